"""virtio-scsi: a SCSI host adapter whose queues a back-end serves (with
vhost-scsi, the kernel's SCSI target, LIO, answers every command).

The guest's driver (virtio_scsi, with sd on top) scans the targets and
LUNs the config space allows and finds the disks the back-end has: with
vhost-scsi, target T is the configfs TPG tpgt_T, LUN N its lun_N. All the
queues go to the back-end: control (task management), events, and the
request queues.
"""

from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.virtio import scsi, spec


class VirtioScsi(VirtioDevice):
    device_id = spec.VIRTIO_ID_SCSI
    queue_max_size = 128

    def __init__(self, backend, request_queues=1, name="virtio-scsi"):
        super().__init__(backend, name)
        self.request_queues = request_queues
        self.num_queues = scsi.FIRST_REQUEST_QUEUE + request_queues

    def config(self):
        return scsi.config(self.request_queues, self.queue_max_size)

    def write_config(self, offset, data):
        # sense_size and cdb_size are the driver's to write; Linux writes the
        # sizes the config already says (96, 32). The kernel's vhost-scsi
        # uses those fixed sizes whatever is written, so the writes change
        # nothing here.
        pass

"""virtio-scsi with no KVM: the wire formats, the device model's config
space, the order in which vhost-scsi gets the rings and the endpoint, and
--scsi on the command line (tests/testbed/test_vhost_scsi.py runs it all
on the real kernel)."""

import pytest

from pyvmm.cli import main
from pyvmm.devices.virtio.device import Queue
from pyvmm.devices.virtio.scsi import VirtioScsi
from pyvmm.devices.virtio.vhost_kernel import VhostKernelScsiBackend
from pyvmm.vhost.backend import VhostError
from pyvmm.virtio import scsi, spec


def test_the_structs_have_the_sizes_of_linux_virtio_scsi_h():
    assert scsi.CONFIG.size == 36
    assert scsi.CMD_REQ.size == 51
    assert scsi.CMD_RESP.size == 108


def test_a_lun_is_written_in_flat_addressing():
    assert scsi.lun_bytes(1, 0) == bytes([1, 1, 0x40, 0, 0, 0, 0, 0])
    assert scsi.lun_bytes(255, 300) == bytes([1, 255, 0x41, 0x2C, 0, 0, 0, 0])
    for target, lun in ((256, 0), (0, 16384), (-1, 0)):
        with pytest.raises(ValueError):
            scsi.lun_bytes(target, lun)


class FakeVhostScsi:
    """/dev/vhost-scsi as the back-end drives it, every call in order."""

    def __init__(self, abi=1, fail_endpoint=False):
        self.calls, self.abi, self.fail_endpoint = [], abi, fail_endpoint

    def set_owner(self):
        self.calls.append("set_owner")

    def get_abi_version(self):
        return self.abi

    def get_features(self):
        return spec.bits(spec.VIRTIO_F_VERSION_1, spec.VIRTIO_RING_F_EVENT_IDX,
                         scsi.VIRTIO_SCSI_F_HOTPLUG, scsi.VIRTIO_SCSI_F_T10_PI)

    def set_features(self, features):
        self.calls.append(("set_features", features))

    def set_mem_table(self, memory):
        self.calls.append("set_mem_table")

    def start_vring(self, index, size, addr, kick, call, err):
        self.calls.append(("start_vring", index))

    def set_endpoint(self, wwpn):
        if self.fail_endpoint:
            raise VhostError("vhost-scsi target naa.x: no usable TPG")
        self.calls.append(("set_endpoint", wwpn))

    def clear_endpoint(self, wwpn):
        self.calls.append(("clear_endpoint", wwpn))

    def get_vring_base(self, index):
        self.calls.append(("get_vring_base", index))
        return 0

    def close(self):
        self.calls.append("close")


class FakeTarget:
    closed = False

    def close(self):
        self.closed = True


def queues(n):
    return [Queue(index=i, size=128, ready=True, desc=0x1000 * (i + 1), kick_fd=10 + i,
                  call_fd=99) for i in range(n)]


def test_the_model_offers_ring_features_only_and_every_queue_goes_to_vhost_scsi():
    vhost = FakeVhostScsi()
    device = VirtioScsi(VhostKernelScsiBackend(vhost, "naa.5001405abc"), request_queues=2)
    assert device.device_id == 8 and device.num_queues == 4
    assert list(device.vhost_queues()) == [0, 1, 2, 3]
    # No HOTPLUG or T10_PI: pyvmm sends no events and no protection data.
    assert device.features == spec.bits(spec.VIRTIO_F_VERSION_1, spec.VIRTIO_RING_F_EVENT_IDX)
    fields = scsi.CONFIG.unpack(device.config())
    assert fields == (2, 126, 0xFFFF, 128, 16, 96, 32, 0, 255, 16383)


def test_the_endpoint_is_set_after_the_rings_and_cleared_before_they_stop():
    vhost = FakeVhostScsi()
    target = FakeTarget()
    backend = VhostKernelScsiBackend(vhost, "naa.5001405abc", target)
    features = spec.bit(spec.VIRTIO_F_VERSION_1)
    backend.start(object(), features, queues(3))
    assert vhost.calls == ["set_owner", ("set_features", features), "set_mem_table",
                           ("start_vring", 0), ("start_vring", 1), ("start_vring", 2),
                           ("set_endpoint", "naa.5001405abc")]
    del vhost.calls[:]
    backend.stop()
    assert vhost.calls == [("clear_endpoint", "naa.5001405abc"), ("get_vring_base", 0),
                           ("get_vring_base", 1), ("get_vring_base", 2)]
    del vhost.calls[:]
    backend.stop()                      # a second reset has nothing to stop
    assert vhost.calls == []
    backend.close()
    assert vhost.calls == ["close"] and target.closed


def test_a_refused_endpoint_stops_the_rings_it_started():
    vhost = FakeVhostScsi(fail_endpoint=True)
    backend = VhostKernelScsiBackend(vhost, "naa.x")
    with pytest.raises(VhostError, match="no usable TPG"):
        backend.start(object(), 0, queues(3))
    assert vhost.calls[-3:] == [("get_vring_base", 0), ("get_vring_base", 1),
                                ("get_vring_base", 2)]
    assert not any(c[0] == "clear_endpoint" for c in vhost.calls if isinstance(c, tuple))


def test_an_unknown_abi_version_is_refused():
    with pytest.raises(VhostError, match="ABI version 2"):
        VhostKernelScsiBackend(FakeVhostScsi(abi=2), "naa.x")


@pytest.mark.parametrize("option, message", [
    ("vhost-kernel", "give image=PATH"),
    ("vhost-user,socket=/x", "must be vhost-kernel"),
    ("vhost-kernel,wwpn=naa.1,tpgt=2", "tpgt=N: only with image="),
    ("vhost-kernel,image=/x,tpgt=256", "tpgt=256: give a number from 0 to 255"),
    ("vhost-kernel,image=/x,queues=0", "queues=0: give a number from 1 to 16"),
    ("vhost-kernel,wwpn=naa/1", "no '/'"),
    ("vhost-kernel,image=/x,lun=3", "unknown option 'lun=3'"),
])
def test_bad_scsi_options_get_one_line(capsys, option, message):
    with pytest.raises(SystemExit) as exit:
        main(["run", "--scsi", option, "--", "true"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1]


@pytest.mark.parametrize("errno_, message", [
    (19, "vhost-scsi target naa.x: no usable TPG"),          # ENODEV (Linux 6.1)
    (17, "vhost-scsi target naa.x: no usable TPG"),          # EEXIST (older kernels)
    (14, "/dev/vhost-scsi: VHOST_SCSI_SET_ENDPOINT: Bad address (target naa.x)"),
])
def test_what_the_kernel_says_to_set_endpoint_is_one_line(monkeypatch, errno_, message):
    import os

    from pyvmm.vhost.kernel import scsi as kernel_scsi

    def refuse(fd, request, arg, name):
        raise OSError(errno_, f"{name}: {os.strerror(errno_)}")
    monkeypatch.setattr(kernel_scsi, "ioctl", refuse)
    vhost = kernel_scsi.VhostKernelScsi.__new__(kernel_scsi.VhostKernelScsi)
    vhost.fd, vhost.path = -1, "/dev/vhost-scsi"
    with pytest.raises(VhostError) as e:
        vhost.set_endpoint("naa.x")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)

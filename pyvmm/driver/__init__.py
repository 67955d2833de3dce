"""A guest-less driver: a back-end's queues driven as a guest would drive
them, with no VM, so that any vhost back-end can be tested on any machine.

    driver.py   Driver: guest memory in a memfd, buffers in it, and the
                queues of one back-end, attached through the same interface
                pyvmm's devices use (QueueBackend): vhost-user or the
                kernel's vhost-net and vhost-scsi
    queue.py    DriverQueue: one split ring's driver side with its kick and
                call eventfds; send a chain, wait for it, check what came back
    devices.py  requests of blk, rng, net, fs, vsock and scsi, one function each
"""

from pyvmm.driver.driver import Driver, DriverError, vhost_net, vhost_scsi, vhost_user
from pyvmm.driver.queue import DriverQueue

__all__ = ["Driver", "DriverError", "DriverQueue", "vhost_net", "vhost_scsi", "vhost_user"]

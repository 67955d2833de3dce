"""Writing vhost-user back-ends in Python.

    device.py   BackendDevice: what a device author implements (and Refused)
    daemon.py   the library: the protocol, memory, ring states, the event loop
    memory.py   guest memory mapped from the front-end's fds
    fds.py      the fds a front-end hands over, checked before they are used
    vring.py    one queue as the library keeps it, and what a device pops and pushes
    inflight.py inflight I/O tracking, so that a successor can finish the work
    logs.py     the library's log, rate-limited
    program.py  `pyvmm backend DEVICE`, by the spec's program conventions
    rng.py      virtio-rng: the smallest useful device, as an example
    blk.py      virtio-blk on an image file
    vsock.py    virtio-vsock to host Unix sockets
"""

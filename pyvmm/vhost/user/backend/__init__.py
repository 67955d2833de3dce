"""Writing vhost-user back-ends in Python.

    device.py   BackendDevice: what a device author implements
    daemon.py   the library: the protocol, memory, ring states, the event loop
    memory.py   guest memory mapped from the front-end's fds
    rng.py      virtio-rng: the smallest useful device, as an example
"""

"""vhost: handing a virtio device's data path to someone else.

backend.py is the one interface both kinds implement: kernel/ drives the
in-kernel vhost drivers through ioctls (/dev/vhost-net, /dev/vhost-vsock);
the vhost-user front-end (next) will speak the same calls over a socket.
"""

from pyvmm.vhost.backend import VhostBackend, VhostError, VringAddr

__all__ = ["VhostBackend", "VhostError", "VringAddr"]

"""What can go wrong on a vhost-user connection, and whose fault it is.

A ProtocolError names the side that broke the protocol (LocalProtocolError:
we were about to; RemoteProtocolError: the peer did) and the rule, by its id
in ../shared/VHOST-USER-CONFORMANCE.md (BE-n for back-end rules, FE-n for
front-end rules) where it has one. After one, the session is over.

Errors of the connection itself (the peer hung up, went silent) are
ChannelErrors: no rule was broken that we could see, but nothing more can
be said on that socket.
"""

from pyvmm.vhost.backend import VhostError


class VhostUserError(VhostError):
    """Anything that ends a vhost-user session; the message is one line."""


class ProtocolError(VhostUserError):
    def __init__(self, message, rule=None):
        self.rule = rule
        super().__init__(f"{message} ({rule})" if rule else message)


class LocalProtocolError(ProtocolError):
    """We were about to break the protocol (a bug in pyvmm, or a caller's)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol."""


class PeerRefused(RemoteProtocolError):
    """The peer answered a request with a non-zero REPLY_ACK status."""


class ChannelError(VhostUserError):
    """The socket failed: the peer hung up or stopped answering."""


class Disconnected(ChannelError):
    """The peer closed the connection (perhaps in the middle of a message)."""


class Truncated(Disconnected):
    """The peer closed the connection in the middle of a message."""


class ChannelTimeout(ChannelError):
    """The peer did not answer within the read timeout."""


class ConnectionDead(ChannelError):
    """An earlier failure left the connection unusable; nothing was sent."""

"""vhost-user: one protocol core, sans-I/O, that every vhost-user piece shares.

    messages   requests of both channels, header flags, feature bits, payloads
    rules      the protocol as data: per request its payload, fds, gating
               feature, how it is answered, who sends it
    wire       framing: bytes and fds in, frames out
    session    the state machine of one connection, for a front-end, a
               back-end or an observer; errors name the side and the rule
    errors     what can go wrong, and whose fault it is
    channel    the only socket code (SCM_RIGHTS, deadlines, EOF mid-message)
"""

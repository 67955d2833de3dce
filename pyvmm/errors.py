"""The one base class of the errors a user can cause or fix.

Every layer raises its own kind (KvmError, LoaderError, VhostError, ...),
each message a single line that says what went wrong and what to do; the
command line catches them all by this base and prints that line.
"""


class PyvmmError(Exception):
    """An error for the user: the message is one line, no traceback needed."""

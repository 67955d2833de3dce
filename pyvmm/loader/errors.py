from pyvmm.errors import PyvmmError


class LoaderError(PyvmmError):
    """A kernel or initrd that cannot be booted; the message is for the user."""

class LoaderError(Exception):
    """A kernel or initrd that cannot be booted; the message is for the user."""

"""Opening a kernel or initrd file and reading it straight into guest memory.

Only regular files are accepted: /dev/zero would never end and a FIFO would
block the open (it is opened with O_NONBLOCK, then checked). An initrd
larger than guest RAM cannot be booted, so it is refused before any byte of
it is read. (A kernel is not limited as a whole: a vmlinux with debug
information can be far larger than what it loads; its segments are
checked one by one.) What is read goes straight into guest memory, without
a copy in pyvmm's own heap.
"""

import os
import stat

from pyvmm.loader.errors import LoaderError

MiB = 1 << 20

FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device",
              stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO",
              stat.S_IFSOCK: "a socket"}


class Image:
    """An open kernel or initrd; `what` ("kernel", "initrd") names it in errors;
    a file larger than limit bytes (if given) is refused."""

    def __init__(self, path, what, limit=None):
        self.path, self.what = path, what
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise LoaderError(f"{what} {path} does not exist") from None
        except OSError as e:
            raise LoaderError(f"cannot open {what} {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = FILE_KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
                raise LoaderError(f"{what} {path} is {kind}, not a regular file")
            if limit is not None and st.st_size > limit:
                raise LoaderError(f"{what} {path} is {st.st_size / MiB:.0f} MiB, more than the "
                                  f"guest's {limit / MiB:.0f} MiB of memory (give more --mem)")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        self.size = st.st_size
        self.file = open(fd, "rb", buffering=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def read_at(self, offset, length):
        """length bytes at offset (for headers: small)."""
        if offset + length > self.size:
            raise LoaderError(f"{self.path}: truncated: {length} bytes at offset {offset:#x} "
                              f"lie beyond its end")
        self.file.seek(offset)
        data = self.file.read(length)
        if len(data) != length:
            raise LoaderError(f"{self.path}: shorter than its size while reading")
        return data

    def read_into(self, offset, view):
        """Fill view (a writable slice of guest memory) from offset, without a copy."""
        if offset + len(view) > self.size:
            raise LoaderError(f"{self.path}: {len(view)} bytes at offset {offset:#x} lie "
                              f"beyond its end")
        self.file.seek(offset)
        done = 0
        while done < len(view):
            n = self.file.readinto(view[done:])
            if not n:
                raise LoaderError(f"{self.path}: shorter than its size while reading")
            done += n

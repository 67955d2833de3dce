"""Linux boot for x86_64: vmlinux (ELF) or bzImage, initrd, zero page, MP table."""

from pyvmm.loader.errors import LoaderError
from pyvmm.loader.linux import BootInfo, load_linux

__all__ = ["BootInfo", "LoaderError", "load_linux"]

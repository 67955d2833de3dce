"""ioctl(2) through ctypes, and the _IO/_IOR/_IOW/_IOWR number macros.

ctypes releases the GIL for the duration of the call, which matters for
KVM_RUN: a vCPU thread blocked in the guest must not stop the others.
"""

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.restype = ctypes.c_int

# include/uapi/asm-generic/ioctl.h
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction, type_, nr, size):
    return ((direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT)
            | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT))


def _size(struct):
    return struct if isinstance(struct, int) else ctypes.sizeof(struct)


def _IO(type_, nr):
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_, nr, struct):
    return _IOC(_IOC_READ, type_, nr, _size(struct))


def _IOW(type_, nr, struct):
    return _IOC(_IOC_WRITE, type_, nr, _size(struct))


def _IOWR(type_, nr, struct):
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, _size(struct))


def ioctl(fd, request, arg=0, name=None):
    """Issue an ioctl; arg is an int or a ctypes object (passed by reference).

    Returns the non-negative result; raises OSError (with the request's
    name, when given) on failure.
    """
    if isinstance(arg, int):
        arg = ctypes.c_ulong(arg)
    else:
        arg = ctypes.byref(arg)
    ret = _libc.ioctl(fd, ctypes.c_ulong(request), arg)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name or hex(request)}: {os.strerror(err)}")
    return ret

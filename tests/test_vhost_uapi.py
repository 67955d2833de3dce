"""pyvmm/vhost/kernel/uapi.py against <linux/vhost.h>: compile a C probe and
compare every ioctl number and struct layout (as tests/test_kvm_uapi.py does
for KVM)."""

import ctypes

import pytest
from cprobe import c_values

from pyvmm.vhost.kernel import uapi

# Every number uapi.py names: ioctls, feature bits, VHOST_FILE_UNBIND, the ABI.
IOCTLS = sorted(name for name, value in vars(uapi).items()
                if name.startswith("VHOST_") and isinstance(value, int))
STRUCTS = ["vhost_vring_state", "vhost_vring_file", "vhost_vring_addr", "vhost_memory_region",
           "vhost_scsi_target"]
OFFSETS = [("vhost_scsi_target", "vhost_wwpn"), ("vhost_scsi_target", "vhost_tpgt"),
           ("vhost_scsi_target", "reserved"), ("vhost_vring_addr", "log_guest_addr")]


@pytest.fixture(scope="module")
def kernel_values(tmp_path_factory):
    return c_values(tmp_path_factory.mktemp("vhost-uapi"), ["linux/vhost.h"],
                    IOCTLS, STRUCTS, OFFSETS)


def test_every_ioctl_is_probed():
    assert "VHOST_SCSI_SET_ENDPOINT" in IOCTLS and "VHOST_SET_VRING_KICK" in IOCTLS
    assert "VHOST_SCSI_ABI_VERSION" in IOCTLS and "VHOST_F_LOG_ALL" in IOCTLS


@pytest.mark.parametrize("name", IOCTLS)
def test_numbers_match(kernel_values, name):
    assert getattr(uapi, name) == kernel_values[name]


@pytest.mark.parametrize("name", STRUCTS)
def test_struct_sizes_match(kernel_values, name):
    assert ctypes.sizeof(getattr(uapi, name)) == kernel_values[f"sizeof {name}"]


@pytest.mark.parametrize("struct,field", OFFSETS)
def test_field_offsets_match(kernel_values, struct, field):
    assert getattr(uapi, struct).__dict__[field].offset == \
        kernel_values[f"offsetof {struct}.{field}"]


def test_a_wwpn_too_long_or_empty_is_one_clear_error():
    from pyvmm.vhost.backend import VhostError
    from pyvmm.vhost.kernel.scsi import scsi_target
    target = scsi_target("naa.5001405123456789")
    assert target.vhost_wwpn == b"naa.5001405123456789" and target.reserved == 0
    for bad in ("", "n" * 224, "naa.1\0"):
        with pytest.raises(VhostError, match="give a name of 1 to 223 bytes"):
            scsi_target(bad)

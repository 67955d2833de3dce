"""The committed guest images: checksums, formats, and the config they came from."""

import gzip
import hashlib
import re
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from pyvmm import guest

IMAGES = Path(guest.IMAGES)


def test_sha256sums_match(top):
    lines = (IMAGES / "SHA256SUMS").read_text().splitlines()
    names = {line.split()[1] for line in lines}
    assert names >= {f"images/{n}" for n in ("vmlinux", "bzImage", "initramfs.cpio.gz",
                                             "kernel.config", "MANIFEST")}
    for line in lines:
        digest, name = line.split()
        assert hashlib.sha256((top / name).read_bytes()).hexdigest() == digest, name


def test_sha256sum_tool_agrees(top):
    r = subprocess.run(["sha256sum", "-c", "images/SHA256SUMS"], cwd=top,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_images_stay_small():
    total = sum(p.stat().st_size for p in IMAGES.iterdir())
    assert total < 25 * 1024 * 1024


def test_vmlinux_is_x86_64_elf_with_pvh_entry():
    with open(guest.VMLINUX, "rb") as f:
        elf = ELFFile(f)
        assert elf.elfclass == 64 and elf["e_machine"] == "EM_X86_64"
        assert any(seg["p_type"] == "PT_LOAD" for seg in elf.iter_segments())
        # XEN_ELFNOTE_PHYS32_ENTRY (18) in a "Xen" note: the PVH entry point.
        notes = [n for seg in elf.iter_segments() if seg["p_type"] == "PT_NOTE"
                 for n in seg.iter_notes()]
        assert any(n["n_name"] == "Xen" and n["n_type"] == 18 for n in notes)


def test_bzimage_has_a_modern_boot_header():
    data = Path(guest.BZIMAGE).read_bytes()
    # Documentation/arch/x86/boot.rst: "HdrS" at 0x202, protocol version at 0x206.
    assert data[0x202:0x206] == b"HdrS"
    (version,) = struct.unpack_from("<H", data, 0x206)
    assert version >= 0x020C  # 2.12: 64-bit entry, xloadflags


def cpio_names(data):
    """Names in a "newc" cpio archive (the initramfs format)."""
    names, off = [], 0
    while off < len(data):
        assert data[off:off + 6] == b"070701"
        fields = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        filesize, namesize = fields[6], fields[11]
        name = data[off + 110: off + 110 + namesize - 1].decode()
        if name == "TRAILER!!!":
            return names
        names.append(name)
        off = (off + 110 + namesize + 3) & ~3
        off = (off + filesize + 3) & ~3
    raise AssertionError("no TRAILER!!! entry")


def test_initramfs_holds_busybox_and_the_init():
    names = set(cpio_names(gzip.decompress(Path(guest.INITRAMFS).read_bytes())))
    for name in ("init", "bin/busybox", "bin/sh", "bin/vsock", "dev/console", "etc/inittab",
                 "etc/init.d/rcS", "sbin/pyvmm-main", "sbin/pyvmm-exit", "sbin/pyvmm-outb"):
        assert name in names


def fragment_lines():
    for line in (IMAGES.parent / "guest" / "kernel.config").read_text().splitlines():
        if re.match(r"^(CONFIG_\w+=|# CONFIG_\w+ is not set$)", line):
            yield line


@pytest.mark.parametrize("line", list(fragment_lines()))
def test_built_config_has_every_fragment_line(line):
    config = (IMAGES / "kernel.config").read_text()
    m = re.match(r"^# (CONFIG_\w+) is not set$", line)
    if m:
        assert not re.search(rf"^{m.group(1)}=", config, re.M)
    else:
        assert line in config.splitlines()


def guest_digest():
    """Same as guest_digest() in scripts/build-guest."""
    guest_dir = IMAGES.parent / "guest"
    files = [p for p in guest_dir.rglob("*") if p.is_file() and p.name != "README.md"]
    lines = []
    for rel in sorted(str(p.relative_to(guest_dir)) for p in files):
        path = guest_dir / rel
        mode = format(path.stat().st_mode & 0o7777, "o")
        lines.append(f"{rel} {mode} {hashlib.sha256(path.read_bytes()).hexdigest()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def test_images_were_built_from_this_guest_folder():
    manifest = (IMAGES / "MANIFEST").read_text()
    m = re.search(r"^guest: +([0-9a-f]{64})$", manifest, re.M)
    assert m, "MANIFEST has no guest: line"
    assert m.group(1) == guest_digest(), (
        "guest/ changed since images/ were built: run scripts/build-guest")


def test_manifest_names_the_debian_packages():
    manifest = (IMAGES / "MANIFEST").read_text()
    assert re.search(r"^kernel: +6\.12\.\d+ from Debian linux-source-6\.12 \S+", manifest, re.M)
    assert re.search(r"^busybox: +Debian busybox-static \S+", manifest, re.M)

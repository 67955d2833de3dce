"""vhost-scsi in the testbed (issue 21): the LIO target helper on the real
configfs, /dev/vhost-scsi's own ioctls, the guest-less driver's SCSI
commands, and a guest that finds the file as its disk sda."""

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest
from guestvm import finish, start

from pyvmm.driver import vhost_scsi
from pyvmm.memory import GuestMemory
from pyvmm.driver.devices import (scsi_command, scsi_inquiry, scsi_read10, scsi_read_capacity,
                                  scsi_write10)
from pyvmm.vhost.backend import VhostError
from pyvmm.vhost.kernel.scsi import VhostKernelScsi
from pyvmm.vhost.kernel.scsi_target import TARGET, ScsiTarget
from pyvmm.virtio import scsi

pytestmark = [pytest.mark.testbed, pytest.mark.usefixtures("transport")]

MiB = 1 << 20


def image(tmp_path, size, name="disk.img"):
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


def configfs_entries():
    """What configfs has now, to compare with afterwards: nothing left behind."""
    return sorted(str(p.relative_to(TARGET)) for p in TARGET.rglob("*")
                  if p.is_dir() and not p.is_symlink() and p.parent.name in ("core", "vhost"))


def test_a_target_is_made_on_configfs_and_taken_away_again(tmp_path):
    disk = image(tmp_path, MiB)
    before = configfs_entries()
    with ScsiTarget(disk, tpgt=1) as target:
        tpg = TARGET / "vhost" / target.wwpn / "tpgt_1"
        assert (tpg / "nexus").read_text().strip() == target.nexus
        link = tpg / "lun" / "lun_0" / "pyvmm"
        assert link.is_symlink() and Path(link.resolve(), "enable").read_text().strip() == "1"
        vhost = VhostKernelScsi()
        memory = GuestMemory(MiB)
        try:
            vhost.set_owner()
            assert vhost.get_abi_version() == 1
            with pytest.raises(VhostError, match="Bad address"):
                vhost.set_endpoint(target.wwpn)      # no memory table yet: EFAULT
            vhost.set_mem_table(memory)
            with pytest.raises(VhostError, match="no usable TPG"):
                vhost.set_endpoint("naa.500140500000dead")        # no such target
        finally:
            vhost.close()
            memory.close()
    assert configfs_entries() == before


def test_the_driver_inquires_reads_and_writes_with_no_vm(tmp_path):
    """Item 3: SCSI commands straight to vhost-scsi, as the guest's sd would
    send them, with no VM; LIO answers from the file."""
    disk = image(tmp_path, 4 * MiB)
    before = configfs_entries()
    with vhost_scsi(disk, tpgt=1) as d:
        queues = d.start(queues=[(0, 128), (1, 128), (2, 128)])
        q = queues[scsi.FIRST_REQUEST_QUEUE]
        kind, vendor, product = scsi_inquiry(d, q)
        assert (kind, vendor) == (0, "LIO-ORG"), (kind, vendor, product)   # 0: a disk
        assert scsi_read_capacity(d, q) == (4 * MiB // 512, 512)
        assert scsi_read10(d, q, lba=0, blocks=2048) == disk.read_bytes()[:MiB]
        data = os.urandom(64 * 1024)
        scsi_write10(d, q, lba=4096, data=data)
        assert scsi_read10(d, q, lba=4096, blocks=128) == data
        # A LUN that is not there: LIO answers, with CHECK CONDITION.
        response, status, sense, _ = scsi_command(d, q, [0x12, 0, 0, 0, 96, 0], lun=5,
                                                  data_in=96)
        assert response == scsi.VIRTIO_SCSI_S_OK and (status == scsi.SAM_STAT_CHECK_CONDITION
                                                      or _no_lun_inquiry(d, q))
    with open(disk, "rb") as f:
        f.seek(4096 * 512)
        assert f.read(len(data)) == data
    assert configfs_entries() == before


def _no_lun_inquiry(d, q):
    """LIO may answer INQUIRY for a missing LUN with 'no device' (type 0x7f)."""
    response, status, _, data = scsi_command(d, q, [0x12, 0, 0, 0, 96, 0], lun=5, data_in=96)
    return status == scsi.SAM_STAT_GOOD and data[0] == 0x7F


def test_the_guest_sees_the_file_as_sda(tmp_path):
    """Acceptance: capacity and the SHA-256 of 4 MiB as the file's; a write
    with fsync reaches the file; a file system made by the guest on a second
    adapter's disk is clean for e2fsck."""
    disk = image(tmp_path, 8 * MiB)
    fs_disk = tmp_path / "fs.img"
    fs_disk.write_bytes(bytes(16 * MiB))
    before = configfs_entries()
    proc = start("--scsi", f"vhost-kernel,image={disk}", "--scsi", f"vhost-kernel,image={fs_disk}",
                 guest_cmd="echo size $(cat /sys/block/sda/size) $(cat /sys/block/sdb/size); "
                           "head -c 4194304 /dev/sda | sha256sum; "
                           "head -c 65536 /dev/urandom > /tmp/w && sha256sum /tmp/w && "
                           "dd if=/tmp/w of=/dev/sda bs=65536 seek=64 conv=fsync 2>/dev/null && "
                           "mke2fs -q /dev/sdb && sync && echo made")
    rc, out, err = finish(proc)
    assert rc == 0, out + err
    assert re.search(r"vhost-scsi target naa\.5001405\w+; LUN 0 of target 1 is", err), err
    sizes = re.search(r"^size (\d+) (\d+)$", out, re.M)
    assert sizes and sizes.groups() == (str(8 * MiB // 512), str(16 * MiB // 512)), out
    sums = re.findall(r"^([0-9a-f]{64})\s", out, re.M)
    data = disk.read_bytes()
    assert sums[0] == hashlib.sha256(data[:4 * MiB]).hexdigest()
    assert sums[1] == hashlib.sha256(data[4 * MiB:4 * MiB + 65536]).hexdigest()
    assert "made" in out
    fsck = subprocess.run(["e2fsck", "-fn", str(fs_disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert configfs_entries() == before


def test_a_target_that_does_not_exist_is_one_line(tmp_path):
    proc = start("--scsi", "vhost-kernel,wwpn=naa.500140500000beef", guest_cmd="true")
    rc, out, err = finish(proc)
    assert rc == 1, out + err
    assert err.splitlines()[-1] == (
        "pyvmm: error: vhost-scsi target naa.500140500000beef: no such target in "
        "/sys/kernel/config/target/vhost (make it first, e.g. with targetcli, or give image=PATH)")
    assert "Traceback" not in err

"""A LIO SCSI target for vhost-scsi, made in configfs and taken away again.

What `targetcli` would do, in the few configfs writes it takes
(Documentation/target/, rtslib's fileio and vhost fabric):

    core/fileio_N/NAME          a backstore: control "fd_dev_name=IMAGE,fd_dev_size=BYTES",
                                then enable 1
    vhost/WWPN/tpgt_T           the target port group the guest sees as target T
    vhost/WWPN/tpgt_T/nexus     the I_T nexus (the initiator side, in demo mode)
    vhost/WWPN/tpgt_T/lun/lun_0 LUN 0: a symbolic link to the backstore

close() takes away, in the reverse order, exactly what this made, and
leaves anything else in configfs alone. The kernel refuses to drop a TPG
that a VM still has (EBUSY): close /dev/vhost-scsi first.
"""

import errno
import logging
import os
import secrets
from pathlib import Path

from pyvmm.errors import PyvmmError

log = logging.getLogger("pyvmm.scsi")

TARGET = Path("/sys/kernel/config/target")


class ScsiTargetError(PyvmmError):
    pass


def new_wwpn():
    """A WWPN in the form rtslib makes them: naa.5001405 and 9 random hex digits."""
    return "naa.5001405" + secrets.token_hex(5)[:9]


def check_target(wwpn, root=TARGET):
    """A target made beforehand: is there one by that name, with a TPG the
    kernel can serve (one with a nexus)? Said before the VM starts, since
    the kernel only tells at the guest's DRIVER_OK, and then only as ENODEV."""
    target = Path(root) / "vhost" / wwpn
    if not target.is_dir():
        raise ScsiTargetError(f"vhost-scsi target {wwpn}: no such target in {target.parent} "
                              f"(make it first, e.g. with targetcli, or give image=PATH)")
    tpgs = sorted(target.glob("tpgt_*"))
    if not any(_has_nexus(tpg) for tpg in tpgs):
        raise ScsiTargetError(f"vhost-scsi target {wwpn}: none of its "
                              f"{len(tpgs)} TPGs has a nexus (write an initiator name to "
                              f"{target}/tpgt_N/nexus)")


def _has_nexus(tpg):
    try:
        return bool((tpg / "nexus").read_text().strip())
    except OSError:                 # (vhost-scsi answers ENODEV for a TPG without one)
        return False


class ScsiTarget:
    def __init__(self, image, wwpn=None, tpgt=1, name="pyvmm", root=TARGET):
        """image: a regular file, LUN 0's contents; wwpn: the target's name
        (default: a new one); tpgt: the target number the guest sees."""
        self.image = Path(image).resolve()
        self.wwpn = wwpn or new_wwpn()
        self.nexus = new_wwpn()
        self.tpgt = tpgt
        self.name = name
        self.root = Path(root)
        self._made = []            # paths this made, in the order it made them

    def __enter__(self):
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def create(self):
        if not self.root.is_dir():
            raise ScsiTargetError(f"no LIO target in configfs ({self.root}): load target_core_mod "
                                  f"and mount configfs (mount -t configfs none /sys/kernel/config)")
        if not self.image.is_file() or self.image.stat().st_size == 0:
            raise ScsiTargetError(f"{self.image}: give a regular file with something in it")
        if not 0 <= self.tpgt < 256:
            raise ScsiTargetError(f"tpgt={self.tpgt}: give a number from 0 to 255")
        vhost = self.root / "vhost"
        if (vhost / self.wwpn).exists():
            raise ScsiTargetError(f"vhost-scsi target {self.wwpn} exists already (not ours)")
        index = min(set(range(1000)) - self._hba_indexes())
        backstore = self.root / "core" / f"fileio_{index}" / self.name
        self._mkdir(backstore.parent)
        self._mkdir(backstore)
        self._write(backstore / "control",
                    f"fd_dev_name={self.image},fd_dev_size={self.image.stat().st_size}")
        self._write(backstore / "enable", "1")
        if not vhost.is_dir():
            self._mkdir(vhost, missing="load the vhost_scsi module (modprobe vhost_scsi)")
        tpg = vhost / self.wwpn / f"tpgt_{self.tpgt}"
        self._mkdir(tpg.parent)
        self._mkdir(tpg)
        self._write(tpg / "nexus", self.nexus)
        lun = tpg / "lun" / "lun_0"
        self._mkdir(lun.parent)     # (configfs makes it with the TPG)
        self._mkdir(lun)
        link = lun / self.name
        try:
            os.symlink(backstore, link)
        except OSError as e:
            raise ScsiTargetError(f"cannot link LUN 0 ({link}) to {backstore}: "
                                  f"{e.strerror}") from None
        self._made.append(link)
        log.info("vhost-scsi target %s: tpgt %d, LUN 0 on %s", self.wwpn, self.tpgt, self.image)

    def close(self):
        """Take away what create() made, the last first."""
        while self._made:
            path = self._made.pop()
            try:
                if path.is_symlink():
                    path.unlink()
                else:
                    path.rmdir()
            except OSError as e:
                log.warning("could not remove %s: %s", path, e.strerror)

    def _hba_indexes(self):
        """The N of every core/PLUGIN_N: a new HBA takes an index none has."""
        taken = set()
        for hba in (self.root / "core").iterdir():
            kind, _, n = hba.name.rpartition("_")
            if kind and n.isdigit():
                taken.add(int(n))
        return taken

    def _mkdir(self, path, missing=None):
        try:
            path.mkdir()
        except FileExistsError:
            return                  # (made by someone else: not ours to take away)
        except OSError as e:
            hint = f": {missing}" if missing and e.errno in (errno.EINVAL, errno.ENOENT) else ""
            raise ScsiTargetError(f"cannot make {path}: {e.strerror}{hint}") from None
        self._made.append(path)

    def _write(self, path, text):
        try:
            path.write_text(text + "\n")
        except OSError as e:
            raise ScsiTargetError(f"writing {text!r} to {path}: {e.strerror}") from None

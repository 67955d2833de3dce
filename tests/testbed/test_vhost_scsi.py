"""vhost-scsi in the testbed (issue 21, first steps): the LIO target helper on
the real configfs, and /dev/vhost-scsi's own ioctls."""

from pathlib import Path

import pytest

from pyvmm.vhost.backend import VhostError
from pyvmm.vhost.kernel.scsi import VhostKernelScsi
from pyvmm.vhost.kernel.scsi_target import TARGET, ScsiTarget

pytestmark = pytest.mark.testbed


def test_a_target_is_made_on_configfs_and_taken_away_again(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    before = sorted(p.name for p in (TARGET / "core").iterdir())
    with ScsiTarget(image, tpgt=1) as target:
        tpg = TARGET / "vhost" / target.wwpn / "tpgt_1"
        assert (tpg / "nexus").read_text().strip() == target.nexus
        link = tpg / "lun" / "lun_0" / "pyvmm"
        assert link.is_symlink() and Path(link.resolve(), "enable").read_text().strip() == "1"
        vhost = VhostKernelScsi()
        try:
            vhost.set_owner()
            assert vhost.get_abi_version() == 1
            with pytest.raises(VhostError, match="no usable TPG"):
                vhost.set_endpoint("naa.500140500000dead")        # no such target
        finally:
            vhost.close()
    assert sorted(p.name for p in (TARGET / "core").iterdir()) == before
    assert not (TARGET / "vhost" / target.wwpn).exists()

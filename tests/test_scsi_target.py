"""The vhost-scsi target helper against a stand-in configfs (a directory
tree): what it writes, and that close() takes away exactly what it made.
tests/testbed/test_vhost_scsi.py runs it on the real configfs."""

import pytest

from pyvmm.vhost.kernel.scsi_target import ScsiTarget, ScsiTargetError


def tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def configfs(tmp_path):
    root = tmp_path / "target"
    (root / "core" / "fileio_0" / "someone").mkdir(parents=True)   # another user's
    (root / "core" / "iblock_1").mkdir()
    (root / "vhost").mkdir()
    return root


def test_a_target_is_made_and_taken_away_to_the_byte(tmp_path, configfs):
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 4096)
    before = tree(configfs)
    with ScsiTarget(image, wwpn="naa.5001405000000001", tpgt=3, root=configfs) as t:
        bs = configfs / "core" / "fileio_2" / "pyvmm"            # the first free index
        assert (bs / "control").read_text() == f"fd_dev_name={image},fd_dev_size=4096\n"
        assert (bs / "enable").read_text() == "1\n"
        tpg = configfs / "vhost" / "naa.5001405000000001" / "tpgt_3"
        assert (tpg / "nexus").read_text() == t.nexus + "\n" and t.nexus.startswith("naa.")
        assert (tpg / "lun" / "lun_0" / "pyvmm").resolve() == bs
        (bs / "control").unlink()          # (the real configfs has no files to remove)
        (bs / "enable").unlink()
        (tpg / "nexus").unlink()
    assert tree(configfs) == before


def test_what_is_wrong_is_one_line(tmp_path, configfs):
    image = tmp_path / "disk.img"
    image.write_bytes(b"x")
    (configfs / "vhost" / "naa.5001405000000002").mkdir()
    before = tree(configfs)
    with pytest.raises(ScsiTargetError, match="exists already"):
        ScsiTarget(image, wwpn="naa.5001405000000002", root=configfs).__enter__()
    assert tree(configfs) == before                 # the backstore it made went again
    with pytest.raises(ScsiTargetError, match="load target_core_mod"):
        ScsiTarget(image, root=tmp_path / "nowhere").create()
    with pytest.raises(ScsiTargetError, match="a regular file"):
        ScsiTarget(tmp_path, root=configfs).create()
    with pytest.raises(ScsiTargetError, match="tpgt=256"):
        ScsiTarget(image, tpgt=256, root=configfs).create()



def test_a_lun_the_kernel_will_not_link_is_one_line(tmp_path, configfs, monkeypatch):
    """(configfs refuses a link to a backstore that is not enabled, say.)"""
    image = tmp_path / "disk.img"
    image.write_bytes(b"x")
    before = tree(configfs)

    def refuse(src, dst):
        raise OSError(13, "Permission denied")
    monkeypatch.setattr("pyvmm.vhost.kernel.scsi_target.os.symlink", refuse)
    # (configfs's attribute files go with their directory; the stand-in's would not)
    monkeypatch.setattr(ScsiTarget, "_write", lambda self, path, text: None)
    with pytest.raises(ScsiTargetError, match=r"cannot link LUN 0 \(.*lun_0/pyvmm\) to .*: "
                                              "Permission denied"):
        ScsiTarget(image, root=configfs).__enter__()
    assert tree(configfs) == before


def test_a_target_made_beforehand_is_checked_before_the_vm_starts(configfs):
    from pyvmm.vhost.kernel.scsi_target import check_target
    with pytest.raises(ScsiTargetError, match="no such target"):
        check_target("naa.5001405000000003", root=configfs)
    tpg = configfs / "vhost" / "naa.5001405000000003" / "tpgt_1"
    tpg.mkdir(parents=True)
    (tpg / "nexus").write_text("\n")                # configfs reads an unset nexus as empty
    with pytest.raises(ScsiTargetError, match="none of its 1 TPGs has a nexus"):
        check_target("naa.5001405000000003", root=configfs)
    (tpg / "nexus").write_text("naa.5001405000000004\n")
    check_target("naa.5001405000000003", root=configfs)

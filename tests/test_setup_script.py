"""scripts/setup in a checkout that has no compiled ring walk yet (a fresh
clone, as CI's): it builds it, and exits 0. No KVM."""

import shutil
import subprocess


def test_setup_builds_the_ring_walk_in_a_checkout_without_one(tmp_path, top):
    """(Under `set -euo pipefail`, looking for a build that was not there
    once ended scripts/setup silently, with status 2, right after pip.)"""
    for name in ("scripts", "pyvmm"):
        shutil.copytree(top / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("_ring_walk.*", "__pycache__"))
    shutil.copy2(top / "pyproject.toml", tmp_path)       # its time kept: no pip run
    (tmp_path / ".venv").symlink_to(top / ".venv")
    done = subprocess.run(["bash", str(tmp_path / "scripts" / "setup")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "building the compiled ring walk" in done.stderr
    assert list((tmp_path / "pyvmm" / "virtio").glob("_ring_walk.*.so"))

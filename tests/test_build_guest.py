"""scripts/build-guest reproduces the committed kernel configuration."""

import subprocess

import pytest


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_check_config_reproduces_images_config(top):
    # Installs and unpacks linux-source-6.12 on first use (about a minute).
    r = subprocess.run([str(top / "scripts" / "build-guest"), "--check-config"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("matches images/kernel.config" in r.stderr
            or "built from another linux-source" in r.stderr)


def test_unknown_option_is_one_line(top):
    r = subprocess.run([str(top / "scripts" / "build-guest"), "--bogus"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["build-guest: error: unknown option: --bogus (see --help)"]

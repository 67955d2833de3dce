"""Test tiers (see README.md, "Tests").

- unmarked: host tests, no KVM needed, fast.
- @pytest.mark.testbed: need real KVM or /dev/vhost-*; they run inside
  scripts/testbed, all in one VM. Outside it they fail (never skip).
- @pytest.mark.launches_testbed: run on the host and start scripts/testbed
  themselves, one VM at a time.
"""

import os
from pathlib import Path

import pytest

# pytester: tests of pyvmm's own pytest plugin (pyvmm/pytest_plugin.py) run
# pytest on small test files.
pytest_plugins = ["pytester"]

TOP = Path(__file__).resolve().parent.parent
IN_TESTBED = bool(os.environ.get("PYVMM_TESTBED"))


def pytest_runtest_setup(item):
    if item.get_closest_marker("testbed") and not IN_TESTBED:
        pytest.fail("needs real KVM and vhost: run it inside the testbed, "
                    "scripts/testbed -- .venv/bin/python -m pytest -m testbed", pytrace=False)
    if item.get_closest_marker("launches_testbed") and IN_TESTBED:
        pytest.fail("starts scripts/testbed itself: run it on the host", pytrace=False)


@pytest.fixture
def top():
    """The checkout's top directory."""
    return TOP


@pytest.fixture
def memory16():
    """16 MiB of guest memory in a memfd, as a VM would have."""
    from pyvmm.memory import GuestMemory
    m = GuestMemory(16 << 20)
    yield m
    m.close()

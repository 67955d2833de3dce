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


# --- resuming the testbed tier ---------------------------------------------------------
# Now and then the testbed VM itself freezes (nested KVM under TCG), and
# scripts/test runs the tier again. With --passed-file FILE, each test that
# passes is written to FILE, and tests already in it are not run again: the
# next attempt runs only what the frozen one did not finish.

def pytest_addoption(parser):
    parser.addoption("--passed-file", metavar="FILE",
                     help="record passed tests in FILE, and skip collecting those already "
                          "in it (scripts/test's testbed tier resumes with it)")


_passed = {"file": None, "calls": set()}


def pytest_configure(config):
    path = config.getoption("passed_file")
    _passed["file"] = Path(path) if path else None


def pytest_collection_modifyitems(config, items):
    path = _passed["file"]
    if path is None or not path.exists():
        return
    passed = set(path.read_text().split("\n"))
    done = [item for item in items if item.nodeid in passed]
    if done:
        items[:] = [item for item in items if item.nodeid not in passed]
        config.hook.pytest_deselected(items=done)


_reruns = []          # reports of failed attempts that ran again (pytest-rerunfailures)


def pytest_runtest_logreport(report):
    if report.outcome == "rerun":
        _reruns.append(report)
    # Passed: its call passed, and then its teardown too.
    if _passed["file"] is None:
        return
    if report.when == "call" and report.passed:
        _passed["calls"].add(report.nodeid)
    elif report.when == "teardown" and report.passed and report.nodeid in _passed["calls"]:
        with open(_passed["file"], "a") as f:
            f.write(report.nodeid + "\n")


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


@pytest.fixture(params=["compiled", "python"])
def ring_walk(request, monkeypatch):
    """Ring tests run on both chain walks: with `pytest.mark.usefixtures(
    "ring_walk")` in a module's pytestmark, every DeviceRing made on memory
    with host addresses walks in C (pyvmm/virtio/ring_walk.c; and blk's
    reads and writes go through blk_requests.c), then in Python (the
    reference). The compiled case fails, not skips, where the walk was not
    built: scripts/setup builds it."""
    from pyvmm.virtio import compiled_ring
    monkeypatch.setattr(compiled_ring, "walker", lambda: request.param)
    return request.param


@pytest.fixture(params=["pci", "mmio"])
def transport(request, monkeypatch):
    """The testbed's device suites run on both virtio transports: a module
    with `pytest.mark.usefixtures("transport")` in its pytestmark runs each
    test with the guest's devices on virtio-pci (MSI-X), then on
    virtio-mmio. `pyvmm run` takes its --transport default from
    $PYVMM_TRANSPORT, which every pyvmm a test starts inherits."""
    monkeypatch.setenv("PYVMM_TRANSPORT", request.param)
    return request.param


def pytest_terminal_summary(terminalreporter):
    """Why each rerun test failed the first time (the summary only names it):
    in a CI log, that tells a nested guest's reset from a real failure."""
    for report in _reruns:
        terminalreporter.write_sep("-", f"first attempt of {report.nodeid} ({report.when})")
        terminalreporter.write_line(report.longreprtext[-3000:])

"""A back-end author's first tests, with pyvmm's pytest plugin (installed
with pyvmm: the fixtures need no import). The back-ends here are pyvmm's
own Python ones; put your program's command line in their place."""

import sys

from pyvmm.driver.devices import blk_read, blk_write, rng_read
from pyvmm.pytest_plugin import must_failures

BACKEND = [sys.executable, "-m", "pyvmm", "backend"]


def test_entropy(vhost_user_driver):
    d = vhost_user_driver(BACKEND + ["rng", "--socket-path", "{socket}"])
    q = d.start(queues=[(0, 64)])[0]
    assert len(rng_read(d, q, 32)) == 32


def test_a_disk_keeps_what_is_written(vhost_user_driver, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    d = vhost_user_driver(BACKEND + ["blk", "--socket-path", "{socket}", "--image", str(image)])
    q = d.start(queues=[(0, 128)])[0]
    assert blk_write(d, q, sector=1, data=b"hello".ljust(512, b"\0")) == 0
    assert blk_read(d, q, sector=1, length=512)[1].startswith(b"hello")


def test_every_must_rule_of_the_protocol(vhost_user_check):
    results = vhost_user_check(BACKEND + ["rng"], device="rng")
    assert not must_failures(results) and results["BE-51"][0] == "PASS"


def test_a_back_end_that_never_listens_fails_in_one_line(pytester):
    """The fixture's own failure: the back-end's exit and output, no traceback."""
    pytester.makepyfile("""
        def test_it(vhost_user_backend):
            vhost_user_backend(["sh", "-c", "echo cannot start; exit 3"])
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*sh did not listen on * (exit status 3):*"])

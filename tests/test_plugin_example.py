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


def test_a_write_survives_a_crash_of_the_back_end(vhost_user_backend, vhost_user_driver,
                                                 tmp_path):
    """Kill the back-end with a write posted, start it again, reconnect: the
    write completes once, and the disk has it."""
    from pyvmm.driver.devices import VIRTIO_BLK_T_OUT, blk_post
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    sock = vhost_user_backend(BACKEND + ["blk", "--socket-path", "{socket}", "--image",
                                         str(image)])
    d = vhost_user_driver(sock)
    q = d.start(queues=[(0, 128)])[0]
    vhost_user_backend.kill(sock)
    head, places = blk_post(d, q, VIRTIO_BLK_T_OUT, 2, b"after".ljust(512, b"\0"))
    vhost_user_backend.restart(sock)
    d.reconnect()
    assert q.wait(head) == 1 and d.read(places[-1], 1) == b"\0"
    assert blk_read(d, q, sector=2, length=512)[1].startswith(b"after")


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


def test_the_back_end_fixture_waits_for_a_listening_socket_not_for_its_file(pytester):
    """vhost_user_backend returns once the back-end listens: a connection
    made at once is not refused (it was, when the fixture waited for the
    socket file only)."""
    from backends import SLOW_LISTENER      # (tests/backends.py: not an author's import)
    pytester.makepyfile(f"""
        import socket, sys
        def test_it(vhost_user_backend):
            sock = vhost_user_backend([sys.executable, "-c", {SLOW_LISTENER!r}, "{{socket}}"])
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock)
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)


QSD = ("['qemu-storage-daemon', '--blockdev', 'driver=file,node-name=f0,filename=' + str(image), "
       "'--export', 'type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,'"
       "'addr.path={socket},writable=on']")


def test_vhost_user_check_of_qemu_storage_daemon_by_socket(pytester):
    """qemu-storage-daemon cannot be given --socket-path: vhost_user_check takes
    the socket a started back-end listens on, or a command with {socket} in it
    (the checker starts it, and again after it dies: BE-21 kills it). This
    test's long name makes a tmp_path too long for a socket: the fixtures'
    sockets are elsewhere."""
    pytester.makepyfile(f"""
        import pytest

        @pytest.fixture
        def image(tmp_path):
            image = tmp_path / "disk.img"
            image.write_bytes(bytes(1 << 20))
            return image

        def test_by_socket(vhost_user_backend, vhost_user_check, image):
            sock = vhost_user_backend({QSD})
            results = vhost_user_check(sock, device="blk", rules=["BE-9", "BE-51", "BE-75"])
            assert [r for r, _ in results.values()] == ["PASS", "PASS", "PASS"], results

        def test_by_command_with_its_socket(vhost_user_check, image):
            results = vhost_user_check({QSD}, device="blk", rules=["BE-21", "BE-51", "BE-111"])
            assert results["BE-21"] == ("FAIL", results["BE-21"][1]), results
            assert "SIGSEGV" in results["BE-21"][1] and results["BE-51"][0] == "PASS", results
            assert results["BE-111"][0] == "SKIP", results    # not started with --socket-path
    """)
    result = pytester.runpytest_subprocess()
    assert result.ret == 0, result.stdout.str()


def test_a_program_that_is_not_there_is_one_line(pytester):
    pytester.makepyfile("""
        def test_backend(vhost_user_backend):
            vhost_user_backend(["no-such-vhost-user-program", "--socket-path", "{socket}"])

        def test_check(vhost_user_check):
            vhost_user_check(["no-such-vhost-user-program"])
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*no-such-vhost-user-program: no such program*"] * 2)
    for noise in ("Traceback", "FileNotFoundError", "During handling"):
        assert noise not in result.stdout.str(), result.stdout.str()


def test_the_readme_plugin_example_runs_as_written(pytester, top, monkeypatch):
    """The README's first plugin test, copied out as it stands: its imports
    are all there and its command line runs (`pyvmm` of this checkout)."""
    import os
    import re
    readme = (top / "README.md").read_text()
    intro = readme.index("a pytest plugin (`pyvmm/pytest_plugin.py`)")
    example = re.search(r"```python\n(.*?)```", readme[intro:], re.S).group(1)
    pytester.makepyfile(example)
    bin_dir = os.path.dirname(sys.executable)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = pytester.runpytest_subprocess()
    assert result.ret == 0, result.stdout.str()

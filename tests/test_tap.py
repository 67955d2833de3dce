"""Taps and their addresses, each test in a network namespace of its own
(`unshare --net`): the host's own network is never touched."""

import subprocess
import sys
import textwrap

PRELUDE = """
import json, subprocess
from pyvmm.sys.tap import Tap
def ip(*args):
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout
def state(name):
    info = json.loads(ip("-j", "addr", "show", name))[0]
    addrs = sorted(f"{a['local']}/{a['prefixlen']}" for a in info["addr_info"]
                   if not a["local"].startswith("fe80"))
    return "UP" in info["flags"], addrs
"""


def in_netns(script):
    r = subprocess.run(["unshare", "--net", sys.executable, "-c",
                        PRELUDE + textwrap.dedent(script)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_what_pyvmm_adds_to_a_persistent_tap_goes_away_again():
    out = in_netns("""
        ip("tuntap", "add", "dev", "keep0", "mode", "tap", "vnet_hdr")
        ip("addr", "add", "10.9.9.1/24", "dev", "keep0")       # the user's own
        tap = Tap("keep0")
        assert tap.persistent
        tap.configure("10.9.0.1/30")
        tap.configure("fd00::1/64")
        tap.configure("10.9.9.1/24")                              # had it already
        print(state("keep0"))
        tap.close()
        print(state("keep0"))
    """)
    # (Linux drops IPv6 addresses when a link goes down, so the user's own
    # address here is an IPv4 one.)
    assert out.splitlines() == ["(True, ['10.9.0.1/30', '10.9.9.1/24', 'fd00::1/64'])",
                                "(False, ['10.9.9.1/24'])"]


def test_a_tap_that_was_up_stays_up():
    out = in_netns("""
        ip("tuntap", "add", "dev", "keep1", "mode", "tap", "vnet_hdr")
        ip("link", "set", "keep1", "up")
        tap = Tap("keep1")
        tap.configure("10.9.1.1/30")
        tap.close()
        print(state("keep1"))
    """)
    assert out.strip() == "(True, [])"


def test_a_new_tap_is_not_persistent_and_goes_with_pyvmm():
    out = in_netns("""
        tap = Tap("pyvmm%d")
        print(tap.name, tap.persistent)
        tap.configure("10.10.0.1/30")
        print(state(tap.name))
        tap.close()
        print("pyvmm0" in ip("-br", "link"))
    """)
    assert out.splitlines() == ["pyvmm0 False", "(True, ['10.10.0.1/30'])", "False"]


def test_a_multiqueue_tap_has_a_queue_per_fd_and_detaches_one():
    """--net vhost-kernel,queues=N: one tap, N queues (one fd each, a
    vhost-net on each); a queue pair the guest does not use has its tap
    queue detached (TUNSETQUEUE), and attached again when it asks."""
    out = in_netns("""
        import re
        def queues(name):
            info = ip("-d", "link", "show", name)
            return re.search(r"multi_queue numqueues (\\d+) numdisabled (\\d+)", info).groups()
        tap = Tap("pyvmm%d", queues=3)
        print(tap.name, len(set(tap.fds)), queues(tap.name))
        tap.set_queue_attached(2, False)
        print(queues(tap.name))
        tap.set_queue_attached(2, True)
        print(queues(tap.name))
        tap.close()
        print("pyvmm0" in ip("-br", "link"))
    """)
    assert out.splitlines() == ["pyvmm0 3 ('3', '0')", "('2', '1')", "('3', '0')", "False"]


def test_queues_on_a_tap_that_is_not_multiqueue_is_one_clear_error():
    out = in_netns("""
        from pyvmm.sys.tap import TapError
        ip("tuntap", "add", "dev", "keep2", "mode", "tap", "vnet_hdr")
        try:
            Tap("keep2", queues=2)
        except TapError as e:
            print(e)
        print(ip("-br", "link", "show", "keep2").split()[0])    # left as it was
    """)
    assert out.splitlines() == [
        "cannot create tap 'keep2': Invalid argument (it exists and is not multiqueue: "
        "queues=2 needs one made with 'ip tuntap add keep2 mode tap multi_queue vnet_hdr')",
        "keep2"]

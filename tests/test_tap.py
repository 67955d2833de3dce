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

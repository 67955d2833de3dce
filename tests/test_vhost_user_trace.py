"""The --trace vhost-user lines: what a back-end author reads."""

from pyvmm.devices.virtio.blk import BLK_FEATURE_NAMES
from pyvmm.vhost.user.messages import (
    U64, BackendReq, DeviceConfig, Empty, FrontendReq, MemoryRegion, Message, MemTable,
    VringFd, VringState)
from pyvmm.vhost.user.trace import describe

R = FrontendReq


def line(direction, request, payload, flags=0x1, fds=()):
    return describe(direction, Message(request, flags, payload, fds), BLK_FEATURE_NAMES)


def test_requests_and_replies_read_without_the_spec():
    assert line("->", R.GET_FEATURES, Empty()) == "-> GET_FEATURES"
    assert line("<-", R.GET_FEATURES, U64(1 << 32 | 1 << 30 | 1 << 9), 0x5) == (
        "<- reply to GET_FEATURES: features=0x140000200 (FLUSH|PROTOCOL_FEATURES|VERSION_1)")
    assert line("<-", R.SET_FEATURES, U64(0), 0x5) == "<- reply to SET_FEATURES: ack=0 (ok)"
    assert line("<-", R.SET_OWNER, U64(1), 0x5) == "<- reply to SET_OWNER: ack=1 (refused)"
    assert line("->", R.SET_VRING_NUM, VringState(1, 256), 0x9) == (
        "-> SET_VRING_NUM [NEED_REPLY] index=1 size=256")
    assert line("->", R.GET_VRING_BASE, VringState(0, 0)) == "-> GET_VRING_BASE index=0"
    assert line("<-", R.GET_VRING_BASE, VringState(0, 7), 0x5) == (
        "<- reply to GET_VRING_BASE: index=0 base=7")
    assert line("->", R.SET_VRING_CALL, VringFd(2), fds=(9,)) == "-> SET_VRING_CALL index=2 (1 fd)"
    region = MemoryRegion(0x1_0000_0000, 2 << 30, 0x7F00_0000_0000, 3 << 30)
    assert line("->", R.SET_MEM_TABLE, MemTable((region,)), fds=(5,)) == (
        "-> SET_MEM_TABLE 1 region(s): [guest 0x100000000 size 2 GiB user 0x7f0000000000 "
        "fd offset 0xc0000000] (1 fd)")
    assert line("->", R.GET_CONFIG, DeviceConfig(0, 0, bytes(8))) == (
        "-> GET_CONFIG offset=0 size=8 flags=0")
    assert line("->", BackendReq.CONFIG_CHANGE_MSG, Empty(), 0x9) == (
        "-> BACKEND_CONFIG_CHANGE_MSG [NEED_REPLY]")


def test_the_readme_says_what_each_trace_names(top):
    """The README's `--trace vhost-user` line for blk is what the trace prints
    (blk's own bits by name, "..." for some left out); what it says of
    `pyvmm trace` is what the proxy prints: it does not know the device (it
    calls describe() with no names), so blk's FLUSH is bit9 there."""
    import re
    readme = (top / "README.md").read_text()
    shown = re.search(r"virtio-blk0 <- reply to GET_FEATURES: features=(0x[0-9a-f]+) \((.*)\)",
                      readme)
    printed = line("<-", R.GET_FEATURES, U64(int(shown.group(1), 16)), 0x5)
    names = printed[printed.index("(") + 1:-1].split("|")
    head, tail = shown.group(2).split("|...|")
    assert names[:len(head.split("|"))] == head.split("|") and names[-1] == tail, printed
    proxied = describe("<-", Message(R.GET_FEATURES, 0x5, U64(1 << 32 | 1 << 9)))
    assert proxied == "<- reply to GET_FEATURES: features=0x100000200 (bit9|VERSION_1)"
    assert "blk's FLUSH is `bit9`" in " ".join(readme.split()), "the README does not say so"

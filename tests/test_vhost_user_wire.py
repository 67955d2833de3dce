"""vhost-user messages and framing against known bytes, and fed garbage.

The byte strings below are written out by hand from the spec's layouts
(little-endian, as on x86), not produced by the code under test: each one
is decoded and must give the message, and each message encoded must give
the bytes.
"""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.vhost.user import rules
from pyvmm.vhost.user.errors import RemoteProtocolError
from pyvmm.vhost.user.messages import (
    U64, BackendReq, DeviceConfig, DeviceStateTransfer, Empty, FrontendReq, Inflight, IotlbMsg,
    LogArea, MemoryRegion, MemTable, Message, PayloadError, ProtocolFeature, Raw, SingleMemRegion,
    Uuid, VringAddress, VringArea, VringFd, VringState, flag_names, protocol_feature_names)
from pyvmm.vhost.user.wire import MAX_FDS, NEED_DATA, Frame, FrameReader, encode


def h(text):
    return bytes.fromhex(text.replace(" ", ""))


REGION = MemoryRegion(guest_addr=0x1_0000_0000, size=0x4000_0000, user_addr=0x7F00_0000_0000,
                      mmap_offset=0xC000_0000)
REGION_BYTES = ("00000000 01000000  00000040 00000000  00000000 007f0000  000000c0 00000000")

# (payload, its bytes on the wire)
PAYLOADS = [
    (Empty(), ""),
    (U64(0x1_4000_0000), "00000040 01000000"),
    (VringState(1, 256), "01000000 00010000"),
    (VringFd(2), "02000000 00000000"),
    (VringFd(1, no_fd=True), "01010000 00000000"),
    (VringAddress(1, 0, desc=0x1000, used=0x3000, avail=0x2000, log=0),
     "01000000 00000000  00100000 00000000  00300000 00000000  00200000 00000000"
     "00000000 00000000"),
    (MemTable((REGION,)), "01000000 00000000 " + REGION_BYTES),
    (MemTable(()), "00000000 00000000"),
    (SingleMemRegion(REGION), "00000000 00000000 " + REGION_BYTES),
    (LogArea(0x2000, 0x10), "00200000 00000000  10000000 00000000"),
    (Inflight(0x3000, 0, 2, 128), "00300000 00000000  00000000 00000000  0200 8000 00000000"),
    (DeviceConfig(0, 0, b"\x00\x00\x10\x00"), "00000000 04000000 00000000  00001000"),
    (VringArea(3, False, 4096, 0), "03000000 00000000  00100000 00000000  00000000 00000000"),
    (IotlbMsg(0x1000, 0x2000, 0x7000, 3, 2),
     "00100000 00000000  00200000 00000000  00700000 00000000  03 02 000000000000"),
    (DeviceStateTransfer(0, 0), "00000000 00000000"),
    (Uuid(bytes(range(16))), "000102030405060708090a0b0c0d0e0f"),
    (Raw(b"\x01\x02"), "0102"),
]


@pytest.mark.parametrize("payload,text", PAYLOADS, ids=[type(p).__name__ for p, _ in PAYLOADS])
def test_payloads_encode_and_decode_known_bytes(payload, text):
    data = h(text)
    assert payload.pack() == data
    assert type(payload).unpack(data) == payload


@pytest.mark.parametrize("layout,data", [
    (U64, b"\0" * 7), (U64, b"\0" * 9), (VringState, b""), (VringAddress, b"\0" * 32),
    (MemTable, b"\x02\0\0\0\0\0\0\0" + b"\0" * 32),          # says 2 regions, has 1
    (MemTable, b"\x09\0\0\0\0\0\0\0" + b"\0" * 288),         # 9 regions: at most 8
    (SingleMemRegion, b"\0" * 32), (Inflight, b"\0" * 20),   # 20 bytes of fields, 24 on the wire
    (DeviceConfig, b"\0\0\0\0\x08\0\0\0\0\0\0\0" + b"\0" * 4),   # says 8 bytes, has 4
    (DeviceConfig, b"\0\0\0\0\x00\x01\0\0\0\0\0\0" + b"\0" * 256),   # 256: fine
    (VringFd, h("01 00 01 00 00000000")),                    # bits besides index and NOFD
])
def test_payloads_of_the_wrong_size_are_refused(layout, data):
    if layout is DeviceConfig and len(data) == 12 + 256:
        assert len(layout.unpack(data).data) == 256
        return
    with pytest.raises(PayloadError):
        layout.unpack(data)


# (request, flags, payload bytes, the whole frame)
FRAMES = [
    (FrontendReq.GET_FEATURES, 0x1, "", "01000000 01000000 00000000"),
    (FrontendReq.GET_FEATURES, 0x5, "00000040 01000000",
     "01000000 05000000 08000000 00000040 01000000"),
    (FrontendReq.SET_VRING_NUM, 0x1, "00000000 00010000",
     "08000000 01000000 08000000 00000000 00010000"),
    (FrontendReq.SET_VRING_KICK, 0x9, "01000000 00000000",
     "0c000000 09000000 08000000 01000000 00000000"),
    (BackendReq.CONFIG_CHANGE_MSG, 0x9, "", "02000000 09000000 00000000"),
]


@pytest.mark.parametrize("request_,flags,payload,frame", FRAMES)
def test_frames_encode_and_decode_known_bytes(request_, flags, payload, frame):
    assert encode(request_, flags, h(payload)) == h(frame)
    reader = FrameReader("FE")
    reader.feed(h(frame))
    assert reader.next() == Frame(int(request_), flags, h(payload), ())
    assert reader.next() is NEED_DATA


def test_every_request_has_a_rule_with_a_payload_that_round_trips():
    for channel in rules.Channel:
        assert set(channel.rules) == set(channel.requests)
        for rule in channel.rules.values():
            assert rule.payload.unpack is not None and rule.reply_payload.unpack is not None


def test_names_for_people():
    assert FrontendReq.SET_BACKEND_REQ_FD.spec_name == "VHOST_USER_SET_BACKEND_REQ_FD"
    assert BackendReq.CONFIG_CHANGE_MSG.spec_name == "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG"
    assert flag_names(0x9) == "VERSION1|NEED_REPLY"
    mask = ProtocolFeature.MQ.mask | ProtocolFeature.REPLY_ACK.mask | 1 << 40
    assert protocol_feature_names(mask) == "MQ|REPLY_ACK|bit40"


# --- the frame reader: pieces, fds, bad headers ----------------------------------------

def test_a_frame_in_pieces_and_two_frames_in_one_piece():
    data = h(FRAMES[1][3]) + h(FRAMES[2][3])
    reader = FrameReader("BE")
    for i in range(0, 15):
        reader.feed(data[i:i + 1])
        assert reader.next() is NEED_DATA
    reader.feed(data[15:])
    assert reader.next().request == 1 and reader.next().request == 8
    assert reader.next() is NEED_DATA


def test_fds_belong_to_the_frame_whose_header_came_with_them():
    r1, w1 = os.pipe()
    kick = h(FRAMES[3][3])
    reader = FrameReader("FE")
    reader.feed(h(FRAMES[0][3]) + kick[:5], fds=())          # GET_FEATURES, then half a header
    assert reader.next().fds == ()
    reader.feed(kick[5:], fds=(r1,))                          # fds mid-header: for no header
    with pytest.raises(RemoteProtocolError, match="in the middle of a message.*FE-3"):
        reader.next()
    with pytest.raises(OSError):                              # the reader closed the stray fd
        os.fstat(r1)
    os.close(w1)

    r2, w2 = os.pipe()
    reader = FrameReader("FE")
    reader.feed(h(FRAMES[0][3]) + kick, fds=(r2,))            # fds with the first header
    assert reader.next().fds == (r2,) and reader.next().fds == ()
    os.close(r2), os.close(w2)


@pytest.mark.parametrize("frame,message", [
    ("01000000 02000000 00000000", "version 2, not 1"),
    ("01000000 11000000 00000000", "unknown flag bits 0x10"),
    ("05000000 01000000 01100000", "announces 4097 bytes"),
])
def test_bad_headers_are_the_peers_fault(frame, message):
    reader = FrameReader("FE")
    reader.feed(h(frame))
    with pytest.raises(RemoteProtocolError, match=message):
        reader.next()
    with pytest.raises(RemoteProtocolError, match="already broke"):
        reader.feed(b"x")


@settings(max_examples=500, deadline=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=12))
def test_any_bytes_give_frames_need_data_or_a_protocol_error(chunks):
    reader = FrameReader("BE")
    try:
        for chunk in chunks:
            reader.feed(chunk)
            while (frame := reader.next()) is not NEED_DATA:
                assert len(frame.payload) <= 0x1000
    except RemoteProtocolError as e:
        assert "\n" not in str(e)


# --- frame(): one whole frame, as Connection.receive reads it --------------------------

def _as_fed(data, fds=()):
    """What feed() then next() make of data, on a new reader."""
    reader = FrameReader("FE")
    reader.feed(data, fds)
    return reader.next()


@pytest.mark.parametrize("text", [f[3] for f in FRAMES])
def test_a_whole_frame_is_the_frame_feed_and_next_give(text):
    reader = FrameReader("FE")
    frame = reader.frame(h(text))
    assert frame == _as_fed(h(text)) and type(frame.payload) is bytes
    assert reader.frame(h(text)) == frame          # and the next one too


def test_frame_with_a_part_frame_buffered_goes_through_the_buffer():
    data = h(FRAMES[1][3]) + h(FRAMES[2][3])
    reader = FrameReader("FE")
    reader.feed(data[:5])
    assert reader.frame(data[5:]).request == 1      # the buffered start, then the rest
    assert reader.next().request == 8
    assert reader.frame(data[:5]) is NEED_DATA      # less than a header: kept for later


def test_fds_of_a_whole_frame_are_its_own_and_the_next_frame_takes_its_own():
    r, w = os.pipe()
    kick = h(FRAMES[3][3])
    reader = FrameReader("FE")
    assert reader.frame(kick, (r,)).fds == (r,)
    reader.feed(h(FRAMES[0][3])[:5], fds=(w,))       # the next header's start brings an fd
    reader.feed(h(FRAMES[0][3])[5:])
    assert reader.next().fds == (w,)
    os.close(r), os.close(w)


@pytest.mark.parametrize("frame,message", [
    ("01000000 02000000 00000000", "version 2, not 1"),
    ("01000000 11000000 00000000", "unknown flag bits 0x10"),
])
def test_a_whole_frame_with_a_bad_header_closes_its_fds(frame, message):
    r, w = os.pipe()
    reader = FrameReader("FE")
    with pytest.raises(RemoteProtocolError, match=message):
        reader.frame(h(frame), (r,))
    with pytest.raises(OSError):                     # nobody else would close it
        os.fstat(r)
    os.close(w)
    with pytest.raises(RemoteProtocolError, match="already broke"):
        reader.frame(h(FRAMES[0][3]))


def test_a_whole_frame_with_too_many_fds_closes_them_all():
    pipes = [os.pipe() for _ in range(MAX_FDS + 1)]
    reader = FrameReader("FE")
    with pytest.raises(RemoteProtocolError, match=f"{MAX_FDS + 1} fds with one message"):
        reader.frame(h(FRAMES[0][3]), tuple(r for r, _ in pipes))
    for r, w in pipes:
        with pytest.raises(OSError):
            os.fstat(r)
        os.close(w)


def test_a_message_is_a_frozen_record():
    """(Message fills its own __dict__, for speed: still a frozen dataclass.)"""
    import dataclasses
    m = Message(FrontendReq.GET_FEATURES, 1, Empty())
    assert m == Message(FrontendReq.GET_FEATURES, 1, Empty(), ()) and hash(m) == hash(
        Message(FrontendReq.GET_FEATURES, 1, Empty()))
    assert repr(m) == ("Message(request=<FrontendReq.GET_FEATURES: 1>, flags=1, "
                       "payload=Empty(), fds=())")
    assert [f.name for f in dataclasses.fields(m)] == ["request", "flags", "payload", "fds"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.flags = 5

"""Framing: bytes and file descriptors in, frames out (and back). No sockets.

A frame is a header (request, flags, size) plus `size` bytes of payload,
with the fds that came with it. What the payload means is for the session
(session.py) to decide; here only what any frame must be: version 1, no
unknown flag bits, a size within MAX_PAYLOAD_SIZE, at most MAX_FDS fds.

Which frame do fds belong to? The sender attaches them to the sendmsg()
that carries the first byte of the header (FE-3), so they arrive with the
recvmsg() that reads it (BE-7). FrameReader.feed(data, fds) therefore gives
a chunk's fds to the first frame whose header starts within that chunk,
and a chunk with fds but no header start is a protocol error.
"""

import os
from typing import NamedTuple

from pyvmm.vhost.user.errors import RemoteProtocolError
from pyvmm.vhost.user.messages import (HEADER, HEADER_SIZE, KNOWN_FLAGS, MAX_FDS,
                                       MAX_PAYLOAD_SIZE, VHOST_USER_VERSION,
                                       VHOST_USER_VERSION_MASK)

NEED_DATA = "NEED_DATA"   # next() has no whole frame yet


class Frame(NamedTuple):         # (a tuple: made for every message, at little cost)
    request: int          # the number in the header, not yet checked against a channel
    flags: int
    payload: bytes
    fds: tuple = ()


def encode(request, flags, payload=b""):
    """The bytes of one frame (its fds go beside them, with the first byte)."""
    return HEADER.pack(int(request), flags, len(payload)) + payload


class FrameReader:
    """Frames out of a byte stream from one peer.

    peer_rules: "FE" or "BE", the prefix of the rules the peer is held to
    (a front-end's frames are checked against FE rules, and so on). Fds the
    reader holds when it fails, or when it is closed, are closed.
    """

    def __init__(self, peer_rules):
        self.peer_rules = peer_rules
        self._buffer = bytearray()
        self._consumed = 0          # stream position of _buffer[0]
        self._fd_chunks = []        # [start, end, fds] of chunks that brought fds
        self.failed = False

    def feed(self, data, fds=()):
        if self.failed:
            close_fds(fds)
            raise RemoteProtocolError("the connection already broke the protocol")
        start = self._consumed + len(self._buffer)
        self._buffer += data
        if fds:
            self._fd_chunks.append([start, start + len(data), tuple(fds)])

    def frame(self, data, fds=()):
        """feed(data, fds) then next(), for data that is one whole frame (what
        Connection.receive reads): with nothing buffered, checked as next()
        checks it without going through the buffer."""
        if not (self._buffer or self._fd_chunks or self.failed) and len(data) >= HEADER_SIZE:
            request, flags, size = HEADER.unpack_from(data)
            if len(data) == HEADER_SIZE + size:
                try:
                    self._check_header(request, flags, size)
                    if len(fds) > MAX_FDS:
                        self._fail_fds(len(fds))
                except RemoteProtocolError:
                    close_fds(fds)      # (not in the buffer's bookkeeping: close() misses them)
                    raise
                self._consumed += len(data)
                return Frame(request, flags, bytes(data[HEADER_SIZE:]), tuple(fds))
        self.feed(data, fds)
        return self.next()

    def next(self):
        """The next whole frame, or NEED_DATA."""
        if len(self._buffer) < HEADER_SIZE:
            self._check_no_stray_fds(self._consumed + len(self._buffer))
            return NEED_DATA
        request, flags, size = HEADER.unpack_from(self._buffer)
        self._check_header(request, flags, size)
        if len(self._buffer) < HEADER_SIZE + size:
            return NEED_DATA
        fds = self._take_fds(self._consumed) if self._fd_chunks else ()
        payload = bytes(self._buffer[HEADER_SIZE:HEADER_SIZE + size])
        del self._buffer[:HEADER_SIZE + size]
        self._consumed += HEADER_SIZE + size
        if self._fd_chunks:
            try:
                # Fds that came in the middle of this frame, with no header of their own.
                self._check_no_stray_fds(self._consumed)
            except RemoteProtocolError:
                close_fds(fds)
                raise
        return Frame(request, flags, payload, fds)

    def _check_header(self, request, flags, size):
        if flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
            self._fail(f"header of request {request} has version "
                       f"{flags & VHOST_USER_VERSION_MASK}, not 1",
                       "BE-2" if self.peer_rules == "BE" else "FE-1")
        if flags & ~KNOWN_FLAGS:
            self._fail(f"header of request {request} sets unknown flag bits "
                       f"{flags & ~KNOWN_FLAGS:#x}",
                       "BE-3" if self.peer_rules == "BE" else "FE-1")
        if size > MAX_PAYLOAD_SIZE:
            self._fail(f"header of request {request} announces {size} bytes of payload "
                       f"(at most {MAX_PAYLOAD_SIZE})",
                       "BE-5" if self.peer_rules == "BE" else "FE-2")

    def _take_fds(self, frame_start):
        """The fds of chunks in which the header at frame_start begins."""
        self._check_no_stray_fds(frame_start)
        fds = []
        while self._fd_chunks and self._fd_chunks[0][0] <= frame_start < self._fd_chunks[0][1]:
            fds.extend(self._fd_chunks.pop(0)[2])
        if len(fds) > MAX_FDS:
            close_fds(fds)
            self._fail_fds(len(fds))
        return tuple(fds)

    def _fail_fds(self, count):
        self._fail(f"{count} fds with one message (at most {MAX_FDS})",
                   "BE-83" if self.peer_rules == "BE" else "FE-36")

    def _check_no_stray_fds(self, position):
        """Fds of a chunk that ended before `position` without starting a header."""
        if self._fd_chunks and self._fd_chunks[0][1] <= position:
            self._fail("file descriptors arrived in the middle of a message, not with a header",
                       "FE-3" if self.peer_rules == "FE" else None)

    def _fail(self, message, rule):
        self.close()
        raise RemoteProtocolError(message, rule)

    def close(self):
        """Close every fd not yet handed out with a frame."""
        self.failed = True
        for chunk in self._fd_chunks:
            close_fds(chunk[2])
        self._fd_chunks.clear()


def close_fds(fds):
    """Close fds received but not handed on, ignoring those already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass

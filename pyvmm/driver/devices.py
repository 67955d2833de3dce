"""Requests of a few device types, for the guest-less driver: each lays out
its buffers in the driver's memory as a guest's driver would, sends the
chain, waits for it and returns what the device wrote. post() lays out and
sends a chain without waiting; the request builders (fuse_message,
vsock_packet) give the bytes of one request.

    blk:  blk_read, blk_write, blk_flush, blk_get_id (pyvmm/virtio/blk.py)
    rng:  rng_read
    net:  net_send (a frame with the 12-byte virtio_net_hdr_v1), net_post,
          net_receive
    fs:   fuse_init, fuse_lookup (pyvmm/virtio/fs.py)
    vsock: vsock_send, with net_post/net_receive's twins vsock_post and
          vsock_receive on the rx queue (pyvmm/virtio/vsock.py)
"""

import itertools
import os

from pyvmm.driver.queue import DriverError
from pyvmm.virtio import fs, vsock

from pyvmm.virtio.blk import (OUTHDR, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_T_FLUSH,
                              VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT)

NET_HDR = bytes(12)          # struct virtio_net_hdr_v1, no offloads asked for


def post(driver, queue, readable=(), writable=(), kick=True):
    """One chain made available: a device-readable buffer holding each bytes
    of readable, then a device-writable one per entry of writable (its
    size, or bytes it starts out holding). (head, [gpa of each writable])."""
    buffers, places = [], []
    for data in readable:
        gpa = driver.alloc(len(data))
        driver.write(gpa, data)
        buffers.append((gpa, len(data), False))
    for entry in writable:
        size = entry if isinstance(entry, int) else len(entry)
        gpa = driver.alloc(size)
        if not isinstance(entry, int):
            driver.write(gpa, entry)
        buffers.append((gpa, size, True))
        places.append(gpa)
    return queue.send(buffers, kick=kick), places


def blk_post(driver, queue, kind, sector, out=b"", data=None, kick=True):
    """One virtio-blk request made available: the header (and out), then data
    (a size or initial bytes) if the device is to write some, then a status
    byte of 0xff. (head, [data's gpa,] status's gpa)."""
    return post(driver, queue, [OUTHDR.pack(kind, 0, sector) + out],
                ([] if data is None else [data]) + [b"\xff"], kick)


def _blk(driver, queue, kind, sector, out=b"", in_length=0, timeout=5.0):
    """One virtio-blk request; (status byte, the data the device wrote)."""
    head, places = blk_post(driver, queue, kind, sector, out, in_length or None)
    written = queue.wait(head, timeout)
    return (driver.read(places[-1], 1)[0],
            driver.read(places[0], max(0, min(written - 1, in_length))) if in_length else b"")


def blk_read(driver, queue, sector, length, timeout=5.0):
    """VIRTIO_BLK_T_IN: (status, bytes read)."""
    return _blk(driver, queue, VIRTIO_BLK_T_IN, sector, in_length=length, timeout=timeout)


def blk_write(driver, queue, sector, data, timeout=5.0):
    """VIRTIO_BLK_T_OUT: the status."""
    return _blk(driver, queue, VIRTIO_BLK_T_OUT, sector, out=bytes(data), timeout=timeout)[0]


def blk_flush(driver, queue, timeout=5.0):
    return _blk(driver, queue, VIRTIO_BLK_T_FLUSH, 0, timeout=timeout)[0]


def blk_get_id(driver, queue, timeout=5.0):
    """VIRTIO_BLK_T_GET_ID: (status, the id without its NUL padding)."""
    status, ident = _blk(driver, queue, VIRTIO_BLK_T_GET_ID, 0,
                         in_length=VIRTIO_BLK_ID_BYTES, timeout=timeout)
    return status, ident.rstrip(b"\0")


def rng_read(driver, queue, length, timeout=5.0):
    """Entropy: the bytes the device wrote into a buffer of length bytes."""
    head, (buf,) = post(driver, queue, writable=[length])
    return driver.read(buf, queue.wait(head, timeout))


def net_send(driver, txq, frame, timeout=5.0):
    """One Ethernet frame on a transmit queue; waits until the device took it."""
    txq.wait(post(driver, txq, [NET_HDR + frame])[0], timeout)


def net_post(driver, rxq, count=8, size=2048):
    """count receive buffers on a receive queue; {head: gpa} for net_receive."""
    posted = {}
    for _ in range(count):
        gpa = driver.alloc(size)
        posted[rxq.send([(gpa, size, True)], kick=False)] = gpa
    os.eventfd_write(rxq.kick, 1)
    return posted


def net_receive(driver, rxq, posted, timeout=5.0):
    """The frames the device put in posted buffers (virtio_net_hdr_v1 removed)."""
    frames = []
    for head, length in rxq.wait(None, timeout):
        frames.append(driver.read(posted.pop(head), length)[len(NET_HDR):])
    return frames


_fuse_unique = itertools.count(1)


def fuse_message(opcode, unique, nodeid, arguments=b""):
    """A FUSE request's bytes: fuse_in_header, then the opcode's arguments."""
    return fs.IN_HEADER.pack(fs.IN_HEADER.size + len(arguments), opcode, unique, nodeid,
                             0, 0, 0, 0, 0) + arguments


def _fuse(driver, queue, opcode, nodeid, arguments, reply_size, timeout):
    """One FUSE request; (error, unique matches, the reply after the out header)."""
    unique = next(_fuse_unique)
    head, (out,) = post(driver, queue, [fuse_message(opcode, unique, nodeid, arguments)],
                        [fs.OUT_HEADER.size + reply_size])
    written = queue.wait(head, timeout)
    if written < fs.OUT_HEADER.size:
        raise DriverError(f"queue {queue.index}: a FUSE reply of {written} bytes, shorter "
                          f"than its {fs.OUT_HEADER.size}-byte header")
    length, error, got = fs.OUT_HEADER.unpack(driver.read(out, fs.OUT_HEADER.size))
    if got != unique or length != written:
        raise DriverError(f"queue {queue.index}: a FUSE reply for request {got} of "
                          f"{length} bytes, to request {unique} in {written} used bytes")
    return error, driver.read(out + fs.OUT_HEADER.size, written - fs.OUT_HEADER.size)


def fuse_init(driver, queue, timeout=5.0):
    """FUSE_INIT (the first request of a session): (error, (major, minor))."""
    error, reply = _fuse(driver, queue, fs.FUSE_INIT, 0,
                         fs.INIT_IN.pack(fs.FUSE_KERNEL_VERSION, fs.FUSE_KERNEL_MINOR_VERSION,
                                         0, 0), 256, timeout)
    return error, (fs.INIT_IN.unpack_from(reply)[:2] if len(reply) >= 8 else None)


def fuse_lookup(driver, queue, name, parent=fs.FUSE_ROOT_ID, timeout=5.0):
    """FUSE_LOOKUP of name in directory parent: (error, the entry's nodeid or None)."""
    error, reply = _fuse(driver, queue, fs.FUSE_LOOKUP, parent, name.encode() + b"\0", 256,
                         timeout)
    return error, (fs.ENTRY_NODEID.unpack_from(reply)[0] if error == 0 and len(reply) >= 8
                   else None)


def vsock_packet(src_cid, dst_cid, src_port, dst_port, op, payload=b"", buf_alloc=1 << 16,
                 fwd_cnt=0):
    """A vsock stream packet's bytes: virtio_vsock_hdr, then payload."""
    return vsock.HDR.pack(src_cid, dst_cid, src_port, dst_port, len(payload),
                          vsock.VIRTIO_VSOCK_TYPE_STREAM, op, 0, buf_alloc, fwd_cnt) + payload


def vsock_send(driver, txq, src_cid, dst_cid, src_port, dst_port, op, payload=b"",
               buf_alloc=1 << 16, fwd_cnt=0, timeout=5.0):
    """One vsock stream packet on the tx queue; waits until the device took it."""
    packet = vsock_packet(src_cid, dst_cid, src_port, dst_port, op, payload, buf_alloc,
                          fwd_cnt)
    txq.wait(post(driver, txq, [packet])[0], timeout)


def vsock_post(driver, rxq, count=8, size=4096):
    return net_post(driver, rxq, count, size)


def vsock_receive(driver, rxq, posted, timeout=5.0):
    """The packets the device put in posted buffers, as (header fields, payload)."""
    packets = []
    for head, length in rxq.wait(None, timeout):
        data = driver.read(posted.pop(head), length)
        if length < vsock.HDR.size:
            raise DriverError(f"queue {rxq.index}: a vsock packet of {length} bytes, shorter "
                              f"than its {vsock.HDR.size}-byte header")
        packets.append((vsock.HDR.unpack_from(data), data[vsock.HDR.size:]))
    return packets

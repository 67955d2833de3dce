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
    scsi: scsi_command (any CDB), scsi_inquiry, scsi_read_capacity, scsi_read10,
          scsi_write10 (pyvmm/virtio/scsi.py)
"""

import itertools
import os

from pyvmm.driver.queue import DriverError
from pyvmm.virtio import fs, scsi, vsock

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


# SCSI commands (SPC-4, SBC-3), as the guest's sd driver sends them.
INQUIRY, READ_CAPACITY_10, READ_10, WRITE_10 = 0x12, 0x25, 0x28, 0x2A


def scsi_command(driver, queue, cdb, target=1, lun=0, data_out=b"", data_in=0, timeout=5.0):
    """One virtio-scsi request on a request queue: the header and data_out
    (device-readable), then the response and data_in bytes (device-writable).
    (response, SCSI status, sense bytes, the data read)."""
    header = scsi.CMD_REQ.pack(scsi.lun_bytes(target, lun), next(_tags),
                               scsi.VIRTIO_SCSI_S_SIMPLE, 0, 0, bytes(cdb))
    head, places = post(driver, queue, [header + bytes(data_out)],
                        [scsi.CMD_RESP.size] + ([data_in] if data_in else []))
    queue.wait(head, timeout)
    sense_len, resid, _, status, response, sense = scsi.CMD_RESP.unpack(
        driver.read(places[0], scsi.CMD_RESP.size))
    data = driver.read(places[1], max(0, data_in - resid)) if data_in else b""
    return response, status, sense[:min(sense_len, len(sense))], data


_tags = itertools.count(1)


def _checked(what, result):
    response, status, sense, data = result
    if response != scsi.VIRTIO_SCSI_S_OK:
        raise DriverError(f"{what}: virtio-scsi response {scsi.RESPONSES.get(response, response)}")
    if status != scsi.SAM_STAT_GOOD:
        raise DriverError(f"{what}: SCSI status {status:#04x}, sense {sense.hex()}")
    return data


def scsi_inquiry(driver, queue, target=1, lun=0, timeout=5.0):
    """INQUIRY: (peripheral device type, vendor, product), e.g. (0, 'LIO-ORG', ...)."""
    data = _checked("INQUIRY", scsi_command(driver, queue, [INQUIRY, 0, 0, 0, 96, 0],
                                            target, lun, data_in=96, timeout=timeout))
    return data[0] & 0x1F, data[8:16].decode().strip(), data[16:32].decode().strip()


def scsi_read_capacity(driver, queue, target=1, lun=0, timeout=5.0):
    """READ CAPACITY(10): (number of blocks, block size)."""
    data = _checked("READ CAPACITY(10)", scsi_command(
        driver, queue, [READ_CAPACITY_10] + [0] * 9, target, lun, data_in=8, timeout=timeout))
    last, size = int.from_bytes(data[:4], "big"), int.from_bytes(data[4:8], "big")
    return last + 1, size


def _rw10(opcode, lba, blocks):
    return [opcode, 0, *lba.to_bytes(4, "big"), 0, *blocks.to_bytes(2, "big"), 0]


def scsi_read10(driver, queue, lba, blocks, block_size=512, target=1, lun=0, timeout=5.0):
    """READ(10): the bytes of blocks blocks from lba."""
    return _checked("READ(10)", scsi_command(
        driver, queue, _rw10(READ_10, lba, blocks), target, lun,
        data_in=blocks * block_size, timeout=timeout))


def scsi_write10(driver, queue, lba, data, block_size=512, target=1, lun=0, timeout=5.0):
    """WRITE(10): data (whole blocks) at lba."""
    _checked("WRITE(10)", scsi_command(
        driver, queue, _rw10(WRITE_10, lba, len(data) // block_size), target, lun,
        data_out=data, timeout=timeout))

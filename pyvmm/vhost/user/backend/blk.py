"""virtio-blk (virtio id 2) as a vhost-user back-end: a disk in a file.

Each request is one chain: the 16-byte header (type, sector), the data, and
a status byte in the last device-writable byte (pyvmm/virtio/blk.py). Data
moves straight between the image and guest memory (the chain's read_file
and write_file: preadv/pwritev into its buffers); nothing is copied
through Python objects. The requests of one kick are served at once, on
io_threads threads (handle_queue). Where the compiled ring walk was built,
plain reads and writes go through C whole (pyvmm/virtio/blk_requests.c:
taken from the ring, done and given back as this file's Python path
would); the Python path stays the reference, and serves every other
request, and all of them while a --die-at point is armed.

Served: IN, OUT, FLUSH (fdatasync), GET_ID (the serial), and on a writable
regular file DISCARD (punching a hole) and WRITE_ZEROES. A read-only disk
offers VIRTIO_BLK_F_RO and fails writes. Several queues share the image.
INFLIGHT_SHMFD is offered (inflight.py): a front-end that keeps the area
can have a restarted back-end finish what this one took.

A malformed request (no room for the header or status, a range past the
end of the disk) gets VIRTIO_BLK_S_IOERR; a chain with no writable byte
cannot carry a status and is returned with nothing written.

After the image grew, request_resize() (kill -HUP, in `pyvmm backend blk`)
has the size taken again and the front-end told: it only writes an
eventfd, so that it is safe in a signal handler; the work is done in the
serving loop, between requests.
"""

import logging
import os
import queue
import stat
import threading

from pyvmm.sys.fallocate import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
                                 FALLOC_FL_ZERO_RANGE, fallocate)
from pyvmm.vhost.user.backend.device import RING_FEATURES, BackendDevice
from pyvmm.virtio import compiled_ring, spec
from pyvmm.virtio.splitring import RingError
from pyvmm.virtio.blk import (
    CONFIG, DISCARD_SEGMENT, OUTHDR, SECTOR, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)

log = logging.getLogger("pyvmm.backend")

SEG_MAX = 126                 # data buffers per request: a 128-entry ring less header, status
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment
MAX_DISCARD_SEG = 16
# Requests served at once: the loop's thread and one more. A guest's 1 MiB
# read comes as two requests of 504 KiB in one kick (seg_max) and a small
# one: two copies at once take the most of it; more threads only cost
# wake-ups (`scripts/bench blk-backend` inside the testbed, 2 vCPUs: CPU
# per GiB 0.86-0.89x of qemu-storage-daemon's in the transfers with 2,
# 0.93-0.95x with 4, the same throughput). More queues or a busier guest
# may want more (--io-threads).
IO_THREADS = 2


class RequestFailed(Exception):
    """The request ends with this status (VIRTIO_BLK_S_IOERR or _UNSUPP)."""

    def __init__(self, status, why):
        super().__init__(why)
        self.status = status


class Blk(BackendDevice):
    device_id = spec.VIRTIO_ID_BLOCK
    name = "blk"
    inflight_tracking = True

    def __init__(self, image, read_only=False, num_queues=1, serial=None, io_threads=IO_THREADS):
        """image: a regular file or block device, opened here (OSError if it
        cannot be). io_threads: requests served at once (1: one at a time,
        in the loop's thread)."""
        self.fd = os.open(image, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        try:
            st = os.fstat(self.fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise OSError("not a regular file or block device")
            self.size = self._image_size()
        except OSError:
            os.close(self.fd)
            raise
        self.read_only = read_only
        self.num_queues = num_queues
        # Holes only in files we own; a block device would need BLKDISCARD.
        self.can_discard = not read_only and stat.S_ISREG(st.st_mode)
        self.serial = (serial or os.path.basename(image)).encode()[:VIRTIO_BLK_ID_BYTES]
        self.resize_requests = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.io_threads = max(1, io_threads)
        self._requests = self._finished = None
        self._plain = {}          # queue index -> its compiled_ring.BlkRequests
        # A subclass with a handle_queue of its own gets every kick there.
        self._kicks_in_c = type(self).handle_queue is Blk.handle_queue
        if compiled_ring.available and self.io_threads > 1:
            # The C path's threads start with the device rather than at the
            # guest's first request, where starting them cost a connection
            # about 10 ms inside the testbed.
            compiled_ring.lib.pv_pool_start(self.io_threads - 1)

    @property
    def features(self):
        f = RING_FEATURES | spec.bits(VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE,
                                      VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ)
        if self.read_only:
            f |= spec.bit(VIRTIO_BLK_F_RO)
        if self.can_discard:
            f |= spec.bits(VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES)
        return f

    def config(self):
        discard = (MAX_DISCARD_SECTORS, MAX_DISCARD_SEG) if self.can_discard else (0, 0)
        return CONFIG.pack(self.size // SECTOR, 0, SEG_MAX, 0, 0, 0, SECTOR,
                           0, 0, 0, 0, 0, 0, self.num_queues,
                           *discard, 1, *discard, 1 if self.can_discard else 0)

    def reset(self):
        self._plain.clear()       # (each holds its ring, and so the memory)

    def close(self):
        if self._requests is not None:
            for _ in range(self.io_threads - 1):
                self._requests.put(None)
        os.close(self.fd)
        os.close(self.resize_requests)

    def attach(self, daemon):
        """A request made while no front-end was connected is taken at once."""
        super().attach(daemon)
        daemon.loop.add_reader(self.resize_requests, self._on_resize_request,
                               "a resize request")

    def detach(self):
        if self.daemon is not None:
            self.daemon.loop.remove(self.resize_requests)
        super().detach()

    def request_resize(self):
        """Have resize() run in the serving loop (safe in a signal handler:
        many requests before the loop gets to them are one resize)."""
        try:
            os.eventfd_write(self.resize_requests, 1)
        except BlockingIOError:
            pass                  # so many asked that one more changes nothing

    def _on_resize_request(self):
        try:
            os.eventfd_read(self.resize_requests)
        except BlockingIOError:
            return
        self.resize()

    def _image_size(self):
        """Whole sectors of the image (a partial last one is not the guest's)."""
        return os.lseek(self.fd, 0, os.SEEK_END) // SECTOR * SECTOR

    def resize(self):
        """Take the image's size again (it grew or shrank) and tell the front-end."""
        self.size = self._image_size()
        if self.daemon is not None:
            self.daemon.config_changed()

    def handle_queue(self, index, ring, memory):
        """Serve what the driver made available. Where the ring is walked in C
        (and no fault point is armed, nothing resubmitted: Vring.compiled),
        reads and writes are served whole in C, and each other request in
        turn here. Else a batch at a time: the first
        request of a batch here, the others at once on the I/O threads (the
        preadv/pwritev in C or in os release the GIL, so the copies overlap);
        each batch is over, and pushed in the order its requests finished,
        before the next is taken (what a dead predecessor left in flight is
        served first, one at a time). Nothing is left in flight when this
        returns: a new memory table or GET_VRING_BASE never finds a thread
        still using guest memory."""
        while True:
            compiled = ring.compiled
            if compiled and not self._serve_plain(index, ring):
                return                # the ring is empty (and the driver asked to kick)
            batch, broken = [], None
            try:
                while len(batch) < (1 if compiled else self.io_threads):
                    alone = ring.resubmitting      # BE-74: oldest first, one at a time
                    if (chain := ring.pop()) is None:
                        break
                    batch.append(chain)
                    if alone:
                        break
            except RingError as e:     # what came before the break is still served
                broken = e
            if not batch:
                if broken is not None:
                    raise broken
                return
            done = self._serve_batch(batch, memory)
            failed = None
            for chain, written in done:
                if isinstance(written, BaseException):
                    failed = failed or written
                else:
                    ring.push(chain.head, written)
            if failed is not None or broken is not None:
                raise failed or broken

    def serve_kick(self, index, ring, call, event_idx):
        """A kick whose ring holds only reads and writes, served and signalled
        in C with no Python per request (Device.serve_kick); any other
        request stops C, and handle_queue goes on from it. Attached to a
        daemon, C then waits for the ring's next kick in the daemon's event
        loop and serves it too, for as long as nothing else is ready there:
        a message, another ring's kick, a resize, or a signal send it back.
        (Not in a subclass that has its own handle_queue: that one sees
        every kick.)"""
        if not (self._kicks_in_c and ring.compiled):
            return False
        wait = (self.daemon.loop.fileno(), ring.kick) if self.daemon is not None else None
        return not self._serve_plain(index, ring, call, event_idx, wait)

    def _serve_plain(self, index, ring, call=None, event_idx=False, wait=None):
        """Reads and writes served in C (compiled_ring.BlkRequests: what serve()
        and the ring's pop and push do, for those), up to the first request
        of another kind, which the Python path takes next (call, event_idx,
        wait: BlkRequests.serve's). False once the ring is empty."""
        plain = self._plain.get(index)
        if plain is None or plain.ring is not ring.device_ring:
            plain = self._plain[index] = compiled_ring.BlkRequests(ring.device_ring,
                                                                   self.io_threads)
        stopped, _, failed, error = plain.serve(ring.inflight, self.fd, self.size,
                                                self.read_only, call, event_idx, wait)
        if failed:
            log.warning("I/O error on the image: %s", os.strerror(error) if error else
                        f"{failed} short read(s) or write(s)")
        return stopped

    def _serve_batch(self, batch, memory):
        """[(chain, bytes written or the exception)] of each chain of batch, in
        the order they finished. Returns, or raises (SIGTERM's SystemExit, say),
        only once no I/O thread is still in guest memory: the mappings may
        close right after."""
        for chain in batch[1:]:
            self._io().put((chain, memory))
        waiting = len(batch) - 1
        try:
            done = [(batch[0], _serving(self.serve, batch[0], memory))]
            while waiting:
                done.append(self._finished.get())
                waiting -= 1
            return done
        finally:
            while waiting:
                self._finished.get()
                waiting -= 1

    def _io(self):
        """The queue of requests for the I/O threads (started at first use)."""
        if self._requests is None:
            self._requests, self._finished = queue.SimpleQueue(), queue.SimpleQueue()
            for i in range(self.io_threads - 1):
                threading.Thread(target=self._io_thread, name=f"blk-io-{i}", daemon=True).start()
        return self._requests

    def _io_thread(self):
        while (job := self._requests.get()) is not None:
            chain, memory = job
            self._finished.put((chain, _serving(self.serve, chain, memory)))

    def serve(self, chain, memory):
        """Do one request; returns the bytes written into the chain."""
        in_len = chain.writable_len - 1                      # the last byte is the status
        if in_len < 0:
            log.warning("a request with no room for its status byte; returned unanswered")
            return 0
        written = 0
        try:
            out_len = chain.readable_len - OUTHDR.size
            if out_len < 0:
                raise RequestFailed(VIRTIO_BLK_S_IOERR, "a request shorter than its header")
            kind, _, sector = OUTHDR.unpack(chain.read(memory, 0, OUTHDR.size))
            written = self._do(kind, sector, chain, out_len, in_len, memory)
            status = VIRTIO_BLK_S_OK
        except RequestFailed as e:
            log.debug("request failed: %s", e)
            status = e.status
        except OSError as e:
            log.warning("I/O error on the image: %s", e.strerror)
            status = VIRTIO_BLK_S_IOERR
        chain.write(memory, bytes([status]), in_len)
        return written + 1

    def _range(self, sector, length):
        offset = sector * SECTOR
        if offset + length > self.size:
            raise RequestFailed(VIRTIO_BLK_S_IOERR, f"{length} bytes at sector {sector} run past "
                                                    f"the end of a {self.size}-byte disk")
        return offset

    def _writes(self):
        if self.read_only:
            raise RequestFailed(VIRTIO_BLK_S_IOERR, "a write to a read-only disk")

    def _do(self, kind, sector, chain, out_len, in_len, memory):
        """The request's work (data after the header, and before the status
        byte); returns the bytes of data written into the chain."""
        if kind == VIRTIO_BLK_T_IN:
            offset = self._range(sector, in_len)
            return self._moved(chain.read_file(memory, self.fd, offset, 0, in_len), in_len,
                               offset)
        if kind == VIRTIO_BLK_T_OUT:
            self._writes()
            offset = self._range(sector, out_len)
            self._moved(chain.write_file(memory, self.fd, offset, OUTHDR.size, out_len),
                        out_len, offset)
            return 0
        if kind == VIRTIO_BLK_T_FLUSH:
            os.fdatasync(self.fd)
            return 0
        if kind == VIRTIO_BLK_T_GET_ID:
            return chain.write(memory, self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:in_len])
        if kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES) and self.can_discard:
            self._discard(kind, chain, out_len, memory)
            return 0
        raise RequestFailed(VIRTIO_BLK_S_UNSUPP, f"request type {kind}")

    @staticmethod
    def _moved(done, want, offset):
        """done of want bytes at offset were read or written: all, or the request fails."""
        if done != want:
            raise RequestFailed(VIRTIO_BLK_S_IOERR, f"{done} of {want} bytes at {offset}")
        return done

    def _discard(self, kind, chain, out_len, memory):
        """Each segment: punch a hole (DISCARD, or WRITE_ZEROES with UNMAP) or zero it."""
        if out_len % DISCARD_SEGMENT.size or out_len // DISCARD_SEGMENT.size > MAX_DISCARD_SEG:
            raise RequestFailed(VIRTIO_BLK_S_IOERR, f"{out_len} bytes of discard segments")
        raw = chain.read(memory, OUTHDR.size, out_len)
        for sector, count, flags in DISCARD_SEGMENT.iter_unpack(raw):
            if count > MAX_DISCARD_SECTORS:
                raise RequestFailed(VIRTIO_BLK_S_IOERR, f"a segment of {count} sectors")
            offset, length = self._range(sector, count * SECTOR), count * SECTOR
            unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            if kind == VIRTIO_BLK_T_DISCARD:
                if flags:                # 5.2.6.2: no flags on a discard
                    raise RequestFailed(VIRTIO_BLK_S_UNSUPP, "a discard with flags")
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            elif unmap:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            else:
                try:
                    fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                except OSError:          # a file system without ZERO_RANGE
                    for at in range(offset, offset + length, 1 << 20):
                        os.pwrite(self.fd, bytes(min(1 << 20, offset + length - at)), at)


def _serving(serve, chain, memory):
    """serve(chain, memory), or the exception it raised (the loop's thread
    raises it once the whole batch is back)."""
    try:
        return serve(chain, memory)
    except Exception as e:     # noqa: BLE001 - handed to the loop's thread
        return e

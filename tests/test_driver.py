"""The guest-less driver (pyvmm/driver/) on real back-ends with no VM:
qemu-storage-daemon and pyvmm's rng back-end, and back-ends of pyvmm's
library broken on purpose, which the driver's checks must catch."""

import os
import sys
import threading

import pytest
from backends import storage_daemon

from pyvmm.driver import DriverError, vhost_user
from pyvmm.driver.devices import blk_flush, blk_get_id, blk_read, blk_write, rng_read
from pyvmm.vhost.user.backend.daemon import serve_connection
from pyvmm.vhost.user.backend.rng import Rng
from pyvmm.vhost.user.channel import Listener


def test_a_disk_on_qemu_storage_daemon(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    with storage_daemon(str(tmp_path), image) as sock, vhost_user(sock, config_size=60) as d:
        q = d.start(queues=[(0, 128)])[0]
        data = os.urandom(8192)
        assert blk_write(d, q, 8, data) == 0
        assert blk_flush(d, q) == 0
        assert blk_read(d, q, 8, 8192) == (0, data)
        assert blk_get_id(d, q)[0] in (0, 2)          # OK, or UNSUPP where there is no id
    assert image.read_bytes()[8 * 512:8 * 512 + 8192] == data


def test_entropy_from_pyvmm_backend_rng(vhost_user_driver):
    """(With the pytest plugin's fixture, as a back-end author would.)"""
    d = vhost_user_driver([sys.executable, "-m", "pyvmm", "backend", "rng", "--socket-path",
                           "{socket}"])
    q = d.start(queues=[(0, 64)])[0]
    a, b = rng_read(d, q, 64), rng_read(d, q, 64)
    assert len(a) == len(b) == 64 and a != b


class Liar(Rng):
    """Says it wrote more than the chain can hold."""

    def handle_queue(self, index, ring, memory):
        while (chain := ring.pop()) is not None:
            ring.push(chain.head, sum(b.length for b in chain.buffers) + 100)


class Silent(Rng):
    """Takes requests and never answers them."""

    def handle_queue(self, index, ring, memory):
        while ring.pop() is not None:
            pass


def serve_one(path, device):
    listener = Listener(path)

    def run():
        serve_connection(device, listener.accept("the driver"))
        listener.close()
    threading.Thread(target=run, daemon=True).start()


@pytest.mark.parametrize("device, message", [
    (Liar(), "came back with 164 bytes written into 64 device-writable bytes"),
    (Silent(), "did not use chain .* within 0.5 s"),
])
def test_a_misbehaving_device_is_caught(tmp_path, device, message):
    path = str(tmp_path / "broken.sock")
    serve_one(path, device)
    with vhost_user(path) as d:
        q = d.start(queues=[(0, 64)])[0]
        with pytest.raises(DriverError, match=message):
            rng_read(d, q, 64, timeout=0.5)


def test_a_ring_the_device_finds_broken_is_reported(tmp_path):
    """A chain pointing outside guest memory: the back-end signals its error
    eventfd, and the driver says so instead of waiting out its timeout."""
    path = str(tmp_path / "rng.sock")
    serve_one(path, Rng())
    with vhost_user(path) as d:
        q = d.start(queues=[(0, 64)])[0]
        head = q.send([(d.memory.size + 4096, 64, True)])
        with pytest.raises(DriverError, match="signalled its error eventfd"):
            q.wait(head, timeout=5)

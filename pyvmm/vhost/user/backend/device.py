"""What a vhost-user back-end's author writes: a BackendDevice.

The library (daemon.py) does the protocol: the connection, every control
message, the memory table, ring states, REPLY_ACK, config reads, status,
reset. A device says what it is (queues, feature bits, config space) and
what to do when a queue has work:

    class Rng(BackendDevice):
        device_id = 4                  # VIRTIO_ID_RNG
        num_queues = 1

        def handle_queue(self, index, ring, memory):
            while (chain := ring.pop()) is not None:
                written = 0
                for buf in chain.buffers:
                    if buf.writable:
                        memory.write(buf.addr, os.urandom(buf.length))
                        written += buf.length
                ring.push(chain.head, written)

The library signals the queue's call eventfd after handle_queue() returns
and, if the guest broke the ring (RingError), its error eventfd.

A request the back-end will not carry out raises Refused, in the library
or in a device's hook (write_config, say): the front-end gets "no" where
an answer is due, the reason goes to the log in one line, and the
connection goes on.
"""

from pyvmm.virtio import spec


class Refused(Exception):
    """One request refused, the connection still usable (a non-zero ack, or the
    request's error form); the message is one line, with the rule broken."""

    def __init__(self, why, rule=None):
        super().__init__(f"{why} ({rule})" if rule else why)
        self.rule = rule


RING_FEATURES = spec.bits(spec.VIRTIO_F_VERSION_1, spec.VIRTIO_RING_F_INDIRECT_DESC,
                          spec.VIRTIO_RING_F_EVENT_IDX)


class BackendDevice:
    #: VIRTIO_ID_* (for messages and --print-capabilities)
    device_id = None
    #: a name for messages
    name = "device"
    #: how many queues, and the most entries a queue may have
    num_queues = 1
    max_queue_size = 1024
    #: the Daemon serving a front-end, between attach() and detach()
    daemon = None
    #: offer INFLIGHT_SHMFD, so that a front-end can have what this back-end
    #: took but never completed resubmitted to its successor (inflight.py)
    inflight_tracking = False

    @property
    def features(self):
        """The virtio feature bits offered (VIRTIO_F_VERSION_1 and ring features by default)."""
        return RING_FEATURES

    def config(self):
        """The device's config space, as bytes (none by default)."""
        return b""

    def write_config(self, offset, data):
        """The driver wrote config space (SET_CONFIG)."""

    def start(self, features):
        """The front-end set the features the driver acked (SET_FEATURES)."""

    def attach(self, daemon):
        """A front-end connected; daemon serves it until detach(). A device
        with sources of its own (sockets, say) watches them in daemon.loop (an
        EventLoop); daemon.wake(index) has the library run handle_queue for
        that queue if it is started and enabled, and interrupt the driver;
        daemon.config_changed() tells the front-end to read config() again."""
        self.daemon = daemon

    def detach(self):
        """The front-end is gone: stop watching the loop (reset() follows)."""
        self.daemon = None

    def handle_queue(self, index, ring, memory):
        """Queue index has new chains: pop them (ring.pop()), do the work, push
        them (ring.push(head, bytes_written)). memory reads and writes guest
        buffers (read, write, view)."""
        raise NotImplementedError

    def serve_kick(self, index, ring, call, event_idx):
        """A kick on queue index, served whole in one go where a device can
        (blk's plain reads and writes, in C): the chains served as
        handle_queue would, then call (the queue's call eventfd, or None)
        signalled if the driver wants to hear of them (event_idx:
        VIRTIO_RING_F_EVENT_IDX negotiated). True if so; False leaves the
        rest of the ring to handle_queue and the library's interrupt, as
        for a device without one (the default)."""
        return False

    def reset(self):
        """Back to the initial state (RESET_DEVICE, or a new front-end)."""

    def close(self):
        """The program ends: release what the device holds (files, sockets)."""

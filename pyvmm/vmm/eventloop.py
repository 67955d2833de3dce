"""The main thread's event loop: one epoll set, a callback per file descriptor.

Console input, the VMM's own wake-up eventfd and (later) vhost-user sockets
all come through here. Nothing polls: the loop sleeps in epoll_wait.
"""

import selectors


class EventLoop:
    def __init__(self):
        self._selector = selectors.DefaultSelector()

    def add_reader(self, fd, callback):
        """Call callback() whenever fd is readable."""
        self._selector.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd):
        self._selector.unregister(fd)

    def run_until(self, done, timeout=None):
        """Dispatch events until done() is true (checked after each batch)."""
        while not done():
            for key, _ in self._selector.select(timeout):
                key.data()

    def close(self):
        self._selector.close()

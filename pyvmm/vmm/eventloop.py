"""The main thread's event loop: one epoll set, a callback per file descriptor.

Console input, the VMM's own wake-up eventfd and the back-ends' error
eventfds all come through here; callbacks may add and remove sources while
the loop runs. Nothing polls: the loop sleeps in epoll_wait.

A callback that raises ends nothing by itself: the loop hands the exception
to on_error(what, exception), and the machine decides (it ends the VM with
one line, for instance when the terminal behind console input hangs up).
"""

import selectors


class EventLoop:
    def __init__(self, on_error):
        self._selector = selectors.DefaultSelector()
        self._on_error = on_error

    def add_reader(self, fd, callback, what):
        """Call callback() whenever fd is readable; what names it in errors."""
        self._selector.register(fd, selectors.EVENT_READ, (callback, what))

    def remove_reader(self, fd):
        self._selector.unregister(fd)

    def run_until(self, done, timeout=None):
        """Dispatch events until done() is true (checked after each batch)."""
        while not done():
            for key, _ in self._selector.select(timeout):
                if self._selector.get_map().get(key.fd) is not key:
                    continue   # removed (or replaced) by a callback of this batch
                callback, what = key.data
                try:
                    callback()
                except Exception as e:   # noqa: BLE001 - any failure ends the VM cleanly
                    self._on_error(what, e)

    def close(self):
        self._selector.close()

"""An event loop: one epoll set, a callback per file descriptor.

In pyvmm's main thread: console input, the VMM's own wake-up eventfd, the
back-ends' error eventfds and vhost-user back-end channels, and a
vhost-user socket watched for its peer hanging up. In a vhost-user
back-end (vhost/user/backend/): its socket and the kick eventfds of its
rings. Callbacks may add and remove sources while the loop runs. Nothing
polls: the loop sleeps in epoll_wait.

A callback that raises ends nothing by itself: the loop hands the exception
to on_error(what, exception), and the machine decides (it ends the VM with
one line, for instance when the terminal behind console input hangs up).
"""

import select


class EventLoop:
    # What watch()'s callbacks get: test events against these.
    READABLE = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
    WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR

    def __init__(self, on_error):
        self._epoll = select.epoll()
        self._sources = {}         # fd -> (callback, what, whether it takes the events)
        self._on_error = on_error

    def add_reader(self, fd, callback, what):
        """Call callback() whenever fd is readable; what names it in errors.
        (A regular file cannot be watched: PermissionError.)"""
        self._add(fd, select.EPOLLIN, callback, what)

    def add_hangup_watch(self, fd, callback, what):
        """Call callback() once the peer of socket fd has closed its end (EPOLLRDHUP),
        whatever data comes and goes meanwhile. Remove the watch in the callback."""
        self._add(fd, select.EPOLLRDHUP, callback, what)

    def watch(self, fd, callback, what, readable=False, writable=False):
        """Call callback(events) while socket fd is readable or writable, as asked;
        asking for neither stops watching it (so that a hung-up socket one
        cannot serve now does not wake the loop again and again). Call again
        to change what is watched."""
        events = (select.EPOLLIN | select.EPOLLRDHUP if readable else 0) | (
            select.EPOLLOUT if writable else 0)
        if not events:
            self.remove(fd)
        elif fd in self._sources:
            self._epoll.modify(fd, events)
            self._sources[fd] = (callback, what, True)
        else:
            self._epoll.register(fd, events)
            self._sources[fd] = (callback, what, True)

    def _add(self, fd, events, callback, what):
        self._epoll.register(fd, events)
        self._sources[fd] = (callback, what, False)

    def remove(self, fd):
        if self._sources.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def run_until(self, done, timeout=None):
        """Dispatch events until done() is true (checked after each batch)."""
        while not done():
            ready = [(fd, events, self._sources.get(fd))
                     for fd, events in self._epoll.poll(-1 if timeout is None else timeout)]
            for fd, events, source in ready:
                if source is None or self._sources.get(fd) is not source:
                    continue   # removed (or replaced) by a callback of this batch
                callback, what, with_events = source
                try:
                    if with_events:
                        callback(events)
                    else:
                        callback()
                except Exception as e:   # noqa: BLE001 - any failure ends the VM cleanly
                    self._on_error(what, e)

    def fileno(self):
        """The epoll fd, for C that waits on the same set and hands back what
        it does not serve itself (the blk back-end's kicks: its sources are
        level-triggered, so what C leaves is still ready here)."""
        return self._epoll.fileno()

    def close(self):
        self._epoll.close()

"""The guest's serial console on the host: output to a file descriptor,
input from the terminal (raw mode, with an escape key) or from a pipe.

Output: the UART hands over each byte from a vCPU thread, holding the
UART's lock, so it must never wait for the host. Bytes go into a bounded
buffer that a writer thread drains into out_fd; if whoever reads out_fd
stops reading, the buffer fills and further output is dropped and counted
instead of stopping the guest.

In an interactive session every key goes to the guest, Ctrl-C included, so
the VMM is left with an escape sequence, as in QEMU: Ctrl-A x quits,
Ctrl-A Ctrl-A sends a Ctrl-A.
"""

import os
import termios
import threading
import tty

from pyvmm.devices.serial import RX_BUFFER_LIMIT

CTRL_A = 0x01
ESCAPE_HELP = "pyvmm: console escape: Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A"

# Guest output waiting for a slow reader; beyond this it is dropped.
OUTPUT_BUFFER_LIMIT = 256 << 10
# How long the end of the run waits for buffered output to be written.
FLUSH_TIMEOUT = 2.0


class OutputBuffer:
    """A bounded buffer between the vCPUs and a blocking write to fd."""

    def __init__(self, fd, limit=OUTPUT_BUFFER_LIMIT):
        self.fd = fd
        self.limit = limit
        self.dropped = 0           # bytes lost because the reader stalled
        self._buffer = bytearray()
        self._cond = threading.Condition()
        self._writing = False      # the writer holds bytes taken from _buffer
        self._closed = False
        self._failed = False
        self._on_error = None
        self._thread = None

    def start(self, on_error):
        """Begin writing; on_error(OSError) if the fd fails (then output is dropped)."""
        self._on_error = on_error
        self._thread = threading.Thread(target=self._write_loop, name="console-output",
                                        daemon=True)
        self._thread.start()

    def put(self, data):
        """Called from vCPU threads: never blocks on the host."""
        with self._cond:
            room = self.limit - len(self._buffer)
            if self._failed or room <= 0:
                self.dropped += len(data)
                return
            if len(data) > room:
                self.dropped += len(data) - room
                data = data[:room]
            if not self._buffer:
                self._cond.notify()
            self._buffer += data

    def _write_loop(self):
        while True:
            with self._cond:
                self._writing = False
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._buffer or self._closed)
                if not self._buffer:
                    return
                data = bytes(self._buffer)
                self._buffer.clear()
                self._writing = True
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view):]
            except OSError as e:
                with self._cond:
                    self._failed = True
                    self.dropped += len(view) + len(self._buffer)
                    self._buffer.clear()
                self._on_error(e)

    def close(self, timeout=FLUSH_TIMEOUT):
        """Write what is buffered (waiting at most timeout), then stop the writer."""
        if self._thread is None:
            return
        with self._cond:
            self._cond.wait_for(lambda: not self._buffer and not self._writing, timeout)
            self.dropped += len(self._buffer)
            self._buffer.clear()
            self._closed = True
            self._cond.notify_all()
        self._thread.join(0.1)


class Console:
    def __init__(self, out_fd, in_fd=None):
        """out_fd receives the guest's output; in_fd (optional) feeds its input."""
        self.out_fd = out_fd
        self.in_fd = in_fd
        self.interactive = in_fd is not None and os.isatty(in_fd)
        self._output = OutputBuffer(out_fd)
        self._saved_tty = None
        self._escape = False
        self._serial = None
        self._on_quit = None
        self._loop = None

    @property
    def dropped(self):
        """Bytes of guest output lost because out_fd's reader did not keep up."""
        return self._output.dropped

    def output(self, byte):
        """One byte from the guest (called from a vCPU thread)."""
        self._output.put(bytes((byte,)))

    def start(self, loop, serial, on_quit, on_error):
        """Forward output, and input to serial; on_quit() when the user escapes,
        on_error(message) when the output cannot be written."""
        self._serial, self._on_quit, self._loop = serial, on_quit, loop
        self._output.start(lambda e: on_error(f"console output: {e.strerror}"))
        if self.in_fd is None:
            return
        if self.interactive:
            self._saved_tty = termios.tcgetattr(self.in_fd)
            tty.setraw(self.in_fd)
        try:
            loop.add_reader(self.in_fd, self._on_input, "console input")
        except PermissionError:
            # A regular file or /dev/null cannot be polled: it is all there
            # already, so hand it over in one go.
            serial.receive(os.read(self.in_fd, RX_BUFFER_LIMIT))

    def close(self):
        """Flush the output, give the terminal back its settings."""
        self._output.close()
        if self._saved_tty is not None:
            try:
                termios.tcsetattr(self.in_fd, termios.TCSADRAIN, self._saved_tty)
            except (termios.error, OSError):
                pass   # the terminal hung up: nothing left to restore
            self._saved_tty = None

    def _on_input(self):
        data = os.read(self.in_fd, 4096)
        if not data:  # end of piped input: the guest just gets no more
            self._loop.remove(self.in_fd)
            return
        if self.interactive:
            data = self._filter_escape(data)
        if data:
            self._serial.receive(data)

    def _filter_escape(self, data):
        out = bytearray()
        for byte in data:
            if self._escape:
                self._escape = False
                if byte in (ord("x"), ord("X")):
                    self._on_quit()
                    return bytes(out)
                out.append(byte)  # Ctrl-A Ctrl-A, or an unknown key: pass it on
            elif byte == CTRL_A:
                self._escape = True
            else:
                out.append(byte)
        return bytes(out)

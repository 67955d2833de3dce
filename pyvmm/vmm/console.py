"""The guest's serial console on the host: output to a file descriptor,
input from the terminal (raw mode, with an escape key) or from a pipe.

In an interactive session every key goes to the guest, Ctrl-C included, so
the VMM is left with an escape sequence, as in QEMU: Ctrl-A x quits,
Ctrl-A Ctrl-A sends a Ctrl-A.
"""

import os
import termios
import tty

from pyvmm.devices.serial import RX_BUFFER_LIMIT

CTRL_A = 0x01
ESCAPE_HELP = "pyvmm: console escape: Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A"


class Console:
    def __init__(self, out_fd, in_fd=None):
        """out_fd receives the guest's output; in_fd (optional) feeds its input."""
        self.out_fd = out_fd
        self.in_fd = in_fd
        self.interactive = in_fd is not None and os.isatty(in_fd)
        self._saved_tty = None
        self._escape = False
        self._serial = None
        self._on_quit = None
        self._loop = None

    def output(self, byte):
        """One byte from the guest (called from a vCPU thread)."""
        os.write(self.out_fd, bytes((byte,)))

    def start(self, loop, serial, on_quit):
        """Begin forwarding input to serial; on_quit() when the user escapes."""
        self._serial, self._on_quit, self._loop = serial, on_quit, loop
        if self.in_fd is None:
            return
        if self.interactive:
            self._saved_tty = termios.tcgetattr(self.in_fd)
            tty.setraw(self.in_fd)
        try:
            loop.add_reader(self.in_fd, self._on_input)
        except PermissionError:
            # A regular file or /dev/null cannot be polled: it is all there
            # already, so hand it over in one go.
            serial.receive(os.read(self.in_fd, RX_BUFFER_LIMIT))

    def close(self):
        if self._saved_tty is not None:
            termios.tcsetattr(self.in_fd, termios.TCSADRAIN, self._saved_tty)
            self._saved_tty = None

    def _on_input(self):
        data = os.read(self.in_fd, 4096)
        if not data:  # end of piped input: the guest just gets no more
            self._loop.remove_reader(self.in_fd)
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

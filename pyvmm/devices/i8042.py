"""A small i8042 keyboard controller, with no keyboard or mouse behind it.

It exists for two reasons. Linux resets the machine through it (reboot=k,
and as a fallback of the other methods): command 0xFE on port 0x64 pulses
the CPU reset line, and pyvmm ends the VM. And a kernel with the i8042
driver probes it at boot: a controller that answers its commands lets that
probe finish at once, where a silent one costs seconds of timeouts.

Ports: 0x60 data, 0x64 status (read) / command (write). Commands as in
drivers/input/serio/i8042.h.
"""

import collections
import threading

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64

I8042_STR_OBF = 0x01        # output buffer full: data waits at 0x60
I8042_STR_SYSFLAG = 0x04    # self-test passed
I8042_STR_CMDDAT = 0x08     # last write was a command
I8042_CMD_CTL_RCTR = 0x20   # read the controller configuration byte (CTR)
I8042_CMD_CTL_WCTR = 0x60   # write the CTR (next byte on 0x60)
I8042_CMD_AUX_DISABLE = 0xA7
I8042_CMD_AUX_ENABLE = 0xA8
I8042_CMD_AUX_TEST = 0xA9
I8042_CMD_CTL_TEST = 0xAA
I8042_CMD_KBD_TEST = 0xAB
I8042_CMD_KBD_DISABLE = 0xAD
I8042_CMD_KBD_ENABLE = 0xAE
I8042_CMD_AUX_LOOP = 0xD3   # echo the next data byte as if the mouse sent it
I8042_CMD_AUX_SEND = 0xD4   # send the next data byte to the mouse
I8042_CMD_RESET = 0xFE      # pulse the CPU reset line
I8042_RET_CTL_TEST = 0x55
I8042_CTR_KBDDIS, I8042_CTR_AUXDIS, I8042_CTR_XLATE = 0x10, 0x20, 0x40


class I8042:
    def __init__(self, on_reset):
        self.on_reset = on_reset
        self._lock = threading.Lock()
        self._out = collections.deque(maxlen=16)
        self._ctr = I8042_CTR_XLATE | I8042_CTR_AUXDIS | I8042_CTR_KBDDIS
        self._pending = None    # the command waiting for its data byte
        self._last_was_command = False

    def read(self, offset, size):
        with self._lock:
            if offset == I8042_COMMAND_PORT - I8042_DATA_PORT:
                return ((I8042_STR_OBF if self._out else 0) | I8042_STR_SYSFLAG
                        | (I8042_STR_CMDDAT if self._last_was_command else 0))
            if offset == 0:
                return self._out.popleft() if self._out else 0
            return 0xFF

    def write(self, offset, size, value):
        value &= 0xFF
        with self._lock:
            if offset == I8042_COMMAND_PORT - I8042_DATA_PORT:
                self._last_was_command = True
                reset = self._command(value)
            elif offset == 0:
                self._last_was_command = False
                reset = False
                self._data(value)
            else:
                return
        if reset:
            self.on_reset()

    def _command(self, cmd):
        self._pending = None
        if cmd == I8042_CMD_RESET:
            return True
        if cmd == I8042_CMD_CTL_RCTR:
            self._out.append(self._ctr)
        elif cmd in (I8042_CMD_CTL_WCTR, I8042_CMD_AUX_LOOP, I8042_CMD_AUX_SEND):
            self._pending = cmd
        elif cmd == I8042_CMD_CTL_TEST:
            self._out.append(I8042_RET_CTL_TEST)
        elif cmd == I8042_CMD_KBD_TEST:
            self._out.append(0x00)  # interface test passed
        elif cmd == I8042_CMD_AUX_TEST:
            self._out.append(0x01)  # "clock line stuck": there is no mouse port
        elif cmd == I8042_CMD_KBD_DISABLE:
            self._ctr |= I8042_CTR_KBDDIS
        elif cmd == I8042_CMD_KBD_ENABLE:
            self._ctr &= ~I8042_CTR_KBDDIS
        elif cmd == I8042_CMD_AUX_DISABLE:
            self._ctr |= I8042_CTR_AUXDIS
        elif cmd == I8042_CMD_AUX_ENABLE:
            self._ctr &= ~I8042_CTR_AUXDIS
        return False

    def _data(self, value):
        pending, self._pending = self._pending, None
        if pending == I8042_CMD_CTL_WCTR:
            self._ctr = value
        elif pending == I8042_CMD_AUX_LOOP:
            # Echoed without the AUXDATA status bit, this fails the loop test
            # at once (rather than after a long timeout), and AUX_TEST then
            # tells the driver that no mouse port exists.
            self._out.append(value)
        # Bytes for the keyboard or the mouse go nowhere: neither exists, and
        # the driver gives up on them after its timeout.

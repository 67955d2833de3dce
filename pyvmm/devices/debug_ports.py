"""The two I/O ports the tiny guest's init writes (see guest/README.md).

- ExitPort (0xf4, like QEMU's isa-debug-exit): the guest's exit status.
- DebugCon (0xe9, the Bochs/QEMU "debugcon"): bytes of debug output; the
  first one marks the moment the guest reached init.
"""


class ExitPort:
    def __init__(self, on_exit):
        self.on_exit = on_exit

    def read(self, offset, size):
        return 0xFF

    def write(self, offset, size, value):
        self.on_exit(value & 0xFF)


class DebugCon:
    def __init__(self, on_byte):
        self.on_byte = on_byte

    def read(self, offset, size):
        return 0xE9  # what QEMU's debugcon answers, so guests can detect it

    def write(self, offset, size, value):
        for i in range(size):
            self.on_byte((value >> (8 * i)) & 0xFF)

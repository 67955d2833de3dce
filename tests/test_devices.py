"""The legacy devices' register behaviour, driven as the Linux drivers drive them."""

import pytest

from pyvmm.devices import serial as uart
from pyvmm.devices.bus import Bus, BusConflict
from pyvmm.devices.debug_ports import DebugCon, ExitPort
from pyvmm.devices.i8042 import I8042


class Line:
    """Records the IRQ line's level changes."""
    def __init__(self):
        self.changes = []

    def __call__(self, level):
        self.changes.append(level)

    @property
    def level(self):
        return self.changes[-1] if self.changes else 0


@pytest.fixture
def com1():
    out = bytearray()
    irq = Line()
    dev = uart.Serial(irq, out.append)
    return dev, irq, out


def iir_id(dev):
    return dev.read(uart.UART_IIR, 1) & 0x0F


def test_transmit_goes_out(com1):
    dev, irq, out = com1
    for b in b"hi\n":
        dev.write(uart.UART_TX, 1, b)
    assert out == b"hi\n"
    assert dev.read(uart.UART_LSR, 1) & (uart.UART_LSR_THRE | uart.UART_LSR_TEMT) == 0x60


def test_thre_interrupt_on_enable_and_cleared_by_iir_read(com1):
    dev, irq, out = com1
    assert iir_id(dev) == uart.UART_IIR_NO_INT
    dev.write(uart.UART_IER, 1, uart.UART_IER_THRI)
    assert irq.level == 1
    assert iir_id(dev) == uart.UART_IIR_THRI     # reading it consumes the event
    assert irq.level == 0 and iir_id(dev) == uart.UART_IIR_NO_INT
    dev.write(uart.UART_TX, 1, ord("x"))          # THR empties again at once
    assert irq.level == 1 and iir_id(dev) == uart.UART_IIR_THRI


def test_received_bytes_raise_data_interrupt(com1):
    dev, irq, out = com1
    dev.receive(b"ab")
    assert irq.level == 0                         # not enabled yet
    dev.write(uart.UART_FCR, 1, uart.UART_FCR_CLEAR_RCVR)  # the driver's start-up
    dev.write(uart.UART_IER, 1, uart.UART_IER_RDI)
    assert irq.level == 1
    assert dev.read(uart.UART_LSR, 1) & uart.UART_LSR_DR
    assert iir_id(dev) == uart.UART_IIR_RDI
    assert dev.read(uart.UART_RX, 1) == ord("a")
    assert dev.read(uart.UART_RX, 1) == ord("b")
    assert irq.level == 0 and not dev.read(uart.UART_LSR, 1) & uart.UART_LSR_DR


def test_out2_gates_the_interrupt(com1):
    dev, irq, out = com1
    dev.write(uart.UART_MCR, 1, 0)
    dev.write(uart.UART_IER, 1, uart.UART_IER_THRI)
    assert irq.level == 0


def test_loopback_as_the_8250_probe_checks_it(com1):
    dev, irq, out = com1
    dev.write(uart.UART_MCR, 1, uart.UART_MCR_LOOP | 0x0A)   # RTS and OUT2
    assert dev.read(uart.UART_MSR, 1) & 0xF0 == 0x90         # CTS and DCD
    dev.write(uart.UART_TX, 1, 0x55)
    assert out == b"" and dev.read(uart.UART_RX, 1) == 0x55


def test_divisor_latch_and_scratch(com1):
    dev, irq, out = com1
    dev.write(uart.UART_LCR, 1, uart.UART_LCR_DLAB | 3)
    dev.write(uart.UART_DLL, 1, 1)
    dev.write(uart.UART_DLM, 1, 0)
    assert out == b""                              # DLAB: not data
    assert dev.read(uart.UART_DLL, 1) == 1
    dev.write(uart.UART_LCR, 1, 3)
    dev.write(uart.UART_SCR, 1, 0xA5)
    assert dev.read(uart.UART_SCR, 1) == 0xA5


def test_fifo_enabled_shows_in_iir(com1):
    dev, irq, out = com1
    dev.write(uart.UART_FCR, 1, uart.UART_FCR_ENABLE_FIFO)
    assert dev.read(uart.UART_IIR, 1) & 0xC0 == 0xC0


def test_receive_buffer_is_bounded(com1):
    dev, irq, out = com1
    dev.write(uart.UART_IER, 1, uart.UART_IER_RDI)
    dev.receive(b"x" * (uart.RX_BUFFER_LIMIT + 100))
    n = 0
    while dev.read(uart.UART_LSR, 1) & uart.UART_LSR_DR:
        dev.read(uart.UART_RX, 1)
        n += 1
    assert n == uart.RX_BUFFER_LIMIT


def test_i8042_answers_the_linux_probe_and_resets():
    resets = []
    kbc = I8042(lambda: resets.append(1))

    def status():
        return kbc.read(4, 1)

    kbc.write(4, 1, 0x20)                      # read CTR
    assert status() & 1 and kbc.read(0, 1) == 0x70
    kbc.write(4, 1, 0xAA)                      # self test
    assert kbc.read(0, 1) == 0x55
    kbc.write(4, 1, 0xD3)                      # AUX loop: echoed without AUXDATA
    kbc.write(0, 1, 0x5A)
    assert status() & 0x21 == 0x01 and kbc.read(0, 1) == 0x5A
    kbc.write(4, 1, 0xA9)                      # AUX test fails: no mouse port
    assert kbc.read(0, 1) == 0x01
    assert not status() & 1 and not resets
    kbc.write(4, 1, 0xFE)
    assert resets == [1]


def test_debug_ports():
    statuses, marks = [], []
    ExitPort(statuses.append).write(0, 1, 0x107)
    con = DebugCon(marks.append)
    con.write(0, 2, 0x4241)
    assert statuses == [7] and marks == [0x41, 0x42]
    assert con.read(0, 1) == 0xE9


def test_bus_dispatch_and_conflicts():
    bus = Bus("port I/O")
    seen = []

    class Dev:
        def read(self, offset, size):
            return offset

        def write(self, offset, size, value):
            seen.append((offset, value))

    bus.add(0x3F8, 8, Dev(), "serial")
    bus.add(0x60, 5, Dev(), "i8042")
    entry = bus.find(0x3FA)
    assert entry.name == "serial" and bus.read(entry, 0x3FA, 1) == 2
    bus.write(bus.find(0x64), 0x64, 1, 0xFE)
    assert seen == [(4, 0xFE)]
    assert bus.find(0x400) is None and bus.find(0x3F7) is None
    assert bus.read(None, 0x80, 2) == 0xFFFF      # nobody home: all ones
    bus.write(None, 0x80, 1, 0)                   # ignored
    for base, size in [(0x3FF, 2), (0x3F0, 9), (0x3F8, 1), (0x5F, 2)]:
        with pytest.raises(BusConflict):
            bus.add(base, size, Dev(), "clash")

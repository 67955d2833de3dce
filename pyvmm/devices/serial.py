"""A 16550A UART (the PC's COM1 at 0x3f8, IRQ 4), interrupt driven.

Register file as in include/uapi/linux/serial_reg.h. The guest's 8250
driver writes characters to THR after a "transmitter empty" interrupt, up to
16 per interrupt, instead of polling LSR for every character; received bytes
raise the "data available" interrupt. The interrupt line follows the
pending state, so the IOAPIC sees a rising edge each time the UART starts
wanting attention.
"""

import collections
import threading

COM1_PORT = 0x3F8
COM1_IRQ = 4

# Register offsets
UART_RX = 0    # in:  receive buffer (DLAB=0)
UART_TX = 0    # out: transmit buffer (DLAB=0)
UART_DLL = 0   # divisor latch low (DLAB=1)
UART_IER = 1   # interrupt enable (DLAB=0)
UART_DLM = 1   # divisor latch high (DLAB=1)
UART_IIR = 2   # in:  interrupt identification
UART_FCR = 2   # out: FIFO control
UART_LCR = 3   # line control
UART_MCR = 4   # modem control
UART_LSR = 5   # line status
UART_MSR = 6   # modem status
UART_SCR = 7   # scratch

UART_IER_RDI = 0x01    # receiver data interrupt
UART_IER_THRI = 0x02   # transmitter holding register empty interrupt
UART_IIR_NO_INT = 0x01
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_FIFO_ENABLED = 0xC0
UART_FCR_ENABLE_FIFO = 0x01
UART_FCR_CLEAR_RCVR = 0x02
UART_LCR_DLAB = 0x80
UART_MCR_DTR, UART_MCR_RTS, UART_MCR_OUT1, UART_MCR_OUT2, UART_MCR_LOOP = 1, 2, 4, 8, 0x10
UART_LSR_DR = 0x01     # data ready
UART_LSR_THRE = 0x20   # transmit holding register empty
UART_LSR_TEMT = 0x40   # transmitter empty
UART_MSR_CTS, UART_MSR_DSR, UART_MSR_RI, UART_MSR_DCD = 0x10, 0x20, 0x40, 0x80

# Host input the guest has not taken yet; beyond this, bytes are dropped.
RX_BUFFER_LIMIT = 4096
# The receive FIFO the guest sees (a 16550A has 16 bytes).
RX_FIFO_SIZE = 16


class Serial:
    def __init__(self, set_irq, output):
        """set_irq(level) drives the IRQ line; output(byte) transmits one byte."""
        self._set_irq = set_irq
        self._output = output
        self._lock = threading.Lock()
        # Input waits in _pending until the guest's driver enables receive
        # interrupts, so that nothing typed or piped early is lost when the
        # driver clears the FIFO at start-up; then it moves to the FIFO, _rx.
        self._pending = collections.deque()
        self._rx = collections.deque()
        self._irq_level = 0
        self.ier = 0
        self.lcr = 0x03        # 8 data bits, as after a BIOS
        self.mcr = UART_MCR_OUT2
        self.scr = 0
        self.dll, self.dlm = 0x0C, 0  # 9600 baud
        self.fifo_enabled = False
        # "Transmitter empty" is an edge: raised when THR empties (always
        # right after a write here) or when the interrupt gets enabled, and
        # consumed by reading IIR.
        self._thr_pending = False

    # --- interrupt state ---------------------------------------------------

    def _iir(self):
        if self.ier & UART_IER_RDI and self._rx:
            return UART_IIR_RDI
        if self.ier & UART_IER_THRI and self._thr_pending:
            return UART_IIR_THRI
        return UART_IIR_NO_INT

    def _update_irq(self):
        level = 0 if self._iir() == UART_IIR_NO_INT else 1
        # OUT2 gates the interrupt line on PC serial ports.
        if not self.mcr & UART_MCR_OUT2:
            level = 0
        if level != self._irq_level:
            self._irq_level = level
            self._set_irq(level)

    # --- the host side -----------------------------------------------------

    def receive(self, data):
        """Bytes typed on the host side, for the guest to read."""
        with self._lock:
            room = RX_BUFFER_LIMIT - len(self._pending)
            self._pending.extend(data[:max(room, 0)])
            self._fill_fifo()
            self._update_irq()

    def _fill_fifo(self):
        if self.ier & UART_IER_RDI and not self.mcr & UART_MCR_LOOP:
            while self._pending and len(self._rx) < RX_FIFO_SIZE:
                self._rx.append(self._pending.popleft())

    # --- the guest side ----------------------------------------------------

    def read(self, offset, size):
        with self._lock:
            value = self._read(offset)
            self._fill_fifo()
            self._update_irq()
            return value

    def _read(self, offset):
        dlab = self.lcr & UART_LCR_DLAB
        if offset == UART_RX:
            if dlab:
                return self.dll
            return self._rx.popleft() if self._rx else 0
        if offset == UART_IER:
            return self.dlm if dlab else self.ier
        if offset == UART_IIR:
            iir = self._iir()
            if iir == UART_IIR_THRI:
                self._thr_pending = False
            return iir | (UART_IIR_FIFO_ENABLED if self.fifo_enabled else 0)
        if offset == UART_LCR:
            return self.lcr
        if offset == UART_MCR:
            return self.mcr
        if offset == UART_LSR:
            return UART_LSR_THRE | UART_LSR_TEMT | (UART_LSR_DR if self._rx else 0)
        if offset == UART_MSR:
            if self.mcr & UART_MCR_LOOP:
                # Loopback: the modem outputs come back as inputs (the 8250
                # driver checks this when it probes the port).
                return ((UART_MSR_CTS if self.mcr & UART_MCR_RTS else 0)
                        | (UART_MSR_DSR if self.mcr & UART_MCR_DTR else 0)
                        | (UART_MSR_RI if self.mcr & UART_MCR_OUT1 else 0)
                        | (UART_MSR_DCD if self.mcr & UART_MCR_OUT2 else 0))
            return UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
        if offset == UART_SCR:
            return self.scr
        return 0xFF

    def write(self, offset, size, value):
        value &= 0xFF
        with self._lock:
            self._write(offset, value)
            self._fill_fifo()
            self._update_irq()

    def _write(self, offset, value):
        dlab = self.lcr & UART_LCR_DLAB
        if offset == UART_TX:
            if dlab:
                self.dll = value
            elif self.mcr & UART_MCR_LOOP:
                if len(self._rx) < RX_FIFO_SIZE:
                    self._rx.append(value)
                self._thr_pending = True
            else:
                self._output(value)
                self._thr_pending = True
        elif offset == UART_IER:
            if dlab:
                self.dlm = value
            else:
                if value & UART_IER_THRI and not self.ier & UART_IER_THRI:
                    self._thr_pending = True  # THR is empty: say so at once
                self.ier = value & 0x0F
        elif offset == UART_FCR:
            self.fifo_enabled = bool(value & UART_FCR_ENABLE_FIFO)
            if value & UART_FCR_CLEAR_RCVR:
                self._rx.clear()
        elif offset == UART_LCR:
            self.lcr = value
        elif offset == UART_MCR:
            self.mcr = value & 0x1F
        elif offset == UART_SCR:
            self.scr = value

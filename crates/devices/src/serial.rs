//! 8250/16550A UART (PC COM ports), built on `vm_superio::Serial`.
//!
//! Register map (offsets from the base port, National Semiconductor PC16550D
//! datasheet): 0 RBR/THR (DLL when LCR.DLAB=1), 1 IER (DLM), 2 IIR/FCR,
//! 3 LCR, 4 MCR, 5 LSR, 6 MSR, 7 SCR.  The transmitter is always ready
//! (LSR.THRE=1, LSR.TEMT=1): bytes the guest writes to THR go straight to the
//! output sink.  The receive FIFO holds 64 bytes.

use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;

use crate::bus::{read_bytes, write_bytes, PioDevice};
use crate::irq::IrqLine;

/// Base I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// ISA IRQ (and GSI) of COM1.
pub const COM1_IRQ: u32 = 4;
/// Number of consecutive I/O ports a UART occupies.
pub const UART_PORTS: u16 = 8;

/// `vm_superio` trigger that pulses an [`IrqLine`] (the UART interrupt is
/// edge-triggered on the ISA bus).
pub struct IrqTrigger(pub Arc<dyn IrqLine>);

impl Trigger for IrqTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.pulse();
        Ok(())
    }
}

type Inner = vm_superio::Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>;

/// A 16550A UART at `base..base + 8` (COM1: 0x3f8, IRQ 4).
pub struct Serial {
    base: u16,
    inner: Inner,
}

impl Serial {
    /// Creates COM1 (ports 0x3f8-0x3ff) raising `irq` (wire it to GSI 4) and
    /// writing transmitted bytes to `out`.
    pub fn new(irq: Arc<dyn IrqLine>, out: Box<dyn Write + Send>) -> Self {
        Self::with_base(COM1_BASE, irq, out)
    }

    /// Creates a UART at an arbitrary base port (COM2 = 0x2f8, COM3 = 0x3e8,
    /// COM4 = 0x2e8).
    pub fn with_base(base: u16, irq: Arc<dyn IrqLine>, out: Box<dyn Write + Send>) -> Self {
        Self { base, inner: vm_superio::Serial::new(IrqTrigger(irq), out) }
    }

    /// First I/O port of the UART.
    pub fn base(&self) -> u16 {
        self.base
    }

    /// Queues console input bytes into the receive FIFO (RBR) and raises the
    /// receive-data interrupt if the guest enabled it (IER bit 0).
    ///
    /// Returns how many bytes were accepted (0 when the 64-byte FIFO is full,
    /// or while the UART is in loopback mode); the caller keeps the rest and
    /// retries later.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.inner.fifo_capacity() == 0 {
            return 0;
        }
        self.inner.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Free space in the receive FIFO, in bytes.
    pub fn fifo_capacity(&self) -> usize {
        self.inner.fifo_capacity()
    }

    /// Mutable access to the output sink (e.g. to flush it).
    pub fn output_mut(&mut self) -> &mut (dyn Write + Send) {
        self.inner.writer_mut().as_mut()
    }

    fn read_byte(&mut self, port: u16) -> u8 {
        match port.wrapping_sub(self.base) {
            off @ 0..=7 => self.inner.read(off as u8),
            _ => 0xff,
        }
    }

    fn write_byte(&mut self, port: u16, value: u8) {
        if let off @ 0..=7 = port.wrapping_sub(self.base) {
            if let Err(e) = self.inner.write(off as u8, value) {
                tracing::debug!("serial {:#x}: write failed: {e:?}", self.base);
            }
        }
    }
}

impl PioDevice for Serial {
    fn read(&mut self, port: u16, data: &mut [u8]) {
        read_bytes(port, data, |p| self.read_byte(p));
    }

    fn write(&mut self, port: u16, data: &[u8]) {
        write_bytes(port, data, |p, v| self.write_byte(p, v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::RecordingIrq;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn inb(s: &mut Serial, port: u16) -> u8 {
        let mut b = [0];
        s.read(port, &mut b);
        b[0]
    }

    #[test]
    fn output_and_lsr() {
        let buf = SharedBuf::default();
        let irq = Arc::new(RecordingIrq::new());
        let mut s = Serial::new(irq.clone(), Box::new(buf.clone()));
        for &c in b"hi!\n" {
            s.write(0x3f8, &[c]);
        }
        assert_eq!(&*buf.0.lock().unwrap(), b"hi!\n");
        // LSR: THR empty (bit 5) and transmitter empty (bit 6), no data ready.
        assert_eq!(inb(&mut s, 0x3fd) & 0x61, 0x60);
        // No interrupt: IER is zero.
        assert_eq!(irq.edges(), 0);
        // Scratch register round trip; unowned port reads 0xff.
        s.write(0x3ff, &[0x5a]);
        assert_eq!(inb(&mut s, 0x3ff), 0x5a);
        assert_eq!(inb(&mut s, 0x400), 0xff);
        s.write(0x400, &[1]);
    }

    #[test]
    fn input_raises_irq_when_enabled() {
        let irq = Arc::new(RecordingIrq::new());
        let mut s = Serial::new(irq.clone(), Box::new(std::io::sink()));
        assert_eq!(s.enqueue_input(b"ab"), 2);
        assert_eq!(irq.edges(), 0, "RDA interrupt disabled in IER");
        assert_eq!(inb(&mut s, 0x3fd) & 1, 1, "LSR data ready");
        // Enabling RDA with data pending asserts the interrupt.
        s.write(0x3f9, &[0x01]);
        assert_eq!(irq.take_edges(), 1);
        assert_eq!(inb(&mut s, 0x3fa) & 0x0f, 0x04, "IIR: received data");
        assert_eq!(inb(&mut s, 0x3f8), b'a');
        assert_eq!(inb(&mut s, 0x3f8), b'b');
        assert_eq!(inb(&mut s, 0x3fd) & 1, 0);
        // New input with RDA enabled raises the IRQ again.
        assert_eq!(s.enqueue_input(b"c"), 1);
        assert_eq!(irq.take_edges(), 1);
        assert_eq!(inb(&mut s, 0x3f8), b'c');
    }

    #[test]
    fn fifo_capacity_is_respected() {
        let mut s = Serial::new(Arc::new(crate::NoIrq), Box::new(std::io::sink()));
        let big = [b'x'; 100];
        assert_eq!(s.enqueue_input(&big), 64);
        assert_eq!(s.fifo_capacity(), 0);
        assert_eq!(s.enqueue_input(b"y"), 0);
        assert_eq!(s.enqueue_input(b""), 0);
        let mut two = [0u8; 2];
        s.read(0x3f8, &mut two);
        assert_eq!(two[0], b'x');
        assert_eq!(s.fifo_capacity(), 1);
    }
}

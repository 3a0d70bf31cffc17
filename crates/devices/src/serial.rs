//! 8250/16550A UART (PC COM ports), built on `vm_superio::Serial`.
//!
//! Register map (offsets from the base port, National Semiconductor PC16550D
//! datasheet): 0 RBR/THR (DLL when LCR.DLAB=1), 1 IER (DLM), 2 IIR/FCR,
//! 3 LCR, 4 MCR, 5 LSR, 6 MSR, 7 SCR.  The transmitter is always ready
//! (LSR.THRE=1, LSR.TEMT=1): bytes the guest writes to THR go straight to the
//! output sink.  The receive FIFO holds 64 bytes.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::NoEvents;
use vm_superio::Trigger;

use crate::bus::{read_bytes, write_bytes, PioDevice};
use crate::irq::IrqLine;
use crate::StateError;

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

/// The trigger inside [`Serial`]: pulses the IRQ line, except while a
/// snapshot is being loaded (the interrupt controller's own state already
/// holds any interrupt the UART raised before the snapshot).
struct LineTrigger {
    line: Arc<dyn IrqLine>,
    muted: AtomicBool,
}

impl LineTrigger {
    fn new(line: Arc<dyn IrqLine>, muted: bool) -> Self {
        Self { line, muted: AtomicBool::new(muted) }
    }
}

impl Trigger for LineTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        if !self.muted.load(Ordering::Relaxed) {
            self.line.pulse();
        }
        Ok(())
    }
}

type Inner = vm_superio::Serial<LineTrigger, NoEvents, Box<dyn Write + Send>>;

/// Receive FIFO size in bytes.
pub const FIFO_SIZE: usize = 64;

/// Snapshot of a UART's registers and receive FIFO (see [`Serial::state`]);
/// the serializable form of `vm_superio::serial::SerialState`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte (DLL).
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte (DLM).
    pub baud_divisor_high: u8,
    /// Interrupt enable register (bits 3:0).
    pub interrupt_enable: u8,
    /// Interrupt identification register (pending interrupt bits).
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes not yet read by the guest, oldest first (at most
    /// [`FIFO_SIZE`]).
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialSnapshot {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for vm_superio::serial::SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

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
        Self { base, inner: vm_superio::Serial::new(LineTrigger::new(irq, false), out) }
    }

    /// Snapshot of the registers and the receive FIFO.  The base port, IRQ
    /// line and output writer are not part of it.
    pub fn state(&self) -> SerialSnapshot {
        self.inner.state().into()
    }

    /// Checks `s` without applying it (see [`Serial::restore`]).
    pub fn validate(&self, s: &SerialSnapshot) -> Result<(), StateError> {
        StateError::check(
            s.in_buffer.len() <= FIFO_SIZE,
            "serial.in_buffer",
            format!("{} bytes, more than the {FIFO_SIZE}-byte FIFO", s.in_buffer.len()),
        )?;
        StateError::check(
            s.interrupt_enable & !0x0f == 0,
            "serial.interrupt_enable",
            format!("{:#x}: bits 7:4 set", s.interrupt_enable),
        )
    }

    /// Loads a snapshot taken by [`Serial::state`], keeping the IRQ line and
    /// output writer given to the constructor.  Raises no interrupt: pending
    /// UART interrupts are in the interrupt controller's own snapshot.  On
    /// error the UART is left unchanged.
    pub fn restore(&mut self, s: &SerialSnapshot) -> Result<(), StateError> {
        self.validate(s)?;
        let line = Arc::clone(&self.inner.interrupt_evt().line);
        let sink: Box<dyn Write + Send> = Box::new(std::io::sink());
        let placeholder = vm_superio::Serial::new(LineTrigger::new(Arc::clone(&line), true), sink);
        let out = std::mem::replace(&mut self.inner, placeholder).into_writer();
        let state = vm_superio::serial::SerialState::from(s);
        match vm_superio::Serial::from_state(&state, LineTrigger::new(line, true), NoEvents, out) {
            Ok(inner) => self.inner = inner,
            // Unreachable: the FIFO length was checked and the trigger cannot fail.
            Err(e) => {
                return Err(StateError { field: "serial".into(), reason: format!("rejected by the UART model: {e:?}") })
            }
        }
        self.inner.interrupt_evt().muted.store(false, Ordering::Relaxed);
        Ok(())
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
        match u8::try_from(port.wrapping_sub(self.base)) {
            Ok(off @ 0..=7) => self.inner.read(off),
            _ => 0xff,
        }
    }

    fn write_byte(&mut self, port: u16, value: u8) {
        if let Ok(off @ 0..=7) = u8::try_from(port.wrapping_sub(self.base)) {
            if let Err(e) = self.inner.write(off, value) {
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
    fn state_round_trip() {
        let irq = Arc::new(RecordingIrq::new());
        let mut s = Serial::new(irq.clone(), Box::new(std::io::sink()));
        s.write(0x3fb, &[0x80]); // DLAB
        s.write(0x3f8, &[0x01]); // 115200 baud
        s.write(0x3f9, &[0x00]);
        s.write(0x3fb, &[0x1b]); // 8E1, DLAB off
        s.write(0x3fc, &[0x0b]); // DTR RTS OUT2
        s.write(0x3ff, &[0x77]);
        assert_eq!(s.enqueue_input(b"hello"), 5);
        s.write(0x3f9, &[0x01]); // RDA interrupt
        assert_eq!(inb(&mut s, 0x3f8), b'h');
        assert_eq!(s.enqueue_input(b"!"), 1); // RDA interrupt pending in IIR
        irq.take_edges();
        let st = s.state();
        assert_eq!(st.in_buffer, b"ello!");
        assert_eq!(st.interrupt_identification & 0x04, 0x04);
        let json = serde_json::to_string(&st).unwrap();
        let st2: SerialSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(st2, st);
        let buf = SharedBuf::default();
        let irq2 = Arc::new(RecordingIrq::new());
        let mut t = Serial::new(irq2.clone(), Box::new(buf.clone()));
        t.restore(&st2).unwrap();
        assert_eq!(irq2.edges(), 0, "restore raises no interrupt");
        assert_eq!(t.state(), st);
        for port in 0x3f9..=0x3ff {
            assert_eq!(inb(&mut s, port), inb(&mut t, port), "port {port:#x}");
        }
        assert_eq!(t.fifo_capacity(), 59);
        for &c in b"ello!" {
            assert_eq!(inb(&mut t, 0x3f8), c);
        }
        // The IRQ line and the output writer are the ones given to the constructor.
        assert_eq!(t.enqueue_input(b"x"), 1);
        assert_eq!(irq2.take_edges(), 1);
        t.write(0x3f8, b"!");
        assert_eq!(&*buf.0.lock().unwrap(), b"!");
        t.write(0x3fb, &[0x80]);
        assert_eq!(inb(&mut t, 0x3f8), 0x01, "divisor latch");
    }

    #[test]
    fn malformed_state_is_rejected() {
        let mut s = Serial::new(Arc::new(crate::NoIrq), Box::new(std::io::sink()));
        s.write(0x3ff, &[0x42]);
        let good = s.state();
        let mut bad = good.clone();
        bad.in_buffer = vec![0; FIFO_SIZE + 1];
        assert_eq!(s.restore(&bad).unwrap_err().field, "serial.in_buffer");
        let mut bad = good.clone();
        bad.interrupt_enable = 0xf0;
        assert_eq!(s.restore(&bad).unwrap_err().field, "serial.interrupt_enable");
        assert_eq!(s.state(), good);
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

//! Minimal Intel 8042 PS/2 keyboard controller (ports 0x60 and 0x64), with no
//! keyboard or mouse attached.
//!
//! Its purposes are (1) letting the guest reset the machine (command 0xFE,
//! the classic "pulse output line 0" reset used by Linux `reboot=k`), and
//! (2) answering the Linux `i8042` driver's probe quickly instead of timing
//! out.  Behaviour follows the IBM PC/AT technical reference / 8042 controller
//! command set:
//!
//! | command (port 0x64) | effect |
//! |---|---|
//! | 0x20 | read configuration byte ("CTR") → output buffer |
//! | 0x60 | next data byte (port 0x60) is the new configuration byte |
//! | 0xA7 / 0xA8 | disable / enable AUX — ignored: no AUX port (CTR bit 5 stays set) |
//! | 0xA9 | AUX interface test → 0x01 ("clock line stuck low": no AUX port) |
//! | 0xAA | controller self-test → 0x55 |
//! | 0xAB | keyboard interface test → 0x00 |
//! | 0xAD / 0xAE | disable / enable keyboard (CTR bit 4) |
//! | 0xD0 | read output port → output buffer |
//! | 0xD1 | next data byte is the output port; bit 0 clear = CPU reset |
//! | 0xD2 | next data byte is echoed as keyboard data |
//! | 0xD3 | next data byte is echoed as keyboard data (no AUX loopback) |
//! | 0xD4 | next data byte goes to the AUX device — dropped |
//! | 0xF0-0xFF | pulse output lines; an even command (bit 0 clear, e.g. 0xFE) resets the CPU |
//!
//! Status register (port 0x64 read): bit 0 OBF, bit 2 system flag (always 1,
//! POST passed), bit 3 last write was a command, bit 4 keyboard not inhibited.
//! Data written to port 0x60 outside a command parameter would go to the
//! keyboard, which is absent: it is dropped (the guest's keyboard driver
//! times out, asynchronously in Linux).  No interrupt (IRQ 1/12) is ever raised.
//!
//! Linux's AUX probe (`i8042_check_aux`) sees the 0xD3 loopback fail
//! (data without the AUX status bit), then the AUX test return 0x01, and
//! concludes there is no AUX port, without any 500 ms timeout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bus::{read_bytes, write_bytes, PioDevice};
use crate::StateError;

/// Data port (read: output buffer, write: input buffer / command parameter).
pub const DATA_PORT: u16 = 0x60;
/// Status (read) / command (write) port.
pub const COMMAND_PORT: u16 = 0x64;

const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
const STATUS_CMD: u8 = 0x08;
const STATUS_UNLOCKED: u8 = 0x10;

const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
/// Power-on configuration byte: keyboard interrupt enabled, system flag,
/// AUX disabled, XT translation.
const CTR_DEFAULT: u8 = 0x01 | 0x04 | CTR_AUX_DISABLE | 0x40;
/// Output port: bit 0 = CPU not in reset, bit 1 = A20 enabled.
const OUTPUT_PORT_DEFAULT: u8 = 0x03;

/// What the next write to the data port means (a command awaiting its
/// parameter byte).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// No command pending: data goes to the (absent) keyboard.
    None,
    /// After command 0x60: the byte is the new configuration byte.
    WriteCtr,
    /// After command 0xD1: the byte is the new output port.
    WriteOutputPort,
    /// After command 0xD2/0xD3: the byte is echoed as keyboard data.
    EchoKbd,
    /// After command 0xD4: the byte goes to the (absent) AUX device.
    AuxSend,
}

/// Snapshot of the 8042 (see [`I8042::state`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct I8042State {
    /// Configuration byte ("CTR"; bit 5, AUX disabled, always set).
    pub ctr: u8,
    /// Output port (bit 0 = CPU not in reset, bit 1 = A20).
    pub output_port: u8,
    /// Unread output-buffer byte.
    pub out: Option<u8>,
    /// The last write went to the command port (status bit 3).
    pub last_was_cmd: bool,
    /// Command awaiting its data byte.
    pub pending: Pending,
}

/// The 8042 controller.  Register it at port 0x60 (len 1) and port 0x64
/// (len 1); the same instance handles both.
pub struct I8042 {
    ctr: u8,
    output_port: u8,
    /// Single-byte output buffer: a new response overwrites an unread one.
    out: Option<u8>,
    last_was_cmd: bool,
    pending: Pending,
    reset: Box<dyn Fn() + Send>,
}

impl I8042 {
    /// Creates the controller; `reset` is invoked (with the device lock held,
    /// so it must not access this device) each time the guest requests a CPU
    /// reset.
    pub fn new(reset: Box<dyn Fn() + Send>) -> Self {
        Self {
            ctr: CTR_DEFAULT,
            output_port: OUTPUT_PORT_DEFAULT,
            out: None,
            last_was_cmd: false,
            pending: Pending::None,
            reset,
        }
    }

    /// Creates the controller with a reset callback that sets `flag` to
    /// `true`; the VMM polls it after each port-I/O exit.
    pub fn with_reset_flag(flag: Arc<AtomicBool>) -> Self {
        Self::new(Box::new(move || flag.store(true, Ordering::SeqCst)))
    }

    /// Snapshot of the controller's registers.
    pub fn state(&self) -> I8042State {
        I8042State {
            ctr: self.ctr,
            output_port: self.output_port,
            out: self.out,
            last_was_cmd: self.last_was_cmd,
            pending: self.pending,
        }
    }

    /// Checks `s` without applying it (see [`I8042::restore`]).
    pub fn validate(&self, s: &I8042State) -> Result<(), StateError> {
        StateError::check(s.ctr & CTR_AUX_DISABLE != 0, "i8042.ctr", format!("{:#x}: AUX-disable bit clear", s.ctr))
    }

    /// Loads a snapshot taken by [`I8042::state`], keeping the reset
    /// callback (which the restore does not call).  On error the controller
    /// is left unchanged.
    pub fn restore(&mut self, s: &I8042State) -> Result<(), StateError> {
        self.validate(s)?;
        self.ctr = s.ctr;
        self.output_port = s.output_port;
        self.out = s.out;
        self.last_was_cmd = s.last_was_cmd;
        self.pending = s.pending;
        Ok(())
    }

    fn request_reset(&mut self) {
        tracing::info!("i8042: guest requested CPU reset");
        (self.reset)();
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_SYS | STATUS_UNLOCKED;
        if self.out.is_some() {
            s |= STATUS_OBF;
        }
        if self.last_was_cmd {
            s |= STATUS_CMD;
        }
        s
    }

    fn command(&mut self, cmd: u8) {
        self.last_was_cmd = true;
        self.pending = Pending::None;
        match cmd {
            0x20 => self.out = Some(self.ctr),
            0x60 => self.pending = Pending::WriteCtr,
            // No AUX port: enabling/disabling it has no effect on CTR bit 5.
            0xa7 | 0xa8 => {}
            0xa9 => self.out = Some(0x01),
            0xaa => {
                self.out = Some(0x55);
                self.ctr = CTR_DEFAULT;
            }
            0xab => self.out = Some(0x00),
            0xad => self.ctr |= CTR_KBD_DISABLE,
            0xae => self.ctr &= !CTR_KBD_DISABLE,
            0xd0 => self.out = Some(self.output_port),
            0xd1 => self.pending = Pending::WriteOutputPort,
            0xd2 | 0xd3 => self.pending = Pending::EchoKbd,
            0xd4 => self.pending = Pending::AuxSend,
            0xf0..=0xff => {
                if cmd & 1 == 0 {
                    self.request_reset();
                }
            }
            _ => tracing::debug!("i8042: unsupported command {cmd:#x}"),
        }
    }

    fn data_write(&mut self, value: u8) {
        self.last_was_cmd = false;
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::WriteCtr => self.ctr = value | CTR_AUX_DISABLE,
            Pending::WriteOutputPort => {
                self.output_port = value;
                if value & 1 == 0 {
                    self.request_reset();
                }
            }
            Pending::EchoKbd => self.out = Some(value),
            // No AUX device and no keyboard: dropped.
            Pending::AuxSend | Pending::None => {}
        }
    }

    fn read_byte(&mut self, port: u16) -> u8 {
        match port {
            DATA_PORT => self.out.take().unwrap_or(0),
            COMMAND_PORT => self.status(),
            _ => 0xff,
        }
    }

    fn write_byte(&mut self, port: u16, value: u8) {
        match port {
            DATA_PORT => self.data_write(value),
            COMMAND_PORT => self.command(value),
            _ => {}
        }
    }
}

impl PioDevice for I8042 {
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

    fn inb(d: &mut I8042, port: u16) -> u8 {
        let mut b = [0];
        d.read(port, &mut b);
        b[0]
    }

    #[test]
    fn reset_callback() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut d = I8042::with_reset_flag(flag.clone());
        d.write(0x64, &[0xfe]);
        assert!(flag.swap(false, Ordering::SeqCst));
        // Output-port write with bit 0 clear also resets.
        d.write(0x64, &[0xd1]);
        d.write(0x60, &[0x02]);
        assert!(flag.swap(false, Ordering::SeqCst));
        d.write(0x64, &[0xff]);
        assert!(!flag.load(Ordering::SeqCst));
    }

    #[test]
    fn state_round_trip() {
        let mut d = I8042::new(Box::new(|| {}));
        d.write(0x64, &[0x60]);
        d.write(0x60, &[0x45]); // CTR
        d.write(0x64, &[0xad]); // disable keyboard
        d.write(0x64, &[0xd2]);
        d.write(0x60, &[0x9c]); // echoed byte waits in the output buffer
        d.write(0x64, &[0xd1]); // output port write pending
        let s = d.state();
        assert_eq!(s.pending, Pending::WriteOutputPort);
        let json = serde_json::to_string(&s).unwrap();
        let s2: I8042State = serde_json::from_str(&json).unwrap();
        assert_eq!(s2, s);
        let flag = Arc::new(AtomicBool::new(false));
        let mut e = I8042::with_reset_flag(flag.clone());
        e.restore(&s2).unwrap();
        assert_eq!(e.state(), s);
        assert!(!flag.load(Ordering::SeqCst));
        assert_eq!(inb(&mut e, 0x64), inb(&mut d, 0x64));
        assert_eq!(inb(&mut e, 0x60), 0x9c);
        // The pending output-port write completes on the restored controller: reset.
        e.write(0x60, &[0x00]);
        assert!(flag.load(Ordering::SeqCst));
        e.write(0x64, &[0x20]);
        assert_eq!(inb(&mut e, 0x60), 0x45 | CTR_AUX_DISABLE | CTR_KBD_DISABLE);
    }

    #[test]
    fn malformed_state_is_rejected() {
        let mut d = I8042::new(Box::new(|| {}));
        let good = d.state();
        let bad = I8042State { ctr: 0, ..good.clone() };
        assert_eq!(d.restore(&bad).unwrap_err().field, "i8042.ctr");
        assert_eq!(d.state(), good);
        assert!(serde_json::from_str::<Pending>("\"Bogus\"").is_err());
    }

    #[test]
    fn linux_probe_sequence() {
        let mut d = I8042::new(Box::new(|| {}));
        // Flush: nothing pending.
        assert_eq!(inb(&mut d, 0x64) & STATUS_OBF, 0);
        // Self test.
        d.write(0x64, &[0xaa]);
        assert_eq!(inb(&mut d, 0x64) & STATUS_OBF, 1);
        assert_eq!(inb(&mut d, 0x60), 0x55);
        assert_eq!(inb(&mut d, 0x64) & STATUS_OBF, 0);
        // Read / write CTR.
        d.write(0x64, &[0x20]);
        let ctr = inb(&mut d, 0x60);
        assert_eq!(ctr, CTR_DEFAULT);
        d.write(0x64, &[0x60]);
        d.write(0x60, &[0x47]);
        d.write(0x64, &[0x20]);
        assert_eq!(inb(&mut d, 0x60), 0x47 | CTR_AUX_DISABLE);
        // Keyboard interface test.
        d.write(0x64, &[0xab]);
        assert_eq!(inb(&mut d, 0x60), 0x00);
        // AUX loop: answer without the AUX status bit, AUX test fails.
        d.write(0x64, &[0xd3]);
        d.write(0x60, &[0x5a]);
        assert_eq!(inb(&mut d, 0x64) & (STATUS_OBF | 0x20), STATUS_OBF);
        d.write(0x64, &[0xa9]);
        assert_eq!(inb(&mut d, 0x60), 0x01);
        // AUX enable does not clear CTR.AUXDIS.
        d.write(0x64, &[0xa8]);
        d.write(0x64, &[0x20]);
        assert_ne!(inb(&mut d, 0x60) & CTR_AUX_DISABLE, 0);
        // Keyboard data is dropped; random bytes do not panic.
        for v in 0..=255u8 {
            d.write(0x60, &[v]);
            d.write(0x64, &[(v & 0xfe) | 1]);
            let mut w = [0u8; 4];
            d.read(0x60, &mut w);
        }
    }
}

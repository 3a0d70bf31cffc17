//! Dual Intel 8259A programmable interrupt controllers (PC/AT cascade) and
//! the edge/level control registers (ELCR, PIIX/ICH "4D0h/4D1h").
//!
//! Ports: master 0x20 (command) / 0x21 (data), slave 0xA0 / 0xA1, ELCR 0x4D0
//! (IRQ 0-7) / 0x4D1 (IRQ 8-15).  The slave's INT output is wired to master
//! input 2.  Implemented from the Intel 8259A datasheet: ICW1-ICW4
//! initialisation (single/cascade, ICW4, auto-EOI, special fully nested),
//! OCW1 (IMR), OCW2 (non-specific / specific EOI, rotations, set priority),
//! OCW3 (read IRR/ISR, poll, special mask), edge detection for inputs whose
//! ELCR bit is 0, level sensitivity for inputs whose ELCR bit is 1,
//! rotating priority, and spurious IRQ 7/15 on an interrupt acknowledge with
//! no pending request.  ELCR bits for IRQ 0, 1, 2, 8 and 13 are reserved (0).

use serde::{Deserialize, Serialize};

use crate::bus::{read_bytes, write_bytes, PioDevice};
use crate::StateError;

/// Master PIC command port (data port is +1).
pub const MASTER_PORT: u16 = 0x20;
/// Slave PIC command port (data port is +1).
pub const SLAVE_PORT: u16 = 0xa0;
/// ELCR port for IRQ 0-7 (IRQ 8-15 at +1).
pub const ELCR_PORT: u16 = 0x4d0;

/// One 8259A.
#[derive(Debug, Clone, Default)]
struct Chip {
    /// Interrupt request register.
    irr: u8,
    /// Interrupt mask register (OCW1).
    imr: u8,
    /// In-service register.
    isr: u8,
    /// Current input levels (for edge detection).
    last_level: u8,
    /// Priority rotation: IR `priority_add` has the highest priority.
    priority_add: u8,
    /// ICW2: vector base (low 3 bits zero).
    irq_base: u8,
    /// OCW3 RR/RIS: `true` = reads of the command port return ISR.
    read_isr: bool,
    /// OCW3 P: next read is a poll command.
    poll: bool,
    /// OCW3 special mask mode.
    special_mask: bool,
    /// 0 = ready, 1..=3 = expecting ICW2..ICW4.
    init_state: u8,
    /// ICW1 IC4.
    init4: bool,
    /// ICW1 SNGL.
    single: bool,
    /// ICW4 AEOI.
    auto_eoi: bool,
    /// OCW2 rotate in automatic EOI mode.
    rotate_on_auto_eoi: bool,
    /// ICW4 SFNM.
    special_fully_nested: bool,
    /// ELCR: 1 = level triggered.
    elcr: u8,
    /// Writable ELCR bits.
    elcr_mask: u8,
    is_master: bool,
}

impl Chip {
    fn new(is_master: bool) -> Self {
        Self { elcr_mask: if is_master { 0xf8 } else { 0xde }, is_master, ..Self::default() }
    }

    fn set_input(&mut self, irq: u8, level: bool) {
        let mask = 1u8 << (irq & 7);
        if self.elcr & mask != 0 {
            if level {
                self.irr |= mask;
                self.last_level |= mask;
            } else {
                self.irr &= !mask;
                self.last_level &= !mask;
            }
        } else if level {
            if self.last_level & mask == 0 {
                self.irr |= mask;
            }
            self.last_level |= mask;
        } else {
            self.last_level &= !mask;
        }
    }

    /// Priority (0 = highest) of the highest-priority bit in `mask`, or 8.
    fn priority(&self, mask: u8) -> u8 {
        (0..8u8).find(|p| mask & (1 << ((p + self.priority_add) & 7)) != 0).unwrap_or(8)
    }

    /// The IR input this chip would interrupt for, if any.
    fn pending_irq(&self) -> Option<u8> {
        let prio = self.priority(self.irr & !self.imr);
        if prio == 8 {
            return None;
        }
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if self.special_fully_nested && self.is_master {
            in_service &= !(1 << 2);
        }
        (prio < self.priority(in_service)).then_some((prio + self.priority_add) & 7)
    }

    fn intack(&mut self, irq: u8) {
        let mask = 1u8 << (irq & 7);
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= mask;
        }
        // A level-sensitive request stays in IRR while the input is high.
        if self.elcr & mask == 0 {
            self.irr &= !mask;
        }
    }

    fn init_reset(&mut self) {
        let (elcr, elcr_mask, is_master) = (self.elcr, self.elcr_mask, self.is_master);
        let irr = self.irr & elcr;
        *self = Self { elcr, elcr_mask, is_master, irr, ..Self::default() };
    }

    fn write_command(&mut self, val: u8) {
        if val & 0x10 != 0 {
            // ICW1.
            self.init_reset();
            self.init_state = 1;
            self.init4 = val & 1 != 0;
            self.single = val & 2 != 0;
            if val & 0x08 != 0 {
                tracing::debug!("pic: ICW1 LTIM (global level mode) ignored; use ELCR");
            }
        } else if val & 0x08 != 0 {
            // OCW3.
            if val & 0x04 != 0 {
                self.poll = true;
            }
            if val & 0x02 != 0 {
                self.read_isr = val & 1 != 0;
            }
            if val & 0x40 != 0 {
                self.special_mask = val & 0x20 != 0;
            }
        } else {
            // OCW2.
            let level = val & 7;
            match val >> 5 {
                0 => self.rotate_on_auto_eoi = false,
                4 => self.rotate_on_auto_eoi = true,
                cmd @ (1 | 5) => {
                    // Non-specific EOI (with rotation for 5).
                    let prio = self.priority(self.isr);
                    if prio != 8 {
                        let irq = (prio + self.priority_add) & 7;
                        self.isr &= !(1 << irq);
                        if cmd == 5 {
                            self.priority_add = (irq + 1) & 7;
                        }
                    }
                }
                3 => self.isr &= !(1 << level),
                6 => self.priority_add = (level + 1) & 7,
                7 => {
                    self.isr &= !(1 << level);
                    self.priority_add = (level + 1) & 7;
                }
                _ => {}
            }
        }
    }

    fn write_data(&mut self, val: u8) {
        match self.init_state {
            1 => {
                self.irq_base = val & 0xf8;
                self.init_state = match (self.single, self.init4) {
                    (false, _) => 2,
                    (true, true) => 3,
                    (true, false) => 0,
                };
            }
            2 => self.init_state = if self.init4 { 3 } else { 0 },
            3 => {
                self.special_fully_nested = val & 0x10 != 0;
                self.auto_eoi = val & 0x02 != 0;
                self.init_state = 0;
            }
            _ => self.imr = val,
        }
    }
}

/// Snapshot of one 8259A (see [`PicState`]).  Bit *n* of the 8-bit registers
/// is IR input *n* of this chip.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PicChipState {
    /// Interrupt request register.
    pub irr: u8,
    /// Interrupt mask register (OCW1).
    pub imr: u8,
    /// In-service register.
    pub isr: u8,
    /// Last input levels seen (for edge detection).
    pub last_level: u8,
    /// Priority rotation: IR `priority_add` (0-7) has the highest priority.
    pub priority_add: u8,
    /// ICW2 vector base (low 3 bits zero).
    pub irq_base: u8,
    /// OCW3 RR/RIS: reads of the command port return ISR (else IRR).
    pub read_isr: bool,
    /// OCW3 P: the next command-port read is a poll.
    pub poll: bool,
    /// OCW3 special mask mode.
    pub special_mask: bool,
    /// Initialisation sequence: 0 = ready, 1-3 = expecting ICW2-ICW4.
    pub init_state: u8,
    /// ICW1 IC4 (ICW4 follows).
    pub init4: bool,
    /// ICW1 SNGL (no cascade).
    pub single: bool,
    /// ICW4 AEOI.
    pub auto_eoi: bool,
    /// OCW2 rotate in automatic EOI mode.
    pub rotate_on_auto_eoi: bool,
    /// ICW4 SFNM.
    pub special_fully_nested: bool,
    /// ELCR byte: 1 = level triggered (reserved bits of the chip are 0).
    pub elcr: u8,
}

/// Snapshot of the PIC pair and ELCR (see [`Pic::state`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PicState {
    /// Master (IRQ 0-7, ports 0x20/0x21, ELCR 0x4D0).
    pub master: PicChipState,
    /// Slave (IRQ 8-15, ports 0xA0/0xA1, ELCR 0x4D1).
    pub slave: PicChipState,
}

impl Chip {
    fn state(&self) -> PicChipState {
        PicChipState {
            irr: self.irr,
            imr: self.imr,
            isr: self.isr,
            last_level: self.last_level,
            priority_add: self.priority_add,
            irq_base: self.irq_base,
            read_isr: self.read_isr,
            poll: self.poll,
            special_mask: self.special_mask,
            init_state: self.init_state,
            init4: self.init4,
            single: self.single,
            auto_eoi: self.auto_eoi,
            rotate_on_auto_eoi: self.rotate_on_auto_eoi,
            special_fully_nested: self.special_fully_nested,
            elcr: self.elcr,
        }
    }

    fn validate(&self, s: &PicChipState, name: &str) -> Result<(), StateError> {
        StateError::check(s.priority_add <= 7, format!("{name}.priority_add"), format!("{} > 7", s.priority_add))?;
        StateError::check(s.irq_base & 7 == 0, format!("{name}.irq_base"), format!("{:#x}: low bits set", s.irq_base))?;
        StateError::check(s.init_state <= 3, format!("{name}.init_state"), format!("{} > 3", s.init_state))?;
        StateError::check(
            s.elcr & !self.elcr_mask == 0,
            format!("{name}.elcr"),
            format!("{:#x}: reserved bits set (writable {:#x})", s.elcr, self.elcr_mask),
        )
    }

    fn restore(&mut self, s: &PicChipState) {
        let (elcr_mask, is_master) = (self.elcr_mask, self.is_master);
        *self = Self {
            irr: s.irr,
            imr: s.imr,
            isr: s.isr,
            last_level: s.last_level,
            priority_add: s.priority_add,
            irq_base: s.irq_base,
            read_isr: s.read_isr,
            poll: s.poll,
            special_mask: s.special_mask,
            init_state: s.init_state,
            init4: s.init4,
            single: s.single,
            auto_eoi: s.auto_eoi,
            rotate_on_auto_eoi: s.rotate_on_auto_eoi,
            special_fully_nested: s.special_fully_nested,
            elcr: s.elcr,
            elcr_mask,
            is_master,
        };
    }
}

/// The PC/AT pair of 8259A PICs plus ELCR.
///
/// Register the same instance at ports 0x20 (len 2), 0xA0 (len 2) and
/// 0x4D0 (len 2).
#[derive(Debug, Clone)]
pub struct Pic {
    chips: [Chip; 2],
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// Creates both PICs in their power-on state (uninitialised, IMR = 0,
    /// vector base 0, all inputs edge-triggered).
    pub fn new() -> Self {
        Self { chips: [Chip::new(true), Chip::new(false)] }
    }

    /// Propagates the slave's INT output to master input 2.
    fn update(&mut self) {
        let slave_int = self.chips[1].pending_irq().is_some();
        self.chips[0].set_input(2, slave_int);
    }

    /// Drives ISA interrupt input `irq` (0-15; 2 is the cascade input and
    /// is ignored, larger values are ignored) to `level` (`true` = high).
    ///
    /// Edge-triggered inputs (ELCR bit 0) latch a request on a low→high
    /// transition; level-triggered ones request while high.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            0 | 1 | 3..=7 => self.chips[0].set_input(irq, level),
            8..=15 => self.chips[1].set_input(irq - 8, level),
            _ => return,
        }
        self.update();
    }

    /// The master's INT output: an unmasked request with higher priority than
    /// any interrupt in service is pending.
    pub fn has_interrupt(&self) -> bool {
        self.chips[0].pending_irq().is_some()
    }

    /// Interrupt acknowledge (the CPU's INTA cycles): returns the vector and
    /// moves the request from IRR to ISR (unless in auto-EOI mode).
    ///
    /// Returns `None` when INT is not asserted (no INTA cycle would happen).
    /// If the master's request comes from the slave and the slave's request
    /// has gone, returns the slave's spurious vector (IRQ 15, nothing set in
    /// the slave's ISR).
    pub fn acknowledge(&mut self) -> Option<u8> {
        self.has_interrupt().then(|| self.inta())
    }

    /// Full INTA sequence, including the master's spurious IRQ 7 when nothing
    /// is pending.
    fn inta(&mut self) -> u8 {
        let vector = match self.chips[0].pending_irq() {
            Some(2) => {
                let slave_irq = match self.chips[1].pending_irq() {
                    Some(irq) => {
                        self.chips[1].intack(irq);
                        irq
                    }
                    None => 7,
                };
                self.chips[0].intack(2);
                self.chips[1].irq_base.wrapping_add(slave_irq)
            }
            Some(irq) => {
                self.chips[0].intack(irq);
                self.chips[0].irq_base.wrapping_add(irq)
            }
            None => self.chips[0].irq_base.wrapping_add(7),
        };
        self.update();
        vector
    }

    /// Interrupt request register of the master (bits 0-7) and slave (8-15).
    pub fn irr(&self) -> u16 {
        u16::from_le_bytes([self.chips[0].irr, self.chips[1].irr])
    }

    /// In-service register of the master (bits 0-7) and slave (8-15).
    pub fn isr(&self) -> u16 {
        u16::from_le_bytes([self.chips[0].isr, self.chips[1].isr])
    }

    /// Interrupt mask register of the master (bits 0-7) and slave (8-15).
    pub fn imr(&self) -> u16 {
        u16::from_le_bytes([self.chips[0].imr, self.chips[1].imr])
    }

    /// ELCR of the master (bits 0-7) and slave (8-15): 1 = level triggered.
    pub fn elcr(&self) -> u16 {
        u16::from_le_bytes([self.chips[0].elcr, self.chips[1].elcr])
    }

    /// Snapshot of both chips and the ELCR.
    pub fn state(&self) -> PicState {
        PicState { master: self.chips[0].state(), slave: self.chips[1].state() }
    }

    /// Checks `s` without applying it (see [`Pic::restore`]).
    pub fn validate(&self, s: &PicState) -> Result<(), StateError> {
        self.chips[0].validate(&s.master, "pic.master")?;
        self.chips[1].validate(&s.slave, "pic.slave")
    }

    /// Loads a snapshot taken by [`Pic::state`].  On error the PICs are left
    /// unchanged.
    pub fn restore(&mut self, s: &PicState) -> Result<(), StateError> {
        self.validate(s)?;
        self.chips[0].restore(&s.master);
        self.chips[1].restore(&s.slave);
        Ok(())
    }

    /// Reads one PIC/ELCR port.
    pub fn read_port(&mut self, port: u16) -> u8 {
        let (chip, data) = match port {
            0x20 | 0x21 => (&mut self.chips[0], port == 0x21),
            0xa0 | 0xa1 => (&mut self.chips[1], port == 0xa1),
            0x4d0 => return self.chips[0].elcr,
            0x4d1 => return self.chips[1].elcr,
            _ => return 0xff,
        };
        if chip.poll {
            chip.poll = false;
            let ret = match chip.pending_irq() {
                Some(irq) => {
                    chip.intack(irq);
                    irq | 0x80
                }
                None => 0,
            };
            self.update();
            return ret;
        }
        match (data, chip.read_isr) {
            (true, _) => chip.imr,
            (false, true) => chip.isr,
            (false, false) => chip.irr,
        }
    }

    /// Writes one PIC/ELCR port.
    pub fn write_port(&mut self, port: u16, value: u8) {
        match port {
            0x20 => self.chips[0].write_command(value),
            0x21 => self.chips[0].write_data(value),
            0xa0 => self.chips[1].write_command(value),
            0xa1 => self.chips[1].write_data(value),
            0x4d0 | 0x4d1 => {
                let chip = if port == 0x4d0 { &mut self.chips[0] } else { &mut self.chips[1] };
                chip.elcr = value & chip.elcr_mask;
            }
            _ => return,
        }
        self.update();
    }
}

impl PioDevice for Pic {
    fn read(&mut self, port: u16, data: &mut [u8]) {
        read_bytes(port, data, |p| self.read_port(p));
    }

    fn write(&mut self, port: u16, data: &[u8]) {
        write_bytes(port, data, |p, v| self.write_port(p, v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux `init_8259A(auto_eoi)`: vectors 0x30-0x3f.
    pub(crate) fn linux_init(pic: &mut Pic, auto_eoi: bool) {
        pic.write_port(0x21, 0xff);
        pic.write_port(0xa1, 0xff);
        pic.write_port(0x20, 0x11);
        pic.write_port(0x21, 0x30);
        pic.write_port(0x21, 0x04);
        pic.write_port(0x21, if auto_eoi { 0x03 } else { 0x01 });
        pic.write_port(0xa0, 0x11);
        pic.write_port(0xa1, 0x38);
        pic.write_port(0xa1, 0x02);
        pic.write_port(0xa1, 0x01);
        // Unmask all but... everything for the tests.
        pic.write_port(0x21, 0x00);
        pic.write_port(0xa1, 0x00);
    }

    #[test]
    fn init_mask_eoi_flow() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        assert_eq!(pic.read_port(0x21), 0x00);
        assert!(!pic.has_interrupt());
        // Masked IRQ 1 does not interrupt.
        pic.write_port(0x21, 0x02);
        pic.set_irq(1, true);
        pic.set_irq(1, false);
        assert!(!pic.has_interrupt());
        assert_eq!(pic.irr() & 2, 2);
        // Unmask: now it does.
        pic.write_port(0x21, 0x00);
        assert!(pic.has_interrupt());
        assert_eq!(pic.acknowledge(), Some(0x31));
        assert_eq!(pic.isr(), 0x0002);
        assert!(!pic.has_interrupt());
        // IRQ 0 has higher priority: it preempts IRQ 1 in service.
        pic.set_irq(0, true);
        pic.set_irq(0, false);
        assert!(pic.has_interrupt());
        // IRQ 3 does not (lower priority than IRQ 1 in service)...
        pic.set_irq(3, true);
        assert_eq!(pic.acknowledge(), Some(0x30));
        assert!(!pic.has_interrupt());
        // OCW3 read ISR.
        pic.write_port(0x20, 0x0b);
        assert_eq!(pic.read_port(0x20), 0x03);
        pic.write_port(0x20, 0x0a);
        assert_eq!(pic.read_port(0x20), 0x08);
        // Non-specific EOI retires IRQ 0, then IRQ 1; IRQ 3 follows.
        pic.write_port(0x20, 0x20);
        assert_eq!(pic.isr(), 0x0002);
        assert!(!pic.has_interrupt());
        pic.write_port(0x20, 0x61); // specific EOI IRQ 1
        assert_eq!(pic.isr(), 0);
        assert_eq!(pic.acknowledge(), Some(0x33));
        // Edge input held high does not re-trigger.
        pic.write_port(0x20, 0x20);
        assert!(!pic.has_interrupt());
    }

    #[test]
    fn slave_cascade_level_and_spurious() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        // IRQ 10 level-triggered via ELCR.
        pic.write_port(0x4d1, 0x04 | 0x01 | 0x20); // IRQ 8 and 13 bits are reserved
        assert_eq!(pic.elcr(), 0x0400);
        pic.set_irq(10, true);
        assert!(pic.has_interrupt());
        assert_eq!(pic.acknowledge(), Some(0x3a));
        assert_eq!(pic.isr(), 0x0404);
        // EOI the slave then the master while the line is still high: re-raises.
        pic.write_port(0xa0, 0x20);
        pic.write_port(0x20, 0x20);
        assert!(pic.has_interrupt());
        pic.set_irq(10, false);
        // The slave request vanished but master IRR2 is latched: spurious IRQ 15.
        assert!(pic.has_interrupt());
        assert_eq!(pic.acknowledge(), Some(0x3f));
        assert_eq!(pic.isr() & 0xff00, 0);
        pic.write_port(0x20, 0x20);
        assert!(!pic.has_interrupt());
        assert_eq!(pic.acknowledge(), None);
        assert_eq!(pic.inta(), 0x37, "master spurious IRQ 7");
    }

    #[test]
    fn auto_eoi_and_poll() {
        let mut pic = Pic::new();
        linux_init(&mut pic, true);
        pic.set_irq(0, true);
        assert_eq!(pic.acknowledge(), Some(0x30));
        assert_eq!(pic.isr(), 0);
        pic.set_irq(0, false);
        // Poll mode: OCW3 P, then read.
        pic.set_irq(5, true);
        pic.write_port(0x20, 0x0c);
        assert_eq!(pic.read_port(0x20), 0x85);
        assert!(!pic.has_interrupt());
    }

    #[test]
    fn state_round_trip() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.write_port(0x4d1, 0x04); // IRQ 10 level
        pic.write_port(0x21, 0x08); // mask IRQ 3
        pic.set_irq(1, true); // edge, input still high
        pic.set_irq(3, true);
        pic.set_irq(4, true);
        pic.set_irq(4, false);
        pic.set_irq(10, true);
        assert_eq!(pic.acknowledge(), Some(0x31));
        pic.write_port(0x20, 0xc4); // set priority: IR 5 highest
        pic.write_port(0xa0, 0x0b); // slave: read ISR
        pic.write_port(0xa0, 0x11); // slave mid-initialisation (expects ICW2)
        let s = pic.state();
        let json = serde_json::to_string(&s).unwrap();
        let s2: PicState = serde_json::from_str(&json).unwrap();
        assert_eq!(s2, s);
        let mut other = Pic::new();
        other.restore(&s2).unwrap();
        assert_eq!(other.state(), s);
        // Both behave the same from here on.
        for p in [&mut pic, &mut other] {
            p.write_port(0xa1, 0x38);
            p.write_port(0xa1, 0x02);
            p.write_port(0xa1, 0x01);
            p.set_irq(1, false);
            p.set_irq(1, true);
        }
        for _ in 0..4 {
            assert_eq!(pic.acknowledge(), other.acknowledge());
            pic.write_port(0x20, 0x20);
            other.write_port(0x20, 0x20);
            for port in [0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1] {
                assert_eq!(pic.read_port(port), other.read_port(port), "port {port:#x}");
            }
        }
        assert_eq!(pic.state(), other.state());
    }

    #[test]
    fn malformed_state_is_rejected() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        let good = pic.state();
        let mut bad = good.clone();
        bad.slave.priority_add = 8;
        assert_eq!(pic.restore(&bad).unwrap_err().field, "pic.slave.priority_add");
        let mut bad = good.clone();
        bad.master.elcr = 0x01; // IRQ 0 cannot be level triggered
        assert_eq!(pic.restore(&bad).unwrap_err().field, "pic.master.elcr");
        let mut bad = good.clone();
        bad.master.init_state = 4;
        assert_eq!(pic.restore(&bad).unwrap_err().field, "pic.master.init_state");
        let mut bad = good.clone();
        bad.slave.irq_base = 0x39;
        assert_eq!(pic.restore(&bad).unwrap_err().field, "pic.slave.irq_base");
        assert_eq!(pic.state(), good, "unchanged after a rejected restore");
    }

    #[test]
    fn hostile_writes_do_not_panic() {
        let mut pic = Pic::new();
        for v in 0..=255u8 {
            for port in [0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, 0x22] {
                pic.write_port(port, v);
                pic.read_port(port);
            }
            pic.set_irq(v, v & 1 != 0);
            pic.set_irq(v % 16, v & 2 != 0);
            pic.acknowledge();
        }
        let mut w = [0u8; 4];
        pic.read(0x20, &mut w);
        pic.write(0x4d0, &w);
        // Post-conditions: whatever state the noise left is one a snapshot can restore, and a
        // fresh Linux initialisation still takes (the mask reads back).
        let st = pic.state();
        pic.restore(&st).expect("the state hostile writes leave restores");
        assert_eq!(pic.state(), st);
        linux_init(&mut pic, false);
        assert_eq!((pic.read_port(0x21), pic.read_port(0xa1)), (0x00, 0x00));
        pic.write_port(0x21, 0x5a);
        assert_eq!(pic.read_port(0x21), 0x5a);
    }
}

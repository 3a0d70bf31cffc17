//! Intel 82093AA I/O APIC (one chip, 24 input pins), per the "82093AA I/O
//! Advanced Programmable Interrupt Controller (IOAPIC)" datasheet.
//!
//! MMIO at [`IOAPIC_BASE`]: IOREGSEL at +0x00 (register index, bits 7:0) and
//! IOWIN at +0x10 (32-bit window on the selected register).  Registers:
//! 0x00 IOAPICID (bits 27:24), 0x01 IOAPICVER (read-only [`IOAPIC_VERSION`]:
//! 24 entries, version 0x11 — no directed-EOI register, so EOIs arrive by
//! LAPIC broadcast), 0x02 IOAPICARB (read-only, equals the ID),
//! 0x10 + 2n / 0x11 + 2n redirection entry n low / high dword.
//!
//! Inputs carry the *asserted* state (`true` = interrupt requested); the
//! polarity bit (13) is stored but not applied, since the virtual wiring
//! already delivers logical levels.  Edge-triggered pins deliver on a
//! rising edge when unmasked; level-triggered pins deliver while asserted and
//! set Remote IRR until the LAPIC's EOI for their vector ([`IoApic::eoi`]).
//!
//! Deliveries are handed to a caller-supplied sink, `FnMut(ApicMessage) ->
//! bool`, which returns whether some local APIC accepted the message (the
//! composed [`crate::irqchip::EmuIrqchip`] routes them to its LAPIC).  A
//! level-triggered message sets Remote IRR only when accepted.

use serde::{Deserialize, Serialize};

use crate::StateError;

/// Guest-physical base address of the IOAPIC.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Size of the IOAPIC MMIO window mapped by the bus, in bytes.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Number of redirection entries / input pins.
pub const NUM_PINS: usize = 24;
/// IOAPICVER value: max redirection entry 23 (bits 23:16), version 0x11.
pub const IOAPIC_VERSION: u32 = 0x0017_0011;

const RTE_DELIVERY_STATUS: u64 = 1 << 12;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;
/// Guest-writable bits: vector, delivery mode, destination mode, polarity,
/// trigger mode, mask (low dword) and destination (bits 63:56).
const RTE_WRITABLE: u64 = 0xff00_0000_0001_afff;

/// Interrupt delivery modes (ICR / redirection-entry bits 10:8), Intel SDM
/// Vol. 3 §11.6.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    /// 000: deliver `vector` to the destination(s).
    Fixed,
    /// 001: deliver to the lowest-priority destination processor.
    LowestPriority,
    /// 010: system management interrupt.
    Smi,
    /// 100: non-maskable interrupt (vector ignored).
    Nmi,
    /// 101: INIT.
    Init,
    /// 110: startup IPI (ICR only).
    Startup,
    /// 111: external interrupt: vector comes from an 8259A INTA cycle.
    ExtInt,
    /// 011: reserved encoding.
    Reserved,
}

impl DeliveryMode {
    /// Decodes bits 10:8 of a redirection entry or ICR.
    pub fn from_bits(v: u64) -> Self {
        match (v >> 8) & 7 {
            0 => Self::Fixed,
            1 => Self::LowestPriority,
            2 => Self::Smi,
            4 => Self::Nmi,
            5 => Self::Init,
            6 => Self::Startup,
            7 => Self::ExtInt,
            _ => Self::Reserved,
        }
    }
}

/// An interrupt message sent by the IOAPIC on the APIC bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApicMessage {
    /// Interrupt vector (0-255).
    pub vector: u8,
    /// Delivery mode.
    pub delivery_mode: DeliveryMode,
    /// `true` = logical destination mode, `false` = physical.
    pub logical: bool,
    /// Destination field: APIC ID (physical) or logical mask.
    pub dest: u8,
    /// `true` if the source pin is level-triggered (LAPIC sets TMR and
    /// broadcasts an EOI back).
    pub level_triggered: bool,
}

/// Snapshot of the IOAPIC (see [`IoApic::state`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct IoApicState {
    /// IOAPIC ID (0-15).
    pub id: u8,
    /// IOREGSEL: the register index selected for IOWIN.
    pub regsel: u8,
    /// Redirection entries 0-23, 64 bits each, with Remote IRR (bit 14).
    pub rte: [u64; NUM_PINS],
    /// Asserted input pins (bit *n* = pin *n*, bits 24-31 zero).
    pub levels: u32,
}

/// The IOAPIC register state.
#[derive(Debug, Clone)]
pub struct IoApic {
    id: u8,
    regsel: u8,
    /// Redirection table (64-bit entries).
    rte: [u64; NUM_PINS],
    /// Current asserted state of each input pin (bit n = pin n).
    levels: u32,
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new()
    }
}

impl IoApic {
    /// Creates an IOAPIC with ID 0 and every entry masked (reset state).
    pub fn new() -> Self {
        Self { id: 0, regsel: 0, rte: [RTE_MASKED; NUM_PINS], levels: 0 }
    }

    /// Snapshot of the registers and input levels.
    pub fn state(&self) -> IoApicState {
        IoApicState { id: self.id, regsel: self.regsel, rte: self.rte, levels: self.levels }
    }

    /// Checks `s` without applying it (see [`IoApic::restore`]).
    pub fn validate(&self, s: &IoApicState) -> Result<(), StateError> {
        StateError::check(s.id <= 0x0f, "ioapic.id", format!("{:#x} > 0xf", s.id))?;
        StateError::check(s.levels >> NUM_PINS == 0, "ioapic.levels", format!("{:#x}: pins above 23", s.levels))?;
        for (pin, e) in s.rte.iter().enumerate() {
            StateError::check(
                e & !(RTE_WRITABLE | RTE_REMOTE_IRR | RTE_DELIVERY_STATUS) == 0,
                format!("ioapic.rte[{pin}]"),
                format!("{e:#x}: reserved bits set"),
            )?;
        }
        Ok(())
    }

    /// Loads a snapshot taken by [`IoApic::state`].  Nothing is delivered:
    /// interrupts already accepted are part of the LAPIC's state.  On error
    /// the IOAPIC is left unchanged.
    pub fn restore(&mut self, s: &IoApicState) -> Result<(), StateError> {
        self.validate(s)?;
        *self = Self { id: s.id, regsel: s.regsel, rte: s.rte, levels: s.levels };
        Ok(())
    }

    /// Redirection entry of `pin` (0-23), or `None` for an invalid pin.
    pub fn redirection_entry(&self, pin: usize) -> Option<u64> {
        self.rte.get(pin).copied()
    }

    fn message(entry: u64) -> ApicMessage {
        ApicMessage {
            vector: (entry & 0xff) as u8,
            delivery_mode: DeliveryMode::from_bits(entry),
            logical: entry & (1 << 11) != 0,
            dest: (entry >> 56) as u8,
            level_triggered: entry & RTE_LEVEL != 0,
        }
    }

    /// Delivers `pin` if it is asserted, unmasked, level-triggered and not
    /// awaiting an EOI.
    fn service_level(&mut self, pin: usize, deliver: &mut dyn FnMut(ApicMessage) -> bool) {
        let Some(entry) = self.rte.get_mut(pin) else {
            return;
        };
        if self.levels & (1 << pin) != 0 && *entry & (RTE_LEVEL | RTE_MASKED | RTE_REMOTE_IRR) == RTE_LEVEL {
            // Remote IRR is set only if some LAPIC accepted the message.
            if deliver(Self::message(*entry)) {
                *entry |= RTE_REMOTE_IRR;
            }
        }
    }

    /// Drives input `pin` (0-23; others are ignored) to `level` (`true` =
    /// asserted), delivering resulting interrupts through `deliver`.
    pub fn set_irq(&mut self, pin: u32, level: bool, deliver: &mut dyn FnMut(ApicMessage) -> bool) {
        let Ok(pin) = usize::try_from(pin) else {
            return;
        };
        let Some(&entry) = self.rte.get(pin) else {
            return;
        };
        let bit = 1u32 << pin;
        let was = self.levels & bit != 0;
        if level {
            self.levels |= bit;
        } else {
            self.levels &= !bit;
        }
        if entry & RTE_LEVEL != 0 {
            self.service_level(pin, deliver);
        } else if level && !was && entry & RTE_MASKED == 0 {
            // Edge: delivered on the rising edge; masked edges are lost.
            deliver(Self::message(entry));
        }
    }

    /// End of interrupt for `vector`, broadcast by the LAPIC when it retires
    /// a level-triggered interrupt: clears Remote IRR of every level entry
    /// with that vector and re-delivers those whose input is still asserted.
    pub fn eoi(&mut self, vector: u8, deliver: &mut dyn FnMut(ApicMessage) -> bool) {
        for pin in 0..NUM_PINS {
            let Some(e) = self.rte.get_mut(pin) else {
                continue;
            };
            if (*e & 0xff) as u8 == vector && *e & RTE_REMOTE_IRR != 0 {
                *e &= !RTE_REMOTE_IRR;
                self.service_level(pin, deliver);
            }
        }
    }

    fn read_register(&self, index: u8) -> u32 {
        match index {
            0x00 => u32::from(self.id) << 24,
            0x01 => IOAPIC_VERSION,
            0x02 => u32::from(self.id) << 24,
            0x10..=0x3f => {
                // Pin 0-23: always within the redirection table.
                let e = self.rte.get(usize::from((index - 0x10) / 2)).copied().unwrap_or(0);
                if index & 1 == 0 {
                    (e & 0xffff_ffff) as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, index: u8, value: u32, deliver: &mut dyn FnMut(ApicMessage) -> bool) {
        match index {
            0x00 => self.id = ((value >> 24) & 0x0f) as u8,
            0x10..=0x3f => {
                let pin = usize::from((index - 0x10) / 2);
                // Pin 0-23: always within the redirection table.
                let Some(slot) = self.rte.get_mut(pin) else {
                    return;
                };
                let old = *slot;
                let new = if index & 1 == 0 {
                    (old & 0xffff_ffff_0000_0000) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                };
                let ro = old & (RTE_REMOTE_IRR | RTE_DELIVERY_STATUS);
                let mut e = (new & RTE_WRITABLE) | ro;
                // Switching to edge mode clears Remote IRR (Linux relies on
                // this to recover level interrupts on version-0x11 IOAPICs).
                if e & RTE_LEVEL == 0 {
                    e &= !RTE_REMOTE_IRR;
                }
                *slot = e;
                // Unmasking an asserted level-triggered pin delivers it.
                self.service_level(pin, deliver);
            }
            // Version and arbitration registers are read-only.
            _ => {}
        }
    }

    /// Guest load at `offset` (0..[`IOAPIC_SIZE`]) from the IOAPIC base.
    /// Accesses must be 32-bit and dword aligned (IOREGSEL may also be read
    /// with narrower accesses); anything else reads as zero.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0x00 => u32::from(self.regsel),
            0x10 => self.read_register(self.regsel),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        match bytes.get(..data.len()) {
            Some(src) if offset == 0 || data.len() == 4 => data.copy_from_slice(src),
            _ => data.fill(0),
        }
    }

    /// Guest store at `offset` from the IOAPIC base; see [`IoApic::mmio_read`]
    /// for the accepted access sizes.  Interrupts caused by the write (e.g.
    /// unmasking an asserted level pin) go to `deliver`.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], deliver: &mut dyn FnMut(ApicMessage) -> bool) {
        match (offset, data) {
            (0x00, &[b0, ..]) if data.len() <= 4 => self.regsel = b0,
            (0x10, &[b0, b1, b2, b3]) => {
                let value = u32::from_le_bytes([b0, b1, b2, b3]);
                self.write_register(self.regsel, value, deliver);
            }
            _ => tracing::debug!("ioapic: ignored {}-byte write at offset {offset:#x}", data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wr(io: &mut IoApic, reg: u8, v: u32, out: &mut Vec<ApicMessage>) {
        io.mmio_write(0, &[reg], &mut |m| {
            out.push(m);
            true
        });
        io.mmio_write(0x10, &v.to_le_bytes(), &mut |m| {
            out.push(m);
            true
        });
    }

    fn rd(io: &mut IoApic, reg: u8) -> u32 {
        let mut out = Vec::new();
        io.mmio_write(0, &reg.to_le_bytes(), &mut |m| {
            out.push(m);
            true
        });
        let mut b = [0u8; 4];
        io.mmio_read(0x10, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn id_version_arbitration() {
        let mut io = IoApic::new();
        assert_eq!(rd(&mut io, 1), 0x0017_0011);
        let mut v = Vec::new();
        wr(&mut io, 0, 0x0200_0000, &mut v);
        assert_eq!(rd(&mut io, 0), 0x0200_0000);
        assert_eq!(rd(&mut io, 2), 0x0200_0000);
        wr(&mut io, 1, 0, &mut v);
        assert_eq!(rd(&mut io, 1), 0x0017_0011);
        assert_eq!(rd(&mut io, 0x10), 0x0001_0000, "masked at reset");
        assert_eq!(rd(&mut io, 0x40), 0);
    }

    #[test]
    fn edge_pin_delivers_on_rising_edge_when_unmasked() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        io.set_irq(4, true, &mut |m| {
            out.push(m);
            true
        });
        io.set_irq(4, false, &mut |m| {
            out.push(m);
            true
        });
        assert!(out.is_empty(), "masked");
        wr(&mut io, 0x10 + 8, 0x24, &mut out);
        wr(&mut io, 0x11 + 8, 0, &mut out);
        assert!(out.is_empty());
        io.set_irq(4, true, &mut |m| {
            out.push(m);
            true
        });
        io.set_irq(4, true, &mut |m| {
            out.push(m);
            true
        });
        io.set_irq(4, false, &mut |m| {
            out.push(m);
            true
        });
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].vector, 0x24);
        assert!(!out[0].level_triggered);
        assert_eq!(out[0].delivery_mode, DeliveryMode::Fixed);
    }

    #[test]
    fn logical_destination_mode_is_kept() {
        // Linux's flat APIC driver: logical mode (bit 11), destination 0x01 (CPU 0's LDR).
        let mut io = IoApic::new();
        let mut out = Vec::new();
        wr(&mut io, 0x10 + 8, 0x824, &mut out);
        wr(&mut io, 0x11 + 8, 0x0100_0000, &mut out);
        assert_eq!(io.redirection_entry(4), Some(0x0100_0000_0000_0824));
        io.set_irq(4, true, &mut |m| {
            out.push(m);
            true
        });
        assert_eq!(out.len(), 1);
        assert!(out[0].logical && out[0].dest == 1, "{:?}", out[0]);
    }

    #[test]
    fn level_pin_remote_irr_and_eoi() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        // Pin 10: vector 0x41, level, active low, unmasked, dest 0.
        wr(&mut io, 0x10 + 20, 0x41 | (1 << 13) | (1 << 15), &mut out);
        io.set_irq(10, true, &mut |m| {
            out.push(m);
            true
        });
        assert_eq!(out.len(), 1);
        assert!(out[0].level_triggered);
        assert_ne!(rd(&mut io, 0x10 + 20) & (1 << 14), 0, "remote IRR");
        // Still asserted: no re-delivery until EOI.
        io.set_irq(10, true, &mut |m| {
            out.push(m);
            true
        });
        assert_eq!(out.len(), 1);
        io.eoi(0x41, &mut |m| {
            out.push(m);
            true
        });
        assert_eq!(out.len(), 2, "re-delivered: still asserted");
        io.set_irq(10, false, &mut |m| {
            out.push(m);
            true
        });
        io.eoi(0x41, &mut |m| {
            out.push(m);
            true
        });
        assert_eq!(out.len(), 2);
        assert_eq!(rd(&mut io, 0x10 + 20) & (1 << 14), 0);
        // Guest cannot set Remote IRR; switching to edge clears it.
        io.set_irq(10, true, &mut |m| {
            out.push(m);
            true
        });
        assert_eq!(out.len(), 3);
        wr(&mut io, 0x10 + 20, 0x41 | (1 << 14), &mut out);
        assert_eq!(rd(&mut io, 0x10 + 20), 0x41);
    }

    #[test]
    fn state_round_trip() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        wr(&mut io, 0, 0x0300_0000, &mut out);
        wr(&mut io, 0x10 + 20, 0x41 | (1 << 13) | (1 << 15), &mut out); // pin 10 level
        wr(&mut io, 0x11 + 20, 0x0200_0000, &mut out);
        wr(&mut io, 0x10 + 8, 0x24, &mut out); // pin 4 edge
        io.set_irq(10, true, &mut |m| {
            out.push(m);
            true
        });
        io.set_irq(4, true, &mut |m| {
            out.push(m);
            true
        });
        assert_eq!(out.len(), 2);
        io.mmio_write(0, &[0x15], &mut |_| true); // IOREGSEL left pointing at pin 2 high
        let s = io.state();
        let json = serde_json::to_string(&s).unwrap();
        let s2: IoApicState = serde_json::from_str(&json).unwrap();
        assert_eq!(s2, s);
        let mut other = IoApic::new();
        other.restore(&s2).unwrap();
        assert_eq!(other.state(), s);
        let mut b = [0u8; 4];
        other.mmio_read(0, &mut b);
        assert_eq!(b[0], 0x15, "IOREGSEL");
        assert_eq!(rd(&mut other, 0), 0x0300_0000);
        assert_ne!(rd(&mut other, 0x10 + 20) & (1 << 14), 0, "remote IRR kept");
        // Pin 4 is still high (no new edge); the EOI re-delivers pin 10 on both.
        for dev in [&mut io, &mut other] {
            let mut got = Vec::new();
            dev.set_irq(4, true, &mut |m| {
                got.push(m);
                true
            });
            dev.eoi(0x41, &mut |m| {
                got.push(m);
                true
            });
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].vector, 0x41);
            assert_eq!(got[0].dest, 2);
        }
    }

    #[test]
    fn malformed_state_is_rejected() {
        let mut io = IoApic::new();
        let good = io.state();
        let mut bad = good.clone();
        bad.rte[23] |= 1 << 40;
        assert_eq!(io.restore(&bad).unwrap_err().field, "ioapic.rte[23]");
        let mut bad = good.clone();
        bad.levels = 1 << 24;
        assert_eq!(io.restore(&bad).unwrap_err().field, "ioapic.levels");
        let mut bad = good.clone();
        bad.id = 0x10;
        assert_eq!(io.restore(&bad).unwrap_err().field, "ioapic.id");
        assert_eq!(io.state(), good);
        // A redirection table of the wrong length does not deserialize.
        let mut v = serde_json::to_value(&good).unwrap();
        v["rte"].as_array_mut().unwrap().push(0.into());
        assert!(serde_json::from_value::<IoApicState>(v).is_err());
    }

    #[test]
    fn hostile_accesses() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        for reg in 0..=255u8 {
            wr(&mut io, reg, 0xffff_ffff, &mut out);
            rd(&mut io, reg);
            io.set_irq(u32::from(reg), true, &mut |m| {
                out.push(m);
                true
            });
            io.eoi(reg, &mut |m| {
                out.push(m);
                true
            });
        }
        let mut b8 = [0u8; 8];
        io.mmio_read(0x10, &mut b8);
        io.mmio_read(0x13, &mut b8[..1]);
        io.mmio_write(0x10, &b8, &mut |m| {
            out.push(m);
            true
        });
        io.mmio_write(0xfff, &[], &mut |m| {
            out.push(m);
            true
        });
        io.set_irq(u32::MAX, true, &mut |m| {
            out.push(m);
            true
        });
        // Post-conditions: the read-only version register survived and the state the noise
        // left is one a snapshot can restore.
        assert_eq!(rd(&mut io, 1), IOAPIC_VERSION);
        let st = io.state();
        io.restore(&st).expect("the state hostile accesses leave restores");
        assert_eq!(io.state(), st);
    }
}

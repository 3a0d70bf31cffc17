//! Userspace interrupt controller complex for one vCPU of the software CPU
//! emulator: 8259A PIC pair + ELCR, 82093AA IOAPIC, xAPIC and 8254 PIT,
//! wired like a PC.
//!
//! Wiring:
//!
//! * ISA IRQ *n* (0-15, [`EmuIrqchip::set_irq`] with `gsi < 16`) drives PIC
//!   input *n* and IOAPIC pin *n*, except ISA IRQ 0 (PIT channel 0) which
//!   drives IOAPIC pin 2 (the usual PC interrupt source override: the
//!   firmware tables must declare "ISA IRQ 0 → GSI 2"); ISA IRQ 2 is the
//!   PIC cascade and is ignored.  GSIs 16-23 drive IOAPIC pins 16-23 only.
//! * IOAPIC messages go to the LAPIC (physical APIC ID 0, or logical
//!   destinations matching its LDR; fixed, lowest-priority and NMI delivery;
//!   other modes are dropped).  LAPIC EOIs of level-triggered vectors are
//!   broadcast back to the IOAPIC.
//! * The PIC's INT output reaches the CPU through LAPIC LINT0 when it is
//!   programmed as unmasked ExtINT (virtual wire mode), or directly when the
//!   LAPIC is globally or software disabled; see
//!   [`Lapic::accepts_pic_interrupts`].
//!
//! This type implements [`PioDevice`] for the PIC (0x20-0x21, 0xA0-0xA1),
//! ELCR (0x4D0-0x4D1) and PIT (0x40-0x43, 0x61) ports listed in
//! [`PIO_RANGES`], and [`MmioDevice`] for the LAPIC page (0xFEE00000, 4 KiB)
//! and IOAPIC window (0xFEC00000, 4 KiB) listed in [`MMIO_RANGES`], dispatching
//! by address; [`EmuIrqchip::attach`] registers all of them on the buses.
//!
//! # Locking
//!
//! The chip is shared as `Arc<Mutex<EmuIrqchip>>`.  Devices raise interrupts
//! through [`GsiLine`], which locks the chip while holding their own lock, so
//! the lock order is *device → chip*.  Callers must hold the chip's mutex
//! only briefly and must never access another device (or call into a bus)
//! while holding it.  The chip never calls out to other devices.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use serde::{Deserialize, Serialize};

use crate::bus::{lock, read_bytes, write_bytes, MmioBus, MmioDevice, PioBus, PioDevice};
use crate::ioapic::{ApicMessage, DeliveryMode, IoApic, IoApicState, IOAPIC_BASE, IOAPIC_SIZE};
use crate::irq::{IrqLine, MsiSink};
use crate::lapic::{Lapic, LapicState, LAPIC_BASE, LAPIC_SIZE};
use crate::pic::{Pic, PicState};
use crate::pit::{Pit, PitState};
use crate::{Clock, Error, StateError};

/// I/O port ranges `(base, len)` served by [`EmuIrqchip`]'s [`PioDevice`]
/// implementation: master PIC, slave PIC, ELCR, PIT, port 0x61.
pub const PIO_RANGES: [(u16, u16); 5] = [(0x20, 2), (0xa0, 2), (0x4d0, 2), (0x40, 4), (0x61, 1)];

/// Guest-physical ranges `(base, len)` served by [`EmuIrqchip`]'s
/// [`MmioDevice`] implementation: the LAPIC page and the IOAPIC window.
pub const MMIO_RANGES: [(u64, u64); 2] = [(LAPIC_BASE, LAPIC_SIZE), (IOAPIC_BASE, IOAPIC_SIZE)];

/// Internal IRQ line from PIT channel 0: counts rising edges so the chip can
/// route them after `Pit::poll` returns (no re-entrant locking).
#[derive(Default)]
struct EdgeCounter(AtomicU64);

impl IrqLine for EdgeCounter {
    fn set_level(&self, level: bool) {
        if level {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Snapshot of the whole interrupt-controller complex (see
/// [`EmuIrqchip::state`]).  Timer times are absolute readings of the shared
/// clock in ns (see [`crate::pit::PitRunState`] and
/// [`crate::lapic::LapicTimerState`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EmuIrqchipState {
    /// The 8259A pair and ELCR.
    pub pic: PicState,
    /// The IOAPIC.
    pub ioapic: IoApicState,
    /// The local APIC.
    pub lapic: LapicState,
    /// The 8254 PIT and port 0x61.
    pub pit: PitState,
}

impl EmuIrqchipState {
    /// The latest clock reading (ns) the timers' state refers to: the PIT channels' and the
    /// LAPIC timer's `start_ns`. A clock restored below it would make the guest's timers wait
    /// out the difference, so a restore must start the clock at or after it.
    pub fn latest_timer_ns(&self) -> u64 {
        let pit = self.pit.channels.iter().filter_map(|c| match c.run {
            crate::pit::PitRunState::Counting { start_ns, .. } => Some(start_ns),
            _ => None,
        });
        pit.chain(self.lapic.timer.map(|t| t.start_ns)).max().unwrap_or(0)
    }
}

/// PIC + IOAPIC + LAPIC + PIT for one vCPU.
pub struct EmuIrqchip {
    pic: Pic,
    ioapic: IoApic,
    lapic: Lapic,
    pit: Pit,
    pit_irq0: Arc<EdgeCounter>,
}

/// Routes an IOAPIC message to the (only) LAPIC; returns whether accepted.
fn deliver(lapic: &mut Lapic, m: ApicMessage) -> bool {
    if !lapic.matches_destination(m.dest, m.logical) {
        return false;
    }
    match m.delivery_mode {
        DeliveryMode::Fixed | DeliveryMode::LowestPriority => lapic.accept_interrupt(m.vector, m.level_triggered),
        DeliveryMode::Nmi => {
            lapic.raise_nmi();
            true
        }
        mode => {
            tracing::debug!("irqchip: dropped IOAPIC message with delivery mode {mode:?}");
            false
        }
    }
}

impl EmuIrqchip {
    /// Creates the chip set in its power-on state.
    ///
    /// `clock`: virtual time in ns shared by the PIT and the LAPIC timer;
    /// `lapic_timer_hz`: LAPIC timer input clock in Hz (before its divider).
    pub fn new(clock: Clock, lapic_timer_hz: u64) -> Self {
        let pit_irq0 = Arc::new(EdgeCounter::default());
        Self {
            pic: Pic::new(),
            ioapic: IoApic::new(),
            lapic: Lapic::new(lapic_timer_hz, Arc::clone(&clock)),
            pit: Pit::new(clock, pit_irq0.clone()),
            pit_irq0,
        }
    }

    /// Snapshot of the PIC, IOAPIC, LAPIC and PIT.  Take it while the vCPU
    /// is stopped (between two runs), together with the CPU's state.
    pub fn state(&self) -> EmuIrqchipState {
        EmuIrqchipState {
            pic: self.pic.state(),
            ioapic: self.ioapic.state(),
            lapic: self.lapic.state(),
            pit: self.pit.state(),
        }
    }

    /// Loads a snapshot taken by [`EmuIrqchip::state`]; the clock stays the
    /// one given to [`EmuIrqchip::new`] (the VMM must make it continue from
    /// the reading it had at save time).  Nothing is delivered or signalled
    /// by the restore itself; call [`EmuIrqchip::poll`] afterwards to get
    /// the next timer deadline.  All four parts are checked before any is
    /// changed: on error the chip is left unchanged.
    pub fn restore(&mut self, s: &EmuIrqchipState) -> Result<(), StateError> {
        self.pic.validate(&s.pic)?;
        self.ioapic.validate(&s.ioapic)?;
        self.lapic.validate(&s.lapic)?;
        self.pit.validate(&s.pit)?;
        self.pic.restore(&s.pic)?;
        self.ioapic.restore(&s.ioapic)?;
        self.lapic.restore(&s.lapic)?;
        self.pit.restore(&s.pit)?;
        // Edges counted by a `poll` are routed within that call: none is in flight.
        self.pit_irq0.0.store(0, Ordering::SeqCst);
        Ok(())
    }

    /// Registers `chip` on the buses at [`PIO_RANGES`] and [`MMIO_RANGES`].
    pub fn attach(chip: &Arc<Mutex<Self>>, pio: &mut PioBus, mmio: &mut MmioBus) -> Result<(), Error> {
        for (base, len) in PIO_RANGES {
            pio.insert(base, len, chip.clone())?;
        }
        for (base, len) in MMIO_RANGES {
            mmio.insert(base, len, chip.clone())?;
        }
        Ok(())
    }

    /// Drives an interrupt input to `level` (`true` = asserted):
    /// `gsi` 0-15 are ISA IRQs (to the PIC and the IOAPIC, ISA IRQ 0 on
    /// IOAPIC pin 2, IRQ 2 ignored), 16-23 IOAPIC-only GSIs; others ignored.
    pub fn set_irq(&mut self, gsi: u32, level: bool) {
        let pin = match gsi {
            0 => 2,
            2 => return,
            1..=23 => gsi,
            _ => return,
        };
        if let Ok(irq @ 0..=15) = u8::try_from(gsi) {
            self.pic.set_irq(irq, level);
        }
        let lapic = &mut self.lapic;
        self.ioapic.set_irq(pin, level, &mut |m| deliver(lapic, m));
    }

    /// Delivers a message-signalled interrupt (Intel SDM Vol. 3 §11.11): address
    /// 0xFEEx_xxxx with the destination in bits 19:12 and the destination mode in bit 2;
    /// data with the vector in bits 7:0, the delivery mode in bits 10:8 and the trigger mode
    /// in bit 15. Messages to other addresses are dropped. Returns whether it was accepted.
    pub fn deliver_msi(&mut self, addr: u64, data: u32) -> bool {
        if addr >> 20 != 0xfee {
            tracing::debug!("irqchip: dropped MSI to {addr:#x}");
            return false;
        }
        let m = ApicMessage {
            vector: (data & 0xff) as u8,
            delivery_mode: DeliveryMode::from_bits(u64::from(data)),
            logical: addr & (1 << 2) != 0,
            dest: ((addr >> 12) & 0xff) as u8,
            level_triggered: data & (1 << 15) != 0,
        };
        deliver(&mut self.lapic, m)
    }

    /// Runs the PIT and LAPIC timers up to `now_ns` (raising IRQ 0 and the
    /// LAPIC timer interrupt as due) and returns the earliest next deadline
    /// in ns, if any.  The caller should call it again at that time and after
    /// guest accesses to the PIT or LAPIC timer registers (which can move
    /// the deadlines).
    pub fn poll(&mut self, now_ns: u64) -> Option<u64> {
        let pit_next = self.pit.poll(now_ns);
        if self.pit_irq0.0.swap(0, Ordering::SeqCst) > 0 {
            self.set_irq(0, true);
            self.set_irq(0, false);
        }
        let lapic_next = self.lapic.poll(now_ns);
        match (pit_next, lapic_next) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether an external interrupt should be presented to the CPU (when
    /// its RFLAGS.IF allows): from the LAPIC, or from the PIC when it is
    /// routed to the CPU.
    pub fn interrupt_pending(&self) -> bool {
        (self.lapic.accepts_pic_interrupts() && self.pic.has_interrupt()) || self.lapic.has_interrupt()
    }

    /// Acknowledges the highest-priority pending interrupt and returns its
    /// vector: a PIC (ExtINT) interrupt first, as the LAPIC delivers ExtINT
    /// without priority checks, else the LAPIC's.  `None` if nothing is
    /// pending.
    pub fn acknowledge(&mut self) -> Option<u8> {
        if self.lapic.accepts_pic_interrupts() && self.pic.has_interrupt() {
            return self.pic.acknowledge();
        }
        self.lapic.acknowledge()
    }

    /// Returns and clears a pending NMI (from an NMI IPI or IOAPIC message).
    pub fn take_nmi(&mut self) -> bool {
        self.lapic.take_nmi()
    }

    /// Broadcasts an EOI for `vector` to the IOAPIC (normally done
    /// automatically when the guest writes the LAPIC EOI register).
    pub fn ioapic_eoi(&mut self, vector: u8) {
        let lapic = &mut self.lapic;
        self.ioapic.eoi(vector, &mut |m| deliver(lapic, m));
    }

    /// The PIC pair.
    pub fn pic(&self) -> &Pic {
        &self.pic
    }

    /// The PIC pair, mutably.
    pub fn pic_mut(&mut self) -> &mut Pic {
        &mut self.pic
    }

    /// The IOAPIC.
    pub fn ioapic(&self) -> &IoApic {
        &self.ioapic
    }

    /// The local APIC (e.g. for `MOV CR8` and the IA32_APIC_BASE MSR).
    pub fn lapic(&self) -> &Lapic {
        &self.lapic
    }

    /// The local APIC, mutably.
    pub fn lapic_mut(&mut self) -> &mut Lapic {
        &mut self.lapic
    }

    /// The PIT.
    pub fn pit(&self) -> &Pit {
        &self.pit
    }

    /// The PIT, mutably.
    pub fn pit_mut(&mut self) -> &mut Pit {
        &mut self.pit
    }

    fn read_port(&mut self, port: u16) -> u8 {
        match port {
            0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1 => self.pic.read_port(port),
            0x40..=0x43 | 0x61 => {
                let mut b = [0xff];
                PioDevice::read(&mut self.pit, port, &mut b);
                b[0]
            }
            _ => 0xff,
        }
    }

    fn write_port(&mut self, port: u16, value: u8) {
        match port {
            0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1 => self.pic.write_port(port, value),
            0x40..=0x43 | 0x61 => PioDevice::write(&mut self.pit, port, &[value]),
            _ => {}
        }
    }
}

impl PioDevice for EmuIrqchip {
    fn read(&mut self, port: u16, data: &mut [u8]) {
        read_bytes(port, data, |p| self.read_port(p));
    }

    fn write(&mut self, port: u16, data: &[u8]) {
        write_bytes(port, data, |p, v| self.write_port(p, v));
    }
}

impl MmioDevice for EmuIrqchip {
    fn read(&mut self, gpa: u64, data: &mut [u8]) {
        if let Some(off) = gpa.checked_sub(LAPIC_BASE).filter(|&o| o < LAPIC_SIZE) {
            self.lapic.mmio_read(off, data);
        } else if let Some(off) = gpa.checked_sub(IOAPIC_BASE).filter(|&o| o < IOAPIC_SIZE) {
            self.ioapic.mmio_read(off, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, gpa: u64, data: &[u8]) {
        if let Some(off) = gpa.checked_sub(LAPIC_BASE).filter(|&o| o < LAPIC_SIZE) {
            if let Some(vector) = self.lapic.mmio_write(off, data) {
                self.ioapic_eoi(vector);
            }
        } else if let Some(off) = gpa.checked_sub(IOAPIC_BASE).filter(|&o| o < IOAPIC_SIZE) {
            let lapic = &mut self.lapic;
            self.ioapic.mmio_write(off, data, &mut |m| deliver(lapic, m));
        }
    }
}

/// An [`IrqLine`] that drives one input of a shared [`EmuIrqchip`]
/// (e.g. GSI 4 for COM1).
///
/// Holds a weak reference, so it does not keep the chip alive; once the chip
/// is dropped the line does nothing.  Each call locks the chip mutex briefly.
pub struct GsiLine {
    chip: Weak<Mutex<EmuIrqchip>>,
    gsi: u32,
    notify: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl GsiLine {
    /// Creates a line driving `gsi` (see [`EmuIrqchip::set_irq`]) of `chip`.
    pub fn new(chip: &Arc<Mutex<EmuIrqchip>>, gsi: u32) -> Self {
        Self { chip: Arc::downgrade(chip), gsi, notify: None }
    }

    /// Adds a callback run (after the chip is unlocked) whenever the line is
    /// asserted and the CPU then has an interrupt pending — e.g. to wake a
    /// vCPU halted until its next timer deadline when an I/O thread raises an
    /// interrupt.  (A masked line wakes nobody.)
    pub fn with_notify(mut self, notify: Arc<dyn Fn() + Send + Sync>) -> Self {
        self.notify = Some(notify);
        self
    }

    /// The GSI this line drives.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    fn kick(&self) {
        if let Some(n) = &self.notify {
            n();
        }
    }
}

impl IrqLine for GsiLine {
    fn set_level(&self, level: bool) {
        if let Some(chip) = self.chip.upgrade() {
            let pending = {
                let mut c = lock(&chip);
                c.set_irq(self.gsi, level);
                level && c.interrupt_pending()
            };
            if pending {
                self.kick();
            }
        }
    }

    fn pulse(&self) {
        if let Some(chip) = self.chip.upgrade() {
            let pending = {
                let mut c = lock(&chip);
                c.set_irq(self.gsi, true);
                c.set_irq(self.gsi, false);
                c.interrupt_pending()
            };
            if pending {
                self.kick();
            }
        }
    }
}

/// The [`MsiSink`] of an [`EmuIrqchip`]: MSIs go to its LAPIC; `notify` runs afterwards
/// when the CPU has an interrupt pending (to wake a halted vCPU).
pub struct EmuMsi {
    chip: Weak<Mutex<EmuIrqchip>>,
    notify: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl EmuMsi {
    /// An MSI sink for `chip`, calling `notify` (if given) after each message that leaves
    /// an interrupt pending for the CPU.
    pub fn new(chip: &Arc<Mutex<EmuIrqchip>>, notify: Option<Arc<dyn Fn() + Send + Sync>>) -> Self {
        Self { chip: Arc::downgrade(chip), notify }
    }
}

impl MsiSink for EmuMsi {
    fn send_msi(&self, addr: u64, data: u32) {
        if let Some(chip) = self.chip.upgrade() {
            let pending = {
                let mut c = lock(&chip);
                c.deliver_msi(addr, data);
                c.interrupt_pending()
            };
            if let Some(n) = self.notify.as_ref().filter(|_| pending) {
                n();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serial::Serial;
    use std::sync::atomic::AtomicBool;

    fn chip() -> (EmuIrqchip, Arc<AtomicU64>) {
        let t = Arc::new(AtomicU64::new(1_000));
        let tc = t.clone();
        (EmuIrqchip::new(Arc::new(move || tc.load(Ordering::SeqCst)), 1_000_000_000), t)
    }

    fn outb(c: &mut EmuIrqchip, port: u16, v: u8) {
        PioDevice::write(c, port, &[v]);
    }

    fn inb(c: &mut EmuIrqchip, port: u16) -> u8 {
        let mut b = [0];
        PioDevice::read(c, port, &mut b);
        b[0]
    }

    fn mmio_w32(c: &mut EmuIrqchip, gpa: u64, v: u32) {
        MmioDevice::write(c, gpa, &v.to_le_bytes());
    }

    fn mmio_r32(c: &mut EmuIrqchip, gpa: u64) -> u32 {
        let mut b = [0u8; 4];
        MmioDevice::read(c, gpa, &mut b);
        u32::from_le_bytes(b)
    }

    fn ioapic_w(c: &mut EmuIrqchip, reg: u32, v: u32) {
        mmio_w32(c, IOAPIC_BASE, reg);
        mmio_w32(c, IOAPIC_BASE + 0x10, v);
    }

    fn ioapic_r(c: &mut EmuIrqchip, reg: u32) -> u32 {
        mmio_w32(c, IOAPIC_BASE, reg);
        mmio_r32(c, IOAPIC_BASE + 0x10)
    }

    fn pic_init(c: &mut EmuIrqchip) {
        for (p, v) in [
            (0x20, 0x11),
            (0x21, 0x30),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x38),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0x21, 0x00),
            (0xa1, 0x00),
        ] {
            outb(c, p, v);
        }
    }

    #[test]
    fn msi_reaches_lapic() {
        let (mut c, _) = chip();
        mmio_w32(&mut c, LAPIC_BASE + 0xf0, 0x1ff);
        assert!(!c.deliver_msi(0xfee0_5000, 0x41), "another APIC ID");
        assert!(!c.deliver_msi(0xfec0_0000, 0x41), "not an MSI address");
        assert!(!c.interrupt_pending());
        assert!(c.deliver_msi(0xfee0_0000, 0x41));
        assert!(c.interrupt_pending());
        assert_eq!(c.acknowledge(), Some(0x41));
    }

    #[test]
    fn pic_direct_then_through_lapic_extint() {
        let (mut c, _) = chip();
        pic_init(&mut c);
        // LAPIC software-disabled at reset: PIC goes straight to the CPU.
        c.set_irq(1, true);
        c.set_irq(1, false);
        assert!(c.interrupt_pending());
        assert_eq!(c.acknowledge(), Some(0x31));
        outb(&mut c, 0x20, 0x20);
        // Enable the LAPIC (SVR) with LINT0 masked: PIC blocked.
        mmio_w32(&mut c, LAPIC_BASE + 0xf0, 0x1ff);
        c.set_irq(1, true);
        c.set_irq(1, false);
        assert!(!c.interrupt_pending());
        assert_eq!(c.acknowledge(), None);
        // Virtual wire mode: LINT0 = ExtINT, unmasked (Linux init_bsp_APIC).
        mmio_w32(&mut c, LAPIC_BASE + 0x350, 0x700);
        assert!(c.interrupt_pending());
        assert_eq!(c.acknowledge(), Some(0x31));
        assert!(!c.interrupt_pending());
        assert_eq!(c.pic().isr(), 0x0002);
    }

    #[test]
    fn ioapic_level_interrupt_with_eoi_and_remote_irr() {
        let (mut c, _) = chip();
        mmio_w32(&mut c, LAPIC_BASE + 0xf0, 0x1ff);
        // Pin 20 (a PCI GSI): vector 0x41, level, active low, dest APIC 0.
        ioapic_w(&mut c, 0x10 + 40, 0x41 | (1 << 13) | (1 << 15));
        ioapic_w(&mut c, 0x11 + 40, 0);
        c.set_irq(20, true);
        assert!(c.interrupt_pending());
        assert_ne!(ioapic_r(&mut c, 0x10 + 40) & (1 << 14), 0, "remote IRR");
        assert_eq!(c.acknowledge(), Some(0x41));
        // TMR bit set for a level interrupt.
        assert_ne!(mmio_r32(&mut c, LAPIC_BASE + 0x180 + 0x20) & (1 << 1), 0);
        assert!(!c.interrupt_pending());
        // EOI with the line still asserted: re-delivered.
        mmio_w32(&mut c, LAPIC_BASE + 0xb0, 0);
        assert!(c.interrupt_pending());
        assert_eq!(c.acknowledge(), Some(0x41));
        // The device deasserts, then the guest EOIs: remote IRR clears.
        c.set_irq(20, false);
        mmio_w32(&mut c, LAPIC_BASE + 0xb0, 0);
        assert!(!c.interrupt_pending());
        assert_eq!(ioapic_r(&mut c, 0x10 + 40) & (1 << 14), 0);
        // Masked while asserted; unmasking delivers.
        ioapic_w(&mut c, 0x10 + 40, 0x41 | (1 << 15) | (1 << 16));
        c.set_irq(20, true);
        assert!(!c.interrupt_pending());
        ioapic_w(&mut c, 0x10 + 40, 0x41 | (1 << 15));
        assert_eq!(c.acknowledge(), Some(0x41));
    }

    #[test]
    fn pit_irq0_via_ioapic_pin2_and_pic() {
        let (mut c, t) = chip();
        pic_init(&mut c);
        mmio_w32(&mut c, LAPIC_BASE + 0xf0, 0x1ff);
        ioapic_w(&mut c, 0x10 + 4, 0x30); // pin 2, edge, vector 0x30
                                          // PIT channel 0, mode 2, 1193 ticks (~1 ms).
        outb(&mut c, 0x43, 0x34);
        outb(&mut c, 0x40, 0xa9);
        outb(&mut c, 0x40, 0x04);
        let now = t.load(Ordering::SeqCst);
        let dl = c.poll(now).unwrap();
        assert!(dl > now && dl - now < 1_100_000);
        assert!(!c.interrupt_pending());
        assert!(c.poll(dl).unwrap() > dl);
        assert!(c.interrupt_pending());
        assert_eq!(c.acknowledge(), Some(0x30));
        // The PIC saw the edge too (blocked from the CPU: LINT0 masked).
        assert_eq!(c.pic().irr() & 1, 1);
    }

    #[test]
    fn lapic_timer_through_chip_poll() {
        let (mut c, t) = chip();
        mmio_w32(&mut c, LAPIC_BASE + 0xf0, 0x1ff);
        mmio_w32(&mut c, LAPIC_BASE + 0x3e0, 0xb);
        mmio_w32(&mut c, LAPIC_BASE + 0x320, 0xec);
        mmio_w32(&mut c, LAPIC_BASE + 0x380, 5000); // 5 us at 1 GHz
        let now = t.load(Ordering::SeqCst);
        assert_eq!(c.poll(now), Some(now + 5000));
        assert_eq!(c.poll(now + 5000), None);
        assert_eq!(c.acknowledge(), Some(0xec));
    }

    #[test]
    fn serial_raises_gsi4_through_shared_chip() {
        let (c, _) = chip();
        let chip = Arc::new(Mutex::new(c));
        let mut pio = PioBus::new();
        let mut mmio = MmioBus::new();
        EmuIrqchip::attach(&chip, &mut pio, &mut mmio).unwrap();
        let kicked = Arc::new(AtomicBool::new(false));
        let k = kicked.clone();
        let line = GsiLine::new(&chip, 4).with_notify(Arc::new(move || k.store(true, Ordering::SeqCst)));
        let serial = Arc::new(Mutex::new(Serial::new(Arc::new(line), Box::new(std::io::sink()))));
        pio.insert(0x3f8, 8, serial.clone()).unwrap();
        // PIC init through the bus.
        for (p, v) in [(0x20u16, 0x11u8), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01), (0x21, 0x00)] {
            assert!(pio.write(p, &[v]));
        }
        pio.write(0x3f9, &[0x01]); // IER: RDA
        assert_eq!(serial.lock().unwrap().enqueue_input(b"x"), 1);
        assert!(kicked.load(Ordering::SeqCst));
        let mut c = chip.lock().unwrap();
        assert!(c.interrupt_pending());
        assert_eq!(c.acknowledge(), Some(0x34));
        drop(c);
        // MMIO dispatch through the bus.
        let mut b = [0u8; 4];
        assert!(mmio.read(LAPIC_BASE + 0x30, &mut b));
        assert_eq!(u32::from_le_bytes(b), 0x0005_0014);
        assert!(mmio.write(IOAPIC_BASE, &1u32.to_le_bytes()));
        assert!(mmio.read(IOAPIC_BASE + 0x10, &mut b));
        assert_eq!(u32::from_le_bytes(b), 0x0017_0011);
        // A dropped chip makes the line inert.
        drop(pio);
        drop(mmio);
        drop(chip);
        assert_eq!(serial.lock().unwrap().enqueue_input(b"y"), 1);
    }

    #[test]
    fn lines_and_msis_notify_only_when_the_cpu_has_an_interrupt() {
        let (c, _) = chip();
        let chip = Arc::new(Mutex::new(c));
        let kicks = Arc::new(AtomicU64::new(0));
        let k = kicks.clone();
        let notify: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            k.fetch_add(1, Ordering::SeqCst);
        });
        let line = GsiLine::new(&chip, 4).with_notify(notify.clone());
        let msi = EmuMsi::new(&chip, Some(notify));
        // PIC: IRQ 4 masked, the LAPIC disabled (the PIC reaches the CPU directly).
        for (p, v) in [(0x20u16, 0x11u8), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01), (0x21, 0x10)] {
            outb(&mut lock(&chip), p, v);
        }
        line.pulse();
        line.set_level(true);
        line.set_level(false);
        assert_eq!(kicks.load(Ordering::SeqCst), 0, "a masked line wakes nobody");
        outb(&mut lock(&chip), 0x21, 0x00);
        line.pulse();
        assert_eq!(kicks.load(Ordering::SeqCst), 1);
        assert_eq!(lock(&chip).acknowledge(), Some(0x34));
        outb(&mut lock(&chip), 0x20, 0x20);
        // MSIs: to another APIC nothing; to ours (LAPIC enabled) a kick.
        mmio_w32(&mut lock(&chip), LAPIC_BASE + 0xf0, 0x1ff);
        msi.send_msi(0xfee0_5000, 0x41);
        assert_eq!(kicks.load(Ordering::SeqCst), 1);
        msi.send_msi(0xfee0_0000, 0x41);
        assert_eq!(kicks.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn state_round_trip() {
        let (mut c, t) = chip();
        pic_init(&mut c);
        mmio_w32(&mut c, LAPIC_BASE + 0xf0, 0x1ff);
        // Virtual wire; IOAPIC pin 2 (PIT): edge, vector 0x30; pin 20: level, vector 0x41.
        mmio_w32(&mut c, LAPIC_BASE + 0x350, 0x700);
        ioapic_w(&mut c, 0x10 + 4, 0x30);
        ioapic_w(&mut c, 0x10 + 40, 0x41 | (1 << 13) | (1 << 15));
        // PIT channel 0, mode 2, ~1 ms; LAPIC timer periodic 0xec every 5 us.
        outb(&mut c, 0x43, 0x34);
        outb(&mut c, 0x40, 0xa9);
        outb(&mut c, 0x40, 0x04);
        mmio_w32(&mut c, LAPIC_BASE + 0x3e0, 0xb);
        mmio_w32(&mut c, LAPIC_BASE + 0x320, 0x2_00ec);
        mmio_w32(&mut c, LAPIC_BASE + 0x380, 5000);
        c.set_irq(20, true);
        c.set_irq(1, true);
        assert_eq!(c.acknowledge(), Some(0x31), "PIC first (ExtINT)");
        assert_eq!(c.acknowledge(), Some(0x41));
        let now = t.fetch_add(7_000, Ordering::SeqCst) + 7_000;
        c.poll(now);
        let s = c.state();
        let json = serde_json::to_string(&s).unwrap();
        let s2: EmuIrqchipState = serde_json::from_str(&json).unwrap();
        assert_eq!(s2, s);
        let (mut d, t2) = chip();
        t2.store(now, Ordering::SeqCst);
        d.restore(&s2).unwrap();
        assert_eq!(d.state(), s);
        assert_eq!(d.interrupt_pending(), c.interrupt_pending());
        let mut later = now;
        let mut vectors = Vec::new();
        for step in 0..50u64 {
            later += 37_000 + step;
            t.store(later, Ordering::SeqCst);
            t2.store(later, Ordering::SeqCst);
            assert_eq!(c.poll(later), d.poll(later));
            if step == 0 {
                // Retire the level interrupt taken before the snapshot: still asserted, so
                // the IOAPIC delivers it again.
                mmio_w32(&mut c, LAPIC_BASE + 0xb0, 0);
                mmio_w32(&mut d, LAPIC_BASE + 0xb0, 0);
            }
            if step == 3 {
                c.set_irq(20, false);
                d.set_irq(20, false);
            }
            // Take what is pending, with an EOI to the PIC and the LAPIC after each.
            for _ in 0..4 {
                let v = c.acknowledge();
                assert_eq!(v, d.acknowledge());
                let Some(v) = v else { break };
                vectors.push(v);
                for x in [&mut c, &mut d] {
                    outb(x, 0x20, 0x20);
                    mmio_w32(x, LAPIC_BASE + 0xb0, 0);
                }
            }
        }
        assert_eq!(c.state(), d.state());
        for v in [0x30, 0x41, 0xec] {
            assert!(vectors.contains(&v), "vector {v:#x} never delivered: {vectors:x?}");
        }
    }

    #[test]
    fn malformed_state_is_rejected_atomically() {
        let (mut c, _) = chip();
        pic_init(&mut c);
        let good = c.state();
        let mut bad = good.clone();
        bad.pic.master.imr = 0x55; // valid on its own
        bad.pit.channels[0].reload = 0; // would divide by zero
        assert_eq!(c.restore(&bad).unwrap_err().field, "pit.channels[0].reload");
        assert_eq!(c.state(), good, "no part restored");
        let mut bad = good.clone();
        bad.lapic.irr[0] = 1;
        assert_eq!(c.restore(&bad).unwrap_err().field, "lapic.irr");
    }

    #[test]
    fn hostile_inputs() {
        let (mut c, t) = chip();
        for v in 0..=255u8 {
            for (p, _) in PIO_RANGES {
                outb(&mut c, p, v);
                outb(&mut c, p + 1, v);
                inb(&mut c, p);
            }
            c.set_irq(u32::from(v), v & 1 == 0);
            c.set_irq(u32::MAX - u32::from(v), true);
            c.poll(t.fetch_add(12_345, Ordering::SeqCst));
            c.acknowledge();
            MmioDevice::write(&mut c, 0xfee0_0000 + u64::from(v) * 16, &[v; 4]);
            MmioDevice::write(&mut c, 0xfec0_0000 + u64::from(v) * 16, &[v; 4]);
            let mut b = [0u8; 8];
            MmioDevice::read(&mut c, 0xfee0_0ffc, &mut b);
            MmioDevice::read(&mut c, 0xfec0_0010, &mut b[..3]);
            MmioDevice::read(&mut c, 0x1234, &mut b);
        }
        c.poll(u64::MAX);
        assert_eq!(inb(&mut c, 0x22), 0xff);
    }
}

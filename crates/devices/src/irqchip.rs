//! Userspace interrupt controller complex for the vCPUs of the software CPU
//! emulator: 8259A PIC pair + ELCR, 82093AA IOAPIC, one xAPIC per vCPU
//! (APIC IDs 0..N-1) and 8254 PIT, wired like a PC.
//!
//! Wiring:
//!
//! * ISA IRQ *n* (0-15, [`EmuIrqchip::set_irq`] with `gsi < 16`) drives PIC
//!   input *n* and IOAPIC pin *n*, except ISA IRQ 0 (PIT channel 0) which
//!   drives IOAPIC pin 2 (the usual PC interrupt source override: the
//!   firmware tables must declare "ISA IRQ 0 → GSI 2"); ISA IRQ 2 is the
//!   PIC cascade and is ignored.  GSIs 16-23 drive IOAPIC pins 16-23 only.
//! * IOAPIC messages and MSIs go to the LAPICs their destination names
//!   (physical APIC ID, 0xFF broadcast, or logical flat/cluster destinations
//!   matching each LDR; Intel SDM Vol. 3A §11.6.2): fixed delivery to every
//!   target, lowest-priority delivery to the target with the lowest processor
//!   priority (round robin among equals, §11.6.2.4), NMI and INIT to every
//!   target; other modes are dropped.  LAPIC EOIs of level-triggered vectors
//!   are broadcast back to the IOAPIC.
//! * IPIs written to a LAPIC's ICR (§11.6.1) are routed the same way, with the
//!   destination shorthands (self, all including self, all excluding self),
//!   plus INIT (which resets the target LAPIC and leaves an INIT for its vCPU)
//!   and SIPI (a start-up vector for its vCPU); see [`EmuIrqchip::take_startup`].
//!   An INIT level de-assert does nothing.
//! * The PIC's INT output reaches vCPU 0 (the bootstrap processor) through
//!   its LAPIC's LINT0 when it is programmed as unmasked ExtINT (virtual wire
//!   mode), or directly when that LAPIC is globally or software disabled; see
//!   [`Lapic::accepts_pic_interrupts`].
//! * Each vCPU runs its own LAPIC's timer ([`EmuIrqchip::poll_cpu`]); the PIT
//!   is run by whichever vCPU polls first.
//!
//! Every delivery to a LAPIC records that vCPU in a set of vCPUs to wake
//! ([`EmuIrqchip::take_kicks`]): whoever made the delivery takes it after
//! unlocking the chip and wakes those vCPUs if they sleep in `hlt`.
//!
//! This type implements [`PioDevice`] for the PIC (0x20-0x21, 0xA0-0xA1),
//! ELCR (0x4D0-0x4D1) and PIT (0x40-0x43, 0x61) ports listed in
//! [`PIO_RANGES`], and [`MmioDevice`] for the LAPIC page (0xFEE00000, 4 KiB)
//! and IOAPIC window (0xFEC00000, 4 KiB) listed in [`MMIO_RANGES`], dispatching
//! by address; [`EmuIrqchip::attach`] registers all of them on the buses.  The
//! LAPIC page is per vCPU: an accessor that knows which vCPU made the access
//! uses [`EmuIrqchip::lapic_read`] / [`EmuIrqchip::lapic_write`]; through the
//! bus it is vCPU 0's.
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
use crate::lapic::{Ipi, Lapic, LapicState, LAPIC_BASE, LAPIC_SIZE};
use crate::pic::{Pic, PicState};
use crate::pit::{Pit, PitState};
use crate::{Clock, Error, StateError};

/// Bit `i` of a per-vCPU mask (kicks, NMI hints); 0 for vCPUs from 64 on.
fn cpu_bit(i: usize) -> u64 {
    u32::try_from(i).ok().and_then(|i| 1u64.checked_shl(i)).unwrap_or(0)
}

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
///
/// A state saved with one vCPU before SMP support has no `ap_lapics`,
/// `init_pending` or `sipi_pending`: they default to empty, which is the
/// one-vCPU chip.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EmuIrqchipState {
    /// The 8259A pair and ELCR.
    pub pic: PicState,
    /// The IOAPIC.
    pub ioapic: IoApicState,
    /// vCPU 0's local APIC.
    pub lapic: LapicState,
    /// The local APICs of vCPUs 1..N, in order.
    #[serde(default)]
    pub ap_lapics: Vec<LapicState>,
    /// Per vCPU (0..N, or empty for none): an INIT IPI the vCPU has not taken yet.
    #[serde(default)]
    pub init_pending: Vec<bool>,
    /// Per vCPU (0..N, or empty for none): a start-up IPI's vector the vCPU has not taken.
    #[serde(default)]
    pub sipi_pending: Vec<Option<u8>>,
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
        let lapics = std::iter::once(&self.lapic).chain(&self.ap_lapics).filter_map(|l| l.timer.map(|t| t.start_ns));
        pit.chain(lapics).max().unwrap_or(0)
    }
}

/// Start-up events an IPI left for a vCPU (see [`EmuIrqchip::take_startup`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Startup {
    /// An INIT arrived: the vCPU must go to its INIT state (an application processor then
    /// waits for a SIPI). Its LAPIC was already reset.
    pub init: bool,
    /// A start-up IPI arrived with this vector (taken after `init`): a vCPU waiting for a
    /// SIPI starts in real mode at `vector`·0x1000; any other ignores it (SDM Vol. 3A
    /// §9.4.4.1 and §11.6.1).
    pub sipi: Option<u8>,
}

/// PIC + IOAPIC + one LAPIC per vCPU + PIT.
pub struct EmuIrqchip {
    pic: Pic,
    ioapic: IoApic,
    apics: Apics,
    pit: Pit,
    pit_irq0: Arc<EdgeCounter>,
}

/// The LAPICs and what their deliveries left for the vCPUs.
struct Apics {
    /// LAPIC of vCPU `i` (APIC ID `i`).
    lapics: Vec<Lapic>,
    /// Per vCPU: start-up events not yet taken.
    startup: Vec<Startup>,
    /// vCPUs (bit `i` for vCPU `i`, the first 64) that got something since the last
    /// [`EmuIrqchip::take_kicks`].
    kicks: u64,
    /// Where the next lowest-priority tie-break starts.
    rr: usize,
    /// Bit `i` set: vCPU `i` (the first 64) may have an NMI latched; see
    /// [`EmuIrqchip::nmi_hint`].
    nmi_hint: Arc<AtomicU64>,
}

/// Who an interrupt message or IPI is for.
#[derive(Clone, Copy)]
enum Dest {
    /// A physical APIC ID or logical destination (with the mode).
    Id { dest: u8, logical: bool },
    /// Every LAPIC.
    All,
    /// Every LAPIC but vCPU `n`'s.
    AllBut(usize),
    /// vCPU `n`'s LAPIC only.
    Only(usize),
}

impl Apics {
    fn targets(&self, d: Dest) -> impl Iterator<Item = usize> + '_ {
        self.lapics.iter().enumerate().filter_map(move |(i, l)| {
            let hit = match d {
                Dest::Id { dest, logical } => l.matches_destination(dest, logical),
                Dest::All => true,
                Dest::AllBut(n) => i != n,
                Dest::Only(n) => i == n,
            };
            hit.then_some(i)
        })
    }

    fn kick(&mut self, i: usize) {
        self.kicks |= cpu_bit(i);
    }

    /// Marks vCPU `i`'s NMI hint after its LAPIC latched an NMI.
    fn hint_nmi(&self, i: usize) {
        self.nmi_hint.fetch_or(cpu_bit(i), Ordering::Release);
    }

    /// Delivers `vector`/`mode` to the LAPICs `d` names (SDM Vol. 3A §11.6.2); returns
    /// whether any accepted it.
    fn deliver(&mut self, d: Dest, mode: DeliveryMode, vector: u8, level_triggered: bool) -> bool {
        let mut any = false;
        match mode {
            DeliveryMode::Fixed => {
                let t: Vec<usize> = self.targets(d).collect();
                for i in t {
                    if self.lapics.get_mut(i).is_some_and(|l| l.accept_interrupt(vector, level_triggered)) {
                        self.kick(i);
                        any = true;
                    }
                }
            }
            DeliveryMode::LowestPriority => {
                // The enabled target with the lowest processor priority; among equals, the
                // next after the last one chosen.
                let n = self.lapics.len().max(1);
                let rr = self.rr;
                let best = self
                    .targets(d)
                    .filter(|&i| self.lapics.get(i).is_some_and(Lapic::enabled))
                    .min_by_key(|&i| (self.lapics.get(i).map_or(u8::MAX, Lapic::ppr) >> 4, (i + n - rr % n) % n));
                if let Some(i) = best {
                    self.rr = i + 1;
                    if self.lapics.get_mut(i).is_some_and(|l| l.accept_interrupt(vector, level_triggered)) {
                        self.kick(i);
                        any = true;
                    }
                }
            }
            DeliveryMode::Nmi => {
                let t: Vec<usize> = self.targets(d).collect();
                for i in t {
                    if let Some(l) = self.lapics.get_mut(i) {
                        l.raise_nmi();
                        self.hint_nmi(i);
                        self.kick(i);
                        any = true;
                    }
                }
            }
            DeliveryMode::Init => {
                let t: Vec<usize> = self.targets(d).collect();
                for i in t {
                    if let (Some(l), Some(s)) = (self.lapics.get_mut(i), self.startup.get_mut(i)) {
                        l.init();
                        *s = Startup { init: true, sipi: None };
                        self.kick(i);
                        any = true;
                    }
                }
            }
            DeliveryMode::Startup => {
                let t: Vec<usize> = self.targets(d).collect();
                for i in t {
                    if let Some(s) = self.startup.get_mut(i) {
                        s.sipi = Some(vector);
                        self.kick(i);
                        any = true;
                    }
                }
            }
            mode => tracing::debug!("irqchip: dropped a message with delivery mode {mode:?}"),
        }
        any
    }

    /// An IOAPIC message or MSI.
    fn message(&mut self, m: ApicMessage) -> bool {
        if matches!(m.delivery_mode, DeliveryMode::Startup | DeliveryMode::ExtInt) {
            tracing::debug!("irqchip: dropped an interrupt message with delivery mode {:?}", m.delivery_mode);
            return false;
        }
        let d = if !m.logical && m.dest == 0xff { Dest::All } else { Dest::Id { dest: m.dest, logical: m.logical } };
        self.deliver(d, m.delivery_mode, m.vector, m.level_triggered)
    }

    /// An IPI that vCPU `from` wrote to its ICR (SDM Vol. 3A §11.6.1).
    fn ipi(&mut self, from: usize, ipi: Ipi) {
        if ipi.mode == DeliveryMode::Init && ipi.level_triggered && !ipi.assert {
            // INIT level de-assert: only synchronises arbitration IDs on old processors.
            return;
        }
        let d = match ipi.shorthand {
            1 => Dest::Only(from),
            2 => Dest::All,
            3 => Dest::AllBut(from),
            _ if !ipi.logical && ipi.dest == 0xff => Dest::All,
            _ => Dest::Id { dest: ipi.dest, logical: ipi.logical },
        };
        self.deliver(d, ipi.mode, ipi.vector, false);
    }
}

impl EmuIrqchip {
    /// Creates the chip set for one vCPU in its power-on state.
    ///
    /// `clock`: virtual time in ns shared by the PIT and the LAPIC timer;
    /// `lapic_timer_hz`: LAPIC timer input clock in Hz (before its divider).
    pub fn new(clock: Clock, lapic_timer_hz: u64) -> Self {
        Self::with_cpus(clock, lapic_timer_hz, 1)
    }

    /// Creates the chip set for `cpus` vCPUs (at least 1; LAPICs with APIC IDs
    /// 0..`cpus`, vCPU 0 the bootstrap processor) in its power-on state;
    /// `clock` and `lapic_timer_hz` as in [`EmuIrqchip::new`].
    pub fn with_cpus(clock: Clock, lapic_timer_hz: u64, cpus: u8) -> Self {
        let pit_irq0 = Arc::new(EdgeCounter::default());
        let n = cpus.max(1);
        Self {
            pic: Pic::new(),
            ioapic: IoApic::new(),
            apics: Apics {
                lapics: (0..n).map(|id| Lapic::with_id(id, lapic_timer_hz, Arc::clone(&clock))).collect(),
                startup: vec![Startup::default(); usize::from(n)],
                kicks: 0,
                rr: 0,
                nmi_hint: Arc::default(),
            },
            pit: Pit::new(clock, pit_irq0.clone()),
            pit_irq0,
        }
    }

    /// How many vCPUs (LAPICs) the chip serves.
    pub fn cpus(&self) -> usize {
        self.apics.lapics.len()
    }

    /// Snapshot of the PIC, IOAPIC, LAPICs, pending start-up IPIs and PIT.
    /// Take it while the vCPUs are stopped (between two runs), together
    /// with the CPUs' states.
    pub fn state(&self) -> EmuIrqchipState {
        let mut lapics = self.apics.lapics.iter().map(Lapic::state);
        let lapic = lapics.next().unwrap_or_else(|| Lapic::new(1, Arc::new(|| 0)).state());
        let multi = self.apics.lapics.len() > 1;
        EmuIrqchipState {
            pic: self.pic.state(),
            ioapic: self.ioapic.state(),
            lapic,
            ap_lapics: lapics.collect(),
            init_pending: if multi { self.apics.startup.iter().map(|s| s.init).collect() } else { Vec::new() },
            sipi_pending: if multi { self.apics.startup.iter().map(|s| s.sipi).collect() } else { Vec::new() },
            pit: self.pit.state(),
        }
    }

    /// Loads a snapshot taken by [`EmuIrqchip::state`]; the clock stays the
    /// one given to [`EmuIrqchip::new`] (the VMM must make it continue from
    /// the reading it had at save time).  Nothing is delivered or signalled
    /// by the restore itself; call [`EmuIrqchip::poll`] afterwards to get
    /// the next timer deadline.  Every part is checked before any is
    /// changed: on error (a malformed part, or a state for another number of
    /// vCPUs) the chip is left unchanged.
    pub fn restore(&mut self, s: &EmuIrqchipState) -> Result<(), StateError> {
        let n = self.apics.lapics.len();
        StateError::check(
            1 + s.ap_lapics.len() == n,
            "ap_lapics",
            format!("{} LAPICs saved, the chip has {n}", 1 + s.ap_lapics.len()),
        )?;
        for (name, len) in [("init_pending", s.init_pending.len()), ("sipi_pending", s.sipi_pending.len())] {
            StateError::check(len == 0 || len == n, name, format!("{len} entries for {n} vCPUs"))?;
        }
        self.pic.validate(&s.pic)?;
        self.ioapic.validate(&s.ioapic)?;
        let saved = std::iter::once(&s.lapic).chain(&s.ap_lapics);
        for (l, st) in self.apics.lapics.iter().zip(saved.clone()) {
            l.validate(st)?;
        }
        self.pit.validate(&s.pit)?;
        self.pic.restore(&s.pic)?;
        self.ioapic.restore(&s.ioapic)?;
        for (l, st) in self.apics.lapics.iter_mut().zip(saved) {
            l.restore(st)?;
        }
        self.pit.restore(&s.pit)?;
        for (i, st) in self.apics.startup.iter_mut().enumerate() {
            *st = Startup {
                init: s.init_pending.get(i).copied().unwrap_or(false),
                sipi: s.sipi_pending.get(i).copied().flatten(),
            };
        }
        self.apics.kicks = 0;
        let hint = (0..n).filter(|&i| self.apics.lapics.get(i).is_some_and(Lapic::nmi_pending)).map(cpu_bit);
        self.apics.nmi_hint.store(hint.fold(0, |a, b| a | b), Ordering::Release);
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
            if self.pic.has_interrupt() {
                self.apics.kick(0);
            }
        }
        let apics = &mut self.apics;
        self.ioapic.set_irq(pin, level, &mut |m| apics.message(m));
    }

    /// Delivers a message-signalled interrupt (Intel SDM Vol. 3 §11.11): address
    /// 0xFEEx_xxxx with the destination in bits 19:12 and the destination mode in bit 2;
    /// data with the vector in bits 7:0, the delivery mode in bits 10:8 and the trigger mode
    /// in bit 15. Messages to other addresses are dropped. Returns whether a LAPIC accepted
    /// it.
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
        self.apics.message(m)
    }

    /// Runs the PIT and vCPU 0's LAPIC timer up to `now_ns`; see [`EmuIrqchip::poll_cpu`].
    pub fn poll(&mut self, now_ns: u64) -> Option<u64> {
        self.poll_cpu(0, now_ns)
    }

    /// Runs the PIT and vCPU `cpu`'s LAPIC timer up to `now_ns` (raising
    /// IRQ 0 and the LAPIC timer interrupt as due) and returns the earliest
    /// next deadline of the two in ns, if any.  The vCPU should call it again
    /// at that time and after guest accesses to the PIT or its LAPIC timer
    /// registers (which can move the deadlines).
    pub fn poll_cpu(&mut self, cpu: usize, now_ns: u64) -> Option<u64> {
        let pit_next = self.pit.poll(now_ns);
        if self.pit_irq0.0.swap(0, Ordering::SeqCst) > 0 {
            self.set_irq(0, true);
            self.set_irq(0, false);
        }
        let lapic_next = match self.apics.lapics.get_mut(cpu) {
            Some(l) => {
                let before = l.has_interrupt();
                let next = l.poll(now_ns);
                if !before && l.has_interrupt() {
                    self.apics.kick(cpu);
                }
                next
            }
            None => None,
        };
        match (pit_next, lapic_next) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether an external interrupt should be presented to vCPU 0; see
    /// [`EmuIrqchip::interrupt_pending_for`].
    pub fn interrupt_pending(&self) -> bool {
        self.interrupt_pending_for(0)
    }

    /// Whether an external interrupt should be presented to vCPU `cpu` (when
    /// its RFLAGS.IF allows): from its LAPIC, or, for vCPU 0, from the PIC
    /// when it is routed to the CPU.
    pub fn interrupt_pending_for(&self, cpu: usize) -> bool {
        let Some(l) = self.apics.lapics.get(cpu) else {
            return false;
        };
        (cpu == 0 && l.accepts_pic_interrupts() && self.pic.has_interrupt()) || l.has_interrupt()
    }

    /// Acknowledges vCPU 0's highest-priority pending interrupt; see
    /// [`EmuIrqchip::acknowledge_for`].
    pub fn acknowledge(&mut self) -> Option<u8> {
        self.acknowledge_for(0)
    }

    /// Acknowledges the highest-priority interrupt pending for vCPU `cpu`
    /// and returns its vector: a PIC (ExtINT) interrupt first (vCPU 0 only),
    /// as the LAPIC delivers ExtINT without priority checks, else the
    /// LAPIC's.  `None` if nothing is pending.
    pub fn acknowledge_for(&mut self, cpu: usize) -> Option<u8> {
        let l = self.apics.lapics.get_mut(cpu)?;
        if cpu == 0 && l.accepts_pic_interrupts() && self.pic.has_interrupt() {
            return self.pic.acknowledge();
        }
        l.acknowledge()
    }

    /// Returns and clears a pending NMI of vCPU 0 (from an NMI IPI or IOAPIC message).
    pub fn take_nmi(&mut self) -> bool {
        self.take_nmi_for(0)
    }

    /// Returns and clears a pending NMI of vCPU `cpu`.
    pub fn take_nmi_for(&mut self, cpu: usize) -> bool {
        self.apics.nmi_hint.fetch_and(!cpu_bit(cpu), Ordering::Release);
        self.apics.lapics.get_mut(cpu).is_some_and(Lapic::take_nmi)
    }

    /// Bit `i` of the shared word is set while vCPU `i` (of the first 64) may have an NMI
    /// latched: set with every NMI delivered to it (and on restore), cleared when
    /// [`EmuIrqchip::take_nmi_for`] takes it, both under the chip's lock. A vCPU reads it
    /// without the lock and asks the chip only when its bit is set (a vCPU from 64 on
    /// always asks), so looking for NMIs costs no lock on the run loop's hot path. An NMI
    /// latched while the bit was being read is seen at the next look.
    pub fn nmi_hint(&self) -> Arc<AtomicU64> {
        self.apics.nmi_hint.clone()
    }

    /// Whether vCPU `cpu` has an NMI latched, without taking it (a CPU that cannot take
    /// it yet, its NMIs blocked until an IRET, leaves it latched; one that can wakes from
    /// `hlt` for it).
    pub fn nmi_pending_for(&self, cpu: usize) -> bool {
        self.apics.lapics.get(cpu).is_some_and(Lapic::nmi_pending)
    }

    /// Takes the start-up events (INIT, SIPI) IPIs left for vCPU `cpu`.
    pub fn take_startup(&mut self, cpu: usize) -> Startup {
        self.apics.startup.get_mut(cpu).map(std::mem::take).unwrap_or_default()
    }

    /// The vCPUs (bit `i` for vCPU `i`; the first 64) that an interrupt,
    /// NMI, INIT or SIPI was delivered to since the last call: wake them if
    /// they sleep.
    pub fn take_kicks(&mut self) -> u64 {
        std::mem::take(&mut self.apics.kicks)
    }

    /// Broadcasts an EOI for `vector` to the IOAPIC (normally done
    /// automatically when the guest writes the LAPIC EOI register).
    pub fn ioapic_eoi(&mut self, vector: u8) {
        let apics = &mut self.apics;
        self.ioapic.eoi(vector, &mut |m| apics.message(m));
    }

    /// Guest load from vCPU `cpu`'s LAPIC page at `offset` (0..0x1000).
    pub fn lapic_read(&mut self, cpu: usize, offset: u64, data: &mut [u8]) {
        match self.apics.lapics.get_mut(cpu) {
            Some(l) => l.mmio_read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Guest store to vCPU `cpu`'s LAPIC page at `offset`: EOIs of
    /// level-triggered vectors reach the IOAPIC, ICR writes send their IPI.
    pub fn lapic_write(&mut self, cpu: usize, offset: u64, data: &[u8]) {
        let Some(l) = self.apics.lapics.get_mut(cpu) else {
            return;
        };
        let eoi = l.mmio_write(offset, data);
        let ipi = l.take_ipi();
        if let Some(vector) = eoi {
            self.ioapic_eoi(vector);
        }
        if let Some(ipi) = ipi {
            self.apics.ipi(cpu, ipi);
        }
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

    /// vCPU 0's local APIC.
    ///
    /// # Panics
    ///
    /// Never: the chip has at least one LAPIC.
    #[allow(clippy::indexing_slicing)] // `with_cpus` builds at least one LAPIC
    pub fn lapic(&self) -> &Lapic {
        &self.apics.lapics[0]
    }

    /// vCPU 0's local APIC, mutably.
    #[allow(clippy::indexing_slicing)] // as in `lapic`
    pub fn lapic_mut(&mut self) -> &mut Lapic {
        &mut self.apics.lapics[0]
    }

    /// vCPU `cpu`'s local APIC, if there is one.
    pub fn lapic_of(&self, cpu: usize) -> Option<&Lapic> {
        self.apics.lapics.get(cpu)
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
            self.lapic_read(0, off, data);
        } else if let Some(off) = gpa.checked_sub(IOAPIC_BASE).filter(|&o| o < IOAPIC_SIZE) {
            self.ioapic.mmio_read(off, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, gpa: u64, data: &[u8]) {
        if let Some(off) = gpa.checked_sub(LAPIC_BASE).filter(|&o| o < LAPIC_SIZE) {
            self.lapic_write(0, off, data);
        } else if let Some(off) = gpa.checked_sub(IOAPIC_BASE).filter(|&o| o < IOAPIC_SIZE) {
            let apics = &mut self.apics;
            self.ioapic.mmio_write(off, data, &mut |m| apics.message(m));
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
    notify: Option<Kick>,
}

/// What a line or MSI sink runs, after unlocking the chip, with the vCPUs an interrupt was
/// delivered to (bit `i` for vCPU `i`; see [`EmuIrqchip::take_kicks`]): wake them.
pub type Kick = Arc<dyn Fn(u64) + Send + Sync>;

impl GsiLine {
    /// Creates a line driving `gsi` (see [`EmuIrqchip::set_irq`]) of `chip`.
    pub fn new(chip: &Arc<Mutex<EmuIrqchip>>, gsi: u32) -> Self {
        Self { chip: Arc::downgrade(chip), gsi, notify: None }
    }

    /// Adds a callback run (after the chip is unlocked) whenever a change of
    /// the line delivered an interrupt to some vCPUs, with those vCPUs — e.g.
    /// to wake a vCPU halted until its next timer deadline when an I/O thread
    /// raises an interrupt.  (A masked line wakes nobody.)
    pub fn with_notify(mut self, notify: Kick) -> Self {
        self.notify = Some(notify);
        self
    }

    /// The GSI this line drives.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    fn kick(&self, cpus: u64) {
        if let Some(n) = self.notify.as_ref().filter(|_| cpus != 0) {
            n(cpus);
        }
    }
}

impl IrqLine for GsiLine {
    fn set_level(&self, level: bool) {
        if let Some(chip) = self.chip.upgrade() {
            let kicks = {
                let mut c = lock(&chip);
                c.set_irq(self.gsi, level);
                c.take_kicks()
            };
            self.kick(kicks);
        }
    }

    fn pulse(&self) {
        if let Some(chip) = self.chip.upgrade() {
            let kicks = {
                let mut c = lock(&chip);
                c.set_irq(self.gsi, true);
                c.set_irq(self.gsi, false);
                c.take_kicks()
            };
            self.kick(kicks);
        }
    }
}

/// The [`MsiSink`] of an [`EmuIrqchip`]: MSIs go to the LAPICs they name; `notify` runs
/// afterwards with the vCPUs that got one (to wake them if halted).
pub struct EmuMsi {
    chip: Weak<Mutex<EmuIrqchip>>,
    notify: Option<Kick>,
}

impl EmuMsi {
    /// An MSI sink for `chip`, calling `notify` (if given) after each message that was
    /// delivered, with the vCPUs it went to.
    pub fn new(chip: &Arc<Mutex<EmuIrqchip>>, notify: Option<Kick>) -> Self {
        Self { chip: Arc::downgrade(chip), notify }
    }
}

impl MsiSink for EmuMsi {
    fn send_msi(&self, addr: u64, data: u32) {
        if let Some(chip) = self.chip.upgrade() {
            let kicks = {
                let mut c = lock(&chip);
                c.deliver_msi(addr, data);
                c.take_kicks()
            };
            if let Some(n) = self.notify.as_ref().filter(|_| kicks != 0) {
                n(kicks);
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

    fn smp_chip(cpus: u8) -> EmuIrqchip {
        let mut c = EmuIrqchip::with_cpus(Arc::new(|| 1_000), 1_000_000_000, cpus);
        for cpu in 0..usize::from(cpus) {
            c.lapic_write(cpu, 0xf0, &0x1ffu32.to_le_bytes()); // software-enable
        }
        c
    }

    fn icr(c: &mut EmuIrqchip, from: usize, hi: u32, lo: u32) {
        c.lapic_write(from, 0x310, &hi.to_le_bytes());
        c.lapic_write(from, 0x300, &lo.to_le_bytes());
    }

    fn lapic_r32(c: &mut EmuIrqchip, cpu: usize, off: u64) -> u32 {
        let mut b = [0u8; 4];
        c.lapic_read(cpu, off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn each_vcpu_has_its_own_lapic() {
        let mut c = smp_chip(3);
        for (cpu, id) in [(0, 0), (1, 1), (2, 2)] {
            assert_eq!(lapic_r32(&mut c, cpu, 0x20) >> 24, id, "APIC ID");
        }
        assert_ne!(c.lapic_of(0).unwrap().apic_base() & (1 << 8), 0, "vCPU 0 is the BSP");
        assert_eq!(c.lapic_of(1).unwrap().apic_base() & (1 << 8), 0, "vCPU 1 is an AP");
        c.lapic_write(1, 0x80, &0x20u32.to_le_bytes());
        assert_eq!((lapic_r32(&mut c, 0, 0x80), lapic_r32(&mut c, 1, 0x80)), (0, 0x20), "TPR is per vCPU");
        assert!(c.lapic_of(3).is_none());
        assert_eq!(lapic_r32(&mut c, 7, 0x20), u32::MAX, "no such vCPU");
    }

    #[test]
    fn fixed_ipis_by_physical_destination_and_shorthand() {
        let mut c = smp_chip(4);
        icr(&mut c, 0, 2 << 24, 0x41); // physical 2, fixed 0x41
        assert_eq!(c.take_kicks(), 1 << 2);
        assert!(c.interrupt_pending_for(2) && !c.interrupt_pending_for(1) && !c.interrupt_pending_for(0));
        assert_eq!(c.acknowledge_for(2), Some(0x41));
        c.lapic_write(2, 0xb0, &[0; 4]);
        icr(&mut c, 1, 0, 0x0004_0042); // self
        assert_eq!(c.take_kicks(), 1 << 1);
        assert_eq!(c.acknowledge_for(1), Some(0x42));
        c.lapic_write(1, 0xb0, &[0; 4]);
        icr(&mut c, 1, 0, 0x000c_0043); // all excluding self
        assert_eq!(c.take_kicks(), 0b1101);
        for cpu in [0, 2, 3] {
            assert_eq!(c.acknowledge_for(cpu), Some(0x43));
        }
        assert_eq!(c.acknowledge_for(1), None);
        icr(&mut c, 3, 0, 0x0008_0044); // all including self
        assert_eq!(c.take_kicks(), 0b1111);
        icr(&mut c, 3, 0xff << 24, 0x45); // physical broadcast
        assert_eq!(c.take_kicks(), 0b1111);
        icr(&mut c, 0, 9 << 24, 0x46); // nobody has APIC ID 9
        assert_eq!(c.take_kicks(), 0);
    }

    #[test]
    fn logical_flat_and_cluster_destinations() {
        let mut c = smp_chip(4);
        // Flat model (DFR all ones): LDR bit per vCPU, as Linux sets it.
        for cpu in 0..4 {
            c.lapic_write(cpu, 0xd0, &((1u32 << cpu) << 24).to_le_bytes());
        }
        icr(&mut c, 0, 0b1010 << 24, 0x850); // logical, vCPUs 1 and 3
        assert_eq!(c.take_kicks(), 0b1010);
        // An IOAPIC entry with a logical destination: pin 20 to vCPUs 2 and 3, vector 0x51.
        ioapic_w(&mut c, 0x10 + 40, 0x51 | (1 << 11));
        ioapic_w(&mut c, 0x11 + 40, 0b1100 << 24);
        c.set_irq(20, true);
        c.set_irq(20, false);
        assert_eq!(c.take_kicks(), 0b1100);
        assert_eq!((c.acknowledge_for(2), c.acknowledge_for(3)), (Some(0x51), Some(0x51)));
        // Cluster model: cluster 1, members 0b0011 are vCPUs 0 and 1.
        for cpu in 0..4 {
            c.lapic_write(cpu, 0xe0, &0x0fff_ffffu32.to_le_bytes());
            let ldr = (0x10 | (1u32 << (cpu % 2))) << 24;
            c.lapic_write(cpu, 0xd0, &if cpu < 2 { ldr } else { 0x2100_0000 }.to_le_bytes());
        }
        icr(&mut c, 2, 0x13 << 24, 0x852);
        assert_eq!(c.take_kicks(), 0b0011);
    }

    #[test]
    fn lowest_priority_picks_the_least_busy_and_rotates_among_equals() {
        let mut c = smp_chip(3);
        // vCPU 0 busy (TPR 0x40): lowest priority among all goes to 1 or 2, alternating.
        c.lapic_write(0, 0x80, &0x40u32.to_le_bytes());
        let mut got = Vec::new();
        for _ in 0..4 {
            assert!(c.deliver_msi(0xfee0_0000 | (0xff << 12), 0x160)); // lowest priority, broadcast
            got.push(c.take_kicks());
            for cpu in 0..3 {
                while c.acknowledge_for(cpu).is_some() {
                    c.lapic_write(cpu, 0xb0, &[0; 4]);
                }
            }
        }
        assert_eq!(got, [0b010, 0b100, 0b010, 0b100]);
        // A physical destination names one vCPU: it gets it whatever its priority.
        assert!(c.deliver_msi(0xfee0_0000, 0x161));
        assert_eq!(c.take_kicks(), 0b001);
    }

    /// NMIs from the IOAPIC (a pin with NMI delivery) and from an MSI latch in the target
    /// LAPIC: visible without taking (`nmi_pending_for`), taken once, several collapse into
    /// one latch, none is an ordinary interrupt, and the latch is part of the chip's state.
    #[test]
    fn ioapic_and_msi_nmis_latch_once_per_vcpu() {
        let mut c = smp_chip(3);
        // Pin 20: NMI delivery (mode 4, bits 10:8), physical destination 2, edge.
        ioapic_w(&mut c, 0x10 + 40, 4 << 8);
        ioapic_w(&mut c, 0x11 + 40, 2 << 24);
        c.set_irq(20, true);
        c.set_irq(20, false);
        assert_eq!(c.take_kicks(), 0b100, "the target vCPU is woken");
        assert!(c.nmi_pending_for(2) && !c.nmi_pending_for(0) && !c.nmi_pending_for(1));
        assert!(c.nmi_pending_for(2), "looking does not take it");
        assert!(!c.interrupt_pending_for(2), "an NMI is not an INTR");
        // A second NMI (an MSI with NMI delivery to APIC ID 2) while the first is latched.
        assert!(c.deliver_msi(0xfee0_0000 | (2 << 12), 0x400));
        assert_eq!(c.take_kicks(), 0b100);
        let saved = c.state();
        let hint = c.nmi_hint();
        assert_eq!(hint.load(Ordering::Acquire), 0b100, "the hint names vCPU 2");
        assert!(c.take_nmi_for(2));
        assert_eq!(hint.load(Ordering::Acquire), 0, "taken: the hint is clear");
        assert!(!c.take_nmi_for(2) && !c.nmi_pending_for(2), "one latch: two NMIs in a row collapse");
        // The latch survives a save and restore.
        let mut d = smp_chip(3);
        d.restore(&saved).unwrap();
        assert_eq!(d.nmi_hint().load(Ordering::Acquire), 0b100, "restored with its hint");
        assert!(d.nmi_pending_for(2) && d.take_nmi_for(2) && !d.take_nmi_for(2));
        // An MSI NMI to vCPU 0 through the broadcast destination reaches every vCPU.
        assert!(c.deliver_msi(0xfee0_0000 | (0xff << 12), 0x400));
        assert_eq!(c.take_kicks(), 0b111);
        assert!((0..3).all(|cpu| c.take_nmi_for(cpu)));
    }

    #[test]
    fn nmi_init_and_sipi_ipis() {
        let mut c = smp_chip(2);
        icr(&mut c, 0, 1 << 24, 0x400); // NMI to vCPU 1
        assert_eq!(c.take_kicks(), 0b10);
        assert!(!c.take_nmi_for(0) && c.take_nmi_for(1) && !c.take_nmi_for(1));
        // Linux's wakeup_secondary_cpu_via_init: INIT assert, INIT de-assert, SIPI, SIPI.
        c.lapic_write(1, 0x80, &0x30u32.to_le_bytes());
        icr(&mut c, 0, 1 << 24, 0xc500);
        assert_eq!(c.take_kicks(), 0b10);
        assert_eq!(lapic_r32(&mut c, 1, 0x80), 0, "INIT reset the target LAPIC");
        assert_eq!(lapic_r32(&mut c, 1, 0x20) >> 24, 1, "but not its APIC ID");
        icr(&mut c, 0, 1 << 24, 0x8500);
        assert_eq!(c.take_kicks(), 0, "INIT level de-assert does nothing");
        assert_eq!(c.take_startup(1), Startup { init: true, sipi: None });
        assert_eq!(c.take_startup(1), Startup::default(), "taken once");
        icr(&mut c, 0, 1 << 24, 0x0698);
        icr(&mut c, 0, 1 << 24, 0x0698);
        assert_eq!(c.take_kicks(), 0b10);
        assert_eq!(c.take_startup(1), Startup { init: false, sipi: Some(0x98) });
        assert_eq!(c.take_startup(0), Startup::default());
        // INIT to self (hostile, or a reboot path): recorded for the sender, no hang.
        icr(&mut c, 0, 0, 0x0004_4500);
        assert_eq!(c.take_startup(0), Startup { init: true, sipi: None });
    }

    #[test]
    fn smp_state_round_trip_and_mismatch() {
        let mut c = smp_chip(3);
        c.lapic_write(2, 0x80, &0x20u32.to_le_bytes());
        icr(&mut c, 0, 1 << 24, 0xc500);
        icr(&mut c, 0, 1 << 24, 0x0610);
        icr(&mut c, 0, 2 << 24, 0x77);
        let s = c.state();
        assert_eq!((s.ap_lapics.len(), s.init_pending.len(), s.sipi_pending.len()), (2, 3, 3));
        let json = serde_json::to_string(&s).unwrap();
        let back: EmuIrqchipState = serde_json::from_str(&json).unwrap();
        let mut d = EmuIrqchip::with_cpus(Arc::new(|| 1_000), 1_000_000_000, 3);
        d.restore(&back).unwrap();
        assert_eq!(d.state(), s);
        assert_eq!(d.acknowledge_for(2), Some(0x77));
        assert_eq!(d.take_startup(1), Startup { init: true, sipi: Some(0x10) });
        let mut one = EmuIrqchip::new(Arc::new(|| 1_000), 1_000_000_000);
        let before = one.state();
        assert_eq!(one.restore(&s).unwrap_err().field, "ap_lapics");
        assert_eq!(one.state(), before);
        // A one-vCPU state from before SMP (no AP fields) still loads into a one-vCPU chip.
        let mut old: serde_json::Value = serde_json::to_value(&before).unwrap();
        for k in ["ap_lapics", "init_pending", "sipi_pending"] {
            old.as_object_mut().unwrap().remove(k);
        }
        let old: EmuIrqchipState = serde_json::from_value(old).unwrap();
        one.restore(&old).unwrap();
        assert_eq!(one.state(), before);
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
        let line = GsiLine::new(&chip, 4).with_notify(Arc::new(move |_| k.store(true, Ordering::SeqCst)));
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
        let notify: Kick = Arc::new(move |cpus| {
            assert_eq!(cpus, 1, "vCPU 0 only");
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

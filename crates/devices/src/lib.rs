//! Guest-visible legacy devices and userspace interrupt controllers of an x86
//! PC-like virtual machine.
//!
//! Two accelerators use this crate:
//!
//! * **KVM with the in-kernel irqchip**: only [`serial::Serial`],
//!   [`i8042::I8042`] and [`cmos::Cmos`] are used; interrupts are raised
//!   through an [`irq::IrqLine`] implemented by the caller (e.g. `KVM_IRQ_LINE`).
//! * **The software CPU emulator**: additionally uses the interrupt
//!   controllers and timers, composed in [`irqchip::EmuIrqchip`]
//!   (8259A PIC pair + 82093AA IOAPIC + xAPIC + 8254 PIT).
//!
//! Devices are attached to the guest through [`bus::PioBus`] (x86 I/O ports)
//! and [`bus::MmioBus`] (guest-physical memory-mapped I/O).
//!
//! All guest-controlled inputs are treated as hostile: no guest access can
//! panic; unknown registers read as documented constants and writes to them
//! are ignored.
//!
//! # Snapshots
//!
//! Every device with guest-visible state has a serializable state type and a
//! `state()` / `restore(&state)` pair ([`Pic::state`], [`IoApic::state`],
//! [`Lapic::state`], [`Pit::state`], [`EmuIrqchip::state`], [`Cmos::state`],
//! [`Serial::state`], [`I8042::state`], [`AcpiPm::state`]).  Host-side
//! wiring (clocks, interrupt lines, output writers, reset and power-off
//! callbacks) is not state: it stays what the constructor was given.
//! `restore` checks the whole state first and returns a [`StateError`]
//! naming the bad field, leaving the device unchanged, if it is malformed.
//!
//! Timers ([`Pit`], [`Lapic`]) save their deadlines and start times as
//! absolute readings of the shared [`Clock`] (guest nanoseconds).  The VMM
//! must keep that clock continuous across a snapshot (restore its offset so
//! that it resumes at the value it had when the state was saved); timers then
//! continue exactly where they stopped.
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::cast_possible_truncation)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::indexing_slicing))]

pub mod guest_log;

use std::sync::Arc;

pub mod acpi_pm;
pub mod bus;
pub mod cmos;
pub mod i8042;
pub mod ioapic;
pub mod irq;
pub mod irqchip;
pub mod lapic;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod serial;

pub use acpi_pm::AcpiPm;
pub use bus::{MmioBus, MmioDevice, PioBus, PioDevice};
pub use cmos::Cmos;
pub use i8042::I8042;
pub use ioapic::IoApic;
pub use irq::{IrqLine, MsiSink, NoIrq};
pub use irqchip::{EmuIrqchip, EmuMsi, GsiLine, Kick, Startup};
pub use lapic::{Ipi, Lapic};
pub use pci::{PciBus, PciConfig, PciDevice, PciId};
pub use pic::Pic;
pub use pit::Pit;
pub use serial::Serial;

/// A virtual monotonic clock: each call returns the current time in
/// nanoseconds (arbitrary epoch, must never go backwards).
///
/// The timers ([`Pit`], [`Lapic`]) read it at every guest register access so
/// that counters decrease with (virtual) time.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The shortest interval between two interrupts of a periodic timer (PIT channel 0 in modes
/// 2/3, the LAPIC timer in periodic mode), in ns: 200 µs, KVM's `min_timer_period_us`
/// default for the same two timers. A guest may program a shorter period (down to 1 ns on
/// the LAPIC); its counter still reads on the programmed grid, but interrupts come on a grid
/// of this period, so a hostile guest cannot make the host wake up more often than 5000
/// times a second through a timer (missed expirations are coalesced, as always).
pub const MIN_PERIODIC_TIMER_NS: u64 = 200_000;

/// A device state given to `restore` is malformed (a corrupt or foreign
/// snapshot).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("invalid device state: {field}: {reason}")]
pub struct StateError {
    /// The offending field, as a path from the device (e.g. `pit.channels[2].mode`).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl StateError {
    /// Returns `Err(StateError)` for `field` with `reason` unless `ok`.
    pub(crate) fn check(ok: bool, field: impl Into<String>, reason: impl Into<String>) -> Result<(), StateError> {
        if ok {
            Ok(())
        } else {
            Err(StateError { field: field.into(), reason: reason.into() })
        }
    }
}

/// Errors returned by this crate.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The range `[base, base + len)` overlaps a range already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// First address (port or guest-physical address) of the rejected range.
        base: u64,
        /// Length of the rejected range, in ports or bytes.
        len: u64,
    },
    /// The range is empty or wraps around the end of the address space.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// First address of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

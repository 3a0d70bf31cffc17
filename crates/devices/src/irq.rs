//! Interrupt lines driven by devices.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// An interrupt request line that a device drives.
///
/// `level == true` asserts the line.  Level-triggered devices hold it
/// asserted while their interrupt condition is pending; edge-triggered
/// (ISA-style) devices signal an event with [`IrqLine::pulse`], i.e.
/// `set_level(true)` immediately followed by `set_level(false)`.
///
/// Implementations must not call back into the device that drives them
/// (the device may hold its own lock while raising the line).
pub trait IrqLine: Send + Sync {
    /// Sets the electrical state of the line (`true` = asserted).
    fn set_level(&self, level: bool);

    /// Signals one edge-triggered interrupt: assert, then deassert.
    fn pulse(&self) {
        self.set_level(true);
        self.set_level(false);
    }
}

/// An unconnected interrupt line: every call is ignored.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoIrq;

impl IrqLine for NoIrq {
    fn set_level(&self, _level: bool) {}
}

/// An interrupt line that records its state, for tests and for polling-style
/// consumers: the current level and the number of rising edges seen so far.
#[derive(Debug, Default)]
pub struct RecordingIrq {
    level: AtomicBool,
    rising_edges: AtomicU64,
}

impl RecordingIrq {
    /// Creates a deasserted line with no edges recorded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Current level of the line (`true` = asserted).
    pub fn level(&self) -> bool {
        self.level.load(Ordering::SeqCst)
    }

    /// Number of low→high transitions since creation or the last
    /// [`RecordingIrq::take_edges`].
    pub fn edges(&self) -> u64 {
        self.rising_edges.load(Ordering::SeqCst)
    }

    /// Returns the number of rising edges recorded and resets it to zero.
    pub fn take_edges(&self) -> u64 {
        self.rising_edges.swap(0, Ordering::SeqCst)
    }
}

impl IrqLine for RecordingIrq {
    fn set_level(&self, level: bool) {
        let old = self.level.swap(level, Ordering::SeqCst);
        if level && !old {
            self.rising_edges.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Where a device's message-signalled interrupts go (PCI 3.0 §6.8): on `emu` the userspace
/// LAPIC, on KVM `KVM_SIGNAL_MSI`.
pub trait MsiSink: Send + Sync {
    /// Sends the MSI with message address `addr` (0xFEEx_xxxx on x86) and data `data`.
    fn send_msi(&self, addr: u64, data: u32);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_counts_rising_edges() {
        let l = RecordingIrq::new();
        l.pulse();
        l.set_level(true);
        l.set_level(true);
        assert!(l.level());
        assert_eq!(l.take_edges(), 2);
        assert_eq!(l.edges(), 0);
        NoIrq.pulse();
    }
}

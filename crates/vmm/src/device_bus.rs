//! Where a vCPU's exits go: the port I/O and MMIO buses of the VM's devices, with per-vCPU
//! exit counters. Shared by the VM builder (`vm`) and the vCPU threads (`vstate`), so that
//! neither imports the other's internals.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use accel::ExitHandler;
use devices::{MmioBus, PioBus};

/// The bus a vCPU's exits go to: port I/O and MMIO devices.
#[derive(Clone)]
pub struct DeviceBus {
    pio: Arc<PioBus>,
    mmio: Arc<MmioBus>,
    pub(crate) exits: Arc<ExitCounts>,
}

/// One vCPU's exits by kind (reported by the API's `vm.counters`).
#[derive(Debug, Default)]
pub struct ExitCounts {
    /// Port I/O reads (`IN`).
    pub pio_read: AtomicU64,
    /// Port I/O writes (`OUT`).
    pub pio_write: AtomicU64,
    /// MMIO loads.
    pub mmio_read: AtomicU64,
    /// MMIO stores.
    pub mmio_write: AtomicU64,
    /// Halts seen by the VMM (KVM without in-kernel HLT handling).
    pub hlt: AtomicU64,
    /// Returns to the VMM with nothing to do (time slices, signals, pause requests).
    pub interrupted: AtomicU64,
}

impl ExitCounts {
    /// `(kind, count)` pairs.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("pio_read", l(&self.pio_read)),
            ("pio_write", l(&self.pio_write)),
            ("mmio_read", l(&self.mmio_read)),
            ("mmio_write", l(&self.mmio_write)),
            ("hlt", l(&self.hlt)),
            ("interrupted", l(&self.interrupted)),
        ]
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

impl DeviceBus {
    /// A bus over `pio` and `mmio`, with fresh exit counters.
    pub(crate) fn new(pio: PioBus, mmio: MmioBus) -> DeviceBus {
        DeviceBus { pio: Arc::new(pio), mmio: Arc::new(mmio), exits: Arc::default() }
    }

    /// Counts a return from `run` with nothing to do.
    pub(crate) fn count_interrupted(&self) {
        bump(&self.exits.interrupted);
    }

    /// Counts a halt the VMM saw.
    pub(crate) fn count_hlt(&self) {
        bump(&self.exits.hlt);
    }

    /// A bus with no devices (tests).
    #[cfg(test)]
    pub(crate) fn detached() -> DeviceBus {
        DeviceBus { pio: Arc::new(PioBus::new()), mmio: Arc::new(MmioBus::new()), exits: Arc::default() }
    }
}

impl ExitHandler for DeviceBus {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        bump(&self.exits.pio_read);
        if !self.pio.read(port, data) {
            data.fill(0xff);
        }
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        bump(&self.exits.pio_write);
        let _ = self.pio.write(port, data);
    }
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        bump(&self.exits.mmio_read);
        if !self.mmio.read(gpa, data) {
            data.fill(0xff);
        }
    }
    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
        bump(&self.exits.mmio_write);
        let _ = self.mmio.write(gpa, data);
    }
}

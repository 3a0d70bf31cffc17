//! The VM side of the seam: [`Vm`], what it is made from ([`VmSpec`]) and its saved state
//! ([`VmState`]).

use std::sync::Arc;

use devices::{IrqLine, MsiSink};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::{emu, kvm, Choice, Clock, RamRegion, Result, Vcpu};

/// Reports guest RAM written by devices (DMA) since the last call, as `(GPA, length in
/// bytes)` ranges; see [`Vm::needs_dma_log`]. Must be cheap when nothing was written.
pub type DeviceWrites = Arc<dyn Fn() -> Vec<(u64, u64)> + Send + Sync>;

/// What a [`crate::Hypervisor`] builds a [`Vm`] from.
#[derive(Clone)]
pub struct VmSpec<'a> {
    /// Guest RAM, as mappings the VMM allocated: they must stay mapped for as long as the
    /// VM or any of its vCPUs exists. Each region must be non-empty and 4 KiB aligned (GPA,
    /// size and host address).
    pub ram: &'a [RamRegion],
    /// The guest clock (the VMM's pausable clock). Engines with userspace timers (the
    /// emulator's PIT, LAPIC timer and TSC) run on it; KVM keeps its own (kvmclock, part of
    /// [`VmState`]).
    pub clock: Clock,
    /// vCPUs the VM will have (1 or more; ids 0..cpus): the emulator builds one LAPIC per
    /// vCPU; KVM creates them one by one and ignores it.
    pub cpus: u8,
}

/// One virtual machine of an accelerator: guest RAM registered, interrupt controllers
/// created. Everything the VMM wires devices to goes through here, so the VMM never names
/// the engine.
///
/// Interrupt inputs are GSIs `0..24`: ISA IRQs 0-15 (to the PIC and the IOAPIC, ISA IRQ 0 on
/// IOAPIC pin 2 as on a PC) and IOAPIC pins 16-23.
pub trait Vm: Send + Sync {
    /// Creates vCPU `id` (its initial APIC ID), at the architectural reset state plus what
    /// the engine sets up for boot; load registers with [`Vcpu::set_state`] before running.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Unsupported`] for an id the engine cannot run (the emulator runs one
    /// vCPU); the engine's error when creating it fails.
    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu + Send>>;

    /// The interrupt input `gsi` (`0..24`), for a device to drive: level-triggered devices
    /// hold it, edge-triggered ones pulse it.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Unsupported`] for a GSI out of range or a VM without interrupt
    /// controllers.
    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>>;

    /// Where message-signalled interrupts go (PCI MSI/MSI-X): address 0xFEEx_xxxx, data
    /// with the vector and delivery mode (Intel SDM Vol. 3 §11.11).
    fn msi_sink(&self) -> Arc<dyn MsiSink>;

    /// Whether [`Vm::register_ioevent`] is offered: guest writes to a registered address
    /// then signal the eventfd without leaving the engine. Without it those writes reach the
    /// VMM's [`crate::ExitHandler`] like any MMIO store.
    fn supports_ioevents(&self) -> bool;

    /// Makes guest stores of any width to MMIO GPA `gpa` signal `evt` instead of exiting.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Unsupported`] where [`Vm::supports_ioevents`] is false; the engine's
    /// error when the registration fails.
    fn register_ioevent(&self, evt: &EventFd, gpa: u64) -> Result<()>;

    /// Undoes [`Vm::register_ioevent`] for the same `evt` and `gpa`.
    ///
    /// # Errors
    ///
    /// As [`Vm::register_ioevent`].
    fn unregister_ioevent(&self, evt: &EventFd, gpa: u64) -> Result<()>;

    /// Whether the engine must hear about guest RAM written by devices (DMA): the emulator
    /// caches decoded code by physical address and must retire code on pages a device
    /// wrote. When false, the VMM need not record device writes at all.
    fn needs_dma_log(&self) -> bool;

    /// Gives the engine the source of device writes (see [`Vm::needs_dma_log`]). The first
    /// call counts, later ones are ignored; vCPUs created before it see it too. Engines that
    /// do not need it drop `source`.
    fn set_device_writes(&self, source: DeviceWrites);

    /// How the VMM's firmware tables should describe the interrupt controllers (see
    /// [`IrqTables`]).
    fn irq_tables(&self) -> IrqTables;

    /// Saves the VM-level state the engine keeps outside guest RAM and the vCPUs
    /// (interrupt controllers, timers, clocks). Call it while no vCPU runs.
    ///
    /// # Errors
    ///
    /// The engine's error when reading the state fails.
    fn save_state(&self) -> Result<VmState>;

    /// Loads a state from [`Vm::save_state`] of the same engine into this (new) VM, before
    /// its vCPUs' states are restored.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Unsupported`] for another engine's state;
    /// [`crate::Error::InvalidState`] for a malformed one (this VM is then unchanged); the
    /// engine's error when loading fails.
    fn restore_state(&self, state: &VmState) -> Result<()>;
}

/// How the guest's firmware tables describe a [`Vm`]'s interrupt controllers
/// ([`Vm::irq_tables`]): the tables decide whether the guest runs in symmetric I/O mode (MP
/// spec §3.6.2.3: every vCPU's local APIC and the IOAPIC, legacy interrupts through the
/// IOAPIC) and so whether Linux uses the local APIC timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqTables {
    /// None: the guest finds no local APIC configuration and stays in PIC virtual-wire mode,
    /// with the PIT as its only timer (an engine without interrupt controllers).
    None,
    /// An MP table (MP spec 1.4): every vCPU's local APIC and the IOAPIC, ISA IRQ n on
    /// IOAPIC pin n — KVM's in-kernel irqchip. (Kernels built without
    /// `CONFIG_X86_MPPARSE`, such as Debian's, ignore it.)
    MpTable,
    /// An ACPI MADT: every vCPU's local APIC, the IOAPIC, and ISA IRQ 0 on GSI 2 (an
    /// interrupt source override, as on a PC) — the emulator's irqchip.
    Madt,
}

/// A [`Vm`]'s saved VM-level state: opaque to the VMM, which stores it (serde) and hands it
/// back to [`Vm::restore_state`]. Serialized as `{"<engine>/<version>": {...}}`, so a
/// file says which engine and which layout wrote it, and a new layout is a new variant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VmState(pub(crate) VmStateRepr);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum VmStateRepr {
    /// The emulator's userspace irqchip, layout 1 (one vCPU; read as layout 2 without the
    /// application processors' parts).
    #[serde(rename = "emu/1")]
    Emu1(Box<emu::EmuVmState>),
    /// The emulator's userspace irqchip, layout 2: one LAPIC and pending start-up IPIs per
    /// vCPU.
    #[serde(rename = "emu/2")]
    Emu2(Box<emu::EmuVmState>),
    /// KVM's in-kernel irqchip, PIT and clock, layout 1.
    #[serde(rename = "kvm/1")]
    Kvm1(Box<kvm::KvmVmState>),
}

impl VmState {
    /// The engine that saved it, as a [`Choice`] that selects that engine again (restore
    /// uses it to pick the hypervisor).
    pub fn engine(&self) -> Choice {
        match self.0 {
            VmStateRepr::Emu1(_) | VmStateRepr::Emu2(_) => Choice::Emu,
            VmStateRepr::Kvm1(_) => Choice::Kvm,
        }
    }

    /// The earliest guest clock reading (ns) this state can continue from: the latest time
    /// its timers refer to (the emulator's PIT and LAPIC start times; 0 for KVM, whose
    /// kvmclock is part of the state). A clock restored earlier would make the guest's timers
    /// wait out the difference.
    pub fn earliest_clock_ns(&self) -> u64 {
        match &self.0 {
            VmStateRepr::Emu1(s) | VmStateRepr::Emu2(s) => s.irqchip.latest_timer_ns(),
            VmStateRepr::Kvm1(_) => 0,
        }
    }

    /// The layout version within its engine.
    pub fn version(&self) -> u32 {
        match self.0 {
            VmStateRepr::Emu1(_) | VmStateRepr::Kvm1(_) => 1,
            VmStateRepr::Emu2(_) => 2,
        }
    }
}

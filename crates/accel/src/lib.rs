//! The accelerator seam: everything the VMM needs from the engine that runs guest code,
//! behind three traits (Cloud Hypervisor's `hypervisor` crate is the model).
//!
//! - [`Hypervisor`]: one engine on this host. [`select`] picks it from the user's
//!   [`Choice`] (`auto` included, with the reason) and gives a `Box<dyn Hypervisor>`;
//!   [`Hypervisor::name`] is the accelerator's name for the user ("kvm", "emu").
//! - [`Vm`]: one virtual machine of that engine, made by [`Hypervisor::create_vm`] over the
//!   guest RAM the VMM allocated ([`VmSpec`]). It owns the memory registration, the
//!   interrupt controllers and the ways into them ([`Vm::irq_line`], [`Vm::msi_sink`]),
//!   ioeventfd registration ([`Vm::register_ioevent`]), what the engine needs to hear about
//!   device DMA ([`Vm::needs_dma_log`]) and an opaque, versioned save/restore of its
//!   VM-level state ([`VmState`]).
//! - [`Vcpu`]: one virtual CPU, made by [`Vm::create_vcpu`]; it runs guest code and hands
//!   port I/O and MMIO it cannot complete to the VMM's [`ExitHandler`].
//!
//! Two engines implement them: [`kvm`] (hardware virtualization through `/dev/kvm`, rust-vmm
//! `kvm-ioctls`, with the in-kernel irqchip and PIT, MSIs through irqfds and GSI routes) and
//! [`emu`] (rustvisor's own x86-64 interpreter, `x86emu`, with the userspace PIC, IOAPIC,
//! LAPIC and PIT of `devices` as its irqchip). Both start from the same architectural
//! register state ([`CpuState`]), so the VMM and the device models never know which runs.
//! The concrete engine types stay public for tests and tools that need engine-specific
//! facilities.

pub mod emu;
mod hypervisor;
pub mod kvm;
pub mod state;
mod vcpu;
mod vm;

pub use devices::{Clock, IrqLine, MsiSink};
pub use hypervisor::{select, usable_engines, Choice, Hypervisor, SelectOptions, Selection};
pub use state::{CpuState, Segment, Table};
pub use vcpu::{ExitHandler, Vcpu, VcpuExit, VcpuSnapshot, VcpuStopper};
pub use vm::{DeviceWrites, IrqTables, Vm, VmSpec, VmState};
pub use vmm_sys_util::eventfd::EventFd;

/// One contiguous block of guest RAM mapped into the VMM. Defined in `x86emu` (the lowest
/// crate that needs it) and shared by both engines: KVM registers it as a memory slot, the
/// emulator's MMU maps it.
pub use x86emu::RamRegion;

/// Errors from the accelerators.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` could not be opened or an ioctl failed.
    #[error("kvm: {0}")]
    Kvm(String),
    /// The accelerator cannot run this guest (e.g. a KVM internal emulation error).
    #[error("accelerator failure: {0}")]
    Internal(String),
    /// A configuration the accelerator does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The requested accelerator cannot run on this host (the message says why and what is
    /// accepted instead).
    #[error("{0}")]
    Unavailable(String),
    /// A saved state given to a restore is malformed; `what` names the part ("irqchip",
    /// "vCPU"), the source names the bad field.
    #[error("invalid {what} state: {source}")]
    InvalidState {
        /// The part of the state that was refused.
        what: &'static str,
        /// The validation error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

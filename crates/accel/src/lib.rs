//! vCPU engines behind one interface.
//!
//! Two accelerators run guest code: [`kvm`] (hardware virtualization through `/dev/kvm`,
//! rust-vmm `kvm-ioctls`) and [`emu`] (rustvisor's own x86-64 interpreter, `x86emu`).
//! Both take guest RAM as host mappings ([`RamRegion`]), start from the same architectural
//! register state ([`CpuState`]) and hand port I/O and MMIO to the same [`ExitHandler`], so
//! device models never know which one runs.

pub mod emu;
pub mod kvm;
pub mod state;

pub use state::{CpuState, Segment, Table};

/// One contiguous block of guest RAM mapped into the VMM.
#[derive(Clone, Copy, Debug)]
pub struct RamRegion {
    /// Guest physical address (GPA) of the first byte.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address of the first byte; valid for `size` bytes for the VM's lifetime.
    pub host_addr: *mut u8,
}

// SAFETY: a RamRegion is a plain description of a mapping that outlives the VM; the mapping
// itself is shared guest memory that the guest may change at any time, so no Rust aliasing
// guarantees are claimed for it by any user of this type.
unsafe impl Send for RamRegion {}
// SAFETY: see the `Send` impl above: the type holds no thread-affine state.
unsafe impl Sync for RamRegion {}

/// What the VMM does with guest port I/O and MMIO accesses that leave the accelerator.
///
/// `data.len()` is the access size in bytes (1, 2, 4 or 8). Reads must fill all of `data`;
/// unclaimed addresses read as all ones, like an empty bus.
pub trait ExitHandler {
    /// `in` from I/O port `port`.
    fn pio_read(&mut self, port: u16, data: &mut [u8]);
    /// `out` to I/O port `port`.
    fn pio_write(&mut self, port: u16, data: &[u8]);
    /// Load from a GPA that is not RAM.
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]);
    /// Store to a GPA that is not RAM.
    fn mmio_write(&mut self, gpa: u64, data: &[u8]);
}

/// Why [`Vcpu::run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExit {
    /// The vCPU executed `hlt` (only reported by engines without an in-kernel irqchip, or
    /// with interrupts disabled so that nothing can wake it).
    Hlt,
    /// The guest requested a system reset (triple fault, i8042 pulse reported by the VMM).
    Reset(String),
    /// The guest turned itself off.
    Shutdown,
    /// The run was interrupted from outside (e.g. [`Vcpu::run`] budget used up, a signal);
    /// call `run` again.
    Interrupted,
}

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
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// One virtual CPU of either accelerator.
pub trait Vcpu {
    /// Loads the architectural register state (used at boot and restore).
    fn set_state(&mut self, state: &CpuState) -> Result<()>;
    /// Reads back the architectural register state.
    fn state(&mut self) -> Result<CpuState>;
    /// Runs guest code until something the VMM must act on happens. Port I/O and MMIO are
    /// completed through `handler` inside the call.
    fn run(&mut self, handler: &mut dyn ExitHandler) -> Result<VcpuExit>;
    /// Everything needed to continue this vCPU elsewhere (a snapshot); call it only while
    /// the vCPU is not running.
    fn save_snapshot(&mut self) -> Result<VcpuSnapshot>;
    /// Loads a state saved by [`Vcpu::save_snapshot`] on the same accelerator.
    ///
    /// Errors: [`Error::Unsupported`] for another accelerator's state, or the state's own
    /// validation error naming the bad field.
    fn restore_snapshot(&mut self, state: &VcpuSnapshot) -> Result<()>;
}

/// A vCPU's snapshot state, per accelerator.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum VcpuSnapshot {
    /// The emulator's CPU.
    Emu(Box<emu::EmuVcpuState>),
    /// A KVM vCPU.
    Kvm(Box<kvm::KvmVcpuState>),
}

//! The per-VM monitor: guest memory, the Linux boot protocols, legacy devices and the vCPU
//! run loop over either accelerator (`kvm` or `emu`).

pub mod arch;
pub mod backup;
pub mod clock;
pub mod config;
pub mod console_mux;
pub mod controller;
pub mod device_bus;
pub mod host_files;
pub mod ksm;
pub mod memory;
pub mod panic_policy;
pub mod persist;
pub mod terminal;
pub mod virtio_devices;
pub mod vm;
pub mod vstate;

pub use config::{
    Accel, BalloonConfig, ConsoleOut, DiskConfig, DiskErrorPolicy, DiskFormat, MacAddr, MemoryOptions, NetConfig,
    VmConfig, VsockConfig,
};
pub use vm::{RunOutcome, Vm};

use std::path::PathBuf;

/// Errors of the VMM library. Each names the offending input so the CLI can print one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range or malformed.
    #[error("{field}: {msg}")]
    Config {
        /// The field, as the command line spells it (`--memory`, `--disk`, ...).
        field: &'static str,
        /// What is wrong with it, and what is accepted.
        msg: String,
    },
    /// Reading a kernel or initrd file failed.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: String,
        /// The host error.
        #[source]
        err: std::io::Error,
    },
    /// The kernel image could not be loaded by linux-loader.
    #[error("kernel: {}: not a loadable {format}: {source}", path.display())]
    Kernel {
        /// The kernel file.
        path: PathBuf,
        /// The format it was loaded as (`bzImage` or `ELF vmlinux`).
        format: &'static str,
        /// The loader's error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The kernel image failed one of rustvisor's own checks.
    #[error("kernel: {}: {problem}", path.display())]
    KernelImage {
        /// The kernel file.
        path: PathBuf,
        /// What is wrong with it.
        problem: KernelProblem,
    },
    /// Guest memory could not be written.
    #[error("guest memory: {what}: {source}")]
    Memory {
        /// What was being written (`command line`, `zero page`, `ACPI tables`, ...).
        what: &'static str,
        /// The guest memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Guest memory could not be allocated.
    #[error("guest memory: {0}")]
    MemoryAlloc(#[source] vm_memory::mmap::FromRangesError),
    /// A boot table has more entries than its format can count.
    #[error("guest memory: {what} has {len} entries, more than its table can hold")]
    TableTooLong {
        /// The table (`e820 map`, ...).
        what: &'static str,
        /// Its number of entries.
        len: usize,
    },
    /// The accelerator failed.
    #[error(transparent)]
    Accel(#[from] accel::Error),
    /// A vCPU stopped the run.
    #[error(transparent)]
    Vcpu(#[from] vstate::VcpuError),
    /// A device could not be placed on its bus.
    #[error("device: {name}: {source}")]
    Device {
        /// The device (`serial`, `i8042`, `pci`, ...).
        name: &'static str,
        /// The bus error.
        #[source]
        source: devices::Error,
    },
    /// A device could not be created because of a host error.
    #[error("device: {name}: {source}")]
    DeviceIo {
        /// The device (`virtio-console`, ...).
        name: String,
        /// The host error.
        #[source]
        source: std::io::Error,
    },
    /// There is no room left for a device.
    #[error("device: {name}: {space} is full")]
    DeviceSpace {
        /// The device (`console`, `rng`, ...).
        name: String,
        /// What is full (`PCI MMIO window`, `PCI bus 0 (32 slots)`).
        space: &'static str,
    },
    /// A vCPU thread could not be created.
    #[error("device: vCPU {id} thread: {source}")]
    VcpuThread {
        /// The vCPU's index.
        id: usize,
        /// The host error.
        #[source]
        source: std::io::Error,
    },
}

/// A check rustvisor makes on a kernel image that the image failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelProblem {
    /// Neither a bzImage nor an ELF file.
    #[error("not a kernel (neither a bzImage nor an ELF vmlinux)")]
    NotAKernel,
    /// A bzImage whose loader result carries no setup header.
    #[error("bzImage without setup header")]
    NoSetupHeader,
    /// A bzImage shorter than its header says.
    #[error("truncated bzImage: {len} bytes, its header says {want}")]
    Truncated {
        /// The file's length in bytes.
        len: u64,
        /// The length the setup header promises (setup sectors, then `syssize` paragraphs).
        want: u64,
    },
    /// A bzImage without the 64-bit entry point.
    #[error("boot protocol {version:#x} has no 64-bit entry (need 2.12+ with XLF_KERNEL_64)")]
    No64BitEntry {
        /// The boot protocol version in the setup header.
        version: u16,
        /// The header's `xloadflags`.
        xloadflags: u16,
    },
    /// An ELF kernel without a Xen PVH entry note.
    #[error("ELF kernel has no PVH entry note")]
    NoPvhNote,
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

//! The per-VM monitor: guest memory, the Linux boot protocols, legacy devices and the vCPU
//! run loop over either accelerator (`kvm` or `emu`).

pub mod arch;
pub mod clock;
pub mod config;
pub mod controller;
pub mod device_bus;
pub mod host_files;
pub mod memory;
pub mod panic_policy;
pub mod persist;
pub mod virtio_devices;
pub mod vm;
pub mod vstate;

pub use config::{Accel, ConsoleOut, DiskConfig, DiskFormat, MacAddr, NetConfig, VmConfig, VsockConfig};
pub use vm::{RunOutcome, Vm};

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
    /// The kernel image could not be loaded.
    #[error("kernel: {0}")]
    Kernel(String),
    /// Guest memory could not be set up or written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The accelerator failed.
    #[error(transparent)]
    Accel(#[from] accel::Error),
    /// A device could not be set up.
    #[error("device: {0}")]
    Device(String),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

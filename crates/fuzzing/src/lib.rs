//! The bodies of rustvisor's fuzz targets, as ordinary library code that builds on stable.
//!
//! `fuzz/` (a cargo-fuzz workspace of its own, built with nightly and libFuzzer) wraps each
//! function of [`TARGETS`] in a one-line `fuzz_target!`; `tests/corpus.rs` replays every
//! checked-in corpus file of every target through the same function on stable, as part of
//! `cargo test --workspace`. Each target treats its input as hostile guest or user data: the
//! function returns normally for any input, and a panic, an abort, a hang or an unbounded
//! allocation in the code under test is the bug a fuzzer reports.
//!
//! Targets (input layouts are in each module's documentation):
//!
//! | target | what it feeds |
//! |---|---|
//! | `virtio_blk`, `virtio_net`, `virtio_vsock`, `virtio_rng`, `virtio_console`, `virtio_balloon` | a guest memory image with split virtqueues, descriptor chains and request bytes, then queue kicks and host-side events ([`virtio_dev`]) |
//! | `virtio_pci` | PCI config space (conf1 ports), BAR 0 (common config, notify, ISR, device config, MSI-X table and PBA) accesses to a virtio-pci function, with transport save/restore ([`virtio_pci`]) |
//! | `legacy_devices` | port and MMIO accesses to the serial port, i8042, CMOS/RTC, PIT, PIC, IOAPIC, LAPIC, ACPI PM and PCI conf1, with time passing ([`legacy`]) |
//! | `x86emu` | arbitrary code and data run by the emulator in a small real-, protected- or long-mode machine ([`emu`]) |
//! | `api_vmm`, `api_daemon` | VMM and daemon REST bodies, routes, queries and command-line device options ([`api`]) |
//! | `snapshot` | a VMM snapshot's `snapshot.json` and memory runs, restored into an emu VM and its devices ([`snapshot`]) |
//! | `kernel_loader` | a kernel image (bzImage or ELF) and an initrd loaded into guest memory ([`loader`]) |
//! | `qcow2` | a disk image file opened by the block layer, then read and written ([`qcow2`]) |

#![deny(clippy::indexing_slicing, clippy::unwrap_used)]

pub mod api;
pub mod emu;
pub mod legacy;
pub mod loader;
pub mod qcow2;
pub mod seeds;
pub mod snapshot;
pub mod virtio_dev;
pub mod virtio_pci;

use std::path::PathBuf;
use std::sync::OnceLock;

/// A fuzz target's body: runs one input.
pub type Body = fn(&[u8]);

/// Every fuzz target: its name (the `fuzz/fuzz_targets/<name>.rs` file and the
/// `fuzz/corpus/<name>/` folder), the path of its body in this crate (which that file calls)
/// and the body.
pub const TARGETS: &[(&str, &str, Body)] = &[
    ("virtio_blk", "virtio_dev::blk", virtio_dev::blk),
    ("virtio_net", "virtio_dev::net", virtio_dev::net),
    ("virtio_vsock", "virtio_dev::vsock", virtio_dev::vsock),
    ("virtio_rng", "virtio_dev::rng", virtio_dev::rng),
    ("virtio_console", "virtio_dev::console", virtio_dev::console),
    ("virtio_balloon", "virtio_dev::balloon", virtio_dev::balloon),
    ("virtio_pci", "virtio_pci::run", virtio_pci::run),
    ("legacy_devices", "legacy::run", legacy::run),
    ("x86emu", "emu::run", emu::run),
    ("api_vmm", "api::vmm", api::vmm),
    ("api_daemon", "api::daemon", api::daemon),
    ("snapshot", "snapshot::run", snapshot::run),
    ("kernel_loader", "loader::run", loader::run),
    ("qcow2", "qcow2::run", qcow2::run),
];

/// The body of target `name`, if there is one.
pub fn target(name: &str) -> Option<Body> {
    TARGETS.iter().find(|(n, _, _)| *n == name).map(|(_, _, f)| *f)
}

/// A folder of this process's own for the files a target needs (disk images, sockets,
/// snapshot folders): under `/dev/shm` when it exists (no disk I/O per execution), else the
/// temporary folder. Made once per process; left behind when the process ends (a fuzzer is
/// killed rather than ended), so it is small and named by process id.
pub fn scratch_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base =
            if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = base.join(format!("rustvisor-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        dir
    })
    .clone()
}

/// Reads an input front to back; past its end every read gives zeros (so any input is a
/// valid one).
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    /// The next byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        let (&b, rest) = self.data.split_first().unwrap_or((&0, &[]));
        self.data = rest;
        b
    }

    /// The next 2 bytes, little-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// The next 4 bytes, little-endian.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// The next 8 bytes, little-endian.
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// The next `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.data.split_at(n.min(self.data.len()));
        self.data = b;
        a
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

//! The validated description of one VM.

use std::path::PathBuf;

/// Which vCPU engine runs the guest: `auto`, `kvm` or `emu` (the choice type of the
/// accelerator seam, which also decides what `auto` means on this host).
pub use accel::Choice as Accel;

/// Where the 8250 console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialOut {
    /// The terminal: stdout for output, stdin for input.
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Discarded.
    Null,
}

/// Everything needed to build a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// bzImage or ELF vmlinux path.
    pub kernel: PathBuf,
    /// Optional initramfs path.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM size in bytes.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub cpus: u8,
    /// Accelerator choice.
    pub accel: Accel,
    /// Console destination.
    pub serial: SerialOut,
    /// virtio-blk disks, in PCI slot order.
    pub disks: Vec<crate::DiskConfig>,
    /// virtio-net NICs.
    pub nets: Vec<crate::NetConfig>,
    /// The virtio-vsock device.
    pub vsock: Option<crate::VsockConfig>,
    /// Whether to add a virtio-rng device (entropy from the host's getrandom).
    pub rng: bool,
    /// The virtio-console (the guest's /dev/hvc0): where its output goes (and, for `Stdio`,
    /// where its input comes from); `None` = no virtio-console.
    pub console: Option<SerialOut>,
}

/// Most virtio PCI devices one VM may have (bus 0 has 32 slots; slot 0 is the host bridge).
pub const MAX_PCI_DEVICES: usize = 31;

/// Smallest guest RAM accepted, in bytes.
pub const MIN_MEM: u64 = 16 << 20;

/// Parses a memory size such as "512M", "1G", "65536K" or a plain byte count.
///
/// Returns an error naming the accepted forms for anything else.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| {
        format!("'{s}' is not a size (accepted: a number with an optional K, M or G suffix, e.g. 512M)")
    })?;
    n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too large"))
}

/// Host physical memory in bytes (from sysconf).
pub fn host_memory() -> u64 {
    // SAFETY: sysconf only reads system configuration values.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let psize = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if pages <= 0 || psize <= 0 {
        return u64::MAX;
    }
    (pages as u64).saturating_mul(psize as u64)
}

impl VmConfig {
    /// Checks ranges; returns `Error::Config` naming the field and the accepted range.
    pub fn validate(&self) -> crate::Result<()> {
        let host = host_memory();
        if self.mem_size < MIN_MEM || self.mem_size > host {
            return Err(crate::Error::Config {
                field: "--memory",
                msg: format!(
                    "{} bytes is out of range (accepted: {} MiB up to the host's {} MiB)",
                    self.mem_size,
                    MIN_MEM >> 20,
                    host >> 20
                ),
            });
        }
        if !self.mem_size.is_multiple_of(4096) {
            return Err(crate::Error::Config {
                field: "--memory",
                msg: format!("{} bytes is not a whole number of 4 KiB pages (e.g. 512M)", self.mem_size),
            });
        }
        if self.cpus == 0 {
            return Err(crate::Error::Config { field: "--cpus", msg: "must be at least 1".into() });
        }
        if !self.kernel.is_file() {
            return Err(crate::Error::Config {
                field: "--kernel",
                msg: format!("{}: no such file", self.kernel.display()),
            });
        }
        if let Some(i) = &self.initrd {
            if !i.is_file() {
                return Err(crate::Error::Config { field: "--initrd", msg: format!("{}: no such file", i.display()) });
            }
        }
        for (i, d) in self.disks.iter().enumerate() {
            if !d.path.is_file() {
                return Err(crate::Error::Config {
                    field: "--disk",
                    msg: format!("{}: no such file", d.path.display()),
                });
            }
            let canon = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            if self.disks[..i].iter().any(|o| canon(&o.path) == canon(&d.path)) {
                return Err(crate::Error::Config {
                    field: "--disk",
                    msg: format!("{}: given twice (each image may back one disk)", d.path.display()),
                });
            }
        }
        for (i, n) in self.nets.iter().enumerate() {
            if self.nets[..i].iter().any(|o| o.tap == n.tap) {
                return Err(crate::Error::Config { field: "--net", msg: format!("tap {}: given twice", n.tap) });
            }
        }
        if self.console == Some(SerialOut::Stdio) && self.serial == SerialOut::Stdio {
            return Err(crate::Error::Config {
                field: "--console",
                msg: "stdio is taken by --serial stdio (accepted: one of --serial/--console on stdio; e.g. --serial null)"
                    .into(),
            });
        }
        let devices = usize::from(self.console.is_some())
            + self.disks.len()
            + self.nets.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.rng);
        if devices > MAX_PCI_DEVICES {
            return Err(crate::Error::Config {
                field: "--disk/--net",
                msg: format!("{devices} PCI devices requested (accepted: at most {MAX_PCI_DEVICES})"),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }
}

//! The VM configuration and its one validation.
//!
//! [`VmConfig`] comes from `api-types`: the same typed description of a VM is built by
//! `rustvisor run`'s flags, received by the VMM API, stored in snapshots and by the host
//! manager. Its enumerations are checked while parsing; [`validate`] checks everything else
//! (ranges, names, files on the host, combinations), once, for every path a VM is built by.
//! Errors name the field as the command line spells it (`--memory`); the API controller maps
//! that to the JSON field.

use std::path::Path;

pub use api_types::{
    Accel, BalloonConfig, ConsoleOut, DiskConfig, DiskErrorPolicy, DiskFormat, MacAddr, MemoryOptions, NetConfig,
    VmConfig, VsockConfig, MAX_STATS_INTERVAL_S, SERIAL_MAX,
};

use crate::{Error, Result};

/// Most virtio PCI devices one VM may have (bus 0 has 32 slots; slot 0 is the host bridge).
pub const MAX_PCI_DEVICES: usize = 31;

/// Smallest guest RAM accepted, in MiB (the kernel loader then checks what the kernel needs).
pub const MIN_MEM_MIB: u64 = 16;

/// Most vCPUs a VM may have (the MP table's APIC IDs, the IOAPIC taking the next one).
pub const MAX_CPUS: u8 = 64;

/// Why `--console socket=...` is refused (the virtio-console has no socket mode).
pub const CONSOLE_SOCKET_REFUSED: &str = "socket= is for --serial only (accepted: stdio, file=PATH, null)";

/// Longest Unix socket path, in bytes (`sun_path` less its NUL).
pub const SOCKET_PATH_MAX: usize = 107;

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// Why a memory size was refused ([`parse_size`]); the message names the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a number with an optional K, M or G suffix.
    #[error("'{0}' is not a size (accepted: a number with an optional K, M or G suffix, e.g. 512M)")]
    NotASize(String),
    /// More bytes than a `u64` holds.
    #[error("'{0}' is too large")]
    TooLarge(String),
}

/// Parses a memory size such as "512M", "1G", "65536K" or a plain byte count, in bytes.
///
/// Errors: [`SizeError`].
pub fn parse_size(s: &str) -> std::result::Result<u64, SizeError> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| SizeError::NotASize(s.to_string()))?;
    n.checked_mul(mult).ok_or_else(|| SizeError::TooLarge(s.to_string()))
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

/// The accelerator seam's name for `a`.
pub fn engine(a: Accel) -> accel::Choice {
    match a {
        Accel::Auto => accel::Choice::Auto,
        Accel::Kvm => accel::Choice::Kvm,
        Accel::Emu => accel::Choice::Emu,
    }
}

/// The configuration's name for the accelerator seam's `c`.
pub fn accel_of(c: accel::Choice) -> Accel {
    match c {
        accel::Choice::Auto => Accel::Auto,
        accel::Choice::Kvm => Accel::Kvm,
        accel::Choice::Emu => Accel::Emu,
    }
}

fn config(field: &'static str, msg: String) -> Error {
    Error::Config { field, msg }
}

fn must_be_file(field: &'static str, path: &str) -> Result<()> {
    if path.is_empty() {
        return Err(config(field, "a path is required".into()));
    }
    if !Path::new(path).is_file() {
        return Err(config(field, format!("{path}: no such file")));
    }
    Ok(())
}

/// Checks `cfg` for everything its types do not: ranges, names, host files and combinations.
///
/// Errors: [`Error::Config`] naming the field (as the command line spells it) and the accepted
/// values.
pub fn validate(cfg: &VmConfig) -> Result<()> {
    let host_mib = host_memory() >> 20;
    if cfg.memory_mib < MIN_MEM_MIB || cfg.memory_mib > host_mib {
        return Err(config(
            "--memory",
            format!("{} MiB is out of range (accepted: {MIN_MEM_MIB} to the host's {host_mib} MiB)", cfg.memory_mib),
        ));
    }
    if cfg.cpus == 0 || cfg.cpus > MAX_CPUS {
        return Err(config("--cpus", format!("{} (accepted: at least 1 and at most {MAX_CPUS})", cfg.cpus)));
    }
    must_be_file("--kernel", &cfg.kernel)?;
    if let Some(i) = &cfg.initrd {
        must_be_file("--initrd", i)?;
    }
    if cfg.cmdline.len() >= crate::arch::CMDLINE_MAX {
        return Err(config(
            "--cmdline",
            format!("{} bytes is too long (accepted: up to {})", cfg.cmdline.len(), crate::arch::CMDLINE_MAX - 1),
        ));
    }
    for (i, d) in cfg.disks.iter().enumerate() {
        must_be_file("--disk", &d.path)?;
        let canon = |p: &str| std::fs::canonicalize(p).unwrap_or_else(|_| p.into());
        if cfg.disks[..i].iter().any(|o| canon(&o.path) == canon(&d.path)) {
            return Err(config("--disk", format!("{}: given twice (each image may back one disk)", d.path)));
        }
        if let Some(id) = &d.serial {
            if id.len() > SERIAL_MAX || !id.is_ascii() {
                return Err(config("--disk", format!("serial '{id}' (accepted: up to {SERIAL_MAX} ASCII characters)")));
            }
        }
    }
    for (i, n) in cfg.nets.iter().enumerate() {
        let tap = &n.tap;
        if tap.is_empty()
            || tap.len() > IFNAME_MAX
            || tap.contains(['/', ':', ',']) // ':' marks aliases
            || tap.chars().any(|c| c.is_whitespace() || c.is_control())
            || tap == "."
            || tap == ".."
        {
            return Err(config(
                "--net",
                format!("tap name '{tap}' (accepted: 1 to {IFNAME_MAX} bytes without '/', ':', ',' or whitespace)"),
            ));
        }
        if cfg.nets[..i].iter().any(|o| o.tap == n.tap) {
            return Err(config("--net", format!("tap {tap}: given twice")));
        }
    }
    if let Some(v) = &cfg.vsock {
        if !(3..=0xffff_fffe).contains(&v.cid) {
            return Err(config("--vsock", format!("cid {} (accepted: 3 to 4294967294)", v.cid)));
        }
        if v.socket.is_empty() {
            return Err(config("--vsock", "socket=PATH is required".into()));
        }
    }
    if let ConsoleOut::Socket { path, log } = &cfg.serial {
        let bytes = path.as_os_str().len();
        if bytes == 0 || bytes > SOCKET_PATH_MAX || path.as_os_str().as_encoded_bytes().contains(&b',') {
            return Err(config(
                "--serial",
                format!(
                    "socket path {} ({bytes} bytes) (accepted: 1 to {SOCKET_PATH_MAX} bytes without ',')",
                    path.display()
                ),
            ));
        }
        if log.as_ref().is_some_and(|l| l.as_os_str().is_empty()) {
            return Err(config("--serial", "log= needs a file (accepted: socket=PATH[,log=FILE])".into()));
        }
    }
    if matches!(cfg.console, Some(ConsoleOut::Socket { .. })) {
        return Err(config("--console", CONSOLE_SOCKET_REFUSED.into()));
    }
    if cfg.console == Some(ConsoleOut::Stdio) && cfg.serial == ConsoleOut::Stdio {
        return Err(config(
            "--console",
            "stdio is taken by --serial stdio (accepted: one of --serial/--console on stdio; e.g. --serial null)"
                .into(),
        ));
    }
    if let Some(b) = &cfg.balloon {
        if b.stats_interval_s > MAX_STATS_INTERVAL_S {
            return Err(config(
                "--balloon",
                format!(
                    "stats_interval_s {} (accepted: 0 (no statistics) to {MAX_STATS_INTERVAL_S} seconds)",
                    b.stats_interval_s
                ),
            ));
        }
    }
    let m = &cfg.memory_options;
    if m.hugepages && (m.mergeable || m.thp) {
        return Err(config(
            "--memory-options",
            "hugepages cannot be combined with mergeable or thp (KSM does not merge hugetlbfs pages, and they \
             are huge already) (accepted: hugepages alone, or mergeable and/or thp)"
                .into(),
        ));
    }
    if m.hugepages && !cfg.memory_mib.is_multiple_of(2) {
        return Err(config(
            "--memory-options",
            format!("hugepages needs a whole number of 2 MiB pages: --memory {} MiB is odd", cfg.memory_mib),
        ));
    }
    let devices = usize::from(cfg.console.is_some())
        + cfg.disks.len()
        + cfg.nets.len()
        + usize::from(cfg.vsock.is_some())
        + usize::from(cfg.rng)
        + usize::from(cfg.balloon.is_some());
    if devices > MAX_PCI_DEVICES {
        return Err(config(
            "--disk/--net",
            format!("{devices} PCI devices requested (accepted: at most {MAX_PCI_DEVICES})"),
        ));
    }
    Ok(())
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

    fn base() -> VmConfig {
        serde_json::from_str(r#"{"kernel": "/proc/self/exe", "memory_mib": 64}"#).unwrap()
    }

    #[test]
    fn one_validation_names_the_field() {
        validate(&base()).unwrap();
        let mut socket = base();
        socket.serial = "socket=/run/rv/c.sock,log=/var/log/c.log".parse().unwrap();
        validate(&socket).unwrap();
        let mut balloon = base();
        balloon.balloon = Some(BalloonConfig { stats_interval_s: 0, ..BalloonConfig::default() });
        balloon.memory_options = "mergeable=on,thp=on".parse().unwrap();
        validate(&balloon).unwrap();
        type Edit = Box<dyn Fn(&mut VmConfig)>;
        let cases: Vec<(Edit, &str, &str)> = vec![
            (Box::new(|c| c.memory_mib = 1), "--memory", "out of range"),
            (Box::new(|c| c.cpus = 0), "--cpus", "at least 1"),
            (Box::new(|c| c.kernel = "/nonexistent".into()), "--kernel", "no such file"),
            (Box::new(|c| c.cmdline = "x".repeat(5000)), "--cmdline", "too long"),
            (Box::new(|c| c.nets = vec!["tap=abcdefghijklmnopq".parse().unwrap()]), "--net", "1 to 15 bytes"),
            (Box::new(|c| c.nets = vec!["tap=t0".parse().unwrap(), "tap=t0".parse().unwrap()]), "--net", "twice"),
            (Box::new(|c| c.vsock = Some("cid=2,socket=/x".parse().unwrap())), "--vsock", "3 to"),
            (
                Box::new(|c| c.serial = format!("socket=/{}", "s".repeat(SOCKET_PATH_MAX)).parse().unwrap()),
                "--serial",
                "1 to 107 bytes",
            ),
            (Box::new(|c| c.console = Some("socket=/c.sock".parse().unwrap())), "--console", "--serial only"),
            (
                Box::new(|c| c.balloon = Some("stats_interval_s=3601".parse().unwrap())),
                "--balloon",
                "0 (no statistics) to 3600",
            ),
            (
                Box::new(|c| c.memory_options = "hugepages=on,mergeable=on".parse().unwrap()),
                "--memory-options",
                "cannot be combined",
            ),
            (
                Box::new(|c| c.memory_options = "hugepages=on,thp=on".parse().unwrap()),
                "--memory-options",
                "cannot be combined",
            ),
            (
                Box::new(|c| {
                    c.memory_options.hugepages = true;
                    c.memory_mib = 65
                }),
                "--memory-options",
                "65 MiB is odd",
            ),
            (
                Box::new(|c| {
                    c.serial = ConsoleOut::Stdio;
                    c.console = Some(ConsoleOut::Stdio)
                }),
                "--console",
                "stdio",
            ),
        ];
        for (edit, field, want) in cases {
            let mut c = base();
            edit(&mut c);
            let e = validate(&c).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, Error::Config { field: f, .. } if f == field), "{field}: {msg}");
            assert!(msg.contains(want), "{field}: {msg}");
        }
    }
}

/// The host files a VMM opens for a configuration, for a jail (see the `jail` crate) that
/// must hold exactly them. Paths are as written in the configuration (made absolute against
/// the current folder).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFiles {
    /// Read only: the kernel, the initrd, read-only disks, and the backing files of qcow2
    /// images (as `block::chain_files` finds them, under the disk's chain policy).
    pub read: Vec<std::path::PathBuf>,
    /// Read and written in place: writable disk images (and a writable image's external data
    /// file, where allowed).
    pub write: Vec<std::path::PathBuf>,
    /// Folders in which the VMM creates files or sockets: of socket and file consoles and
    /// their logs, and of the vsock socket (`<socket>_<port>` files too).
    pub create_in: Vec<std::path::PathBuf>,
    /// Device nodes: `/dev/kvm` unless the accelerator is `emu`, `/dev/net/tun` with NICs.
    pub devices: Vec<std::path::PathBuf>,
    /// Whether it needs the host's network namespace (its TAPs are there).
    pub host_network: bool,
}

/// What the VMM opens on the host for `cfg` ([`HostFiles`]).
///
/// Errors: a path that cannot be made absolute (no current folder).
pub fn host_files(cfg: &VmConfig) -> std::io::Result<HostFiles> {
    use std::path::PathBuf;
    let abs = |p: &Path| std::path::absolute(p);
    let mut f = HostFiles::default();
    f.read.push(abs(Path::new(&cfg.kernel))?);
    if let Some(i) = &cfg.initrd {
        f.read.push(abs(Path::new(i))?);
    }
    for d in &cfg.disks {
        let p = abs(Path::new(&d.path))?;
        let qcow2 = match d.format {
            Some(fmt) => fmt == DiskFormat::Qcow2,
            None => block::detect_format(&p).is_ok_and(|fmt| fmt == block::Format::Qcow2),
        };
        if qcow2 {
            let policy = block::ImagePolicy {
                allow_backing_outside: d.allow_backing_outside,
                allow_data_file: d.allow_data_file,
            };
            // An image whose chain does not check out is left to the VMM to refuse, with
            // the block layer's message.
            for (file, writable) in block::chain_files(&p, !d.readonly, policy).unwrap_or_default() {
                if writable {
                    f.write.push(file);
                } else {
                    f.read.push(file);
                }
            }
        }
        if d.readonly {
            f.read.push(p);
        } else {
            f.write.push(p);
        }
    }
    let mut creates: Vec<PathBuf> = Vec::new();
    for out in std::iter::once(&cfg.serial).chain(cfg.console.iter()) {
        match out {
            ConsoleOut::File(p) => creates.push(p.clone()),
            ConsoleOut::Socket { path, log } => {
                creates.push(path.clone());
                creates.extend(log.iter().cloned());
            }
            _ => {}
        }
    }
    if let Some(v) = &cfg.vsock {
        creates.push(PathBuf::from(&v.socket));
    }
    for c in creates {
        if let Some(dir) = abs(&c)?.parent() {
            if !f.create_in.iter().any(|d| d == dir) {
                f.create_in.push(dir.to_path_buf());
            }
        }
    }
    if cfg.accel != Accel::Emu {
        f.devices.push("/dev/kvm".into());
    }
    if !cfg.nets.is_empty() {
        f.devices.push("/dev/net/tun".into());
        f.host_network = true;
    }
    Ok(f)
}

//! Kernel samepage merging (KSM) figures, for the host manager's metrics: the host's
//! (`/sys/kernel/mm/ksm/*`) and one process's (`/proc/PID/ksm_stat`, Linux 6.1+, or
//! `/proc/PID/ksm_merging_pages`, 5.19+; and the mergeable mappings in `/proc/PID/smaps`).
//! A VMM whose guest RAM is marked mergeable (`memory_options.mergeable`) lets KSM share
//! identical pages with other VMs once `/sys/kernel/mm/ksm/run` is 1 (off by default).
//!
//! Every reader takes the folder it reads from, so tests can point it at a fake one.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the host's KSM figures are.
pub const SYS_KSM: &str = "/sys/kernel/mm/ksm";

/// The host's KSM figures (in pages of the host's page size, 4 KiB on x86).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostKsm {
    /// `run`: 0 stopped, 1 merging, 2 stopped and unmerged.
    pub run: u64,
    /// `pages_shared`: shared pages in use (one per set of identical pages).
    pub pages_shared: u64,
    /// `pages_sharing`: how many more sites share them (roughly the pages saved).
    pub pages_sharing: u64,
    /// `pages_unshared`: unique pages scanned repeatedly.
    pub pages_unshared: u64,
    /// `pages_volatile`: pages changing too fast to merge.
    pub pages_volatile: u64,
    /// `full_scans`: how many times every mergeable area was scanned.
    pub full_scans: u64,
    /// `general_profit` in bytes (6.1+): memory saved less KSM's own metadata; may be
    /// negative.
    pub general_profit: Option<i64>,
    /// The host's page size in bytes.
    pub page_size: u64,
}

impl HostKsm {
    /// Whether KSM is merging now (`run` is 1).
    pub fn running(&self) -> bool {
        self.run == 1
    }

    /// Bytes saved by sharing (`pages_sharing` × page size).
    pub fn saved_bytes(&self) -> u64 {
        self.pages_sharing.saturating_mul(self.page_size)
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system configuration value.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

fn read_num<T: std::str::FromStr>(path: &Path) -> io::Result<T> {
    let s = std::fs::read_to_string(path)?;
    s.trim().parse().map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidData, format!("{}: not a number: {:?}", path.display(), s.trim()))
    })
}

/// The host's KSM figures from `dir` ([`SYS_KSM`]).
///
/// Errors: `dir/run` or one of the page counts is missing or unreadable (a kernel without
/// KSM has no `dir`).
pub fn host(dir: &Path) -> io::Result<HostKsm> {
    let n = |f: &str| read_num::<u64>(&dir.join(f));
    Ok(HostKsm {
        run: n("run")?,
        pages_shared: n("pages_shared")?,
        pages_sharing: n("pages_sharing")?,
        pages_unshared: n("pages_unshared")?,
        pages_volatile: n("pages_volatile")?,
        full_scans: n("full_scans")?,
        general_profit: read_num(&dir.join("general_profit")).ok(),
        page_size: page_size(),
    })
}

/// One process's KSM figures.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessKsm {
    /// Pages of this process that KSM merged (shared with other pages, in this process or
    /// another): `ksm_merging_pages`.
    pub merging_pages: u64,
    /// `ksm_rmap_items` (6.1+): pages KSM tracks for this process.
    pub rmap_items: Option<u64>,
    /// `ksm_zero_pages` (6.10+): pages merged with the zero page.
    pub zero_pages: Option<u64>,
    /// `ksm_process_profit` in bytes (6.1+); may be negative.
    pub profit: Option<i64>,
    /// Bytes of the process's mappings marked mergeable (`mg` in smaps' VmFlags).
    pub mergeable_bytes: u64,
    /// The host's page size in bytes.
    pub page_size: u64,
}

impl ProcessKsm {
    /// Bytes of this process that KSM merged.
    pub fn merging_bytes(&self) -> u64 {
        self.merging_pages.saturating_mul(self.page_size)
    }
}

/// `/proc/PID`.
pub fn proc_dir(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}"))
}

/// The KSM figures of the process whose `/proc` folder is `dir` ([`proc_dir`]).
///
/// Errors: the process has neither `ksm_stat` nor `ksm_merging_pages` (a kernel before
/// 5.19, or no such process), or its `smaps` cannot be read.
pub fn process(dir: &Path) -> io::Result<ProcessKsm> {
    let mut k = ProcessKsm { page_size: page_size(), ..ProcessKsm::default() };
    match std::fs::read_to_string(dir.join("ksm_stat")) {
        Ok(stat) => {
            for line in stat.lines() {
                let mut it = line.split_whitespace();
                let (Some(key), Some(val)) = (it.next(), it.next()) else { continue };
                let key = key.trim_end_matches(':');
                match key {
                    "ksm_merging_pages" => k.merging_pages = val.parse().unwrap_or(0),
                    "ksm_rmap_items" => k.rmap_items = val.parse().ok(),
                    "ksm_zero_pages" => k.zero_pages = val.parse().ok(),
                    "ksm_process_profit" => k.profit = val.parse().ok(),
                    _ => {}
                }
            }
        }
        Err(_) => k.merging_pages = read_num(&dir.join("ksm_merging_pages"))?,
    }
    k.mergeable_bytes = mergeable_bytes(&std::fs::read_to_string(dir.join("smaps"))?);
    Ok(k)
}

/// Bytes of the mappings in `smaps` (the text of `/proc/PID/smaps`) whose VmFlags have `mg`.
pub fn mergeable_bytes(smaps: &str) -> u64 {
    let mut total = 0u64;
    let mut size_kib = 0u64;
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            size_kib = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            if flags.split_whitespace().any(|f| f == "mg") {
                total = total.saturating_add(size_kib.saturating_mul(1024));
            }
            size_kib = 0;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rv-ksm-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const SMAPS: &str = "\
7f0000000000-7f0020000000 rw-p 00000000 00:00 0
Size:             524288 kB
Rss:                1024 kB
VmFlags: rd wr mr mw me ac mg
7f0020000000-7f0020001000 r--p 00000000 00:00 0
Size:                  4 kB
VmFlags: rd mr mw me
";

    #[test]
    fn host_and_process_figures() {
        let d = fake_dir("host");
        for (f, v) in [
            ("run", "1"),
            ("pages_shared", "10"),
            ("pages_sharing", "300"),
            ("pages_unshared", "5"),
            ("pages_volatile", "2"),
            ("full_scans", "7"),
            ("general_profit", "-4096"),
        ] {
            std::fs::write(d.join(f), format!("{v}\n")).unwrap();
        }
        let h = host(&d).unwrap();
        assert!(h.running());
        assert_eq!((h.pages_shared, h.pages_sharing, h.general_profit), (10, 300, Some(-4096)));
        assert_eq!(h.saved_bytes(), 300 * h.page_size);
        std::fs::remove_file(d.join("pages_sharing")).unwrap();
        assert!(host(&d).is_err(), "a missing count is an error");
        assert!(host(Path::new("/nonexistent/ksm")).is_err());

        let p = fake_dir("proc");
        std::fs::write(
            p.join("ksm_stat"),
            "ksm_rmap_items 40\nksm_zero_pages 3\nksm_merging_pages 12\nksm_process_profit 8192\nksm_merge_any: no\nksm_mergeable: yes\n",
        )
        .unwrap();
        std::fs::write(p.join("smaps"), SMAPS).unwrap();
        let k = process(&p).unwrap();
        assert_eq!((k.merging_pages, k.rmap_items, k.zero_pages, k.profit), (12, Some(40), Some(3), Some(8192)));
        assert_eq!(k.mergeable_bytes, 512 << 20);
        assert_eq!(k.merging_bytes(), 12 * k.page_size);
        // An older kernel: ksm_merging_pages only.
        std::fs::remove_file(p.join("ksm_stat")).unwrap();
        std::fs::write(p.join("ksm_merging_pages"), "5\n").unwrap();
        let k = process(&p).unwrap();
        assert_eq!((k.merging_pages, k.rmap_items), (5, None));
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::remove_dir_all(&p);
    }

    #[test]
    fn this_process_can_be_read() {
        // Whatever this host's kernel offers, reading our own figures either works or says
        // which file is missing; the real host's folder too.
        match process(&proc_dir(std::process::id())) {
            Ok(k) => assert_eq!(k.mergeable_bytes % 4096, 0),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}"),
        }
        if Path::new(SYS_KSM).join("run").exists() {
            host(Path::new(SYS_KSM)).unwrap();
        }
    }
}

//! Guest RAM layout (x86 PC): RAM from GPA 0 up to the 32-bit MMIO hole at 3 GiB, the rest
//! from 4 GiB up; and how it is backed on the host ([`MemoryOptions`]): private anonymous
//! memory, optionally marked mergeable for KSM (`MADV_MERGEABLE`) or asking for transparent
//! huge pages (`MADV_HUGEPAGE`), or 2 MiB hugetlbfs pages reserved at boot (`MAP_HUGETLB`).

use std::path::Path;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

pub use crate::config::MemoryOptions;
use crate::Error;

/// Size of the huge pages `hugepages` backs guest RAM with.
pub const HUGE_PAGE: u64 = 2 << 20;
/// Where the host counts its free 2 MiB huge pages.
pub const FREE_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

/// Start of the 32-bit MMIO hole (LAPIC, IOAPIC, future PCI BARs), GPA.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// PCI memory BAR window (32-bit), GPA: from the start of the hole up to the IOAPIC.
pub const PCI_MMIO_START: u64 = MMIO_HOLE_START;
/// End (exclusive) of the PCI memory BAR window, GPA.
pub const PCI_MMIO_END: u64 = 0xfec0_0000;
/// First GPA above 4 GiB.
pub const HIGH_RAM_START: u64 = 1 << 32;

/// RAM ranges (GPA, size in bytes) for `mem_size` bytes of guest RAM.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![(0, MMIO_HOLE_START), (HIGH_RAM_START, mem_size - MMIO_HOLE_START)]
    }
}

fn options_error(msg: String) -> Error {
    Error::Config { field: "--memory-options", msg }
}

/// Free 2 MiB huge pages on the host, from `path` ([`FREE_HUGEPAGES`]); 0 when the file is
/// missing (no hugetlbfs support).
pub fn free_huge_pages(path: &Path) -> u64 {
    std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// Allocates guest RAM as `opts` asks: private anonymous mappings (marked mergeable, or
/// asking for transparent huge pages), or 2 MiB hugetlbfs pages reserved now.
///
/// Errors: `Error::Config` for `--memory-options` when the host has too few free huge
/// pages or refuses the advice (a kernel without KSM or THP), naming what to change;
/// `Error::MemoryAlloc` when the mappings cannot be made.
pub fn create(mem_size: u64, opts: &MemoryOptions) -> crate::Result<GuestMemoryMmap> {
    let ranges = ram_ranges(mem_size);
    let mem = if opts.hugepages {
        let need = mem_size.div_ceil(HUGE_PAGE);
        let free = free_huge_pages(Path::new(FREE_HUGEPAGES));
        if free < need {
            return Err(options_error(format!(
                "hugepages: {need} free 2 MiB huge pages needed for {} MiB of RAM, the host has {free} \
                 ({FREE_HUGEPAGES}; raise /proc/sys/vm/nr_hugepages, or leave hugepages off)",
                mem_size >> 20
            )));
        }
        let regions = ranges
            .iter()
            .map(|&(gpa, size)| {
                // No MAP_NORESERVE: the huge pages are reserved by the mmap itself, so a host
                // that runs short fails here rather than with a SIGBUS in the guest later.
                let map = MmapRegionBuilder::new(size as usize)
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB)
                    .with_hugetlbfs(true)
                    .build()
                    .map_err(|e| {
                        options_error(format!(
                            "hugepages: reserving {} MiB of 2 MiB huge pages: {e} (raise /proc/sys/vm/nr_hugepages)",
                            size >> 20
                        ))
                    })?;
                GuestRegionMmap::new(map, GuestAddress(gpa))
                    .ok_or(Error::MemoryAlloc(vm_memory::mmap::FromRangesError::InvalidGuestRegion))
            })
            .collect::<crate::Result<Vec<_>>>()?;
        GuestMemoryMmap::from_regions(regions).map_err(|e| Error::MemoryAlloc(e.into()))?
    } else {
        let ranges: Vec<(GuestAddress, usize)> = ranges.iter().map(|&(g, s)| (GuestAddress(g), s as usize)).collect();
        GuestMemoryMmap::from_ranges(&ranges).map_err(Error::MemoryAlloc)?
    };
    for (on, advice, what, hint) in [
        (opts.mergeable, libc::MADV_MERGEABLE, "mergeable", "a kernel with CONFIG_KSM"),
        (opts.thp, libc::MADV_HUGEPAGE, "thp", "a kernel with transparent huge pages"),
    ] {
        if !on {
            continue;
        }
        for r in regions(&mem) {
            // SAFETY: the range is one whole mapping of guest RAM made above; both advices
            // only change how the kernel may back it (merging identical pages copy-on-write,
            // huge pages), never its contents.
            let rc = unsafe { libc::madvise(r.host_addr.cast(), r.size as usize, advice) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                return Err(options_error(format!("{what}: madvise: {e} (needs {hint})")));
            }
        }
    }
    Ok(mem)
}

/// The host mappings of guest RAM, for the accelerators.
pub fn regions(mem: &GuestMemoryMmap) -> Vec<accel::RamRegion> {
    mem.iter()
        .map(|r| accel::RamRegion {
            gpa: r.start_addr().0,
            size: r.len(),
            host_addr: mem.get_host_address(r.start_addr()).unwrap_or(std::ptr::null_mut()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn layout_splits_at_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }

    /// VmFlags of the mapping that starts at `addr` in /proc/self/smaps.
    fn vm_flags(addr: *mut u8) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{:x}-", addr as usize);
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        lines.find(|l| l.starts_with("VmFlags:")).unwrap_or_default().to_string()
    }

    #[test]
    fn backing_options() {
        let plain = create(16 << 20, &MemoryOptions::default()).unwrap();
        assert!(!vm_flags(regions(&plain)[0].host_addr).contains(" mg"));
        let opts = MemoryOptions { mergeable: true, ..MemoryOptions::default() };
        match create(16 << 20, &opts) {
            Ok(m) => {
                assert!(vm_flags(regions(&m)[0].host_addr).contains(" mg"), "{}", vm_flags(regions(&m)[0].host_addr))
            }
            // A host kernel without KSM refuses the advice, and says what is needed.
            Err(e) => assert!(e.to_string().contains("CONFIG_KSM"), "{e}"),
        }
        let opts = MemoryOptions { thp: true, ..MemoryOptions::default() };
        match create(16 << 20, &opts) {
            Ok(m) => assert!(vm_flags(regions(&m)[0].host_addr).contains(" hg")),
            Err(e) => assert!(e.to_string().contains("transparent huge pages"), "{e}"),
        }
        // Hugetlbfs: refused naming the shortfall unless the host has the pages free.
        let opts = MemoryOptions { hugepages: true, ..MemoryOptions::default() };
        let free = free_huge_pages(Path::new(FREE_HUGEPAGES));
        match create(16 << 20, &opts) {
            Ok(m) => {
                assert!(free >= 8);
                let r = m.iter().next().unwrap();
                assert_eq!(r.is_hugetlbfs(), Some(true));
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(matches!(e, Error::Config { field: "--memory-options", .. }), "{msg}");
                assert!(msg.contains("nr_hugepages"), "{msg}");
                if free < 8 {
                    assert!(
                        msg.contains(&format!("8 free 2 MiB huge pages needed for 16 MiB of RAM, the host has {free}")),
                        "{msg}"
                    );
                }
            }
        }
        assert_eq!(free_huge_pages(Path::new("/nonexistent")), 0);
    }
}

//! Guest RAM layout (x86 PC): RAM from GPA 0 up to the 32-bit MMIO hole at 3 GiB, the rest
//! from 4 GiB up.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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

/// Allocates guest RAM (anonymous private mappings).
pub fn create(mem_size: u64) -> crate::Result<GuestMemoryMmap> {
    let ranges: Vec<(GuestAddress, usize)> =
        ram_ranges(mem_size).into_iter().map(|(g, s)| (GuestAddress(g), s as usize)).collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(crate::Error::MemoryAlloc)
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
}

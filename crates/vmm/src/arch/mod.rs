//! x86-64 boot: kernel loading (bzImage through the Linux x86 boot protocol 2.15, ELF
//! vmlinux through the PVH entry), zero page, e820 map, PVH start_info, boot page tables
//! and GDT, and the vCPU state at the kernel's entry point.

pub mod acpi;
pub mod mptable;

use accel::{CpuState, Segment, Table};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use std::path::Path;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::{ram_ranges, HIGH_RAM_START};
use crate::{Error, KernelProblem, Result};

/// GPA of the boot GDT.
pub const GDT_ADDR: u64 = 0x500;
/// GPA of the PVH `hvm_start_info` (and its memory map after it).
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// GPA of the zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK: u64 = 0x8ff0;
/// GPA of the boot PML4 (followed by the PDPT and four page directories).
pub const PML4_ADDR: u64 = 0x9000;
/// GPA of the kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line accepted, in bytes including the NUL.
pub const CMDLINE_MAX: usize = 4096;
/// Where the kernel is loaded (1 MiB), GPA.
pub const KERNEL_ADDR: u64 = 0x10_0000;
/// RAM the kernel needs above its decompressed image before it can use the rest, in bytes
/// (early page tables, the boot allocator's first blocks, the zero page copy).
const KERNEL_SLACK: u64 = 8 << 20;
/// End of conventional memory below the EBDA.
const EBDA_START: u64 = 0x9_fc00;

/// e820 entry types (ACPI 6.4 Table 15.1).
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// GDT layout: null, 64-bit code (0x08), data (0x10), TSS (0x18), 32-bit code (0x20).
const GDT: [u64; 5] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x0080_8b00_0000_ffff, 0x00cf_9b00_0000_ffff];

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// bzImage 64-bit entry (startup_64), RSI = zero page.
    Linux64,
    /// PVH 32-bit entry, EBX = hvm_start_info.
    Pvh,
}

/// Result of loading a kernel.
#[derive(Clone, Debug)]
pub struct BootInfo {
    /// Entry GPA.
    pub entry: u64,
    /// Entry protocol.
    pub kind: EntryKind,
}

fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut v = vec![(0, EBDA_START, E820_RAM), (EBDA_START, KERNEL_ADDR - EBDA_START, E820_RESERVED)];
    for (gpa, size) in ram_ranges(mem_size) {
        if gpa == 0 {
            v.push((KERNEL_ADDR, size - KERNEL_ADDR, E820_RAM));
        } else {
            v.push((gpa, size, E820_RAM));
        }
    }
    v
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |err| Error::Io { path: path.display().to_string(), err }
}

fn mem_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> Error {
    move |source| Error::Memory { what, source }
}

fn bad_kernel(path: &Path, problem: KernelProblem) -> Error {
    Error::KernelImage { path: path.to_path_buf(), problem }
}

/// Loads kernel, initrd and command line into guest memory and writes the boot tables.
///
/// bzImages (magic "HdrS" at offset 0x202) use the 64-bit boot protocol; ELF images need a
/// PVH note (XEN_ELFNOTE_PHYS32_ENTRY). Errors: `Error::Kernel` when linux-loader refuses the
/// image, `Error::KernelImage` for a file that is neither or is truncated, `Error::Config`
/// for an initrd that does not fit or an over-long cmdline.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<BootInfo> {
    let (mut f, kernel_len) = crate::host_files::open_regular(kernel).map_err(io_err(kernel))?;
    let mut magic = [0u8; 0x206];
    let n = std::io::Read::read(&mut f, &mut magic).map_err(io_err(kernel))?;
    std::io::Seek::rewind(&mut f).map_err(io_err(kernel))?;
    let is_elf = n >= 4 && magic[..4] == *b"\x7fELF";
    let is_bz = n >= 0x206 && magic[0x202..0x206] == *b"HdrS";
    let low_end = ram_ranges(mem_size)[0].1;

    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(Error::Config {
            field: "--cmdline",
            msg: format!("{} bytes is too long (at most {})", cmdline.len(), CMDLINE_MAX - 1),
        });
    }
    let mut cbytes = cmdline.as_bytes().to_vec();
    cbytes.push(0);
    mem.write_slice(&cbytes, GuestAddress(CMDLINE_ADDR)).map_err(mem_err("command line"))?;
    write_gdt_and_page_tables(mem)?;

    let (entry, kind, setup, kernel_end) =
        if is_bz {
            let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(KERNEL_ADDR)))
                .map_err(|source| Error::Kernel { path: kernel.to_path_buf(), format: "bzImage", source })?;
            let hdr = r.setup_header.ok_or_else(|| bad_kernel(kernel, KernelProblem::NoSetupHeader))?;
            // The boot sector, `setup_sects` sectors of real-mode setup (0 means 4), then
            // `syssize` 16-byte paragraphs of protected-mode kernel (boot protocol 2.04+).
            let setup_sects = u64::from(if hdr.setup_sects == 0 { 4 } else { hdr.setup_sects });
            let want = (setup_sects + 1) * 512 + u64::from(hdr.syssize) * 16;
            if kernel_len < want {
                return Err(bad_kernel(kernel, KernelProblem::Truncated { len: kernel_len, want }));
            }
            let (version, xlf) = (hdr.version, hdr.xloadflags);
            if version < 0x020c || xlf & 1 == 0 {
                return Err(bad_kernel(kernel, KernelProblem::No64BitEntry { version, xloadflags: xlf }));
            }
            // The kernel decompresses itself into `init_size` bytes at its preferred address
            // (or where it was loaded, if higher): that range must be RAM and stay clear of the
            // initrd (boot protocol 2.10+, `pref_address` and `init_size`).
            let end = r.kernel_load.0.max(hdr.pref_address).saturating_add(u64::from(hdr.init_size));
            (r.kernel_load.0 + 0x200, EntryKind::Linux64, Some(hdr), end)
        } else if is_elf {
            let r = Elf::load(mem, None, &mut f, Some(GuestAddress(KERNEL_ADDR))).map_err(|source| Error::Kernel {
                path: kernel.to_path_buf(),
                format: "ELF vmlinux",
                source,
            })?;
            match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => (a.0, EntryKind::Pvh, None, r.kernel_end),
                _ => return Err(bad_kernel(kernel, KernelProblem::NoPvhNote)),
            }
        } else {
            return Err(bad_kernel(kernel, KernelProblem::NotAKernel));
        };

    let mib = |b: u64| b.div_ceil(1 << 20);
    // What the kernel needs besides its image: room for its first page tables and
    // allocations before it can use the rest of RAM.
    // The image's header sets `kernel_end` (a bzImage's `pref_address` and `init_size`): one
    // near 2^64 must be refused, not wrap to a small need.
    let kernel_need = kernel_end.saturating_add(KERNEL_SLACK).checked_next_multiple_of(1 << 20).unwrap_or(u64::MAX);
    if kernel_need > low_end {
        return Err(Error::Config {
            field: "--memory",
            msg: format!(
                "{} MiB is too small for {} (accepted: at least {} MiB for this kernel)",
                mib(mem_size),
                kernel.display(),
                mib(kernel_need)
            ),
        });
    }

    // initrd: as high as allowed, page aligned, above everything the kernel uses. Its size
    // is checked before anything is read, and it is streamed into guest memory.
    let mut initrd_loc = None;
    if let Some(p) = initrd {
        let (mut file, size) = crate::host_files::open_regular(p).map_err(io_err(p))?;
        let max = setup.map(|h| u64::from(h.initrd_addr_max)).unwrap_or(0xffff_ffff).min(low_end - 1);
        let top = (max + 1) & !0xfff;
        let addr = top.checked_sub(size).map(|a| a & !0xfff).filter(|&a| a >= kernel_need);
        let Some(addr) = addr else {
            return Err(Error::Config {
                field: "--initrd",
                msg: format!(
                    "{} ({} MiB) does not fit in guest memory ({} MiB) beside the kernel (accepted: --memory of at least {} MiB)",
                    p.display(),
                    mib(size),
                    mib(mem_size),
                    mib(kernel_need + size.next_multiple_of(0x1000))
                ),
            });
        };
        let len = usize::try_from(size).map_err(|_| Error::Config { field: "--initrd", msg: "too large".into() })?;
        mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len).map_err(|e| match e {
            vm_memory::GuestMemoryError::IOError(err) => Error::Io { path: p.display().to_string(), err },
            e => mem_err("initrd")(e),
        })?;
        initrd_loc = Some((addr, size));
    }

    let rsdp = acpi::write_tables(mem)?;
    let e820 = e820_map(mem_size);
    match kind {
        EntryKind::Linux64 => {
            let mut bp = boot_params::default();
            // `setup` is Some for bzImages.
            if let Some(h) = setup {
                bp.hdr = h;
            }
            bp.hdr.type_of_loader = 0xff;
            bp.hdr.boot_flag = 0xaa55;
            bp.hdr.header = 0x5372_6448;
            bp.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
            bp.hdr.cmdline_size = cbytes.len() as u32;
            bp.hdr.loadflags |= 0x80; // CAN_USE_HEAP
            bp.hdr.heap_end_ptr = 0xfe00;
            if let Some((a, s)) = initrd_loc {
                bp.hdr.ramdisk_image = a as u32;
                bp.hdr.ramdisk_size = s as u32;
            }
            for (i, (addr, size, t)) in e820.iter().enumerate() {
                bp.e820_table[i] = boot_e820_entry { addr: *addr, size: *size, r#type: *t };
            }
            bp.e820_entries = e820.len() as u8;
            bp.acpi_rsdp_addr = rsdp;
            mem.write_obj(bp, GuestAddress(ZERO_PAGE_ADDR)).map_err(mem_err("zero page"))?;
        }
        EntryKind::Pvh => write_pvh_start_info(mem, &e820, initrd_loc, rsdp)?,
    }
    Ok(BootInfo { entry, kind })
}

/// Writes `hvm_start_info` (Xen PVH ABI, xen/include/public/arch-x86/hvm/start_info.h).
fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    e820: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<()> {
    use linux_loader::loader::elf::start_info::{
        hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
    };
    let memmap = PVH_INFO_ADDR + 0x40;
    let modlist = PVH_INFO_ADDR + 0x400;
    let entries = u32::try_from(e820.len()).map_err(|_| Error::TableTooLong { what: "e820 map", len: e820.len() })?;
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        flags: 0,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: modlist,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: rsdp,
        memmap_paddr: memmap,
        memmap_entries: entries,
        reserved: 0,
    };
    mem.write_obj(info, GuestAddress(PVH_INFO_ADDR)).map_err(mem_err("PVH start_info"))?;
    let entry_size = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    for (i, &(addr, size, type_)) in e820.iter().enumerate() {
        let e = hvm_memmap_table_entry { addr, size, type_, reserved: 0 };
        mem.write_obj(e, GuestAddress(memmap + entry_size * i as u64)).map_err(mem_err("PVH memory map"))?;
    }
    if let Some((paddr, size)) = initrd {
        let m = hvm_modlist_entry { paddr, size, cmdline_paddr: 0, reserved: 0 };
        mem.write_obj(m, GuestAddress(modlist)).map_err(mem_err("PVH module list"))?;
    }
    Ok(())
}

/// GDT at [`GDT_ADDR`] and identity page tables for the first 4 GiB (2 MiB pages).
fn write_gdt_and_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    for (i, d) in GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + 8 * i as u64)).map_err(mem_err("GDT"))?;
    }
    let pdpt = PML4_ADDR + 0x1000;
    mem.write_obj(pdpt | 3, GuestAddress(PML4_ADDR)).map_err(mem_err("page tables"))?;
    for g in 0..4u64 {
        let pd = PML4_ADDR + 0x2000 + g * 0x1000;
        mem.write_obj(pd | 3, GuestAddress(pdpt + g * 8)).map_err(mem_err("page tables"))?;
        for i in 0..512u64 {
            let pa = (g << 30) | (i << 21);
            mem.write_obj(pa | 0x83, GuestAddress(pd + i * 8)).map_err(mem_err("page tables"))?;
        }
    }
    Ok(())
}

fn seg_from_gdt(index: u16) -> Segment {
    let d = GDT[index as usize];
    let hi = (d >> 32) as u32;
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: index * 8,
        type_: ((hi >> 8) & 0xf) as u8,
        present: hi & (1 << 15) != 0,
        dpl: ((hi >> 13) & 3) as u8,
        db: hi & (1 << 22) != 0,
        s: hi & (1 << 12) != 0,
        l: hi & (1 << 21) != 0,
        g: hi & (1 << 23) != 0,
        avl: false,
        unusable: false,
    }
}

/// The boot vCPU's register state at the kernel entry.
pub fn boot_cpu_state(info: &BootInfo) -> CpuState {
    let mut s = CpuState { rflags: 2, ..CpuState::default() };
    let data = seg_from_gdt(2);
    let mut tss = seg_from_gdt(3);
    tss.limit = 0xfffff;
    tss.selector = 0x18;
    s.tr = tss;
    s.ldt = Segment { unusable: true, type_: 2, ..Segment::default() };
    s.gdt = Table { base: GDT_ADDR, limit: (GDT.len() * 8 - 1) as u16 };
    s.idt = Table { base: 0, limit: 0 };
    s.rip = info.entry;
    match info.kind {
        EntryKind::Linux64 => {
            s.segs = [data, seg_from_gdt(1), data, data, data, data];
            s.cr0 = 0x8000_0011 | (1 << 16); // PG | ET | PE | WP
            s.cr3 = PML4_ADDR;
            s.cr4 = 1 << 5; // PAE
            s.efer = (1 << 8) | (1 << 10); // LME | LMA
            s.gprs[accel::state::reg::RSI] = ZERO_PAGE_ADDR;
            s.gprs[accel::state::reg::RSP] = BOOT_STACK;
            s.gprs[accel::state::reg::RBP] = BOOT_STACK;
        }
        EntryKind::Pvh => {
            s.segs = [data, seg_from_gdt(4), data, data, data, data];
            s.cr0 = 0x11; // PE | ET
            s.gprs[accel::state::reg::RBX] = PVH_INFO_ADDR;
        }
    }
    s
}

/// Size of RAM above 4 GiB for a given total, in bytes (for CMOS).
pub fn high_mem(mem_size: u64) -> u64 {
    ram_ranges(mem_size).iter().filter(|(g, _)| *g >= HIGH_RAM_START).map(|(_, s)| s).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn e820_covers_ram_and_reserves_bios_area() {
        let m = e820_map(512 << 20);
        assert_eq!(m[0], (0, EBDA_START, E820_RAM));
        assert_eq!(m[1].2, E820_RESERVED);
        assert_eq!(m[2], (KERNEL_ADDR, (512 << 20) - KERNEL_ADDR, E820_RAM));
        let m = e820_map(5 << 30);
        assert_eq!(m.last().copied(), Some((1 << 32, 2 << 30, E820_RAM)));
    }

    #[test]
    fn rejects_non_kernel() {
        let mem = crate::memory::create(64 << 20, &Default::default()).unwrap();
        let dir = std::env::temp_dir().join(format!("rv-notkernel-{}", std::process::id()));
        std::fs::write(&dir, b"hello, I am not a kernel").unwrap();
        let e = load(&mem, 64 << 20, &dir, None, "console=ttyS0").unwrap_err();
        assert!(e.to_string().contains("not a kernel"), "{e}");
        // truncated bzImage: valid magic, nothing behind it
        let mut b = vec![0u8; 0x300];
        b[0x1f1] = 4;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206] = 0x0f;
        b[0x207] = 0x02;
        std::fs::write(&dir, &b).unwrap();
        let e = load(&mem, 64 << 20, &dir, None, "").unwrap_err();
        assert!(matches!(e, Error::Kernel { format: "bzImage", .. } | Error::KernelImage { .. }), "{e}");
        let _ = std::fs::remove_file(&dir);
        assert!(mem.num_regions() == 1);
    }

    #[test]
    fn boot_state_64bit_entry() {
        let s = boot_cpu_state(&BootInfo { entry: 0x100200, kind: EntryKind::Linux64 });
        assert_eq!(s.rip, 0x100200);
        assert!(s.segs[1].l && !s.segs[1].db);
        assert_eq!(s.gprs[6], ZERO_PAGE_ADDR);
        let s = boot_cpu_state(&BootInfo { entry: 0x1000000, kind: EntryKind::Pvh });
        assert!(s.segs[1].db && !s.segs[1].l);
        assert_eq!(s.cr0 & 0x8000_0000, 0);
        assert_eq!(s.gprs[3], PVH_INFO_ADDR);
    }
}

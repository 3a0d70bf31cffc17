//! The Linux boot protocol layout written for the real Debian bzImage: zero page, e820 map,
//! command line, initrd placement and the ACPI RSDP pointer (Linux boot protocol 2.15,
//! Documentation/x86/boot.rst and zero-page.rst).

use std::path::PathBuf;
use vm_memory::{Bytes, GuestAddress};
use vmm::arch::{self, EntryKind, CMDLINE_ADDR, ZERO_PAGE_ADDR};

fn guest(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guest").join(name);
    assert!(p.exists(), "{} missing: run scripts/setup-guest.sh (scripts/test.sh does)", p.display());
    p
}

fn rd<T: vm_memory::ByteValued>(mem: &vm_memory::GuestMemoryMmap, at: u64) -> T {
    mem.read_obj(GuestAddress(at)).unwrap()
}

#[test]
fn bzimage_zero_page_e820_cmdline_initrd() {
    let size = 256u64 << 20;
    let mem = vmm::memory::create(size, &Default::default()).unwrap();
    let cmdline = "console=ttyS0 rv.layout=1";
    let info = arch::load(&mem, size, &guest("vmlinuz"), Some(&guest("initrd.img")), cmdline).unwrap();
    assert_eq!(info.kind, EntryKind::Linux64);
    assert_eq!(info.entry, arch::KERNEL_ADDR + 0x200, "64-bit entry is startup_64 at load address + 0x200");

    let zp = ZERO_PAGE_ADDR;
    // setup_header lives at 0x1f1 in the zero page.
    assert_eq!(rd::<u16>(&mem, zp + 0x1fe), 0xaa55, "boot_flag");
    assert_eq!(rd::<u32>(&mem, zp + 0x202), 0x5372_6448, "header magic HdrS");
    assert_eq!(rd::<u8>(&mem, zp + 0x210), 0xff, "type_of_loader: undefined loader");
    assert_ne!(rd::<u8>(&mem, zp + 0x211) & 0x80, 0, "loadflags CAN_USE_HEAP");
    assert_eq!(rd::<u32>(&mem, zp + 0x228), CMDLINE_ADDR as u32, "cmd_line_ptr");
    let mut c = vec![0u8; cmdline.len() + 1];
    mem.read_slice(&mut c, GuestAddress(CMDLINE_ADDR)).unwrap();
    assert_eq!(&c[..cmdline.len()], cmdline.as_bytes());
    assert_eq!(c[cmdline.len()], 0, "NUL-terminated");

    // initrd: page aligned, inside low RAM, below initrd_addr_max, and holding the file.
    let rd_addr = u64::from(rd::<u32>(&mem, zp + 0x218));
    let rd_size = u64::from(rd::<u32>(&mem, zp + 0x21c));
    let initrd = std::fs::read(guest("initrd.img")).unwrap();
    assert_eq!(rd_size, initrd.len() as u64);
    assert_eq!(rd_addr % 4096, 0);
    assert!(rd_addr + rd_size <= size && rd_addr + rd_size <= u64::from(rd::<u32>(&mem, zp + 0x22c)) + 1);
    let mut head = vec![0u8; 64];
    mem.read_slice(&mut head, GuestAddress(rd_addr)).unwrap();
    assert_eq!(head, initrd[..64]);

    // e820 (count at 0x1e8, table at 0x2d0, 20-byte entries): RAM below the EBDA, a hole up
    // to 1 MiB, and RAM from 1 MiB to the end; the kernel and initrd are inside usable RAM.
    let n = rd::<u8>(&mem, zp + 0x1e8) as u64;
    let e = |i: u64| {
        (
            rd::<u64>(&mem, zp + 0x2d0 + 20 * i),
            rd::<u64>(&mem, zp + 0x2d8 + 20 * i),
            rd::<u32>(&mem, zp + 0x2e0 + 20 * i),
        )
    };
    assert_eq!(n, 3);
    assert_eq!(e(0), (0, 0x9fc00, 1));
    assert_eq!(e(1).2, 2, "reserved below 1 MiB");
    assert_eq!(e(2), (0x10_0000, size - 0x10_0000, 1));

    // ACPI RSDP pointer (boot protocol 2.14+).
    let rsdp = rd::<u64>(&mem, zp + 0x070);
    assert_eq!(rsdp, arch::acpi::RSDP_ADDR);
    let mut sig = [0u8; 8];
    mem.read_slice(&mut sig, GuestAddress(rsdp)).unwrap();
    assert_eq!(&sig, b"RSD PTR ");
}

#[test]
fn pvh_start_info() {
    let size = 256u64 << 20;
    let mem = vmm::memory::create(size, &Default::default()).unwrap();
    let info = arch::load(&mem, size, &guest("vmlinux"), Some(&guest("initrd.img")), "console=ttyS0").unwrap();
    assert_eq!(info.kind, EntryKind::Pvh);
    let si = arch::PVH_INFO_ADDR;
    assert_eq!(rd::<u32>(&mem, si), 0x336e_c578, "hvm_start_info magic");
    assert_eq!(rd::<u32>(&mem, si + 12), 1, "one module: the initrd");
    assert_eq!(rd::<u64>(&mem, si + 24), CMDLINE_ADDR);
    assert_eq!(rd::<u64>(&mem, si + 32), arch::acpi::RSDP_ADDR);
    assert_eq!(rd::<u32>(&mem, si + 48), 3, "memmap entries");
    let modlist = rd::<u64>(&mem, si + 16);
    let initrd_len = std::fs::metadata(guest("initrd.img")).unwrap().len();
    assert_eq!(rd::<u64>(&mem, modlist + 8), initrd_len);
}

//! ACPI tables (ACPI 6.4): RSDP → XSDT → FADT (→ FACS, DSDT), built with rust-vmm's
//! `acpi_tables`. They give the guest a standard power-off path: the FADT points at the
//! PM1a blocks of `devices::acpi_pm`, and the DSDT's `_S5` object gives the soft-off sleep
//! type. The DSDT also describes the PCI host bridge (`\_SB.PCI0`, PNP0A03): bus 0 through
//! configuration mechanism #1 at ports 0xCF8-0xCFF, and the 32-bit MMIO window where
//! device BARs live. Devices use MSI-X, so there is no `_PRT`. Interrupt routing for the
//! legacy devices stays with the PIC in virtual-wire mode on `emu` (no MADT).

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, Name, Package, Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use devices::acpi_pm::{PM1A_CNT_BLK, PM1A_EVT_BLK, S5_SLP_TYP};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// GPA of the RSDP (in the BIOS read-only area that Linux also scans, ACPI 6.4 §5.2.5.1).
pub const RSDP_ADDR: u64 = 0xe_0000;
const XSDT_ADDR: u64 = 0xe_0040;
const FADT_ADDR: u64 = 0xe_0100;
const FACS_ADDR: u64 = 0xe_0400;
const DSDT_ADDR: u64 = 0xe_0500;

const OEM_ID: [u8; 6] = *b"RSTVSR";
const OEM_TABLE: [u8; 8] = *b"RVISOR  ";
/// ISA IRQ of the SCI.
pub const SCI_IRQ: u16 = 9;

fn aml_bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// `\_SB.PCI0`: the PCI host bridge (PCI Firmware 3.2 §4.1, ACPI 6.4 §6.4.3.5 address
/// space descriptors): bus 0, the conf1 ports, the I/O ports outside them, and the BAR
/// window [`crate::memory::PCI_MMIO_START`] to [`crate::memory::PCI_MMIO_END`].
fn pci_host_bridge() -> Vec<u8> {
    let zero = 0u8;
    let hid = EISAName::new("PNP0A03");
    let bus = AddressSpace::<u16>::new_bus_number(0, 0);
    let conf1 = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = AddressSpace::<u16>::new_io(0, 0xcf7, None);
    let io_high = AddressSpace::<u16>::new_io(0xd00, 0xffff, None);
    let mmio = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        crate::memory::PCI_MMIO_START as u32,
        (crate::memory::PCI_MMIO_END - 1) as u32,
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus, &conf1, &io_low, &io_high, &mmio]);
    let (hid_n, adr, seg, uid, bbn, crs_n) = (
        Name::new(Path::new("_HID"), &hid),
        Name::new(Path::new("_ADR"), &zero),
        Name::new(Path::new("_SEG"), &zero),
        Name::new(Path::new("_UID"), &zero),
        Name::new(Path::new("_BBN"), &zero),
        Name::new(Path::new("_CRS"), &crs),
    );
    let pci0 = Device::new(Path::new("PCI0"), vec![&hid_n, &adr, &seg, &uid, &bbn, &crs_n]);
    aml_bytes(&Scope::new(Path::new("\\_SB_"), vec![&pci0]))
}

/// Writes the tables into guest memory; returns the RSDP's GPA.
pub fn write_tables(mem: &GuestMemoryMmap) -> crate::Result<u64> {
    let merr = |source: vm_memory::GuestMemoryError| crate::Error::Memory { what: "ACPI tables", source };

    // DSDT: just the soft-off sleep type, Name (_S5, Package () { 5, 5, 0, 0 }).
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    let typ = S5_SLP_TYP as u8;
    let zero = 0u8;
    let s5 = Name::new(Path::new("_S5_"), &Package::new(vec![&typ, &typ, &zero, &zero]));
    dsdt.append_slice(&aml_bytes(&s5));
    dsdt.append_slice(&pci_host_bridge());
    mem.write_slice(dsdt.as_slice(), GuestAddress(DSDT_ADDR)).map_err(merr)?;

    mem.write_slice(&aml_bytes(&FACS::new()), GuestAddress(FACS_ADDR)).map_err(merr)?;

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .dsdt_64(DSDT_ADDR)
        .firmware_ctrl_64(FACS_ADDR)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::Wbinvd);
    fadt.sci_int = SCI_IRQ.into();
    fadt.pm1a_evt_blk = u32::from(PM1A_EVT_BLK).into();
    fadt.pm1a_cnt_blk = u32::from(PM1A_CNT_BLK).into();
    fadt.pm1_evt_len = 4;
    fadt.pm1_cnt_len = 2;
    fadt.century = 0x32;
    // IA-PC boot architecture flags: legacy devices and an 8042 are present.
    fadt.iapc_boot_arch = 0x3u16.into();
    mem.write_slice(&aml_bytes(&fadt.finalize()), GuestAddress(FADT_ADDR)).map_err(merr)?;

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(FADT_ADDR);
    mem.write_slice(&aml_bytes(&xsdt), GuestAddress(XSDT_ADDR)).map_err(merr)?;

    mem.write_slice(&aml_bytes(&Rsdp::new(OEM_ID, XSDT_ADDR)), GuestAddress(RSDP_ADDR)).map_err(merr)?;
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = crate::memory::create(64 << 20, &Default::default()).unwrap();
        assert_eq!(write_tables(&mem).unwrap(), RSDP_ADDR);
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(RSDP_ADDR)).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));
        assert_eq!(u64::from_le_bytes(rsdp[24..32].try_into().unwrap()), XSDT_ADDR);
        for (addr, sig) in [(XSDT_ADDR, b"XSDT"), (FADT_ADDR, b"FACP"), (DSDT_ADDR, b"DSDT")] {
            let mut hdr = [0u8; 8];
            mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
            assert_eq!(&hdr[..4], sig);
            let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
            let mut t = vec![0u8; len];
            mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
            assert!(checksum_ok(&t), "{} checksum", String::from_utf8_lossy(sig));
        }
        // The FADT's PM1a control block is where the PM device listens.
        let mut fadt = [0u8; 276];
        mem.read_slice(&mut fadt, GuestAddress(FADT_ADDR)).unwrap();
        assert_eq!(u32::from_le_bytes(fadt[64..68].try_into().unwrap()), u32::from(PM1A_CNT_BLK));
    }
}

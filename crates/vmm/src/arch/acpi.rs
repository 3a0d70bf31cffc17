//! ACPI tables (ACPI 6.4): RSDP → XSDT → FADT (→ FACS, DSDT), built with rust-vmm's
//! `acpi_tables`. They give the guest a standard power-off path: the FADT points at the
//! PM1a blocks of `devices::acpi_pm`, and the DSDT's `_S5` object gives the soft-off sleep
//! type. The DSDT also describes the PCI host bridge (`\_SB.PCI0`, PNP0A03): bus 0 through
//! configuration mechanism #1 at ports 0xCF8-0xCFF, and the 32-bit MMIO window where
//! device BARs live. Devices use MSI-X, so there is no `_PRT`.
//!
//! Where the accelerator's irqchip is described by ACPI ([`accel::IrqTables::Madt`], the
//! emulator), a MADT ([`write_madt`]) lists every vCPU's local APIC and the IOAPIC, with
//! ISA IRQ 0 on GSI 2: the guest runs in symmetric I/O mode and Linux uses the local APIC
//! timer, one-shot, as its tick device. Without it Linux stays in PIC virtual-wire mode
//! with the PIT, whose 16-bit counter makes an idle guest wake at least every 27 ms. KVM's
//! irqchip is described by an MP table instead (`super::mptable`).

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
const MADT_ADDR: u64 = 0xe_0300;
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

    write_xsdt(mem, &[FADT_ADDR])?;

    mem.write_slice(&aml_bytes(&Rsdp::new(OEM_ID, XSDT_ADDR)), GuestAddress(RSDP_ADDR)).map_err(merr)?;
    Ok(RSDP_ADDR)
}

fn write_xsdt(mem: &GuestMemoryMmap, tables: &[u64]) -> crate::Result<()> {
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    for &t in tables {
        xsdt.add_entry(t);
    }
    mem.write_slice(&aml_bytes(&xsdt), GuestAddress(XSDT_ADDR))
        .map_err(|source| crate::Error::Memory { what: "ACPI tables", source })
}

/// GPA of the IOAPIC (`devices::ioapic::IOAPIC_BASE`), as the MADT gives it.
const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// GPA of the local APICs.
const LAPIC_ADDR: u32 = 0xfee0_0000;

/// The MADT (ACPI 6.4 §5.2.12) for `cpus` vCPUs: local APICs at [`LAPIC_ADDR`] with IDs
/// `0..cpus`, the dual 8259 flag (`PCAT_COMPAT`), the IOAPIC (ID 0, GSIs 0-23), ISA IRQ 0
/// on GSI 2 (the emulator's irqchip wires the PIT there, like a PC; the other ISA IRQs are
/// identity-mapped, the SCI takes the ACPI default of level, active low) and LINT1 of every
/// local APIC as NMI.
fn madt(cpus: u8) -> Sdt {
    let mut madt = Sdt::new(*b"APIC", 36, 5, OEM_ID, OEM_TABLE, 1);
    madt.append_slice(&LAPIC_ADDR.to_le_bytes());
    madt.append_slice(&1u32.to_le_bytes()); // flags: PCAT_COMPAT
    for id in 0..cpus {
        // Processor Local APIC (type 0, 8 bytes): ACPI processor UID, APIC ID, enabled.
        madt.append_slice(&[0, 8, id, id, 1, 0, 0, 0]);
    }
    // I/O APIC (type 1, 12 bytes): ID 0, reserved, address, GSI base 0.
    madt.append_slice(&[1, 12, 0, 0]);
    madt.append_slice(&IOAPIC_ADDR.to_le_bytes());
    madt.append_slice(&0u32.to_le_bytes());
    // Interrupt Source Override (type 2, 10 bytes): bus 0 (ISA), IRQ 0 -> GSI 2, conforming.
    madt.append_slice(&[2, 10, 0, 0]);
    madt.append_slice(&2u32.to_le_bytes());
    madt.append_slice(&0u16.to_le_bytes());
    // Local APIC NMI (type 4, 6 bytes): all processors (UID 0xff), conforming, LINT1.
    madt.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    madt
}

/// Adds the MADT for `cpus` vCPUs to the tables [`write_tables`] wrote, and lists it in the
/// XSDT: local APICs with IDs `0..cpus`, the IOAPIC, ISA IRQ 0 on GSI 2 and LINT1 as NMI.
pub fn write_madt(mem: &GuestMemoryMmap, cpus: u8) -> crate::Result<()> {
    mem.write_slice(madt(cpus).as_slice(), GuestAddress(MADT_ADDR))
        .map_err(|source| crate::Error::Memory { what: "ACPI tables", source })?;
    write_xsdt(mem, &[FADT_ADDR, MADT_ADDR])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    fn table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let mut hdr = [0u8; 8];
        mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
        let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
        let mut t = vec![0u8; len];
        mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
        t
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
            let t = table(&mem, addr);
            assert_eq!(&t[..4], sig);
            assert!(checksum_ok(&t), "{} checksum", String::from_utf8_lossy(sig));
        }
        // The FADT's PM1a control block is where the PM device listens.
        let mut fadt = [0u8; 276];
        mem.read_slice(&mut fadt, GuestAddress(FADT_ADDR)).unwrap();
        assert_eq!(u32::from_le_bytes(fadt[64..68].try_into().unwrap()), u32::from(PM1A_CNT_BLK));
        // No MADT unless asked for.
        assert_eq!(table(&mem, XSDT_ADDR).len(), 36 + 8);
    }

    #[test]
    fn the_madt_lists_the_local_apics_the_ioapic_and_irq0_on_gsi2() {
        let mem = crate::memory::create(64 << 20, &Default::default()).unwrap();
        write_tables(&mem).unwrap();
        write_madt(&mem, 2).unwrap();
        let xsdt = table(&mem, XSDT_ADDR);
        assert!(checksum_ok(&xsdt));
        let entries: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(entries, [FADT_ADDR, MADT_ADDR]);
        let m = table(&mem, MADT_ADDR);
        assert_eq!(&m[..4], b"APIC");
        assert!(checksum_ok(&m));
        assert_eq!(u32::from_le_bytes(m[36..40].try_into().unwrap()), LAPIC_ADDR);
        assert_eq!(u32::from_le_bytes(m[40..44].try_into().unwrap()), 1, "PCAT_COMPAT");
        // Walk the structures: (type, length) and the fields that matter.
        let mut at = 44;
        let mut seen = Vec::new();
        while at < m.len() {
            let (t, len) = (m[at], usize::from(m[at + 1]));
            let s = &m[at..at + len];
            match t {
                0 => assert_eq!(s[4] & 1, 1, "enabled"),
                1 => assert_eq!(u32::from_le_bytes(s[4..8].try_into().unwrap()), IOAPIC_ADDR),
                2 => assert_eq!((s[3], u32::from_le_bytes(s[4..8].try_into().unwrap())), (0, 2)),
                4 => assert_eq!(s[5], 1, "LINT1"),
                _ => panic!("unexpected structure {t}"),
            }
            seen.push((t, s.get(3).copied()));
            at += len;
        }
        assert_eq!(at, m.len());
        assert_eq!(seen, [(0, Some(0)), (0, Some(1)), (1, Some(0)), (2, Some(0)), (4, Some(0))]);
        // It fits before the FACS.
        assert!(MADT_ADDR + m.len() as u64 <= FACS_ADDR);
    }
}

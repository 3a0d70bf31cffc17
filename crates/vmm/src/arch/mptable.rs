//! Intel MultiProcessor Specification 1.4 tables, so that the guest finds every vCPU's
//! local APIC and the IOAPIC (for `kvm`'s in-kernel irqchip; the emulator's is described
//! by the ACPI MADT, `super::acpi::write_madt`). Placed at the top of conventional memory
//! (the EBDA area), where Linux's `smp_scan_config` looks.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// GPA of the MP floating pointer structure (MP spec §4.1).
pub const MPTABLE_ADDR: u64 = 0x9_fc00;
const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// ISA IRQs routed through the IOAPIC (ISA IRQ n → IOAPIC pin n, KVM's default routing).
const ISA_IRQS: u8 = 16;

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)))
}

/// Builds the floating pointer and configuration table for `cpus` vCPUs (APIC IDs
/// 0..cpus, the IOAPIC gets ID `cpus`). Returns the bytes to place at [`MPTABLE_ADDR`].
pub fn build(cpus: u8) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut count = 0u16;
    for id in 0..cpus {
        // Processor entry (type 0, 20 bytes): APIC id, version, flags (enabled, BSP),
        // CPU signature (family 6), feature flags (FPU, APIC).
        entries.extend_from_slice(&[0, id, 0x14, if id == 0 { 3 } else { 1 }]);
        entries.extend_from_slice(&0x0600u32.to_le_bytes());
        entries.extend_from_slice(&((1u32 << 0) | (1 << 9)).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus entry (type 1): bus 0 is ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // IOAPIC entry (type 2): id, version 0x11, enabled, address.
    entries.extend_from_slice(&[2, cpus, 0x11, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // I/O interrupt entries (type 3): ISA IRQ n → IOAPIC pin n, conforming polarity/trigger.
    for irq in 0..ISA_IRQS {
        if irq == 2 {
            continue; // the cascade
        }
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, cpus, irq]);
        count += 1;
    }
    // Local interrupt entries (type 4): LINT0 = ExtINT, LINT1 = NMI, to all local APICs.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut cfg = Vec::with_capacity(44 + entries.len());
    cfg.extend_from_slice(b"PCMP");
    cfg.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    cfg.push(4); // spec revision 1.4
    cfg.push(0); // checksum, below
    cfg.extend_from_slice(b"RUSTVISR");
    cfg.extend_from_slice(b"000000000000");
    cfg.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    cfg.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    cfg.extend_from_slice(&count.to_le_bytes());
    cfg.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    cfg.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    cfg.push(0); // extended table checksum
    cfg.push(0);
    cfg.extend_from_slice(&entries);
    cfg[7] = checksum(&cfg);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&((MPTABLE_ADDR + 16) as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec revision
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]); // feature bytes: configuration table present
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&cfg);
    fp
}

/// Writes the MP table for `cpus` vCPUs into guest memory.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> crate::Result<()> {
    mem.write_slice(&build(cpus), GuestAddress(MPTABLE_ADDR))
        .map_err(|source| crate::Error::Memory { what: "MP table", source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let t = build(4);
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        let cfg = &t[16..];
        assert_eq!(&cfg[..4], b"PCMP");
        let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
        assert_eq!(len, cfg.len());
        assert_eq!(cfg.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        let count = u16::from_le_bytes([cfg[34], cfg[35]]);
        // 4 CPUs + bus + IOAPIC + 15 IRQs + 2 local interrupts
        assert_eq!(count, 4 + 1 + 1 + 15 + 2);
        // First processor entry is the enabled BSP with APIC id 0.
        assert_eq!(&cfg[44..48], &[0, 0, 0x14, 3]);
        // The table fits below the end of conventional memory (0xa0000).
        assert!(MPTABLE_ADDR as usize + t.len() <= 0xa_0000);
    }
}

//! The CPUID the emulator advertises: a plain x86-64 baseline that matches what it
//! implements (Intel SDM Vol. 2A CPUID).
//!
//! The vendor is GenuineIntel, family 6 model 0x1c stepping 10 (an in-order Atom): Linux's
//! vulnerability whitelist marks that model as not speculating, so the guest needs no PTI,
//! VERW or retpoline mitigations. Leaf 0x15 gives the TSC/crystal frequency so the guest
//! neither calibrates the TSC nor the local APIC timer.
//!
//! The TSC is derived from the host's monotonic clock, so it is invariant (leaf 0x8000_0007)
//! and the local APIC timer always runs (ARAT, leaf 6). With IA32_TSC_ADJUST (leaf 7) as
//! well, Linux trusts the TSC without its clocksource watchdog, which otherwise compares it
//! against jiffies: an emulated guest loses timer ticks whenever the host deschedules its
//! vCPU, and the watchdog would then declare the TSC unstable and fall back to a periodic
//! jiffies clock.

use crate::cpu::Cpu;

/// Features in leaf 1 EDX: FPU PSE TSC MSR PAE CX8 APIC PGE CMOV PAT CLFSH MMX FXSR SSE SSE2.
const LEAF1_EDX: u32 = (1 << 0)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 8)
    | (1 << 9)
    | (1 << 13)
    | (1 << 15)
    | (1 << 16)
    | (1 << 19)
    | (1 << 23)
    | (1 << 24)
    | (1 << 25)
    | (1 << 26);

fn regs4(s: &[u8; 16]) -> (u32, u32, u32, u32) {
    let [a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3] = *s;
    (
        u32::from_le_bytes([a0, a1, a2, a3]),
        u32::from_le_bytes([b0, b1, b2, b3]),
        u32::from_le_bytes([c0, c1, c2, c3]),
        u32::from_le_bytes([d0, d1, d2, d3]),
    )
}

/// Returns (EAX, EBX, ECX, EDX) for leaf `leaf`, subleaf `sub`.
pub(crate) fn cpuid(cpu: &Cpu, leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    let tsc_hz = cpu.config.tsc_hz;
    match leaf {
        0 => (0x16, 0x756e_6547, 0x6c65_746e, 0x4965_6e69), // "GenuineIntel"
        1 => {
            let eax = 0x0001_06ca;
            let ebx = (u32::from(cpu.config.apic_id) << 24) | (1 << 16) | (8 << 8);
            (eax, ebx, 0, LEAF1_EDX)
        }
        // Thermal and power management: ARAT only (the local APIC timer runs in every
        // state, which is true of the emulated one), so Linux trusts it as its tick device.
        6 => (1 << 2, 0, 0, 0),
        // Structured extended features, subleaf 0 (the only one): IA32_TSC_ADJUST.
        7 if sub == 0 => (0, 1 << 1, 0, 0),
        0x15 => (1, 1, u32::try_from(tsc_hz).unwrap_or(u32::MAX), 0),
        0x16 => {
            let mhz = u32::try_from(tsc_hz / 1_000_000).unwrap_or(u32::MAX);
            (mhz, mhz, 100, 0)
        }
        0x8000_0000 => (0x8000_0008, 0, 0, 0),
        0x8000_0001 => (0, 0, 1, (1 << 11) | (1 << 20) | (1 << 29)),
        0x8000_0002 => regs4(b"rustvisor emu x8"),
        0x8000_0003 => regs4(b"6-64 CPU\0\0\0\0\0\0\0\0"),
        0x8000_0004 => (0, 0, 0, 0),
        0x8000_0007 => (0, 0, 0, 1 << 8),
        0x8000_0008 => (0x3028, 0, 0, 0),
        _ => (0, 0, 0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuConfig;

    #[test]
    fn timer_leaves() {
        let c = Cpu::new(Vec::new(), CpuConfig { tsc_hz: 1_000_000_000, apic_id: 0 });
        assert_eq!(cpuid(&c, 6, 0).0 & (1 << 2), 1 << 2, "ARAT");
        assert_eq!(cpuid(&c, 7, 0), (0, 1 << 1, 0, 0), "TSC_ADJUST, no more subleaves");
        assert_eq!(cpuid(&c, 7, 1), (0, 0, 0, 0));
        assert_eq!(cpuid(&c, 0x8000_0007, 0).3, 1 << 8, "invariant TSC");
        assert_eq!(cpuid(&c, 0x15, 0), (1, 1, 1_000_000_000, 0));
    }
}

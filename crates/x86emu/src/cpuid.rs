//! The CPUID the emulator advertises: exactly the features it implements (Intel SDM Vol. 2A
//! CPUID).
//!
//! That is the x86-64-v2 level plus AES-NI, PCLMULQDQ, MOVBE, RDRAND and RDSEED: SSE through
//! SSE2 and the x87 FPU, SSE3 (with FISTTP), SSSE3, SSE4.1, SSE4.2 (with CRC32 and POPCNT),
//! CMPXCHG16B and LAHF/SAHF in 64-bit mode; no AVX, XSAVE, BMI or SHA. The vector extensions
//! and the random-number instructions are replayed on the host CPU's own instructions (see
//! `sse.rs`), so each of them is implemented, and advertised, only where the host has it
//! ([`has`]); x86-64-v2 guests therefore need an x86-64-v2 host. CMPXCHG16B, POPCNT, MOVBE and
//! LAHF/SAHF are emulated in software and always advertised.
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

/// An instruction-set extension whose instructions run on the host CPU's own instructions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ext {
    /// SSE3 (CPUID.1:ECX bit 0), including the x87 FISTTP.
    Sse3,
    /// SSSE3 (CPUID.1:ECX bit 9).
    Ssse3,
    /// SSE4.1 (CPUID.1:ECX bit 19).
    Sse41,
    /// SSE4.2 (CPUID.1:ECX bit 20), including CRC32.
    Sse42,
    /// AES-NI (CPUID.1:ECX bit 25).
    Aes,
    /// PCLMULQDQ (CPUID.1:ECX bit 1).
    Pclmul,
    /// RDRAND (CPUID.1:ECX bit 30).
    Rdrand,
    /// RDSEED (CPUID.7.0:EBX bit 18).
    Rdseed,
}

/// Whether the emulator implements (and advertises) extension `e`: whether the host CPU has
/// it. The answer is cached by the standard library, so this is cheap enough to ask on
/// every execution of an instruction.
#[inline]
pub(crate) fn has(e: Ext) -> bool {
    match e {
        Ext::Sse3 => is_x86_feature_detected!("sse3"),
        Ext::Ssse3 => is_x86_feature_detected!("ssse3"),
        Ext::Sse41 => is_x86_feature_detected!("sse4.1"),
        Ext::Sse42 => is_x86_feature_detected!("sse4.2"),
        Ext::Aes => is_x86_feature_detected!("aes"),
        Ext::Pclmul => is_x86_feature_detected!("pclmulqdq"),
        Ext::Rdrand => is_x86_feature_detected!("rdrand"),
        Ext::Rdseed => is_x86_feature_detected!("rdseed"),
    }
}

/// Features in leaf 1 ECX that are always implemented: CX16 (13), MOVBE (22), POPCNT (23).
const LEAF1_ECX_SOFT: u32 = (1 << 13) | (1 << 22) | (1 << 23);

/// Leaf 1 ECX: the software features and the host-replayed extensions the host has.
fn leaf1_ecx() -> u32 {
    [
        (Ext::Sse3, 0),
        (Ext::Pclmul, 1),
        (Ext::Ssse3, 9),
        (Ext::Sse41, 19),
        (Ext::Sse42, 20),
        (Ext::Aes, 25),
        (Ext::Rdrand, 30),
    ]
    .into_iter()
    .filter(|&(e, _)| has(e))
    .fold(LEAF1_ECX_SOFT, |ecx, (_, bit)| ecx | (1 << bit))
}

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

/// Bits of the APIC ID that number the cores of a package of `cpus` vCPUs: ceil(log2(cpus)).
fn core_id_bits(cpus: u8) -> u32 {
    u32::from(cpus.max(1)).next_power_of_two().trailing_zeros()
}

/// Returns (EAX, EBX, ECX, EDX) for leaf `leaf`, subleaf `sub`.
pub(crate) fn cpuid(cpu: &Cpu, leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    let tsc_hz = cpu.config.tsc_hz;
    match leaf {
        0 => (0x16, 0x756e_6547, 0x6c65_746e, 0x4965_6e69), // "GenuineIntel"
        1 => {
            let eax = 0x0001_06ca;
            // EBX: initial APIC ID (31:24), addressable logical processor IDs in the package
            // (23:16, with EDX.HTT when above one), CLFLUSH line size in 8-byte units (15:8).
            let ids = 1u32 << core_id_bits(cpu.config.cpus);
            let ebx = (u32::from(cpu.config.apic_id) << 24) | (ids.min(255) << 16) | (8 << 8);
            let htt = if cpu.config.cpus > 1 { 1 << 28 } else { 0 };
            (eax, ebx, leaf1_ecx(), LEAF1_EDX | htt)
        }
        // Extended topology (SDM Vol. 3A §9.6.2): level 0 is SMT (one thread per core),
        // level 1 the cores (all vCPUs in one package); EAX is the APIC ID shift to the next
        // level, EBX the logical processors at this level, ECX the level number and type,
        // EDX the x2APIC ID (= the APIC ID). Subleaves past the last are invalid (ECX type 0).
        0xb => {
            let id = u32::from(cpu.config.apic_id);
            match sub {
                0 => (0, 1, (1 << 8), id),
                1 => (core_id_bits(cpu.config.cpus), u32::from(cpu.config.cpus.max(1)), (2 << 8) | 1, id),
                _ => (0, 0, sub & 0xff, id),
            }
        }
        // Thermal and power management: ARAT only (the local APIC timer runs in every
        // state, which is true of the emulated one), so Linux trusts it as its tick device.
        6 => (1 << 2, 0, 0, 0),
        // Structured extended features, subleaf 0 (the only one): IA32_TSC_ADJUST, and
        // RDSEED where the host has it.
        7 if sub == 0 => (0, (1 << 1) | if has(Ext::Rdseed) { 1 << 18 } else { 0 }, 0, 0),
        0x15 => (1, 1, u32::try_from(tsc_hz).unwrap_or(u32::MAX), 0),
        0x16 => {
            let mhz = u32::try_from(tsc_hz / 1_000_000).unwrap_or(u32::MAX);
            (mhz, mhz, 100, 0)
        }
        0x8000_0000 => (0x8000_0008, 0, 0, 0),
        // LAHF/SAHF in 64-bit mode (ECX bit 0); SYSCALL, NX, long mode (EDX).
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
        let c = Cpu::new(Vec::new(), CpuConfig { tsc_hz: 1_000_000_000, apic_id: 0, cpus: 1 });
        assert_eq!(cpuid(&c, 6, 0).0 & (1 << 2), 1 << 2, "ARAT");
        assert_eq!(cpuid(&c, 7, 0).1 & !(1 << 18), 1 << 1, "TSC_ADJUST (and maybe RDSEED)");
        assert_eq!(cpuid(&c, 7, 0).0, 0, "no more subleaves");
        assert_eq!(cpuid(&c, 7, 1), (0, 0, 0, 0));
        assert_eq!(cpuid(&c, 0x8000_0007, 0).3, 1 << 8, "invariant TSC");
        assert_eq!(cpuid(&c, 0x15, 0), (1, 1, 1_000_000_000, 0));
    }

    #[test]
    fn topology_is_one_package_of_single_thread_cores() {
        for (cpus, shift) in [(1u8, 0u32), (2, 1), (3, 2), (4, 2), (64, 6)] {
            for id in [0u8, cpus - 1] {
                let c = Cpu::new(Vec::new(), CpuConfig { tsc_hz: 1_000_000_000, apic_id: id, cpus });
                let (_, ebx, _, edx) = cpuid(&c, 1, 0);
                assert_eq!(ebx >> 24, u32::from(id), "leaf 1 initial APIC ID");
                assert_eq!((ebx >> 16) & 0xff, 1 << shift, "leaf 1 addressable IDs");
                assert_eq!(edx & (1 << 28) != 0, cpus > 1, "HTT");
                assert_eq!(cpuid(&c, 0xb, 0), (0, 1, 1 << 8, u32::from(id)), "SMT level");
                assert_eq!(cpuid(&c, 0xb, 1), (shift, u32::from(cpus), (2 << 8) | 1, u32::from(id)), "core level");
                assert_eq!(cpuid(&c, 0xb, 2), (0, 0, 2, u32::from(id)), "invalid level");
            }
        }
    }

    #[test]
    fn feature_bits_match_the_host() {
        let c = Cpu::new(Vec::new(), CpuConfig { tsc_hz: 1_000_000_000, apic_id: 0, cpus: 1 });
        let ecx = cpuid(&c, 1, 0).2;
        assert_eq!(ecx & LEAF1_ECX_SOFT, LEAF1_ECX_SOFT, "CX16, MOVBE, POPCNT");
        let want = [
            (0, is_x86_feature_detected!("sse3")),
            (1, is_x86_feature_detected!("pclmulqdq")),
            (9, is_x86_feature_detected!("ssse3")),
            (19, is_x86_feature_detected!("sse4.1")),
            (20, is_x86_feature_detected!("sse4.2")),
            (25, is_x86_feature_detected!("aes")),
            (30, is_x86_feature_detected!("rdrand")),
        ];
        for (bit, host) in want {
            assert_eq!(ecx & (1 << bit) != 0, host, "leaf 1 ECX bit {bit}");
        }
        // Nothing else: no monitor, VMX, FMA, XSAVE, AVX, F16C, x2APIC, hypervisor bits.
        let known = want.iter().fold(LEAF1_ECX_SOFT, |m, (b, _)| m | (1 << b));
        assert_eq!(ecx & !known, 0);
        assert_eq!(cpuid(&c, 7, 0).1 & (1 << 18) != 0, is_x86_feature_detected!("rdseed"));
        assert_eq!(cpuid(&c, 0x8000_0001, 0).2, 1, "LAHF/SAHF in 64-bit mode only");
    }
}

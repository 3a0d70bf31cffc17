//! Fast forms (`crate::uop::Uop`) to Cranelift IR, one host function per run of them.
//!
//! The generated function has the signature `extern "C" fn(cpu: *mut Cpu, ctx: *mut
//! JitCtx) -> u64` and returns `retired | kind << 32` (see `super::EXIT_*`). Every exit
//! stores the guest registers it changed, RIP, and RFLAGS or, for a pending ADD, SUB,
//! logic operation, INC or DEC, its operands (`JitCtx::lf_kind`, which the next block reads
//! only where it looks at the flags).

use super::{aluop, JitCtx, EXIT_FAULT, EXIT_GP, EXIT_LINK, EXIT_NORMAL};
use crate::alu::Op2;
use crate::cpu::flags::{ARITH, CF, OF, SF, ZF};
use crate::cpu::{ctl, sreg, Cpu, FpuState, Seg};
use crate::decode::{JitFn, Op};
use crate::mmu::{tlb_layout, GEN_CODE, P_EXEC, P_RAM, P_READ, P_USER, P_WRITE, TLB_SIZE, TLB_VALID};
use crate::uop::{FpOp, Lanes, MemOp, Src, Sse, Uop, VShift, VecOp, Xs, HIGH8, NONE};
use cranelift_codegen::binemit::Reloc;
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4, F64, F64X2, I16, I16X8, I32, I32X4, I64, I64X2, I8, I8X16};
use cranelift_codegen::ir::{AbiParam, ConstantData, InstBuilder, MemFlagsData, SigRef, Signature, Type, Value};
use cranelift_codegen::isa::CallConv;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::JITModule;
use cranelift_module::{FuncId, Module};
use iced_x86::ConditionCode;
use iced_x86::Instruction;
use std::mem::offset_of;

/// What the translation of one block depends on besides its instructions.
pub(crate) struct Env {
    /// CPL 3: memory accesses check the U/S permission.
    pub(crate) user: bool,
    /// Address of the block's page code generation (`AtomicU32`).
    pub(crate) gen_ptr: u64,
    /// The generation the block was decoded at: a store that changes it ends the block.
    pub(crate) gen: u32,
    /// The RAM page index of the block.
    pub(crate) page: u64,
    /// Address of the block's two `super::Link`s: [0] for the branch target (JMP, CALL,
    /// taken Jcc), [1] for a Jcc's fall-through.
    pub(crate) links: u64,
    /// Address of copies of the block's instructions (`[Instruction]`, one per
    /// instruction, in order) for [`super::jit_generic`].
    pub(crate) insns: u64,
    /// Address of the jump-cache probe ([`probe`]).
    pub(crate) probe: u64,
}

/// Kind of the pending (not yet materialised) flag computation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pk {
    Add,
    Sub,
    Logic,
    Inc,
    Dec,
    /// An operation whose flags come from `crate::alu` ([`super::jit_alu_flags`], an
    /// [`aluop`] code): shifts, rotates, IMUL, ADC, SBB. `b` is the count of a shift.
    Helper(u64),
}

/// The last flag-setting operation, kept as operands: flags = f(kind, a, b, r) merged into
/// the RFLAGS variable. `a`, `b`, `r` are zero-extended `sz`-byte values.
#[derive(Clone, Copy)]
struct Pending {
    k: Pk,
    sz: u8,
    a: Value,
    b: Value,
    r: Value,
}

impl Pending {
    /// `kind << 8 | size` for [`super::jit_flags`]; None for [`Pk::Helper`] (its flags come
    /// from `crate::alu`).
    fn code(&self) -> Option<u64> {
        let k = match self.k {
            Pk::Add => super::flagk::ADD,
            Pk::Sub => super::flagk::SUB,
            Pk::Logic => super::flagk::LOGIC,
            Pk::Inc => super::flagk::INC,
            Pk::Dec => super::flagk::DEC,
            Pk::Helper(_) => return None,
        };
        Some(k << 8 | u64::from(self.sz))
    }
}

/// Where the arithmetic flags left by the block's predecessor are, at this point of the
/// translation (`JitCtx::lf_kind`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lf {
    /// RFLAGS is the one the context's lazy record gives from the RFLAGS variable (the
    /// variable itself when the record is clear): read only where flags are looked at.
    Live,
    /// A later operation replaced them (the pending one), but the record is still in the
    /// context: exits replace it.
    Stale,
    /// The record is clear (the RFLAGS variable and the pending operations are exact).
    Clear,
}

/// Longest chain of flag operations kept lazily (see `Tr::below`) before it is settled.
const CHAIN: usize = 8;

fn mask(sz: u8) -> i64 {
    match sz {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => -1,
    }
}

fn off(o: usize) -> i32 {
    i32::try_from(o).unwrap_or(i32::MAX)
}

fn gpr_off(r: u8) -> i32 {
    off(offset_of!(Cpu, gpr) + 8 * usize::from(r & 15))
}

/// Offset in the `Cpu` of XMM register `x` (16 bytes, little-endian lanes).
fn xmm_off(x: u8) -> i32 {
    off(offset_of!(Cpu, fpu) + offset_of!(FpuState, xmm) + 16 * usize::from(x & 15))
}

/// MXCSR up to the exception flags under which compiled SSE arithmetic runs on the host
/// as it would on the guest: every exception masked, round to nearest, no DAZ or FTZ
/// (the power-on value, and the host thread's own).
pub(crate) const MXCSR_HOST: u32 = 0x1f80;

struct Tr<'a, 'b> {
    b: FunctionBuilder<'b>,
    env: &'a Env,
    /// The block's instructions.
    ops: &'a [Op],
    cpu: Value,
    ctx: Value,
    regs: [Variable; 16],
    fl: Variable,
    pending: Option<Pending>,
    /// Operations before `pending` whose flags are not in the RFLAGS variable yet, oldest
    /// first: each one's flags depend on the ones before it (INC/DEC keep CF; ADC, SBB,
    /// shifts, rotates and IMUL go through `crate::alu` with the flags before), so they
    /// are materialised, in order, only where flags are observed. ADD, SUB and logic
    /// operations set every arithmetic flag and clear the chain.
    below: Vec<Pending>,
    /// GPRs written so far (stored at every exit).
    written: u16,
    /// RFLAGS variable written so far.
    fl_written: bool,
    /// The predecessor's lazily kept flags (the bottom of the chain below `below`).
    lf: Lf,
    /// Instructions retired by earlier passes of a block that loops onto itself.
    done: Variable,
    sig_read: SigRef,
    sig_write: SigRef,
    sig_note: SigRef,
    /// `crate::sse::jit_aes`.
    sig_aes: SigRef,
    sig_gen: SigRef,
    sig_flags: SigRef,
    /// Compiled blocks' own signature (links are followed by tail calls).
    sig_block: SigRef,
    /// [`probe`]'s signature.
    sig_probe: SigRef,
    /// GPRs the block names (loaded at entry, reloaded after an interpreted instruction).
    used: u16,
    /// The block loops onto itself: every exit stores every register in `used`.
    self_loop: bool,
    /// Constants made in the current IR block (see `k`): the block, and each constant.
    consts: (Option<cranelift_codegen::ir::Block>, Vec<(Type, i64, Value)>),
    /// `ctx.tlb`, loaded once at entry.
    tlb: Value,
}

/// Flags of accesses to the `Cpu`, the context and the TLB (aligned, never trapping).
const MF: MemFlagsData = MemFlagsData::trusted();

/// Flags of guest RAM accesses (never trapping: the TLB maps them; maybe unaligned).
fn gm() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

impl Tr<'_, '_> {
    fn iconst(&mut self, v: u64) -> Value {
        self.k(I64, v as i64)
    }

    /// The constant `v` of type `ty`, made once per IR block where it is used. (Made once
    /// in the entry block, constants that instruction selection could not fold into an
    /// immediate lived in registers across the whole function: callee-saved ones, saved
    /// and restored by every block's prologue and exits.)
    fn k(&mut self, ty: Type, v: i64) -> Value {
        let cur = self.b.current_block();
        if self.consts.0 != cur {
            // Kept allocated: this runs for every IR block the translator emits into.
            self.consts.0 = cur;
            self.consts.1.clear();
        }
        if let Some(&(_, _, x)) = self.consts.1.iter().find(|c| c.0 == ty && c.1 == v) {
            return x;
        }
        let x = self.b.ins().iconst(ty, v);
        self.consts.1.push((ty, v, x));
        x
    }

    fn ty(&self, x: Value) -> Type {
        self.b.func.dfg.value_type(x)
    }

    /// `x & c`. Masks to the low 8, 16 or 32 bits of a 64-bit value are zero extensions
    /// (one MOVZX or 32-bit MOV, no immediate: `0xffff_ffff` does not fit one).
    fn andi(&mut self, x: Value, c: i64) -> Value {
        let ty = self.ty(x);
        if c == -1 {
            return x;
        }
        if ty == I64 {
            let narrow = match c {
                0xff => Some(I8),
                0xffff => Some(I16),
                0xffff_ffff => Some(I32),
                _ => None,
            };
            if let Some(t) = narrow {
                let n = self.b.ins().ireduce(t, x);
                return self.b.ins().uextend(I64, n);
            }
        }
        let k = self.k(ty, c);
        self.b.ins().band(x, k)
    }

    fn ori(&mut self, x: Value, c: i64) -> Value {
        if c == 0 {
            return x;
        }
        let k = self.k(self.ty(x), c);
        self.b.ins().bor(x, k)
    }

    fn xori(&mut self, x: Value, c: i64) -> Value {
        let k = self.k(self.ty(x), c);
        self.b.ins().bxor(x, k)
    }

    fn addi(&mut self, x: Value, c: i64) -> Value {
        let k = self.k(self.ty(x), c);
        self.b.ins().iadd(x, k)
    }

    fn muli(&mut self, x: Value, c: i64) -> Value {
        let k = self.k(self.ty(x), c);
        self.b.ins().imul(x, k)
    }

    fn shli(&mut self, x: Value, c: i64) -> Value {
        let k = self.k(I64, c);
        self.b.ins().ishl(x, k)
    }

    fn ushri(&mut self, x: Value, c: i64) -> Value {
        let k = self.k(I64, c);
        self.b.ins().ushr(x, k)
    }

    fn sshri(&mut self, x: Value, c: i64) -> Value {
        let k = self.k(I64, c);
        self.b.ins().sshr(x, k)
    }

    fn cmpi(&mut self, cc: IntCC, x: Value, c: i64) -> Value {
        let k = self.k(self.ty(x), c);
        self.b.ins().icmp(cc, x, k)
    }

    fn reg(&mut self, r: u8) -> Value {
        let v = self.regs.get(usize::from(r & 15)).copied().unwrap_or(self.fl);
        self.b.use_var(v)
    }

    /// The one result of a helper call (its signature returns one I64).
    fn result(&mut self, call: cranelift_codegen::ir::Inst) -> Value {
        match self.b.inst_results(call).first() {
            Some(&v) => v,
            None => self.b.ins().iconst(I64, 0),
        }
    }

    fn set_reg64(&mut self, r: u8, v: Value) {
        let var = self.regs.get(usize::from(r & 15)).copied().unwrap_or(self.fl);
        self.b.def_var(var, v);
        self.written |= 1 << (r & 15);
    }

    /// Writes a 32/64-bit result as MOV does (32-bit writes zero-extend).
    fn set_reg(&mut self, r: u8, v: Value, sz: u8) {
        let v = match sz {
            // 8- and 16-bit writes keep the rest of the register.
            1 | 2 => {
                let old = self.reg(r);
                let keep = self.andi(old, !mask(sz));
                let low = self.andi(v, mask(sz));
                self.b.ins().bor(keep, low)
            }
            4 => self.andi(v, 0xffff_ffff),
            _ => v,
        };
        self.set_reg64(r, v);
    }

    fn masked(&mut self, v: Value, sz: u8) -> Value {
        if sz == 8 {
            v
        } else {
            self.andi(v, mask(sz))
        }
    }

    /// Effective address of a memory operand: base + (index << scale) + displacement (what
    /// LEA computes; no segment base).
    fn ea(&mut self, m: &MemOp) -> Value {
        let mut a = None;
        if m.base != NONE {
            a = Some(self.reg(m.base));
        }
        if m.index != NONE {
            let r = self.reg(m.index);
            let s = if m.scale == 0 { r } else { self.shli(r, i64::from(m.scale)) };
            a = Some(match a {
                Some(x) => self.b.ins().iadd(x, s),
                None => s,
            });
        }
        match a {
            Some(x) if m.disp == 0 => x,
            Some(x) => self.addi(x, m.disp as i64),
            None => self.iconst(m.disp),
        }
    }

    /// Linear address of a memory operand.
    fn la(&mut self, m: &MemOp) -> Value {
        let mut a = self.ea(m);
        let seg = match m.seg {
            1 => Some(sreg::FS),
            2 => Some(sreg::GS),
            _ => None,
        };
        if let Some(s) = seg {
            let o = off(offset_of!(Cpu, seg) + s * std::mem::size_of::<Seg>() + offset_of!(Seg, base));
            let base = self.b.ins().load(I64, MF, self.cpu, o);
            a = self.b.ins().iadd(a, base);
        }
        a
    }

    /// The full RFLAGS value now (materialising the chained and pending operations).
    fn flags(&mut self) -> Value {
        let old = self.base(false);
        match self.pending {
            Some(p) => self.apply(p, old),
            None => old,
        }
    }

    /// RFLAGS before the pending operation: the RFLAGS variable (materialised from the
    /// predecessor's lazy record while that is live) with the chained operations applied.
    /// `cold`: on a rarely taken path, through calls to [`super::jit_flags`] rather than
    /// inline code where it can.
    fn base(&mut self, cold: bool) -> Value {
        let mut f = if self.lf == Lf::Live { self.materialize_lazy() } else { self.b.use_var(self.fl) };
        for i in 0..self.below.len() {
            let Some(&p) = self.below.get(i) else { break };
            f = match p.code() {
                Some(ks) if cold => self.flags_call(ks, p, f),
                _ => self.apply(p, f),
            };
        }
        f
    }

    /// RFLAGS after pending operation `p` (kind and size `ks`) from `old`, through a call
    /// to [`super::jit_flags`].
    fn flags_call(&mut self, ks: u64, p: Pending, old: Value) -> Value {
        let ks = self.iconst(ks);
        let fp = self.iconst(super::jit_flags as *const () as u64);
        let call = self.b.ins().call_indirect(self.sig_flags, fp, &[ks, p.a, p.b, p.r, old]);
        self.result(call)
    }

    /// The RFLAGS variable = RFLAGS from the predecessor's lazy record (`JitCtx::lf_kind`,
    /// cleared) where the record is set; returns it. It leaves the translation's state
    /// (`lf`) as it is: on a path that joins others again the record and the variable
    /// still give RFLAGS (callers on the main path make `lf` [`Lf::Clear`]).
    fn materialize_lazy(&mut self) -> Value {
        let old = self.b.use_var(self.fl);
        let kind = self.b.ins().load(I64, MF, self.ctx, off(offset_of!(JitCtx, lf_kind)));
        let set = self.b.create_block();
        let join = self.b.create_block();
        let f = self.b.append_block_param(join, I64);
        self.b.ins().brif(kind, set, &[], join, &[old.into()]);
        self.b.switch_to_block(set);
        let v = lazy_flags(&mut self.b, self.ctx, kind, old, self.sig_flags);
        self.b.ins().jump(join, &[v.into()]);
        self.b.switch_to_block(join);
        self.b.def_var(self.fl, f);
        self.fl_written = true;
        f
    }

    /// Makes `p` the pending flag operation (see `below`).
    fn set_pending(&mut self, p: Pending) {
        if matches!(p.k, Pk::Add | Pk::Sub | Pk::Logic) {
            self.below.clear();
            if self.lf == Lf::Live {
                self.lf = Lf::Stale;
            }
        } else if let Some(prev) = self.pending.take() {
            if self.below.len() < CHAIN {
                self.below.push(prev);
            } else {
                self.pending = Some(prev);
                self.settle();
            }
        }
        self.pending = Some(p);
    }

    /// RFLAGS after pending operation `p` from RFLAGS `old` (inline code, or the call to
    /// `crate::alu` for [`Pk::Helper`]).
    fn apply(&mut self, p: Pending, old: Value) -> Value {
        if let Pk::Helper(code) = p.k {
            let c = self.iconst(code);
            let s = self.iconst(u64::from(p.sz));
            let fp = self.iconst(super::jit_alu_flags as *const () as u64);
            let call = self.b.ins().call_indirect(self.sig_flags, fp, &[c, s, p.a, p.b, old]);
            return self.result(call);
        }
        let bits = i64::from(p.sz) * 8;
        // `a`, `b` and `r` are zero-extended: bit `bits - 1` shifted down is 0 or 1.
        let (cf, of, af) = match p.k {
            Pk::Logic | Pk::Helper(_) => (None, None, None),
            Pk::Add | Pk::Sub | Pk::Inc | Pk::Dec => {
                let add = matches!(p.k, Pk::Add | Pk::Inc);
                let cf = if matches!(p.k, Pk::Inc | Pk::Dec) {
                    self.andi(old, CF as i64)
                } else {
                    let c = if add {
                        self.b.ins().icmp(IntCC::UnsignedLessThan, p.r, p.a)
                    } else {
                        self.b.ins().icmp(IntCC::UnsignedLessThan, p.a, p.b)
                    };
                    self.b.ins().uextend(I64, c)
                };
                // OF: add: (a ^ r) & (b ^ r); sub: (a ^ b) & (a ^ r); top bit.
                let x = if add {
                    let t1 = self.b.ins().bxor(p.a, p.r);
                    let t2 = self.b.ins().bxor(p.b, p.r);
                    self.b.ins().band(t1, t2)
                } else {
                    let t1 = self.b.ins().bxor(p.a, p.b);
                    let t2 = self.b.ins().bxor(p.a, p.r);
                    self.b.ins().band(t1, t2)
                };
                let o = self.ushri(x, bits - 1);
                let of = self.shli(o, 11);
                let t = self.b.ins().bxor(p.a, p.b);
                let t = self.b.ins().bxor(t, p.r);
                let af = self.andi(t, 0x10);
                (Some(cf), Some(of), Some(af))
            }
        };
        let z = self.cmpi(IntCC::Equal, p.r, 0);
        let z = self.b.ins().uextend(I64, z);
        let zf = self.shli(z, 6);
        let s = self.ushri(p.r, bits - 1);
        let sf = self.shli(s, 7);
        let lo = self.andi(p.r, 0xff);
        let pc = self.b.ins().popcnt(lo);
        let pc = self.andi(pc, 1);
        let pc = self.xori(pc, 1);
        let pf = self.shli(pc, 2);
        let keep = if matches!(p.k, Pk::Inc | Pk::Dec) { !(ARITH & !CF) } else { !ARITH };
        let mut f = self.andi(old, keep as i64);
        for x in [cf, of, af].into_iter().flatten() {
            f = self.b.ins().bor(f, x);
        }
        let f = self.b.ins().bor(f, zf);
        let f = self.b.ins().bor(f, sf);
        self.b.ins().bor(f, pf)
    }

    /// Materialises the chained and pending flags into the RFLAGS variable.
    fn settle(&mut self) {
        if self.pending.is_some() {
            let f = self.flags();
            self.b.def_var(self.fl, f);
            self.pending = None;
            self.below.clear();
            self.fl_written = true;
        } else if self.lf == Lf::Live {
            self.materialize_lazy();
        }
        if self.lf == Lf::Live {
            self.lf = Lf::Clear;
        }
    }

    /// CF now, as 0 or 1 (for ADC and SBB): from the pending operation's operands when it
    /// is an ADD, SUB or logic operation, else from the settled RFLAGS.
    fn carry(&mut self) -> Value {
        if self.pending.is_some_and(|p| matches!(p.k, Pk::Add | Pk::Sub | Pk::Logic)) {
            let c = self.cond(ConditionCode::b);
            return self.b.ins().uextend(I64, c);
        }
        self.settle();
        let f = self.b.use_var(self.fl);
        self.andi(f, CF as i64)
    }

    fn flag_bit(&mut self, f: Value, bit: u64) -> Value {
        let t = self.andi(f, bit as i64);
        self.cmpi(IntCC::NotEqual, t, 0)
    }

    /// Condition `cc` as an I8 boolean.
    fn cond(&mut self, cc: ConditionCode) -> Value {
        use ConditionCode as C;
        if let Some(p) = self.pending.filter(|p| match p.k {
            // Only shifts set ZF and SF from the result (rotates keep them, IMUL leaves
            // them undefined): their fast forms are below; the rest ask crate::alu.
            Pk::Helper(c) => {
                matches!(c, aluop::SHL | aluop::SHR | aluop::SAR) && matches!(cc, C::e | C::ne | C::s | C::ns)
            }
            _ => true,
        }) {
            let bits = i64::from(p.sz) * 8;
            let sign = |t: &mut Self, v: Value| {
                let s = t.andi(v, 1i64.wrapping_shl(u32::try_from(bits - 1).unwrap_or(63)));
                t.cmpi(IntCC::NotEqual, s, 0)
            };
            let sx = |t: &mut Self, v: Value| if bits == 64 { v } else { t.shli(v, 64 - bits) };
            let fast = match (p.k, cc) {
                (_, C::e) => Some(self.cmpi(IntCC::Equal, p.r, 0)),
                (_, C::ne) => Some(self.cmpi(IntCC::NotEqual, p.r, 0)),
                (_, C::s) => Some(sign(self, p.r)),
                (_, C::ns) => {
                    let s = sign(self, p.r);
                    Some(self.xori(s, 1))
                }
                (Pk::Sub, C::b) => Some(self.b.ins().icmp(IntCC::UnsignedLessThan, p.a, p.b)),
                (Pk::Sub, C::ae) => Some(self.b.ins().icmp(IntCC::UnsignedGreaterThanOrEqual, p.a, p.b)),
                (Pk::Sub, C::be) => Some(self.b.ins().icmp(IntCC::UnsignedLessThanOrEqual, p.a, p.b)),
                (Pk::Sub, C::a) => Some(self.b.ins().icmp(IntCC::UnsignedGreaterThan, p.a, p.b)),
                (Pk::Sub, C::l | C::ge | C::le | C::g) => {
                    let a = sx(self, p.a);
                    let b = sx(self, p.b);
                    let c = match cc {
                        C::l => IntCC::SignedLessThan,
                        C::ge => IntCC::SignedGreaterThanOrEqual,
                        C::le => IntCC::SignedLessThanOrEqual,
                        _ => IntCC::SignedGreaterThan,
                    };
                    Some(self.b.ins().icmp(c, a, b))
                }
                (Pk::Add, C::b) => Some(self.b.ins().icmp(IntCC::UnsignedLessThan, p.r, p.a)),
                (Pk::Add, C::ae) => Some(self.b.ins().icmp(IntCC::UnsignedGreaterThanOrEqual, p.r, p.a)),
                (Pk::Logic, C::b | C::o) => Some(self.b.ins().iconst(I8, 0)),
                (Pk::Logic, C::ae | C::no) => Some(self.b.ins().iconst(I8, 1)),
                (Pk::Logic, C::be) => Some(self.cmpi(IntCC::Equal, p.r, 0)),
                (Pk::Logic, C::a) => Some(self.cmpi(IntCC::NotEqual, p.r, 0)),
                (Pk::Logic, C::l | C::ge | C::le | C::g) => {
                    let r = sx(self, p.r);
                    let c = match cc {
                        C::l => IntCC::SignedLessThan,
                        C::ge => IntCC::SignedGreaterThanOrEqual,
                        C::le => IntCC::SignedLessThanOrEqual,
                        _ => IntCC::SignedGreaterThan,
                    };
                    Some(self.cmpi(c, r, 0))
                }
                _ => None,
            };
            if let Some(v) = fast {
                return v;
            }
        }
        // Settled, so that further conditions on the same flags reuse them.
        self.settle();
        let f = self.b.use_var(self.fl);
        let bit = |t: &mut Self, b: u64| t.flag_bit(f, b);
        let not = |t: &mut Self, v: Value| t.xori(v, 1);
        match cc {
            C::o => bit(self, OF),
            C::no => {
                let v = bit(self, OF);
                not(self, v)
            }
            C::b => bit(self, CF),
            C::ae => {
                let v = bit(self, CF);
                not(self, v)
            }
            C::e => bit(self, ZF),
            C::ne => {
                let v = bit(self, ZF);
                not(self, v)
            }
            C::be => bit(self, CF | ZF),
            C::a => {
                let v = bit(self, CF | ZF);
                not(self, v)
            }
            C::s => bit(self, SF),
            C::ns => {
                let v = bit(self, SF);
                not(self, v)
            }
            C::p => bit(self, crate::cpu::flags::PF),
            C::np => {
                let v = bit(self, crate::cpu::flags::PF);
                not(self, v)
            }
            C::l | C::ge | C::le | C::g => {
                let s = bit(self, SF);
                let o = bit(self, OF);
                let lt = self.b.ins().bxor(s, o);
                match cc {
                    C::l => lt,
                    C::ge => not(self, lt),
                    C::le => {
                        let z = bit(self, ZF);
                        self.b.ins().bor(z, lt)
                    }
                    _ => {
                        let z = bit(self, ZF);
                        let le = self.b.ins().bor(z, lt);
                        not(self, le)
                    }
                }
            }
            C::None => self.b.ins().iconst(I8, 1),
        }
    }

    /// Stores changed state, RIP = `rip`, and returns `n | kind << 32`.
    fn exit(&mut self, rip: Value, n: u64, kind: u64) {
        self.exit_as(rip, n, kind, false);
    }

    /// [`Self::exit`] on a rarely taken path: pending flags are materialised by a call to
    /// [`super::jit_flags`] rather than inline (less code to compile).
    fn exit_cold(&mut self, rip: Value, n: u64, kind: u64) {
        self.exit_as(rip, n, kind, true);
    }

    /// Stores changed state and RIP = `rip` and goes on in the compiled block at `rip`
    /// through the jump cache ([`probe`]), else returns like [`Self::exit`] with
    /// [`EXIT_NORMAL`].
    fn exit_probe(&mut self, rip: Value, n: u64) {
        let total = self.leave(rip, n, false);
        let p = self.iconst(self.env.probe);
        self.b.ins().return_call_indirect(self.sig_probe, p, &[self.cpu, self.ctx, total]);
    }

    fn exit_as(&mut self, rip: Value, n: u64, kind: u64, cold: bool) {
        let total = self.leave(rip, n, cold);
        let code = self.addi(total, (kind << 32) as i64);
        self.b.ins().return_(&[code]);
    }

    /// Stores changed state and RIP = `rip` for leaving after the block's first `n`
    /// instructions; returns the instructions this function retired (earlier passes of a
    /// self-loop included).
    fn leave(&mut self, rip: Value, n: u64, cold: bool) -> Value {
        self.store_exit(cold);
        self.b.ins().store(MF, rip, self.cpu, off(offset_of!(Cpu, rip)));
        let d = self.b.use_var(self.done);
        self.addi(d, n as i64)
    }

    /// Exit to a constant `target` after `n` instructions, through link `k`. A filled link
    /// is followed right here, by a tail call of the target's code, when its length fits in
    /// `JitCtx::left` and the target's page kept its generation (for a target on the block's
    /// page (`start`), this block's page: the target translates to it as this block did);
    /// a target on another page must also still translate to the link's GPA through a TLB
    /// entry that allows execution, else the probe takes the exit. Instructions retired so
    /// far are taken from `JitCtx::left`. A link not filled yet goes to the probe with the
    /// link in `JitCtx::link`: it goes on in the target's baseline code, or returns
    /// [`EXIT_LINK`] (so that `enter` fills the link with Cranelift code). Otherwise the
    /// block returns [`EXIT_LINK`].
    fn exit_to(&mut self, target: u64, n: u64, k: u64, start: u64) {
        let rip = self.iconst(target);
        let far = target & !0xfff != start & !0xfff;
        let l = self.iconst(self.env.links + k * std::mem::size_of::<super::Link>() as u64);
        let total = self.leave(rip, n, false);
        // One compare and branch per condition (each icmp fuses with its brif).
        let follow = self.b.create_block();
        let back = self.b.create_block();
        let (fits_at, gen_at) = (self.b.create_block(), self.b.create_block());
        let unfilled = self.b.create_block();
        let f = self.b.ins().load(I64, MF, l, off(offset_of!(super::Link, f)));
        let linked = self.cmpi(IntCC::NotEqual, f, 0);
        self.b.ins().brif(linked, fits_at, &[], unfilled, &[]);
        self.b.switch_to_block(fits_at);
        let len = self.b.ins().load(I64, MF, l, off(offset_of!(super::Link, len)));
        let need = self.b.ins().iadd(total, len);
        let left = self.b.ins().load(I64, MF, self.ctx, off(offset_of!(JitCtx, left)));
        let fits = self.b.ins().icmp(IntCC::UnsignedLessThanOrEqual, need, left);
        self.b.ins().brif(fits, gen_at, &[], back, &[]);
        self.b.switch_to_block(gen_at);
        if far {
            let probe = self.b.create_block();
            let check = |t: &mut Self, ok: Value| {
                let next = t.b.create_block();
                t.b.ins().brif(ok, next, &[], probe, &[]);
                t.b.switch_to_block(next);
            };
            // The target's page kept its generation.
            let gens = self.b.ins().load(I64, MF, self.ctx, off(offset_of!(JitCtx, gens)));
            let page = self.b.ins().load(I64, MF, l, off(offset_of!(super::Link, page)));
            let ga = self.muli(page, 4);
            let ga = self.b.ins().iadd(gens, ga);
            let g = self.b.ins().uload32(MemFlagsData::new(), ga, 0);
            let lg = self.b.ins().load(I64, MF, l, off(offset_of!(super::Link, gen)));
            let c = self.b.ins().icmp(IntCC::Equal, g, lg);
            check(self, c);
            // RIP's TLB entry, as `Cpu::translate` hits it for an instruction fetch.
            let idx = (target >> 12) & (TLB_SIZE as u64 - 1);
            let te = self.b.ins().iadd_imm_s(self.tlb, (idx * tlb_layout::SIZE as u64) as i64);
            let tag = self.b.ins().load(I64, MF, te, off(tlb_layout::TAG));
            let c = self.cmpi(IntCC::Equal, tag, ((target & !0xfff) | TLB_VALID) as i64);
            check(self, c);
            let c = self.tlb_allows(te, P_EXEC | if self.env.user { P_USER } else { 0 });
            check(self, c);
            let tgpa = self.b.ins().load(I64, MF, te, off(tlb_layout::GPA));
            let lgpa = self.b.ins().load(I64, MF, l, off(offset_of!(super::Link, gpa)));
            let c = self.b.ins().icmp(IntCC::Equal, tgpa, lgpa);
            self.b.ins().brif(c, follow, &[], probe, &[]);
            // The translation or the code changed (or the TLB entry went): the probe looks.
            self.b.switch_to_block(probe);
            let p = self.iconst(self.env.probe);
            self.b.ins().return_call_indirect(self.sig_probe, p, &[self.cpu, self.ctx, total]);
        } else {
            let p = self.iconst(self.env.gen_ptr);
            let g = self.b.ins().load(I32, MemFlagsData::new(), p, 0);
            let same = self.cmpi(IntCC::Equal, g, i64::from(self.env.gen));
            self.b.ins().brif(same, follow, &[], back, &[]);
        }
        self.b.switch_to_block(follow);
        follow_to(&mut self.b, [self.cpu, self.ctx], left, total, f, self.sig_block);
        // Not filled (the target has no Cranelift code yet, or it was not run yet): the
        // probe goes on in the target's baseline code, else returns EXIT_LINK.
        self.b.switch_to_block(unfilled);
        self.store_link(l, far);
        let p = self.iconst(self.env.probe);
        self.b.ins().return_call_indirect(self.sig_probe, p, &[self.cpu, self.ctx, total]);
        self.b.switch_to_block(back);
        self.store_link(l, far);
        let code = self.addi(total, (EXIT_LINK << 32) as i64);
        self.b.ins().return_(&[code]);
    }

    /// `JitCtx::link` = `l` with this block's page (`super::FAR_LINK` for a link to
    /// another page) and generation (an EXIT_LINK's).
    fn store_link(&mut self, l: Value, far: bool) {
        self.b.ins().store(MF, l, self.ctx, off(offset_of!(JitCtx, link)));
        let page = self.iconst(if far { super::FAR_LINK } else { self.env.page });
        self.b.ins().store(MF, page, self.ctx, off(offset_of!(JitCtx, link_page)));
        let gen = self.iconst(u64::from(self.env.gen));
        self.b.ins().store(MF, gen, self.ctx, off(offset_of!(JitCtx, link_gen)));
    }

    /// The last instruction of a block when it is a JMP, CALL or Jcc: exits through links.
    fn branch(&mut self, op: &Op, i: usize, start: u64) {
        let n = i as u64 + 1;
        match op.uop {
            Uop::Jcc { cc, target } => {
                let c = self.cond(cc);
                // Exactly one of the two exits runs: the state they both store is stored
                // once, before the branch (the same code at run time, half the IR).
                self.store_before_exits();
                let taken = self.b.create_block();
                let not = self.b.create_block();
                self.b.ins().brif(c, taken, &[], not, &[]);
                self.b.switch_to_block(taken);
                self.exit_to(target, n, 0, start);
                self.b.switch_to_block(not);
                self.exit_to(op.next_ip, n, 1, start);
            }
            Uop::Jmp { target } => self.exit_to(target, n, 0, start),
            Uop::Call { target } => {
                let ret = self.iconst(op.next_ip);
                self.push(ret, op, i);
                self.exit_to(target, n, 0, start);
            }
            _ => {}
        }
    }

    /// A branch target `t` of instruction `i` must be canonical: #GP(0) exit otherwise
    /// (SDM Vol. 2 RET, JMP, CALL in 64-bit mode).
    fn check_canonical(&mut self, t: Value, op: &Op, i: usize) {
        let sx = self.shli(t, 16);
        let sx = self.sshri(sx, 16);
        let bad = self.b.ins().icmp(IntCC::NotEqual, sx, t);
        self.exit_if(bad, op, i, EXIT_GP);
    }

    /// Checks ctx.faulted after a helper call: branches to instruction `i`'s fault exit.
    fn check_fault(&mut self, op: &Op, i: usize) {
        let f = self.b.ins().load(I64, MF, self.ctx, off(offset_of!(JitCtx, faulted)));
        self.exit_if(f, op, i, EXIT_FAULT);
    }

    /// Where `bad` is non-zero: the cold exit `kind` as instruction `i` (RIP its own, state
    /// before it); code goes on after it otherwise.
    fn exit_if(&mut self, bad: Value, op: &Op, i: usize, kind: u64) {
        let out = self.b.create_block();
        let cont = self.b.create_block();
        self.b.set_cold_block(out);
        self.b.ins().brif(bad, out, &[], cont, &[]);
        self.b.switch_to_block(out);
        let rip = self.iconst(op.ip);
        self.exit_cold(rip, i as u64 + 1, kind);
        self.b.switch_to_block(cont);
    }

    /// The TLB entry for an access of `size` bytes at `la`, its tag, the tag a hit has and
    /// the permissions it needs: RAM (not MMIO), the access allowed, and the page of the
    /// last byte the entry's (an access that crosses into the next page cannot match: that
    /// page has another slot).
    fn tlb_parts(&mut self, la: Value, size: u8, write: bool) -> (Value, Value, Value, u8) {
        let need = P_RAM | (if write { P_WRITE } else { P_READ }) | if self.env.user { P_USER } else { 0 };
        let idx = self.ushri(la, 12);
        let idx = self.andi(idx, (TLB_SIZE - 1) as i64);
        let idx = self.muli(idx, tlb_layout::SIZE as i64);
        let e = self.b.ins().iadd(self.tlb, idx);
        let tag = self.b.ins().load(I64, MF, e, off(tlb_layout::TAG));
        let last = if size > 1 { self.addi(la, i64::from(size) - 1) } else { la };
        let pg = self.andi(last, !0xfff);
        let want = self.ori(pg, TLB_VALID as i64);
        (e, tag, want, need)
    }

    /// Whether TLB entry `e` allows an access that needs permissions `need`.
    fn tlb_allows(&mut self, e: Value, need: u8) -> Value {
        let perm = self.b.ins().uload8(I32, MF, e, off(tlb_layout::PERM));
        let pm = self.andi(perm, i64::from(need));
        self.cmpi(IntCC::Equal, pm, i64::from(need))
    }

    /// The host address of `la` through TLB entry `e` (a hit).
    fn tlb_host(&mut self, e: Value, la: Value) -> Value {
        let host = self.b.ins().load(I64, MF, e, off(tlb_layout::HOST));
        let o = self.andi(la, 0xfff);
        self.b.ins().iadd(host, o)
    }

    /// The TLB-hit test for an access of `size` bytes at `la`: branches to `slow` on a miss
    /// and goes on (in a new block) on a hit, with the host address and the TLB entry.
    fn tlb_hit(&mut self, la: Value, size: u8, write: bool, slow: cranelift_codegen::ir::Block) -> (Value, Value) {
        let (e, tag, want, need) = self.tlb_parts(la, size, write);
        // One compare and branch per condition (each icmp fuses with its brif).
        let c1 = self.b.ins().icmp(IntCC::Equal, tag, want);
        let (perm_at, fast) = (self.b.create_block(), self.b.create_block());
        self.b.ins().brif(c1, perm_at, &[], slow, &[]);
        self.b.switch_to_block(perm_at);
        let c2 = self.tlb_allows(e, need);
        self.b.ins().brif(c2, fast, &[], slow, &[]);
        self.b.switch_to_block(fast);
        (self.tlb_host(e, la), e)
    }

    /// The TLB-hit test for an access of `size` bytes at `la` as a condition (for the SSE
    /// forms' combined checks): (condition, host address, TLB entry).
    fn tlb_cond(&mut self, la: Value, size: u8, write: bool) -> (Value, Value, Value) {
        let (e, tag, want, need) = self.tlb_parts(la, size, write);
        let c1 = self.b.ins().icmp(IntCC::Equal, tag, want);
        let c2 = self.tlb_allows(e, need);
        let c = self.b.ins().band(c1, c2);
        (c, self.tlb_host(e, la), e)
    }

    /// Reads `size` bytes at `la` (zero-extended); a fault exits as instruction `i`.
    fn read(&mut self, la: Value, size: u8, op: &Op, i: usize) -> Value {
        let slow = self.b.create_block();
        let join = self.b.create_block();
        self.b.set_cold_block(slow);
        let t = self.b.declare_var(I64);
        let (addr, _) = self.tlb_hit(la, size, false, slow);
        let v = match size {
            1 => self.b.ins().uload8(I64, gm(), addr, 0),
            2 => self.b.ins().uload16(I64, gm(), addr, 0),
            4 => self.b.ins().uload32(gm(), addr, 0),
            _ => self.b.ins().load(I64, gm(), addr, 0),
        };
        self.b.def_var(t, v);
        self.b.ins().jump(join, &[]);
        self.b.switch_to_block(slow);
        let sz = self.iconst(u64::from(size));
        let f = self.iconst(super::jit_read as *const () as u64);
        let call = self.b.ins().call_indirect(self.sig_read, f, &[self.cpu, self.ctx, la, sz]);
        let v = self.result(call);
        self.b.def_var(t, v);
        self.check_fault(op, i);
        self.b.ins().jump(join, &[]);
        self.b.switch_to_block(join);
        self.b.use_var(t)
    }

    /// Writes the low `size` bytes of `v` at `la`; a fault exits as instruction `i`.
    fn write(&mut self, la: Value, size: u8, v: Value, op: &Op, i: usize) {
        let slow = self.b.create_block();
        let note = self.b.create_block();
        let join = self.b.create_block();
        self.b.set_cold_block(slow);
        self.b.set_cold_block(note);
        let (addr, e) = self.tlb_hit(la, size, true, slow);
        match size {
            1 => {
                self.b.ins().istore8(gm(), v, addr, 0);
            }
            2 => {
                self.b.ins().istore16(gm(), v, addr, 0);
            }
            4 => {
                self.b.ins().istore32(gm(), v, addr, 0);
            }
            _ => {
                self.b.ins().store(gm(), v, addr, 0);
            }
        }
        self.note_store(e, note, join);
        self.b.switch_to_block(slow);
        let sz = self.iconst(u64::from(size));
        let f = self.iconst(super::jit_write as *const () as u64);
        self.b.ins().call_indirect(self.sig_write, f, &[self.cpu, self.ctx, la, sz, v]);
        self.check_fault(op, i);
        self.b.ins().jump(join, &[]);
        self.b.switch_to_block(join);
    }

    /// After a store through TLB entry `e` (the current block ends here): retires code on
    /// the page if it holds any (`PageGen::written`, called in the cold block `note`), then
    /// goes on at `join`.
    fn note_store(&mut self, e: Value, note: cranelift_codegen::ir::Block, join: cranelift_codegen::ir::Block) {
        let g = self.b.ins().load(I64, MF, e, off(tlb_layout::GEN));
        let gz = self.cmpi(IntCC::Equal, g, 0);
        let chk = self.b.create_block();
        self.b.ins().brif(gz, join, &[], chk, &[]);
        self.b.switch_to_block(chk);
        let gv = self.b.ins().load(I32, MemFlagsData::new(), g, 0);
        let code = self.andi(gv, i64::from(GEN_CODE));
        self.b.ins().brif(code, note, &[], join, &[]);
        self.b.switch_to_block(note);
        let f = self.iconst(super::jit_note_write as *const () as u64);
        self.b.ins().call_indirect(self.sig_note, f, &[g]);
        self.b.ins().jump(join, &[]);
    }

    /// After a store by instruction `i`: if the block's own page changed generation, end
    /// here (RIP = `next`).
    fn check_gen(&mut self, next: u64, i: usize) {
        let p = self.iconst(self.env.gen_ptr);
        let g = self.b.ins().load(I32, MemFlagsData::new(), p, 0);
        let same = self.cmpi(IntCC::Equal, g, i64::from(self.env.gen));
        let out = self.b.create_block();
        let cont = self.b.create_block();
        self.b.set_cold_block(out);
        self.b.ins().brif(same, cont, &[], out, &[]);
        self.b.switch_to_block(out);
        let rip = self.iconst(next);
        self.exit_cold(rip, i as u64 + 1, EXIT_NORMAL);
        self.b.switch_to_block(cont);
    }

    fn src(&mut self, s: Src, sz: u8, op: &Op, i: usize) -> Value {
        match s {
            Src::Reg(r) => {
                let v = self.reg(r);
                self.masked(v, sz)
            }
            Src::Imm(v) => self.iconst(v),
            Src::Mem(m) => {
                let la = self.la(&m);
                self.read(la, sz, op, i)
            }
        }
    }

    /// Result and lazy flags of ADD/SUB/AND/OR/XOR at `sz`.
    fn arith(&mut self, o: Op2, sz: u8, a: Value, b: Value) -> (Value, Pending) {
        let (r, k) = match o {
            Op2::Add => (self.b.ins().iadd(a, b), Pk::Add),
            Op2::Sub => (self.b.ins().isub(a, b), Pk::Sub),
            Op2::And => (self.b.ins().band(a, b), Pk::Logic),
            Op2::Or => (self.b.ins().bor(a, b), Pk::Logic),
            _ => (self.b.ins().bxor(a, b), Pk::Logic),
        };
        let r = self.masked(r, sz);
        (r, Pending { k, sz, a, b, r })
    }

    /// Stores the GPRs written so far into the `Cpu`.
    fn store_gprs(&mut self) {
        for r in 0..16u8 {
            if self.written & (1 << r) != 0 {
                let v = self.reg(r);
                self.b.ins().store(MF, v, self.cpu, gpr_off(r));
            }
        }
    }

    /// Clears the context's lazy flags where they were overwritten since (exits and helper
    /// calls replace a record that no longer holds).
    fn clear_stale(&mut self) {
        if self.lf == Lf::Stale {
            let zero = self.iconst(0);
            self.b.ins().store(MF, zero, self.ctx, off(offset_of!(JitCtx, lf_kind)));
        }
    }

    /// Stores the GPRs written so far and the whole RFLAGS (if changed) into the `Cpu`, and
    /// clears the context's lazy flags: for a helper that runs instructions. `cold`: on a
    /// rarely taken path, where pending flags are materialised by a call to
    /// [`super::jit_flags`] rather than inline (less code to compile).
    fn store_state(&mut self, cold: bool) {
        self.store_gprs();
        if self.fl_written || self.pending.is_some() || self.lf == Lf::Live {
            let f = if cold {
                let old = self.base(true);
                match self.pending {
                    Some(p) => match p.code() {
                        Some(ks) => self.flags_call(ks, p, old),
                        None => self.apply(p, old),
                    },
                    None => old,
                }
            } else {
                self.flags()
            };
            self.b.ins().store(MF, f, self.cpu, off(offset_of!(Cpu, rflags)));
        }
        self.clear_stale();
    }

    /// Stores the GPRs written so far into the `Cpu`, and the flags for leaving the block:
    /// an ADD, SUB, logic, INC or DEC pending is left lazily in the context
    /// (`JitCtx::lf_kind`: four stores, where computing RFLAGS takes ~25 instructions),
    /// for the next block to read only if it looks at them before it overwrites them; a
    /// live lazy record of the predecessor is left where it is. `cold`: as for
    /// [`Self::store_state`].
    fn store_exit(&mut self, cold: bool) {
        self.store_gprs();
        let rflags = off(offset_of!(Cpu, rflags));
        match self.pending {
            Some(p) if p.code().is_some() => {
                if matches!(p.k, Pk::Inc | Pk::Dec) || !self.below.is_empty() {
                    // RFLAGS before it (INC and DEC keep CF).
                    let f = self.base(cold);
                    self.b.ins().store(MF, f, self.cpu, rflags);
                } else if self.fl_written {
                    let f = self.b.use_var(self.fl);
                    self.b.ins().store(MF, f, self.cpu, rflags);
                }
                let ks = self.iconst(p.code().unwrap_or(0));
                self.b.ins().store(MF, ks, self.ctx, off(offset_of!(JitCtx, lf_kind)));
                if p.k != Pk::Logic {
                    // (Logic operations' flags come from the result alone.)
                    self.b.ins().store(MF, p.a, self.ctx, off(offset_of!(JitCtx, lf_a)));
                    self.b.ins().store(MF, p.b, self.ctx, off(offset_of!(JitCtx, lf_b)));
                }
                self.b.ins().store(MF, p.r, self.ctx, off(offset_of!(JitCtx, lf_r)));
            }
            Some(_) => self.store_state(cold),
            None => {
                // (A live record stays where it is.)
                if self.fl_written {
                    let f = self.b.use_var(self.fl);
                    self.b.ins().store(MF, f, self.cpu, rflags);
                }
                self.clear_stale();
            }
        }
    }

    /// Stores the changed state (as [`Self::store_exit`]) where every path from here on
    /// leaves the block: nothing is left to store at the exits.
    fn store_before_exits(&mut self) {
        self.store_exit(false);
        self.written = 0;
        self.fl_written = false;
        self.pending = None;
        self.below.clear();
        // The `Cpu` and the context hold RFLAGS now (as for a predecessor's record).
        self.lf = Lf::Live;
    }

    /// Instruction `i` (`insn`) without a fast form: stores the registers and RFLAGS, runs
    /// it through [`super::jit_generic`], exits if it asks to, and reloads the registers and
    /// RFLAGS.
    fn generic(&mut self, i: usize, insn: &Instruction) {
        self.store_state(false);
        let at = self.iconst(self.env.insns + (i * std::mem::size_of::<Instruction>()) as u64);
        // An instruction that ends a decoded block (it changes translations, segments, the
        // interrupt flag...) also ends a chain of compiled blocks.
        let how = super::generic_how(insn, self.env.user);
        let how = self.iconst(how);
        let fp = self.iconst(super::jit_generic as *const () as u64);
        let call = self.b.ins().call_indirect(self.sig_gen, fp, &[self.cpu, self.ctx, at, how]);
        let st = self.result(call);
        let out = self.b.create_block();
        let cont = self.b.create_block();
        self.b.ins().brif(st, out, &[], cont, &[]);
        // Everything is stored already: return `done + i + 1 + kind << 32`.
        self.b.switch_to_block(out);
        let d = self.b.use_var(self.done);
        let code = self.b.ins().iadd(d, st);
        let code = self.addi(code, i as i64);
        self.b.ins().return_(&[code]);
        self.b.switch_to_block(cont);
        for (r, &var) in (0u8..).zip(self.regs.iter()) {
            if self.used & (1 << r) != 0 {
                let v = self.b.ins().load(I64, MF, self.cpu, gpr_off(r));
                self.b.def_var(var, v);
            }
        }
        let f = self.b.ins().load(I64, MF, self.cpu, off(offset_of!(Cpu, rflags)));
        self.b.def_var(self.fl, f);
        self.pending = None;
        self.below.clear();
        self.lf = Lf::Clear;
        if !self.self_loop {
            self.written = 0;
            self.fl_written = false;
        }
    }

    /// I8 condition: SSE instructions run (CR0.EM and CR0.TS clear, CR4.OSFXSR set, as
    /// `crate::sse` checks) and, with `fp`, the guest's MXCSR is [`MXCSR_HOST`] up to the
    /// exception flags, so that the host computes what the guest's SSE unit would.
    fn sse_ok(&mut self, fp: bool) -> Value {
        let cr0 = self.b.ins().load(I64, MF, self.cpu, off(offset_of!(Cpu, cr0)));
        let cr4 = self.b.ins().load(I64, MF, self.cpu, off(offset_of!(Cpu, cr4)));
        let a = self.andi(cr0, (ctl::CR0_EM | ctl::CR0_TS) as i64);
        let c = self.cmpi(IntCC::Equal, a, 0);
        let x = self.andi(cr4, ctl::CR4_OSFXSR as i64);
        let c2 = self.cmpi(IntCC::NotEqual, x, 0);
        let mut c = self.b.ins().band(c, c2);
        if fp {
            let o = off(offset_of!(Cpu, fpu) + offset_of!(FpuState, mxcsr));
            let m = self.b.ins().load(I32, MF, self.cpu, o);
            let m = self.andi(m, 0xffc0);
            let c3 = self.cmpi(IntCC::Equal, m, i64::from(MXCSR_HOST));
            c = self.b.ins().band(c, c3);
        }
        c
    }

    /// The TLB test of an SSE memory operand of `size` bytes: (condition, host address,
    /// TLB entry); with `aligned`, the address must also be a multiple of 16 (else the
    /// interpreter raises the #GP legacy SSE requires).
    fn sse_mem(&mut self, m: &MemOp, size: u8, write: bool, aligned: bool) -> (Value, Value, Value) {
        let la = self.la(m);
        let (mut c, addr, e) = self.tlb_cond(la, size, write);
        if aligned {
            let lo = self.andi(la, 15);
            let a = self.cmpi(IntCC::Equal, lo, 0);
            c = self.b.ins().band(c, a);
        }
        (c, addr, e)
    }

    /// Branches on `ok` to a new block, where the caller emits the fast form, or to the
    /// cold block running instruction `i` in the interpreter ([`Self::interpret_cold`]); returns
    /// the block both continue at (the caller jumps there from the fast form) and the cold
    /// block (the fast form may still give up by jumping there, before it changed anything).
    fn guarded(
        &mut self,
        ok: Value,
        i: usize,
        reload: &[u8],
        flags: bool,
    ) -> (cranelift_codegen::ir::Block, cranelift_codegen::ir::Block) {
        let fast = self.b.create_block();
        let slow = self.b.create_block();
        let join = self.b.create_block();
        self.b.set_cold_block(slow);
        self.b.ins().brif(ok, fast, &[], slow, &[]);
        self.b.switch_to_block(slow);
        self.interpret_cold(i, reload, flags);
        self.b.ins().jump(join, &[]);
        self.b.switch_to_block(fast);
        (join, slow)
    }

    /// Instruction `i` through [`super::jit_generic`] where its fast form's checks failed:
    /// the registers and RFLAGS stored first; the block ends if it faulted or must stop,
    /// else the GPRs in `reload` (those it writes) and, with `flags`, RFLAGS are reloaded.
    fn interpret_cold(&mut self, i: usize, reload: &[u8], flags: bool) {
        self.store_state(true);
        let at = self.iconst(self.env.insns + (i * std::mem::size_of::<Instruction>()) as u64);
        let how = self.iconst(u64::from(self.env.user));
        let fp = self.iconst(super::jit_generic as *const () as u64);
        let call = self.b.ins().call_indirect(self.sig_gen, fp, &[self.cpu, self.ctx, at, how]);
        let st = self.result(call);
        let out = self.b.create_block();
        let cont = self.b.create_block();
        self.b.set_cold_block(out);
        self.b.ins().brif(st, out, &[], cont, &[]);
        // Everything is stored already: return `done + i + 1 + kind << 32`.
        self.b.switch_to_block(out);
        let d = self.b.use_var(self.done);
        let code = self.b.ins().iadd(d, st);
        let code = self.addi(code, i as i64);
        self.b.ins().return_(&[code]);
        self.b.switch_to_block(cont);
        for &r in reload {
            let v = self.b.ins().load(I64, MF, self.cpu, gpr_off(r));
            self.set_reg64(r, v);
        }
        if flags {
            let f = self.b.ins().load(I64, MF, self.cpu, off(offset_of!(Cpu, rflags)));
            self.b.def_var(self.fl, f);
        }
    }

    /// Loads a value of type `ty` from source `s`: an XMM register's low bytes, or the
    /// guest memory at host address `addr` (checked by the caller).
    fn xload(&mut self, ty: Type, s: &Xs, addr: Option<Value>) -> Value {
        match (s, addr) {
            (Xs::M(_), Some(a)) => self.b.ins().load(ty, gm(), a, 0),
            (Xs::X(x), _) => self.b.ins().load(ty, MF, self.cpu, xmm_off(*x)),
            // Not reached: `sse` checks every memory operand and passes its address.
            (Xs::M(_), None) => self.b.ins().load(ty, MF, self.cpu, xmm_off(0)),
        }
    }

    /// Cranelift's `shuffle` of I8X16 `a` and `b` (mask bytes 0-15 pick from `a`, 16-31
    /// from `b`).
    fn shuffle(&mut self, a: Value, b: Value, mask: &[u8]) -> Value {
        let imm = self.b.func.dfg.immediates.push(ConstantData::from(mask));
        self.b.ins().shuffle(a, b, imm)
    }

    /// Stores `v` (64 bits) into the low half of XMM `d` and zeroes the high half.
    fn xset_low64(&mut self, d: u8, v: Value) {
        self.b.ins().store(MF, v, self.cpu, xmm_off(d));
        let z = self.iconst(0);
        self.b.ins().store(MF, z, self.cpu, xmm_off(d) + 8);
    }

    /// SSE fast form `s` of instruction `i`.
    fn sse(&mut self, s: Sse, op: &Op, i: usize) {
        // The memory operand, if any: its size, whether it is written, alignment.
        let mem = match s {
            Sse::Mov { s: Xs::M(m), aligned, .. } => Some((m, 16, false, aligned)),
            Sse::Store { m, size, aligned, .. } => Some((m, size, true, aligned)),
            Sse::LoadZ { s: Xs::M(m), size, .. } => Some((m, size, false, false)),
            Sse::Fp { s: Xs::M(m), lanes, .. } => Some((m, lanes.mem_size(), false, lanes.mem_size() == 16)),
            Sse::Vec { s: Xs::M(m), .. }
            | Sse::Pshufd { s: Xs::M(m), .. }
            | Sse::Palignr { s: Xs::M(m), .. }
            | Sse::Aes { s: Xs::M(m), .. } => Some((m, 16, false, true)),
            Sse::Ucomi { s: Xs::M(m), dbl, .. } => Some((m, if dbl { 8 } else { 4 }, false, false)),
            Sse::CvtI2F { s: Src::Mem(m), ssz, .. } => Some((m, ssz, false, false)),
            _ => None,
        };
        if let Sse::Ucomi { .. } = s {
            // Both paths define the RFLAGS variable.
            self.settle();
        }
        let mut ok = self.sse_ok(s.host_fp());
        let (mut addr, mut entry) = (None, None);
        if let Some((m, size, write, aligned)) = mem {
            let (c, a, e) = self.sse_mem(&m, size, write, aligned);
            ok = self.b.ins().band(ok, c);
            (addr, entry) = (Some(a), Some(e));
        }
        let reload: &[u8] = match s {
            Sse::ToGpr { d, .. } | Sse::Pmovmskb { d, .. } => &[d],
            _ => &[],
        };
        let (join, slow) = self.guarded(ok, i, reload, matches!(s, Sse::Ucomi { .. }));
        match s {
            Sse::Mov { d, s: src, .. } => {
                let v = self.xload(I64X2, &src, addr);
                self.b.ins().store(MF, v, self.cpu, xmm_off(d));
            }
            Sse::Store { s: x, size, .. } => {
                let ty = match size {
                    4 => I32,
                    8 => I64,
                    _ => I64X2,
                };
                let v = self.b.ins().load(ty, MF, self.cpu, xmm_off(x));
                if let (Some(a), Some(e)) = (addr, entry) {
                    self.b.ins().store(gm(), v, a, 0);
                    let note = self.b.create_block();
                    self.b.set_cold_block(note);
                    self.note_store(e, note, join);
                    self.b.switch_to_block(join);
                    self.check_gen(op.next_ip, i);
                    return;
                }
            }
            Sse::LoadZ { d, s: src, size } => {
                let v = if size == 4 {
                    let v = self.xload(I32, &src, addr);
                    self.b.ins().uextend(I64, v)
                } else {
                    self.xload(I64, &src, addr)
                };
                self.xset_low64(d, v);
            }
            Sse::Merge { d, s: x, size } => {
                let ty = if size == 4 { I32 } else { I64 };
                let v = self.b.ins().load(ty, MF, self.cpu, xmm_off(x));
                self.b.ins().store(MF, v, self.cpu, xmm_off(d));
            }
            Sse::FromGpr { d, s: r, size } => {
                let v = self.reg(r);
                let v = self.masked(v, size);
                self.xset_low64(d, v);
            }
            Sse::ToGpr { d, s: x, size } => {
                let v = if size == 4 {
                    self.b.ins().uload32(MF, self.cpu, xmm_off(x))
                } else {
                    self.b.ins().load(I64, MF, self.cpu, xmm_off(x))
                };
                self.set_reg(d, v, size);
            }
            Sse::Fp { op: f, lanes, d, s: src } => {
                let ty = match lanes {
                    Lanes::Ss => F32,
                    Lanes::Sd => F64,
                    Lanes::Ps => F32X4,
                    Lanes::Pd => F64X2,
                };
                let b = self.xload(ty, &src, addr);
                let r = if f == FpOp::Sqrt {
                    self.b.ins().sqrt(b)
                } else {
                    let a = self.b.ins().load(ty, MF, self.cpu, xmm_off(d));
                    if matches!(f, FpOp::Add | FpOp::Mul) {
                        // Which NaN operand x86 returns depends on the operand order, which
                        // Cranelift may swap for commutative operations: NaN operands go to
                        // the interpreter.
                        let uno = self.b.ins().fcmp(FloatCC::Unordered, a, b);
                        let uno = if ty.is_vector() { self.b.ins().vany_true(uno) } else { uno };
                        let go = self.b.create_block();
                        self.b.ins().brif(uno, slow, &[], go, &[]);
                        self.b.switch_to_block(go);
                    }
                    match f {
                        FpOp::Add => self.b.ins().fadd(a, b),
                        FpOp::Sub => self.b.ins().fsub(a, b),
                        FpOp::Mul => self.b.ins().fmul(a, b),
                        _ => self.b.ins().fdiv(a, b),
                    }
                };
                // Scalar forms store only the low lane: the rest of XMM d is kept.
                self.b.ins().store(MF, r, self.cpu, xmm_off(d));
            }
            Sse::Vec { op: v, d, s: src } => {
                use VecOp as V;
                let ty = match v {
                    V::AddB | V::SubB | V::CmpEqB | V::MinUB | V::MaxUB | V::Pshufb | V::Unpack { .. } => I8X16,
                    V::AddW | V::SubW | V::CmpEqW => I16X8,
                    V::AddD | V::SubD | V::CmpEqD => I32X4,
                    _ => I64X2,
                };
                let b = self.xload(ty, &src, addr);
                let a = self.b.ins().load(ty, MF, self.cpu, xmm_off(d));
                let r = match v {
                    V::And => self.b.ins().band(a, b),
                    V::Andn => self.b.ins().band_not(b, a),
                    V::Or => self.b.ins().bor(a, b),
                    V::Xor => self.b.ins().bxor(a, b),
                    V::AddB | V::AddW | V::AddD | V::AddQ => self.b.ins().iadd(a, b),
                    V::SubB | V::SubW | V::SubD | V::SubQ => self.b.ins().isub(a, b),
                    V::CmpEqB | V::CmpEqW | V::CmpEqD => self.b.ins().icmp(IntCC::Equal, a, b),
                    V::MinUB => self.b.ins().umin(a, b),
                    V::MaxUB => self.b.ins().umax(a, b),
                    V::Pshufb => self.b.ins().x86_pshufb(a, b),
                    V::Unpack { high, lane } => {
                        // Output lane j: lane j/2 (+ half) of d for even j, of s (bytes
                        // 16-31 of the shuffle's input) for odd j.
                        let half = if high { 8 } else { 0 };
                        let mask: Vec<u8> = (0..16u8)
                            .map(|k| {
                                let (j, byte) = (k / lane, k % lane);
                                half + (j / 2) * lane + byte + if j % 2 == 1 { 16 } else { 0 }
                            })
                            .collect();
                        self.shuffle(a, b, &mask)
                    }
                };
                self.b.ins().store(MF, r, self.cpu, xmm_off(d));
            }
            Sse::ShiftImm { op: sh, bits, d, count } => {
                let ty = match bits {
                    16 => I16X8,
                    32 => I32X4,
                    _ => I64X2,
                };
                let v = self.b.ins().load(ty, MF, self.cpu, xmm_off(d));
                let r = if count >= bits && sh != VShift::Sar {
                    self.b.ins().bxor(v, v)
                } else {
                    let n = self.b.ins().iconst(I32, i64::from(count.min(bits - 1)));
                    match sh {
                        VShift::Shl => self.b.ins().ishl(v, n),
                        VShift::Shr => self.b.ins().ushr(v, n),
                        VShift::Sar => self.b.ins().sshr(v, n),
                    }
                };
                self.b.ins().store(MF, r, self.cpu, xmm_off(d));
            }
            Sse::ByteShift { left, d, count } => {
                let v = self.b.ins().load(I8X16, MF, self.cpu, xmm_off(d));
                let zero = self.b.ins().bxor(v, v);
                // Index 16 picks a byte of `zero`.
                let mask: Vec<u8> = (0..16u8)
                    .map(|i| {
                        let from = if left { i.checked_sub(count) } else { i.checked_add(count).filter(|&j| j < 16) };
                        from.unwrap_or(16)
                    })
                    .collect();
                let r = self.shuffle(v, zero, &mask);
                self.b.ins().store(MF, r, self.cpu, xmm_off(d));
            }
            Sse::Pshufd { d, s: src, imm } => {
                let v = self.xload(I8X16, &src, addr);
                let mask: Vec<u8> = (0..16u8).map(|i| 4 * ((imm >> (2 * (i / 4))) & 3) + i % 4).collect();
                let r = self.shuffle(v, v, &mask);
                self.b.ins().store(MF, r, self.cpu, xmm_off(d));
            }
            Sse::Palignr { d, s: src, imm } => {
                let lo = self.xload(I8X16, &src, addr);
                let hi = self.b.ins().load(I8X16, MF, self.cpu, xmm_off(d));
                let zero = self.b.ins().bxor(hi, hi);
                // Byte k of the 32 bytes hi:lo is lo[k] (k < 16) or hi[k - 16]; past 32: 0.
                let r = if imm < 16 {
                    let mask: Vec<u8> = (0..16u8).map(|i| i + imm).collect();
                    self.shuffle(lo, hi, &mask)
                } else {
                    let mask: Vec<u8> =
                        (0..16u8).map(|i| i.checked_add(imm - 16).filter(|&j| j < 16).unwrap_or(16)).collect();
                    self.shuffle(hi, zero, &mask)
                };
                self.b.ins().store(MF, r, self.cpu, xmm_off(d));
            }
            Sse::Aes { kind, d, s: src } => {
                // The host's AESENC/AESDEC on the register in the Cpu (no GPR or flag).
                let dp = self.addi(self.cpu, i64::from(xmm_off(d)));
                let sp = match (src, addr) {
                    (Xs::M(_), Some(a)) => a,
                    (Xs::X(x), _) => self.addi(self.cpu, i64::from(xmm_off(x))),
                    (Xs::M(_), None) => dp,
                };
                let k = self.iconst(u64::from(kind));
                let f = self.iconst(crate::sse::jit_aes as *const () as u64);
                self.b.ins().call_indirect(self.sig_aes, f, &[dp, sp, k]);
            }
            Sse::Pmovmskb { d, s: x } => {
                let v = self.b.ins().load(I8X16, MF, self.cpu, xmm_off(x));
                let m = self.b.ins().vhigh_bits(I64, v);
                self.set_reg64(d, m);
            }
            Sse::Ucomi { dbl, a, s: src } => {
                let ty = if dbl { F64 } else { F32 };
                let y = self.xload(ty, &src, addr);
                let x = self.b.ins().load(ty, MF, self.cpu, xmm_off(a));
                let uno = self.b.ins().fcmp(FloatCC::Unordered, x, y);
                let lt = self.b.ins().fcmp(FloatCC::LessThan, x, y);
                let eq = self.b.ins().fcmp(FloatCC::Equal, x, y);
                let zf = self.b.ins().bor(eq, uno);
                let cf = self.b.ins().bor(lt, uno);
                let zf = self.b.ins().uextend(I64, zf);
                let pf = self.b.ins().uextend(I64, uno);
                let cf = self.b.ins().uextend(I64, cf);
                let zf = self.shli(zf, 6);
                let pf = self.shli(pf, 2);
                let old = self.b.use_var(self.fl);
                let f = self.andi(old, !(ARITH as i64));
                let f = self.b.ins().bor(f, zf);
                let f = self.b.ins().bor(f, pf);
                let f = self.b.ins().bor(f, cf);
                self.b.def_var(self.fl, f);
            }
            Sse::CvtI2F { dbl, d, s: src, ssz } => {
                let v = match (src, addr) {
                    (Src::Mem(_), Some(a)) => {
                        if ssz == 4 {
                            self.b.ins().load(I32, gm(), a, 0)
                        } else {
                            self.b.ins().load(I64, gm(), a, 0)
                        }
                    }
                    (Src::Reg(r), _) => {
                        let v = self.reg(r);
                        if ssz == 4 {
                            self.b.ins().ireduce(I32, v)
                        } else {
                            v
                        }
                    }
                    _ => self.iconst(0),
                };
                let r = self.b.ins().fcvt_from_sint(if dbl { F64 } else { F32 }, v);
                self.b.ins().store(MF, r, self.cpu, xmm_off(d));
            }
        }
        self.b.ins().jump(join, &[]);
        self.b.switch_to_block(join);
        if let Sse::Ucomi { .. } = s {
            self.fl_written = true;
        }
    }

    /// Pushes `v` (64-bit) and updates RSP after the store succeeded.
    fn push(&mut self, v: Value, op: &Op, i: usize) {
        let sp = self.reg(4);
        let sp = self.addi(sp, -8);
        self.write(sp, 8, v, op, i);
        self.set_reg64(4, sp);
    }

    /// Translates instruction `i`; returns the RIP after it when it ends the block with a
    /// computed target (`Some`), None to fall through.
    fn op(&mut self, op: &Op, i: usize) -> Option<Value> {
        match op.uop {
            Uop::Nop => {}
            Uop::Sse(x) => self.sse(x, op, i),
            Uop::Generic => {
                self.generic(i, &op.insn);
                // It may have stored into the block's own page.
                self.check_gen(op.next_ip, i);
            }
            Uop::MovR { d, s, sz } => {
                let v = self.src(s, sz, op, i);
                self.set_reg(d, v, sz);
            }
            Uop::MovM { m, s, sz } => {
                let v = self.src(s, sz, op, i);
                let la = self.la(&m);
                self.write(la, sz, v, op, i);
                self.check_gen(op.next_ip, i);
            }
            Uop::Lea { d, m, sz } => {
                let a = self.ea(&m);
                self.set_reg(d, a, sz);
            }
            Uop::Unary { neg, d, sz } => {
                let a = self.reg(d);
                let a = self.masked(a, sz);
                if neg {
                    let zero = self.iconst(0);
                    let r = self.b.ins().isub(zero, a);
                    let r = self.masked(r, sz);
                    self.set_pending(Pending { k: Pk::Sub, sz, a: zero, b: a, r });
                    self.set_reg(d, r, sz);
                } else {
                    let r = self.b.ins().bnot(a);
                    let r = self.masked(r, sz);
                    self.set_reg(d, r, sz);
                }
            }
            Uop::ShiftCl { op: o, d, sz } => {
                let a = self.reg(d);
                let a = self.masked(a, sz);
                let c = self.reg(1);
                let n = self.andi(c, if sz == 8 { 63 } else { 31 });
                // A count of 0 changes no flag: crate::alu knows (the DYN code keeps the
                // fast conditions away).
                let bits = i64::from(sz) * 8;
                let (r, code) = match o {
                    Op2::Shl => (self.b.ins().ishl(a, n), aluop::SHL),
                    Op2::Shr => (self.b.ins().ushr(a, n), aluop::SHR),
                    _ => {
                        let x = if bits == 64 { a } else { self.shli(a, 64 - bits) };
                        let n2 = if bits == 64 { n } else { self.addi(n, 64 - bits) };
                        (self.b.ins().sshr(x, n2), aluop::SAR)
                    }
                };
                let r = self.masked(r, sz);
                self.set_pending(Pending { k: Pk::Helper(code | aluop::DYN), sz, a, b: n, r });
                self.set_reg(d, r, sz);
            }
            Uop::Alu { op: o, d, s, sz, write } => {
                let b = self.src(s, sz, op, i);
                let a = if d & HIGH8 != 0 {
                    // AH..BH (CMP/TEST only: never written).
                    let v = self.reg(d & 3);
                    self.ushri(v, 8)
                } else {
                    self.reg(d)
                };
                let a = self.masked(a, sz);
                let (r, p) = self.arith(o, sz, a, b);
                self.set_pending(p);
                if write {
                    self.set_reg(d, r, sz);
                }
            }
            Uop::AluM { op: o, m, s, sz, write } => {
                let b = self.src(s, sz, op, i);
                let la = self.la(&m);
                let a = self.read(la, sz, op, i);
                let (r, p) = self.arith(o, sz, a, b);
                if write {
                    self.write(la, sz, r, op, i);
                }
                self.set_pending(p);
                if write {
                    self.check_gen(op.next_ip, i);
                }
            }
            Uop::AluF { op: o, d, s, sz } => {
                let b = self.src(s, sz, op, i);
                let a = self.reg(d);
                let a = self.masked(a, sz);
                // The flags before stay lazy: they reach crate::alu only where these are
                // observed.
                let (r, code) = match o {
                    Op2::Adc | Op2::Sbb => {
                        let cf = self.carry();
                        if o == Op2::Adc {
                            let t = self.b.ins().iadd(a, b);
                            (self.b.ins().iadd(t, cf), aluop::ADC)
                        } else {
                            let t = self.b.ins().isub(a, b);
                            (self.b.ins().isub(t, cf), aluop::SBB)
                        }
                    }
                    _ => (self.b.ins().imul(a, b), aluop::IMUL),
                };
                let r = self.masked(r, sz);
                self.set_pending(Pending { k: Pk::Helper(code), sz, a, b, r });
                self.set_reg(d, r, sz);
            }
            Uop::Imul3 { d, s, imm, sz } => {
                let a = self.src(s, sz, op, i);
                let b = self.iconst(imm);
                let r = self.b.ins().imul(a, b);
                let r = self.masked(r, sz);
                self.set_pending(Pending { k: Pk::Helper(aluop::IMUL), sz, a, b, r });
                self.set_reg(d, r, sz);
            }
            Uop::Setcc { cc, d } => {
                let c = self.cond(cc);
                let c = self.b.ins().uextend(I64, c);
                let g = self.reg(d);
                let g = self.andi(g, !0xff);
                let g = self.b.ins().bor(g, c);
                self.set_reg64(d, g);
            }
            Uop::Cmov { cc, d, s, sz } => {
                let v = self.src(s, sz, op, i);
                let c = self.cond(cc);
                let cur = self.reg(d);
                let r = self.b.ins().select(c, v, cur);
                self.set_reg(d, r, sz);
            }
            Uop::MovXR { d, s, ssz, dsz, signed } => {
                let v = if s & HIGH8 != 0 {
                    let v = self.reg(s & 3);
                    self.ushri(v, 8)
                } else {
                    self.reg(s)
                };
                let v = self.ext(v, ssz, signed);
                let v = self.masked(v, dsz);
                self.set_reg(d, v, dsz);
            }
            Uop::MovX { d, m, ssz, dsz, signed } => {
                let la = self.la(&m);
                let v = self.read(la, ssz, op, i);
                let v = self.ext(v, ssz, signed);
                let v = self.masked(v, dsz);
                self.set_reg(d, v, dsz);
            }
            Uop::Div { s, sz } => {
                let b = self.src(s, sz, op, i);
                let lo = self.reg(0);
                let lo = self.masked(lo, sz);
                let hi = self.reg(2);
                let hi = self.masked(hi, sz);
                // A zero divisor or a quotient too wide (hi >= divisor): the interpreter
                // raises #DE.
                let fits = self.b.ins().icmp(IntCC::UnsignedLessThan, hi, b);
                let (join, _) = self.guarded(fits, i, &[0, 2], false);
                let (q, r) = if sz == 4 {
                    let h = self.shli(hi, 32);
                    let n = self.b.ins().bor(h, lo);
                    (self.b.ins().udiv(n, b), self.b.ins().urem(n, b))
                } else {
                    let slot = self.b.create_sized_stack_slot(cranelift_codegen::ir::StackSlotData::new(
                        cranelift_codegen::ir::StackSlotKind::ExplicitSlot,
                        8,
                        3,
                    ));
                    let p = self.b.ins().stack_addr(I64, slot, 0);
                    let f = self.iconst(super::jit_div128 as *const () as u64);
                    let call = self.b.ins().call_indirect(self.sig_read, f, &[lo, hi, b, p]);
                    let q = self.result(call);
                    (q, self.b.ins().load(I64, MF, p, 0))
                };
                self.set_reg(0, q, sz);
                self.set_reg(2, r, sz);
                self.b.ins().jump(join, &[]);
                self.b.switch_to_block(join);
            }
            Uop::Bswap { d, sz } => {
                let v = self.reg(d);
                let r = if sz == 8 {
                    self.b.ins().bswap(v)
                } else {
                    let x = self.b.ins().ireduce(I32, v);
                    let x = self.b.ins().bswap(x);
                    self.b.ins().uextend(I64, x)
                };
                self.set_reg(d, r, sz);
            }
            Uop::Bsf { d, s, sz } => {
                let b = self.src(s, sz, op, i);
                let a = self.reg(d);
                let a = self.masked(a, sz);
                let zero = self.cmpi(IntCC::Equal, b, 0);
                let c = self.b.ins().ctz(b);
                // A zero source leaves the destination (written back: a 32-bit one is
                // zero-extended).
                let r = self.b.ins().select(zero, a, c);
                self.set_pending(Pending { k: Pk::Helper(aluop::BSF), sz, a, b, r });
                self.set_reg(d, r, sz);
            }
            Uop::IncDec { d, sz, dec } => {
                let a = self.reg(d);
                let a = self.masked(a, sz);
                let one = self.iconst(1);
                let r = if dec { self.b.ins().isub(a, one) } else { self.b.ins().iadd(a, one) };
                let r = self.masked(r, sz);
                // Keeps CF of the flags before (chained, see `below`).
                self.set_pending(Pending { k: if dec { Pk::Dec } else { Pk::Inc }, sz, a, b: one, r });
                self.set_reg(d, r, sz);
            }
            Uop::IncDecM { m, sz, dec } => {
                let la = self.la(&m);
                let a = self.read(la, sz, op, i);
                let one = self.iconst(1);
                let r = if dec { self.b.ins().isub(a, one) } else { self.b.ins().iadd(a, one) };
                let r = self.masked(r, sz);
                self.write(la, sz, r, op, i);
                self.set_pending(Pending { k: if dec { Pk::Dec } else { Pk::Inc }, sz, a, b: one, r });
                self.check_gen(op.next_ip, i);
            }
            Uop::Shift { op: o, d, c, sz } => {
                let a = self.reg(d);
                let a = self.masked(a, sz);
                // The CPU masks the count; a masked count of 0 changes no flag (the register
                // is still written: a 32-bit one is zero-extended).
                let n = i64::from(c) & if sz == 8 { 63 } else { 31 };
                if n == 0 {
                    self.set_reg(d, a, sz);
                } else {
                    let bits = i64::from(sz) * 8;
                    let (r, code) = match o {
                        Op2::Shl => (self.shli(a, n), aluop::SHL),
                        Op2::Shr => (self.ushri(a, n), aluop::SHR),
                        Op2::Sar => {
                            let x = if bits == 64 { a } else { self.shli(a, 64 - bits) };
                            // 8/16-bit counts may pass the width: all sign bits.
                            (self.sshri(x, (n + 64 - bits).min(63)), aluop::SAR)
                        }
                        Op2::Rol | Op2::Ror => {
                            let ty = if sz == 8 { I64 } else { I32 };
                            let x = if sz == 8 { a } else { self.b.ins().ireduce(I32, a) };
                            let k = self.k(I64, n);
                            let y = if o == Op2::Rol { self.b.ins().rotl(x, k) } else { self.b.ins().rotr(x, k) };
                            let y = if ty == I64 { y } else { self.b.ins().uextend(I64, y) };
                            (y, if o == Op2::Rol { aluop::ROL } else { aluop::ROR })
                        }
                        _ => return None,
                    };
                    let r = self.masked(r, sz);
                    let cnt = self.iconst(n as u64);
                    self.set_pending(Pending { k: Pk::Helper(code), sz, a, b: cnt, r });
                    self.set_reg(d, r, sz);
                }
            }
            Uop::Jcc { cc, target } => {
                let c = self.cond(cc);
                let t = self.iconst(target);
                let n = self.iconst(op.next_ip);
                return Some(self.b.ins().select(c, t, n));
            }
            Uop::Jmp { target } => return Some(self.iconst(target)),
            Uop::Call { target } => {
                let ret = self.iconst(op.next_ip);
                self.push(ret, op, i);
                return Some(self.iconst(target));
            }
            Uop::Ret => {
                let sp = self.reg(4);
                let t = self.read(sp, 8, op, i);
                self.check_canonical(t, op, i);
                let sp = self.addi(sp, 8);
                self.set_reg64(4, sp);
                return Some(t);
            }
            Uop::JmpInd { s } | Uop::CallInd { s } => {
                let t = self.src(s, 8, op, i);
                self.check_canonical(t, op, i);
                if let Uop::CallInd { .. } = op.uop {
                    let ret = self.iconst(op.next_ip);
                    self.push(ret, op, i);
                }
                // The run of compiled blocks goes on through the jump cache (`enter`).
                return Some(t);
            }
            Uop::Push { r } => {
                let v = self.reg(r);
                self.push(v, op, i);
                self.check_gen(op.next_ip, i);
            }
            Uop::PushI { v } => {
                let v = self.iconst(v);
                self.push(v, op, i);
                self.check_gen(op.next_ip, i);
            }
            Uop::Pushf => {
                let f = self.flags();
                let f = self.andi(f, !(crate::cpu::flags::RF | crate::cpu::flags::VM) as i64);
                self.push(f, op, i);
                self.check_gen(op.next_ip, i);
            }
            Uop::BitI { op: o, s, bit, sz } => {
                let code = match o {
                    Op2::Bt => aluop::BT,
                    Op2::Bts => aluop::BTS,
                    Op2::Btr => aluop::BTR,
                    _ => aluop::BTC,
                };
                let (a, la) = match s {
                    Src::Reg(d) => {
                        let v = self.reg(d);
                        (self.masked(v, sz), None)
                    }
                    Src::Mem(m) => {
                        let la = self.la(&m);
                        (self.read(la, sz, op, i), Some(la))
                    }
                    Src::Imm(_) => {
                        // Never lowered so.
                        self.generic(i, &op.insn);
                        return None;
                    }
                };
                let m = 1i64 << (bit & 63);
                let r = match o {
                    Op2::Bt => a,
                    Op2::Bts => self.ori(a, m),
                    Op2::Btr => self.andi(a, !m),
                    _ => self.xori(a, m),
                };
                let r = self.masked(r, sz);
                let b = self.iconst(u64::from(bit));
                match (s, la) {
                    _ if o == Op2::Bt => {}
                    (Src::Reg(d), _) => self.set_reg(d, r, sz),
                    (_, Some(la)) => self.write(la, sz, r, op, i),
                    _ => {}
                }
                // After the store: a fault in it leaves the flags as they were.
                self.set_pending(Pending { k: Pk::Helper(code), sz, a, b, r });
                if la.is_some() && o != Op2::Bt {
                    self.check_gen(op.next_ip, i);
                }
            }
            Uop::CmpxchgM { m, s, sz } => {
                let la = self.la(&m);
                let d = self.read(la, sz, op, i);
                let acc0 = self.reg(0);
                let acc = self.masked(acc0, sz);
                let v = self.reg(s);
                let v = self.masked(v, sz);
                let eq = self.b.ins().icmp(IntCC::Equal, acc, d);
                // Unequal: the operand is written back unchanged (the locked cycle).
                let new = self.b.ins().select(eq, v, d);
                self.write(la, sz, new, op, i);
                let r = self.b.ins().isub(acc, d);
                let r = self.masked(r, sz);
                self.set_pending(Pending { k: Pk::Sub, sz, a: acc, b: d, r });
                // Equal: RAX whole; else the operand (zero-extended from 32 bits).
                let na = self.b.ins().select(eq, acc0, d);
                self.set_reg64(0, na);
                self.check_gen(op.next_ip, i);
            }
            Uop::Cli => {
                if self.env.user {
                    // CPL 3: #GP(0) unless IOPL is 3, which the interpreter checks.
                    self.generic(i, &op.insn);
                } else {
                    // IF is not among the lazily kept flags: cleared in the variable.
                    let f = self.b.use_var(self.fl);
                    let f = self.andi(f, !(crate::cpu::flags::IF as i64));
                    self.b.def_var(self.fl, f);
                    self.fl_written = true;
                }
            }
            Uop::MovSreg { d, s, sz } => {
                let s = usize::from(s).min(5);
                let o = off(offset_of!(Cpu, seg) + s * std::mem::size_of::<Seg>() + offset_of!(Seg, selector));
                let v = self.b.ins().uload16(I64, MF, self.cpu, o);
                self.set_reg(d, v, sz);
            }
            Uop::SetccM { cc, m } => {
                let c = self.cond(cc);
                let c = self.b.ins().uextend(I64, c);
                let la = self.la(&m);
                self.write(la, 1, c, op, i);
                self.check_gen(op.next_ip, i);
            }
            Uop::Pop { r } => {
                let sp = self.reg(4);
                let v = self.read(sp, 8, op, i);
                let sp = self.addi(sp, 8);
                self.set_reg64(4, sp);
                self.set_reg64(r, v);
            }
        }
        None
    }

    /// The last instruction `op` (index `i`) of a block, a JMP or Jcc to the block's own
    /// start: loops to `header` while another whole pass fits in `ctx.left` and the
    /// block's page is unchanged; exits otherwise.
    fn loop_back(&mut self, op: &Op, i: usize, header: cranelift_codegen::ir::Block) {
        let n = i as u64 + 1;
        let again = self.b.create_block();
        if let Uop::Jcc { cc, .. } = op.uop {
            let c = self.cond(cc);
            let out = self.b.create_block();
            self.b.ins().brif(c, again, &[], out, &[]);
            self.b.switch_to_block(out);
            // The loop ends: on to the next block (the fall-through link, or the probe).
            let start = match op.uop {
                Uop::Jcc { target, .. } => target,
                _ => op.ip,
            };
            self.exit_to(op.next_ip, n, 1, start);
        } else {
            self.b.ins().jump(again, &[]);
        }
        self.b.switch_to_block(again);
        // Flags the next pass overwrites before anything can observe them are not
        // materialised on the back edge, only where the loop stops.
        let dead = self.flags_dead_at_head();
        if !dead {
            self.settle();
        }
        let d = self.b.use_var(self.done);
        let d2 = self.addi(d, (2 * n) as i64);
        let left = self.b.ins().load(I64, MF, self.ctx, off(offset_of!(JitCtx, left)));
        let cont = self.b.create_block();
        let stop = self.b.create_block();
        let same_gen = self.b.create_block();
        let fits = self.b.ins().icmp(IntCC::UnsignedLessThanOrEqual, d2, left);
        self.b.ins().brif(fits, same_gen, &[], stop, &[]);
        self.b.switch_to_block(same_gen);
        let p = self.iconst(self.env.gen_ptr);
        let g = self.b.ins().load(I32, MemFlagsData::new(), p, 0);
        let same = self.cmpi(IntCC::Equal, g, i64::from(self.env.gen));
        self.b.ins().brif(same, cont, &[], stop, &[]);
        self.b.switch_to_block(stop);
        let target = match op.uop {
            Uop::Jcc { target, .. } | Uop::Jmp { target } => target,
            _ => op.next_ip,
        };
        let rip = self.iconst(target);
        self.exit(rip, n, EXIT_NORMAL);
        self.b.switch_to_block(cont);
        if dead {
            // The RFLAGS variable keeps the non-arithmetic flags (only the pending
            // operations' arithmetic flags are dropped).
            self.pending = None;
            self.below.clear();
        }
        let d1 = self.addi(d, n as i64);
        self.b.def_var(self.done, d1);
        self.b.ins().jump(header, &[]);
    }

    /// Whether a pass of this self-loop overwrites every arithmetic flag before anything
    /// can read them or leave the block: its first instructions up to an ADD, SUB, CMP,
    /// AND, OR, XOR or TEST with register or immediate operands neither read flags nor
    /// access memory nor exit (register moves, LEA, NOP).
    fn flags_dead_at_head(&self) -> bool {
        for op in self.ops {
            match op.uop {
                Uop::Alu {
                    op: Op2::Add | Op2::Sub | Op2::And | Op2::Or | Op2::Xor,
                    s: Src::Reg(_) | Src::Imm(_),
                    ..
                } => return true,
                Uop::MovR { s: Src::Reg(_) | Src::Imm(_), .. } | Uop::MovXR { .. } | Uop::Lea { .. } | Uop::Nop => {}
                _ => return false,
            }
        }
        false
    }

    fn ext(&mut self, v: Value, ssz: u8, signed: bool) -> Value {
        let t: Type = match ssz {
            1 => I8,
            2 => I16,
            _ => I32,
        };
        let n = self.b.ins().ireduce(t, v);
        if signed {
            self.b.ins().sextend(I64, n)
        } else {
            self.b.ins().uextend(I64, n)
        }
    }
}

/// Compiles `ops` (the instructions of one block, in order) into a function of `module`,
/// to be finalized with others. Returns its id and its code size in bytes; None if
/// Cranelift refused it.
pub(crate) fn compile(
    module: &mut JITModule,
    ctx: &mut cranelift_codegen::Context,
    fctx: &mut FunctionBuilderContext,
    ops: &[Op],
    env: &Env,
) -> Option<(FuncId, usize)> {
    module.clear_context(ctx);
    let tc = module.target_config();
    // Helpers are Rust `extern "C"` functions: the host's convention.
    let cc = module.make_signature().call_conv;
    let sig = block_sig(module);
    ctx.func.signature = sig.clone();
    let mk = |params: &[Type], ret: bool| {
        let mut s = Signature::new(cc);
        s.params.extend(params.iter().map(|t| AbiParam::new(*t)));
        if ret {
            s.returns.push(AbiParam::new(I64));
        }
        s
    };
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, fctx);
        let sig_read = b.import_signature(mk(&[I64, I64, I64, I64], true));
        let sig_write = b.import_signature(mk(&[I64, I64, I64, I64, I64], false));
        let sig_note = b.import_signature(mk(&[I64], false));
        let sig_aes = b.import_signature(mk(&[I64, I64, I64], false));
        let sig_gen = b.import_signature(mk(&[I64, I64, I64, I64], true));
        let sig_flags = b.import_signature(mk(&[I64, I64, I64, I64, I64], true));
        let sig_block = b.import_signature(sig);
        let sig_probe = b.import_signature(probe_sig(module));
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let &[cpu, cx] = b.block_params(entry) else {
            return None;
        };
        let regs: [Variable; 16] = std::array::from_fn(|_| b.declare_var(I64));
        let fl = b.declare_var(I64);
        // Load every register the block names, and RFLAGS.
        let mut used = 0u16;
        for o in ops {
            used |= regs_named(&o.uop);
        }
        let zero = b.ins().iconst(I64, 0);
        for (r, &var) in (0u8..).zip(regs.iter()) {
            let v = if used & (1 << r) != 0 { b.ins().load(I64, MF, cpu, gpr_off(r)) } else { zero };
            b.def_var(var, v);
        }
        let tlb = b.ins().load(I64, MF, cx, off(offset_of!(JitCtx, tlb)));
        let f = b.ins().load(I64, MF, cpu, off(offset_of!(Cpu, rflags)));
        b.def_var(fl, f);
        let done = b.declare_var(I64);
        b.def_var(done, zero);
        // A block that ends with a branch back to its own start (a tight loop) runs its
        // passes here: the back edge goes to `header`.
        let start = ops.first().map_or(0, |o| o.ip);
        let self_loop = match ops.last().map(|o| o.uop) {
            Some(Uop::Jcc { target, .. }) | Some(Uop::Jmp { target }) => target == start,
            _ => false,
        };
        let header = b.create_block();
        let mut t = Tr {
            b,
            env,
            ops,
            cpu,
            ctx: cx,
            regs,
            fl,
            pending: None,
            below: Vec::new(),
            // In a loop, any exit may follow a pass that wrote every register the block
            // names: store them all (unchanged ones store what was loaded).
            written: if self_loop { used } else { 0 },
            fl_written: self_loop,
            done,
            sig_read,
            sig_write,
            sig_note,
            sig_aes,
            sig_gen,
            sig_flags,
            sig_block,
            sig_probe,
            used,
            self_loop,
            consts: (None, Vec::new()),
            tlb,
            lf: Lf::Live,
        };
        if self_loop {
            // Every pass starts in the same state: the predecessor's flags are dropped
            // where a pass overwrites them before anything can look at them, else
            // materialised once here.
            if t.flags_dead_at_head() {
                t.lf = Lf::Stale;
            } else {
                t.materialize_lazy();
                t.lf = Lf::Clear;
            }
        }
        t.b.ins().jump(header, &[]);
        t.b.switch_to_block(header);
        let mut rip = None;
        let mut linked = false;
        let n = ops.len();
        for (i, op) in ops.iter().enumerate() {
            if self_loop && i + 1 == n {
                t.loop_back(op, i, header);
                break;
            }
            if i + 1 == n && matches!(op.uop, Uop::Jcc { .. } | Uop::Jmp { .. } | Uop::Call { .. }) {
                t.branch(op, i, start);
                linked = true;
                break;
            }
            // Inside a trace (see `super::trace`): the next instruction is where this one
            // goes.
            if let Some(next) = ops.get(i + 1).map(|o| o.ip) {
                match op.uop {
                    Uop::Jmp { target } if target == next => continue,
                    Uop::Call { target } if target == next => {
                        let ret = t.iconst(op.next_ip);
                        t.push(ret, op, i);
                        // The return address may have landed on the trace's page.
                        t.check_gen(target, i);
                        continue;
                    }
                    _ => {}
                }
            }
            rip = t.op(op, i);
            if rip.is_some() {
                break;
            }
        }
        let last = ops.last()?;
        if self_loop || linked {
            t.b.seal_all_blocks();
            t.b.finalize(tc);
            return define(module, ctx);
        }
        let rip = match rip {
            Some(r) => r,
            None => t.iconst(last.next_ip),
        };
        t.exit_probe(rip, ops.len() as u64);
        t.b.seal_all_blocks();
        t.b.finalize(tc);
    }
    define(module, ctx)
}

/// Compiles the function built in `ctx` into `module` (not yet finalized): its id and code
/// size in bytes.
fn define(module: &mut JITModule, ctx: &mut cranelift_codegen::Context) -> Option<(FuncId, usize)> {
    let id = module.declare_anonymous_function(&ctx.func.signature).ok()?;
    module.define_function(id, ctx).ok()?;
    let code = ctx.compiled_code()?;
    // Code may be written at another address than the one it runs at (`super::codemem`):
    // a relocation relative to where it is written would be wrong. Blocks call helpers
    // through absolute addresses, so none has one; refused if one ever does.
    if code.buffer.relocs().iter().any(|r| !matches!(r.kind, Reloc::Abs4 | Reloc::Abs8)) {
        return None;
    }
    Some((id, code.code_buffer().len()))
}

/// The entry of function `id` of `module`, defined by [`compile`] and finalized since
/// (`JITModule::finalize_definitions`, once for any number of functions).
pub(crate) fn entry(module: &super::CodeModule, id: FuncId) -> Option<JitFn> {
    let p = module.entry(id);
    std::ptr::NonNull::new(p.cast_mut()).map(JitFn)
}

/// The signature of every compiled block: `(cpu, ctx) -> u64` in the `tail` convention.
fn block_sig(module: &JITModule) -> Signature {
    let mut sig = module.make_signature();
    sig.params.push(AbiParam::new(I64));
    sig.params.push(AbiParam::new(I64));
    sig.returns.push(AbiParam::new(I64));
    sig.call_conv = CallConv::Tail;
    sig
}

/// Goes on in compiled block `f` (a followed link, or a jump-cache entry the probe
/// checked): `JitCtx::left` (`left`, loaded) shrinks by the `total` instructions the block
/// that leaves retired (`enter` counts them from there); then a tail call of `f` with
/// `(cpu, ctx)`.
fn follow_to(b: &mut FunctionBuilder, [cpu, cx]: [Value; 2], left: Value, total: Value, f: Value, sig_block: SigRef) {
    let l2 = b.ins().isub(left, total);
    b.ins().store(MF, l2, cx, off(offset_of!(JitCtx, left)));
    b.ins().return_call_indirect(sig_block, f, &[cpu, cx]);
}

/// RFLAGS from the context's lazy record of kind `kind` (non-zero; see `JitCtx::lf_kind`)
/// over `old`, through [`super::jit_flags`] (signature `sig_flags`); clears the record.
fn lazy_flags(b: &mut FunctionBuilder, cx: Value, kind: Value, old: Value, sig_flags: SigRef) -> Value {
    let ld = |b: &mut FunctionBuilder, o: usize| b.ins().load(I64, MF, cx, off(o));
    let la = ld(b, offset_of!(JitCtx, lf_a));
    let lb = ld(b, offset_of!(JitCtx, lf_b));
    let lr = ld(b, offset_of!(JitCtx, lf_r));
    let fp = b.ins().iconst(I64, super::jit_flags as *const () as i64);
    let call = b.ins().call_indirect(sig_flags, fp, &[kind, la, lb, lr, old]);
    let f = b.inst_results(call).first().copied().unwrap_or(old);
    let zero = b.ins().iconst(I64, 0);
    b.ins().store(MF, zero, cx, off(offset_of!(JitCtx, lf_kind)));
    f
}

/// `JitCtx::chained` += 1 (a block entered through a jump cache).
fn count_chained(b: &mut FunctionBuilder, cx: Value) {
    let c = b.ins().load(I64, MF, cx, off(offset_of!(JitCtx, chained)));
    let c = b.ins().iadd_imm_s(c, 1);
    b.ins().store(MF, c, cx, off(offset_of!(JitCtx, chained)));
}

/// The signature of [`probe`]: `(cpu, ctx, retired) -> u64` in the `tail` convention.
fn probe_sig(module: &JITModule) -> Signature {
    let mut sig = block_sig(module);
    sig.params.push(AbiParam::new(I64));
    sig
}

/// Compiles the jump-cache probe (QEMU's `lookup_and_goto_ptr`), tail-called by a block's
/// exits whose target is not a link (RET, indirect transfers, other pages, the end of the
/// block) after it stored its state and RIP: `probe(cpu, ctx, retired)` with `retired` the
/// instructions the exiting block retired. It continues in the compiled block that the
/// jump cache holds for RIP when `enter` would (`super::jc_next`): the entry is RIP's, of
/// the current epoch and privilege, its length fits in `JitCtx::left`, RIP translates to
/// its GPA through a TLB entry that allows execution (no TLB fill here: a miss returns),
/// and its page kept its generation. Else it continues, under the same conditions, in the
/// baseline code that the baseline jump cache holds for RIP (of the current baseline
/// epoch), counting its runs as the baseline probe does. Otherwise it returns `retired` (an
/// [`EXIT_NORMAL`]), and `enter` looks again. Reached from a link not filled yet
/// (`JitCtx::link` set), it leaves Cranelift code to `enter` (returning [`EXIT_LINK`]),
/// which fills the link. Shared by every block of every vCPU
/// (everything it reads comes through `ctx`). None if Cranelift refuses.
pub(crate) fn probe(code: &mut super::CodeModule) -> Option<*const u8> {
    use super::jc_layout as jl;
    let module = &mut code.m;
    let mut ctx = cranelift_module::Module::make_context(module);
    let mut fctx = FunctionBuilderContext::new();
    let tc = module.target_config();
    ctx.func.signature = probe_sig(module);
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
        let sig_block = b.import_signature(block_sig(module));
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let &[cpu, cx, total] = b.block_params(entry) else {
            return None;
        };
        let ld = |b: &mut FunctionBuilder, ty: Type, base: Value, o: usize| b.ins().load(ty, MF, base, off(o));
        let rip = ld(&mut b, I64, cpu, offset_of!(Cpu, rip));
        // super::jc_index: Fibonacci hashing (the entry's offset in either table).
        let bits = super::JC_SIZE.trailing_zeros();
        let h = b.ins().imul_imm_s(rip, 0x9e37_79b9_7f4a_7c15_u64 as i64);
        let h = b.ins().ushr_imm_s(h, i64::from(64 - bits));
        let h = b.ins().imul_imm_s(h, jl::SIZE as i64);
        let bmiss = b.create_block();
        let miss = b.create_block();
        // One compare and branch per condition (each icmp fuses with its brif).
        let check = |b: &mut FunctionBuilder, ok: Value, miss: cranelift_codegen::ir::Block| {
            let next = b.create_block();
            b.ins().brif(ok, next, &[], miss, &[]);
            b.switch_to_block(next);
        };
        // The checks of the entry at `e` of the table whose current epoch is `cur_epoch`
        // (see the doc above); its code on success, else to `miss`.
        let entry = |b: &mut FunctionBuilder,
                     e: Value,
                     cur_epoch: Value,
                     miss: cranelift_codegen::ir::Block|
         -> (Value, Value) {
            let erip = ld(b, I64, e, jl::RIP);
            let c = b.ins().icmp(IntCC::Equal, erip, rip);
            check(b, c, miss);
            let f = ld(b, I64, e, jl::F);
            let c = b.ins().icmp_imm_s(IntCC::NotEqual, f, 0);
            check(b, c, miss);
            let epoch = b.ins().uload32(MF, e, off(jl::EPOCH));
            let c = b.ins().icmp(IntCC::Equal, epoch, cur_epoch);
            check(b, c, miss);
            let user = b.ins().uload8(I64, MF, e, off(jl::USER));
            let cur_user = ld(b, I64, cx, offset_of!(JitCtx, user));
            let c = b.ins().icmp(IntCC::Equal, user, cur_user);
            check(b, c, miss);
            let len = b.ins().uload32(MF, e, off(jl::LEN));
            let left = ld(b, I64, cx, offset_of!(JitCtx, left));
            let need = b.ins().iadd(total, len);
            let c = b.ins().icmp(IntCC::UnsignedLessThanOrEqual, need, left);
            check(b, c, miss);
            // RIP's TLB entry (as `Cpu::translate` hits it for an instruction fetch).
            let tlb = ld(b, I64, cx, offset_of!(JitCtx, tlb));
            let ti = b.ins().ushr_imm_s(rip, 12);
            let ti = b.ins().band_imm_s(ti, (TLB_SIZE - 1) as i64);
            let ti = b.ins().imul_imm_s(ti, tlb_layout::SIZE as i64);
            let te = b.ins().iadd(tlb, ti);
            let tag = ld(b, I64, te, tlb_layout::TAG);
            let pg = b.ins().band_imm_s(rip, !0xfff_i64);
            let want = b.ins().bor_imm_s(pg, TLB_VALID as i64);
            let c = b.ins().icmp(IntCC::Equal, tag, want);
            check(b, c, miss);
            // P_EXEC, and P_USER at CPL 3 (P_USER is bit 0, like `user`).
            const _: () = assert!(P_USER == 1);
            let perm = b.ins().uload8(I64, MF, te, off(tlb_layout::PERM));
            let needp = b.ins().bor_imm_s(cur_user, i64::from(P_EXEC));
            let has = b.ins().band(perm, needp);
            let c = b.ins().icmp(IntCC::Equal, has, needp);
            check(b, c, miss);
            let tgpa = ld(b, I64, te, tlb_layout::GPA);
            let o = b.ins().band_imm_s(rip, 0xfff);
            let gpa = b.ins().bor(tgpa, o);
            let egpa = ld(b, I64, e, jl::GPA);
            let c = b.ins().icmp(IntCC::Equal, gpa, egpa);
            check(b, c, miss);
            // The page's code generation (`SharedRam` keeps them in one array of u32).
            let gens = ld(b, I64, cx, offset_of!(JitCtx, gens));
            let page = ld(b, I64, e, jl::PAGE);
            let ga = b.ins().imul_imm_s(page, 4);
            let ga = b.ins().iadd(gens, ga);
            let g = b.ins().uload32(MemFlagsData::new(), ga, 0);
            let eg = b.ins().uload32(MF, e, off(jl::GEN));
            let c = b.ins().icmp(IntCC::Equal, g, eg);
            check(b, c, miss);
            (f, left)
        };
        // A link exit not filled yet (see `Translator::exit_to`): `enter` fills it with
        // Cranelift code, so that is left to it.
        let link = ld(&mut b, I64, cx, offset_of!(JitCtx, link));
        let jc = ld(&mut b, I64, cx, offset_of!(JitCtx, jc));
        let e = b.ins().iadd(jc, h);
        let cur_epoch = ld(&mut b, I64, cx, offset_of!(JitCtx, epoch));
        let (f, left) = entry(&mut b, e, cur_epoch, bmiss);
        let c = b.ins().icmp_imm_s(IntCC::Equal, link, 0);
        check(&mut b, c, miss);
        count_chained(&mut b, cx);
        follow_to(&mut b, [cpu, cx], left, total, f, sig_block);
        // No Cranelift code: the block's baseline code (its prologue takes `(cpu, ctx)` in
        // registers and returns as the `tail` convention does), counting its runs as the
        // baseline probe does (a full batch goes back to `enter`, which adds it to the
        // block's hits).
        b.switch_to_block(bmiss);
        let bjc = ld(&mut b, I64, cx, offset_of!(JitCtx, bjc));
        let e = b.ins().iadd(bjc, h);
        let cur_epoch = ld(&mut b, I64, cx, offset_of!(JitCtx, base_epoch));
        let (f, left) = entry(&mut b, e, cur_epoch, miss);
        let runs = b.ins().uload32(MF, e, off(jl::RUNS));
        let runs = b.ins().iadd_imm_s(runs, 1);
        let c = b.ins().icmp_imm_s(IntCC::UnsignedLessThan, runs, i64::from(super::BJC_BATCH));
        check(&mut b, c, miss);
        b.ins().istore32(MF, runs, e, off(jl::RUNS));
        let zero = b.ins().iconst(I64, 0);
        b.ins().store(MF, zero, cx, off(offset_of!(JitCtx, link)));
        count_chained(&mut b, cx);
        // Baseline code reads RFLAGS from the `Cpu`: the lazily kept flags are
        // materialised first (`JitCtx::lf_kind`).
        let kind = ld(&mut b, I64, cx, offset_of!(JitCtx, lf_kind));
        let set = b.create_block();
        let go = b.create_block();
        b.ins().brif(kind, set, &[], go, &[]);
        b.switch_to_block(set);
        let old = ld(&mut b, I64, cpu, offset_of!(Cpu, rflags));
        let mut fs = Signature::new(module.make_signature().call_conv);
        fs.params.extend([AbiParam::new(I64); 5]);
        fs.returns.push(AbiParam::new(I64));
        let sig_flags = b.import_signature(fs);
        let fl = lazy_flags(&mut b, cx, kind, old, sig_flags);
        b.ins().store(MF, fl, cpu, off(offset_of!(Cpu, rflags)));
        b.ins().jump(go, &[]);
        b.switch_to_block(go);
        follow_to(&mut b, [cpu, cx], left, total, f, sig_block);
        b.switch_to_block(miss);
        // `total` (EXIT_NORMAL), or EXIT_LINK for a link exit.
        let kind = b.ins().iconst(I64, (super::EXIT_LINK << 32) as i64);
        let none = b.ins().iconst(I64, 0);
        let k = b.ins().select(link, kind, none);
        let code = b.ins().iadd(total, k);
        b.ins().return_(&[code]);
        b.seal_all_blocks();
        b.finalize(tc);
    }
    define_finalized(code, &mut ctx)
}

/// Compiles the function built in `ctx` into `module` and finalizes it: its entry. For
/// the code compiled once per process (`super::shared_code`).
fn define_finalized(module: &mut super::CodeModule, ctx: &mut cranelift_codegen::Context) -> Option<*const u8> {
    let (id, bytes) = define(&mut module.m, ctx)?;
    module.m.finalize_definitions().ok()?;
    let at = module.entry(id);
    super::perf_map_note(at, bytes, format_args!("rv-emu shared code"));
    Some(at)
}

/// Compiles the trampoline through which Rust enters compiled blocks:
/// `extern "C" fn(cpu, ctx, block) -> u64` calling `block(cpu, ctx)` in the `tail`
/// convention. None if Cranelift refuses.
pub(crate) fn trampoline(code: &mut super::CodeModule) -> Option<*const u8> {
    let module = &mut code.m;
    let mut ctx = cranelift_module::Module::make_context(module);
    let mut fctx = FunctionBuilderContext::new();
    let tc = module.target_config();
    let mut sig = module.make_signature();
    for _ in 0..3 {
        sig.params.push(AbiParam::new(I64));
    }
    sig.returns.push(AbiParam::new(I64));
    ctx.func.signature = sig;
    let tail = block_sig(module);
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
        let sig_block = b.import_signature(tail);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let &[cpu, cx, f] = b.block_params(entry) else {
            return None;
        };
        let call = b.ins().call_indirect(sig_block, f, &[cpu, cx]);
        let r = *b.inst_results(call).first()?;
        b.ins().return_(&[r]);
        b.seal_all_blocks();
        b.finalize(tc);
    }
    define_finalized(code, &mut ctx)
}

/// Bit mask of the GPRs a fast form names (read or written).
fn regs_named(u: &Uop) -> u16 {
    let r = |x: u8| if x == NONE { 0 } else { 1u16 << (x & 15) };
    let m = |m: &MemOp| r(m.base) | r(m.index);
    let s = |s: &Src| match s {
        Src::Reg(x) => r(*x),
        Src::Imm(_) => 0,
        Src::Mem(mm) => m(mm),
    };
    match u {
        Uop::Generic | Uop::Nop | Uop::Jcc { .. } | Uop::Jmp { .. } | Uop::Cli => 0,
        Uop::BitI { s: x, .. } => s(x),
        Uop::CmpxchgM { m: mm, s: x, .. } => r(0) | r(*x) | m(mm),
        Uop::Sse(x) => match x {
            Sse::Mov { s: Xs::M(mm), .. }
            | Sse::LoadZ { s: Xs::M(mm), .. }
            | Sse::Fp { s: Xs::M(mm), .. }
            | Sse::Vec { s: Xs::M(mm), .. }
            | Sse::Ucomi { s: Xs::M(mm), .. }
            | Sse::Store { m: mm, .. } => m(mm),
            Sse::FromGpr { s: g, .. } => r(*g),
            Sse::ToGpr { d, .. } | Sse::Pmovmskb { d, .. } => r(*d),
            Sse::Pshufd { s: Xs::M(mm), .. } | Sse::Palignr { s: Xs::M(mm), .. } | Sse::Aes { s: Xs::M(mm), .. } => {
                m(mm)
            }
            Sse::CvtI2F { s: x, .. } => s(x),
            _ => 0,
        },
        Uop::MovR { d, s: x, .. } => r(*d) | s(x),
        Uop::MovM { m: mm, s: x, .. } => m(mm) | s(x),
        Uop::Lea { d, m: mm, .. } => r(*d) | m(mm),
        Uop::Unary { d, .. } => r(*d),
        Uop::ShiftCl { d, .. } => r(*d) | r(1),
        Uop::Alu { d, s: x, .. } | Uop::AluF { d, s: x, .. } | Uop::Imul3 { d, s: x, .. } => r(*d) | s(x),
        Uop::AluM { m: mm, s: x, .. } => m(mm) | s(x),
        Uop::Setcc { d, .. } => r(*d),
        Uop::Cmov { d, s: x, .. } => r(*d) | s(x),
        Uop::MovXR { d, s: x, .. } => r(*d) | r(*x & !HIGH8),
        Uop::Bswap { d, .. } => r(*d),
        Uop::Div { s: x, .. } => s(x) | r(0) | r(2),
        Uop::Bsf { d, s: x, .. } => r(*d) | s(x),
        Uop::MovX { d, m: mm, .. } => r(*d) | m(mm),
        Uop::IncDec { d, .. } | Uop::Shift { d, .. } => r(*d),
        Uop::IncDecM { m: mm, .. } => m(mm),
        Uop::Call { .. } | Uop::Ret => r(4),
        Uop::JmpInd { s: x } => s(x),
        Uop::CallInd { s: x } => s(x) | r(4),
        Uop::Push { r: x } | Uop::Pop { r: x } => r(*x) | r(4),
        Uop::PushI { .. } | Uop::Pushf => r(4),
        Uop::MovSreg { d, .. } => r(*d),
        Uop::SetccM { m: mm, .. } => m(mm),
    }
}

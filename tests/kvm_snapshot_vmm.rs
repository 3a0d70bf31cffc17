//! VMM-level snapshot/restore on the `kvm` accelerator, driven over the REST API, with a
//! tiny hand-made guest: an ELF64 with one PT_LOAD at 1 MiB and a Xen PVH entry note, whose
//! 32-bit code keeps a counter in a register (ESI) and in memory (at 32 MiB) and prints
//! `RV-COUNT <register> <memory>` on COM1 forever, with a busy-wait between lines.
//!
//! create → boot → a few counts → pause (the console stops) → snapshot → kill -9 → a new VMM
//! → restore (Paused, kvm) → resume: the next count is the last one before the pause + 1,
//! register and memory still agree, and the count keeps increasing.
//!
//! Skipped (with a message) when /dev/kvm is absent. On a PVM host the VMM needs
//! `RUSTVISOR_KVM_ON_PVM=1` to accept `accel: "kvm"`; it is set on every VMM started here.

mod common;

use api::client::Client;
use api::types::VmConfig;
use common::*;
use iced_x86::code_asm::*;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the guest is loaded and entered (the PVH entry), GPA.
const ENTRY: u64 = 0x10_0000;
/// The guest's in-memory copy of the counter, GPA (32 MiB, inside the 64 MiB of RAM).
const COUNTER_GPA: u32 = 0x200_0000;
/// Scratch buffer for the decimal digits, GPA.
const DIGITS_GPA: u32 = 0x20_0000;
/// Guest stack top, GPA (conventional memory, below the EBDA).
const STACK_TOP: u32 = 0x8_0000;
/// Busy-wait iterations between lines (two instructions each). Guest kernel-mode code is
/// emulated at ~1.8 M instructions/s on the PVM host, so this is ~0.15 s per line there.
const DELAY_LOOPS: u32 = 130_000;
const COM1_THR: u32 = 0x3f8;
const COM1_LSR: u32 = 0x3fd;
/// Xen ELF note type XEN_ELFNOTE_PHYS32_ENTRY.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// The guest's 32-bit code (protected mode, paging off, flat segments from the VMM's boot
/// GDT: code 0x20, data 0x10), assembled for [`ENTRY`].
fn guest_code() -> Vec<u8> {
    fn build() -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(32)?;
        let mut main = a.create_label();
        let mut delay = a.create_label();
        let mut bad = a.create_label();
        let mut halt = a.create_label();
        let mut putc = a.create_label();
        let mut putc_wait = a.create_label();
        let mut putdec = a.create_label();
        let mut putdec_conv = a.create_label();
        let mut putdec_out = a.create_label();

        a.mov(eax, 0x10u32)?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(ss, ax)?;
        a.mov(esp, STACK_TOP)?;
        a.xor(esi, esi)?;
        a.mov(dword_ptr(COUNTER_GPA), 0u32)?;

        a.set_label(&mut main)?;
        // The register and memory copies must agree, before and after a snapshot.
        a.cmp(dword_ptr(COUNTER_GPA), esi)?;
        a.jne(bad)?;
        for byte in b"RV-COUNT " {
            a.mov(al, u32::from(*byte))?;
            a.call(putc)?;
        }
        a.mov(eax, esi)?;
        a.call(putdec)?;
        a.mov(al, u32::from(b' '))?;
        a.call(putc)?;
        a.mov(eax, dword_ptr(COUNTER_GPA))?;
        a.call(putdec)?;
        a.mov(al, u32::from(b'\n'))?;
        a.call(putc)?;
        a.inc(esi)?;
        a.inc(dword_ptr(COUNTER_GPA))?;
        a.mov(ecx, DELAY_LOOPS)?;
        a.set_label(&mut delay)?;
        a.dec(ecx)?;
        a.jnz(delay)?;
        a.jmp(main)?;

        a.set_label(&mut bad)?;
        for byte in b"RV-MISMATCH\n" {
            a.mov(al, u32::from(*byte))?;
            a.call(putc)?;
        }
        a.set_label(&mut halt)?;
        a.cli()?;
        a.hlt()?;
        a.jmp(halt)?;

        // putc: AL = byte; waits for THRE (LSR bit 5), then writes THR. Keeps all registers.
        a.set_label(&mut putc)?;
        a.push(edx)?;
        a.push(eax)?;
        a.mov(edx, COM1_LSR)?;
        a.set_label(&mut putc_wait)?;
        a.in_(al, dx)?;
        a.test(al, 0x20u32)?;
        a.jz(putc_wait)?;
        a.pop(eax)?;
        a.mov(edx, COM1_THR)?;
        a.out(dx, al)?;
        a.pop(edx)?;
        a.ret()?;

        // putdec: EAX = value, printed in decimal. Clobbers EAX, ECX, EDX, EDI.
        a.set_label(&mut putdec)?;
        a.mov(edi, DIGITS_GPA + 16)?;
        a.mov(ecx, 10u32)?;
        a.set_label(&mut putdec_conv)?;
        a.xor(edx, edx)?;
        a.div(ecx)?;
        a.add(dl, u32::from(b'0'))?;
        a.dec(edi)?;
        a.mov(byte_ptr(edi), dl)?;
        a.test(eax, eax)?;
        a.jnz(putdec_conv)?;
        a.set_label(&mut putdec_out)?;
        a.mov(al, byte_ptr(edi))?;
        a.call(putc)?;
        a.inc(edi)?;
        a.cmp(edi, DIGITS_GPA + 16)?;
        a.jb(putdec_out)?;
        a.ret()?;

        a.assemble(ENTRY)
    }
    build().expect("assemble the guest")
}

/// A minimal ELF64 executable as linux-loader's `Elf` loader wants it (magic, little endian,
/// `e_phentsize` = 56, `e_phoff` ≥ 64, `e_entry` ≥ the VMM's high-memory start of 1 MiB):
/// one PT_LOAD of `code` at physical [`ENTRY`] and a PT_NOTE holding the Xen PVH entry note
/// (name "Xen\0", type 18, 4-byte descriptor = entry GPA).
fn tiny_elf(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    const CODE_OFF: usize = 0x1000;
    let note_off = EHDR + 2 * PHDR;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // n_namesz
    note.extend_from_slice(&4u32.to_le_bytes()); // n_descsz
    note.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes()); // n_type
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(ENTRY as u32).to_le_bytes());

    let mut f = Vec::new();
    // e_ident: magic, ELFCLASS64, ELFDATA2LSB, EV_CURRENT, System V ABI, padding.
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // e_type = ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine = EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes()); // e_version
    f.extend_from_slice(&ENTRY.to_le_bytes()); // e_entry
    f.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&(EHDR as u16).to_le_bytes()); // e_ehsize
    f.extend_from_slice(&(PHDR as u16).to_le_bytes()); // e_phentsize
    f.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    assert_eq!(f.len(), EHDR);
    let phdr = |f: &mut Vec<u8>, p_type: u32, p_flags: u32, off: usize, addr: u64, size: usize, align: u64| {
        f.extend_from_slice(&p_type.to_le_bytes());
        f.extend_from_slice(&p_flags.to_le_bytes());
        f.extend_from_slice(&(off as u64).to_le_bytes());
        f.extend_from_slice(&addr.to_le_bytes()); // p_vaddr
        f.extend_from_slice(&addr.to_le_bytes()); // p_paddr
        f.extend_from_slice(&(size as u64).to_le_bytes()); // p_filesz
        f.extend_from_slice(&(size as u64).to_le_bytes()); // p_memsz
        f.extend_from_slice(&align.to_le_bytes());
    };
    phdr(&mut f, 1, 5, CODE_OFF, ENTRY, code.len(), 0x1000); // PT_LOAD, R+X
    phdr(&mut f, 4, 4, note_off, 0, note.len(), 4); // PT_NOTE, R
    assert_eq!(f.len(), note_off);
    f.extend_from_slice(&note);
    f.resize(CODE_OFF, 0);
    f.extend_from_slice(code);
    f
}

/// A `rustvisor vmm` process (stderr to a file), killed when dropped.
struct Vmm {
    child: Child,
    client: Client,
}

impl Vmm {
    fn start(sock: &Path, stderr: &Path) -> Vmm {
        let err = std::fs::File::create(stderr).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_rustvisor"))
            .args(["vmm", "--api-socket"])
            .arg(sock)
            .env("RUSTVISOR_KVM_ON_PVM", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        let client = Client::new(sock).unwrap().with_timeout(Duration::from_secs(30));
        let end = Instant::now() + Duration::from_secs(10);
        while client.ping().is_err() {
            assert!(Instant::now() < end, "the VMM's API did not come up");
            std::thread::sleep(Duration::from_millis(10));
        }
        Vmm { child, client }
    }

    /// kill -9, and reap it.
    fn kill9(mut self) {
        self.child.kill().unwrap();
        let st = self.child.wait().unwrap();
        assert_eq!(st.signal(), Some(libc::SIGKILL), "the VMM was not killed by SIGKILL: {st}");
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One complete console line `RV-COUNT <reg> <mem>`: (register, memory, offset just past
/// its newline).
type Line = (u64, u64, usize);

/// The complete (newline-terminated) lines of the console; panics on any other line.
fn counts(text: &str) -> Vec<Line> {
    let mut v = Vec::new();
    let mut off = 0;
    for l in text.split_inclusive('\n') {
        off += l.len();
        let Some(l) = l.strip_suffix('\n') else { break };
        let mut f = l.strip_prefix("RV-COUNT ").unwrap_or_else(|| panic!("unexpected console line {l:?}")).split(' ');
        let mut num = || f.next().and_then(|s| s.parse::<u64>().ok()).unwrap_or_else(|| panic!("bad line {l:?}"));
        v.push((num(), num(), off));
    }
    v
}

fn console(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// What to show when a wait fails: the console's tail and the VMMs' stderr.
fn diagnostics(dir: &TempDir) -> String {
    let err = |n: &str| std::fs::read_to_string(dir.path(n)).unwrap_or_default();
    format!(
        "console:\n{}\nVMM A stderr:\n{}\nVMM B stderr:\n{}",
        tail(&console(&dir.path("console.log"))),
        tail(&err("a.err")),
        tail(&err("b.err"))
    )
}

/// Waits (at most `timeout`) until the console's last complete count is ≥ `at_least`.
fn wait_count(dir: &TempDir, at_least: u64, timeout: Duration) -> u64 {
    let end = Instant::now() + timeout;
    loop {
        if let Some(&(n, _, _)) = counts(&console(&dir.path("console.log"))).last() {
            if n >= at_least {
                return n;
            }
        }
        assert!(Instant::now() < end, "the counter did not reach {at_least} in {timeout:?}\n{}", diagnostics(dir));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kvm_tiny_guest_snapshot_kill_restore_continues_the_counter() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm is absent");
        return;
    }
    let t0 = Instant::now();
    let dir = TempDir::new("kvm-snap-vmm");
    let kernel = dir.path("tiny-pvh.elf");
    std::fs::write(&kernel, tiny_elf(&guest_code())).unwrap();
    let log = dir.path("console.log");
    let snap = dir.path("snap");
    let cfg = VmConfig {
        kernel: kernel.display().to_string(),
        initrd: None,
        cmdline: "console=ttyS0".into(),
        memory_mib: 64,
        cpus: 1,
        accel: api::types::Accel::Kvm,
        serial: api::types::ConsoleOut::File(log.to_path_buf()),
        console: None,
        disks: vec![],
        nets: vec![],
        vsock: None,
        rng: false,
        balloon: None,
        memory_options: Default::default(),
    };

    // First VMM: boot, count, pause, snapshot, kill -9.
    let vmm = Vmm::start(&dir.path("a.sock"), &dir.path("a.err"));
    let c = &vmm.client;
    c.create(&cfg).unwrap();
    assert_eq!(c.info().unwrap().state, "Created");
    c.boot().unwrap();
    let booted = Instant::now();
    let info = c.info().unwrap();
    assert_eq!((info.state.as_str(), info.accelerator.as_deref()), ("Running", Some("kvm")), "{info:?}");
    wait_count(&dir, 0, Duration::from_secs(20));
    let first_line = booted.elapsed();
    wait_count(&dir, 4, Duration::from_secs(30));
    let per_line = (booted.elapsed() - first_line) / 4;
    eprintln!("first line {first_line:?} after boot, then one line every ~{per_line:?}");

    c.pause().unwrap();
    assert_eq!(c.info().unwrap().state, "Paused");
    let at_pause = console(&log);
    let lines = counts(&at_pause);
    let &(before, _, before_end) = lines.last().unwrap();
    std::thread::sleep(Duration::from_millis(800).max(per_line * 4));
    assert_eq!(console(&log), at_pause, "the console changed while the VM was paused");

    c.snapshot(&snap).unwrap();
    let state = std::fs::read_to_string(snap.join("snapshot.json")).unwrap();
    assert!(state.contains("\"accelerator\":\"kvm\""), "snapshot.json does not say kvm");
    assert_eq!(std::fs::metadata(snap.join("memory.bin")).unwrap().len(), 64 << 20, "memory.bin size");
    vmm.kill9();
    assert_eq!(console(&log), at_pause, "the console changed after the pause");

    // Second VMM: restore (paused, kvm), resume, the counter continues.
    let vmm = Vmm::start(&dir.path("b.sock"), &dir.path("b.err"));
    let c = &vmm.client;
    let restore_start = Instant::now();
    c.restore(&snap).unwrap();
    let restore_time = restore_start.elapsed();
    let info = c.info().unwrap();
    assert_eq!(info.state, "Paused", "{info:?}");
    assert_eq!(info.accelerator.as_deref(), Some("kvm"), "{info:?}");
    assert_eq!((info.config.accel.as_str(), info.config.memory_mib), ("kvm", 64), "{info:?}");
    std::thread::sleep(Duration::from_millis(500).max(per_line * 2));
    assert_eq!(console(&log), at_pause, "the restored VM ran before vm.resume");

    c.resume().unwrap();
    assert_eq!(c.info().unwrap().state, "Running");
    let last = wait_count(&dir, before + 5, Duration::from_secs(30));
    assert!(last >= before + 5);

    let text = console(&log);
    assert!(text.starts_with(&at_pause), "the console before the pause was rewritten");
    assert!(!text.contains("MISMATCH"), "register and memory counters disagreed\n{}", diagnostics(&dir));
    let all = counts(&text);
    // The first line completed after the restore is the last count before the pause + 1.
    let next = all.iter().find(|l| l.2 > before_end).unwrap();
    assert_eq!(next.0, before + 1, "first count after the restore (last before the pause: {before})");
    // Every line: register = memory, and the counts run 0, 1, 2, ... without gap or repeat.
    for (i, &(reg, mem, _)) in all.iter().enumerate() {
        assert_eq!(reg, mem, "register and memory counters differ on line {i}");
        assert_eq!(reg, i as u64, "counts are not consecutive: {:?}", all.iter().map(|l| l.0).collect::<Vec<_>>());
    }

    c.vmm_shutdown().unwrap();
    let mut vmm = vmm;
    let end = Instant::now() + Duration::from_secs(10);
    let st = loop {
        if let Some(st) = vmm.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < end, "the VMM did not exit after vmm.shutdown\n{}", diagnostics(&dir));
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(st.code(), Some(0), "VMM exit status");
    eprintln!(
        "counts 0..={before} before the snapshot, {}..={last} after; restore {restore_time:?}; total {:?}",
        before + 1,
        t0.elapsed()
    );
}

//! Seccomp-BPF allow-lists for the VMM's threads (issue 14): each thread installs the filter
//! of its [`Role`] with [`apply`] before it touches guest data, and from then on may make
//! only the system calls its role needs (with argument checks where they matter: ioctl
//! numbers, socket families, no executable memory, threads but no processes).
//!
//! - [`init`] picks the [`Mode`] for the whole process (`--seccomp on|log|off`) and, for
//!   [`Mode::On`], installs the `SIGSYS` handler; [`apply`] does nothing before [`init`] (unit
//!   tests, the daemon) or under [`Mode::Off`].
//! - [`Mode::On`]: a system call outside the list traps (`SECCOMP_RET_TRAP`); the handler
//!   writes one line, `rustvisor: bad system call N (name) on thread T`, to stderr (the VMM's
//!   log) and ends the process with status [`BAD_SYSCALL_EXIT_STATUS`] (Firecracker does the
//!   same with its own status). [`Mode::Log`]: the call goes ahead and the kernel logs it
//!   (`SECCOMP_RET_LOG`: a `type=1326` audit record in `dmesg` naming the thread's `comm` and
//!   the `syscall=` number), to find what a filter lacks without stopping the VM.
//! - Filters stack: a thread keeps the filter of the thread that started it, and adds its own.
//!   So the thread that starts others (the API's blocking workers, which build VMs) has the
//!   widest list ([`Role::Api`]), and a thread's own list narrows it. The lists are in
//!   [`filters`], one function per role, with the reason for every system call.
//! - A few calls are refused quietly (`ENOSYS`) rather than trapped, by a second filter
//!   ([`filters::refused`]): `clone3`, whose flags a filter cannot read, so that glibc falls
//!   back to `clone`, whose flags it can; and `openat` on threads that open no file, because
//!   glibc's allocator reads `/proc/sys/vm/overcommit_memory` once per process on whichever
//!   thread first shrinks a heap, and copes with a failure.
//! - Test hook: with `RUSTVISOR_TEST_HOOKS=1` and `RUSTVISOR_TEST_BAD_SYSCALL=<role name>` in
//!   the environment, the first thread of that role makes a forbidden system call (`getppid`)
//!   right after installing its filter, so the integration tests can check, per role, that the
//!   filter is really on and that the report names the thread. Environment variables, not a
//!   cargo feature: the tests run the same binary that ships (a feature would build another
//!   one), and whoever sets a VMM's environment already controls the process; the guest and
//!   the API cannot reach it. Two variables so that a stray one alone does nothing.

pub mod filters;
mod names;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

pub use names::SYSCALL_NAMES;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// The exit status of a VMM stopped by a forbidden system call: 128 + `SIGSYS` (31), what a
/// shell shows for a process that `SIGSYS` killed.
pub const BAD_SYSCALL_EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// The system call the test hook makes: one that no role allows (and harmless if it runs,
/// under [`Mode::Log`]).
pub const TEST_BAD_SYSCALL: libc::c_long = libc::SYS_getppid;

/// What a filter does with a system call outside its list (`--seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Trap (`SECCOMP_RET_TRAP`): report the call and end the VMM. The default.
    #[default]
    On,
    /// Allow it and have the kernel log it (`SECCOMP_RET_LOG`).
    Log,
    /// Install no filter.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "on" => Ok(Mode::On),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            _ => Err(format!("{s:?}: expected on, log or off")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::On => "on",
            Mode::Log => "log",
            Mode::Off => "off",
        })
    }
}

/// What a VMM thread does, which decides its filter (see [`filters`] for each list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The process's main thread once the VMM is set up: waits for the end, then tears the
    /// VM down (joins threads, flushes disks, removes sockets).
    Main,
    /// The API server thread (`api-server`) and, inherited, the blocking workers it starts
    /// (`api-worker`), which carry out requests: they build, boot, restore, snapshot, back up
    /// and delete VMs, so they start every other thread.
    Api,
    /// A vCPU thread (`vcpuN`) on the kvm accelerator: `KVM_RUN` and the device models.
    VcpuKvm,
    /// A vCPU thread (`vcpuN`) on the emu accelerator: the x86 emulator and device models.
    VcpuEmu,
    /// A virtio device's worker thread (`virtio-blk`, `virtio-net`, ...): virtqueues and the
    /// device's host side (image files, TAP, Unix sockets, getrandom, madvise).
    VirtioWorker,
    /// The serial console multiplexer (`serial-console`): a Unix socket, its clients, a log.
    SerialConsole,
    /// The VM's device-event thread (`vm-events`): pauses the VM on a stalled disk.
    VmEvents,
    /// `vmm.shutdown`'s threads: the one that stops the VM (`api-vmm-shutdown`) and the
    /// deadline after which the process ends anyway (`vmm-shutdown-deadline`).
    Shutdown,
    /// A backup's copier thread (`backup-copier`): reads the disk, writes the target.
    BackupCopier,
    /// `rustvisor run`'s terminal input thread: stdin to the serial port.
    ConsoleInput,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 10] = [
        Role::Main,
        Role::Api,
        Role::VcpuKvm,
        Role::VcpuEmu,
        Role::VirtioWorker,
        Role::SerialConsole,
        Role::VmEvents,
        Role::Shutdown,
        Role::BackupCopier,
        Role::ConsoleInput,
    ];

    /// The role's name (the test hook's `RUSTVISOR_TEST_BAD_SYSCALL` value; both vCPU roles
    /// are `vcpu`).
    pub fn name(self) -> &'static str {
        match self {
            Role::Main => "main",
            Role::Api => "api",
            Role::VcpuKvm | Role::VcpuEmu => "vcpu",
            Role::VirtioWorker => "virtio-worker",
            Role::SerialConsole => "serial-console",
            Role::VmEvents => "vm-events",
            Role::Shutdown => "shutdown",
            Role::BackupCopier => "backup-copier",
            Role::ConsoleInput => "console-input",
        }
    }
}

/// Why a filter could not be made or installed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// seccompiler refused the rules or the kernel the program.
    #[error("seccomp filter for role {role}: {source}")]
    Filter {
        /// The role.
        role: &'static str,
        /// seccompiler's (or the kernel's) error.
        #[source]
        source: seccompiler::Error,
    },
    /// `sigaction(SIGSYS)` failed.
    #[error("installing the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
    /// [`init`] was called twice.
    #[error("the seccomp mode is already set")]
    AlreadySet,
}

/// The process's mode, set once by [`init`].
static MODE: OnceLock<Mode> = OnceLock::new();
/// The test hook's role name (`RUSTVISOR_TEST_BAD_SYSCALL`), read by [`init`].
static BAD_SYSCALL_ROLE: OnceLock<Option<String>> = OnceLock::new();
/// The test hook fired already (it fires once per process).
static BAD_SYSCALL_DONE: AtomicBool = AtomicBool::new(false);
/// Executable memory is allowed ([`allow_exec_memory`]).
pub(crate) static EXEC_MEMORY: AtomicBool = AtomicBool::new(false);

/// Lets every role map memory executable (`mmap`/`mprotect` with `PROT_EXEC`): for the emu
/// translation tier's code cache (`RUSTVISOR_EMU_TIER=jit|auto`), which vCPU threads fill
/// and which their parents' filters (stacked) must allow too. Call before [`apply`] runs on
/// any thread; without it, `PROT_EXEC` is refused everywhere.
pub fn allow_exec_memory() {
    EXEC_MEMORY.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Sets the process's mode (call once, on the main thread, before any thread that calls
/// [`apply`] starts) and, for [`Mode::On`], installs the `SIGSYS` handler. Reads the test
/// hook's environment variables.
///
/// Errors: [`Error::AlreadySet`] on a second call, [`Error::Handler`] when `sigaction` fails.
pub fn init(mode: Mode) -> Result<(), Error> {
    let hook = (std::env::var_os("RUSTVISOR_TEST_HOOKS").is_some_and(|v| v == "1"))
        .then(|| std::env::var("RUSTVISOR_TEST_BAD_SYSCALL").ok())
        .flatten();
    if mode == Mode::On {
        install_sigsys_handler().map_err(Error::Handler)?;
    }
    MODE.set(mode).map_err(|_| Error::AlreadySet)?;
    let _ = BAD_SYSCALL_ROLE.set(hook);
    Ok(())
}

/// The mode [`init`] set, if it was called.
pub fn mode() -> Option<Mode> {
    MODE.get().copied()
}

/// The BPF program of `role` under `mode` ([`Mode::Off`]: an empty program). The arguments
/// of rules that need the process id (`tgkill` to this process only) use this process's.
///
/// Errors: [`Error::Filter`] when seccompiler refuses the rules (a bug in [`filters`]).
pub fn program(role: Role, mode: Mode) -> Result<BpfProgram, Error> {
    let mismatch = match mode {
        Mode::On => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
        Mode::Off => return Ok(Vec::new()),
    };
    let err = |source| Error::Filter { role: role.name(), source };
    let rules = filters::rules(role).into_map().map_err(|e| err(e.into()))?;
    let filter =
        SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64).map_err(|e| err(e.into()))?;
    BpfProgram::try_from(filter).map_err(|e| err(e.into()))
}

/// A second, tiny program installed with every role's: the calls of
/// [`filters::refused`] fail with `ENOSYS` instead of reaching the role's list. Stacked
/// filters combine to the strictest answer, so this `ERRNO` wins over the role's `ALLOW` (and
/// loses to its `TRAP`).
fn refusing_program(role: Role) -> Result<BpfProgram, Error> {
    let err = |source| Error::Filter { role: "refused", source };
    let rules = filters::refused(role).iter().map(|&nr| (nr, vec![])).collect();
    let filter =
        SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), TargetArch::x86_64)
            .map_err(|e| err(e.into()))?;
    BpfProgram::try_from(filter).map_err(|e| err(e.into()))
}

/// Installs `role`'s filter on the calling thread, in the mode [`init`] set (nothing before
/// [`init`] or under [`Mode::Off`]), then runs the test hook if it names `role`.
///
/// A filter that cannot be installed ends the process (status 1, after one line on stderr):
/// a VMM thread never runs unfiltered when filters were asked for.
pub fn apply(role: Role) {
    let Some(mode) = mode() else { return };
    if mode != Mode::Off {
        // The refusing filter first: installing the role's filter needs prctl(NO_NEW_PRIVS)
        // and seccomp(), which only the roles that start threads allow.
        let installed = program(role, mode).and_then(|p| {
            let refusing = refusing_program(role)?;
            seccompiler::apply_filter(&refusing).map_err(|source| Error::Filter { role: "refused", source })?;
            seccompiler::apply_filter(&p).map_err(|source| Error::Filter { role: role.name(), source })
        });
        if let Err(e) = installed {
            let thread = std::thread::current();
            eprintln!("rustvisor: thread {}: {e}; stopping the VMM", thread.name().unwrap_or("unnamed"));
            // SAFETY: _exit(2) ends the process; nothing runs after it.
            unsafe { libc::_exit(1) };
        }
    }
    let hooked = BAD_SYSCALL_ROLE.get().and_then(Option::as_deref).is_some_and(|r| r == role.name());
    if hooked && !BAD_SYSCALL_DONE.swap(true, Ordering::SeqCst) {
        // SAFETY: getppid(2) takes no arguments and touches no memory.
        unsafe { libc::syscall(TEST_BAD_SYSCALL) };
    }
}

/// How many system calls `role` may make (each counted once, with or without argument
/// checks; the ones [`filters::refused`] answers with `ENOSYS` not counted).
pub fn allowed_count(role: Role) -> usize {
    let refused = filters::refused(role);
    filters::rules(role).syscalls().filter(|nr| !refused.contains(nr)).count()
}

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler is an
    // `extern "C"` function of the SA_SIGINFO shape that stays for the process's life, and
    // only async-signal-safe calls happen in it (see `on_sigsys`).
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `si_code` of a `SIGSYS` raised by a seccomp filter (`SYS_SECCOMP`, asm-generic/siginfo.h).
const SYS_SECCOMP: libc::c_int = 1;
/// Byte offset of `si_syscall` in a 64-bit `siginfo_t` (asm-generic/siginfo.h: three ints,
/// padding to 8, then `_sigsys { void *_call_addr; int _syscall; unsigned int _arch; }`).
const SI_SYSCALL_OFFSET: usize = 24;

/// A line built on the stack (no allocation: this runs in a signal handler).
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = b;
                self.len += 1;
            }
        }
    }

    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            if let Some(d) = digits.get_mut(i) {
                *d = b'0' + (n % 10) as u8;
            }
            n /= 10;
            if n == 0 || i == 0 {
                break;
            }
        }
        let mut copy = [0u8; 20];
        let tail = digits.get(i..).unwrap_or(&[]);
        if let Some(dst) = copy.get_mut(..tail.len()) {
            dst.copy_from_slice(tail);
        }
        self.push(copy.get(..tail.len()).unwrap_or(&[]));
    }
}

/// The `SIGSYS` handler: one line on stderr, then `_exit(BAD_SYSCALL_EXIT_STATUS)`. Only
/// async-signal-safe calls (`prctl(PR_GET_NAME)`, `getpid`, `gettid`, `write`, `_exit`), each allowed by every
/// role's filter; no allocation, no lock.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let mut line = Line { buf: [0; 160], len: 0 };
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler; si_code is its
    // third int, and for a seccomp SIGSYS si_syscall is at SI_SYSCALL_OFFSET (an aligned int
    // within the 128-byte structure).
    let (code, nr) =
        unsafe { ((*info).si_code, info.cast::<u8>().add(SI_SYSCALL_OFFSET).cast::<libc::c_int>().read()) };
    if code == SYS_SECCOMP {
        line.push(b"rustvisor: bad system call ");
        line.push_number(u64::try_from(nr).unwrap_or(0));
        if let Some(name) = usize::try_from(nr).ok().and_then(|n| SYSCALL_NAMES.get(n)).filter(|n| !n.is_empty()) {
            line.push(b" (");
            line.push(name.as_bytes());
            line.push(b")");
        }
    } else {
        line.push(b"rustvisor: SIGSYS not from seccomp (si_code ");
        line.push_number(u64::from(code.unsigned_abs()));
        line.push(b")");
    }
    let mut comm = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (with the NUL) into the buffer given;
    // getpid(2) and gettid(2) have no preconditions.
    let main = unsafe {
        libc::prctl(libc::PR_GET_NAME, comm.as_mut_ptr());
        libc::getpid() == libc::gettid()
    };
    let name_len = comm.iter().position(|&b| b == 0).unwrap_or(16);
    line.push(b" on thread ");
    // The main thread's kernel name is the program's; std calls it "main".
    line.push(if main { b"main" } else { comm.get(..name_len).unwrap_or(&[]) });
    line.push(b"; stopping the VMM (seccomp; --seccomp log to find what a filter lacks)\n");
    let mut out = line.buf.get(..line.len).unwrap_or(&[]);
    while !out.is_empty() {
        // SAFETY: writes `out.len()` bytes from a live stack buffer to stderr.
        let n = unsafe { libc::write(2, out.as_ptr().cast(), out.len()) };
        match usize::try_from(n) {
            Ok(n) if n > 0 => out = out.get(n..).unwrap_or(&[]),
            _ => break,
        }
    }
    // SAFETY: _exit(2) is async-signal-safe and ends the process.
    unsafe { libc::_exit(BAD_SYSCALL_EXIT_STATUS) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles_in_both_modes_and_the_names_table_matches_libc() {
        for role in Role::ALL {
            for mode in [Mode::On, Mode::Log] {
                let p = program(role, mode).unwrap();
                assert!(!p.is_empty() && p.len() < 4096, "{role:?}: {} instructions", p.len());
            }
            assert!(program(role, Mode::Off).unwrap().is_empty());
            assert!(!refusing_program(role).unwrap().is_empty());
            // A refused call must pass the role's list, or its TRAP would win.
            for nr in filters::refused(role) {
                assert!(filters::rules(role).contains(*nr) || *nr == libc::SYS_clone3, "{role:?}: {nr}");
            }
            assert!(allowed_count(role) > 10, "{role:?}");
        }
        assert_eq!(SYSCALL_NAMES[libc::SYS_getppid as usize], "getppid");
        assert_eq!(SYSCALL_NAMES[libc::SYS_ioctl as usize], "ioctl");
        assert_eq!(SYSCALL_NAMES[libc::SYS_clone3 as usize], "clone3");
    }

    #[test]
    fn no_role_allows_the_test_hooks_syscall_or_process_creation() {
        for role in Role::ALL {
            let r = filters::rules(role);
            for nr in [
                TEST_BAD_SYSCALL,
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_ptrace,
            ] {
                assert!(!r.contains(nr), "{role:?} allows {}", SYSCALL_NAMES[nr as usize]);
            }
        }
    }

    #[test]
    fn a_thread_that_starts_others_allows_what_they_need() {
        for role in Role::ALL {
            let parent = filters::rules(role);
            for &child in filters::children(role) {
                for nr in filters::rules(child).syscalls() {
                    assert!(parent.contains(nr), "{role:?} lacks {} of {child:?}", SYSCALL_NAMES[nr as usize]);
                }
            }
        }
    }

    #[test]
    fn modes_parse() {
        assert_eq!("on".parse::<Mode>(), Ok(Mode::On));
        assert_eq!("log".parse::<Mode>(), Ok(Mode::Log));
        assert_eq!("off".parse::<Mode>(), Ok(Mode::Off));
        assert!("yes".parse::<Mode>().is_err());
        assert_eq!(Mode::default().to_string(), "on");
    }

    #[test]
    fn line_numbers() {
        for n in [0u64, 7, 10, 110, 18446744073709551615] {
            let mut l = Line { buf: [0; 160], len: 0 };
            l.push_number(n);
            assert_eq!(std::str::from_utf8(&l.buf[..l.len]).unwrap(), n.to_string());
        }
    }
}

#[cfg(test)]
mod listing {
    use super::*;

    /// `cargo test -p seccomp -- --ignored --nocapture list_roles`: each role's allowed calls
    /// (what the README's counts come from; also handy when comparing with `strace -f -Y`).
    #[test]
    #[ignore = "prints the lists"]
    fn list_roles() {
        for role in Role::ALL {
            let refused = filters::refused(role);
            let names: Vec<&str> = filters::rules(role)
                .syscalls()
                .filter(|nr| !refused.contains(nr))
                .map(|nr| SYSCALL_NAMES[usize::try_from(nr).unwrap()])
                .collect();
            println!("{role:?} {} {}", allowed_count(role), names.join(" "));
        }
    }
}

#[cfg(test)]
mod cost {
    use super::*;
    use std::time::Instant;

    /// ns per call of `f` over `n` calls.
    fn per_call(n: u32, mut f: impl FnMut()) -> f64 {
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        t.elapsed().as_nanos() as f64 / f64::from(n)
    }

    /// `cargo test --release -p seccomp -- --ignored --nocapture filter_cost`: the cost the
    /// filters add to a system call on a vCPU thread of a VMM driven over the API (which
    /// carries the API's filter and its own, each with its refusing filter).
    #[test]
    #[ignore = "a measurement"]
    fn filter_cost() {
        let t = std::thread::spawn(|| {
            // SAFETY: eventfd(2) with valid flags; the fd is closed below.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
            let mut buf = 0u64;
            let mut read = || {
                // SAFETY: reads 8 bytes into `buf` from the eventfd (EAGAIN: nothing to read).
                unsafe { libc::read(fd, (&mut buf as *mut u64).cast(), 8) };
            };
            let futex_word = 0u32;
            let futex = || {
                // SAFETY: FUTEX_WAKE on a live word wakes nobody and touches no memory.
                unsafe { libc::syscall(libc::SYS_futex, &futex_word as *const u32, libc::FUTEX_WAKE, 1) };
            };
            let n = 200_000;
            let before = (per_call(n, &mut read), per_call(n, futex));
            for role in [Role::Api, Role::VcpuEmu] {
                seccompiler::apply_filter(&refusing_program(role).unwrap()).unwrap();
                seccompiler::apply_filter(&program(role, Mode::On).unwrap()).unwrap();
            }
            let after = (per_call(n, &mut read), per_call(n, futex));
            println!(
                "read(eventfd): {:.0} ns -> {:.0} ns; futex(WAKE): {:.0} ns -> {:.0} ns; {} + {} BPF instructions",
                before.0,
                after.0,
                before.1,
                after.1,
                program(Role::Api, Mode::On).unwrap().len(),
                program(Role::VcpuEmu, Mode::On).unwrap().len()
            );
            // SAFETY: closes the eventfd opened above.
            unsafe { libc::close(fd) };
        });
        t.join().unwrap();
    }
}

//! The allow-list of each [`Role`], one function per role, every system call with the reason
//! the role makes it. Found with `strace -f` (per thread name, `-Y`) over the integration
//! tests (Debian guest with disks, TAP networking, vsock, rng, virtio-console, balloon,
//! snapshot/restore, backup, every API call) and then checked by running them with the
//! filters on: a call missing here stops the VMM with its name and thread.
//!
//! What no role allows: `execve`/`execveat`, `fork`/`vfork`, `clone` without `CLONE_THREAD`
//! (a new process), `ptrace` and `process_vm_*`, mounting, module loading, `bpf`, `kexec`,
//! `mmap`/`mprotect` with `PROT_EXEC` (no new code in the VMM), sockets other than `AF_UNIX`
//! (and the `AF_INET` datagram socket that brings a TAP up), ioctls outside KVM, TUN, the
//! terminal and a few socket and block-device requests.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompRule};

use crate::Role;

/// A role's rules: system call number → the argument checks of which one must hold (empty:
/// allowed with any arguments).
#[derive(Debug, Default, Clone)]
pub struct Rules {
    map: BTreeMap<i64, Option<Vec<Vec<Cond>>>>,
}

impl Rules {
    /// Allows `nr` with any arguments.
    fn allow(&mut self, nr: libc::c_long) -> &mut Self {
        self.map.insert(nr, None);
        self
    }

    /// Allows `nr` when all of `conds` hold (or when another rule for it does, or when it is
    /// allowed with any arguments).
    fn allow_if(&mut self, nr: libc::c_long, conds: Vec<Cond>) -> &mut Self {
        // `None` (any arguments) already allows more than the new rule.
        if let Some(rules) = self.map.entry(nr).or_insert_with(|| Some(Vec::new())) {
            rules.push(conds);
        }
        self
    }

    /// Adds everything `other` allows.
    fn merge(&mut self, other: Rules) -> &mut Self {
        for (nr, rules) in other.map {
            match rules {
                None => {
                    self.allow(nr);
                }
                Some(rules) => {
                    for conds in rules {
                        self.allow_if(nr, conds);
                    }
                }
            }
        }
        self
    }

    /// Whether `nr` is allowed at all (with some arguments).
    pub fn contains(&self, nr: libc::c_long) -> bool {
        self.map.contains_key(&nr)
    }

    /// How many system calls are allowed.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is allowed.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The allowed system calls' numbers.
    pub fn syscalls(&self) -> impl Iterator<Item = i64> + '_ {
        self.map.keys().copied()
    }

    /// seccompiler's form.
    ///
    /// Errors: a rule seccompiler refuses.
    pub fn into_map(self) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
        self.map
            .into_iter()
            .map(|(nr, rules)| {
                let rules = match rules {
                    None => Vec::new(),
                    Some(rules) => rules.into_iter().map(SeccompRule::new).collect::<Result<Vec<_>, _>>()?,
                };
                Ok((nr, rules))
            })
            .collect()
    }
}

/// Argument `i` (a 32-bit int) equals `v`.
fn eq32(i: u8, v: u64) -> Cond {
    cond(i, Len::Dword, Op::Eq, v)
}

/// Argument `i` (32 bits) differs from `v`.
fn ne32(i: u8, v: u64) -> Cond {
    cond(i, Len::Dword, Op::Ne, v)
}

/// The bits `mask` of argument `i` (32 bits) equal `v`.
fn masked32(i: u8, mask: u64, v: u64) -> Cond {
    cond(i, Len::Dword, Op::MaskedEq(mask), v)
}

fn cond(i: u8, len: Len, op: Op, v: u64) -> Cond {
    // Only an argument index above 5 is refused; every index here is a constant ≤ 5.
    Cond::new(i, len, op, v).unwrap_or_else(|_| unreachable!("argument index {i} ≤ 5"))
}

/// A u64 from a libc constant of any integer type (all are small and non-negative here).
fn c<T: TryInto<u64>>(v: T) -> u64 {
    v.try_into().unwrap_or(u64::MAX)
}

/// `_IOC` request numbers (asm-generic/ioctl.h): the type byte is bits 8..16.
const IOC_TYPE_MASK: u64 = 0xff00;
/// KVM's ioctl type (`KVMIO`, linux/kvm.h).
const KVMIO: u64 = 0xae;
/// TUN's and the terminal's ioctl type ('T': `TUNSETIFF`, `TCGETS`, `FIONBIO`, ...).
const TIO: u64 = 0x54;
/// Socket ioctls (`SIOCGIFFLAGS` 0x8913, `SIOCSIFFLAGS` 0x8914, `SIOCGIFINDEX` 0x8933...).
const SOCKIO: u64 = 0x89;
/// Block-device ioctls (`BLKGETSIZE64`, `BLKSSZGET`, ..., type 0x12).
const BLKIO: u64 = 0x12;

/// KVM ioctls that create VMs, vCPUs, devices or memory slots: the control plane's only; a
/// vCPU thread may use every other KVM ioctl (on its own vCPU fd and the VM's).
const KVM_CREATORS: [u64; 8] = [
    0xae01,      // KVM_CREATE_VM
    0xae41,      // KVM_CREATE_VCPU
    0x4020_ae46, // KVM_SET_USER_MEMORY_REGION
    0xae47,      // KVM_SET_TSS_ADDR
    0x4008_ae48, // KVM_SET_IDENTITY_MAP_ADDR
    0xae60,      // KVM_CREATE_IRQCHIP
    0x4040_ae77, // KVM_CREATE_PIT2
    0xc00c_aee0, // KVM_CREATE_DEVICE
];

/// What every thread needs once filtered: memory, locks, time, exits, logging to stderr, the
/// SIGSYS report and a panic's abort.
fn base(r: &mut Rules) {
    // The allocator (malloc arenas, large blocks) and thread stacks: anonymous or file
    // mappings, never executable.
    if crate::EXEC_MEMORY.load(std::sync::atomic::Ordering::Relaxed) {
        // The emu translation tier's code cache (crate::allow_exec_memory).
        r.allow(libc::SYS_mmap);
        r.allow(libc::SYS_mprotect);
    } else {
        r.allow_if(libc::SYS_mmap, vec![masked32(2, c(libc::PROT_EXEC), 0)]);
        r.allow_if(libc::SYS_mprotect, vec![masked32(2, c(libc::PROT_EXEC), 0)]);
    }
    r.allow(libc::SYS_munmap); // frees the above
    r.allow(libc::SYS_mremap); // realloc of large blocks
    r.allow(libc::SYS_brk); // malloc's main arena
    r.allow(libc::SYS_madvise); // malloc trimming, a thread's stack at exit (MADV_DONTNEED)
    r.allow(libc::SYS_futex); // Mutex, Condvar, channels, thread join
    r.allow(libc::SYS_sched_yield); // spin loops in std and crossbeam-style channels
    r.allow(libc::SYS_clock_gettime); // Instant/SystemTime when the vDSO falls back
    r.allow(libc::SYS_gettimeofday); // same
    r.allow(libc::SYS_nanosleep); // thread::sleep
    r.allow(libc::SYS_clock_nanosleep); // thread::sleep (glibc)
    r.allow(libc::SYS_restart_syscall); // a sleep interrupted by the vCPU kick signal
    r.allow(libc::SYS_getrandom); // std's HashMap keys, once per thread
    r.allow(libc::SYS_close); // dropping files, eventfds, sockets
                              // std's debug builds check that an fd being closed is still open (F_GETFD).
    r.allow_if(libc::SYS_fcntl, vec![eq32(1, c(libc::F_GETFD))]);
    // glibc's malloc sizes its arena count from the CPUs once per process, on whichever
    // thread first needs a new arena (sched_getaffinity, after /sys/.../cpu/online).
    r.allow(libc::SYS_sched_getaffinity);
    // Answered ENOSYS on every role but the API's (see `refused`): glibc's malloc reads
    // /proc/sys/vm/overcommit_memory on whichever thread first shrinks a heap.
    r.allow(libc::SYS_openat);
    // Logging (tracing and eprintln) and the SIGSYS report go to stderr.
    r.allow_if(libc::SYS_write, vec![eq32(0, 2)]);
    r.allow_if(libc::SYS_writev, vec![eq32(0, 2)]);
    // The SIGSYS report names the thread.
    r.allow_if(libc::SYS_prctl, vec![eq32(0, c(libc::PR_GET_NAME))]);
    r.allow(libc::SYS_rt_sigreturn); // return from the vCPU kick handler
    r.allow(libc::SYS_rt_sigprocmask); // thread exit, abort()
    r.allow(libc::SYS_sigaltstack); // std removes a thread's signal stack at exit
    r.allow(libc::SYS_exit); // thread exit
    r.allow(libc::SYS_exit_group); // process exit (_exit in the SIGSYS handler too)
    r.allow(libc::SYS_getpid); // abort() and pthread_kill
    r.allow(libc::SYS_gettid); // same
                               // abort() (the panic policy) and pthread_kill (kicking vCPUs out of KVM_RUN): signals to
                               // this process's own threads only (tgid, an int: its low 32 bits).
    r.allow_if(libc::SYS_tgkill, vec![eq32(0, c(std::process::id()))]);
}

/// Starting threads that install their own filter: `clone` with `CLONE_THREAD` only (never a
/// process), the new thread's own setup, and installing a filter.
fn spawn_threads(r: &mut Rules) {
    let thread = c(libc::CLONE_THREAD);
    r.allow_if(libc::SYS_clone, vec![masked32(0, thread, thread)]);
    r.allow(libc::SYS_clone3); // answered ENOSYS by the second filter (see `clone3_program`)
    r.allow(libc::SYS_set_robust_list); // glibc, in the new thread
    r.allow(libc::SYS_rseq); // glibc, in the new thread
    r.allow_if(libc::SYS_prctl, vec![eq32(0, c(libc::PR_SET_NAME))]); // thread names
    r.allow_if(libc::SYS_prctl, vec![eq32(0, c(libc::PR_SET_NO_NEW_PRIVS))]); // before seccomp()
    r.allow_if(libc::SYS_seccomp, vec![eq32(0, c(libc::SECCOMP_SET_MODE_FILTER))]);
    // the child's filter
}

/// epoll loops and eventfds (device workers, the console mux, the API's tokio reactor).
fn event_loop(r: &mut Rules) {
    r.allow(libc::SYS_epoll_wait);
    r.allow(libc::SYS_epoll_pwait);
    r.allow(libc::SYS_epoll_ctl);
    r.allow(libc::SYS_read); // eventfd counts, sockets, files
    r.allow(libc::SYS_write); // eventfd signals, sockets, files
}

/// The calls that fail with `ENOSYS` on threads of `role`, before its list is consulted
/// (each is also in the list, or its `TRAP` would win; see `refusing_program`).
pub fn refused(role: Role) -> &'static [i64] {
    match role {
        // clone3's flags are out of a filter's reach: glibc falls back to clone.
        Role::Api => &[libc::SYS_clone3],
        // openat as well: the only files these threads open are glibc's, once per process:
        // /proc/sys/vm/overcommit_memory the first time a thread shrinks a malloc heap (a
        // failure means "do not shrink heaps"), /sys/devices/system/cpu/online when malloc
        // first sizes its arena count (it falls back to sched_getaffinity).
        _ => &[libc::SYS_clone3, libc::SYS_openat],
    }
}

/// The roles whose threads a thread of `role` starts once filtered: they inherit its filter,
/// so its list includes theirs (the kernel answers with the strictest of a thread's filters).
pub fn children(role: Role) -> &'static [Role] {
    match role {
        Role::Api => &[
            Role::VcpuKvm,
            Role::VcpuEmu,
            Role::VirtioWorker,
            Role::SerialConsole,
            Role::VmEvents,
            Role::BackupCopier,
            Role::Shutdown,
        ],
        _ => &[],
    }
}

/// The rules of `role`.
pub fn rules(role: Role) -> Rules {
    let mut r = Rules::default();
    base(&mut r);
    match role {
        Role::Main => main(&mut r),
        Role::Api => api(&mut r),
        Role::VcpuKvm => vcpu_kvm(&mut r),
        Role::VcpuEmu => vcpu_emu(&mut r),
        Role::VirtioWorker => virtio_worker(&mut r),
        Role::SerialConsole => serial_console(&mut r),
        Role::VmEvents => vm_events(&mut r),
        Role::Shutdown => shutdown(&mut r),
        Role::BackupCopier => backup_copier(&mut r),
        Role::ConsoleInput => console_input(&mut r),
    }
    for &child in children(role) {
        r.merge(rules(child));
    }
    r
}

/// Tearing a VM down: joining its threads, dropping devices (qcow2 metadata write-back and
/// flush), removing its sockets, restoring the terminal.
fn teardown(r: &mut Rules) {
    r.allow(libc::SYS_write); // eventfd wake-ups of worker threads, image write-back
    r.allow(libc::SYS_pwrite64); // qcow2 metadata write-back
    r.allow(libc::SYS_pread64); // qcow2 metadata
    r.allow(libc::SYS_fsync); // flushing images
    r.allow(libc::SYS_fdatasync); // same
    r.allow(libc::SYS_newfstatat); // checking a socket file is still ours before unlinking
    r.allow(libc::SYS_statx); // same (std's metadata)
    r.allow(libc::SYS_unlink); // removing the API, console and vsock sockets
    r.allow(libc::SYS_unlinkat); // same
    r.allow_if(libc::SYS_ioctl, vec![masked32(1, IOC_TYPE_MASK, TIO << 8)]); // TCSETS: the terminal back
}

fn main(r: &mut Rules) {
    teardown(r);
    r.allow(libc::SYS_epoll_wait); // the API server's shutdown on this thread
    r.allow(libc::SYS_epoll_ctl);
    r.allow(libc::SYS_shutdown); // closing API connections
}

/// The control plane: everything `vm.create`/`boot`/`restore`/`snapshot`/`backup`/`delete`
/// do, plus the HTTP server.
fn api(r: &mut Rules) {
    teardown(r);
    event_loop(r);
    spawn_threads(r);
    // Files: kernel, initrd, disk images, snapshots, backups.
    r.allow(libc::SYS_openat);
    r.allow(libc::SYS_read);
    r.allow(libc::SYS_pread64);
    r.allow(libc::SYS_readv);
    r.allow(libc::SYS_writev); // hyper's responses
    r.allow(libc::SYS_pwritev);
    r.allow(libc::SYS_preadv);
    r.allow(libc::SYS_lseek);
    r.allow(libc::SYS_fstat);
    r.allow(libc::SYS_ftruncate);
    r.allow(libc::SYS_fallocate);
    r.allow(libc::SYS_mkdir);
    r.allow(libc::SYS_mkdirat);
    r.allow(libc::SYS_rename);
    r.allow(libc::SYS_renameat2);
    r.allow(libc::SYS_getdents64);
    r.allow(libc::SYS_readlink);
    r.allow(libc::SYS_flock); // image locks
    r.allow(libc::SYS_fcntl); // CLOEXEC/NONBLOCK flags, OFD locks
    r.allow(libc::SYS_dup); // try_clone of files and eventfds
    r.allow(libc::SYS_statfs); // hugetlbfs checks
    r.allow(libc::SYS_fstatfs);
    r.allow(libc::SYS_sysinfo); // guest RAM against the host's
    r.allow(libc::SYS_memfd_create); // guest RAM
    r.allow(libc::SYS_eventfd2); // queue kicks, wake-ups
    r.allow(libc::SYS_epoll_create1); // device workers' epoll sets
    r.allow(libc::SYS_rt_sigaction); // the vCPU kick handler
    r.allow(libc::SYS_mbind); // hugepages
                              // Sockets: the API and console sockets, vsock's Unix sockets; an AF_INET datagram socket
                              // for the TAP's SIOCSIFFLAGS.
    r.allow_if(libc::SYS_socket, vec![eq32(0, c(libc::AF_UNIX))]);
    r.allow_if(libc::SYS_socket, vec![eq32(0, c(libc::AF_INET))]);
    r.allow(libc::SYS_bind);
    r.allow(libc::SYS_listen);
    r.allow(libc::SYS_accept4);
    r.allow(libc::SYS_connect);
    r.allow(libc::SYS_recvfrom);
    r.allow(libc::SYS_sendto);
    r.allow(libc::SYS_recvmsg);
    r.allow(libc::SYS_sendmsg);
    r.allow(libc::SYS_shutdown);
    r.allow(libc::SYS_getsockopt);
    r.allow(libc::SYS_setsockopt);
    r.allow(libc::SYS_chmod); // sockets are 0600
    r.allow(libc::SYS_fchmod);
    r.allow(libc::SYS_fchmodat);
    // ioctls: KVM (all), TUN and terminal ('T'), interface flags, block-device sizes.
    r.allow_if(libc::SYS_ioctl, vec![masked32(1, IOC_TYPE_MASK, KVMIO << 8)]);
    r.allow_if(libc::SYS_ioctl, vec![masked32(1, IOC_TYPE_MASK, SOCKIO << 8)]);
    r.allow_if(libc::SYS_ioctl, vec![masked32(1, IOC_TYPE_MASK, BLKIO << 8)]);
}

/// The device-model side of a vCPU, common to both accelerators: UART output to a file or
/// stdout, queue kicks (eventfd writes), device resets dropping handlers.
fn vcpu_common(r: &mut Rules) {
    r.allow(libc::SYS_write); // serial output, eventfd kicks
    r.allow(libc::SYS_read); // eventfd reads in device resets
    r.allow(libc::SYS_fcntl); // eventfd try_clone on queue activation
    r.allow(libc::SYS_eventfd2); // a queue's kick eventfds, made on DRIVER_OK
    r.allow(libc::SYS_timerfd_create); // virtio-vsock's connection timer, made on DRIVER_OK
}

fn vcpu_kvm(r: &mut Rules) {
    vcpu_common(r);
    // KVM_RUN and the vCPU/VM state ioctls (snapshots, IRQ lines, MSIs, ioeventfds); not the
    // ones that create VMs, vCPUs, devices or map memory.
    let mut kvm = vec![masked32(1, IOC_TYPE_MASK, KVMIO << 8)];
    kvm.extend(KVM_CREATORS.iter().map(|&n| ne32(1, n)));
    r.allow_if(libc::SYS_ioctl, kvm);
}

fn vcpu_emu(r: &mut Rules) {
    vcpu_common(r);
    // Cross-vCPU TLB shootdowns on SMP guests (x86emu's mmu: a full barrier on every other
    // vCPU thread), registered once.
    const MEMBARRIER_CMD_PRIVATE_EXPEDITED: u64 = 8;
    const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: u64 = 16;
    r.allow_if(libc::SYS_membarrier, vec![eq32(0, MEMBARRIER_CMD_PRIVATE_EXPEDITED)]);
    r.allow_if(libc::SYS_membarrier, vec![eq32(0, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED)]);
    // The emulator's memory: guest RAM is mapped once by the control plane; the TLB and the
    // decoder only allocate. The translation tier's code cache (RUSTVISOR_EMU_TIER=jit|auto)
    // needs executable memory: `base` allows PROT_EXEC then (crate::allow_exec_memory), for
    // every role since the vCPU threads' parents' filters are stacked on theirs.
    if crate::EXEC_MEMORY.load(std::sync::atomic::Ordering::Relaxed) {
        // Tier auto's compiler thread (x86emu::jit's worker), started by the vCPU thread on
        // its first hot block: it keeps the vCPU's filter (no seccomp call of its own).
        let thread = c(libc::CLONE_THREAD);
        r.allow_if(libc::SYS_clone, vec![masked32(0, thread, thread)]);
        r.allow(libc::SYS_clone3); // answered ENOSYS (see `refused`)
        r.allow(libc::SYS_set_robust_list); // glibc, in the new thread
        r.allow(libc::SYS_rseq); // glibc, in the new thread
        r.allow_if(libc::SYS_prctl, vec![eq32(0, c(libc::PR_SET_NAME))]); // its name
    }
}

fn virtio_worker(r: &mut Rules) {
    event_loop(r);
    // virtio-blk: image I/O, flushes, discards (punch hole), qcow2 growth.
    r.allow(libc::SYS_pread64);
    r.allow(libc::SYS_pwrite64);
    r.allow(libc::SYS_preadv);
    r.allow(libc::SYS_pwritev);
    r.allow(libc::SYS_fsync);
    r.allow(libc::SYS_fdatasync);
    r.allow(libc::SYS_fallocate);
    r.allow(libc::SYS_ftruncate);
    r.allow(libc::SYS_lseek);
    r.allow(libc::SYS_fstat);
    r.allow(libc::SYS_statx);
    // virtio-net: TAP frames.
    r.allow(libc::SYS_readv);
    r.allow(libc::SYS_writev);
    // virtio-vsock: guest connections to host Unix sockets and host connections in.
    r.allow_if(libc::SYS_socket, vec![eq32(0, c(libc::AF_UNIX))]);
    r.allow(libc::SYS_connect);
    r.allow(libc::SYS_accept4);
    r.allow(libc::SYS_recvfrom);
    r.allow(libc::SYS_sendto);
    r.allow(libc::SYS_shutdown);
    r.allow(libc::SYS_fcntl);
    r.allow(libc::SYS_poll); // has a host connection hung up?
    r.allow_if(libc::SYS_ioctl, vec![eq32(1, c(libc::FIONBIO))]); // set_nonblocking on a connection
                                                                  // virtio-balloon: giving pages back (madvise is in `base`); its statistics timer.
    r.allow(libc::SYS_timerfd_create);
    r.allow(libc::SYS_timerfd_settime);
    // virtio-rng: getrandom (in `base`).
    // New activations: fresh epoll sets.
    r.allow(libc::SYS_epoll_create1);
    r.allow(libc::SYS_eventfd2);
}

fn serial_console(r: &mut Rules) {
    event_loop(r);
    r.allow(libc::SYS_accept4); // clients
    r.allow(libc::SYS_recvfrom);
    r.allow(libc::SYS_sendto);
    r.allow(libc::SYS_shutdown);
    r.allow(libc::SYS_fcntl);
    r.allow(libc::SYS_poll); // the mux's loop
    r.allow_if(libc::SYS_ioctl, vec![eq32(1, c(libc::FIONBIO))]); // set_nonblocking on a new client
}

fn vm_events(r: &mut Rules) {
    // Pausing the VM kicks the vCPUs (tgkill, in `base`) and waits on them (futex).
    r.allow(libc::SYS_write); // eventfd wake-ups
}

fn shutdown(r: &mut Rules) {
    teardown(r);
    spawn_threads(r); // the deadline thread
    r.allow(libc::SYS_epoll_ctl);
    r.allow(libc::SYS_shutdown);
}

fn backup_copier(r: &mut Rules) {
    r.allow(libc::SYS_pread64);
    r.allow(libc::SYS_pwrite64);
    r.allow(libc::SYS_preadv); // qcow2 reads of several clusters
    r.allow(libc::SYS_pwritev);
    r.allow(libc::SYS_read);
    r.allow(libc::SYS_write);
    r.allow(libc::SYS_fsync);
    r.allow(libc::SYS_fdatasync);
    r.allow(libc::SYS_lseek);
    r.allow(libc::SYS_fstat);
    r.allow(libc::SYS_statx);
    r.allow(libc::SYS_ftruncate);
    r.allow(libc::SYS_fallocate);
    r.allow(libc::SYS_rename);
    r.allow(libc::SYS_renameat2);
    r.allow(libc::SYS_unlink);
    r.allow(libc::SYS_unlinkat);
}

fn console_input(r: &mut Rules) {
    r.allow_if(libc::SYS_read, vec![eq32(0, 0)]); // stdin
}

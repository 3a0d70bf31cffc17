//! The VMM jail (Firecracker's `jailer` is the model): a program started
//!
//! - in new mount, PID, IPC and UTS namespaces (and a new network namespace when it needs no
//!   host interface), as PID 1 of its PID namespace;
//! - with its root `pivot_root`ed into a private tmpfs that holds only what it is given: files
//!   and folders bound at **their host paths** (so a configuration's paths mean the same
//!   inside), read-only unless said otherwise, always `nosuid,nodev`; its own device nodes
//!   (`/dev/kvm`, `/dev/net/tun`, ...) owned by the jail's uid; `/proc` of its PID namespace;
//!   the root itself read-only;
//! - as an unprivileged uid/gid with no supplementary groups, an empty capability bounding set
//!   and no capabilities, `PR_SET_NO_NEW_PRIVS`, and resource limits (open files).
//!
//! [`spawn`] forks with `clone(2)` (the namespaces need it: `unshare(CLONE_NEWPID)` does not
//! move the caller) and runs the jail's steps in the child between the fork and `execve(2)`:
//! every path and string is prepared by the parent, so the child only makes system calls
//! (async-signal-safe, as a multi-threaded parent requires). A failing step is reported back
//! over a close-on-exec pipe and named in [`Error::Setup`].
//!
//! The caller (the host manager, `rustvisor run --jail`) owns the policy: which uid, which
//! files, and making the files the jailed program writes (disk images, its state folder)
//! belong to that uid.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read as _};
use std::os::fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Component, Path, PathBuf};
use std::process::ExitStatus;

/// Why a program could not be started (in its jail).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A path handed to the jail is not absolute, has `..` or a NUL byte (`what` says which).
    #[error("jail: {what}")]
    BadPath {
        /// The path and the problem.
        what: String,
    },
    /// The parent could not prepare (stat a bound path, make the pipe, clone).
    #[error("jail: {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A step in the child failed (e.g. "bind /var/lib/x.img", "setresuid 2100000001",
    /// "execve /usr/bin/rustvisor").
    #[error("jail: {step}: {source}")]
    Setup {
        /// The step.
        step: String,
        /// The child's errno.
        #[source]
        source: io::Error,
    },
}

/// One host path made visible inside the jail at the same path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Absolute host path of a file or folder (it must exist).
    pub path: PathBuf,
    /// Writable inside the jail (else read-only).
    pub writable: bool,
}

/// What the jailed program may see and be.
#[derive(Debug, Clone)]
pub struct Jail {
    /// An existing, empty host folder: the jail's tmpfs root is mounted on it in the child's
    /// mount namespace only (the host sees it empty).
    pub root: PathBuf,
    /// The uid the program runs as (not 0).
    pub uid: u32,
    /// Its gid (not 0).
    pub gid: u32,
    /// Host name in its UTS namespace.
    pub hostname: String,
    /// A new, empty network namespace (only a loopback interface, down): for a program that
    /// needs no host interface. A VMM with TAPs keeps the host's, where its TAPs are.
    pub new_net: bool,
    /// Files and folders bound at their host paths; a path inside an earlier writable folder
    /// is already visible and gets its own mount only if its mode differs.
    pub binds: Vec<Bind>,
    /// Character devices made inside at the same path with the host node's numbers, owned by
    /// `uid:gid`, mode 0600 (e.g. `/dev/kvm`, `/dev/net/tun`); missing host nodes are skipped.
    pub devices: Vec<PathBuf>,
    /// `RLIMIT_NOFILE` (soft and hard).
    pub max_open_files: u64,
    /// The folder the program starts in (made in the jail's root if no bind holds it), so
    /// paths relative to the caller's folder mean the same inside; default `/`.
    pub workdir: Option<PathBuf>,
    /// Also restrict file access with Landlock (a second wall: the program may only touch
    /// the binds, its devices and `/proc`, with the binds' modes) where the kernel has it
    /// (ABI 1 and up); skipped without a word where it does not.
    pub landlock: bool,
}

impl Jail {
    /// A jail on `root` for `uid:gid` with nothing in it but `/dev/null`, `/dev/zero`,
    /// `/dev/urandom` and `/dev/random` (made, not bound), and `/proc`.
    pub fn new(root: impl Into<PathBuf>, uid: u32, gid: u32) -> Jail {
        Jail {
            root: root.into(),
            uid,
            gid,
            hostname: "jail".into(),
            new_net: true,
            binds: Vec::new(),
            devices: ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"].iter().map(PathBuf::from).collect(),
            max_open_files: 4096,
            workdir: None,
            landlock: true,
        }
    }

    /// Adds a read-only bind of `path`.
    pub fn bind_ro(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        self.binds.push(Bind { path: path.into(), writable: false });
        self
    }

    /// Adds a writable bind of `path`.
    pub fn bind_rw(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        self.binds.push(Bind { path: path.into(), writable: true });
        self
    }

    /// Adds writable folders `dirs`, writable files `write` and read-only paths `read`,
    /// leaving out those inside a writable folder (visible there already, and writable
    /// there: a read-only bind on top would take that away).
    pub fn bind_all(&mut self, dirs: &[PathBuf], write: &[PathBuf], read: &[PathBuf]) -> &mut Self {
        let inside_rw = |p: &Path| dirs.iter().any(|d| p.starts_with(d));
        for d in dirs {
            if !self.binds.iter().any(|b| b.path == *d) {
                self.bind_rw(d);
            }
        }
        for (paths, writable) in [(write, true), (read, false)] {
            for p in paths.iter().filter(|p| !inside_rw(p)) {
                if !self.binds.iter().any(|b| b.path == *p) {
                    self.binds.push(Bind { path: p.clone(), writable });
                }
            }
        }
        self
    }

    /// Adds what a dynamically linked program needs to start: `/usr` read-only, the host's
    /// `/bin`, `/sbin`, `/lib*` (as the same symlinks where the host has merged-/usr links,
    /// else read-only binds) and `/etc/ld.so.cache`.
    pub fn add_system_libraries(&mut self) -> &mut Self {
        if Path::new("/usr").is_dir() {
            self.bind_ro("/usr");
        }
        for d in ["/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"] {
            match std::fs::symlink_metadata(d) {
                Ok(m) if m.file_type().is_symlink() => {}
                Ok(m) if m.is_dir() => {
                    self.bind_ro(d);
                }
                _ => {}
            }
        }
        if Path::new("/etc/ld.so.cache").is_file() {
            self.bind_ro("/etc/ld.so.cache");
        }
        self
    }
}

/// The program to start.
#[derive(Debug)]
pub struct Command {
    exe: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    stdin: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
    setsid: bool,
    die_with_parent: bool,
}

impl Command {
    /// `exe` (an absolute path, visible inside the jail) with no arguments, an empty
    /// environment, stdin from /dev/null and stdout/stderr inherited.
    pub fn new(exe: impl Into<PathBuf>) -> Command {
        Command {
            exe: exe.into(),
            args: Vec::new(),
            env: Vec::new(),
            stdin: None,
            stdout: None,
            stderr: None,
            setsid: false,
            die_with_parent: false,
        }
    }

    /// Appends an argument.
    pub fn arg(&mut self, a: impl AsRef<OsStr>) -> &mut Self {
        self.args.push(a.as_ref().to_os_string());
        self
    }

    /// Sets an environment variable (the environment starts empty).
    pub fn env(&mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> &mut Self {
        self.env.push((k.as_ref().to_os_string(), v.as_ref().to_os_string()));
        self
    }

    /// Standard input from `f` (default /dev/null).
    pub fn stdin(&mut self, f: File) -> &mut Self {
        self.stdin = Some(f);
        self
    }

    /// Standard output to `f` (default: inherited).
    pub fn stdout(&mut self, f: File) -> &mut Self {
        self.stdout = Some(f);
        self
    }

    /// Standard error to `f` (default: inherited).
    pub fn stderr(&mut self, f: File) -> &mut Self {
        self.stderr = Some(f);
        self
    }

    /// Starts the program in a session of its own (`setsid`), so it outlives its parent's
    /// terminal and process group.
    pub fn setsid(&mut self, on: bool) -> &mut Self {
        self.setsid = on;
        self
    }

    /// Has the kernel SIGKILL the program when the thread that spawned it ends
    /// (`PR_SET_PDEATHSIG`): for a foreground wrapper such as `rustvisor run --jail`.
    pub fn die_with_parent(&mut self, on: bool) -> &mut Self {
        self.die_with_parent = on;
        self
    }
}

/// A started program: its host pid, reaped with `waitpid(2)` (the parent's child).
#[derive(Debug)]
pub struct Child {
    pid: u32,
    status: Option<ExitStatus>,
}

impl Child {
    /// The host pid (the jailed program sees itself as pid 1).
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// Its exit status if it has ended (reaping it), else `None`.
    ///
    /// Errors: `waitpid(2)`'s.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.wait_with(libc::WNOHANG)
    }

    /// Waits for it to end.
    ///
    /// Errors: `waitpid(2)`'s.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(st) = self.wait_with(0)? {
                return Ok(st);
            }
        }
    }

    /// Sends SIGKILL (nothing once it has been reaped: its pid may be another's by then).
    ///
    /// Errors: `kill(2)`'s.
    pub fn kill(&mut self) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        // SAFETY: kill(2) on our own unreaped child's pid only sends a signal.
        if unsafe { libc::kill(self.pid_t(), libc::SIGKILL) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn pid_t(&self) -> libc::pid_t {
        libc::pid_t::try_from(self.pid).unwrap_or(libc::pid_t::MAX)
    }

    fn wait_with(&mut self, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
        if let Some(st) = self.status {
            return Ok(Some(st));
        }
        let mut status = 0;
        loop {
            // SAFETY: waitpid(2) on our own child writes only `status`.
            let r = unsafe { libc::waitpid(self.pid_t(), &mut status, flags) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                return Ok(None);
            }
            let st = ExitStatus::from_raw(status);
            self.status = Some(st);
            return Ok(Some(st));
        }
    }
}

/// The pid that process `host_pid` sees for itself (the last field of `NSpid:` in
/// `/proc/<host_pid>/status`): 1 for a jailed program, `host_pid` for one in the host's PID
/// namespace. `None` if the process is gone.
pub fn ns_pid(host_pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{host_pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

/// One system call of the child's setup, with everything it needs prepared.
enum Step {
    Setsid,
    DieWithParent,
    Dup2(RawFd, RawFd),
    ResetSignals,
    MountPrivate,
    MountTmpfs(CString),
    Mkdir(CString),
    MkFile(CString),
    Symlink(CString, CString),
    Mknod(CString, libc::mode_t, libc::dev_t, u32, u32),
    Bind(CString, CString),
    Remount(CString, libc::c_ulong),
    MountProc(CString),
    Chdir(CString),
    PivotRoot,
    DetachOldRoot,
    RemountRootRo,
    Hostname(CString),
    Rlimit(libc::__rlimit_resource_t, u64),
    DropBoundingSet,
    Setgroups,
    Setresgid(u32),
    Setresuid(u32),
    ClearCaps,
    NoNewPrivs,
    /// Landlock: create a ruleset handling [`LANDLOCK_HANDLED`] (the child keeps its fd).
    LandlockCreate,
    /// Landlock: allow `access` beneath the path (skipped without a ruleset).
    LandlockRule(CString, u64),
    /// Landlock: enforce the ruleset on this process (skipped without a ruleset).
    LandlockRestrict,
    Exec,
}

/// Landlock ABI 1 file-system rights (`LANDLOCK_ACCESS_FS_*`, linux/landlock.h).
mod ll {
    pub const EXECUTE: u64 = 1 << 0;
    pub const WRITE_FILE: u64 = 1 << 1;
    pub const READ_FILE: u64 = 1 << 2;
    pub const READ_DIR: u64 = 1 << 3;
    pub const REMOVE_DIR: u64 = 1 << 4;
    pub const REMOVE_FILE: u64 = 1 << 5;
    pub const MAKE_DIR: u64 = 1 << 7;
    pub const MAKE_REG: u64 = 1 << 8;
    pub const MAKE_SOCK: u64 = 1 << 9;
    /// Every ABI 1 right (bits 0 to 12).
    pub const ALL_V1: u64 = (1 << 13) - 1;
    pub const RULE_PATH_BENEATH: libc::c_int = 1;
    pub const SYS_CREATE_RULESET: libc::c_long = 444;
    pub const SYS_ADD_RULE: libc::c_long = 445;
    pub const SYS_RESTRICT_SELF: libc::c_long = 446;
}

/// What the Landlock ruleset handles (denied unless a rule allows it).
const LANDLOCK_HANDLED: u64 = ll::ALL_V1;

/// `struct landlock_path_beneath_attr` (packed in the kernel's ABI).
#[repr(C, packed)]
struct PathBeneath {
    allowed_access: u64,
    parent_fd: i32,
}

impl Step {
    /// For the error message (made by the parent, after the child failed).
    fn describe(&self) -> String {
        let s = |c: &CString| String::from_utf8_lossy(c.as_bytes()).into_owned();
        match self {
            Step::Setsid => "setsid".into(),
            Step::DieWithParent => "PR_SET_PDEATHSIG".into(),
            Step::Dup2(_, to) => format!("dup2 onto fd {to}"),
            Step::ResetSignals => "reset signals".into(),
            Step::MountPrivate => "make / private".into(),
            Step::MountTmpfs(p) => format!("mount tmpfs on {}", s(p)),
            Step::Mkdir(p) => format!("mkdir {}", s(p)),
            Step::MkFile(p) => format!("create mount point {}", s(p)),
            Step::Symlink(t, p) => format!("symlink {} -> {}", s(p), s(t)),
            Step::Mknod(p, ..) => format!("mknod {}", s(p)),
            Step::Bind(src, _) => format!("bind {}", s(src)),
            Step::Remount(p, _) => format!("remount {}", s(p)),
            Step::MountProc(p) => format!("mount proc on {}", s(p)),
            Step::Chdir(p) => format!("chdir {}", s(p)),
            Step::PivotRoot => "pivot_root".into(),
            Step::DetachOldRoot => "detach the old root".into(),
            Step::RemountRootRo => "remount / read-only".into(),
            Step::Hostname(h) => format!("sethostname {}", s(h)),
            Step::Rlimit(r, n) => format!("setrlimit {r} {n}"),
            Step::DropBoundingSet => "drop the capability bounding set".into(),
            Step::Setgroups => "setgroups []".into(),
            Step::Setresgid(g) => format!("setresgid {g}"),
            Step::Setresuid(u) => format!("setresuid {u}"),
            Step::ClearCaps => "capset (none)".into(),
            Step::NoNewPrivs => "PR_SET_NO_NEW_PRIVS".into(),
            Step::LandlockCreate => "landlock_create_ruleset".into(),
            Step::LandlockRule(p, _) => format!("landlock rule for {}", s(p)),
            Step::LandlockRestrict => "landlock_restrict_self".into(),
            Step::Exec => "execve".into(),
        }
    }
}

fn cstr(p: &Path) -> Result<CString, Error> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::BadPath { what: format!("{} has a NUL byte", p.display()) })
}

/// Checks that `p` is absolute and plain (no `.`/`..`), so binding it at the same path inside
/// the jail cannot land outside the jail's root.
fn plain_absolute(p: &Path) -> Result<(), Error> {
    let ok = p.is_absolute() && p.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if ok {
        Ok(())
    } else {
        Err(Error::BadPath { what: format!("{} must be an absolute path without '.' or '..'", p.display()) })
    }
}

/// `root` + `p` (absolute).
fn inside(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

/// Every folder from `root` down to `p`'s parent, in order.
fn parents(p: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = p.ancestors().skip(1).filter(|a| *a != Path::new("/")).map(Path::to_path_buf).collect();
    v.reverse();
    v
}

/// The child's steps for `jail` (run before `Exec`).
fn jail_steps(j: &Jail, steps: &mut Vec<Step>) -> Result<(), Error> {
    plain_absolute(&j.root)?;
    if j.uid == 0 || j.gid == 0 {
        return Err(Error::BadPath { what: "the jail's uid and gid must not be 0".into() });
    }
    let root = &j.root;
    steps.push(Step::MountPrivate);
    steps.push(Step::MountTmpfs(cstr(root)?));
    // Folders made in the tmpfs (each once).
    let mut made: Vec<PathBuf> = Vec::new();
    let mkdir = |p: &Path, made: &mut Vec<PathBuf>, steps: &mut Vec<Step>| -> Result<(), Error> {
        for d in parents(p).into_iter().chain(std::iter::once(p.to_path_buf())) {
            if !made.contains(&d) {
                steps.push(Step::Mkdir(cstr(&inside(root, &d))?));
                made.push(d);
            }
        }
        Ok(())
    };
    // Merged-/usr symlinks of the host (bin -> usr/bin, ...).
    for d in ["/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"] {
        if let Ok(m) = std::fs::symlink_metadata(d) {
            if m.file_type().is_symlink() && j.binds.iter().any(|b| b.path.starts_with("/usr")) {
                let target =
                    std::fs::read_link(d).map_err(|e| Error::Io { what: format!("reading {d}"), source: e })?;
                steps.push(Step::Symlink(cstr(&target)?, cstr(&inside(root, Path::new(d)))?));
            }
        }
    }
    // Devices.
    mkdir(Path::new("/dev"), &mut made, steps)?;
    for dev in &j.devices {
        plain_absolute(dev)?;
        let Ok(m) = std::fs::metadata(dev) else { continue };
        if !m.file_type().is_char_device() {
            return Err(Error::BadPath { what: format!("{} is not a character device", dev.display()) });
        }
        mkdir(dev.parent().unwrap_or(Path::new("/")), &mut made, steps)?;
        steps.push(Step::Mknod(cstr(&inside(root, dev))?, libc::S_IFCHR | 0o600, m.rdev(), j.uid, j.gid));
    }
    // Binds, outer paths first.
    let mut binds = j.binds.clone();
    binds.sort_by_key(|b| b.path.components().count());
    let mut bound: Vec<&Bind> = Vec::new();
    for b in &binds {
        plain_absolute(&b.path)?;
        let m =
            std::fs::metadata(&b.path).map_err(|e| Error::Io { what: format!("{}", b.path.display()), source: e })?;
        // Inside an earlier bind the path is visible already (the same host file): mount it
        // again only to change its mode.
        let outer = bound.iter().rev().find(|o| b.path.starts_with(&o.path));
        if let Some(o) = outer {
            if o.writable == b.writable {
                continue;
            }
        } else {
            mkdir(b.path.parent().unwrap_or(Path::new("/")), &mut made, steps)?;
            if m.is_dir() {
                mkdir(&b.path, &mut made, steps)?;
            } else {
                steps.push(Step::MkFile(cstr(&inside(root, &b.path))?));
            }
        }
        let dst = cstr(&inside(root, &b.path))?;
        steps.push(Step::Bind(cstr(&b.path)?, dst.clone()));
        let ro = if b.writable { 0 } else { libc::MS_RDONLY };
        steps.push(Step::Remount(dst, libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV | ro));
        bound.push(b);
    }
    if let Some(w) = &j.workdir {
        plain_absolute(w)?;
        if !bound.iter().any(|b| w.starts_with(&b.path)) {
            mkdir(w, &mut made, steps)?;
        }
    }
    mkdir(Path::new("/proc"), &mut made, steps)?;
    steps.push(Step::MountProc(cstr(&inside(root, Path::new("/proc")))?));
    steps.push(Step::Chdir(cstr(root)?));
    steps.push(Step::PivotRoot);
    steps.push(Step::DetachOldRoot);
    steps.push(Step::Chdir(CString::from(c"/")));
    steps.push(Step::RemountRootRo);
    if let Some(w) = &j.workdir {
        steps.push(Step::Chdir(cstr(w)?));
    }
    let host =
        CString::new(j.hostname.as_bytes()).map_err(|_| Error::BadPath { what: "hostname has a NUL byte".into() })?;
    steps.push(Step::Hostname(host));
    steps.push(Step::Rlimit(libc::RLIMIT_NOFILE, j.max_open_files));
    steps.push(Step::DropBoundingSet);
    steps.push(Step::Setgroups);
    steps.push(Step::Setresgid(j.gid));
    steps.push(Step::Setresuid(j.uid));
    steps.push(Step::ClearCaps);
    steps.push(Step::NoNewPrivs);
    if j.landlock {
        steps.push(Step::LandlockCreate);
        let (read, write) = (ll::READ_FILE | ll::READ_DIR | ll::EXECUTE, ll::WRITE_FILE);
        let make = ll::MAKE_REG | ll::MAKE_SOCK | ll::MAKE_DIR | ll::REMOVE_FILE | ll::REMOVE_DIR;
        for b in &binds {
            let is_dir = std::fs::metadata(&b.path).is_ok_and(|m| m.is_dir());
            let access = match (b.writable, is_dir) {
                (false, true) => read,
                (false, false) => ll::READ_FILE | ll::EXECUTE,
                // Nothing written by the program may be executed by it.
                (true, true) => ll::READ_FILE | ll::READ_DIR | write | make,
                (true, false) => ll::READ_FILE | write,
            };
            steps.push(Step::LandlockRule(cstr(&b.path)?, access));
        }
        for dev in j.devices.iter().filter(|d| d.exists()) {
            steps.push(Step::LandlockRule(cstr(dev)?, ll::READ_FILE | ll::WRITE_FILE));
        }
        steps.push(Step::LandlockRule(CString::from(c"/proc"), ll::READ_FILE | ll::READ_DIR | ll::WRITE_FILE));
        // The root and the folders made in it: listing only (the merged-/usr links resolve
        // through it).
        steps.push(Step::LandlockRule(CString::from(c"/"), ll::READ_DIR));
        if let Some(w) = &j.workdir {
            steps.push(Step::LandlockRule(cstr(w)?, ll::READ_DIR));
        }
        steps.push(Step::LandlockRestrict);
    }
    Ok(())
}

/// Starts `cmd`, jailed by `jail` if given (else only forked, with `cmd`'s session and
/// stdio). Returns once the program runs (its `execve` succeeded).
///
/// Errors: [`Error::BadPath`] for a relative or odd path, [`Error::Io`] when a bound path is
/// missing or the fork fails, [`Error::Setup`] naming the child's failed step (e.g. `bind`
/// without root, `execve` of a program the jail does not contain).
pub fn spawn(cmd: &Command, jail: Option<&Jail>) -> Result<Child, Error> {
    plain_absolute(&cmd.exe)?;
    let exe = cstr(&cmd.exe)?;
    let mut argv_c = vec![exe.clone()];
    for a in &cmd.args {
        argv_c.push(
            CString::new(a.as_bytes()).map_err(|_| Error::BadPath { what: "an argument has a NUL byte".into() })?,
        );
    }
    let mut env_c = Vec::new();
    for (k, v) in &cmd.env {
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        env_c.push(
            CString::new(kv).map_err(|_| Error::BadPath { what: "an environment variable has a NUL byte".into() })?,
        );
    }
    let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env_c.iter().map(|c| c.as_ptr()).collect();
    envp.push(std::ptr::null());

    let null = match &cmd.stdin {
        Some(_) => None,
        None => Some(File::open("/dev/null").map_err(|e| Error::Io { what: "opening /dev/null".into(), source: e })?),
    };
    let stdin = cmd.stdin.as_ref().or(null.as_ref()).map(AsRawFd::as_raw_fd);
    let mut steps = Vec::new();
    if cmd.setsid {
        steps.push(Step::Setsid);
    }

    for (f, to) in
        [(stdin, 0), (cmd.stdout.as_ref().map(AsRawFd::as_raw_fd), 1), (cmd.stderr.as_ref().map(AsRawFd::as_raw_fd), 2)]
    {
        if let Some(fd) = f {
            steps.push(Step::Dup2(fd, to));
        }
    }
    steps.push(Step::ResetSignals);
    let mut flags: libc::c_long = libc::c_long::from(libc::SIGCHLD);
    if let Some(j) = jail {
        jail_steps(j, &mut steps)?;
        flags |= libc::c_long::from(libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS);
        if j.new_net {
            flags |= libc::c_long::from(libc::CLONE_NEWNET);
        }
    }
    // After the uid change, which clears it (prctl(2)).
    if cmd.die_with_parent {
        steps.push(Step::DieWithParent);
    }
    steps.push(Step::Exec);

    let mut fds = [0; 2];
    // SAFETY: pipe2(2) writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(Error::Io { what: "pipe2".into(), source: io::Error::last_os_error() });
    }
    // SAFETY: both descriptors were just made by pipe2 and are owned here only.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };

    // SAFETY: clone(2) without CLONE_VM and a null stack behaves like fork(2): the child gets
    // a copy of this address space and continues here with 0. The child only runs
    // `run_child`, which makes system calls on data prepared above and never returns.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    if pid < 0 {
        return Err(Error::Io { what: "clone".into(), source: io::Error::last_os_error() });
    }
    if pid == 0 {
        run_child(&steps, wr.as_raw_fd(), &exe, &argv, &envp);
    }
    drop(wr);
    let pid =
        u32::try_from(pid).map_err(|_| Error::Io { what: "clone".into(), source: io::Error::other("bad pid") })?;
    let mut child = Child { pid, status: None };
    let mut report = [0u8; 8];
    let mut rd = File::from(rd);
    let mut got = 0;
    while got < report.len() {
        match rd.read(report.get_mut(got..).unwrap_or_default()) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Io { what: "reading the child's report".into(), source: e });
            }
        }
    }
    if got == 0 {
        return Ok(child);
    }
    let _ = child.wait();
    let (idx, errno) = report.split_at(4);
    let idx = u32::from_ne_bytes(idx.try_into().unwrap_or_default()) as usize;
    let errno = i32::from_ne_bytes(errno.try_into().unwrap_or_default());
    let step = match steps.get(idx) {
        Some(Step::Exec) => format!("execve {}", cmd.exe.display()),
        Some(s) => s.describe(),
        None => "setup".into(),
    };
    Err(Error::Setup { step, source: io::Error::from_raw_os_error(errno) })
}

/// The child: runs `steps`, reporting the first failure (step index, errno) on `report`.
fn run_child(
    steps: &[Step],
    report: RawFd,
    exe: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    // The Landlock ruleset's fd; -1 where the kernel has no Landlock.
    let mut ruleset: libc::c_int = -1;
    for (i, s) in steps.iter().enumerate() {
        // SAFETY: each call is a plain system call on strings and values prepared by the
        // parent (valid NUL-terminated C strings kept alive by the parent's frame, which
        // this copy of the address space shares); nothing allocates.
        let r = unsafe { child_step(s, exe, argv, envp, &mut ruleset) };
        if r < 0 {
            // SAFETY: __errno_location is the calling thread's errno.
            let errno = unsafe { *libc::__errno_location() };
            let mut msg = [0u8; 8];
            let (a, b) = msg.split_at_mut(4);
            a.copy_from_slice(&u32::try_from(i).unwrap_or(u32::MAX).to_ne_bytes());
            b.copy_from_slice(&errno.to_ne_bytes());
            // SAFETY: write(2) of 8 bytes from `msg` and _exit(2): async-signal-safe.
            unsafe {
                libc::write(report, msg.as_ptr().cast(), msg.len());
                libc::_exit(127);
            }
        }
    }
    // SAFETY: as above; only reached if execve returned without an error code.
    unsafe { libc::_exit(127) }
}

/// One step; returns the system call's result (< 0 with errno set on failure).
///
/// # Safety
/// Only for the forked child of [`spawn`]: the pointers are the parent's prepared strings.
unsafe fn child_step(
    s: &Step,
    exe: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    ruleset: &mut libc::c_int,
) -> libc::c_long {
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: (for every arm) system calls with valid C strings or plain values.
    unsafe {
        let r: libc::c_int = match s {
            Step::Setsid => libc::setsid(),
            Step::DieWithParent => libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0),
            Step::Dup2(fd, to) => {
                if fd == to {
                    // Clear close-on-exec instead.
                    libc::fcntl(*fd, libc::F_SETFD, 0)
                } else {
                    libc::dup2(*fd, *to)
                }
            }
            Step::ResetSignals => {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                // The parent may ignore SIGPIPE (Rust programs do); ignored signals stay
                // ignored across execve.
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                0
            }
            Step::MountPrivate => {
                libc::mount(null, c"/".as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null())
            }
            Step::MountTmpfs(p) => libc::mount(
                c"tmpfs".as_ptr(),
                p.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID,
                c"mode=0755,size=4m,nr_inodes=4096".as_ptr().cast(),
            ),
            Step::Mkdir(p) => {
                let r = libc::mkdir(p.as_ptr(), 0o755);
                if r < 0 && *libc::__errno_location() == libc::EEXIST {
                    0
                } else {
                    r
                }
            }
            Step::MkFile(p) => {
                let fd = libc::open(p.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o600);
                if fd >= 0 {
                    libc::close(fd);
                }
                fd
            }
            Step::Symlink(t, p) => libc::symlink(t.as_ptr(), p.as_ptr()),
            Step::Mknod(p, mode, dev, uid, gid) => {
                let r = libc::mknod(p.as_ptr(), *mode, *dev);
                if r < 0 {
                    r
                } else {
                    libc::chown(p.as_ptr(), *uid, *gid)
                }
            }
            Step::Bind(src, dst) => {
                libc::mount(src.as_ptr(), dst.as_ptr(), null, libc::MS_BIND | libc::MS_REC, std::ptr::null())
            }
            Step::Remount(p, flags) => libc::mount(null, p.as_ptr(), null, *flags, std::ptr::null()),
            Step::MountProc(p) => libc::mount(
                c"proc".as_ptr(),
                p.as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ),
            Step::Chdir(p) => libc::chdir(p.as_ptr()),
            Step::PivotRoot => {
                return libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr());
            }
            Step::DetachOldRoot => libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
            Step::RemountRootRo => libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
                std::ptr::null(),
            ),
            Step::Hostname(h) => libc::sethostname(h.as_ptr(), h.as_bytes().len()),
            Step::Rlimit(res, n) => {
                let lim = libc::rlimit { rlim_cur: *n, rlim_max: *n };
                libc::setrlimit(*res, &lim)
            }
            Step::DropBoundingSet => {
                for cap in 0..64 {
                    // EINVAL past the last capability the kernel knows: ignored.
                    libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
                }
                0
            }
            Step::Setgroups => {
                return libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>());
            }
            Step::Setresgid(g) => {
                return libc::syscall(libc::SYS_setresgid, *g, *g, *g);
            }
            Step::Setresuid(u) => {
                return libc::syscall(libc::SYS_setresuid, *u, *u, *u);
            }
            Step::ClearCaps => {
                // struct __user_cap_header_struct { version, pid } and two data words.
                let header: [u32; 2] = [0x2008_0522, 0]; // _LINUX_CAPABILITY_VERSION_3
                let data = [0u32; 6];
                return libc::syscall(libc::SYS_capset, header.as_ptr(), data.as_ptr());
            }
            Step::NoNewPrivs => libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            Step::LandlockCreate => {
                // struct landlock_ruleset_attr { __u64 handled_access_fs; }
                let attr: u64 = LANDLOCK_HANDLED;
                let fd = libc::syscall(ll::SYS_CREATE_RULESET, &attr as *const u64, 8usize, 0u32);
                if fd < 0 {
                    let e = *libc::__errno_location();
                    // No Landlock in this kernel (or disabled at boot): the other walls hold.
                    return if e == libc::ENOSYS || e == libc::EOPNOTSUPP { 0 } else { fd };
                }
                *ruleset = libc::c_int::try_from(fd).unwrap_or(-1);
                0
            }
            Step::LandlockRule(p, access) => {
                if *ruleset < 0 {
                    return 0;
                }
                let fd = libc::open(p.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
                if fd < 0 {
                    return libc::c_long::from(fd);
                }
                let attr = PathBeneath { allowed_access: *access, parent_fd: fd };
                let r =
                    libc::syscall(ll::SYS_ADD_RULE, *ruleset, ll::RULE_PATH_BENEATH, &attr as *const PathBeneath, 0u32);
                libc::close(fd);
                return r;
            }
            Step::LandlockRestrict => {
                if *ruleset < 0 {
                    return 0;
                }
                let r = libc::syscall(ll::SYS_RESTRICT_SELF, *ruleset, 0u32);
                libc::close(*ruleset);
                return r;
            }
            Step::Exec => libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr()),
        };
        libc::c_long::from(r)
    }
}

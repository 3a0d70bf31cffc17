//! VMM processes: spawning one per VM in a session of its own (so it outlives the daemon),
//! finding out whether one still lives and is the one we think, killing and reaping.
//!
//! The daemon reaps the VMMs it spawned (`waitpid` through [`Child::try_wait`]) and so learns
//! their exit status; a VMM it adopted after a restart is not its child, so only its
//! disappearance can be seen (`/proc/<pid>`).

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use api::client::Client;

/// How long a fresh VMM has to answer `vmm.ping`.
pub const API_DEADLINE: Duration = Duration::from_secs(10);

/// A VMM this daemon spawned: reaped through `waitpid(2)`.
pub type Child = jail::Child;

/// Environment variables a VMM gets from the daemon (its environment is otherwise empty):
/// logging, backtraces and the emulator's switches.
fn passed_env(name: &std::ffi::OsStr) -> bool {
    let n = name.as_encoded_bytes();
    n.starts_with(b"RUST_") || n.starts_with(b"RUSTVISOR_")
}

/// Spawns `exe vmm --api-socket socket` in a new session, stdin from /dev/null and its
/// stdout and stderr appended to `log`; inside `jail` when given (see the `jail` crate: the
/// VMM is then PID 1 of its own PID namespace, as an unprivileged user).
///
/// Errors: the log cannot be opened, or the jail could not be set up (the message names the
/// failed step).
pub fn spawn(exe: &Path, socket: &Path, log: &Path, jail: Option<&jail::Jail>) -> io::Result<Child> {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    let mut cmd = jail::Command::new(exe);
    cmd.arg("vmm").arg("--api-socket").arg(socket).stdout(out).stderr(err).setsid(true);
    for (k, v) in std::env::vars_os().filter(|(k, _)| passed_env(k)) {
        cmd.env(k, v);
    }
    // A log file, not a terminal: no colour codes.
    cmd.env("NO_COLOR", "1");
    jail::spawn(&cmd, jail).map_err(io::Error::other)
}

/// Whether a VMM's `vmm.ping` answer `answered` (the pid it sees for itself) is process
/// `host_pid`: equal, or `host_pid`'s pid in its own PID namespace (1 for a jailed VMM).
pub fn is_pid(answered: u32, host_pid: u32) -> bool {
    answered == host_pid || jail::ns_pid(host_pid) == Some(answered)
}

/// Why a freshly spawned VMM's API did not come up ([`wait_api`]).
#[derive(Debug, thiserror::Error)]
pub enum WaitApiError {
    /// No client could be made for the socket.
    #[error("cannot start an API client: {0}")]
    Client(#[source] std::io::Error),
    /// The VMM exited first (`how` describes its exit).
    #[error("the VMM {how}")]
    Exited {
        /// E.g. "exited with status 2".
        how: String,
    },
    /// Another process answers on the socket.
    #[error("another process (pid {pid}) answers on {}", socket.display())]
    WrongPid {
        /// The process that answered.
        pid: u32,
        /// The socket.
        socket: std::path::PathBuf,
    },
    /// [`API_DEADLINE`] passed without an answer.
    #[error("the VMM's API did not answer within {API_DEADLINE:?}: {0}")]
    Timeout(#[source] api::client::ClientError),
}

/// Waits until the VMM `child` answers `vmm.ping` on `socket` with its own pid; returns a
/// client for it.
///
/// Errors: [`WaitApiError`]: the child exits first, another process answers, or
/// [`API_DEADLINE`] passes.
pub fn wait_api(child: &mut Child, socket: &Path) -> Result<Client, WaitApiError> {
    let client = Client::new(socket).map_err(WaitApiError::Client)?.with_timeout(Duration::from_secs(2));
    let end = Instant::now() + API_DEADLINE;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(WaitApiError::Exited { how: describe_exit(st) });
        }
        match client.ping() {
            Ok(p) if is_pid(p.pid, child.id()) => return Ok(client.with_timeout(Duration::from_secs(60))),
            Ok(p) => return Err(WaitApiError::WrongPid { pid: p.pid, socket: socket.to_path_buf() }),
            Err(e) if Instant::now() > end => return Err(WaitApiError::Timeout(e)),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Whether the VMM on `socket` answers `vmm.ping` as process `pid` (so a reused pid or a
/// stale socket is never taken for it).
pub fn answers_as(socket: &Path, pid: u32) -> bool {
    let Ok(client) = Client::new(socket) else { return false };
    matches!(client.with_timeout(Duration::from_secs(2)).ping(), Ok(p) if is_pid(p.pid, pid))
}

/// Whether process `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // "pid (comm) S ...": the state follows the last ')' (comm may hold anything).
    match stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()) {
        Some(state) => !matches!(state, "Z" | "X" | "x"),
        None => false,
    }
}

/// Sends SIGKILL to `pid` (a process we do not hold a [`Child`] for).
pub fn kill_pid(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    if pid <= 0 {
        return;
    }
    // SAFETY: kill(2) with a positive pid only sends a signal; no memory is involved.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Waits up to `timeout` for `pid` to be gone (reaping it through `child` when we hold it).
pub fn wait_gone(pid: u32, child: Option<&mut Child>, timeout: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + timeout;
    let mut child = child;
    loop {
        if let Some(c) = child.as_deref_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
        } else if !pid_alive(pid) {
            return None;
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills the VMM `pid` and waits for it (reaping it through `child` when we hold it).
pub fn kill_and_reap(pid: u32, child: Option<&mut Child>) -> Option<ExitStatus> {
    match child {
        Some(c) => {
            let _ = c.kill();
            c.wait().ok()
        }
        None => {
            kill_pid(pid);
            wait_gone(pid, None, Duration::from_secs(5))
        }
    }
}

/// "exited with status 1", "was killed by signal 9 (SIGKILL)", "exited with status 159 (a
/// forbidden system call: seccomp)" (the VMM's SIGSYS handler; its log's last line names the
/// call and the thread).
pub fn describe_exit(st: ExitStatus) -> String {
    if let Some(code) = st.code() {
        if code == seccomp::BAD_SYSCALL_EXIT_STATUS {
            return format!("exited with status {code} (a forbidden system call: seccomp)");
        }
        return format!("exited with status {code}");
    }
    match st.signal() {
        Some(sig) => format!("was killed by signal {sig}{}", signal_name(sig)),
        None => format!("ended ({st})"),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGABRT => " (SIGABRT: a panic or abort)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGBUS => " (SIGBUS)",
        libc::SIGINT => " (SIGINT)",
        libc::SIGHUP => " (SIGHUP)",
        _ => "",
    }
}

/// The VMM's last words in its log: the last line of its last 8 KiB that reports an error
/// or a panic, cut to 300 characters.
pub fn last_log_line(log: &Path) -> Option<String> {
    let text = std::fs::read(log).ok()?;
    let start = text.len().saturating_sub(8192);
    let tail = String::from_utf8_lossy(&text[start..]);
    let line = tail
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.contains("ERROR") || l.contains("panic") || l.starts_with("rustvisor:"))?;
    Some(line.chars().take(300).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_and_exit_descriptions() {
        assert!(pid_alive(std::process::id()));
        let mut sleep = jail::Command::new("/bin/sleep");
        sleep.arg("30");
        let mut child = jail::spawn(&sleep, None).unwrap();
        let pid = child.id();
        assert!(pid_alive(pid));
        let st = kill_and_reap(pid, Some(&mut child)).unwrap();
        assert_eq!(describe_exit(st), "was killed by signal 9 (SIGKILL)");
        assert!(!pid_alive(pid));
        let st = std::process::Command::new("sh").args(["-c", "exit 3"]).status().unwrap();
        assert_eq!(describe_exit(st), "exited with status 3");
        let st = std::process::Command::new("sh").args(["-c", "exit 159"]).status().unwrap();
        assert_eq!(describe_exit(st), "exited with status 159 (a forbidden system call: seccomp)");
    }
}

//! `rustvisor daemon`: opens the store, re-adopts the VMMs that outlived the previous daemon,
//! autostarts VMs after a host boot, supervises them on a thread of its own and serves the
//! API until SIGTERM or SIGINT: on its Unix socket (mode 0660, group `rustvisor` when that
//! group exists) and, with `--listen`, on TCP to clients with the bearer token. VMMs run in
//! sessions of their own and keep running when the daemon stops or dies.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::service::{DaemonPaths, Service, ServiceError};
use crate::store::{NewEvent, Peer, Store, StoreError};

/// How often the supervisor looks at the VMs.
const SUPERVISE_EVERY: Duration = Duration::from_millis(200);
/// The group that may use the daemon's socket, when it exists (like `docker` or `libvirt`).
pub const SOCKET_GROUP: &str = "rustvisor";
/// The shortest bearer token accepted for `--listen`.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A folder, the lock or the socket could not be set up.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// Another daemon holds the state folder.
    #[error("another rustvisor daemon uses the state folder {0}")]
    Locked(PathBuf),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reconciling the VMs failed.
    #[error("reconciling the VMs: {0}")]
    Reconcile(#[from] ServiceError),
    /// A setting is unusable (e.g. `--token-file`); the message names the flag.
    #[error("{0}")]
    Config(String),
}

/// The daemon's settings.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Persistent state: the store and the VMs' console logs.
    pub state_dir: PathBuf,
    /// Runtime files: the VMMs' API sockets.
    pub run_dir: PathBuf,
    /// The daemon's API socket.
    pub socket: PathBuf,
    /// The program to spawn VMMs with (`<exe> vmm --api-socket PATH`).
    pub vmm_exe: PathBuf,
    /// Also serve the API on this TCP address (needs `token_file`).
    pub listen: Option<std::net::SocketAddr>,
    /// The bearer token TCP clients must send (the file's first line; at least
    /// [`MIN_TOKEN_LEN`] characters; the file must not be readable by group or others).
    pub token_file: Option<PathBuf>,
    /// How long a VM must run for its restart count to go back to 0.
    pub restart_reset_after: Duration,
    /// cgroups, admission and ballooning.
    pub resources: crate::service::ResourceOptions,
    /// Start each VMM in a jail ([`crate::service::Service::with_jail`]).
    pub jail: bool,
}

/// Reads the bearer token of `--token-file`.
///
/// Errors: [`DaemonError::Config`] naming the flag: unreadable, readable by group or others,
/// or shorter than [`MIN_TOKEN_LEN`].
pub fn read_token(path: &Path) -> Result<Arc<str>, DaemonError> {
    let bad = |m: String| DaemonError::Config(format!("--token-file: {}: {m}", path.display()));
    let md = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if md.permissions().mode() & 0o077 != 0 {
        return Err(bad(format!(
            "mode {:o} lets others read it (accepted: 0600 or 0400)",
            md.permissions().mode() & 0o777
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad(format!(
            "the token must be at least {MIN_TOKEN_LEN} printable characters without spaces (e.g. `openssl rand -hex 32`)"
        )));
    }
    Ok(Arc::from(token))
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(cfg: DaemonConfig) -> Result<(), DaemonError> {
    let token = match (&cfg.listen, &cfg.token_file) {
        (Some(_), Some(f)) => Some(read_token(f)?),
        (Some(_), None) => {
            return Err(DaemonError::Config(
                "--listen: needs --token-file (the API is never served on TCP without a token)".into(),
            ))
        }
        (None, _) => None,
    };
    for d in [&cfg.state_dir, &cfg.run_dir] {
        std::fs::create_dir_all(d).map_err(io_err(format!("creating {}", d.display())))?;
    }
    let lock_path = cfg.state_dir.join("daemon.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(format!("opening {}", lock_path.display())))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(DaemonError::Locked(cfg.state_dir.clone())),
        Err(std::fs::TryLockError::Error(e)) => return Err(io_err(format!("locking {}", lock_path.display()))(e)),
    }
    let store = Store::open(&cfg.state_dir.join("rustvisor.db"))?;
    let paths =
        DaemonPaths { state_dir: cfg.state_dir.clone(), run_dir: cfg.run_dir.clone(), vmm_exe: cfg.vmm_exe.clone() };
    let svc = Arc::new(
        Service::new(paths, store)
            .with_restart_reset_after(cfg.restart_reset_after)
            .with_resources(cfg.resources.clone())
            .with_jail(cfg.jail),
    );
    svc.reconcile()?;
    let listener = bind(&cfg.socket)?;
    let tcp = match cfg.listen {
        Some(addr) => Some(std::net::TcpListener::bind(addr).map_err(io_err(format!("--listen: binding {addr}")))?),
        None => None,
    };
    svc.log(&NewEvent {
        vm: None,
        kind: "daemon-started",
        detail: format!("pid {}, socket {}", std::process::id(), cfg.socket.display()),
        peer: Peer::default(),
    })?;
    tracing::info!("rustvisor daemon: API on {}, state in {}", cfg.socket.display(), cfg.state_dir.display());

    {
        let svc = svc.clone();
        std::thread::Builder::new()
            .name("autostart".into())
            .spawn(move || svc.autostart())
            .map_err(io_err("starting the autostart thread"))?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let supervisor = {
        let (svc, stop) = (svc.clone(), stop.clone());
        std::thread::Builder::new()
            .name("supervisor".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    svc.supervise();
                    std::thread::sleep(SUPERVISE_EVERY);
                }
            })
            .map_err(io_err("starting the supervisor thread"))?
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(io_err("starting tokio"))?;
    let served = rt.block_on(async {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::UnixListener::from_std(listener)?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        let tcp_server = match (tcp, token) {
            (Some(l), Some(token)) => {
                l.set_nonblocking(true)?;
                let l = tokio::net::TcpListener::from_std(l)?;
                tracing::info!("rustvisor daemon: API also on TCP {} (bearer token)", l.local_addr()?);
                let mut rx = stop_rx.clone();
                Some(tokio::spawn(crate::server::serve_tcp(l, svc.clone(), token, async move {
                    let _ = rx.wait_for(|s| *s).await;
                })))
            }
            _ => None,
        };
        crate::server::serve(listener, svc.clone(), shutdown).await;
        let _ = stop_tx.send(true);
        if let Some(t) = tcp_server {
            let _ = t.await;
        }
        Ok::<_, io::Error>(())
    });
    tracing::info!("rustvisor daemon: stopping (VMMs keep running)");
    stop.store(true, Ordering::SeqCst);
    let _ = supervisor.join();
    let _ = std::fs::remove_file(&cfg.socket);
    served.map_err(io_err("serving the API"))
}

/// Binds the daemon's socket (replacing a stale one nobody listens on) with mode 0660.
fn bind(socket: &Path) -> Result<StdUnixListener, DaemonError> {
    let what = format!("binding {}", socket.display());
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    }
    match std::fs::symlink_metadata(socket) {
        Ok(md) if !md.file_type().is_socket() => {
            return Err(io_err(what)(io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a socket")));
        }
        Ok(_) => match StdUnixStream::connect(socket) {
            Ok(_) => {
                return Err(io_err(what)(io::Error::new(io::ErrorKind::AddrInUse, "another process listens on it")));
            }
            Err(_) => {
                std::fs::remove_file(socket).map_err(io_err(format!("removing the stale {}", socket.display())))?
            }
        },
        Err(_) => {}
    }
    let listener = StdUnixListener::bind(socket).map_err(io_err(what.clone()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660)).map_err(io_err(what.clone()))?;
    set_group(socket, SOCKET_GROUP).map_err(io_err(format!("{what}: giving it to group {SOCKET_GROUP}")))?;
    Ok(listener)
}

/// Gives `path` to group `group` when that group exists; returns its gid, or `None` when
/// there is no such group (then nothing changes).
///
/// Errors: looking the group up, or `chown(2)`.
pub fn set_group(path: &Path, group: &str) -> io::Result<Option<u32>> {
    let Some(gid) = group_id(group)? else { return Ok(None) };
    std::os::unix::fs::chown(path, None, Some(gid))?;
    Ok(Some(gid))
}

/// The gid of group `name` (`getgrnam_r(3)`), or `None` when it does not exist.
fn group_id(name: &str) -> io::Result<Option<u32>> {
    let cname = std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: `group` is plain old data that getgrnam_r fills in.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the NUL-terminated name, the struct, the
    // buffer with its true length, and the result pointer; the strings getgrnam_r stores
    // point into `buf`, which we do not read.
    let rc = unsafe { libc::getgrnam_r(cname.as_ptr(), &mut grp, buf.as_mut_ptr().cast(), buf.len(), &mut result) };
    match rc {
        0 if result.is_null() => Ok(None),
        0 => Ok(Some(grp.gr_gid)),
        // Not found is reported as one of these by some C libraries.
        libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => Ok(None),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn socket_group_only_when_the_group_exists() {
        let dir = std::env::temp_dir().join(format!("rv-group-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        std::fs::write(&f, b"").unwrap();
        let before = std::fs::metadata(&f).unwrap().gid();
        assert_eq!(set_group(&f, "no-such-group-rustvisor-test").unwrap(), None);
        assert_eq!(std::fs::metadata(&f).unwrap().gid(), before);
        // Our own primary group exists; chown to it is always allowed.
        // SAFETY: getgid has no preconditions.
        let gid = unsafe { libc::getgid() };
        let name = {
            // SAFETY: getgrgid returns a pointer into static storage or null; read at once.
            let g = unsafe { libc::getgrgid(gid) };
            assert!(!g.is_null());
            // SAFETY: gr_name of a valid group entry is a NUL-terminated string.
            unsafe { std::ffi::CStr::from_ptr((*g).gr_name) }.to_string_lossy().into_owned()
        };
        assert_eq!(set_group(&f, &name).unwrap(), Some(gid));
        assert_eq!(std::fs::metadata(&f).unwrap().gid(), gid);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn token_files() {
        let dir = std::env::temp_dir().join(format!("rv-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(&*read_token(&f).unwrap(), "0123456789abcdef0123");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_token(&f).unwrap_err().to_string().contains("lets others read it"));
        std::fs::write(&f, "short\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_token(&f).unwrap_err().to_string().contains("at least 16"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! `rustvisor daemon`: opens the store, re-adopts the VMMs that outlived the previous daemon,
//! supervises them on a thread of its own and serves the API until SIGTERM or SIGINT. VMMs
//! run in sessions of their own and keep running when the daemon stops or dies.

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
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(cfg: DaemonConfig) -> Result<(), DaemonError> {
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
    let svc = Arc::new(Service::new(paths, store));
    svc.reconcile()?;
    let listener = bind(&cfg.socket)?;
    svc.log(&NewEvent {
        vm: None,
        kind: "daemon-started",
        detail: format!("pid {}, socket {}", std::process::id(), cfg.socket.display()),
        peer: Peer::default(),
    })?;
    tracing::info!("rustvisor daemon: API on {}, state in {}", cfg.socket.display(), cfg.state_dir.display());

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
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        crate::server::serve(listener, svc.clone(), shutdown).await;
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
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660)).map_err(io_err(what))?;
    Ok(listener)
}

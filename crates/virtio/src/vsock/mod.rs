//! virtio-vsock, the socket device (virtio 1.2 §5.10), stream sockets only, with the host side
//! on Unix-domain sockets (Firecracker's convention):
//!
//! - **Host → guest.** A host program connects to the device's socket `uds_path` and writes
//!   `CONNECT <port>\n`. The device sends the guest an `OP_REQUEST` from the host (CID 2) and a
//!   fresh ephemeral host port (≥ 1024) to guest port `<port>`; once the guest answers
//!   `OP_RESPONSE` the device writes `OK <host_port>\n` to the Unix connection and relays bytes
//!   both ways. A guest `OP_RST` (refused) closes the Unix connection.
//! - **Guest → host.** A guest connection to CID 2 port `P` connects to the Unix socket
//!   `<uds_path>_P`: success answers `OP_RESPONSE`, failure `OP_RST`.
//!
//! Data flows as `OP_RW` packets under credit-based flow control (§5.10.6.3): the device
//! advertises a [`CONN_BUF`]-byte receive buffer per connection and never sends the guest more
//! than the guest's advertised credit. `OP_SHUTDOWN`, `OP_RST` and Unix-side EOF/hang-up close
//! connections cleanly. The worker never blocks: every socket is non-blocking and pending bytes
//! are buffered per connection with a bound.
//!
//! Every packet from the guest is validated (chain shape, header length, type, op, `len` against
//! the buffers and [`MAX_PKT_PAYLOAD`], source CID); malformed packets are dropped and counted in
//! [`Counters::errors`], packets for unknown connections are answered with `OP_RST`.

mod muxer;
pub mod packet;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::device::{read_config_bytes, ActivateContext, ActivateError, Counters, VirtioDevice};
use crate::worker::{Completion, Worker};
use crate::{TYPE_VSOCK, VIRTIO_F_VERSION_1};

/// Size of each of the three queues (rx 0, tx 1, event 2).
pub const QUEUE_SIZE: u16 = 256;
/// Smallest guest CID accepted (0, 1 and 2 are reserved: hypervisor, loopback, host; §5.10.4).
pub const MIN_GUEST_CID: u64 = 3;
/// Largest guest CID accepted (`0xffff_ffff` is `VMADDR_CID_ANY`; the upper 32 bits are reserved).
pub const MAX_GUEST_CID: u64 = 0xffff_fffe;
/// Receive buffer the device advertises per connection (`buf_alloc`), in bytes: the most
/// guest → host bytes it holds for a connection whose Unix peer is not reading.
pub const CONN_BUF: u32 = 256 << 10;
/// Largest payload of one packet, in bytes, either way (a guest `len` above it is malformed).
pub const MAX_PKT_PAYLOAD: u32 = 64 << 10;
/// Most connections (established, connecting or waiting for their `CONNECT` line) at a time;
/// each holds one host file descriptor. Beyond it guest requests get `OP_RST` and host
/// connections are closed.
pub const MAX_CONNS: usize = 256;

/// Error from [`Vsock::new`].
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved or out of range.
    #[error("vsock guest CID {0} is out of range: it must be in {MIN_GUEST_CID}..={MAX_GUEST_CID} (0-2 are reserved, 0xffffffff is VMADDR_CID_ANY)")]
    InvalidCid(u64),
    /// `uds_path` exists and is not a socket.
    #[error("vsock socket path {0}: exists and is not a Unix socket")]
    NotASocket(PathBuf),
    /// Another process listens on `uds_path`.
    #[error("vsock socket path {0}: another process is listening on it")]
    InUse(PathBuf),
    /// Creating or binding the socket failed.
    #[error("vsock socket path {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// The socket device.
pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    /// (device, inode) of the socket file we bound, to remove only our own on drop.
    bound: (u64, u64),
    counters: Arc<Counters>,
    worker: Worker<muxer::VsockWorker>,
}

impl Vsock {
    /// A new, inactive socket device for a guest with CID `guest_cid`, listening for host
    /// connections on the Unix socket `uds_path` (bound now, so errors surface at VM start; a
    /// stale socket file nobody listens on is replaced).
    ///
    /// Errors: `guest_cid` outside [`MIN_GUEST_CID`]`..=`[`MAX_GUEST_CID`]; `uds_path` exists
    /// and is not a socket, or a live process listens on it; the socket cannot be bound.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Vsock, VsockError> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let io_err = |source| VsockError::Io { path: uds_path.clone(), source };
        match std::fs::symlink_metadata(&uds_path) {
            Ok(md) if !md.file_type().is_socket() => return Err(VsockError::NotASocket(uds_path)),
            Ok(_) => match connect_nonblocking(&uds_path) {
                Ok(_) => return Err(VsockError::InUse(uds_path)),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Err(VsockError::InUse(uds_path)),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(&uds_path).map_err(io_err)?
                }
                Err(e) => return Err(io_err(e)),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let listener = UnixListener::bind(&uds_path).map_err(io_err)?;
        listener.set_nonblocking(true).map_err(io_err)?;
        let md = std::fs::symlink_metadata(&uds_path).map_err(io_err)?;
        Ok(Vsock {
            cid: guest_cid,
            uds_path,
            listener,
            bound: (md.dev(), md.ino()),
            counters: Arc::default(),
            worker: Worker::new("virtio-vsock"),
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.cid
    }

    /// The Unix socket host programs connect to.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // Ends the worker (closing every connection) before the socket file goes.
        self.worker.shutdown();
        // Remove the socket file if it is still the one we bound.
        if let Ok(md) = std::fs::symlink_metadata(&self.uds_path) {
            if (md.dev(), md.ino()) == self.bound {
                let _ = std::fs::remove_file(&self.uds_path);
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }
    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | crate::RING_FEATURES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; } (§5.10.4)
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() < 3 || ctx.queue_evts.len() < 3 {
            return Err(ActivateError::BadConfig("vsock needs rx, tx and event queues".into()));
        }
        let host = |e: io::Error| ActivateError::Host(format!("vsock {}: {e}", self.uds_path.display()));
        let listener = self.listener.try_clone().map_err(host)?;
        let (queue_evts, w) =
            muxer::VsockWorker::new(ctx, self.cid, self.uds_path.clone(), listener, self.counters.clone())
                .map_err(host)?;
        self.worker.activate(queue_evts, w).map_err(host)
    }
    fn reset(&mut self) -> Completion {
        // Dropping the worker's state closes every connection; host programs see EOF.
        self.worker.reset()
    }
    fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }
}

/// Connects a non-blocking stream socket to the Unix socket at `path` without ever waiting:
/// a listener whose backlog is full fails with `EAGAIN` instead of blocking (also used to
/// tell a stale socket file, `ECONNREFUSED`, from a live one).
///
/// Errors: `InvalidInput` for an empty path, one with a NUL or longer than `sun_path`;
/// otherwise `socket(2)`'s or `connect(2)`'s.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    let family = libc::sa_family_t::try_from(libc::AF_UNIX).map_err(io::Error::other)?;
    let mut addr = libc::sockaddr_un { sun_family: family, sun_path: [0; 108] };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "Unix socket path too long or invalid"));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh, valid descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    let len = libc::socklen_t::try_from(len).map_err(io::Error::other)?;
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call and `len` does not exceed its size.
    let r = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(), len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(sock))
}

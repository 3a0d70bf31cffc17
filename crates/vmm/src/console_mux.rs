//! The 8250 console served on a Unix socket (`--serial socket=PATH[,log=FILE]`): one thread
//! fans the guest's output out to a log file and to every attached client, and feeds the
//! keyboard client's input to the UART.
//!
//! - **The guest never waits.** The UART's writer ([`MuxWriter`]) appends to a queue of at
//!   most [`PENDING_MAX`] bytes and wakes the thread; bytes beyond it are dropped (and the
//!   stream says how many).
//! - **A client never holds up the guest or the others.** Each has a buffer of at most
//!   [`CLIENT_BUFFER`] bytes, written without blocking; a client that reads too slowly loses
//!   its oldest bytes, and its stream says how many. A client that never reads costs that much
//!   memory and nothing else.
//! - At most [`MAX_CLIENTS`] clients at once; one more gets [`BUSY_NOTICE`] and is closed.
//! - On attach a client first gets the last [`REPLAY`] bytes of output (so the prompt shows).
//! - **One typist.** The oldest client holds the keyboard; the others' input is discarded
//!   (each is told once, [`READ_ONLY_NOTICE`]). When the typist leaves, the next oldest gets
//!   the keyboard ([`KEYBOARD_NOTICE`] if it had been told it had not). Input goes to the UART
//!   as its 64-byte FIFO takes it: at most [`INPUT_MAX`] bytes wait, and meanwhile the typist's
//!   socket is not read (its writes back up on it).
//! - A client that closes (or shuts down its sending side) is detached. Detaching never
//!   affects the VM.
//! - The log is appended to, and rotated to `FILE.1` (replacing the previous one) when it
//!   would pass [`LOG_ROTATE`] bytes.
//! - The socket has mode 0600 and is removed when the [`ConsoleMux`] is dropped (with the VM);
//!   clients then see the end of their stream.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Most clients attached at once.
pub const MAX_CLIENTS: usize = 16;
/// Most output bytes buffered for one client (beyond: its oldest bytes are dropped).
pub const CLIENT_BUFFER: usize = 64 * 1024;
/// Output bytes a new client gets first (the most recent ones).
pub const REPLAY: usize = 16 * 1024;
/// Guest output bytes waiting for the thread (beyond: dropped).
pub const PENDING_MAX: usize = 1 << 20;
/// Typed bytes waiting for room in the UART's FIFO (beyond: the typist's socket is not read).
pub const INPUT_MAX: usize = 4096;
/// The log's size, in bytes, past which it is rotated to `FILE.1`.
pub const LOG_ROTATE: u64 = 4 << 20;
/// How often waiting input is offered to the UART again, in milliseconds.
const INPUT_RETRY_MS: i32 = 2;
/// Sent to a client whose input is discarded, the first time it types.
pub const READ_ONLY_NOTICE: &str = "\r\n[rustvisor: read-only: another console has the keyboard]\r\n";
/// Sent to a client that gets the keyboard after having been told it was read-only.
pub const KEYBOARD_NOTICE: &str = "\r\n[rustvisor: this console has the keyboard now]\r\n";
/// Sent to a client refused because [`MAX_CLIENTS`] are attached.
pub const BUSY_NOTICE: &str = "[rustvisor: console busy: 16 consoles are attached already]\r\n";
/// Room kept in a client's buffer for the "bytes dropped" notice.
const NOTICE_ROOM: usize = 128;

/// Takes typed bytes: returns how many it accepted (0 when it has no room now; the rest is
/// offered again every few milliseconds).
pub type InputSink = Box<dyn FnMut(&[u8]) -> usize + Send>;

/// Why a console socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    /// The path exists and is not a socket (it is not replaced).
    #[error("{}: exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// A live process listens on the socket.
    #[error("{}: in use (another process listens on it)", .0.display())]
    InUse(PathBuf),
    /// A host error on the socket or the log.
    #[error("{}: {source}", path.display())]
    Io {
        /// The socket or log file.
        path: PathBuf,
        /// The host error.
        #[source]
        source: io::Error,
    },
}

/// What the guest side and the thread share.
struct Shared {
    state: Mutex<Pending>,
    wake: EventFd,
    /// Output bytes buffered for clients after the thread's last round.
    client_bytes: AtomicUsize,
}

#[derive(Default)]
struct Pending {
    /// Guest output not yet taken by the thread.
    bytes: Vec<u8>,
    /// Guest output dropped because `bytes` was full.
    dropped: u64,
    /// The mux is being dropped: flush and end.
    stop: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The UART's output sink: queues the bytes for the mux thread and returns at once.
pub struct MuxWriter(Arc<Shared>);

impl Write for MuxWriter {
    /// Always takes every byte (bytes past [`PENDING_MAX`] waiting ones are dropped and
    /// counted); never blocks on a client or the log.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let wake = {
            let mut p = self.0.lock();
            let was_empty = p.bytes.is_empty();
            let n = buf.len().min(PENDING_MAX.saturating_sub(p.bytes.len()));
            p.bytes.extend_from_slice(buf.get(..n).unwrap_or_default());
            p.dropped += (buf.len() - n) as u64;
            was_empty && n > 0
        };
        if wake {
            let _ = self.0.wake.write(1);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The console log, rotated to `FILE.1` when it would pass [`LOG_ROTATE`] bytes.
struct RotatingLog {
    path: PathBuf,
    file: File,
    size: u64,
    limit: u64,
    warned: bool,
}

impl RotatingLog {
    fn open(path: &Path, limit: u64) -> io::Result<RotatingLog> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingLog { path: path.to_path_buf(), file, size, limit, warned: false })
    }

    /// `FILE.1`.
    fn rotated(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".1");
        p.into()
    }

    fn write(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.size > 0 && self.size.saturating_add(data.len() as u64) > self.limit {
            let reopened = std::fs::rename(&self.path, self.rotated())
                .and_then(|()| std::fs::OpenOptions::new().create(true).append(true).open(&self.path));
            match reopened {
                Ok(f) => self.file = f,
                Err(e) => self.warn(format_args!("cannot rotate it: {e}")),
            }
            // On failure, try again after another `limit` bytes.
            self.size = 0;
        }
        match self.file.write_all(data) {
            Ok(()) => self.size += data.len() as u64,
            Err(e) => self.warn(format_args!("cannot write it: {e}")),
        }
    }

    fn warn(&mut self, what: std::fmt::Arguments<'_>) {
        if !self.warned {
            self.warned = true;
            tracing::warn!("console log {}: {what}", self.path.display());
        }
    }
}

/// One attached client.
struct Client {
    stream: UnixStream,
    /// Output not yet written to it.
    out: VecDeque<u8>,
    /// Bytes at the front of `out` that are a "bytes dropped" notice not yet started.
    notice: usize,
    /// Output bytes dropped for it since its last notice was started.
    dropped: u64,
    /// It was told that its input is discarded.
    told_read_only: bool,
}

impl Client {
    /// Queues `data`, dropping the oldest bytes beyond [`CLIENT_BUFFER`] (a notice at the
    /// front says how many).
    fn push(&mut self, data: &[u8]) {
        self.out.extend(data);
        if self.out.len() <= CLIENT_BUFFER {
            return;
        }
        // The unsent notice goes; the new one counts everything dropped since.
        self.out.drain(..self.notice);
        let excess = self.out.len().saturating_sub(CLIENT_BUFFER - NOTICE_ROOM);
        self.out.drain(..excess);
        self.dropped += excess as u64;
        let notice =
            format!("\r\n[rustvisor: {} bytes of output dropped: this console reads too slowly]\r\n", self.dropped);
        for b in notice.bytes().rev() {
            self.out.push_front(b);
        }
        self.notice = notice.len();
    }

    /// Writes what it can without blocking. Errors: the client is gone.
    fn flush(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            let (front, _) = self.out.as_slices();
            match (&self.stream).write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out.drain(..n);
                    if self.notice > 0 {
                        // A started notice is ordinary output now.
                        self.notice = 0;
                        self.dropped = 0;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The thread's state.
struct Mux {
    shared: Arc<Shared>,
    listener: UnixListener,
    log: Option<RotatingLog>,
    /// The last [`REPLAY`] output bytes.
    ring: VecDeque<u8>,
    /// Oldest first: `clients[0]` holds the keyboard.
    clients: Vec<Client>,
    /// Typed bytes the UART has not taken yet.
    input: VecDeque<u8>,
    sink: InputSink,
}

fn pollfd(fd: i32, events: i16) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

impl Mux {
    fn run(mut self) {
        let mut buf = [0u8; 4096];
        let mut fds = Vec::new();
        loop {
            fds.clear();
            fds.push(pollfd(self.shared.wake.as_raw_fd(), libc::POLLIN));
            fds.push(pollfd(self.listener.as_raw_fd(), libc::POLLIN));
            for (i, c) in self.clients.iter().enumerate() {
                let mut ev = 0;
                if i > 0 || self.input.len() < INPUT_MAX {
                    ev |= libc::POLLIN;
                }
                if !c.out.is_empty() {
                    ev |= libc::POLLOUT;
                }
                fds.push(pollfd(c.stream.as_raw_fd(), ev));
            }
            let timeout = if self.input.is_empty() { -1 } else { INPUT_RETRY_MS };
            // SAFETY: `fds` is a valid array of `fds.len()` pollfds that outlives the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("serial console: poll failed: {e}; the console socket stops");
                    return;
                }
                continue;
            }
            let revents = |i: usize| fds.get(i).map_or(0, |f| f.revents);
            if revents(0) != 0 {
                let _ = self.shared.wake.read();
            }
            let (bytes, dropped, stop) = {
                let mut p = self.shared.lock();
                (std::mem::take(&mut p.bytes), std::mem::take(&mut p.dropped), p.stop)
            };
            if dropped > 0 {
                self.output(format!("\r\n[rustvisor: {dropped} bytes of guest output dropped]\r\n").as_bytes());
            }
            self.output(&bytes);
            // Clients polled this round (accepted ones come after them).
            let polled = self.clients.len();
            let mut gone = vec![false; polled];
            for (i, g) in gone.iter_mut().enumerate() {
                let ev = revents(i + 2);
                if ev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    *g = !self.read_client(i, &mut buf) || ev & (libc::POLLHUP | libc::POLLERR) != 0;
                }
            }
            if revents(1) != 0 {
                self.accept();
            }
            gone.resize(self.clients.len(), false);
            for (c, g) in self.clients.iter_mut().zip(gone.iter_mut()) {
                if !*g && c.flush().is_err() {
                    *g = true;
                }
            }
            self.remove(&gone);
            self.feed();
            let buffered = self.clients.iter().map(|c| c.out.len()).sum();
            self.shared.client_bytes.store(buffered, Ordering::Relaxed);
            if stop {
                return;
            }
        }
    }

    /// Fans `data` out to the log, the replay ring and every client.
    fn output(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if let Some(log) = &mut self.log {
            log.write(data);
        }
        self.ring.extend(data);
        let excess = self.ring.len().saturating_sub(REPLAY);
        self.ring.drain(..excess);
        for c in &mut self.clients {
            c.push(data);
        }
    }

    /// Reads once from client `i`; returns false when it is gone (end of stream or error).
    fn read_client(&mut self, i: usize, buf: &mut [u8]) -> bool {
        let typist = i == 0;
        let room = if typist { INPUT_MAX.saturating_sub(self.input.len()).min(buf.len()) } else { buf.len() };
        let Some(c) = self.clients.get_mut(i) else { return false };
        let Some(buf) = buf.get_mut(..room).filter(|b| !b.is_empty()) else { return true };
        match (&c.stream).read(buf) {
            Ok(0) => false,
            Ok(n) => {
                if typist {
                    self.input.extend(buf.get(..n).unwrap_or_default());
                } else if !c.told_read_only {
                    c.told_read_only = true;
                    c.push(READ_ONLY_NOTICE.as_bytes());
                }
                true
            }
            Err(e) => matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted),
        }
    }

    /// Accepts every waiting connection (refusing those beyond [`MAX_CLIENTS`]).
    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("serial console: accept failed: {e}");
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.clients.len() >= MAX_CLIENTS {
                // A fresh socket's buffer has room for one line; the client is closed anyway.
                let _ = (&stream).write(BUSY_NOTICE.as_bytes());
                continue;
            }
            let mut c = Client { stream, out: VecDeque::new(), notice: 0, dropped: 0, told_read_only: false };
            let (a, b) = self.ring.as_slices();
            c.push(a);
            c.push(b);
            self.clients.push(c);
        }
    }

    /// Removes the clients marked gone; the oldest remaining one holds the keyboard.
    fn remove(&mut self, gone: &[bool]) {
        if !gone.iter().any(|g| *g) {
            return;
        }
        let typist_left = gone.first().copied().unwrap_or(false);
        let mut i = 0;
        self.clients.retain(|_| {
            let keep = !gone.get(i).copied().unwrap_or(false);
            i += 1;
            keep
        });
        if typist_left {
            if let Some(c) = self.clients.first_mut() {
                if c.told_read_only {
                    c.told_read_only = false;
                    c.push(KEYBOARD_NOTICE.as_bytes());
                    let _ = c.flush();
                }
            }
        }
    }

    /// Offers waiting input to the UART.
    fn feed(&mut self) {
        while !self.input.is_empty() {
            let (front, _) = self.input.as_slices();
            let took = (self.sink)(front).min(front.len());
            if took == 0 {
                return;
            }
            self.input.drain(..took);
        }
    }
}

/// Binds `path` (mode 0600), replacing a stale socket nobody listens on.
fn bind(path: &Path) -> Result<(UnixListener, (u64, u64)), MuxError> {
    let io_err = |source| MuxError::Io { path: path.to_path_buf(), source };
    match std::fs::symlink_metadata(path) {
        Ok(md) if !md.file_type().is_socket() => return Err(MuxError::NotASocket(path.to_path_buf())),
        Ok(_) => match virtio::vsock::connect_nonblocking(path) {
            Ok(_) => return Err(MuxError::InUse(path.to_path_buf())),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Err(MuxError::InUse(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path).map_err(io_err)?,
            Err(e) => return Err(io_err(e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let listener = UnixListener::bind(path).map_err(io_err)?;
    let bound = (|| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let md = std::fs::symlink_metadata(path)?;
        Ok((md.dev(), md.ino()))
    })();
    match bound {
        Ok(b) => Ok((listener, b)),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(io_err(e))
        }
    }
}

/// A serial console served on a Unix socket. Built with [`ConsoleMux::new`], given to the
/// UART as [`ConsoleMux::writer`], then started with the UART's input
/// ([`ConsoleMux::start`]); dropping it flushes what the guest wrote, closes the clients and
/// removes the socket.
pub struct ConsoleMux {
    shared: Arc<Shared>,
    path: PathBuf,
    /// (device, inode) of the socket file bound, so that only that one is removed.
    bound: (u64, u64),
    /// The listener and the log until [`ConsoleMux::start`].
    parts: Option<(UnixListener, Option<RotatingLog>)>,
    thread: Option<JoinHandle<()>>,
}

impl ConsoleMux {
    /// Binds the socket `path` (mode 0600; a stale socket file nobody listens on is replaced)
    /// and opens `log` for appending.
    ///
    /// Errors: [`MuxError::NotASocket`] or [`MuxError::InUse`] for `path`;
    /// [`MuxError::Io`] when the socket cannot be bound or the log opened (nothing is left
    /// behind).
    pub fn new(path: &Path, log: Option<&Path>) -> Result<ConsoleMux, MuxError> {
        let wake = EventFd::new(EFD_NONBLOCK).map_err(|source| MuxError::Io { path: path.into(), source })?;
        let (listener, bound) = bind(path)?;
        let log = match log.map(|l| RotatingLog::open(l, LOG_ROTATE).map_err(|source| (l, source))).transpose() {
            Ok(l) => l,
            Err((l, source)) => {
                let _ = std::fs::remove_file(path);
                return Err(MuxError::Io { path: l.to_path_buf(), source });
            }
        };
        Ok(ConsoleMux {
            shared: Arc::new(Shared { state: Mutex::default(), wake, client_bytes: AtomicUsize::new(0) }),
            path: path.to_path_buf(),
            bound,
            parts: Some((listener, log)),
            thread: None,
        })
    }

    /// The sink for the UART's output.
    pub fn writer(&self) -> MuxWriter {
        MuxWriter(self.shared.clone())
    }

    /// The socket's path.
    pub fn socket(&self) -> &Path {
        &self.path
    }

    /// Output bytes buffered for the attached clients (at most [`MAX_CLIENTS`] ×
    /// [`CLIENT_BUFFER`]), as of the thread's last round.
    pub fn client_bytes(&self) -> usize {
        self.shared.client_bytes.load(Ordering::Relaxed)
    }

    /// Starts the thread that serves the clients, typing into `input` (idempotent).
    ///
    /// Errors: the thread cannot be created.
    pub fn start(&mut self, input: InputSink) -> io::Result<()> {
        let Some((listener, log)) = self.parts.take() else { return Ok(()) };
        let mux = Mux {
            shared: self.shared.clone(),
            listener,
            log,
            ring: VecDeque::new(),
            clients: Vec::new(),
            input: VecDeque::new(),
            sink: input,
        };
        self.thread = Some(std::thread::Builder::new().name("serial-console".into()).spawn(move || {
            seccomp::apply(seccomp::Role::SerialConsole);
            mux.run()
        })?);
        Ok(())
    }
}

impl Drop for ConsoleMux {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        let _ = self.shared.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        } else if let Some((_, Some(mut log))) = self.parts.take() {
            // Never started: what the guest wrote still goes to the log.
            log.write(&std::mem::take(&mut self.shared.lock().bytes));
        }
        if let Ok(md) = std::fs::symlink_metadata(&self.path) {
            if (md.dev(), md.ino()) == self.bound {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Dir {
            let p = std::env::temp_dir().join(format!("rv-mux-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A mux whose input goes to a shared vector, like a UART FIFO of `fifo` bytes: it takes
    /// at most that many, then nothing until the next offer.
    fn mux(dir: &Dir, fifo: usize) -> (ConsoleMux, MuxWriter, Arc<Mutex<Vec<u8>>>) {
        let mut m = ConsoleMux::new(&dir.0.join("c.sock"), Some(&dir.0.join("c.log"))).unwrap();
        let typed = Arc::new(Mutex::new(Vec::new()));
        let t = typed.clone();
        let mut full = false;
        m.start(Box::new(move |b: &[u8]| {
            full = !full;
            if !full {
                return 0;
            }
            let n = b.len().min(fifo);
            t.lock().unwrap().extend_from_slice(&b[..n]);
            n
        }))
        .unwrap();
        let w = m.writer();
        (m, w, typed)
    }

    fn connect(m: &ConsoleMux) -> UnixStream {
        let s = UnixStream::connect(m.socket()).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        s
    }

    /// Reads from `s` into `got` until what arrived contains `needle` (30 s at most: a hang
    /// guard, generous because the whole suite shares two cores with booting guests).
    fn read_until(s: &mut UnixStream, got: &mut Vec<u8>, needle: &str) {
        let end = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 16384];
        let mut from = 0;
        loop {
            if got.get(from..).is_some_and(|t| t.windows(needle.len()).any(|w| w == needle.as_bytes())) {
                return;
            }
            from = got.len().saturating_sub(needle.len());
            if Instant::now() >= end {
                // The head and the tail of what arrived (a stuck client's stream is ~300 KB).
                let head = String::from_utf8_lossy(got.get(..256).unwrap_or(got));
                let tail = String::from_utf8_lossy(got.get(got.len().saturating_sub(256)..).unwrap_or_default());
                panic!("no {needle:?} in {} bytes: {head:?} ... {tail:?}", got.len());
            }
            match s.read(&mut buf) {
                Ok(0) => panic!("closed before {needle:?}: {:?}", String::from_utf8_lossy(got)),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
    }

    fn wait(what: &str, mut f: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn output_fans_out_and_one_client_types() {
        let dir = Dir::new("fan");
        let (m, mut w, typed) = mux(&dir, 64);
        w.write_all(b"boot banner\r\n$ ").unwrap();
        let mut a = connect(&m);
        let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
        read_until(&mut a, &mut got_a, "$ ");
        assert!(String::from_utf8_lossy(&got_a).starts_with("boot banner"), "replay on attach");
        let mut b = connect(&m);
        read_until(&mut b, &mut got_b, "$ ");
        assert_eq!(std::fs::metadata(m.socket()).unwrap().permissions().mode() & 0o777, 0o600);

        // a attached first: it types; b is told once that it is read-only.
        a.write_all(b"echo hi\r").unwrap();
        wait("a's input", || typed.lock().unwrap().as_slice() == b"echo hi\r");
        b.write_all(b"rm -rf /\r").unwrap();
        b.write_all(b"again").unwrap();
        read_until(&mut b, &mut got_b, "read-only");
        w.write_all(b"hi\r\n").unwrap();
        read_until(&mut a, &mut got_a, "hi\r\n");
        read_until(&mut b, &mut got_b, "hi\r\n");
        assert_eq!(typed.lock().unwrap().as_slice(), b"echo hi\r", "b's input is discarded");
        assert_eq!(String::from_utf8_lossy(&got_b).matches("read-only").count(), 1, "told once");
        assert!(!String::from_utf8_lossy(&got_a).contains("read-only"));

        // a leaves: b has the keyboard.
        drop(a);
        read_until(&mut b, &mut got_b, "has the keyboard now");
        b.write_all(b"ls\r").unwrap();
        wait("b's input", || typed.lock().unwrap().ends_with(b"ls\r"));

        // The log has everything, in order; dropping the mux closes b and removes the socket.
        w.write_all(b"bye\r\n").unwrap();
        let sock = m.socket().to_path_buf();
        drop(m);
        let mut rest = Vec::new();
        b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        b.read_to_end(&mut rest).unwrap();
        assert!(String::from_utf8_lossy(&rest).ends_with("bye\r\n"), "flushed before closing: {rest:?}");
        assert!(!sock.exists(), "the socket is removed");
        let log = std::fs::read_to_string(dir.0.join("c.log")).unwrap();
        assert_eq!(log, "boot banner\r\n$ hi\r\nbye\r\n");
    }

    #[test]
    fn input_waits_for_the_uart() {
        let dir = Dir::new("input");
        // More than the mux holds: the rest waits in the typist's socket.
        let (m, _w, typed) = mux(&dir, 64);
        let mut a = connect(&m);
        let text: Vec<u8> = (0..3 * INPUT_MAX).map(|i| b'a' + (i % 26) as u8).collect();
        a.write_all(&text).unwrap();
        wait("all input", || typed.lock().unwrap().len() == text.len());
        assert!(*typed.lock().unwrap() == text, "in order, nothing lost");
    }

    #[test]
    fn a_client_that_never_reads_holds_up_nothing() {
        let dir = Dir::new("slow");
        let (m, mut w, _typed) = mux(&dir, 64);
        let mut stuck = connect(&m); // does not read until the end
        let mut live = connect(&m);
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            read_until(&mut live, &mut got, "END");
            got.len()
        });
        // 8 MiB of output: far more than the stuck client's socket and buffer hold.
        let t = Instant::now();
        let chunk = vec![b'.'; 4096];
        for _ in 0..2048 {
            w.write_all(&chunk).unwrap();
            assert!(m.client_bytes() <= 2 * CLIENT_BUFFER, "{} bytes buffered", m.client_bytes());
            std::thread::yield_now();
        }
        assert!(t.elapsed() < Duration::from_secs(5), "the guest side was held up: {:?}", t.elapsed());
        // The writer outran the thread, so some output was dropped (maybe a first "END"):
        // say it until the live client has seen it.
        while !reader.is_finished() {
            w.write_all(b"END").unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        let live_got = reader.join().unwrap();
        assert!(live_got > 4096, "the live client got the output ({live_got} bytes)");
        assert!(m.client_bytes() <= 2 * CLIENT_BUFFER, "{} bytes buffered", m.client_bytes());
        // New clients are still served; the stuck one finds out what it missed.
        let mut late = connect(&m);
        w.write_all(b"LATE").unwrap();
        read_until(&mut late, &mut Vec::new(), "LATE");
        // (Dropped for it, or already before the thread: either way the stream says so.)
        read_until(&mut stuck, &mut Vec::new(), "output dropped");
        read_until(&mut stuck, &mut Vec::new(), "LATE");
    }

    #[test]
    fn a_slow_client_loses_its_oldest_bytes_and_is_told() {
        let mut c = Client {
            stream: UnixStream::pair().unwrap().0,
            out: VecDeque::new(),
            notice: 0,
            dropped: 0,
            told_read_only: false,
        };
        for _ in 0..10 {
            c.push(&vec![b'a'; CLIENT_BUFFER / 4]);
        }
        c.push(b"newest");
        assert!(c.out.len() <= CLIENT_BUFFER);
        let text: Vec<u8> = c.out.iter().copied().collect();
        let text = String::from_utf8_lossy(&text);
        // Dropped down to the buffer less the notice's room; "newest" then still fit.
        let want = 10 * CLIENT_BUFFER / 4 - (CLIENT_BUFFER - NOTICE_ROOM);
        assert!(text.starts_with(&format!("\r\n[rustvisor: {want} bytes of output dropped")), "{}", &text[..80]);
        assert!(text.ends_with("newest"));
        assert_eq!(text.matches("dropped").count(), 1, "one notice counts every dropped byte");
    }

    #[test]
    fn the_seventeenth_client_is_refused() {
        let dir = Dir::new("limit");
        let (m, mut w, _typed) = mux(&dir, 64);
        let mut clients: Vec<UnixStream> = (0..MAX_CLIENTS).map(|_| connect(&m)).collect();
        w.write_all(b"ready").unwrap();
        for c in &mut clients {
            read_until(c, &mut Vec::new(), "ready");
        }
        let mut extra = connect(&m);
        extra.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = String::new();
        extra.read_to_string(&mut got).unwrap();
        assert_eq!(got, BUSY_NOTICE);
        // One leaves: there is room again.
        clients.pop();
        let mut again = Vec::new();
        wait("a free place", || {
            let mut c = connect(&m);
            let mut buf = [0u8; 128];
            match c.read(&mut buf) {
                Ok(n) if n > 0 && !buf[..n].starts_with(b"[rustvisor: console busy") => {
                    again.push(c);
                    true
                }
                _ => false,
            }
        });
    }

    #[test]
    fn the_log_rotates_and_stale_sockets_are_replaced() {
        let dir = Dir::new("rotate");
        let path = dir.0.join("c.log");
        let mut log = RotatingLog::open(&path, 1000).unwrap();
        for i in 0..25u8 {
            log.write(&[b'a' + i; 100]);
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 500, "rotated at 1000 bytes");
        let old = std::fs::read(dir.0.join("c.log.1")).unwrap();
        assert_eq!(old.len(), 1000);
        assert_eq!(old[0], b'a' + 10, "the previous generation");
        let mut again = RotatingLog::open(&path, 1000).unwrap();
        assert_eq!(again.size, 500, "a reopened log counts what it has");
        again.write(&[b'z'; 600]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 600);
        assert_eq!(LOG_ROTATE, 4 << 20);

        // A stale socket is replaced; a live one or a plain file is not.
        let sock = dir.0.join("s.sock");
        drop(UnixListener::bind(&sock).unwrap());
        let m = ConsoleMux::new(&sock, None).unwrap();
        assert!(matches!(ConsoleMux::new(&sock, None), Err(MuxError::InUse(_))));
        drop(m);
        assert!(!sock.exists());
        std::fs::write(&sock, b"x").unwrap();
        assert!(matches!(ConsoleMux::new(&sock, None), Err(MuxError::NotASocket(_))));
        assert_eq!(std::fs::read(&sock).unwrap(), b"x");
        let e = ConsoleMux::new(&dir.0.join("t.sock"), Some(&dir.0.join("no/such/c.log"))).err().unwrap();
        assert!(matches!(e, MuxError::Io { .. }), "{e}");
        assert!(!dir.0.join("t.sock").exists(), "nothing left behind");
    }
}

//! The vsock worker: demultiplexes guest packets to per-connection state, relays bytes to and
//! from the Unix sockets and picks the next packet for each rx buffer the guest offers.
//!
//! Connections are keyed by `(host port, guest port)` (the guest CID is fixed and the host is
//! CID 2). Stateless replies (`OP_RST`) wait in `ctrl`; connections with something to send wait
//! in `rx_ready`, served round-robin. When `ctrl` is full the tx queue is left alone until the
//! guest drains rx, so a guest that floods tx without offering rx buffers cannot grow host
//! memory.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::packet::*;
use super::{connect_nonblocking, CONN_BUF, MAX_CONNS, MAX_PKT_PAYLOAD};
use crate::device::{ActivateContext, Counters, DmaLog, GuestMem, Interrupt};
use crate::queue::{self, Chain, ChainError, Direction};
use crate::worker::{EpollCtl, Handler, FIRST_DEVICE_TOKEN};

const RXQ: u16 = 0;
const TXQ: u16 = 1;

const LISTENER_TOKEN: u64 = FIRST_DEVICE_TOKEN;
const TIMER_TOKEN: u64 = FIRST_DEVICE_TOKEN + 1;
const FIRST_CONN_TOKEN: u64 = FIRST_DEVICE_TOKEN + 2;

/// Host → guest bytes buffered per connection (read from the Unix socket, not yet sent).
const RX_BUF_MAX: usize = 64 << 10;
/// Stateless replies queued before the tx queue is paused.
const MAX_CTRL: usize = 64;
/// Bytes forwarded to the Unix socket since the last advertised `fwd_cnt` that trigger an
/// `OP_CREDIT_UPDATE`.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF / 4;
/// How long a host program has to send `CONNECT <port>\n`, and the guest to answer a request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the guest has to answer our `OP_SHUTDOWN` (both directions) with `OP_RST`, or the
/// Unix peer to take the last guest bytes after the guest closed, before a forced `OP_RST`.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Timer period while deadlines are pending.
const TICK: Duration = Duration::from_millis(250);
/// Longest `CONNECT <port>\n` line accepted, in bytes.
const MAX_CONNECT_LINE: usize = 32;
/// First ephemeral host port.
const FIRST_EPHEMERAL_PORT: u32 = 1024;
/// Connections accepted per listener event.
const ACCEPT_BATCH: usize = 64;

/// `(host port, guest port)`.
type Key = (u32, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated: `OP_REQUEST` queued or sent, waiting for the guest's `OP_RESPONSE`.
    Connecting,
    /// Relaying data.
    Established,
    /// Closing: waiting for the guest's `OP_RST` or for the last bytes to reach the Unix peer.
    Closing,
}

/// A host connection that has not sent its `CONNECT <port>\n` line yet.
struct PendingUds {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// One stream connection.
struct Conn {
    key: Key,
    stream: UnixStream,
    token: u64,
    state: State,
    deadline: Option<Instant>,
    /// Events registered on the worker's epoll set (`None`: not registered).
    interest: Option<EventSet>,
    in_rx_ready: bool,
    send_request: bool,
    send_response: bool,
    send_credit_update: bool,
    /// An `OP_CREDIT_REQUEST` went out and the guest has not opened credit since.
    credit_requested: bool,
    /// `OP_SHUTDOWN` flags sent to the guest.
    shutdown_sent: u32,
    /// `OP_SHUTDOWN` flags received from the guest.
    peer_shut: u32,
    /// The Unix peer hung up (closed both directions).
    hup: bool,
    /// Our write side of the Unix socket is shut down.
    wr_shut: bool,
    // Guest → host.
    tx_buf: VecDeque<u8>,
    /// Bytes at the front of `tx_buf` the device wrote itself (`OK <port>\n`), not guest data.
    tx_prefix: usize,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    // Host → guest.
    rx_buf: VecDeque<u8>,
    local_eof: bool,
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
}

impl Conn {
    fn new(key: Key, stream: UnixStream, token: u64, state: State) -> Conn {
        Conn {
            key,
            stream,
            token,
            state,
            deadline: None,
            interest: None,
            in_rx_ready: false,
            send_request: false,
            send_response: false,
            send_credit_update: false,
            credit_requested: false,
            shutdown_sent: 0,
            peer_shut: 0,
            hup: false,
            wr_shut: false,
            tx_buf: VecDeque::new(),
            tx_prefix: 0,
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            rx_buf: VecDeque::new(),
            local_eof: false,
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
        }
    }

    /// Bytes the guest can still take (§5.10.6.3): `buf_alloc - (rx_cnt - fwd_cnt)`.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub((self.rx_cnt - self.peer_fwd_cnt).0)
    }

    /// Guest bytes held in `tx_buf` (the device's own prefix excluded).
    fn tx_data(&self) -> usize {
        self.tx_buf.len() - self.tx_prefix
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && self.peer_shut & SHUTDOWN_RCV == 0
            && self.shutdown_sent & SHUTDOWN_SEND == 0
    }

    fn wants_read(&self) -> bool {
        self.can_send_data() && !self.local_eof && self.rx_buf.len() < RX_BUF_MAX
    }

    /// The `OP_SHUTDOWN` flags to send now (0: none): after Unix EOF, once buffered bytes are out.
    fn pending_shutdown(&self) -> u32 {
        if self.state != State::Established || self.shutdown_sent != 0 || !self.local_eof || !self.rx_buf.is_empty() {
            return 0;
        }
        if self.hup {
            SHUTDOWN_BOTH
        } else {
            SHUTDOWN_SEND
        }
    }

    fn has_rx_work(&self) -> bool {
        self.send_request
            || self.send_response
            || (self.can_send_data() && !self.rx_buf.is_empty() && (self.peer_credit() > 0 || !self.credit_requested))
            || self.pending_shutdown() != 0
            || self.send_credit_update
    }

    fn header(&self, guest_cid: u64, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.key.0,
            dst_port: self.key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next packet for the guest, with at most `cap` payload bytes.
    fn next_rx(&mut self, cap: usize, guest_cid: u64) -> Option<(Header, Vec<u8>)> {
        let mut data = Vec::new();
        let mut h = if self.send_request {
            self.send_request = false;
            self.header(guest_cid, OP_REQUEST)
        } else if self.send_response {
            self.send_response = false;
            self.header(guest_cid, OP_RESPONSE)
        } else if self.can_send_data() && !self.rx_buf.is_empty() && self.peer_credit() > 0 && cap > 0 {
            let n = self.rx_buf.len().min(self.peer_credit() as usize).min(cap).min(MAX_PKT_PAYLOAD as usize);
            data.extend(self.rx_buf.drain(..n));
            // n ≤ MAX_PKT_PAYLOAD.
            self.rx_cnt += u32::try_from(n).unwrap_or(MAX_PKT_PAYLOAD);
            self.header(guest_cid, OP_RW)
        } else if self.can_send_data() && !self.rx_buf.is_empty() && self.peer_credit() == 0 && !self.credit_requested {
            self.credit_requested = true;
            self.header(guest_cid, OP_CREDIT_REQUEST)
        } else if self.pending_shutdown() != 0 {
            let flags = self.pending_shutdown();
            self.shutdown_sent = flags;
            if flags == SHUTDOWN_BOTH {
                self.state = State::Closing;
                self.deadline = Some(Instant::now() + CLOSE_TIMEOUT);
            }
            let mut h = self.header(guest_cid, OP_SHUTDOWN);
            h.flags = flags;
            h
        } else if self.send_credit_update {
            self.header(guest_cid, OP_CREDIT_UPDATE)
        } else {
            return None;
        };
        // At most MAX_PKT_PAYLOAD (only OP_RW carries data).
        h.len = u32::try_from(data.len()).unwrap_or(MAX_PKT_PAYLOAD);
        // Every packet carries our credit.
        self.send_credit_update = false;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Some((h, data))
    }

    /// Writes buffered guest bytes to the Unix socket until it would block.
    /// Errors: the Unix peer is gone or the socket failed.
    fn flush(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            let n = match send_nosignal(&self.stream, front) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.tx_buf.drain(..n);
            let own = n.min(self.tx_prefix);
            self.tx_prefix -= own;
            // n ≤ the buffered bytes, which the guest's credit keeps below 2^32.
            self.fwd_cnt += u32::try_from(n - own).unwrap_or(u32::MAX);
        }
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.send_credit_update = true;
        }
        Ok(())
    }

    /// Reads from the Unix socket into `rx_buf` until it would block, is full or hits EOF.
    /// Errors: the socket failed.
    fn fill_rx(&mut self) -> io::Result<()> {
        let mut tmp = [0u8; 16 << 10];
        while self.wants_read() {
            let n = (RX_BUF_MAX - self.rx_buf.len()).min(tmp.len());
            let Some(buf) = tmp.get_mut(..n) else { break };
            match self.stream.read(buf) {
                Ok(0) => {
                    self.local_eof = true;
                    // EOF alone may be a half-close; a hang-up means the peer is gone.
                    self.hup |= peer_hung_up(&self.stream);
                }
                // `read` returns at most `buf.len()`.
                Ok(k) => self.rx_buf.extend(buf.get(..k).unwrap_or_default()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Brings the epoll registration in line with what the connection waits for. Nothing is
    /// registered while it waits for nothing, so a hung-up socket cannot spin the worker.
    fn update_interest(&mut self, ctl: &EpollCtl) -> io::Result<()> {
        let mut want = EventSet::empty();
        if self.wants_read() {
            want |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            want |= EventSet::OUT;
        }
        let fd = self.stream.as_raw_fd();
        match self.interest {
            Some(_) if want.is_empty() => {
                self.interest = None;
                ctl.remove(fd)
            }
            Some(cur) if cur.bits() == want.bits() => Ok(()),
            Some(_) => {
                ctl.modify(fd, want, self.token)?;
                self.interest = Some(want);
                Ok(())
            }
            None if want.is_empty() => Ok(()),
            None => {
                ctl.add(fd, want, self.token)?;
                self.interest = Some(want);
                Ok(())
            }
        }
    }
}

/// `send(2)` with `MSG_NOSIGNAL | MSG_DONTWAIT`: a closed peer is `EPIPE`, never `SIGPIPE`.
fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the pointer and length describe the readable slice `buf`; the fd is owned by
    // `stream` and open for the duration of the call.
    let n = unsafe {
        libc::send(stream.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Whether the socket reports `POLLHUP` (for a Unix stream: the peer closed both directions).
fn peer_hung_up(stream: &UnixStream) -> bool {
    let mut p = libc::pollfd { fd: stream.as_raw_fd(), events: 0, revents: 0 };
    // SAFETY: `p` is one valid pollfd for an fd `stream` keeps open; the timeout is 0.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & libc::POLLHUP != 0
}

/// Parses `CONNECT <port>` (the newline already removed; a trailing `\r` is tolerated).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    std::str::from_utf8(line).ok()?.strip_prefix("CONNECT ")?.trim().parse().ok()
}

/// Connection state of the device (everything but the queues).
pub(super) struct Muxer {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    timer: TimerFd,
    timer_armed: bool,
    conns: HashMap<Key, Conn>,
    tokens: HashMap<u64, Key>,
    pending: HashMap<u64, PendingUds>,
    next_token: u64,
    next_port: u32,
    /// Stateless replies (`OP_RST`) waiting for rx buffers.
    ctrl: VecDeque<Header>,
    /// Connections with something to send, round-robin.
    rx_ready: VecDeque<Key>,
    counters: Arc<Counters>,
}

impl Muxer {
    fn rst_for(&self, key: Key) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        }
    }

    /// Queues an `OP_RST` answering guest packet `h` (never one answering an `OP_RST`).
    fn reply_rst(&mut self, h: &Header) {
        if h.op != OP_RST {
            let rst = self.rst_for((h.dst_port, h.src_port));
            self.ctrl.push_back(rst);
        }
    }

    fn arm_timer(&mut self) {
        if !self.timer_armed {
            match self.timer.reset(TICK, Some(TICK)) {
                Ok(()) => self.timer_armed = true,
                Err(e) => tracing::warn!("vsock: arming timer: {e}"),
            }
        }
    }

    /// Drops connection `key`, closing its Unix socket; queues an `OP_RST` for the guest when `rst`.
    fn kill(&mut self, key: Key, rst: bool, ctl: &EpollCtl) {
        if let Some(conn) = self.conns.remove(&key) {
            if conn.interest.is_some() {
                let _ = ctl.remove(conn.stream.as_raw_fd());
            }
            self.tokens.remove(&conn.token);
            if rst {
                let h = self.rst_for(key);
                self.ctrl.push_back(h);
            }
        }
    }

    /// After anything happened to connection `key`: finishes a close once the Unix side took
    /// every byte, fixes the epoll registration and queues the connection for rx.
    fn settle(&mut self, key: Key, ctl: &EpollCtl) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        if conn.tx_buf.is_empty() {
            if conn.peer_shut & SHUTDOWN_SEND != 0 && !conn.wr_shut {
                let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                conn.wr_shut = true;
            }
            if conn.peer_shut == SHUTDOWN_BOTH {
                // The guest closed and the Unix peer has every byte: acknowledge with OP_RST.
                self.kill(key, true, ctl);
                return;
            }
        } else if conn.peer_shut == SHUTDOWN_BOTH && conn.deadline.is_none() {
            conn.state = State::Closing;
            conn.deadline = Some(Instant::now() + CLOSE_TIMEOUT);
        }
        if conn.peer_shut & SHUTDOWN_RCV != 0 {
            conn.rx_buf.clear();
        }
        let needs_timer = conn.deadline.is_some();
        if let Err(e) = conn.update_interest(ctl) {
            tracing::warn!("vsock: epoll registration: {e}");
            self.kill(key, true, ctl);
            return;
        }
        if conn.has_rx_work() && !conn.in_rx_ready {
            conn.in_rx_ready = true;
            self.rx_ready.push_back(key);
        }
        if needs_timer {
            self.arm_timer();
        }
    }

    /// Whether a packet waits for an rx buffer (drops idle connections from `rx_ready`).
    fn has_rx_work(&mut self) -> bool {
        if !self.ctrl.is_empty() {
            return true;
        }
        while let Some(&key) = self.rx_ready.front() {
            match self.conns.get_mut(&key) {
                Some(c) if c.has_rx_work() => return true,
                Some(c) => c.in_rx_ready = false,
                None => {}
            }
            self.rx_ready.pop_front();
        }
        false
    }

    /// The next packet for the guest, with at most `cap` payload bytes.
    fn next_rx_packet(&mut self, cap: usize, ctl: &EpollCtl) -> Option<(Header, Vec<u8>)> {
        if let Some(h) = self.ctrl.pop_front() {
            return Some((h, Vec::new()));
        }
        for _ in 0..self.rx_ready.len() {
            let Some(key) = self.rx_ready.pop_front() else { break };
            let Some(conn) = self.conns.get_mut(&key) else { continue };
            conn.in_rx_ready = false;
            let pkt = conn.next_rx(cap, self.cid);
            // Room in rx_buf may re-enable reading; a sent shutdown may start a deadline.
            self.settle(key, ctl);
            if pkt.is_some() {
                return pkt;
            }
        }
        None
    }

    /// Handles one validated packet from the guest.
    fn handle_packet(&mut self, h: Header, payload: Vec<u8>, ctl: &EpollCtl) {
        let key = (h.dst_port, h.src_port);
        if h.dst_cid != HOST_CID {
            // Only the host is reachable through this device.
            self.reply_rst(&h);
            return;
        }
        if h.type_ != TYPE_STREAM || !(OP_REQUEST..=OP_CREDIT_REQUEST).contains(&h.op) {
            Counters::add(&self.counters.errors, 1);
            self.kill(key, false, ctl);
            self.reply_rst(&h);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            match h.op {
                OP_REQUEST => self.connect_guest(&h, ctl),
                OP_RST => {}
                _ => self.reply_rst(&h),
            }
            return;
        };
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        if conn.peer_credit() > 0 {
            conn.credit_requested = false;
        }
        match h.op {
            OP_REQUEST => {
                // The guest reuses a live connection's ports: refuse, and forget the old one
                // (the guest no longer knows it).
                self.kill(key, false, ctl);
                self.reply_rst(&h);
                return;
            }
            OP_RESPONSE => {
                if conn.state != State::Connecting {
                    self.kill(key, true, ctl);
                    return;
                }
                conn.state = State::Established;
                conn.deadline = None;
                let ok = format!("OK {}\n", key.0);
                conn.tx_prefix += ok.len();
                for (i, b) in ok.bytes().enumerate() {
                    conn.tx_buf.insert(i, b);
                }
            }
            OP_RST => {
                self.kill(key, false, ctl);
                return;
            }
            OP_SHUTDOWN => conn.peer_shut |= h.flags & SHUTDOWN_BOTH,
            OP_RW => {
                if conn.state != State::Established || conn.peer_shut & SHUTDOWN_SEND != 0 {
                    self.kill(key, true, ctl);
                    return;
                }
                if conn.tx_data() + payload.len() > CONN_BUF as usize {
                    // The guest ignored our credit.
                    tracing::debug!("vsock: guest overran the receive buffer of port {}", key.0);
                    Counters::add(&self.counters.errors, 1);
                    self.kill(key, true, ctl);
                    return;
                }
                conn.tx_buf.extend(payload);
            }
            OP_CREDIT_REQUEST => conn.send_credit_update = true,
            _ => {} // OP_CREDIT_UPDATE: the credit was taken above.
        }
        if let Err(e) = conn.flush() {
            tracing::debug!("vsock: writing to the Unix socket of port {}: {e}", key.0);
            self.kill(key, true, ctl);
            return;
        }
        self.settle(key, ctl);
    }

    /// The guest connects to host port `h.dst_port`: connect to `<uds_path>_<port>`.
    fn connect_guest(&mut self, h: &Header, ctl: &EpollCtl) {
        if self.conns.len() + self.pending.len() >= MAX_CONNS {
            self.reply_rst(h);
            return;
        }
        let mut path: OsString = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", h.dst_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("vsock: guest connection to {}: {e}", Path::new(&path).display());
                self.reply_rst(h);
                return;
            }
        };
        let key = (h.dst_port, h.src_port);
        let token = self.next_token;
        self.next_token += 1;
        let mut conn = Conn::new(key, stream, token, State::Established);
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        conn.send_response = true;
        self.conns.insert(key, conn);
        self.tokens.insert(token, key);
        self.settle(key, ctl);
    }

    /// Accepts host connections on the device socket.
    fn accept(&mut self, ctl: &EpollCtl) {
        for _ in 0..ACCEPT_BATCH {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: accept: {e}");
                    return;
                }
            };
            if self.conns.len() + self.pending.len() >= MAX_CONNS {
                tracing::warn!("vsock: too many connections; refusing a host connection");
                continue;
            }
            let token = self.next_token;
            self.next_token += 1;
            if stream.set_nonblocking(true).is_err() || ctl.add(stream.as_raw_fd(), EventSet::IN, token).is_err() {
                continue;
            }
            let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
            self.pending.insert(token, PendingUds { stream, line: Vec::new(), deadline });
            self.arm_timer();
        }
    }

    /// Reads a host connection's `CONNECT <port>\n` line; once complete, asks the guest.
    fn read_connect_line(&mut self, token: u64, ctl: &EpollCtl) {
        let Some(p) = self.pending.get_mut(&token) else { return };
        let mut tmp = [0u8; 64];
        let drop_it = match p.stream.read(&mut tmp) {
            Ok(0) => true,
            Ok(n) => {
                p.line.extend_from_slice(tmp.get(..n).unwrap_or_default());
                match p.line.iter().position(|&b| b == b'\n') {
                    Some(nl) => {
                        let Some(p) = self.pending.remove(&token) else { return };
                        // `nl` is the position of a byte of the line.
                        let rest = p.line.get(nl + 1..).unwrap_or_default().to_vec();
                        match parse_connect(p.line.get(..nl).unwrap_or_default()) {
                            Some(port) => self.connect_host(token, p.stream, port, rest, ctl),
                            None => {
                                tracing::debug!("vsock: bad CONNECT line from a host program");
                                let _ = ctl.remove(p.stream.as_raw_fd());
                            }
                        }
                        return;
                    }
                    None => p.line.len() > MAX_CONNECT_LINE,
                }
            }
            Err(e) => !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted),
        };
        if drop_it {
            if let Some(p) = self.pending.remove(&token) {
                let _ = ctl.remove(p.stream.as_raw_fd());
            }
        }
    }

    /// A host program asked for guest port `port`: allocate a host port and send `OP_REQUEST`.
    fn connect_host(&mut self, token: u64, stream: UnixStream, port: u32, early: Vec<u8>, ctl: &EpollCtl) {
        let mut host_port = None;
        for _ in 0..=MAX_CONNS {
            let p = self.next_port;
            // u32::MAX is VMADDR_PORT_ANY: never hand it out.
            self.next_port = if p >= u32::MAX - 1 { FIRST_EPHEMERAL_PORT } else { p + 1 };
            if !self.conns.contains_key(&(p, port)) {
                host_port = Some(p);
                break;
            }
        }
        let Some(host_port) = host_port else {
            let _ = ctl.remove(stream.as_raw_fd());
            return;
        };
        let key = (host_port, port);
        let mut conn = Conn::new(key, stream, token, State::Connecting);
        // Still registered for IN from the pending stage.
        conn.interest = Some(EventSet::IN);
        conn.send_request = true;
        conn.deadline = Some(Instant::now() + HANDSHAKE_TIMEOUT);
        conn.rx_buf.extend(early);
        self.conns.insert(key, conn);
        self.tokens.insert(token, key);
        self.settle(key, ctl);
    }

    /// A connection's Unix socket is ready.
    fn conn_event(&mut self, token: u64, events: EventSet, ctl: &EpollCtl) {
        let Some(&key) = self.tokens.get(&token) else { return };
        let Some(conn) = self.conns.get_mut(&key) else { return };
        if events.contains(EventSet::ERROR) {
            self.kill(key, true, ctl);
            return;
        }
        if events.contains(EventSet::HANG_UP) {
            conn.hup = true;
        }
        let res = conn.flush().and_then(|()| conn.fill_rx());
        if let Err(e) = res {
            tracing::debug!("vsock: Unix socket of port {}: {e}", key.0);
            self.kill(key, true, ctl);
            return;
        }
        self.settle(key, ctl);
    }

    /// Timer tick: expire handshakes and closes that took too long.
    fn expire(&mut self, ctl: &EpollCtl) {
        let _ = self.timer.wait();
        let now = Instant::now();
        let late: Vec<u64> = self.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(&t, _)| t).collect();
        for t in late {
            if let Some(p) = self.pending.remove(&t) {
                let _ = ctl.remove(p.stream.as_raw_fd());
            }
        }
        let late: Vec<Key> =
            self.conns.iter().filter(|(_, c)| c.deadline.is_some_and(|d| d <= now)).map(|(&k, _)| k).collect();
        for k in late {
            tracing::debug!("vsock: connection {k:?} timed out");
            self.kill(k, true, ctl);
        }
        if self.pending.is_empty() && self.conns.values().all(|c| c.deadline.is_none()) {
            let _ = self.timer.clear();
            self.timer_armed = false;
        }
    }

    fn fd_event(&mut self, token: u64, events: EventSet, ctl: &EpollCtl) {
        match token {
            LISTENER_TOKEN => self.accept(ctl),
            TIMER_TOKEN => self.expire(ctl),
            t if self.pending.contains_key(&t) => self.read_connect_line(t, ctl),
            t => self.conn_event(t, events, ctl),
        }
    }
}

/// Reads and validates one tx packet (device-readable buffers only, inside guest memory);
/// returns `None` (counted by the caller) when it is malformed.
fn parse_tx(chain: Result<Chain, ChainError>, mem: &GuestMem, cid: u64) -> Option<(Header, Vec<u8>)> {
    let (chain, total) = match chain.and_then(|c| c.validate(mem, Direction::Readable).map(|t| (c, t))) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!("vsock: tx chain: {e}");
            return None;
        }
    };
    let mut reader = chain.reader(mem);
    let mut hb = [0u8; HDR_LEN];
    if let Err(e) = reader.read_exact(&mut hb) {
        tracing::debug!("vsock: tx packet header: {e}");
        return None;
    }
    let h = Header::from_bytes(&hb);
    if h.len > MAX_PKT_PAYLOAD || u64::from(h.len) > total - HDR_LEN as u64 {
        tracing::debug!("vsock: tx packet len {} exceeds its buffers", h.len);
        return None;
    }
    if h.src_cid != cid {
        tracing::debug!("vsock: tx packet from CID {} (guest is {cid})", h.src_cid);
        return None;
    }
    if h.op != OP_RW && h.len != 0 {
        tracing::debug!("vsock: tx packet op {} with payload", h.op);
        return None;
    }
    // At most MAX_PKT_PAYLOAD, checked above.
    let mut payload = vec![0u8; h.len as usize];
    if let Err(e) = reader.read_exact(&mut payload) {
        tracing::debug!("vsock: tx packet payload: {e}");
        return None;
    }
    Some((h, payload))
}

/// The device's state on its worker thread.
pub(super) struct VsockWorker {
    mem: GuestMem,
    rxq: Queue,
    txq: Queue,
    interrupt: Arc<dyn Interrupt>,
    dma: Arc<DmaLog>,
    counters: Arc<Counters>,
    /// The tx queue was left alone because `ctrl` is full.
    tx_blocked: bool,
    mux: Muxer,
    /// The event queue (virtio 1.2 §5.10.6.7).
    evq: Option<Queue>,
    /// A transport reset event is owed to the driver (after a snapshot or restore).
    reset_pending: bool,
}

impl VsockWorker {
    /// The worker state and the queues' kick eventfds, from the activation context.
    ///
    /// Errors: the timer could not be created.
    pub(super) fn new(
        ctx: ActivateContext,
        cid: u64,
        uds_path: PathBuf,
        listener: UnixListener,
        counters: Arc<Counters>,
    ) -> io::Result<(Vec<EventFd>, VsockWorker)> {
        let timer = TimerFd::new()?;
        // SAFETY: fcntl on a descriptor `timer` owns; only O_NONBLOCK is added, so a spurious
        // wake-up never blocks the worker in read(2).
        let r = unsafe {
            let fd = timer.as_raw_fd();
            let fl = libc::fcntl(fd, libc::F_GETFL);
            if fl < 0 {
                fl
            } else {
                libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK)
            }
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut queues = ctx.queues.into_iter();
        let resumed = ctx.resumed;
        let (Some(rxq), Some(txq)) = (queues.next(), queues.next()) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "missing queues"));
        };
        let mux = Muxer {
            cid,
            uds_path,
            listener,
            timer,
            timer_armed: false,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            pending: HashMap::new(),
            next_token: FIRST_CONN_TOKEN,
            next_port: FIRST_EPHEMERAL_PORT,
            ctrl: VecDeque::new(),
            rx_ready: VecDeque::new(),
            counters: counters.clone(),
        };
        let w = VsockWorker {
            mem: ctx.mem,
            rxq,
            txq,
            interrupt: ctx.interrupt,
            dma: ctx.dma,
            counters,
            tx_blocked: false,
            mux,
            evq: queues.next(),
            reset_pending: resumed,
        };
        Ok((ctx.queue_evts, w))
    }

    fn process_tx(&mut self, ctl: &EpollCtl) {
        let (mem, counters, cid) = (&self.mem, &self.counters, self.mux.cid);
        let notify = queue::fill(
            &mut self.txq,
            mem,
            &mut self.mux,
            |m| m.ctrl.len() < MAX_CTRL,
            |m, _, chain| {
                match parse_tx(chain, mem, cid) {
                    Some((h, payload)) => {
                        Counters::add(&counters.requests, 1);
                        Counters::add(&counters.bytes_read, payload.len() as u64);
                        m.handle_packet(h, payload, ctl);
                    }
                    None => Counters::add(&counters.errors, 1),
                }
                0
            },
        );
        if notify {
            self.interrupt.notify_queue(TXQ);
        }
        self.tx_blocked = self.mux.ctrl.len() >= MAX_CTRL;
    }

    fn process_rx(&mut self, ctl: &EpollCtl) {
        loop {
            let (mem, dma, counters) = (&self.mem, &self.dma, &self.counters);
            let notify = queue::fill(
                &mut self.rxq,
                mem,
                &mut self.mux,
                |m| m.has_rx_work(),
                |m, _, chain| serve_rx(m, chain, mem, dma, counters, ctl),
            );
            if notify {
                self.interrupt.notify_queue(RXQ);
            }
            if self.tx_blocked && self.mux.ctrl.len() < MAX_CTRL {
                self.process_tx(ctl);
                continue;
            }
            break;
        }
    }
}

/// Fills one rx chain (device-writable buffers only, inside guest memory, room for a header)
/// with the next packet; returns the bytes written (0, counted, when the chain is unusable).
fn serve_rx(
    m: &mut Muxer,
    chain: Result<Chain, ChainError>,
    mem: &GuestMem,
    dma: &DmaLog,
    counters: &Counters,
    ctl: &EpollCtl,
) -> u32 {
    let checked = chain.and_then(|c| match c.validate(mem, Direction::Writable)? {
        t if t < HDR_LEN as u64 => Err(ChainError::TooSmall { len: t, min: HDR_LEN as u64 }),
        t => Ok((c, t)),
    });
    let (chain, total) = match checked {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!("vsock: rx chain: {e}");
            Counters::add(&counters.errors, 1);
            return 0;
        }
    };
    let max = MAX_PKT_PAYLOAD as usize;
    let cap = usize::try_from(total - HDR_LEN as u64).map_or(max, |c| c.min(max));
    let Some((h, data)) = m.next_rx_packet(cap, ctl) else {
        // Only data was pending and the buffer had no room for any.
        Counters::add(&counters.errors, 1);
        return 0;
    };
    let mut w = chain.writer(mem, dma);
    if let Err(e) = w.write_all(&h.to_bytes()).and_then(|()| w.write_all(&data)) {
        tracing::debug!("vsock: rx packet: {e}");
        Counters::add(&counters.errors, 1);
        return 0;
    }
    Counters::add(&counters.requests, 1);
    Counters::add(&counters.bytes_written, data.len() as u64);
    // At most HDR_LEN + MAX_PKT_PAYLOAD.
    u32::try_from(HDR_LEN + data.len()).unwrap_or(u32::MAX)
}

impl VsockWorker {
    /// Sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (id 0, §5.10.6.7) in the first event buffer,
    /// if one is owed and the driver has posted a buffer: the guest then drops connections
    /// whose host side is gone (they were closed when the device was quiesced).
    fn send_transport_reset(&mut self) {
        use virtio_queue::QueueT;
        if !self.reset_pending {
            return;
        }
        let Some(q) = self.evq.as_mut() else { return };
        if !q.ready() {
            self.reset_pending = false;
            return;
        }
        let (head, chain) = match queue::pop(q, &self.mem) {
            Ok(Some(popped)) => popped,
            Ok(None) => return,
            Err(e) => {
                devices::guest_warn!("vsock: corrupt event avail ring: {e}");
                return;
            }
        };
        let mut len = 0u32;
        match chain {
            Ok(c) => {
                let mut w = c.writer(&self.mem, &self.dma);
                match w.write_all(&0u32.to_le_bytes()) {
                    Ok(()) => len = 4,
                    Err(e) => tracing::debug!("vsock: event buffer: {e}"),
                }
            }
            Err(e) => tracing::debug!("vsock: event chain: {e}"),
        }
        if len == 0 {
            Counters::add(&self.counters.errors, 1);
        }
        if q.add_used(&self.mem, head, len).is_ok() {
            self.reset_pending = false;
            if q.needs_notification(&self.mem).unwrap_or(true) {
                self.interrupt.notify_queue(2);
            }
        }
    }
}

impl Handler for VsockWorker {
    fn init(&mut self, ctl: &EpollCtl) -> io::Result<()> {
        ctl.add(self.mux.listener.as_raw_fd(), EventSet::IN, LISTENER_TOKEN)?;
        ctl.add(self.mux.timer.as_raw_fd(), EventSet::IN, TIMER_TOKEN)?;
        self.send_transport_reset();
        Ok(())
    }

    fn queue_event(&mut self, queue: usize, ctl: &EpollCtl) {
        match u16::try_from(queue) {
            Ok(RXQ) => {}
            Ok(TXQ) => self.process_tx(ctl),
            // The event queue: buffers for the transport reset owed after a snapshot.
            _ => {
                self.send_transport_reset();
                return;
            }
        }
        self.process_rx(ctl);
    }

    fn fd_event(&mut self, token: u64, events: EventSet, ctl: &EpollCtl) {
        self.mux.fd_event(token, events, ctl);
        self.process_rx(ctl);
    }
}

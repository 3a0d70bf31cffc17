//! Device-level tests: the device runs on its real worker thread; the test plays the guest
//! driver through rings in guest memory and the host programs through real Unix sockets.

// Test fixtures: byte patterns wrap on purpose; sizes and indices are small constants.
#![allow(clippy::cast_possible_truncation)]

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::packet::*;
use super::*;
use crate::device::{ActivateContext, DmaLog, Interrupt};
use crate::testing::{TestQueue, DATA, F_INDIRECT, F_NEXT, F_WRITE};

const GUEST_CID: u64 = 3;
const TIMEOUT: Duration = Duration::from_secs(5);
const MEM_SIZE: usize = 4 << 20;
/// Rx buffers posted at start, one descriptor each.
const NRX: u16 = 8;
const RX_BUF: u32 = 4096;
/// Tx packets are built here: header at `TX_HDR`, payload at `TX_DATA`.
const TX_HDR: u64 = 0x100000;
const TX_DATA: u64 = 0x101000;
/// Free area for hostile buffers.
const SCRATCH: u64 = 0x200000;

/// A named hostile rx chain: how to write it into the queue.
type Case = (&'static str, Box<dyn Fn(&TestQueue)>);

fn rx_addr(slot: u16) -> u64 {
    DATA + u64::from(slot) * 0x2000
}

/// Waits until `f` holds; panics after [`TIMEOUT`].
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + TIMEOUT;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A directory under /tmp (short, for `sun_path`), removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = PathBuf::from(format!("/tmp/rvv-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Default)]
struct Irq {
    counts: [AtomicU64; 3],
}

impl Interrupt for Irq {
    fn notify_queue(&self, queue: u16) {
        if let Some(c) = self.counts.get(queue as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn notify_config(&self) {}
}

/// The guest driver side of one activated device.
struct Harness {
    dir: TempDir,
    path: PathBuf,
    dev: Vsock,
    rxq: TestQueue,
    txq: TestQueue,
    kicks: Vec<EventFd>,
    irq: Arc<Irq>,
    dma: Arc<DmaLog>,
    rx_seen: u16,
    /// Tx chains the device could not return (head index out of range).
    tx_lost: u16,
}

impl Harness {
    fn new() -> Harness {
        Self::build(true, false)
    }

    fn with_rx(post_rx: bool) -> Harness {
        Self::build(post_rx, false)
    }

    /// `post_rx`: offer [`NRX`] rx buffers; `event_idx`: the driver negotiated
    /// `VIRTIO_RING_F_EVENT_IDX`.
    fn build(post_rx: bool, event_idx: bool) -> Harness {
        let dir = TempDir::new();
        let path = dir.0.join("v.sock");
        let mut dev = Vsock::new(GUEST_CID, path.clone()).unwrap();
        let mut rxq = TestQueue::new(QUEUE_SIZE, MEM_SIZE);
        let txq = TestQueue::at(&rxq.mem, QUEUE_SIZE, 0x5000);
        let evq = TestQueue::at(&rxq.mem, QUEUE_SIZE, 0x8000);
        if post_rx {
            for slot in 0..NRX {
                rxq.add_chain(slot, &[(rx_addr(slot), RX_BUF, true)]);
            }
        }
        let kicks: Vec<EventFd> = (0..3).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
        let irq = Arc::new(Irq::default());
        let dma = Arc::new(DmaLog::default());
        let ctx = ActivateContext {
            mem: rxq.mem.clone(),
            acked_features: dev.device_features(),
            queues: [rxq.queue(), txq.queue(), evq.queue()]
                .into_iter()
                .map(|mut q| {
                    q.set_event_idx(event_idx);
                    q
                })
                .collect(),
            queue_evts: kicks.iter().map(|e| e.try_clone().unwrap()).collect(),
            interrupt: irq.clone(),
            dma: dma.clone(),
            resumed: false,
        };
        dev.activate(ctx).unwrap();
        Harness { dir, path, dev, rxq, txq, kicks, irq, dma, rx_seen: 0, tx_lost: 0 }
    }

    fn errors(&self) -> u64 {
        self.dev.counters().errors.load(Ordering::Relaxed)
    }

    fn kick(&self, q: usize) {
        self.kicks[q].write(1).unwrap();
    }

    /// The next packet the device put in the rx queue within `wait`, re-posting its buffer.
    fn try_recv(&mut self, wait: Duration) -> Option<(Header, Vec<u8>)> {
        let end = Instant::now() + wait;
        while self.rxq.used_idx() == self.rx_seen {
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let (head, len) = self.rxq.used(self.rx_seen);
        self.rx_seen = self.rx_seen.wrapping_add(1);
        let head = head as u16;
        assert!(len as usize >= HDR_LEN, "rx packet of {len} bytes");
        let hb: [u8; HDR_LEN] = self.rxq.read(rx_addr(head), HDR_LEN).try_into().unwrap();
        let h = Header::from_bytes(&hb);
        assert_eq!(len as usize, HDR_LEN + h.len as usize, "used length and header len disagree");
        let data = self.rxq.read(rx_addr(head) + HDR_LEN as u64, h.len as usize);
        self.rxq.add_chain(head, &[(rx_addr(head), RX_BUF, true)]);
        self.kick(0);
        Some((h, data))
    }

    fn recv(&mut self) -> (Header, Vec<u8>) {
        self.try_recv(TIMEOUT).expect("timed out waiting for an rx packet")
    }

    /// The next packet that is not a credit update.
    fn recv_skip_credit(&mut self) -> (Header, Vec<u8>) {
        loop {
            let p = self.recv();
            if p.0.op != OP_CREDIT_UPDATE {
                return p;
            }
        }
    }

    /// Publishes a tx chain whose head is descriptor 0 (already written) and waits until the
    /// device consumed it.
    fn publish_tx(&mut self, head: u16) {
        self.txq.publish(head);
        self.kick(1);
        self.wait_tx();
    }

    fn wait_tx(&mut self) {
        let want = self.txq.avail_idx().wrapping_sub(self.tx_lost);
        let txq = &self.txq;
        wait_for("the tx chain to be used", || txq.used_idx() == want);
    }

    /// Sends one packet (header descriptor, then a payload descriptor when non-empty).
    fn send(&mut self, h: Header, payload: &[u8]) {
        self.rxq.write(TX_HDR, &h.to_bytes());
        if payload.is_empty() {
            self.txq.set_desc(0, TX_HDR, HDR_LEN as u32, 0, 0);
        } else {
            self.rxq.write(TX_DATA, payload);
            self.txq.set_desc(0, TX_HDR, HDR_LEN as u32, F_NEXT, 1);
            self.txq.set_desc(1, TX_DATA, payload.len() as u32, 0, 0);
        }
        self.publish_tx(0);
    }

    fn send_rw(&mut self, guest_port: u32, host_port: u32, data: &[u8]) {
        let mut h = pkt(OP_RW, guest_port, host_port);
        h.len = data.len() as u32;
        self.send(h, data);
    }

    /// Guest connects to host port `host_port` from `guest_port`; returns the device's answer.
    fn guest_connect(&mut self, guest_port: u32, host_port: u32) -> Header {
        self.send(pkt(OP_REQUEST, guest_port, host_port), &[]);
        self.recv_skip_credit().0
    }

    /// A host program connects through the device socket to guest port `port`; the guest
    /// accepts. Returns the Unix stream and the host port.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let (req, _) = self.recv();
        assert_eq!(req.op, OP_REQUEST);
        assert_eq!((req.src_cid, req.dst_cid, req.dst_port, req.type_), (HOST_CID, GUEST_CID, port, TYPE_STREAM));
        assert!(req.src_port >= 1024);
        assert_eq!(req.buf_alloc, CONN_BUF);
        self.send(pkt(OP_RESPONSE, port, req.src_port), &[]);
        let line = read_line(&mut s);
        assert_eq!(line, format!("OK {}", req.src_port));
        (s, req.src_port)
    }
}

/// A guest packet header from `guest_port` to host port `host_port` with a 64 KiB buffer.
fn pkt(op: u16, guest_port: u32, host_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 << 10,
        fwd_cnt: 0,
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = s.read(&mut b).expect("read with timeout");
        assert_eq!(n, 1, "EOF before end of line");
        if b[0] == b'\n' {
            return String::from_utf8(out).unwrap();
        }
        out.push(b[0]);
    }
}

fn read_exact_timeout(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).expect("read with timeout");
    v
}

/// Asserts the stream reaches EOF (or is reset) within the timeout.
fn assert_eof(s: &mut UnixStream) {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        r => panic!("expected EOF, got {r:?}"),
    }
}

/// A Unix server at `path` that echoes every connection back, until EOF.
fn echo_server(path: &Path) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(path).unwrap();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let end = Instant::now() + TIMEOUT;
        let mut s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("echo server accept: {e}"),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut b = [0u8; 4096];
        loop {
            match s.read(&mut b) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if s.write_all(&b[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    })
}

#[test]
fn new_validates_cid_and_path() {
    let dir = TempDir::new();
    for cid in [0, 1, 2, 0xffff_ffff, 1 << 40] {
        let e = Vsock::new(cid, dir.0.join("a.sock")).err().expect("reserved CID accepted");
        assert!(matches!(e, VsockError::InvalidCid(c) if c == cid));
        assert!(e.to_string().contains("3..=4294967294"), "{e}");
    }
    // A regular file is not replaced.
    let file = dir.0.join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(Vsock::new(3, file.clone()), Err(VsockError::NotASocket(_))));
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    // A live listener is not stolen.
    let live = dir.0.join("live.sock");
    let _l = UnixListener::bind(&live).unwrap();
    assert!(matches!(Vsock::new(3, live), Err(VsockError::InUse(_))));
    // A stale socket is replaced, and removed again on drop.
    let stale = dir.0.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let v = Vsock::new(3, stale.clone()).unwrap();
    assert_eq!(v.guest_cid(), 3);
    assert_eq!(v.uds_path(), stale.as_path());
    UnixStream::connect(&stale).unwrap();
    drop(v);
    assert!(!stale.exists());
    // A directory that does not exist.
    assert!(matches!(Vsock::new(3, dir.0.join("no/such/dir.sock")), Err(VsockError::Io { .. })));
}

#[test]
fn config_queues_and_features() {
    let dir = TempDir::new();
    let v = Vsock::new(0x1234_5678, dir.0.join("v.sock")).unwrap();
    assert_eq!(v.device_type(), crate::TYPE_VSOCK);
    assert_eq!(v.queue_max_sizes(), vec![256, 256, 256]);
    assert_eq!(v.device_features(), crate::VIRTIO_F_VERSION_1 | crate::RING_FEATURES);
    let mut b = [0xffu8; 8];
    v.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0x1234_5678);
    let mut b = [0xffu8; 4];
    v.read_config(4, &mut b);
    assert_eq!(b, [0; 4]);
    v.read_config(8, &mut b);
    assert_eq!(b, [0; 4]);
}

#[test]
fn host_to_guest_handshake_data_and_shutdown() {
    let mut h = Harness::new();
    let (mut s, host_port) = h.host_connect(52);
    // Host → guest.
    s.write_all(b"hello guest").unwrap();
    let (p, data) = h.recv();
    assert_eq!((p.op, p.src_cid, p.dst_cid, p.src_port, p.dst_port), (OP_RW, HOST_CID, GUEST_CID, host_port, 52));
    assert_eq!(data, b"hello guest");
    assert!(h.dma.pending());
    let ranges = h.dma.take();
    assert!(!ranges.is_empty() && ranges.iter().all(|&(gpa, len)| gpa >= DATA && gpa + len <= rx_addr(NRX)));
    assert!(h.irq.counts[0].load(Ordering::Relaxed) > 0);
    // Guest → host.
    h.send_rw(52, host_port, b"hello host");
    assert_eq!(read_exact_timeout(&mut s, 10), b"hello host");
    assert!(h.irq.counts[1].load(Ordering::Relaxed) > 0);
    // Host half-closes: the guest sees SHUTDOWN(SEND) and can still send.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (p, _) = h.recv_skip_credit();
    assert_eq!((p.op, p.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    h.send_rw(52, host_port, b"still here");
    assert_eq!(read_exact_timeout(&mut s, 10), b"still here");
    // The guest closes: the device acknowledges with RST and closes the Unix side.
    let mut sd = pkt(OP_SHUTDOWN, 52, host_port);
    sd.flags = SHUTDOWN_BOTH;
    h.send(sd, &[]);
    let (p, _) = h.recv_skip_credit();
    assert_eq!((p.op, p.src_port, p.dst_port), (OP_RST, host_port, 52));
    assert_eof(&mut s);
    let c = h.dev.counters();
    assert!(c.requests.load(Ordering::Relaxed) >= 6);
    assert_eq!(c.bytes_written.load(Ordering::Relaxed), 11);
    assert_eq!(c.bytes_read.load(Ordering::Relaxed), 20);
    assert_eq!(h.errors(), 0);
}

#[test]
fn event_idx_data_both_ways() {
    let mut h = Harness::build(true, true);
    let (mut s, port) = h.host_connect(52);
    for i in 0..3 * NRX {
        s.write_all(format!("msg{i}").as_bytes()).unwrap();
        let (p, data) = h.recv();
        assert_eq!((p.op, data), (OP_RW, format!("msg{i}").into_bytes()));
        h.send_rw(52, port, b"ack");
        assert_eq!(read_exact_timeout(&mut s, 3), b"ack");
    }
    assert_eq!(h.errors(), 0);
}

#[test]
fn host_full_close_sends_shutdown_both_and_guest_rst_finishes() {
    let mut h = Harness::new();
    let (mut s, host_port) = h.host_connect(7);
    s.write_all(b"bye").unwrap();
    drop(s);
    let (p, data) = h.recv();
    assert_eq!((p.op, data.as_slice()), (OP_RW, &b"bye"[..]));
    let (p, _) = h.recv();
    assert_eq!((p.op, p.flags), (OP_SHUTDOWN, SHUTDOWN_BOTH));
    h.send(pkt(OP_RST, 7, host_port), &[]);
    // The connection is gone: data to it is answered with RST.
    h.send_rw(7, host_port, b"x");
    let (p, _) = h.recv();
    assert_eq!(p.op, OP_RST);
}

#[test]
fn guest_rst_refuses_host_connect() {
    let mut h = Harness::new();
    let mut s = UnixStream::connect(&h.path).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"CONNECT 99\n").unwrap();
    let (req, _) = h.recv();
    assert_eq!(req.op, OP_REQUEST);
    h.send(pkt(OP_RST, 99, req.src_port), &[]);
    assert_eof(&mut s);
    // Two host connections get distinct ephemeral ports.
    let (_a, pa) = h.host_connect(1);
    let (_b, pb) = h.host_connect(1);
    assert_ne!(pa, pb);
}

#[test]
fn bad_connect_lines_are_closed() {
    let mut h = Harness::new();
    for line in [&b"HELLO 5\n"[..], b"CONNECT x\n", b"CONNECT 99999999999\n", &[b'A'; 100]] {
        let mut s = UnixStream::connect(&h.path).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.write_all(line).unwrap();
        assert_eof(&mut s);
    }
    assert!(h.try_recv(Duration::from_millis(50)).is_none());
    // Data written right behind the CONNECT line is kept for the guest.
    let mut s = UnixStream::connect(&h.path).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"CONNECT 5\r\nearly").unwrap();
    let (req, _) = h.recv();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 5));
    h.send(pkt(OP_RESPONSE, 5, req.src_port), &[]);
    assert_eq!(read_line(&mut s), format!("OK {}", req.src_port));
    let (p, data) = h.recv();
    assert_eq!((p.op, data.as_slice()), (OP_RW, &b"early"[..]));
}

#[test]
fn guest_to_host_connect_with_echo_server() {
    let mut h = Harness::new();
    let server = echo_server(&PathBuf::from(format!("{}_1234", h.path.display())));
    let r = h.guest_connect(5000, 1234);
    assert_eq!((r.op, r.src_cid, r.dst_cid, r.src_port, r.dst_port), (OP_RESPONSE, HOST_CID, GUEST_CID, 1234, 5000));
    assert_eq!(r.buf_alloc, CONN_BUF);
    h.send_rw(5000, 1234, b"ping");
    let (p, data) = h.recv();
    assert_eq!((p.op, p.src_port, p.dst_port), (OP_RW, 1234, 5000));
    assert_eq!(data, b"ping");
    let mut sd = pkt(OP_SHUTDOWN, 5000, 1234);
    sd.flags = SHUTDOWN_BOTH;
    h.send(sd, &[]);
    let (p, _) = h.recv_skip_credit();
    assert_eq!(p.op, OP_RST);
    server.join().unwrap();
    // Nobody listens on another port: RST.
    let r = h.guest_connect(5001, 4321);
    assert_eq!((r.op, r.src_port, r.dst_port), (OP_RST, 4321, 5001));
    assert_eq!(h.errors(), 0);
}

#[test]
fn rst_on_unknown_connection() {
    let mut h = Harness::new();
    h.send_rw(10, 20, b"who?");
    let (p, _) = h.recv();
    assert_eq!((p.op, p.src_cid, p.dst_cid, p.src_port, p.dst_port), (OP_RST, HOST_CID, GUEST_CID, 20, 10));
    for op in [OP_SHUTDOWN, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST, OP_RESPONSE] {
        h.send(pkt(op, 10, 20), &[]);
        assert_eq!(h.recv().0.op, OP_RST, "op {op}");
    }
    // An RST is never answered.
    h.send(pkt(OP_RST, 10, 20), &[]);
    assert!(h.try_recv(Duration::from_millis(50)).is_none());
    // Another CID than the host: RST.
    let mut p = pkt(OP_REQUEST, 10, 20);
    p.dst_cid = 5;
    h.send(p, &[]);
    assert_eq!(h.recv().0.op, OP_RST);
    assert_eq!(h.errors(), 0);
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let mut h = Harness::new();
    let mut s = UnixStream::connect(&h.path).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"CONNECT 80\n").unwrap();
    let (req, _) = h.recv();
    let port = req.src_port;
    let mut resp = pkt(OP_RESPONSE, 80, port);
    resp.buf_alloc = 100;
    h.send(resp, &[]);
    assert_eq!(read_line(&mut s), format!("OK {port}"));
    let big: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    s.write_all(&big).unwrap();
    // Exactly 100 bytes, then a credit request, then nothing.
    let mut got = Vec::new();
    while got.len() < 100 {
        let (p, d) = h.recv();
        assert_eq!(p.op, OP_RW);
        got.extend(d);
    }
    assert_eq!(got, &big[..100]);
    let (p, _) = h.recv();
    assert_eq!(p.op, OP_CREDIT_REQUEST);
    assert!(h.try_recv(Duration::from_millis(100)).is_none());
    // The guest consumed 100 bytes: 100 more.
    let mut cu = pkt(OP_CREDIT_UPDATE, 80, port);
    cu.buf_alloc = 100;
    cu.fwd_cnt = 100;
    h.send(cu, &[]);
    let mut got = Vec::new();
    while got.len() < 100 {
        let (p, d) = h.recv();
        assert_eq!(p.op, OP_RW);
        got.extend(d);
    }
    assert_eq!(got, &big[100..200]);
    assert_eq!(h.recv().0.op, OP_CREDIT_REQUEST);
    // A bigger buffer: the rest.
    cu.buf_alloc = 1000;
    cu.fwd_cnt = 200;
    h.send(cu, &[]);
    let mut got = Vec::new();
    while got.len() < 100 {
        let (p, d) = h.recv();
        assert_eq!(p.op, OP_RW);
        got.extend(d);
    }
    assert_eq!(got, &big[200..]);
}

#[test]
fn guest_to_host_credit_update_and_request() {
    let mut h = Harness::new();
    let (mut s, port) = h.host_connect(9);
    // A credit request is answered with the device's credit.
    h.send(pkt(OP_CREDIT_REQUEST, 9, port), &[]);
    let (p, _) = h.recv();
    assert_eq!((p.op, p.buf_alloc, p.fwd_cnt), (OP_CREDIT_UPDATE, CONN_BUF, 0));
    // Forwarding a quarter of the buffer makes the device advertise the new fwd_cnt.
    let chunk = vec![0x5au8; MAX_PKT_PAYLOAD as usize];
    h.send_rw(9, port, &chunk);
    assert_eq!(read_exact_timeout(&mut s, chunk.len()), chunk);
    let (p, _) = h.recv();
    assert_eq!((p.op, p.fwd_cnt), (OP_CREDIT_UPDATE, MAX_PKT_PAYLOAD));
}

#[test]
fn guest_overrunning_credit_is_reset() {
    let mut h = Harness::new();
    let (mut s, port) = h.host_connect(11);
    // The host does not read; the guest ignores its credit.
    let chunk = vec![1u8; MAX_PKT_PAYLOAD as usize];
    let mut rst = false;
    for _ in 0..64 {
        h.send_rw(11, port, &chunk);
        while let Some((p, _)) = h.try_recv(Duration::from_millis(5)) {
            rst |= p.op == OP_RST;
        }
        if rst {
            break;
        }
    }
    assert!(rst, "no RST after overrunning the credit");
    assert!(h.errors() >= 1);
    // The host side is closed (after whatever the socket buffer already held).
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut b = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    }
}

/// Writes a hostile tx chain with `write` (descriptors from 0), publishes head 0 and checks
/// that it is consumed, counted and answered by nothing.
fn hostile_tx(h: &mut Harness, what: &str, write: impl FnOnce(&mut Harness)) {
    let before = h.errors();
    write(h);
    h.publish_tx(0);
    assert_eq!(h.errors(), before + 1, "{what}: not counted");
    assert!(h.try_recv(Duration::from_millis(20)).is_none(), "{what}: answered");
}

#[test]
fn hostile_tx_chains_are_dropped_and_counted() {
    let mut h = Harness::new();
    let good = pkt(OP_RW, 10, 20).to_bytes();
    h.rxq.write(SCRATCH, &good);
    hostile_tx(&mut h, "descriptor loop", |h| h.txq.set_desc(0, SCRATCH, 44, F_NEXT, 0));
    hostile_tx(&mut h, "two-descriptor loop", |h| {
        h.txq.set_desc(0, SCRATCH, 44, F_NEXT, 1);
        h.txq.set_desc(1, SCRATCH, 44, F_NEXT, 0);
    });
    hostile_tx(&mut h, "next out of range", |h| h.txq.set_desc(0, SCRATCH, 44, F_NEXT, 999));
    hostile_tx(&mut h, "outside guest memory", |h| h.txq.set_desc(0, 0xffff_ffff_0000, 44, 0, 0));
    hostile_tx(&mut h, "wrapping address", |h| h.txq.set_desc(0, u64::MAX - 10, 44, 0, 0));
    hostile_tx(&mut h, "straddling the end of memory", |h| h.txq.set_desc(0, MEM_SIZE as u64 - 20, 44, 0, 0));
    hostile_tx(&mut h, "zero length", |h| h.txq.set_desc(0, SCRATCH, 0, 0, 0));
    hostile_tx(&mut h, "u32::MAX length", |h| h.txq.set_desc(0, SCRATCH, u32::MAX, 0, 0));
    hostile_tx(&mut h, "short header", |h| h.txq.set_desc(0, SCRATCH, 20, 0, 0));
    hostile_tx(&mut h, "device-writable buffer", |h| h.txq.set_desc(0, SCRATCH, 44, F_WRITE, 0));
    hostile_tx(&mut h, "writable payload", |h| {
        let mut p = pkt(OP_RW, 10, 20);
        p.len = 4;
        h.rxq.write(SCRATCH + 0x100, &p.to_bytes());
        h.txq.set_desc(0, SCRATCH + 0x100, 44, F_NEXT, 1);
        h.txq.set_desc(1, SCRATCH + 0x200, 4, F_WRITE, 0);
    });
    hostile_tx(&mut h, "len larger than the buffers", |h| {
        let mut p = pkt(OP_RW, 10, 20);
        p.len = 100;
        h.rxq.write(SCRATCH + 0x100, &p.to_bytes());
        h.txq.set_desc(0, SCRATCH + 0x100, 44 + 10, 0, 0);
    });
    hostile_tx(&mut h, "len u32::MAX", |h| {
        let mut p = pkt(OP_RW, 10, 20);
        p.len = u32::MAX;
        h.rxq.write(SCRATCH + 0x100, &p.to_bytes());
        h.txq.set_desc(0, SCRATCH + 0x100, 44, 0, 0);
    });
    hostile_tx(&mut h, "len above the packet maximum", |h| {
        let mut p = pkt(OP_RW, 10, 20);
        p.len = MAX_PKT_PAYLOAD + 1;
        h.rxq.write(SCRATCH + 0x100, &p.to_bytes());
        h.txq.set_desc(0, SCRATCH + 0x100, 44 + MAX_PKT_PAYLOAD + 1, 0, 0);
    });
    hostile_tx(&mut h, "spoofed source CID", |h| {
        let mut p = pkt(OP_REQUEST, 10, 20);
        p.src_cid = 77;
        h.rxq.write(SCRATCH + 0x100, &p.to_bytes());
        h.txq.set_desc(0, SCRATCH + 0x100, 44, 0, 0);
    });
    hostile_tx(&mut h, "payload on a request", |h| {
        let mut p = pkt(OP_REQUEST, 10, 20);
        p.len = 4;
        h.rxq.write(SCRATCH + 0x100, &p.to_bytes());
        h.txq.set_desc(0, SCRATCH + 0x100, 48, 0, 0);
    });
    hostile_tx(&mut h, "misaligned indirect table", |h| h.txq.set_desc(0, SCRATCH + 0x1000, 20, F_INDIRECT, 0));
    hostile_tx(&mut h, "nested indirect table", |h| {
        // The table's only entry is itself indirect.
        let e = SCRATCH + 0x1000;
        h.rxq.write(e, &(SCRATCH + 0x1000).to_le_bytes());
        h.rxq.write(e + 8, &16u32.to_le_bytes());
        h.rxq.write(e + 12, &F_INDIRECT.to_le_bytes());
        h.rxq.write(e + 14, &0u16.to_le_bytes());
        h.txq.set_desc(0, e, 16, F_INDIRECT, 0);
    });
    // A head index outside the ring (it cannot go in the used ring either).
    let before = h.errors();
    h.txq.publish(300);
    h.kick(1);
    wait_for("head out of range to be counted", || h.errors() == before + 1);
    h.tx_lost += 1;
    // A wrong type or unknown op is counted and answered with RST.
    for (ty, op) in [(2u16, OP_REQUEST), (TYPE_STREAM, 0), (TYPE_STREAM, 99)] {
        let before = h.errors();
        let mut p = pkt(op, 10, 20);
        p.type_ = ty;
        h.send(p, &[]);
        assert_eq!(h.errors(), before + 1);
        assert_eq!(h.recv().0.op, OP_RST);
    }
    // A good packet still works; the header may also be split across descriptors.
    let mut p = pkt(OP_RW, 10, 20);
    p.len = 3;
    let b = p.to_bytes();
    h.rxq.write(SCRATCH + 0x3000, &b[..10]);
    h.rxq.write(SCRATCH + 0x4000, &b[10..]);
    h.rxq.write(SCRATCH + 0x5000, b"abc");
    h.txq.set_desc(0, SCRATCH + 0x3000, 10, F_NEXT, 1);
    h.txq.set_desc(1, SCRATCH + 0x4000, 34, F_NEXT, 2);
    h.txq.set_desc(2, SCRATCH + 0x5000, 3, 0, 0);
    let before = h.errors();
    h.publish_tx(0);
    assert_eq!(h.recv().0.op, OP_RST);
    assert_eq!(h.errors(), before);
    let server = echo_server(&PathBuf::from(format!("{}_77", h.path.display())));
    assert_eq!(h.guest_connect(1, 77).op, OP_RESPONSE);
    h.send_rw(1, 77, b"ok");
    assert_eq!(h.recv().1, b"ok");
    h.send(pkt(OP_RST, 1, 77), &[]);
    server.join().unwrap();
}

#[test]
fn hostile_rx_chains_are_dropped_and_counted() {
    let mut h = Harness::with_rx(false);
    // Something to deliver: an RST for an unknown connection.
    h.send_rw(10, 20, b"x");
    let cases: Vec<Case> = vec![
        ("device-readable", Box::new(|q: &TestQueue| q.set_desc(0, rx_addr(0), RX_BUF, 0, 0))),
        ("shorter than a header", Box::new(|q: &TestQueue| q.set_desc(0, rx_addr(0), 43, F_WRITE, 0))),
        ("zero length", Box::new(|q: &TestQueue| q.set_desc(0, rx_addr(0), 0, F_WRITE, 0))),
        ("outside guest memory", Box::new(|q: &TestQueue| q.set_desc(0, 1 << 40, RX_BUF, F_WRITE, 0))),
        ("u32::MAX length", Box::new(|q: &TestQueue| q.set_desc(0, rx_addr(0), u32::MAX, F_WRITE, 0))),
        ("loop", Box::new(|q: &TestQueue| q.set_desc(0, rx_addr(0), RX_BUF, F_WRITE | F_NEXT, 0))),
        (
            "mixed directions",
            Box::new(|q: &TestQueue| {
                q.set_desc(0, rx_addr(0), 44, F_WRITE | F_NEXT, 1);
                q.set_desc(1, rx_addr(1), 44, F_NEXT, 2);
                q.set_desc(2, rx_addr(2), 44, F_WRITE, 0);
            }),
        ),
    ];
    for (i, (what, write)) in cases.iter().enumerate() {
        let before = h.errors();
        write(&h.rxq);
        h.rxq.publish(0);
        h.kick(0);
        let q = &h.rxq;
        wait_for(what, || q.used_idx() == i as u16 + 1);
        assert_eq!(h.rxq.used(i as u16), (0, 0), "{what}");
        assert_eq!(h.errors(), before + 1, "{what}");
    }
    h.rx_seen = cases.len() as u16;
    // A corrupt avail index is ignored.
    h.rxq.set_avail_idx(h.rx_seen.wrapping_add(1000));
    h.kick(0);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(h.rxq.used_idx(), h.rx_seen);
    h.rxq.set_avail_idx(h.rx_seen);
    // A good buffer split in two still gets the pending RST.
    h.rxq.add_chain(0, &[(rx_addr(0), 20, true), (rx_addr(0) + 20, RX_BUF - 20, true)]);
    h.kick(0);
    let q = &h.rxq;
    wait_for("the RST", || q.used_idx() != h.rx_seen);
    let (head, len) = h.rxq.used(h.rx_seen);
    assert_eq!((head, len), (0, 44));
    let hb: [u8; HDR_LEN] = h.rxq.read(rx_addr(0), HDR_LEN).try_into().unwrap();
    assert_eq!(Header::from_bytes(&hb).op, OP_RST);
}

#[test]
fn corrupt_tx_avail_index_does_not_hang() {
    let mut h = Harness::new();
    h.txq.set_avail_idx(5000);
    h.kick(1);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(h.txq.used_idx(), 0);
    h.txq.set_avail_idx(0);
    // Still serving.
    h.send_rw(1, 2, b"x");
    assert_eq!(h.recv().0.op, OP_RST);
}

#[test]
fn tx_back_pressure_without_rx_buffers() {
    let mut h = Harness::with_rx(false);
    // Far more unanswered packets than stateless replies are queued: the device stops taking
    // tx chains instead of growing its queue.
    let p = pkt(OP_RW, 10, 20).to_bytes();
    for i in 0..QUEUE_SIZE {
        h.rxq.write(SCRATCH + u64::from(i) * 64, &p);
        h.txq.set_desc(i, SCRATCH + u64::from(i) * 64, 44, 0, 0);
        h.txq.publish(i);
    }
    h.kick(1);
    let txq = &h.txq;
    wait_for("tx to stall", || txq.used_idx() > 0);
    std::thread::sleep(Duration::from_millis(50));
    let used = h.txq.used_idx();
    assert!(used < QUEUE_SIZE, "tx not paused ({used} used)");
    // Offering rx buffers resumes tx.
    for slot in 0..NRX {
        h.rxq.add_chain(slot, &[(rx_addr(slot), RX_BUF, true)]);
    }
    h.kick(0);
    let mut n = 0;
    while let Some((p, _)) = h.try_recv(Duration::from_millis(500)) {
        assert_eq!(p.op, OP_RST);
        n += 1;
        if n == QUEUE_SIZE {
            break;
        }
    }
    assert_eq!(n, QUEUE_SIZE);
    assert_eq!(h.txq.used_idx(), QUEUE_SIZE);
}

#[test]
fn reset_closes_connections() {
    let mut h = Harness::new();
    let (mut s, _) = h.host_connect(3);
    assert!(h.dev.reset().wait(std::time::Duration::from_secs(10)), "the reset completes");
    assert_eof(&mut s);
    // The listening socket survives a reset.
    assert!(h.path.exists());
    let _keep = &h.dir;
}

#[test]
fn resumed_device_sends_a_transport_reset_event() {
    let dir = TempDir::new();
    let mut dev = Vsock::new(GUEST_CID, dir.0.join("v.sock")).unwrap();
    let rxq = TestQueue::new(QUEUE_SIZE, MEM_SIZE);
    let txq = TestQueue::at(&rxq.mem, QUEUE_SIZE, 0x5000);
    let mut evq = TestQueue::at(&rxq.mem, QUEUE_SIZE, 0x8000);
    // The driver's event buffer, filled with junk so the event's zero id shows.
    let ev_buf = 0xa000u64;
    rxq.mem.write_obj(0xffff_ffffu32, GuestAddress(ev_buf)).unwrap();
    evq.set_desc(0, ev_buf, 8, 2, 0);
    evq.publish(0);
    let kicks: Vec<EventFd> = (0..3).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
    let irq = Arc::new(Irq::default());
    let ctx = ActivateContext {
        mem: rxq.mem.clone(),
        acked_features: dev.device_features(),
        queues: vec![rxq.queue(), txq.queue(), evq.queue()],
        queue_evts: kicks.iter().map(|e| e.try_clone().unwrap()).collect(),
        interrupt: irq.clone(),
        dma: Arc::new(DmaLog::default()),
        resumed: true,
    };
    dev.activate(ctx).unwrap();
    wait_for("transport reset event", || evq.used_idx() == 1);
    let id: u32 = rxq.mem.read_obj(GuestAddress(ev_buf)).unwrap();
    assert_eq!(id, 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
    let used_len: u32 = rxq.mem.read_obj(GuestAddress(0x8000 + 0x1800 + 4 + 4)).unwrap();
    assert_eq!(used_len, 4);
    wait_for("event queue interrupt", || irq.counts[2].load(Ordering::Relaxed) == 1);
}

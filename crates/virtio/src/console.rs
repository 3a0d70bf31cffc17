//! virtio-console (virtio 1.2 §5.3) with a single port and no multiport: bytes the guest puts
//! in the transmit queue go to a host writer; bytes from the host (a pollable input such as
//! stdin, and/or an [`InputSender`] the VMM feeds) fill the guest's receive buffers.
//!
//! Offers `VIRTIO_CONSOLE_F_SIZE` with an 80×25 console.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{read_config_bytes, ActivateContext, ActivateError, Counters, DmaLog, GuestMem, Interrupt};
use crate::queue::{self, Chain, ChainError, Direction};
use crate::worker::{Completion, EpollCtl, Handler, Worker, FIRST_DEVICE_TOKEN};
use crate::{VirtioDevice, TYPE_CONSOLE, VIRTIO_F_VERSION_1};

/// `VIRTIO_CONSOLE_F_SIZE` (§5.3.3): `cols` and `rows` in the configuration are valid.
pub const VIRTIO_CONSOLE_F_SIZE: u64 = 1 << 0;
/// Size of both queues (receiveq 0, transmitq 1).
pub const QUEUE_SIZE: u16 = 256;
/// Columns reported in the configuration space.
pub const COLS: u16 = 80;
/// Rows reported in the configuration space.
pub const ROWS: u16 = 25;
/// Host → guest bytes buffered while the guest offers no receive buffers; input beyond it is
/// refused ([`InputSender::send`]) or left unread (an [`InputSource`]).
pub const INPUT_BUFFER: usize = 64 << 10;

const RXQ: u16 = 0;
const TXQ: u16 = 1;
const WAKE_TOKEN: u64 = FIRST_DEVICE_TOKEN;
const SOURCE_TOKEN: u64 = FIRST_DEVICE_TOKEN + 1;
/// Most bytes copied from one transmit chain (the rest of a larger chain is dropped, counted).
const MAX_TX_CHAIN: u64 = 1 << 20;

/// A pollable host input for the console, e.g. stdin or a pipe: the worker waits for it to
/// become readable and then reads once, so a blocking descriptor never blocks it. Read
/// returning 0 (EOF) or an error ends the input.
pub trait InputSource: Read + AsRawFd + Send {}
impl<T: Read + AsRawFd + Send> InputSource for T {}

/// Input bytes waiting for receive buffers, shared by the device, its worker and senders.
struct InputQueue {
    bytes: Mutex<VecDeque<u8>>,
    /// Written when bytes arrive, to wake the worker.
    wake: EventFd,
}

impl InputQueue {
    fn lock(&self) -> MutexGuard<'_, VecDeque<u8>> {
        self.bytes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Feeds bytes to the guest's console input (cloneable, usable from any thread).
#[derive(Clone)]
pub struct InputSender {
    q: Arc<InputQueue>,
}

impl InputSender {
    /// Queues `data` for the guest and wakes the device; returns how many bytes were taken
    /// (fewer than `data.len()` when [`INPUT_BUFFER`] bytes are already waiting). Bytes sent
    /// before the driver is ready wait for it.
    pub fn send(&self, data: &[u8]) -> usize {
        let n = {
            let mut b = self.q.lock();
            let n = data.len().min(INPUT_BUFFER.saturating_sub(b.len()));
            b.extend(data.iter().take(n));
            n
        };
        if n > 0 {
            let _ = self.q.wake.write(1);
        }
        n
    }
}

/// The console device.
pub struct Console {
    output: Arc<Mutex<Box<dyn Write + Send>>>,
    source: Arc<Mutex<Option<Box<dyn InputSource>>>>,
    input: Arc<InputQueue>,
    counters: Arc<Counters>,
    worker: Worker<ConsoleWorker>,
}

impl Console {
    /// A new, inactive console writing guest output to `output` and reading guest input from
    /// `input` when given (more input can be fed through [`Console::input_sender`]).
    ///
    /// Errors: the wake-up eventfd could not be created.
    pub fn new(output: Box<dyn Write + Send>, input: Option<Box<dyn InputSource>>) -> io::Result<Console> {
        let wake = EventFd::new(EFD_NONBLOCK)?;
        Ok(Console {
            output: Arc::new(Mutex::new(output)),
            source: Arc::new(Mutex::new(input)),
            input: Arc::new(InputQueue { bytes: Mutex::new(VecDeque::new()), wake }),
            counters: Arc::default(),
            worker: Worker::new("virtio-console"),
        })
    }

    /// A handle that feeds bytes to the guest's console input.
    pub fn input_sender(&self) -> InputSender {
        InputSender { q: self.input.clone() }
    }
}

/// The console's state on its worker thread.
struct ConsoleWorker {
    mem: GuestMem,
    rxq: Queue,
    txq: Queue,
    interrupt: Arc<dyn Interrupt>,
    dma: Arc<DmaLog>,
    counters: Arc<Counters>,
    output: Arc<Mutex<Box<dyn Write + Send>>>,
    source: Arc<Mutex<Option<Box<dyn InputSource>>>>,
    /// The input source's descriptor while it is registered on the epoll set.
    source_fd: Option<RawFd>,
    input: Arc<InputQueue>,
}

impl ConsoleWorker {
    /// Copies one transmit chain (device-readable buffers only, inside guest memory) to the
    /// output; returns 0 (nothing written to the guest). At most [`MAX_TX_CHAIN`] bytes are
    /// copied; the rest of a larger chain is dropped and counted as an error.
    fn serve_tx(chain: Result<Chain, ChainError>, mem: &GuestMem, out: &mut dyn Write, counters: &Counters) -> u32 {
        let (chain, total) = match chain.and_then(|c| c.validate(mem, Direction::Readable).map(|t| (c, t))) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("console: transmit chain: {e}");
                Counters::add(&counters.errors, 1);
                return 0;
            }
        };
        let mut reader = chain.reader(mem);
        let mut chunk = [0u8; 4096];
        let mut done = 0u64;
        while done < MAX_TX_CHAIN {
            let max = usize::try_from(MAX_TX_CHAIN - done).map_or(chunk.len(), |m| m.min(chunk.len()));
            let Some(buf) = chunk.get_mut(..max) else { break };
            let n = match reader.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!("console: transmit chain: {e}");
                    Counters::add(&counters.errors, 1);
                    return 0;
                }
            };
            // `read` returns at most `buf.len()`.
            let data = buf.get(..n).unwrap_or_default();
            if let Err(e) = out.write_all(data) {
                tracing::warn!("console: output: {e}");
                Counters::add(&counters.errors, 1);
                return 0;
            }
            done += n as u64;
        }
        if total > MAX_TX_CHAIN {
            Counters::add(&counters.errors, 1);
        }
        Counters::add(&counters.requests, 1);
        Counters::add(&counters.bytes_read, done);
        0
    }

    fn process_tx(&mut self) {
        let (mem, counters) = (&self.mem, &self.counters);
        let mut out = self.output.lock().unwrap_or_else(|e| e.into_inner());
        let notify = queue::drain(&mut self.txq, mem, |_, chain| Self::serve_tx(chain, mem, &mut **out, counters));
        let _ = out.flush();
        drop(out);
        if notify {
            self.interrupt.notify_queue(TXQ);
        }
    }

    /// Fills one receive chain (device-writable buffers only, inside guest memory, at least
    /// one byte) from the pending input; returns the bytes written.
    fn serve_rx(
        pending: &mut VecDeque<u8>,
        chain: Result<Chain, ChainError>,
        mem: &GuestMem,
        dma: &DmaLog,
        counters: &Counters,
    ) -> u32 {
        let chain = match chain.and_then(|c| match c.validate(mem, Direction::Writable)? {
            0 => Err(ChainError::TooSmall { len: 0, min: 1 }),
            _ => Ok(c),
        }) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("console: receive chain: {e}");
                Counters::add(&counters.errors, 1);
                return 0;
            }
        };
        let mut w = chain.writer(mem, dma);
        let (a, b) = pending.as_slices();
        if let Err(e) = w.write(a).and_then(|_| w.write(b)) {
            tracing::debug!("console: receive chain: {e}");
            Counters::add(&counters.errors, 1);
            return 0;
        }
        // At most the chain's length, which is below 2^32.
        let n = usize::try_from(w.written()).unwrap_or(usize::MAX).min(pending.len());
        pending.drain(..n);
        Counters::add(&counters.requests, 1);
        Counters::add(&counters.bytes_written, n as u64);
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn process_rx(&mut self, ctl: &EpollCtl) {
        let (mem, dma, counters) = (&self.mem, &self.dma, &self.counters);
        let notify = {
            let mut pending = self.input.lock();
            queue::fill(
                &mut self.rxq,
                mem,
                &mut *pending,
                |p| !p.is_empty(),
                |p, _, chain| Self::serve_rx(p, chain, mem, dma, counters),
            )
        };
        if notify {
            self.interrupt.notify_queue(RXQ);
        }
        self.update_source(ctl);
    }

    /// Watches the input source while there is room for its bytes, and not otherwise.
    fn update_source(&mut self, ctl: &EpollCtl) {
        let room = self.input.lock().len() < INPUT_BUFFER;
        match (self.source_fd, room) {
            (None, true) => {
                let src = self.source.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(s) = src.as_ref() {
                    let fd = s.as_raw_fd();
                    match ctl.add(fd, EventSet::IN, SOURCE_TOKEN) {
                        Ok(()) => self.source_fd = Some(fd),
                        Err(e) => tracing::warn!("console: watching the input: {e}"),
                    }
                }
            }
            (Some(fd), false) => {
                let _ = ctl.remove(fd);
                self.source_fd = None;
            }
            _ => {}
        }
    }

    /// The input source is readable: one read into the pending input.
    fn read_source(&mut self, ctl: &EpollCtl) {
        let room = INPUT_BUFFER.saturating_sub(self.input.lock().len());
        if room == 0 {
            return;
        }
        let mut buf = vec![0u8; room.min(4096)];
        let mut src = self.source.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = src.as_mut() else { return };
        match s.read(&mut buf) {
            Ok(n) if n > 0 => self.input.lock().extend(buf.iter().take(n)),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            r => {
                // EOF or a failed input: stop watching it for good.
                if let Err(e) = r {
                    tracing::warn!("console: input: {e}");
                }
                if let Some(fd) = self.source_fd.take() {
                    let _ = ctl.remove(fd);
                }
                *src = None;
            }
        }
    }
}

impl Handler for ConsoleWorker {
    fn init(&mut self, ctl: &EpollCtl) -> io::Result<()> {
        ctl.add(self.input.wake.as_raw_fd(), EventSet::IN, WAKE_TOKEN)?;
        self.update_source(ctl);
        // Input may have arrived before activation.
        self.process_rx(ctl);
        Ok(())
    }

    fn queue_event(&mut self, queue: usize, ctl: &EpollCtl) {
        match u16::try_from(queue) {
            Ok(RXQ) => self.process_rx(ctl),
            Ok(TXQ) => self.process_tx(),
            _ => {}
        }
    }

    fn fd_event(&mut self, token: u64, _events: EventSet, ctl: &EpollCtl) {
        match token {
            WAKE_TOKEN => {
                let _ = self.input.wake.read();
            }
            SOURCE_TOKEN => self.read_source(ctl),
            _ => return,
        }
        self.process_rx(ctl);
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2]
    }
    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | crate::RING_FEATURES | VIRTIO_CONSOLE_F_SIZE
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_console_config { le16 cols; le16 rows; le32 max_nr_ports; le32 emerg_wr; }
        let mut cfg = [0u8; 12];
        cfg[0..2].copy_from_slice(&COLS.to_le_bytes());
        cfg[2..4].copy_from_slice(&ROWS.to_le_bytes());
        cfg[4..8].copy_from_slice(&1u32.to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let mut queues = ctx.queues.into_iter();
        let (Some(rxq), Some(txq)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::BadConfig("console needs receive and transmit queues".into()));
        };
        let w = ConsoleWorker {
            mem: ctx.mem,
            rxq,
            txq,
            interrupt: ctx.interrupt,
            dma: ctx.dma,
            counters: self.counters.clone(),
            output: self.output.clone(),
            source: self.source.clone(),
            source_fd: None,
            input: self.input.clone(),
        };
        self.worker.activate(ctx.queue_evts, w).map_err(|e| ActivateError::Host(e.to_string()))
    }
    fn reset(&mut self) -> Completion {
        // Pending input stays queued for the next activation.
        self.worker.reset()
    }
    fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }
}

#[cfg(test)]
// Test fixtures: byte patterns wrap on purpose; sizes and indices are small constants.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::testing::{TestQueue, DATA, F_NEXT, F_WRITE};

    const TIMEOUT: Duration = Duration::from_secs(5);
    const MEM_SIZE: usize = 1 << 20;
    const TX_BASE: u64 = 0x5000;

    /// A named hostile chain: how to write it into a queue.
    type Case<Q> = (&'static str, Box<dyn Fn(&Q)>);

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let end = Instant::now() + TIMEOUT;
        while !f() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[derive(Default)]
    struct Irq([AtomicU64; 2]);

    impl Interrupt for Irq {
        fn notify_queue(&self, q: u16) {
            self.0[q as usize].fetch_add(1, Ordering::Relaxed);
        }
        fn notify_config(&self) {}
    }

    struct Harness {
        con: Console,
        out: SharedBuf,
        rxq: TestQueue,
        /// The transmit queue, at `TX_BASE` in the receive queue's memory.
        txq: TestQueue,
        kicks: Vec<EventFd>,
        irq: Arc<Irq>,
        dma: Arc<DmaLog>,
    }

    impl Harness {
        fn new(input: Option<Box<dyn InputSource>>) -> Harness {
            let out = SharedBuf::default();
            let con = Console::new(Box::new(out.clone()), input).unwrap();
            let rxq = TestQueue::new(QUEUE_SIZE, MEM_SIZE);
            let txq = TestQueue::at(&rxq.mem, QUEUE_SIZE, TX_BASE);
            let kicks: Vec<EventFd> = (0..2).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
            Harness { con, out, rxq, txq, kicks, irq: Arc::default(), dma: Arc::default() }
        }

        fn activate(&mut self) {
            let ctx = ActivateContext {
                mem: self.rxq.mem.clone(),
                acked_features: self.con.device_features(),
                queues: vec![self.rxq.queue(), self.txq.queue()],
                queue_evts: self.kicks.iter().map(|e| e.try_clone().unwrap()).collect(),
                interrupt: self.irq.clone(),
                dma: self.dma.clone(),
                resumed: false,
            };
            self.con.activate(ctx).unwrap();
        }

        fn errors(&self) -> u64 {
            self.con.counters().errors.load(Ordering::Relaxed)
        }

        fn kick(&self, q: usize) {
            self.kicks[q].write(1).unwrap();
        }

        /// Publishes tx chain `head` and waits until it is used.
        fn tx(&mut self, head: u16) {
            self.txq.publish(head);
            self.kick(1);
            let (txq, want) = (&self.txq, self.txq.avail_idx());
            wait_for("the transmit chain", || txq.used_idx() == want);
        }

        /// Posts a `len`-byte receive buffer at descriptor `d` and waits for it to be used;
        /// returns the bytes written into it.
        fn rx(&mut self, d: u16, len: u32) -> Vec<u8> {
            let want = self.rxq.used_idx().wrapping_add(1);
            self.rxq.add_chain(d, &[(DATA + u64::from(d) * 0x1000, len, true)]);
            self.kick(0);
            let q = &self.rxq;
            wait_for("the receive buffer", || q.used_idx() == want);
            let (head, n) = self.rxq.used(want.wrapping_sub(1));
            assert_eq!(head, u32::from(d));
            self.rxq.read(DATA + u64::from(d) * 0x1000, n as usize)
        }
    }

    #[test]
    fn config_queues_and_features() {
        let h = Harness::new(None);
        assert_eq!(h.con.device_type(), crate::TYPE_CONSOLE);
        assert_eq!(h.con.queue_max_sizes(), vec![256, 256]);
        assert_eq!(h.con.device_features(), VIRTIO_F_VERSION_1 | crate::RING_FEATURES | VIRTIO_CONSOLE_F_SIZE);
        let mut b = [0xffu8; 4];
        h.con.read_config(0, &mut b);
        assert_eq!(b, [80, 0, 25, 0]);
        h.con.read_config(12, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn transmit_reaches_the_writer() {
        let mut h = Harness::new(None);
        h.activate();
        h.rxq.write(DATA + 0x10000, b"hello ");
        h.rxq.write(DATA + 0x20000, b"world\n");
        h.txq.set_desc(0, DATA + 0x10000, 6, F_NEXT, 1);
        h.txq.set_desc(1, DATA + 0x20000, 6, 0, 0);
        h.tx(0);
        assert_eq!(h.txq.used(0), (0, 0));
        assert_eq!(&*h.out.0.lock().unwrap(), b"hello world\n");
        assert!(h.irq.0[1].load(Ordering::Relaxed) > 0);
        let c = h.con.counters();
        assert_eq!((c.requests.load(Ordering::Relaxed), c.bytes_read.load(Ordering::Relaxed)), (1, 12));
        assert_eq!(h.errors(), 0);
    }

    #[test]
    fn input_sender_fills_receive_buffers() {
        let mut h = Harness::new(None);
        let tx = h.con.input_sender();
        // Input sent before the driver is ready waits for it.
        assert_eq!(tx.send(b"abc"), 3);
        h.activate();
        assert_eq!(h.rx(0, 2), b"ab");
        assert_eq!(h.rx(1, 100), b"c");
        assert!(h.dma.take().contains(&(DATA, 2)));
        assert!(h.irq.0[0].load(Ordering::Relaxed) > 0);
        // A buffer posted before input arrives is filled when it does.
        h.rxq.add_chain(2, &[(DATA + 0x2000, 100, true)]);
        h.kick(0);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(h.rxq.used_idx(), 2);
        assert_eq!(tx.send(b"late"), 4);
        let q = &h.rxq;
        wait_for("late input", || q.used_idx() == 3);
        assert_eq!(h.rxq.used(2), (2, 4));
        assert_eq!(h.rxq.read(DATA + 0x2000, 4), b"late");
        let c = h.con.counters();
        assert_eq!(c.bytes_written.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn input_is_bounded() {
        let h = Harness::new(None);
        let tx = h.con.input_sender();
        let big = vec![7u8; INPUT_BUFFER + 10];
        assert_eq!(tx.send(&big), INPUT_BUFFER);
        assert_eq!(tx.send(b"x"), 0);
    }

    #[test]
    fn input_source_is_polled_until_eof() {
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut h = Harness::new(Some(Box::new(b)));
        h.activate();
        a.write_all(b"typed").unwrap();
        let mut got = Vec::new();
        let mut d = 0;
        while got.len() < 5 {
            got.extend(h.rx(d, 100));
            d += 1;
        }
        assert_eq!(got, b"typed");
        drop(a);
        // After EOF the sender still works.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(h.con.input_sender().send(b"!"), 1);
        assert_eq!(h.rx(d, 100), b"!");
    }

    #[test]
    fn hostile_chains_are_dropped_and_counted() {
        let mut h = Harness::new(None);
        h.activate();
        let tx_cases: Vec<Case<TestQueue>> = vec![
            ("loop", Box::new(|t: &TestQueue| t.set_desc(0, DATA, 8, F_NEXT, 0))),
            ("next out of range", Box::new(|t: &TestQueue| t.set_desc(0, DATA, 8, F_NEXT, 500))),
            ("outside guest memory", Box::new(|t: &TestQueue| t.set_desc(0, 1 << 40, 8, 0, 0))),
            ("u32::MAX length", Box::new(|t: &TestQueue| t.set_desc(0, DATA, u32::MAX, 0, 0))),
            ("device-writable", Box::new(|t: &TestQueue| t.set_desc(0, DATA, 8, F_WRITE, 0))),
            (
                "mixed directions",
                Box::new(|t: &TestQueue| {
                    t.set_desc(0, DATA, 8, F_NEXT, 1);
                    t.set_desc(1, DATA, 8, F_WRITE, 0);
                }),
            ),
        ];
        for (what, write) in &tx_cases {
            let before = h.errors();
            write(&h.txq);
            h.tx(0);
            assert_eq!(h.errors(), before + 1, "{what}");
        }
        assert!(h.out.0.lock().unwrap().is_empty());
        // A zero-length buffer is harmless.
        h.txq.set_desc(0, DATA, 0, 0, 0);
        h.tx(0);
        // A corrupt avail index is ignored.
        let avail = h.txq.avail_idx();
        h.txq.set_avail_idx(avail.wrapping_add(999));
        h.kick(1);
        std::thread::sleep(Duration::from_millis(20));
        h.txq.set_avail_idx(avail);
        // Receive side, with input pending.
        assert_eq!(h.con.input_sender().send(b"in"), 2);
        let rx_cases: Vec<Case<TestQueue>> = vec![
            ("device-readable", Box::new(|q: &TestQueue| q.set_desc(0, DATA, 8, 0, 0))),
            ("zero length", Box::new(|q: &TestQueue| q.set_desc(0, DATA, 0, F_WRITE, 0))),
            ("outside guest memory", Box::new(|q: &TestQueue| q.set_desc(0, 1 << 40, 8, F_WRITE, 0))),
            ("loop", Box::new(|q: &TestQueue| q.set_desc(0, DATA, 8, F_WRITE | F_NEXT, 0))),
        ];
        for (i, (what, write)) in rx_cases.iter().enumerate() {
            let before = h.errors();
            write(&h.rxq);
            h.rxq.publish(0);
            h.kick(0);
            let q = &h.rxq;
            wait_for(what, || q.used_idx() == i as u16 + 1);
            assert_eq!(h.rxq.used(i as u16), (0, 0), "{what}");
            assert_eq!(h.errors(), before + 1, "{what}");
        }
        // Good chains still work both ways.
        assert_eq!(h.rx(1, 16), b"in");
        h.rxq.write(DATA + 0x30000, b"out");
        h.txq.set_desc(0, DATA + 0x30000, 3, 0, 0);
        h.tx(0);
        assert_eq!(&*h.out.0.lock().unwrap(), b"out");
    }

    #[test]
    fn reset_keeps_pending_input() {
        let spawned = crate::worker::spawned_on_this_thread();
        let mut h = Harness::new(None);
        h.activate();
        assert!(h.con.reset().wait(Duration::from_secs(10)), "the reset completes");
        assert_eq!(h.con.input_sender().send(b"kept"), 4);
        h.rxq = TestQueue::new(QUEUE_SIZE, MEM_SIZE);
        h.txq = TestQueue::at(&h.rxq.mem, QUEUE_SIZE, TX_BASE);
        h.activate();
        assert_eq!(h.rx(0, 16), b"kept");
        assert_eq!(crate::worker::spawned_on_this_thread(), spawned + 1, "one worker thread for both activations");
    }
}

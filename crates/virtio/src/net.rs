//! virtio-net, the network device (virtio 1.2 §5.1), backed by a host TAP interface
//! ([`crate::tap`]) or any other [`FrameIo`].
//!
//! One queue pair: receiveq1 (queue [`RX_QUEUE`]) and transmitq1 (queue [`TX_QUEUE`]), no
//! control queue. Every buffer starts with the 12-byte `struct virtio_net_hdr_v1` (§5.1.6),
//! which the TAP also carries (`IFF_VNET_HDR`), so frames go between the rings and the TAP
//! unchanged apart from the header fields this device owns.
//!
//! Features offered: `VIRTIO_F_VERSION_1`, the ring features, [`VIRTIO_NET_F_MAC`],
//! [`VIRTIO_NET_F_STATUS`] and [`VIRTIO_NET_F_MRG_RXBUF`]. No checksum or segmentation
//! offloads are offered (the TAP has them off too), so the guest sends and receives fully
//! checksummed frames of at most [`MAX_FRAME_LEN`] bytes including the header; nor `MTU`,
//! `CTRL_VQ` or `MQ`.
//!
//! The worker reads the TAP edge-triggered while the guest has receive buffers posted. When it
//! has none, the frame already read is kept, the TAP is taken off the epoll set's interest and
//! the device waits for the driver to kick the receive queue; nothing spins.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;

use crate::device::{read_config_bytes, ActivateContext, ActivateError, Counters, DmaLog, GuestMem, Interrupt};
use crate::queue::{self, Chain, ChainError, Direction};
use crate::stats::{self, DeviceStats, NetStats};
use crate::tap::{Tap, VNET_HDR_LEN};
use crate::worker::{Completion, EpollCtl, Handler, Worker, FIRST_DEVICE_TOKEN};
use crate::{VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1};

/// `VIRTIO_NET_F_MAC` (bit 5): the device has a MAC address in its config space (§5.1.3).
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_MRG_RXBUF` (bit 15): the driver can merge receive buffers, so one frame may
/// span several receive chains; `num_buffers` in the header says how many (§5.1.6.3.2).
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
/// `VIRTIO_NET_F_STATUS` (bit 16): the config space's `status` field is valid (§5.1.4).
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// `VIRTIO_NET_S_LINK_UP` in the config space's `status` field.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// receiveq1's index.
pub const RX_QUEUE: u16 = 0;
/// transmitq1's index.
pub const TX_QUEUE: u16 = 1;
/// Largest size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest frame handled, in bytes, including the 12-byte virtio-net header (12 + 14-byte
/// Ethernet header + 64 KiB). Longer frames are dropped and counted as errors.
pub const MAX_FRAME_LEN: usize = 65562;
/// Smallest frame handled, in bytes: the virtio-net header and an Ethernet header.
pub const MIN_FRAME_LEN: usize = VNET_HDR_LEN + 14;
/// Bytes of configuration space (`mac`, `status`, `max_virtqueue_pairs`; §5.1.4); reads past
/// it return 0.
pub const CONFIG_LEN: usize = 10;

/// A source and sink of whole frames, each a 12-byte `virtio_net_hdr_v1` followed by an
/// Ethernet frame: the TAP, or a `SOCK_SEQPACKET` socket in tests.
pub trait FrameIo: Send + Sync {
    /// The file descriptor the worker polls for `EPOLLIN`; it must be non-blocking.
    fn raw_fd(&self) -> RawFd;
    /// Reads one frame into `buf`, returning its length in bytes (a longer frame may be
    /// truncated to `buf.len()`). Errors: `WouldBlock` when none is queued, or an OS error.
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes the whole frame `frame`, returning the bytes accepted. Errors: an OS error.
    fn write_frame(&self, frame: &[u8]) -> io::Result<usize>;
}

impl FrameIo for Tap {
    fn raw_fd(&self) -> RawFd {
        self.as_raw_fd()
    }
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf)
    }
    fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        self.write(frame)
    }
}

/// A stable, locally administered unicast MAC address derived from `seed` (e.g. the TAP name):
/// 64-bit FNV-1a of the seed's bytes, with bit 1 (locally administered) of the first byte set
/// and bit 0 (multicast) clear. The same seed always gives the same address.
pub fn default_mac(seed: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

/// The network device.
pub struct Net {
    io: Arc<dyn FrameIo>,
    mac: [u8; 6],
    counters: Arc<Counters>,
    stats: Arc<NetStats>,
    worker: Worker<NetQueues>,
}

impl Net {
    /// A new, inactive network device on `tap` with guest MAC address `mac` (see
    /// [`default_mac`]).
    pub fn new(tap: Tap, mac: [u8; 6]) -> Net {
        Net::with_io(Arc::new(tap), mac)
    }

    /// A new, inactive network device whose frames go to and come from `io` instead of a TAP.
    pub fn with_io(io: Arc<dyn FrameIo>, mac: [u8; 6]) -> Net {
        Net { io, mac, counters: Arc::default(), stats: Arc::default(), worker: Worker::new("virtio-net") }
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }
    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | crate::RING_FEATURES | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MRG_RXBUF
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() < 2 || ctx.queue_evts.len() < 2 {
            return Err(ActivateError::BadConfig("virtio-net needs receiveq1 and transmitq1".into()));
        }
        let mut queues = ctx.queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::BadConfig("virtio-net needs receiveq1 and transmitq1".into()));
        };
        let q = NetQueues::new(
            ctx.mem,
            rx,
            tx,
            self.io.clone(),
            ctx.interrupt,
            ctx.dma,
            (self.counters.clone(), self.stats.clone()),
            ctx.acked_features & VIRTIO_NET_F_MRG_RXBUF != 0,
        );
        // The worker drops the previous activation's state (if any) before serving this one.
        self.worker.activate(ctx.queue_evts, q).map_err(|e| ActivateError::Host(e.to_string()))
    }
    fn reset(&mut self) -> Completion {
        // A received frame the worker held is dropped.
        self.worker.reset()
    }
    fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }
    fn stats(&self) -> DeviceStats {
        DeviceStats::Net(self.stats.clone())
    }
}

const TAP_TOKEN: u64 = FIRST_DEVICE_TOKEN;
/// Consecutive failed reads of the frame source after which the worker waits for its next
/// readiness edge instead of trying again.
const MAX_READ_ERRORS: u32 = 16;

/// Checks a parsed chain for this device ([`Chain::validate`]: every buffer of direction
/// `dir` and inside guest memory) and that it holds at most `max_total` bytes. Returns the
/// chain and its length in bytes.
fn checked(
    chain: Result<Chain, ChainError>,
    mem: &GuestMem,
    dir: Direction,
    max_total: u64,
) -> Result<(Chain, u64), ChainError> {
    let chain = chain?;
    let total = chain.validate(mem, dir)?;
    if total > max_total {
        return Err(ChainError::TooBig { len: total, max: max_total });
    }
    Ok((chain, total))
}

/// One receive chain taken for the frame being placed.
struct RxChain {
    chain: Chain,
    written: u32,
}

/// How [`NetQueues::process_rx`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rx {
    /// The frame source has nothing more (or keeps failing): wait for its next edge.
    Drained,
    /// No receive buffers for the frame read: stop watching the source until a kick.
    Starved,
    /// [`RX_BUDGET`] frames moved; more may be queued.
    Budget,
}

/// Most frames received in one go before the worker looks at its other events.
const RX_BUDGET: usize = 256;

/// What became of a received frame.
#[derive(Debug, PartialEq, Eq)]
enum Placed {
    /// In the used ring.
    Delivered,
    /// Dropped (too big for the posted buffers); counted as an error.
    Dropped,
    /// Not enough buffers posted: keep the frame and wait for a receive-queue kick.
    Starved,
}

/// The device's state on the worker thread.
pub(crate) struct NetQueues {
    mem: GuestMem,
    rx: Queue,
    tx: Queue,
    io: Arc<dyn FrameIo>,
    interrupt: Arc<dyn Interrupt>,
    dma: Arc<DmaLog>,
    counters: Arc<Counters>,
    stats: Arc<NetStats>,
    mrg_rxbuf: bool,
    /// Frame read from `io` ([`MAX_FRAME_LEN`] + 1 bytes: a read filling it was too long).
    rx_buf: Vec<u8>,
    /// Length of a frame in `rx_buf` that is waiting for receive buffers.
    rx_pending: Option<usize>,
    /// Frame gathered from a TX chain.
    tx_buf: Vec<u8>,
    rx_chains: Vec<RxChain>,
    /// Whether the TAP fd is watched for `EPOLLIN`.
    tap_armed: bool,
    /// Whether the current `process_rx` put anything in the RX used ring.
    rx_used: bool,
}

impl NetQueues {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        mem: GuestMem,
        rx: Queue,
        tx: Queue,
        io: Arc<dyn FrameIo>,
        interrupt: Arc<dyn Interrupt>,
        dma: Arc<DmaLog>,
        (counters, stats): (Arc<Counters>, Arc<NetStats>),
        mrg_rxbuf: bool,
    ) -> NetQueues {
        NetQueues {
            mem,
            rx,
            tx,
            io,
            interrupt,
            dma,
            counters,
            stats,
            mrg_rxbuf,
            rx_buf: vec![0; MAX_FRAME_LEN + 1],
            rx_pending: None,
            tx_buf: vec![0; MAX_FRAME_LEN],
            rx_chains: Vec::new(),
            tap_armed: false,
            rx_used: false,
        }
    }

    /// Sends every available TX chain to `io` and returns them through the used ring (length
    /// 0: TX buffers are device-readable only). Returns whether the guest must be interrupted.
    pub(crate) fn process_tx(&mut self) -> bool {
        let Self { mem, tx, io, counters, stats, tx_buf, .. } = self;
        if !tx.ready() {
            return false;
        }
        let (mut used_any, mut rechecks) = (false, 0u32);
        loop {
            if tx.event_idx_enabled() {
                let _ = tx.disable_notification(mem);
            }
            let mut progressed = false;
            loop {
                let (head, chain) = match queue::pop(tx, mem) {
                    Ok(Some(popped)) => popped,
                    Ok(None) => break,
                    Err(e) => {
                        devices::guest_warn!("virtio-net: corrupt TX avail ring: {e}");
                        Counters::add(&counters.errors, 1);
                        stats::add(&stats.tx_dropped, 1);
                        // Ask for a kick once the driver has repaired it.
                        let _ = tx.enable_notification(mem);
                        return used_any && tx.needs_notification(mem).unwrap_or(true);
                    }
                };
                rechecks = 0;
                Self::send(chain, mem, io.as_ref(), (counters, stats), tx_buf);
                match tx.add_used(mem, head, 0) {
                    Ok(()) => {
                        used_any = true;
                        progressed = true;
                    }
                    // An out-of-range head: the chain was empty and is already counted.
                    Err(e) => tracing::debug!("virtio-net: TX add_used({head}): {e}"),
                }
            }
            if !tx.event_idx_enabled() {
                break;
            }
            match tx.enable_notification(mem) {
                // The driver added chains meanwhile. Retrying without progress happens once:
                // an avail ring whose index is readable but entries are not must not spin.
                Ok(true) if progressed || rechecks == 0 => {
                    rechecks += 1;
                    continue;
                }
                Ok(_) => break,
                Err(e) => {
                    devices::guest_warn!("virtio-net: TX enable notification: {e}");
                    break;
                }
            }
        }
        used_any && tx.needs_notification(mem).unwrap_or(true)
    }

    /// Gathers one TX chain (header + frame) and writes it to `io`; malformed chains, frames
    /// outside [`MIN_FRAME_LEN`]..=[`MAX_FRAME_LEN`] and write errors are counted and dropped.
    fn send(
        chain: Result<Chain, ChainError>,
        mem: &GuestMem,
        io: &dyn FrameIo,
        (counters, stats): (&Counters, &NetStats),
        buf: &mut [u8],
    ) {
        let dropped = || {
            Counters::add(&counters.errors, 1);
            stats::add(&stats.tx_dropped, 1);
        };
        let (chain, frame) = match checked(chain, mem, Direction::Readable, MAX_FRAME_LEN as u64) {
            // t ≤ MAX_FRAME_LEN ≤ buf.len(), so the `get_mut` succeeds.
            Ok((c, t)) => match usize::try_from(t).ok().and_then(|t| buf.get_mut(..t)) {
                Some(frame) if frame.len() >= MIN_FRAME_LEN => (c, frame),
                _ => {
                    tracing::debug!("virtio-net: TX frame of {t} bytes dropped (too short)");
                    dropped();
                    return;
                }
            },
            Err(e) => {
                tracing::debug!("virtio-net: TX chain dropped: {e}");
                dropped();
                return;
            }
        };
        let total = frame.len();
        if let Err(e) = chain.reader(mem).read_exact(frame) {
            tracing::debug!("virtio-net: TX chain dropped: {e}");
            dropped();
            return;
        }
        // No offloads were negotiated: flags, gso_type, hdr_len, gso_size, csum_* must be 0 and
        // num_buffers is unused on transmit (§5.1.6.2). Don't let the guest pass anything else
        // to the host's stack.
        frame.iter_mut().take(VNET_HDR_LEN).for_each(|b| *b = 0);
        match io.write_frame(frame) {
            Ok(n) if n == total => {
                Counters::add(&counters.requests, 1);
                Counters::add(&counters.bytes_read, total as u64);
                stats::add(&stats.tx_packets, 1);
                stats::add(&stats.tx_bytes, (total - VNET_HDR_LEN) as u64);
            }
            Ok(n) => {
                tracing::debug!("virtio-net: TX short write ({n} of {total} bytes)");
                Counters::add(&counters.errors, 1);
                stats::add(&stats.tx_errors, 1);
            }
            Err(e) => {
                tracing::debug!("virtio-net: TX write: {e}");
                Counters::add(&counters.errors, 1);
                stats::add(&stats.tx_errors, 1);
            }
        }
    }

    /// Moves frames from `io` into the posted receive buffers until `io` has none left, the
    /// buffers run out (the frame read is kept for later) or [`RX_BUDGET`] frames were moved.
    /// Returns whether the guest must be interrupted, and which of those happened.
    pub(crate) fn process_rx(&mut self) -> (bool, Rx) {
        if !self.rx.ready() {
            return (false, Rx::Starved);
        }
        self.rx_used = false;
        let (mut read_errors, mut frames) = (0u32, 0usize);
        let state = loop {
            if frames == RX_BUDGET {
                break Rx::Budget;
            }
            let len = match self.rx_pending {
                Some(n) => n,
                None => match self.io.read_frame(&mut self.rx_buf) {
                    Ok(n) if (MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&n) => n,
                    Ok(n) => {
                        // A truncated (too long), runt or empty (EOF) read.
                        tracing::debug!("virtio-net: RX frame of {n} bytes dropped");
                        Counters::add(&self.counters.errors, 1);
                        stats::add(&self.stats.rx_errors, 1);
                        read_errors += 1;
                        if read_errors >= MAX_READ_ERRORS {
                            break Rx::Drained;
                        }
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Rx::Drained,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::debug!("virtio-net: RX read: {e}");
                        Counters::add(&self.counters.errors, 1);
                        stats::add(&self.stats.rx_errors, 1);
                        read_errors += 1;
                        if read_errors >= MAX_READ_ERRORS {
                            break Rx::Drained;
                        }
                        continue;
                    }
                },
            };
            self.rx_pending = Some(len);
            match self.place(len) {
                Placed::Delivered | Placed::Dropped => self.rx_pending = None,
                Placed::Starved => {
                    stats::add(&self.stats.rx_no_buffers, 1);
                    break Rx::Starved;
                }
            }
            frames += 1;
        };
        let notify = self.rx_used && self.rx.needs_notification(&self.mem).unwrap_or(true);
        (notify, state)
    }

    /// Puts the frame of `len` bytes in `rx_buf` into receive chains: one chain, or as many as
    /// it needs with `VIRTIO_NET_F_MRG_RXBUF`. Malformed chains are returned with nothing
    /// written (counted) and the frame goes to the next ones. Chains taken for a frame that
    /// does not fit are given back to the available ring.
    fn place(&mut self, len: usize) -> Placed {
        let Self { mem, rx, dma, counters, stats, rx_buf, rx_chains, mrg_rxbuf, rx_used, .. } = self;
        let size = usize::from(rx.size());
        let max_chains = if *mrg_rxbuf { size } else { 1 };
        let mut start = rx.next_avail();
        rx_chains.clear();
        let (mut cap, mut descs, mut rechecked) = (0u64, 0usize, false);
        while cap < len as u64 {
            if rx_chains.len() >= max_chains {
                tracing::debug!("virtio-net: RX frame of {len} bytes dropped (larger than the receive buffers)");
                rx.set_next_avail(start);
                Counters::add(&counters.errors, 1);
                stats::add(&stats.rx_dropped, 1);
                return Placed::Dropped;
            }
            let (head, chain) = match queue::pop(rx, mem) {
                Ok(Some(popped)) => popped,
                Ok(None) => {
                    // Ask for a kick when buffers come, then check for a race with the driver
                    // (once: an avail ring whose entries cannot be read must not spin).
                    if let (Ok(true), false) = (rx.enable_notification(mem), rechecked) {
                        rechecked = true;
                        continue;
                    }
                    rx.set_next_avail(start);
                    if descs >= size {
                        // Every descriptor is posted and the frame still does not fit.
                        tracing::debug!("virtio-net: RX frame of {len} bytes dropped (larger than the ring)");
                        Counters::add(&counters.errors, 1);
                        stats::add(&stats.rx_dropped, 1);
                        return Placed::Dropped;
                    }
                    return Placed::Starved;
                }
                Err(e) => {
                    devices::guest_warn!("virtio-net: corrupt RX avail ring: {e}");
                    Counters::add(&counters.errors, 1);
                    rx.set_next_avail(start);
                    let _ = rx.enable_notification(mem);
                    return Placed::Starved;
                }
            };
            rechecked = false;
            let checked = checked(chain, mem, Direction::Writable, u64::MAX).and_then(|(c, total)| {
                // Every receive buffer must hold at least the header (§5.1.6.3.1).
                if total < VNET_HDR_LEN as u64 {
                    return Err(ChainError::TooSmall { len: total, min: VNET_HDR_LEN as u64 });
                }
                Ok((c, total))
            });
            match checked {
                Ok((chain, total)) => {
                    descs += chain.descriptors();
                    rx_chains.push(RxChain { chain, written: 0 });
                    cap += total;
                }
                Err(e) => {
                    tracing::debug!("virtio-net: RX chain {head} returned unused: {e}");
                    Counters::add(&counters.errors, 1);
                    // It and the chains taken before it go back through the used ring empty;
                    // the frame goes on to the next chains.
                    for c in rx_chains.drain(..).map(|c| c.chain.head()).chain([head]) {
                        if rx.add_used(mem, c, 0).is_ok() {
                            *rx_used = true;
                        }
                    }
                    (cap, descs) = (0, 0);
                    start = rx.next_avail();
                }
            }
        }

        // The header: no offloads, so everything 0 but num_buffers (§5.1.6.4).
        // At most the queue size.
        let [n0, n1] = u16::try_from(rx_chains.len()).unwrap_or(u16::MAX).to_le_bytes();
        if let Some((hdr, _)) = rx_buf.split_first_chunk_mut::<VNET_HDR_LEN>() {
            *hdr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, n0, n1];
        }
        let mut off = 0usize;
        let mut failed = false;
        for c in rx_chains.iter_mut() {
            if off >= len {
                break;
            }
            let mut w = c.chain.writer(mem, dma);
            // off < len ≤ rx_buf.len().
            let res = w.write(rx_buf.get(off..len).unwrap_or_default());
            // At most the chain's length, below 2^32.
            c.written = u32::try_from(w.written()).unwrap_or(u32::MAX);
            off += c.written as usize;
            if let Err(e) = res {
                tracing::debug!("virtio-net: RX frame: {e}");
                failed = true;
                break;
            }
        }
        for c in rx_chains.iter() {
            let used_len = if failed { 0 } else { c.written };
            if rx.add_used(mem, c.chain.head(), used_len).is_ok() {
                *rx_used = true;
            }
        }
        if failed {
            Counters::add(&counters.errors, 1);
            stats::add(&stats.rx_dropped, 1);
            return Placed::Dropped;
        }
        Counters::add(&counters.requests, 1);
        Counters::add(&counters.bytes_written, len as u64);
        stats::add(&stats.rx_packets, 1);
        // len ≥ MIN_FRAME_LEN > VNET_HDR_LEN.
        stats::add(&stats.rx_bytes, len.saturating_sub(VNET_HDR_LEN) as u64);
        Placed::Delivered
    }

    /// Serves the receive side and watches the TAP only while buffers are posted.
    fn run_rx(&mut self, ctl: &EpollCtl) {
        let (notify, state) = self.process_rx();
        if notify {
            self.interrupt.notify_queue(RX_QUEUE);
        }
        let want = state != Rx::Starved;
        // Out of budget with frames still queued: re-arming re-reports the readiness, so the
        // worker serves its other events and comes back.
        if want != self.tap_armed || state == Rx::Budget {
            // Edge-triggered either way, so a hang-up or error is reported once, not forever.
            let events = if want { EventSet::IN | EventSet::EDGE_TRIGGERED } else { EventSet::EDGE_TRIGGERED };
            match ctl.modify(self.io.raw_fd(), events, TAP_TOKEN) {
                Ok(()) => self.tap_armed = want,
                Err(e) => tracing::warn!("virtio-net: epoll modify: {e}"),
            }
        }
    }
}

impl Handler for NetQueues {
    fn init(&mut self, ctl: &EpollCtl) -> io::Result<()> {
        // Adding reports the current readiness, so frames already queued are not missed.
        ctl.add(self.io.raw_fd(), EventSet::IN | EventSet::EDGE_TRIGGERED, TAP_TOKEN)?;
        self.tap_armed = true;
        Ok(())
    }
    fn queue_event(&mut self, queue: usize, ctl: &EpollCtl) {
        if queue == usize::from(RX_QUEUE) {
            self.run_rx(ctl);
        } else if queue == usize::from(TX_QUEUE) && self.process_tx() {
            self.interrupt.notify_queue(TX_QUEUE);
        }
    }
    fn fd_event(&mut self, token: u64, _events: EventSet, ctl: &EpollCtl) {
        if token == TAP_TOKEN {
            self.run_rx(ctl);
        }
    }
}

#[cfg(test)]
// Test fixtures: byte patterns wrap on purpose; sizes and indices are small constants.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;
    use crate::tap::TapError;
    use crate::testing::{TestQueue, DATA, F_INDIRECT, F_NEXT, F_WRITE};

    /// One end of a `SOCK_SEQPACKET` pair standing in for the TAP.
    struct Seq(OwnedFd);

    impl FrameIo for Seq {
        fn raw_fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
        fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
            // SAFETY: the pointer and length describe the writable slice `buf`.
            let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(n as usize)
        }
        fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
            // SAFETY: the pointer and length describe the readable slice `frame`.
            let n = unsafe { libc::write(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(n as usize)
        }
    }

    impl Seq {
        fn recv(&self) -> Option<Vec<u8>> {
            let mut buf = vec![0u8; 128 << 10];
            match self.read_frame(&mut buf) {
                Ok(n) => Some(buf[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) => panic!("recv: {e}"),
            }
        }
        fn send(&self, frame: &[u8]) {
            assert_eq!(self.write_frame(frame).unwrap(), frame.len());
        }
    }

    /// (device end, test end), both non-blocking.
    fn seq_pair() -> (Arc<Seq>, Seq) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors socketpair(2) writes.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0, "socketpair: {}", io::Error::last_os_error());
        // SAFETY: socketpair(2) just created both descriptors; nothing else owns them.
        unsafe { (Arc::new(Seq(OwnedFd::from_raw_fd(fds[0]))), Seq(OwnedFd::from_raw_fd(fds[1]))) }
    }

    #[derive(Default)]
    struct Irq(Mutex<Vec<u16>>);

    impl Interrupt for Irq {
        fn notify_queue(&self, queue: u16) {
            self.0.lock().unwrap().push(queue);
        }
        fn notify_config(&self) {}
    }

    const SIZE: u16 = 16;

    struct Rig {
        tq: TestQueue,
        peer: Seq,
        q: NetQueues,
        counters: Arc<Counters>,
        stats: Arc<NetStats>,
        dma: Arc<DmaLog>,
    }

    impl Rig {
        /// The test queue is receiveq1 (`rx`) or transmitq1; the other queue is not ready.
        fn new(rx: bool, mrg: bool) -> Rig {
            Rig::with_event_idx(rx, mrg, false)
        }
        fn with_event_idx(rx: bool, mrg: bool, event_idx: bool) -> Rig {
            let tq = TestQueue::new(SIZE, 1 << 20);
            let (io, peer) = seq_pair();
            let idle = Queue::new(SIZE).unwrap();
            let mut q = tq.queue();
            q.set_event_idx(event_idx);
            let (rxq, txq) = if rx { (q, idle) } else { (idle, q) };
            let (counters, dma) = (Arc::<Counters>::default(), Arc::<DmaLog>::default());
            let stats = Arc::<NetStats>::default();
            let q = NetQueues::new(
                tq.mem.clone(),
                rxq,
                txq,
                io,
                Arc::new(Irq::default()),
                dma.clone(),
                (counters.clone(), stats.clone()),
                mrg,
            );
            Rig { tq, peer, q, counters, stats, dma }
        }
        /// The [`NetStats`] as (rx_packets, rx_bytes, rx_dropped, rx_errors, rx_no_buffers,
        /// tx_packets, tx_bytes, tx_dropped, tx_errors).
        fn stats(&self) -> [u64; 9] {
            let s = &*self.stats;
            [
                &s.rx_packets,
                &s.rx_bytes,
                &s.rx_dropped,
                &s.rx_errors,
                &s.rx_no_buffers,
                &s.tx_packets,
                &s.tx_bytes,
                &s.tx_dropped,
                &s.tx_errors,
            ]
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        }
        fn errors(&self) -> u64 {
            self.counters.errors.load(std::sync::atomic::Ordering::Relaxed)
        }
        fn requests(&self) -> u64 {
            self.counters.requests.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    /// A frame of `len` bytes in all (header included) whose header is junk the device must
    /// clear and whose bytes depend on `seed`.
    fn frame(len: usize, seed: u8) -> Vec<u8> {
        let mut f: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)).collect();
        f[..VNET_HDR_LEN].copy_from_slice(&[3, 1, 0x40, 0, 0x40, 0, 0, 0, 0, 0, 0, 0]);
        f
    }

    /// `f` as the other side should see it: header cleared (num_buffers as given).
    fn clean(f: &[u8], num_buffers: u16) -> Vec<u8> {
        let mut v = f.to_vec();
        v[..VNET_HDR_LEN].fill(0);
        v[10..12].copy_from_slice(&num_buffers.to_le_bytes());
        v
    }

    /// Writes `f` into guest memory split as `lens` at DATA, DATA+0x1000, ...; returns the
    /// `(addr, len, writable)` list for `add_chain`.
    fn place_tx(tq: &TestQueue, f: &[u8], lens: &[usize]) -> Vec<(u64, u32, bool)> {
        let mut off = 0;
        let mut bufs = Vec::new();
        for (i, &l) in lens.iter().enumerate() {
            let addr = DATA + i as u64 * 0x1000;
            tq.write(addr, &f[off..off + l]);
            bufs.push((addr, l as u32, false));
            off += l;
        }
        assert_eq!(off, f.len());
        bufs
    }

    /// Writes an indirect table of `n` chained buffers of 4 bytes (writable or not) at `table`.
    fn indirect_table(tq: &TestQueue, table: u64, n: u16, writable: bool) {
        for i in 0..n {
            let a = table + u64::from(i) * 16;
            let flags = if i + 1 < n { F_NEXT } else { 0 } | if writable { F_WRITE } else { 0 };
            tq.write(a, &(DATA + 0x8000).to_le_bytes());
            tq.write(a + 8, &4u32.to_le_bytes());
            tq.write(a + 12, &flags.to_le_bytes());
            tq.write(a + 14, &(i + 1).to_le_bytes());
        }
    }

    #[test]
    fn tx_frame_arrives_whole() {
        let mut r = Rig::new(false, false);
        let f = frame(72, 1);
        let bufs = place_tx(&r.tq, &f, &[12, 30, 30]);
        r.tq.add_chain(0, &bufs);
        assert!(r.q.process_tx());
        assert_eq!(r.peer.recv().unwrap(), clean(&f, 0));
        assert_eq!(r.peer.recv(), None);
        assert_eq!((r.tq.used_idx(), r.tq.used(0)), (1, (0, 0)));
        assert_eq!((r.requests(), r.errors()), (1, 0));
        assert_eq!(r.counters.bytes_read.load(std::sync::atomic::Ordering::Relaxed), 72);
        assert_eq!(r.stats(), [0, 0, 0, 0, 0, 1, 60, 0, 0], "one 60-byte Ethernet frame sent");
        // Several chains at once, the header and frame in one buffer.
        for i in 0..3u16 {
            let f = frame(100, i as u8);
            r.tq.write(DATA + 0x10000 * u64::from(i + 1), &f);
            r.tq.add_chain(i * 2, &[(DATA + 0x10000 * u64::from(i + 1), 100, false)]);
        }
        assert!(r.q.process_tx());
        for i in 0..3u8 {
            assert_eq!(r.peer.recv().unwrap(), clean(&frame(100, i), 0));
        }
        assert_eq!((r.tq.used_idx(), r.requests(), r.errors()), (4, 4, 0));
        assert!(!r.q.process_tx(), "nothing new: no interrupt");
    }

    #[test]
    fn tx_hostile_chains_are_dropped() {
        let mut r = Rig::new(false, false);
        let good = frame(64, 9);
        r.tq.write(DATA + 0x40000, &good);
        type Setup = fn(&mut TestQueue);
        let cases: &[(&str, Setup)] = &[
            ("descriptor loop", |tq| {
                tq.set_desc(0, DATA, 100, F_NEXT, 1);
                tq.set_desc(1, DATA, 100, F_NEXT, 0);
                tq.publish(0);
            }),
            ("outside guest memory", |tq| {
                tq.add_chain(0, &[(DATA, 12, false), (1 << 40, 60, false)]);
            }),
            ("address wraps", |tq| {
                tq.add_chain(0, &[(u64::MAX - 8, 64, false)]);
            }),
            ("zero length", |tq| {
                tq.add_chain(0, &[(DATA, 0, false)]);
            }),
            ("u32::MAX length", |tq| {
                tq.add_chain(0, &[(DATA, u32::MAX, false)]);
            }),
            ("writable buffer", |tq| {
                tq.add_chain(0, &[(DATA, 12, false), (DATA + 0x100, 60, true)]);
            }),
            ("longer than the queue", |tq| {
                indirect_table(tq, DATA + 0x20000, SIZE * 2, false);
                tq.set_desc(0, DATA + 0x20000, u32::from(SIZE) * 2 * 16, F_INDIRECT, 0);
                tq.publish(0);
            }),
            ("bad indirect table length", |tq| {
                tq.set_desc(0, DATA + 0x20000, 24, F_INDIRECT, 0);
                tq.publish(0);
            }),
            ("next out of range", |tq| {
                tq.set_desc(0, DATA, 64, F_NEXT, SIZE + 3);
                tq.publish(0);
            }),
            ("frame over 65562 bytes", |tq| {
                let bufs: Vec<_> = (0..5).map(|i| (DATA + i * 0x4000, 0x4000, false)).collect();
                tq.add_chain(0, &bufs);
            }),
            ("shorter than the headers", |tq| {
                tq.add_chain(0, &[(DATA, 12 + 13, false)]);
            }),
            ("head out of range", |tq| {
                tq.publish(SIZE + 1);
            }),
        ];
        for (i, (what, setup)) in cases.iter().enumerate() {
            let used = r.tq.used_idx();
            setup(&mut r.tq);
            r.q.process_tx();
            assert_eq!(r.errors(), i as u64 + 1, "{what}: counted");
            assert_eq!(r.stats()[7], i as u64 + 1, "{what}: a tx drop");
            assert_eq!(r.peer.recv(), None, "{what}: nothing sent");
            if *what != "head out of range" {
                assert_eq!(r.tq.used_idx(), used.wrapping_add(1), "{what}: chain returned");
                assert_eq!(r.tq.used(used).1, 0, "{what}");
            }
            // The next good frame still goes through.
            r.tq.add_chain(5, &[(DATA + 0x40000, 64, false)]);
            r.q.process_tx();
            assert_eq!(r.peer.recv().unwrap(), clean(&good, 0), "{what}: next frame");
            assert_eq!(r.requests(), i as u64 + 1);
        }
        let n = cases.len() as u64;
        assert_eq!(r.stats(), [0, 0, 0, 0, 0, n, n * 52, n, 0], "good frames sent, hostile ones dropped");
    }

    #[test]
    fn tx_corrupt_avail_index() {
        let mut r = Rig::new(false, false);
        r.tq.set_avail_idx(SIZE + 5);
        assert!(!r.q.process_tx());
        assert_eq!((r.errors(), r.tq.used_idx()), (1, 0));
        assert_eq!(r.stats()[7], 1, "tx_dropped");
        r.tq.set_avail_idx(0);
        let f = frame(64, 2);
        let bufs = place_tx(&r.tq, &f, &[64]);
        r.tq.add_chain(0, &bufs);
        assert!(r.q.process_tx());
        assert_eq!(r.peer.recv().unwrap(), clean(&f, 0));
    }

    #[test]
    fn tx_write_error_is_counted() {
        let mut r = Rig::new(false, false);
        let Rig { peer, .. } = &r;
        // SAFETY: shutting down the test's own socket.
        unsafe { libc::shutdown(peer.0.as_raw_fd(), libc::SHUT_RDWR) };
        let f = frame(64, 2);
        let bufs = place_tx(&r.tq, &f, &[64]);
        r.tq.add_chain(0, &bufs);
        assert!(r.q.process_tx());
        assert_eq!((r.errors(), r.requests(), r.tq.used_idx()), (1, 0, 1));
        assert_eq!(r.stats(), [0, 0, 0, 0, 0, 0, 0, 0, 1], "a TAP write error is a tx error, not a drop");
    }

    #[test]
    fn rx_frame_lands_in_guest_buffers() {
        let mut r = Rig::new(true, false);
        r.tq.add_chain(0, &[(DATA, 20, true), (DATA + 0x1000, 2000, true)]);
        let f = frame(112, 4);
        r.peer.send(&f);
        assert_eq!(r.q.process_rx(), (true, Rx::Drained));
        assert_eq!((r.tq.used_idx(), r.tq.used(0)), (1, (0, 112)));
        let want = clean(&f, 1);
        assert_eq!(r.tq.read(DATA, 20), want[..20]);
        assert_eq!(r.tq.read(DATA + 0x1000, 92), want[20..]);
        assert_eq!(r.tq.read(DATA + 0x1000 + 92, 4), [0; 4], "nothing past the frame");
        assert_eq!(r.dma.take(), vec![(DATA, 20), (DATA + 0x1000, 92)]);
        assert_eq!((r.requests(), r.errors()), (1, 0));
        assert_eq!(r.counters.bytes_written.load(std::sync::atomic::Ordering::Relaxed), 112);
        assert_eq!(r.stats(), [1, 100, 0, 0, 0, 0, 0, 0, 0], "one 100-byte Ethernet frame received");
        // Nothing more to read: no interrupt, not starved.
        assert_eq!(r.q.process_rx(), (false, Rx::Drained));
    }

    #[test]
    fn rx_waits_for_buffers() {
        let mut r = Rig::new(true, false);
        let (f1, f2) = (frame(60, 1), frame(70, 2));
        r.peer.send(&f1);
        r.peer.send(&f2);
        assert_eq!(r.q.process_rx(), (false, Rx::Starved), "no buffers: starved");
        assert_eq!(r.q.process_rx(), (false, Rx::Starved), "still starved, frame kept");
        r.tq.add_chain(0, &[(DATA, 1600, true)]);
        assert_eq!(r.q.process_rx(), (true, Rx::Starved), "first frame in, second waits");
        assert_eq!((r.tq.used_idx(), r.tq.used(0)), (1, (0, 60)));
        assert_eq!(r.tq.read(DATA, 60), clean(&f1, 1));
        r.tq.add_chain(1, &[(DATA + 0x1000, 1600, true)]);
        assert_eq!(r.q.process_rx(), (true, Rx::Drained));
        assert_eq!(r.tq.used(1), (1, 70));
        assert_eq!(r.tq.read(DATA + 0x1000, 70), clean(&f2, 1));
        assert_eq!((r.requests(), r.errors()), (2, 0));
        // Three waits for buffers, nothing dropped: the frames waited.
        assert_eq!(r.stats(), [2, 48 + 58, 0, 0, 3, 0, 0, 0, 0]);
    }

    /// `avail_event`, where the device says when it wants the next kick (§2.7.10).
    fn avail_event(tq: &TestQueue) -> u16 {
        u16::from_le_bytes(tq.read(crate::testing::USED + 4 + 8 * u64::from(SIZE), 2).try_into().unwrap())
    }

    #[test]
    fn rx_event_idx_asks_for_a_kick_when_starved() {
        let mut r = Rig::with_event_idx(true, false, true);
        r.tq.add_chain(0, &[(DATA, 1600, true)]);
        r.peer.send(&frame(60, 1));
        r.peer.send(&frame(60, 2));
        assert_eq!(r.q.process_rx(), (true, Rx::Starved));
        assert_eq!(r.tq.used_idx(), 1);
        assert_eq!(avail_event(&r.tq), 1, "kick me when chain 1 is posted");
        r.tq.add_chain(1, &[(DATA + 0x1000, 1600, true)]);
        assert_eq!(r.q.process_rx(), (false, Rx::Drained), "used_event 0 already passed: no interrupt");
        assert_eq!(r.tq.used_idx(), 2);
        assert_eq!(r.tq.read(DATA + 0x1000, 60), clean(&frame(60, 2), 1));
    }

    #[test]
    fn tx_event_idx() {
        let mut r = Rig::with_event_idx(false, false, true);
        for i in 0..3u16 {
            let addr = DATA + u64::from(i) * 0x1000;
            r.tq.write(addr, &frame(64, i as u8));
            r.tq.add_chain(i, &[(addr, 64, false)]);
        }
        assert!(r.q.process_tx(), "used_event 0 crossed");
        assert_eq!((r.tq.used_idx(), r.requests()), (3, 3));
        assert_eq!(avail_event(&r.tq), 3, "kick me for the next chain");
        for i in 0..3u8 {
            assert_eq!(r.peer.recv().unwrap(), clean(&frame(64, i), 0));
        }
    }

    #[test]
    fn rx_frame_too_big_for_chain_is_dropped() {
        let mut r = Rig::new(true, false);
        r.tq.add_chain(0, &[(DATA, 100, true)]);
        r.peer.send(&frame(212, 1));
        let small = frame(62, 2);
        r.peer.send(&small);
        assert_eq!(r.q.process_rx(), (true, Rx::Drained));
        assert_eq!((r.errors(), r.requests()), (1, 1));
        assert_eq!((r.tq.used_idx(), r.tq.used(0)), (1, (0, 62)), "the chain took the next frame");
        assert_eq!(r.tq.read(DATA, 62), clean(&small, 1));
        assert_eq!(r.stats(), [1, 50, 1, 0, 0, 0, 0, 0, 0], "the big frame is an rx drop");
    }

    #[test]
    fn rx_hostile_chains_are_returned_unused() {
        let mut r = Rig::new(true, false);
        type Setup = fn(&mut TestQueue);
        let cases: &[(&str, Setup)] = &[
            ("readable only", |tq| {
                tq.add_chain(0, &[(DATA, 1600, false)]);
            }),
            ("readable then writable", |tq| {
                tq.add_chain(0, &[(DATA, 12, false), (DATA + 0x1000, 1600, true)]);
            }),
            ("descriptor loop", |tq| {
                tq.set_desc(0, DATA, 100, F_NEXT | F_WRITE, 1);
                tq.set_desc(1, DATA, 100, F_NEXT | F_WRITE, 0);
                tq.publish(0);
            }),
            ("outside guest memory", |tq| {
                tq.add_chain(0, &[(DATA, 12, true), (1 << 40, 1600, true)]);
            }),
            ("u32::MAX length", |tq| {
                tq.add_chain(0, &[(DATA, u32::MAX, true)]);
            }),
            ("zero length", |tq| {
                tq.add_chain(0, &[(DATA, 0, true)]);
            }),
            ("smaller than the header", |tq| {
                tq.add_chain(0, &[(DATA, 11, true)]);
            }),
            ("longer than the queue", |tq| {
                indirect_table(tq, DATA + 0x20000, SIZE * 2, true);
                tq.set_desc(0, DATA + 0x20000, u32::from(SIZE) * 2 * 16, F_INDIRECT, 0);
                tq.publish(0);
            }),
            ("head out of range", |tq| {
                tq.publish(SIZE + 1);
            }),
        ];
        for (i, (what, setup)) in cases.iter().enumerate() {
            let used = r.tq.used_idx();
            setup(&mut r.tq);
            r.tq.add_chain(8, &[(DATA + 0x40000, 1600, true)]);
            let f = frame(80, i as u8);
            r.peer.send(&f);
            assert_eq!(r.q.process_rx(), (true, Rx::Drained), "{what}");
            assert_eq!(r.errors(), i as u64 + 1, "{what}: counted");
            let mut u = used;
            if *what != "head out of range" {
                assert_eq!(r.tq.used(u), (0, 0), "{what}: returned with nothing written");
                u = u.wrapping_add(1);
            }
            assert_eq!(r.tq.used(u), (8, 80), "{what}: frame in the next chain");
            assert_eq!(r.tq.used_idx(), u.wrapping_add(1), "{what}");
            assert_eq!(r.tq.read(DATA + 0x40000, 80), clean(&f, 1), "{what}");
            assert_eq!(r.requests(), i as u64 + 1);
        }
    }

    #[test]
    fn rx_corrupt_avail_index() {
        let mut r = Rig::new(true, false);
        r.tq.set_avail_idx(SIZE + 5);
        let f = frame(80, 3);
        r.peer.send(&f);
        assert_eq!(r.q.process_rx(), (false, Rx::Starved));
        assert_eq!((r.errors(), r.tq.used_idx()), (1, 0));
        r.tq.set_avail_idx(0);
        r.tq.add_chain(0, &[(DATA, 1600, true)]);
        assert_eq!(r.q.process_rx(), (true, Rx::Drained));
        assert_eq!(r.tq.read(DATA, 80), clean(&f, 1), "the kept frame arrives");
    }

    #[test]
    fn rx_overlong_runt_and_empty_frames_are_dropped() {
        let mut r = Rig::new(true, false);
        r.tq.add_chain(0, &[(DATA, 0x20000, true)]);
        r.peer.send(&frame(MAX_FRAME_LEN + 1, 1));
        r.peer.send(&frame(MIN_FRAME_LEN - 1, 2));
        r.peer.send(&[]);
        let f = frame(MAX_FRAME_LEN, 3);
        r.peer.send(&f);
        assert_eq!(r.q.process_rx(), (true, Rx::Drained));
        assert_eq!((r.errors(), r.requests()), (3, 1));
        let eth = (MAX_FRAME_LEN - VNET_HDR_LEN) as u64;
        assert_eq!(r.stats(), [1, eth, 0, 3, 0, 0, 0, 0, 0], "bad lengths read are rx errors");
        assert_eq!((r.tq.used_idx(), r.tq.used(0)), (1, (0, MAX_FRAME_LEN as u32)));
        assert_eq!(r.tq.read(DATA, MAX_FRAME_LEN), clean(&f, 1));
    }

    #[test]
    fn rx_peer_gone_does_not_spin() {
        let mut r = Rig::new(true, false);
        r.tq.add_chain(0, &[(DATA, 1600, true)]);
        let Rig { q, peer, .. } = r;
        drop(peer);
        // Every read now returns 0 (EOF); the device gives up after a bounded number.
        let mut q = q;
        assert_eq!(q.process_rx(), (false, Rx::Drained));
    }

    /// A frame source that never runs dry.
    struct Flood(EventFd);

    impl FrameIo for Flood {
        fn raw_fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
        fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
            let f = frame(200, 1);
            buf[..f.len()].copy_from_slice(&f);
            Ok(f.len())
        }
        fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
            Ok(frame.len())
        }
    }

    #[test]
    fn rx_endless_source_is_served_in_budgets() {
        let tq = TestQueue::new(256, 1 << 20);
        let counters = Arc::<Counters>::default();
        let mut q = NetQueues::new(
            tq.mem.clone(),
            tq.queue(),
            Queue::new(256).unwrap(),
            Arc::new(Flood(EventFd::new(EFD_NONBLOCK).unwrap())),
            Arc::new(Irq::default()),
            Arc::default(),
            (counters.clone(), Arc::default()),
            false,
        );
        let mut tq = tq;
        // Every frame is too big for the one chain: each is dropped, and the loop still ends.
        tq.add_chain(0, &[(DATA, 100, true)]);
        assert_eq!(q.process_rx(), (false, Rx::Budget));
        assert_eq!(counters.errors.load(std::sync::atomic::Ordering::Relaxed), RX_BUDGET as u64);
        // Delivered frames count too: a full ring of fitting buffers.
        tq.set_desc(0, DATA, 300, F_WRITE, 0);
        for i in 1..256u16 {
            tq.add_chain(i, &[(DATA + u64::from(i) * 0x200, 300, true)]);
        }
        assert_eq!(q.process_rx(), (true, Rx::Budget));
        assert_eq!(tq.used_idx(), 256);
        assert_eq!(q.process_rx(), (false, Rx::Starved));
        assert_eq!(counters.requests.load(std::sync::atomic::Ordering::Relaxed), 256);
    }

    #[test]
    fn rx_mergeable_buffers() {
        let mut r = Rig::new(true, true);
        // Three chains of 1000 bytes for a 2512-byte frame; only two posted at first.
        r.tq.add_chain(0, &[(DATA, 1000, true)]);
        r.tq.add_chain(1, &[(DATA + 0x1000, 400, true), (DATA + 0x2000, 600, true)]);
        let f = frame(2512, 5);
        r.peer.send(&f);
        assert_eq!(r.q.process_rx(), (false, Rx::Starved), "two chains are not enough: wait");
        assert_eq!(r.tq.used_idx(), 0);
        r.tq.add_chain(3, &[(DATA + 0x3000, 1000, true)]);
        assert_eq!(r.q.process_rx(), (true, Rx::Drained));
        assert_eq!(r.tq.used_idx(), 3);
        assert_eq!([r.tq.used(0), r.tq.used(1), r.tq.used(2)], [(0, 1000), (1, 1000), (3, 512)]);
        let want = clean(&f, 3);
        let mut got = r.tq.read(DATA, 1000);
        got.extend(r.tq.read(DATA + 0x1000, 400));
        got.extend(r.tq.read(DATA + 0x2000, 600));
        got.extend(r.tq.read(DATA + 0x3000, 512));
        assert_eq!(got, want, "num_buffers = 3 and the frame in order");
        assert_eq!((r.requests(), r.errors()), (1, 0));

        // A frame bigger than the whole ring's buffers is dropped; the buffers stay.
        for i in 0..SIZE {
            r.tq.add_chain(i, &[(DATA + 0x10000 + u64::from(i) * 0x100, 100, true)]);
        }
        r.peer.send(&frame(3000, 6));
        let small = frame(90, 7);
        r.peer.send(&small);
        assert_eq!(r.q.process_rx(), (true, Rx::Drained));
        assert_eq!((r.requests(), r.errors()), (2, 1));
        assert_eq!((r.tq.used_idx(), r.tq.used(3)), (4, (0, 90)));
        assert_eq!(r.tq.read(DATA + 0x10000, 90), clean(&small, 1));
    }

    #[test]
    fn rx_mergeable_hostile_chain_midway() {
        let mut r = Rig::new(true, true);
        r.tq.add_chain(0, &[(DATA, 1000, true)]);
        r.tq.add_chain(1, &[(DATA + 0x1000, 1000, false)]);
        r.tq.add_chain(2, &[(DATA + 0x2000, 1000, true)]);
        r.tq.add_chain(3, &[(DATA + 0x3000, 1000, true)]);
        let f = frame(1500, 8);
        r.peer.send(&f);
        assert_eq!(r.q.process_rx(), (true, Rx::Drained));
        assert_eq!(r.errors(), 1);
        // Chain 0 (taken before the bad one) and chain 1 come back empty; the frame is in 2 and 3.
        assert_eq!(r.tq.used_idx(), 4);
        assert_eq!([r.tq.used(0), r.tq.used(1), r.tq.used(2), r.tq.used(3)], [(0, 0), (1, 0), (2, 1000), (3, 500)]);
        let mut got = r.tq.read(DATA + 0x2000, 1000);
        got.extend(r.tq.read(DATA + 0x3000, 500));
        assert_eq!(got, clean(&f, 2));
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn activate(net: &mut Net, tq: &TestQueue, rx: bool, irq: Arc<Irq>) -> Vec<EventFd> {
        let evts: Vec<EventFd> = (0..2).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
        let idle = Queue::new(SIZE).unwrap();
        let queues = if rx { vec![tq.queue(), idle] } else { vec![idle, tq.queue()] };
        net.activate(ActivateContext {
            mem: tq.mem.clone(),
            acked_features: VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC,
            queues,
            queue_evts: evts.iter().map(|e| e.try_clone().unwrap()).collect(),
            interrupt: irq,
            dma: Arc::default(),
            resumed: false,
        })
        .unwrap();
        evts
    }

    #[test]
    fn worker_receives_when_buffers_come() {
        let (io, peer) = seq_pair();
        let mut net = Net::with_io(io, default_mac("t"));
        let mut tq = TestQueue::new(SIZE, 1 << 20);
        let irq = Arc::new(Irq::default());
        let evts = activate(&mut net, &tq, true, irq.clone());
        // A frame with no buffers posted waits.
        let f1 = frame(60, 1);
        peer.send(&f1);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(tq.used_idx(), 0);
        // More frames while starved are not read.
        peer.send(&frame(61, 2));
        std::thread::sleep(Duration::from_millis(20));
        tq.add_chain(0, &[(DATA, 1600, true)]);
        evts[0].write(1).unwrap();
        wait_for("the first frame", || tq.used_idx() == 1);
        assert_eq!(tq.read(DATA, 60), clean(&f1, 1));
        tq.add_chain(1, &[(DATA + 0x1000, 1600, true)]);
        tq.add_chain(2, &[(DATA + 0x2000, 1600, true)]);
        evts[0].write(1).unwrap();
        wait_for("the second frame", || tq.used_idx() == 2);
        // Buffers posted first, frame later: the TAP's readiness wakes the worker.
        std::thread::sleep(Duration::from_millis(20));
        let f3 = frame(62, 3);
        peer.send(&f3);
        wait_for("the third frame", || tq.used_idx() == 3);
        assert_eq!(tq.read(DATA + 0x2000, 62), clean(&f3, 1));
        assert!(irq.0.lock().unwrap().iter().all(|&q| q == RX_QUEUE));
        assert!(irq.0.lock().unwrap().len() >= 3);
        assert!(net.reset().wait(Duration::from_secs(10)), "the reset completes");
        assert_eq!(net.counters().requests.load(std::sync::atomic::Ordering::Relaxed), 3);
    }

    #[test]
    fn worker_transmits_on_kick() {
        let (io, peer) = seq_pair();
        let mut net = Net::with_io(io, default_mac("t"));
        let mut tq = TestQueue::new(SIZE, 1 << 20);
        let irq = Arc::new(Irq::default());
        let evts = activate(&mut net, &tq, false, irq.clone());
        let f = frame(90, 4);
        let bufs = place_tx(&tq, &f, &[12, 78]);
        tq.add_chain(0, &bufs);
        evts[1].write(1).unwrap();
        wait_for("the frame", || tq.used_idx() == 1);
        assert_eq!(peer.recv().unwrap(), clean(&f, 0));
        wait_for("the interrupt", || irq.0.lock().unwrap().contains(&TX_QUEUE));
        assert!(net.reset().wait(Duration::from_secs(10)), "the reset completes");
        assert!(net.reset().is_done(), "a second reset has nothing to stop");
    }

    #[test]
    fn config_space_and_features() {
        let (io, _peer) = seq_pair();
        let net = Net::with_io(io, [0x02, 1, 2, 3, 4, 5]);
        assert_eq!(net.device_type(), TYPE_NET);
        assert_eq!(net.queue_max_sizes(), vec![256, 256]);
        let f = net.device_features();
        for bit in [VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MRG_RXBUF] {
            assert_ne!(f & bit, 0);
        }
        // No CSUM (0), GUEST_CSUM (1), MTU (3), GSO/TSO/UFO (6..=14), CTRL_VQ (17), MQ (22).
        for bit in [0, 1, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 17, 22] {
            assert_eq!(f & (1 << bit), 0, "bit {bit}");
        }
        let mut c = [0xffu8; 16];
        net.read_config(0, &mut c);
        assert_eq!(c, [2, 1, 2, 3, 4, 5, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        let mut s = [0u8; 2];
        net.read_config(6, &mut s);
        assert_eq!(u16::from_le_bytes(s), VIRTIO_NET_S_LINK_UP);
    }

    #[test]
    fn default_mac_is_stable_local_unicast() {
        let a = default_mac("rvtap0");
        assert_eq!(a, default_mac("rvtap0"));
        assert_ne!(a, default_mac("rvtap1"));
        for seed in ["", "a", "rvtap0", "tap-with-a-long-name"] {
            let m = default_mac(seed);
            assert_eq!(m[0] & 0x03, 0x02, "{seed}: locally administered unicast");
        }
    }

    /// An `AF_PACKET` socket on interface `ifindex` for EtherType `proto`.
    fn packet_socket(ifindex: u32, proto: u16) -> OwnedFd {
        // SAFETY: plain socket(2) call; the result is checked.
        let fd =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, i32::from(proto.to_be())) };
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        // SAFETY: `fd` was just created and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `sockaddr_ll` is plain old data; all-zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto.to_be();
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: the pointer and length describe `sll`.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", io::Error::last_os_error());
        fd
    }

    #[test]
    fn real_tap_round_trip() {
        let tap = match Tap::open("rvtap-ut%d") {
            Ok(t) => t,
            Err(TapError::OpenTun(e)) if e.kind() == io::ErrorKind::NotFound => {
                eprintln!("skipping real_tap_round_trip: /dev/net/tun is missing");
                return;
            }
            Err(TapError::OpenTun(e) | TapError::Ioctl { source: e, .. })
                if e.kind() == io::ErrorKind::PermissionDenied =>
            {
                eprintln!("skipping real_tap_round_trip: no permission to create a TAP ({e})");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        tap.set_up().expect("bring the TAP up");
        let name = std::ffi::CString::new(tap.name()).unwrap();
        // SAFETY: `name` is a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0);
        const PROTO: u16 = 0x88b5; // IEEE local experimental EtherType
        let sock = packet_socket(ifindex, PROTO);
        let tap: Arc<dyn FrameIo> = Arc::new(tap);
        let mac = default_mac("rvtap-ut");
        let eth = |seed: u8| {
            let mut f = vec![0u8; VNET_HDR_LEN];
            f.extend([0xff; 6]);
            f.extend(mac);
            f.extend(PROTO.to_be_bytes());
            f.extend((0..50u8).map(|i| i ^ seed));
            f
        };

        // Guest TX -> host.
        let tx_tq = TestQueue::new(SIZE, 1 << 20);
        let mut tx = NetQueues::new(
            tx_tq.mem.clone(),
            Queue::new(SIZE).unwrap(),
            tx_tq.queue(),
            tap.clone(),
            Arc::new(Irq::default()),
            Arc::default(),
            (Arc::default(), Arc::default()),
            false,
        );
        let mut tx_tq = tx_tq;
        let out = eth(1);
        let bufs = place_tx(&tx_tq, &out, &[VNET_HDR_LEN, out.len() - VNET_HDR_LEN]);
        tx_tq.add_chain(0, &bufs);
        assert!(tx.process_tx());
        let mut buf = vec![0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(5);
        let got = loop {
            // SAFETY: the pointer and length describe `buf`.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                break buf[..n as usize].to_vec();
            }
            assert!(Instant::now() < deadline, "the host never saw the guest's frame");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(got, out[VNET_HDR_LEN..]);

        // Host -> guest RX.
        let mut rx_tq = TestQueue::new(SIZE, 1 << 20);
        let mut rx = NetQueues::new(
            rx_tq.mem.clone(),
            rx_tq.queue(),
            Queue::new(SIZE).unwrap(),
            tap.clone(),
            Arc::new(Irq::default()),
            Arc::default(),
            (Arc::default(), Arc::default()),
            false,
        );
        let inbound = eth(2);
        // SAFETY: `sockaddr_ll` is plain old data; all-zero is valid.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = ifindex as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let frame = &inbound[VNET_HDR_LEN..];
        // SAFETY: the pointers and lengths describe `frame` and `to`.
        let n = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                &to as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(n, frame.len() as isize, "sendto: {}", io::Error::last_os_error());
        // The kernel may send frames of its own (IPv6 autoconfiguration): skip them.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut head = 0u16;
        loop {
            let used = rx_tq.used_idx();
            rx_tq.add_chain(head, &[(DATA + u64::from(head) * 0x1000, 2048, true)]);
            while rx_tq.used_idx() == used {
                rx.process_rx();
                assert!(Instant::now() < deadline, "the guest never saw the host's frame");
                std::thread::sleep(Duration::from_millis(2));
            }
            let (id, len) = rx_tq.used(used);
            let data = rx_tq.read(DATA + u64::from(id) * 0x1000, len as usize);
            if data[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == PROTO.to_be_bytes() {
                assert_eq!(data, clean(&inbound, 1));
                break;
            }
            head = (head + 1) % SIZE;
        }
    }
}

//! The virtio device targets: each device model activated on split virtqueues whose
//! descriptor tables, available rings and buffers come from the input, then driven by queue
//! kicks and host-side events. Devices run in the worker's inline mode
//! ([`virtio::worker::inline`]): their handlers run on the fuzzing thread, so a run is
//! deterministic.
//!
//! Input layout (little-endian; a short input reads as zeros past its end):
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | features the driver acks (masked by the device's offer; `VERSION_1` always) |
//! | 8..12 | queue sizes: queue `i` has `1 << (byte % 8)` entries (1 to 128) |
//! | 12 | device options (bit 0: virtio-blk read-only; balloon: bit 1 no statistics queue, bit 2 free page reporting) |
//! | 13 | script length `S` |
//! | 14..16 | host data length `H` |
//! | 16.. | the script: `S` bytes, one step each (below) |
//! | then | host data: `H` bytes, chunks of `u16` length + bytes (frames from the TAP, console input, vsock host connections, balloon targets) |
//! | then | guest memory from GPA 0 (at most [`USED_BASE`] bytes) |
//!
//! Queue `i`'s descriptor table starts right after queue `i - 1`'s available ring (queue 0's
//! at GPA 0), its available ring right after its descriptor table (16-byte aligned), and its
//! used ring at [`USED_BASE`] + `i` × 4 KiB. Guest memory is [`MEM_SIZE`] bytes.
//!
//! A script step `b`: queue `q = (b & 3) % queues`; bit 6 set: the driver publishes one more
//! available entry on `q` (its avail index + 1) first; bit 7 set: a host-side event (the next
//! host data chunk) instead of a kick; otherwise the driver kicks `q`. After each step the
//! device serves what is ready. An empty script kicks every queue once.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use virtio::device::{ActivateContext, DmaLog, GuestMem, Interrupt, VirtioDevice};
use virtio::worker::inline;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::Input;

/// Guest memory size in bytes.
pub const MEM_SIZE: u64 = 0x40000;
/// GPA of queue 0's used ring (queue `i`'s is `i` × 4 KiB above); guest memory from the
/// input stops here.
pub const USED_BASE: u64 = 0x30000;
/// Most events the device serves after one script step (a bound on the work of one step).
const ROUNDS: usize = 16;
/// `VIRTIO_RING_F_EVENT_IDX`.
const EVENT_IDX: u64 = 1 << 29;

/// Counts interrupts (nothing to deliver them to).
struct NoIrq;
impl Interrupt for NoIrq {
    fn notify_queue(&self, _queue: u16) {}
    fn notify_config(&self) {}
}

/// What a device target's input says, parsed.
struct Plan<'a> {
    features: u64,
    sizes: [u16; 4],
    options: u8,
    script: &'a [u8],
    host: Input<'a>,
    memory: &'a [u8],
}

impl<'a> Plan<'a> {
    fn parse(data: &'a [u8]) -> Plan<'a> {
        let mut i = Input::new(data);
        let features = i.u64();
        let sizes = [0; 4].map(|_: u16| 1u16 << (i.u8() % 8));
        let options = i.u8();
        let script_len = usize::from(i.u8());
        let host_len = usize::from(i.u16());
        let script = i.bytes(script_len);
        let host = Input::new(i.bytes(host_len));
        let memory = i.rest();
        Plan { features, sizes, options, script, host, memory }
    }

    /// The next host data chunk (`u16` length, then bytes).
    fn host_chunk(&mut self) -> &'a [u8] {
        let n = usize::from(self.host.u16());
        self.host.bytes(n)
    }
}

/// Where queue `i`'s rings are, for queues of `sizes` entries: (descriptor table, available
/// ring, used ring) GPAs.
pub fn ring_layout(sizes: &[u16]) -> Vec<(u64, u64, u64)> {
    let mut at = 0u64;
    let mut v = Vec::new();
    for (i, &s) in sizes.iter().enumerate() {
        let desc = at;
        let avail = (desc + 16 * u64::from(s)).next_multiple_of(16);
        at = (avail + 6 + 2 * u64::from(s)).next_multiple_of(16);
        v.push((desc, avail, USED_BASE + 0x1000 * i as u64));
    }
    v
}

/// A ready queue of `size` entries at the given ring GPAs.
fn make_queue(max: u16, size: u16, (desc, avail, used): (u64, u64, u64), event_idx: bool) -> Option<Queue> {
    let mut q = Queue::new(max).ok()?;
    q.set_size(size.min(max));
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(desc);
    q.set_desc_table_address(lo, hi);
    let (lo, hi) = split(avail);
    q.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(used);
    q.set_used_ring_address(lo, hi);
    q.set_event_idx(event_idx);
    q.set_ready(true);
    Some(q)
}

/// Host-side events of one device.
trait Host {
    /// Delivers one host data chunk to the device.
    fn event(&mut self, chunk: &[u8]);
}

/// No host-side events.
struct Quiet;
impl Host for Quiet {
    fn event(&mut self, _chunk: &[u8]) {}
}

/// What a device did in one run (its counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Work {
    /// Requests completed.
    pub requests: u64,
    /// Requests failed.
    pub errors: u64,
}

/// Activates `dev` on the input's queues and runs the input's script.
fn drive(dev: &mut dyn VirtioDevice, mut plan: Plan<'_>, host: &mut dyn Host) -> Option<Work> {
    inline::enable();
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]) else { return None };
    let mem: GuestMem = mem;
    let image = plan.memory.get(..plan.memory.len().min(USED_BASE as usize)).unwrap_or_default();
    if mem.write_slice(image, GuestAddress(0)).is_err() {
        return None;
    }
    let max_sizes = dev.queue_max_sizes();
    let nq = max_sizes.len().min(plan.sizes.len());
    let sizes: Vec<u16> = plan.sizes.iter().zip(&max_sizes).map(|(&s, &m)| s.min(m)).collect();
    let layout = ring_layout(&sizes);
    let acked = (plan.features & dev.device_features()) | virtio::VIRTIO_F_VERSION_1;
    let mut queues = Vec::new();
    let mut kicks = Vec::new();
    for (i, &max) in max_sizes.iter().enumerate() {
        let (size, rings) = match (sizes.get(i), layout.get(i)) {
            (Some(&s), Some(&l)) => (s, l),
            // A queue the driver did not enable.
            _ => (max, (0, 0, 0)),
        };
        let mut q = make_queue(max, size, rings, acked & EVENT_IDX != 0)?;
        if i >= nq {
            q.set_ready(false);
        }
        let Ok(evt) = EventFd::new(EFD_NONBLOCK) else { return None };
        queues.push(q);
        kicks.push(evt);
    }
    // Each kick eventfd is shared by the device (its copy) and the driver (ours).
    let mut driver_kicks = Vec::new();
    for k in &kicks {
        let Ok(c) = k.try_clone() else { return None };
        driver_kicks.push(c);
    }
    let ctx = ActivateContext {
        mem: mem.clone(),
        acked_features: acked,
        queues,
        queue_evts: kicks,
        interrupt: Arc::new(NoIrq),
        dma: Arc::new(DmaLog::default()),
        resumed: false,
    };
    if dev.activate(ctx).is_err() {
        return None;
    }
    inline::run(ROUNDS);
    let script: Vec<u8> = if plan.script.is_empty() { (0..nq as u8).collect() } else { plan.script.to_vec() };
    for b in script {
        let q = usize::from(b & 3) % nq.max(1);
        if b & 0x40 != 0 {
            if let Some(&(_, avail, _)) = layout.get(q) {
                let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap_or(0);
                let _ = mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2));
            }
        }
        if b & 0x80 != 0 {
            let chunk = plan.host_chunk();
            host.event(chunk);
        } else if let Some(k) = driver_kicks.get(q) {
            let _ = k.write(1);
        }
        inline::run(ROUNDS);
    }
    // The driver resets the device: it must let go of the queues at once.
    let done = dev.reset();
    debug_assert!(done.is_done(), "an inline device resets synchronously");
    let c = dev.counters();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    Some(Work { requests: load(&c.requests), errors: load(&c.errors) })
}

/// `virtio_blk`: requests (IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES, unknown types) on a
/// 64 KiB raw disk image, rewritten before each run.
pub fn blk(data: &[u8]) {
    let _ = blk_work(data);
}

/// [`blk`], returning what the device did.
pub fn blk_work(data: &[u8]) -> Option<Work> {
    let plan = Plan::parse(data);
    let path = crate::scratch_dir().join(format!("virtio-blk-{:?}.img", std::thread::current().id()));
    let content: Vec<u8> = (0..64u32 << 10).map(|i| (i / 512) as u8).collect();
    if std::fs::write(&path, content).is_err() {
        return None;
    }
    let Ok(img) = block::DiskImage::open(&path, block::Format::Raw, false) else { return None };
    let mut dev = virtio::block::Block::new(img, plan.options & 1 != 0, Some("fuzz-serial".into()));
    drive(&mut dev, plan, &mut Quiet)
}

/// A TAP stand-in: frames the host sends come from the input; frames the guest sends are
/// dropped.
struct FuzzTap {
    ready: EventFd,
    frames: Mutex<VecDeque<Vec<u8>>>,
}

impl virtio::net::FrameIo for FuzzTap {
    fn raw_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }
    fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut q = self.frames.lock().unwrap_or_else(|e| e.into_inner());
        let Some(f) = q.pop_front() else {
            let _ = self.ready.read();
            return Err(std::io::ErrorKind::WouldBlock.into());
        };
        let n = f.len().min(buf.len());
        if let (Some(dst), Some(src)) = (buf.get_mut(..n), f.get(..n)) {
            dst.copy_from_slice(src);
        }
        Ok(n)
    }
    fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        Ok(frame.len())
    }
}

struct NetHost(Arc<FuzzTap>);
impl Host for NetHost {
    fn event(&mut self, chunk: &[u8]) {
        self.0.frames.lock().unwrap_or_else(|e| e.into_inner()).push_back(chunk.to_vec());
        let _ = self.0.ready.write(1);
    }
}

/// `virtio_net`: transmit chains, receive buffers (mergeable or not) and frames arriving from
/// the host (host data chunks, each one frame: a 12-byte `virtio_net_hdr_v1` and Ethernet).
pub fn net(data: &[u8]) {
    let _ = net_work(data);
}

/// [`net`], returning what the device did.
pub fn net_work(data: &[u8]) -> Option<Work> {
    let plan = Plan::parse(data);
    let Ok(ready) = EventFd::new(EFD_NONBLOCK) else { return None };
    let tap = Arc::new(FuzzTap { ready, frames: Mutex::new(VecDeque::new()) });
    let mut dev = virtio::net::Net::with_io(tap.clone(), [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    drive(&mut dev, plan, &mut NetHost(tap))
}

/// `virtio_rng`: entropy requests.
pub fn rng(data: &[u8]) {
    let _ = rng_work(data);
}

/// [`rng`], returning what the device did.
pub fn rng_work(data: &[u8]) -> Option<Work> {
    let plan = Plan::parse(data);
    let mut dev = virtio::rng::Rng::new();
    drive(&mut dev, plan, &mut Quiet)
}

struct ConsoleHost(virtio::console::InputSender);
impl Host for ConsoleHost {
    fn event(&mut self, chunk: &[u8]) {
        self.0.send(chunk);
    }
}

/// `virtio_console`: transmit chains (to a sink) and receive buffers filled with host input
/// (host data chunks).
pub fn console(data: &[u8]) {
    let _ = console_work(data);
}

/// [`console`], returning what the device did.
pub fn console_work(data: &[u8]) -> Option<Work> {
    let plan = Plan::parse(data);
    let Ok(mut dev) = virtio::console::Console::new(Box::new(std::io::sink()), None) else { return None };
    let mut host = ConsoleHost(dev.input_sender());
    drive(&mut dev, plan, &mut host)
}

struct BalloonHost(virtio::balloon::BalloonHandle);
impl Host for BalloonHost {
    fn event(&mut self, chunk: &[u8]) {
        let mut i = Input::new(chunk);
        self.0.set_target_pages(i.u32());
    }
}

/// `virtio_balloon`: inflate and deflate PFN lists (pages outside guest memory included),
/// statistics buffers, free page reports, and host changes of the target (host data chunks:
/// a `u32` number of pages).
pub fn balloon(data: &[u8]) {
    let _ = balloon_work(data);
}

/// [`balloon`], returning what the device did.
pub fn balloon_work(data: &[u8]) -> Option<Work> {
    let plan = Plan::parse(data);
    let opts = virtio::balloon::BalloonOptions {
        deflate_on_oom: true,
        stats_interval: (plan.options & 2 == 0).then_some(std::time::Duration::from_secs(3600)),
        free_page_reporting: plan.options & 4 != 0,
    };
    let mut dev = virtio::balloon::Balloon::new(opts);
    let mut host = BalloonHost(dev.handle());
    drive(&mut dev, plan, &mut host)
}

/// Host programs connected to the vsock device's Unix socket.
struct VsockHost {
    path: std::path::PathBuf,
    conns: Vec<UnixStream>,
}
impl Host for VsockHost {
    fn event(&mut self, chunk: &[u8]) {
        // An empty chunk closes the oldest connection; any other connects (at most 8) and
        // writes the chunk ("CONNECT <port>\n" and data).
        if chunk.is_empty() {
            if !self.conns.is_empty() {
                self.conns.remove(0);
            }
            return;
        }
        if self.conns.len() < 8 {
            if let Ok(s) = UnixStream::connect(&self.path) {
                let _ = s.set_nonblocking(true);
                self.conns.push(s);
            }
        }
        if let Some(s) = self.conns.last_mut() {
            let _ = s.write_all(chunk);
        }
    }
}

/// `virtio_vsock`: packets from the guest on the transmit queue (requests to host ports,
/// data, credit updates, shutdowns, resets), receive buffers, and host programs that connect
/// to the device's Unix socket and write (host data chunks).
pub fn vsock(data: &[u8]) {
    let _ = vsock_work(data);
}

/// [`vsock`], returning what the device did.
pub fn vsock_work(data: &[u8]) -> Option<Work> {
    let plan = Plan::parse(data);
    let path = crate::scratch_dir().join(format!("vsock-{:?}.sock", std::thread::current().id()));
    let Ok(mut dev) = virtio::vsock::Vsock::new(3, path.clone()) else { return None };
    let mut host = VsockHost { path, conns: Vec::new() };
    drive(&mut dev, plan, &mut host)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seeds reach the devices: each serves requests (a harness that returned early
    /// would fuzz nothing).
    #[test]
    fn seeds_make_the_devices_work() {
        for (target, name, data) in crate::seeds::all() {
            let work = match target {
                "virtio_blk" => blk_work(&data),
                "virtio_net" => net_work(&data),
                "virtio_rng" => rng_work(&data),
                "virtio_console" => console_work(&data),
                "virtio_balloon" => balloon_work(&data),
                "virtio_vsock" => vsock_work(&data),
                _ => continue,
            };
            let work = work.unwrap_or_else(|| panic!("{target}/{name}: the harness gave up"));
            eprintln!("{target}/{name}: {work:?}");
            assert!(work.requests > 0, "{target}/{name}: no request served: {work:?}");
        }
    }
}

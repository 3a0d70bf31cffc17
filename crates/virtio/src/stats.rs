//! Per-device statistics beyond the common [`Counters`](crate::Counters): virtio-blk
//! operations, bytes and latency histograms ([`BlockStats`]), virtio-net packets, bytes,
//! drops and errors ([`NetStats`]). Every field is an atomic updated with `Relaxed` adds on
//! the worker thread (no lock on the request path); readers ([`VirtioDevice::stats`]) take
//! snapshots field by field, so a snapshot taken while requests complete may be a few
//! requests apart between fields, never torn within one.
//!
//! [`VirtioDevice::stats`]: crate::VirtioDevice::stats

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Upper bounds of the latency histograms' finite buckets, in seconds, ascending (50 µs to
/// 1 s); a last, unbounded bucket (`+Inf`) takes the rest.
pub const LATENCY_BOUNDS_S: [f64; 14] =
    [0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// [`LATENCY_BOUNDS_S`] in nanoseconds (what the request path compares against).
const LATENCY_BOUNDS_NS: [u64; 14] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
];

/// Buckets of a [`LatencyHistogram`]: the finite ones and `+Inf`.
const BUCKETS: usize = LATENCY_BOUNDS_NS.len() + 1;

/// A histogram of durations with the fixed buckets of [`LATENCY_BOUNDS_S`]: per-bucket
/// (non-cumulative) counts and the sum, lock-free.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// `buckets[i]`: observations in `(bound[i-1], bound[i]]`; the last one: above 1 s.
    buckets: [AtomicU64; BUCKETS],
    /// Sum of the observations, nanoseconds (saturating at about 584 years).
    sum_ns: AtomicU64,
}

/// A [`LatencyHistogram`] read at one moment, in the shape of a Prometheus histogram.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// The finite buckets' upper bounds, seconds ([`LATENCY_BOUNDS_S`]).
    pub bounds_s: Vec<f64>,
    /// Cumulative counts: `cumulative[i]` observations took at most `bounds_s[i]`.
    pub cumulative: Vec<u64>,
    /// Every observation (the `+Inf` bucket).
    pub count: u64,
    /// Sum of the observations, seconds.
    pub sum_s: f64,
}

impl LatencyHistogram {
    /// Counts one observation of `d`.
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_NS.partition_point(|&b| b < ns);
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        // Saturating: a wrap would make the sum go backwards.
        let _ = self.sum_ns.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| Some(s.saturating_add(ns)));
    }

    /// The histogram now, cumulative. `count` is the sum of the buckets read, so the
    /// snapshot is consistent in itself (`cumulative` never decreases and ends ≤ `count`).
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = Vec::with_capacity(LATENCY_BOUNDS_S.len());
        let mut running = 0u64;
        for (i, b) in self.buckets.iter().enumerate() {
            running = running.saturating_add(b.load(Ordering::Relaxed));
            if i < LATENCY_BOUNDS_S.len() {
                cumulative.push(running);
            }
        }
        HistogramSnapshot {
            bounds_s: LATENCY_BOUNDS_S.to_vec(),
            cumulative,
            count: running,
            sum_s: Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed)).as_secs_f64(),
        }
    }
}

/// virtio-blk statistics, from the guest's point of view: a read moves bytes from the disk
/// to the guest, a write from the guest to the disk. An operation is counted when its
/// request completes (status `VIRTIO_BLK_S_OK` or an error; failures are also in
/// [`Counters::errors`](crate::Counters::errors)); its bytes only when it succeeded. A
/// request kept by the `pause` error policy counts once, when it finally completes, with
/// its latency measured from when it was first taken off the virtqueue.
#[derive(Debug, Default)]
pub struct BlockStats {
    /// `VIRTIO_BLK_T_IN` requests completed.
    pub read_ops: AtomicU64,
    /// `VIRTIO_BLK_T_OUT` requests completed.
    pub write_ops: AtomicU64,
    /// `VIRTIO_BLK_T_FLUSH` requests completed.
    pub flush_ops: AtomicU64,
    /// Bytes read from the disk into the guest by successful reads.
    pub read_bytes: AtomicU64,
    /// Bytes written from the guest to the disk by successful writes.
    pub write_bytes: AtomicU64,
    /// Times a host I/O error stopped the request queue and asked the VMM to pause the VM
    /// (error policy `pause`).
    pub error_pauses: AtomicU64,
    /// Read latency: request taken off the virtqueue → status written.
    pub read_latency: LatencyHistogram,
    /// Write latency, as for reads.
    pub write_latency: LatencyHistogram,
    /// Flush latency, as for reads.
    pub flush_latency: LatencyHistogram,
}

/// virtio-net statistics, from the guest's point of view: rx = host → guest (frames read
/// from the TAP into receive buffers), tx = guest → host. Bytes are Ethernet frame bytes,
/// without the 12-byte `virtio_net_hdr_v1`.
///
/// While the guest has no receive buffer posted the device stops reading the TAP and the
/// frames wait in the host's TAP queue ([`NetStats::rx_no_buffers`] counts those waits);
/// what the host kernel drops from a full TAP queue shows in the TAP's own statistics
/// (`/sys/class/net/TAP/statistics/tx_dropped`), not here.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames delivered into the guest's receive buffers.
    pub rx_packets: AtomicU64,
    /// Bytes of those frames.
    pub rx_bytes: AtomicU64,
    /// Frames read from the TAP and dropped: larger than the receive buffers the guest
    /// posted (or than its whole ring), or whose buffers could not be written.
    pub rx_dropped: AtomicU64,
    /// Failed TAP reads and frames of a length the device does not take (runt, over
    /// [`MAX_FRAME_LEN`](crate::net::MAX_FRAME_LEN), empty).
    pub rx_errors: AtomicU64,
    /// Times a frame waited because the guest had no receive buffer posted.
    pub rx_no_buffers: AtomicU64,
    /// Frames written whole to the TAP.
    pub tx_packets: AtomicU64,
    /// Bytes of those frames.
    pub tx_bytes: AtomicU64,
    /// Transmit chains dropped for the guest's fault: malformed, outside guest memory, a
    /// frame shorter than an Ethernet header or longer than
    /// [`MAX_FRAME_LEN`](crate::net::MAX_FRAME_LEN), or a corrupt available ring.
    pub tx_dropped: AtomicU64,
    /// TAP write errors and short writes (the frame is lost).
    pub tx_errors: AtomicU64,
}

/// A device's statistics beyond the common counters ([`VirtioDevice::stats`]).
///
/// [`VirtioDevice::stats`]: crate::VirtioDevice::stats
#[derive(Debug, Clone, Default)]
pub enum DeviceStats {
    /// None (rng, console, vsock, balloon).
    #[default]
    None,
    /// A virtio-blk device's.
    Block(Arc<BlockStats>),
    /// A virtio-net device's.
    Net(Arc<NetStats>),
}

/// Adds `n` to `c` (`Relaxed`).
pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_upper_bounds_and_the_snapshot_is_cumulative() {
        let h = LatencyHistogram::default();
        let snap = h.snapshot();
        assert_eq!((snap.count, snap.sum_s), (0, 0.0));
        assert_eq!(snap.cumulative, vec![0; 14]);
        assert_eq!(snap.bounds_s, LATENCY_BOUNDS_S.to_vec());
        for (i, (&s, &ns)) in LATENCY_BOUNDS_S.iter().zip(&LATENCY_BOUNDS_NS).enumerate() {
            assert_eq!(Duration::from_secs_f64(s).as_nanos(), u128::from(ns), "bound {i}");
        }
        h.record(Duration::from_micros(10)); // ≤ 50 µs
        h.record(Duration::from_micros(50)); // exactly a bound: in that bucket (≤)
        h.record(Duration::from_micros(51)); // ≤ 100 µs
        h.record(Duration::from_millis(3)); // ≤ 5 ms
        h.record(Duration::from_secs(2)); // +Inf only
        h.record(Duration::MAX); // +Inf, and the sum saturates instead of wrapping
        let s = h.snapshot();
        assert_eq!(s.count, 6);
        assert_eq!(s.cumulative, vec![2, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4]);
        assert!(s.cumulative.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(s.sum_s, Duration::from_nanos(u64::MAX).as_secs_f64());
        let h = LatencyHistogram::default();
        h.record(Duration::from_millis(1));
        h.record(Duration::from_millis(2));
        assert!((h.snapshot().sum_s - 0.003).abs() < 1e-12);
    }
}

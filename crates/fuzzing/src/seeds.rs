//! Seed inputs: a few valid inputs per target, built here from the formats' definitions (so
//! they stay in step with the input layouts), written to `fuzz/corpus/<target>/seed-*` by the
//! ignored test `write_seeds` (`cargo test -p fuzzing --test corpus -- --ignored`).
//!
//! Where a real file is better than a built one (a bzImage header, an ELF vmlinux with its
//! PVH note), the seeds take a slice of the Debian guest's kernel from `guest/` when it is
//! there.

use std::path::Path;

use crate::virtio_dev::{ring_layout, USED_BASE};

/// One seed: target, name, bytes.
pub type Seed = (&'static str, String, Vec<u8>);

/// A virtio device target's input under construction (see [`crate::virtio_dev`]).
struct Virtq {
    features: u64,
    sizes: [u8; 4],
    options: u8,
    script: Vec<u8>,
    host: Vec<u8>,
    mem: Vec<u8>,
    /// Per queue: next free descriptor, avail index.
    next: Vec<(u16, u16)>,
}

/// Device-writable.
const W: bool = true;
/// Device-readable.
const R: bool = false;

impl Virtq {
    fn new(features: u64, log_sizes: &[u8]) -> Virtq {
        let mut sizes = [0u8; 4];
        for (s, &l) in sizes.iter_mut().zip(log_sizes) {
            *s = l;
        }
        Virtq {
            features,
            sizes,
            options: 0,
            script: Vec::new(),
            host: Vec::new(),
            mem: vec![0; 0x2000],
            next: vec![(0, 0); log_sizes.len()],
        }
    }

    fn layout(&self) -> Vec<(u64, u64, u64)> {
        let n = self.next.len();
        let sizes: Vec<u16> = self.sizes.iter().take(n).map(|&l| 1u16 << (l % 8)).collect();
        ring_layout(&sizes)
    }

    fn put(&mut self, at: u64, bytes: &[u8]) {
        let at = at as usize;
        if self.mem.len() < at + bytes.len() {
            self.mem.resize(at + bytes.len(), 0);
        }
        if let Some(dst) = self.mem.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }

    /// Adds a chain of `(gpa, len, device-writable)` buffers on queue `q` and publishes it.
    fn chain(&mut self, q: usize, bufs: &[(u64, u32, bool)]) {
        let layout = self.layout();
        let Some(&(desc, avail, _)) = layout.get(q) else { return };
        let size = 1u16 << (self.sizes.get(q).copied().unwrap_or(0) % 8);
        let Some(&(first, idx)) = self.next.get(q) else { return };
        for (k, &(addr, len, w)) in bufs.iter().enumerate() {
            let i = first + k as u16;
            let last = k + 1 == bufs.len();
            let flags: u16 = if last { 0 } else { 1 } | if w { 2 } else { 0 };
            let next = if last { 0 } else { i + 1 };
            let mut d = Vec::new();
            d.extend_from_slice(&addr.to_le_bytes());
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&flags.to_le_bytes());
            d.extend_from_slice(&next.to_le_bytes());
            self.put(desc + 16 * u64::from(i % size), &d);
        }
        self.put(avail + 4 + 2 * u64::from(idx % size), &first.to_le_bytes());
        self.put(avail + 2, &(idx + 1).to_le_bytes());
        if let Some(n) = self.next.get_mut(q) {
            *n = (first + bufs.len() as u16, idx + 1);
        }
    }

    fn host_chunk(&mut self, chunk: &[u8]) {
        self.host.extend_from_slice(&(chunk.len() as u16).to_le_bytes());
        self.host.extend_from_slice(chunk);
    }

    fn bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&self.features.to_le_bytes());
        v.extend_from_slice(&self.sizes);
        v.push(self.options);
        v.push(self.script.len() as u8);
        v.extend_from_slice(&(self.host.len() as u16).to_le_bytes());
        v.extend_from_slice(&self.script);
        v.extend_from_slice(&self.host);
        let mut mem = self.mem.clone();
        mem.truncate(USED_BASE as usize);
        while mem.last() == Some(&0) {
            mem.pop();
        }
        v.extend_from_slice(&mem);
        v
    }
}

const EVENT_IDX: u64 = 1 << 29;
const INDIRECT: u64 = 1 << 28;

fn blk_header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn virtio_blk() -> Vec<Seed> {
    use virtio::block::*;
    let mut out = Vec::new();
    for (name, features) in [
        ("all-features", VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES | EVENT_IDX),
        ("plain", 0),
    ] {
        let mut v = Virtq::new(features, &[5]);
        v.put(0x1000, &blk_header(VIRTIO_BLK_T_IN, 2));
        v.chain(0, &[(0x1000, 16, R), (0x2000, 1024, W), (0x1f00, 1, W)]);
        v.put(0x1010, &blk_header(VIRTIO_BLK_T_OUT, 4));
        v.put(0x2400, &[0xab; 512]);
        v.chain(0, &[(0x1010, 16, R), (0x2400, 512, R), (0x1f01, 1, W)]);
        v.put(0x1020, &blk_header(VIRTIO_BLK_T_FLUSH, 0));
        v.chain(0, &[(0x1020, 16, R), (0x1f02, 1, W)]);
        v.put(0x1030, &blk_header(VIRTIO_BLK_T_GET_ID, 0));
        v.chain(0, &[(0x1030, 16, R), (0x2600, 20, W), (0x1f03, 1, W)]);
        v.put(0x1040, &blk_header(VIRTIO_BLK_T_DISCARD, 0));
        // virtio_blk_discard_write_zeroes: sector, num_sectors, flags.
        let mut seg = 8u64.to_le_bytes().to_vec();
        seg.extend_from_slice(&8u32.to_le_bytes());
        seg.extend_from_slice(&0u32.to_le_bytes());
        v.put(0x2700, &seg);
        v.chain(0, &[(0x1040, 16, R), (0x2700, 16, R), (0x1f04, 1, W)]);
        v.put(0x1050, &blk_header(VIRTIO_BLK_T_WRITE_ZEROES, 0));
        v.chain(0, &[(0x1050, 16, R), (0x2700, 16, R), (0x1f05, 1, W)]);
        v.put(0x1060, &blk_header(99, 0));
        v.chain(0, &[(0x1060, 16, R), (0x1f06, 1, W)]);
        out.push(("virtio_blk", format!("seed-{name}"), v.bytes()));
    }
    // A read-only disk and an indirect table.
    let mut v = Virtq::new(INDIRECT, &[3]);
    v.options = 1;
    // An IN through the indirect table (served), then a direct OUT (refused: read-only).
    v.put(0x1000, &blk_header(VIRTIO_BLK_T_IN, 0));
    let mut table = Vec::new();
    for (k, (addr, len, flags)) in [(0x1000u64, 16u32, 1u16), (0x2000, 512, 3), (0x1f00, 1, 2)].into_iter().enumerate()
    {
        table.extend_from_slice(&addr.to_le_bytes());
        table.extend_from_slice(&len.to_le_bytes());
        table.extend_from_slice(&flags.to_le_bytes());
        table.extend_from_slice(&(k as u16 + 1).to_le_bytes());
    }
    v.put(0x3000, &table);
    let layout = v.layout();
    if let Some(&(desc, avail, _)) = layout.first() {
        let mut d = 0x3000u64.to_le_bytes().to_vec();
        d.extend_from_slice(&48u32.to_le_bytes());
        d.extend_from_slice(&4u16.to_le_bytes());
        d.extend_from_slice(&0u16.to_le_bytes());
        v.put(desc, &d);
        v.put(avail + 2, &1u16.to_le_bytes());
        v.next = vec![(1, 1)];
    }
    v.put(0x1010, &blk_header(VIRTIO_BLK_T_OUT, 0));
    v.chain(0, &[(0x1010, 16, R), (0x2400, 512, R), (0x1f01, 1, W)]);
    out.push(("virtio_blk", "seed-readonly-indirect".into(), v.bytes()));
    out
}

fn net_frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x52, 0x54, 0, 0xaa, 0xbb, 0xcc, 0x08, 0x00]);
    f.extend((0..len).map(|i| i as u8));
    f
}

fn virtio_net() -> Vec<Seed> {
    let mut out = Vec::new();
    for (name, features) in [("mergeable", virtio::net::VIRTIO_NET_F_MRG_RXBUF | EVENT_IDX), ("plain", 0)] {
        let mut v = Virtq::new(features, &[3, 3]);
        for k in 0..4u64 {
            v.chain(0, &[(0x4000 + k * 0x800, 0x800, W)]);
        }
        let frame = net_frame(60);
        v.put(0x1000, &frame);
        v.chain(1, &[(0x1000, 12, R), (0x100c, frame.len() as u32 - 12, R)]);
        v.host_chunk(&net_frame(100));
        v.host_chunk(&net_frame(3000));
        v.script = vec![1, 0x80, 0, 0x80, 0];
        out.push(("virtio_net", format!("seed-{name}"), v.bytes()));
    }
    out
}

fn virtio_rng() -> Vec<Seed> {
    let mut v = Virtq::new(EVENT_IDX, &[2]);
    v.chain(0, &[(0x1000, 8, R), (0x1100, 64, W), (0x1200, 0, W)]);
    v.chain(0, &[(0x1300, 0x20000, W)]);
    vec![("virtio_rng", "seed-requests".into(), v.bytes())]
}

fn virtio_console() -> Vec<Seed> {
    let mut v = Virtq::new(0, &[2, 2]);
    v.chain(0, &[(0x1000, 64, W)]);
    v.chain(0, &[(0x1100, 64, W)]);
    v.put(0x1800, b"hello from the guest\n");
    v.chain(1, &[(0x1800, 21, R)]);
    v.host_chunk(b"ls -l\n");
    v.script = vec![1, 0x80, 0];
    vec![("virtio_console", "seed-io".into(), v.bytes())]
}

fn virtio_balloon() -> Vec<Seed> {
    let mut v = Virtq::new(1 << 1, &[2, 2, 2]);
    let pfns: Vec<u8> = [0x10u32, 0x11, 0x12, 0x30, 0x9_9999].iter().flat_map(|p| p.to_le_bytes()).collect();
    v.put(0x1000, &pfns);
    v.chain(0, &[(0x1000, pfns.len() as u32, R)]);
    v.chain(1, &[(0x1000, 8, R)]);
    // Statistics: (tag u16, value u64) pairs.
    let stats: Vec<u8> =
        (0u16..6).flat_map(|t| t.to_le_bytes().into_iter().chain((u64::from(t) << 20).to_le_bytes())).collect();
    v.put(0x1100, &stats);
    v.chain(2, &[(0x1100, stats.len() as u32, R)]);
    v.host_chunk(&16u32.to_le_bytes());
    v.script = vec![0, 1, 2, 0x80, 0x42];
    let mut seeds = vec![("virtio_balloon", "seed-inflate-deflate-stats".into(), v.bytes())];
    // Free page reporting, no statistics queue: inflate, deflate, reporting.
    let mut v = Virtq::new(1 << 5, &[2, 2, 2]);
    v.options = 2 | 4;
    v.chain(2, &[(0x8000, 0x2000, W)]);
    v.script = vec![2];
    seeds.push(("virtio_balloon", "seed-reporting".into(), v.bytes()));
    seeds
}

fn vsock_packet(op: u16, src_port: u32, dst_port: u32, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&3u64.to_le_bytes());
    h.extend_from_slice(&2u64.to_le_bytes());
    h.extend_from_slice(&src_port.to_le_bytes());
    h.extend_from_slice(&dst_port.to_le_bytes());
    h.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&op.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&65536u32.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(payload);
    h
}

fn virtio_vsock() -> Vec<Seed> {
    use virtio::vsock::packet::*;
    let mut v = Virtq::new(EVENT_IDX, &[3, 3, 1]);
    for k in 0..4u64 {
        v.chain(0, &[(0x4000 + k * 0x1000, 0x1000, W)]);
    }
    let pkts = [
        vsock_packet(OP_REQUEST, 1234, 5000, b""),
        vsock_packet(OP_RW, 1234, 5000, b"data for nobody"),
        vsock_packet(OP_CREDIT_REQUEST, 1234, 5000, b""),
        vsock_packet(OP_SHUTDOWN, 1234, 5000, b""),
        vsock_packet(OP_RST, 1234, 5000, b""),
    ];
    let mut at = 0x1000u64;
    for p in &pkts {
        v.put(at, p);
        v.chain(1, &[(at, HDR_LEN as u32, R), (at + HDR_LEN as u64, (p.len() - HDR_LEN) as u32, R)]);
        at += 0x100;
    }
    v.host_chunk(b"CONNECT 1024\n");
    v.host_chunk(b"hello\n");
    v.host_chunk(b"");
    v.script = vec![0, 1, 0x80, 0, 0x80, 0x80, 0];
    vec![("virtio_vsock", "seed-packets".into(), v.bytes())]
}

/// A virtio-pci operation (see [`crate::virtio_pci`]).
fn pci_op(kind: u8, size_log: u8, offset: u16, value: u64) -> Vec<u8> {
    let mut v = vec![kind, size_log];
    v.extend_from_slice(&offset.to_le_bytes());
    v.extend_from_slice(&value.to_le_bytes());
    v
}

fn virtio_pci() -> Vec<Seed> {
    let mut seeds = Vec::new();
    for (device, name) in [(0u8, "rng"), (1, "console"), (2, "balloon"), (3, "net")] {
        // Driver initialisation (virtio 1.2 §3.1.1) of queue 0 through the common
        // configuration, MSI-X set up, a notification, an ISR read, a snapshot.
        let mut ops = vec![
            pci_op(0, 2, 0, 0x8000_0800), // CONFIG_ADDRESS: device 1, register 0
            pci_op(1, 2, 0, 0),           // vendor and device ID
            pci_op(0, 2, 0, 0x8000_0804), // command register
            pci_op(2, 1, 0, 0x0006),      // memory space, bus master
            pci_op(0, 2, 0, 0x8000_0810), // BAR 0
            pci_op(1, 2, 0, 0),
            pci_op(4, 0, 0x14, 0),   // reset
            pci_op(4, 0, 0x14, 1),   // ACKNOWLEDGE
            pci_op(4, 0, 0x14, 3),   // DRIVER
            pci_op(4, 2, 0x00, 1),   // device_feature_select
            pci_op(3, 2, 0x04, 0),   // device_feature
            pci_op(4, 2, 0x08, 1),   // driver_feature_select 1
            pci_op(4, 2, 0x0c, 1),   // VERSION_1
            pci_op(4, 0, 0x14, 0xb), // FEATURES_OK
            pci_op(3, 0, 0x14, 0),
            pci_op(3, 1, 0x12, 0),             // num_queues
            pci_op(4, 1, 0x10, 0),             // config_msix_vector
            pci_op(4, 1, 0x16, 0),             // queue_select 0
            pci_op(4, 1, 0x18, 8),             // queue_size
            pci_op(4, 1, 0x1a, 1),             // queue_msix_vector
            pci_op(4, 3, 0x20, 0),             // queue_desc
            pci_op(4, 3, 0x28, 0x80),          // queue_driver
            pci_op(4, 3, 0x30, 0x3_0000),      // queue_device
            pci_op(4, 1, 0x1c, 1),             // queue_enable
            pci_op(4, 2, 0x4000, 0xfee0_0000), // MSI-X entry 0 address
            pci_op(4, 2, 0x4008, 0x41),        // data
            pci_op(4, 2, 0x400c, 0),           // unmasked
            pci_op(4, 2, 0x4010, 0xfee0_0000),
            pci_op(4, 2, 0x4018, 0x42),
            pci_op(4, 2, 0x401c, 0),
            pci_op(0, 2, 0, 0x8000_0840), // the MSI-X capability's dword
            pci_op(1, 2, 0, 0),
            pci_op(4, 0, 0x14, 0xf), // DRIVER_OK
            pci_op(4, 1, 0x3000, 0), // notify queue 0
            pci_op(5, 0, 0, 0),
            pci_op(3, 0, 0x1000, 0), // ISR
            pci_op(3, 2, 0x2000, 0), // device configuration
            pci_op(3, 2, 0x6000, 0), // PBA
            pci_op(6, 0, 0, 0),      // save/restore
            pci_op(7, 0, 0, 0),      // quiesce/resume
            pci_op(4, 0, 0x14, 0),   // reset
        ];
        let mut input = vec![device, ops.len() as u8];
        input.extend(ops.drain(..).flatten());
        // Guest memory: queue 0 (8 entries) with one chain of a writable buffer.
        let mut mem = vec![0u8; 0x1100];
        let d: Vec<u8> = [
            0x1000u64.to_le_bytes().to_vec(),
            64u32.to_le_bytes().to_vec(),
            2u16.to_le_bytes().to_vec(),
            0u16.to_le_bytes().to_vec(),
        ]
        .concat();
        mem.get_mut(..16).unwrap_or_default().copy_from_slice(&d);
        if let Some(a) = mem.get_mut(0x80..0x86) {
            a.copy_from_slice(&[0, 0, 1, 0, 0, 0]);
        }
        input.extend_from_slice(&mem);
        seeds.push(("virtio_pci", format!("seed-init-{name}"), input));
    }
    seeds
}

/// A legacy-device operation (see [`crate::legacy`]).
fn dev_op(kind: u8, size_log: u8, addr: u16, value: u32) -> Vec<u8> {
    let mut v = vec![kind, size_log];
    v.extend_from_slice(&addr.to_le_bytes());
    v.extend_from_slice(&value.to_le_bytes());
    v
}

fn legacy_devices() -> Vec<Seed> {
    let port = |p: u16| 0x8000 | p;
    let out = |p: u16, v: u32| dev_op(1, 0, port(p), v);
    let inp = |p: u16| dev_op(0, 0, port(p), 0);
    let pic_pit: Vec<Vec<u8>> = vec![
        // PIC: ICW1-ICW4 on both, unmask IRQ 0.
        out(0x20, 0x11),
        out(0x21, 0x20),
        out(0x21, 4),
        out(0x21, 1),
        out(0xa0, 0x11),
        out(0xa1, 0x28),
        out(0xa1, 2),
        out(0xa1, 1),
        out(0x21, 0xfe),
        out(0xa1, 0xff),
        // PIT channel 0, mode 2, 1 ms; channel 2 gate on.
        out(0x43, 0x34),
        out(0x40, 0xa9),
        out(0x40, 0x04),
        out(0x61, 1),
        dev_op(6, 0, 0, 5_000_000),
        dev_op(9, 0, 0, 0),
        out(0x20, 0x20),
        out(0x43, 0xc2),
        inp(0x40),
        inp(0x40),
        inp(0x61),
        out(0x20, 0x0b),
        inp(0x20),
        out(0x4d0, 0x08),
        inp(0x4d0),
        dev_op(7, 0, 3, 1),
        dev_op(9, 0, 0, 0),
        dev_op(7, 0, 3, 0),
        dev_op(11, 0, 0, 0),
    ];
    let serial_cmos: Vec<Vec<u8>> = vec![
        // 16550: divisor latch, 8N1, FIFO, interrupts, a byte out, status in.
        out(0x3fb, 0x80),
        out(0x3f8, 1),
        out(0x3f9, 0),
        out(0x3fb, 3),
        out(0x3fa, 0xc7),
        out(0x3f9, 0x0f),
        out(0x3fc, 0x0b),
        out(0x3f8, b'A'.into()),
        inp(0x3fd),
        inp(0x3fa),
        dev_op(10, 1, 0, 0x0a0d),
        inp(0x3f8),
        out(0x3fc, 0x10),
        out(0x3f8, 0x55),
        inp(0x3f8),
        // CMOS: time, status registers, memory size bytes, NMI mask bit.
        out(0x70, 0x00),
        inp(0x71),
        out(0x70, 0x0a),
        inp(0x71),
        out(0x70, 0x0b),
        out(0x71, 0x42),
        out(0x70, 0x0c),
        inp(0x71),
        out(0x70, 0x34),
        inp(0x71),
        out(0x70, 0x8f),
        inp(0x71),
        dev_op(6, 0, 0, 1_000_000_000),
        out(0x70, 0x0c),
        inp(0x71),
        // i8042: status, self-test, read/write command byte, pulse reset.
        inp(0x64),
        out(0x64, 0xaa),
        inp(0x60),
        out(0x64, 0x20),
        inp(0x60),
        out(0x64, 0x60),
        out(0x60, 0x47),
        out(0x64, 0xd1),
        out(0x60, 0xdf),
        out(0x64, 0xfe),
        // ACPI PM: enable, status, power button, S5.
        dev_op(1, 1, port(0x602), 0x100),
        dev_op(0, 1, port(0x600), 0),
        dev_op(1, 1, port(0x600), 0x100),
        dev_op(1, 1, port(0x604), 1),
        dev_op(1, 1, port(0x604), 0x3401),
        // PCI conf1: host bridge ID.
        dev_op(1, 2, port(0xcf8), 0x8000_0000),
        dev_op(0, 2, port(0xcfc), 0),
        dev_op(0, 0, port(0xcfb), 0),
        dev_op(11, 0, 0, 0),
    ];
    let apics: Vec<Vec<u8>> = vec![
        // LAPIC: enable (SVR), TPR, timer periodic with divide 16, ICR IPIs, EOI.
        dev_op(3, 2, 0xf0, 0x1ff),
        dev_op(3, 2, 0x80, 0),
        dev_op(3, 2, 0x3e0, 3),
        dev_op(3, 2, 0x320, 0x2_0030),
        dev_op(3, 2, 0x380, 10_000),
        dev_op(6, 0, 0, 2_000_000),
        dev_op(2, 2, 0x390, 0),
        dev_op(9, 0, 0, 0),
        dev_op(3, 2, 0xb0, 0),
        dev_op(3, 2, 0x310, 0x0100_0000),
        dev_op(3, 2, 0x300, 0x4031),
        dev_op(3, 2, 0x300, 0xc4500),
        dev_op(3, 2, 0x300, 0xc4608),
        dev_op(9, 0, 0, 0),
        dev_op(13, 2, 0xf0, 0x1ff),
        dev_op(12, 2, 0x20, 0),
        dev_op(12, 2, 0x30, 0),
        // IOAPIC: ID, version, redirection entry 3 to vector 0x33 on vCPU 0; raise the line.
        dev_op(5, 2, 0x00, 0),
        dev_op(4, 2, 0x10, 0),
        dev_op(5, 2, 0x00, 1),
        dev_op(4, 2, 0x10, 0),
        dev_op(5, 2, 0x00, 0x16),
        dev_op(5, 2, 0x10, 0xa033),
        dev_op(5, 2, 0x00, 0x17),
        dev_op(5, 2, 0x10, 0),
        dev_op(7, 0, 3, 1),
        dev_op(9, 0, 0, 0),
        dev_op(3, 2, 0xb0, 0),
        dev_op(7, 0, 3, 0),
        dev_op(8, 0, 0, 0x4035),
        dev_op(9, 0, 0, 0),
        dev_op(11, 0, 0, 0),
    ];
    vec![
        ("legacy_devices", "seed-pic-pit".into(), pic_pit.concat()),
        ("legacy_devices", "seed-serial-cmos-i8042-pm-pci".into(), serial_cmos.concat()),
        ("legacy_devices", "seed-lapic-ioapic".into(), apics.concat()),
    ]
}

fn x86emu() -> Vec<Seed> {
    // Hand-assembled.
    let long_loop = [
        0xb9, 0x64, 0, 0, 0, // mov ecx, 100
        0x48, 0x01, 0xc8, // add rax, rcx
        0xe2, 0xfb, // loop
        0xe6, 0x80, // out 0x80, al
        0x0f, 0xa2, // cpuid
        0x0f, 0x31, // rdtsc
        0x48, 0x89, 0x04, 0x25, 0x00, 0x00, 0x09, 0x00, // mov [0x90000], rax
        0xf3, 0x0f, 0x6f, 0x04, 0x25, 0x00, 0x00, 0x09, 0x00, // movdqu xmm0, [0x90000]
        0xd9, 0xe8, // fld1
        0x0f, 0x0b, // ud2
    ];
    let real = [
        0xb8, 0x34, 0x12, // mov ax, 0x1234
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xee, // out dx, al
        0xec, // in al, dx
        0xfa, // cli
        0xf4, // hlt
    ];
    let prot = [
        0xfb, // sti
        0xb8, 0x00, 0x00, 0xe0, 0xfe, // mov eax, 0xfee00000
        0x8b, 0x18, // mov ebx, [eax]
        0x90, // nop
        0xf4, // hlt
        0xeb, 0xfd, // jmp back to hlt
    ];
    let mut seeds = Vec::new();
    for (name, mode, irq, code) in
        [("long", 2u8, 0u8, &long_loop[..]), ("real", 0, 0, &real[..]), ("prot-irq", 1, 0x54, &prot[..])]
    {
        let mut v = vec![mode, irq];
        v.extend_from_slice(code);
        seeds.push(("x86emu", format!("seed-{name}"), v));
    }
    seeds
}

fn with_sel(sel: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![sel];
    v.extend_from_slice(body);
    v
}

/// Every field of a VMM configuration, as `vm.create` takes it.
pub const FULL_CONFIG: &str = r#"{"kernel":"/k","initrd":"/i","cmdline":"console=ttyS0","memory_mib":512,"cpus":1,"accel":"emu","serial":"file=/s.log","console":"null","disks":[{"path":"/d","format":"qcow2","readonly":true,"serial":"s1","allow_backing_outside":true,"allow_data_file":false}],"nets":[{"tap":"t0","mac":"52:54:00:12:34:56"}],"vsock":{"cid":3,"socket":"/v.sock"},"rng":true,"balloon":{"deflate_on_oom":false,"stats_interval_s":10,"free_page_reporting":true},"memory_options":{"mergeable":true,"hugepages":false,"thp":true}}"#;

fn api_vmm() -> Vec<Seed> {
    let mut s: Vec<Seed> = vec![
        ("api_vmm", "seed-create-full".into(), with_sel(0, FULL_CONFIG.as_bytes())),
        ("api_vmm", "seed-create-min".into(), with_sel(0, br#"{"kernel":"/boot/vmlinuz","memory_mib":64}"#)),
        ("api_vmm", "seed-snapshot".into(), with_sel(1, br#"{"destination_url":"file:///var/lib/snap%201"}"#)),
        ("api_vmm", "seed-restore".into(), with_sel(2, br#"{"source_url":"file:///var/lib/snap"}"#)),
        ("api_vmm", "seed-backup".into(), with_sel(3, br#"{"destination_url":"file:///b","rate_limit_mib_s":10}"#)),
        ("api_vmm", "seed-balloon".into(), with_sel(4, br#"{"target_mib":256}"#)),
        ("api_vmm", "seed-url".into(), with_sel(6, b"file:///a%20b/c%2fd")),
        ("api_vmm", "seed-bad-body".into(), with_sel(8, br#"{"kernel":3}"#)),
    ];
    for (k, opt) in [
        "path=/d.img,format=qcow2,readonly=on,serial=abc,on_error=pause,backing=allow",
        "tap=tap0,mac=52:54:00:12:34:56",
        "cid=3,socket=/tmp/v.sock",
        "deflate_on_oom=on,stats_interval_s=5,free_page_reporting=on",
        "mergeable=on,hugepages=off,thp=on",
        "emu",
        "file=/tmp/console.log",
        "52:54:00:12:34:56",
        "512M",
        "1G",
    ]
    .iter()
    .enumerate()
    {
        let mut v = vec![5, k as u8];
        v.extend_from_slice(opt.as_bytes());
        s.push(("api_vmm", format!("seed-option-{k}"), v));
    }
    let ping = serde_json::to_vec(&api::types::PingInfo {
        version: "0.1.0".into(),
        accelerators: vec!["emu".into()],
        pid: 1234,
    })
    .ok();
    if let Some(p) = ping {
        s.push(("api_vmm", "seed-answer-ping".into(), [vec![7, 0], p].concat()));
    }
    s
}

fn api_daemon() -> Vec<Seed> {
    let mut s: Vec<Seed> = vec![
        (
            "api_daemon",
            "seed-create".into(),
            with_sel(
                0,
                br#"{"name":"web","restart":"on-failure","autostart":true,"nics":[{"net":"lan0","vlan":20}],"volumes":[{"pool":"p","volume":"v"}],"resources":{"cpu_limit_pct":50},"config":{"kernel":"/k","memory_mib":256}}"#,
            ),
        ),
        ("api_daemon", "seed-update".into(), with_sel(1, br#"{"restart":"always","autostart":false}"#)),
        ("api_daemon", "seed-stop".into(), with_sel(2, br#"{"timeout_s":10}"#)),
        (
            "api_daemon",
            "seed-network".into(),
            with_sel(3, br#"{"name":"lan0","subnet":"10.77.0.1/24","dhcp":true,"nat":true,"vlan_filtering":true}"#),
        ),
        (
            "api_daemon",
            "seed-firewall".into(),
            with_sel(
                4,
                br#"{"name":"web","default_in":"drop","rules":[{"direction":"in","proto":"tcp","ports":"80-443","from":"10.0.0.0/8","action":"accept"}]}"#,
            ),
        ),
        ("api_daemon", "seed-pool".into(), [vec![5, 0], br#"{"name":"p","path":"/var/lib/pool"}"#.to_vec()].concat()),
        ("api_daemon", "seed-volume".into(), [vec![5, 1], br#"{"name":"v","size_bytes":1048576,"format":"qcow2"}"#.to_vec()].concat()),
        ("api_daemon", "seed-backup".into(), [vec![6, 1], br#"{}"#.to_vec()].concat()),
        ("api_daemon", "seed-snapshot".into(), [vec![6, 3], br#"{"name":"s1"}"#.to_vec()].concat()),
        ("api_daemon", "seed-name".into(), with_sel(9, b"web-01")),
    ];
    for (k, t) in [
        "GET /api/v1/events?vm=web&after=3&limit=10",
        "DELETE /api/v1/vms/web?force=true",
        "PUT /api/v1/vms/web/snapshots/s1/revert",
        "GET /api/v1/capacity?cpus=2&memory_mib=512&disk_bytes=1000&pool=p",
        "POST /api/v1/pools/p/volumes/v/clone",
    ]
    .iter()
    .enumerate()
    {
        s.push(("api_daemon", format!("seed-target-{k}"), with_sel(7, t.as_bytes())));
    }
    for (k, o) in [
        "net=lan0,vlan=20,mac=52:54:00:00:00:01,firewall=web",
        "on-failure",
        "high",
        "10.1.0.1/16",
        "in,tcp,22,accept",
        "running",
    ]
    .iter()
    .enumerate()
    {
        let mut v = vec![8, k as u8];
        v.extend_from_slice(o.as_bytes());
        s.push(("api_daemon", format!("seed-option-{k}"), v));
    }
    s
}

/// A valid snapshot state line: an emu VM with one vCPU at its reset state, fresh legacy
/// devices, one virtio-rng transport, 1 MiB of zero memory.
fn snapshot() -> Vec<Seed> {
    use accel::Vm as _;
    let mut seeds = Vec::new();
    let mut ram = vec![0u8; 1 << 20];
    let region = accel::RamRegion { gpa: 0, size: 1 << 20, host_addr: ram.as_mut_ptr() };
    let clock: accel::Clock = std::sync::Arc::new(|| 5_000_000);
    let spec = accel::VmSpec { ram: std::slice::from_ref(&region), clock, cpus: 1 };
    let Ok(vm) = accel::emu::EmuVm::new(&spec) else { return seeds };
    let Ok(vm_state) = vm.save_state() else { return seeds };
    let Ok(mut vcpu) = vm.create_vcpu(0) else { return seeds };
    let Ok(vcpu_state) = vcpu.save_snapshot() else { return seeds };
    let Ok(mem) = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]) else {
        return seeds;
    };
    struct Sink;
    impl devices::MsiSink for Sink {
        fn send_msi(&self, _: u64, _: u32) {}
    }
    let rng = virtio::pci::VirtioPci::new(
        Box::new(virtio::rng::Rng::new()),
        0xe000_0000,
        mem,
        std::sync::Arc::new(Sink),
        std::sync::Arc::new(virtio::DmaLog::default()),
        None,
    );
    let Ok(mut config) = serde_json::from_str::<vmm::VmConfig>(r#"{"kernel":"/k","memory_mib":1,"rng":true}"#) else {
        return seeds;
    };
    config.cpus = 1;
    let empty_sha: String = {
        use sha2::Digest;
        sha2::Sha256::new().finalize().iter().map(|x| format!("{x:02x}")).collect()
    };
    let state = vmm::persist::VmState {
        config,
        accelerator: "emu".into(),
        clock_ns: 5_000_000,
        vcpus: vec![vcpu_state],
        vm: vm_state,
        serial: devices::Serial::new(std::sync::Arc::new(devices::NoIrq), Box::new(std::io::sink())).state(),
        i8042: devices::I8042::new(Box::new(|| {})).state(),
        cmos: devices::Cmos::new(1 << 20, 0).state(),
        pm: devices::AcpiPm::new(Box::new(|| {})).state(),
        pci_config_address: 0x8000_0800,
        virtio: vec![rng.save_state()],
        balloon: None,
        memory: vmm::persist::memory::MemoryImage {
            file: "memory.bin".into(),
            size: 1 << 20,
            runs: vec![],
            sha256: empty_sha,
        },
    };
    drop(vcpu);
    drop(vm);
    drop(ram);
    if let Ok(body) = serde_json::to_vec(&state) {
        seeds.push(("snapshot", "seed-emu-rng".into(), [vec![0], body].concat()));
    }
    seeds
}

/// Reads up to `len` bytes of `path` from `offset`.
fn slice_of(path: &Path, offset: u64, len: usize) -> Option<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    f.seek(SeekFrom::Start(offset)).ok()?;
    let mut v = vec![0u8; len];
    let n = f.read(&mut v).ok()?;
    v.truncate(n);
    Some(v)
}

/// A minimal ELF64 vmlinux: one PT_LOAD at 16 MiB and a PT_NOTE with the PVH entry
/// (`XEN_ELFNOTE_PHYS32_ENTRY`, type 18).
fn tiny_pvh_elf() -> Vec<u8> {
    let mut f = vec![0u8; 0x1100];
    let mut put = |at: usize, b: &[u8]| {
        if let Some(d) = f.get_mut(at..at + b.len()) {
            d.copy_from_slice(b);
        }
    };
    put(0, b"\x7fELF\x02\x01\x01");
    put(16, &2u16.to_le_bytes()); // ET_EXEC
    put(18, &62u16.to_le_bytes()); // EM_X86_64
    put(20, &1u32.to_le_bytes());
    put(24, &0x100_0000u64.to_le_bytes()); // entry
    put(32, &64u64.to_le_bytes()); // phoff
    put(52, &64u16.to_le_bytes()); // ehsize
    put(54, &56u16.to_le_bytes()); // phentsize
    put(56, &2u16.to_le_bytes()); // phnum
                                  // PT_LOAD
    let ph = 64;
    put(ph, &1u32.to_le_bytes());
    put(ph + 4, &5u32.to_le_bytes());
    put(ph + 8, &0x1000u64.to_le_bytes());
    put(ph + 16, &0xffff_ffff_8100_0000u64.to_le_bytes());
    put(ph + 24, &0x100_0000u64.to_le_bytes());
    put(ph + 32, &0x100u64.to_le_bytes());
    put(ph + 40, &0x1000u64.to_le_bytes());
    put(ph + 48, &0x1000u64.to_le_bytes());
    // PT_NOTE
    let ph = 64 + 56;
    put(ph, &4u32.to_le_bytes());
    put(ph + 8, &0x200u64.to_le_bytes());
    put(ph + 32, &20u64.to_le_bytes());
    put(ph + 40, &20u64.to_le_bytes());
    put(ph + 48, &4u64.to_le_bytes());
    // The note: namesz 4, descsz 4, type 18, "Xen\0", entry.
    put(0x200, &4u32.to_le_bytes());
    put(0x204, &4u32.to_le_bytes());
    put(0x208, &18u32.to_le_bytes());
    put(0x20c, b"Xen\0");
    put(0x210, &0x100_0000u32.to_le_bytes());
    put(0x1000, &[0xf4; 0x100]);
    f
}

fn kernel_loader() -> Vec<Seed> {
    let mut seeds = vec![
        ("kernel_loader", "seed-tiny-pvh-elf".into(), [vec![0], tiny_pvh_elf()].concat()),
        ("kernel_loader", "seed-tiny-pvh-elf-initrd".into(), [vec![4], tiny_pvh_elf()].concat()),
    ];
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest");
    // The real bzImage: its boot sector and setup (the setup header names their length),
    // then its payload cut to 4 KiB, with `syssize` saying so.
    if let Some(head) = slice_of(&guest.join("vmlinuz"), 0, 0x8000) {
        let setup_sects = head.get(0x1f1).copied().map_or(4, |s| if s == 0 { 4 } else { usize::from(s) });
        let setup_len = (setup_sects + 1) * 512;
        if let (Some(setup), Some(payload)) =
            (head.get(..setup_len), slice_of(&guest.join("vmlinuz"), setup_len as u64, 4096))
        {
            let mut k = setup.to_vec();
            if let Some(syssize) = k.get_mut(0x1f4..0x1f8) {
                syssize.copy_from_slice(&((payload.len() as u32) / 16).to_le_bytes());
            }
            k.extend_from_slice(&payload);
            seeds.push(("kernel_loader", "seed-bzimage-cut".into(), [vec![0], k.clone()].concat()));
            seeds.push(("kernel_loader", "seed-bzimage-cut-initrd".into(), [vec![2], k].concat()));
        }
        if let Some(h) = head.get(..0x400) {
            seeds.push(("kernel_loader", "seed-bzimage-header".into(), [vec![0], h.to_vec()].concat()));
        }
    }
    // The real vmlinux's ELF and program headers (the loader then finds the file short).
    if let Some(h) = slice_of(&guest.join("vmlinux"), 0, 0x400) {
        seeds.push(("kernel_loader", "seed-vmlinux-headers".into(), [vec![0], h].concat()));
    }
    seeds
}

/// A qcow2 image built by hand with 512-byte clusters: header, L1 table, refcount table,
/// refcount block, one L2 table and one data cluster; `version` 2 or 3; `backing` names a
/// backing file.
fn tiny_qcow2(version: u32, backing: Option<&str>) -> Vec<u8> {
    let cluster = 512u64;
    let mut f = vec![0u8; 6 * cluster as usize];
    let mut put = |at: u64, b: &[u8]| {
        let at = at as usize;
        if let Some(d) = f.get_mut(at..at + b.len()) {
            d.copy_from_slice(b);
        }
    };
    put(0, b"QFI\xfb");
    put(4, &version.to_be_bytes());
    if let Some(b) = backing {
        put(8, &400u64.to_be_bytes());
        put(16, &(b.len() as u32).to_be_bytes());
        put(400, b.as_bytes());
    }
    put(20, &9u32.to_be_bytes()); // cluster_bits
    put(24, &(64u64 << 10).to_be_bytes()); // size: 64 KiB
    put(32, &0u32.to_be_bytes()); // no encryption
    put(36, &2u32.to_be_bytes()); // l1_size: each L2 (64 entries) maps 32 KiB
    put(40, &cluster.to_be_bytes()); // l1_table_offset
    put(48, &(2 * cluster).to_be_bytes()); // refcount_table_offset
    put(56, &1u32.to_be_bytes()); // refcount_table_clusters
    if version >= 3 {
        put(96, &4u32.to_be_bytes()); // refcount_order: 16 bits
        put(100, &104u32.to_be_bytes()); // header_length
        if backing.is_some() {
            // Header extension: the backing file's format, then the end marker.
            put(104, &0xe279_2acau32.to_be_bytes());
            put(108, &3u32.to_be_bytes());
            put(112, b"raw\0\0\0\0\0");
        }
    }
    // L1[0] -> L2 at cluster 4 (COPIED flag), L2[0] -> data at cluster 5.
    put(cluster, &((4 * cluster) | (1 << 63)).to_be_bytes());
    put(4 * cluster, &((5 * cluster) | (1 << 63)).to_be_bytes());
    put(5 * cluster, b"hello, qcow2");
    // Refcount table[0] -> block at cluster 3; clusters 0..=5 used once.
    put(2 * cluster, &(3 * cluster).to_be_bytes());
    for c in 0..6u64 {
        put(3 * cluster + 2 * c, &1u16.to_be_bytes());
    }
    f
}

fn qcow2() -> Vec<Seed> {
    let mut seeds = vec![
        ("qcow2", "seed-v2-512b-clusters".into(), tiny_qcow2(2, None)),
        ("qcow2", "seed-v3-512b-clusters".into(), tiny_qcow2(3, None)),
        ("qcow2", "seed-backing-outside".into(), tiny_qcow2(3, Some("/etc/hostname"))),
        ("qcow2", "seed-backing-beside".into(), tiny_qcow2(3, Some("base.img"))),
        ("qcow2", "seed-raw".into(), vec![0x33; 4096]),
    ];
    // The header of an image made by the block layer (64 KiB clusters; its tables, 64 KiB
    // further on, are cut off to keep the input small).
    let path = crate::scratch_dir().join("seed-made.qcow2");
    if block::create_qcow2(&path, 16 << 20, None).is_ok() {
        if let Ok(mut b) = std::fs::read(&path) {
            b.truncate(512);
            seeds.push(("qcow2", "seed-created-16m-header".into(), b));
        }
        let _ = std::fs::remove_file(&path);
    }
    seeds
}

/// Every seed of every target.
pub fn all() -> Vec<Seed> {
    [
        virtio_blk(),
        virtio_net(),
        virtio_rng(),
        virtio_console(),
        virtio_balloon(),
        virtio_vsock(),
        virtio_pci(),
        legacy_devices(),
        x86emu(),
        api_vmm(),
        api_daemon(),
        snapshot(),
        kernel_loader(),
        qcow2(),
    ]
    .concat()
}

//! Data safety under faults (issue 14): a guest writes numbered records to a virtio-blk
//! disk, each with O_DIRECT | O_SYNC, and reports each one on its serial console once its
//! write returned; the VMM is killed with SIGKILL at a random moment, again and again. After
//! every kill, every record the guest reported must be on the disk image, whole.
//!
//! Booting the guest for each trial would take minutes, so the guest boots once per image
//! format; the VMM snapshots it while the writer runs, and each trial restores that snapshot
//! into a new VMM process, resumes it and kills it 50-1500 ms later. The writer
//! (`rv-records`, scripts/guest/rv-records.c) takes a fresh RDRAND nonce for every record,
//! so each trial's records differ from every earlier trial's even though each starts from
//! the same guest state; a record's slot on the 1 GiB disk is its nonce modulo the slots, so
//! on qcow2 most writes allocate a cluster (L2 and refcount updates). The raw image is read
//! directly, the qcow2 image through `crates/block`; after the loop, the last trial's records
//! are read once more through `qemu-img convert`, and `qemu-img check` must find no
//! corruption (leaked clusters are allowed: a kill between allocating a cluster and using it
//! leaks it).
//!
//! `RV_KILL9_TRIALS` (default 50) sets the kills per format; `RV_KILL9_SEED` replays the
//! delays of an earlier run (each run prints its seed).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use api::types::{DiskConfig, DiskFormat};
use common::*;

/// 512-byte slots of the 1 GiB image; a record with nonce x goes to slot x % SLOTS.
const SLOTS: u64 = 1 << 21;
const IMAGE_BYTES: u64 = SLOTS * 512;

/// A record the guest reported as written: its number and nonce (its slot is
/// `nonce % SLOTS`).
#[derive(Clone, Copy, Debug)]
struct Reported {
    seq: u64,
    nonce: u64,
}

impl Reported {
    fn offset(&self) -> u64 {
        (self.nonce % SLOTS) * 512
    }
}

/// The 512 bytes `rv-records` writes for record `seq` with `nonce`.
fn record_bytes(seq: u64, nonce: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[..8].copy_from_slice(b"RVREC001");
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..24].copy_from_slice(&nonce.to_le_bytes());
    let mut x = nonce | 1;
    for i in (24..512).step_by(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b[i..i + 8].copy_from_slice(&x.to_le_bytes());
    }
    b
}

/// The `RV-REC seq nonce` lines of a console log, complete lines only (a kill may cut the
/// last one short).
fn reported(console: &str) -> Vec<Reported> {
    let complete = console.rfind('\n').map_or("", |end| &console[..end]);
    complete
        .lines()
        .filter_map(|l| {
            let mut f = l.trim_end_matches('\r').strip_prefix("RV-REC ")?.split(' ');
            let seq = u64::from_str_radix(f.next()?, 16).ok()?;
            let nonce = u64::from_str_radix(f.next()?, 16).ok()?;
            f.next().is_none().then_some(Reported { seq, nonce })
        })
        .collect()
}

/// xorshift64: the trials' kill delays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What one format's loop found.
#[derive(Debug, Default)]
struct Outcome {
    kills: usize,
    /// Records reported (and so checked) over all trials.
    checked: usize,
    /// Of those, records not on the image (or not whole).
    lost: Vec<String>,
    /// Trials in which the guest reported no record before the kill.
    idle_trials: usize,
    /// Longest restore (vm.restore call), ms.
    max_restore_ms: u128,
}

/// Reads 512-byte slots of a disk image.
enum Image {
    Raw(std::fs::File),
    Qcow2(block::DiskImage),
}

impl Image {
    fn open(path: &Path, format: DiskFormat) -> Image {
        match format {
            DiskFormat::Raw => Image::Raw(std::fs::File::open(path).unwrap()),
            DiskFormat::Qcow2 => Image::Qcow2(block::DiskImage::open(path, block::Format::Qcow2, true).unwrap()),
        }
    }
    fn slot(&self, offset: u64) -> [u8; 512] {
        let mut b = [0u8; 512];
        match self {
            Image::Raw(f) => std::os::unix::fs::FileExt::read_exact_at(f, &mut b, offset).unwrap(),
            Image::Qcow2(d) => d.read_at(offset, &mut b).unwrap(),
        }
        b
    }
}

/// Checks the records one trial reported against the image; returns the lost ones. A slot
/// may hold, instead of its reported record, a later record of the same trial that landed on
/// the same slot: one reported after it, or the one in flight at the kill (number one past
/// the last reported).
fn lost_records(recs: &[Reported], img: &Image) -> Vec<Reported> {
    let last_seq = recs.iter().map(|r| r.seq).max().unwrap_or(0);
    let mut lost = Vec::new();
    for (i, r) in recs.iter().enumerate() {
        let got = img.slot(r.offset());
        if got == record_bytes(r.seq, r.nonce) {
            continue;
        }
        let seq = u64::from_le_bytes(got[8..16].try_into().unwrap());
        let nonce = u64::from_le_bytes(got[16..24].try_into().unwrap());
        let whole_later = got == record_bytes(seq, nonce) && nonce % SLOTS == r.nonce % SLOTS && seq > r.seq;
        let reported_later = recs[i + 1..].iter().any(|l| l.seq == seq && l.nonce == nonce);
        if !(whole_later && (reported_later || seq == last_seq + 1)) {
            lost.push(*r);
        }
    }
    lost
}

fn kill_loop(format: DiskFormat, trials: usize, seed: u64) -> Outcome {
    let name = format.as_str();
    let dir = TempDir::new(&format!("kill9-{name}"));
    let img = dir.path(&format!("disk.{name}"));
    match format {
        DiskFormat::Raw => std::fs::File::create(&img).unwrap().set_len(IMAGE_BYTES).unwrap(),
        DiskFormat::Qcow2 => {
            host("qemu-img", &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), &IMAGE_BYTES.to_string()]);
        }
    }
    let log = dir.path("console.log");
    let script = format!("rv-records /dev/vda {SLOTS}\n");
    let disks = vec![DiskConfig {
        path: img.display().to_string(),
        format: Some(format),
        readonly: false,
        serial: None,
        ..Default::default()
    }];
    let mut cfg = guest_config(&script, &log, disks);
    cfg.memory_mib = 128;
    let snap = dir.path("snap");
    {
        let vmm = Vmm::start(&dir.path("boot.sock"));
        vmm.client.create(&cfg).unwrap();
        vmm.client.boot().unwrap();
        let end = Instant::now() + Duration::from_secs(240);
        while reported(&std::fs::read_to_string(&log).unwrap_or_default()).len() < 20 {
            assert!(
                Instant::now() < end,
                "{name}: the writer did not start:\n{}",
                tail(&std::fs::read_to_string(&log).unwrap_or_default())
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        vmm.client.pause().unwrap();
        vmm.client.snapshot(&snap).unwrap();
        // Killed on drop, like every trial's VMM.
    }
    let mut rng = Rng(seed | 1);
    let mut out = Outcome::default();
    let mut last = Vec::new();
    for trial in 0..trials {
        let _ = std::fs::remove_file(&log);
        let sock = dir.path(&format!("t{trial}.sock"));
        let mut vmm = Vmm::start(&sock);
        let t = Instant::now();
        vmm.client.restore(&snap).unwrap_or_else(|e| panic!("{name} trial {trial}: restore: {e}"));
        out.max_restore_ms = out.max_restore_ms.max(t.elapsed().as_millis());
        vmm.client.resume().unwrap();
        std::thread::sleep(Duration::from_millis(50 + rng.next() % 1450));
        vmm.child.kill().unwrap();
        vmm.child.wait().unwrap();
        drop(vmm);
        let _ = std::fs::remove_file(&sock);
        out.kills += 1;
        let recs = reported(&std::fs::read_to_string(&log).unwrap_or_default());
        if recs.is_empty() {
            out.idle_trials += 1;
        }
        out.checked += recs.len();
        for r in lost_records(&recs, &Image::open(&img, format)) {
            out.lost.push(format!("trial {trial}: record {:#x} (nonce {:016x})", r.seq, r.nonce));
        }
        last = recs;
    }
    if format == DiskFormat::Qcow2 {
        // The last trial's records once more, read by QEMU's qcow2 code.
        let scratch = dir.path("converted.raw");
        host("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", img.to_str().unwrap(), scratch.to_str().unwrap()]);
        for r in lost_records(&last, &Image::open(&scratch, DiskFormat::Raw)) {
            out.lost.push(format!("last trial, read by qemu-img: record {:#x} (nonce {:016x})", r.seq, r.nonce));
        }
        // Exit status 0: clean; 3: leaked clusters only; 2: corruption; 1: check failed.
        let check = std::process::Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&img).output().unwrap();
        let text = String::from_utf8_lossy(&check.stdout).into_owned() + &String::from_utf8_lossy(&check.stderr);
        eprintln!("kill9 qcow2: qemu-img check exit {:?}: {}", check.status.code(), text.trim());
        assert!(matches!(check.status.code(), Some(0 | 3)), "qemu-img check after the loop: {text}");
    }
    out
}

#[test]
fn kill9_loop_loses_no_synced_record_on_raw_and_qcow2() {
    let qemu_img = std::process::Command::new("qemu-img").arg("--version").output().is_ok_and(|o| o.status.success());
    let trials: usize = std::env::var("RV_KILL9_TRIALS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let seed: u64 = std::env::var("RV_KILL9_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!("kill9: {trials} trials per format, RV_KILL9_SEED={seed}");
    let start = Instant::now();
    let raw = std::thread::spawn(move || kill_loop(DiskFormat::Raw, trials, seed));
    let qcow2 = if qemu_img {
        Some(std::thread::spawn(move || kill_loop(DiskFormat::Qcow2, trials, seed.rotate_left(17))))
    } else {
        println!("skipped (qcow2 half): qemu-img is not installed (scripts/setup-guest.sh installs it)");
        None
    };
    let mut results = vec![("raw", raw.join().unwrap())];
    if let Some(q) = qcow2 {
        results.push(("qcow2", q.join().unwrap()));
    }
    for (name, o) in &results {
        eprintln!(
            "kill9 {name}: {} kills, {} synced records checked, {} lost; {} trials with no record; longest restore {} ms",
            o.kills,
            o.checked,
            o.lost.len(),
            o.idle_trials,
            o.max_restore_ms
        );
    }
    eprintln!("kill9: {:.1} s wall", start.elapsed().as_secs_f64());
    for (name, o) in &results {
        assert_eq!(o.kills, trials);
        assert!(o.lost.is_empty(), "{name}: synced records lost after kill -9: {:#?}", o.lost);
        assert!(o.idle_trials < trials / 2, "{name}: the writer wrote nothing in most trials: {o:?}");
    }
}

//! `vm.backup` of a running Debian guest on `emu`: the guest keeps writing a counter into
//! sixteen sectors spread over its raw disk (each round writes them in order, each write
//! synced) while a rate-limited backup copies the disk; the export must show the disk at one
//! instant (the slots never torn between rounds) with the rest of the disk as it was, zero
//! ranges left as holes, and the live disk must keep the newer writes. A qcow2 overlay (with
//! a raw backing file) exports to a raw image `qemu-img compare` finds identical; a
//! read-only disk is not exported. Also: a second backup while one runs (409), a snapshot
//! during a backup, a cancelled backup, and the VM's end.

mod common;

use api::client::Client;
use api::types::{BackupState, BackupStatus, DiskConfig, DiskFormat};
use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
/// The raw disk: 64 MiB, data in the first 48 MiB, zeros (holes) after.
const RAW_SIZE: usize = 64 * MIB;
const RAW_DATA: usize = 48 * MIB;
/// Counter slots: sector 0 of every 3rd MiB.
const SLOTS: usize = 16;
const SLOT_STRIDE: usize = 3 * MIB;

/// Each round n writes `RVSLOT n` into the slots in order (synced one by one), then prints
/// `RV-COUNT n`. Before that, the qcow2 disk gets four records.
const SCRIPT: &str = r#"
for k in 0 1 2 3; do
  printf 'RVQCOW %d\n' $k | dd of=/dev/vdb bs=512 seek=$((k*4096+7)) count=1 conv=sync,notrunc,fsync 2>/dev/null
done
echo RV-QCOW-WRITTEN
n=1
while true; do
  k=0
  while [ $k -lt 16 ]; do
    printf 'RVSLOT %d\n' $n | dd of=/dev/vda bs=512 seek=$((k*6144)) count=1 conv=sync,notrunc,fsync 2>/dev/null
    k=$((k+1))
  done
  echo "RV-COUNT $n"
  n=$((n+1))
done
"#;

/// The counter in each slot of a raw image of the disk.
fn slots(image: &[u8]) -> Vec<Option<u64>> {
    (0..SLOTS)
        .map(|k| {
            let sector = &image[k * SLOT_STRIDE..k * SLOT_STRIDE + 512];
            let text = std::str::from_utf8(sector.split(|&b| b == b'\n').next()?).ok()?;
            text.strip_prefix("RVSLOT ")?.parse().ok()
        })
        .collect()
}

/// Checks that `image`'s slots show one instant of the guest's rounds: slots 0..j hold n,
/// the rest n-1 (or all the same); returns (min, max).
fn consistent_slots(image: &[u8], what: &str) -> (u64, u64) {
    let s = slots(image);
    let v: Vec<u64> = s.iter().map(|x| x.unwrap_or_else(|| panic!("{what}: a slot without a record: {s:?}"))).collect();
    let (min, max) = (*v.iter().min().unwrap(), *v.iter().max().unwrap());
    assert!(max - min <= 1, "{what}: slots from different instants: {v:?}");
    assert!(v.windows(2).all(|w| w[0] >= w[1]), "{what}: a later slot is newer than an earlier one (torn): {v:?}");
    (min, max)
}

fn wait_backup(c: &Client, timeout: Duration) -> BackupStatus {
    let end = Instant::now() + timeout;
    loop {
        let s = c.backup_status().unwrap();
        if s.state != BackupState::Running {
            return s;
        }
        assert!(Instant::now() < end, "backup still running: {s:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn disk(path: &Path, format: DiskFormat, readonly: bool) -> DiskConfig {
    DiskConfig { path: path.display().to_string(), format: Some(format), readonly, ..Default::default() }
}

#[test]
fn backup_of_a_running_guest_is_one_instant() {
    let dir = TempDir::new("backup");
    let log = dir.path("console.log");
    // vda: raw with data, then a zero tail (a hole on the host too).
    let raw = dir.path("vda.raw");
    let mut original = pattern(RAW_DATA, 7);
    original.resize(RAW_SIZE, 0);
    std::fs::write(&raw, &original[..RAW_DATA]).unwrap();
    std::fs::File::options().write(true).open(&raw).unwrap().set_len(RAW_SIZE as u64).unwrap();
    // vdb: a qcow2 overlay over a raw base with a zero MiB in the middle.
    let base = dir.path("base.raw");
    let mut b = pattern(16 * MIB, 9);
    b[5 * MIB..6 * MIB].fill(0);
    std::fs::write(&base, &b).unwrap();
    let top = dir.path("top.qcow2");
    host("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top.to_str().unwrap()]);
    // vdc: read-only, not exported.
    let ro = dir.path("ro.raw");
    std::fs::write(&ro, pattern(MIB, 11)).unwrap();

    let cfg = guest_config(
        SCRIPT,
        &log,
        vec![
            disk(&raw, DiskFormat::Raw, false),
            disk(&top, DiskFormat::Qcow2, false),
            disk(&ro, DiskFormat::Raw, true),
        ],
    );
    let vmm = Vmm::start(&dir.path("api.sock"));
    let c = &vmm.client;
    c.create(&cfg).unwrap();
    assert_eq!(status_code(c.backup(&dir.path("early"), None)), 409, "a VM not booted");
    c.boot().unwrap();
    assert_eq!(status_code(c.backup_status()), 404, "no backup yet");
    assert_eq!(status_code(c.backup_cancel()), 404);
    let before = wait_count(&log, 2, Duration::from_secs(180));

    // 1. A backup at 4 MiB/s (16 s for the raw disk) while the guest writes.
    let out = dir.path("b1");
    let started = c.backup(&out, Some(4)).unwrap();
    eprintln!("backup 1: guest paused {:.3} ms to start it", started.pause_ms);
    assert_eq!(started.state, BackupState::Running);
    assert_eq!(started.disks.iter().map(|d| d.index).collect::<Vec<_>>(), [0, 1]);
    assert!(started.pause_ms < 1000.0, "{started:?}");
    assert_eq!(status_code(c.backup(&dir.path("second"), None)), 409, "a backup runs already");
    assert!(!dir.path("second").exists());
    // A snapshot while the backup runs (after the guest wrote a round more during it); the
    // backup goes on.
    wait_count(&log, before + 1, Duration::from_secs(60));
    c.pause().unwrap();
    assert_eq!(c.backup_status().unwrap().state, BackupState::Running);
    c.snapshot(&dir.path("snap")).unwrap();
    c.resume().unwrap();
    let t = Instant::now();
    let done = wait_backup(c, Duration::from_secs(120));
    eprintln!("backup 1 done {:.1} s after the snapshot: {done:?}", t.elapsed().as_secs_f64());
    assert_eq!(done.state, BackupState::Done, "{done:?}");
    for d in &done.disks {
        assert_eq!((d.bytes_copied, d.state, &d.error), (d.bytes_total, BackupState::Done, &None), "{d:?}");
    }
    let mut names: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["disk0.raw", "disk1.raw"], "one file per writable disk, nothing else");

    // The raw disk's export: one instant of the counter, everything else as before.
    let export = std::fs::read(out.join("disk0.raw")).unwrap();
    assert_eq!(export.len(), RAW_SIZE);
    let (min, max) = consistent_slots(&export, "export");
    assert!(min >= before, "the export predates the backup: slots {min}..{max}, count {before} before it");
    assert!(done.disks[0].bytes_before_write > 0, "the guest's writes ran ahead of the copier: {done:?}");
    let mut masked = export.clone();
    for k in 0..SLOTS {
        masked[k * SLOT_STRIDE..k * SLOT_STRIDE + 512]
            .copy_from_slice(&original[k * SLOT_STRIDE..k * SLOT_STRIDE + 512]);
    }
    assert!(masked == original, "the export differs from the disk outside the counter slots");
    let md = std::fs::metadata(out.join("disk0.raw")).unwrap();
    assert!(
        md.blocks() * 512 <= (RAW_DATA + MIB) as u64,
        "the zero tail is a hole: {} bytes allocated",
        md.blocks() * 512
    );
    assert_eq!(md.mode() & 0o777, 0o600);

    // The live disk keeps the newer writes.
    let later = wait_count(&log, last_count(&log).unwrap() + 2, Duration::from_secs(60));
    let live = std::fs::read(&raw).unwrap();
    let (live_min, _) = consistent_slots(&live[..], "live disk");
    assert!(
        live_min > max,
        "the live disk (slots ≥ {live_min}, count {later}) lost the writes after the export ({max})"
    );

    // The qcow2 overlay exports to a raw image identical to it.
    let cmp = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "raw", "-F", "qcow2"])
        .arg(out.join("disk1.raw"))
        .arg(&top)
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
    let q = std::fs::read(out.join("disk1.raw")).unwrap();
    assert_eq!(&q[7 * 512..7 * 512 + 9], b"RVQCOW 0\n");
    assert!(q[5 * MIB..6 * MIB].iter().all(|&x| x == 0));

    // 2. A cancelled backup: 1 MiB/s, cancelled at once.
    let out2 = dir.path("b2");
    c.backup(&out2, Some(1)).unwrap();
    c.backup_cancel().unwrap();
    let s = c.backup_status().unwrap();
    assert_eq!(s.state, BackupState::Cancelled, "{s:?}");
    assert!(s.disks.iter().all(|d| d.state == BackupState::Cancelled && d.bytes_copied < d.bytes_total), "{s:?}");
    assert_eq!(status_code(c.backup(&out2, None)), 400, "the folder is not empty");
    c.backup_cancel().unwrap();

    // 3. Unlimited, and paused: also one instant, with the pause reported.
    c.pause().unwrap();
    let s = c.backup(&dir.path("b3"), None).unwrap();
    eprintln!("backup 3 (VM paused already): {:.3} ms to start the jobs", s.pause_ms);
    c.resume().unwrap();
    let s = wait_backup(c, Duration::from_secs(60));
    assert_eq!(s.state, BackupState::Done, "{s:?}");
    consistent_slots(&std::fs::read(dir.path("b3/disk0.raw")).unwrap(), "paused export");

    // The backup ends with the VM.
    c.shutdown().unwrap();
    assert_eq!(status_code(c.backup_status()), 409);
    c.vmm_shutdown().unwrap();
}

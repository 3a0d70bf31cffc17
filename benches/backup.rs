//! Backup of a running VM (`cargo bench --bench backup`; needs scripts/setup-guest.sh): a
//! 512 MiB Debian guest on `emu` with a 512 MiB disk full of data (raw, then the same data as
//! qcow2), the guest printing a counter every second. For each run: the guest's pause to start
//! the backup (`pause_ms`, measured in the VMM around pause → attach → resume), the API round
//! trip of `PUT vm.backup`, and the export's speed from the request to `done` (fsync
//! included), alternated with `cp` of the same image file (and `cp` followed by `sync` of the
//! copy) on the same file system. The source is in the host's page cache for all of them.
//!
//! `RUSTVISOR_BENCH_DIR` picks the folder (default: the system temp dir); `RUSTVISOR_BENCH_RUNS`
//! the runs (default 5).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api::client::Client;
use api::types::{BackupState, DiskConfig, DiskFormat, VmConfig};

const DISK_MIB: u64 = 512;

fn guest(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest").join(name);
    assert!(p.exists(), "{} missing: run scripts/setup-guest.sh", p.display());
    p
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn range(v: &[f64]) -> String {
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(0.0, f64::max);
    format!("{min:.1}-{max:.1}")
}

fn last_count(log: &Path) -> u64 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("RV-COUNT ")?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// A file of `mib` MiB of pseudo-random data (no zero blocks).
fn data_file(path: &Path, mib: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
    f.into_inner().unwrap().sync_all().unwrap();
}

/// MiB/s of `cp SRC DST` (then `sync DST` when `sync`), the copy removed after.
fn cp(src: &Path, dst: &Path, sync: bool) -> f64 {
    let t = Instant::now();
    assert!(Command::new("cp").arg(src).arg(dst).status().unwrap().success());
    if sync {
        assert!(Command::new("sync").arg(dst).status().unwrap().success());
    }
    let s = t.elapsed().as_secs_f64();
    std::fs::remove_file(dst).unwrap();
    DISK_MIB as f64 / s
}

struct Run {
    pause_ms: f64,
    put_ms: f64,
    /// MiB/s from the request to `done` (fsync included).
    mib_s: f64,
    /// MiB/s from the request to the last byte copied (before the fsync).
    copy_mib_s: f64,
}

/// One backup into `out` (removed after): the pause, the PUT round trip, MiB/s to done.
fn backup(c: &Client, out: &Path) -> Run {
    let t = Instant::now();
    let started = c.backup(out, None).unwrap();
    let put_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut copied = None;
    let status = loop {
        let s = c.backup_status().unwrap();
        if copied.is_none() && s.disks.iter().all(|d| d.bytes_copied == d.bytes_total) {
            copied = Some(t.elapsed().as_secs_f64());
        }
        if s.state != BackupState::Running {
            break s;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let secs = t.elapsed().as_secs_f64();
    let copy_secs = copied.unwrap_or(secs);
    assert_eq!(status.state, BackupState::Done, "{status:?}");
    std::fs::remove_dir_all(out).unwrap();
    Run { pause_ms: started.pause_ms, put_ms, mib_s: DISK_MIB as f64 / secs, copy_mib_s: DISK_MIB as f64 / copy_secs }
}

fn start_vmm(sock: &Path) -> (Child, Client) {
    let _ = std::fs::remove_file(sock);
    let child = Command::new(env!("CARGO_BIN_EXE_rustvisor"))
        .args(["vmm", "--api-socket"])
        .arg(sock)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let c = Client::new(sock).unwrap().with_timeout(Duration::from_secs(300));
    while c.ping().is_err() {
        std::thread::sleep(Duration::from_millis(1));
    }
    (child, c)
}

fn main() {
    let base = std::env::var_os("RUSTVISOR_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let runs: usize = std::env::var("RUSTVISOR_BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let dir = base.join(format!("rv-bench-backup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let raw = dir.join("disk.raw");
    data_file(&raw, DISK_MIB);
    let qcow2 = dir.join("disk.qcow2");
    let ok = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2)
        .status()
        .is_ok_and(|s| s.success());

    let log = dir.join("console.log");
    use base64::Engine;
    let script = "i=0; while true; do echo \"RV-COUNT $i\"; i=$((i+1)); sleep 1; done\n";
    let mut disks =
        vec![DiskConfig { path: raw.display().to_string(), format: Some(DiskFormat::Raw), ..Default::default() }];
    if ok {
        disks.push(DiskConfig {
            path: qcow2.display().to_string(),
            format: Some(DiskFormat::Qcow2),
            ..Default::default()
        });
    }
    let cfg = VmConfig {
        kernel: guest("vmlinuz").display().to_string(),
        initrd: Some(guest("initrd.img").display().to_string()),
        cmdline: format!("console=ttyS0 rv.cmd={}", base64::engine::general_purpose::STANDARD.encode(script)),
        memory_mib: 512,
        cpus: 1,
        accel: api::types::Accel::Emu,
        serial: api::types::ConsoleOut::File(log.clone()),
        console: None,
        disks,
        nets: vec![],
        vsock: None,
        rng: false,
        balloon: None,
        memory_options: Default::default(),
    };
    // One VM per source format, so that each backup exports exactly one 512 MiB disk.
    let sources: Vec<(&str, DiskConfig)> = ["raw", "qcow2"].into_iter().zip(cfg.disks.iter().cloned()).collect();
    let sock = dir.join("api.sock");
    let mut cps = Vec::new();
    let mut cp_syncs = Vec::new();
    for (name, d) in sources {
        let mut cfg = cfg.clone();
        cfg.disks = vec![d.clone()];
        let (mut child, c) = start_vmm(&sock);
        c.create(&cfg).unwrap();
        c.boot().unwrap();
        let booted = last_count(&log);
        while last_count(&log) < booted + 2 {
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut r = Vec::new();
        for i in 0..runs {
            r.push(backup(&c, &dir.join(format!("out-{name}-{i}"))));
            if name == "raw" {
                cps.push(cp(&raw, &dir.join("cp.raw"), false));
                cp_syncs.push(cp(&raw, &dir.join("cp.raw"), true));
            }
        }
        let pause: Vec<f64> = r.iter().map(|x| x.pause_ms).collect();
        let put: Vec<f64> = r.iter().map(|x| x.put_ms).collect();
        let speed: Vec<f64> = r.iter().map(|x| x.mib_s).collect();
        let copy: Vec<f64> = r.iter().map(|x| x.copy_mib_s).collect();
        println!(
            "backup {name} {DISK_MIB} MiB, guest running: pause {:.3} ms (range {}), PUT vm.backup {:.2} ms, export to done (fsynced) {:.0} MiB/s (range {}), to the last byte copied {:.0} MiB/s (range {}) [median of {runs}]",
            median(pause.clone()),
            range(&pause),
            median(put),
            median(speed.clone()),
            range(&speed),
            median(copy.clone()),
            range(&copy)
        );
        let _ = c.vmm_shutdown();
        let _ = child.wait();
        let _ = std::fs::remove_file(&log);
    }
    println!(
        "cp of the raw image: {:.0} MiB/s (range {}); cp + sync of the copy: {:.0} MiB/s (range {}) [median of {runs}]",
        median(cps.clone()),
        range(&cps),
        median(cp_syncs.clone()),
        range(&cp_syncs)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

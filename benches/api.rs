//! VMM API benchmark (`cargo bench --bench api`; needs scripts/setup-guest.sh): VMM start to
//! API-ready (wall and CPU time of the VMM process), pause and resume latency, snapshot time
//! and size, and restore-to-running time for a 512 MiB Debian guest on `emu`, printed next to
//! Firecracker's published figures.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api::client::Client;
use api::types::VmConfig;

fn guest(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest").join(name);
    assert!(p.exists(), "{} missing: run scripts/setup-guest.sh", p.display());
    p
}

fn cpu_ms(pid: u32) -> f64 {
    // /proc/PID/task/TID/schedstat: each thread's time on a CPU in ns (first field).
    let mut ns = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        ns += s.split_whitespace().next().and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    }
    ns as f64 / 1e6
}

fn start_vmm(sock: &Path) -> (Child, Client, Duration) {
    let _ = std::fs::remove_file(sock);
    let t = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_rustvisor"))
        .args(["vmm", "--api-socket"])
        .arg(sock)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let c = Client::new(sock).unwrap().with_timeout(Duration::from_secs(120));
    while c.ping().is_err() {
        std::thread::sleep(Duration::from_micros(200));
    }
    (child, c, t.elapsed())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn last_count(log: &Path) -> u64 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("RV-COUNT ")?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

fn main() {
    let dir = std::env::temp_dir().join(format!("rv-bench-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");

    let mut wall = Vec::new();
    let mut cpu = Vec::new();
    for _ in 0..10 {
        let (mut child, c, t) = start_vmm(&sock);
        wall.push(t.as_secs_f64() * 1e3);
        cpu.push(cpu_ms(child.id()));
        let _ = c.vmm_shutdown();
        let _ = child.wait();
    }
    println!("vmm-start-to-api-ready-ms: {:.1} (median of 10; VMM CPU time {:.1} ms)", median(wall), median(cpu));

    let log = dir.join("console.log");
    use base64::Engine;
    let script = "i=0; while true; do echo \"RV-COUNT $i\"; i=$((i+1)); sleep 1; done\n";
    let cfg = VmConfig {
        kernel: guest("vmlinuz").display().to_string(),
        initrd: Some(guest("initrd.img").display().to_string()),
        cmdline: format!("console=ttyS0 rv.cmd={}", base64::engine::general_purpose::STANDARD.encode(script)),
        memory_mib: 512,
        cpus: 1,
        accel: api::types::Accel::Emu,
        serial: api::types::ConsoleOut::File(log.to_path_buf()),
        console: None,
        disks: vec![],
        nets: vec![],
        vsock: None,
        rng: false,
        balloon: None,
        memory_options: Default::default(),
    };
    let (mut child, c, _) = start_vmm(&sock);
    c.create(&cfg).unwrap();
    c.boot().unwrap();
    while last_count(&log) < 2 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (mut p, mut r) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let t = Instant::now();
        c.pause().unwrap();
        p.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        c.resume().unwrap();
        r.push(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("pause-ms: {:.2}  resume-ms: {:.2} (median of 20, API round trip included)", median(p), median(r));

    c.pause().unwrap();
    let snap = dir.join("snap");
    let t = Instant::now();
    c.snapshot(&snap).unwrap();
    let snap_ms = t.elapsed().as_secs_f64() * 1e3;
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(snap.join("memory.bin")).unwrap();
    println!(
        "snapshot-ms: {snap_ms:.0} (512 MiB guest; memory file {} MiB on disk of {} MiB)",
        (m.blocks() * 512) >> 20,
        m.len() >> 20
    );
    let before = last_count(&log);
    let _ = child.kill();
    let _ = child.wait();

    let (mut child, c, _) = start_vmm(&sock);
    let t = Instant::now();
    c.restore(&snap).unwrap();
    c.resume().unwrap();
    let restore_ms = t.elapsed().as_secs_f64() * 1e3;
    while last_count(&log) <= before {
        std::thread::sleep(Duration::from_millis(5));
    }
    let first_line_ms = t.elapsed().as_secs_f64() * 1e3;
    println!("restore-to-running-ms: {restore_ms:.0} (restore + resume; next guest output after {first_line_ms:.0} ms, the guest sleeps 1 s between lines)");
    let _ = c.vmm_shutdown();
    let _ = child.wait();
    println!("reference (Firecracker, published): VMM start ~8 CPU-ms; snapshot restore a few ms");
    let _ = std::fs::remove_dir_all(&dir);
}

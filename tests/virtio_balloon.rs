//! virtio-balloon with the Debian guest's own `virtio_balloon` driver on `emu`, driven through
//! the VMM API:
//!
//! - `inflate_deflate_snapshot_restore`: the guest touches most of its 512 MiB (a tmpfs
//!   filled and emptied) and prints `MemTotal`/`MemFree` every second. A 256 MiB target makes
//!   its `MemTotal` drop by 256 MiB (`deflate_on_oom` off: the driver takes the pages out of
//!   the guest's total) and the VMM's RSS fall; the statistics arrive. The VM is then
//!   snapshotted, the VMM killed, the snapshot restored in a new VMM with the balloon's state
//!   (a forged target beyond the guest's RAM is refused), and deflating to 0 there gives the
//!   memory back to the guest.
//! - `free_page_reporting_and_mergeable_memory`: with free page reporting, memory the guest
//!   frees goes back to the host without any balloon target; guest RAM is marked mergeable,
//!   which `/proc/PID/smaps` shows; whether KSM merges depends on the host's
//!   `/sys/kernel/mm/ksm/run` (said so when it is off, never silently passed).
//!
//! The initramfs of `scripts/setup-guest.sh` holds `virtio_balloon.ko`; one built before that
//! gets the module appended as a second cpio archive (the kernel unpacks both).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::client::Client;
use api::types::{BalloonConfig, MemoryOptions, VmConfig};
use common::*;

/// Helpers of this test on the shared [`Vmm`].
trait VmmExt {
    /// (VmRSS, RssAnon) of the VMM process in MiB.
    fn rss_mib(&self) -> (u64, u64);
}

impl VmmExt for Vmm {
    /// (VmRSS, RssAnon) of the VMM process in MiB.
    fn rss_mib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib = |key: &str| -> u64 {
            let line = status.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{key} in {status}"));
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        };
        (kib("VmRSS:") >> 10, kib("RssAnon:") >> 10)
    }
}

/// A newc cpio archive holding `files` (name, mode, bytes), with its trailer.
fn cpio(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut entry = |name: &str, mode: u32, data: &[u8], ino: usize| {
        let fields = [ino as u32, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, 0, 0, name.len() as u32 + 1, 0];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(4), 0);
    };
    for (i, (name, mode, data)) in files.iter().enumerate() {
        entry(name, *mode, data, i + 1);
    }
    entry("TRAILER!!!", 0, &[], 0);
    out
}

/// The test initramfs: `guest/initrd.img` when it has the balloon driver, else a copy with
/// `virtio_balloon.ko` (from the extracted kernel package) appended in `dir`.
fn initrd(dir: &TempDir) -> PathBuf {
    let img = guest_file("initrd.img");
    if guest_dir().join("initrd-root/lib/modules/virtio_balloon.ko").exists() {
        return img;
    }
    let kver = std::fs::read_to_string(guest_file("kernel-version")).unwrap();
    let ko =
        guest_dir().join(format!("rootfs-kernel/lib/modules/{}/kernel/drivers/virtio/virtio_balloon.ko", kver.trim()));
    let ko = std::fs::read(&ko).unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup-guest.sh)", ko.display()));
    eprintln!("note: guest/initrd.img predates virtio_balloon.ko; appending it (rerun scripts/setup-guest.sh)");
    let mut bytes = std::fs::read(&img).unwrap();
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    bytes.extend(cpio(&[("lib/modules/virtio_balloon.ko", 0o100644, &ko)]));
    let out = dir.path("initrd-balloon.img");
    std::fs::write(&out, bytes).unwrap();
    out
}

fn guest_config(initrd: &Path, script: &str, log: &Path, balloon: BalloonConfig, mem: MemoryOptions) -> VmConfig {
    use base64::Engine;
    // Loaded by the initramfs's /init for the balloon device; by hand for an older one.
    let script = format!(
        "[ -d /sys/bus/virtio/drivers/virtio_balloon ] || insmod /lib/modules/virtio_balloon.ko\n\
         echo \"RV-BALLOON-DRIVER $(ls /sys/bus/virtio/drivers/virtio_balloon | grep -c virtio)\"\n{script}"
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(script);
    VmConfig {
        kernel: guest_file("vmlinuz").display().to_string(),
        initrd: Some(initrd.display().to_string()),
        cmdline: format!("console=ttyS0 panic=-1 rv.cmd={b64}"),
        memory_mib: 512,
        cpus: 1,
        accel: api::types::Accel::Emu,
        serial: api::types::ConsoleOut::File(log.to_path_buf()),
        console: None,
        disks: vec![],
        nets: vec![],
        vsock: None,
        rng: false,
        balloon: Some(balloon),
        memory_options: mem,
    }
}

/// Prints `RV-MEM <MemTotal kB> <MemFree kB>` every second, forever.
const MEMINFO_LOOP: &str =
    "while true; do set -- $(grep -E '^(MemTotal|MemFree):' /proc/meminfo); echo \"RV-MEM $2 $5\"; sleep 1; done\n";

/// Waits for `needle` on the console.
fn wait_console(log: &Path, needle: &str, timeout: Duration) -> String {
    let end = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(Instant::now() < end, "timed out waiting for {needle:?}; console:\n{}", tail(&text));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last `RV-MEM` line after byte `from` of the console: (MemTotal, MemFree) in MiB.
fn last_mem(log: &Path, from: usize) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.get(from..)?.lines().rev().find_map(|l| {
        let mut it = l.strip_prefix("RV-MEM ")?.split_whitespace().map(|v| v.parse::<u64>().ok());
        Some((it.next()?? >> 10, it.next()?? >> 10))
    })
}

fn console_len(log: &Path) -> usize {
    std::fs::metadata(log).map_or(0, |m| m.len() as usize)
}

/// Waits until a fresh `RV-MEM` line satisfies `ok`; returns it.
fn wait_mem(log: &Path, what: &str, timeout: Duration, ok: impl Fn(u64, u64) -> bool) -> (u64, u64) {
    let end = Instant::now() + timeout;
    let from = console_len(log);
    loop {
        if let Some((t, f)) = last_mem(log, from).filter(|&(t, f)| ok(t, f)) {
            return (t, f);
        }
        assert!(
            Instant::now() < end,
            "{what}: last guest meminfo {:?}; console:\n{}",
            last_mem(log, 0),
            tail(&std::fs::read_to_string(log).unwrap_or_default())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until `vm.balloon` reports `actual_mib == target`; returns how long it took.
fn wait_actual(c: &Client, target: u64, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let b = c.balloon_info().unwrap();
        if b.actual_mib == target {
            return start.elapsed();
        }
        assert!(start.elapsed() < timeout, "the guest's balloon stayed at {} MiB (target {target})", b.actual_mib);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the VMM's anonymous RSS is at most `max` MiB; returns (VmRSS, RssAnon).
fn wait_rss_below(vmm: &Vmm, max: u64, timeout: Duration) -> (u64, u64) {
    let end = Instant::now() + timeout;
    loop {
        let rss = vmm.rss_mib();
        if rss.1 <= max {
            return rss;
        }
        assert!(Instant::now() < end, "the VMM's RSS stayed at {rss:?} MiB (expected at most {max} MiB anonymous)");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `snapshot.json` (`good`) with the first `"key":` scalar of its state set to `value` and a
/// header digest that matches: a forgery the checksum cannot catch.
fn forge(good: &[u8], key: &str, value: &str) -> Vec<u8> {
    let text = std::str::from_utf8(good).unwrap();
    let (head, state) = text.split_once('\n').unwrap();
    let state = state.trim_end();
    let k = format!("\"{key}\":");
    let at = state.find(&k).unwrap_or_else(|| panic!("{key} not in the state")) + k.len();
    let end = at + state[at..].find([',', '}']).unwrap();
    let forged = format!("{}{value}{}", &state[..at], &state[end..]);
    let old = head.split("\"sha256\":\"").nth(1).unwrap().split('"').next().unwrap();
    format!("{}\n{forged}\n", head.replace(old, &sha256_hex(forged.as_bytes()))).into_bytes()
}

#[test]
fn inflate_deflate_snapshot_restore() {
    let dir = TempDir::new("balloon");
    let log = dir.path("console.log");
    let initrd = initrd(&dir);
    // Touch most of guest RAM, give it back to the guest's allocator, then report meminfo.
    let script = format!(
        "mkdir -p /mnt/big && mount -t tmpfs -o size=420m tmpfs /mnt/big\n\
         dd if=/dev/zero of=/mnt/big/fill bs=1M count=330 2>/dev/null; rm /mnt/big/fill\n\
         echo RV-FILLED\n{MEMINFO_LOOP}"
    );
    let balloon = BalloonConfig { deflate_on_oom: false, stats_interval_s: 1, free_page_reporting: false };
    let cfg = guest_config(&initrd, &script, &log, balloon, MemoryOptions::default());
    let snap = dir.path("snap");
    let (total0, target) = {
        let vmm = Vmm::start(&dir.path("a.sock"));
        let c = &vmm.client;
        c.create(&cfg).unwrap();
        c.boot().unwrap();
        let text = wait_console(&log, "RV-FILLED", Duration::from_secs(300));
        assert!(text.contains("RV-BALLOON-DRIVER 1"), "the guest's virtio_balloon driver bound the device");
        let (total0, free0) = wait_mem(&log, "first meminfo", Duration::from_secs(60), |_, _| true);
        let b = c.balloon_info().unwrap();
        assert_eq!((b.target_mib, b.actual_mib), (0, 0));
        let rss0 = vmm.rss_mib();
        eprintln!(
            "guest MemTotal {total0} MiB, MemFree {free0} MiB; VMM RSS {} MiB ({} MiB anonymous)",
            rss0.0, rss0.1
        );
        assert!(rss0.1 >= 330, "the guest touched its memory: anonymous RSS {} MiB", rss0.1);

        // Inflate by 256 MiB.
        c.balloon_set(256).unwrap();
        let took = wait_actual(c, 256, Duration::from_secs(180));
        let (total1, free1) =
            wait_mem(&log, "MemTotal after inflating", Duration::from_secs(60), |t, _| t + 250 <= total0);
        assert!(total1 + 262 >= total0, "MemTotal {total0} → {total1} MiB for a 256 MiB balloon");
        let rss1 = wait_rss_below(&vmm, rss0.1 - 200, Duration::from_secs(30));
        eprintln!(
                "inflate 256 MiB: guest reached the target in {:.2} s; MemTotal {total0} → {total1} MiB, MemFree {free0} → \
                 {free1} MiB; VMM RSS {} → {} MiB (anonymous {} → {} MiB)",
                took.as_secs_f64(),
                rss0.0,
                rss1.0,
                rss0.1,
                rss1.1
            );
        // Statistics every second: the guest's view, fresh.
        let end = Instant::now() + Duration::from_secs(30);
        let stats = loop {
            let b = c.balloon_info().unwrap();
            if let Some(s) = b.stats.filter(|s| s.total_bytes.is_some_and(|t| (t >> 20) + 250 <= total0)) {
                assert!(b.stats_age_s.unwrap() < 5.0, "{b:?}");
                break s;
            }
            assert!(Instant::now() < end, "no statistics with the smaller MemTotal: {b:?}");
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(
            stats.free_bytes.is_some() && stats.available_bytes.is_some() && stats.minor_faults.is_some(),
            "{stats:?}"
        );
        let counters = c.counters().unwrap();
        let dev = &counters.devices["balloon"];
        assert!(dev.requests >= 256 && dev.errors == 0, "{dev:?}");

        // Snapshot with the balloon inflated; kill -9 the VMM (Vmm's drop).
        c.pause().unwrap();
        c.snapshot(&snap).unwrap();
        (total0, 256)
    };
    let vmm = Vmm::start(&dir.path("b.sock"));
    let c = &vmm.client;
    // A forged target beyond the guest's RAM (with a matching checksum) is refused.
    let state = snap.join("snapshot.json");
    let good = std::fs::read(&state).unwrap();
    std::fs::write(&state, forge(&good, "target_pages", "999999")).unwrap();
    match c.restore(&snap) {
        Err(api::client::ClientError::Http { status: 400, message, .. }) => {
            assert!(message.contains("balloon.target_pages 999999 (accepted: 0 to 131072"), "{message}")
        }
        other => panic!("forged balloon target: {other:?}"),
    }
    std::fs::write(&state, &good).unwrap();
    c.restore(&snap).unwrap();
    let b = c.balloon_info().unwrap();
    assert_eq!((b.target_mib, b.actual_mib), (target, target), "the balloon's state is restored");
    let rss_restored = vmm.rss_mib();
    c.resume().unwrap();
    wait_mem(&log, "the restored guest runs", Duration::from_secs(60), |t, _| t + 250 <= total0);
    // Deflate: the guest gets its memory back.
    c.balloon_set(0).unwrap();
    let took = wait_actual(c, 0, Duration::from_secs(180));
    let (total2, free2) = wait_mem(&log, "MemTotal after deflating", Duration::from_secs(60), |t, _| t + 4 >= total0);
    eprintln!(
        "deflate to 0 (restored VM, RSS after restore {} MiB): guest back to MemTotal {total2} MiB (MemFree {free2} MiB) \
         in {:.2} s",
        rss_restored.0,
        took.as_secs_f64()
    );
    assert_eq!(c.counters().unwrap().devices["balloon"].errors, 0);
    // A target larger than the guest is refused.
    match c.balloon_set(513) {
        Err(api::client::ClientError::Http { status: 400, .. }) => {}
        other => panic!("{other:?}"),
    }
    c.vmm_shutdown().unwrap();
}

#[test]
fn free_page_reporting_and_mergeable_memory() {
    let dir = TempDir::new("balloon-fpr");
    let log = dir.path("console.log");
    let initrd = initrd(&dir);
    let script = format!(
        "mkdir -p /mnt/big && mount -t tmpfs -o size=420m tmpfs /mnt/big\n\
         dd if=/dev/zero of=/mnt/big/fill bs=1M count=300 2>/dev/null\n\
         echo RV-FILLED; sleep 5; rm /mnt/big/fill; echo RV-FREED\n{MEMINFO_LOOP}"
    );
    let balloon = BalloonConfig { free_page_reporting: true, ..BalloonConfig::default() };
    let mem = MemoryOptions { mergeable: true, ..MemoryOptions::default() };
    let cfg = guest_config(&initrd, &script, &log, balloon, mem);
    let vmm = Vmm::start(&dir.path("a.sock"));
    let c = &vmm.client;
    c.create(&cfg).unwrap();
    c.boot().unwrap();
    wait_console(&log, "RV-FILLED", Duration::from_secs(300));
    let rss_full = vmm.rss_mib();
    let reported_full = c.balloon_info().unwrap().reported_mib;
    assert!(rss_full.1 >= 300, "the guest touched its memory: {rss_full:?} MiB");
    wait_console(&log, "RV-FREED", Duration::from_secs(60));
    // Freed guest memory is reported (2 MiB blocks, after the driver's 2 s delay) and given
    // back to the host.
    let rss_freed = wait_rss_below(&vmm, rss_full.1 - 150, Duration::from_secs(90));
    let b = c.balloon_info().unwrap();
    eprintln!(
        "free page reporting: VMM RSS {} → {} MiB (anonymous {} → {} MiB) after the guest freed 300 MiB; {} MiB \
         reported since the fill ({} in all)",
        rss_full.0,
        rss_freed.0,
        rss_full.1,
        rss_freed.1,
        b.reported_mib - reported_full,
        b.reported_mib
    );
    assert!(b.reported_mib >= reported_full + 150, "{b:?}");
    assert_eq!((b.target_mib, b.actual_mib), (0, 0), "no balloon inflation involved");

    // Guest RAM is marked mergeable.
    let ksm = vmm::ksm::process(&vmm::ksm::proc_dir(vmm.child.id())).unwrap();
    assert!(ksm.mergeable_bytes >= 512 << 20, "{ksm:?}");
    match vmm::ksm::host(Path::new(vmm::ksm::SYS_KSM)) {
        Err(e) => eprintln!("skipped: KSM merging: the host has no KSM ({}: {e})", vmm::ksm::SYS_KSM),
        Ok(h) if !h.running() => {
            eprintln!("skipped: KSM merging: /sys/kernel/mm/ksm/run is {} (KSM off on this host)", h.run)
        }
        Ok(_) => {
            // Guest RAM holds identical pages (zeroed kernel pages, ...): KSM merges some within
            // its first scans (two passes over 512 MiB at the default 100 pages per 20 ms).
            let end = Instant::now() + Duration::from_secs(180);
            loop {
                let k = vmm::ksm::process(&vmm::ksm::proc_dir(vmm.child.id())).unwrap();
                if k.merging_pages > 0 {
                    eprintln!("KSM: {} MiB of the VMM merged", k.merging_bytes() >> 20);
                    break;
                }
                assert!(Instant::now() < end, "KSM runs but merged nothing of the VMM: {k:?}");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    c.vmm_shutdown().unwrap();
}

//! The VMM driven over its REST API with the Debian guest on `emu`: lifecycle with a
//! clock-driven counter (pause stops it, resume continues it, wrong transitions are 409 and
//! the VM keeps running), and snapshot → kill -9 → restore in a new VMM process, where the
//! counter, a tmpfs file and a disk write all carry on; corrupt or missing snapshot files are
//! refused with a clear error and left untouched.

mod common;

use api::client::{Client, ClientError};
use api::types::DiskConfig;
use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

const COUNTER: &str = "i=0; while true; do echo \"RV-COUNT $i\"; i=$((i+1)); sleep 1; done\n";

#[test]
fn lifecycle_pause_resume_shutdown_and_conflicts() {
    let dir = TempDir::new("api-life");
    let sock = dir.path("api.sock");
    let log = dir.path("console.log");
    let vmm = Vmm::start(&sock);
    let c = &vmm.client;
    assert_eq!(std::fs::metadata(&sock).unwrap().mode() & 0o777, 0o600, "socket mode");
    assert_eq!(status_code(c.boot()), 409, "boot before create");
    c.create(&guest_config(COUNTER, &log, vec![])).unwrap();
    assert_eq!(c.info().unwrap().state, "Created");
    c.boot().unwrap();
    assert_eq!(status_code(c.boot()), 409, "boot twice");
    assert_eq!(status_code(c.resume()), 409, "resume a running VM");
    wait_count(&log, 2, Duration::from_secs(120));

    c.pause().unwrap();
    let info = c.info().unwrap();
    assert_eq!(info.state, "Paused");
    assert_eq!(status_code(c.pause()), 409, "pause a paused VM");
    let at_pause = last_count(&log).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(last_count(&log).unwrap(), at_pause, "the counter must stop while paused");

    c.resume().unwrap();
    wait_count(&log, at_pause + 2, Duration::from_secs(30));
    assert_eq!(status_code(c.snapshot(&dir.path("snap"))), 409, "snapshot a running VM");
    assert_eq!(c.info().unwrap().state, "Running", "a refused request leaves the VM running");
    let counters = c.counters().unwrap();
    assert!(counters.vcpus[0]["pio_write"] > 0, "{counters:?}");

    c.shutdown().unwrap();
    let info = c.info().unwrap();
    assert_eq!(info.state, "Shutdown");
    // Stopped through the API (the guest powered off on the button, or was stopped): not a
    // failure a supervisor would restart.
    assert!(matches!(info.ended, Some(api::types::VmEnd::Shutdown | api::types::VmEnd::PowerOff)), "{:?}", info.ended);
    assert_eq!(status_code(c.pause()), 409, "pause after shutdown");
    assert!(c.ping().is_ok(), "the VMM outlives its VM");
    c.delete().unwrap();
    assert_eq!(status_code(c.info().map(|_| ())), 404);
    c.vmm_shutdown().unwrap();
}

fn file_digests(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let d = sha256_hex(&std::fs::read(&p).unwrap());
            (p, d)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn snapshot_kill_restore_continues_the_guest() {
    let dir = TempDir::new("api-snap");
    let log = dir.path("console.log");
    // A disk with an ext4 file system for the guest to write to before the snapshot.
    let img = dir.path("disk.raw");
    host("mkfs.ext4", &["-q", "-F", img.to_str().unwrap(), "32M"]);
    let script = String::from(
        "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt\n\
         echo tmpfs-$$-marker > /tmp/mark\n\
         echo disk-written-before-snapshot > /mnt/f && sync\n\
         i=0; while true; do echo \"RV-COUNT $i $(cat /tmp/mark) $(cat /mnt/f)\"; i=$((i+1)); sleep 1; done\n",
    );
    let disks = vec![DiskConfig {
        path: img.display().to_string(),
        format: Some(api::types::DiskFormat::Raw),
        readonly: false,
        serial: None,
        ..Default::default()
    }];
    let snap = dir.path("snap");
    let before;
    {
        let vmm = Vmm::start(&dir.path("a.sock"));
        vmm.client.create(&guest_config(&script, &log, disks)).unwrap();
        vmm.client.boot().unwrap();
        wait_count(&log, 3, Duration::from_secs(120));
        vmm.client.pause().unwrap();
        before = last_count(&log).unwrap();
        // The guest's mount (reads), write and sync (writes, a flush) show in the disk's
        // counters, each operation timed once.
        let counters = vmm.client.counters().unwrap();
        let b = counters.devices["disk0"].block.clone().expect("disk0 has block counters");
        assert!(b.read_ops > 0 && b.read_bytes >= 1024 && b.write_ops > 0 && b.write_bytes >= 512, "{b:?}");
        assert!(b.flush_ops > 0, "sync flushes the disk: {b:?}");
        assert_eq!(
            (b.read_latency.count, b.write_latency.count, b.flush_latency.count),
            (b.read_ops, b.write_ops, b.flush_ops),
            "{b:?}"
        );
        assert_eq!(b.error_pauses, 0);
        vmm.client.snapshot(&snap).unwrap();
        // kill -9 the VMM (Vmm's drop).
    }
    // Touched memory only: a 512 MiB guest that used well under half of it.
    let mem = std::fs::metadata(snap.join("memory.bin")).unwrap();
    assert_eq!(mem.len(), 512 << 20, "apparent size = guest RAM");
    assert!(mem.blocks() * 512 < 200 << 20, "memory.bin takes {} MiB on disk", (mem.blocks() * 512) >> 20);

    let vmm = Vmm::start(&dir.path("b.sock"));
    let c = &vmm.client;
    c.restore(&snap).unwrap();
    assert_eq!(c.info().unwrap().state, "Paused");
    assert_eq!(status_code(c.restore(&snap)), 409, "restore over a live VM");
    c.resume().unwrap();
    let after = wait_count(&log, before + 2, Duration::from_secs(60));
    let text = std::fs::read_to_string(&log).unwrap();
    // The counter went on from where it was (the first line after the restore is before+1).
    let counts: Vec<u64> =
        text.lines().filter_map(|l| l.strip_prefix("RV-COUNT ")?.split_whitespace().next()?.parse().ok()).collect();
    let pos = counts.iter().rposition(|&n| n == before).unwrap();
    assert_eq!(counts.get(pos + 1), Some(&(before + 1)), "counter after restore: {counts:?}");
    assert!(after > before);
    let last = text.lines().rev().find(|l| l.starts_with("RV-COUNT ")).unwrap();
    assert!(last.contains("-marker"), "tmpfs file lost: {last}");
    assert!(last.contains("disk-written-before-snapshot"), "disk write lost: {last}");
    c.vmm_shutdown().unwrap();
}

/// A 2-vCPU guest: a counter pinned to vCPU 1 (an application processor) prints, with each
/// count, a second counter that a loop pinned to vCPU 0 advances. Snapshot, kill -9, restore
/// in a new VMM: both go on from where they were, so both vCPUs run after the restore.
#[test]
fn two_vcpu_snapshot_kill_restore_continues_on_both_vcpus() {
    let dir = TempDir::new("api-snap-smp");
    let log = dir.path("console.log");
    let script = "echo 0 > /tmp/z\n\
         taskset -c 0 sh -c 'z=0; while true; do z=$((z+1)); echo $z > /tmp/z; sleep 1; done' &\n\
         taskset -c 1 sh -c 'i=0; while true; do echo \"RV-COUNT $i z=$(cat /tmp/z) cpu=$(cat /proc/self/stat | cut -d\" \" -f39)\"; i=$((i+1)); sleep 1; done'\n";
    let mut cfg = guest_config(script, &log, vec![]);
    cfg.cpus = 2;
    let snap = dir.path("snap");
    let before;
    let z_of = |line: &str| -> u64 {
        line.split("z=").nth(1).and_then(|t| t.split_whitespace().next()?.parse().ok()).unwrap_or(0)
    };
    let z_before;
    {
        let vmm = Vmm::start(&dir.path("a.sock"));
        vmm.client.create(&cfg).unwrap();
        vmm.client.boot().unwrap();
        wait_count(&log, 3, Duration::from_secs(180));
        // vm.counters lists each vCPU, and each has run: vCPU 0 booted the kernel, vCPU 1
        // prints the counter (the serial port's writes are port I/O the VMM counts).
        let counters = vmm.client.counters().unwrap();
        assert_eq!(counters.vcpus.len(), 2, "{counters:?}");
        for (i, v) in counters.vcpus.iter().enumerate() {
            assert!(v["pio_write"] > 0 && v["pio_read"] > 0, "vCPU {i} has not run: {counters:?}");
        }
        vmm.client.pause().unwrap();
        before = last_count(&log).unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        z_before = z_of(text.lines().rev().find(|l| l.starts_with("RV-COUNT ")).unwrap());
        vmm.client.snapshot(&snap).unwrap();
    }
    let vmm = Vmm::start(&dir.path("b.sock"));
    let c = &vmm.client;
    c.restore(&snap).unwrap();
    assert_eq!(c.info().unwrap().state, "Paused");
    c.resume().unwrap();
    wait_count(&log, before + 3, Duration::from_secs(90));
    // The restored VMM's counters start from zero and show vCPU 1 printing again.
    let counters = c.counters().unwrap();
    assert_eq!(counters.vcpus.len(), 2, "{counters:?}");
    assert!(counters.vcpus[1]["pio_write"] > 0, "vCPU 1 has not run since the restore: {counters:?}");
    // The restored VMM names its two vCPU threads, with host thread IDs that are its own.
    let threads = c.info().unwrap().vcpu_threads;
    assert_eq!(threads.iter().map(|t| t.vcpu).collect::<Vec<_>>(), [0, 1], "{threads:?}");
    for t in &threads {
        let comm = std::fs::read_to_string(format!("/proc/{}/task/{}/comm", vmm.child.id(), t.tid)).unwrap();
        assert_eq!(comm.trim(), format!("vcpu{}", t.vcpu));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let counts: Vec<u64> =
        text.lines().filter_map(|l| l.strip_prefix("RV-COUNT ")?.split_whitespace().next()?.parse().ok()).collect();
    let pos = counts.iter().rposition(|&n| n == before).unwrap();
    assert_eq!(counts.get(pos + 1), Some(&(before + 1)), "counter after restore: {counts:?}");
    let last = text.lines().rev().find(|l| l.starts_with("RV-COUNT ")).unwrap();
    assert!(z_of(last) > z_before, "vCPU 0's loop did not go on after the restore: {last} (before: z={z_before})");
    assert!(last.contains("cpu=1"), "the counter runs on vCPU 1: {last}");
    c.vmm_shutdown().unwrap();
}

/// `state` (a JSON object's text) with the first `"key":value` scalar set to `value`.
fn json_set(state: &str, key: &str, value: &str) -> String {
    let k = format!("\"{key}\":");
    let at = state.find(&k).unwrap_or_else(|| panic!("{key} not in the state")) + k.len();
    let end = at + state[at..].find([',', '}']).unwrap();
    format!("{}{value}{}", &state[..at], &state[end..])
}

/// `state` with the (object or scalar) value of the first `"key":` replaced by `value`.
fn json_replace_value(state: &str, key: &str, value: &str) -> String {
    let k = format!("\"{key}\":");
    let at = state.find(&k).unwrap() + k.len();
    let b = state.as_bytes();
    let end = if b[at] == b'{' {
        let (mut depth, mut i, mut in_str) = (0, at, false);
        loop {
            match b[i] {
                b'"' if i == 0 || b[i - 1] != b'\\' => in_str = !in_str,
                b'{' if !in_str => depth += 1,
                b'}' if !in_str => {
                    depth -= 1;
                    if depth == 0 {
                        break i + 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
    } else {
        at + state[at..].find([',', '}']).unwrap()
    };
    format!("{}{value}{}", &state[..at], &state[end..])
}

/// A `snapshot.json` with `state` as its state line and a header (from `good`) whose digest
/// matches it: a forgery the checksum cannot catch.
fn with_header(good: &[u8], state: &str) -> Vec<u8> {
    let head = std::str::from_utf8(&good[..good.iter().position(|b| *b == b'\n').unwrap()]).unwrap();
    let old = head.split("\"sha256\":\"").nth(1).unwrap().split('"').next().unwrap();
    let head = head.replace(old, &sha256_hex(state.as_bytes()));
    format!("{head}\n{state}\n").into_bytes()
}

#[test]
fn corrupt_or_missing_snapshot_is_refused_and_left_alone() {
    let dir = TempDir::new("api-corrupt");
    let log = dir.path("console.log");
    let snap = dir.path("snap");
    {
        let vmm = Vmm::start(&dir.path("a.sock"));
        // With a virtio device, so the state has virtqueues to forge.
        let mut cfg = guest_config(COUNTER, &log, vec![]);
        cfg.rng = true;
        vmm.client.create(&cfg).unwrap();
        vmm.client.boot().unwrap();
        wait_count(&log, 1, Duration::from_secs(120));
        vmm.client.pause().unwrap();
        vmm.client.snapshot(&snap).unwrap();
        assert_eq!(status_code(vmm.client.snapshot(&snap)), 400, "snapshot into a folder that is not empty");
    }
    let vmm = Vmm::start(&dir.path("b.sock"));
    let c = &vmm.client;
    let refused = |what: &str| match c.restore(&snap) {
        Err(ClientError::Http { status: 400, message, .. }) => message,
        other => panic!("{what}: expected 400, got {other:?}"),
    };
    // A flipped byte in the state.
    let state = snap.join("snapshot.json");
    let good = std::fs::read(&state).unwrap();
    let mut bad = good.clone();
    let k = bad.len() - 20;
    bad[k] ^= 0x01;
    std::fs::write(&state, &bad).unwrap();
    let digests = file_digests(&snap);
    let m = refused("corrupt state");
    assert!(m.contains("snapshot.json") && m.contains("checksum"), "{m}");
    assert_eq!(file_digests(&snap), digests, "a failed restore changed the snapshot");
    std::fs::write(&state, &good).unwrap();

    // Issue 15 items 4, 6 and 8: forged states with a valid checksum.
    let secret = dir.path("outside-secret");
    std::fs::write(&secret, vec![7u8; 4096]).unwrap();
    let secret_name = format!("../{}", secret.file_name().unwrap().to_str().unwrap());
    // (what, the key whose value is forged, found after `anchor`, the new value, the word
    // the refusal must name).
    let secret_json = format!("{secret_name:?}");
    let forgeries: [(&str, &str, &str, &str, &str); 6] = [
        ("memory.file ../", "\"memory\":", "file", &secret_json, "memory.file"),
        ("memory.file absolute", "\"memory\":", "file", "\"/etc/passwd\"", "memory.file"),
        ("clock_ns 0", "{", "clock_ns", "0", "clock_ns"),
        ("clock_ns max", "{", "clock_ns", "18446744073709551615", "clock_ns"),
        ("irqchip null", "\"vm\":", "irqchip", "null", "irqchip"),
        ("queue size", "\"queues\":", "size", "1000", "size 1000"),
    ];
    for (what, anchor, key, value, want) in forgeries {
        let body = std::str::from_utf8(&good[good.iter().position(|b| *b == b'\n').unwrap() + 1..]).unwrap().trim_end();
        let at = body.find(anchor).unwrap_or_else(|| panic!("{what}: {anchor} not in the state"));
        let tail = if value == "null" {
            json_replace_value(&body[at..], key, value)
        } else {
            json_set(&body[at..], key, value)
        };
        let forged = format!("{}{tail}", &body[..at]);
        assert_ne!(forged, body, "{what}: the edit changed nothing");
        std::fs::write(&state, with_header(&good, &forged)).unwrap();
        let m = refused(what);
        assert!(m.contains(want), "{what}: {m}");
        assert!(!m.contains("4096 bytes"), "{what}: the message leaks the outside file's size: {m}");
    }
    std::fs::write(&state, &good).unwrap();
    // A state file over the size bound is refused before it is read.
    let huge = dir.path("huge-snap");
    std::fs::create_dir_all(&huge).unwrap();
    std::fs::File::create(huge.join("snapshot.json")).unwrap().set_len(1 << 30).unwrap();
    let m = match c.restore(&huge) {
        Err(ClientError::Http { status: 400, message, .. }) => message,
        other => panic!("huge state: {other:?}"),
    };
    assert!(m.contains("at most"), "{m}");
    // FIFOs instead of the files: refused at once, and the VMM keeps answering.
    for name in ["snapshot.json", "memory.bin"] {
        let p = snap.join(name);
        let keep = std::fs::read(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        host("mkfifo", &[p.to_str().unwrap()]);
        let t = Instant::now();
        let m = refused(name);
        assert!(m.contains(name) && m.contains("not a regular file"), "{name}: {m}");
        assert!(t.elapsed() < Duration::from_secs(10), "{name}: restore took {:?}", t.elapsed());
        assert!(c.ping().is_ok());
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, keep).unwrap();
    }
    // A flipped byte in guest memory.
    let memf = snap.join("memory.bin");
    let mem_good = std::fs::read(&memf).unwrap();
    let mut mem_bad = mem_good.clone();
    let nz = mem_bad.iter().rposition(|b| *b != 0).unwrap();
    mem_bad[nz] ^= 0x80;
    std::fs::write(&memf, &mem_bad).unwrap();
    let m = refused("corrupt memory");
    assert!(m.contains("memory.bin") && m.contains("checksum"), "{m}");
    // Missing memory file.
    std::fs::remove_file(&memf).unwrap();
    let m = refused("missing memory");
    assert!(m.contains("memory.bin"), "{m}");
    // Missing folder.
    let m = match c.restore(&dir.path("nope")) {
        Err(ClientError::Http { status: 400, message, .. }) => message,
        other => panic!("missing folder: {other:?}"),
    };
    assert!(m.contains("snapshot.json"), "{m}");
    assert_eq!(status_code(c.info().map(|_| ())), 404, "no VM after failed restores");
    assert!(c.ping().is_ok());
}

#[test]
fn run_with_api_socket_serves_the_same_api() {
    let dir = TempDir::new("api-run");
    let sock = dir.path("run.sock");
    let log = dir.path("console.log");
    let extra = ["--api-socket".to_string(), sock.display().to_string()];
    let mut child = guest_command(COUNTER, &log, &extra).stdin(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let c = Client::new(&sock).unwrap().with_timeout(Duration::from_secs(60));
    let end = Instant::now() + Duration::from_secs(10);
    while c.ping().is_err() {
        assert!(Instant::now() < end, "API did not come up");
        std::thread::sleep(Duration::from_millis(10));
    }
    let info = c.info().unwrap();
    assert_eq!((info.state.as_str(), info.config.memory_mib), ("Running", 512));
    wait_count(&log, 1, Duration::from_secs(120));
    c.pause().unwrap();
    let n = last_count(&log).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(last_count(&log).unwrap(), n, "paused");
    c.resume().unwrap();
    wait_count(&log, n + 1, Duration::from_secs(30));
    c.vmm_shutdown().unwrap();
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(0));
}

#[test]
fn real_vmm_answers_malformed_requests_with_4xx() {
    let dir = TempDir::new("api-fuzz");
    let vmm = Vmm::start(&dir.path("f.sock"));
    let c = &vmm.client;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let fields = [
        ("memory_mib", vec!["0", "1", "18446744073709551615", "-5", "\"512\"", "1e30", "null"]),
        ("cpus", vec!["0", "65", "255", "256", "-1", "true"]),
        ("accel", vec!["\"xen\"", "1", "\"\"", "[]"]),
        ("serial", vec!["\"tcp:1\"", "\"file=relative\"", "{}", "7"]),
        (
            "disks",
            vec!["[{\"path\":\"/nonexistent.img\"}]", "[{\"path\":\"/x\",\"format\":\"vmdk\"}]", "[{}]", "\"d\""],
        ),
        (
            "nets",
            vec!["[{\"tap\":\"abcdefghijklmnopqrst\"}]", "[{\"tap\":\"t0\",\"mac\":\"01:00:00:00:00:00\"}]", "[1]"],
        ),
        ("vsock", vec!["{\"cid\":2,\"socket\":\"/tmp/x\"}", "{\"cid\":99999999999,\"socket\":\"/x\"}", "{\"cid\":3}"]),
        ("bogus_field", vec!["1", "\"x\""]),
        (
            "cmdline",
            vec!["\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"", "5"],
        ),
    ];
    let long_cmdline = format!("\"{}\"", "a".repeat(5000));
    for i in 0..600 {
        let mut body = String::from("{\"kernel\":\"/nonexistent/vmlinuz\"");
        for _ in 0..1 + next() % 3 {
            let (k, vals) = &fields[(next() % fields.len() as u64) as usize];
            let v = if *k == "cmdline" && i % 7 == 0 {
                long_cmdline.as_str()
            } else {
                vals[(next() % vals.len() as u64) as usize]
            };
            body.push_str(&format!(",\"{k}\":{v}"));
        }
        body.push('}');
        if i % 5 == 0 {
            // Truncated JSON.
            body.truncate((next() % body.len() as u64) as usize);
        }
        let r = c.request("PUT", "vm.create", Some(body.clone().into_bytes())).unwrap();
        assert!((400..500).contains(&r.status), "vm.create {body} → {}", r.status);
        let routes = ["vm.boot", "vm.pause", "vm.resume", "vm.snapshot", "vm.restore", "vm.nope", "vm.info"];
        let route = routes[(next() % routes.len() as u64) as usize];
        let junk = format!("{{\"destination_url\":\"{}\"}}", "x".repeat((next() % 100) as usize));
        let r = c.request("PUT", route, Some(junk.into_bytes())).unwrap();
        assert!((400..500).contains(&r.status), "{route} → {}", r.status);
    }
    assert!(c.ping().is_ok(), "the VMM still answers");
    assert_eq!(status_code(c.info().map(|_| ())), 404, "nothing was created");
}

/// Issue 15 item 5 through the API: a qcow2 backing loop is a 400 at `vm.boot` (it used to
/// kill the VMM with a stack overflow), and the VMM keeps serving.
#[test]
fn backing_loop_is_a_400_and_the_vmm_lives() {
    let dir = TempDir::new("api-loop");
    let (a, b) = (dir.path("a.qcow2"), dir.path("b.qcow2"));
    host("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", a.to_str().unwrap(), "1M"]);
    host("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", b.to_str().unwrap(), "1M"]);
    let vmm = Vmm::start(&dir.path("loop.sock"));
    let c = &vmm.client;
    let disks = vec![DiskConfig {
        path: a.display().to_string(),
        format: Some(api::types::DiskFormat::Qcow2),
        ..Default::default()
    }];
    c.create(&guest_config(COUNTER, &dir.path("console.log"), disks)).unwrap();
    match c.boot() {
        Err(ClientError::Http { status: 400, message, .. }) => {
            assert!(message.contains("a.qcow2") && message.contains("loops back"), "{message}")
        }
        other => panic!("expected 400, got {other:?}"),
    }
    assert!(c.ping().is_ok(), "the VMM survived");
    assert_eq!(c.info().unwrap().state, "Created", "the failed boot left the VM as it was");
}

/// `vm.info` says how the VM ended, so a supervisor can tell a guest crash (a failure) from
/// a power-off: a kernel panic with `panic=-1` resets the guest and is reported as `reset`.
#[test]
fn a_guest_crash_is_reported_as_a_reset() {
    let dir = TempDir::new("api-crash");
    let log = dir.path("console.log");
    let vmm = Vmm::start(&dir.path("crash.sock"));
    let c = &vmm.client;
    // No init and no root device: the kernel panics early, and panic=-1 resets.
    let mut cfg = guest_config("", &log, vec![]);
    cfg.cmdline = "console=ttyS0 panic=-1 rdinit=/nonexistent root=/dev/nonexistent".into();
    c.create(&cfg).unwrap();
    c.boot().unwrap();
    let end = Instant::now() + Duration::from_secs(120);
    let info = loop {
        let info = c.info().unwrap();
        if info.state == "Shutdown" {
            break info;
        }
        assert!(
            Instant::now() < end,
            "the guest did not end:\n{}",
            tail(&std::fs::read_to_string(&log).unwrap_or_default())
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(std::fs::read_to_string(&log).unwrap().contains("Kernel panic"), "expected a panic");
    match &info.ended {
        Some(api::types::VmEnd::Reset { reason }) => assert!(!reason.is_empty()),
        other => panic!("expected ended = reset, got {other:?}"),
    }
    assert!(info.ended.as_ref().is_some_and(api::types::VmEnd::is_failure));
}

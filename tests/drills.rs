//! `rustvisor drill NAME` end to end: each drill runs its private daemon, boots Debian
//! guests on `emu`, breaks something, prints what it measured and must pass (exit 0 and
//! "PASS"), leaving no daemon, VMM, folder, mount or cgroup behind. cpu-overcommit runs at
//! a small scale (3 VMs on this host's CPUs, 3 s a step) to keep the suite short;
//! bridge-misconfiguration runs its daemon in a network namespace of its own.

mod common;

use std::process::Command;

use common::*;

/// Runs a drill: its output, which must end with PASS (or say it was skipped).
fn drill(args: &[&str]) -> String {
    let (kernel, initrd) = (guest_file("vmlinuz"), guest_file("initrd.img"));
    let out = Command::new(env!("CARGO_BIN_EXE_rustvisor"))
        .arg("drill")
        .args(args)
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}{err}");
    assert!(out.status.success() && text.trim_end().ends_with("PASS"), "drill {args:?} failed:\n{text}{err}");
    // Nothing left: its daemon's folder is gone.
    let tag = text.lines().find_map(|l| l.strip_prefix("private daemon: ")).and_then(|l| l.split(' ').next());
    if let Some(dir) = tag {
        assert!(!std::path::Path::new(dir).exists(), "{dir} left behind");
    }
    text
}

#[test]
fn storage_saturation_pauses_the_vm_and_it_continues_with_its_data_whole() {
    let out = drill(&["storage-saturation"]);
    if out.contains("skipped:") {
        return;
    }
    assert!(out.contains("No space left on device"), "{out}");
    assert!(out.contains("the image holds the guest's 12 MiB: yes"), "{out}");
}

#[test]
fn memory_exhaustion_balloons_then_kills_the_low_priority_vm() {
    let out = drill(&["memory-exhaustion"]);
    if out.contains("skipped:") {
        return;
    }
    assert!(out.contains("event oom-killed") && out.contains("priority low"), "{out}");
    assert!(out.contains("important: running"), "{out}");
}

#[test]
fn cpu_overcommit_shows_ready_time_rising() {
    let out = drill(&["cpu-overcommit", "--vms", "3", "--seconds", "3"]);
    let rows: Vec<&str> = out.lines().filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit())).collect();
    assert_eq!(rows.len(), 3, "one row per step: {out}");
}

#[test]
fn bridge_misconfiguration_is_seen_by_net_check_and_repaired() {
    let out = drill(&["bridge-misconfiguration"]);
    if out.contains("skipped:") {
        return;
    }
    assert!(out.contains("net check: network lan: bridge rv-lan is down"), "{out}");
    assert!(out.contains("event network-repaired"), "{out}");
    assert!(out.contains("answered again after the repair: true"), "{out}");
}

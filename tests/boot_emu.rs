//! Boots the stock Debian kernel (fetched by scripts/setup-guest.sh) on the `emu`
//! accelerator, through both entry paths, and checks what the guest's userspace prints.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("guest")
}

fn guest_file(name: &str) -> PathBuf {
    let p = guest_dir().join(name);
    assert!(p.exists(), "{} is missing: run scripts/setup-guest.sh first (scripts/test.sh does)", p.display());
    p
}

/// Runs `rustvisor run` on emu with the serial console going to a file; returns
/// (exit status, console text, stderr).
fn boot(kernel: &str, cmdline: &str, tag: &str) -> (i32, String, String) {
    let log = std::env::temp_dir().join(format!("rv-boot-{}-{tag}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_rustvisor"))
        .args(["run", "--kernel"])
        .arg(guest_file(kernel))
        .arg("--initrd")
        .arg(guest_file("initrd.img"))
        .args(["--cmdline", cmdline, "--memory", "512M", "--accel", "emu", "--serial"])
        .arg(format!("file={}", log.display()))
        .output()
        .expect("spawn rustvisor");
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    eprintln!("{tag}: {:.1} s wall", start.elapsed().as_secs_f64());
    (out.status.code().unwrap_or(-1), console, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn check_test_workload(code: i32, console: &str, stderr: &str) {
    let tail: String =
        console.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    let version = std::fs::read_to_string(guest_file("kernel-version")).unwrap();
    let digest = std::fs::read_to_string(guest_file("rv-test-data.sha256")).unwrap();
    assert!(console.contains("Linux version"), "no boot banner; stderr: {stderr}\n{tail}");
    assert!(console.contains("RUSTVISOR-INIT-OK"), "init marker missing; stderr: {stderr}\n{tail}");
    assert!(console.contains(&format!("RV-UNAME {}", version.trim())), "uname -r differs; stderr: {stderr}\n{tail}");
    assert!(console.contains(&format!("RV-SHA256 {}", digest.trim())), "sha256sum differs; stderr: {stderr}\n{tail}");
    assert!(console.contains("RV-DONE"), "workload did not finish; stderr: {stderr}\n{tail}");
    assert!(
        console.contains("ACPI: PM: Preparing to enter system sleep state S5"),
        "power-off did not go through ACPI S5:\n{tail}"
    );
    assert_eq!(code, 0, "guest powered off, so the exit status must be 0; stderr: {stderr}\n{tail}");
}

#[test]
fn bzimage_boots_to_userspace_on_emu() {
    let (code, console, stderr) = boot("vmlinuz", "console=ttyS0 panic=-1 rv.test=1", "bzimage");
    check_test_workload(code, &console, &stderr);
}

#[test]
fn pvh_vmlinux_boots_to_userspace_on_emu() {
    let (code, console, stderr) = boot("vmlinux", "console=ttyS0 panic=-1 rv.test=1", "pvh");
    check_test_workload(code, &console, &stderr);
}

#[test]
fn kernel_panic_ends_with_nonzero_status() {
    // No init in the initramfs and no root device: the kernel panics, and panic=-1 resets.
    let (code, console, stderr) =
        boot("vmlinuz", "console=ttyS0 panic=-1 rdinit=/nonexistent root=/dev/nonexistent", "panic");
    assert!(console.contains("Kernel panic"), "expected a panic:\n{console}");
    assert_eq!(code, 1, "a crash must end with status 1; stderr: {stderr}");
    assert_eq!(stderr.trim().lines().filter(|l| l.starts_with("rustvisor:")).count(), 1, "one-line reason: {stderr}");
    assert!(stderr.contains("reset"), "{stderr}");
}

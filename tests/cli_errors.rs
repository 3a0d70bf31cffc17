//! Bad input to `rustvisor run`: one line naming the problem, exit status 2.

use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rustvisor")).args(args).output().expect("spawn rustvisor");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn tmpfile(name: &str, data: &[u8]) -> String {
    let p = std::env::temp_dir().join(format!("rv-cli-{}-{name}", std::process::id()));
    std::fs::write(&p, data).unwrap();
    p.display().to_string()
}

#[test]
fn not_a_kernel_is_refused() {
    let k = tmpfile("notkernel", b"just some text, not a kernel at all");
    let (code, err) = run(&["run", "--kernel", &k, "--accel", "emu", "--serial", "null"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a kernel"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn memory_sizes_are_checked() {
    let k = tmpfile("k2", b"x");
    for (m, want) in [("0", "out of range"), ("banana", "not a size"), ("100000G", "out of range")] {
        let (code, err) = run(&["run", "--kernel", &k, "--memory", m, "--serial", "null"]);
        assert_eq!(code, 2, "{m}: {err}");
        assert!(err.contains("--memory") && err.contains(want), "{m}: {err}");
    }
}

#[test]
fn missing_files_and_unknown_values() {
    let (code, err) = run(&["run", "--kernel", "/nonexistent/vmlinuz", "--serial", "null"]);
    assert_eq!(code, 2);
    assert!(err.contains("--kernel") && err.contains("no such file"), "{err}");
    let k = tmpfile("k3", b"x");
    let (code, err) = run(&["run", "--kernel", &k, "--accel", "xen"]);
    assert_eq!(code, 2);
    assert!(err.contains("auto, kvm, emu"), "{err}");
    let (code, err) = run(&["run", "--kernel", &k, "--serial", "tcp:1"]);
    assert_eq!(code, 2);
    assert!(err.contains("--serial"), "{err}");
    let (code, _) = run(&["run", "--kernel", &k, "--frobnicate"]);
    assert_eq!(code, 2);
}

#[test]
fn emu_refuses_more_than_one_cpu() {
    let k = tmpfile("k4", b"x");
    let (code, err) = run(&["run", "--kernel", &k, "--accel", "emu", "--cpus", "2", "--serial", "null"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--cpus"), "{err}");
}

#[test]
fn initrd_larger_than_memory_is_refused() {
    let kernel = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/vmlinuz");
    assert!(kernel.exists(), "run scripts/setup-guest.sh first (scripts/test.sh does)");
    let big = std::env::temp_dir().join(format!("rv-cli-{}-bigrd", std::process::id()));
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(40 << 20).unwrap();
    let (code, err) = run(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        big.to_str().unwrap(),
        "--memory",
        "32M",
        "--accel",
        "emu",
        "--serial",
        "null",
    ]);
    let _ = std::fs::remove_file(&big);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--initrd") && err.contains("does not fit"), "{err}");
}

#[test]
fn cpu_count_is_checked() {
    let k = tmpfile("k5", b"x");
    let (code, err) = run(&["run", "--kernel", &k, "--cpus", "0", "--serial", "null"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--cpus") && err.contains("at least 1"), "{err}");
    let (code, err) = run(&["run", "--kernel", &k, "--cpus", "300", "--serial", "null"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--cpus"), "{err}");
}

#[test]
fn kvm_where_it_cannot_work_is_a_clear_error() {
    // On a PVM host (like the project's build machines) or without /dev/kvm, an explicit
    // `--accel kvm` must fail at once with one line, not hang in the guest.
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    let no_kvm = !std::path::Path::new("/dev/kvm").exists();
    if !pvm && !no_kvm {
        println!("skipping: this host has usable KVM");
        return;
    }
    let k = tmpfile("k6", b"x");
    let start = std::time::Instant::now();
    let (code, err) = run(&["run", "--kernel", &k, "--accel", "kvm", "--serial", "null"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--accel") && err.contains("kvm"), "{err}");
    assert!(err.contains("emu"), "names what is accepted here: {err}");
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
}

mod common;

/// Runs `rustvisor run` with the real guest kernel and `extra` device flags; the VM must not
/// start. Returns (status, stderr).
fn run_with_devices(extra: &[&str]) -> (i32, String) {
    let k = common::guest_file("vmlinuz");
    let mut args = vec!["run", "--kernel", k.to_str().unwrap(), "--accel", "emu", "--serial", "null"];
    args.extend_from_slice(extra);
    run(&args)
}

fn one_line(err: &str) {
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn bad_disk_options_are_refused_and_images_left_alone() {
    let dir = common::TempDir::new("cli-disk");
    let (code, err) = run_with_devices(&["--disk", "path=/nonexistent/disk.img"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--disk") && err.contains("no such file"), "{err}");
    one_line(&err);

    let img = dir.path("d.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let img_s = img.to_str().unwrap();
    let (code, err) = run_with_devices(&["--disk", &format!("path={img_s},format=vmdk")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--disk") && err.contains("raw, qcow2"), "{err}");
    one_line(&err);

    let (code, err) = run_with_devices(&["--disk", &format!("path={img_s}"), "--disk", &format!("path={img_s}")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--disk") && err.contains("twice"), "{err}");
    one_line(&err);

    // A raw file called qcow2 is refused, not reinterpreted.
    let (code, err) = run_with_devices(&["--disk", &format!("path={img_s},format=qcow2")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--disk"), "{err}");
    one_line(&err);

    // A qcow2 whose backing file is gone: the error names it, and neither image changes.
    let ov = dir.path("ov.qcow2");
    let ov_s = ov.to_str().unwrap();
    common::host(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-u", "-b", "/nonexistent/base.raw", "-F", "raw", ov_s, "64M"],
    );
    let before = (std::fs::read(&ov).unwrap(), std::fs::read(&img).unwrap());
    let (code, err) =
        run_with_devices(&["--disk", &format!("path={img_s}"), "--disk", &format!("path={ov_s},format=qcow2")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--disk") && err.contains("/nonexistent/base.raw"), "{err}");
    one_line(&err);
    assert_eq!((std::fs::read(&ov).unwrap(), std::fs::read(&img).unwrap()), before, "a failed start changed an image");
}

#[test]
fn bad_net_and_vsock_options_are_refused() {
    for (flag, val, want) in [
        ("--net", "tap=abcdefghijklmnopq", "1 to 15 bytes"),
        ("--net", "tap=a/b", "1 to 15 bytes"),
        ("--net", "tap=rv0,mac=01:02:03:04:05:06", "unicast"),
        ("--net", "mac=52:54:00:00:00:01", "tap=NAME"),
        ("--vsock", "cid=2,socket=/tmp/x", "3 to"),
        ("--vsock", "cid=3", "socket=PATH"),
    ] {
        let (code, err) = run_with_devices(&[flag, val]);
        assert_eq!(code, 2, "{flag} {val}: {err}");
        assert!(err.contains(flag) && err.contains(want), "{flag} {val}: {err}");
        one_line(&err);
    }
}

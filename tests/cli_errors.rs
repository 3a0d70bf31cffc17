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
    for (m, want) in [
        ("0", "out of range"),
        ("banana", "not a size"),
        ("100000G", "out of range"),
        ("16777217", "whole number of MiB"),
    ] {
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
    let long = format!("socket=/tmp/{}.sock", "s".repeat(200));
    let (code, err) = run(&["run", "--kernel", &k, "--serial", &long]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--serial") && err.contains("1 to 107 bytes"), "{err}");
    let (code, _) = run(&["run", "--kernel", &k, "--frobnicate"]);
    assert_eq!(code, 2);
}

#[test]
fn emu_refuses_more_vcpus_than_four_per_host_cpu() {
    let k = tmpfile("k4", b"x");
    let host = std::thread::available_parallelism().map_or(1, |n| n.get());
    let too_many = (4 * host + 1).min(65).to_string();
    let (code, err) = run(&["run", "--kernel", &k, "--accel", "emu", "--cpus", &too_many, "--serial", "null"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--cpus") && err.contains("accepted"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn initrd_larger_than_memory_is_refused() {
    let kernel = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/vmlinuz");
    assert!(kernel.exists(), "run scripts/setup-guest.sh first (scripts/test.sh does)");
    let big = std::env::temp_dir().join(format!("rv-cli-{}-bigrd", std::process::id()));
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(120 << 20).unwrap();
    let (code, err) = run(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        big.to_str().unwrap(),
        "--memory",
        "128M",
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

    let (code, err) = run_with_devices(&["--disk", &format!("path={img_s},on-error=stop")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--disk: on-error") && err.contains("report, pause"), "{err}");
    one_line(&err);
    // Nothing could resume a VM paused on a disk error without the API.
    let (code, err) = run_with_devices(&["--disk", &format!("path={img_s},on-error=pause")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--disk") && err.contains("on-error=pause needs --api-socket"), "{err}");
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

/// Issue 15 items 2, 3 and 5: a qcow2 header is untrusted. Backing files outside the image's
/// directory, external data files and backing loops are refused at start with one line naming
/// the image and the file (exit 2, never an abort), and no file is changed.
#[test]
fn crafted_qcow2_headers_are_refused() {
    let images = common::TempDir::new("cli-crafted");
    let host_dir = common::TempDir::new("cli-crafted-host");
    // A host file the guest must not reach (stands for /etc/shadow).
    let secret = host_dir.path("shadow");
    std::fs::write(&secret, b"root:$6$secret-hash:19000:0:99999:7:::\n").unwrap();
    let secret_s = secret.to_str().unwrap();
    let qimg = |args: &[&str]| common::host("qemu-img", args);

    let backing = images.path("backing.qcow2");
    qimg(&["create", "-q", "-f", "qcow2", "-u", "-b", secret_s, "-F", "raw", backing.to_str().unwrap(), "1M"]);
    let data = images.path("data.qcow2");
    qimg(&["create", "-q", "-f", "qcow2", "-o", &format!("data_file={secret_s}"), data.to_str().unwrap(), "1M"]);
    let (a, b) = (images.path("a.qcow2"), images.path("b.qcow2"));
    qimg(&["create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", a.to_str().unwrap(), "1M"]);
    qimg(&["create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", b.to_str().unwrap(), "1M"]);
    let snapshot = |paths: &[&std::path::Path]| paths.iter().map(|p| std::fs::read(p).unwrap()).collect::<Vec<_>>();
    let all = [backing.as_path(), data.as_path(), a.as_path(), b.as_path(), secret.as_path()];
    let before = snapshot(&all);

    for (img, want) in [
        (&backing, vec!["backing.qcow2", secret_s, "outside", "backing=allow"]),
        (&data, vec!["data.qcow2", "external data file", "data_file=allow"]),
        (&a, vec!["a.qcow2", "loops back"]),
    ] {
        let (code, err) = run_with_devices(&["--disk", &format!("path={},format=qcow2", img.display())]);
        assert_eq!(code, 2, "{}: {err}", img.display());
        for w in want {
            assert!(err.contains(w), "{}: '{w}' missing from: {err}", img.display());
        }
        one_line(&err);
    }
    // Format detection (no format=) takes the same path.
    let (code, err) = run_with_devices(&["--disk", &format!("path={}", b.display())]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("loops back"), "{err}");
    assert_eq!(snapshot(&all), before, "a refused start changed a file");
}

/// Issue 15 item 9: truncated bzImages are refused (exit 2), and a guest too small for the
/// kernel is refused with the minimum named instead of triple-faulting.
#[test]
fn truncated_kernels_and_too_small_guests_are_refused() {
    let kernel = common::guest_file("vmlinuz");
    let whole = std::fs::read(&kernel).unwrap();
    // The length the header promises (boot protocol: setup sectors, then syssize paragraphs).
    let setup_sects = match whole[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let syssize = u32::from_le_bytes(whole[0x1f4..0x1f8].try_into().unwrap()) as usize;
    let want = (setup_sects + 1) * 512 + syssize * 16;
    assert!(want <= whole.len());
    for len in [1 << 20, whole.len() / 2, want - 1] {
        let k = tmpfile(&format!("trunc-{len}"), &whole[..len]);
        let (code, err) = run(&["run", "--kernel", &k, "--memory", "256M", "--accel", "emu", "--serial", "null"]);
        let _ = std::fs::remove_file(&k);
        assert_eq!(code, 2, "{len} bytes: {err}");
        assert!(err.contains("truncated"), "{len} bytes: {err}");
        one_line(&err);
    }
    for m in ["48M", "64M"] {
        let (code, err) =
            run(&["run", "--kernel", kernel.to_str().unwrap(), "--memory", m, "--accel", "emu", "--serial", "null"]);
        assert_eq!(code, 2, "{m}: {err}");
        assert!(err.contains("--memory") && err.contains("at least"), "{m}: {err}");
        one_line(&err);
    }
}

/// Issue 15 item 7: a huge (sparse) initrd is refused by its size before it is read.
#[test]
fn huge_initrd_is_refused_before_reading() {
    let kernel = common::guest_file("vmlinuz");
    let big = std::env::temp_dir().join(format!("rv-cli-{}-4g-initrd", std::process::id()));
    std::fs::File::create(&big).unwrap().set_len(4 << 30).unwrap();
    let start = std::time::Instant::now();
    // Reaped below by wait4(2), which also returns the child's peak RSS.
    #[allow(clippy::zombie_processes)]
    let mut child = Command::new(env!("CARGO_BIN_EXE_rustvisor"))
        .args(["run", "--kernel", kernel.to_str().unwrap(), "--initrd", big.to_str().unwrap()])
        .args(["--memory", "512M", "--accel", "emu", "--serial", "null"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    let mut wstatus = 0;
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not yet reaped; both pointers are valid for the call.
    assert_eq!(unsafe { libc::wait4(pid, &mut wstatus, 0, &mut usage) }, pid);
    let elapsed = start.elapsed();
    let _ = std::fs::remove_file(&big);
    assert!(libc::WIFEXITED(wstatus) && libc::WEXITSTATUS(wstatus) == 2, "status {wstatus:#x}: {stderr}");
    assert!(stderr.contains("--initrd") && stderr.contains("does not fit"), "{stderr}");
    one_line(&stderr);
    // Guest RAM is mapped but not touched: peak RSS (KiB) far below the initrd's 4 GiB.
    assert!(usage.ru_maxrss < 256 << 10, "peak RSS {} KiB", usage.ru_maxrss);
    assert!(elapsed < std::time::Duration::from_secs(5), "took {elapsed:?}");
}

#[test]
fn balloon_and_memory_options_are_checked() {
    let k = tmpfile("k-balloon", b"x");
    for (flag, value, want) in [
        ("--balloon", "stats_interval_s=x", "--balloon: stats_interval_s='x'"),
        ("--balloon", "stats_interval_s=4000", "0 (no statistics) to 3600"),
        ("--balloon", "size=1G", "--balloon: unknown key 'size'"),
        ("--memory-options", "ksm=on", "--memory-options: unknown key 'ksm'"),
        ("--memory-options", "hugepages=on,mergeable=on", "cannot be combined"),
        ("--memory-options", "hugepages=yes,thp=on", "cannot be combined"),
    ] {
        let (code, err) = run(&["run", "--kernel", &k, "--serial", "null", flag, value]);
        assert_eq!(code, 2, "{flag} {value}: {err}");
        assert!(err.contains(want), "{flag} {value}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    // `--balloon` alone takes the defaults; the (fake) kernel is what fails then.
    let (code, err) = run(&["run", "--kernel", &k, "--balloon", "--serial", "null", "--accel", "emu"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a kernel"), "{err}");
    // Huge pages the host does not have free are refused naming the shortfall (a host with
    // 64 free 2 MiB pages gets as far as the kernel).
    let (code, err) =
        run(&["run", "--kernel", &k, "--memory", "128M", "--memory-options", "hugepages=on", "--serial", "null"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--memory-options: hugepages: 64 free 2 MiB huge pages needed") || err.contains("not a kernel"),
        "{err}"
    );
}

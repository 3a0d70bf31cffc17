//! Seccomp filters per VMM thread (issue 14): for every thread role, the test hook
//! (`RUSTVISOR_TEST_HOOKS=1`, `RUSTVISOR_TEST_BAD_SYSCALL=<role>`) makes the first thread of
//! that role call `getppid`, which no role allows, right after installing its filter; the VMM
//! must stop with status 159 and the line "bad system call 110 (getppid) on thread <name>".
//! Under `--seccomp log` the same call goes through and the guest runs to its end. The rest of
//! the suite runs with the filters on (the default), which checks that they allow what the
//! VMM needs.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{guest_command, guest_config, guest_file, TempDir};

/// The exit status of a VMM stopped by its SIGSYS handler (128 + SIGSYS).
const BAD_SYSCALL_STATUS: i32 = 159;

fn hook<'a>(c: &'a mut Command, role: &str) -> &'a mut Command {
    c.env("RUSTVISOR_TEST_HOOKS", "1").env("RUSTVISOR_TEST_BAD_SYSCALL", role)
}

/// Waits (at most 60 s) for `child` to end; its output.
fn finish(mut child: Child) -> Output {
    let end = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// The process stopped on the hook's call, and said so naming `thread`.
fn assert_stopped_on(out: &Output, thread: &str) {
    assert_stopped_on_one_of(out, &[thread]);
}

/// The process stopped on the hook's call, and said so naming one of `threads` (threads of
/// one role race to the hook).
fn assert_stopped_on_one_of(out: &Output, threads: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(BAD_SYSCALL_STATUS), "status {}; stderr:\n{stderr}", out.status);
    let want: Vec<String> =
        threads.iter().map(|t| format!("rustvisor: bad system call 110 (getppid) on thread {t};")).collect();
    assert!(stderr.lines().any(|l| want.iter().any(|w| l.starts_with(w))), "none of {want:?} in stderr:\n{stderr}");
}

/// `rustvisor vmm --api-socket` with the hook on `role`, stderr captured.
fn vmm(sock: &Path, role: &str) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rustvisor"));
    c.args(["vmm", "--api-socket"]).arg(sock).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    hook(&mut c, role).spawn().unwrap()
}

/// Waits (at most 10 s) for the API on `sock` to answer.
fn api(sock: &Path) -> api::client::Client {
    let client = api::client::Client::new(sock).unwrap().with_timeout(Duration::from_secs(60));
    let end = Instant::now() + Duration::from_secs(10);
    while client.ping().is_err() {
        assert!(Instant::now() < end, "the VMM's API did not come up");
        std::thread::sleep(Duration::from_millis(10));
    }
    client
}

/// `rustvisor run` on the test guest (which powers off after `script`) with the hook on
/// `role` and `extra` flags.
fn run(dir: &TempDir, role: &str, extra: &[&str]) -> Child {
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let mut c = guest_command("echo RV-SECCOMP-DONE", &dir.path("console.log"), &extra);
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    hook(&mut c, role).spawn().unwrap()
}

#[test]
fn the_main_thread_is_filtered_once_the_vmm_is_set_up() {
    let dir = TempDir::new("seccomp-main");
    assert_stopped_on(&finish(vmm(&dir.path("api.sock"), "main")), "main");
}

#[test]
fn the_api_thread_is_filtered() {
    let dir = TempDir::new("seccomp-api");
    assert_stopped_on(&finish(vmm(&dir.path("api.sock"), "api")), "api-server");
}

#[test]
fn vcpu_threads_are_filtered() {
    let dir = TempDir::new("seccomp-vcpu");
    // Both vCPU threads run the hook; whichever gets there first stops the VMM.
    assert_stopped_on_one_of(&finish(run(&dir, "vcpu", &["--cpus", "2"])), &["vcpu0", "vcpu1"]);
}

#[test]
fn kvm_vcpu_threads_are_filtered() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let mut c = Command::new(env!("CARGO_BIN_EXE_rustvisor"));
    c.args(["run", "--kernel"])
        .arg(guest_file("vmlinuz"))
        .args(["--memory", "128M", "--accel", "kvm", "--serial", "null"])
        // A PVM host runs unmodified kernels badly, but the vCPU thread stops before that.
        .env("RUSTVISOR_KVM_ON_PVM", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    assert_stopped_on(&finish(hook(&mut c, "vcpu").spawn().unwrap()), "vcpu0");
}

#[test]
fn device_workers_are_filtered() {
    let dir = TempDir::new("seccomp-worker");
    assert_stopped_on(&finish(run(&dir, "virtio-worker", &["--rng"])), "virtio-rng");
}

#[test]
fn the_serial_console_mux_is_filtered() {
    let dir = TempDir::new("seccomp-mux");
    let sock = dir.path("serial.sock");
    let mut c = Command::new(env!("CARGO_BIN_EXE_rustvisor"));
    c.args(["run", "--kernel"])
        .arg(guest_file("vmlinuz"))
        .arg("--initrd")
        .arg(guest_file("initrd.img"))
        .args(["--memory", "128M", "--accel", "emu", "--serial"])
        .arg(format!("socket={}", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    assert_stopped_on(&finish(hook(&mut c, "serial-console").spawn().unwrap()), "serial-console");
}

/// With the filters on (no hook), a client of the console socket gets the guest's output
/// (the mux makes each client non-blocking: an ioctl its list must allow).
#[test]
fn a_console_socket_client_is_served_with_the_filters_on() {
    use std::io::Read;
    let dir = TempDir::new("seccomp-mux-client");
    let sock = dir.path("serial.sock");
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode("echo RV-SECCOMP-MUX; sleep 600");
    let mut c = Command::new(env!("CARGO_BIN_EXE_rustvisor"));
    c.args(["run", "--kernel"])
        .arg(guest_file("vmlinuz"))
        .arg("--initrd")
        .arg(guest_file("initrd.img"))
        .args(["--cmdline", &format!("console=ttyS0 panic=-1 rv.cmd={b64}"), "--accel", "emu", "--serial"])
        .arg(format!("socket={}", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut vm = Kill(c.spawn().unwrap());
    // Connect early: the mux's ring keeps only the latest output for a late client.
    let end = Instant::now() + Duration::from_secs(240);
    let mut client = loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(&sock) {
            break s;
        }
        assert!(vm.0.try_wait().unwrap().is_none(), "the VMM ended");
        assert!(Instant::now() < end, "no console socket");
        std::thread::sleep(Duration::from_millis(20));
    };
    client.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("RV-SECCOMP-MUX") {
        if let Some(st) = vm.0.try_wait().unwrap() {
            let mut err = String::new();
            let _ = vm.0.stderr.take().unwrap().read_to_string(&mut err);
            panic!("the VMM ended ({st}): {err}");
        }
        assert!(Instant::now() < end, "no output on the console socket: {:?}", String::from_utf8_lossy(&seen));
        match client.read(&mut buf) {
            Ok(0) => panic!("the console socket closed: {:?}", String::from_utf8_lossy(&seen)),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
}

#[test]
fn the_console_input_thread_is_filtered() {
    let dir = TempDir::new("seccomp-input");
    let mut c = Command::new(env!("CARGO_BIN_EXE_rustvisor"));
    c.args(["run", "--kernel"])
        .arg(guest_file("vmlinuz"))
        .arg("--initrd")
        .arg(guest_file("initrd.img"))
        .args(["--memory", "128M", "--accel", "emu", "--serial", "stdio"])
        .current_dir(&dir.0)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    assert_stopped_on(&finish(hook(&mut c, "console-input").spawn().unwrap()), "console-input");
}

#[test]
fn the_vm_events_thread_is_filtered() {
    let dir = TempDir::new("seccomp-events");
    let sock = dir.path("api.sock");
    let sock = sock.to_str().unwrap();
    assert_stopped_on(&finish(run(&dir, "vm-events", &["--api-socket", sock])), "vm-events");
}

#[test]
fn the_shutdown_threads_are_filtered() {
    let dir = TempDir::new("seccomp-shutdown");
    let sock = dir.path("api.sock");
    let child = vmm(&sock, "shutdown");
    api(&sock).vmm_shutdown().unwrap();
    // The kernel's thread name is cut to 15 bytes: "api-vmm-shutdown".
    assert_stopped_on(&finish(child), "api-vmm-shutdow");
}

#[test]
fn the_backup_copier_is_filtered() {
    let dir = TempDir::new("seccomp-backup");
    let img = dir.path("disk.raw");
    std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
    let sock = dir.path("api.sock");
    let child = vmm(&sock, "backup-copier");
    let c = api(&sock);
    let disk = api::types::DiskConfig { path: img.display().to_string(), ..Default::default() };
    c.create(&guest_config("sleep 600", &dir.path("console.log"), vec![disk])).unwrap();
    c.boot().unwrap();
    // The copier stops the VMM as it starts: the request may or may not be answered.
    let _ = c.backup(&dir.path("backup"), None);
    assert_stopped_on(&finish(child), "backup-copier");
}

#[test]
fn log_mode_lets_the_call_through_and_the_guest_runs_to_its_end() {
    let dir = TempDir::new("seccomp-log");
    let child = run(&dir, "vcpu", &["--seccomp", "log", "--rng"]);
    let out = finish(child);
    let console = std::fs::read_to_string(dir.path("console.log")).unwrap_or_default();
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(console.contains("RV-SECCOMP-DONE"), "console:\n{}", common::tail(&console));
}

#[test]
fn seccomp_flag_values_are_checked() {
    let out = Command::new(env!("CARGO_BIN_EXE_rustvisor"))
        .args(["vmm", "--api-socket", "/nonexistent/x.sock", "--seccomp", "maybe"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("expected on, log or off"), "{stderr}");
}

/// A daemon whose VMMs inherit the hook on `vcpu`: the VMM dies as the VM boots, and the
/// daemon's reason carries the VMM's line: "crashed" with the exit status described when
/// `vm.boot` was answered first, a failed start (the VM stays "stopped") when the VMM died
/// before answering.
#[test]
fn the_manager_shows_the_bad_system_call_as_the_crash_reason() {
    let dir = TempDir::new("seccomp-mgr");
    let sock = dir.path("rustvisor.sock");
    let cgroup = format!("rustvisor-test/seccomp-{}", std::process::id());
    let log = std::fs::File::create(dir.path("daemon.log")).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_rustvisor"));
    c.arg("daemon")
        .arg("--state-dir")
        .arg(dir.path("state"))
        .arg("--run-dir")
        .arg(dir.path("run"))
        .arg("--socket")
        .arg(&sock)
        .args(["--cgroup-parent", &cgroup])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stderr(log);
    let daemon = Daemon { child: hook(&mut c, "vcpu").spawn().unwrap(), run: dir.path("run"), cgroup };
    let end = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < end, "the daemon's socket did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rv = |args: &[&str]| {
        let out =
            Command::new(env!("CARGO_BIN_EXE_rustvisor")).args(args).arg("--connect").arg(&sock).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (kernel, initrd) = (guest_file("vmlinuz"), guest_file("initrd.img"));
    let (kernel, initrd) = (kernel.to_str().unwrap(), initrd.to_str().unwrap());
    let created =
        rv(&["vm", "create", "s", "--kernel", kernel, "--initrd", initrd, "--accel", "emu", "--restart", "no"]);
    assert_eq!(created.0, Some(0), "{created:?}");
    let started = rv(&["vm", "start", "s"]);
    let end = Instant::now() + Duration::from_secs(60);
    let reason = loop {
        let (_, out, _) = rv(&["vm", "list", "--json"]);
        let list: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        let vm = list["vms"].as_array().and_then(|v| v.iter().find(|v| v["name"] == "s")).cloned();
        let state = vm.as_ref().map(|v| v["state"].clone());
        if started.0 == Some(0) && state.as_ref().is_some_and(|s| s == "crashed") {
            let reason = vm.as_ref().map(|v| v["reason"].as_str().unwrap_or_default().to_string());
            let reason = reason.unwrap_or_default();
            assert!(reason.contains("exited with status 159 (a forbidden system call: seccomp)"), "{reason}");
            break reason;
        }
        if started.0 != Some(0) && state.as_ref().is_some_and(|s| s == "stopped") {
            assert!(started.2.contains("rustvisor: bad system call"), "{started:?}");
            break vm.map(|v| v["reason"].as_str().unwrap_or_default().to_string()).unwrap_or_default();
        }
        assert!(Instant::now() < end, "the VM did not crash: {started:?} {out}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(reason.contains("rustvisor: bad system call 110 (getppid) on thread vcpu0"), "{reason}");
    drop(daemon);
}

/// The daemon of the manager test: killed on drop with its VMMs, its cgroups removed.
struct Daemon {
    child: Child,
    run: std::path::PathBuf,
    cgroup: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // VMMs whose command line names our run folder.
        let needle = self.run.display().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                // SAFETY: kill(2) only sends a signal to a process this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let top = std::path::Path::new("/sys/fs/cgroup").join(&self.cgroup);
        for _ in 0..100 {
            for vm in std::fs::read_dir(&top).into_iter().flatten().flatten() {
                let _ = std::fs::remove_dir(vm.path());
            }
            if std::fs::remove_dir(&top).is_ok() || !top.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(parent) = top.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Under `perf record` (which sets `PERF_BUILDID_DIR`), Cranelift's JIT opened
/// `/tmp/perf-PID.map` for every compiled function from the filtered vCPU thread and
/// panicked on the refusal, stopping the VMM. The VMM opens the map before its filters and
/// describes each compiled block in it; the guest runs to its end.
#[test]
fn under_perf_record_compiled_blocks_are_mapped_and_the_vm_runs_to_its_end() {
    let dir = TempDir::new("seccomp-perf-map");
    let log = dir.path("console.log");
    let mut c = guest_command("echo RV-PERF-MAP-DONE", &log, &[]);
    c.env("PERF_BUILDID_DIR", dir.path("buildid")).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    let map = std::path::PathBuf::from(format!("/tmp/perf-{}.map", child.id()));
    let out = finish(child);
    let text = std::fs::read_to_string(&map).unwrap_or_default();
    let _ = std::fs::remove_file(&map);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "status {}; stderr:\n{stderr}", out.status);
    assert!(std::fs::read_to_string(&log).unwrap().contains("RV-PERF-MAP-DONE"), "stderr:\n{stderr}");
    // `START SIZE NAME`, hexadecimal: the shared code, then blocks named by guest RIP.
    let blocks: Vec<&str> = text.lines().filter(|l| l.contains(" rv-emu block 0x")).collect();
    assert!(blocks.len() > 100, "{} blocks in {}:\n{text:.2000}", blocks.len(), map.display());
    for l in &blocks {
        let f: Vec<&str> = l.split(' ').collect();
        assert!(
            u64::from_str_radix(f[0], 16).is_ok_and(|a| a > 0) && u64::from_str_radix(f[1], 16).is_ok_and(|s| s > 0),
            "{l}"
        );
    }
}

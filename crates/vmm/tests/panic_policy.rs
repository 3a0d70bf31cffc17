//! Issue 8: a panic on any VMM thread used to leave the others waiting for ever (the API then
//! hung). With the panic policy installed, the process reports the panic and aborts at once.

use std::process::Command;
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "RV_PANIC_POLICY_CHILD";

/// In the child: install the policy, then panic on a worker thread while the main thread
/// waits for it the way the VMM's API waits on a vCPU (a join that would never return if the
/// process went on).
fn child() -> ! {
    vmm::panic_policy::install();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::Builder::new()
        .name("virtio-blk".into())
        .spawn(move || {
            let _keep = tx;
            let v: Vec<u8> = Vec::new();
            let i = std::hint::black_box(3);
            let _ = v[i];
        })
        .unwrap();
    // Without the policy the panicking thread would drop `tx` and this would return; the
    // policy must not even let it get that far.
    let _ = rx.recv();
    let _ = t.join();
    std::thread::sleep(Duration::from_secs(30));
    std::process::exit(0);
}

#[test]
fn a_panicking_thread_aborts_the_process_with_the_reason() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child();
    }
    let start = Instant::now();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_panicking_thread_aborts_the_process_with_the_reason", "--nocapture"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "status {:?}; stderr: {stderr}", out.status);
    assert!(
        stderr.contains("thread 'virtio-blk' panicked at") && stderr.contains("index out of bounds"),
        "the reason is reported: {stderr}"
    );
    assert!(stderr.contains("stopping the VMM"), "{stderr}");
    assert!(start.elapsed() < Duration::from_secs(20), "aborted at once, took {:?}", start.elapsed());
}

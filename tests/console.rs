//! The interactive serial console on a pseudo-terminal: typing reaches the guest shell, and
//! the Ctrl-A X escape quits the VM with status 0.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Opens a pty pair; returns (master, slave).
fn openpty() -> (OwnedFd, OwnedFd) {
    let (mut m, mut s) = (0, 0);
    // SAFETY: openpty writes two new descriptors into the given ints; the name, termios and
    // winsize pointers may be null.
    let r = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    assert_eq!(r, 0, "openpty failed");
    // SAFETY: both descriptors were just created by openpty and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) }
}

/// Waits until `needle` appears in what the reader thread collected.
fn wait_for(rx: &mpsc::Receiver<Vec<u8>>, seen: &mut String, needle: &str, timeout: Duration) {
    let end = Instant::now() + timeout;
    while !seen.contains(needle) {
        let left = end.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out waiting for {needle:?}; console so far:\n{seen}");
        if let Ok(chunk) = rx.recv_timeout(left.min(Duration::from_millis(200))) {
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

#[test]
fn typing_reaches_the_guest_and_ctrl_a_x_quits() {
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest");
    assert!(guest.join("vmlinuz").exists(), "run scripts/setup-guest.sh first (scripts/test.sh does)");
    let (master, slave) = openpty();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rustvisor"))
        .args(["run", "--kernel"])
        .arg(guest.join("vmlinuz"))
        .arg("--initrd")
        .arg(guest.join("initrd.img"))
        .args(["--cmdline", "console=ttyS0 panic=-1", "--memory", "512M", "--accel", "emu"])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rustvisor");
    let mut reader = std::fs::File::from(master.try_clone().unwrap());
    let mut writer = std::fs::File::from(master);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    wait_for(&rx, &mut seen, "RUSTVISOR-INIT-OK", Duration::from_secs(240));
    // The shell prompt comes after the marker; type a command whose output differs from
    // its echo.
    std::thread::sleep(Duration::from_millis(500));
    writer.write_all(b"echo typed-$((6*7))\r").unwrap();
    wait_for(&rx, &mut seen, "typed-42", Duration::from_secs(60));
    writer.write_all(&[0x01, b'x']).unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "Ctrl-A X did not end the VM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(0), "stderr: {err}");
    assert!(err.contains("quit from the console"), "stderr: {err}");
}

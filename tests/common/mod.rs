//! Shared by the integration tests that boot the Debian guest made by
//! scripts/setup-guest.sh on the `emu` accelerator.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The guest artefacts folder.
pub fn guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("guest")
}

/// A file made by the setup script; panics with a hint when it is missing.
pub fn guest_file(name: &str) -> PathBuf {
    let p = guest_dir().join(name);
    assert!(p.exists(), "{} is missing: run scripts/setup-guest.sh first (scripts/test.sh does)", p.display());
    p
}

/// A fresh scratch folder under the system temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `<tmp>/rv-<tag>-<pid>`.
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("rv-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    /// A path inside the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `rustvisor run` on emu with the test initramfs, running the shell `script` as the guest
/// workload (init's `rv.cmd=`), console to `log`, plus `extra` flags.
pub fn guest_command(script: &str, log: &Path, extra: &[String]) -> Command {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(script);
    let cmdline = format!("console=ttyS0 panic=-1 rv.cmd={b64}");
    let mut c = Command::new(env!("CARGO_BIN_EXE_rustvisor"));
    c.args(["run", "--kernel"])
        .arg(guest_file("vmlinuz"))
        .arg("--initrd")
        .arg(guest_file("initrd.img"))
        .args(["--cmdline", &cmdline, "--memory", "512M", "--accel", "emu", "--serial"])
        .arg(format!("file={}", log.display()))
        .args(extra);
    c
}

/// Runs the guest to its end; returns (exit status, console text, stderr).
pub fn run_guest(script: &str, log: &Path, extra: &[String]) -> (i32, String, String) {
    let start = Instant::now();
    let out = guest_command(script, log, extra).stdin(Stdio::null()).output().expect("spawn rustvisor");
    eprintln!("guest run: {:.1} s wall", start.elapsed().as_secs_f64());
    let console = std::fs::read_to_string(log).unwrap_or_default();
    (out.status.code().unwrap_or(-1), console, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Waits until the console file `log` contains `needle` (or the child exits, or time runs out).
pub fn wait_for_console(child: &mut Child, log: &Path, needle: &str, timeout: Duration) -> String {
    let end = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("rustvisor exited ({st}) before {needle:?}; console:\n{}", tail(&text));
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("timed out waiting for {needle:?}; console:\n{}", tail(&text));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last 40 lines of `text`.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The value after `key ` on the console line starting with it.
pub fn console_value<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    console
        .lines()
        .find_map(|l| l.trim_end().strip_prefix(key)?.strip_prefix(' '))
        .map(|v| v.split_whitespace().next().unwrap_or(""))
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs a host command, panicking with its output when it fails; returns stdout.
pub fn host(cmd: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Deterministic test content of `len` bytes.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A `rustvisor vmm --api-socket SOCK` process with a client for it, killed when dropped.
pub struct Vmm {
    /// The process.
    pub child: Child,
    /// A client of its API (60 s timeout).
    pub client: api::client::Client,
}

impl Vmm {
    /// Starts the VMM and waits (10 s at most) until its API answers.
    pub fn start(sock: &Path) -> Vmm {
        let child = Command::new(env!("CARGO_BIN_EXE_rustvisor"))
            .args(["vmm", "--api-socket"])
            .arg(sock)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let client = api::client::Client::new(sock).unwrap().with_timeout(Duration::from_secs(60));
        let end = Instant::now() + Duration::from_secs(10);
        while client.ping().is_err() {
            assert!(Instant::now() < end, "the VMM's API did not come up");
            std::thread::sleep(Duration::from_millis(10));
        }
        Vmm { child, client }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The HTTP status of an API call's result: 200 for a success, the status of an HTTP error;
/// a transport error fails the test.
pub fn status_code<T>(r: Result<T, api::client::ClientError>) -> u16 {
    match r {
        Ok(_) => 200,
        Err(api::client::ClientError::Http { status, .. }) => status,
        Err(e) => panic!("transport error: {e}"),
    }
}

/// The highest `RV-COUNT n` on the console log `log` so far.
pub fn last_count(log: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().filter_map(|l| l.strip_prefix("RV-COUNT ")?.split_whitespace().next()?.parse().ok()).max()
}

/// Waits (at most `timeout`) until the console log shows `RV-COUNT n` with n ≥ `at_least`;
/// returns n.
pub fn wait_count(log: &Path, at_least: u64, timeout: Duration) -> u64 {
    let end = Instant::now() + timeout;
    loop {
        if let Some(n) = last_count(log).filter(|n| *n >= at_least) {
            return n;
        }
        assert!(
            Instant::now() < end,
            "counter did not reach {at_least}:\n{}",
            tail(&std::fs::read_to_string(log).unwrap_or_default())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The configuration of an `emu` VM of 512 MiB and one vCPU booting the test guest, whose
/// init runs `script` (base64 in `rv.cmd=`), with its serial console in `log` and `disks`.
pub fn guest_config(script: &str, log: &Path, disks: Vec<api::types::DiskConfig>) -> api::types::VmConfig {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(script);
    api::types::VmConfig {
        kernel: guest_file("vmlinuz").display().to_string(),
        initrd: Some(guest_file("initrd.img").display().to_string()),
        cmdline: format!("console=ttyS0 panic=-1 rv.cmd={b64}"),
        memory_mib: 512,
        cpus: 1,
        accel: api::types::Accel::Emu,
        serial: api::types::ConsoleOut::File(log.to_path_buf()),
        console: None,
        disks,
        nets: vec![],
        vsock: None,
        rng: false,
        balloon: None,
        memory_options: Default::default(),
    }
}

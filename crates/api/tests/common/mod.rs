//! Test support: a mock [`Controller`] (a small state machine), temporary directories, a
//! server on a fresh socket, and raw HTTP over a Unix socket with timeouts everywhere.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use api::server::{serve_with, ServerHandle, ServerOptions};
use api::types::{
    BackupDiskStatus, BackupState, BackupStatus, BalloonInfo, BalloonStats, Counters, DeviceCounters, PingInfo,
    VmConfig, VmInfo,
};
use api::{ApiError, Controller};

/// The test sockets' read and write timeout: a server that takes longer has hung.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// The mock VM's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum St {
    Created,
    Running,
    Paused,
    Shutdown,
}

/// A mock VMM: Created/Running/Paused/Shutdown, Conflict for a wrong transition.
#[derive(Default)]
pub struct Mock {
    pub vm: Mutex<Option<(St, VmConfig)>>,
    /// Every controller method panics while this is set.
    pub panic: AtomicBool,
    pub vmm_shutdowns: AtomicUsize,
    /// While set, `vmm_shutdown` waits for [`Mock::release_vmm_shutdown`] before it counts.
    pub hold_vmm_shutdown: AtomicBool,
    released: (Mutex<bool>, Condvar),
    pub snapshots: Mutex<Vec<String>>,
    pub restores: Mutex<Vec<String>>,
    /// The balloon target last set.
    pub balloon_mib: Mutex<u64>,
    /// The latest backup, with its rate limit.
    pub backup: Mutex<Option<(BackupStatus, Option<u64>)>>,
}

impl Mock {
    pub fn new() -> Arc<Mock> {
        Arc::new(Mock::default())
    }

    /// Lets a held `vmm_shutdown` go on.
    pub fn release_vmm_shutdown(&self) {
        *self.released.0.lock().unwrap() = true;
        self.released.1.notify_all();
    }

    pub fn state(&self) -> Option<St> {
        self.vm.lock().unwrap().as_ref().map(|(s, _)| *s)
    }

    fn check_panic(&self) {
        if self.panic.load(Ordering::SeqCst) {
            panic!("mock controller told to panic");
        }
    }

    /// The state's name and the configuration of a Running or Paused VM, or Conflict/NotFound.
    fn live(&self, action: &str) -> Result<(String, VmConfig), ApiError> {
        self.check_panic();
        match self.vm.lock().unwrap().as_ref() {
            None => Err(ApiError::NotFound("no VM: create one first".into())),
            Some((s @ (St::Running | St::Paused), cfg)) => Ok((format!("{s:?}"), cfg.clone())),
            Some((s, _)) => Err(ApiError::Conflict { action: action.into(), state: format!("{s:?}") }),
        }
    }

    /// Moves `from` → `to`, or Conflict/NotFound.
    fn transition(&self, action: &str, from: &[St], to: St) -> Result<(), ApiError> {
        self.check_panic();
        let mut vm = self.vm.lock().unwrap();
        match vm.as_mut() {
            None => Err(ApiError::NotFound("no VM: create one first".into())),
            Some((s, _)) if from.contains(s) => {
                *s = to;
                Ok(())
            }
            Some((s, _)) => Err(ApiError::Conflict { action: action.into(), state: format!("{s:?}") }),
        }
    }
}

pub fn sample_config() -> VmConfig {
    serde_json::from_str(r#"{"kernel": "/boot/vmlinuz", "disks": [{"path": "/img/root.raw", "readonly": true}]}"#)
        .unwrap()
}

impl Controller for Mock {
    fn ping(&self) -> PingInfo {
        self.check_panic();
        PingInfo { version: "9.9.9-test".into(), accelerators: vec!["kvm".into(), "emu".into()], pid: 4242 }
    }
    fn create(&self, cfg: VmConfig) -> Result<(), ApiError> {
        self.check_panic();
        if cfg.memory_mib < 16 {
            return Err(ApiError::BadRequest { field: "memory_mib".into(), msg: "at least 16 MiB".into() });
        }
        let mut vm = self.vm.lock().unwrap();
        if let Some((s, _)) = vm.as_ref() {
            return Err(ApiError::Conflict { action: "create".into(), state: format!("{s:?}") });
        }
        *vm = Some((St::Created, cfg));
        Ok(())
    }
    fn boot(&self) -> Result<(), ApiError> {
        self.transition("boot", &[St::Created], St::Running)
    }
    fn pause(&self) -> Result<(), ApiError> {
        self.transition("pause", &[St::Running], St::Paused)
    }
    fn resume(&self) -> Result<(), ApiError> {
        self.transition("resume", &[St::Paused], St::Running)
    }
    fn shutdown(&self) -> Result<(), ApiError> {
        self.transition("shutdown", &[St::Running, St::Paused], St::Shutdown)
    }
    fn reboot(&self) -> Result<(), ApiError> {
        self.transition("reboot", &[St::Running], St::Running)
    }
    fn delete(&self) -> Result<(), ApiError> {
        self.check_panic();
        match self.vm.lock().unwrap().take() {
            Some(_) => Ok(()),
            None => Err(ApiError::NotFound("no VM".into())),
        }
    }
    fn info(&self) -> Result<VmInfo, ApiError> {
        self.check_panic();
        match self.vm.lock().unwrap().as_ref() {
            None => Err(ApiError::NotFound("no VM: create one first".into())),
            Some((s, cfg)) => Ok(VmInfo {
                state: format!("{s:?}"),
                config: cfg.clone(),
                uptime_s: if *s == St::Created { 0.0 } else { 12.34 },
                accelerator: (*s != St::Created).then(|| "kvm".to_string()),
                ended: None,
                pause_reason: None,
                vcpu_threads: Vec::new(),
            }),
        }
    }
    fn counters(&self) -> Result<Counters, ApiError> {
        self.check_panic();
        if self.vm.lock().unwrap().is_none() {
            return Err(ApiError::NotFound("no VM".into()));
        }
        let mut vcpu0 = BTreeMap::new();
        vcpu0.insert("hlt".to_string(), 7u64);
        vcpu0.insert("pio".to_string(), 123456u64);
        let mut vcpu1 = BTreeMap::new();
        vcpu1.insert("mmio".to_string(), 99u64);
        let mut devices = BTreeMap::new();
        devices.insert(
            "disk0".to_string(),
            DeviceCounters {
                requests: 10,
                bytes_read: 40960,
                bytes_written: 512,
                errors: 0,
                block: Some(api::types::BlockCounters {
                    read_ops: 1,
                    write_ops: 9,
                    read_bytes: 512,
                    write_bytes: 40960,
                    ..Default::default()
                }),
                net: None,
            },
        );
        devices.insert(
            "net0".to_string(),
            DeviceCounters {
                requests: 3,
                bytes_read: 1500,
                bytes_written: 60,
                errors: 1,
                block: None,
                net: Some(api::types::NetCounters {
                    rx_packets: 1,
                    rx_bytes: 48,
                    tx_packets: 2,
                    tx_bytes: 1476,
                    tx_errors: 1,
                    ..Default::default()
                }),
            },
        );
        Ok(Counters { vcpus: vec![vcpu0, vcpu1], devices, guest_warnings: 7, guest_warnings_suppressed: 2 })
    }
    fn balloon_set(&self, target_mib: u64) -> Result<(), ApiError> {
        let (state, cfg) = self.live("vm.balloon")?;
        if cfg.balloon.is_none() {
            return Err(ApiError::NoDevice {
                action: "vm.balloon".into(),
                device: "balloon".into(),
                field: "balloon".into(),
                state,
            });
        }
        if target_mib > cfg.memory_mib {
            return Err(ApiError::BadRequest {
                field: "target_mib".into(),
                msg: format!("{target_mib} MiB (accepted: 0 to {})", cfg.memory_mib),
            });
        }
        *self.balloon_mib.lock().unwrap() = target_mib;
        Ok(())
    }
    fn balloon_info(&self) -> Result<BalloonInfo, ApiError> {
        let (state, cfg) = self.live("vm.balloon")?;
        if cfg.balloon.is_none() {
            return Err(ApiError::NoDevice {
                action: "vm.balloon".into(),
                device: "balloon".into(),
                field: "balloon".into(),
                state,
            });
        }
        let t = *self.balloon_mib.lock().unwrap();
        Ok(BalloonInfo {
            target_mib: t,
            actual_mib: t / 2,
            stats: Some(BalloonStats {
                total_bytes: Some(512 << 20),
                free_bytes: Some(100 << 20),
                major_faults: Some(3),
                ..BalloonStats::default()
            }),
            stats_age_s: Some(1.25),
            reported_mib: 6,
        })
    }
    fn snapshot(&self, destination_dir: &str) -> Result<(), ApiError> {
        self.check_panic();
        if destination_dir == "/fail" {
            return Err(ApiError::Internal("cannot write /fail/state: read-only file system".into()));
        }
        match self.state() {
            Some(St::Paused) => {
                self.snapshots.lock().unwrap().push(destination_dir.to_string());
                Ok(())
            }
            Some(s) => Err(ApiError::Conflict { action: "snapshot".into(), state: format!("{s:?}") }),
            None => Err(ApiError::NotFound("no VM".into())),
        }
    }
    fn restore(&self, source_dir: &str) -> Result<(), ApiError> {
        self.check_panic();
        let mut vm = self.vm.lock().unwrap();
        if let Some((s, _)) = vm.as_ref() {
            return Err(ApiError::Conflict { action: "restore".into(), state: format!("{s:?}") });
        }
        self.restores.lock().unwrap().push(source_dir.to_string());
        *vm = Some((St::Paused, sample_config()));
        Ok(())
    }
    fn backup(&self, destination_dir: &str, rate_limit_mib_s: Option<u64>) -> Result<BackupStatus, ApiError> {
        self.check_panic();
        match self.state() {
            Some(St::Running | St::Paused) => {}
            Some(s) => return Err(ApiError::Conflict { action: "vm.backup".into(), state: format!("{s:?}") }),
            None => return Err(ApiError::NotFound("no VM".into())),
        }
        let mut b = self.backup.lock().unwrap();
        if b.as_ref().is_some_and(|(s, _)| s.state == BackupState::Running) {
            return Err(ApiError::Conflict { action: "vm.backup (one is running)".into(), state: "Running".into() });
        }
        let status = BackupStatus {
            destination: destination_dir.to_string(),
            pause_ms: 1.25,
            state: BackupState::Running,
            disks: vec![BackupDiskStatus {
                index: 0,
                path: "/img/root.raw".into(),
                target: format!("{destination_dir}/disk0.raw"),
                bytes_total: 1 << 20,
                bytes_copied: 0,
                bytes_before_write: 0,
                state: BackupState::Running,
                error: None,
            }],
        };
        *b = Some((status.clone(), rate_limit_mib_s));
        Ok(status)
    }
    fn backup_status(&self) -> Result<BackupStatus, ApiError> {
        self.check_panic();
        self.backup
            .lock()
            .unwrap()
            .as_ref()
            .map(|(s, _)| s.clone())
            .ok_or_else(|| ApiError::NotFound("no backup".into()))
    }
    fn backup_cancel(&self) -> Result<(), ApiError> {
        self.check_panic();
        let mut b = self.backup.lock().unwrap();
        let (s, _) = b.as_mut().ok_or_else(|| ApiError::NotFound("no backup".into()))?;
        if s.state == BackupState::Running {
            s.state = BackupState::Cancelled;
            for d in &mut s.disks {
                d.state = BackupState::Cancelled;
            }
        }
        Ok(())
    }
    fn vmm_shutdown(&self) {
        if self.hold_vmm_shutdown.load(Ordering::SeqCst) {
            let (lock, cv) = &self.released;
            let guard = lock.lock().unwrap();
            drop(cv.wait_while(guard, |released| !*released).unwrap());
        }
        self.vmm_shutdowns.fetch_add(1, Ordering::SeqCst);
    }
}

/// A directory under the system's temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("api-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A mock server on a fresh socket, with a short read timeout.
pub struct TestServer {
    pub mock: Arc<Mock>,
    pub handle: Option<ServerHandle>,
    pub socket: PathBuf,
    pub dir: TempDir,
}

impl TestServer {
    pub fn start(tag: &str) -> TestServer {
        TestServer::start_with(tag, ServerOptions { read_timeout: Duration::from_millis(800), ..Default::default() })
    }

    pub fn start_with(tag: &str, opts: ServerOptions) -> TestServer {
        let dir = TempDir::new(tag);
        let socket = dir.path().join("api.sock");
        let mock = Mock::new();
        let handle = serve_with(&socket, mock.clone(), opts).expect("serve");
        TestServer { mock, handle: Some(handle), socket, dir }
    }
}

/// A response: status, headers (lower-case names), body.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

pub fn connect(socket: &Path) -> UnixStream {
    let s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Reads until EOF; panics on a read timeout (the server hung). Connection resets count as
/// EOF.
pub fn read_all(s: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                panic!("the server did not answer or close within {IO_TIMEOUT:?}; got so far {:?}", trunc(&out))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return out,
        }
    }
}

fn trunc(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned()
}

/// Parses the first response in `raw` (None when `raw` is empty: closed without an answer).
/// Interim 1xx responses (100 Continue) are skipped.
pub fn parse_response(mut raw: &[u8]) -> Option<Resp> {
    while raw.starts_with(b"HTTP/1.1 1") {
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
        raw = &raw[end + 4..];
    }
    if raw.is_empty() {
        return None;
    }
    let head_end =
        raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("bad response {:?}", trunc(raw)));
    let head = std::str::from_utf8(&raw[..head_end]).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    assert!(status_line.starts_with("HTTP/1."), "bad status line {status_line:?}");
    let status: u16 = status_line[9..12].parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[head_end + 4..];
    let len = headers.iter().find(|(n, _)| n == "content-length").map(|(_, v)| v.parse::<usize>().unwrap());
    let body = match len {
        Some(n) => rest[..n.min(rest.len())].to_vec(),
        None => rest.to_vec(),
    };
    Some(Resp { status, headers, body })
}

/// Sends raw bytes, half-closes, and reads the answer (None: closed without one). Write errors
/// (the server closed early, e.g. after a 413) are ignored: what it answered is still read.
pub fn raw(socket: &Path, request: &[u8]) -> Option<Resp> {
    let mut s = connect(socket);
    let _ = s.write_all(request);
    let _ = s.shutdown(std::net::Shutdown::Write);
    parse_response(&read_all(&mut s))
}

/// A well-formed request.
pub fn request(socket: &Path, method: &str, route: &str, body: Option<&str>) -> Resp {
    let mut req = format!("{method} /api/v1/{route} HTTP/1.1\r\nHost: localhost\r\n");
    if let Some(b) = body {
        req += &format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len());
    } else {
        req += "\r\n";
    }
    raw(socket, req.as_bytes()).unwrap_or_else(|| panic!("no answer to {method} {route}"))
}

pub fn get(socket: &Path, route: &str) -> Resp {
    request(socket, "GET", route, None)
}

pub fn put(socket: &Path, route: &str, body: Option<&str>) -> Resp {
    request(socket, "PUT", route, body)
}

/// A tiny deterministic PRNG (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    pub fn bytes_upto(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        self.bytes(n)
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

//! The API client: [`Client`] makes blocking calls over the Unix socket (hyper's HTTP/1.1
//! client on a small tokio runtime of its own), and [`run`] is `rustvisor api`, the command-line
//! front end ([`ApiArgs`]).

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::fileurl::path_to_file_url;
use crate::server::API_PREFIX;
use crate::types::{
    BackupRequest, BackupState, BackupStatus, BalloonInfo, BalloonTarget, Counters, ErrorBody, PingInfo,
    RestoreRequest, SnapshotRequest, VmConfig, VmInfo,
};

/// The largest response body the client reads.
const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached (absent, nobody listening, no permission).
    #[error("cannot connect to the API socket {}: {source}{}", socket.display(), connect_hint(source))]
    Connect {
        /// The socket's path.
        socket: PathBuf,
        /// The error from `connect`.
        source: io::Error,
    },
    /// The server answered with a 4xx or 5xx.
    #[error("{}: {message}", status_line(*status))]
    Http {
        /// The HTTP status code.
        status: u16,
        /// The error message of the body (or the body itself when it is not an [`ErrorBody`]).
        message: String,
        /// The error body, when it is one.
        body: Option<ErrorBody>,
    },
    /// The exchange failed after connecting: an I/O or protocol error, or no answer in time.
    #[error("{0}")]
    Transport(String),
    /// A success response whose body is not what the route returns.
    #[error("unexpected response body: {0}")]
    Decode(String),
}

fn connect_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => " (is the VMM running?)",
        _ => "",
    }
}

/// "404 Not Found".
fn status_line(status: u16) -> String {
    match StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()) {
        Some(reason) => format!("{status} {reason}"),
        None => status.to_string(),
    }
}

/// A response as it came: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    /// The HTTP status code.
    pub status: u16,
    /// The body's bytes (JSON, or empty for a 204).
    pub body: Vec<u8>,
}

/// A blocking API client for one socket. Each call opens a connection of its own. Its methods
/// block on a runtime of the client's own, so they must not be called from async code.
#[derive(Debug)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
    rt: tokio::runtime::Runtime,
}

impl Client {
    /// A client for the API on `socket`, with a 60 s timeout per call.
    pub fn new(socket: impl Into<PathBuf>) -> io::Result<Client> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(Client { socket: socket.into(), timeout: Duration::from_secs(60), rt })
    }

    /// The same client with another timeout per call (connect, send and receive together).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `method` to route `name` (e.g. "vm.info", without the `/api/v1/` prefix) with an
    /// optional JSON body, and returns the response whatever its status.
    pub fn request(&self, method: &str, name: &str, body: Option<Vec<u8>>) -> Result<RawResponse, ClientError> {
        let method = Method::from_bytes(method.as_bytes()).map_err(|e| ClientError::Transport(e.to_string()))?;
        let path = format!("{API_PREFIX}{name}");
        let fut = exchange(&self.socket, method, &path, body);
        self.rt.block_on(async {
            match tokio::time::timeout(self.timeout, fut).await {
                Ok(r) => r,
                Err(_) => Err(ClientError::Transport(format!(
                    "no answer from {} within {:?}",
                    self.socket.display(),
                    self.timeout
                ))),
            }
        })
    }

    /// Like [`Client::request`], but a 4xx or 5xx is a [`ClientError::Http`]; returns the body.
    pub fn call(&self, method: &str, name: &str, body: Option<Vec<u8>>) -> Result<Vec<u8>, ClientError> {
        let resp = self.request(method, name, body)?;
        if (200..300).contains(&resp.status) {
            return Ok(resp.body);
        }
        let body = serde_json::from_slice::<ErrorBody>(&resp.body).ok();
        let message = match &body {
            Some(b) => b.error.clone(),
            None if resp.body.is_empty() => "(no message)".into(),
            None => String::from_utf8_lossy(&resp.body).chars().take(200).collect(),
        };
        Err(ClientError::Http { status: resp.status, message, body })
    }

    fn get<T: DeserializeOwned>(&self, name: &str) -> Result<T, ClientError> {
        let body = self.call("GET", name, None)?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode(e.to_string()))
    }

    fn put<B: Serialize>(&self, name: &str, body: Option<&B>) -> Result<(), ClientError> {
        let body = body.map(|b| serde_json::to_vec(b).map_err(|e| ClientError::Decode(e.to_string()))).transpose()?;
        self.call("PUT", name, body).map(drop)
    }

    fn put_json<B: Serialize, T: DeserializeOwned>(&self, name: &str, body: &B) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Decode(e.to_string()))?;
        let resp = self.call("PUT", name, Some(body))?;
        serde_json::from_slice(&resp).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// `GET vmm.ping`.
    pub fn ping(&self) -> Result<PingInfo, ClientError> {
        self.get("vmm.ping")
    }

    /// `GET vm.info`.
    pub fn info(&self) -> Result<VmInfo, ClientError> {
        self.get("vm.info")
    }

    /// `GET vm.counters`.
    pub fn counters(&self) -> Result<Counters, ClientError> {
        self.get("vm.counters")
    }

    /// `PUT vm.create`.
    pub fn create(&self, cfg: &VmConfig) -> Result<(), ClientError> {
        self.put("vm.create", Some(cfg))
    }

    /// `PUT vm.boot`.
    pub fn boot(&self) -> Result<(), ClientError> {
        self.put::<()>("vm.boot", None)
    }

    /// `PUT vm.pause`.
    pub fn pause(&self) -> Result<(), ClientError> {
        self.put::<()>("vm.pause", None)
    }

    /// `PUT vm.resume`.
    pub fn resume(&self) -> Result<(), ClientError> {
        self.put::<()>("vm.resume", None)
    }

    /// `PUT vm.shutdown`.
    pub fn shutdown(&self) -> Result<(), ClientError> {
        self.put::<()>("vm.shutdown", None)
    }

    /// `PUT vm.reboot`.
    pub fn reboot(&self) -> Result<(), ClientError> {
        self.put::<()>("vm.reboot", None)
    }

    /// `PUT vm.delete`.
    pub fn delete(&self) -> Result<(), ClientError> {
        self.put::<()>("vm.delete", None)
    }

    /// `PUT vm.balloon`: asks the guest for a balloon of `target_mib` MiB.
    pub fn balloon_set(&self, target_mib: u64) -> Result<(), ClientError> {
        self.put("vm.balloon", Some(&BalloonTarget { target_mib }))
    }

    /// `GET vm.balloon`.
    pub fn balloon_info(&self) -> Result<BalloonInfo, ClientError> {
        self.get("vm.balloon")
    }

    /// `PUT vm.snapshot` into directory `dir` (made absolute against the current directory).
    pub fn snapshot(&self, dir: &Path) -> Result<(), ClientError> {
        let destination_url = dir_url(dir)?;
        self.put("vm.snapshot", Some(&SnapshotRequest { destination_url }))
    }

    /// `PUT vm.restore` from directory `dir` (made absolute against the current directory).
    pub fn restore(&self, dir: &Path) -> Result<(), ClientError> {
        let source_url = dir_url(dir)?;
        self.put("vm.restore", Some(&RestoreRequest { source_url }))
    }

    /// `PUT vm.backup` into directory `dir` (made absolute against the current directory),
    /// the background copy reading at most `rate_limit_mib_s` MiB/s (`None`: unlimited).
    /// Returns once the jobs started, with the guest's pause.
    pub fn backup(&self, dir: &Path, rate_limit_mib_s: Option<u64>) -> Result<BackupStatus, ClientError> {
        let destination_url = dir_url(dir)?;
        self.put_json("vm.backup", &BackupRequest { destination_url, rate_limit_mib_s })
    }

    /// `GET vm.backup`: the latest backup's progress.
    pub fn backup_status(&self) -> Result<BackupStatus, ClientError> {
        self.get("vm.backup")
    }

    /// `DELETE vm.backup`: cancels the running backup.
    pub fn backup_cancel(&self) -> Result<(), ClientError> {
        self.call("DELETE", "vm.backup", None).map(drop)
    }

    /// `PUT vmm.shutdown`.
    pub fn vmm_shutdown(&self) -> Result<(), ClientError> {
        self.put::<()>("vmm.shutdown", None)
    }
}

/// The `file://` URL of `dir`, made absolute.
fn dir_url(dir: &Path) -> Result<String, ClientError> {
    let abs = std::path::absolute(dir)
        .map_err(|e| ClientError::Transport(format!("cannot make {} absolute: {e}", dir.display())))?;
    Ok(path_to_file_url(&abs))
}

/// One request on a fresh connection.
async fn exchange(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<RawResponse, ClientError> {
    let transport = |what: &str, e: &dyn std::error::Error| {
        let mut msg = format!("{what} {}: {e}", socket.display());
        let mut source = e.source();
        while let Some(s) = source {
            msg.push_str(&format!(": {s}"));
            source = s.source();
        }
        ClientError::Transport(msg)
    };
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect { socket: socket.to_owned(), source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| transport("talking to", &e))?;
    let conn = tokio::spawn(conn);
    let mut req =
        Request::builder().method(method).uri(path).header(header::HOST, HeaderValue::from_static("localhost"));
    if body.is_some() {
        req = req.header(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| transport("building a request for", &e))?;
    let result = async {
        let resp = sender.send_request(req).await.map_err(|e| transport("no answer from", &e))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| transport("reading the answer from", &*e))?
            .to_bytes()
            .to_vec();
        Ok(RawResponse { status, body })
    }
    .await;
    conn.abort();
    result
}

/// `rustvisor api`: calls the API of a running VMM.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// The VMM's API socket.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Print the responses' JSON as it comes instead of a readable summary.
    #[arg(long)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: ApiCommand,
}

/// The API calls of `rustvisor api`.
#[derive(clap::Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum ApiCommand {
    /// Check that the VMM answers; print its version, accelerators and PID.
    Ping,
    /// The VM's state, uptime and configuration.
    Info,
    /// Per-vCPU exit counts and per-device counters.
    Counters,
    /// Create the VM from a JSON configuration file (see openapi.yaml, VmConfig).
    Create {
        /// The configuration (JSON).
        #[arg(value_name = "FILE.json")]
        file: PathBuf,
    },
    /// Boot the created VM.
    Boot,
    /// Pause the running VM.
    Pause,
    /// Resume the paused VM.
    Resume,
    /// Shut the VM down (ACPI power button, then stop).
    Shutdown,
    /// Reset the VM.
    Reboot,
    /// Stop the VM if needed and forget it.
    Delete,
    /// Without SIZE: the balloon's target and actual size and the guest's memory statistics.
    /// With SIZE (e.g. 256M, 1G; a plain number is MiB): ask the guest to give back that
    /// much memory (0 deflates the balloon).
    Balloon {
        /// The balloon's new size.
        #[arg(value_name = "SIZE", value_parser = parse_mib)]
        target_mib: Option<u64>,
    },
    /// Write a snapshot of the paused VM into DIR (created if absent; must be empty).
    Snapshot {
        /// The snapshot directory (relative to the current directory unless absolute).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Restore a snapshot from DIR into a VMM with no VM (it comes back paused).
    Restore {
        /// The snapshot directory (relative to the current directory unless absolute).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Export the running or paused VM's writable disks as of one instant into DIR (created
    /// if absent; must be empty): one raw sparse image per disk, `disk<i>.raw`. Returns once
    /// the copy started; `backup-status` follows it.
    Backup {
        /// The destination directory (relative to the current directory unless absolute).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// The most MiB/s the background copy reads (default: unlimited).
        #[arg(long, value_name = "MIB")]
        rate_limit: Option<u64>,
    },
    /// The latest backup's progress, per disk.
    BackupStatus,
    /// Cancel the running backup.
    BackupCancel,
    /// Stop the VM (if any) and the VMM process.
    VmmShutdown,
}

/// Parses a size in MiB: `N` or `NM` (MiB), `NG` (GiB).
///
/// Errors: a message naming the accepted forms.
pub fn parse_mib(s: &str) -> Result<u64, String> {
    let bad = || format!("'{s}' is not a size (accepted: N or NM for MiB, NG for GiB, e.g. 256M)");
    let (num, mult) = match s.strip_suffix(['G', 'g']) {
        Some(n) => (n, 1024),
        None => (s.strip_suffix(['M', 'm']).unwrap_or(s), 1),
    };
    num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult)).ok_or_else(bad)
}

/// Runs `rustvisor api` with stdout and stderr.
pub fn run(args: ApiArgs) -> ExitCode {
    run_with(args, &mut io::stdout().lock(), &mut io::stderr().lock())
}

/// Runs `rustvisor api`, writing results to `out` and the one-line error to `err`: exit 0 on
/// success, 1 on any failure (`rustvisor api: <status>: <message>` for an HTTP error).
pub fn run_with(args: ApiArgs, out: &mut dyn Write, err: &mut dyn Write) -> ExitCode {
    match execute(&args, out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(err, "rustvisor api: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

fn execute(args: &ApiArgs, out: &mut dyn Write) -> Result<(), String> {
    let client = Client::new(&args.socket).map_err(|e| format!("cannot start the client: {e}"))?;
    let e = |e: ClientError| e.to_string();
    let (method, name, body, done) = match &args.command {
        ApiCommand::Ping => ("GET", "vmm.ping", None, None),
        ApiCommand::Info => ("GET", "vm.info", None, None),
        ApiCommand::Counters => ("GET", "vm.counters", None, None),
        ApiCommand::Create { file } => {
            let json = std::fs::read(file).map_err(|err| format!("cannot read {}: {err}", file.display()))?;
            ("PUT", "vm.create", Some(json), Some("VM created".to_string()))
        }
        ApiCommand::Boot => ("PUT", "vm.boot", None, Some("VM booted".into())),
        ApiCommand::Pause => ("PUT", "vm.pause", None, Some("VM paused".into())),
        ApiCommand::Resume => ("PUT", "vm.resume", None, Some("VM resumed".into())),
        ApiCommand::Shutdown => ("PUT", "vm.shutdown", None, Some("VM shut down".into())),
        ApiCommand::Reboot => ("PUT", "vm.reboot", None, Some("VM rebooted".into())),
        ApiCommand::Delete => ("PUT", "vm.delete", None, Some("VM deleted".into())),
        ApiCommand::Balloon { target_mib: None } => ("GET", "vm.balloon", None, None),
        ApiCommand::Balloon { target_mib: Some(t) } => {
            let json = serde_json::to_vec(&BalloonTarget { target_mib: *t }).map_err(|err| err.to_string())?;
            ("PUT", "vm.balloon", Some(json), Some(format!("balloon target set to {t} MiB")))
        }
        ApiCommand::Snapshot { dir } => {
            let body = SnapshotRequest { destination_url: dir_url(dir).map_err(e)? };
            let json = serde_json::to_vec(&body).map_err(|err| err.to_string())?;
            ("PUT", "vm.snapshot", Some(json), Some(format!("snapshot written to {}", dir.display())))
        }
        ApiCommand::Restore { dir } => {
            let body = RestoreRequest { source_url: dir_url(dir).map_err(e)? };
            let json = serde_json::to_vec(&body).map_err(|err| err.to_string())?;
            ("PUT", "vm.restore", Some(json), Some(format!("VM restored from {} (paused)", dir.display())))
        }
        ApiCommand::Backup { dir, rate_limit } => {
            let body = BackupRequest { destination_url: dir_url(dir).map_err(e)?, rate_limit_mib_s: *rate_limit };
            let json = serde_json::to_vec(&body).map_err(|err| err.to_string())?;
            ("PUT", "vm.backup", Some(json), None)
        }
        ApiCommand::BackupStatus => ("GET", "vm.backup", None, None),
        ApiCommand::BackupCancel => ("DELETE", "vm.backup", None, Some("backup cancelled".into())),
        ApiCommand::VmmShutdown => ("PUT", "vmm.shutdown", None, Some("VMM shutting down".into())),
    };
    let body = client.call(method, name, body).map_err(e)?;
    let write_err = |err: io::Error| format!("cannot write the output: {err}");
    if args.json {
        if !body.is_empty() {
            out.write_all(&body).map_err(write_err)?;
            writeln!(out).map_err(write_err)?;
        }
        return Ok(());
    }
    let text = match (&args.command, done) {
        (_, Some(done)) => format!("{done}\n"),
        (ApiCommand::Ping, _) => format_ping(&decode(&body)?),
        (ApiCommand::Info, _) => format_info(&decode(&body)?),
        (ApiCommand::Balloon { .. }, _) => format_balloon(&decode(&body)?),
        (ApiCommand::Backup { .. } | ApiCommand::BackupStatus, _) => format_backup(&decode(&body)?),
        (_, _) => format_counters(&decode(&body)?),
    };
    out.write_all(text.as_bytes()).map_err(write_err)
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| ClientError::Decode(e.to_string()).to_string())
}

/// `vmm.ping`, for a person.
pub fn format_ping(p: &PingInfo) -> String {
    format!("version: {}\naccelerators: {}\npid: {}\n", p.version, p.accelerators.join(", "), p.pid)
}

/// `vm.info`, for a person.
pub fn format_info(i: &VmInfo) -> String {
    let c = &i.config;
    let mut s = match &i.pause_reason {
        Some(why) => format!("state: {} ({why})\nuptime: {:.1} s\n", i.state, i.uptime_s),
        None => format!("state: {}\nuptime: {:.1} s\n", i.state, i.uptime_s),
    };
    s += &format!("accelerator: {}\n", i.accelerator.as_deref().unwrap_or("-"));
    s += &format!("kernel: {}\n", c.kernel);
    if let Some(initrd) = &c.initrd {
        s += &format!("initrd: {initrd}\n");
    }
    s += &format!(
        "cmdline: {}\nmemory: {} MiB\ncpus: {}\naccel: {}\nserial: {}\n",
        c.cmdline, c.memory_mib, c.cpus, c.accel, c.serial
    );
    if let Some(console) = &c.console {
        s += &format!("console: {console}\n");
    }
    for (n, d) in c.disks.iter().enumerate() {
        let mut opts = vec![d.format.map_or_else(|| "format detected".to_string(), |f| f.to_string())];
        if d.readonly {
            opts.push("read-only".into());
        }
        if let Some(serial) = &d.serial {
            opts.push(format!("serial {serial}"));
        }
        if d.on_error == crate::types::DiskErrorPolicy::Pause {
            opts.push("pause on I/O error".into());
        }
        s += &format!("disk{n}: {} ({})\n", d.path, opts.join(", "));
    }
    for (n, net) in c.nets.iter().enumerate() {
        s += &format!("net{n}: tap {}", net.tap);
        if let Some(mac) = &net.mac {
            s += &format!(", mac {mac}");
        }
        s += "\n";
    }
    if let Some(v) = &c.vsock {
        s += &format!("vsock: cid {}, socket {}\n", v.cid, v.socket);
    }
    s += &format!("rng: {}\n", if c.rng { "yes" } else { "no" });
    if let Some(b) = &c.balloon {
        s += &format!(
            "balloon: deflate on OOM {}, statistics {}, free page reporting {}\n",
            if b.deflate_on_oom { "yes" } else { "no" },
            if b.stats_interval_s == 0 { "off".to_string() } else { format!("every {} s", b.stats_interval_s) },
            if b.free_page_reporting { "yes" } else { "no" }
        );
    }
    let m = &c.memory_options;
    let opts: Vec<&str> = [(m.mergeable, "mergeable"), (m.hugepages, "hugepages"), (m.thp, "thp")]
        .iter()
        .filter(|o| o.0)
        .map(|o| o.1)
        .collect();
    if !opts.is_empty() {
        s += &format!("memory options: {}\n", opts.join(", "));
    }
    s
}

/// `vm.balloon`, for a person.
pub fn format_balloon(b: &BalloonInfo) -> String {
    let mut s =
        format!("target: {} MiB\nactual: {} MiB\nreported free: {} MiB\n", b.target_mib, b.actual_mib, b.reported_mib);
    let Some(st) = &b.stats else {
        return s + "statistics: none yet\n";
    };
    s += &format!("statistics ({:.1} s old):\n", b.stats_age_s.unwrap_or(0.0));
    let mib = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| format!("{} MiB", v >> 20));
    let n = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    for (k, v) in [
        ("total", mib(st.total_bytes)),
        ("free", mib(st.free_bytes)),
        ("available", mib(st.available_bytes)),
        ("disk caches", mib(st.disk_caches_bytes)),
        ("swapped in", mib(st.swap_in_bytes)),
        ("swapped out", mib(st.swap_out_bytes)),
        ("major faults", n(st.major_faults)),
        ("minor faults", n(st.minor_faults)),
        ("hugetlb allocations", n(st.hugetlb_allocations)),
        ("hugetlb failures", n(st.hugetlb_failures)),
    ] {
        s += &format!("  {k}: {v}\n");
    }
    s
}

/// `vm.backup`, for a person: the overall state and pause, then one line per disk.
pub fn format_backup(b: &BackupStatus) -> String {
    let state = |s: BackupState| match s {
        BackupState::Running => "running",
        BackupState::Done => "done",
        BackupState::Failed => "failed",
        BackupState::Cancelled => "cancelled",
    };
    let mut s =
        format!("backup to {}: {} (guest paused {:.2} ms to start it)\n", b.destination, state(b.state), b.pause_ms);
    if b.disks.is_empty() {
        s += "no writable disk\n";
    }
    for d in &b.disks {
        let pct = if d.bytes_total == 0 { 100.0 } else { d.bytes_copied as f64 * 100.0 / d.bytes_total as f64 };
        s += &format!(
            "disk{}: {} {:.1}% ({} of {} bytes) {} -> {}",
            d.index,
            state(d.state),
            pct,
            d.bytes_copied,
            d.bytes_total,
            d.path,
            d.target
        );
        if let Some(err) = &d.error {
            s += &format!(": {err}");
        }
        s += "\n";
    }
    s
}

/// `vm.counters`, for a person: a table of vCPU exits by kind, then one of devices.
pub fn format_counters(c: &Counters) -> String {
    let mut s = String::new();
    if c.vcpus.is_empty() {
        s += "vCPU exits: none\n";
    } else {
        let mut kinds: Vec<&str> = c.vcpus.iter().flat_map(|m| m.keys().map(String::as_str)).collect();
        kinds.sort_unstable();
        kinds.dedup();
        let mut rows = vec![std::iter::once("vcpu".to_string()).chain(kinds.iter().map(|k| k.to_string())).collect()];
        for (n, m) in c.vcpus.iter().enumerate() {
            let counts = kinds.iter().map(|k| m.get(*k).copied().unwrap_or(0).to_string());
            rows.push(std::iter::once(n.to_string()).chain(counts).collect());
        }
        s += "vCPU exits:\n";
        s += &table(&rows);
    }
    if c.devices.is_empty() {
        s += "devices: none\n";
    } else {
        let mut rows: Vec<Vec<String>> = vec![["device", "requests", "bytes_read", "bytes_written", "errors"]
            .iter()
            .map(|h| h.to_string())
            .collect()];
        for (name, d) in &c.devices {
            rows.push(vec![
                name.clone(),
                d.requests.to_string(),
                d.bytes_read.to_string(),
                d.bytes_written.to_string(),
                d.errors.to_string(),
            ]);
        }
        s += "devices:\n";
        s += &table(&rows);
    }
    let header = |h: &[&str]| vec![h.iter().map(|h| h.to_string()).collect::<Vec<_>>()];
    let mut disks = header(&["disk", "reads", "read_bytes", "writes", "write_bytes", "flushes", "error_pauses"]);
    let mut nics = header(&[
        "nic",
        "rx_packets",
        "rx_bytes",
        "rx_dropped",
        "rx_errors",
        "tx_packets",
        "tx_bytes",
        "tx_dropped",
        "tx_errors",
    ]);
    for (name, d) in &c.devices {
        if let Some(b) = &d.block {
            let v = [b.read_ops, b.read_bytes, b.write_ops, b.write_bytes, b.flush_ops, b.error_pauses];
            disks.push(std::iter::once(name.clone()).chain(v.iter().map(u64::to_string)).collect());
        }
        if let Some(n) = &d.net {
            let v = [
                n.rx_packets,
                n.rx_bytes,
                n.rx_dropped,
                n.rx_errors,
                n.tx_packets,
                n.tx_bytes,
                n.tx_dropped,
                n.tx_errors,
            ];
            nics.push(std::iter::once(name.clone()).chain(v.iter().map(u64::to_string)).collect());
        }
    }
    if disks.len() > 1 {
        s += "disks:\n";
        s += &table(&disks);
    }
    if nics.len() > 1 {
        s += "nics:\n";
        s += &table(&nics);
    }
    s
}

/// Rows as columns: the first left-aligned, the others right-aligned, two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|v| v.chars().count()).max().unwrap_or(0)).collect();
    let mut s = String::new();
    for row in rows {
        let mut line = String::from("  ");
        for (c, v) in row.iter().enumerate() {
            if c == 0 {
                line += &format!("{v:<w$}", w = widths[c]);
            } else {
                line += &format!("  {v:>w$}", w = widths[c]);
            }
        }
        s += line.trim_end();
        s += "\n";
    }
    s
}

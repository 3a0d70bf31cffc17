//! The client and `rustvisor api` against the mock server: human output, `--json`, errors.

mod common;

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use api::client::{run_with, ApiArgs, ApiCommand, Client, ClientError};
use clap::{CommandFactory, Parser};
use common::*;

/// `rustvisor api ...` as the lead's CLI will parse it.
#[derive(Parser, Debug)]
#[command(name = "rustvisor-api")]
struct Cli {
    #[command(flatten)]
    args: ApiArgs,
}

/// Runs `rustvisor api --socket SOCKET <words>`: (exit code, stdout, stderr).
fn cli(socket: &Path, words: &[&str]) -> (ExitCode, String, String) {
    let mut argv = vec!["rustvisor-api".to_string(), "--socket".into(), socket.display().to_string()];
    argv.extend(words.iter().map(|w| w.to_string()));
    let args = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}")).args;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run_with(args, &mut out, &mut err);
    (code, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
}

fn ok(socket: &Path, words: &[&str]) -> String {
    let (code, out, err) = cli(socket, words);
    assert_eq!(code, ExitCode::SUCCESS, "{words:?}: {err}");
    assert_eq!(err, "", "{words:?}");
    out
}

fn fails(socket: &Path, words: &[&str]) -> String {
    let (code, out, err) = cli(socket, words);
    assert_eq!(code, ExitCode::FAILURE, "{words:?} succeeded: {out}");
    assert_eq!(out, "", "{words:?}");
    assert!(err.starts_with("rustvisor api: "), "{err}");
    assert_eq!(err.matches('\n').count(), 1, "one line: {err:?}");
    err
}

#[test]
fn cli_definition_is_valid() {
    Cli::command().debug_assert();
    let cli = Cli::try_parse_from(["x", "--socket", "/s", "--json", "snapshot", "rel/dir"]).unwrap();
    assert!(cli.args.json);
    assert_eq!(cli.args.command, ApiCommand::Snapshot { dir: "rel/dir".into() });
    let cli = Cli::try_parse_from(["x", "--socket", "/s", "vmm-shutdown"]).unwrap();
    assert_eq!(cli.args.command, ApiCommand::VmmShutdown);
    assert!(Cli::try_parse_from(["x", "ping"]).is_err(), "--socket is required");
    assert!(Cli::try_parse_from(["x", "--socket", "/s", "snapshot"]).is_err(), "snapshot needs DIR");
    assert!(Cli::try_parse_from(["x", "--socket", "/s", "frobnicate"]).is_err());
    let cli = Cli::try_parse_from(["x", "--socket", "/s", "balloon", "1G"]).unwrap();
    assert_eq!(cli.args.command, ApiCommand::Balloon { target_mib: Some(1024) });
    let cli = Cli::try_parse_from(["x", "--socket", "/s", "balloon"]).unwrap();
    assert_eq!(cli.args.command, ApiCommand::Balloon { target_mib: None });
    for (size, mib) in [("256M", 256), ("256", 256), ("0", 0), ("2g", 2048)] {
        assert_eq!(api::client::parse_mib(size), Ok(mib), "{size}");
    }
    for bad in ["1.5G", "12K", "", "M", "-1", "99999999999999999999G"] {
        assert!(api::client::parse_mib(bad).unwrap_err().contains("accepted: N or NM"), "{bad}");
    }
}

#[test]
fn cli_balloon() {
    let srv = TestServer::start("cli-balloon");
    let s = &srv.socket;
    let cfg = srv.dir.path().join("vm.json");
    std::fs::write(&cfg, r#"{"kernel": "/boot/vmlinuz", "balloon": {}, "memory_options": {"mergeable": true}}"#)
        .unwrap();
    ok(s, &["create", cfg.to_str().unwrap()]);
    let info = ok(s, &["info"]);
    assert!(info.contains("balloon: deflate on OOM yes, statistics every 5 s, free page reporting no\n"), "{info}");
    assert!(info.contains("memory options: mergeable\n"), "{info}");
    let err = fails(s, &["balloon", "256M"]);
    assert!(err.contains("409 Conflict: vm.balloon is not allowed while the VM is Created"), "{err}");
    ok(s, &["boot"]);
    assert_eq!(ok(s, &["balloon", "256M"]), "balloon target set to 256 MiB\n");
    let out = ok(s, &["balloon"]);
    assert!(
        out.starts_with("target: 256 MiB\nactual: 128 MiB\nreported free: 6 MiB\nstatistics (1.2 s old):\n"),
        "{out}"
    );
    assert!(out.contains("  total: 512 MiB\n  free: 100 MiB\n  available: -\n"), "{out}");
    assert!(out.contains("  major faults: 3\n"), "{out}");
    let json: serde_json::Value = serde_json::from_str(&ok(s, &["--json", "balloon"])).unwrap();
    assert_eq!(json["target_mib"], 256);
    let err = fails(s, &["balloon", "1G"]);
    assert!(err.contains("400 Bad Request: target_mib: 1024 MiB (accepted: 0 to 512)"), "{err}");
    let c = Client::new(s).unwrap();
    c.balloon_set(64).unwrap();
    assert_eq!(c.balloon_info().unwrap().target_mib, 64);
}

#[test]
fn cli_human_output_through_a_lifecycle() {
    let srv = TestServer::start("cli-human");
    let s = &srv.socket;

    assert_eq!(ok(s, &["ping"]), "version: 9.9.9-test\naccelerators: kvm, emu\npid: 4242\n");

    let err = fails(s, &["info"]);
    assert_eq!(err, "rustvisor api: 404 Not Found: no VM: create one first\n");

    let cfg = srv.dir.path().join("vm.json");
    std::fs::write(&cfg, r#"{"kernel": "/boot/vmlinuz", "memory_mib": 1024, "cpus": 2, "disks": [{"path": "/img/a.qcow2", "format": "qcow2", "readonly": true}], "nets": [{"tap": "tap0"}]}"#).unwrap();
    assert_eq!(ok(s, &["create", cfg.to_str().unwrap()]), "VM created\n");
    assert_eq!(ok(s, &["boot"]), "VM booted\n");

    let info = ok(s, &["info"]);
    assert!(info.starts_with("state: Running\nuptime: 12.3 s\naccelerator: kvm\nkernel: /boot/vmlinuz\n"), "{info}");
    assert!(info.contains("memory: 1024 MiB\ncpus: 2\n"), "{info}");
    assert!(info.contains("disk0: /img/a.qcow2 (qcow2, read-only)\n"), "{info}");
    assert!(info.contains("net0: tap tap0\n"), "{info}");
    assert!(info.ends_with("rng: no\n"), "{info}");

    let counters = ok(s, &["counters"]);
    let expected = "\
vCPU exits:
  vcpu  hlt  mmio     pio
  0       7     0  123456
  1       0    99       0
devices:
  device  requests  bytes_read  bytes_written  errors
  disk0         10       40960            512       0
  net0           3        1500             60       1
disks:
  disk   reads  read_bytes  writes  write_bytes  flushes  error_pauses
  disk0      1         512       9        40960        0             0
nics:
  nic   rx_packets  rx_bytes  rx_dropped  rx_errors  tx_packets  tx_bytes  tx_dropped  tx_errors
  net0           1        48           0          0           2      1476           0          1
";
    assert_eq!(counters, expected);

    assert_eq!(ok(s, &["pause"]), "VM paused\n");
    let err = fails(s, &["pause"]);
    assert_eq!(err, "rustvisor api: 409 Conflict: pause is not allowed while the VM is Paused\n");

    // Snapshot: a relative DIR is made absolute and sent as a file:// URL.
    let out = ok(s, &["snapshot", "some dir/snap"]);
    assert_eq!(out, "snapshot written to some dir/snap\n");
    let expected = std::env::current_dir().unwrap().join("some dir/snap");
    assert_eq!(*srv.mock.snapshots.lock().unwrap(), [expected.to_str().unwrap()]);
    let err = fails(s, &["snapshot", "/fail"]);
    assert!(err.starts_with("rustvisor api: 500 Internal Server Error: cannot write /fail/state"), "{err}");

    assert_eq!(ok(s, &["resume"]), "VM resumed\n");
    // Backup: start, status, cancel.
    let out = ok(s, &["backup", "/backups/b", "--rate-limit", "16"]);
    assert_eq!(
        out,
        "backup to /backups/b: running (guest paused 1.25 ms to start it)\n\
         disk0: running 0.0% (0 of 1048576 bytes) /img/root.raw -> /backups/b/disk0.raw\n"
    );
    assert_eq!(srv.mock.backup.lock().unwrap().as_ref().unwrap().1, Some(16));
    assert!(ok(s, &["backup-status"]).starts_with("backup to /backups/b: running"));
    assert_eq!(ok(s, &["backup-cancel"]), "backup cancelled\n");
    assert!(ok(s, &["backup-status"]).contains("disk0: cancelled"));
    assert_eq!(ok(s, &["reboot"]), "VM rebooted\n");
    assert_eq!(ok(s, &["shutdown"]), "VM shut down\n");
    assert_eq!(ok(s, &["delete"]), "VM deleted\n");
    assert_eq!(ok(s, &["restore", "/snaps/a"]), "VM restored from /snaps/a (paused)\n");
    assert_eq!(*srv.mock.restores.lock().unwrap(), ["/snaps/a"]);
    assert_eq!(srv.mock.state(), Some(St::Paused));

    assert_eq!(ok(s, &["vmm-shutdown"]), "VMM shutting down\n");
    let deadline = Instant::now() + Duration::from_secs(5);
    while srv.mock.vmm_shutdowns.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "vmm_shutdown not called");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn cli_json_output() {
    let srv = TestServer::start("cli-json");
    let s = &srv.socket;
    let out = ok(s, &["--json", "ping"]);
    assert!(out.ends_with('\n'));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v, serde_json::json!({"version": "9.9.9-test", "accelerators": ["kvm", "emu"], "pid": 4242}));

    let cfg = srv.dir.path().join("vm.json");
    std::fs::write(&cfg, r#"{"kernel": "/k"}"#).unwrap();
    assert_eq!(ok(s, &["--json", "create", cfg.to_str().unwrap()]), "", "a 204 prints nothing");
    let v: serde_json::Value = serde_json::from_str(&ok(s, &["--json", "info"])).unwrap();
    assert_eq!(v["state"], "Created");
    assert_eq!(v["config"]["kernel"], "/k");
    assert_eq!(v["config"]["cmdline"], "console=ttyS0");
    let v: serde_json::Value = serde_json::from_str(&ok(s, &["--json", "counters"])).unwrap();
    assert_eq!(v["vcpus"][0]["pio"], 123456);
    assert_eq!(v["devices"]["net0"]["errors"], 1);

    // Errors are the same one line on stderr with --json.
    let err = fails(s, &["--json", "resume"]);
    assert_eq!(err, "rustvisor api: 409 Conflict: resume is not allowed while the VM is Created\n");
}

#[test]
fn cli_errors_are_one_line() {
    let srv = TestServer::start("cli-errors");
    let s = &srv.socket;

    // The server's 400 for a bad configuration file names the field.
    let cfg = srv.dir.path().join("bad.json");
    std::fs::write(&cfg, r#"{"kernel": "/k", "memory": 512}"#).unwrap();
    let err = fails(s, &["create", cfg.to_str().unwrap()]);
    assert!(err.starts_with("rustvisor api: 400 Bad Request: memory: unknown field `memory`"), "{err}");

    let err = fails(s, &["create", "/no/such/file.json"]);
    assert!(err.starts_with("rustvisor api: cannot read /no/such/file.json: "), "{err}");

    // No socket, or nobody listening on it.
    let missing = srv.dir.path().join("missing.sock");
    let err = fails(&missing, &["ping"]);
    assert!(err.contains(missing.to_str().unwrap()) && err.contains("cannot connect"), "{err}");
    let stale = srv.dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let err = fails(&stale, &["--json", "info"]);
    assert!(err.contains(stale.to_str().unwrap()), "{err}");

    // The controller panicking: a 500.
    srv.mock.panic.store(true, Ordering::SeqCst);
    let err = fails(s, &["ping"]);
    assert!(err.starts_with("rustvisor api: 500 Internal Server Error: "), "{err}");
}

#[test]
fn client_library_calls() {
    let srv = TestServer::start("client-lib");
    let c = Client::new(&srv.socket).unwrap().with_timeout(Duration::from_secs(10));
    assert_eq!(c.socket(), srv.socket);
    assert_eq!(c.ping().unwrap().pid, 4242);
    match c.info() {
        Err(ClientError::Http { status: 404, .. }) => {}
        other => panic!("{other:?}"),
    }
    c.create(&sample_config()).unwrap();
    match c.create(&sample_config()) {
        Err(ClientError::Http { status: 409, body: Some(b), .. }) => assert_eq!(b.state.as_deref(), Some("Created")),
        other => panic!("{other:?}"),
    }
    c.boot().unwrap();
    c.pause().unwrap();
    c.snapshot(Path::new("/snap/x y")).unwrap();
    assert_eq!(*srv.mock.snapshots.lock().unwrap(), ["/snap/x y"]);
    c.resume().unwrap();
    match c.backup_status() {
        Err(ClientError::Http { status: 404, .. }) => {}
        other => panic!("{other:?}"),
    }
    let b = c.backup(Path::new("/backups/x y"), Some(4)).unwrap();
    assert_eq!((b.destination.as_str(), b.pause_ms), ("/backups/x y", 1.25));
    assert_eq!(srv.mock.backup.lock().unwrap().as_ref().unwrap().1, Some(4));
    assert_eq!(c.backup_status().unwrap(), b);
    match c.backup(Path::new("/backups/z"), None) {
        Err(ClientError::Http { status: 409, .. }) => {}
        other => panic!("{other:?}"),
    }
    c.backup_cancel().unwrap();
    assert_eq!(c.backup_status().unwrap().state, api::types::BackupState::Cancelled);
    assert_eq!(c.info().unwrap().config, sample_config());
    assert_eq!(c.counters().unwrap().vcpus.len(), 2);
    c.reboot().unwrap();
    c.shutdown().unwrap();
    c.delete().unwrap();
    c.restore(Path::new("/snap/x y")).unwrap();
    let raw = c.request("POST", "vm.info", None).unwrap();
    assert_eq!(raw.status, 405);
    let raw = c.request("GET", "vm.nope", None).unwrap();
    assert_eq!(raw.status, 404);
    match c.call("PUT", "vm.create", Some(b"{".to_vec())) {
        Err(ClientError::Http { status: 400, body: Some(b), .. }) => assert_eq!(b.field.as_deref(), Some("body")),
        other => panic!("{other:?}"),
    }
    c.vmm_shutdown().unwrap();

    // A server that never answers: the client's timeout.
    let dir = TempDir::new("client-silent");
    let path = dir.path().join("silent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let c = Client::new(&path).unwrap().with_timeout(Duration::from_millis(300));
    match c.ping() {
        Err(ClientError::Transport(msg)) => assert!(msg.contains("no answer"), "{msg}"),
        other => panic!("{other:?}"),
    }
}

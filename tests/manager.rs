//! The host manager end to end: a real `rustvisor daemon` with its own state folder, run
//! folder and socket in a temp folder, driven by `rustvisor vm` and `rustvisor events`, with
//! real VMMs booting the Debian guest on `emu`.
//!
//! - bad input (no VM booted): exit 2 with one line naming the field, store unchanged;
//! - one test shares its booted VMs across the checks: two VMs started (with a concurrent
//!   second start of one: a 409), each console its own guest; a guest power-off is
//!   `stopped` and not restarted; a guest kernel crash (panic=-1 resets) is `crashed`; `kill -9` of a VMM with `--restart no` is `crashed` with
//!   the reason; `kill -9` of the daemon: the new one adopts the running VM (same pid); then
//!   `kill -9` of that adopted VMM with `on-failure` restarts it (event, count 1); pause,
//!   resume, stop, delete; the restart count goes back to 0 after `--restart-reset-after`;
//! - snapshots of a running VM: the guest writes its disk after the snapshot, a revert
//!   brings back the old disk and the guest continues from the snapshot (RAM), followed
//!   live by `events --follow`; autostart after a "host reboot" in order with its delay.
//! - consoles (`rustvisor vm console`, on that test's VM `a`): two clients attached, the first
//!   types and both see the output, the second's input is ignored until the first detaches
//!   (Ctrl-]) and the VM keeps running; after the daemon's `kill -9` and restart a new
//!   console works; a console attached when the VMM dies ends with a message.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use manager::types::{Event, EventList, VmList, VmState, VmSummary};

/// How long a guest boot may take on `emu` with other tests beside it.
const BOOT: Duration = Duration::from_secs(300);

/// A daemon in its own folders; dropping it kills it and every VMM it started.
struct Env {
    dir: TempDir,
    daemon: Option<Child>,
    daemon_args: Vec<String>,
    /// With [`Env::in_netns`]: the network namespace the daemons run in (the first daemon's
    /// fresh one, kept open so a restarted daemon joins it).
    netns: Option<Option<std::fs::File>>,
    /// The daemon's `--cgroup-parent`: one of its own, removed on drop.
    cgroup_parent: String,
}

/// A `--cgroup-parent` for test `tag`'s daemon, unique on the host.
fn test_cgroup_parent(tag: &str) -> String {
    format!("rustvisor-test/{tag}-{}", std::process::id())
}

/// Removes cgroup `parent` and the VM groups in it from every cgroup mount (retrying while
/// killed VMMs finish exiting).
fn remove_cgroups(parent: &str) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mounts.lines() {
        let Some((pre, post)) = line.split_once(" - ") else { continue };
        if !post.starts_with("cgroup") {
            continue;
        }
        let Some(mp) = pre.split_whitespace().nth(4) else { continue };
        let dir = std::path::Path::new(mp).join(parent);
        for _ in 0..100 {
            for vm in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if vm.path().is_dir() {
                    let _ = std::fs::remove_dir(vm.path());
                }
            }
            if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // "rustvisor-test" itself, unless another test's daemon still uses it.
        if let Some(top) = dir.parent() {
            let _ = std::fs::remove_dir(top);
        }
    }
}

impl Env {
    fn new(tag: &str) -> Env {
        Env::with_args(tag, &[])
    }

    /// A daemon started with `args` besides its folders.
    fn with_args(tag: &str, args: &[&str]) -> Env {
        let mut env = Env {
            dir: TempDir::new(tag),
            daemon: None,
            daemon_args: args.iter().map(|a| a.to_string()).collect(),
            netns: None,
            cgroup_parent: test_cgroup_parent(tag),
        };
        env.start_daemon();
        env
    }

    /// A daemon (and so its VMMs, TAPs, bridges, dnsmasqs and nftables rules) in a network
    /// namespace of its own, so the test leaves the host's networking alone.
    fn in_netns(tag: &str) -> Env {
        let mut env = Env {
            dir: TempDir::new(tag),
            daemon: None,
            daemon_args: Vec::new(),
            netns: Some(None),
            cgroup_parent: test_cgroup_parent(tag),
        };
        env.start_daemon();
        let pid = env.daemon.as_ref().unwrap().id();
        env.netns = Some(Some(std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap()));
        env
    }

    fn socket(&self) -> PathBuf {
        self.dir.path("rustvisor.sock")
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path("run")
    }

    fn start_daemon(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path("daemon.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rustvisor"));
        cmd.arg("daemon")
            .arg("--state-dir")
            .arg(self.dir.path("state"))
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--socket")
            .arg(self.socket())
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .args(&self.daemon_args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stderr(log);
        match &self.netns {
            None => {}
            Some(None) => {
                // SAFETY: between fork and exec the child only calls unshare(2), which is
                // async-signal-safe and touches no memory of the parent.
                unsafe {
                    cmd.pre_exec(|| {
                        if libc::unshare(libc::CLONE_NEWNET) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
            Some(Some(ns)) => {
                let fd = ns.as_raw_fd();
                // SAFETY: between fork and exec the child only calls setns(2) on a
                // descriptor inherited from the parent, which stays open until exec.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
        }
        let child = cmd.spawn().unwrap();
        self.daemon = Some(child);
        wait_until("the daemon's socket", Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(self.socket()).ok()
        });
    }

    /// `kill -9` of the daemon.
    fn kill_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill().unwrap();
            d.wait().unwrap();
        }
    }

    /// `rustvisor <args> --connect SOCKET`: (exit code, stdout, stderr).
    fn rv(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_rustvisor"))
            .args(args)
            .arg("--connect")
            .arg(self.socket())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.rv(args);
        assert_eq!(code, 0, "{args:?}: {err}");
        out
    }

    /// Runs a command that must be refused as bad input: exit 2, one line naming `field`.
    fn bad_input(&self, args: &[&str], field: &str) {
        let (code, out, err) = self.rv(args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err:?}");
        assert!(err.starts_with("rustvisor: ") && err.contains(field), "{args:?}: {err}");
    }

    fn list(&self) -> Vec<VmSummary> {
        serde_json::from_str::<VmList>(&self.ok(&["vm", "list", "--json"])).unwrap().vms
    }

    fn vm(&self, name: &str) -> VmSummary {
        self.list().into_iter().find(|v| v.name == name).unwrap_or_else(|| panic!("no VM {name}"))
    }

    fn events(&self, vm: &str) -> Vec<Event> {
        serde_json::from_str::<EventList>(&self.ok(&["events", "--json", "--vm", vm])).unwrap().events
    }

    fn console(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path("state").join("vms").join(name).join("console.log")).unwrap_or_default()
    }

    /// Creates a VM running the guest script `script`.
    fn create(&self, name: &str, script: &str, restart: &str) {
        self.create_with(name, script, restart, &[]);
    }

    /// Creates a VM running the guest script `script`, with more `vm create` flags.
    fn create_with(&self, name: &str, script: &str, restart: &str, more: &[&str]) {
        self.create_sized(name, script, restart, "512M", more);
    }

    /// Creates a VM of `memory` running the guest script `script`, with more flags.
    fn create_sized(&self, name: &str, script: &str, restart: &str, memory: &str, more: &[&str]) {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(script);
        let cmdline = format!("console=ttyS0 panic=-1 rv.cmd={b64}");
        let (kernel, initrd) = (guest_file("vmlinuz"), guest_file("initrd.img"));
        let out = self.ok(&[
            "vm",
            "create",
            name,
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "--memory",
            memory,
            "--cpus",
            "1",
            "--accel",
            "emu",
            "--restart",
            restart,
        ]
        .into_iter()
        .chain(more.iter().copied())
        .collect::<Vec<_>>());
        assert_eq!(out, format!("VM '{name}' defined (restart {restart})\n"));
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.kill_daemon();
        // Every VMM whose socket is in our run folder.
        let needle = self.run_dir().display().to_string();
        for pid in vmm_pids(&needle) {
            // SAFETY: kill(2) only sends a signal to a process of this test's.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // And the dnsmasqs of its networks (daemons of their own, with their files in our
        // run folder), left when a test fails before deleting its networks.
        for pid in pids_naming(&needle, "dnsmasq") {
            // SAFETY: kill(2) only sends a signal to a process of this test's.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        remove_cgroups(&self.cgroup_parent);
    }
}

/// Processes running `program` whose command line contains `needle`.
fn pids_naming(needle: &str, program: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        let exe = cmd.split('\0').next().unwrap_or("");
        if exe.rsplit('/').next() == Some(program) && cmd.contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// A `rustvisor vm console NAME` client with its input, output and messages piped.
struct Console {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    /// The threads copying its stdout and stderr (they end at the pipes' EOF).
    pumps: Vec<std::thread::JoinHandle<()>>,
}

impl Console {
    /// Attaches to `name` and waits for the client to say it is connected.
    fn attach(env: &Env, name: &str) -> Console {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rustvisor"))
            .args(["vm", "console", name, "--connect"])
            .arg(env.socket())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pump = |mut from: Box<dyn Read + Send>| {
            let buf = Arc::new(Mutex::new(Vec::new()));
            let b = buf.clone();
            let thread = std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = from.read(&mut chunk) {
                    b.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            });
            (buf, thread)
        };
        let (out, out_pump) = pump(Box::new(child.stdout.take().unwrap()));
        let (err, err_pump) = pump(Box::new(child.stderr.take().unwrap()));
        let c = Console { stdin: child.stdin.take(), child, out, err, pumps: vec![out_pump, err_pump] };
        c.wait_err(&format!("Connected to {name} (Ctrl-] detaches)"));
        c
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    fn messages(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    fn wait_err(&self, want: &str) {
        wait_until(&format!("{want:?} from the console client"), Duration::from_secs(30), || {
            self.messages().contains(want).then_some(())
        });
    }

    fn wait_out(&self, want: &str, timeout: Duration) {
        let end = Instant::now() + timeout;
        while !self.text().contains(want) {
            assert!(Instant::now() < end, "no {want:?} on the console: {:?}", tail(&self.text()));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn type_text(&mut self, text: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(text).unwrap();
        stdin.flush().unwrap();
    }

    /// Types `cmd` (and Enter) until the output shows `want`: the shell may not be reading
    /// yet, so it is typed again every 15 s.
    fn run(&mut self, cmd: &str, want: &str) {
        let end = Instant::now() + BOOT;
        loop {
            self.type_text(format!("{cmd}\r").as_bytes());
            let again = Instant::now() + Duration::from_secs(15);
            while Instant::now() < again {
                if self.text().contains(want) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(Instant::now() < end, "no {want:?} after typing {cmd:?}: {:?}", tail(&self.text()));
        }
    }

    /// Ctrl-]: the client must exit 0 saying the VM keeps running.
    fn detach(mut self) {
        self.type_text(&[0x1d]);
        let status = self.wait_exit();
        assert_eq!(status, Some(0), "{}", self.messages());
        assert!(self.messages().contains("the VM keeps running"), "{}", self.messages());
    }

    /// Waits for the client to exit and for its last output to be read (what it wrote just
    /// before exiting may still be in the pipes when it is reaped).
    fn wait_exit(&mut self) -> Option<i32> {
        let st = wait_until("the console client to exit", Duration::from_secs(30), || self.child.try_wait().unwrap());
        for pump in self.pumps.drain(..) {
            pump.join().unwrap();
        }
        st.code()
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// VMM processes (`rustvisor vmm --api-socket PATH`) whose socket path contains `needle`.
fn vmm_pids(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("\0vmm\0--api-socket\0") && cmd.contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// A field of `/proc/<pid>/status` (its first value).
fn status_field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("no {key}"));
    line.split_whitespace().next().unwrap_or("").to_string()
}

/// Checks that VMM `pid` of VM `vm` is jailed: an unprivileged uid, no capabilities,
/// no_new_privs, PID 1 of namespaces of its own, a root holding only what it was given.
fn assert_jailed(pid: u32, vm: &str) {
    let uid: u32 = status_field(pid, "Uid:").parse().unwrap();
    assert!(uid >= 2_100_000_000, "VMM of {vm} runs as uid {uid}");
    assert_eq!(status_field(pid, "Gid:"), uid.to_string());
    for cap in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(status_field(pid, cap), "0000000000000000", "{cap} of {vm}'s VMM");
    }
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:")).unwrap();
    assert_eq!(nspid.split_whitespace().collect::<Vec<_>>(), [pid.to_string().as_str(), "1"], "PID 1 inside");
    for ns in ["mnt", "pid", "ipc", "uts", "net"] {
        let mine = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let its = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(mine, its, "{vm}'s VMM shares the {ns} namespace (no NICs: its own network namespace)");
    }
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    let mut top: Vec<String> =
        std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    top.sort();
    for absent in ["home", "root", "var", "boot", "sys"] {
        assert!(!top.iter().any(|t| t == absent), "/{absent} is in {vm}'s jail: {top:?}");
    }
    assert!(!root.join("etc/passwd").exists(), "{vm}'s jail has /etc/passwd");
    assert!(!root.join("dev/kvm").exists(), "an emu VM's jail has no /dev/kvm");
    assert!(root.join("dev/null").exists());
}

fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| !s[i + 1..].trim_start().starts_with('Z')))
        .unwrap_or(false)
}

fn kill9(pid: u32) {
    // SAFETY: kill(2) only sends a signal to a process of this test's.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

#[test]
fn bad_input_is_refused_and_leaves_the_store_unchanged() {
    let env = Env::new("mgr-bad");
    assert_eq!(std::fs::metadata(env.socket()).unwrap().mode() & 0o777, 0o660, "socket mode");
    let kernel = guest_file("vmlinuz").display().to_string();
    env.ok(&["vm", "create", "ok-1", "--kernel", &kernel, "--accel", "emu"]);
    let (list, events) = (env.ok(&["vm", "list", "--json"]), env.ok(&["events", "--json"]));

    env.bad_input(&["vm", "start", "nope"], "no VM named 'nope'");
    env.bad_input(&["vm", "info", "nope"], "no VM named 'nope'");
    env.bad_input(&["vm", "delete", "nope"], "no VM named 'nope'");
    env.bad_input(&["vm", "create", "Bad/Name", "--kernel", &kernel], "name: ");
    env.bad_input(&["vm", "create", "x", "--kernel", &kernel, "--cpus", "0"], "config.cpus");
    env.bad_input(&["vm", "create", "ok-1", "--kernel", &kernel], "name: a VM named 'ok-1' already exists");
    env.bad_input(
        &["vm", "create", "m", "--kernel", &kernel, "--memory", "1M"],
        "config.memory_mib: 1 MiB is out of range (accepted: ",
    );
    env.bad_input(&["vm", "create", "m", "--kernel", &kernel, "--memory", "lots"], "--memory");
    env.bad_input(&["vm", "create", "d", "--kernel", &kernel, "--disk", "path=/nonexistent/disk.raw"], "config.disks");
    env.bad_input(&["vm", "create", "r", "--kernel", &kernel, "--restart", "sometimes"], "no, on-failure, always");
    env.bad_input(&["vm", "create", "k", "--kernel", "/nonexistent/vmlinuz"], "config.kernel");
    let spec = env.dir.path("spec.json");
    std::fs::write(&spec, format!(r#"{{"kernel": "{kernel}", "memory_mib": 256, "bogus": 1}}"#)).unwrap();
    env.bad_input(&["vm", "create", "s", "--from-file", spec.to_str().unwrap()], "config.bogus");
    std::fs::write(&spec, r#"{"kernel": "relative/vmlinuz"}"#).unwrap();
    env.bad_input(&["vm", "create", "s", "--from-file", spec.to_str().unwrap()], "config.kernel");
    env.bad_input(&["vm", "stop", "ok-1", "--timeout", "0"], "timeout_s");

    env.bad_input(&["vm", "console", "nope"], "no VM named 'nope'");
    env.bad_input(&["vm", "console", "Bad/Name"], "name: ");

    // Refused in its state, not bad input: exit 1.
    let (code, _, err) = env.rv(&["vm", "stop", "ok-1"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is stopped: not running"), "{err}");
    let (code, _, err) = env.rv(&["vm", "console", "ok-1"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err, "rustvisor: VM 'ok-1' is stopped: no console: the VM is not running (start it first)\n");

    assert_eq!(env.ok(&["vm", "list", "--json"]), list, "the VM list changed");
    assert_eq!(env.ok(&["events", "--json"]), events, "the event log changed");
    let spec_ok = env.dir.path("ok.json");
    std::fs::write(&spec_ok, format!(r#"{{"kernel": "{kernel}", "memory_mib": 256}}"#)).unwrap();
    env.ok(&["vm", "create", "from-file", "--from-file", spec_ok.to_str().unwrap()]);
    assert_eq!(env.vm("from-file").memory_mib, 256);
    env.ok(&["vm", "delete", "ok-1"]);
    assert_eq!(env.list().len(), 1);
    let table = env.ok(&["vm", "list"]);
    assert!(
        table.starts_with("NAME       STATE    CPUS  MEMORY  UPTIME  ACCEL  PID\nfrom-file  stopped  1"),
        "{table}"
    );

    // Without a daemon: exit 1 with a hint.
    let mut env = env;
    env.kill_daemon();
    let (code, _, err) = env.rv(&["vm", "list"]);
    assert_eq!(code, 1);
    assert!(err.contains("is `rustvisor daemon` running?"), "{err}");
}

const LOOP: &str = "while true; do sleep 1; done";

#[test]
fn vms_are_supervised_restarted_and_outlive_the_daemon() {
    let t0 = Instant::now();
    let mut env = Env::with_args("mgr-life", &["--restart-reset-after", "20"]);
    // a's guest reads commands from its console (a shell, started again if it ends).
    env.create("a", "echo VM-A-HERE; while true; do sh; done", "on-failure");
    env.create("b", &format!("echo VM-B-HERE; {LOOP}"), "no");
    // c's script ends at once: the guest's init then powers off.
    env.create("c", "echo VM-C-HERE", "on-failure");
    // d's guest crashes its kernel; panic=-1 resets it: a failure, with restart no.
    env.create("d", "echo VM-D-HERE; echo c > /proc/sysrq-trigger", "no");

    // Start all three at once, and `a` twice: one of the two gets a 409.
    let results: Vec<(String, (i32, String, String))> = std::thread::scope(|s| {
        let handles: Vec<_> = ["a", "a", "b", "c", "d"]
            .into_iter()
            .map(|n| {
                let env = &env;
                s.spawn(move || (n.to_string(), env.rv(&["vm", "start", n])))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let a: Vec<_> = results.iter().filter(|(n, _)| n == "a").map(|(_, r)| r).collect();
    let (ok, refused): (Vec<&(i32, String, String)>, Vec<_>) = a.iter().copied().partition(|r| r.0 == 0);
    assert_eq!((ok.len(), refused.len()), (1, 1), "{a:?}");
    let refusal = &refused[0];
    assert_eq!(refusal.0, 1, "{refusal:?}");
    assert!(
        refusal.2.contains("start is in progress") || refusal.2.contains("already started"),
        "the refusal names the operation or state: {refusal:?}"
    );
    for (n, r) in &results {
        if n != "a" {
            assert_eq!(r.0, 0, "start {n}: {r:?}");
        }
    }
    let listed = env.list();
    for n in ["a", "b"] {
        let v = listed.iter().find(|v| v.name == n).unwrap();
        assert_eq!(v.state, VmState::Running, "{v:?}");
        assert!(alive(v.pid.unwrap()), "{v:?}");
        assert_eq!(v.accel, "emu");
    }
    let table = env.ok(&["vm", "list"]);
    assert!(table.lines().any(|l| l.starts_with("a ") && l.contains("running") && l.contains("emu")), "{table}");
    // Every VMM runs in a jail of its own (the daemon's default).
    let pid_a = listed.iter().find(|v| v.name == "a").unwrap().pid.unwrap();
    let pid_b = listed.iter().find(|v| v.name == "b").unwrap().pid.unwrap();
    assert_jailed(pid_a, "a");
    assert_jailed(pid_b, "b");
    assert_ne!(status_field(pid_a, "Uid:"), status_field(pid_b, "Uid:"), "one uid per VM");

    // Each console shows its own guest.
    for (n, mark, other) in [("a", "VM-A-HERE", "VM-B-HERE"), ("b", "VM-B-HERE", "VM-A-HERE")] {
        let text = wait_until(&format!("{n}'s guest"), BOOT, || {
            let t = env.console(n);
            (t.contains("RUSTVISOR-INIT-OK") && t.contains(mark)).then_some(t)
        });
        assert!(!text.contains(other), "{n}'s console shows the other guest");
    }
    eprintln!("two guests up: {:.1} s", t0.elapsed().as_secs_f64());

    // Two consoles on a: the first attached types, both see the output; the second's input
    // is ignored (it is told so) until the first detaches.
    let nonce = std::process::id();
    let mut first = Console::attach(&env, "a");
    let mut second = Console::attach(&env, "a");
    for c in [&first, &second] {
        c.wait_out("VM-A-HERE", Duration::from_secs(30)); // the recent output, replayed
    }
    second.type_text(format!("echo ignored-$((6*7))-{nonce}\r").as_bytes());
    second.wait_out("read-only: another console has the keyboard", Duration::from_secs(30));
    first.run(&format!("echo hello-$((6*7))-{nonce}"), &format!("hello-42-{nonce}"));
    second.wait_out(&format!("hello-42-{nonce}"), Duration::from_secs(30));
    for c in [&first, &second] {
        assert!(!c.text().contains(&format!("ignored-42-{nonce}")), "the read-only console typed: {}", c.text());
    }
    let a_pid = env.vm("a").pid.unwrap();
    first.detach();
    second.wait_out("this console has the keyboard now", Duration::from_secs(30));
    second.run(&format!("echo second-$((6*7))-{nonce}"), &format!("second-42-{nonce}"));
    second.detach();
    let a = env.vm("a");
    assert_eq!((a.state, a.pid), (VmState::Running, Some(a_pid)), "the VM keeps running after detaching");
    assert_eq!(env.events("a").iter().filter(|e| e.kind == "console-attached").count(), 2);
    eprintln!("consoles: {:.1} s", t0.elapsed().as_secs_f64());

    // c's guest powered off: stopped, not restarted although on-failure.
    let c = wait_until("c to power off", BOOT, || Some(env.vm("c")).filter(|v| v.state == VmState::Stopped));
    assert!(env.console("c").contains("VM-C-HERE"));
    assert_eq!(c.reason.as_deref(), Some("the guest powered off"), "{c:?}");
    assert_eq!(c.restarts, 0);
    assert!(env.events("c").iter().any(|e| e.kind == "stopped" && e.detail == "the guest powered off"));
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        let c = env.vm("c");
        assert_eq!((c.state, c.restarts), (VmState::Stopped, 0), "a powered-off guest is not restarted");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!std::fs::exists(env.run_dir().join("vms/c/api.sock")).unwrap(), "c's socket is gone");

    // d's guest crashed: crashed (not stopped), with the VMM's reason, not restarted.
    let d = wait_until("d to be crashed", BOOT, || Some(env.vm("d")).filter(|v| v.state == VmState::Crashed));
    assert!(env.console("d").contains("VM-D-HERE"));
    assert!(d.reason.as_deref().is_some_and(|r| r.starts_with("the guest reset")), "{d:?}");
    assert_eq!(d.restarts, 0);

    // kill -9 of b's VMM (restart no): crashed with the reason.
    let b_pid = env.vm("b").pid.unwrap();
    kill9(b_pid);
    let b = wait_until("b to be crashed", Duration::from_secs(30), || {
        Some(env.vm("b")).filter(|v| v.state == VmState::Crashed)
    });
    let reason = b.reason.unwrap_or_default();
    assert!(reason.contains(&format!("pid {b_pid}")) && reason.contains("signal 9"), "{reason}");
    assert_eq!((b.pid, b.restarts), (None, 0));
    assert!(env.events("b").iter().any(|e| e.kind == "crashed" && e.detail.contains("signal 9")));

    // Pause and resume a.
    env.ok(&["vm", "pause", "a"]);
    assert_eq!(env.vm("a").state, VmState::Paused);
    let (code, _, err) = env.rv(&["vm", "pause", "a"]);
    assert_eq!(code, 1, "pause twice: {err}");
    env.ok(&["vm", "resume", "a"]);
    assert_eq!(env.vm("a").state, VmState::Running);

    // kill -9 of the daemon: the VMM lives on and the next daemon adopts it.
    let a_pid = env.vm("a").pid.unwrap();
    env.kill_daemon();
    assert!(alive(a_pid), "the VMM died with the daemon");
    env.start_daemon();
    let a = env.vm("a");
    assert_eq!((a.state, a.pid), (VmState::Running, Some(a_pid)), "{a:?}");
    assert!(env.events("a").iter().any(|e| e.kind == "adopted" && e.detail == format!("pid {a_pid}")));
    assert_eq!(env.vm("b").state, VmState::Crashed, "b stays crashed");

    // The adopted VM's console works through the new daemon; a console attached when its VMM
    // dies ends, saying so.
    let mut console = Console::attach(&env, "a");
    console.run(&format!("echo adopted-$((6*7))-{nonce}"), &format!("adopted-42-{nonce}"));

    // kill -9 of a's (adopted) VMM with on-failure: restarted once.
    kill9(a_pid);
    assert_eq!(console.wait_exit(), Some(0), "{}", console.messages());
    assert!(console.messages().contains("The console of a closed"), "{}", console.messages());
    drop(console);
    let a = wait_until("a to be restarted", Duration::from_secs(60), || {
        Some(env.vm("a")).filter(|v| v.state == VmState::Running && v.pid != Some(a_pid))
    });
    assert_eq!(a.restarts, 1, "{a:?}");
    let ev = env.events("a");
    let crashed = ev.iter().position(|e| e.kind == "crashed" && e.detail.contains(&format!("pid {a_pid}"))).unwrap();
    let restarted = ev.iter().position(|e| e.kind == "restarted").unwrap();
    assert!(crashed < restarted, "{ev:?}");
    assert_eq!(ev[restarted].peer_uid, None, "the daemon's own action");
    wait_until("a's guest after the restart", BOOT, || env.console("a").contains("VM-A-HERE").then_some(()));
    eprintln!("restarted guest up: {:.1} s", t0.elapsed().as_secs_f64());
    // After 20 s of running (--restart-reset-after 20) the count goes back to 0.
    wait_until("a's restart count to be reset", Duration::from_secs(90), || (env.vm("a").restarts == 0).then_some(()));
    assert!(env.events("a").iter().any(|e| e.kind == "restarts-reset" && e.detail.starts_with("1 restarts forgotten")));

    // Stop a gracefully; delete b and c.
    let a_pid = a.pid.unwrap();
    let out = env.ok(&["vm", "stop", "a", "--timeout", "20"]);
    assert!(out.starts_with("VM 'a' stopped"), "{out}");
    let a = env.vm("a");
    assert_eq!((a.state, a.pid), (VmState::Stopped, None));
    assert!(!alive(a_pid), "a's VMM still runs");
    assert!(!std::fs::exists(env.run_dir().join("vms/a/api.sock")).unwrap());
    let stopped = env.events("a").into_iter().last().unwrap();
    assert_eq!(stopped.kind, "stopped");
    assert!(stopped.peer_uid.is_some() && stopped.peer_pid.is_some(), "{stopped:?}");
    env.ok(&["vm", "delete", "b"]);
    env.ok(&["vm", "delete", "c"]);
    env.ok(&["vm", "delete", "d"]);
    assert_eq!(env.list().iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["a"]);
    assert!(vmm_pids(&env.run_dir().display().to_string()).is_empty(), "a VMM is left");
    eprintln!("manager end to end: {:.1} s", t0.elapsed().as_secs_f64());
}

/// A raw disk of `mib` MiB of zeros.
fn zero_disk(path: &std::path::Path, mib: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
}

fn disk_head(path: &std::path::Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    String::from_utf8_lossy(&bytes[..16]).into_owned()
}

#[test]
fn snapshots_revert_disk_and_ram_and_vms_autostart_in_order() {
    let t0 = Instant::now();
    let mut env = Env::new("mgr-snap");
    let disk = env.dir.path("s.raw");
    zero_disk(&disk, 8);
    let disk_flag = format!("path={},format=raw", disk.display());
    // The guest writes OLD, sleeps, then writes NEW: a snapshot taken during the sleep and
    // reverted to after NEW must show OLD on the disk and a guest that writes NEW again.
    let script = "echo SNAP-GUEST-UP; echo OLD-DATA | dd of=/dev/vda conv=fsync 2>/dev/null; echo WROTE-OLD; \
                  sleep 25; echo NEW-DATA | dd of=/dev/vda conv=fsync 2>/dev/null; echo WROTE-NEW; \
                  while true; do sleep 1; done";
    env.create_with(
        "s",
        script,
        "no",
        &["--disk", &disk_flag, "--autostart", "--start-order", "1", "--start-delay", "3", "--balloon"],
    );
    // "late" autostarts after s (order 2) and fails: its kernel is not a kernel.
    let not_a_kernel = guest_file("initrd.img");
    env.ok(&["vm", "create", "late", "--kernel", not_a_kernel.to_str().unwrap(), "--accel", "emu", "--autostart"]);
    env.ok(&["vm", "set", "late", "--start-order", "2"]);
    env.bad_input(&["vm", "set", "late", "--start-delay", "601"], "start_delay_s");

    // The host "reboots": a new daemon with a fresh run folder autostarts s, then late.
    env.kill_daemon();
    std::fs::remove_file(env.run_dir().join("autostart.done")).unwrap();
    env.start_daemon();
    wait_until("s to be running", BOOT, || (env.vm("s").state == VmState::Running).then_some(()));
    let s_auto = env.events("s").into_iter().find(|e| e.kind == "autostarted").expect("s autostarted");
    let late = wait_until("late to be autostarted", Duration::from_secs(60), || {
        let ev = env.events("late");
        ev.iter().any(|e| e.kind == "start-failed").then_some(ev)
    });
    let late_auto = late.iter().find(|e| e.kind == "autostarted").unwrap();
    assert!(late_auto.time_ms >= s_auto.time_ms + 3000, "late waited s's 3 s delay: {s_auto:?} {late_auto:?}");
    assert_eq!(env.vm("late").state, VmState::Stopped);

    wait_until("s's guest to write OLD", BOOT, || env.console("s").contains("WROTE-OLD").then_some(()));
    // The balloon is set on the running VM through the daemon.
    env.ok(&["vm", "set", "s", "--balloon", "64M"]);
    let info: serde_json::Value = serde_json::from_str(&env.ok(&["vm", "info", "s", "--json"])).unwrap();
    assert_eq!(info["balloon"]["target_mib"], 64, "{info}");
    env.ok(&["vm", "set", "s", "--balloon", "0"]);
    env.bad_input(&["vm", "set", "s", "--balloon", "4G"], "balloon_mib");
    assert_eq!(&disk_head(&disk)[..8], "OLD-DATA");
    let out = env.ok(&["vm", "snapshot", "s", "create", "before"]);
    assert!(out.contains("created (disks and RAM"), "{out}");
    assert_eq!(env.vm("s").state, VmState::Running, "resumed after the snapshot");
    let snaps: serde_json::Value = serde_json::from_str(&env.ok(&["vm", "snapshot", "s", "list", "--json"])).unwrap();
    assert_eq!(snaps["snapshots"][0]["name"], "before");
    assert_eq!(snaps["snapshots"][0]["memory"], true);
    env.bad_input(&["vm", "snapshot", "s", "revert", "nope"], "no snapshot named 'nope'");
    let (code, _, err) = env.rv(&["vm", "set", "s", "--memory", "1G"]);
    assert!(code == 1 && err.contains("only while it is stopped"), "{code} {err}");

    wait_until("s's guest to write NEW", Duration::from_secs(120), || {
        env.console("s").contains("WROTE-NEW").then_some(())
    });
    assert_eq!(&disk_head(&disk)[..8], "NEW-DATA");

    // Follow the events live while reverting.
    let mut follower = Command::new(env!("CARGO_BIN_EXE_rustvisor"))
        .args(["events", "--follow", "--json", "--vm", "s", "--connect"])
        .arg(env.socket())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = env.ok(&["vm", "snapshot", "s", "revert", "before"]);
    assert_eq!(out, "VM 's' reverted to snapshot 'before'\n");
    assert_eq!(&disk_head(&disk)[..8], "OLD-DATA", "the disk is as it was at the snapshot");
    let s = env.vm("s");
    assert_eq!(s.state, VmState::Running, "{s:?}");
    // The guest continues from the snapshot: it writes NEW again, without booting.
    wait_until("the reverted guest to write NEW again", Duration::from_secs(120), || {
        env.console("s").contains("WROTE-NEW").then_some(())
    });
    let console = env.console("s");
    assert!(!console.contains("SNAP-GUEST-UP"), "the guest rebooted instead of resuming: {console}");
    assert_eq!(&disk_head(&disk)[..8], "NEW-DATA");
    {
        use std::io::BufRead;
        let reader = std::io::BufReader::new(follower.stdout.take().unwrap());
        let mut kinds = Vec::new();
        for line in reader.lines() {
            let e: Event = serde_json::from_str(&line.unwrap()).unwrap();
            kinds.push(e.kind);
            if kinds.last().is_some_and(|k| k == "snapshot-reverted") {
                break;
            }
        }
        assert!(kinds.contains(&"snapshot-created".to_string()), "the history comes first: {kinds:?}");
    }
    let _ = follower.kill();
    let _ = follower.wait();

    env.ok(&["vm", "snapshot", "s", "delete", "before"]);
    assert!(env.ok(&["vm", "snapshot", "s", "list"]).lines().count() == 1, "only the header is left");
    env.ok(&["vm", "delete", "s", "--force"]);
    assert!(!env.dir.path("state/vms/s").exists(), "the VM's snapshots went with it");
    eprintln!("snapshot test: {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn a_daemon_killed_during_creates_leaves_only_whole_definitions() {
    let mut env = Env::new("mgr-kill-create");
    let kernel = guest_file("vmlinuz").display().to_string();
    let pid = env.daemon.as_ref().unwrap().id();
    let created = std::thread::scope(|s| {
        let creator = s.spawn(|| {
            let mut n = 0;
            loop {
                let (code, _, _) = env.rv(&["vm", "create", &format!("c{n}"), "--kernel", &kernel, "--accel", "emu"]);
                if code != 0 {
                    return n;
                }
                n += 1;
            }
        });
        // Let some creates through, then kill -9 the daemon in the middle of the loop.
        wait_until("a few creates", Duration::from_secs(60), || {
            std::fs::read_dir(env.dir.path("state").join("vms")).ok().map(|d| d.count()).filter(|n| *n >= 5)
        });
        kill9(pid);
        creator.join().unwrap()
    });
    env.kill_daemon();
    env.start_daemon();
    let vms = env.list();
    // Every create that answered is stored; the one in flight is stored whole or not at all.
    assert!(vms.len() == created || vms.len() == created + 1, "{} stored, {created} answered", vms.len());
    let defined = serde_json::from_str::<EventList>(&env.ok(&["events", "--json"]))
        .unwrap()
        .events
        .into_iter()
        .filter(|e| e.kind == "defined")
        .count();
    assert_eq!(defined, vms.len(), "one 'defined' event per stored VM");
    for v in &vms {
        let info: serde_json::Value = serde_json::from_str(&env.ok(&["vm", "info", &v.name, "--json"])).unwrap();
        assert_eq!(info["config"]["kernel"], kernel.as_str(), "{info}");
        assert_eq!(v.state, VmState::Stopped);
    }
    // The store takes new definitions after the crash.
    env.ok(&["vm", "create", "after", "--kernel", &kernel, "--accel", "emu"]);
}

/// The guest's DHCP client: busybox udhcpc with a script that puts the lease on eth0; like a
/// real guest it tries again (an emulated guest on a loaded host can miss a DHCP answer).
const DHCP: &str =
    "printf '#!/bin/sh\\n[ \"$1\" = bound ] || exit 0\\nip addr add $ip/$mask dev $interface\\n[ -n \"$router\" ] && ip route add default via $router\\nexit 0\\n' > /tmp/u.sh
chmod +x /tmp/u.sh; ip link set lo up; ip link set eth0 up
for try in 1 2 3; do udhcpc -i eth0 -s /tmp/u.sh -q -n -t 10 -T 3 && echo DHCP-OK && break; done";

/// A network namespace "outside" the daemon's, joined to it by a veth pair (the daemon's
/// side `DAEMON_SIDE`, the outside `SERVER`), with an HTTP server on `SERVER` that records
/// its clients' addresses.
struct Outside {
    name: String,
    peers: Arc<Mutex<Vec<String>>>,
}

impl Outside {
    const SERVER: &'static str = "192.0.2.1";
    const DAEMON_SIDE: &'static str = "192.0.2.2";

    fn new(env: &Env, port: u16) -> Outside {
        let pid = env.daemon.as_ref().unwrap().id();
        let name = format!("rvtest-out-{}", std::process::id());
        let dns = format!("--net=/proc/{pid}/ns/net");
        let run = |cmd: &mut Command| {
            let st = cmd.status().unwrap();
            assert!(st.success(), "{cmd:?}");
        };
        run(Command::new("ip").args(["netns", "add", &name]));
        // veth-d in the daemon's namespace, veth-o outside.
        run(Command::new("nsenter")
            .args([&dns, "ip", "link", "add", "veth-d", "type", "veth"])
            .args(["peer", "name", "veth-o", "netns", &name]));
        let side = format!("{}/24", Self::DAEMON_SIDE);
        run(Command::new("nsenter").args([&dns, "ip", "addr", "add", &side, "dev", "veth-d"]));
        run(Command::new("nsenter").args([&dns, "ip", "link", "set", "veth-d", "up"]));
        let server = format!("{}/24", Self::SERVER);
        run(Command::new("ip").args(["-n", &name, "addr", "add", &server, "dev", "veth-o"]));
        run(Command::new("ip").args(["-n", &name, "link", "set", "veth-o", "up"]));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let ns_file = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let seen = peers.clone();
        std::thread::spawn(move || {
            // SAFETY: setns only switches this thread's network namespace to the one the open
            // descriptor refers to.
            let r = unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            let l = std::net::TcpListener::bind((Outside::SERVER, port)).unwrap();
            tx.send(()).unwrap();
            for conn in l.incoming() {
                let Ok(mut c) = conn else { continue };
                if let Ok(a) = c.peer_addr() {
                    seen.lock().unwrap().push(a.ip().to_string());
                }
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf);
                let body = "hello-from-outside\n";
                let _ = write!(c, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            }
        });
        rx.recv().unwrap();
        Outside { name, peers }
    }

    fn peers(&self) -> Vec<String> {
        self.peers.lock().unwrap().clone()
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Whether this host can run the network test; else why not.
fn network_test_blocker() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (bridges, TAPs and nftables need CAP_NET_ADMIN)".into());
    }
    for tool in ["nft", "dnsmasq"] {
        let found = ["/usr/sbin", "/sbin", "/usr/bin"].iter().any(|d| std::path::Path::new(d).join(tool).exists());
        if !found {
            return Some(format!("{tool} is not installed (scripts/setup-guest.sh installs it)"));
        }
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    None
}

#[test]
fn vms_on_a_dhcp_network_reach_each_other_and_a_firewall_changes_live() {
    if let Some(why) = network_test_blocker() {
        eprintln!("skipped: {why}");
        return;
    }
    let t0 = Instant::now();
    let mut env = Env::in_netns("mgr-net");
    env.ok(&["net", "create", "lan0", "--subnet", "10.77.0.1/24", "--dhcp", "--nat"]);
    env.ok(&["net", "create", "iso", "--subnet", "10.78.0.1/24", "--dhcp", "--isolated"]);
    env.ok(&["firewall", "create", "web"]);
    // "Outside": another namespace behind the daemon's, through a veth pair, with a server.
    let outside = Outside::new(&env, 8080);
    // Bad input: exit 2, one line naming the field, nothing made.
    env.bad_input(&["net", "create", "lan1", "--subnet", "10.77.0.129/25"], "overlaps network lan0");
    env.bad_input(&["net", "create", "lan2", "--dhcp"], "dhcp: needs a subnet");
    env.bad_input(&["net", "create", "lan3", "--subnet", "10.78.0.1/24", "--nat", "--isolated"], "isolated");
    env.bad_input(&["firewall", "create", "bad", "--allow", "sideways tcp/80"], "rule 'allow sideways tcp/80'");
    let kernel = guest_file("vmlinuz").display().to_string();
    env.bad_input(&["vm", "create", "x", "--kernel", &kernel, "--nic", "net=nope"], "nics[0].net");
    env.bad_input(&["vm", "create", "x", "--kernel", &kernel, "--nic", "net=lan0,vlan=20"], "nics[0].vlan");
    let nets: serde_json::Value = serde_json::from_str(&env.ok(&["net", "list", "--json"])).unwrap();
    assert_eq!(nets["networks"].as_array().unwrap().len(), 2, "{nets}");

    let srv = format!(
        "{DHCP}; mkdir -p /www; echo hello-from-srv > /www/index.html; httpd -p 80 -h /www; echo SRV-READY; {LOOP}"
    );
    env.create_with("srv", &srv, "no", &["--nic", "net=lan0,firewall=web"]);
    env.create_with("cli", &format!("{DHCP}; echo CLI-READY; while true; do sh; done"), "no", &["--nic", "net=lan0"]);
    // On the isolated network: a lease, but no way to the host.
    let iso =
        format!("{DHCP}; ping -c 2 -W 2 10.78.0.1 >/dev/null && echo HOST-REACHED || echo HOST-UNREACHABLE; {LOOP}");
    env.create_with("iso", &iso, "no", &["--nic", "net=iso"]);
    env.ok(&["vm", "start", "srv"]);
    env.ok(&["vm", "start", "cli"]);
    env.ok(&["vm", "start", "iso"]);
    wait_until("srv's guest to serve", BOOT, || env.console("srv").contains("SRV-READY").then_some(()));
    wait_until("cli's guest to get a lease", BOOT, || env.console("cli").contains("CLI-READY").then_some(()));
    for vm in ["srv", "cli"] {
        let events: Vec<String> = env.events(vm).iter().map(|e| format!("{} {}", e.kind, e.detail)).collect();
        let console = env.console(vm);
        assert!(console.contains("DHCP-OK"), "{vm} got no lease: {}\nevents: {events:#?}", tail(&console));
    }

    // vm info shows the leased addresses (from dnsmasq's leases).
    let ip_of = |vm: &str| {
        wait_until(&format!("{vm}'s lease in vm info"), Duration::from_secs(30), || {
            let info: serde_json::Value = serde_json::from_str(&env.ok(&["vm", "info", vm, "--json"])).unwrap();
            info["nics"][0]["ip"].as_str().map(str::to_string)
        })
    };
    let (srv_ip, cli_ip) = (ip_of("srv"), ip_of("cli"));
    assert!(srv_ip.starts_with("10.77.0.") && cli_ip.starts_with("10.77.0.") && srv_ip != cli_ip, "{srv_ip} {cli_ip}");
    let info: serde_json::Value = serde_json::from_str(&env.ok(&["net", "info", "lan0", "--json"])).unwrap();
    assert_eq!(info["leases"].as_array().unwrap().len(), 2, "{info}");
    assert_eq!(info["problems"], serde_json::json!([]), "{info}");
    assert_eq!(env.ok(&["net", "check"]), "no problems found\n");

    // cli pings srv and fetches its page. (`timeout 10 wget`, not `wget -T`: Debian's busybox
    // is built without FEATURE_WGET_TIMEOUT and writes through a NULL pointer on `-T`, on any
    // CPU.)
    let mut c = Console::attach(&env, "cli");
    c.run(&format!("ping -c 1 -W 3 {srv_ip} >/dev/null && echo PING-OK-$((2+2))"), "PING-OK-4");
    c.run(&format!("timeout 10 wget -q -O - http://{srv_ip}/ && echo FETCH-OK-$((1+1))"), "FETCH-OK-2");
    assert!(c.text().contains("hello-from-srv"), "{}", tail(&c.text()));

    // The firewall drops tcp/80 to srv: the fetch fails, ping still works; then it is lifted.
    env.ok(&["firewall", "set", "web", "--deny", "in tcp/80"]);
    let before = c.text().len();
    c.type_text(format!("timeout 10 wget -q -O - http://{srv_ip}/ || echo FETCH-FAILED-$((3+3))\r").as_bytes());
    c.wait_out("FETCH-FAILED-6", Duration::from_secs(60));
    assert!(!c.text()[before..].contains("hello-from-srv"), "the page came through the firewall");
    c.run(&format!("ping -c 1 -W 3 {srv_ip} >/dev/null && echo PING2-OK-$((4+4))"), "PING2-OK-8");
    env.ok(&["firewall", "set", "web"]);
    c.run(&format!("timeout 10 wget -q -O - http://{srv_ip}/ && echo FETCH2-OK-$((5+5))"), "FETCH2-OK-10");
    // NAT: cli reaches the server outside through the host, masqueraded.
    c.run(&format!("timeout 10 wget -q -O - http://{}:8080/ && echo OUT-OK-$((6+6))", Outside::SERVER), "OUT-OK-12");
    assert!(c.text().contains("hello-from-outside"), "{}", tail(&c.text()));
    let peers = outside.peers();
    assert!(!peers.is_empty() && peers.iter().all(|p| p == Outside::DAEMON_SIDE), "masqueraded: {peers:?}");
    wait_until("iso's ping to the host", BOOT, || {
        let t = env.console("iso");
        (t.contains("HOST-REACHED") || t.contains("HOST-UNREACHABLE")).then_some(())
    });
    let t = env.console("iso");
    assert!(t.contains("DHCP-OK") && t.contains("HOST-UNREACHABLE"), "{}", tail(&t));
    env.ok(&["vm", "delete", "iso", "--force"]);
    drop(c);

    // A dnsmasq that dies is restarted by the daemon (with an event).
    let dnsmasq_pid: i32 =
        std::fs::read_to_string(env.run_dir().join("networks/lan0.dnsmasq.pid")).unwrap().trim().parse().unwrap();
    // SAFETY: kill(2) only sends a signal to the test's own dnsmasq.
    unsafe { libc::kill(dnsmasq_pid, libc::SIGKILL) };
    wait_until("the network to be repaired", Duration::from_secs(30), || {
        let ev: EventList = serde_json::from_str(&env.ok(&["events", "--json"])).unwrap();
        ev.events.iter().any(|e| e.kind == "network-repaired" && e.detail.starts_with("lan0")).then_some(())
    });
    assert_eq!(env.ok(&["net", "check"]), "no problems found\n");
    // A "host reboot" of the network side: the daemon dies, the bridge goes; the next daemon
    // makes it again and puts the running VMs' TAPs back on it.
    env.kill_daemon();
    let pid = std::fs::read_to_string(env.run_dir().join("networks/lan0.dnsmasq.pid")).unwrap();
    let ns = format!("--net=/proc/{}/ns/net", pid.trim());
    let st = Command::new("nsenter").args([ns.as_str(), "ip", "link", "del", "rv-lan0"]).status().unwrap();
    assert!(st.success());
    env.start_daemon();
    assert_eq!(env.ok(&["net", "check"]), "no problems found\n", "the bridge and TAPs are back");
    let mut c = Console::attach(&env, "cli");
    c.run(&format!("ping -c 1 -W 3 {srv_ip} >/dev/null && echo PING3-OK-$((7+7))"), "PING3-OK-14");
    drop(c);

    // In use: the network and the group cannot go; after the VMs, they can.
    env.bad_input(&["net", "delete", "lan0"], "used by VM(s) cli, srv");
    let (code, _, err) = env.rv(&["firewall", "delete", "web"]);
    assert!(code == 2 && err.contains("used by VM(s) srv"), "{code} {err}");
    env.ok(&["vm", "delete", "srv", "--force"]);
    env.ok(&["vm", "delete", "cli", "--force"]);
    env.ok(&["firewall", "delete", "web"]);
    env.ok(&["net", "delete", "lan0"]);
    env.ok(&["net", "delete", "iso"]);
    assert_eq!(env.ok(&["net", "list"]).lines().count(), 1, "only the header is left");
    drop(outside);
    eprintln!("network test: {:.1} s", t0.elapsed().as_secs_f64());
}

/// The kernel command line that runs `script` in the test guest.
fn script_cmdline(script: &str) -> String {
    use base64::Engine;
    format!("console=ttyS0 panic=-1 rv.cmd={}", base64::engine::general_purpose::STANDARD.encode(script))
}

fn file_head(path: &std::path::Path, n: usize) -> String {
    let bytes = std::fs::read(path).unwrap();
    String::from_utf8_lossy(&bytes[..n]).into_owned()
}

#[test]
fn a_running_vms_backup_restores_and_a_linked_clone_of_a_template_boots() {
    let t0 = Instant::now();
    let env = Env::new("mgr-store");
    let pool = env.dir.path("pool");
    env.ok(&["pool", "create", "p", "--path", pool.to_str().unwrap()]);
    env.ok(&["volume", "create", "p/base", "--size", "16M", "--format", "raw"]);
    let base = pool.join("base.raw");
    // The guest writes BEFORE, then, well after the backup, AFTER (its "file deleted").
    let script = "echo BEFORE-DATA | dd of=/dev/vda conv=fsync 2>/dev/null; echo DISK-READY; sleep 20; \
                  echo AFTER--DATA | dd of=/dev/vda conv=fsync 2>/dev/null; echo AFTER-WRITTEN; \
                  while true; do sleep 1; done";
    env.create_with("src", script, "no", &["--disk", "vol=p/base"]);
    env.ok(&["vm", "start", "src"]);
    wait_until("src's guest to write its disk", BOOT, || env.console("src").contains("DISK-READY").then_some(()));
    let out = env.ok(&["backup", "create", "src"]);
    let id = out.split_whitespace().nth(1).unwrap().to_string();
    assert!(out.starts_with(&format!("backup {id} of VM 'src'")), "{out}");
    let events = env.events("src");
    assert!(events.iter().any(|e| e.kind == "backup-started" && e.detail.contains("guest paused")), "{events:?}");
    wait_until("src's guest to overwrite its disk", Duration::from_secs(120), || {
        env.console("src").contains("AFTER-WRITTEN").then_some(())
    });
    assert_eq!(file_head(&base, 11), "AFTER--DATA");

    // Restored as a new VM: a new volume with the data as of the backup, and the VM boots
    // and reads it.
    env.ok(&["backup", "restore", &id, "--as", "back", "--pool", "p"]);
    assert_eq!(file_head(&pool.join("back-disk0.raw"), 11), "BEFORE-DATA");
    let read = script_cmdline("echo \"DISK=$(head -c 11 /dev/vda)\"; echo READ-DONE; while true; do sleep 1; done");
    env.ok(&["vm", "set", "back", "--cmdline", &read]);

    // src becomes a template; a linked clone boots and writes without touching it.
    env.ok(&["vm", "kill", "src"]);
    env.ok(&["vm", "template", "src"]);
    let template_before = std::fs::read(&base).unwrap();
    env.ok(&["vm", "clone", "src", "c1", "--linked"]);
    let write = script_cmdline(
        "echo \"DISK=$(head -c 11 /dev/vda)\"; echo CLONE-DATA! | dd of=/dev/vda conv=fsync 2>/dev/null; \
         echo CLONE-OK; while true; do sleep 1; done",
    );
    env.ok(&["vm", "set", "c1", "--cmdline", &write]);
    let (code, _, err) = env.rv(&["vm", "start", "src"]);
    assert!(code == 1 && err.contains("is a template"), "{code} {err}");
    env.ok(&["vm", "start", "back"]);
    env.ok(&["vm", "start", "c1"]);
    wait_until("the restored VM to read its disk", BOOT, || env.console("back").contains("READ-DONE").then_some(()));
    assert!(env.console("back").contains("DISK=BEFORE-DATA"), "{}", tail(&env.console("back")));
    wait_until("the clone to write its disk", BOOT, || env.console("c1").contains("CLONE-OK").then_some(()));
    assert!(env.console("c1").contains("DISK=AFTER--DATA"), "the clone sees the template's data");
    assert_eq!(std::fs::read(&base).unwrap(), template_before, "the template's volume is unchanged");
    let vols = env.ok(&["volume", "list", "p"]);
    assert!(vols.lines().any(|l| l.starts_with("c1-disk0") && l.contains("qcow2") && l.contains(" base ")), "{vols}");
    // The template cannot go while the clone's volume is built on it.
    let (code, _, err) = env.rv(&["vm", "delete", "src"]);
    assert!(code == 1 && err.contains("c1"), "{code} {err}");
    env.ok(&["vm", "delete", "c1", "--force"]);
    env.ok(&["vm", "delete", "back", "--force"]);
    eprintln!("storage test: {:.1} s", t0.elapsed().as_secs_f64());
}

/// `vm info NAME --json`.
fn info_json(env: &Env, name: &str) -> serde_json::Value {
    serde_json::from_str(&env.ok(&["vm", "info", name, "--json"])).unwrap()
}

/// The daemon's cgroups, or why it has none (then the test is skipped).
fn cgroups_of(env: &Env) -> Result<String, String> {
    let cap: serde_json::Value = serde_json::from_str(&env.ok(&["capacity", "--json"])).unwrap();
    let cg = cap["host"]["cgroups"].as_str().unwrap().to_string();
    if cg.starts_with("none") {
        Err(cg)
    } else {
        Ok(cg)
    }
}

/// utime + stime of process `pid`, seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
    (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) as f64 / 100.0
}

/// The CPU thread `tid` of `pid` last ran on (`stat` field 39).
fn last_cpu(pid: u32, tid: u64) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].split_whitespace().nth(36)?.parse().ok()
}

/// `GET /metrics` from the daemon, parsed as Prometheus would.
fn scrape(env: &Env) -> prometheus_parse::Scrape {
    let mut s = std::os::unix::net::UnixStream::connect(env.socket()).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// The value of sample `name` whose labels include `want`.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    scrape.samples.iter().find_map(|s| {
        let ok = s.metric == name && want.iter().all(|(k, v)| s.labels.get(k) == Some(*v));
        match (ok, &s.value) {
            (false, _) => None,
            // OpenMetrics types a counter without its `_total`: the parser sees it untyped.
            (
                true,
                prometheus_parse::Value::Counter(x)
                | prometheus_parse::Value::Gauge(x)
                | prometheus_parse::Value::Untyped(x),
            ) => Some(*x),
            (true, prometheus_parse::Value::Histogram(h)) => h.last().map(|b| b.count),
            (true, _) => None,
        }
    })
}

/// `nr_throttled` of the cgroup folder among `cgroup` (the VM's folders, ", "-joined) that
/// has the CPU controller.
fn nr_throttled(cgroup: &str) -> u64 {
    cgroup
        .split(", ")
        .map(std::path::Path::new)
        .find(|d| d.join("cpu.max").exists() || d.join("cpu.cfs_quota_us").exists())
        .and_then(|d| std::fs::read_to_string(d.join("cpu.stat")).ok())
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("nr_throttled ").and_then(|n| n.trim().parse().ok())))
        .expect("cpu.stat nr_throttled")
}

#[test]
fn vcpus_are_pinned_cpu_limits_hold_and_admission_counts_vcpus() {
    let env = Env::with_args("mgr-res", &["--cpu-overcommit", "1.0"]);
    let cgroups = match cgroups_of(&env) {
        Ok(c) => c,
        Err(why) => return eprintln!("skipped: the daemon has no cgroups here ({why})"),
    };
    eprintln!("cgroups: {cgroups}");
    let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if host_cpus < 2 {
        return eprintln!("skipped: pinning apart needs 2 host CPUs, this host has {host_cpus}");
    }
    let disk = env.dir.path("burn.raw");
    zero_disk(&disk, 8);
    let disk_flag = format!("path={},format=raw", disk.display());
    // The guest writes 64 blocks of 4 KiB to its disk, then burns CPU.
    let script = "dd if=/dev/zero of=/dev/vda bs=4096 count=64 oflag=direct 2>/dev/null; sync; echo BURN-UP; \
                  while :; do :; done";
    env.create_with(
        "burn",
        script,
        "no",
        &["--pin", "vcpu0=1", "--priority", "low", "--disk", &disk_flag, "--balloon"],
    );
    env.bad_input(&["vm", "set", "burn", "--pin", "vcpu1=0"], "resources.pin");
    env.bad_input(&["vm", "set", "burn", "--cpuset", "0-999"], "resources.cpuset");
    env.bad_input(&["vm", "set", "burn", "--cpu-weight", "0"], "resources.cpu_weight");
    env.bad_input(&["vm", "set", "burn", "--cpu-limit", "lots"], "--cpu-limit");
    env.ok(&["vm", "start", "burn"]);
    wait_until("the guest to burn", BOOT, || env.console("burn").contains("BURN-UP").then_some(()));

    // Placement: its cgroup, the OOM priority and the pinned vCPU thread.
    let info = info_json(&env, "burn");
    let pid = info["summary"]["pid"].as_u64().unwrap() as u32;
    let placement = &info["placement"];
    let cgroup = placement["cgroup"].as_str().expect("a cgroup").to_string();
    assert!(cgroup.contains("mgr-res"), "{cgroup}");
    assert_eq!(placement["oom_score_adj"], 1000, "priority low: {info}");
    let vcpu0 = &placement["vcpu_threads"][0];
    assert_eq!((vcpu0["vcpu"].as_u64(), vcpu0["affinity"].as_str()), (Some(0), Some("1")), "{info}");
    let tid = vcpu0["tid"].as_u64().unwrap();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(last_cpu(pid, tid), Some(1), "the pinned vCPU thread runs on CPU 1");
    }
    let text = env.ok(&["vm", "info", "burn"]);
    assert!(text.contains("pinned vcpu0=1") && text.contains(&format!("vcpu0: thread {tid} on CPUs 1")), "{text}");

    // Admission: 1 vCPU up + 2 more would be 3 on 2 CPUs at --cpu-overcommit 1.0.
    let (kernel, initrd) = (guest_file("vmlinuz"), guest_file("initrd.img"));
    let (k, i) = (kernel.to_str().unwrap(), initrd.to_str().unwrap());
    env.ok(&["vm", "create", "big", "--kernel", k, "--initrd", i, "--cpus", "2", "--accel", "emu"]);
    let (code, _, err) = env.rv(&["vm", "start", "big"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("would commit 3 vCPUs on 2 host CPUs") && err.contains("--cpu-overcommit 1"), "{err}");
    assert_eq!(env.vm("big").state, VmState::Stopped);
    let cap = env.ok(&["capacity", "--cpus", "1", "--memory", "512M"]);
    assert!(cap.contains("1 more VMs of 1 vCPU, 512 MiB fit; cpu runs out first"), "{cap}");

    // A CPU limit set live holds the burning guest to half a CPU.
    let rate = |secs: u64| {
        let (c0, t0) = (cpu_seconds(pid), Instant::now());
        std::thread::sleep(Duration::from_secs(secs));
        (cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64()
    };
    let before = rate(3);
    env.ok(&["vm", "set", "burn", "--cpu-limit", "0.5"]);
    std::thread::sleep(Duration::from_millis(500));
    let throttled0 = nr_throttled(&cgroup);
    let limited = rate(6);
    let throttled = nr_throttled(&cgroup) - throttled0;
    eprintln!(
        "burning guest: {before:.2} CPUs before, {limited:.2} with --cpu-limit 0.5 ({throttled} periods throttled)"
    );
    assert!(limited <= 0.6, "{limited:.2} CPUs under a 0.5 limit");
    if before >= 0.75 {
        assert!(throttled > 0, "the limit throttled the VM");
        assert!(limited >= 0.4, "{limited:.2} CPUs: the limit should leave it about 0.5");
    } else {
        // A guest the host already holds under the limit is never throttled.
        eprintln!(
            "note: the host was too busy ({before:.2} CPUs before) to see the limit throttle the VM or check its lower bound"
        );
    }

    // The metrics show the guest's work: its disk writes with their latencies, its vCPU's
    // CPU and ready time, its cgroup's memory and the throttling just seen.
    let m = scrape(&env);
    let vm = [("vm", "burn")];
    let disk = [("vm", "burn"), ("disk", "disk0"), ("op", "write")];
    assert!(sample(&m, "rustvisor_disk_ops_total", &disk).unwrap() >= 64.0, "64 writes of the guest");
    assert!(sample(&m, "rustvisor_disk_bytes_total", &disk).unwrap() >= 262_144.0);
    assert!(sample(&m, "rustvisor_disk_latency_seconds", &disk).unwrap() >= 64.0, "each write timed");
    let vcpu0 = [("vm", "burn"), ("vcpu", "0")];
    assert!(sample(&m, "rustvisor_vcpu_cpu_seconds_total", &vcpu0).unwrap() > 1.0);
    assert!(sample(&m, "rustvisor_vcpu_ready_seconds_total", &vcpu0).is_some());
    assert!(sample(&m, "rustvisor_vm_cgroup_memory_bytes", &vm).unwrap() > 50e6);
    assert!(sample(&m, "rustvisor_vm_cpu_throttled_seconds_total", &vm).unwrap() > 0.0);
    assert_eq!(sample(&m, "rustvisor_vm_balloon_target_bytes", &vm), Some(0.0));
    let ratio = sample(&m, "rustvisor_host_vcpu_overcommit_ratio", &[]).unwrap();
    assert!((ratio - 1.0 / host_cpus as f64).abs() < 1e-9, "1 vCPU up on {host_cpus} CPUs: {ratio}");

    // Pins removed live: the vCPU may run anywhere again.
    env.ok(&["vm", "set", "burn", "--pin", "none", "--cpu-limit", "none"]);
    let info = info_json(&env, "burn");
    assert_eq!(info["placement"]["vcpu_threads"][0]["affinity"], format!("0-{}", host_cpus - 1), "{info}");
    env.ok(&["vm", "kill", "burn"]);
    let first = cgroup.split(", ").next().unwrap().to_string();
    wait_until("its cgroup to be removed", Duration::from_secs(10), || {
        (!std::path::Path::new(&first).exists()).then_some(())
    });
}

#[test]
fn when_the_vms_memory_runs_out_the_lowest_priority_vm_is_killed() {
    // 800 MiB for all VMs, overcommitted 4×. "high" boots (~145 MiB) and fills 400 MiB of
    // its RAM (~555 MiB); then "low" boots (~145 MiB) and takes 300 MiB more: the VMs need
    // ~1000 MiB. Plain badness would kill the bigger "high"; with oom_score_adj 1000 against
    // 0 the kernel must take "low", and "high" keeps running. (The last allocation comes
    // from "low", the victim itself: had "high" been allocating too, the kernel could kill
    // it as well in the few ms before the first victim's pages are uncharged — seen here.)
    let env = Env::with_args("mgr-oom", &["--vm-memory-limit", "800M", "--mem-overcommit", "4"]);
    if let Err(why) = cgroups_of(&env) {
        return eprintln!("skipped: the daemon has no cgroups here ({why})");
    }
    let fill = "echo HIGH-UP; mkdir -p /mnt/fill; mount -t tmpfs -o size=450m none /mnt/fill; \
                dd if=/dev/zero of=/mnt/fill/x bs=1M count=400 2>/dev/null && echo HIGH-FILLED; \
                while true; do sleep 1; done";
    env.create_sized("high", fill, "no", "768M", &["--priority", "high"]);
    let hold = "echo LOW-UP; mkdir -p /mnt/hold; mount -t tmpfs -o size=350m none /mnt/hold; \
                dd if=/dev/zero of=/mnt/hold/x bs=1M count=300 2>/dev/null; echo LOW-HELD; \
                while true; do sleep 1; done";
    env.create_with("low", hold, "no", &["--priority", "low"]);
    env.ok(&["vm", "start", "high"]);
    wait_until("high to fill its memory", BOOT, || env.console("high").contains("HIGH-FILLED").then_some(()));
    env.ok(&["vm", "start", "low"]);
    let low = wait_until("low to be OOM-killed", BOOT, || {
        let v = env.vm("low");
        (v.state == VmState::Crashed).then_some(v)
    });
    assert!(!env.console("low").contains("LOW-HELD"), "low got its memory");
    let reason = low.reason.unwrap_or_default();
    assert!(reason.contains("OOM killer") && reason.contains("priority low"), "{reason}");
    assert!(reason.contains("--vm-memory-limit 800 MiB"), "{reason}");
    let ev = env.events("low");
    let oom = ev.iter().find(|e| e.kind == "oom-killed").expect("an oom-killed event");
    eprintln!("low: {}", oom.detail);
    std::thread::sleep(Duration::from_secs(2));
    let high = env.vm("high");
    let events: Vec<String> = env.events("high").iter().map(|e| format!("{}: {}", e.kind, e.detail)).collect();
    assert_eq!(high.state, VmState::Running, "the important VM survives: {:?}; events {events:?}", high.reason);
    let host: serde_json::Value = serde_json::from_str(&env.ok(&["capacity", "--json"])).unwrap();
    assert_eq!(host["host"]["memory_mib"], 800, "{host}");
    assert_eq!(host["host"]["vms_up"], 1, "{host}");
}

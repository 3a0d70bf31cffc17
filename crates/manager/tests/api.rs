//! The daemon's API without booting anything: `openapi.yaml` against the served routes (both
//! ways) and the wire types, the HTTP status mapping, and a failed start leaving nothing
//! behind (the "VMM" is a program that exits at once).

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use api::client::Client;
use manager::server::ROUTES;
use manager::service::{DaemonPaths, Service};
use manager::store::Store;
use manager::types::{
    Capacity, CreateRequest, ErrorBody, Event, EventList, FirewallInfo, FirewallList, FirewallSpec, HostInfo,
    LeaseInfo, NetCheck, NetworkCreate, NetworkInfo, NetworkList, NicInfo, NicSpec, Placement, Policy, Priority,
    Resources, SnapshotInfo, SnapshotList, Stats, UpdateRequest, VcpuStats, VcpuThread, VmDetails, VmState, VmStats,
    VmSummary, VolumeAttach, VolumeCreate,
};

fn openapi() -> serde_yaml::Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    serde_yaml::from_str(&text).expect("openapi.yaml parses")
}

#[test]
fn openapi_lists_exactly_the_served_routes() {
    let doc = openapi();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_mapping().unwrap() {
        for (method, _) in item.as_mapping().unwrap() {
            let method = method.as_str().unwrap();
            if method != "parameters" {
                documented.insert((method.to_ascii_uppercase(), path.as_str().unwrap().to_string()));
            }
        }
    }
    let served: BTreeSet<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(served.len(), ROUTES.len(), "ROUTES has duplicates");
    let missing: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(missing.is_empty(), "served but not in openapi.yaml: {missing:?}");
    assert!(extra.is_empty(), "in openapi.yaml but not served: {extra:?}");
}

#[test]
fn openapi_refs_resolve_and_schemas_match_the_wire_types() {
    let doc = openapi();
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    for line in text.lines() {
        if let Some(r) = line.trim().strip_prefix("$ref: ") {
            let mut node = &doc;
            for part in r.trim_matches('"').strip_prefix("#/").expect("local ref").split('/') {
                node = &node[part];
            }
            assert!(!node.is_null(), "dangling $ref {r}");
        }
    }
    // Each schema's properties are exactly the fields serde writes (all optional ones set).
    let summary = VmSummary {
        name: "a".into(),
        state: VmState::Running,
        operation: Some("stop".into()),
        cpus: 1,
        memory_mib: 512,
        accel: "emu".into(),
        pid: Some(1),
        uptime_s: Some(1.0),
        restart: Default::default(),
        autostart: true,
        template: false,
        restarts: 0,
        reason: Some("r".into()),
    };
    let resources = Resources {
        cpu_weight: Some(200),
        cpu_limit_percent: Some(150),
        cpuset: Some("0-1".into()),
        pin: [(0, 1)].into(),
        memory_limit_mib: Some(768),
        priority: Priority::Low,
        balloon_min_mib: Some(256),
    };
    let host = HostInfo {
        cpus: 2,
        memory_mib: 24_000,
        memory_available_mib: 20_000,
        overcommit: Default::default(),
        committed_vcpus: 1,
        committed_memory_mib: 512,
        vms_up: 1,
        cgroups: "none: disabled".into(),
    };
    let capacity = Capacity {
        host: host.clone(),
        by_cpu: 7,
        by_memory: 40,
        by_disk: Some(3),
        fit: 3,
        limited_by: "disk".into(),
        explanation: vec![],
    };
    let details = VmDetails {
        summary: summary.clone(),
        config: serde_json::from_str(r#"{"kernel": "/k"}"#).unwrap(),
        policy: Policy::default(),
        resources: resources.clone(),
        placement: Some(Placement {
            cgroup: Some("/sys/fs/cgroup/rustvisor.slice/a".into()),
            oom_score_adj: 400,
            vcpu_threads: vec![VcpuThread { vcpu: 0, tid: 7, affinity: "0-1".into() }],
        }),
        nics: vec![],
        balloon: None,
        console_log: "/c".into(),
        api_socket: Some("/s".into()),
        created_ms: 0,
    };
    let event = Event {
        id: 1,
        time_ms: 2,
        vm: Some("a".into()),
        kind: "defined".into(),
        detail: String::new(),
        peer_uid: Some(0),
        peer_pid: Some(1),
        peer_addr: Some("127.0.0.1:5".into()),
    };
    let snapshot =
        SnapshotInfo { name: "s".into(), created_ms: 1, size_bytes: 2, memory: true, vm_state: VmState::Running };
    let update = UpdateRequest {
        restart: Some(Default::default()),
        autostart: Some(true),
        start_order: Some(1),
        start_delay_s: Some(2),
        memory_mib: Some(256),
        cpus: Some(1),
        cmdline: Some("x".into()),
        config: Some(serde_json::from_str(r#"{"kernel": "/k"}"#).unwrap()),
        nics: Some(vec![]),
        balloon_mib: Some(128),
        resources: Some(resources.clone()),
    };
    let nic: NicSpec = "net=lan0,vlan=20,mac=52:54:00:00:00:01,firewall=web".parse().unwrap();
    let nic_info = NicInfo { spec: nic.clone(), tap: "rvt-a-0".into(), ip: Some("10.0.0.2".into()) };
    let net_create = NetworkCreate {
        name: "lan0".into(),
        subnet: Some("10.77.0.1/24".parse().unwrap()),
        dhcp: true,
        nat: true,
        isolated: false,
        vlan_filtering: true,
    };
    let net_info = NetworkInfo {
        spec: net_create.spec(),
        used_by: vec!["a".into()],
        problems: vec![],
        leases: vec![LeaseInfo { mac: "m".into(), ip: "i".into(), hostname: Some("h".into()) }],
    };
    let fw = FirewallSpec {
        name: "web".into(),
        rules: vec!["allow in tcp/80".parse().unwrap()],
        default_in: "drop".parse().unwrap(),
        default_out: "accept".parse().unwrap(),
    };
    let fw_info = FirewallInfo { spec: fw.clone(), used_by: vec![] };
    let error =
        ErrorBody { error: "e".into(), field: Some("f".into()), operation: Some("o".into()), state: Some("s".into()) };
    let samples = [
        ("VmSummary", serde_json::to_value(&summary).unwrap()),
        ("VmDetails", serde_json::to_value(&details).unwrap()),
        ("Event", serde_json::to_value(&event).unwrap()),
        ("EventList", serde_json::to_value(EventList { events: vec![] }).unwrap()),
        ("Error", serde_json::to_value(&error).unwrap()),
        ("StopRequest", serde_json::json!({"force": true, "timeout_s": 5})),
        (
            "CreateRequest",
            serde_json::json!({"name": "a", "restart": "no", "autostart": true, "start_order": 1,
                "start_delay_s": 2, "nics": [], "volumes": [], "resources": {}, "config": {}}),
        ),
        ("UpdateRequest", serde_json::to_value(&update).unwrap()),
        ("Policy", serde_json::to_value(Policy::default()).unwrap()),
        ("Resources", serde_json::to_value(&resources).unwrap()),
        ("HostInfo", serde_json::to_value(&host).unwrap()),
        ("Capacity", serde_json::to_value(&capacity).unwrap()),
        ("Stats", serde_json::to_value(Stats { time_ms: 1, host: host.clone(), ksm: None, vms: vec![] }).unwrap()),
        (
            "VmStats",
            serde_json::to_value(VmStats {
                name: "a".into(),
                state: VmState::Running,
                cpus: 1,
                memory_mib: 512,
                accel: "emu".into(),
                restarts: 0,
                uptime_s: Some(1.0),
                cpu_seconds: Some(2.0),
                resident_bytes: Some(3),
                ksm_merging_bytes: Some(4),
                vcpus: vec![VcpuStats { vcpu: 0, cpu_seconds: 1.0, ready_seconds: 0.5 }],
                cgroup_memory_bytes: Some(5),
                cpu_throttled_seconds: Some(0.1),
                devices: Default::default(),
                balloon: None,
            })
            .unwrap(),
        ),
        ("VcpuStats", serde_json::to_value(VcpuStats { vcpu: 0, cpu_seconds: 1.0, ready_seconds: 0.5 }).unwrap()),
        ("OvercommitPolicy", serde_json::to_value(host.overcommit).unwrap()),
        ("SnapshotInfo", serde_json::to_value(&snapshot).unwrap()),
        ("SnapshotList", serde_json::to_value(SnapshotList { snapshots: vec![] }).unwrap()),
        ("SnapshotCreate", serde_json::json!({"name": "s"})),
        ("NicSpec", serde_json::to_value(&nic).unwrap()),
        ("NicInfo", serde_json::to_value(&nic_info).unwrap()),
        ("NetworkCreate", serde_json::to_value(&net_create).unwrap()),
        ("NetworkSpec", serde_json::to_value(net_create.spec()).unwrap()),
        ("NetworkInfo", serde_json::to_value(&net_info).unwrap()),
        ("LeaseInfo", serde_json::to_value(&net_info.leases[0]).unwrap()),
        ("NetworkList", serde_json::to_value(NetworkList { networks: vec![] }).unwrap()),
        ("NetCheck", serde_json::to_value(NetCheck { problems: vec![] }).unwrap()),
        ("FirewallSpec", serde_json::to_value(&fw).unwrap()),
        ("FirewallInfo", serde_json::to_value(&fw_info).unwrap()),
        ("FirewallList", serde_json::to_value(FirewallList { firewalls: vec![] }).unwrap()),
        ("VolumeAttach", serde_json::json!({"volume": "p/v", "readonly": true})),
        ("PoolCreate", serde_json::json!({"name": "p", "path": "/p"})),
        ("PoolDetails", serde_json::json!({"name": "p", "info": {}})),
        ("PoolList", serde_json::json!({"pools": []})),
        (
            "VolumeCreate",
            serde_json::json!({"name": "v", "size_bytes": 1, "format": "raw", "preallocate": true,
            "import_from": "/f", "source_format": "raw"}),
        ),
        ("VolumeDetails", serde_json::json!({"pool": "p", "info": {}, "used_by": []})),
        ("VolumeList", serde_json::json!({"volumes": []})),
        ("VolumeResize", serde_json::json!({"size_bytes": 1})),
        ("VolumeClone", serde_json::json!({"name": "v", "pool": "p", "linked": true})),
        ("VmClone", serde_json::json!({"name": "v", "linked": true})),
        ("BackupCreate", serde_json::json!({"to": "/b"})),
        ("BackupList", serde_json::json!({"backups": []})),
        ("BackupRestore", serde_json::json!({"name": "v", "pool": "p"})),
        (
            "BackupInfo",
            serde_json::to_value(manager::store::BackupRow {
                id: "i".into(),
                vm: "v".into(),
                path: "/p".into(),
                created_ms: 1,
                bytes: 2,
                sha256: "s".into(),
            })
            .unwrap(),
        ),
    ];
    // The request samples are what the types accept, and the storage types' fields are the
    // schemas'.
    for (name, value) in [
        ("VolumeAttach", serde_json::to_value(VolumeAttach { volume: "p/v".into(), readonly: true }).unwrap()),
        ("PoolInfo", serde_json::to_value(samples_pool_info()).unwrap()),
        ("VolumeInfo", serde_json::to_value(samples_volume_info()).unwrap()),
    ] {
        let props: BTreeSet<String> = doc["components"]["schemas"][name]["properties"]
            .as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap().to_string())
            .collect();
        let fields: BTreeSet<String> = value.as_object().unwrap().keys().cloned().collect();
        assert_eq!(props, fields, "schema {name} against the wire type");
    }
    serde_json::from_value::<VolumeCreate>(serde_json::json!({"name": "v", "size_bytes": 1, "format": "raw",
        "preallocate": true, "import_from": "/f", "source_format": "raw"}))
    .unwrap();
    // The create sample is a CreateRequest (with a configuration).
    let mut create = samples.iter().find(|s| s.0 == "CreateRequest").unwrap().1.clone();
    create["config"] = serde_json::json!({"kernel": "/k"});
    serde_json::from_value::<CreateRequest>(create).unwrap();
    for (name, value) in samples {
        let props: BTreeSet<String> = doc["components"]["schemas"][name]["properties"]
            .as_mapping()
            .unwrap_or_else(|| panic!("schema {name}"))
            .keys()
            .map(|k| k.as_str().unwrap().to_string())
            .collect();
        let fields: BTreeSet<String> = value.as_object().unwrap().keys().cloned().collect();
        assert_eq!(props, fields, "schema {name} against the wire type");
    }
}

/// A daemon service and server in this process, on a temp folder: its Unix socket, and TCP
/// on a free port with [`TOKEN`].
struct Daemon {
    dir: PathBuf,
    socket: PathBuf,
    tcp: std::net::SocketAddr,
    svc: Arc<Service>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const TOKEN: &str = "test-token-0123456789abcdef";

impl Daemon {
    fn start(tag: &str, vmm_exe: &Path) -> Daemon {
        let dir = std::env::temp_dir().join(format!("rv-mgr-api-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir.join("rustvisor.db")).unwrap();
        let paths = DaemonPaths { state_dir: dir.join("state"), run_dir: dir.join("run"), vmm_exe: vmm_exe.into() };
        let svc = Arc::new(Service::new(paths, store));
        let socket = dir.join("d.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        tcp.set_nonblocking(true).unwrap();
        let tcp_addr = tcp.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let served = svc.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::UnixListener::from_std(listener).unwrap();
                let tcp = tokio::net::TcpListener::from_std(tcp).unwrap();
                let (stop_tcp, tcp_stopped) = tokio::sync::oneshot::channel::<()>();
                let t = tokio::spawn(manager::server::serve_tcp(tcp, served.clone(), Arc::from(TOKEN), async move {
                    let _ = tcp_stopped.await;
                }));
                manager::server::serve(listener, served, async move {
                    let _ = rx.await;
                })
                .await;
                let _ = stop_tcp.send(());
                let _ = t.await;
            });
        });
        Daemon { dir, socket, tcp: tcp_addr, svc, stop: Some(tx), thread: Some(thread) }
    }

    /// One HTTP/1.1 request over TCP (`Connection: close`): (status, body).
    fn tcp_call(&self, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.tcp).unwrap();
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let ctype = if body.is_empty() { "" } else { "Content-Type: application/json\r\n" };
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}{ctype}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
    }

    fn call(&self, method: &str, route: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        let c = Client::new(&self.socket).unwrap();
        let r = c.request(method, route, body.map(|b| b.as_bytes().to_vec())).unwrap();
        let v = if r.body.is_empty() { serde_json::Value::Null } else { serde_json::from_slice(&r.body).unwrap() };
        (r.status, v)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        let _ = self.thread.take().map(|t| t.join());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const KERNEL_FILE: &str = "/proc/self/exe";

#[test]
fn statuses_and_a_failed_start_leaves_nothing_behind() {
    // The test binary itself exists: a file the kernel check accepts.
    let kernel = std::fs::canonicalize(KERNEL_FILE).unwrap().display().to_string();
    let d = Daemon::start("status", Path::new("/bin/false"));
    let create = format!(r#"{{"name": "a", "restart": "on-failure", "config": {{"kernel": "{kernel}"}}}}"#);
    let (s, v) = d.call("POST", "vms", Some(&create));
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["state"], "stopped");

    let (s, v) = d.call("POST", "vms", Some(&create));
    assert_eq!((s, v["field"].as_str()), (409, Some("name")), "{v}");
    let (s, v) = d.call("POST", "vms", Some(r#"{"name": "b", "config": {"kernel": "/k"}, "x": 1}"#));
    assert_eq!((s, v["field"].as_str()), (400, Some("x")), "{v}");
    let (s, v) = d.call("POST", "vms", Some(r#"{"name": "b", "config": {"kernel": "/k", "serial": "file=/tmp/x"}}"#));
    assert_eq!((s, v["field"].as_str()), (400, Some("config.serial")), "{v}");
    let (s, v) = d.call("GET", "vms/Bad", None);
    assert_eq!((s, v["field"].as_str()), (400, Some("name")), "{v}");
    let (s, _) = d.call("GET", "vms/b", None);
    assert_eq!(s, 404);
    let (s, _) = d.call("GET", "nothing", None);
    assert_eq!(s, 404);
    let (s, v) = d.call("POST", "vms/a/start", None);
    assert_eq!(s, 405, "{v}");
    let (s, v) = d.call("GET", "events?bogus=1", None);
    assert_eq!((s, v["field"].as_str()), (400, Some("bogus")), "{v}");
    let (s, v) = d.call("PUT", "vms/a/pause", Some("{}"));
    assert_eq!((s, v["field"].as_str()), (400, Some("body")), "{v}");
    let (s, v) = d.call("PUT", "vms/a/pause", None);
    assert_eq!((s, v["state"].as_str()), (409, Some("stopped")), "{v}");

    // The "VMM" exits at once: a 500 naming why, nothing left, the failure logged.
    let (s, v) = d.call("PUT", "vms/a/start", None);
    assert_eq!(s, 500, "{v}");
    assert!(v["error"].as_str().unwrap().contains("start failed: the VMM exited with status 1"), "{v}");
    let (_, v) = d.call("GET", "vms/a", None);
    assert_eq!(v["summary"]["state"], "stopped", "{v}");
    assert!(v["summary"]["pid"].is_null());
    assert!(!d.dir.join("run/vms/a").exists(), "the run folder is left");
    let (_, v) = d.call("GET", "events?vm=a", None);
    let kinds: Vec<&str> = v["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["defined", "start-failed"]);
    let (s, _) = d.call("DELETE", "vms/a", None);
    assert_eq!(s, 204);
    let (_, v) = d.call("GET", "vms", None);
    assert_eq!(v["vms"], serde_json::json!([]));
}

/// Sends `GET /api/v1/<route>` by hand with `headers`; returns the status, the head and the
/// stream (positioned after the head) with the bytes already read past it.
fn raw_get(socket: &Path, route: &str, headers: &str) -> (u16, String, std::os::unix::net::UnixStream, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    write!(s, "GET /api/v1/{route} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the head: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&got[..end]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head, s, got.split_off(end))
}

/// Reads from `s` into `got` until it contains `needle` (10 s at most).
fn read_until(s: &mut std::os::unix::net::UnixStream, got: &mut Vec<u8>, needle: &str) {
    use std::io::Read;
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(got).contains(needle) {
        let n = s.read(&mut buf).unwrap_or_else(|e| panic!("no {needle:?} in {:?}: {e}", String::from_utf8_lossy(got)));
        assert!(n > 0, "closed before {needle:?}: {:?}", String::from_utf8_lossy(got));
        got.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn console_upgrades_and_proxies_to_the_vmm_console_socket() {
    use std::io::{Read, Write};
    const UPGRADE: &str = "Connection: Upgrade\r\nUpgrade: rustvisor-console\r\n";
    let kernel = std::fs::canonicalize(KERNEL_FILE).unwrap().display().to_string();
    let d = Daemon::start("console", Path::new("/bin/false"));
    let (s, v) = d.call("POST", "vms", Some(&format!(r#"{{"name": "a", "config": {{"kernel": "{kernel}"}}}}"#)));
    assert_eq!(s, 201, "{v}");

    // Errors before the upgrade are JSON.
    let (s, head, ..) = raw_get(&d.socket, "vms/a/console", "");
    assert_eq!(s, 426, "{head}");
    assert!(head.to_ascii_lowercase().contains("upgrade: rustvisor-console"), "{head}");
    let (s, ..) = raw_get(&d.socket, "vms/nope/console", UPGRADE);
    assert_eq!(s, 404);
    let (s, _, mut conn, mut body) = raw_get(&d.socket, "vms/a/console", UPGRADE);
    assert_eq!(s, 409);
    read_until(&mut conn, &mut body, "}");
    let e: ErrorBody = serde_json::from_slice(&body).unwrap();
    assert_eq!(e.state.as_deref(), Some("stopped"), "{e:?}");
    assert!(e.error.contains("is stopped: no console"), "{e:?}");

    // A "running" VM whose VMM console is a real console multiplexer with a fake guest.
    let mut store = Store::open(&d.dir.join("rustvisor.db")).unwrap();
    let rt = manager::store::Runtime {
        state: VmState::Running,
        pid: Some(std::process::id()),
        socket: None,
        started_ms: Some(0),
        accel: Some("emu".into()),
        reason: None,
        restarts: 0,
    };
    store.set_runtime("a", &rt, Some(true), &[]).unwrap();
    let run = d.dir.join("run/vms/a");
    std::fs::create_dir_all(&run).unwrap();
    let mut mux = vmm::console_mux::ConsoleMux::new(&run.join("console.sock"), None).unwrap();
    let typed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let t = typed.clone();
    mux.start(Box::new(move |b: &[u8]| {
        t.lock().unwrap().extend_from_slice(b);
        b.len()
    }))
    .unwrap();
    let mut guest = mux.writer();
    guest.write_all(b"login: ").unwrap();

    let (s, head, mut first, mut got1) = raw_get(&d.socket, "vms/a/console", UPGRADE);
    assert_eq!(s, 101, "{head}");
    let (s, _, mut second, mut got2) = raw_get(&d.socket, "vms/a/console", UPGRADE);
    assert_eq!(s, 101);
    read_until(&mut first, &mut got1, "login: ");
    read_until(&mut second, &mut got2, "login: ");
    first.write_all(b"root\r").unwrap();
    second.write_all(b"intruder\r").unwrap();
    read_until(&mut second, &mut got2, "read-only");
    guest.write_all(b"# ").unwrap();
    read_until(&mut first, &mut got1, "# ");
    read_until(&mut second, &mut got2, "# ");
    assert_eq!(typed.lock().unwrap().as_slice(), b"root\r", "only the first console types");
    let (_, v) = d.call("GET", "events?vm=a", None);
    let attached = v["events"].as_array().unwrap().iter().filter(|e| e["kind"] == "console-attached").count();
    assert_eq!(attached, 2, "{v}");

    // The first detaches: the second gets the keyboard.
    drop(first);
    read_until(&mut second, &mut got2, "has the keyboard now");
    second.write_all(b"ls\r").unwrap();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !typed.lock().unwrap().ends_with(b"ls\r") {
        assert!(std::time::Instant::now() < end, "the second console's input never arrived");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // The VM ends: the console closes.
    drop(mux);
    let mut rest = Vec::new();
    second.read_to_end(&mut rest).unwrap();
}

/// A raw `GET /api/v1/events?follow=1` on the Unix socket; returns the stream.
fn follow(socket: &Path, query: &str) -> std::os::unix::net::UnixStream {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    write!(s, "GET /api/v1/events?follow=1{query} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_millis(200))).unwrap();
    s
}

/// Reads `s` until what it sent contains every one of `wanted`, for at most 10 s.
fn read_stream_until(s: &mut std::os::unix::net::UnixStream, seen: &mut String, wanted: &[&str]) {
    use std::io::Read;
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while !wanted.iter().all(|w| seen.contains(w)) {
        assert!(std::time::Instant::now() < end, "the stream did not send {wanted:?}; it sent: {seen}");
        match s.read(&mut buf) {
            Ok(0) => panic!("the stream ended: {seen}"),
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(_) => {}
        }
    }
}

#[test]
fn set_snapshots_of_a_stopped_vm_event_stream_tcp_token_and_autostart_order() {
    let kernel = std::fs::canonicalize(KERNEL_FILE).unwrap().display().to_string();
    let d = Daemon::start("more", Path::new("/bin/false"));
    let disk = d.dir.join("disk.raw");
    std::fs::write(&disk, vec![b'A'; 1 << 20]).unwrap();

    // A follower started before anything happens sees each event as it is committed.
    let mut stream = follow(&d.socket, "&vm=v");
    let mut seen = String::new();
    let create =
        format!(r#"{{"name": "v", "config": {{"kernel": "{kernel}", "disks": [{{"path": "{}"}}]}}}}"#, disk.display());
    assert_eq!(d.call("POST", "vms", Some(&create)).0, 201);
    read_stream_until(&mut stream, &mut seen, &["200 OK", "application/x-ndjson", r#""kind":"defined""#]);

    // vm set: fields change, bad values are 400s naming the field.
    let (s, v) = d.call("PATCH", "vms/v", Some(r#"{"memory_mib": 256, "restart": "always", "autostart": true}"#));
    assert_eq!(s, 200, "{v}");
    assert_eq!((v["config"]["memory_mib"].as_u64(), v["policy"]["restart"].as_str()), (Some(256), Some("always")));
    assert_eq!(v["summary"]["autostart"], true);
    for (body, field) in [
        (r#"{"start_order": 5000}"#, "start_order"),
        (r#"{"start_delay_s": 601}"#, "start_delay_s"),
        (r#"{"memory_mib": 1}"#, "config.memory_mib"),
        (r#"{"bogus": 1}"#, "bogus"),
        ("{}", "body"),
    ] {
        let (s, v) = d.call("PATCH", "vms/v", Some(body));
        assert_eq!((s, v["field"].as_str()), (400, Some(field)), "{body}: {v}");
    }
    read_stream_until(&mut stream, &mut seen, &[r#""kind":"updated""#, "memory 256 MiB"]);

    // A stopped VM's snapshot holds its disks; a revert puts them back.
    let (s, v) = d.call("POST", "vms/v/snapshots", Some(r#"{"name": "s1"}"#));
    assert_eq!(s, 201, "{v}");
    assert_eq!((v["memory"].as_bool(), v["vm_state"].as_str()), (Some(false), Some("stopped")));
    assert!(v["size_bytes"].as_u64().unwrap() >= 1 << 20, "{v}");
    let (s, v) = d.call("POST", "vms/v/snapshots", Some(r#"{"name": "s1"}"#));
    assert_eq!((s, v["field"].as_str()), (409, Some("name")), "{v}");
    let (s, v) = d.call("POST", "vms/v/snapshots", Some(r#"{"name": "Bad Name"}"#));
    assert_eq!((s, v["field"].as_str()), (400, Some("name")), "{v}");
    std::fs::write(&disk, vec![b'B'; 1 << 20]).unwrap();
    // The configuration goes back too.
    assert_eq!(d.call("PATCH", "vms/v", Some(r#"{"memory_mib": 512}"#)).0, 200);
    let (s, v) = d.call("PUT", "vms/v/snapshots/s1/revert", None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(std::fs::read(&disk).unwrap(), vec![b'A'; 1 << 20], "the disk is back");
    let (_, v) = d.call("GET", "vms/v", None);
    assert_eq!((v["config"]["memory_mib"].as_u64(), v["summary"]["state"].as_str()), (Some(256), Some("stopped")));
    assert_eq!(d.call("PUT", "vms/v/snapshots/nope/revert", None).0, 404);
    let (_, v) = d.call("GET", "vms/v/snapshots", None);
    assert_eq!(v["snapshots"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(d.call("DELETE", "vms/v/snapshots/s1", None).0, 204);
    assert_eq!(d.call("DELETE", "vms/v/snapshots/s1", None).0, 404);
    assert!(!d.dir.join("state/vms/v/snapshots/s1").exists(), "the snapshot's files are gone");
    read_stream_until(&mut stream, &mut seen, &["snapshot-created", "snapshot-reverted", "snapshot-deleted"]);
    assert!(!seen.contains(r#""vm":"w""#), "the stream shows only VM v");

    // TCP: only with the token; the audit log has the client's address.
    let (s, body) = d.tcp_call("GET", "/api/v1/vms", None, "");
    assert_eq!(s, 401, "{body}");
    assert_eq!(d.tcp_call("GET", "/api/v1/vms", Some("wrong-token-0123456789abcdef"), "").0, 401);
    let (s, body) = d.tcp_call("GET", "/api/v1/vms", Some(TOKEN), "");
    assert_eq!(s, 200, "{body}");
    assert!(body.contains(r#""name":"v""#), "{body}");
    let create_w =
        format!(r#"{{"name": "w", "autostart": true, "start_order": 1, "config": {{"kernel": "{kernel}"}}}}"#);
    let (s, body) = d.tcp_call("POST", "/api/v1/vms", Some(TOKEN), &create_w);
    assert_eq!(s, 201, "{body}");
    let (_, v) = d.call("GET", "events?vm=w", None);
    let addr = v["events"][0]["peer_addr"].as_str().unwrap_or_default().to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{v}");
    assert!(v["events"][0]["peer_uid"].is_null());

    // Autostart: by order (w: 1, v: 0 → v first), once per host boot. The "VMM" here exits
    // at once, so each start fails, and is logged.
    d.svc.autostart();
    let (_, v) = d.call("GET", "events", None);
    let auto: Vec<&str> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "autostarted")
        .map(|e| e["vm"].as_str().unwrap())
        .collect();
    assert_eq!(auto, ["v", "w"], "{v}");
    d.svc.autostart();
    let (_, v2) = d.call("GET", "events?kind=x", None);
    assert_eq!(v2["field"], "kind", "unknown query parameters are refused");
    let (_, v2) = d.call("GET", "events", None);
    assert_eq!(v2["events"].as_array().unwrap().len(), v["events"].as_array().unwrap().len(), "autostart runs once");
}

fn samples_pool_info() -> manager::types::PoolInfo {
    manager::types::PoolInfo {
        path: "/p".into(),
        capacity_bytes: 1,
        available_bytes: 1,
        allocated_bytes: 1,
        virtual_bytes: 1,
        volumes: 1,
    }
}

fn samples_volume_info() -> manager::types::VolumeInfo {
    manager::types::VolumeInfo {
        name: "v".into(),
        path: "/p/v.raw".into(),
        format: storage::Format::Raw,
        virtual_bytes: 1,
        allocated_bytes: 1,
        backing: None,
        foreign_backing: None,
        read_only: false,
    }
}

#[test]
fn pools_volumes_templates_clones_and_backups_of_stopped_vms() {
    let kernel = std::fs::canonicalize(KERNEL_FILE).unwrap().display().to_string();
    let d = Daemon::start("storage", Path::new("/bin/false"));
    let pool_dir = d.dir.join("pool");
    let (s, v) = d.call("POST", "pools", Some(&format!(r#"{{"name": "p", "path": "{}"}}"#, pool_dir.display())));
    assert_eq!(s, 201, "{v}");
    let (s, v) = d.call("POST", "pools", Some(r#"{"name": "q", "path": "relative"}"#));
    assert_eq!((s, v["field"].as_str()), (400, Some("path")), "{v}");

    // Thin volumes: a 1 GiB raw volume allocates nothing.
    let (s, v) =
        d.call("POST", "pools/p/volumes", Some(r#"{"name": "big", "size_bytes": 1073741824, "format": "raw"}"#));
    assert_eq!(s, 201, "{v}");
    assert_eq!((v["info"]["virtual_bytes"].as_u64(), v["info"]["allocated_bytes"].as_u64()), (Some(1 << 30), Some(0)));
    let (s, v) = d.call("POST", "pools/p/volumes", Some(r#"{"name": "base", "size_bytes": 4194304, "format": "raw"}"#));
    assert_eq!(s, 201, "{v}");
    let base = v["info"]["path"].as_str().unwrap().to_string();
    std::fs::OpenOptions::new().write(true).open(&base).unwrap().write_all_at(b"BASE-DATA", 0).unwrap();
    let (s, v) = d.call("PUT", "pools/p/volumes/big/resize", Some(r#"{"size_bytes": 512}"#));
    assert_eq!(s, 400, "a shrink is refused: {v}");
    let (s, v) = d.call("PUT", "pools/p/volumes/big/resize", Some(r#"{"size_bytes": 2147483648}"#));
    assert_eq!((s, v["info"]["virtual_bytes"].as_u64()), (200, Some(2 << 30)), "{v}");
    let (s, v) = d.call("GET", "pools/p", None);
    assert_eq!((s, v["info"]["volumes"].as_u64()), (200, Some(2)), "{v}");

    // A VM on the volume: the volume is in use.
    let create = format!(
        r#"{{"name": "src", "volumes": [{{"volume": "p/base"}}], "nics": [], "config": {{"kernel": "{kernel}"}}}}"#
    );
    assert_eq!(d.call("POST", "vms", Some(&create)).0, 201);
    let (_, v) = d.call("GET", "vms/src", None);
    assert_eq!(v["config"]["disks"][0]["path"], base.as_str(), "{v}");
    let (s, v) = d.call("DELETE", "pools/p/volumes/base", None);
    assert!(s == 409 && v["error"].as_str().unwrap().contains("VM(s) src"), "{s} {v}");
    let (s, v) =
        d.call("POST", "vms", Some(r#"{"name": "x", "volumes": [{"volume": "p/nope"}], "config": {"kernel": "/k"}}"#));
    assert_eq!((s, v["field"].as_str()), (400, Some("volumes[0].volume")), "{v}");

    // Backup of the stopped VM, restore as a new VM: the data is there; a corrupt backup is
    // refused.
    let (s, b) = d.call("POST", "vms/src/backups", None);
    assert_eq!(s, 201, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    std::fs::OpenOptions::new().write(true).open(&base).unwrap().write_all_at(b"NEW!-DATA", 0).unwrap();
    let (s, v) = d.call("POST", &format!("backups/{id}/restore"), Some(r#"{"name": "back", "pool": "p"}"#));
    assert_eq!(s, 201, "{v}");
    let (_, v) = d.call("GET", "vms/back", None);
    let restored = v["config"]["disks"][0]["path"].as_str().unwrap().to_string();
    assert_ne!(restored, base);
    assert_eq!(&std::fs::read(&restored).unwrap()[..9], b"BASE-DATA", "the data as of the backup");
    let manifest = Path::new(b["path"].as_str().unwrap()).join("definition.json");
    let mut def = std::fs::read(&manifest).unwrap();
    def[10] ^= 1;
    std::fs::write(&manifest, def).unwrap();
    let (s, v) = d.call("POST", &format!("backups/{id}/restore"), Some(r#"{"name": "bad", "pool": "p"}"#));
    assert!(s >= 400 && v["error"].as_str().unwrap().contains("definition.json"), "{s} {v}");
    assert_eq!(d.call("GET", "vms/bad", None).0, 404, "nothing was defined");

    // Template, linked clone, refusals.
    let (s, v) = d.call("POST", "vms/src/clone", Some(r#"{"name": "c1", "linked": true}"#));
    assert_eq!((s, v["field"].as_str()), (400, Some("linked")), "linked clones need a template: {v}");
    let (s, v) = d.call("PUT", "vms/src/template", None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["summary"]["template"].as_bool(), v["config"]["disks"][0]["readonly"].as_bool()),
        (Some(true), Some(true))
    );
    let (s, v) = d.call("PUT", "vms/src/start", None);
    assert!(s == 409 && v["error"].as_str().unwrap().contains("is a template"), "{s} {v}");
    let (s, v) = d.call("POST", "vms/src/clone", Some(r#"{"name": "c1", "linked": true}"#));
    assert_eq!(s, 201, "{v}");
    let (_, v) = d.call("GET", "vms/c1", None);
    assert_eq!(v["config"]["disks"][0]["readonly"], false, "{v}");
    let (_, v) = d.call("GET", "pools/p/volumes/c1-disk0", None);
    assert_eq!((v["info"]["format"].as_str(), v["info"]["backing"].as_str()), (Some("qcow2"), Some("base")), "{v}");
    let (s, v) = d.call("DELETE", "vms/src", None);
    assert!(s == 409 && v["error"].as_str().unwrap().contains("c1"), "the template has a clone: {s} {v}");
    let (s, v) = d.call("DELETE", "pools/p/volumes/base", None);
    assert_eq!(s, 409, "{v}");
    // Full clone: independent data.
    let (s, v) = d.call("POST", "vms/src/clone", Some(r#"{"name": "c2"}"#));
    assert_eq!(s, 201, "{v}");
    let (_, v) = d.call("GET", "pools/p/volumes", None);
    let names: Vec<&str> =
        v["volumes"].as_array().unwrap().iter().map(|x| x["info"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["back-disk0", "base", "big", "c1-disk0", "c2-disk0"], "{v}");
    // Clean up in order: clones and their volumes, then the template (refused while a volume
    // is built on its disk) and its volume.
    for vm in ["c1", "c2", "back"] {
        assert_eq!(d.call("DELETE", &format!("vms/{vm}"), None).0, 204, "{vm}");
    }
    for vol in ["c1-disk0", "c2-disk0", "back-disk0"] {
        let (s, v) = d.call("DELETE", &format!("pools/p/volumes/{vol}"), None);
        assert_eq!(s, 204, "{vol}: {v}");
    }
    assert_eq!(d.call("DELETE", "vms/src", None).0, 204);
    for vol in ["base", "big"] {
        let (s, v) = d.call("DELETE", &format!("pools/p/volumes/{vol}"), None);
        assert_eq!(s, 204, "{vol}: {v}");
    }
    assert_eq!(d.call("DELETE", &format!("backups/{id}"), None).0, 204);
    assert_eq!(d.call("DELETE", "pools/p", None).0, 204);
}

/// Scrapes `path` over the Unix socket and parses it as Prometheus does: (head, samples).
fn scrape(socket: &Path, path: &str) -> (String, Vec<prometheus_parse::Sample>) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    let (head, text) = got.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(text.ends_with("# EOF\n"), "{text}");
    let lines = text.lines().map(|l| Ok(l.to_string()));
    (head.to_string(), prometheus_parse::Scrape::parse(lines).expect("the exposition parses").samples)
}

/// The value of the sample `metric` with labels `labels`.
fn value(samples: &[prometheus_parse::Sample], metric: &str, labels: &[(&str, &str)]) -> f64 {
    let s = samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no {metric}{labels:?} in {samples:#?}"));
    match s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{metric}: {other:?}"),
    }
}

#[test]
fn metrics_scrape_with_a_prometheus_parser() {
    let kernel = std::fs::canonicalize(KERNEL_FILE).unwrap().display().to_string();
    let d = Daemon::start("metrics", Path::new("/bin/false"));
    for (name, mem, cpus) in [("a", 256, 1), ("b", 1024, 2)] {
        let body =
            format!(r#"{{"name": "{name}", "config": {{"kernel": "{kernel}", "memory_mib": {mem}, "cpus": {cpus}}}}}"#);
        let (s, v) = d.call("POST", "vms", Some(&body));
        assert_eq!(s, 201, "{v}");
    }
    let (head, m) = scrape(&d.socket, "/api/v1/metrics");
    assert!(head.to_ascii_lowercase().contains("content-type: application/openmetrics-text; version=1.0.0"), "{head}");
    assert_eq!(value(&m, "rustvisor_vms", &[]), 2.0);
    assert_eq!(value(&m, "rustvisor_vms_running", &[]), 0.0);
    assert_eq!(value(&m, "rustvisor_vm_memory_configured_bytes", &[("vm", "a")]), 256.0 * 1048576.0);
    assert_eq!(value(&m, "rustvisor_vm_memory_configured_bytes", &[("vm", "b")]), 1024.0 * 1048576.0);
    assert_eq!(value(&m, "rustvisor_vm_vcpus", &[("vm", "a")]), 1.0);
    assert_eq!(value(&m, "rustvisor_vm_vcpus", &[("vm", "b")]), 2.0);
    assert_eq!(value(&m, "rustvisor_vm_info", &[("vm", "b"), ("state", "stopped")]), 1.0);
    assert_eq!(value(&m, "rustvisor_vm_up", &[("vm", "a")]), 0.0);
    assert_eq!(value(&m, "rustvisor_vm_restarts_total", &[("vm", "a")]), 0.0);
    assert_eq!(value(&m, "rustvisor_host_vcpu_overcommit_ratio", &[]), 0.0);
    assert!(value(&m, "rustvisor_host_cpus", &[]) >= 1.0);
    assert!(value(&m, "rustvisor_host_memory_bytes", &[]) > 0.0);
    assert!(!m.iter().any(|s| s.metric == "rustvisor_vm_cpu_seconds_total"), "no VMM, no CPU time");

    // "b" running, its "VMM" this process with a thread named like a vCPU.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let vcpu = std::thread::Builder::new().name("vcpu1".into()).spawn(move || rx.recv()).unwrap();
    let mut store = Store::open(&d.dir.join("rustvisor.db")).unwrap();
    let rt = manager::store::Runtime {
        state: VmState::Running,
        pid: Some(std::process::id()),
        socket: None,
        started_ms: Some(manager::store::now_ms() - 5000),
        accel: Some("emu".into()),
        reason: None,
        restarts: 3,
    };
    store.set_runtime("b", &rt, Some(true), &[]).unwrap();
    let (_, m) = scrape(&d.socket, "/metrics");
    drop(tx);
    let _ = vcpu.join();
    assert_eq!(value(&m, "rustvisor_vms_running", &[]), 1.0);
    assert_eq!(value(&m, "rustvisor_vm_up", &[("vm", "b")]), 1.0);
    assert_eq!(value(&m, "rustvisor_vm_info", &[("vm", "b"), ("state", "running"), ("accel", "emu")]), 1.0);
    assert_eq!(value(&m, "rustvisor_vm_restarts_total", &[("vm", "b")]), 3.0);
    assert!(value(&m, "rustvisor_vm_uptime_seconds", &[("vm", "b")]) >= 5.0);
    assert!(value(&m, "rustvisor_vm_cpu_seconds_total", &[("vm", "b")]) > 0.0);
    assert!(value(&m, "rustvisor_vm_resident_bytes", &[("vm", "b")]) > 0.0);
    assert!(value(&m, "rustvisor_vcpu_ready_seconds_total", &[("vm", "b"), ("vcpu", "1")]) >= 0.0);
    let cpus = value(&m, "rustvisor_host_cpus", &[]);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs();
    assert!(close(value(&m, "rustvisor_host_vcpu_overcommit_ratio", &[]), 2.0 / cpus));
    let mem = value(&m, "rustvisor_host_memory_bytes", &[]);
    assert!(close(value(&m, "rustvisor_host_memory_overcommit_ratio", &[]), 1024.0 * 1048576.0 / mem));
    // Over TCP, with the token.
    let (s, text) = d.tcp_call("GET", "/metrics", Some(TOKEN), "");
    assert_eq!(s, 200, "{text}");
    assert!(text.contains("\nrustvisor_vms ") && text.ends_with("# EOF\n"), "{text}");
}

//! The server against a mock controller: the routes against openapi.yaml, the status mapping,
//! the socket's handling, timeouts and `vmm.shutdown`.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use api::server::{serve, ServerOptions, ROUTES};
use common::*;

fn openapi() -> serde_yaml::Value {
    let text = api::types::OPENAPI_YAML.to_string();
    serde_yaml::from_str(&text).expect("openapi.yaml parses")
}

/// (METHOD, path, operation) of every operation in openapi.yaml.
fn documented_operations() -> Vec<(String, String, serde_yaml::Value)> {
    let doc = openapi();
    let paths = doc["paths"].as_mapping().expect("paths");
    let mut ops = Vec::new();
    for (path, item) in paths {
        for (method, op) in item.as_mapping().unwrap() {
            let method = method.as_str().unwrap();
            assert!(
                ["get", "put", "post", "delete", "patch", "head", "options"].contains(&method),
                "odd key {method} under {path:?}"
            );
            ops.push((method.to_ascii_uppercase(), path.as_str().unwrap().to_string(), op.clone()));
        }
    }
    ops
}

#[test]
fn openapi_lists_exactly_the_served_routes() {
    let documented: BTreeSet<(String, String)> = documented_operations().into_iter().map(|(m, p, _)| (m, p)).collect();
    let served: BTreeSet<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(ROUTES.len(), served.len(), "ROUTES has duplicates");
    let missing: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(missing.is_empty(), "served but not in openapi.yaml: {missing:?}");
    assert!(extra.is_empty(), "in openapi.yaml but not served: {extra:?}");
}

#[test]
fn openapi_refs_resolve_and_statuses_are_known() {
    let doc = openapi();
    let text = api::types::OPENAPI_YAML.to_string();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.0"));
    for line in text.lines() {
        if let Some(r) = line.trim().strip_prefix("$ref: ") {
            let r = r.trim_matches('"');
            let mut node = &doc;
            for part in r.strip_prefix("#/").expect("local ref").split('/') {
                node = &node[part];
            }
            assert!(!node.is_null(), "dangling $ref {r}");
        }
    }
    for (method, path, op) in documented_operations() {
        let responses = op["responses"].as_mapping().unwrap_or_else(|| panic!("{method} {path}: no responses"));
        let codes: Vec<&str> = responses.keys().map(|k| k.as_str().expect("quoted status")).collect();
        for c in &codes {
            assert!(
                ["200", "204", "400", "404", "405", "408", "409", "413", "415", "500"].contains(c),
                "{method} {path}: unexpected status {c}"
            );
        }
        assert!(codes.contains(&"405"), "{method} {path}: no 405");
        assert!(codes.contains(&"200") ^ codes.contains(&"204"), "{method} {path}: one success status");
        if op.get("requestBody").is_some() {
            for c in ["400", "413", "415"] {
                assert!(codes.contains(&c), "{method} {path}: a body route without {c}");
            }
        }
    }
}

#[test]
fn every_route_is_served_with_its_method() {
    let srv = TestServer::start("routes");
    assert_eq!(put(&srv.socket, "vm.create", Some(r#"{"kernel": "/k"}"#)).status, 204);
    for (method, path) in ROUTES {
        let route = path.strip_prefix("/api/v1/").unwrap();
        let body = match (*method, route) {
            (_, "vm.create") => Some(r#"{"kernel": "/k"}"#),
            (_, "vm.snapshot") => Some(r#"{"destination_url": "file:///s"}"#),
            (_, "vm.restore") => Some(r#"{"source_url": "file:///s"}"#),
            ("PUT", "vm.balloon") => Some(r#"{"target_mib": 1}"#),
            ("PUT", "vm.backup") => Some(r#"{"destination_url": "file:///b"}"#),
            _ => None,
        };
        let methods: Vec<&str> = ROUTES.iter().filter(|(_, p)| p == path).map(|(m, _)| *m).collect();
        let r = request(&srv.socket, method, route, body);
        let routing_404 = r.status == 404 && r.json()["error"].as_str().unwrap().starts_with("no such route");
        assert!(
            r.status != 405 && !routing_404,
            "{method} {path} → {} {:?}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        assert!(r.status < 500, "{method} {path} → {}", r.status);
        for other in ["GET", "PUT", "POST", "DELETE", "PATCH"] {
            if methods.contains(&other) {
                continue;
            }
            let r = request(&srv.socket, other, route, None);
            assert_eq!(r.status, 405, "{other} {path}");
            assert_eq!(r.header("allow"), Some(methods.join(", ").as_str()), "{other} {path}");
            assert!(r.json()["error"].is_string());
        }
    }
}

#[test]
fn body_routes_match_the_document() {
    let srv = TestServer::start("bodies");
    for (method, path, op) in documented_operations() {
        if method != "PUT" || path.ends_with("vmm.shutdown") {
            continue;
        }
        let route = path.strip_prefix("/api/v1/").unwrap();
        if op.get("requestBody").is_some() {
            let r = put(&srv.socket, route, None);
            assert_eq!(r.status, 400, "{path} without a body");
            assert_eq!(r.json()["field"], "body");
            assert!(r.json()["error"].as_str().unwrap().contains("needs a JSON request body"));
        } else {
            let r = put(&srv.socket, route, Some("{}"));
            assert_eq!(r.status, 400, "{path} with a body");
            assert!(r.json()["error"].as_str().unwrap().contains("takes no request body"));
        }
    }
}

fn error_of(r: &Resp) -> String {
    r.json()["error"].as_str().unwrap().to_string()
}

#[test]
fn status_mapping_through_a_vm_lifecycle() {
    let srv = TestServer::start("status");
    let s = &srv.socket;

    let r = get(s, "vmm.ping");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json()["version"], "9.9.9-test");
    assert_eq!(r.json()["pid"], 4242);

    // No VM yet: NotFound → 404.
    for route in ["vm.info", "vm.counters"] {
        let r = get(s, route);
        assert_eq!(r.status, 404, "{route}");
        assert!(error_of(&r).contains("no VM"));
    }
    assert_eq!(put(s, "vm.boot", None).status, 404);

    // The controller's BadRequest → 400 with its field.
    let r = put(s, "vm.create", Some(r#"{"kernel": "/k", "memory_mib": 8}"#));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["field"], "memory_mib");
    assert_eq!(error_of(&r), "memory_mib: at least 16 MiB");

    // Body errors name the field.
    for (body, field) in [
        (r#"{"kernel": 5}"#, "kernel"),
        (r#"{"kernel": "/k", "cpus": 256}"#, "cpus"),
        (r#"{"kernel": "/k", "cpus": "two"}"#, "cpus"),
        (r#"{"kernel": "/k", "memory_mib": 1e400}"#, "memory_mib"),
        (r#"{"kernel": "/k", "memory_mib": -1}"#, "memory_mib"),
        (r#"{"kernel": "/k", "memroy_mib": 64}"#, "memroy_mib"),
        (r#"{"cpus": 1}"#, "kernel"),
        (r#"{"kernel": "/k", "disks": [{"path": "/d", "format": ["raw"]}]}"#, "disks[0].format"),
        (r#"{"kernel": "/k", "nets": [{"tap": "t", "vlan": 3}]}"#, "nets[0].vlan"),
        (r#"{"kernel": "/k", "vsock": {"cid": 18446744073709551616, "socket": "/v"}}"#, "vsock.cid"),
        (r#"{"kernel": "/k""#, "body"),
        (r#"{"kernel": "/k"}{}"#, "body"),
        (r#"not json"#, "body"),
        (r#"["/k"]"#, "body"),
        (r#"null"#, "body"),
    ] {
        let r = put(s, "vm.create", Some(body));
        assert_eq!(r.status, 400, "{body}");
        assert_eq!(r.json()["field"], field, "{body}: {}", error_of(&r));
        let err = error_of(&r);
        assert!(err.starts_with(&format!("{field}: ")) || field == "body", "{body}: {err}");
    }

    let r = put(s, "vm.create", Some(r#"{"kernel": "/k", "disks": [{"path": "/d"}]}"#));
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());

    // Wrong transitions → 409 with the state.
    let r = put(s, "vm.create", Some(r#"{"kernel": "/k"}"#));
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["state"], "Created");
    let r = put(s, "vm.resume", None);
    assert_eq!(r.status, 409);
    assert_eq!(error_of(&r), "resume is not allowed while the VM is Created");

    assert_eq!(put(s, "vm.boot", None).status, 204);
    let r = get(s, "vm.info");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["state"], "Running");
    assert_eq!(r.json()["config"]["disks"][0]["path"], "/d");
    assert_eq!(r.json()["config"]["memory_mib"], 512);
    let r = get(s, "vm.counters");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["devices"]["disk0"]["requests"], 10);
    assert_eq!(put(s, "vm.reboot", None).status, 204);

    // Snapshot needs Paused.
    assert_eq!(put(s, "vm.snapshot", Some(r#"{"destination_url": "file:///snap"}"#)).status, 409);
    assert_eq!(put(s, "vm.pause", None).status, 204);
    assert_eq!(put(s, "vm.pause", None).status, 409);
    for bad in ["snap", "/snap", "file://snap", "file://host/snap", "http:///snap", "file:///a%zz", ""] {
        let r = put(s, "vm.snapshot", Some(&format!(r#"{{"destination_url": "{bad}"}}"#)));
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.json()["field"], "destination_url");
        assert!(error_of(&r).contains("file:///"), "{}", error_of(&r));
    }
    let r = put(s, "vm.snapshot", Some(r#"{"destination_url": "file:///s", "compress": true}"#));
    assert_eq!((r.status, r.json()["field"].as_str()), (400, Some("compress")));
    let r = put(s, "vm.snapshot", Some(r#"{"source_url": "file:///s"}"#));
    assert_eq!(r.status, 400);
    assert_eq!(put(s, "vm.snapshot", Some(r#"{"destination_url": "file:///snap%20dir/x"}"#)).status, 204);
    assert_eq!(put(s, "vm.snapshot", Some(r#"{"destination_url": "file://localhost/snap2"}"#)).status, 204);
    assert_eq!(*srv.mock.snapshots.lock().unwrap(), ["/snap dir/x", "/snap2"]);
    // The controller's Internal → 500.
    let r = put(s, "vm.snapshot", Some(r#"{"destination_url": "file:///fail"}"#));
    assert_eq!(r.status, 500);
    assert!(error_of(&r).contains("read-only file system"));

    // Restore needs no VM.
    let r = put(s, "vm.restore", Some(r#"{"source_url": "file:///snap"}"#));
    assert_eq!((r.status, r.json()["state"].as_str()), (409, Some("Paused")));
    assert_eq!(put(s, "vm.resume", None).status, 204);
    assert_eq!(put(s, "vm.shutdown", None).status, 204);
    assert_eq!(put(s, "vm.delete", None).status, 204);
    assert_eq!(put(s, "vm.delete", None).status, 404);
    let r = put(s, "vm.restore", Some(r#"{"source_url": "snap"}"#));
    assert_eq!((r.status, r.json()["field"].as_str()), (400, Some("source_url")));
    assert_eq!(put(s, "vm.restore", Some(r#"{"source_url": "file:///snap"}"#)).status, 204);
    assert_eq!(get(s, "vm.info").json()["state"], "Paused");
}

#[test]
fn routing_and_framing_errors() {
    let srv = TestServer::start("framing");
    let s = &srv.socket;
    for path in ["/", "/api/v1/", "/api/v1/vm.nope", "/api/v2/vm.info", "/api/v1/vm.info/", "/API/V1/VM.INFO"] {
        let r = raw(s, format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).unwrap();
        assert_eq!(r.status, 404, "{path}");
        assert!(error_of(&r).starts_with("no such route"));
    }
    // A query string does not change the route.
    assert_eq!(raw(s, b"GET /api/v1/vmm.ping?x=1 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap().status, 200);
    // HTTP/1.0 works too.
    assert_eq!(raw(s, b"GET /api/v1/vmm.ping HTTP/1.0\r\n\r\n").unwrap().status, 200);

    // 413: by Content-Length (the body never read) and by a chunked body that grows too large.
    let big = format!(r#"{{"kernel": "{}"}}"#, "k".repeat(70_000));
    let r = raw(
        s,
        format!(
            "PUT /api/v1/vm.create HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{big}",
            big.len()
        )
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 413);
    assert!(error_of(&r).contains("65536"));
    let mut chunked =
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for _ in 0..20 {
        chunked.extend_from_slice(format!("{:x}\r\n{}\r\n", 8192, "x".repeat(8192)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(raw(s, &chunked).unwrap().status, 413);
    // Just under the limit is read (and then refused as a bad value, not as too large).
    let body = format!(r#"{{"kernel": 1, "cmdline": "{}"}}"#, "c".repeat(60_000));
    assert_eq!(put(s, "vm.create", Some(&body)).status, 400);

    // 415: a body that is not declared JSON.
    for ct in ["text/plain", "application/x-www-form-urlencoded", "application/jsonx"] {
        let body = r#"{"kernel": "/k"}"#;
        let req = format!(
            "PUT /api/v1/vm.create HTTP/1.1\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(raw(s, req.as_bytes()).unwrap().status, 415, "{ct}");
    }
    let body = r#"{"kernel": "/k"}"#;
    let req = format!("PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    assert_eq!(raw(s, req.as_bytes()).unwrap().status, 415, "no Content-Type");
    let req = format!(
        "PUT /api/v1/vm.create HTTP/1.1\r\nContent-Type: Application/JSON; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(raw(s, req.as_bytes()).unwrap().status, 204, "JSON with a charset");

    // Garbage framing: hyper's own 4xx.
    for req in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /api/v1/vmm.ping HTTP/9.9\r\n\r\n",
        b"PUT /api/v1/vm.boot HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
        b"PUT /api/v1/vm.boot HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nBad Header\r\n\r\n",
    ] {
        let r = raw(s, req).unwrap_or_else(|| panic!("no answer to {:?}", String::from_utf8_lossy(req)));
        assert!((400..500).contains(&r.status), "{:?} → {}", String::from_utf8_lossy(req), r.status);
    }
}

#[test]
fn a_panicking_controller_is_a_500_and_the_server_goes_on() {
    let srv = TestServer::start("panic");
    srv.mock.panic.store(true, Ordering::SeqCst);
    for (method, route) in [("GET", "vmm.ping"), ("GET", "vm.info"), ("PUT", "vm.boot")] {
        let r = request(&srv.socket, method, route, None);
        assert_eq!(r.status, 500, "{route}");
        assert!(error_of(&r).contains(route), "{}", error_of(&r));
    }
    srv.mock.panic.store(false, Ordering::SeqCst);
    assert_eq!(get(&srv.socket, "vmm.ping").status, 200);
}

#[test]
fn socket_is_0600_and_removed_on_drop() {
    let srv = TestServer::start("mode");
    let mode = std::fs::metadata(&srv.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    let mut srv = srv;
    let handle = srv.handle.take().unwrap();
    assert_eq!(handle.socket(), srv.socket);
    handle.stop();
    assert!(!srv.socket.exists(), "socket left behind");
    assert!(std::os::unix::net::UnixStream::connect(&srv.socket).is_err());
}

#[test]
fn stale_socket_is_replaced_and_live_one_refused() {
    let dir = TempDir::new("stale");
    let path = dir.path().join("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "a closed listener leaves its socket file");
    let mock = Mock::new();
    let handle = serve(&path, mock.clone()).expect("replaces a stale socket");
    assert_eq!(get(&path, "vmm.ping").status, 200);

    let err = serve(&path, Mock::new()).expect_err("another server listens");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    assert!(err.to_string().contains("api.sock"), "{err}");
    assert_eq!(get(&path, "vmm.ping").status, 200, "the first server still serves");
    drop(handle);

    let file = dir.path().join("regular");
    std::fs::write(&file, b"keep me").unwrap();
    let err = serve(&file, Mock::new()).expect_err("not a socket");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    let err = serve(&dir.path().join("no/such/dir/api.sock"), Mock::new()).expect_err("no directory");
    assert!(err.to_string().contains("no/such/dir"), "{err}");
}

#[test]
fn vmm_shutdown_answers_before_it_stops_the_vmm() {
    let srv = TestServer::start("vmmshutdown");
    // A VMM that does not stop until told: if the server called it before answering, this
    // test would get no answer (and fail on its read timeout).
    srv.mock.hold_vmm_shutdown.store(true, Ordering::SeqCst);
    let mut conn = connect(&srv.socket);
    conn.write_all(b"PUT /api/v1/vmm.shutdown HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    // No half-close: the server itself closes the connection after the 204.
    let r = parse_response(&read_all(&mut conn)).unwrap();
    assert_eq!(r.status, 204);
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(srv.mock.vmm_shutdowns.load(Ordering::SeqCst), 0);
    srv.mock.release_vmm_shutdown();
    let deadline = Instant::now() + Duration::from_secs(5);
    while srv.mock.vmm_shutdowns.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "vmm_shutdown never called");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(srv.mock.vmm_shutdowns.load(Ordering::SeqCst), 1);
}

#[test]
fn keep_alive_serves_several_requests() {
    let srv = TestServer::start("keepalive");
    let mut conn = connect(&srv.socket);
    conn.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\nGET /api/v1/vm.nope HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let all = String::from_utf8(read_all(&mut conn)).unwrap();
    assert!(all.starts_with("HTTP/1.1 200"), "{all}");
    assert!(all.contains("HTTP/1.1 404"), "{all}");
}

#[test]
fn stalled_clients_time_out_and_do_not_block_others() {
    let timeout = Duration::from_secs(2);
    let srv = TestServer::start_with("stall", ServerOptions { read_timeout: timeout, ..Default::default() });
    let t0 = Instant::now();
    // Idle, half a request line, half the headers, the headers but half the body.
    let partials: Vec<&[u8]> = vec![
        b"",
        b"GET /api/v1/vm",
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n",
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"kernel\"",
    ];
    let mut conns: Vec<_> = (0..8)
        .flat_map(|_| partials.iter())
        .map(|p| {
            let mut c = connect(&srv.socket);
            c.write_all(p).unwrap();
            c
        })
        .collect();
    // Others are served at once.
    for _ in 0..5 {
        assert_eq!(get(&srv.socket, "vmm.ping").status, 200);
    }
    assert!(t0.elapsed() < timeout * 3 / 4, "served only after {:?}", t0.elapsed());
    // The stalled ones are closed (or answered 408 for the body) after the read timeout.
    for (i, c) in conns.iter_mut().enumerate() {
        let got = parse_response(&read_all(c));
        if i % partials.len() == 3 {
            assert_eq!(got.map(|r| r.status), Some(408));
        } else {
            assert!(got.is_none(), "{got:?}");
        }
    }
    let waited = t0.elapsed();
    assert!(waited >= timeout && waited < timeout * 5, "{waited:?}");
    assert_eq!(get(&srv.socket, "vmm.ping").status, 200);
}

#[test]
fn balloon_routes() {
    let srv = TestServer::start("balloon");
    let s = &srv.socket;
    assert_eq!(get(s, "vm.balloon").status, 404, "no VM");
    assert_eq!(put(s, "vm.balloon", Some(r#"{"target_mib": 1}"#)).status, 404);
    // A VM without a balloon: 409 naming the missing device, with the state.
    assert_eq!(put(s, "vm.create", Some(r#"{"kernel": "/k"}"#)).status, 204);
    let r = get(s, "vm.balloon");
    assert_eq!((r.status, r.json()["state"].as_str()), (409, Some("Created")));
    assert_eq!(put(s, "vm.boot", None).status, 204);
    for r in [get(s, "vm.balloon"), put(s, "vm.balloon", Some(r#"{"target_mib": 1}"#))] {
        assert_eq!((r.status, r.json()["state"].as_str()), (409, Some("Running")));
        assert_eq!(error_of(&r), "vm.balloon: the VM has no balloon device (add one with \"balloon\" at vm.create)");
    }
    assert_eq!(put(s, "vm.delete", None).status, 204);
    let cfg = r#"{"kernel": "/k", "memory_mib": 512, "balloon": {"stats_interval_s": 2}}"#;
    assert_eq!(put(s, "vm.create", Some(cfg)).status, 204);
    assert_eq!(get(s, "vm.info").json()["config"]["balloon"]["deflate_on_oom"], true, "defaults filled in");
    assert_eq!(put(s, "vm.boot", None).status, 204);
    for (body, field) in [
        (r#"{"target_mib": 513}"#, "target_mib"),
        (r#"{"target_mib": "256M"}"#, "target_mib"),
        (r#"{"target_mib": -1}"#, "target_mib"),
        (r#"{}"#, "target_mib"),
        (r#"{"target_mib": 1, "now": true}"#, "now"),
        (r#"[256]"#, "body"),
    ] {
        let r = put(s, "vm.balloon", Some(body));
        assert_eq!((r.status, r.json()["field"].as_str()), (400, Some(field)), "{body}: {}", error_of(&r));
    }
    assert_eq!(put(s, "vm.balloon", None).status, 400, "PUT needs a body");
    assert_eq!(put(s, "vm.balloon", Some(r#"{"target_mib": 256}"#)).status, 204);
    let r = get(s, "vm.balloon");
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!((j["target_mib"].as_u64(), j["actual_mib"].as_u64()), (Some(256), Some(128)));
    assert_eq!(j["stats"]["total_bytes"], 512u64 << 20);
    assert!(j["stats"].get("swap_in_bytes").is_none(), "unreported values are absent: {j}");
    assert_eq!(j["stats_age_s"], 1.25);
    assert_eq!(put(s, "vm.pause", None).status, 204);
    assert_eq!(put(s, "vm.balloon", Some(r#"{"target_mib": 0}"#)).status, 204, "a paused VM too");
}

#[test]
fn backup_routes_and_statuses() {
    let srv = TestServer::start("backup");
    let s = &srv.socket;
    let body = r#"{"destination_url": "file:///backups/b%201", "rate_limit_mib_s": 8}"#;
    assert_eq!(put(s, "vm.backup", Some(body)).status, 404, "no VM");
    assert_eq!(get(s, "vm.backup").status, 404);
    assert_eq!(request(s, "DELETE", "vm.backup", None).status, 404);
    assert_eq!(put(s, "vm.create", Some(r#"{"kernel": "/k"}"#)).status, 204);
    let r = put(s, "vm.backup", Some(body));
    assert_eq!((r.status, r.json()["state"].as_str()), (409, Some("Created")));
    assert_eq!(put(s, "vm.boot", None).status, 204);
    // Bad bodies: the field named.
    for (bad, field) in [
        (r#"{"destination_url": "/b"}"#, "destination_url"),
        (r#"{"destination_url": "file:///b", "rate_limit_mib_s": -1}"#, "rate_limit_mib_s"),
        (r#"{"destination_url": "file:///b", "rate_limit_mib_s": "fast"}"#, "rate_limit_mib_s"),
        (r#"{"destination_url": "file:///b", "compress": true}"#, "compress"),
        (r#"{}"#, "destination_url"),
    ] {
        let r = put(s, "vm.backup", Some(bad));
        assert_eq!((r.status, r.json()["field"].as_str()), (400, Some(field)), "{bad}");
    }
    assert_eq!(put(s, "vm.backup", None).status, 400, "PUT needs a body");
    let r = put(s, "vm.backup", Some(body));
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!((j["destination"].as_str(), j["state"].as_str()), (Some("/backups/b 1"), Some("running")));
    assert_eq!(j["disks"][0]["target"], "/backups/b 1/disk0.raw");
    assert_eq!(srv.mock.backup.lock().unwrap().as_ref().unwrap().1, Some(8));
    let r = put(s, "vm.backup", Some(body));
    assert_eq!(r.status, 409, "a backup runs already");
    let r = get(s, "vm.backup");
    assert_eq!((r.status, r.json()["disks"][0]["state"].as_str()), (200, Some("running")));
    let r = request(s, "DELETE", "vm.backup", None);
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    assert_eq!(get(s, "vm.backup").json()["state"], "cancelled");
    assert_eq!(request(s, "DELETE", "vm.backup", None).status, 204, "cancelling a finished backup is a no-op");
    // Without a rate limit.
    let r = put(s, "vm.backup", Some(r#"{"destination_url": "file:///b2"}"#));
    assert_eq!(r.status, 200);
    assert_eq!(srv.mock.backup.lock().unwrap().as_ref().unwrap().1, None);
    // Other methods: 405 naming all three.
    let r = request(s, "POST", "vm.backup", None);
    assert_eq!((r.status, r.header("allow")), (405, Some("PUT, GET, DELETE")));
}

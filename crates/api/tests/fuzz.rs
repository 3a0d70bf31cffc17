//! Fuzzing the server with a few thousand hostile requests: random bytes, truncated requests,
//! bad JSON, wrong types, huge numbers, unknown fields, MB-sized bodies, long URLs and headers,
//! and slowloris-style clients. Every answer must be a 4xx (a 2xx only where the request is in
//! fact valid), never a 5xx, never a hang (every test socket has a read timeout), and the
//! server must still answer `GET vmm.ping` at the end.

mod common;

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use api::server::{ServerOptions, ROUTES};
use common::*;

/// Seed from `API_FUZZ_SEED` or a fixed one; printed so a failure can be replayed.
fn seed() -> u64 {
    let seed = std::env::var("API_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_1234_abcd_0001);
    eprintln!("API_FUZZ_SEED={seed}");
    seed
}

fn show(req: &[u8]) -> String {
    let s = String::from_utf8_lossy(&req[..req.len().min(200)]).into_owned();
    if req.len() > 200 {
        format!("{s:?}... ({} bytes)", req.len())
    } else {
        format!("{s:?}")
    }
}

/// Tally of what came back.
#[derive(Default, Debug)]
struct Tally {
    sent: usize,
    closed_without_answer: usize,
    by_status: std::collections::BTreeMap<u16, usize>,
}

impl Tally {
    /// Sends `req`; an answer must satisfy `ok`; returns it.
    fn send(&mut self, srv: &TestServer, req: &[u8], ok: impl Fn(u16) -> bool) -> Option<Resp> {
        self.sent += 1;
        let r = raw(&srv.socket, req);
        match &r {
            None => self.closed_without_answer += 1,
            Some(r) => {
                *self.by_status.entry(r.status).or_default() += 1;
                assert!(
                    ok(r.status),
                    "{} {:?} for {}",
                    r.status,
                    String::from_utf8_lossy(&r.body[..r.body.len().min(300)]),
                    show(req)
                );
            }
        }
        r
    }
}

fn is_4xx(s: u16) -> bool {
    (400..500).contains(&s)
}

fn not_5xx(s: u16) -> bool {
    (200..500).contains(&s)
}

fn put_json(route: &str, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "PUT /api/v1/{route} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

const VALID_CONFIG: &str = r#"{"kernel": "/boot/vmlinuz", "initrd": "/boot/initrd", "cmdline": "console=ttyS0 quiet", "memory_mib": 256, "cpus": 2, "accel": "emu", "serial": "null", "console": "null", "disks": [{"path": "/d0", "format": "raw", "readonly": true, "serial": "abc"}], "nets": [{"tap": "tap0", "mac": "52:54:00:12:34:56"}], "vsock": {"cid": 3, "socket": "/v.sock"}, "rng": true}"#;

/// Valid requests, to truncate and mutate.
fn valid_requests() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = ROUTES
        .iter()
        .filter(|(_, p)| !p.ends_with("vm.create") && !p.ends_with("vm.snapshot") && !p.ends_with("vm.restore"))
        .map(|(m, p)| format!("{m} {p} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: fuzz\r\n\r\n").into_bytes())
        .collect();
    v.push(put_json("vm.create", VALID_CONFIG.as_bytes()));
    v.push(put_json("vm.snapshot", br#"{"destination_url": "file:///tmp/snap"}"#));
    v.push(put_json("vm.restore", br#"{"source_url": "file:///tmp/snap"}"#));
    let mut chunked =
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for part in VALID_CONFIG.as_bytes().chunks(50) {
        chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    v.push(chunked);
    v
}

/// A VmConfig body with one bad value, and the field a 400 must name.
fn bad_config(rng: &mut Rng) -> (String, String) {
    const WRONG_FOR_INT: &[&str] = &[
        r#""512""#,
        "-1",
        "1.5",
        "1e400",
        "-1e400",
        "18446744073709551616",
        "99999999999999999999999999",
        "[]",
        "{}",
        "true",
        "null",
    ];
    const WRONG_FOR_STRING: &[&str] = &["1", "-0.5", "[]", "[\"a\"]", "{}", "true", "false"];
    let (field, value, expect): (&str, String, String) = match rng.below(9) {
        0 => {
            let f = *rng.pick(&["memory_mib", "cpus"]);
            let mut wrong: Vec<&str> = WRONG_FOR_INT.to_vec();
            if f == "cpus" {
                wrong.extend(["256", "65536", "4294967296"]);
            }
            (f, rng.pick(&wrong).to_string(), f.into())
        }
        1 => {
            let f = *rng.pick(&["kernel", "cmdline", "accel", "serial", "initrd", "console"]);
            let mut wrong: Vec<&str> = WRONG_FOR_STRING.to_vec();
            if !["initrd", "console"].contains(&f) {
                wrong.push("null");
            }
            (f, rng.pick(&wrong).to_string(), f.into())
        }
        2 => ("rng", rng.pick(&["1", r#""true""#, "null", "[]"]).to_string(), "rng".into()),
        3 => {
            let (v, e) = rng.pick(&[
                ("{}", "disks"),
                (r#""d""#, "disks"),
                ("[1]", "disks[0]"),
                ("[{}]", "disks[0].path"),
                (r#"[{"path": "/d", "readonly": "yes"}]"#, "disks[0].readonly"),
                (r#"[{"path": "/d"}, {"path": "/e", "format": 1}]"#, "disks[1].format"),
                (r#"[{"path": "/d", "size": 1}]"#, "disks[0].size"),
            ]);
            ("disks", v.to_string(), e.to_string())
        }
        4 => {
            let (v, e) = rng.pick(&[
                (r#"[{"tap": 0}]"#, "nets[0].tap"),
                (r#"[{"mac": "52:54:00:00:00:01"}]"#, "nets[0].tap"),
                (r#"[{"tap": "t", "queues": 4}]"#, "nets[0].queues"),
                (r#""tap0""#, "nets"),
            ]);
            ("nets", v.to_string(), e.to_string())
        }
        5 => {
            let (v, e) = rng.pick(&[
                (r#"{"cid": -3, "socket": "/v"}"#, "vsock.cid"),
                (r#"{"cid": 1e400, "socket": "/v"}"#, "vsock.cid"),
                (r#"{"cid": 18446744073709551616, "socket": "/v"}"#, "vsock.cid"),
                (r#"{"cid": 3}"#, "vsock.socket"),
                (r#"{"cid": 3, "socket": "/v", "port": 1}"#, "vsock.port"),
                ("7", "vsock"),
            ]);
            ("vsock", v.to_string(), e.to_string())
        }
        _ => {
            // An unknown field with a random (but JSON-safe) name.
            let name: String = (0..1 + rng.below(20)).map(|_| (b'a' + rng.below(26) as u8) as char).collect();
            let name = format!("x_{name}");
            let value = rng.pick(&["1", "null", r#""v""#, "[]", "{}"]).to_string();
            return (format!(r#"{{"kernel": "/k", "{name}": {value}}}"#), name);
        }
    };
    let body = if field == "kernel" {
        format!(r#"{{"kernel": {value}}}"#)
    } else {
        format!(r#"{{"kernel": "/k", "{field}": {value}}}"#)
    };
    (body, expect)
}

/// A few random edits: flip, insert, delete, duplicate.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(5) {
        if v.is_empty() {
            v.push(rng.next() as u8);
            continue;
        }
        let i = rng.below(v.len());
        match rng.below(5) {
            0 => v[i] = rng.next() as u8,
            1 => v.insert(i, *rng.pick(b"{}[]\",:0123456789-eE.tfn\\ \x00\xff")),
            2 => {
                v.remove(i);
            }
            3 => {
                let j = (i + rng.below(20)).min(v.len());
                let seg = v[i..j].to_vec();
                v.splice(i..i, seg);
            }
            _ => v.truncate(i),
        }
    }
    v
}

#[test]
fn fuzz_requests_get_4xx_and_the_server_survives() {
    let srv = TestServer::start("fuzz");
    let mut rng = Rng::new(seed());
    let mut t = Tally::default();
    let valid = valid_requests();

    // 1. Random bytes.
    for _ in 0..600 {
        let n = rng.below(3000);
        let req = rng.bytes(n);
        t.send(&srv, &req, is_4xx);
    }
    // 2. A valid request line, then random bytes.
    for _ in 0..300 {
        let mut req = rng.pick(&valid)[..].split(|&b| b == b'\n').next().unwrap().to_vec();
        req.push(b'\n');
        let n = rng.below(2000);
        req.extend(rng.bytes(n));
        t.send(&srv, &req, is_4xx);
    }
    // 3. Truncated valid requests.
    for _ in 0..600 {
        let full = rng.pick(&valid);
        let cut = rng.below(full.len());
        t.send(&srv, &full[..cut], is_4xx);
    }
    // 4. Mutated requests (heads and bodies): a mutation may leave them valid, so 2xx is fine.
    for _ in 0..600 {
        let base = rng.pick(&valid).clone();
        let req = mutate(&mut rng, &base);
        t.send(&srv, &req, not_5xx);
    }
    // 5. Mutated JSON bodies with a correct head.
    for _ in 0..700 {
        let body = mutate(&mut rng, VALID_CONFIG.as_bytes());
        let r = t.send(&srv, &put_json("vm.create", &body), not_5xx);
        let r = r.unwrap_or_else(|| panic!("no answer for body {}", show(&body)));
        if r.status == 400 {
            let field = r.json()["field"].as_str().map(str::to_string);
            assert!(field.is_some_and(|f| !f.is_empty()), "400 without a field for {}: {:?}", show(&body), r.json());
        }
    }
    // 6. Wrong types, out-of-range numbers, unknown fields: a 400 naming the field.
    for _ in 0..700 {
        let (body, field) = bad_config(&mut rng);
        let r = t.send(&srv, &put_json("vm.create", body.as_bytes()), |s| s == 400).unwrap();
        assert_eq!(r.json()["field"].as_str(), Some(field.as_str()), "{body}: {:?}", r.json());
        let msg = r.json()["error"].as_str().unwrap().to_string();
        assert!(msg.starts_with(&format!("{field}: ")), "{body}: {msg}");
    }
    for (route, key) in [("vm.snapshot", "destination_url"), ("vm.restore", "source_url")] {
        for value in ["1", "null", "[]", "{}", r#""rel/dir""#, r#""file:dir""#, r#""http://x/y""#, r#""file://h/x""#] {
            let body = format!(r#"{{"{key}": {value}}}"#);
            let r = t.send(&srv, &put_json(route, body.as_bytes()), |s| s == 400).unwrap();
            assert_eq!(r.json()["field"].as_str(), Some(key), "{body}");
        }
        let body = format!(r#"{{"{key}": "file:///x", "extra": 1}}"#);
        let r = t.send(&srv, &put_json(route, body.as_bytes()), |s| s == 400).unwrap();
        assert_eq!(r.json()["field"].as_str(), Some("extra"));
    }
    // Deep nesting (serde_json's recursion limit), a body of whitespace, of NULs, not UTF-8.
    for body in [
        format!(r#"{{"kernel": {}{}}}"#, "[".repeat(20_000), "]".repeat(20_000)).into_bytes(),
        b" ".repeat(60_000),
        vec![0u8; 1000],
        b"{\"kernel\": \"\xff\xfe\"}".to_vec(),
        b"\xef\xbb\xbf{\"kernel\": \"/k\"}".to_vec(),
    ] {
        t.send(&srv, &put_json("vm.create", &body), |s| s == 400);
    }
    // 7. Methods and paths.
    let methods = ["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "FOO", "get", "P\x01T"];
    for _ in 0..500 {
        let method = *rng.pick(&methods);
        let (_, base) = *rng.pick(ROUTES);
        let path = match rng.below(8) {
            0 => base.to_string(),
            1 => format!("{base}{}", rng.pick(&["/", "x", "%00", "/..", "?a=b", "#frag", "//"])),
            2 => base.to_ascii_uppercase(),
            3 => {
                let prefix: &&str = rng.pick(&["/api/v1//", "/api/v2/", "/api/", "//api/v1/", "/api/v1/../v1/"]);
                base.replacen("/api/v1/", prefix, 1)
            }
            4 => format!("/api/v1/{}", String::from_utf8_lossy(&rng.bytes_upto(30)).replace(['\r', '\n', ' '], "_")),
            5 => "*".to_string(),
            6 => format!("http://localhost{base}"),
            _ => String::from_utf8_lossy(&rng.bytes_upto(50)).replace(['\r', '\n'], "") + "x",
        };
        // A variant of a route with its own method may still be that route (a query string,
        // the absolute form): any answer but a 5xx. Anything else is a 4xx.
        let valid_route = ROUTES.iter().any(|(m, p)| *m == method && *p == base);
        let req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        t.send(&srv, req.as_bytes(), |s| if valid_route { not_5xx(s) } else { is_4xx(s) });
    }
    // 8. Odd headers on a valid body.
    let odd_headers = [
        "Content-Type: text/json",
        "Content-Type: \u{1}",
        "Content-Type:",
        "Content-Length: -1",
        "Content-Length: 18446744073709551616",
        "Content-Length: 0x10",
        "Transfer-Encoding: gzip",
        "Transfer-Encoding: chunked, chunked",
        "Expect: 100-continue",
        "Expect: teapot",
        "Connection: upgrade\r\nUpgrade: websocket",
        "Host: a\r\nHost: b",
        "X-\u{ff}: y",
        " Leading-Space: x",
        "No-Colon",
    ];
    for _ in 0..300 {
        let h = *rng.pick(&odd_headers);
        let body = r#"{"destination_url": "file:///x"}"#;
        let req = format!(
            "PUT /api/v1/vm.snapshot HTTP/1.1\r\nContent-Type: application/json\r\n{h}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        t.send(&srv, req.as_bytes(), not_5xx);
    }
    for n in [101usize, 500, 5000] {
        let mut req = "GET /api/v1/vmm.ping HTTP/1.1\r\n".to_string();
        for i in 0..n {
            req += &format!("X-H{i}: v\r\n");
        }
        req += "\r\n";
        t.send(&srv, req.as_bytes(), is_4xx);
    }
    // 9. Long URLs and headers.
    for len in [8_000usize, 20_000, 70_000, 300_000, 2_000_000] {
        let url = format!("/api/v1/{}", "a".repeat(len));
        t.send(&srv, format!("GET {url} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(), is_4xx);
        let hdr = format!("GET /api/v1/vmm.ping HTTP/1.1\r\nX-Long: {}\r\n\r\n", "v".repeat(len));
        let r = t.send(&srv, hdr.as_bytes(), |s| if len < 8192 { not_5xx(s) } else { is_4xx(s) });
        if len > 16 * 1024 {
            assert!(r.is_some(), "no answer to a {len}-byte header");
        }
    }
    // 10. Bodies of megabytes: by Content-Length and chunked.
    for mb in [1usize, 3, 8] {
        let body = vec![b'x'; mb << 20];
        let r = t.send(&srv, &put_json("vm.create", &body), |s| s == 413);
        assert!(r.is_some(), "no 413 for {mb} MB");
        let mut chunked =
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec();
        for part in body.chunks(1 << 16) {
            chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            chunked.extend_from_slice(part);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        t.send(&srv, &chunked, |s| s == 413);
        // On a route that takes no body, too.
        let r = t.send(&srv, &put_json("vm.pause", &body), |s| s == 413);
        assert!(r.is_some());
    }

    eprintln!("{t:?}");
    assert!(t.sent >= 3000, "only {} requests", t.sent);
    assert_eq!(t.by_status.keys().filter(|s| **s >= 500).count(), 0);
    assert!(!srv.mock.panic.load(Ordering::SeqCst));
    let r = get(&srv.socket, "vmm.ping");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["version"], "9.9.9-test");
}

#[test]
fn slowloris_clients_are_cut_off_and_others_served() {
    let timeout = Duration::from_secs(3);
    let srv = TestServer::start_with("slowloris", ServerOptions { read_timeout: timeout, ..Default::default() });
    let socket = srv.socket.clone();
    let requests: [&[u8]; 3] = [
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n",
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{\"kernel\": \"/kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk\"}",
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n1\r\n \r\n1\r\n \r\n1\r\n \r\n1\r\n \r\n1\r\n \r\n1\r\n \r\n1\r\n \r\n1\r\n \r\n1\r\n \r\n",
    ];
    let t0 = Instant::now();
    let slow: Vec<_> = (0..24)
        .map(|i| {
            let socket = socket.clone();
            let req = requests[i % requests.len()];
            std::thread::spawn(move || {
                // One byte every 50 ms: the head (or body) takes far longer than the 3 s the
                // server allows, though bytes keep coming.
                let mut c = connect(&socket);
                let started = Instant::now();
                for b in req {
                    if c.write_all(&[*b]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                    if started.elapsed() > Duration::from_secs(15) {
                        panic!("the server never cut off a slow client");
                    }
                }
                let _ = c.shutdown(std::net::Shutdown::Write);
                let answer = parse_response(&read_all(&mut c));
                (i % requests.len(), answer.map(|r| r.status), started.elapsed())
            })
        })
        .collect();
    // Meanwhile others are served promptly.
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(get(&socket, "vmm.ping").status, 200);
        // Well under the read timeout: the ping did not wait for the slow clients.
        assert!(t.elapsed() < timeout / 2, "ping took {:?}", t.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    for h in slow {
        let (kind, status, took) = h.join().unwrap();
        match kind {
            0 => assert_eq!(status, None, "slow head"),
            _ => assert!(status == Some(408) || status.is_none(), "slow body: {status:?}"),
        }
        assert!(took >= timeout && took < timeout * 3, "slow client {kind} lasted {took:?}");
    }
    assert!(t0.elapsed() < timeout * 4);
    assert_eq!(get(&socket, "vmm.ping").status, 200);
}

#[test]
fn many_connections_at_once() {
    let srv = TestServer::start("many");
    let socket = srv.socket.clone();
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(1000 + w);
                for _ in 0..100 {
                    match rng.below(3) {
                        0 => assert_eq!(get(&socket, "vmm.ping").status, 200),
                        1 => assert!(is_4xx(raw(&socket, &rng.bytes(200)).map_or(400, |r| r.status))),
                        _ => assert_eq!(put(&socket, "vm.create", Some(r#"{"kernel": 1}"#)).status, 400),
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(get(&socket, "vmm.ping").status, 200);
}

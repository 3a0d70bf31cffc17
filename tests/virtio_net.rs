//! virtio-net with the stock Debian guest on `emu`: the test makes a network namespace with
//! a TAP device and an address, runs the VMM and a small HTTP server inside it, and the guest
//! configures eth0, pings the host side and fetches a file whose digest it reports.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

const HOST_IP: &str = "10.0.2.1";
const GUEST_IP: &str = "10.0.2.15";

/// A network namespace, deleted when dropped.
struct NetNs(String);

impl NetNs {
    fn new(name: &str) -> NetNs {
        let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
        host("ip", &["netns", "add", name]);
        NetNs(name.to_string())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Serves `body` for every GET on `HOST_IP:port` inside namespace `ns`, from a thread that
/// joined the namespace (setns(2) is per thread).
fn http_server(ns: &str, port: u16, body: Vec<u8>) {
    let ns_file = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns file");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: setns only switches this thread's network namespace to the one `ns_file`
        // refers to; the descriptor stays open for the call.
        let r = unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        let l = TcpListener::bind((HOST_IP, port)).expect("bind in netns");
        tx.send(()).unwrap();
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                line.clear();
            }
            let hdr = format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
                body.len()
            );
            let _ = c.write_all(hdr.as_bytes()).and_then(|_| c.write_all(&body));
        }
    });
    rx.recv().unwrap();
}

#[test]
fn guest_pings_host_and_fetches_over_http() {
    let ns = NetNs::new(&format!("rvtest{}", std::process::id()));
    let tap = "rvtap0";
    host("ip", &["-n", &ns.0, "tuntap", "add", tap, "mode", "tap"]);
    host("ip", &["-n", &ns.0, "addr", "add", &format!("{HOST_IP}/24"), "dev", tap]);
    host("ip", &["-n", &ns.0, "link", "set", tap, "up"]);
    host("ip", &["-n", &ns.0, "link", "set", "lo", "up"]);
    let body = pattern(3 << 20, 11);
    let digest = sha256_hex(&body);
    http_server(&ns.0, 8080, body);

    let dir = TempDir::new("net");
    let script = format!(
        r#"
ip link set eth0 up
ip addr add {GUEST_IP}/24 dev eth0
echo "RV-MAC $(cat /sys/class/net/eth0/address)"
ping -c 3 -W 5 {HOST_IP} && echo RV-PING-OK
wget -q -O /tmp/f http://{HOST_IP}:8080/file && echo "RV-HTTP $(sha256sum /tmp/f)"
echo RV-END
"#
    );
    let extra = ["--net".to_string(), format!("tap={tap},mac=52:54:00:12:34:56")];
    let cmd = guest_command(&script, &dir.path("console.log"), &extra);
    // The VMM runs in the namespace, where the TAP is.
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let console = std::fs::read_to_string(dir.path("console.log")).unwrap_or_default();
    let (t, stderr) = (tail(&console), String::from_utf8_lossy(&out.stderr));
    assert!(console.contains("RV-END"), "workload did not finish; stderr: {stderr}\n{t}");
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}\n{t}");
    assert_eq!(console_value(&console, "RV-MAC"), Some("52:54:00:12:34:56"), "{t}");
    assert!(console.contains("RV-PING-OK"), "ping failed:\n{t}");
    assert_eq!(console_value(&console, "RV-HTTP"), Some(digest.as_str()), "HTTP fetch:\n{t}");
}

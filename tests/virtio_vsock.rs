//! virtio-vsock with the stock Debian guest on `emu`, host side on Unix sockets
//! (Firecracker's convention): the guest connects to host port 5000 (`<socket>_5000`, an echo
//! server here), and the host connects to guest port 1234 by writing `CONNECT 1234\n` to the
//! socket; both directions echo.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Stdio;
use std::time::Duration;

#[test]
fn echo_both_ways_over_vsock() {
    let dir = TempDir::new("vsock");
    let sock = dir.path("v.sock");
    // Host port 5000: an echo server on <socket>_5000.
    let listener = UnixListener::bind(format!("{}_5000", sock.display())).unwrap();
    std::thread::spawn(move || {
        for c in listener.incoming() {
            let Ok(mut c) = c else { continue };
            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut buf = Vec::new();
            let _ = c.read_to_end(&mut buf);
            let _ = c.write_all(&buf);
        }
    });
    let script = r#"
rv-vsock connect 2 5000 hello-from-guest
rv-vsock listen 1234 1
echo RV-END
"#;
    let log = dir.path("console.log");
    let extra = ["--vsock".to_string(), format!("cid=3,socket={}", sock.display())];
    let mut child = guest_command(script, &log, &extra).stdin(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let console = wait_for_console(&mut child, &log, "RV-VSOCK-LISTENING", Duration::from_secs(300));
    assert_eq!(
        console_value(&console, "RV-VSOCK-REPLY"),
        Some("hello-from-guest"),
        "guest → host:\n{}",
        tail(&console)
    );

    // Host → guest: CONNECT, OK <port>, then an echo of a large message (credit flow).
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"CONNECT 1234\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "handshake answer: {line:?}");
    let msg = pattern(300 << 10, 5);
    let writer = {
        let mut s = s.try_clone().unwrap();
        let msg = msg.clone();
        std::thread::spawn(move || {
            s.write_all(&msg).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut back = Vec::new();
    r.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(back.len(), msg.len(), "echoed length");
    assert!(back == msg, "echoed bytes differ");

    let console = wait_for_console(&mut child, &log, "RV-END", Duration::from_secs(120));
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(0), "{}", tail(&console));
}

//! virtio-console as an alternative console: with the 8250 on a file and the virtio-console
//! on stdio, what the guest writes to /dev/hvc0 reaches the VMM's stdout, and a line typed on
//! the VMM's stdin can be read from /dev/hvc0.

mod common;

use common::*;
use std::io::{Read, Write};
use std::process::Stdio;
use std::time::Duration;

#[test]
fn hvc0_output_and_input_go_through_stdio() {
    let dir = TempDir::new("hvc");
    let script = r#"
exec 3<>/dev/hvc0
echo RV-HVC-HELLO >&3
echo RV-HVC-READY
read line <&3
echo "RV-HVC-IN $line"
"#;
    let log = dir.path("console.log");
    let mut child = guest_command(script, &log, &["--console".to_string(), "stdio".to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    // Like a serial line, hvc0 drops what arrives while nobody has it open: type once the
    // guest holds it open.
    wait_for_console(&mut child, &log, "RV-HVC-READY", Duration::from_secs(300));
    child.stdin.take().unwrap().write_all(b"typed-on-the-host\n").unwrap();
    let console = wait_for_console(&mut child, &log, "RV-HVC-IN", Duration::from_secs(60));
    assert_eq!(console_value(&console, "RV-HVC-IN"), Some("typed-on-the-host"), "{}", tail(&console));
    let st = child.wait().unwrap();
    let out = reader.join().unwrap();
    assert!(out.contains("RV-HVC-HELLO"), "hvc0 output on stdout: {out:?}");
    assert_eq!(st.code(), Some(0), "{}", tail(&console));
}

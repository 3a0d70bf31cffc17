//! `rustvisor vmm --jail`: the VMM runs as PID 1 of its own namespaces, as an unprivileged
//! user without capabilities, in a root holding only what it was given, and answers its API
//! through the socket in the folder it was given.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn status_field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_string()).unwrap_or_default()
}

#[test]
fn a_jailed_vmm_answers_as_pid_1_of_its_namespace_as_an_unprivileged_user() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the jail needs root (mount and PID namespaces)");
        return;
    }
    let dir = TempDir::new("jail-vmm");
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
    let sock = dir.path("api.sock");
    let mut wrapper = Command::new(env!("CARGO_BIN_EXE_rustvisor"))
        .args(["vmm", "--jail", "--jail-user", "2099999001:2099999002", "--jail-ro"])
        .arg(guest_file("vmlinuz"))
        .arg("--api-socket")
        .arg(&sock)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < end, "no API socket");
        assert!(wrapper.try_wait().unwrap().is_none(), "the jailed VMM exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let api = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_rustvisor"))
            .args(["api", "--json", "--socket"])
            .arg(&sock)
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ping: serde_json::Value = serde_json::from_str(&api(&["ping"])).unwrap();
    assert_eq!(ping["pid"], 1, "PID 1 of its own PID namespace: {ping}");
    // The jailed VMM is the wrapper's child.
    let children = std::fs::read_to_string(format!("/proc/{}/task/{}/children", wrapper.id(), wrapper.id())).unwrap();
    let vmm: u32 = children.split_whitespace().next().expect("the jailed VMM").parse().unwrap();
    assert_eq!(status_field(vmm, "Uid:").split_whitespace().next(), Some("2099999001"));
    assert_eq!(status_field(vmm, "Gid:").split_whitespace().next(), Some("2099999002"));
    assert_eq!(status_field(vmm, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(vmm, "CapBnd:"), "0000000000000000");
    assert_eq!(status_field(vmm, "NoNewPrivs:"), "1");
    for ns in ["mnt", "pid", "ipc", "uts"] {
        let mine = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(mine, std::fs::read_link(format!("/proc/{vmm}/ns/{ns}")).unwrap(), "{ns} namespace");
    }
    let root = std::path::PathBuf::from(format!("/proc/{vmm}/root"));
    assert!(root.join(guest_file("vmlinuz").strip_prefix("/").unwrap()).is_file(), "the kernel it was given");
    assert!(root.join(sock.strip_prefix("/").unwrap()).exists(), "its socket's folder");
    assert!(!root.join("etc/passwd").exists() && !root.join("home").exists() && !root.join("root").exists());
    // A kernel outside the jail is not there for it.
    let bad = format!(r#"{{"kernel":"{}","memory_mib":64,"accel":"emu"}}"#, guest_file("initrd.img").display());
    let cfg = dir.path("vm.json");
    std::fs::write(&cfg, bad).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rustvisor"))
        .args(["api", "--socket"])
        .arg(&sock)
        .arg("create")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no such file"), "{err}");
    let _ = api(&["vmm-shutdown"]);
    let st = wrapper.wait().unwrap();
    assert!(st.success(), "the wrapper exits with the VMM's status: {st}");
}

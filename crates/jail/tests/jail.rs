//! A shell in a jail: what it is (uid, capabilities, pid, host name, network) and what it can
//! reach (only the files bound, read-only unless writable). Needs root (mount namespaces).

use std::path::Path;

fn root_or_skip() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the jail needs root (mount and PID namespaces)");
        return false;
    }
    true
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines().find_map(|l| l.strip_prefix(key)).map(str::trim).unwrap_or_else(|| panic!("no {key} in:\n{out}"))
}

#[test]
fn shell_in_a_jail_sees_only_its_binds_as_an_unprivileged_pid_1() {
    if !root_or_skip() {
        return;
    }
    let tmp = std::env::temp_dir().join(format!("jail-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let (root, rw, ro) = (tmp.join("root"), tmp.join("rw"), tmp.join("ro.txt"));
    for d in [&root, &rw] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(&ro, "read me\n").unwrap();
    // The jail's uid must be able to read the read-only file and write the folder.
    let (uid, gid) = (2_100_000_077, 2_100_000_077);
    std::os::unix::fs::chown(&rw, Some(uid), Some(gid)).unwrap();
    let script = format!(
        "echo uid=$(id -u) gid=$(id -g); echo pid=$$; echo host=$(hostname); \
         grep -E '^(CapEff|CapBnd|CapPrm|NoNewPrivs|Groups):' /proc/self/status; \
         echo root=$(ls / | tr '\\n' ' '); echo ro=$(cat {ro}); \
         echo x > {ro} 2>/dev/null && echo ro_write=yes || echo ro_write=no; \
         echo hello > {rw}/out && echo rw_write=yes || echo rw_write=no; \
         cat /etc/passwd >/dev/null 2>&1 && echo passwd=yes || echo passwd=no; \
         echo ifaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ' '); \
         echo devnull=$(stat -c '%A %u' /dev/null); \
         echo x > /newfile 2>/dev/null && echo rootfs_write=yes || echo rootfs_write=no; \
         cp /bin/true {rw}/t && {rw}/t && echo rw_exec=yes || echo rw_exec=no",
        ro = ro.display(),
        rw = rw.display()
    );
    let mut jail = jail::Jail::new(&root, uid, gid);
    jail.hostname = "vm-test".into();
    jail.add_system_libraries().bind_ro(&ro).bind_rw(&rw);
    let out_path = tmp.join("stdout");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut cmd = jail::Command::new("/bin/sh");
    cmd.arg("-c").arg(&script).env("PATH", "/usr/bin:/bin").stdout(out.try_clone().unwrap()).stderr(out);
    let mut child = jail::spawn(&cmd, Some(&jail)).expect("spawn in a jail");
    let st = child.wait().unwrap();
    let text = std::fs::read_to_string(&out_path).unwrap();
    assert!(st.success(), "{st:?}\n{text}");
    assert_eq!(field(&text, "uid="), format!("{uid} gid={gid}"), "{text}");
    assert_eq!(field(&text, "pid="), "1", "PID 1 of its own PID namespace:\n{text}");
    assert_eq!(field(&text, "host="), "vm-test");
    for cap in ["CapEff:", "CapBnd:", "CapPrm:"] {
        assert_eq!(field(&text, cap), "0000000000000000", "{cap}\n{text}");
    }
    assert_eq!(field(&text, "NoNewPrivs:"), "1");
    assert_eq!(field(&text, "Groups:"), "");
    // Only the binds' top folders, the merged-/usr links, /dev and /proc.
    let top: Vec<&str> = field(&text, "root=").split_whitespace().collect();
    for want in ["dev", "proc", "usr", "bin", "lib"] {
        assert!(top.contains(&want), "{want} missing from / = {top:?}");
    }
    assert!(!top.contains(&"etc") || Path::new("/etc/ld.so.cache").exists(), "{top:?}");
    assert!(!top.contains(&"home") && !top.contains(&"root") && !top.contains(&"var"), "{top:?}");
    assert_eq!(field(&text, "ro="), "read me");
    assert_eq!(field(&text, "ro_write="), "no");
    assert_eq!(field(&text, "rw_write="), "yes");
    assert_eq!(std::fs::read_to_string(rw.join("out")).unwrap(), "hello\n");
    assert_eq!(field(&text, "passwd="), "no", "/etc/passwd is not in the jail");
    assert_eq!(field(&text, "ifaces="), "lo", "a new network namespace has only lo");
    assert_eq!(field(&text, "devnull="), format!("crw------- {uid}"));
    assert_eq!(field(&text, "rootfs_write="), "no", "the jail's root is read-only");
    // Landlock (where the kernel has it): nothing in a writable bind may be executed.
    // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) only returns
    // the ABI version.
    let abi = unsafe { libc::syscall(444, std::ptr::null::<u8>(), 0usize, 1u32) };
    if abi >= 1 {
        assert_eq!(field(&text, "rw_exec="), "no", "Landlock ABI {abi}: no execution from a writable bind");
    } else {
        eprintln!("skipped: the Landlock check (this kernel has no Landlock)");
    }
    // The host sees the jail's root folder empty (the tmpfs is in the child's namespace).
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn a_failed_step_is_named() {
    if !root_or_skip() {
        return;
    }
    let tmp = std::env::temp_dir().join(format!("jail-test-fail-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    // No system libraries bound: the shell cannot be executed inside.
    let jail = jail::Jail::new(&tmp, 2_100_000_078, 2_100_000_078);
    let err = jail::spawn(&jail::Command::new("/bin/sh"), Some(&jail)).unwrap_err();
    assert!(err.to_string().contains("execve /bin/sh"), "{err}");
    // A missing bind is refused before anything starts, naming the path.
    let mut jail = jail::Jail::new(&tmp, 2_100_000_078, 2_100_000_078);
    jail.bind_ro("/nonexistent/file");
    let err = jail::spawn(&jail::Command::new("/bin/sh"), Some(&jail)).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/file"), "{err}");
    let err = jail::spawn(&jail::Command::new("sh"), None).unwrap_err();
    assert!(err.to_string().contains("absolute"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn without_a_jail_it_is_a_plain_fork_and_exec() {
    let out_path = std::env::temp_dir().join(format!("jail-plain-{}", std::process::id()));
    let out = std::fs::File::create(&out_path).unwrap();
    let mut cmd = jail::Command::new("/bin/sh");
    cmd.arg("-c").arg("echo $$ $FOO; exit 3").env("FOO", "bar").stdout(out).setsid(true);
    let mut child = jail::spawn(&cmd, None).unwrap();
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(3));
    let text = std::fs::read_to_string(&out_path).unwrap();
    assert_eq!(text.trim(), format!("{} bar", child.id()));
    assert_eq!(jail::ns_pid(std::process::id()), Some(std::process::id()));
    std::fs::remove_file(&out_path).unwrap();
}

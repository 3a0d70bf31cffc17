//! `rustvisor run --jail` and `rustvisor vmm --jail`: the same command started again inside a
//! jail (the `jail` crate), with this process waiting for it in the foreground.
//!
//! The jailed copy sees `RUSTVISOR_IN_JAIL=1` and runs normally. Writable disk images are
//! given to the jail's user while it runs and given back to their owners after.

use std::os::fd::AsFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::ExitCode;

/// Set in the jailed copy's environment.
pub const IN_JAIL_ENV: &str = "RUSTVISOR_IN_JAIL";

/// The jail's default uid and gid for `run` and `vmm` (the manager gives each VM its own,
/// from 2100000000 up).
pub const DEFAULT_JAIL_ID: u32 = 2_099_999_999;

/// Whether this process is the jailed copy.
pub fn in_jail() -> bool {
    std::env::var_os(IN_JAIL_ENV).is_some()
}

/// Parses `--jail-user UID[:GID]` (neither may be 0).
///
/// Errors: one line naming the flag and the accepted form.
pub fn parse_user(s: Option<&str>) -> Result<(u32, u32), String> {
    let Some(s) = s else { return Ok((DEFAULT_JAIL_ID, DEFAULT_JAIL_ID)) };
    let bad = || format!("--jail-user: '{s}' (accepted: UID or UID:GID, numbers above 0)");
    let (u, g) = s.split_once(':').unwrap_or((s, s));
    let uid: u32 = u.parse().map_err(|_| bad())?;
    let gid: u32 = g.parse().map_err(|_| bad())?;
    if uid == 0 || gid == 0 {
        return Err(bad());
    }
    Ok((uid, gid))
}

/// What the jailed copy needs.
pub struct Needs {
    /// Read-only files and folders.
    pub read: Vec<PathBuf>,
    /// Files written in place (given to the jail's user while it runs).
    pub write: Vec<PathBuf>,
    /// Folders it creates files or sockets in (they must be writable by the jail's user).
    pub create_in: Vec<PathBuf>,
    /// Device nodes.
    pub devices: Vec<PathBuf>,
    /// Whether it needs the host's network namespace.
    pub host_network: bool,
}

/// Starts this command again (same arguments) in a jail holding `needs`, as `user`, and
/// waits for it; returns its exit status as ours (128 + signal when it was killed).
///
/// Errors: (exit status, one line) when the jail cannot be made.
pub fn rerun_in_jail(needs: Needs, user: (u32, u32)) -> Result<ExitCode, (u8, String)> {
    let fail = |m: String| (1u8, format!("--jail: {m}"));
    let exe = std::env::current_exe().map_err(|e| fail(format!("finding this program: {e}")))?;
    let cwd = std::env::current_dir().map_err(|e| fail(format!("the current folder: {e}")))?;
    let root = std::env::temp_dir().join(format!("rustvisor-jail-{}", std::process::id()));
    std::fs::create_dir_all(&root).map_err(|e| fail(format!("creating {}: {e}", root.display())))?;
    let (uid, gid) = user;
    let mut j = jail::Jail::new(&root, uid, gid);
    j.hostname = "rustvisor".into();
    j.add_system_libraries();
    j.bind_ro(&exe);
    j.bind_all(&needs.create_in, &needs.write, &needs.read);
    j.devices.extend(needs.devices);
    j.new_net = !needs.host_network;
    j.workdir = Some(cwd);
    // Give writable images to the jail's user for the run, and back after.
    let mut owners = Vec::new();
    for p in &needs.write {
        let md = std::fs::metadata(p).map_err(|e| fail(format!("{}: {e}", p.display())))?;
        std::os::unix::fs::chown(p, Some(uid), Some(gid))
            .map_err(|e| fail(format!("giving {} to uid {uid}: {e}", p.display())))?;
        owners.push((p.clone(), md.uid(), md.gid()));
    }
    let give_back = |owners: &[(PathBuf, u32, u32)]| {
        for (p, u, g) in owners {
            if let Err(e) = std::os::unix::fs::chown(p, Some(*u), Some(*g)) {
                eprintln!("rustvisor: --jail: giving {} back to uid {u}: {e}", p.display());
            }
        }
    };
    let mut cmd = jail::Command::new(&exe);
    for a in std::env::args_os().skip(1) {
        cmd.arg(a);
    }
    for (k, v) in std::env::vars_os() {
        let n = k.as_encoded_bytes();
        if n.starts_with(b"RUST") || n == b"TERM" || n == b"NO_COLOR" {
            cmd.env(k, v);
        }
    }
    cmd.env(IN_JAIL_ENV, "1").die_with_parent(true);
    let stdio = [std::io::stdin().as_fd(), std::io::stdout().as_fd(), std::io::stderr().as_fd()]
        .map(|fd| fd.try_clone_to_owned().map(std::fs::File::from));
    let [Ok(i), Ok(o), Ok(e)] = stdio else {
        give_back(&owners);
        return Err(fail("duplicating stdin/stdout/stderr".into()));
    };
    cmd.stdin(i).stdout(o).stderr(e);
    let result = jail::spawn(&cmd, Some(&j));
    let status = result.map_err(|e| e.to_string()).and_then(|mut c| c.wait().map_err(|e| e.to_string()));
    give_back(&owners);
    let _ = std::fs::remove_dir(&root);
    let st = status.map_err(fail)?;
    let code = match (st.code(), st.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    };
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

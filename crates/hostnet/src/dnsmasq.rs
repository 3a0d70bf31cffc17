//! One dnsmasq per DHCP network (Debian's `dnsmasq` binary, package `dnsmasq-base`), as
//! libvirt runs it: configured on the command line only (`--conf-file=/dev/null`), bound to
//! the bridge alone, daemonized with a pid file in the run folder, so it outlives a daemon
//! restart and the next daemon finds it again.
//!
//! Files, in the run folder: `<network>.dnsmasq.pid` and `<network>.leases` (dnsmasq's lease
//! file, read by [`leases`]).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::spec::{MacAddr, NetworkSpec};
use crate::Error;

/// DHCP lease time handed to guests.
pub const LEASE_TIME: &str = "1h";

/// `<run_dir>/<network>.leases`.
pub fn lease_file(run_dir: &Path, network: &str) -> PathBuf {
    run_dir.join(format!("{network}.leases"))
}

/// `<run_dir>/<network>.dnsmasq.pid`.
pub fn pid_file(run_dir: &Path, network: &str) -> PathBuf {
    run_dir.join(format!("{network}.dnsmasq.pid"))
}

/// dnsmasq's command line for `spec` (without the program).
pub(crate) fn args(spec: &NetworkSpec, run_dir: &Path) -> Vec<String> {
    let mut a = vec![
        "--conf-file=/dev/null".to_string(),
        format!("--pid-file={}", pid_file(run_dir, &spec.name).display()),
        format!("--dhcp-leasefile={}", lease_file(run_dir, &spec.name).display()),
        "--bind-interfaces".into(),
        format!("--interface={}", spec.bridge),
        "--except-interface=lo".into(),
        "--dhcp-authoritative".into(),
        "--dhcp-no-override".into(),
    ];
    if let Some(subnet) = spec.subnet {
        let (first, last) = subnet.dhcp_range();
        a.push(format!("--listen-address={}", subnet.addr));
        a.push(format!("--dhcp-range={first},{last},{},{LEASE_TIME}", subnet.netmask()));
    }
    if spec.nat {
        // Guests that reach the outside get a DNS forwarder (to the host's resolv.conf).
        a.push("--no-hosts".into());
    } else {
        // No DNS at all.
        a.push("--port=0".into());
    }
    if spec.isolated {
        // No default route for guests: the host routes nothing for them.
        a.push("--dhcp-option=option:router".into());
    }
    a
}

/// The pid of the dnsmasq running for `spec` with exactly the arguments [`args`] gives, if
/// one is alive. A pid file whose process is gone, a zombie or another program is ignored.
pub(crate) fn running(spec: &NetworkSpec, run_dir: &Path) -> Option<(i32, bool)> {
    let pid = pid_of(&pid_file(run_dir, &spec.name))?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv: Vec<String> =
        cmdline.split(|&b| b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect();
    let pid_arg = format!("--pid-file={}", pid_file(run_dir, &spec.name).display());
    if !argv.contains(&pid_arg) || is_zombie(pid) {
        return None;
    }
    let current = argv.get(1..).is_some_and(|rest| rest == args(spec, run_dir).as_slice());
    Some((pid, current))
}

fn pid_of(file: &Path) -> Option<i32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok().filter(|&p: &i32| p > 0)
}

fn is_zombie(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return true };
    // "pid (comm) S ...": the state follows the last ')'.
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_none_or(|s| s == "Z" || s == "X")
}

/// Starts dnsmasq for `spec` unless it runs already with the same arguments; one running
/// with other arguments (the spec changed) is restarted. Returns the pid.
///
/// Errors: [`Error::MissingTool`]; [`Error::Dnsmasq`] with dnsmasq's own message when it
/// fails to start (dnsmasq reports start-up errors before it daemonizes).
pub(crate) fn ensure(spec: &NetworkSpec, run_dir: &Path) -> Result<i32, Error> {
    match running(spec, run_dir) {
        Some((pid, true)) => return Ok(pid),
        Some((pid, false)) => stop_pid(pid),
        None => {}
    }
    let bin =
        crate::nft::find_binary("dnsmasq").ok_or(Error::MissingTool { tool: "dnsmasq", package: "dnsmasq-base" })?;
    std::fs::create_dir_all(run_dir)
        .map_err(|source| Error::Io { what: format!("creating {}", run_dir.display()), source })?;
    let out = Command::new(&bin)
        .args(args(spec, run_dir))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| Error::Io { what: format!("running {}", bin.display()), source })?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(Error::Dnsmasq { network: spec.name.clone(), message: format!("{msg} ({})", out.status) });
    }
    // The parent exits once the daemon is ready and has written its pid file.
    match running(spec, run_dir) {
        Some((pid, _)) => Ok(pid),
        None => Err(Error::Dnsmasq { network: spec.name.clone(), message: "started, but exited at once".into() }),
    }
}

/// Stops the dnsmasq of `spec` if it runs (SIGTERM, then SIGKILL after 3 s) and removes its
/// pid file. The lease file stays (the next dnsmasq hands the same addresses out again).
pub(crate) fn stop(spec: &NetworkSpec, run_dir: &Path) {
    if let Some((pid, _)) = running(spec, run_dir) {
        stop_pid(pid);
    }
    let _ = std::fs::remove_file(pid_file(run_dir, &spec.name));
}

fn stop_pid(pid: i32) {
    // SAFETY: kill(2) with a pid checked to be our dnsmasq; no memory is involved.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(3);
    while !is_zombie(pid) {
        if Instant::now() > deadline {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One DHCP lease from dnsmasq's lease file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The guest NIC's MAC address.
    pub mac: MacAddr,
    /// The address leased.
    pub ip: Ipv4Addr,
    /// The host name the guest sent, if any.
    pub hostname: Option<String>,
    /// When the lease ends; `None`: never (an infinite lease).
    pub expires: Option<SystemTime>,
}

/// The leases of `network` (dnsmasq's `<run_dir>/<network>.leases`); none when the file does
/// not exist. Lines that are not IPv4 leases (the IPv6 `duid` line, garbage) are skipped.
///
/// Errors: [`Error::Io`] when the file exists but cannot be read.
pub fn leases(run_dir: &Path, network: &str) -> Result<Vec<Lease>, Error> {
    let file = lease_file(run_dir, network);
    match std::fs::read_to_string(&file) {
        Ok(text) => Ok(parse_leases(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(Error::Io { what: format!("reading {}", file.display()), source }),
    }
}

/// Parses dnsmasq's lease file format: `<expiry, seconds since the epoch; 0: never> <mac>
/// <ip> <hostname or *> <client id or *>` per line.
pub fn parse_leases(text: &str) -> Vec<Lease> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let expiry: u64 = f.next()?.parse().ok()?;
            let mac: MacAddr = f.next()?.parse().ok()?;
            let ip: Ipv4Addr = f.next()?.parse().ok()?;
            let hostname = f.next().filter(|h| *h != "*").map(str::to_string);
            let expires = (expiry != 0).then(|| UNIX_EPOCH + Duration::from_secs(expiry));
            Some(Lease { mac, ip, hostname, expires })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_follow_the_spec() {
        let mut n =
            NetworkSpec { subnet: Some("10.77.0.1/24".parse().unwrap()), dhcp: true, ..NetworkSpec::new("lan0") };
        let a = args(&n, Path::new("/run/rv"));
        assert!(a.contains(&"--dhcp-range=10.77.0.2,10.77.0.254,255.255.255.0,1h".to_string()), "{a:?}");
        assert!(a.contains(&"--interface=rv-lan0".to_string()));
        assert!(a.contains(&"--dhcp-leasefile=/run/rv/lan0.leases".to_string()));
        assert!(a.contains(&"--port=0".to_string()));
        n.nat = true;
        assert!(!args(&n, Path::new("/run/rv")).contains(&"--port=0".to_string()));
        n.nat = false;
        n.isolated = true;
        assert!(args(&n, Path::new("/run/rv")).contains(&"--dhcp-option=option:router".to_string()));
    }
}

//! The REST API targets: what the VMM's API server (`crates/api`) and the daemon's
//! (`crates/manager`) do with a request before any operation runs, the command-line device
//! options that become the same configuration (`crates/api-types`), and the daemon's side of
//! the VMM's answers (a VMM is a separate, less trusted process).
//!
//! Input: byte 0 picks what the rest is (`% N`, see [`vmm()`] and [`daemon()`]); the rest is a
//! request body, a request target or an option string (UTF-8 where text is wanted: invalid
//! UTF-8 is refused as a server would refuse it).
//!
//! Parsing a body that the server accepts must give a value that serialises and parses
//! back to the same value (the API documents one JSON shape per type).

use std::fmt::Debug;
use std::str::FromStr;

use api::types::{
    Accel, BackupRequest, BackupStatus, BalloonConfig, BalloonInfo, BalloonTarget, ConsoleOut, Counters, DiskConfig,
    MacAddr, MemoryOptions, NetConfig, PingInfo, RestoreRequest, SnapshotRequest, VmConfig, VmInfo, VsockConfig,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Parses `body` as the servers parse a request body; an accepted value must survive a
/// serialise/parse round trip unchanged.
fn body<T: DeserializeOwned + Serialize + PartialEq + Debug>(body: &[u8]) -> Option<T> {
    let v: T = api::server::parse_json_object(body).ok()?;
    let again = serde_json::to_vec(&v).unwrap_or_default();
    match api::server::parse_json_object::<T>(&again) {
        Ok(w) => assert_eq!(v, w, "round trip changed the value"),
        Err(e) => panic!("an accepted body does not parse back after serialising: {e:?}"),
    }
    Some(v)
}

/// Parses `text` with `FromStr` (a command-line option).
fn option<T: FromStr>(text: &str) -> Option<T> {
    text.parse().ok()
}

/// `api_vmm`: byte 0 `% 9` picks: 0 `vm.create` body (then the VMM's validation of the
/// configuration), 1 `vm.snapshot`, 2 `vm.restore`, 3 `vm.backup` (then the `file://` URL
/// check), 4 `vm.balloon`, 5 a `--disk`/`--net`/`--vsock`/`--balloon`/`--memory-options`/
/// `--accel`/`--serial`/MAC/size option (the next byte picks), 6 a `file://` URL, 7 a VMM
/// answer as the daemon and the `rustvisor api` client read and print it (the next byte
/// picks the type), 8 the server's JSON error description of a bad body.
pub fn vmm(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else { return };
    match sel % 9 {
        0 => {
            if let Some(cfg) = body::<VmConfig>(rest) {
                let _ = vmm::config::validate(&cfg);
                let _ = cfg.memory_bytes();
            }
        }
        1 => {
            if let Some(r) = body::<SnapshotRequest>(rest) {
                let _ = api::fileurl::file_url_to_path(&r.destination_url);
            }
        }
        2 => {
            if let Some(r) = body::<RestoreRequest>(rest) {
                let _ = api::fileurl::file_url_to_path(&r.source_url);
            }
        }
        3 => {
            if let Some(r) = body::<BackupRequest>(rest) {
                let _ = api::fileurl::file_url_to_path(&r.destination_url);
            }
        }
        4 => {
            let _ = body::<BalloonTarget>(rest);
        }
        5 => {
            let Some((&which, text)) = rest.split_first() else { return };
            let Ok(text) = std::str::from_utf8(text) else { return };
            match which % 10 {
                0 => drop(option::<DiskConfig>(text)),
                1 => drop(option::<NetConfig>(text)),
                2 => drop(option::<VsockConfig>(text)),
                3 => drop(option::<BalloonConfig>(text)),
                4 => drop(option::<MemoryOptions>(text)),
                5 => drop(option::<Accel>(text)),
                6 => drop(option::<ConsoleOut>(text)),
                7 => drop(option::<MacAddr>(text)),
                8 => drop(vmm::config::parse_size(text)),
                _ => drop(api::client::parse_mib(text)),
            }
        }
        6 => {
            let Ok(text) = std::str::from_utf8(rest) else { return };
            if let Ok(p) = api::fileurl::file_url_to_path(text) {
                // A path the check accepts makes a URL that names it again.
                let url = api::fileurl::path_to_file_url(std::path::Path::new(&p));
                assert_eq!(api::fileurl::file_url_to_path(&url).ok().as_deref(), Some(p.as_str()), "URL round trip");
            }
        }
        7 => {
            let Some((&which, json)) = rest.split_first() else { return };
            match which % 5 {
                0 => drop(serde_json::from_slice::<PingInfo>(json).map(|v| api::client::format_ping(&v))),
                1 => drop(serde_json::from_slice::<VmInfo>(json).map(|v| api::client::format_info(&v))),
                2 => drop(serde_json::from_slice::<BalloonInfo>(json).map(|v| api::client::format_balloon(&v))),
                3 => drop(serde_json::from_slice::<BackupStatus>(json).map(|v| api::client::format_backup(&v))),
                _ => drop(serde_json::from_slice::<Counters>(json).map(|v| api::client::format_counters(&v))),
            }
        }
        _ => {
            if let Err(e) = serde_json::from_slice::<VmConfig>(rest) {
                let _ = api::server::describe_json_error("", e);
            }
        }
    }
}

/// `api_daemon`: byte 0 `% 10` picks: 0 `POST /vms` body, 1 `PATCH /vms/{name}`, 2
/// `PUT .../stop`, 3 `POST /networks` (then the network spec's validation), 4 a firewall
/// (`POST /firewalls`, then its validation), 5 pool and volume bodies (the next byte picks),
/// 6 VM clone, backup and snapshot bodies (the next byte picks), 7 a request target
/// (`METHOD path?query`: route matching, name check, query parsing), 8 a command-line
/// option of the daemon's CLI (`--nic`, `--restart`, `--priority`, CIDR, firewall rule; the
/// next byte picks), 9 a VM, network or pool name.
pub fn daemon(data: &[u8]) {
    use manager::types::*;
    let Some((&sel, rest)) = data.split_first() else { return };
    match sel % 10 {
        0 => drop(body::<CreateRequest>(rest)),
        1 => drop(body::<UpdateRequest>(rest)),
        2 => drop(body::<StopRequest>(rest)),
        3 => {
            if let Some(n) = body::<NetworkCreate>(rest) {
                let spec = n.spec();
                if spec.validate().is_ok() {
                    let _ = spec.check_against(std::slice::from_ref(&spec));
                }
            }
        }
        4 => {
            if let Some(f) = body::<FirewallSpec>(rest) {
                let _ = f.validate();
            }
        }
        5 => {
            let Some((&which, b)) = rest.split_first() else { return };
            match which % 4 {
                0 => drop(body::<PoolCreate>(b)),
                1 => drop(body::<VolumeCreate>(b)),
                2 => drop(body::<VolumeResize>(b)),
                _ => drop(body::<VolumeClone>(b)),
            }
        }
        6 => {
            let Some((&which, b)) = rest.split_first() else { return };
            match which % 4 {
                0 => drop(body::<VmClone>(b)),
                1 => drop(body::<BackupCreate>(b)),
                2 => drop(body::<BackupRestore>(b)),
                _ => drop(body::<SnapshotCreate>(b)),
            }
        }
        7 => {
            let Ok(text) = std::str::from_utf8(rest) else { return };
            let (method, target) = text.split_once(' ').unwrap_or(("GET", text));
            let _ = manager::server::fuzz_request_target(method, target);
        }
        8 => {
            let Some((&which, text)) = rest.split_first() else { return };
            let Ok(text) = std::str::from_utf8(text) else { return };
            match which % 6 {
                0 => drop(option::<NicSpec>(text)),
                1 => drop(option::<RestartPolicy>(text)),
                2 => drop(option::<Priority>(text)),
                3 => drop(option::<hostnet::Ipv4Cidr>(text)),
                4 => drop(option::<hostnet::firewall::Rule>(text).map(|r| r.validate("rule"))),
                _ => drop(option::<VmState>(text)),
            }
        }
        _ => {
            let Ok(text) = std::str::from_utf8(rest) else { return };
            let _ = manager::service::Service::check_name(text);
            let _ = hostnet::spec::validate_name("name", text);
            let _ = hostnet::spec::validate_ifname("tap", text);
        }
    }
}

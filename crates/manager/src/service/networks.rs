//! Virtual networks and firewall groups (`/networks`, `/firewalls`, `/netcheck`), and the
//! VMs' NICs on them: the host side is `hostnet` (bridges and TAPs through netlink, nftables,
//! dnsmasq); this module keeps the store and the host in step.
//!
//! - A network is stored, then made on the host ([`hostnet::ensure_network`]); if that
//!   fails the stored row is removed again, so nothing half-made stays. The daemon makes every
//!   network again at its start ([`Service::restore_networks`]: a host reboot leaves no
//!   bridge), and repairs one that went wrong (a dnsmasq that died, a bridge set down) a few
//!   seconds after ([`Service::supervise_networks`]).
//! - A VM's NICs get TAPs just before its VMM starts ([`Service::attach_nics`]) and lose
//!   them when it ends ([`Service::detach_nics`]); the VMM opens each TAP by name.
//! - A network or firewall group in use by a VM cannot be deleted; the refusal names the VMs.
//!   A firewall group changed while VMs run is applied to their TAPs at once.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{bad, lock, Service, ServiceError};
use crate::store::{NewEvent, Peer, VmRecord};
use crate::types::{
    FirewallInfo, FirewallSpec, LeaseInfo, MacAddr, NetworkCreate, NetworkInfo, NetworkSpec, NicInfo, NicSpec,
};

/// How often the supervisor looks at the networks on the host.
pub const NETWORK_CHECK_EVERY: Duration = Duration::from_secs(5);

pub(super) fn net_error(e: hostnet::Error) -> ServiceError {
    match e {
        hostnet::Error::Invalid(s) => bad(s.field, s.message),
        other => ServiceError::Io { what: "host network".into(), source: std::io::Error::other(other.to_string()) },
    }
}

impl Service {
    /// Where dnsmasq's pid and lease files live.
    fn net_run_dir(&self) -> PathBuf {
        self.paths.run_dir.join("networks")
    }

    fn network(&self, name: &str) -> Result<NetworkSpec, ServiceError> {
        self.store()
            .networks()?
            .into_iter()
            .find(|n| n.name == name)
            .ok_or_else(|| bad("net", format!("no network named '{name}'")))
    }

    fn firewall(&self, name: &str) -> Result<FirewallSpec, ServiceError> {
        self.store()
            .firewalls()?
            .into_iter()
            .find(|f| f.name == name)
            .ok_or_else(|| bad("firewall", format!("no firewall group named '{name}'")))
    }

    /// The VMs using network (`fw` false) or firewall group (`fw` true) `name`.
    fn users(&self, name: &str, fw: bool) -> Result<Vec<String>, ServiceError> {
        Ok(self
            .store()
            .list()?
            .into_iter()
            .filter(|r| r.nics.iter().any(|n| if fw { n.firewall.as_deref() == Some(name) } else { n.net == name }))
            .map(|r| r.name)
            .collect())
    }

    /// `POST /networks`.
    pub fn net_create(&self, req: &NetworkCreate, peer: Peer) -> Result<NetworkInfo, ServiceError> {
        let spec = req.spec();
        spec.validate().map_err(|e| bad(e.field, e.message))?;
        let existing = self.store().networks()?;
        spec.check_against(&existing).map_err(|e| bad(e.field, e.message))?;
        let _claim = self.claim(&format!("network {}", spec.name), "net-create")?;
        let detail = format!(
            "bridge {}{}{}{}{}",
            spec.bridge,
            spec.subnet.map(|s| format!(", {s}")).unwrap_or_default(),
            if spec.dhcp { ", dhcp" } else { "" },
            if spec.nat { ", nat" } else { "" },
            if spec.isolated { ", isolated" } else { "" },
        );
        let ev = NewEvent { vm: None, kind: "network-created", detail: format!("{}: {detail}", spec.name), peer };
        self.store().put_network(&spec, false, &ev)?;
        if let Err(e) = hostnet::ensure_network(&spec, &self.net_run_dir()) {
            let _ = hostnet::remove_network(&spec, &self.net_run_dir());
            let ev = NewEvent {
                vm: None,
                kind: "network-deleted",
                detail: format!("{}: could not be made on the host: {e}", spec.name),
                peer,
            };
            let _ = self.store().delete_network(&spec.name, &ev);
            return Err(net_error(e));
        }
        self.net_info(&spec.name)
    }

    /// `DELETE /networks/{name}`: refused while a VM has a NIC on it.
    pub fn net_delete(&self, name: &str, peer: Peer) -> Result<(), ServiceError> {
        let _claim = self.claim(&format!("network {name}"), "net-delete")?;
        let spec = self.network(name).map_err(|_| ServiceError::NotFound(format!("network {name}")))?;
        let users = self.users(name, false)?;
        if !users.is_empty() {
            return Err(bad("name", format!("network '{name}' is used by VM(s) {}", users.join(", "))));
        }
        hostnet::remove_network(&spec, &self.net_run_dir()).map_err(net_error)?;
        let ev = NewEvent { vm: None, kind: "network-deleted", detail: name.to_string(), peer };
        self.store().delete_network(name, &ev)?;
        Ok(())
    }

    /// `GET /networks`.
    pub fn net_list(&self) -> Result<Vec<NetworkInfo>, ServiceError> {
        let nets = self.store().networks()?;
        nets.iter().map(|n| self.describe_network(n)).collect()
    }

    /// `GET /networks/{name}`.
    pub fn net_info(&self, name: &str) -> Result<NetworkInfo, ServiceError> {
        let spec = self.network(name).map_err(|_| ServiceError::NotFound(format!("network {name}")))?;
        self.describe_network(&spec)
    }

    fn describe_network(&self, spec: &NetworkSpec) -> Result<NetworkInfo, ServiceError> {
        let problems = match hostnet::check(std::slice::from_ref(spec), &[], &self.net_run_dir()) {
            Ok(p) => p.iter().map(ToString::to_string).collect(),
            Err(e) => vec![format!("cannot read the host: {e}")],
        };
        let leases = if spec.dhcp {
            hostnet::leases(&self.net_run_dir(), &spec.name)
                .unwrap_or_default()
                .into_iter()
                .map(|l| LeaseInfo { mac: l.mac.to_string(), ip: l.ip.to_string(), hostname: l.hostname })
                .collect()
        } else {
            Vec::new()
        };
        Ok(NetworkInfo { spec: spec.clone(), used_by: self.users(&spec.name, false)?, problems, leases })
    }

    /// `GET /netcheck`: every network and every running VM's NIC compared with the host.
    pub fn netcheck(&self) -> Result<Vec<String>, ServiceError> {
        let nets = self.store().networks()?;
        let mut nics = Vec::new();
        // (The store's lock must not be held across the loop: nic_attachments takes it.)
        let recs = self.store().list()?;
        for rec in recs {
            if rec.runtime.state.is_active() {
                nics.extend(self.nic_attachments(&rec)?);
            }
        }
        let problems = hostnet::check(&nets, &nics, &self.net_run_dir()).map_err(net_error)?;
        Ok(problems.iter().map(ToString::to_string).collect())
    }

    /// `POST /firewalls` (`replace` false) and `PUT /firewalls/{name}` (true): a replacement
    /// is applied at once to the TAPs of the running VMs in the group.
    pub fn fw_put(&self, spec: &FirewallSpec, replace: bool, peer: Peer) -> Result<FirewallInfo, ServiceError> {
        spec.validate().map_err(|e| bad(e.field, e.message))?;
        let _claim = self.claim(&format!("firewall {}", spec.name), "firewall")?;
        let rules: Vec<String> = spec.rules.iter().map(ToString::to_string).collect();
        let detail = format!(
            "{}: {} (default in {:?}, out {:?})",
            spec.name,
            rules.join("; "),
            spec.default_in,
            spec.default_out
        );
        let kind = if replace { "firewall-updated" } else { "firewall-created" };
        self.store().put_firewall(spec, replace, &NewEvent { vm: None, kind, detail, peer }).map_err(|e| match e {
            crate::store::StoreError::Duplicate(n) => {
                bad("name", format!("a firewall group named '{n}' already exists"))
            }
            crate::store::StoreError::NotFound(n) => ServiceError::NotFound(format!("firewall group {n}")),
            other => other.into(),
        })?;
        if replace {
            let recs = self.store().list()?;
            for rec in recs {
                if !rec.runtime.state.is_active() {
                    continue;
                }
                for (i, nic) in rec.nics.iter().enumerate() {
                    if nic.firewall.as_deref() == Some(spec.name.as_str()) {
                        let tap = hostnet::tap_name(&rec.name, u8::try_from(i).unwrap_or(u8::MAX));
                        hostnet::apply_firewall(&tap, Some(spec)).map_err(net_error)?;
                    }
                }
            }
        }
        Ok(FirewallInfo { spec: spec.clone(), used_by: self.users(&spec.name, true)? })
    }

    /// `DELETE /firewalls/{name}`: refused while a VM's NIC is in the group.
    pub fn fw_delete(&self, name: &str, peer: Peer) -> Result<(), ServiceError> {
        let _claim = self.claim(&format!("firewall {name}"), "firewall")?;
        self.firewall(name).map_err(|_| ServiceError::NotFound(format!("firewall group {name}")))?;
        let users = self.users(name, true)?;
        if !users.is_empty() {
            return Err(bad("name", format!("firewall group '{name}' is used by VM(s) {}", users.join(", "))));
        }
        let ev = NewEvent { vm: None, kind: "firewall-deleted", detail: name.to_string(), peer };
        self.store().delete_firewall(name, &ev)?;
        Ok(())
    }

    /// `GET /firewalls`.
    pub fn fw_list(&self) -> Result<Vec<FirewallInfo>, ServiceError> {
        let fws = self.store().firewalls()?;
        fws.into_iter().map(|f| Ok(FirewallInfo { used_by: self.users(&f.name, true)?, spec: f })).collect()
    }

    /// Checks VM `vm`'s NICs against the networks and groups, and fills in missing MACs with
    /// ones unique on the host.
    ///
    /// Errors: 400 naming `nics[i].net`, `.firewall`, `.vlan` or `.mac`.
    pub(super) fn check_nics(&self, vm: &str, nics: &mut [NicSpec]) -> Result<(), ServiceError> {
        if nics.len() > 8 {
            return Err(bad("nics", format!("{} NICs (accepted: at most 8)", nics.len())));
        }
        let nets = self.store().networks()?;
        let fws = self.store().firewalls()?;
        let mut in_use: Vec<MacAddr> = self
            .store()
            .list()?
            .into_iter()
            .filter(|r| r.name != vm)
            .flat_map(|r| r.nics.into_iter().filter_map(|n| n.mac))
            .collect();
        for (i, nic) in nics.iter_mut().enumerate() {
            let field = |f: &str| format!("nics[{i}].{f}");
            let Some(net) = nets.iter().find(|n| n.name == nic.net) else {
                let known: Vec<&str> = nets.iter().map(|n| n.name.as_str()).collect();
                return Err(bad(
                    field("net"),
                    format!("no network named '{}' (networks: {})", nic.net, known.join(", ")),
                ));
            };
            if let Some(v) = nic.vlan {
                hostnet::validate_vlan(v).map_err(|e| bad(field("vlan"), e.message))?;
                if !net.vlan_filtering {
                    return Err(bad(field("vlan"), format!("network '{}' has no VLAN filtering", net.name)));
                }
            }
            if let Some(fw) = &nic.firewall {
                if !fws.iter().any(|f| &f.name == fw) {
                    return Err(bad(field("firewall"), format!("no firewall group named '{fw}'")));
                }
            }
            match nic.mac {
                Some(m) if in_use.contains(&m) => {
                    return Err(bad(field("mac"), format!("{m} is already used by another VM on this host")));
                }
                Some(m) if !m.is_unicast() => return Err(bad(field("mac"), format!("{m} is not unicast"))),
                Some(_) => {}
                None => nic.mac = Some(hostnet::generate_mac(&format!("{vm}/{i}"), &in_use)),
            }
            in_use.extend(nic.mac);
        }
        Ok(())
    }

    /// The host side of `rec`'s NICs.
    fn nic_attachments(&self, rec: &VmRecord) -> Result<Vec<hostnet::NicAttach>, ServiceError> {
        let nets = self.store().networks()?;
        let fws = self.store().firewalls()?;
        rec.nics
            .iter()
            .enumerate()
            .map(|(i, nic)| {
                let net = nets
                    .iter()
                    .find(|n| n.name == nic.net)
                    .ok_or_else(|| bad(format!("nics[{i}].net"), format!("network '{}' no longer exists", nic.net)))?;
                Ok(hostnet::NicAttach {
                    tap: hostnet::tap_name(&rec.name, u8::try_from(i).unwrap_or(u8::MAX)),
                    bridge: net.bridge.clone(),
                    vlan: nic.vlan,
                    mac: nic.mac.unwrap_or(MacAddr([0x52, 0x54, 0, 0, 0, 1])),
                    firewall: nic.firewall.as_ref().and_then(|f| fws.iter().find(|x| &x.name == f).cloned()),
                })
            })
            .collect()
    }

    /// Makes the TAPs of `rec`'s NICs (idempotent: an existing TAP, held by a running VMM,
    /// is kept and its settings checked); returns the VMM's NIC configurations.
    ///
    /// Errors: the host's; the TAPs made so far are removed again.
    pub(super) fn attach_nics(&self, rec: &VmRecord) -> Result<Vec<api::types::NetConfig>, ServiceError> {
        let attach = self.nic_attachments(rec)?;
        let mut out = Vec::new();
        for (i, a) in attach.iter().enumerate() {
            if let Err(e) = hostnet::create_tap(a) {
                for done in attach.iter().take(i) {
                    let _ = hostnet::remove_tap(&done.tap);
                }
                return Err(net_error(e));
            }
            out.push(api::types::NetConfig { tap: a.tap.clone(), mac: Some(api::types::MacAddr(a.mac.0)) });
        }
        Ok(out)
    }

    /// Removes the TAPs of `rec`'s NICs (nothing to do when there are none left).
    pub(super) fn detach_nics(&self, rec: &VmRecord) {
        for i in 0..rec.nics.len() {
            let tap = hostnet::tap_name(&rec.name, u8::try_from(i).unwrap_or(u8::MAX));
            if let Err(e) = hostnet::remove_tap(&tap) {
                tracing::warn!("VM {}: removing TAP {tap}: {e}", rec.name);
            }
        }
    }

    /// `rec`'s NICs for `vm info`, with the addresses their guests leased.
    pub(super) fn nic_infos(&self, rec: &VmRecord) -> Vec<NicInfo> {
        rec.nics
            .iter()
            .enumerate()
            .map(|(i, nic)| {
                let ip = nic.mac.and_then(|mac| {
                    hostnet::leases(&self.net_run_dir(), &nic.net)
                        .ok()?
                        .into_iter()
                        .find(|l| l.mac == mac)
                        .map(|l| l.ip.to_string())
                });
                NicInfo { spec: nic.clone(), tap: hostnet::tap_name(&rec.name, u8::try_from(i).unwrap_or(u8::MAX)), ip }
            })
            .collect()
    }

    /// At daemon start: makes every network on the host again (after a host reboot nothing
    /// is left; otherwise this changes nothing). A failure is an event, not fatal.
    pub(super) fn restore_networks(&self) -> Result<(), ServiceError> {
        let nets = self.store().networks()?;
        for spec in nets {
            if let Err(e) = hostnet::ensure_network(&spec, &self.net_run_dir()) {
                let ev = NewEvent {
                    vm: None,
                    kind: "network-failed",
                    detail: format!("{}: {e}", spec.name),
                    peer: Peer::default(),
                };
                self.store().log(&ev)?;
            }
        }
        Ok(())
    }

    /// Every [`NETWORK_CHECK_EVERY`]: repairs networks that are not as defined (a dead
    /// dnsmasq, a bridge set down or deleted, rules flushed), with an event saying what was
    /// wrong.
    pub(super) fn supervise_networks(&self) {
        {
            let mut last = lock(&self.net_checked);
            if last.is_some_and(|t| t.elapsed() < NETWORK_CHECK_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let Ok(nets) = self.store().networks() else { return };
        for spec in nets {
            let Ok(_claim) = self.claim(&format!("network {}", spec.name), super::SUPERVISE) else { continue };
            let status = hostnet::network_status(&spec, &self.net_run_dir());
            if status.as_ref().is_ok_and(|s| s.healthy(&spec)) {
                continue;
            }
            let what = match &status {
                Ok(s) => format!("{s:?}"),
                Err(e) => e.to_string(),
            };
            let (kind, detail) = match hostnet::ensure_network(&spec, &self.net_run_dir()) {
                Ok(()) => ("network-repaired", format!("{}: was {what}", spec.name)),
                Err(e) => ("network-failed", format!("{}: {e} (was {what})", spec.name)),
            };
            let _ = self.store().log(&NewEvent { vm: None, kind, detail, peer: Peer::default() });
        }
    }
}

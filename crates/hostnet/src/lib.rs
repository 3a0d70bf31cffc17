//! The host side of virtual networks (issue 10), for the host manager: Linux bridges and
//! persistent TAPs through netlink (`rtnetlink`), nftables rules for NAT, isolation and
//! per-VM firewalls (the `nftables` crate's JSON schema, applied by Debian's `nft` binary,
//! package `nftables`), and one supervised `dnsmasq` per DHCP network (Debian's binary,
//! package `dnsmasq-base`).
//!
//! Everything is synchronous: each call opens its own netlink socket with a private
//! current-thread tokio runtime, in the calling thread's network namespace, and the `nft` and
//! `dnsmasq` processes it starts inherit that namespace. Every call needs `CAP_NET_ADMIN`
//! (the daemon runs as root).
//!
//! The calls are idempotent and converge: [`ensure_network`] and [`create_tap`] create what is
//! missing and fix what differs, so the daemon calls them at its start to restore networks
//! after a host reboot (which leaves nothing) and again to restart a dnsmasq that died;
//! [`remove_network`] and [`remove_tap`] succeed when there is nothing left to remove.
//!
//! What a network is on the host:
//! - the bridge ([`NetworkSpec::bridge`], normally `rv-<name>`, [`bridge_name`]) with a fixed
//!   MAC address derived from the name, VLAN filtering per the spec, the subnet's host
//!   address, and up;
//! - the nftables table `rustvisor-net-<name>` (family `inet`, [`network_table`]): forwarding
//!   from the bridge accepted (and back to it for established connections, or always on a
//!   routed network without NAT); with `nat`, masquerading of the subnet out of every other
//!   interface, and IPv4 forwarding turned on (`/proc/sys/net/ipv4/ip_forward`, never turned
//!   off again: other networks may need it); with `isolated`, forwarding from and to the
//!   bridge dropped, and input from it dropped except DHCP;
//! - with `dhcp`, dnsmasq on the bridge (see [`leases`]): DHCP only, plus a DNS forwarder
//!   when `nat` is on.
//!
//! A guest NIC is a persistent TAP ([`tap_name`], normally `rvt-<vm>-<index>`) enslaved to
//! the bridge, up, with a host-side MAC derived from the guest's, on its VLAN when it has one,
//! with its firewall group as the nftables table `rustvisor-fw-<tap>` (family `bridge`, see
//! [`firewall`]). The VMM opens it by name (`tap=NAME`).
//!
//! The host (its address, DHCP, NAT) is on the bridge's default VLAN 1: on a VLAN-filtering
//! bridge, NICs with another `vlan` reach only the NICs of that VLAN.

use std::io;
use std::path::Path;

pub mod dnsmasq;
pub mod firewall;
mod netlink;
mod nft;
pub mod spec;
mod tap;

pub use dnsmasq::{leases, parse_leases, Lease};
pub use firewall::{stateful_firewall_supported, Action, Direction, FirewallSpec, PortRange, Proto, Rule};
pub use spec::{
    bridge_name, generate_mac, tap_name, validate_name, validate_vlan, Ipv4Cidr, MacAddr, NetworkSpec, NicAttach,
    SpecError,
};

use netlink::Nl;
use rtnetlink::packet_route::link::InfoKind;

/// An error of this crate. [`Error::Invalid`] is bad input; the others are the host's.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A spec is invalid: one line naming the field.
    #[error(transparent)]
    Invalid(#[from] SpecError),
    /// A netlink request failed (`what` says which).
    #[error("netlink: {what}: {source}")]
    Netlink {
        /// The operation, e.g. `adding 10.77.0.1/24 to rv-lan0`.
        what: String,
        /// rtnetlink's error (the kernel's errno inside).
        source: rtnetlink::Error,
    },
    /// A system call or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// The operation, e.g. `opening /dev/net/tun`.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// `nft` refused a batch or failed; `message` is its error output.
    #[error("nft: {message}")]
    Nft {
        /// nft's standard error (it names the offending command).
        message: String,
    },
    /// A network's dnsmasq failed to start.
    #[error("dnsmasq of network {network}: {message}")]
    Dnsmasq {
        /// The network.
        network: String,
        /// dnsmasq's own message and exit status.
        message: String,
    },
    /// A helper program is not installed.
    #[error("{tool} is not installed (Debian package {package})")]
    MissingTool {
        /// The program (`nft`, `dnsmasq`).
        tool: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// The kernel lacks a feature the spec needs (e.g. bridge VLAN filtering).
    #[error("{0}")]
    Unsupported(String),
    /// The host's state is in the way: an interface with the name exists but is of another
    /// kind, or a NIC's bridge does not exist.
    #[error("{0}")]
    Conflict(String),
}

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The nftables table of network `name` (family `inet`): `rustvisor-net-<name>`.
pub fn network_table(name: &str) -> String {
    format!("rustvisor-net-{name}")
}

/// The bridge's own MAC address: locally administered unicast (`02:...`) hashed from the
/// network's name, so it stays the same whichever ports come and go.
fn bridge_mac(network: &str) -> MacAddr {
    let h = spec::fnv1a(format!("bridge/{network}").as_bytes()).to_be_bytes();
    MacAddr([0x02, h[3], h[4], h[5], h[6], h[7]])
}

fn network_batch(spec: &NetworkSpec) -> nft::Batch {
    use nft::Family::INet;
    let table = network_table(&spec.name);
    let br = spec.bridge.as_str();
    let mut b = nft::Batch::new();
    b.replace_table(INet, &table);
    b.add_base_chain(INet, &table, "forward", nft::Hook::Forward, 0, true);
    if spec.isolated {
        b.add_rule(INet, &table, "forward", vec![nft::iface("iifname", br), nft::drop()]);
        b.add_rule(INet, &table, "forward", vec![nft::iface("oifname", br), nft::drop()]);
        b.add_base_chain(INet, &table, "input", nft::Hook::Input, 0, true);
        if spec.dhcp {
            b.add_rule(INet, &table, "input", vec![nft::iface("iifname", br), nft::dport("udp", 67), nft::accept()]);
        }
        b.add_rule(INet, &table, "input", vec![nft::iface("iifname", br), nft::drop()]);
    } else {
        b.add_rule(INet, &table, "forward", vec![nft::iface("iifname", br), nft::accept()]);
        let mut back = vec![nft::iface("oifname", br)];
        if spec.nat {
            back.push(nft::ct_established());
        }
        back.push(nft::accept());
        b.add_rule(INet, &table, "forward", back);
    }
    if let (true, Some(subnet)) = (spec.nat, spec.subnet) {
        b.add_nat_chain(INet, &table, "postrouting", nft::Hook::Postrouting, 100);
        b.add_rule(
            INet,
            &table,
            "postrouting",
            vec![
                nft::ip_prefix("saddr", true, subnet.network(), subnet.prefix),
                nft::ip_prefix("daddr", false, subnet.network(), subnet.prefix),
                nft::iface_not("oifname", br),
                nft::masquerade(),
            ],
        );
    }
    b
}

fn enable_ip_forward() -> Result<()> {
    // Net sysctls are per network namespace: this is the calling thread's.
    let path = "/proc/sys/net/ipv4/ip_forward";
    match std::fs::read_to_string(path) {
        Ok(v) if v.trim() == "1" => Ok(()),
        _ => std::fs::write(path, "1\n").map_err(|source| Error::Io { what: format!("writing {path}"), source }),
    }
}

/// Creates or repairs network `spec` (see the crate docs for what a network is): the bridge
/// (created through netlink if missing), its VLAN filtering, its address (other IPv4
/// addresses on it are removed), link up, the network's nftables table (replaced in one
/// transaction), IPv4 forwarding when `nat`, and dnsmasq when `dhcp` (started if not running,
/// restarted if it runs with other arguments; stopped when `dhcp` is off). `run_dir` holds
/// dnsmasq's pid and lease files (created if missing).
///
/// Errors: [`Error::Invalid`] for a bad spec; [`Error::Conflict`] when an interface with the
/// bridge's name exists and is not a bridge; [`Error::Unsupported`] for VLAN filtering on a
/// kernel without it; [`Error::MissingTool`] without `nft` (or `dnsmasq` when `dhcp`);
/// [`Error::Netlink`], [`Error::Nft`], [`Error::Dnsmasq`], [`Error::Io`] as the host refuses.
pub fn ensure_network(spec: &NetworkSpec, run_dir: &Path) -> Result<()> {
    spec.validate()?;
    let nl = Nl::new()?;
    let link = match nl.link(&spec.bridge)? {
        Some(l) => l,
        None => {
            nl.create_bridge(&spec.bridge, bridge_mac(&spec.name), spec.vlan_filtering)?;
            nl.link(&spec.bridge)?.ok_or_else(|| Error::Conflict(format!("bridge {} vanished", spec.bridge)))?
        }
    };
    if link.kind != Some(InfoKind::Bridge) {
        return Err(Error::Conflict(format!(
            "interface {} exists and is not a bridge (network {}); remove it or choose another bridge name",
            spec.bridge, spec.name
        )));
    }
    if link.vlan_filtering.unwrap_or(false) != spec.vlan_filtering {
        nl.set_vlan_filtering(link.index, &spec.bridge, spec.vlan_filtering)?;
    }
    nl.converge_ipv4(link.index, &spec.bridge, spec.subnet)?;
    if !link.up {
        nl.set_up(link.index, &spec.bridge, true)?;
    }
    nft::apply(&network_batch(spec), false)?;
    if spec.nat {
        enable_ip_forward()?;
    }
    if spec.dhcp {
        dnsmasq::ensure(spec, run_dir)?;
    } else {
        dnsmasq::stop(spec, run_dir);
    }
    Ok(())
}

/// Removes network `spec`: stops its dnsmasq and deletes its pid and lease files, deletes its
/// nftables table and its bridge (TAPs on it are released, not deleted). Nothing missing is
/// an error.
///
/// Errors: [`Error::Conflict`] when the bridge's name is an interface of another kind (left
/// alone); [`Error::Netlink`], [`Error::Nft`], [`Error::Io`].
pub fn remove_network(spec: &NetworkSpec, run_dir: &Path) -> Result<()> {
    dnsmasq::stop(spec, run_dir);
    let leases = dnsmasq::lease_file(run_dir, &spec.name);
    if let Err(e) = std::fs::remove_file(&leases) {
        if e.kind() != io::ErrorKind::NotFound {
            return Err(Error::Io { what: format!("removing {}", leases.display()), source: e });
        }
    }
    if nft::nft_binary().is_some() {
        let mut b = nft::Batch::new();
        b.delete_table(nft::Family::INet, &network_table(&spec.name));
        nft::apply(&b, false)?;
    }
    let nl = Nl::new()?;
    if let Some(link) = nl.link(&spec.bridge)? {
        if link.kind != Some(InfoKind::Bridge) {
            return Err(Error::Conflict(format!("interface {} is not a bridge; left alone", spec.bridge)));
        }
        nl.del_link(link.index, &spec.bridge)?;
    }
    Ok(())
}

/// The state of a network's bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BridgeState {
    /// No interface with the bridge's name.
    Missing,
    /// An interface with the name exists but is not a bridge.
    NotABridge,
    /// The bridge exists, administratively down.
    Down,
    /// The bridge exists and is up.
    Up,
}

/// What [`network_status`] found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetworkStatus {
    /// The bridge.
    pub bridge: BridgeState,
    /// Whether the bridge filters VLANs (`false` when it is missing).
    pub vlan_filtering: bool,
    /// Whether the subnet's host address is on the bridge (`true` without a subnet).
    pub address: bool,
    /// Whether the network's nftables table exists.
    pub rules: bool,
    /// dnsmasq's pid when it runs (`None` when it does not, or the network has no DHCP).
    pub dnsmasq: Option<i32>,
}

impl NetworkStatus {
    /// Whether everything the spec asks for is in place (then [`ensure_network`] would change
    /// nothing but the nftables table's counters).
    pub fn healthy(&self, spec: &NetworkSpec) -> bool {
        self.bridge == BridgeState::Up
            && self.vlan_filtering == spec.vlan_filtering
            && self.address
            && self.rules
            && (self.dnsmasq.is_some() || !spec.dhcp)
    }
}

/// The live state of network `spec`. A network whose dnsmasq died shows `dnsmasq: None`:
/// [`ensure_network`] starts it again (that is the supervision: the daemon polls this, or
/// [`check`], and calls [`ensure_network`]).
///
/// Errors: [`Error::Netlink`], [`Error::Io`]; [`Error::Nft`] when `nft` fails other than for
/// a missing table (a missing `nft` reads as no rules).
pub fn network_status(spec: &NetworkSpec, run_dir: &Path) -> Result<NetworkStatus> {
    let nl = Nl::new()?;
    let link = nl.link(&spec.bridge)?;
    let bridge = match &link {
        None => BridgeState::Missing,
        Some(l) if l.kind != Some(InfoKind::Bridge) => BridgeState::NotABridge,
        Some(l) if l.up => BridgeState::Up,
        Some(_) => BridgeState::Down,
    };
    let address = match (&link, spec.subnet) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(l), Some(c)) => nl.all_ipv4_addrs()?.contains(&(l.index, c)),
    };
    let rules = nft::nft_binary().is_some() && nft::list_table("inet", &network_table(&spec.name))?.is_some();
    let dnsmasq = if spec.dhcp { dnsmasq::running(spec, run_dir).map(|(pid, _)| pid) } else { None };
    Ok(NetworkStatus {
        bridge,
        vlan_filtering: link.as_ref().and_then(|l| l.vlan_filtering).unwrap_or(false),
        address,
        rules,
        dnsmasq,
    })
}

/// Creates or repairs NIC `nic`: the persistent TAP (if missing; an existing one, perhaps
/// open by a running VMM, is kept), enslaved to its bridge with its host-side MAC
/// ([`NicAttach::tap_mac`]), up, on its VLAN when it has one (the port's only VLAN, PVID and
/// untagged), and its firewall ([`apply_firewall`]).
///
/// Errors: [`Error::Invalid`] for a bad spec, or a `vlan` on a bridge without VLAN
/// filtering; [`Error::Conflict`] when the bridge does not exist or the TAP's name is an
/// interface of another kind; [`Error::Io`] for `/dev/net/tun`; [`Error::Netlink`],
/// [`Error::Nft`], [`Error::MissingTool`] (nft, with a firewall).
pub fn create_tap(nic: &NicAttach) -> Result<()> {
    nic.validate()?;
    let nl = Nl::new()?;
    let bridge = match nl.link(&nic.bridge)? {
        Some(b) if b.kind == Some(InfoKind::Bridge) => b,
        _ => {
            return Err(Error::Conflict(format!(
                "bridge {} of TAP {} does not exist (is its network created?)",
                nic.bridge, nic.tap
            )))
        }
    };
    if let (Some(v), false) = (nic.vlan, bridge.vlan_filtering.unwrap_or(false)) {
        return Err(SpecError::new(
            "vlan",
            format!(
                "{v}: the network's bridge {} has VLAN filtering off (create it with --vlan-filtering)",
                nic.bridge
            ),
        )
        .into());
    }
    let link = match nl.link(&nic.tap)? {
        Some(l) => l,
        None => {
            tap::create_persistent(&nic.tap)?;
            nl.link(&nic.tap)?.ok_or_else(|| Error::Conflict(format!("TAP {} vanished", nic.tap)))?
        }
    };
    if link.kind != Some(InfoKind::Tun) {
        return Err(Error::Conflict(format!("interface {} exists and is not a TAP", nic.tap)));
    }
    nl.attach(link.index, &nic.tap, bridge.index, nic.tap_mac())?;
    if let Some(v) = nic.vlan {
        nl.set_port_vlan(link.index, &nic.tap, v)?;
    }
    apply_firewall(&nic.tap, nic.firewall.as_ref())
}

/// Gives TAP `tap` (made by [`create_tap`]) to `uid:gid`, so a jailed VMM running as that
/// user without `CAP_NET_ADMIN` can attach to it.
///
/// Errors: [`Error::Io`] (no such TAP, or it is open by another process with other flags).
pub fn set_tap_owner(tap: &str, uid: u32, gid: u32) -> Result<()> {
    tap::set_owner(tap, uid, gid)
}

/// Sets interface `name` up or down (what an operator's `ip link set NAME down` does; the
/// failure drills use it to break a network on purpose).
///
/// Errors: [`Error::Invalid`] for a bad name; [`Error::Conflict`] when no such interface
/// exists; [`Error::Netlink`].
pub fn set_link_up(name: &str, up: bool) -> Result<()> {
    spec::validate_ifname("name", name)?;
    let nl = Nl::new()?;
    let link = nl.link(name)?.ok_or_else(|| Error::Conflict(format!("no interface {name}")))?;
    nl.set_up(link.index, name, up)
}

/// Deletes TAP `tap` and its firewall table. Nothing missing is an error. A VMM that has the
/// TAP open loses it (its reads and writes fail).
///
/// Errors: [`Error::Conflict`] when `tap` is an interface other than a TAP (left alone);
/// [`Error::Netlink`], [`Error::Nft`], [`Error::Io`].
pub fn remove_tap(tap: &str) -> Result<()> {
    spec::validate_ifname("tap", tap)?;
    if nft::nft_binary().is_some() {
        apply_firewall(tap, None)?;
    }
    let nl = Nl::new()?;
    if let Some(link) = nl.link(tap)? {
        if link.kind != Some(InfoKind::Tun) {
            return Err(Error::Conflict(format!("interface {tap} is not a TAP; left alone")));
        }
        if let Err(e) = nl.del_link(link.index, tap) {
            // Kernels that cannot delete a TUN device through netlink: clear its persistence.
            tracing::debug!("{e}; clearing persistence instead");
            tap::clear_persistent(tap)?;
        }
    }
    Ok(())
}

/// Replaces the firewall of TAP `tap` with `firewall` in one nftables transaction (traffic
/// never sees a half-applied set), also while the VM runs; `None` removes it (everything
/// passes). Works whether the TAP exists yet or not (the rules match its name).
///
/// Errors: [`Error::Invalid`] for a bad spec or TAP name; [`Error::MissingTool`] without
/// `nft` (unless `firewall` is `None`); [`Error::Nft`].
pub fn apply_firewall(tap: &str, firewall: Option<&FirewallSpec>) -> Result<()> {
    spec::validate_ifname("tap", tap)?;
    if let Some(fw) = firewall {
        fw.validate().map_err(|e| SpecError::new(format!("firewall.{}", e.field), e.message))?;
    } else if nft::nft_binary().is_none() {
        return Ok(());
    }
    let stateful = firewall.is_some() && stateful_firewall_supported();
    nft::apply(&firewall::firewall_batch(tap, firewall, stateful), false)
}

/// What kind of misconfiguration a [`Problem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    /// A network's bridge does not exist.
    BridgeMissing,
    /// The bridge's name is an interface of another kind.
    NotABridge,
    /// The bridge is administratively down.
    BridgeDown,
    /// The bridge's VLAN filtering differs from the spec.
    VlanFilteringMismatch,
    /// The subnet's host address is not on the bridge.
    AddressMissing,
    /// The network's nftables table is missing.
    RulesMissing,
    /// The network's dnsmasq is not running.
    DnsmasqDead,
    /// A host route on another interface overlaps the network's subnet.
    RouteClash,
    /// A NIC's TAP does not exist (or is not a TAP).
    TapMissing,
    /// A NIC's TAP is not enslaved to its network's bridge.
    TapNotOnBridge,
    /// A NIC's TAP is administratively down.
    TapDown,
    /// A NIC's TAP is not on its VLAN (alone, as PVID, untagged).
    VlanMismatch,
    /// A NIC's firewall table is missing.
    FirewallMissing,
}

/// One misconfiguration found by [`check`]: `"<subject>: <message>"`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Problem {
    /// What kind of problem.
    pub kind: ProblemKind,
    /// What it is about: `network lan0` or `nic rvt-web-0`.
    pub subject: String,
    /// A human explanation naming the interfaces involved.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.subject, self.message)
    }
}

/// Compares the host with `networks` and the running VMs' `nics` (`rustvisor net check`):
/// bridges missing, down or with other VLAN filtering, addresses and rules missing, dead
/// dnsmasqs, host routes on other interfaces overlapping a subnet, TAPs missing, down, off
/// their bridge or on other VLANs, firewall tables missing. An empty list: all is well.
///
/// Errors: [`Error::Netlink`], [`Error::Nft`], [`Error::Io`] when the host cannot be read.
pub fn check(networks: &[NetworkSpec], nics: &[NicAttach], run_dir: &Path) -> Result<Vec<Problem>> {
    let nl = Nl::new()?;
    let links = nl.links()?;
    let routes = nl.ipv4_routes()?;
    let name_of =
        |index: u32| links.iter().find(|l| l.index == index).map_or_else(|| format!("#{index}"), |l| l.name.clone());
    let mut out = Vec::new();
    for spec in networks {
        let subject = format!("network {}", spec.name);
        let mut problem = |kind, message: String| out.push(Problem { kind, subject: subject.clone(), message });
        let status = network_status(spec, run_dir)?;
        let br = &spec.bridge;
        match status.bridge {
            BridgeState::Missing => problem(ProblemKind::BridgeMissing, format!("bridge {br} does not exist")),
            BridgeState::NotABridge => problem(ProblemKind::NotABridge, format!("interface {br} is not a bridge")),
            BridgeState::Down => problem(ProblemKind::BridgeDown, format!("bridge {br} is down")),
            BridgeState::Up => {}
        }
        if matches!(status.bridge, BridgeState::Up | BridgeState::Down) {
            if status.vlan_filtering != spec.vlan_filtering {
                let (has, wants) = if spec.vlan_filtering { ("off", "on") } else { ("on", "off") };
                problem(
                    ProblemKind::VlanFilteringMismatch,
                    format!("bridge {br} has VLAN filtering {has}, the network wants it {wants}"),
                );
            }
            if !status.address {
                if let Some(c) = spec.subnet {
                    problem(ProblemKind::AddressMissing, format!("bridge {br} lacks its address {c}"));
                }
            }
        }
        if !status.rules {
            problem(ProblemKind::RulesMissing, format!("nftables table inet {} is missing", network_table(&spec.name)));
        }
        if spec.dhcp && status.dnsmasq.is_none() {
            problem(
                ProblemKind::DnsmasqDead,
                format!("dnsmasq is not running (pid file {})", dnsmasq::pid_file(run_dir, &spec.name).display()),
            );
        }
        if let Some(subnet) = spec.subnet {
            let br_index = links.iter().find(|l| l.name == *br).map(|l| l.index);
            for r in &routes {
                if r.dst.prefix > 0 && r.dst.overlaps(&subnet) && r.oif.is_some() && r.oif != br_index {
                    let dev = r.oif.map(name_of).unwrap_or_default();
                    problem(
                        ProblemKind::RouteClash,
                        format!(
                            "subnet {subnet} clashes with the host route {}/{} on {dev}",
                            r.dst.network(),
                            r.dst.prefix
                        ),
                    );
                }
            }
        }
    }
    for nic in nics {
        let subject = format!("nic {}", nic.tap);
        let mut problem = |kind, message: String| out.push(Problem { kind, subject: subject.clone(), message });
        let Some(tap) = links.iter().find(|l| l.name == nic.tap && l.kind == Some(InfoKind::Tun)) else {
            problem(ProblemKind::TapMissing, format!("TAP {} does not exist", nic.tap));
            continue;
        };
        if !tap.up {
            problem(ProblemKind::TapDown, format!("TAP {} is down", nic.tap));
        }
        let bridge = links.iter().find(|l| l.name == nic.bridge && l.kind == Some(InfoKind::Bridge));
        match (bridge, tap.controller) {
            (Some(b), Some(c)) if c == b.index => {}
            (_, c) => {
                let now = c.map_or_else(|| "on no bridge".to_string(), |c| format!("on {}", name_of(c)));
                problem(ProblemKind::TapNotOnBridge, format!("TAP {} is {now}, not on bridge {}", nic.tap, nic.bridge));
            }
        }
        if let Some(v) = nic.vlan {
            let filtering = bridge.and_then(|b| b.vlan_filtering).unwrap_or(false);
            let vlans = nl.port_vlans(tap.index)?;
            if !filtering {
                problem(
                    ProblemKind::VlanMismatch,
                    format!("VLAN {v} wanted, but bridge {} does not filter VLANs", nic.bridge),
                );
            } else if vlans != [(v, true, true)] {
                let shown: Vec<String> = vlans
                    .iter()
                    .map(|(vid, pvid, untagged)| {
                        format!("{vid}{}{}", if *pvid { " pvid" } else { "" }, if *untagged { " untagged" } else { "" })
                    })
                    .collect();
                problem(
                    ProblemKind::VlanMismatch,
                    format!("TAP {} is on VLANs [{}], not VLAN {v} alone (pvid untagged)", nic.tap, shown.join(", ")),
                );
            }
        }
        if nic.firewall.is_some()
            && !(nft::nft_binary().is_some()
                && nft::list_table("bridge", &firewall::firewall_table(&nic.tap))?.is_some())
        {
            problem(
                ProblemKind::FirewallMissing,
                format!("nftables table bridge {} is missing", firewall::firewall_table(&nic.tap)),
            );
        }
    }
    Ok(out)
}

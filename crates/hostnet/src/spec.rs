//! What a network and a NIC attachment are: names, addresses and their validation.
//!
//! Every check fails with a [`SpecError`], one line naming the field
//! (`subnet: 10.77.0.0/24 is the network address; give the host's address, e.g. 10.77.0.1/24`).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::firewall::FirewallSpec;

/// Longest network interface name in bytes (`IFNAMSIZ - 1`).
pub const MAX_IFNAME_LEN: usize = 15;
/// Longest network or firewall name in bytes.
pub const MAX_NAME_LEN: usize = 63;
/// Prefix of the bridges this crate names ([`bridge_name`]).
pub const BRIDGE_PREFIX: &str = "rv-";
/// Prefix of the TAPs this crate names ([`tap_name`]).
pub const TAP_PREFIX: &str = "rvt-";

/// Bad input: one line naming the field (`vlan: 5000 (accepted: 1 to 4094)`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// The field, as the CLI or the JSON spec names it (`name`, `subnet`, `vlan`, `rules[2]`).
    pub field: String,
    /// What is wrong with it, with the accepted values where that helps.
    pub message: String,
}

impl SpecError {
    /// A [`SpecError`] for `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> SpecError {
        SpecError { field: field.into(), message: message.into() }
    }
}

/// Checks a network or firewall name: 1 to 63 bytes, a lower-case letter or digit first, then
/// lower-case letters, digits, `-`, `_` or `.` (the manager's rule for VM names).
///
/// Errors: a [`SpecError`] naming `field`.
pub fn validate_name(field: &str, name: &str) -> Result<(), SpecError> {
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let rest_ok = bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
    if name.len() <= MAX_NAME_LEN && first_ok && rest_ok {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!(
                "{name:?} (accepted: 1 to {MAX_NAME_LEN} characters, a lower-case letter or digit first, then \
                 lower-case letters, digits, '-', '_' or '.')"
            ),
        ))
    }
}

/// Checks a Linux interface name the way the kernel's `dev_valid_name` does: 1 to 15 bytes,
/// not `.` or `..`, without `/`, `:`, NUL or white space.
///
/// Errors: a [`SpecError`] naming `field`.
pub fn validate_ifname(field: &str, name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!(
                "{name:?} is not an interface name (accepted: 1 to {MAX_IFNAME_LEN} bytes, not \".\" or \"..\", \
                 without '/', ':', NUL or white space)"
            ),
        ))
    }
}

/// FNV-1a, 64 bits: a hash that never changes between builds, so derived names stay the same
/// across daemon upgrades.
pub(crate) fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// `len` upper-case letters (A to Z) from the hash of `s`. Upper case never occurs in valid
/// names, so a hashed name can never equal a plain one.
fn hash_letters(s: &str, len: usize) -> String {
    let mut h = fnv1a(s.as_bytes());
    (0..len)
        .map(|_| {
            let c = char::from(b'A' + (h % 26) as u8);
            h /= 26;
            c
        })
        .collect()
}

/// Whether `s` uses only the characters of a valid name (lower-case letters, digits, `-`,
/// `_`, `.`), so it may appear in an interface name as it is.
fn plain_chars(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
}

/// The bridge of network `network`: `rv-<network>` when that fits in 15 bytes (names of up to
/// 12 bytes), else `rv-` + the first 4 bytes + `-` + 7 upper-case letters hashed from the
/// whole name (e.g. `rv-prod-KQXWBMA`). Deterministic; distinct names give distinct bridges
/// unless two long names share their first 4 bytes and hash (about 1 in 8·10⁹).
pub fn bridge_name(network: &str) -> String {
    if plain_chars(network) && BRIDGE_PREFIX.len() + network.len() <= MAX_IFNAME_LEN {
        format!("{BRIDGE_PREFIX}{network}")
    } else {
        let head: String = network.chars().filter(|c| c.is_ascii_alphanumeric()).take(4).collect();
        let head = head.to_ascii_lowercase();
        let hash_len = MAX_IFNAME_LEN - BRIDGE_PREFIX.len() - head.len() - 1;
        format!("{BRIDGE_PREFIX}{head}-{}", hash_letters(network, hash_len))
    }
}

/// The TAP of NIC `nic_index` (0-based) of VM `vm`: `rvt-<vm>-<index>` when that fits in 15
/// bytes (e.g. `rvt-web-0`), else `rvt-`, 7 upper-case letters hashed from the VM name, `-`
/// and the index (e.g. `rvt-QZLKMWA-1`). Unique per (VM, NIC): the index is what follows the
/// last `-`, and hashed names (upper case) never equal plain ones (lower case). Never
/// collides with a [`bridge_name`] (`rvt-` vs `rv-`).
pub fn tap_name(vm: &str, nic_index: u8) -> String {
    let index = nic_index.to_string();
    if plain_chars(vm) && TAP_PREFIX.len() + vm.len() + 1 + index.len() <= MAX_IFNAME_LEN {
        format!("{TAP_PREFIX}{vm}-{index}")
    } else {
        format!("{TAP_PREFIX}{}-{index}", hash_letters(vm, 7))
    }
}

/// An IPv4 address with its prefix length: the host's address on a network and the network's
/// size (`10.77.0.1/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Cidr {
    /// The address (on a network: the host's own address on its bridge).
    pub addr: Ipv4Addr,
    /// The prefix length in bits, 0 to 32.
    pub prefix: u8,
}

impl Ipv4Cidr {
    /// The netmask (`255.255.255.0` for /24).
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix.min(32)))
        }
    }

    /// The network address (`10.77.0.0` for `10.77.0.1/24`).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// The broadcast address (`10.77.0.255` for `10.77.0.1/24`).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }

    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }

    /// Whether the two networks share any address.
    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.contains(other.network()) || other.contains(self.network())
    }

    /// The addresses handed out by DHCP (first, last, both inclusive): the larger side of the
    /// network next to the host's address, leaving out the network and broadcast addresses.
    pub fn dhcp_range(&self) -> (Ipv4Addr, Ipv4Addr) {
        let first = u32::from(self.network()) + 1;
        let last = u32::from(self.broadcast()) - 1;
        let host = u32::from(self.addr);
        if last - host >= host - first {
            (Ipv4Addr::from(host + 1), Ipv4Addr::from(last))
        } else {
            (Ipv4Addr::from(first), Ipv4Addr::from(host - 1))
        }
    }

    /// Checks a network's subnet: prefix /8 to /30, and the address is a usable host address
    /// (not the network or broadcast address, not loopback, multicast, link-local or 0.0.0.0).
    ///
    /// Errors: a [`SpecError`] naming `field`.
    pub fn validate_host(&self, field: &str) -> Result<(), SpecError> {
        let err = |m: String| Err(SpecError::new(field, m));
        if !(8..=30).contains(&self.prefix) {
            return err(format!("{self} (accepted prefixes: /8 to /30)"));
        }
        let a = self.addr;
        if a.is_loopback() || a.is_multicast() || a.is_link_local() || a.is_unspecified() || a.is_broadcast() {
            return err(format!("{self} is not a unicast host address"));
        }
        if a == self.network() {
            let example = Ipv4Addr::from(u32::from(a) + 1);
            return err(format!(
                "{self} is the network address; give the host's address, e.g. {example}/{}",
                self.prefix
            ));
        }
        if a == self.broadcast() {
            return err(format!("{self} is the broadcast address; give the host's address"));
        }
        Ok(())
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = SpecError;

    /// Parses `A.B.C.D/N` (N 0 to 32). Errors name the field `subnet`.
    fn from_str(s: &str) -> Result<Ipv4Cidr, SpecError> {
        let bad =
            || SpecError::new("subnet", format!("{s:?} (expected an IPv4 address and prefix, e.g. 10.77.0.1/24)"));
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        Ok(Ipv4Cidr { addr, prefix })
    }
}

impl TryFrom<String> for Ipv4Cidr {
    type Error = SpecError;
    fn try_from(s: String) -> Result<Ipv4Cidr, SpecError> {
        s.parse()
    }
}

impl From<Ipv4Cidr> for String {
    fn from(c: Ipv4Cidr) -> String {
        c.to_string()
    }
}

/// An Ethernet MAC address (`52:54:00:12:34:56`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Whether this is a unicast address other than all zeros (usable by a NIC).
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl FromStr for MacAddr {
    type Err = SpecError;

    /// Parses six hex bytes separated by `:` (either case). Errors name the field `mac`.
    fn from_str(s: &str) -> Result<MacAddr, SpecError> {
        let bad = || SpecError::new("mac", format!("{s:?} (expected six hex bytes, e.g. 52:54:00:12:34:56)"));
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = SpecError;
    fn try_from(s: String) -> Result<MacAddr, SpecError> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

/// A MAC address for a guest NIC: `52:54:00` (locally administered, unicast: the prefix QEMU
/// and libvirt use) + 3 bytes hashed from `seed` (e.g. `"web/0"`). Deterministic; when the
/// result is in `in_use` (the host's other NICs), `seed#1`, `seed#2`, ... are tried, so the
/// address is unique on the host as long as `in_use` is complete.
pub fn generate_mac(seed: &str, in_use: &[MacAddr]) -> MacAddr {
    let mut attempt = 0u32;
    loop {
        let input = if attempt == 0 { seed.to_string() } else { format!("{seed}#{attempt}") };
        let h = fnv1a(input.as_bytes()).to_be_bytes();
        let mac = MacAddr([0x52, 0x54, 0x00, h[5], h[6], h[7]]);
        if !in_use.contains(&mac) {
            return mac;
        }
        attempt += 1;
    }
}

/// A virtual network: a Linux bridge, optionally with the host's address on it, DHCP
/// (dnsmasq), NAT to the host's routes, or isolation from the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// The network's name ([`validate_name`] rules).
    pub name: String,
    /// The bridge's interface name (normally [`bridge_name`] of `name`).
    pub bridge: String,
    /// The host's address on the bridge and the network's prefix (`10.77.0.1/24`); `None`: a
    /// plain layer-2 switch, the host has no address on it.
    pub subnet: Option<Ipv4Cidr>,
    /// Run a DHCP server (dnsmasq) on the bridge; needs `subnet`.
    pub dhcp: bool,
    /// Masquerade the subnet out of the host's other interfaces (and turn IPv4 forwarding
    /// on); needs `subnet`; excludes `isolated`.
    pub nat: bool,
    /// No host routing at all: the host forwards nothing from or to the bridge and accepts
    /// nothing from it but DHCP. Guests reach only each other.
    pub isolated: bool,
    /// Turn on bridge VLAN filtering, so NICs with a `vlan` see only their VLAN.
    pub vlan_filtering: bool,
}

impl NetworkSpec {
    /// A network named `name` on bridge [`bridge_name`]`(name)`, with no subnet and no
    /// option set.
    pub fn new(name: &str) -> NetworkSpec {
        NetworkSpec {
            name: name.to_string(),
            bridge: bridge_name(name),
            subnet: None,
            dhcp: false,
            nat: false,
            isolated: false,
            vlan_filtering: false,
        }
    }

    /// Checks the spec on its own: the name, the bridge's interface name, the subnet
    /// ([`Ipv4Cidr::validate_host`]), `dhcp` and `nat` need a subnet, `isolated` excludes
    /// `nat`.
    ///
    /// Errors: a [`SpecError`] naming the first bad field.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_name("name", &self.name)?;
        validate_ifname("bridge", &self.bridge)?;
        if let Some(subnet) = &self.subnet {
            subnet.validate_host("subnet")?;
        }
        if self.subnet.is_none() {
            if self.dhcp {
                return Err(SpecError::new("dhcp", "needs a subnet (e.g. --subnet 10.77.0.1/24)"));
            }
            if self.nat {
                return Err(SpecError::new("nat", "needs a subnet (e.g. --subnet 10.77.0.1/24)"));
            }
        }
        if self.isolated && self.nat {
            return Err(SpecError::new("isolated", "excludes nat (an isolated network has no host routing)"));
        }
        Ok(())
    }

    /// Whether the two networks' subnets share any address (`false` when either has none).
    pub fn overlaps(&self, other: &NetworkSpec) -> bool {
        match (&self.subnet, &other.subnet) {
            (Some(a), Some(b)) => a.overlaps(b),
            _ => false,
        }
    }

    /// Checks that this network can exist beside `existing` (the host's other networks): a
    /// different name, a different bridge, no overlapping subnet.
    ///
    /// Errors: a [`SpecError`] naming `name`, `bridge` or `subnet`.
    pub fn check_against(&self, existing: &[NetworkSpec]) -> Result<(), SpecError> {
        for other in existing {
            if other.name == self.name {
                return Err(SpecError::new("name", format!("{:?} is already a network", self.name)));
            }
            if other.bridge == self.bridge {
                return Err(SpecError::new(
                    "bridge",
                    format!("{} is already the bridge of network {}", self.bridge, other.name),
                ));
            }
            if let (Some(a), Some(b)) = (&self.subnet, &other.subnet) {
                if a.overlaps(b) {
                    return Err(SpecError::new("subnet", format!("{a} overlaps network {}'s {b}", other.name)));
                }
            }
        }
        Ok(())
    }
}

/// One guest NIC on the host: a persistent TAP on a network's bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicAttach {
    /// The TAP's interface name (normally [`tap_name`]); the VMM opens it with `tap=NAME`.
    pub tap: String,
    /// The bridge to attach it to (the network's [`NetworkSpec::bridge`]).
    pub bridge: String,
    /// The VLAN (1 to 4094) the port carries untagged as its PVID; `None`: the bridge's
    /// default (VLAN 1). Needs a bridge with VLAN filtering on.
    pub vlan: Option<u16>,
    /// The guest's MAC address. The TAP's own (host-side) address is derived from it, with
    /// the first byte `fe` as libvirt does, so the bridge never takes it as its own address.
    pub mac: MacAddr,
    /// The per-VM firewall on the TAP; `None`: everything passes.
    pub firewall: Option<FirewallSpec>,
}

impl NicAttach {
    /// Checks the attachment: interface names, the VLAN range, a unicast MAC, the firewall.
    ///
    /// Errors: a [`SpecError`] naming the first bad field (`tap`, `bridge`, `vlan`, `mac`,
    /// `firewall...`).
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_ifname("tap", &self.tap)?;
        validate_ifname("bridge", &self.bridge)?;
        if let Some(v) = self.vlan {
            validate_vlan(v)?;
        }
        if !self.mac.is_unicast() {
            return Err(SpecError::new("mac", format!("{} is not a unicast address", self.mac)));
        }
        if let Some(fw) = &self.firewall {
            fw.validate().map_err(|e| SpecError::new(format!("firewall.{}", e.field), e.message))?;
        }
        Ok(())
    }

    /// The TAP's own (host-side) MAC address: the guest's with the first byte `0xfe`.
    pub fn tap_mac(&self) -> MacAddr {
        let mut b = self.mac.0;
        b[0] = 0xfe;
        MacAddr(b)
    }
}

/// Checks a VLAN id: 1 to 4094.
///
/// Errors: a [`SpecError`] naming `vlan`.
pub fn validate_vlan(vlan: u16) -> Result<(), SpecError> {
    if (1..=4094).contains(&vlan) {
        Ok(())
    } else {
        Err(SpecError::new("vlan", format!("{vlan} (accepted: 1 to 4094)")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        validate_name("name", "lan0").unwrap();
        validate_name("name", "a.b_c-d").unwrap();
        for bad in ["", "Lan", "-x", "a b", "a/b", &"x".repeat(64)] {
            let e = validate_name("name", bad).unwrap_err();
            assert_eq!(e.field, "name");
            assert!(e.to_string().starts_with("name: "), "{e}");
        }
    }

    #[test]
    fn bridge_names_fit_and_differ() {
        assert_eq!(bridge_name("lan0"), "rv-lan0");
        assert_eq!(bridge_name("twelve-chars"), "rv-twelve-chars");
        let long = bridge_name("production-network");
        assert_eq!(long.len(), 15, "{long}");
        assert!(long.starts_with("rv-prod-"), "{long}");
        assert_ne!(long, bridge_name("production-network2"));
        assert_eq!(long, bridge_name("production-network"), "deterministic");
    }

    #[test]
    fn tap_names_fit_and_are_unique() {
        assert_eq!(tap_name("web", 0), "rvt-web-0");
        assert_eq!(tap_name("web-0", 1), "rvt-web-0-1");
        let mut seen = std::collections::HashSet::new();
        let vms = ["web", "web-0", "a-very-long-virtual-machine-name", "a-very-long-virtual-machine-namf", "x"];
        for vm in vms {
            for i in [0u8, 1, 9, 10, 99, 100, 255] {
                let t = tap_name(vm, i);
                assert!(t.len() <= MAX_IFNAME_LEN, "{t}");
                validate_ifname("tap", &t).unwrap();
                assert!(seen.insert(t.clone()), "duplicate {t}");
                assert!(!t.starts_with(BRIDGE_PREFIX) || t.starts_with(TAP_PREFIX));
            }
        }
    }

    #[test]
    fn cidr() {
        let c: Ipv4Cidr = "10.77.0.1/24".parse().unwrap();
        assert_eq!(c.network(), Ipv4Addr::new(10, 77, 0, 0));
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 77, 0, 255));
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(c.dhcp_range(), (Ipv4Addr::new(10, 77, 0, 2), Ipv4Addr::new(10, 77, 0, 254)));
        let top: Ipv4Cidr = "10.77.0.254/24".parse().unwrap();
        assert_eq!(top.dhcp_range(), (Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(10, 77, 0, 253)));
        let tiny: Ipv4Cidr = "10.0.0.1/30".parse().unwrap();
        assert_eq!(tiny.dhcp_range(), (Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 2)));
        c.validate_host("subnet").unwrap();
        assert!(c.overlaps(&"10.77.0.130/25".parse().unwrap()));
        assert!(c.overlaps(&"10.0.0.1/8".parse().unwrap()));
        assert!(!c.overlaps(&"10.78.0.1/24".parse().unwrap()));
        for (bad, what) in [
            ("10.77.0.0/24", "network address"),
            ("10.77.0.255/24", "broadcast"),
            ("10.77.0.1/31", "prefix"),
            ("127.0.0.1/8", "unicast"),
        ] {
            let e = bad.parse::<Ipv4Cidr>().unwrap().validate_host("subnet").unwrap_err();
            assert!(e.to_string().starts_with("subnet: ") && e.to_string().contains(what), "{e}");
        }
        for bad in ["10.77.0.1", "10.77.0.1/33", "10.77.0/24", "x/24"] {
            assert_eq!(bad.parse::<Ipv4Cidr>().unwrap_err().field, "subnet");
        }
    }

    #[test]
    fn macs() {
        let m: MacAddr = "52:54:00:AB:cd:01".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:01");
        assert!(m.is_unicast());
        assert!(!"01:00:5e:00:00:01".parse::<MacAddr>().unwrap().is_unicast());
        for bad in ["52:54:00:ab:cd", "52:54:00:ab:cd:01:02", "5:54:00:ab:cd:01", "zz:54:00:ab:cd:01"] {
            assert_eq!(bad.parse::<MacAddr>().unwrap_err().field, "mac");
        }
        let a = generate_mac("web/0", &[]);
        assert_eq!(a, generate_mac("web/0", &[]));
        assert_eq!(&a.0[..3], &[0x52, 0x54, 0x00]);
        let b = generate_mac("web/0", &[a]);
        assert_ne!(a, b);
        assert!(b.is_unicast());
    }

    #[test]
    fn network_validation_names_the_field() {
        let mut n = NetworkSpec::new("lan0");
        n.validate().unwrap();
        n.dhcp = true;
        assert_eq!(n.validate().unwrap_err().field, "dhcp");
        n.dhcp = false;
        n.nat = true;
        assert_eq!(n.validate().unwrap_err().field, "nat");
        n.subnet = Some("10.77.0.1/24".parse().unwrap());
        n.validate().unwrap();
        n.isolated = true;
        assert_eq!(
            n.validate().unwrap_err().to_string(),
            "isolated: excludes nat (an isolated network has no host routing)"
        );
        n.isolated = false;
        n.bridge = "a-bridge-name-too-long".into();
        assert_eq!(n.validate().unwrap_err().field, "bridge");

        let a = NetworkSpec { subnet: Some("10.77.0.1/24".parse().unwrap()), ..NetworkSpec::new("a") };
        let b = NetworkSpec { subnet: Some("10.77.0.129/25".parse().unwrap()), ..NetworkSpec::new("b") };
        assert!(a.overlaps(&b));
        let e = b.check_against(std::slice::from_ref(&a)).unwrap_err();
        assert_eq!(e.to_string(), "subnet: 10.77.0.129/25 overlaps network a's 10.77.0.1/24");
        assert_eq!(a.check_against(std::slice::from_ref(&a)).unwrap_err().field, "name");
        let c = NetworkSpec { subnet: Some("10.78.0.1/24".parse().unwrap()), ..NetworkSpec::new("c") };
        c.check_against(&[a, b]).unwrap();
    }

    #[test]
    fn nic_validation_names_the_field() {
        let mut nic = NicAttach {
            tap: tap_name("web", 0),
            bridge: bridge_name("lan0"),
            vlan: Some(20),
            mac: generate_mac("web/0", &[]),
            firewall: None,
        };
        nic.validate().unwrap();
        assert_eq!(nic.tap_mac().0[0], 0xfe);
        assert_eq!(&nic.tap_mac().0[1..], &nic.mac.0[1..]);
        for v in [0, 4095, 5000] {
            nic.vlan = Some(v);
            let e = nic.validate().unwrap_err();
            assert_eq!(e.to_string(), format!("vlan: {v} (accepted: 1 to 4094)"));
        }
        nic.vlan = None;
        nic.mac = "01:00:5e:00:00:01".parse().unwrap();
        assert_eq!(nic.validate().unwrap_err().field, "mac");
        nic.mac = generate_mac("x", &[]);
        nic.tap = "tap with space".into();
        assert_eq!(nic.validate().unwrap_err().field, "tap");
    }

    #[test]
    fn serde_round_trip() {
        let n = NetworkSpec { subnet: Some("10.77.0.1/24".parse().unwrap()), dhcp: true, ..NetworkSpec::new("lan0") };
        let j = serde_json::to_string(&n).unwrap();
        assert!(j.contains("\"subnet\":\"10.77.0.1/24\""), "{j}");
        assert_eq!(serde_json::from_str::<NetworkSpec>(&j).unwrap(), n);
        let e = serde_json::from_str::<NetworkSpec>(&j.replace("/24", "/40")).unwrap_err();
        assert!(e.to_string().contains("subnet"), "{e}");
    }
}

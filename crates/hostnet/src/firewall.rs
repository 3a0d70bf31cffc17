//! Firewall groups: per-VM rules on a NIC's TAP (micro-segmentation).
//!
//! A [`FirewallSpec`] is a named list of [`Rule`]s and a default verdict per direction.
//! Directions are the guest's: `in` is traffic to the VM (from other VMs, the host or the
//! outside), `out` is traffic the VM sends. A rule's port is the destination port: `in
//! tcp/80` lets others reach the VM's web server, `out udp/53` lets the VM send DNS queries.
//!
//! On the host a TAP's rules are one nftables table of family `bridge`,
//! `rustvisor-fw-<tap>`, hooked on `forward` (to and from other bridge ports), `input` (VM to
//! host) and `output` (host to VM), so they see bridged traffic without `br_netfilter`. Besides
//! the rules, each direction always lets through ARP, DHCP (client port 68 ↔ server port 67)
//! and packets of connections already allowed: with `ct state established,related` where the
//! kernel has bridge connection tracking (`nf_conntrack_bridge`, Debian's kernels do), else
//! statelessly every TCP segment that is not a connection opening (a SYN without ACK); UDP and
//! ICMP replies then need rules of their own. [`stateful_firewall_supported`] tells which.
//! IPv6 neighbour discovery is ICMPv6: with a `drop` default, IPv6 guests need `in icmp` and
//! `out icmp`.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::nft;
use crate::spec::{validate_name, SpecError};

/// The direction of traffic, seen from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// To the VM.
    In,
    /// From the VM.
    Out,
}

/// The protocol a rule matches (IPv4 and IPv6 alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP, optionally one destination port or a range.
    Tcp,
    /// UDP, optionally one destination port or a range.
    Udp,
    /// ICMP and ICMPv6 (no port).
    Icmp,
    /// Every packet (no port).
    Any,
}

/// What a rule (or a direction's default) does with a matching packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let it through (`allow` on the CLI).
    Accept,
    /// Drop it silently (`deny` on the CLI).
    Drop,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Accept => "accept",
            Action::Drop => "drop",
        })
    }
}

impl FromStr for Action {
    type Err = SpecError;

    /// `accept` or `allow`; `drop` or `deny`. Errors name the field `action`.
    fn from_str(s: &str) -> Result<Action, SpecError> {
        match s {
            "accept" | "allow" => Ok(Action::Accept),
            "drop" | "deny" => Ok(Action::Drop),
            _ => Err(SpecError::new("action", format!("{s:?} (accepted: accept, allow, drop, deny)"))),
        }
    }
}

/// A destination port or an inclusive range of them (`80`, `8000-8080`), 1 to 65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRange {
    /// The first port.
    pub first: u16,
    /// The last port (equal to `first` for one port).
    pub last: u16,
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// One firewall rule: `allow in tcp/80`, `deny out udp/53`, `allow in icmp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Rule {
    /// Which traffic: to the VM or from it.
    pub dir: Direction,
    /// The protocol.
    pub proto: Proto,
    /// The destination port(s), for TCP and UDP only; `None`: any port.
    pub port: Option<PortRange>,
    /// What to do with a matching packet.
    pub action: Action,
}

impl Rule {
    /// Checks the rule: a port only with TCP or UDP, ports 1 to 65535, a range's first port
    /// not above its last.
    ///
    /// Errors: a [`SpecError`] naming `field` (the caller's, e.g. `rules[2]`).
    pub fn validate(&self, field: &str) -> Result<(), SpecError> {
        if let Some(p) = self.port {
            if matches!(self.proto, Proto::Icmp | Proto::Any) {
                return Err(SpecError::new(field, format!("{self:?}: only tcp and udp take a port")));
            }
            if p.first == 0 || p.first > p.last {
                return Err(SpecError::new(field, format!("port {p} (accepted: 1 to 65535, a range low-high)")));
            }
        }
        Ok(())
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match self.action {
            Action::Accept => "allow",
            Action::Drop => "deny",
        };
        let dir = match self.dir {
            Direction::In => "in",
            Direction::Out => "out",
        };
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
            Proto::Any => "any",
        };
        write!(f, "{action} {dir} {proto}")?;
        if let Some(p) = self.port {
            write!(f, "/{p}")?;
        }
        Ok(())
    }
}

impl FromStr for Rule {
    type Err = SpecError;

    /// Parses `[allow|accept|deny|drop] <in|out> <tcp|udp|icmp|any>[/<port>[-<port>]]`: the
    /// CLI's `--allow in tcp/80` is `"allow in tcp/80"`; without an action the rule allows.
    /// Errors name the field `rule` and quote the text.
    fn from_str(s: &str) -> Result<Rule, SpecError> {
        let bad = |why: &str| {
            SpecError::new(
                "rule",
                format!(
                    "{s:?}: {why} (expected [allow|deny] in|out tcp|udp|icmp|any[/PORT[-PORT]], e.g. \"in tcp/80\")"
                ),
            )
        };
        let mut words: Vec<&str> = s.split_whitespace().collect();
        let action = match words.first().map(|w| w.parse::<Action>()) {
            Some(Ok(a)) => {
                words.remove(0);
                a
            }
            _ => Action::Accept,
        };
        let [dir, what] = words[..] else {
            return Err(bad("wrong number of words"));
        };
        let dir = match dir {
            "in" => Direction::In,
            "out" => Direction::Out,
            _ => return Err(bad("the direction is in or out")),
        };
        let (proto, port) = match what.split_once('/') {
            Some((p, port)) => (p, Some(port)),
            None => (what, None),
        };
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            "icmp" => Proto::Icmp,
            "any" => Proto::Any,
            _ => return Err(bad("unknown protocol")),
        };
        let port = match port {
            None => None,
            Some(p) => {
                let num = |x: &str| x.parse::<u16>().map_err(|_| bad("ports are 1 to 65535"));
                let (first, last) = match p.split_once('-') {
                    Some((a, b)) => (num(a)?, num(b)?),
                    None => (num(p)?, num(p)?),
                };
                Some(PortRange { first, last })
            }
        };
        let rule = Rule { dir, proto, port, action };
        rule.validate("rule").map_err(|e| bad(&e.message))?;
        Ok(rule)
    }
}

impl TryFrom<String> for Rule {
    type Error = SpecError;
    fn try_from(s: String) -> Result<Rule, SpecError> {
        s.parse()
    }
}

impl From<Rule> for String {
    fn from(r: Rule) -> String {
        r.to_string()
    }
}

/// A firewall group: rules, first match wins, then the direction's default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallSpec {
    /// The group's name ([`validate_name`] rules).
    pub name: String,
    /// The rules in order.
    pub rules: Vec<Rule>,
    /// What happens to traffic to the VM that no rule matches.
    pub default_in: Action,
    /// What happens to traffic from the VM that no rule matches.
    pub default_out: Action,
}

/// Most rules in one group.
pub const MAX_RULES: usize = 256;

impl FirewallSpec {
    /// Checks the group: its name, at most [`MAX_RULES`] rules, each [`Rule::validate`].
    ///
    /// Errors: a [`SpecError`] naming `name`, `rules` or `rules[i]`.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_name("name", &self.name)?;
        if self.rules.len() > MAX_RULES {
            return Err(SpecError::new("rules", format!("{} rules (accepted: at most {MAX_RULES})", self.rules.len())));
        }
        for (i, r) in self.rules.iter().enumerate() {
            r.validate(&format!("rules[{i}]"))?;
        }
        Ok(())
    }
}

/// The nftables table holding the rules of TAP `tap` (family `bridge`).
pub fn firewall_table(tap: &str) -> String {
    format!("rustvisor-fw-{tap}")
}

/// Whether the kernel can track connections of bridged traffic (`nf_conntrack_bridge`), so
/// firewalls are stateful (see the module docs). Asked once per process, with `nft --check`
/// (nothing is changed); `false` also when `nft` cannot run.
pub fn stateful_firewall_supported() -> bool {
    static STATEFUL: OnceLock<bool> = OnceLock::new();
    *STATEFUL.get_or_init(|| {
        let table = "rustvisor-probe";
        let mut b = nft::Batch::new();
        b.add_table(nft::Family::Bridge, table);
        b.add_base_chain(nft::Family::Bridge, table, "forward", nft::Hook::Forward, 0, true);
        b.add_rule(nft::Family::Bridge, table, "forward", vec![nft::ct_established(), nft::accept()]);
        let ok = nft::apply(&b, true).is_ok();
        if !ok {
            tracing::warn!(
                "the kernel has no bridge connection tracking (nf_conntrack_bridge): VM firewalls are stateless"
            );
        }
        ok
    })
}

/// The rules of `spec` on TAP `tap` as an nftables batch replacing the TAP's table (or only
/// deleting it when `spec` is `None`).
pub(crate) fn firewall_batch(tap: &str, spec: Option<&FirewallSpec>, stateful: bool) -> nft::Batch {
    use nft::Family::Bridge;
    let table = firewall_table(tap);
    let mut b = nft::Batch::new();
    let Some(spec) = spec else {
        b.delete_table(Bridge, &table);
        return b;
    };
    b.replace_table(Bridge, &table);
    for (chain, dir, default) in
        [("to-vm", Direction::In, spec.default_in), ("from-vm", Direction::Out, spec.default_out)]
    {
        b.add_chain(Bridge, &table, chain);
        let (sport, dport) = if dir == Direction::In { (67, 68) } else { (68, 67) };
        let mut fixed = vec![
            vec![if stateful { nft::ct_established() } else { nft::tcp_not_syn_only() }, nft::accept()],
            vec![nft::ether_type("arp"), nft::accept()],
            vec![
                nft::port_match("udp", "sport", sport, sport),
                nft::port_match("udp", "dport", dport, dport),
                nft::accept(),
            ],
        ];
        for r in spec.rules.iter().filter(|r| r.dir == dir) {
            let mut stmts = Vec::new();
            match (r.proto, r.port) {
                (Proto::Tcp, Some(p)) => stmts.push(nft::port_match("tcp", "dport", p.first, p.last)),
                (Proto::Udp, Some(p)) => stmts.push(nft::port_match("udp", "dport", p.first, p.last)),
                (Proto::Tcp, None) => stmts.push(nft::l4proto(&["tcp"])),
                (Proto::Udp, None) => stmts.push(nft::l4proto(&["udp"])),
                (Proto::Icmp, _) => stmts.push(nft::l4proto(&["icmp", "ipv6-icmp"])),
                (Proto::Any, _) => {}
            }
            stmts.push(nft::verdict(r.action));
            fixed.push(stmts);
        }
        fixed.push(vec![nft::verdict(default)]);
        for stmts in fixed {
            b.add_rule(Bridge, &table, chain, stmts);
        }
    }
    b.add_base_chain(Bridge, &table, "forward", nft::Hook::Forward, 0, true);
    b.add_rule(Bridge, &table, "forward", vec![nft::iface("oifname", tap), nft::jump("to-vm")]);
    b.add_rule(Bridge, &table, "forward", vec![nft::iface("iifname", tap), nft::jump("from-vm")]);
    b.add_base_chain(Bridge, &table, "output", nft::Hook::Output, 0, true);
    b.add_rule(Bridge, &table, "output", vec![nft::iface("oifname", tap), nft::jump("to-vm")]);
    b.add_base_chain(Bridge, &table, "input", nft::Hook::Input, 0, true);
    b.add_rule(Bridge, &table, "input", vec![nft::iface("iifname", tap), nft::jump("from-vm")]);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_print() {
        for (text, shown) in [
            ("in tcp/80", "allow in tcp/80"),
            ("allow in icmp", "allow in icmp"),
            ("deny out udp/53", "deny out udp/53"),
            ("drop in tcp/8000-8080", "deny in tcp/8000-8080"),
            ("accept out any", "allow out any"),
            ("  in   udp  ", "allow in udp"),
        ] {
            let r: Rule = text.parse().unwrap();
            assert_eq!(r.to_string(), shown);
            assert_eq!(shown.parse::<Rule>().unwrap(), r);
        }
        let r: Rule = "in tcp/8000-8080".parse().unwrap();
        assert_eq!(r.port, Some(PortRange { first: 8000, last: 8080 }));
    }

    #[test]
    fn bad_rules_name_the_field() {
        for (bad, why) in [
            ("in icmp/80", "only tcp and udp take a port"),
            ("in tcp/0", "port 0"),
            ("in tcp/99999", "ports are 1 to 65535"),
            ("in tcp/90-80", "port 90-80"),
            ("sideways tcp/80", "direction"),
            ("in sctp/80", "unknown protocol"),
            ("in", "wrong number"),
            ("allow in tcp/80 now", "wrong number"),
        ] {
            let e = bad.parse::<Rule>().unwrap_err();
            assert_eq!(e.field, "rule");
            let s = e.to_string();
            assert!(s.starts_with("rule: ") && s.contains(why) && s.contains(bad), "{s}");
        }
        assert_eq!("maybe".parse::<Action>().unwrap_err().field, "action");
    }

    #[test]
    fn spec_validation() {
        let mut fw = FirewallSpec {
            name: "web".into(),
            rules: vec!["in tcp/80".parse().unwrap(), "in icmp".parse().unwrap()],
            default_in: Action::Drop,
            default_out: Action::Accept,
        };
        fw.validate().unwrap();
        fw.rules.push(Rule {
            dir: Direction::In,
            proto: Proto::Icmp,
            port: Some(PortRange { first: 1, last: 1 }),
            action: Action::Accept,
        });
        assert_eq!(fw.validate().unwrap_err().field, "rules[2]");
        fw.rules.pop();
        fw.name = "Web".into();
        assert_eq!(fw.validate().unwrap_err().field, "name");
        let j = serde_json::to_string(&FirewallSpec { name: "web".into(), ..fw }).unwrap();
        assert!(j.contains("\"allow in tcp/80\""), "{j}");
        assert!(j.contains("\"default_in\":\"drop\""), "{j}");
    }

    #[test]
    fn batch_shape() {
        let fw = FirewallSpec {
            name: "web".into(),
            rules: vec!["in tcp/80".parse().unwrap(), "deny out udp/53".parse().unwrap()],
            default_in: Action::Drop,
            default_out: Action::Accept,
        };
        let j = firewall_batch("rvt-web-0", Some(&fw), true).to_json();
        assert!(j.starts_with("{\"nftables\":["), "{j}");
        // add + delete + add: one transaction that replaces the table whether it exists or not
        assert_eq!(
            j.matches("\"table\":{\"family\":\"bridge\",\"name\":\"rustvisor-fw-rvt-web-0\"}").count(),
            3,
            "{j}"
        );
        assert!(j.contains("\"ct\""), "{j}");
        assert!(j.contains("\"dport\""), "{j}");
        let stateless = firewall_batch("rvt-web-0", Some(&fw), false).to_json();
        assert!(!stateless.contains("\"ct\""), "{stateless}");
        let del = firewall_batch("rvt-web-0", None, true).to_json();
        assert!(del.contains("\"delete\"") && !del.contains("\"chain\""), "{del}");
        assert!(del.rfind("\"delete\"") > del.rfind("\"add\""), "ends with the delete: {del}");
    }
}

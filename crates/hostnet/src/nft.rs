//! nftables through its JSON API (the `nftables` crate's schema), applied by Debian's `nft`
//! binary (package `nftables`) as `nft -j -f -`: one batch is one kernel transaction.

use std::borrow::Cow;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use nftables::expr::{BinaryOperation, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, SetItem};
use nftables::schema::{Chain, NfListObject, Nftables, Rule, Table};
use nftables::stmt::{JumpTarget, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType};

pub(crate) use nftables::types::NfFamily as Family;
pub(crate) use nftables::types::NfHook as Hook;

use crate::firewall::Action;
use crate::Error;

/// The `nft` binary: the first of `$PATH`'s, else `/usr/sbin/nft` (root's `$PATH` has it;
/// a daemon started with a bare `$PATH` may not).
pub(crate) fn nft_binary() -> Option<PathBuf> {
    find_binary("nft")
}

/// `name` in `$PATH`, `/usr/sbin` or `/sbin`.
pub(crate) fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A list of nftables commands, applied atomically by [`apply`].
#[derive(Debug, Default)]
pub(crate) struct Batch {
    cmds: Vec<nftables::schema::NfObject<'static>>,
}

fn s(v: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(v.to_string()))
}

fn m(left: Expression<'static>, op: Operator, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn payload(protocol: &str, field: &str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: Cow::Owned(protocol.to_string()),
        field: Cow::Owned(field.to_string()),
    })))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn set(items: &[&str]) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(items.iter().map(|i| SetItem::Element(s(i))).collect()))
}

/// `ct state established,related`.
pub(crate) fn ct_established() -> Statement<'static> {
    let ct = Expression::Named(NamedExpression::CT(nftables::expr::CT {
        key: Cow::Borrowed("state"),
        family: None,
        dir: None,
    }));
    m(ct, Operator::IN, Expression::List(vec![s("established"), s("related")]))
}

/// `tcp flags & (syn | ack) != syn`: a TCP segment that does not open a connection.
pub(crate) fn tcp_not_syn_only() -> Statement<'static> {
    let flags = Expression::BinaryOperation(Box::new(BinaryOperation::AND(
        payload("tcp", "flags"),
        Expression::BinaryOperation(Box::new(BinaryOperation::OR(vec![s("syn"), s("ack")]))),
    )));
    m(flags, Operator::NEQ, s("syn"))
}

/// `ether type <t>`.
pub(crate) fn ether_type(t: &str) -> Statement<'static> {
    m(payload("ether", "type"), Operator::EQ, s(t))
}

/// `<proto> <field> <first>[-<last>]`.
pub(crate) fn port_match(proto: &str, field: &str, first: u16, last: u16) -> Statement<'static> {
    let right = if first == last {
        Expression::Number(u32::from(first))
    } else {
        Expression::Range(Box::new(nftables::expr::Range {
            range: [Expression::Number(u32::from(first)), Expression::Number(u32::from(last))],
        }))
    };
    m(payload(proto, field), Operator::EQ, right)
}

/// `meta l4proto { ... }`.
pub(crate) fn l4proto(protos: &[&str]) -> Statement<'static> {
    m(meta(MetaKey::L4proto), Operator::IN, set(protos))
}

/// `iifname`/`oifname` `== name`.
pub(crate) fn iface(key: &str, name: &str) -> Statement<'static> {
    let k = if key == "iifname" { MetaKey::Iifname } else { MetaKey::Oifname };
    m(meta(k), Operator::EQ, s(name))
}

/// `iifname`/`oifname` `!= name`.
pub(crate) fn iface_not(key: &str, name: &str) -> Statement<'static> {
    let k = if key == "iifname" { MetaKey::Iifname } else { MetaKey::Oifname };
    m(meta(k), Operator::NEQ, s(name))
}

/// `ip saddr`/`ip daddr` `==`/`!=` `addr/prefix`.
pub(crate) fn ip_prefix(field: &str, equal: bool, addr: std::net::Ipv4Addr, prefix: u8) -> Statement<'static> {
    let p = Expression::Named(NamedExpression::Prefix(nftables::expr::Prefix {
        addr: Box::new(s(&addr.to_string())),
        len: u32::from(prefix),
    }));
    m(payload("ip", field), if equal { Operator::EQ } else { Operator::NEQ }, p)
}

/// `udp`/`tcp` `dport == port` for one port.
pub(crate) fn dport(proto: &str, port: u16) -> Statement<'static> {
    port_match(proto, "dport", port, port)
}

/// `accept`.
pub(crate) fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

/// `drop`.
pub(crate) fn drop() -> Statement<'static> {
    Statement::Drop(None)
}

/// `accept` or `drop`.
pub(crate) fn verdict(a: Action) -> Statement<'static> {
    match a {
        Action::Accept => accept(),
        Action::Drop => drop(),
    }
}

/// `jump <chain>`.
pub(crate) fn jump(chain: &str) -> Statement<'static> {
    Statement::Jump(JumpTarget { target: Cow::Owned(chain.to_string()) })
}

/// `masquerade`.
pub(crate) fn masquerade() -> Statement<'static> {
    Statement::Masquerade(None)
}

impl Batch {
    pub(crate) fn new() -> Batch {
        Batch::default()
    }

    fn add(&mut self, obj: NfListObject<'static>) {
        self.cmds.push(nftables::schema::NfObject::CmdObject(nftables::schema::NfCmd::Add(obj)));
    }

    fn table(family: Family, name: &str) -> Table<'static> {
        Table { family, name: Cow::Owned(name.to_string()), handle: None }
    }

    /// `add table`.
    pub(crate) fn add_table(&mut self, family: Family, name: &str) {
        self.add(NfListObject::Table(Self::table(family, name)));
    }

    /// `add table; delete table`: removes the table whether it exists or not (a `delete`
    /// alone fails on a missing table). Followed by [`Batch::add_table`] it replaces the
    /// table with what the rest of the batch adds, in one transaction.
    pub(crate) fn delete_table(&mut self, family: Family, name: &str) {
        self.add_table(family, name);
        self.cmds.push(nftables::schema::NfObject::CmdObject(nftables::schema::NfCmd::Delete(NfListObject::Table(
            Self::table(family, name),
        ))));
    }

    /// [`Batch::delete_table`] then [`Batch::add_table`].
    pub(crate) fn replace_table(&mut self, family: Family, name: &str) {
        self.delete_table(family, name);
        self.add_table(family, name);
    }

    /// A regular chain (a `jump` target).
    pub(crate) fn add_chain(&mut self, family: Family, table: &str, name: &str) {
        self.add(NfListObject::Chain(Chain {
            family,
            table: Cow::Owned(table.to_string()),
            name: Cow::Owned(name.to_string()),
            ..Chain::default()
        }));
    }

    /// A base chain of type `filter` on `hook` with priority `prio` and policy accept or drop.
    pub(crate) fn add_base_chain(
        &mut self,
        family: Family,
        table: &str,
        name: &str,
        hook: Hook,
        prio: i32,
        accept: bool,
    ) {
        self.add_typed_chain(family, table, name, NfChainType::Filter, hook, prio, accept);
    }

    /// A base chain of type `nat` on `hook` with priority `prio`.
    pub(crate) fn add_nat_chain(&mut self, family: Family, table: &str, name: &str, hook: Hook, prio: i32) {
        self.add_typed_chain(family, table, name, NfChainType::NAT, hook, prio, true);
    }

    #[allow(clippy::too_many_arguments)]
    fn add_typed_chain(
        &mut self,
        family: Family,
        table: &str,
        name: &str,
        ty: NfChainType,
        hook: Hook,
        prio: i32,
        accept: bool,
    ) {
        self.add(NfListObject::Chain(Chain {
            family,
            table: Cow::Owned(table.to_string()),
            name: Cow::Owned(name.to_string()),
            _type: Some(ty),
            hook: Some(hook),
            prio: Some(prio),
            policy: Some(if accept { NfChainPolicy::Accept } else { NfChainPolicy::Drop }),
            ..Chain::default()
        }));
    }

    /// A rule at the end of `chain`.
    pub(crate) fn add_rule(&mut self, family: Family, table: &str, chain: &str, stmts: Vec<Statement<'static>>) {
        self.add(NfListObject::Rule(Rule {
            family,
            table: Cow::Owned(table.to_string()),
            chain: Cow::Owned(chain.to_string()),
            expr: Cow::Owned(stmts),
            ..Rule::default()
        }));
    }

    /// The batch as `nft -j` input.
    pub(crate) fn to_json(&self) -> String {
        let n = Nftables { objects: Cow::Owned(self.cmds.clone()) };
        // Serializing plain data to a String cannot fail.
        serde_json::to_string(&n).unwrap_or_default()
    }
}

/// Applies `batch` in one transaction (`nft -j -f -`); with `check_only`, `nft --check`: the
/// kernel validates it and nothing changes.
///
/// Errors: [`Error::MissingTool`] without `nft`; [`Error::Nft`] with its message.
pub(crate) fn apply(batch: &Batch, check_only: bool) -> Result<(), Error> {
    let nft = nft_binary().ok_or(Error::MissingTool { tool: "nft", package: "nftables" })?;
    let mut cmd = Command::new(&nft);
    if check_only {
        cmd.arg("--check");
    }
    let mut child = cmd
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Io { what: format!("running {}", nft.display()), source })?;
    let json = batch.to_json();
    let write = child.stdin.take().map(|mut stdin| stdin.write_all(json.as_bytes()));
    let out = child.wait_with_output().map_err(|source| Error::Io { what: "waiting for nft".into(), source })?;
    if let Some(Err(source)) = write {
        if out.status.success() {
            return Err(Error::Io { what: "writing to nft".into(), source });
        }
    }
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(Error::Nft { message: if msg.is_empty() { out.status.to_string() } else { msg } });
    }
    Ok(())
}

/// `nft -j list table <family> <name>` as JSON; `None` when there is no such table.
///
/// Errors: [`Error::MissingTool`]; [`Error::Nft`] for other failures.
pub(crate) fn list_table(family: &str, name: &str) -> Result<Option<serde_json::Value>, Error> {
    let nft = nft_binary().ok_or(Error::MissingTool { tool: "nft", package: "nftables" })?;
    let out = Command::new(&nft)
        .args(["-j", "list", "table", family, name])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Io { what: format!("running {}", nft.display()), source })?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if msg.contains("No such file or directory") {
            return Ok(None);
        }
        return Err(Error::Nft { message: msg });
    }
    serde_json::from_slice(&out.stdout)
        .map(Some)
        .map_err(|e| Error::Nft { message: format!("unreadable `nft -j list table` output: {e}") })
}

//! A synchronous face on `rtnetlink`: each [`Nl`] owns a private current-thread tokio runtime
//! and one rtnetlink connection, opened in the calling thread's network namespace.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    AfSpecBridge, BridgeVlanInfoFlags, InfoBridge, InfoData, InfoKind, LinkAttribute, LinkExtentMask, LinkFlags,
    LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkBridge, LinkBridgeVlan, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

use crate::spec::{Ipv4Cidr, MacAddr};
use crate::Error;

/// What this crate needs to know about one interface.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub index: u32,
    pub name: String,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// The link kind (`bridge`, `tun`, ...), when it has one.
    pub kind: Option<InfoKind>,
    /// The index of the bridge (or bond) it is enslaved to.
    pub controller: Option<u32>,
    /// For a bridge: whether VLAN filtering is on.
    pub vlan_filtering: Option<bool>,
    pub mac: Option<[u8; 6]>,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Link {
        let mut l = Link {
            index: msg.header.index,
            name: String::new(),
            up: msg.header.flags.contains(LinkFlags::Up),
            kind: None,
            controller: None,
            vlan_filtering: None,
            mac: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => l.name = n.clone(),
                LinkAttribute::Controller(c) => l.controller = Some(*c),
                LinkAttribute::Address(a) if a.len() == 6 => {
                    let mut m = [0u8; 6];
                    m.copy_from_slice(a);
                    l.mac = Some(m);
                }
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => l.kind = Some(k.clone()),
                            LinkInfo::Data(InfoData::Bridge(bs)) => {
                                for b in bs {
                                    if let InfoBridge::VlanFiltering(v) = b {
                                        l.vlan_filtering = Some(*v);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        l
    }
}

/// One IPv4 route of the main table.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub dst: Ipv4Cidr,
    pub oif: Option<u32>,
}

/// The errno of a netlink error, if it is one.
pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io().raw_os_error(),
        _ => None,
    }
}

/// A netlink connection with its runtime.
pub(crate) struct Nl {
    rt: tokio::runtime::Runtime,
    h: Handle,
}

impl Nl {
    /// Opens a route netlink socket in the calling thread's network namespace.
    pub(crate) fn new() -> Result<Nl, Error> {
        let io = |source| Error::Io { what: "opening a netlink socket".into(), source };
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().map_err(io)?;
        let (conn, h, _) = {
            let _guard = rt.enter();
            rtnetlink::new_connection().map_err(io)?
        };
        rt.spawn(conn);
        Ok(Nl { rt, h })
    }

    fn run<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
        let what = what.into();
        move |source| Error::Netlink { what, source }
    }

    /// The interface called `name`, if there is one.
    pub(crate) fn link(&self, name: &str) -> Result<Option<Link>, Error> {
        let r = self.run(self.h.link().get().match_name(name).execute().try_next());
        match r {
            Ok(Some(msg)) => Ok(Some(Link::from_message(&msg))),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(Self::err(format!("looking up interface {name}"))(e)),
        }
    }

    /// Every interface.
    pub(crate) fn links(&self) -> Result<Vec<Link>, Error> {
        let msgs: Vec<LinkMessage> =
            self.run(self.h.link().get().execute().try_collect()).map_err(Self::err("listing interfaces"))?;
        Ok(msgs.iter().map(Link::from_message).collect())
    }

    /// Creates bridge `name` (down) with MAC `mac`, VLAN filtering on when `vlan_filtering`.
    pub(crate) fn create_bridge(&self, name: &str, mac: MacAddr, vlan_filtering: bool) -> Result<(), Error> {
        let mut b = LinkMessageBuilder::<LinkBridge>::new(name).address(mac.0.to_vec());
        if vlan_filtering {
            b = b.vlan_filtering(true);
        }
        self.run(self.h.link().add(b.build()).execute()).map_err(|e| vlan_unsupported(e, name, vlan_filtering))
    }

    /// Turns VLAN filtering of bridge `name` (index `index`) on or off.
    pub(crate) fn set_vlan_filtering(&self, index: u32, name: &str, on: bool) -> Result<(), Error> {
        let msg = LinkMessageBuilder::<LinkBridge>::new(name).index(index).vlan_filtering(on).build();
        self.run(self.h.link().change(msg).execute()).map_err(|e| vlan_unsupported(e, name, on))
    }

    /// Sets the link up or down.
    pub(crate) fn set_up(&self, index: u32, name: &str, up: bool) -> Result<(), Error> {
        let b = LinkUnspec::new_with_index(index);
        let msg = if up { b.up() } else { b.down() }.build();
        self.run(self.h.link().change(msg).execute()).map_err(Self::err(format!("setting {name} up={up}")))
    }

    /// Enslaves the link to `controller`, sets its MAC and brings it up.
    pub(crate) fn attach(&self, index: u32, name: &str, controller: u32, mac: MacAddr) -> Result<(), Error> {
        let msg = LinkUnspec::new_with_index(index).address(mac.0.to_vec()).controller(controller).up().build();
        self.run(self.h.link().change(msg).execute()).map_err(Self::err(format!("attaching {name} to its bridge")))
    }

    /// Deletes the link.
    pub(crate) fn del_link(&self, index: u32, name: &str) -> Result<(), Error> {
        match self.run(self.h.link().del(index).execute()) {
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            r => r.map_err(Self::err(format!("deleting interface {name}"))),
        }
    }

    fn addr_messages(&self, index: Option<u32>) -> Result<Vec<AddressMessage>, Error> {
        let mut req = self.h.address().get();
        if let Some(i) = index {
            req = req.set_link_index_filter(i);
        }
        self.run(req.execute().try_collect()).map_err(Self::err("listing addresses"))
    }

    fn v4(msg: &AddressMessage) -> Option<Ipv4Cidr> {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(ip)) => Some(Ipv4Cidr { addr: *ip, prefix: msg.header.prefix_len }),
            _ => None,
        })
    }

    /// The IPv4 addresses of every interface, as (interface index, address/prefix).
    pub(crate) fn all_ipv4_addrs(&self) -> Result<Vec<(u32, Ipv4Cidr)>, Error> {
        Ok(self.addr_messages(None)?.iter().filter_map(|m| Self::v4(m).map(|c| (m.header.index, c))).collect())
    }

    /// Makes `want` the only IPv4 address of link `index` (adds it, removes others).
    pub(crate) fn converge_ipv4(&self, index: u32, name: &str, want: Option<Ipv4Cidr>) -> Result<(), Error> {
        let mut present = false;
        for m in self.addr_messages(Some(index))? {
            let Some(c) = Self::v4(&m) else { continue };
            if Some(c) == want {
                present = true;
            } else {
                self.run(self.h.address().del(m).execute()).map_err(Self::err(format!("removing {c} from {name}")))?;
            }
        }
        if let (Some(c), false) = (want, present) {
            self.run(self.h.address().add(index, IpAddr::V4(c.addr), c.prefix).execute())
                .map_err(Self::err(format!("adding {c} to {name}")))?;
        }
        Ok(())
    }

    /// The VLANs of bridge port `index` as (VLAN id, is PVID, egresses untagged).
    pub(crate) fn port_vlans(&self, index: u32) -> Result<Vec<(u16, bool, bool)>, Error> {
        let msgs: Vec<LinkMessage> = self
            .run(
                self.h
                    .link()
                    .get()
                    .set_filter_mask(AddressFamily::Bridge, vec![LinkExtentMask::Brvlan])
                    .execute()
                    .try_collect(),
            )
            .map_err(Self::err("listing bridge VLANs"))?;
        let mut out = Vec::new();
        for m in msgs.iter().filter(|m| m.header.index == index) {
            for a in &m.attributes {
                if let LinkAttribute::AfSpecBridge(specs) = a {
                    for s in specs {
                        if let AfSpecBridge::VlanInfo(v) = s {
                            out.push((
                                v.vid,
                                v.flags.contains(BridgeVlanInfoFlags::Pvid),
                                v.flags.contains(BridgeVlanInfoFlags::Untagged),
                            ));
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Makes `vlan` the port's only VLAN, as its PVID, egressing untagged (`bridge vlan add
    /// dev PORT vid V pvid untagged`, then `bridge vlan del` of every other VLAN, the
    /// default VLAN 1 included).
    pub(crate) fn set_port_vlan(&self, index: u32, name: &str, vlan: u16) -> Result<(), Error> {
        let current = self.port_vlans(index)?;
        if !current.contains(&(vlan, true, true)) {
            let msg = vlan_message(index, vlan, true);
            self.run(self.h.link().set(msg).execute()).map_err(Self::err(format!("putting {name} on VLAN {vlan}")))?;
        }
        for (vid, _, _) in current.into_iter().filter(|(vid, _, _)| *vid != vlan) {
            let msg = vlan_message(index, vid, false);
            self.run(self.h.link().del_with_message(msg).execute())
                .map_err(Self::err(format!("removing VLAN {vid} from {name}")))?;
        }
        Ok(())
    }

    /// The IPv4 routes of the main table.
    pub(crate) fn ipv4_routes(&self) -> Result<Vec<Route>, Error> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let msgs: Vec<_> =
            self.run(self.h.route().get(msg).execute().try_collect()).map_err(Self::err("listing routes"))?;
        let mut out = Vec::new();
        for m in msgs {
            let mut table = u32::from(m.header.table);
            let mut dst = Ipv4Addr::UNSPECIFIED;
            let mut oif = None;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Table(t) => table = *t,
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
                    RouteAttribute::Oif(o) => oif = Some(*o),
                    _ => {}
                }
            }
            if table == u32::from(libc::RT_TABLE_MAIN) {
                out.push(Route { dst: Ipv4Cidr { addr: dst, prefix: m.header.destination_prefix_length }, oif });
            }
        }
        Ok(out)
    }
}

/// The `AF_BRIDGE` link message of `bridge vlan {add,del} dev PORT vid VID [pvid untagged]`.
fn vlan_message(port: u32, vid: u16, pvid_untagged: bool) -> LinkMessage {
    let flags = if pvid_untagged {
        BridgeVlanInfoFlags::Pvid | BridgeVlanInfoFlags::Untagged
    } else {
        BridgeVlanInfoFlags::empty()
    };
    LinkBridgeVlan::new(port).vlan(vid, flags).build()
}

/// A netlink error, or [`Error::Unsupported`] for `EOPNOTSUPP` when VLAN filtering was asked.
fn vlan_unsupported(e: rtnetlink::Error, bridge: &str, vlan_filtering: bool) -> Error {
    if vlan_filtering && errno(&e) == Some(libc::EOPNOTSUPP) {
        Error::Unsupported(format!(
            "bridge {bridge}: this kernel has no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)"
        ))
    } else {
        Error::Netlink { what: format!("configuring bridge {bridge}"), source: e }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_core::Emitable;

    /// The bytes iproute2's `bridge vlan add dev PORT vid 20 pvid untagged` sends after the
    /// netlink header: an `ifinfomsg` of family `AF_BRIDGE` for the port, then `IFLA_AF_SPEC`
    /// holding one `IFLA_BRIDGE_VLAN_INFO { flags: PVID | UNTAGGED, vid: 20 }`.
    #[test]
    fn vlan_messages_match_iproute2() {
        let msg = vlan_message(7, 20, true);
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        #[rustfmt::skip]
        let want: Vec<u8> = [
            &[7u8, 0, 0, 0][..],             // family AF_BRIDGE, pad, type 0
            &7u32.to_ne_bytes(),             // ifindex
            &[0; 8],                         // flags, change
            &[12, 0, 26, 0],                 // IFLA_AF_SPEC, 12 bytes
            &[8, 0, 2, 0],                   // IFLA_BRIDGE_VLAN_INFO, 8 bytes
            &6u16.to_ne_bytes(),             // BRIDGE_VLAN_INFO_PVID | _UNTAGGED
            &20u16.to_ne_bytes(),            // vid
        ]
        .concat();
        assert_eq!(buf, want);
        let del = vlan_message(7, 1, false);
        let mut buf = vec![0u8; del.buffer_len()];
        del.emit(&mut buf);
        assert_eq!(&buf[buf.len() - 4..], [0, 0, 1, 0]);
    }
}

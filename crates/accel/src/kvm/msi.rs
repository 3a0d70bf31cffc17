//! MSIs into KVM's in-kernel LAPICs through irqfds and GSI routing.
//!
//! The first time a message (address, data) is sent it gets a GSI with an MSI route
//! ("KVM_SET_GSI_ROUTING") and an irqfd ("KVM_IRQFD"); from then on sending it is one
//! eventfd write, which KVM turns into the interrupt without a VMM ioctl. Drivers program
//! their MSI-X vectors once, so the table normally settles after boot. It is bounded: when
//! all [`MAX_MSI_ROUTES`] GSIs are taken (a guest that keeps reprogramming vectors, e.g. for
//! IRQ affinity changes), the least recently sent message gives its GSI to the new one. Its
//! irqfd is deassigned first, which makes KVM finish any injection still in flight with
//! the old route, then the table is reinstalled and the irqfd assigned again. If routing
//! fails, every message goes through "KVM_SIGNAL_MSI" from then on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use devices::MsiSink;
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::IRQCHIP_NUM_PINS;
use crate::{Error, Result};

/// Most MSI routes one VM uses at a time (GSIs `24..24 + MAX_MSI_ROUTES`).
pub const MAX_MSI_ROUTES: usize = 512;

/// An MSI message: address, data.
type Msg = (u64, u32);

/// What [`RouteTable::route`] decided for a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// The message already has this GSI.
    Existing(u32),
    /// A GSI no message has now.
    Fresh(u32),
    /// A GSI taken from `evicted`, the least recently sent message.
    Reused { gsi: u32, evicted: Msg },
}

/// The bookkeeping of MSI routes, without KVM: which message has which GSI, and which
/// message was sent least recently. At most `capacity` messages, GSIs
/// `first_gsi..first_gsi + capacity`.
#[derive(Debug)]
pub(crate) struct RouteTable {
    capacity: usize,
    /// Message → (GSI, tick of its last send).
    by_msg: HashMap<Msg, (u32, u64)>,
    /// GSIs given back by [`RouteTable::remove`].
    free: Vec<u32>,
    /// The next never-used GSI.
    next: u32,
    tick: u64,
}

impl RouteTable {
    pub(crate) fn new(first_gsi: u32, capacity: usize) -> RouteTable {
        RouteTable { capacity, by_msg: HashMap::new(), free: Vec::new(), next: first_gsi, tick: 0 }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_msg.len()
    }

    /// The GSI for `msg`, marking it as just sent; a new message gets a free GSI while the
    /// table is not full, and the least recently sent message's GSI after that. `None` only
    /// for a zero capacity.
    pub(crate) fn route(&mut self, msg: Msg) -> Option<Route> {
        self.tick += 1;
        if let Some(e) = self.by_msg.get_mut(&msg) {
            e.1 = self.tick;
            return Some(Route::Existing(e.0));
        }
        if self.by_msg.len() < self.capacity {
            let gsi = match self.free.pop() {
                Some(gsi) => gsi,
                None => {
                    self.next += 1;
                    self.next - 1
                }
            };
            self.by_msg.insert(msg, (gsi, self.tick));
            return Some(Route::Fresh(gsi));
        }
        let (&evicted, &(gsi, _)) = self.by_msg.iter().min_by_key(|(_, (_, last))| *last)?;
        self.by_msg.remove(&evicted);
        self.by_msg.insert(msg, (gsi, self.tick));
        Some(Route::Reused { gsi, evicted })
    }

    /// Forgets `msg` (its route could not be installed).
    pub(crate) fn remove(&mut self, msg: Msg) {
        if let Some((gsi, _)) = self.by_msg.remove(&msg) {
            self.free.push(gsi);
        }
    }

    /// `(gsi, address, data)` of every route.
    pub(crate) fn entries(&self) -> Vec<(u32, u64, u32)> {
        self.by_msg.iter().map(|(&(addr, data), &(gsi, _))| (gsi, addr, data)).collect()
    }
}

/// Installs the VM's GSI routing table ("KVM_SET_GSI_ROUTING"): KVM's default routes for the
/// in-kernel irqchip (GSIs 0-15 to the PIC pins and GSIs 0-23 to the IOAPIC pins), plus one
/// MSI route per `(gsi, address, data)` in `msi` (GSIs ≥ 24).
///
/// # Errors
///
/// [`Error::Unsupported`] for a GSI below 24 or more entries than the table can hold;
/// [`Error::Kvm`] when the ioctl fails (e.g. on a VM without in-kernel irqchip).
pub(crate) fn set_gsi_routes(vm: &VmFd, msi: &[(u32, u64, u32)]) -> Result<()> {
    let mut entries = Vec::with_capacity(40 + msi.len());
    let chip = |gsi: u32, irqchip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
        e.u.irqchip.irqchip = irqchip;
        e.u.irqchip.pin = pin;
        e
    };
    for gsi in 0..IRQCHIP_NUM_PINS {
        if gsi < 8 {
            entries.push(chip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            entries.push(chip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
        entries.push(chip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    for &(gsi, addr, data) in msi {
        if gsi < IRQCHIP_NUM_PINS {
            return Err(Error::Unsupported(format!("MSI route on irqchip GSI {gsi}")));
        }
        let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
        e.u.msi.address_lo = addr as u32;
        e.u.msi.address_hi = (addr >> 32) as u32;
        e.u.msi.data = data;
        entries.push(e);
    }
    let table = KvmIrqRouting::from_entries(&entries)
        .map_err(|e| Error::Unsupported(format!("{} GSI routes: {e:?}", entries.len())))?;
    vm.set_gsi_routing(&table).map_err(|e| Error::Kvm(format!("KVM_SET_GSI_ROUTING: {e}")))
}

/// Injects one MSI ("KVM_SIGNAL_MSI").
///
/// # Errors
///
/// [`Error::Kvm`] when the ioctl fails.
pub(crate) fn signal_msi(vm: &VmFd, addr: u64, data: u32) -> Result<()> {
    let msi =
        kvm_bindings::kvm_msi { address_lo: addr as u32, address_hi: (addr >> 32) as u32, data, ..Default::default() };
    vm.signal_msi(msi).map(|_| ()).map_err(|e| Error::Kvm(format!("KVM_SIGNAL_MSI {addr:#x}/{data:#x}: {e}")))
}

/// The [`MsiSink`] of a [`super::KvmVm`] (see the [module docs](self)).
pub(crate) struct MsiRouter {
    vm: Arc<VmFd>,
    irqchip: bool,
    state: Mutex<RouterState>,
}

struct RouterState {
    table: RouteTable,
    /// GSI → its irqfd (assigned while the GSI has a route).
    irqfds: HashMap<u32, EventFd>,
    /// Routing failed once: no new routes.
    broken: bool,
}

impl MsiRouter {
    /// A router for `vm` using at most `capacity` routes; without the in-kernel irqchip
    /// every message goes to "KVM_SIGNAL_MSI" (which then fails and is logged).
    pub(crate) fn new(vm: Arc<VmFd>, irqchip: bool, capacity: usize) -> MsiRouter {
        let state =
            RouterState { table: RouteTable::new(IRQCHIP_NUM_PINS, capacity), irqfds: HashMap::new(), broken: false };
        MsiRouter { vm, irqchip, state: Mutex::new(state) }
    }

    /// How many messages are delivered through an irqfd now (0 after routing failed).
    pub(crate) fn irqfd_routes(&self) -> usize {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.broken {
            0
        } else {
            s.irqfds.len()
        }
    }

    /// Makes sure `msg` has a working route; returns its GSI.
    fn ensure_route(&self, s: &mut RouterState, msg: Msg) -> Result<Option<u32>> {
        let Some(route) = s.table.route(msg) else { return Ok(None) };
        let gsi = match route {
            Route::Existing(gsi) => return Ok(Some(gsi)),
            Route::Fresh(gsi) => gsi,
            Route::Reused { gsi, evicted } => {
                // Deassigning flushes injections still using the evicted message's route.
                if let Some(evt) = s.irqfds.remove(&gsi) {
                    if let Err(e) = self.vm.unregister_irqfd(&evt, gsi) {
                        s.table.remove(msg);
                        return Err(Error::Kvm(format!("KVM_IRQFD deassign gsi {gsi} ({evicted:x?}): {e}")));
                    }
                }
                gsi
            }
        };
        let installed = set_gsi_routes(&self.vm, &s.table.entries()).and_then(|()| {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Kvm(format!("eventfd for gsi {gsi}: {e}")))?;
            self.vm.register_irqfd(&evt, gsi).map_err(|e| Error::Kvm(format!("KVM_IRQFD gsi {gsi}: {e}")))?;
            Ok(evt)
        });
        match installed {
            Ok(evt) => {
                s.irqfds.insert(gsi, evt);
                Ok(Some(gsi))
            }
            Err(e) => {
                s.table.remove(msg);
                Err(e)
            }
        }
    }
}

impl MsiSink for MsiRouter {
    fn send_msi(&self, addr: u64, data: u32) {
        if self.irqchip {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if !s.broken {
                match self.ensure_route(&mut s, (addr, data)) {
                    Ok(Some(gsi)) => {
                        if s.irqfds.get(&gsi).is_some_and(|evt| evt.write(1).is_ok()) {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!("MSI routing: {e}; falling back to KVM_SIGNAL_MSI");
                        s.broken = true;
                    }
                }
            }
        }
        if let Err(e) = signal_msi(&self.vm, addr, data) {
            tracing::warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_table_is_bounded_and_reuses_the_least_recently_sent_gsi() {
        let mut t = RouteTable::new(24, 3);
        let (a, b, c, d, e) =
            ((0xfee0_0000, 0x40), (0xfee0_0000, 0x41), (0xfee0_0000, 0x42), (0xfee0_1000, 0x41), (1, 1));
        assert_eq!(t.route(a), Some(Route::Fresh(24)));
        assert_eq!(t.route(b), Some(Route::Fresh(25)));
        assert_eq!(t.route(c), Some(Route::Fresh(26)));
        assert_eq!(t.route(a), Some(Route::Existing(24)));
        // Full: b is the least recently sent.
        assert_eq!(t.route(d), Some(Route::Reused { gsi: 25, evicted: b }));
        assert_eq!(t.route(e), Some(Route::Reused { gsi: 26, evicted: c }));
        assert_eq!(t.route(b), Some(Route::Reused { gsi: 24, evicted: a }));
        assert_eq!(t.len(), 3);
        let mut gsis: Vec<u32> = t.entries().iter().map(|e| e.0).collect();
        gsis.sort_unstable();
        assert_eq!(gsis, vec![24, 25, 26], "every GSI used once, none outside the range");
        // A thousand distinct messages later the table is still bounded and consistent.
        for i in 0..1000u32 {
            let r = t.route((0xfee0_0000, i)).unwrap();
            assert!(matches!(r, Route::Reused { gsi: 24..=26, .. }), "{r:?}");
            assert_eq!(t.len(), 3);
        }
        let Some(Route::Existing(freed)) = t.route((0xfee0_0000, 998)) else { panic!("998 is routed") };
        t.remove((0xfee0_0000, 998));
        assert_eq!(t.len(), 2);
        assert_eq!(t.route((7, 7)), Some(Route::Fresh(freed)), "a removed message's GSI is the free one");
        let mut gsis: Vec<u32> = t.entries().iter().map(|e| e.0).collect();
        gsis.sort_unstable();
        assert_eq!(gsis, vec![24, 25, 26]);
        assert_eq!(RouteTable::new(24, 0).route(a), None);
    }

    #[test]
    fn router_on_kvm_keeps_irqfd_routes_bounded() {
        if !super::super::available() {
            println!("skipping: /dev/kvm unavailable");
            return;
        }
        let vm = super::super::KvmVm::new(&[]).unwrap();
        let router = MsiRouter::new(vm.vm.clone(), true, 4);
        for round in 0..3u32 {
            for v in 0..10u32 {
                router.send_msi(0xfee0_0000, 0x30 + v + round);
                assert!(router.irqfd_routes() <= 4);
            }
        }
        assert_eq!(router.irqfd_routes(), 4, "routing kept working while reusing GSIs");
        let s = router.state.lock().unwrap();
        assert_eq!(s.table.len(), 4);
        let mut gsis: Vec<u32> = s.irqfds.keys().copied().collect();
        gsis.sort_unstable();
        assert_eq!(gsis, vec![24, 25, 26, 27]);
    }
}

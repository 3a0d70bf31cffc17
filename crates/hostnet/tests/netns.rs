//! Host-level tests of hostnet. Each test body runs on a thread of its own that first enters
//! a fresh network namespace (`unshare(CLONE_NEWNET)`, which Linux allows per thread): the
//! netlink sockets, `/proc/sys/net`, `/dev/net/tun` and the `nft`, `dnsmasq` and `ip`
//! processes started from that thread all live in it, so the host's networking is never
//! touched, and everything left behind vanishes with the namespace (dnsmasq is killed by the
//! harness). Without root, `/dev/net/tun`, `nft`, `dnsmasq` (where needed) or `ip`, a test
//! prints "skipped: <why>" and returns.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hostnet::{
    check, create_tap, ensure_network, generate_mac, network_status, remove_network, remove_tap, tap_name, BridgeState,
    Error, FirewallSpec, NetworkSpec, NicAttach, ProblemKind,
};

fn find(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn skip_reason(tools: &[&str]) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (needs CAP_NET_ADMIN in a new network namespace)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    for t in tools {
        if find(t).is_none() {
            return Some(format!("{t} is not installed (scripts/setup-guest.sh installs it)"));
        }
    }
    None
}

/// Kills every dnsmasq whose pid file is in `run_dir` (a test that failed halfway).
fn kill_dnsmasqs(run_dir: &Path) {
    let Ok(dir) = std::fs::read_dir(run_dir) else { return };
    for e in dir.flatten() {
        if !e.file_name().to_string_lossy().ends_with(".dnsmasq.pid") {
            continue;
        }
        let Some(pid) = std::fs::read_to_string(e.path()).ok().and_then(|s| s.trim().parse::<i32>().ok()) else {
            continue;
        };
        let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*run_dir.to_string_lossy()));
        if ours {
            // SAFETY: kill(2) of a dnsmasq this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Runs `body` in a fresh network namespace with a fresh run folder; prints "skipped: ..."
/// and returns when the host cannot run it.
fn in_netns(name: &str, tools: &[&str], body: impl FnOnce(&Path) + Send + 'static) {
    if let Some(why) = skip_reason(tools) {
        println!("skipped: {why}");
        return;
    }
    let run_dir = std::env::temp_dir().join(format!("hostnet-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir).unwrap();
    let host_forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let host_links_before = host_link_names();
    let dir = run_dir.clone();
    let result = std::thread::spawn(move || {
        // SAFETY: unshare(2) of this thread's network namespace only; no memory involved.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Some(format!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error()));
        }
        body(&dir);
        None
    })
    .join();
    kill_dnsmasqs(&run_dir);
    let _ = std::fs::remove_dir_all(&run_dir);
    match result {
        Ok(Some(why)) => println!("skipped: {why}"),
        Ok(None) => {}
        Err(panic) => std::panic::resume_unwind(panic),
    }
    // The host's own namespace saw nothing.
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        host_forward,
        "host ip_forward changed"
    );
    let leaked: Vec<String> = host_link_names()
        .into_iter()
        .filter(|n| (n.starts_with("rv") || n == "d0") && !host_links_before.contains(n))
        .collect();
    assert!(leaked.is_empty(), "test interfaces leaked into the host: {leaked:?}");
}

/// The names of the host's interfaces (the calling thread is in the host's namespace).
fn host_link_names() -> Vec<String> {
    json(&["ip", "-j", "link", "show"])
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap().to_string())
        .collect()
}

/// Runs a command (in the calling thread's namespace), panics unless it succeeds, returns
/// its stdout.
fn run(argv: &[&str]) -> String {
    let out = Command::new(find(argv[0]).unwrap()).args(&argv[1..]).output().unwrap();
    assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn json(argv: &[&str]) -> serde_json::Value {
    serde_json::from_str(&run(argv)).unwrap()
}

fn lan(name: &str, subnet: Option<&str>) -> NetworkSpec {
    NetworkSpec { subnet: subnet.map(|s| s.parse().unwrap()), ..NetworkSpec::new(name) }
}

fn nic(vm: &str, spec: &NetworkSpec) -> NicAttach {
    NicAttach {
        tap: tap_name(vm, 0),
        bridge: spec.bridge.clone(),
        vlan: None,
        mac: generate_mac(&format!("{vm}/0"), &[]),
        firewall: None,
    }
}

/// Waits until the VMM's open TAP `tap` is a forwarding bridge port with carrier (the kernel
/// brings a port up shortly after its carrier, through linkwatch: frames sent before are
/// lost).
fn wait_forwarding(tap: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let l = &json(&["ip", "-j", "-d", "link", "show", "dev", tap])[0];
        if l["operstate"] == "UP" && l["linkinfo"]["info_slave_data"]["state"] == "forwarding" {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{tap} does not forward: {l}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

#[test]
fn network_with_subnet_dhcp_and_nat_is_created_ensured_and_removed() {
    in_netns("lifecycle", &["nft", "dnsmasq", "ip"], |run_dir| {
        let spec = NetworkSpec { dhcp: true, nat: true, ..lan("lan0", Some("10.77.0.1/24")) };
        ensure_network(&spec, run_dir).unwrap();
        let st = network_status(&spec, run_dir).unwrap();
        assert!(st.healthy(&spec), "{st:?}");
        let pid = st.dnsmasq.unwrap();
        assert!(alive(pid));

        // Read back independently of the crate.
        let addrs = json(&["ip", "-j", "addr", "show", "dev", "rv-lan0"]);
        let a = &addrs[0];
        assert!(a["flags"].as_array().unwrap().iter().any(|f| f == "UP"), "{a}");
        assert!(
            a["addr_info"].as_array().unwrap().iter().any(|i| i["local"] == "10.77.0.1" && i["prefixlen"] == 24),
            "{a}"
        );
        let table = run(&["nft", "list", "table", "inet", "rustvisor-net-lan0"]);
        assert!(
            table.contains("ip saddr 10.77.0.0/24 ip daddr != 10.77.0.0/24 oifname != \"rv-lan0\" masquerade"),
            "{table}"
        );
        assert!(table.contains("iifname \"rv-lan0\" accept"), "{table}");
        assert_eq!(std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap().trim(), "1");
        assert!(check(std::slice::from_ref(&spec), &[], run_dir).unwrap().is_empty());

        // Idempotent: the same dnsmasq, the same bridge, one table.
        ensure_network(&spec, run_dir).unwrap();
        let st2 = network_status(&spec, run_dir).unwrap();
        assert_eq!(st2.dnsmasq, Some(pid));
        assert!(st2.healthy(&spec));
        assert_eq!(run(&["nft", "list", "tables"]).matches("rustvisor-net-lan0").count(), 1);

        // A changed spec converges: another subnet, dnsmasq restarted with it.
        let moved = NetworkSpec { subnet: Some("10.78.0.1/24".parse().unwrap()), ..spec.clone() };
        ensure_network(&moved, run_dir).unwrap();
        let st3 = network_status(&moved, run_dir).unwrap();
        assert!(st3.healthy(&moved), "{st3:?}");
        assert_ne!(st3.dnsmasq, Some(pid));
        let addrs = run(&["ip", "-o", "-4", "addr", "show", "dev", "rv-lan0"]);
        assert!(addrs.contains("10.78.0.1/24") && !addrs.contains("10.77.0.1"), "{addrs}");

        remove_network(&moved, run_dir).unwrap();
        let gone = network_status(&moved, run_dir).unwrap();
        assert_eq!(gone.bridge, BridgeState::Missing);
        assert!(!gone.rules && gone.dnsmasq.is_none(), "{gone:?}");
        let pid3 = st3.dnsmasq.unwrap();
        assert!(!alive(pid3), "dnsmasq {pid3} still runs");
        assert!(!run_dir.join("lan0.leases").exists());
        remove_network(&moved, run_dir).unwrap();
    });
}

#[test]
fn isolated_network_drops_host_routing_but_not_dhcp() {
    in_netns("isolated", &["nft", "dnsmasq", "ip"], |run_dir| {
        let spec = NetworkSpec { dhcp: true, isolated: true, ..lan("iso", Some("10.79.0.1/24")) };
        ensure_network(&spec, run_dir).unwrap();
        let table = run(&["nft", "list", "table", "inet", "rustvisor-net-iso"]);
        assert!(table.contains("iifname \"rv-iso\" drop") && table.contains("oifname \"rv-iso\" drop"), "{table}");
        assert!(table.contains("iifname \"rv-iso\" udp dport 67 accept"), "{table}");
        assert!(!table.contains("masquerade"), "{table}");
        assert_eq!(
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap().trim(),
            "0",
            "only nat turns forwarding on"
        );
        remove_network(&spec, run_dir).unwrap();
    });
}

#[test]
fn tap_is_attached_and_the_vmm_can_open_it() {
    in_netns("tap", &["nft", "ip"], |run_dir| {
        let spec = lan("lan1", None);
        ensure_network(&spec, run_dir).unwrap();
        let n = nic("web", &spec);
        create_tap(&n).unwrap();
        create_tap(&n).unwrap();
        let l = &json(&["ip", "-j", "-d", "link", "show", "dev", "rvt-web-0"])[0];
        assert_eq!(l["master"], "rv-lan1", "{l}");
        assert!(l["flags"].as_array().unwrap().iter().any(|f| f == "UP"), "{l}");
        assert_eq!(l["address"], n.tap_mac().to_string(), "{l}");
        assert_eq!(l["linkinfo"]["info_kind"], "tun", "{l}");

        // The VMM's own TAP code attaches to it by name, with its flags.
        let tap = virtio::tap::Tap::open(&n.tap).unwrap();
        assert_eq!(tap.name(), n.tap);
        // Restoring while the VMM holds it (a daemon restart) keeps it.
        create_tap(&n).unwrap();
        drop(tap);
        assert!(
            run(&["ip", "-o", "link", "show", "dev", "rvt-web-0"]).contains("master rv-lan1"),
            "persistent after close"
        );

        remove_tap(&n.tap).unwrap();
        let out = Command::new(find("ip").unwrap()).args(["link", "show", "dev", "rvt-web-0"]).output().unwrap();
        assert!(!out.status.success(), "TAP still there");
        remove_tap(&n.tap).unwrap();

        // A NIC on a network that does not exist, and one on a VLAN of a non-filtering bridge.
        let e = create_tap(&NicAttach { bridge: "rv-nope".into(), ..n.clone() }).unwrap_err();
        assert!(matches!(e, Error::Conflict(_)) && e.to_string().contains("rv-nope"), "{e}");
        let e = create_tap(&NicAttach { vlan: Some(20), ..n.clone() }).unwrap_err();
        assert!(e.to_string().starts_with("vlan: 20: the network's bridge rv-lan1 has VLAN filtering off"), "{e}");
        let e = create_tap(&NicAttach { vlan: Some(5000), ..n }).unwrap_err();
        assert_eq!(e.to_string(), "vlan: 5000 (accepted: 1 to 4094)");
        remove_network(&spec, run_dir).unwrap();
    });
}

#[test]
fn tap_on_a_vlan_of_a_filtering_bridge() {
    in_netns("vlan", &["nft", "ip", "bridge"], |run_dir| {
        let spec = NetworkSpec { vlan_filtering: true, ..lan("vl", None) };
        match ensure_network(&spec, run_dir) {
            Err(Error::Unsupported(why)) => {
                println!("skipped: {why}");
                return;
            }
            r => r.unwrap(),
        }
        let n = NicAttach { vlan: Some(20), ..nic("web", &spec) };
        create_tap(&n).unwrap();
        let other = NicAttach { vlan: None, ..nic("db", &spec) };
        create_tap(&other).unwrap();
        // `bridge -j vlan show`: the TAP carries VLAN 20 alone, as PVID, untagged.
        let v = json(&["bridge", "-j", "vlan", "show", "dev", "rvt-web-0"]);
        let vlans = &v[0]["vlans"];
        assert_eq!(vlans.as_array().unwrap().len(), 1, "{v}");
        assert_eq!(vlans[0]["vlan"], 20, "{v}");
        let flags = vlans[0]["flags"].as_array().unwrap();
        assert!(flags.iter().any(|f| f == "PVID") && flags.iter().any(|f| f == "Egress Untagged"), "{v}");
        let d = json(&["bridge", "-j", "vlan", "show", "dev", "rvt-db-0"]);
        assert_eq!(d[0]["vlans"][0]["vlan"], 1, "{d}");
        assert!(check(std::slice::from_ref(&spec), &[n.clone(), other.clone()], run_dir).unwrap().is_empty());

        // A port moved to another VLAN by hand is a mismatch; create_tap moves it back.
        run(&["bridge", "vlan", "add", "dev", "rvt-web-0", "vid", "30", "pvid", "untagged"]);
        let p = check(std::slice::from_ref(&spec), std::slice::from_ref(&n), run_dir).unwrap();
        assert!(p.iter().any(|p| p.kind == ProblemKind::VlanMismatch), "{p:?}");
        create_tap(&n).unwrap();
        assert!(check(std::slice::from_ref(&spec), std::slice::from_ref(&n), run_dir).unwrap().is_empty());
        remove_network(&spec, run_dir).unwrap();
    });
}

fn fw(name: &str, rules: &[&str]) -> FirewallSpec {
    FirewallSpec {
        name: name.into(),
        rules: rules.iter().map(|r| r.parse().unwrap()).collect(),
        default_in: hostnet::Action::Drop,
        default_out: hostnet::Action::Accept,
    }
}

/// The rules of the TAP's firewall table, as `nft -j` gives them.
fn fw_rules(tap: &str) -> Option<Vec<serde_json::Value>> {
    let out = Command::new(find("nft").unwrap())
        .args(["-j", "list", "table", "bridge", &format!("rustvisor-fw-{tap}")])
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Some(v["nftables"].as_array().unwrap().iter().filter_map(|o| o.get("rule").cloned()).collect())
}

fn dports(rules: &[serde_json::Value], chain: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for r in rules.iter().filter(|r| r["chain"] == chain) {
        for e in r["expr"].as_array().unwrap() {
            let m = &e["match"];
            if m["left"]["payload"]["field"] == "dport" && m["left"]["payload"]["protocol"] == "tcp" {
                out.extend(m["right"].as_u64());
            }
        }
    }
    out
}

#[test]
fn firewall_is_replaced_while_the_tap_lives() {
    in_netns("fw", &["nft", "ip"], |run_dir| {
        let spec = lan("lan2", None);
        ensure_network(&spec, run_dir).unwrap();
        let n = NicAttach { firewall: Some(fw("web", &["in tcp/80", "in icmp"])), ..nic("web", &spec) };
        create_tap(&n).unwrap();
        let rules = fw_rules(&n.tap).expect("firewall table");
        assert_eq!(dports(&rules, "to-vm"), vec![80]);
        // The chain ends with the default: drop for `in`, accept for `out`.
        let last_in = rules.iter().rfind(|r| r["chain"] == "to-vm").unwrap();
        assert!(last_in["expr"].as_array().unwrap().iter().any(|e| e.get("drop").is_some()), "{last_in}");
        let last_out = rules.iter().rfind(|r| r["chain"] == "from-vm").unwrap();
        assert!(last_out["expr"].as_array().unwrap().iter().any(|e| e.get("accept").is_some()), "{last_out}");
        let hooks = run(&["nft", "list", "table", "bridge", "rustvisor-fw-rvt-web-0"]);
        assert!(hooks.contains("oifname \"rvt-web-0\" jump to-vm"), "{hooks}");
        assert!(hooks.contains("iifname \"rvt-web-0\" jump from-vm"), "{hooks}");

        // Replaced in one go while the TAP is open (the VM runs).
        let tap = virtio::tap::Tap::open(&n.tap).unwrap();
        hostnet::apply_firewall(&n.tap, Some(&fw("web2", &["in tcp/443", "in tcp/8000-8080"]))).unwrap();
        let rules = fw_rules(&n.tap).unwrap();
        assert_eq!(dports(&rules, "to-vm"), vec![443], "80 is gone, 443 is there");
        assert_eq!(run(&["nft", "list", "tables"]).matches("rustvisor-fw-rvt-web-0").count(), 1);
        let text = run(&["nft", "list", "table", "bridge", "rustvisor-fw-rvt-web-0"]);
        assert!(text.contains("tcp dport 8000-8080 accept"), "{text}");

        // A bad group is refused, naming the field, and the old rules stay.
        let mut bad = fw("web3", &[]);
        bad.rules.push(hostnet::Rule {
            dir: hostnet::Direction::In,
            proto: hostnet::Proto::Icmp,
            port: Some(hostnet::PortRange { first: 1, last: 2 }),
            action: hostnet::Action::Accept,
        });
        let e = hostnet::apply_firewall(&n.tap, Some(&bad)).unwrap_err();
        assert!(e.to_string().starts_with("firewall.rules[0]: "), "{e}");
        assert_eq!(dports(&fw_rules(&n.tap).unwrap(), "to-vm"), vec![443]);

        hostnet::apply_firewall(&n.tap, None).unwrap();
        assert!(fw_rules(&n.tap).is_none(), "table removed");
        hostnet::apply_firewall(&n.tap, None).unwrap();
        drop(tap);

        // remove_tap takes the firewall with it.
        hostnet::apply_firewall(&n.tap, n.firewall.as_ref()).unwrap();
        remove_tap(&n.tap).unwrap();
        assert!(fw_rules(&n.tap).is_none());
        remove_network(&spec, run_dir).unwrap();
    });
}

#[test]
fn check_finds_a_downed_bridge_a_tap_off_its_bridge_a_dead_dnsmasq_and_a_route_clash() {
    in_netns("check", &["nft", "dnsmasq", "ip"], |run_dir| {
        let spec = NetworkSpec { dhcp: true, ..lan("lan3", Some("10.80.0.1/24")) };
        ensure_network(&spec, run_dir).unwrap();
        let n = NicAttach { firewall: Some(fw("web", &["in tcp/80"])), ..nic("web", &spec) };
        create_tap(&n).unwrap();
        let nets = std::slice::from_ref(&spec);
        let nics = std::slice::from_ref(&n);
        assert_eq!(check(nets, nics, run_dir).unwrap(), vec![]);

        let pid = network_status(&spec, run_dir).unwrap().dnsmasq.unwrap();
        run(&["ip", "link", "set", "rv-lan3", "down"]);
        run(&["ip", "link", "set", "rvt-web-0", "nomaster"]);
        // SAFETY: kill(2) of the dnsmasq this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        while alive(pid) {
            std::thread::sleep(Duration::from_millis(10));
        }
        run(&["ip", "link", "add", "d0", "type", "bridge"]);
        run(&["ip", "addr", "add", "10.80.5.1/16", "dev", "d0"]);
        run(&["ip", "link", "set", "d0", "up"]);

        let problems = check(nets, nics, run_dir).unwrap();
        let kinds: Vec<ProblemKind> = problems.iter().map(|p| p.kind).collect();
        for k in
            [ProblemKind::BridgeDown, ProblemKind::TapNotOnBridge, ProblemKind::DnsmasqDead, ProblemKind::RouteClash]
        {
            assert!(kinds.contains(&k), "{k:?} not in {problems:#?}");
        }
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert!(text.contains(&"network lan3: bridge rv-lan3 is down".to_string()), "{text:?}");
        assert!(
            text.contains(&"nic rvt-web-0: TAP rvt-web-0 is on no bridge, not on bridge rv-lan3".to_string()),
            "{text:?}"
        );
        assert!(
            text.contains(
                &"network lan3: subnet 10.80.0.1/24 clashes with the host route 10.80.0.0/16 on d0".to_string()
            ),
            "{text:?}"
        );
        assert!(text.iter().any(|t| t.starts_with("network lan3: dnsmasq is not running")), "{text:?}");

        // The daemon's repair: ensure the network (restarts dnsmasq) and the NIC again.
        ensure_network(&spec, run_dir).unwrap();
        create_tap(&n).unwrap();
        let st = network_status(&spec, run_dir).unwrap();
        assert!(st.healthy(&spec), "{st:?}");
        assert_ne!(st.dnsmasq, Some(pid));
        let left: Vec<ProblemKind> = check(nets, nics, run_dir).unwrap().iter().map(|p| p.kind).collect();
        assert_eq!(left, vec![ProblemKind::RouteClash]);

        // A TAP that is gone, and firewall rules that are gone.
        run(&["nft", "delete", "table", "bridge", "rustvisor-fw-rvt-web-0"]);
        let kinds: Vec<ProblemKind> = check(&[], nics, run_dir).unwrap().iter().map(|p| p.kind).collect();
        assert_eq!(kinds, vec![ProblemKind::FirewallMissing]);
        remove_tap(&n.tap).unwrap();
        let kinds: Vec<ProblemKind> = check(&[], nics, run_dir).unwrap().iter().map(|p| p.kind).collect();
        assert_eq!(kinds, vec![ProblemKind::TapMissing]);
        remove_network(&spec, run_dir).unwrap();
        let kinds: Vec<ProblemKind> = check(nets, &[], run_dir).unwrap().iter().map(|p| p.kind).collect();
        assert!(kinds.contains(&ProblemKind::BridgeMissing) && kinds.contains(&ProblemKind::RulesMissing), "{kinds:?}");
    });
}

#[test]
fn leases_are_read_from_dnsmasqs_file() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let l = hostnet::leases(&dir, "lan0").unwrap();
    assert_eq!(l.len(), 2, "{l:?}");
    assert_eq!(l[0].mac.to_string(), "52:54:00:12:34:56");
    assert_eq!(l[0].ip.to_string(), "10.77.0.23");
    assert_eq!(l[0].hostname.as_deref(), Some("web"));
    assert_eq!(l[0].expires, Some(UNIX_EPOCH + Duration::from_secs(1_767_225_600)));
    assert_eq!(l[1].hostname, None);
    assert_eq!(l[1].expires, None, "0 is an infinite lease");
    assert!(hostnet::leases(&dir, "no-such-network").unwrap().is_empty());
    assert!(l[0].expires.unwrap() > SystemTime::UNIX_EPOCH);
}

#[test]
fn validation_errors_name_the_field() {
    let mut spec = lan("lan0", Some("10.77.0.0/24"));
    let e = ensure_network(&spec, Path::new("/nonexistent")).unwrap_err();
    assert!(matches!(e, Error::Invalid(_)));
    assert!(e.to_string().starts_with("subnet: 10.77.0.0/24 is the network address"), "{e}");
    spec.subnet = None;
    spec.dhcp = true;
    assert!(ensure_network(&spec, Path::new("/nonexistent"))
        .unwrap_err()
        .to_string()
        .starts_with("dhcp: needs a subnet"));
    spec.name = "Bad Name".into();
    assert!(ensure_network(&spec, Path::new("/nonexistent"))
        .unwrap_err()
        .to_string()
        .starts_with("name: \"Bad Name\""));
    let e = "in tcp/70000".parse::<hostnet::Rule>().unwrap_err();
    assert!(e.to_string().starts_with("rule: \"in tcp/70000\""), "{e}");
    let e = hostnet::apply_firewall("bad name", None).unwrap_err();
    assert!(e.to_string().starts_with("tap: "), "{e}");
}

/// An Ethernet frame with an IPv4 packet, behind the 12-byte vnet header the VMM's TAP uses.
fn ipv4_frame(src: hostnet::MacAddr, dst: [u8; 6], saddr: [u8; 4], daddr: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; virtio::tap::VNET_HDR_LEN];
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = u16::try_from(20 + l4.len()).unwrap().to_be_bytes();
    let mut ip = [0x45, 0, total[0], total[1], 0, 1, 0x40, 0, 64, proto, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    ip[12..16].copy_from_slice(&saddr);
    ip[16..20].copy_from_slice(&daddr);
    let mut sum: u32 = ip.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(l4);
    f
}

/// A TCP SYN from port 40000 to `dport` (checksum left 0: the bridge does not check it).
fn tcp_syn(dport: u16) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02;
    t[14..16].copy_from_slice(&1024u16.to_be_bytes());
    t
}

/// Whether a TCP segment to `dport` arrives on `tap` within `wait`.
fn tcp_arrives(tap: &virtio::tap::Tap, dport: u16, wait: Duration) -> bool {
    let deadline = std::time::Instant::now() + wait;
    let mut buf = vec![0u8; 65536];
    while std::time::Instant::now() < deadline {
        match tap.read(&mut buf) {
            Ok(n) => {
                let f = &buf[virtio::tap::VNET_HDR_LEN..n];
                if f.len() >= 14 + 20 + 4
                    && f[12..14] == [0x08, 0x00]
                    && f[14 + 9] == 6
                    && f[14 + 22..14 + 24] == dport.to_be_bytes()
                {
                    return true;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("reading {}: {e}", tap.name()),
        }
    }
    false
}

#[test]
fn firewall_filters_bridged_traffic_and_a_replacement_takes_effect_at_once() {
    in_netns("fwtraffic", &["nft", "ip"], |run_dir| {
        let spec = lan("lan4", None);
        ensure_network(&spec, run_dir).unwrap();
        let a = nic("client", &spec);
        let b = NicAttach { firewall: Some(fw("web", &["in tcp/80"])), ..nic("server", &spec) };
        create_tap(&a).unwrap();
        create_tap(&b).unwrap();
        // The "VMs": the VMM's TAP code on each end.
        let ta = virtio::tap::Tap::open(&a.tap).unwrap();
        let tb = virtio::tap::Tap::open(&b.tap).unwrap();
        wait_forwarding(&a.tap);
        wait_forwarding(&b.tap);
        let send = |dport: u16| {
            let f = ipv4_frame(a.mac, b.mac.0, [10, 0, 0, 1], [10, 0, 0, 2], 6, &tcp_syn(dport));
            assert_eq!(ta.write(&f).unwrap(), f.len());
        };
        // The bridge floods the first frame to b (it has not learnt b's MAC yet): both
        // reach b's port, and its firewall decides.
        send(80);
        assert!(tcp_arrives(&tb, 80, Duration::from_secs(2)), "allowed tcp/80 did not arrive");
        send(22);
        assert!(!tcp_arrives(&tb, 22, Duration::from_millis(300)), "tcp/22 passed a default-in drop");

        hostnet::apply_firewall(&b.tap, Some(&fw("ssh", &["in tcp/22"]))).unwrap();
        send(22);
        assert!(tcp_arrives(&tb, 22, Duration::from_secs(2)), "tcp/22 still dropped after the replacement");
        send(80);
        assert!(!tcp_arrives(&tb, 80, Duration::from_millis(300)), "tcp/80 passed after its rule was replaced");

        hostnet::apply_firewall(&b.tap, None).unwrap();
        send(81);
        assert!(tcp_arrives(&tb, 81, Duration::from_secs(2)), "no firewall: everything passes");
        remove_network(&spec, run_dir).unwrap();
    });
}

/// A DHCP client message (RFC 2131) from `mac`, broadcast, with the broadcast flag set, as a
/// frame behind the vnet header. `kind` is option 53 (1 DISCOVER, 3 REQUEST); `extra` more
/// options.
fn dhcp_frame(mac: hostnet::MacAddr, kind: u8, extra: &[u8]) -> Vec<u8> {
    let mut bootp = vec![0u8; 236];
    bootp[0] = 1; // BOOTREQUEST
    bootp[1] = 1; // Ethernet
    bootp[2] = 6;
    bootp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    bootp[10] = 0x80; // broadcast flag: the server answers by broadcast
    bootp[28..34].copy_from_slice(&mac.0);
    bootp.extend_from_slice(&[99, 130, 83, 99, 53, 1, kind, 12, 3, b'w', b'e', b'b']);
    bootp.extend_from_slice(extra);
    bootp.push(255);
    let mut udp = Vec::new();
    udp.extend_from_slice(&68u16.to_be_bytes());
    udp.extend_from_slice(&67u16.to_be_bytes());
    udp.extend_from_slice(&u16::try_from(8 + bootp.len()).unwrap().to_be_bytes());
    udp.extend_from_slice(&[0, 0]); // no checksum (allowed over IPv4)
    udp.extend_from_slice(&bootp);
    ipv4_frame(mac, [0xff; 6], [0, 0, 0, 0], [255, 255, 255, 255], 17, &udp)
}

/// (your address, server identifier, router option) of a DHCP server message.
type DhcpReply = ([u8; 4], [u8; 4], Option<Vec<u8>>);

/// Waits for a DHCP server message of type `kind` (2 OFFER, 5 ACK) on `tap`; returns
/// (your address, server identifier, router option).
fn dhcp_reply(tap: &virtio::tap::Tap, kind: u8) -> Option<DhcpReply> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    while std::time::Instant::now() < deadline {
        let n = match tap.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => panic!("reading {}: {e}", tap.name()),
        };
        let f = &buf[virtio::tap::VNET_HDR_LEN..n];
        if f.len() < 14 + 20 + 8 + 240 || f[12..14] != [0x08, 0x00] || f[14 + 9] != 17 {
            continue;
        }
        let ihl = usize::from(f[14] & 0x0f) * 4;
        let udp = &f[14 + ihl..];
        if udp[0..2] != 67u16.to_be_bytes() || udp[2..4] != 68u16.to_be_bytes() {
            continue;
        }
        let bootp = &udp[8..];
        let yiaddr: [u8; 4] = bootp[16..20].try_into().unwrap();
        let (mut msg, mut server, mut router) = (0, [0u8; 4], None);
        let mut opts = &bootp[240..];
        while opts.len() >= 2 && opts[0] != 255 {
            let (code, len) = (opts[0], usize::from(opts[1]));
            let val = &opts[2..2 + len];
            match code {
                53 => msg = val[0],
                54 => server = val.try_into().unwrap(),
                3 => router = Some(val.to_vec()),
                _ => {}
            }
            opts = &opts[2 + len..];
        }
        if msg == kind {
            return Some((yiaddr, server, router));
        }
    }
    None
}

/// A DHCP exchange on `n`'s TAP; returns the lease `leases` then shows and the router option
/// of the ACK.
fn dhcp_lease(spec: &NetworkSpec, n: &NicAttach, run_dir: &Path) -> (hostnet::Lease, Option<Vec<u8>>) {
    let tap = virtio::tap::Tap::open(&n.tap).unwrap();
    wait_forwarding(&n.tap);
    tap.write(&dhcp_frame(n.mac, 1, &[])).unwrap();
    let (offered, server, _) = dhcp_reply(&tap, 2).expect("no DHCPOFFER");
    assert_eq!(server, spec.subnet.unwrap().addr.octets());
    assert!(spec.subnet.unwrap().contains(offered.into()), "{offered:?}");
    let mut req = vec![50, 4];
    req.extend_from_slice(&offered);
    req.extend_from_slice(&[54, 4]);
    req.extend_from_slice(&server);
    tap.write(&dhcp_frame(n.mac, 3, &req)).unwrap();
    let (acked, _, router) = dhcp_reply(&tap, 5).expect("no DHCPACK");
    assert_eq!(acked, offered);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let lease = loop {
        let l = hostnet::leases(run_dir, &spec.name).unwrap();
        if let Some(l) = l.into_iter().find(|l| l.mac == n.mac) {
            break l;
        }
        assert!(std::time::Instant::now() < deadline, "no lease in {}", run_dir.display());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(lease.ip.octets(), acked);
    (lease, router)
}

#[test]
fn a_guest_gets_a_dhcp_lease_and_leases_shows_it() {
    in_netns("dhcp", &["nft", "dnsmasq", "ip"], |run_dir| {
        let spec = NetworkSpec { dhcp: true, ..lan("lan5", Some("10.81.0.1/24")) };
        ensure_network(&spec, run_dir).unwrap();
        let n = nic("web", &spec);
        create_tap(&n).unwrap();
        let (lease, router) = dhcp_lease(&spec, &n, run_dir);
        assert_eq!(router, Some(vec![10, 81, 0, 1]), "the host routes for the guest");
        assert_eq!(lease.hostname.as_deref(), Some("web"));
        let left = lease.expires.unwrap().duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(3000) && left <= Duration::from_secs(3600), "{left:?}");
        remove_network(&spec, run_dir).unwrap();

        // DHCP gets through an isolated network's input rules and a NIC firewall that drops
        // everything else both ways.
        let iso = NetworkSpec { dhcp: true, isolated: true, ..lan("lan6", Some("10.82.0.1/24")) };
        ensure_network(&iso, run_dir).unwrap();
        let closed = FirewallSpec { default_out: hostnet::Action::Drop, ..fw("closed", &[]) };
        let n = NicAttach { firewall: Some(closed), ..nic("db", &iso) };
        create_tap(&n).unwrap();
        let (_, router) = dhcp_lease(&iso, &n, run_dir);
        assert_eq!(router, None, "no default route on an isolated network");
        remove_network(&iso, run_dir).unwrap();
    });
}

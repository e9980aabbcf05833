//! An image that works: the agent runs nothing the image lacks. Started with a PATH that
//! holds only the programs the image ships (`nft`, `conntrack`) — no `ip` — each agent still
//! reads its node's addresses (over rtnetlink, in its node's network namespace), reports them
//! to the controller, and a NodePort restricted to a CIDR by `--node-port-addresses` answers
//! on them with real traffic. Both binaries report the release and commit they were built
//! from.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use common::*;
use kubenft_lab::{Cond, Host, Lab, ProbeOpts, Proto, Service, Slice};
use kubenft_proto::release::PROTOCOL_VERSION;

const NP: u16 = 30061;

/// A directory holding links to the programs the image ships, and nothing else.
fn path_without_ip(lab: &Lab) -> PathBuf {
    let dir = lab.dir().join("path-without-ip");
    std::fs::create_dir_all(&dir).unwrap();
    for program in ["nft", "conntrack"] {
        let target = which(program).unwrap_or_else(|| panic!("{program} is not on PATH"));
        std::os::unix::fs::symlink(&target, dir.join(program)).unwrap();
    }
    assert!(!dir.join("ip").exists());
    dir
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Gives node `node` a second link (a veth pair kept inside the node) with an address in
/// 192.168.60.0/24 routed from ext via the node, an IPv6 address, a point-to-point address
/// (its peer's address is not the node's) and a stray 127.0.0.2 (a loopback address outside
/// `lo`, never reported). Returns the IPv4 address.
fn add_addresses(lab: &Lab, node: &str) -> Ipv4Addr {
    let n = lab.node(node);
    let secondary = Ipv4Addr::new(192, 168, 60, 10 + n.index);
    let cidr = format!("{secondary}/24");
    let v6 = format!("fd00:60::{}/64", n.index);
    let host = Host::Node(node);
    for argv in [
        &[
            "ip", "link", "add", "sec0", "type", "veth", "peer", "name", "sec1",
        ][..],
        &["ip", "addr", "add", &cidr, "dev", "sec0"],
        &["ip", "addr", "add", &v6, "dev", "sec0"],
        &[
            "ip",
            "addr",
            "add",
            "10.77.0.1",
            "peer",
            "10.77.0.2",
            "dev",
            "sec0",
        ],
        &["ip", "addr", "add", "127.0.0.2/8", "dev", "sec0"],
        &["ip", "link", "set", "sec0", "up"],
        &["ip", "link", "set", "sec1", "up"],
    ] {
        lab.exec_ok(host, argv)
            .unwrap_or_else(|e| panic!("{argv:?} on node {node}: {e}"));
    }
    let route = format!("{secondary}/32");
    let primary = n.ipv4.to_string();
    lab.exec_ok(
        Host::External,
        &["ip", "route", "add", &route, "via", &primary],
    )
    .unwrap();
    secondary
}

/// What `ip -o addr` shows in `node` (the local address of each), `lo` and loopback
/// addresses left out: what the agent used to report by running `ip -j addr`.
fn addresses_ip_shows(c: &Cluster, node: &str) -> BTreeSet<IpAddr> {
    c.lab
        .exec_ok(Host::Node(node), &["ip", "-o", "addr", "show"])
        .unwrap()
        .lines()
        .filter(|l| l.split_whitespace().nth(1) != Some("lo"))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.position(|w| w == "inet" || w == "inet6")?;
            words.next()?.split('/').next()?.parse::<IpAddr>().ok()
        })
        .filter(|ip| !ip.is_loopback())
        .collect()
}

/// `BIN --version` without the program's name: "0.1.0 (git 07b6384abcde)".
fn version_of(bin: &Path) -> String {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success(), "{} --version failed", bin.display());
    let text = String::from_utf8(out.stdout).unwrap();
    let (_, version) = text.trim().split_once(' ').expect("NAME VERSION");
    version.to_owned()
}

#[test]
fn an_agent_without_ip_reports_its_addresses_and_serves_cidr_nodeports() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-1", "b")]).remove(0);
    let secondary = add_addresses(&lab, "a");
    let path = path_without_ip(&lab);
    let path = path.to_str().unwrap();
    let env: &[(&str, &str)] = &[("PATH", path)];
    let c = Cluster::start_with_args_and_agent_env(
        lab,
        &["--node-port-addresses", "192.168.60.0/24"],
        &[("a", env), ("b", env)],
    );
    let svc = Service::cluster_ip("web", "10.96.6.1")
        .port("http", 80, TCP, Proto::Tcp)
        .node_port(NP);
    let slice = Slice::for_service("web")
        .port("http", TCP)
        .endpoint(&web, Cond::READY);
    c.write("web.yaml", &[&svc, &slice]);

    // Real traffic on the address in the range, from outside and from the node itself: it
    // is served only if the agent reported it (nothing listens there otherwise: refused).
    c.wait_probe(
        "NodePort on node a's address in 192.168.60.0/24",
        Host::External,
        Proto::Tcp,
        sock(secondary, NP),
        START,
        |r| r.server() == Some("web-1"),
    );
    c.wait_synced(START);
    for from in [Host::External, Host::Node("a")] {
        let rs = c.probe(from, Proto::Tcp, sock(secondary, NP), &ProbeOpts::count(4));
        let t = assert_all_ok(&rs, &format!("{secondary}:{NP} from {from:?}"));
        assert_eq!(t.get("web-1"), Some(&4), "{t:?}");
    }

    // The agents really run without `ip` on their PATH (read once they serve: right after
    // the spawn, /proc may still show the parent's environment).
    for node in ["a", "b"] {
        let pid = c.agent(node).pid().expect("agent running");
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        assert!(
            vars.contains(&format!("PATH={path}").as_bytes()),
            "agent {node} runs with another PATH"
        );
    }

    // Every node's addresses as `ip` shows them, IPv4 and IPv6 (link-local included), the
    // point-to-point address but not its peer, no loopback address.
    let nodes = c.list_nodes().unwrap();
    for node in ["a", "b"] {
        let reported: BTreeSet<IpAddr> = nodes[node]["agentAddresses"]
            .as_array()
            .unwrap_or_else(|| panic!("node {node} reports no addresses: {:#?}", nodes[node]))
            .iter()
            .map(|a| a.as_str().unwrap().parse().unwrap())
            .collect();
        assert_eq!(reported, addresses_ip_shows(&c, node), "node {node}");
        assert!(reported.iter().any(IpAddr::is_ipv6), "{reported:?}");
    }
    let a: BTreeSet<IpAddr> = addresses_ip_shows(&c, "a");
    assert!(a.contains(&IpAddr::V4(secondary)) && a.contains(&"10.77.0.1".parse().unwrap()));
    assert!(!a.contains(&"10.77.0.2".parse().unwrap()));

    // Both binaries' versions, as `--version` prints them, carry the commit, and inspection
    // shows the same on both sides (same build: no skew).
    let agent_version = version_of(&c.lab.binary("kubenft-agent").unwrap());
    let controller_version = version_of(&c.lab.binary("kubenft-controller").unwrap());
    assert!(agent_version.contains(" (git "), "{agent_version}");
    assert_eq!(agent_version, controller_version);
    let list = c.controller_call("ListNodes", None).unwrap();
    assert_eq!(list["controllerVersion"], controller_version.as_str());
    assert_eq!(list["protocolVersion"], PROTOCOL_VERSION);
    assert_eq!(nodes["a"]["agentVersion"], agent_version.as_str());
    assert_eq!(nodes["a"]["agentProtocolVersion"], PROTOCOL_VERSION);
    assert_ne!(nodes["a"]["versionSkew"], true);
    let applied = c.agent_call("a", "GetApplied").unwrap();
    assert_eq!(applied["agentVersion"], agent_version.as_str());
    assert_eq!(applied["protocolVersion"], PROTOCOL_VERSION);
    let log = c.agent("a").logs();
    assert!(!log.contains("cannot list"), "{log}");
}

//! End to end: migrating a node from kube-proxy to kubenft under continuous traffic, and
//! the report of a foreign table that DNATs before us.
//!
//! Node a starts as kube-proxy left it: its nftables-mode tables serve Service `web` (the
//! table, sets, maps, per-Service and per-endpoint chains and masquerading as upstream
//! generates them, plus a counter on the Service chain's dispatch rule to see whether it is
//! used), and iptables-mode leftovers sit in iptables-nft's `ip nat`, `ip filter` and `ip
//! mangle` tables beside kubelet's and Docker's chains, and a stand-in for kube-proxy's process
//! holds its health and metrics ports. Then, while a pod and the node itself open new
//! connections to the Service without pause and a long-lived connection made through
//! kube-proxy's rules exchanges a line every 200 ms: kubenft's agent starts (new connections
//! go through its rules; it waits for kube-proxy's ports), kube-proxy's process goes (the
//! agent serves the ports and reports every kube-proxy table, once), and `kubenft-agent
//! --cleanup-kube-proxy` removes kube-proxy's objects (the report goes). Not one connection
//! fails, the long-lived one keeps its pod, and everything that is not kube-proxy's is
//! exactly as before.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use kubenft_lab::{Host, Lab, ProbeOpts, Process, Proto, wait_until};
use serde_json::Value;

const WEB: &str = "10.96.0.80:80";
const WEB_IP: &str = "10.96.0.80";
/// kube-proxy's chain names for `default/web` port `http` and its endpoints (HASH8 =
/// base32(sha256(name))[:8], as upstream names them).
const SERVICE_CHAIN: &str = "service-SUSTUHLJ-default/web/tcp/http";
const ENDPOINT_CHAINS: [&str; 2] = [
    "endpoint-7FUMELAF-default/web/tcp/http__10.244.1.11/8080",
    "endpoint-ISHEYCOM-default/web/tcp/http__10.244.2.11/8080",
];
const ENDPOINTS: [&str; 2] = ["10.244.1.11", "10.244.2.11"];
/// The detection's shortest period (`migrate::detect::MIN_INTERVAL`).
const DETECT_PERIOD: Duration = Duration::from_secs(5);
/// How long a report may take to follow a change: the detection checks every 5 s, longer when
/// a check costs more (a hundred times its cost), as on a machine busy building.
const DETECT_CAP: Duration = Duration::from_secs(20);

/// kube-proxy's nftables-mode table for `web` (ClusterIP 10.96.0.80:80 → the two endpoints
/// on 8080), node IP 192.168.50.11, cluster CIDR 10.244.0.0/16, Service CIDR 10.96.0.0/16;
/// and its (empty) IPv6 table.
fn kube_proxy_nftables() -> String {
    let t = "ip kube-proxy";
    let mut s = vec![
        format!("add table {t} {{ comment \"rules for kube-proxy\" ; }}"),
        format!("add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"),
        format!(
            "add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"
        ),
        format!(
            "add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
        ),
        format!(
            "add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
        ),
        format!(
            "add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
        ),
        format!(
            "add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
        ),
        format!(
            "add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
        ),
        format!("add chain {t} mark-for-masquerade"),
        format!("add rule {t} mark-for-masquerade mark set mark or 0x4000"),
        format!("add chain {t} masquerading"),
        format!("add rule {t} masquerading mark and 0x4000 == 0 return"),
        format!("add rule {t} masquerading mark set mark xor 0x4000"),
        format!("add rule {t} masquerading masquerade fully-random"),
        format!(
            "add chain {t} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
        ),
        format!("add rule {t} reject-chain reject"),
        format!("add chain {t} services"),
        format!("add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips"),
        format!(
            "add rule {t} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"
        ),
        format!("add chain {t} firewall-check"),
        format!(
            "add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
        ),
        format!("add chain {t} service-endpoints-check"),
        format!(
            "add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services"
        ),
        format!("add chain {t} nodeport-endpoints-check"),
        format!(
            "add rule {t} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"
        ),
        format!("add chain {t} cluster-ips-check"),
        format!(
            "add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
        ),
        format!(
            "add rule {t} cluster-ips-check ip daddr {{ 10.96.0.0/16 }} drop comment \"Drop traffic to unallocated ClusterIPs\""
        ),
    ];
    for (name, kind, hook, prio, jumps) in [
        (
            "filter-prerouting-pre-dnat",
            "filter",
            "prerouting",
            "-110",
            &["firewall-check"][..],
        ),
        (
            "filter-output-pre-dnat",
            "filter",
            "output",
            "-110",
            &["firewall-check"],
        ),
        (
            "filter-input",
            "filter",
            "input",
            "0",
            &["nodeport-endpoints-check", "service-endpoints-check"],
        ),
        (
            "filter-forward",
            "filter",
            "forward",
            "0",
            &["service-endpoints-check", "cluster-ips-check"],
        ),
        (
            "filter-output",
            "filter",
            "output",
            "0",
            &["service-endpoints-check", "cluster-ips-check"],
        ),
        ("nat-prerouting", "nat", "prerouting", "-100", &["services"]),
        ("nat-output", "nat", "output", "-100", &["services"]),
        (
            "nat-postrouting",
            "nat",
            "postrouting",
            "100",
            &["masquerading"],
        ),
    ] {
        s.push(format!(
            "add chain {t} {name} {{ type {kind} hook {hook} priority {prio} ; }}"
        ));
        let guard = if kind == "filter" {
            "ct state new "
        } else {
            ""
        };
        for j in jumps {
            s.push(format!("add rule {t} {name} {guard}jump {j}"));
        }
    }
    for (chain, ip) in ENDPOINT_CHAINS.iter().zip(ENDPOINTS) {
        s.push(format!("add chain {t} {chain}"));
        s.push(format!(
            "add rule {t} {chain} ip saddr {ip} jump mark-for-masquerade"
        ));
        s.push(format!(
            "add rule {t} {chain} meta l4proto tcp dnat to {ip}:{TCP}"
        ));
    }
    s.push(format!("add chain {t} {SERVICE_CHAIN}"));
    s.push(format!(
        "add rule {t} {SERVICE_CHAIN} ip daddr {WEB_IP} tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade"
    ));
    // The counter is the test's: it shows whether kube-proxy's rules still pick endpoints.
    s.push(format!(
        "add rule {t} {SERVICE_CHAIN} counter numgen random mod 2 vmap {{ 0 : goto {}, 1 : goto {} }}",
        ENDPOINT_CHAINS[0], ENDPOINT_CHAINS[1]
    ));
    s.push(format!("add element {t} cluster-ips {{ {WEB_IP} }}"));
    s.push(format!("add element {t} nodeport-ips {{ 192.168.50.11 }}"));
    s.push(format!(
        "add element {t} service-ips {{ {WEB_IP} . tcp . 80 : goto {SERVICE_CHAIN} }}"
    ));
    // The IPv6 table: no IPv6 Services here, the same skeleton.
    let t6 = "ip6 kube-proxy";
    s.extend([
        format!("add table {t6} {{ comment \"rules for kube-proxy\" ; }}"),
        format!(
            "add map {t6} service-ips {{ type ipv6_addr . inet_proto . inet_service : verdict ; }}"
        ),
        format!("add chain {t6} services"),
        format!("add rule {t6} services ip6 daddr . meta l4proto . th dport vmap @service-ips"),
        format!("add chain {t6} nat-prerouting {{ type nat hook prerouting priority -100 ; }}"),
        format!("add rule {t6} nat-prerouting jump services"),
        format!("add chain {t6} nat-output {{ type nat hook output priority -100 ; }}"),
        format!("add rule {t6} nat-output jump services"),
    ]);
    s.join("\n") + "\n"
}

/// iptables-nft's tables as kubelet and Docker leave them: what must survive the cleanup.
const IPTABLES_OTHERS: &str = "\
table ip nat {
  chain PREROUTING { type nat hook prerouting priority -100; policy accept;
    fib daddr type local counter jump DOCKER
  }
  chain INPUT { type nat hook input priority 100; policy accept; }
  chain OUTPUT { type nat hook output priority -100; policy accept;
    ip daddr != 127.0.0.0/8 fib daddr type local counter jump DOCKER
  }
  chain POSTROUTING { type nat hook postrouting priority 100; policy accept;
    oifname != \"docker0\" ip saddr 172.17.0.0/16 counter masquerade
  }
  chain DOCKER { iifname \"docker0\" counter return; }
  chain KUBE-MARK-DROP { counter meta mark set mark or 0x8000; }
  chain KUBE-KUBELET-CANARY { }
}
table ip filter {
  chain INPUT { type filter hook input priority 0; policy accept;
    counter jump KUBE-FIREWALL
  }
  chain FORWARD { type filter hook forward priority 0; policy accept; }
  chain OUTPUT { type filter hook output priority 0; policy accept;
    counter jump KUBE-FIREWALL
  }
  chain KUBE-FIREWALL {
    ip saddr != 127.0.0.0/8 ip daddr 127.0.0.0/8 ct status dnat counter drop comment \"block incoming localnet connections\"
  }
  chain KUBE-KUBELET-CANARY { }
}
table ip mangle {
  chain KUBE-IPTABLES-HINT { }
  chain KUBE-KUBELET-CANARY { }
}
";

/// kube-proxy's iptables-mode leftovers (a stale Service `old` at 10.96.0.99), inserted at
/// the head of the base chains as kube-proxy does.
const KUBE_PROXY_IPTABLES: &str = "\
add chain ip nat KUBE-SERVICES
add chain ip nat KUBE-NODEPORTS
add chain ip nat KUBE-POSTROUTING
add chain ip nat KUBE-MARK-MASQ
add chain ip nat KUBE-PROXY-CANARY
add chain ip nat KUBE-SVC-NGOM5ZSVYBGDJWOQ
add chain ip nat KUBE-SEP-EJPBOZUU5JC3KMA6
add rule ip nat KUBE-MARK-MASQ counter meta mark set mark or 0x4000
add rule ip nat KUBE-POSTROUTING meta mark & 0x4000 != 0x4000 counter return
add rule ip nat KUBE-POSTROUTING counter meta mark set mark xor 0x4000
add rule ip nat KUBE-POSTROUTING counter masquerade fully-random comment \"kubernetes service traffic requiring SNAT\"
add rule ip nat KUBE-SEP-EJPBOZUU5JC3KMA6 ip saddr 10.244.1.11 counter jump KUBE-MARK-MASQ
add rule ip nat KUBE-SEP-EJPBOZUU5JC3KMA6 meta l4proto tcp counter dnat to 10.244.1.11:8080
add rule ip nat KUBE-SVC-NGOM5ZSVYBGDJWOQ ip saddr != 10.244.0.0/16 ip daddr 10.96.0.99 tcp dport 80 counter jump KUBE-MARK-MASQ
add rule ip nat KUBE-SVC-NGOM5ZSVYBGDJWOQ counter jump KUBE-SEP-EJPBOZUU5JC3KMA6
add rule ip nat KUBE-SERVICES ip daddr 10.96.0.99 tcp dport 80 counter jump KUBE-SVC-NGOM5ZSVYBGDJWOQ comment \"default/old:http cluster IP\"
add rule ip nat KUBE-SERVICES fib daddr type local counter jump KUBE-NODEPORTS comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"
insert rule ip nat PREROUTING counter jump KUBE-SERVICES comment \"kubernetes service portals\"
insert rule ip nat OUTPUT counter jump KUBE-SERVICES comment \"kubernetes service portals\"
insert rule ip nat POSTROUTING counter jump KUBE-POSTROUTING comment \"kubernetes postrouting rules\"
add chain ip filter KUBE-SERVICES
add chain ip filter KUBE-EXTERNAL-SERVICES
add chain ip filter KUBE-FORWARD
add chain ip filter KUBE-NODEPORTS
add chain ip filter KUBE-PROXY-FIREWALL
add chain ip filter KUBE-PROXY-CANARY
add rule ip filter KUBE-FORWARD meta mark & 0x4000 == 0x4000 counter accept comment \"kubernetes forwarding rules\"
add rule ip filter KUBE-FORWARD ct state related,established counter accept comment \"kubernetes forwarding conntrack rule\"
insert rule ip filter INPUT ct state new counter jump KUBE-EXTERNAL-SERVICES comment \"kubernetes externally-visible service portals\"
insert rule ip filter INPUT counter jump KUBE-NODEPORTS comment \"kubernetes health check service ports\"
insert rule ip filter INPUT ct state new counter jump KUBE-PROXY-FIREWALL comment \"kubernetes load balancer firewall\"
insert rule ip filter FORWARD ct state new counter jump KUBE-EXTERNAL-SERVICES comment \"kubernetes externally-visible service portals\"
insert rule ip filter FORWARD ct state new counter jump KUBE-SERVICES comment \"kubernetes service portals\"
insert rule ip filter FORWARD counter jump KUBE-FORWARD comment \"kubernetes forwarding rules\"
insert rule ip filter FORWARD ct state new counter jump KUBE-PROXY-FIREWALL comment \"kubernetes load balancer firewall\"
insert rule ip filter OUTPUT ct state new counter jump KUBE-SERVICES comment \"kubernetes service portals\"
insert rule ip filter OUTPUT ct state new counter jump KUBE-PROXY-FIREWALL comment \"kubernetes load balancer firewall\"
add chain ip mangle KUBE-PROXY-CANARY
";

/// Someone else's table, at hooks but touching no Service: it must come out unchanged.
const BYSTANDER: &str = "\
table inet bystander {
  set blocked { type ipv4_addr; elements = { 192.0.2.1, 192.0.2.2 }; }
  chain input { type filter hook input priority 10; policy accept; ip saddr @blocked counter drop; }
  chain pre { type nat hook prerouting priority 50; policy accept; ip daddr 192.0.2.9 counter; }
}
";

/// kube-proxy's tables and what the lab checks them against.
const KUBE_PROXY_TABLES: [(&str, &str); 5] = [
    ("kube-proxy-nftables", "ip kube-proxy"),
    ("kube-proxy-nftables", "ip6 kube-proxy"),
    ("kube-proxy-iptables", "ip filter"),
    ("kube-proxy-iptables", "ip mangle"),
    ("kube-proxy-iptables", "ip nat"),
];

/// What kube-proxy's process holds on the node besides its rules: `/healthz` on 10256 and
/// `/metrics` on 127.0.0.1:10249, sockets without `SO_REUSEPORT` (as Go's).
const KUBE_PROXY_PORTS: &str = "\
import socket, time
held = []
for addr in (('0.0.0.0', 10256), ('127.0.0.1', 10249)):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(addr)
    s.listen(16)
    held.append(s)
print('READY', flush=True)
time.sleep(600)
";

/// Loads an nft script in `node`'s namespace (through a file: a script is many lines).
fn load(lab: &Lab, node: &str, name: &str, script: &str) {
    let path = lab.dir().join(format!("{name}.nft"));
    std::fs::write(&path, script).unwrap();
    lab.exec_ok(
        Host::Node(node),
        &["nft", "-f", &path.display().to_string()],
    )
    .unwrap_or_else(|e| panic!("loading {name} on node {node}: {e}"));
}

/// `nft -s list table FAMILY NAME` (no counter values), or `None` if the table is gone.
fn listing(lab: &Lab, node: &str, family: &str, table: &str) -> Option<String> {
    lab.exec_ok(
        Host::Node(node),
        &["nft", "-s", "list", "table", family, table],
    )
    .ok()
}

fn iptables_tables(lab: &Lab) -> BTreeMap<&'static str, Option<String>> {
    ["nat", "filter", "mangle"]
        .into_iter()
        .map(|t| (t, listing(lab, "a", "ip", t)))
        .collect()
}

/// The packets kube-proxy's Service chain has dispatched so far (its dispatch rule's counter).
fn kube_proxy_dispatched(c: &Cluster) -> u64 {
    let out = c.nft("a", &["-j", "list", "table", "ip", "kube-proxy"]);
    let doc: Value = serde_json::from_str(&out).unwrap();
    doc["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("rule"))
        .filter(|r| r["chain"] == SERVICE_CHAIN)
        .flat_map(|r| r["expr"].as_array().cloned().unwrap_or_default())
        .find_map(|e| e["counter"]["packets"].as_u64())
        .unwrap_or_else(|| panic!("no counter in kube-proxy's Service chain: {out}"))
}

/// Node a's `/healthz`: (code, the `conflicts` as (source, table) pairs, the body).
fn conflicts(c: &Cluster) -> (u16, Vec<(String, String)>, String) {
    let (code, text) = c.http_get(Host::Node("a"), "http://127.0.0.1:10256/healthz");
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let json: Value = serde_json::from_str(&body).unwrap_or_default();
    let list = json["conflicts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["source"].as_str().unwrap_or_default().to_string(),
                c["table"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    (code, list, body)
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(s, t)| (s.to_string(), t.to_string()))
        .collect()
}

/// Waits until node a's `/healthz` lists exactly `want` (sorted by source, then table).
fn wait_conflicts(c: &Cluster, want: &[(&str, &str)]) -> String {
    let want = {
        let mut w = pairs(want);
        w.sort();
        w
    };
    let mut last = (0, Vec::new(), String::new());
    wait_until(DETECT_CAP, POLL, || {
        last = conflicts(c);
        last.1.sort();
        Ok::<_, String>(last.1 == want)
    })
    .unwrap_or_else(|e| panic!("/healthz conflicts not {want:?}: {e}; last: {}", last.2));
    assert_eq!(last.0, 200, "a conflict must not fail /healthz: {}", last.2);
    last.2
}

/// Node a's `/metrics` text.
fn metrics(c: &Cluster) -> String {
    let (code, text) = c.http_get(Host::Node("a"), "http://127.0.0.1:10249/metrics");
    assert_eq!(code, 200, "{text}");
    text
}

fn gauge(source: &str, table: &str) -> String {
    format!("kubenft_agent_foreign_service_rules{{source=\"{source}\",table=\"{table}\"}} 1")
}

/// Waits until the controller shows node a SYNCED.
fn wait_node_synced(c: &Cluster, node: &str) {
    let mut last = Value::Null;
    wait_until(START, Duration::from_millis(100), || {
        last = c.list_nodes()?.remove(node).unwrap_or_default();
        Ok::<_, String>(last["state"] == "SYNCED" && last["ackedVersion"] == last["desiredVersion"])
    })
    .unwrap_or_else(|e| panic!("node {node} not SYNCED: {e}; last: {last:#}"));
}

#[test]
fn kubenft_takes_over_from_kube_proxy_and_removes_its_rules_without_a_failed_connection() {
    let lab = two_node_web(WEB_IP);
    let ips: Vec<String> = ["web-1", "web-2"]
        .map(|p| lab.pod(p).ipv4.to_string())
        .to_vec();
    assert_eq!(
        ips, ENDPOINTS,
        "kube-proxy's chain names assume these addresses"
    );

    // Node a as kube-proxy left it, beside kubelet's, Docker's and someone else's tables.
    load(&lab, "a", "iptables-others", IPTABLES_OTHERS);
    let others_before = iptables_tables(&lab);
    load(&lab, "a", "kube-proxy-iptables", KUBE_PROXY_IPTABLES);
    load(&lab, "a", "kube-proxy-nftables", &kube_proxy_nftables());
    load(&lab, "a", "bystander", BYSTANDER);
    let bystander_before = listing(&lab, "a", "inet", "bystander");

    // The controller runs; node a has no agent yet: kube-proxy's rules serve.
    let controller = lab.spawn_controller(&[]).unwrap();
    let c = Cluster {
        lab,
        controller,
        agents: BTreeMap::new(),
    };
    let target = vip(WEB);
    wait_web_spread(&c, target, START);
    c.wait_answers(Host::Node("a"), Proto::Tcp, target, START);
    assert!(
        kube_proxy_dispatched(&c) > 0,
        "kube-proxy's rules did not serve"
    );

    // kube-proxy's process holds its health and metrics ports (without SO_REUSEPORT).
    let kube_proxy = c
        .lab
        .spawn(
            "kube-proxy",
            Host::Node("a"),
            &["python3", "-c", KUBE_PROXY_PORTS],
        )
        .unwrap();
    kube_proxy
        .wait_for_stdout("READY", START)
        .unwrap_or_else(|e| panic!("kube-proxy's ports: {e}\n{}", kube_proxy.logs()));

    let held = HeldTcp::start(&c, "held", Host::Pod("client"), target);
    held.wait_more(2, "its start");
    let held_server = held.server().unwrap();

    // New connections from the pod and from the node itself, all through the migration.
    let opts = ProbeOpts::count(3).timeout(Duration::from_secs(2));
    let every = (2000, Duration::from_millis(50));
    let (from_pod, (from_node, agent)) = with_traffic(
        &c,
        (Host::Pod("client"), Proto::Tcp, target),
        &opts,
        every,
        || {
            with_traffic(
                &c,
                (Host::Node("a"), Proto::Tcp, target),
                &opts,
                every,
                || {
                    take_over_and_clean_up(
                        &c,
                        (&held, &kube_proxy),
                        &others_before,
                        &bystander_before,
                    )
                },
            )
        },
    );
    // The long-lived connection went on with the same pod all along.
    held.wait_more(3, "after the cleanup");
    assert_eq!(held.server().as_deref(), Some(held_server.as_str()));
    let exchanges = held.exchanges();
    held.stop();
    for (what, rs) in [("from the pod", &from_pod), ("from the node", &from_node)] {
        let t = assert_all_ok(rs, &format!("new connections {what}"));
        assert!(rs.len() >= 60, "too few connections {what}: {}", rs.len());
        assert_eq!(
            t.keys().collect::<Vec<_>>(),
            ["web-1", "web-2"],
            "{what}: {t:?}"
        );
        eprintln!("new connections {what}: {} answered ({t:?})", rs.len());
    }
    eprintln!("long-lived connection: {exchanges} exchanges with {held_server}");
    drop(agent);
}

/// The migration steps while traffic runs (the caller keeps probing); returns node a's agent.
fn take_over_and_clean_up(
    c: &Cluster,
    (held, kube_proxy): (&HeldTcp, &Process),
    others_before: &BTreeMap<&'static str, Option<String>>,
    bystander_before: &Option<String>,
) -> Process {
    // kubenft takes over: its table is created after kube-proxy's, so its nat chains, at the
    // same priority, see new connections first.
    let agent = c.lab.spawn_agent("a", &[]).unwrap();
    wait_node_synced(c, "a");
    let dispatched = kube_proxy_dispatched(c);
    let rs = c.probe(
        Host::Pod("client"),
        Proto::Tcp,
        vip(WEB),
        &ProbeOpts::count(10),
    );
    assert_all_ok(&rs, "new connections once kubenft runs");
    // kube-proxy's rules are still there, but ours decide, as Trace says.
    let from = Host::Pod("client");
    c.assert_trace_agrees("a", from, (Proto::Tcp, vip(WEB)), &rs);
    assert_eq!(
        kube_proxy_dispatched(c),
        dispatched,
        "kube-proxy's rules still chose endpoints for new connections"
    );
    held.wait_more(2, "after kubenft took over");
    // kube-proxy still holds its health and metrics ports: the agent waits for them.
    let log = agent.logs();
    for flag in ["what=\"--healthz-listen\"", "what=\"--metrics-listen\""] {
        assert!(
            log.lines()
                .any(|l| l.contains("another program holds the address") && l.contains(flag)),
            "{flag}:\n{log}"
        );
    }

    // kube-proxy's DaemonSet leaves the node: the process goes, its rules stay (stale but
    // consistent), and the agent takes its ports and reports its rules.
    kube_proxy.stop().unwrap();
    let body = wait_conflicts(c, &KUBE_PROXY_TABLES);
    for needle in [
        "nat-prerouting at prerouting priority -100",
        "KUBE-SERVICES",
    ] {
        assert!(body.contains(needle), "{needle} not in {body}");
    }
    let text = metrics(c);
    for (source, table) in KUBE_PROXY_TABLES {
        assert!(
            text.contains(&gauge(source, table)),
            "{} missing in\n{text}",
            gauge(source, table)
        );
    }
    // One warning per table, however many checks ran.
    std::thread::sleep(DETECT_PERIOD + Duration::from_secs(1));
    let log = agent.logs();
    for (source, table) in KUBE_PROXY_TABLES {
        let warned = log
            .lines()
            .filter(|l| {
                l.contains("WARN") && l.contains(&format!("source={source} table={table} "))
            })
            .count();
        assert_eq!(warned, 1, "warnings for {source} {table}:\n{log}");
    }
    for l in log
        .lines()
        .filter(|l| l.contains("WARN kubenft_agent::migrate"))
    {
        eprintln!("{l}");
    }

    // The cleanup removes kube-proxy's rules.
    let bin = c.lab.binary("kubenft-agent").unwrap().display().to_string();
    let out = c
        .lab
        .exec(Host::Node("a"), &[&bin, "--cleanup-kube-proxy"])
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "--cleanup-kube-proxy failed: {stderr}"
    );
    eprintln!("--cleanup-kube-proxy:\n{stderr}");
    for removed in [
        "table ip kube-proxy",
        "table ip6 kube-proxy",
        "jumps in ip nat",
        "of ip filter",
    ] {
        assert!(stderr.contains(removed), "{removed} not in:\n{stderr}");
    }
    for table in ["ip kube-proxy", "ip6 kube-proxy"] {
        let (family, name) = table.split_once(' ').unwrap();
        assert_eq!(
            listing(&c.lab, "a", family, name),
            None,
            "{table} is still there"
        );
    }
    assert_eq!(
        &iptables_tables(&c.lab),
        others_before,
        "the iptables tables differ from kube-proxy's absence"
    );
    assert_eq!(&listing(&c.lab, "a", "inet", "bystander"), bystander_before);
    for family in ["ip", "ip6"] {
        assert!(
            listing(&c.lab, "a", family, "kubenft").is_some(),
            "{family} kubenft"
        );
    }
    // The report goes.
    wait_conflicts(c, &[]);
    let text = metrics(c);
    assert!(
        !text.contains("kubenft_agent_foreign_service_rules{"),
        "{text}"
    );
    let log = agent.logs();
    assert!(
        log.contains("another program's Service rules are gone"),
        "{log}"
    );
    let rs = c.probe(
        Host::Pod("client"),
        Proto::Tcp,
        vip(WEB),
        &ProbeOpts::count(10),
    );
    assert_all_ok(&rs, "new connections after the cleanup");
    c.assert_traces_agree("a", from, (Proto::Tcp, vip(WEB)), &rs);
    let rs = all_ok(c, Host::Node("a"), vip(WEB), 6);
    c.assert_trace_agrees("a", Host::Node("a"), (Proto::Tcp, vip(WEB)), &rs);
    held.wait_more(2, "after the cleanup");
    // A second run finds nothing to do and says so.
    let out = c
        .lab
        .exec(Host::Node("a"), &[&bin, "--cleanup-kube-proxy"])
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.contains("no kube-proxy rules"),
        "{stderr}"
    );
    agent
}

/// A table that DNATs Service traffic at our priority silently wins (it was registered
/// after ours): the agent reports it, and one whose DNAT hides behind a jump at an earlier
/// priority. One after us, one at postrouting and one that only counts are not reported.
#[test]
fn a_foreign_table_that_dnats_before_us_is_reported() {
    let lab = Cluster::lab(&["a"]);
    pods(&lab, &[("web-1", "a"), ("web-2", "a")]);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    write_web_service(&c, "web", "10.96.0.81", [&c.lab.pod("web-1")]);
    let target = vip("10.96.0.81:80");
    c.wait_probe(
        "web-1 answers",
        Host::Pod("client"),
        Proto::Tcp,
        target,
        START,
        |r| r.server() == Some("web-1"),
    );
    c.wait_synced(START);
    let web2 = c.lab.pod("web-2").ipv4;
    let harmless = "\
table ip late {
  chain pre { type nat hook prerouting priority -90; policy accept;
    ip daddr 10.96.0.81 tcp dport 80 dnat to 192.0.2.1:80
  }
}
table ip counting {
  chain pre { type nat hook prerouting priority -100; policy accept;
    counter
  }
}
table ip post {
  chain post { type nat hook postrouting priority -100; policy accept;
    ip saddr 10.244.0.0/16 masquerade
  }
}
";
    load(&c.lab, "a", "harmless", harmless);
    let sneaky = format!(
        "table ip sneaky {{
  chain pre {{ type nat hook prerouting priority dstnat; policy accept;
    ip daddr 10.96.0.81 tcp dport 80 dnat to {web2}:{TCP}
  }}
}}
table inet early {{
  chain out {{ type nat hook output priority -150; policy accept;
    ip daddr 192.0.2.7 jump to-web
  }}
  chain to-web {{
    tcp dport 80 dnat ip to {web2}:{TCP}
  }}
}}
"
    );
    load(&c.lab, "a", "sneaky", &sneaky);
    // What the operator would otherwise not know: the Service now lands on web-2.
    c.wait_probe(
        "the sneaky table wins",
        Host::Pod("client"),
        Proto::Tcp,
        target,
        START,
        |r| r.server() == Some("web-2"),
    );
    let body = wait_conflicts(
        &c,
        &[
            ("foreign-dnat", "inet early"),
            ("foreign-dnat", "ip sneaky"),
        ],
    );
    for needle in [
        "chain pre DNATs",
        "priority -100, ours -100",
        "chain to-web DNATs",
        "priority -150",
    ] {
        assert!(body.contains(needle), "{needle} not in {body}");
    }
    let text = metrics(&c);
    for table in ["ip sneaky", "inet early"] {
        assert!(
            text.contains(&gauge("foreign-dnat", table)),
            "{table}:\n{text}"
        );
    }
    for table in ["late", "counting", "post"] {
        assert!(
            !text.contains(&format!("table=\"ip {table}\"")),
            "{table}:\n{text}"
        );
    }
    // Gone, and unreported again; the Service is ours again.
    c.nft("a", &["delete", "table", "ip", "sneaky"]);
    c.nft("a", &["delete", "table", "inet", "early"]);
    wait_conflicts(&c, &[]);
    c.wait_probe(
        "ours again",
        Host::Pod("client"),
        Proto::Tcp,
        target,
        START,
        |r| r.server() == Some("web-1"),
    );
    // Trace follows our tables only: with `ip post` masquerading pod traffic behind our
    // back, servers would see another source than Trace says. Without it, they agree.
    c.nft("a", &["delete", "table", "ip", "post"]);
    let rs = all_ok(&c, Host::Pod("client"), target, 4);
    c.assert_traces_agree("a", Host::Pod("client"), (Proto::Tcp, target), &rs);
}

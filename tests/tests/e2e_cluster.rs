//! End to end for issue 4: the controller fed by the Kubernetes API (the real `kube` source
//! against the real `kubenft-fake-apiserver` binary), and two controller replicas with the
//! agents failing over from one to the other under traffic.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use kubenft_lab::probe::tally;
use kubenft_lab::topology::{CONTROLLER_GRPC_PORT, CONTROLLER_HTTP_PORT, CP_V4};
use kubenft_lab::{
    Cond, Host, Lab, ProbeOpts, ProbeResult, Process, Proto, Service, Slice, wait_until,
};
use serde_json::Value;

/// Where the fake API server listens (in `cp`, next to the controller, as on a control-plane
/// node).
const API_PORT: u16 = 6443;
/// The second controller replica's ports (also in `cp`).
const R2_GRPC_PORT: u16 = 9660;
const R2_HTTP_PORT: u16 = 9661;

/// The lab's default controller arguments with `--source` replaced by `source` and the
/// listeners moved to `grpc`/`http` on [`CP_V4`], then `extra`.
fn controller_argv(lab: &Lab, source: &str, grpc: u16, http: u16, extra: &[&str]) -> Vec<String> {
    let mut args = lab.controller_default_args();
    let mut set = |flag: &str, value: String| {
        let i = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("the lab's controller arguments have no {flag}: {args:?}"));
        args[i + 1] = value;
    };
    set("--source", source.to_string());
    set("--grpc-listen", format!("{CP_V4}:{grpc}"));
    set("--http-listen", format!("{CP_V4}:{http}"));
    let bin = lab
        .binary("kubenft-controller")
        .unwrap_or_else(|e| panic!("{e}"));
    let mut argv = vec![bin.display().to_string()];
    argv.extend(args);
    argv.extend(extra.iter().map(|s| s.to_string()));
    argv
}

/// Starts a controller in `cp` under the log name `name`.
fn spawn_controller_as(lab: &Lab, name: &str, argv: &[String]) -> Process {
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    lab.spawn(name, Host::ControlPlane, &argv)
        .unwrap_or_else(|e| panic!("starting {name}: {e}"))
}

/// The HTTP status of `GET http://CP:port/path` from `cp` (`None` if nothing answers).
fn http_status(lab: &Lab, port: u16, path: &str) -> Option<u16> {
    let url = format!("http://{CP_V4}:{port}{path}");
    let out = lab
        .exec(
            Host::ControlPlane,
            &[
                "curl",
                "-s",
                "-m",
                "1",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &url,
            ],
        )
        .unwrap_or_else(|e| panic!("curl {url}: {e}"));
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .ok()
        .filter(|code| *code != 0)
}

/// Waits (≤ `cap`) until `GET path` on the controller's HTTP port answers `want`.
/// `controller` is the process whose logs a failure shows.
fn wait_http(
    lab: &Lab,
    controller: &Process,
    port: u16,
    path: &str,
    want: u16,
    cap: Duration,
) -> Duration {
    let mut last = None;
    wait_until(cap, Duration::from_millis(50), || {
        last = http_status(lab, port, path);
        Ok::<_, String>(last == Some(want))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{path} on :{port} not {want} within {cap:?} ({e}); last {last:?}\n{}",
            controller.log_tail(30)
        )
    })
}

/// ListNodes of the replica whose gRPC port is `port`.
fn list_nodes_at(c: &Cluster, port: u16) -> Result<BTreeMap<String, Value>, String> {
    let addr = format!("{CP_V4}:{port}");
    let (ok, out, err) = c.grpcurl(
        Host::ControlPlane,
        &[&addr, "kubenft.v1.ControllerInspect/ListNodes"],
    );
    if !ok {
        return Err(format!("grpcurl ListNodes on {addr}: {err}"));
    }
    let v: Value = serde_json::from_str(&out).map_err(|e| format!("{out:?}: {e}"))?;
    Ok(v["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|n| (n["name"].as_str().unwrap_or_default().to_string(), n))
        .collect())
}

/// Waits until the replica on `port` has every lab node connected and SYNCED (acked ==
/// desired); returns the acked versions.
fn wait_synced_at(c: &Cluster, port: u16, cap: Duration) -> BTreeMap<String, String> {
    let names: Vec<String> = c.lab.nodes().iter().map(|n| n.name.clone()).collect();
    let mut last = BTreeMap::new();
    wait_until(cap, Duration::from_millis(100), || {
        last = list_nodes_at(c, port)?;
        Ok::<_, String>(names.iter().all(|n| {
            last.get(n).is_some_and(|s| {
                s["connected"] == true
                    && s["state"] == "SYNCED"
                    && s["ackedVersion"] == s["desiredVersion"]
            })
        }))
    })
    .unwrap_or_else(|e| {
        panic!("nodes not connected and SYNCED on :{port} within {cap:?}: {e}; last: {last:#?}")
    });
    last.into_iter()
        .map(|(n, s)| {
            (
                n,
                s["ackedVersion"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// What proves that an agent ran no transaction: its generation and the time of its last
/// commit, per node.
fn transactions(c: &Cluster) -> BTreeMap<String, (String, Value)> {
    c.lab
        .nodes()
        .iter()
        .map(|n| {
            let applied = c
                .agent_call(&n.name, "GetApplied")
                .unwrap_or_else(|e| panic!("{e}"));
            (
                n.name.clone(),
                (c.generation(&n.name), applied["lastAppliedUnixMs"].clone()),
            )
        })
        .collect()
}

/// Waits (≤ `cap`) until `server` answers on `target` (batches of 6 connections, so a new
/// endpoint among several is seen as soon as it is programmed); returns how long it took.
fn wait_server(
    c: &Cluster,
    from: Host<'_>,
    target: std::net::SocketAddr,
    server: &str,
    cap: Duration,
) -> Duration {
    let mut seen = BTreeMap::new();
    wait_until(cap, Duration::from_millis(20), || {
        let rs = c.lab.probe(
            from,
            Proto::Tcp,
            target,
            &ProbeOpts::count(6).timeout(Duration::from_millis(300)),
        )?;
        seen = tally(&rs);
        Ok::<_, kubenft_lab::LabError>(seen.contains_key(server))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{server} did not answer on {target} within {cap:?} ({e}); last tally {seen:?}\n{}",
            c.controller.log_tail(20)
        )
    })
}

/// [`two_node_web`] at `vip_ip`, with its Service and both pods for later changes.
fn web_lab(vip_ip: &str) -> (Lab, Service, [kubenft_lab::Pod; 2]) {
    let lab = two_node_web(vip_ip);
    let backends = [lab.pod("web-1"), lab.pod("web-2")];
    let (svc, _) = web_service("web", vip_ip, &backends);
    (lab, svc, backends)
}

/// The controller runs with `--source kube` against the real fake API server binary (in
/// `cp`, `--watch`ing the lab's manifest directory). It is not ready (and pushes nothing)
/// while the API server is away; once the API server is up, `/readyz` turns 200 and the
/// agents serve a ClusterIP from both pods. A new EndpointSlice written to the watched
/// directory (a watch ADDED event) brings a third pod in within 2 s; an emptied slice
/// (MODIFIED) makes the Service refuse; deleting the Service (DELETED) takes its ClusterIP
/// out of service altogether (dropped as an unallocated Service address).
#[test]
fn controller_reads_the_kubernetes_api_and_agents_serve_traffic() {
    let (lab, svc, backends) = web_lab("10.96.0.70");
    let web3 = pods(&lab, &[("web-3", "b")]).remove(0);
    let slice = Slice::for_service("web").port("http", TCP);

    // The fake API server writes the kubeconfig; stop it again so that the controller first
    // meets an API server that is not there.
    let kubeconfig = lab.dir().join("kubeconfig");
    let api_listen = format!("{CP_V4}:{API_PORT}");
    let api_bin = lab.binary("kubenft-fake-apiserver").unwrap();
    let api = lab
        .spawn(
            "apiserver",
            Host::ControlPlane,
            &[
                api_bin.to_str().unwrap(),
                "--listen",
                &api_listen,
                "--kubeconfig-out",
                kubeconfig.to_str().unwrap(),
                "--manifests",
                lab.manifest_dir().to_str().unwrap(),
                "--watch",
            ],
        )
        .unwrap();
    let url = format!("http://{api_listen}");
    api.wait_for_stdout(&url, START)
        .unwrap_or_else(|e| panic!("fake API server: {e}"));
    let kc = std::fs::read_to_string(&kubeconfig).unwrap();
    assert!(kc.contains(&format!("server: {url}")), "kubeconfig: {kc}");
    api.stop().unwrap();

    let argv = controller_argv(
        &lab,
        "kube",
        CONTROLLER_GRPC_PORT,
        CONTROLLER_HTTP_PORT,
        &["--kubeconfig", kubeconfig.to_str().unwrap()],
    );
    let controller = spawn_controller_as(&lab, "controller", &argv);
    let agents = lab
        .nodes()
        .iter()
        .map(|n| {
            let p = lab.spawn_agent(&n.name, &[]).unwrap();
            (n.name.clone(), p)
        })
        .collect();
    let c = Cluster {
        lab,
        controller,
        agents,
    };
    let target = vip("10.96.0.70:80");

    // No API server: serving HTTP, but not ready, and nothing reaches the agents.
    wait_http(
        &c.lab,
        &c.controller,
        CONTROLLER_HTTP_PORT,
        "/readyz",
        503,
        START,
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        http_status(&c.lab, CONTROLLER_HTTP_PORT, "/readyz"),
        Some(503)
    );
    for n in ["a", "b"] {
        let applied = c.agent_call(n, "GetApplied").unwrap();
        assert!(
            applied["resources"].as_array().is_none_or(Vec::is_empty),
            "agent {n} received rules before the controller had listed anything: {applied}"
        );
    }

    // The API server comes up: ready, synced, and the Service answers from both pods.
    let up = Instant::now();
    api.start().unwrap();
    api.wait_for_stdout(&url, START)
        .unwrap_or_else(|e| panic!("fake API server: {e}"));
    let ready = wait_http(
        &c.lab,
        &c.controller,
        CONTROLLER_HTTP_PORT,
        "/readyz",
        200,
        START,
    );
    eprintln!(
        "/readyz 200 {ready:?} after the API server started ({:?})",
        up.elapsed()
    );
    wait_web_spread(&c, target, START);
    c.wait_synced(START);
    eprintln!("serving {:?} after the API server started", up.elapsed());
    let metrics = c
        .lab
        .exec_ok(
            Host::ControlPlane,
            &[
                "curl",
                "-s",
                "-m",
                "2",
                &format!("http://{CP_V4}:{CONTROLLER_HTTP_PORT}/metrics"),
            ],
        )
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("kubenft_controller_source_events_total")
                && l.contains("EndpointSlice")),
        "no EndpointSlice source events in the controller's metrics:\n{metrics}"
    );

    // A new EndpointSlice for the Service: an ADDED event.
    let extra = Slice::for_service("web")
        .named("web-extra")
        .port("http", TCP)
        .endpoint(&web3, Cond::READY);
    c.write("web-extra.yaml", &[&extra]);
    let took = wait_server(&c, Host::Pod("client"), target, "web-3", CONVERGE);
    eprintln!("new EndpointSlice's pod answers after {took:?}");
    c.wait_all_seen(
        Host::Pod("client"),
        Proto::Tcp,
        target,
        &["web-1", "web-2", "web-3"],
        CONVERGE,
    );
    c.wait_synced(CONVERGE);
    let rs = c.probe(
        Host::Pod("client"),
        Proto::Tcp,
        target,
        &ProbeOpts::count(9),
    );
    c.assert_traces_agree("a", Host::Pod("client"), (Proto::Tcp, target), &rs);

    // Every endpoint gone (MODIFIED slice, DELETED slice): the Service refuses.
    c.write("web.yaml", &[&svc, &slice]);
    c.lab.remove_manifest("web-extra.yaml").unwrap();
    c.wait_probe(
        "Service without endpoints refuses",
        Host::Pod("client"),
        Proto::Tcp,
        target,
        CONVERGE,
        |r| *r == ProbeResult::Refused,
    );
    c.wait_synced(CONVERGE);
    let refused = [ProbeResult::Refused];
    c.assert_traces_agree("a", Host::Pod("client"), (Proto::Tcp, target), &refused);

    // The Service deleted (DELETED): its ClusterIP is no longer allocated and is dropped.
    c.write(
        "web.yaml",
        &[&slice.clone().endpoints(&backends, Cond::READY)],
    );
    c.wait_probe(
        "deleted Service is gone",
        Host::Pod("client"),
        Proto::Tcp,
        target,
        CONVERGE,
        |r| *r == ProbeResult::Timeout,
    );
    let rs = c.probe(
        Host::Pod("client"),
        Proto::Tcp,
        target,
        &ProbeOpts::count(3).timeout(DROP_WAIT),
    );
    assert!(
        rs.iter().all(|r| *r == ProbeResult::Timeout),
        "the deleted Service still answers (or is refused): {rs:?}"
    );
    c.wait_synced(CONVERGE);
    c.assert_traces_agree("a", Host::Pod("client"), (Proto::Tcp, target), &rs);
    // And the controller no longer knows it.
    let view = c.controller_call(
        "GetService",
        Some(r#"{"node":"a","namespace":"default","name":"web"}"#),
    );
    assert!(
        view.as_ref().is_err_and(|e| e.contains("NotFound")),
        "the controller still knows the deleted Service: {view:?}"
    );
    assert_eq!(
        http_status(&c.lab, CONTROLLER_HTTP_PORT, "/readyz"),
        Some(200)
    );
}

/// Two controller replicas (both `--source dir:` of the same manifests, in `cp` on different
/// ports); the agents list both, replica 1 first. While a pod opens new TCP connections to a
/// ClusterIP every 50 ms, replica 1 is SIGKILLed: no connection fails, both agents come up on
/// replica 2 SYNCED with the very versions they had acked on replica 1, and neither agent
/// runs a transaction (same nft generation, same last-commit time). A change made after the
/// failover is served within 2 s through replica 2.
#[test]
fn controller_failover_under_traffic_loses_nothing() {
    let (lab, svc, backends) = web_lab("10.96.0.80");
    let slice = Slice::for_service("web").port("http", TCP);
    let source = format!("dir:{}", lab.manifest_dir().display());
    let r1 = spawn_controller_as(
        &lab,
        "controller",
        &controller_argv(
            &lab,
            &source,
            CONTROLLER_GRPC_PORT,
            CONTROLLER_HTTP_PORT,
            &[],
        ),
    );
    let r2 = spawn_controller_as(
        &lab,
        "controller-2",
        &controller_argv(&lab, &source, R2_GRPC_PORT, R2_HTTP_PORT, &[]),
    );
    // Both replicas serve before the agents start, so that the agents pick replica 1.
    wait_http(&lab, &r1, CONTROLLER_HTTP_PORT, "/readyz", 200, START);
    wait_http(&lab, &r2, R2_HTTP_PORT, "/readyz", 200, START);
    let r2_url = format!("https://{CP_V4}:{R2_GRPC_PORT}");
    let agents = lab
        .nodes()
        .iter()
        .map(|n| {
            let p = lab
                .spawn_agent(&n.name, &["--controller", &r2_url])
                .unwrap();
            (n.name.clone(), p)
        })
        .collect();
    let c = Cluster {
        lab,
        controller: r1.clone(),
        agents,
    };
    let target = vip("10.96.0.80:80");
    wait_web_spread(&c, target, START);
    let acked = wait_synced_at(&c, CONTROLLER_GRPC_PORT, START);
    // Replica 2 computes the same versions on its own, with no agent connected.
    let standby = list_nodes_at(&c, R2_GRPC_PORT).unwrap();
    for (node, version) in &acked {
        let s = &standby[node];
        assert_ne!(
            s["connected"], true,
            "agent {node} is on replica 2 already: {s}"
        );
        assert_eq!(
            s["desiredVersion"].as_str(),
            Some(version.as_str()),
            "replica 2 wants another version for node {node} than replica 1 has acked: {s}"
        );
    }
    let before = transactions(&c);

    let stop = AtomicBool::new(false);
    let (results, failover) = std::thread::scope(|s| {
        let traffic = s.spawn(|| {
            let mut all = Vec::new();
            let start = Instant::now();
            // Bounded: at most 400 rounds of one new connection every 50 ms (20 s).
            for i in 0..400u32 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match c.lab.probe(
                    Host::Pod("client"),
                    Proto::Tcp,
                    target,
                    &ProbeOpts::count(1),
                ) {
                    Ok(rs) => all.extend(rs),
                    Err(e) => all.push(ProbeResult::Other(format!("probe harness: {e}"))),
                }
                let next = Duration::from_millis(50) * (i + 1);
                std::thread::sleep(next.saturating_sub(start.elapsed()));
            }
            all
        });
        std::thread::sleep(Duration::from_millis(1000));
        r1.kill().unwrap();
        let killed = Instant::now();
        eprintln!("replica 1 killed");
        let after = wait_synced_at(&c, R2_GRPC_PORT, START);
        let failover = killed.elapsed();
        std::thread::sleep(Duration::from_millis(1000));
        stop.store(true, Ordering::Relaxed);
        let all = traffic.join().unwrap();
        assert_eq!(
            after, acked,
            "the acked versions changed across the failover"
        );
        (all, failover)
    });
    let t = tally(&results);
    eprintln!(
        "failover to replica 2 in {failover:?}; {} connections meanwhile: {t:?}",
        results.len()
    );
    assert_all_ok(&results, "new connections while the controller failed over");
    assert!(
        results.len() >= 30,
        "too little traffic to prove anything: {t:?}"
    );
    assert!(
        t.contains_key("web-1") && t.contains_key("web-2"),
        "traffic did not spread over both pods: {t:?}"
    );
    // What the agent applied, adopted by replica 2, is what the traffic saw.
    c.assert_trace_agrees("a", Host::Pod("client"), (Proto::Tcp, target), &results);
    assert_eq!(
        transactions(&c),
        before,
        "an agent ran a transaction on failover (re-applied what it already had)"
    );

    // Replica 2 serves changes: a new pod, in through the second replica.
    let web3 = pods(&c.lab, &[("web-3", "b")]).remove(0);
    c.write(
        "web.yaml",
        &[
            &svc,
            &slice
                .clone()
                .endpoints(backends.iter().chain([&web3]), Cond::READY),
        ],
    );
    let took = wait_server(&c, Host::Pod("client"), target, "web-3", CONVERGE);
    eprintln!("change after the failover served in {took:?}");
    let now = wait_synced_at(&c, R2_GRPC_PORT, START);
    let rs = c.probe(
        Host::Pod("client"),
        Proto::Tcp,
        target,
        &ProbeOpts::count(9),
    );
    c.assert_trace_agrees("a", Host::Pod("client"), (Proto::Tcp, target), &rs);
    assert_ne!(now, acked, "the change did not produce new versions");
    assert_ne!(
        transactions(&c),
        before,
        "the change after the failover was served without a transaction?"
    );
    assert!(r2.is_running(), "replica 2 exited:\n{}", r2.log_tail(20));
}

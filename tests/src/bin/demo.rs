//! The README's demo: a 2-node namespace cluster with the real controller and agents, the
//! Service tutorial's example, real traffic, and what an operator sees through grpcurl.
//! Everything it creates is removed when it ends, also on failure.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use kubenft_lab::manifest::{ToJson, list};
use kubenft_lab::{
    Cond, EchoPorts, Host, Lab, LabConfig, ProbeOpts, ProbeResult, Proto, Service, ServiceType,
    Slice, TrafficPolicy, wait_until,
};

const CLUSTER_IP: &str = "10.96.0.100";

fn main() -> anyhow::Result<()> {
    println!("== kubenft demo: building a 2-node lab (network namespaces)");
    let lab = Lab::new(LabConfig {
        nodes: vec!["a".into(), "b".into()],
        ..Default::default()
    })
    .context("building the lab (run as root)")?;
    for n in lab.nodes() {
        println!(
            "   node {:<2} {:<15} pods {}",
            n.name,
            n.ipv4.to_string(),
            n.pod_cidr_v4
        );
    }

    let backends: Vec<_> = [("backend-1", "a"), ("backend-2", "b"), ("backend-3", "b")]
        .iter()
        .map(|(name, node)| lab.add_pod(name, node, &EchoPorts::tcp(&[8080])))
        .collect::<Result<_, _>>()?;
    lab.add_pod("client", "a", &EchoPorts::tcp(&[9]))?;
    for p in lab.pods() {
        println!("   pod  {:<10} on {}  {}", p.name, p.node, p.ipv4);
    }

    let backend_service =
        Service::cluster_ip("backend-service", CLUSTER_IP).port("http", 80, 8080u16, Proto::Tcp);
    let web_nodeport = Service::cluster_ip("web-nodeport", "10.96.0.101")
        .service_type(ServiceType::NodePort)
        .port("http", 80, 8080u16, Proto::Tcp)
        .node_port(30080);
    let web_local = Service::cluster_ip("web-local", "10.96.0.102")
        .service_type(ServiceType::NodePort)
        .port("http", 80, 8080u16, Proto::Tcp)
        .node_port(30081)
        .external_traffic_policy(TrafficPolicy::Local);
    let slice = |svc: &str| {
        Slice::for_service(svc)
            .port("http", 8080)
            .endpoints(&backends, Cond::READY)
    };
    let (s1, s2, s3) = (
        slice("backend-service"),
        slice("web-nodeport"),
        slice("web-local"),
    );
    lab.write_manifest(
        "services.yaml",
        &list(&[
            &backend_service as &dyn ToJson,
            &web_nodeport,
            &web_local,
            &s1,
            &s2,
            &s3,
        ]),
    )?;
    println!(
        "== manifests: backend-service (ClusterIP {CLUSTER_IP}:80 -> 8080), web-nodeport (NodePort 30080), web-local (NodePort 30081, externalTrafficPolicy Local)"
    );

    let controller = lab.spawn_controller(&[])?;
    for n in ["a", "b"] {
        lab.spawn_agent(n, &[])?;
    }
    let vip: SocketAddr = format!("{CLUSTER_IP}:80").parse()?;
    let took = wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        lab.probe_once(Host::Pod("client"), Proto::Tcp, vip)
            .map(|r| r.is_ok())
    });
    match took {
        Ok(t) => println!("== controller and agents up; the ClusterIP answered after {t:.1?}"),
        Err(e) => bail!(
            "the ClusterIP never answered: {e}\n{}",
            controller.log_tail(30)
        ),
    }

    section(
        &lab,
        "pod client -> ClusterIP backend-service",
        Host::Pod("client"),
        vip,
        12,
    )?;
    let (a, b) = (lab.node("a").ipv4, lab.node("b").ipv4);
    section(
        &lab,
        "external client -> node a:30080 (Cluster: source masqueraded)",
        Host::External,
        SocketAddr::new(a.into(), 30080),
        6,
    )?;
    section(
        &lab,
        "external client -> node b:30080",
        Host::External,
        SocketAddr::new(b.into(), 30080),
        6,
    )?;
    section(
        &lab,
        "external client -> node a:30081 (Local: node a's pod, source kept)",
        Host::External,
        SocketAddr::new(a.into(), 30081),
        4,
    )?;
    section(
        &lab,
        "external client -> node b:30081 (Local: node b's pods, source kept)",
        Host::External,
        SocketAddr::new(b.into(), 30081),
        4,
    )?;

    println!(
        "\n== the controller and agents run with mutual TLS; certificates in {}",
        lab.tls().pki.dir().display()
    );
    println!(
        "== grpcurl -cacert ca.crt -cert operator.crt -key operator.key 192.168.50.2:9650 kubenft.v1.ControllerInspect/ListNodes"
    );
    grpcurl(
        &lab,
        &[
            "192.168.50.2:9650",
            "kubenft.v1.ControllerInspect/ListNodes",
        ],
    )?;
    println!(
        "\n== grpcurl ... kubenft.v1.ControllerInspect/GetService  (web-local, as node a sees it)"
    );
    grpcurl(
        &lab,
        &[
            "-d",
            r#"{"node":"a","namespace":"default","name":"web-local"}"#,
            "192.168.50.2:9650",
            "kubenft.v1.ControllerInspect/GetService",
        ],
    )?;
    let ext = kubenft_lab::topology::EXT_V4.to_string();
    println!(
        "\n== grpcurl ... kubenft.v1.ControllerInspect/Trace  (external client -> node b:30081, Local)"
    );
    grpcurl(
        &lab,
        &[
            "-d",
            &format!(
                r#"{{"node":"b","source":"{ext}","destination":"{b}","port":30081,"protocol":"TCP"}}"#
            ),
            "192.168.50.2:9650",
            "kubenft.v1.ControllerInspect/Trace",
        ],
    )?;

    println!("\n== the same through kubectl (the kubectl-kubenft plugin, on PATH)");
    let controller_addr = "192.168.50.2:9650";
    kubectl_kubenft(&lab, &["status", "--controller", controller_addr])?;
    kubectl_kubenft(
        &lab,
        &[
            "trace",
            "--controller",
            controller_addr,
            "--node",
            "a",
            "--source",
            &ext,
            "--destination",
            &a.to_string(),
            "--port",
            "30080",
        ],
    )?;
    let backend_1 = backends[0].ipv4.to_string();
    kubectl_kubenft(
        &lab,
        &["drain-status", &backend_1, "--controller", controller_addr],
    )?;
    println!("\n== done; removing the lab");
    Ok(())
}

/// `kubectl kubenft ARGS` in the control plane, with the operator's certificate; prints the
/// command and what it printed (a non-zero exit is shown, not an error: `drain-status` of a
/// live endpoint says "not drained" with exit 1).
fn kubectl_kubenft(lab: &Lab, args: &[&str]) -> anyhow::Result<()> {
    let plugin = kubenft_lab::process::find_binary("kubectl-kubenft")?;
    let dir = plugin
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let path = format!("PATH={dir}:{}", std::env::var("PATH").unwrap_or_default());
    let tls = lab.tls();
    let (ca, cert, key) = (
        tls.pki.ca().display().to_string(),
        tls.operator.cert.display().to_string(),
        tls.operator.key.display().to_string(),
    );
    println!(
        "\n$ kubectl kubenft {} --cacert ca.crt --cert operator.crt --key operator.key",
        args.join(" ")
    );
    let mut argv = vec!["env", path.as_str(), "kubectl", "kubenft"];
    argv.extend_from_slice(args);
    argv.extend(["--cacert", &ca, "--cert", &cert, "--key", &key]);
    let out = lab.exec(Host::ControlPlane, &argv)?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if let Some(code) = out.status.code().filter(|c| *c != 0) {
        println!("(exit {code})");
    }
    Ok(())
}

/// Sends `count` connections and prints who answered and what source address it saw.
fn section(
    lab: &Lab,
    title: &str,
    from: Host<'_>,
    target: SocketAddr,
    count: u32,
) -> anyhow::Result<()> {
    println!("\n-- {title}");
    let results = lab.probe(from, Proto::Tcp, target, &ProbeOpts::count(count))?;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for r in &results {
        let line = match r {
            ProbeResult::Ok { server, client, .. } => {
                format!("answered by {server:<10} saw source {}", client.ip())
            }
            other => format!("failed: {}", other.label()),
        };
        *seen.entry(line).or_default() += 1;
    }
    for (line, n) in seen {
        println!("   {n:>3} x {line}");
    }
    Ok(())
}

fn grpcurl(lab: &Lab, args: &[&str]) -> anyhow::Result<()> {
    let tls = lab.tls().grpcurl_args();
    let mut argv = vec!["grpcurl"];
    argv.extend(tls.iter().map(String::as_str));
    argv.extend_from_slice(args);
    let out = lab.exec(Host::ControlPlane, &argv)?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!("grpcurl failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

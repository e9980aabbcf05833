//! Network programming latency in the lab: from a manifest change to traffic reaching the new
//! pod, through the real controller and agents. Prints a table; asserts nothing.
//!
//! Each round adds a fresh pod, rewrites the Service's EndpointSlice so that the new pod is its
//! only endpoint, and probes the ClusterIP from a client pod until the new pod answers. The
//! figure includes the controller's directory poll (100 ms), planning, the gRPC push, the nft
//! transaction and the probe's own process start (a few ms per probe).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use kubenft_lab::manifest::{ToJson, list};
use kubenft_lab::{
    Cond, EchoPorts, Host, Lab, LabConfig, ProbeOpts, Proto, Service, Slice, wait_until,
};

#[derive(Parser)]
#[command(name = "kubenft-bench-programming")]
struct Args {
    /// How many changes to time.
    #[arg(long, default_value_t = 20)]
    changes: u32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let lab = Lab::new(LabConfig {
        nodes: vec!["a".into(), "b".into()],
        ..Default::default()
    })
    .context("building the lab (run as root)")?;
    lab.add_pod("client", "a", &EchoPorts::tcp(&[9]))?;
    let first = lab.add_pod("web-0", "b", &EchoPorts::tcp(&[8080]))?;
    let svc = Service::cluster_ip("web", "10.96.0.10").port("http", 80, 8080u16, Proto::Tcp);
    let slice = |pod: &kubenft_lab::Pod| {
        Slice::for_service("web")
            .port("http", 8080)
            .endpoint(pod, Cond::READY)
    };
    lab.write_manifest("web.yaml", &list(&[&svc as &dyn ToJson, &slice(&first)]))?;
    let controller = lab.spawn_controller(&[])?;
    for n in ["a", "b"] {
        lab.spawn_agent(n, &[])?;
    }
    let vip: SocketAddr = "10.96.0.10:80".parse()?;
    wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        lab.probe_once(Host::Pod("client"), Proto::Tcp, vip)
            .map(|r| r.is_ok())
    })
    .with_context(|| format!("the ClusterIP never answered\n{}", controller.log_tail(20)))?;

    let opts = ProbeOpts::count(1).timeout(Duration::from_millis(300));
    let mut samples = Vec::new();
    for i in 1..=args.changes {
        let name = format!("web-{i}");
        let pod = lab.add_pod(
            &name,
            if i % 2 == 0 { "a" } else { "b" },
            &EchoPorts::tcp(&[8080]),
        )?;
        let started = Instant::now();
        lab.write_manifest("web.yaml", &list(&[&svc as &dyn ToJson, &slice(&pod)]))?;
        let mut reached = None;
        while started.elapsed() < Duration::from_secs(10) {
            let r = lab.probe(Host::Pod("client"), Proto::Tcp, vip, &opts)?;
            if r.first().and_then(|r| r.server()) == Some(name.as_str()) {
                reached = Some(started.elapsed());
                break;
            }
        }
        let Some(took) = reached else {
            bail!("change {i}: {name} never answered within 10 s");
        };
        samples.push(took);
        if i > 1 {
            lab.remove_pod(&format!("web-{}", i - 1))?;
        }
    }
    print_table(&mut samples);
    Ok(())
}

fn print_table(samples: &mut [Duration]) {
    samples.sort();
    let pct = |p: f64| {
        let idx = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[idx].as_secs_f64() * 1000.0
    };
    println!("network programming latency: manifest change -> new pod answers (lab, 2 nodes)");
    println!("| changes | min ms | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
        samples.len(),
        samples[0].as_secs_f64() * 1000.0,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        samples[samples.len() - 1].as_secs_f64() * 1000.0
    );
}

//! Suite 2: time to establish a new TCP connection through a ClusterIP with N Services
//! programmed, kubenft's maps versus a linear per-Service rule list (the iptables-mode shape).
//!
//! ```text
//!  client ns ──veth── node ns (the rules; forwarding) ──veth── server ns (echo on :8080,
//!  10.200.1.2         10.200.1.1 | 10.200.2.1                   10.200.2.10-19 = 10 endpoints)
//! ```
//!
//! The Service under test is the last one programmed (for the linear list: the last rule); the
//! others point at fake endpoints. The client (this binary's hidden `client` subcommand, run in
//! the client namespace) opens connections one after another and reports, per connection, the
//! `connect()` time (SYN to SYN-ACK through DNAT: the first packet's rule traversal) and the
//! time to the server's first byte. A fresh topology for every run, so no conntrack entry
//! carries over.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use kubenft_agent::state::AppliedState;

use crate::agent_apply::{self, NODE_IP, NODES};
use crate::netns::{self, Netns};
use crate::nftrun;
use crate::report::{Table, percentile, us};
use crate::workload::{self, Endpoint, SERVICE_PORT, Service, TARGET_PORT, Workload};

#[derive(Clone, Debug)]
pub struct Options {
    pub sizes: Vec<u32>,
    pub connections: usize,
    pub warmup: usize,
}

/// The three namespaces and the echo server; everything is removed on drop.
struct Topology {
    client: Netns,
    node: Netns,
    _server: Netns,
    echo: Child,
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = self.echo.kill();
        let _ = self.echo.wait();
    }
}

fn server_ips() -> Vec<std::net::Ipv4Addr> {
    (10..20)
        .map(|i| std::net::Ipv4Addr::new(10, 200, 2, i))
        .collect()
}

fn topology() -> anyhow::Result<Topology> {
    let client = Netns::create("c")?;
    let node = Netns::create("n")?;
    let server = Netns::create("s")?;
    netns::link(&client, "10.200.1.2/24", &node, &format!("{NODE_IP}/24"))?;
    let (_, server_if) = netns::link(&node, "10.200.2.1/24", &server, "10.200.2.2/24")?;
    client.ip(&["route", "add", "default", "via", NODE_IP])?;
    server.ip(&["route", "add", "default", "via", "10.200.2.1"])?;
    for ip in server_ips() {
        server.ip(&["addr", "add", &format!("{ip}/24"), "dev", &server_if])?;
    }
    node.sysctl("net.ipv4.ip_forward=1")?;
    let echo = server
        .command(&std::env::current_exe()?.to_string_lossy())
        .args(["echo", "--listen", &format!("0.0.0.0:{TARGET_PORT}")])
        .stdin(Stdio::piped())
        .spawn()?;
    Ok(Topology {
        client,
        node,
        _server: server,
        echo,
    })
}

/// The Service under test: index `n - 1`, its 10 endpoints on the echo server.
fn under_test(w: &Workload) -> Service {
    let mut svc = w.service(w.services - 1);
    svc.endpoints = server_ips()
        .into_iter()
        .map(|ip| Endpoint {
            ip,
            port: TARGET_PORT,
            node: 1,
        })
        .collect();
    svc
}

fn services(w: &Workload) -> impl Iterator<Item = Service> + '_ {
    let last = under_test(w);
    (0..w.services - 1)
        .map(|i| w.service(i))
        .chain(std::iter::once(last))
}

/// Programs kubenft's rules for `w` in the node namespace.
async fn program_kubenft(node: &Netns, w: &Workload) -> anyhow::Result<()> {
    let mut state = AppliedState::unknown(0);
    let change = workload::full_change(services(w), 0, NODE_IP);
    agent_apply::apply_change(node, &mut state, &change, Duration::from_secs(900), false).await?;
    Ok(())
}

/// A linear list: one `ip daddr . tcp dport` rule per Service, the one under test last.
fn linear_text(w: &Workload) -> String {
    let t = "ip knb-linear";
    let mut out = format!(
        "add table {t}\nadd chain {t} pre {{ type nat hook prerouting priority -100 ; }}\nadd chain {t} post {{ type nat hook postrouting priority 100 ; }}\nadd rule {t} post ct status dnat masquerade\n"
    );
    for svc in services(w) {
        let target = if svc.index == w.services - 1 {
            let map: Vec<String> = svc
                .endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| format!("{i} : {}", e.ip))
                .collect();
            format!(
                "numgen random mod {} map {{ {} }} : {TARGET_PORT}",
                map.len(),
                map.join(", ")
            )
        } else {
            format!("{}:{}", svc.endpoints[0].ip, svc.endpoints[0].port)
        };
        let _ = writeln!(
            out,
            "add rule {t} pre ip daddr {} tcp dport {SERVICE_PORT} dnat to {target}",
            svc.cluster_ip
        );
    }
    out
}

/// Raw latencies of one cell, in microseconds.
#[derive(Debug, Default)]
struct Samples {
    connect: Vec<f64>,
    first_byte: Vec<f64>,
    failures: usize,
}

impl Samples {
    fn sort(&mut self) {
        self.connect.sort_by(f64::total_cmp);
        self.first_byte.sort_by(f64::total_cmp);
    }
}

/// Runs the client in the client namespace and adds what it reports to `into`.
fn measure(
    topo: &Topology,
    target: SocketAddr,
    count: usize,
    warmup: usize,
    into: &mut Samples,
) -> anyhow::Result<()> {
    let out = topo
        .client
        .command(&std::env::current_exe()?.to_string_lossy())
        .args(["client", "--target", &target.to_string()])
        .args(["--count", &count.to_string()])
        .args(["--warmup", &warmup.to_string()])
        .output()?;
    if !out.status.success() {
        anyhow::bail!("client failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut it = line.split_whitespace().map(str::parse::<f64>);
        match (it.next(), it.next()) {
            (Some(Ok(c)), Some(Ok(f))) => {
                into.connect.push(c / 1e3);
                into.first_byte.push(f / 1e3);
            }
            _ => into.failures += 1,
        }
    }
    Ok(())
}

/// One cell: a topology with one shape at one size programmed.
struct Cell {
    services: u32,
    linear: bool,
    topo: Topology,
    samples: Samples,
}

async fn prepare(n: u32, linear: bool) -> anyhow::Result<Cell> {
    let w = Workload::new(n, NODES);
    let topo = topology()?;
    if linear {
        nftrun::run_ok(&topo.node, &linear_text(&w), Duration::from_secs(900)).await?;
    } else {
        program_kubenft(&topo.node, &w).await?;
    }
    Ok(Cell {
        services: n,
        linear,
        topo,
        samples: Samples::default(),
    })
}

/// Measurement rounds: every cell gets its share of connections in each round, so drifting
/// load on the machine spreads over all cells instead of biasing one.
const ROUNDS: usize = 4;

/// Runs suite 2 and returns its table.
pub async fn run(opts: &Options) -> anyhow::Result<Vec<Table>> {
    let mut cells = Vec::new();
    for &n in &opts.sizes {
        for linear in [false, true] {
            cells.push(prepare(n, linear).await?);
        }
    }
    let per_round = opts.connections.div_ceil(ROUNDS);
    for round in 0..ROUNDS {
        let len = cells.len();
        for i in 0..len {
            let cell = &mut cells[(i + round) % len];
            let target =
                SocketAddr::new(workload::cluster_ip(cell.services - 1).into(), SERVICE_PORT);
            measure(
                &cell.topo,
                target,
                per_round,
                opts.warmup,
                &mut cell.samples,
            )?;
        }
    }
    for cell in &mut cells {
        cell.samples.sort();
    }
    Ok(vec![table(opts, &cells, per_round * ROUNDS)])
}

fn cell(cells: &[Cell], n: u32, linear: bool) -> Option<&Samples> {
    cells
        .iter()
        .find(|c| c.services == n && c.linear == linear)
        .map(|c| &c.samples)
}

fn p(s: &[f64], q: f64) -> String {
    us(percentile(s, q))
}

fn table(opts: &Options, cells: &[Cell], connections: usize) -> Table {
    let mut table = Table::new(
        "Suite 2 — data plane: new TCP connection through a ClusterIP",
        &[
            "Services programmed",
            "kubenft connect p50",
            "kubenft connect p99",
            "linear list connect p50",
            "linear list connect p99",
            "kubenft first byte p50 / p99",
            "linear first byte p50 / p99",
            "failed connections (kubenft / linear)",
        ],
    );
    for &n in &opts.sizes {
        let (Some(a), Some(b)) = (cell(cells, n, false), cell(cells, n, true)) else {
            continue;
        };
        table.row(vec![
            n.to_string(),
            p(&a.connect, 50.0),
            p(&a.connect, 99.0),
            p(&b.connect, 50.0),
            p(&b.connect, 99.0),
            format!("{} / {}", p(&a.first_byte, 50.0), p(&a.first_byte, 99.0)),
            format!("{} / {}", p(&b.first_byte, 50.0), p(&b.first_byte, 99.0)),
            format!("{} / {}", a.failures, b.failures),
        ]);
    }
    table.note(format!(
        "{connections} new TCP connections per cell, sequential, measured in {ROUNDS} interleaved rounds over all cells (each round after {} warm-up connections); each goes from the client namespace through the node namespace (DNAT + masquerade) to one of 10 endpoints. `connect()` is SYN → SYN-ACK, the first packet's trip through the rules; first byte adds the echo server's one-byte reply.",
        opts.warmup
    ));
    table.note("Linear list: one `ip daddr X tcp dport 80 dnat to …` rule per Service in one NAT chain, the Service under test last (the iptables-mode shape: a linear scan).");
    let sizes = (opts.sizes.first(), opts.sizes.last());
    if let (Some(&lo_n), Some(&hi_n)) = sizes
        && lo_n != hi_n
        && let (Some(lo), Some(hi)) = (cell(cells, lo_n, false), cell(cells, hi_n, false))
    {
        let delta = (percentile(&hi.connect, 50.0) / percentile(&lo.connect, 50.0) - 1.0) * 100.0;
        table.note(format!(
            "kubenft connect p50 at {hi_n} vs {lo_n} Services: {delta:+.1}% (target: within 10%: {}).",
            if delta.abs() <= 10.0 { "met" } else { "missed" }
        ));
    }
    table
}

/// The `client` subcommand: `count` measured connections after `warmup` ones; prints
/// `<connect ns> <first byte ns>` per measured connection, `fail <error>` for failures.
pub fn client(target: SocketAddr, count: usize, warmup: usize) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for i in 0..warmup + count {
        let line = match connect_once(target) {
            Ok((c, f)) => format!("{} {}", c.as_nanos(), f.as_nanos()),
            Err(e) => format!("fail {e}"),
        };
        if i >= warmup {
            writeln!(out, "{line}")?;
        }
    }
    out.flush()?;
    Ok(())
}

fn connect_once(target: SocketAddr) -> std::io::Result<(Duration, Duration)> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
    let connected = started.elapsed();
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte)?;
    Ok((connected, started.elapsed()))
}

/// The `echo` subcommand: accept, write one byte, close; exits when stdin closes (the bench
/// went away) or after a bounded number of connections.
pub fn echo(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)?;
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        std::process::exit(0);
    });
    for mut stream in listener.incoming().take(10_000_000).flatten() {
        let _ = stream.write_all(b"x");
    }
    Ok(())
}

//! `kubenft-bench`: issue 5's benchmarks. Each suite prints markdown tables to stdout; the run
//! writes them, headed by the machine's details, to `BENCHMARKS.md` (`--out`).
//!
//! ```text
//!  1  agent apply      agent library → nft in a namespace; kube-proxy's shape as baseline;
//!                      the real agent binary's RSS against a fake controller
//!  2  data plane       client ns → node ns (rules) → server ns; kubenft vs a linear rule list
//!  3  fan-out          the real controller binary, K simulated agents over real gRPC streams
//!  4  reconnect storm  1,000 current agents reconnect after a controller restart
//!                      (3 and 4: in plaintext and with mutual TLS, side by side; `--tls`)
//!  5  programming      in the lab (kubenft-lab), the real controller and agents: an
//!                      EndpointSlice change → the new pod answers a client's probe
//!  6  self-healing     agent library + nft monitor + drift loop in a namespace: cost of
//!                      the structure check and the element verification, idle CPU with
//!                      drift detection on, injection → repair per fault kind
//!  8  programming      suite 5 with 100 and 10,000 other Services in the cluster, through
//!     at scale         the `dir:` source and a fake API server's watch
//!  9  endurance        in the lab, 30 minutes of endpoint churn against the real controller,
//!                      2 real agents and simulated ones: memory, nft objects, conntrack
//!                      entries, descriptors and child processes must not leak (not in the
//!                      default set: `--suite 9`, `--endurance-secs`)
//! ```
//!
//! Needs root (network namespaces). Every namespace is named `knb-<pid>-…` (suite 5's lab:
//! `kn<pid>x<n>-…`) and deleted on exit, also on SIGINT/SIGTERM. Hidden subcommands run inside
//! namespaces: `client`, `echo`, `fake-controller`; started as `kubenft-echo` (a symlink suite 5
//! makes), the binary is the lab's echo server and prober.
#![forbid(unsafe_code)]

mod agent_apply;
mod agent_rss;
mod dataplane;
mod endurance;
mod fanout;
mod healing;
mod kubeproxy;
mod netns;
mod nftrun;
mod programming;
mod programming_scale;
mod report;
mod workload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::report::Table;

#[derive(Debug, Parser)]
#[command(
    name = "kubenft-bench",
    about = "kubenft benchmarks (issue 5)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Hidden>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Suites to run (1 apply, 2 data plane, 3 fan-out, 4 reconnect storm, 5 programming
    /// latency in the lab, 6 self-healing, 8 programming latency at scale, 9 endurance: 30
    /// minutes, so never by default).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5,6,8")]
    suite: Vec<u32>,
    /// Service counts for suite 1.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,30000")]
    sizes: Vec<u32>,
    /// Service counts for suite 6.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,30000")]
    heal_sizes: Vec<u32>,
    /// Injections per fault kind and size in suite 6.
    #[arg(long, default_value_t = 20)]
    heal_injections: usize,
    /// Suite 6's idle window (agent CPU with drift detection on), seconds.
    #[arg(long, default_value_t = 50)]
    heal_idle_secs: u64,
    /// Suite 6 stops injecting one fault kind at one size after this many seconds.
    #[arg(long, default_value_t = 120)]
    heal_kind_cap_secs: u64,
    /// Service counts for suite 2.
    #[arg(long, value_delimiter = ',', default_value = "10,10000,30000")]
    dataplane_sizes: Vec<u32>,
    /// Simulated agent counts for suite 3.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    agents: Vec<u32>,
    /// Services for suites 3 and 4 (10 endpoints each).
    #[arg(long, default_value_t = 10_000)]
    fanout_services: u32,
    /// EndpointSlice changes per agent count in suite 3.
    #[arg(long, default_value_t = 100)]
    fanout_changes: usize,
    /// Agents in suite 4.
    #[arg(long, default_value_t = 1000)]
    storm_agents: u32,
    /// Transports of suites 3 and 4: `both` (plaintext and mutual TLS, side by side in the
    /// same run), `on` (TLS only) or `off` (plaintext only).
    #[arg(long, value_enum, default_value = "both")]
    tls: fanout::TlsMode,
    /// EndpointSlice changes timed in suite 5.
    #[arg(long, default_value_t = 100)]
    programming_changes: usize,
    /// Pause between suite 5's probe attempts, milliseconds (0: back to back).
    #[arg(long, default_value_t = 1)]
    programming_interval_ms: u64,
    /// Background Service counts for suite 8 (suite 5's measurement at each size).
    #[arg(long, value_delimiter = ',', default_value = "100,10000")]
    scale_sizes: Vec<u32>,
    /// EndpointSlice changes timed per size and source in suite 8.
    #[arg(long, default_value_t = 40)]
    scale_changes: usize,
    /// Suite 9's churn duration, seconds (a short run, e.g. 120, is a smoke test).
    #[arg(long, default_value_t = 1800)]
    endurance_secs: u64,
    /// Suite 9's EndpointSlice changes per second.
    #[arg(long, default_value_t = 20.0)]
    endurance_rate: f64,
    /// Suite 9's Services.
    #[arg(long, default_value_t = 1000)]
    endurance_services: u32,
    /// Suite 9's nodes: the lab's 2 real ones and simulated agents for the rest.
    #[arg(long, default_value_t = 50)]
    endurance_nodes: u32,
    /// Pause between suite 9's traffic probe attempts, milliseconds.
    #[arg(long, default_value_t = 250)]
    endurance_probe_interval_ms: u64,
    /// New connections measured per cell in suite 2.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// One-endpoint changes per size in suite 1 (the median is reported).
    #[arg(long, default_value_t = 5)]
    changes: usize,
    /// Cap on one baseline full load, seconds.
    #[arg(long, default_value_t = 300)]
    baseline_cap_secs: u64,
    /// Baseline full loads are not attempted above this many Services.
    #[arg(long, default_value_t = 10_000)]
    baseline_max: u32,
    /// The agent binary (suite 1's memory figure, suite 5) [default: next to this binary].
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// The controller binary (suites 3, 4 and 5) [default: next to this binary].
    #[arg(long)]
    controller_bin: Option<PathBuf>,
    /// Where to write the report (nothing is written if empty).
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Where each suite's latest tables are kept (the report includes every suite found there).
    #[arg(long, default_value = "target/kubenft-bench")]
    sections: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Hidden {
    /// Opens connections and prints their latencies (runs in the client namespace).
    #[command(hide = true)]
    Client {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        warmup: usize,
    },
    /// Accepts connections and answers one byte (runs in the server namespace).
    #[command(hide = true)]
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Serves a fake API server whose objects come from a directory and stdin (suite 8).
    #[command(hide = true)]
    FakeApiserver {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        manifests: PathBuf,
        #[arg(long)]
        kubeconfig_out: PathBuf,
    },
    /// Serves a rule set to one agent and reports its ACK (runs in the agent's namespace).
    #[command(hide = true)]
    FakeController {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        services: u32,
        #[arg(long, default_value_t = 0)]
        chunk: usize,
    },
}

fn main() -> anyhow::Result<()> {
    if programming::invoked_as_echo() {
        // Before any runtime: the echo server builds its own.
        let ok = kubenft_lab::echo::main() == std::process::ExitCode::SUCCESS;
        std::process::exit(if ok { 0 } else { 1 });
    }
    let cli = Cli::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?
        .block_on(run_cli(cli))
}

async fn run_cli(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Hidden::Client {
            target,
            count,
            warmup,
        }) => dataplane::client(target, count, warmup),
        Some(Hidden::Echo { listen }) => dataplane::echo(listen),
        Some(Hidden::FakeApiserver {
            listen,
            manifests,
            kubeconfig_out,
        }) => programming_scale::serve_api(listen, manifests, kubeconfig_out).await,
        Some(Hidden::FakeController {
            listen,
            services,
            chunk,
        }) => agent_rss::serve(listen, services, chunk).await,
        None => {
            tokio::spawn(cleanup_on_signal());
            let result = run(&cli.run).await;
            netns::cleanup_all();
            result
        }
    }
}

/// Deletes this run's namespaces on SIGINT/SIGTERM, then exits.
async fn cleanup_on_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    eprintln!("kubenft-bench: interrupted; deleting namespaces");
    netns::cleanup_all();
    programming::cleanup_on_exit();
    std::process::exit(130);
}

fn sibling(name: &str, given: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe()?;
    Ok(exe.with_file_name(name))
}

async fn run(args: &RunArgs) -> anyhow::Result<()> {
    for suite in &args.suite {
        let started = std::time::Instant::now();
        let tables = run_suite(*suite, args)
            .await
            .with_context(|| format!("suite {suite}"))?;
        let mut section = String::new();
        for t in &tables {
            println!("{}", t.markdown());
            section.push_str(&t.markdown());
        }
        section.push_str(&format!(
            "_Suite {suite} measured {} in {:.0} s by `{}`._\n\n",
            report::now(),
            started.elapsed().as_secs_f64(),
            command_line()
        ));
        save_section(args, *suite, &section)?;
        write_report(args)?;
    }
    Ok(())
}

/// Where each suite's latest tables are kept, so suites run separately end up in one report.
fn sections_dir(args: &RunArgs) -> PathBuf {
    args.sections.clone()
}

fn save_section(args: &RunArgs, suite: u32, text: &str) -> anyhow::Result<()> {
    let dir = sections_dir(args);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("suite-{suite}.md")), text)?;
    Ok(())
}

async fn run_suite(suite: u32, args: &RunArgs) -> anyhow::Result<Vec<Table>> {
    match suite {
        1 => {
            let opts = agent_apply::Options {
                sizes: args.sizes.clone(),
                changes: args.changes,
                baseline_cap: Duration::from_secs(args.baseline_cap_secs),
                baseline_max: args.baseline_max,
            };
            let agent = sibling("kubenft-agent", args.agent_bin.as_ref())?;
            agent_apply::run(&opts, &agent).await
        }
        2 => {
            let opts = dataplane::Options {
                sizes: args.dataplane_sizes.clone(),
                connections: args.connections,
                warmup: 200,
            };
            dataplane::run(&opts).await
        }
        3 | 4 => {
            let opts = fanout::Options {
                services: args.fanout_services,
                agents: args.agents.clone(),
                changes: args.fanout_changes,
                storm_agents: args.storm_agents,
                tls: args.tls,
            };
            let controller = sibling("kubenft-controller", args.controller_bin.as_ref())?;
            if suite == 3 {
                fanout::run_fanout(&opts, &controller).await
            } else {
                fanout::run_storm(&opts, &controller).await
            }
        }
        5 => {
            let opts = programming::Options {
                changes: args.programming_changes,
                interval: Duration::from_millis(args.programming_interval_ms),
            };
            let controller = sibling("kubenft-controller", args.controller_bin.as_ref())?;
            let agent = sibling("kubenft-agent", args.agent_bin.as_ref())?;
            tokio::task::spawn_blocking(move || programming::run(&opts, &controller, &agent))
                .await
                .context("suite 5 panicked")?
        }
        6 => {
            let opts = healing::Options {
                sizes: args.heal_sizes.clone(),
                injections: args.heal_injections,
                idle: Duration::from_secs(args.heal_idle_secs),
                kind_cap: Duration::from_secs(args.heal_kind_cap_secs),
            };
            healing::run(&opts).await
        }
        8 => {
            let opts = programming_scale::Options {
                sizes: args.scale_sizes.clone(),
                changes: args.scale_changes,
                interval: Duration::from_millis(args.programming_interval_ms),
                logs: sections_dir(args).join("suite-8-logs"),
            };
            let controller = sibling("kubenft-controller", args.controller_bin.as_ref())?;
            let agent = sibling("kubenft-agent", args.agent_bin.as_ref())?;
            tokio::task::spawn_blocking(move || programming_scale::run(&opts, &controller, &agent))
                .await
                .context("suite 8 panicked")?
        }
        9 => {
            let opts = endurance::Options {
                duration: Duration::from_secs(args.endurance_secs),
                rate: args.endurance_rate,
                services: args.endurance_services,
                nodes: args.endurance_nodes,
                probe_interval: Duration::from_millis(args.endurance_probe_interval_ms),
            };
            let controller = sibling("kubenft-controller", args.controller_bin.as_ref())?;
            let agent = sibling("kubenft-agent", args.agent_bin.as_ref())?;
            tokio::task::spawn_blocking(move || endurance::run(&opts, &controller, &agent))
                .await
                .context("suite 9 panicked")?
        }
        other => anyhow::bail!("no suite {other} (1-6, 8, 9)"),
    }
}

fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

/// Writes the report: the machine, then every suite's latest section.
fn write_report(args: &RunArgs) -> anyhow::Result<()> {
    if args.out.as_os_str().is_empty() {
        return Ok(());
    }
    let mut text = String::from("# kubenft benchmarks\n\n");
    text.push_str(
        "Generated by `scripts/bench.sh` (`kubenft-bench`, crate `bench/`); each suite's tables were measured in one run of it on this machine, so every figure has its baseline beside it.\n\n",
    );
    text.push_str(&report::machine());
    text.push_str(&format!(
        "\nRun `scripts/bench.sh` for every suite, or e.g. `scripts/bench.sh --suite 1,2 --sizes 1000,10000` for a quick run (each suite section names the command that produced it). Last command: `{}`\n\n",
        command_line()
    ));
    for suite in 1..=9 {
        if let Ok(section) =
            std::fs::read_to_string(sections_dir(args).join(format!("suite-{suite}.md")))
        {
            text.push_str(&section);
        }
    }
    std::fs::write(&args.out, text).with_context(|| format!("writing {}", args.out.display()))
}

//! `kubectl kubenft`: a thin client of the controllers' inspection API, for operators.
//!
//! ```text
//! kubectl kubenft status  --controller HOST:PORT [--controller ...]   every node, merged
//! kubectl kubenft why NAMESPACE/NAME --node N                          one Service on one node
//! kubectl kubenft rejected                                            objects refused, and why
//! kubectl kubenft trace --node N --source S --destination D --port P  where a connection goes
//! kubectl kubenft drain-status ADDRESS [--wait SECONDS]               has every node stopped?
//! ```
//! Exit status: 0 when every controller asked answered (and, for `drain-status`, the address
//! is drained), 1 otherwise (what was learnt is still printed), 2 for a bad command line.
#![forbid(unsafe_code)]

mod connect;
mod drain;
mod status;
mod trace;
mod why;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kubenft_proto::v1::{
    DrainStatusRequest, GetServiceRequest, ListNodesRequest, ListRejectedRequest, TraceRequest,
};

use crate::connect::{ConnectArgs, Inspect};

#[derive(Parser, Debug)]
#[command(name = "kubectl-kubenft", version = kubenft_proto::release::VERSION, about)]
struct Cli {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Every node: sync state, data plane, versions, which controller it streams from.
    Status,
    /// One Service as one node enforces it: ports, endpoints, and the reasons.
    Why {
        /// NAMESPACE/NAME of the Service.
        service: String,
        #[arg(long)]
        node: String,
    },
    /// Objects the controllers refused, with the field at fault.
    Rejected,
    /// Whether every node has stopped sending new connections to an endpoint address (a
    /// pod being deleted): per node DONE, PENDING or NOT_CONNECTED.
    DrainStatus {
        address: String,
        /// Wait up to this long (at most 30 s) for every node to be done.
        #[arg(long, default_value_t = 0)]
        wait: u32,
    },
    /// Where one new connection goes on a node: DNAT to which endpoints, REJECT, DROP or not
    /// a Service; whether its source is masqueraded; and what decided it.
    Trace {
        #[arg(long)]
        node: String,
        /// The client's address (one of the node's own: the node's own traffic).
        #[arg(long)]
        source: String,
        #[arg(long)]
        destination: String,
        #[arg(long)]
        port: u16,
        /// TCP, UDP or SCTP.
        #[arg(long, default_value = "TCP")]
        protocol: String,
        /// The interface the packet enters through (interface detect-local modes).
        #[arg(long, default_value = "")]
        interface: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Status => status(&cli.connect).await,
        Command::Why { service, node } => {
            let (namespace, name) = kubenft_proto::parse_namespaced_name(&service)
                .map_err(|why| anyhow::anyhow!("{service:?}: {why}"))?;
            let mut client = first(&cli.connect).await?;
            let view = client
                .get_service(GetServiceRequest {
                    node,
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })
                .await
                .context("GetService")?
                .into_inner();
            print!("{}", why::render(&view));
            Ok(ExitCode::SUCCESS)
        }
        Command::Trace {
            node,
            source,
            destination,
            port,
            protocol,
            interface,
        } => {
            let protocol = trace::protocol(&protocol).map_err(anyhow::Error::msg)?;
            let mut client = first(&cli.connect).await?;
            let answer = client
                .trace(TraceRequest {
                    node,
                    source,
                    destination,
                    port: u32::from(port),
                    protocol: protocol as i32,
                    interface,
                })
                .await
                .context("Trace")?
                .into_inner();
            print!("{}", trace::render(&answer));
            Ok(ExitCode::SUCCESS)
        }
        Command::DrainStatus { address, wait } => drain_status(&cli.connect, &address, wait).await,
        Command::Rejected => {
            let mut client = first(&cli.connect).await?;
            let errors = client
                .list_rejected(ListRejectedRequest {})
                .await
                .context("ListRejected")?
                .into_inner()
                .errors;
            for e in errors {
                let at = if e.field.is_empty() {
                    String::new()
                } else {
                    format!(" {}", e.field)
                };
                println!("{} {}/{}{at}: {}", e.kind, e.namespace, e.name, e.message);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Asks every replica (concurrently, each waiting up to `wait`); prints every node, judged by
/// the replica its agent is connected to.
async fn drain_status(connect: &ConnectArgs, address: &str, wait: u32) -> Result<ExitCode> {
    let asks = connect.controllers()?.iter().map(|addr| async move {
        let answer = async {
            let mut client = connect.connect(addr).await?;
            let reply = client
                .drain_status(DrainStatusRequest {
                    address: address.to_owned(),
                    wait_seconds: wait,
                })
                .await
                .with_context(|| format!("controller {addr}: DrainStatus"))?;
            anyhow::Ok(reply.into_inner())
        };
        (addr.clone(), answer.await)
    });
    let mut replies = Vec::new();
    let mut failed = Vec::new();
    for (addr, answer) in futures::future::join_all(asks).await {
        match answer {
            Ok(reply) => replies.push((addr, reply.nodes)),
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    if replies.is_empty() {
        anyhow::bail!("no controller answered: {}", failed.join("; "));
    }
    let (rows, done) = drain::merge(&replies);
    print!("{}", drain::render(address, &rows, done));
    for f in &failed {
        eprintln!("{f}");
    }
    Ok(if done && failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Asks every replica; prints the merged table and what could not be asked.
async fn status(connect: &ConnectArgs) -> Result<ExitCode> {
    let mut replies = Vec::new();
    let mut failed = Vec::new();
    for addr in connect.controllers()? {
        match list_nodes(connect, addr).await {
            Ok(reply) => replies.push((addr.clone(), reply)),
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    if replies.is_empty() {
        anyhow::bail!("no controller answered: {}", failed.join("; "));
    }
    print!("{}", status::table(&status::merge(&replies)));
    for f in &failed {
        eprintln!("{f}");
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn list_nodes(
    connect: &ConnectArgs,
    addr: &str,
) -> Result<kubenft_proto::v1::ListNodesResponse> {
    let mut client = connect.connect(addr).await?;
    let reply = client
        .list_nodes(ListNodesRequest {})
        .await
        .with_context(|| format!("controller {addr}: ListNodes"))?;
    Ok(reply.into_inner())
}

/// The first controller that accepts a connection.
async fn first(connect: &ConnectArgs) -> Result<Inspect> {
    let mut errors = Vec::new();
    for addr in connect.controllers()? {
        match connect.connect(addr).await {
            Ok(client) => return Ok(client),
            Err(e) => errors.push(format!("{:#}", anyhow::Error::from(e))),
        }
    }
    anyhow::bail!("no controller answered: {}", errors.join("; "))
}

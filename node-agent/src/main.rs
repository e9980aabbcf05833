//! `kubenft-agent`: parses the command line, sets up logging and signals, and hands over to
//! [`kubenft_agent::agent`].
#![forbid(unsafe_code)]

use std::io::IsTerminal;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use kubenft_agent::agent::{self, Config};
use kubenft_agent::cli::{Args, LogFormat};
use kubenft_agent::nft::NftCli;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kubenft_agent::memory::keep_large_buffers_mapped();
    let args = Args::parse();
    init_logging(args.log_format);
    let nft = NftCli::from_env();
    if args.cleanup {
        return agent::cleanup(&nft, &args.table_name, &args.state_dir)
            .await
            .context("cleanup");
    }
    if args.cleanup_kube_proxy {
        let removed = kubenft_agent::migrate::cleanup::run(&nft)
            .await
            .context("--cleanup-kube-proxy")?;
        if removed.is_empty() {
            tracing::info!("no kube-proxy rules on this node");
        }
        return Ok(());
    }
    let tls = match args.tls() {
        Ok(tls) => tls,
        Err(e) => Args::command()
            .error(clap::error::ErrorKind::ArgumentConflict, e)
            .exit(),
    };
    let cert_dir = args.cert_dir();
    let controller_service = args.controller_service();
    let cfg = Config {
        node_name: args
            .node_name()
            .context("cannot read the hostname for --node-name")?,
        controllers: args.controllers,
        healthz_listen: args.healthz_listen,
        metrics_listen: args.metrics_listen,
        grpc_listen: args.grpc_listen,
        state_dir: args.state_dir,
        table: args.table_name,
        livez_grace: args.livez_grace,
        tls,
        cert_dir,
        controller_service,
        kubeconfig: args.kubeconfig.clone(),
    };
    let cancel = CancellationToken::new();
    tokio::spawn(cancel_on_signal(cancel.clone()));
    agent::run(cfg, nft, cancel).await?;
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A closed stderr must not turn every log line into a panic of the task logging it.
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Cancels on SIGTERM or SIGINT.
async fn cancel_on_signal(cancel: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    cancel.cancel();
}

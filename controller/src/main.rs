use std::io::IsTerminal;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use kubenft_controller::cli::{Args, Command, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::DrainWait(drain)) = args.command {
        let (code, line) = kubenft_controller::drain_wait::run(drain).await;
        if code == kubenft_controller::drain_wait::BAD_USAGE {
            Args::command()
                .error(clap::error::ErrorKind::ArgumentConflict, line)
                .exit();
        }
        // The command's one line of output (a preStop hook's event shows it).
        if code == kubenft_controller::drain_wait::DRAINED {
            println!("{line}");
        } else {
            eprintln!("{line}");
        }
        std::process::exit(code);
    }
    let tls = match args.tls() {
        Ok(tls) => tls,
        Err(e) => Args::command()
            .error(clap::error::ErrorKind::ArgumentConflict, e)
            .exit(),
    };
    let detect_local = match args.detect_local() {
        Ok(d) => d,
        Err(e) => Args::command()
            .error(clap::error::ErrorKind::ArgumentConflict, e)
            .exit(),
    };
    if args.check_config {
        println!("OK");
        return Ok(());
    }
    init_tracing(args.log_format);
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    let mut config = kubenft_controller::Config::from(&args);
    config.tls = tls;
    config.policy.detect_local = detect_local;
    kubenft_controller::run(config, shutdown)
        .await
        .context("kubenft-controller")
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // A closed stderr must not turn every log line into a panic of the task logging it.
        .log_internal_errors(false);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// SIGTERM or SIGINT: stop accepting, drain agent streams, exit.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}

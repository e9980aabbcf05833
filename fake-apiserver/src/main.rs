//! `kubenft-fake-apiserver`: the fake API server as a process, for the lab and the demo. Serves
//! the objects of a manifest directory, writes a kubeconfig pointing at itself, and (with
//! `--watch`) turns edits of the directory into watch events.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Parser;
use kubenft_fake_apiserver::{FakeApiServer, read_manifests};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "kubenft-fake-apiserver",
    version,
    about = "A fake Kubernetes API server (list/watch of Services, EndpointSlices, Nodes) over plain HTTP"
)]
struct Args {
    /// Address to serve on (port 0: a random port; the kubeconfig names the real one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where to write a kubeconfig pointing at this server.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// A directory of manifests to serve.
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// Re-read the manifest directory on changes (polled every 200 ms).
    #[arg(long, requires = "manifests")]
    watch: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // A closed stderr must not turn every log line into a panic of the task logging it.
        .log_internal_errors(false)
        .init();
    let server = FakeApiServer::start(args.listen).await?;
    if let Some(dir) = &args.manifests {
        let n = server.sync_to(read_manifests(dir)?)?;
        tracing::info!(dir = %dir.display(), objects = n, "loaded manifests");
    }
    if let Some(path) = &args.kubeconfig_out {
        server
            .write_kubeconfig(path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{}", server.url());
    let watch = async {
        match (&args.manifests, args.watch) {
            (Some(dir), true) => watch_dir(&server, dir).await,
            _ => std::future::pending().await,
        }
    };
    tokio::select! {
        () = watch => {}
        r = tokio::signal::ctrl_c() => r.context("waiting for a signal")?,
        () = terminated() => {}
    }
    server.stop();
    Ok(())
}

async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

/// Polls the directory and syncs the server to it whenever a file changes. A directory that
/// fails to parse is reported and left as it was served.
async fn watch_dir(server: &FakeApiServer, dir: &Path) {
    let mut last = fingerprint(dir);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = fingerprint(dir);
        if now == last {
            continue;
        }
        last = now;
        match read_manifests(dir).and_then(|objects| server.sync_to(objects)) {
            Ok(changes) => tracing::info!(changes, "manifests re-read"),
            Err(e) => tracing::warn!(error = %e, "manifests not applied"),
        }
    }
}

fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((e.path(), meta.len(), meta.modified().ok()))
        })
        .collect();
    v.sort();
    v
}

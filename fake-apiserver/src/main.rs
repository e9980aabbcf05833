//! `kubenft-fake-apiserver`: the fake API server as a process, for the lab and the demo. Serves
//! the objects of a manifest directory, writes kubeconfigs pointing at itself (one without
//! credentials, and one per `--token-kubeconfig`), authenticates the bearer tokens of
//! `--users`, takes writes through the API (CSRs and their approval and status, Secrets,
//! ConfigMaps, ...), and (with `--watch`) turns edits of the directory into watch events.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Parser;
use kubenft_fake_apiserver::{FakeApiServer, UserInfo, read_manifests};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "kubenft-fake-apiserver",
    version,
    about = "A fake Kubernetes API server over plain HTTP: get/list/watch/create/update/patch/delete of \
             Services, EndpointSlices, Nodes, Secrets, ConfigMaps and CertificateSigningRequests \
             (with their approval and status subresources), bearer-token users",
    long_about = None,
    after_help = "Requests without an Authorization header are the admin user `kubernetes-admin`; \
                  a bearer token not in --users is refused with 401. A CSR's spec.username, uid, \
                  groups and extra are those of the token's user, as on a real API server."
)]
struct Args {
    /// Address to serve on (port 0: a random port; the kubeconfig names the real one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where to write a kubeconfig pointing at this server (no credentials: the admin user).
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// A directory of manifests to serve.
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// Re-read the manifest directory on changes (polled every 200 ms). Objects created
    /// through the API are kept; objects removed from the directory are deleted.
    #[arg(long, requires = "manifests")]
    watch: bool,
    /// A JSON file mapping bearer tokens to users:
    /// {"TOKEN": {"username": "...", "uid": "...", "groups": ["..."], "extra": {"k": ["v"]}}}.
    #[arg(long, value_name = "FILE")]
    users: Option<PathBuf>,
    /// Also write a kubeconfig that authenticates with TOKEN to PATH (repeatable).
    #[arg(long, value_name = "TOKEN=PATH", value_parser = token_and_path)]
    token_kubeconfig: Vec<(String, PathBuf)>,
}

fn token_and_path(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((token, path)) if !token.is_empty() && !path.is_empty() => {
            Ok((token.to_owned(), PathBuf::from(path)))
        }
        _ => Err(format!("expected TOKEN=PATH, got {s:?}")),
    }
}

/// The users of `--users`.
fn read_users(path: &Path) -> anyhow::Result<BTreeMap<String, UserInfo>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --users {}", path.display()))?;
    let users: BTreeMap<String, UserInfo> = serde_json::from_str(&text).with_context(|| {
        format!(
            "--users {}: expected a JSON object mapping tokens to {{username, uid, groups, extra}}",
            path.display()
        )
    })?;
    if let Some((token, _)) = users.iter().find(|(_, u)| u.username.is_empty()) {
        anyhow::bail!(
            "--users {}: the user of token {token:?} has no username",
            path.display()
        );
    }
    Ok(users)
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
    let users = match &args.users {
        Some(path) => read_users(path)?,
        None => BTreeMap::new(),
    };
    let server = FakeApiServer::start(args.listen).await?;
    for (token, user) in users {
        server.add_user(&token, user);
    }
    if let Some(dir) = &args.manifests {
        let n = server.sync_to(read_manifests(dir)?)?;
        tracing::info!(dir = %dir.display(), objects = n, "loaded manifests");
    }
    if let Some(path) = &args.kubeconfig_out {
        server
            .write_kubeconfig(path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    for (token, path) in &args.token_kubeconfig {
        server
            .write_kubeconfig_for(path, token)
            .with_context(|| format!("writing --token-kubeconfig {}", path.display()))?;
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

//! Runs nft scripts inside a namespace with a time cap, timing the wall clock of the `nft`
//! process (spawn, parse, cache fetch, kernel commit) as the agent experiences it.
//!
//! The agent's own runner (`NftCli`) kills nft after 30 s; the baseline takes minutes, so the
//! bench uses this runner for both shapes.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::netns::Netns;

/// How one nft run ended.
#[derive(Debug)]
pub enum Outcome {
    Done {
        wall: Duration,
        /// Peak RSS of the nft process, when measured (`/usr/bin/time`).
        max_rss: Option<u64>,
    },
    /// Killed at the cap.
    TimedOut(Duration),
}

/// Runs `nft -f -` with `script` on stdin. With `measure_rss`, nft runs under `/usr/bin/time`
/// (about a millisecond more: use it for full loads only).
pub async fn run(
    ns: &Netns,
    script: &str,
    cap: Duration,
    measure_rss: bool,
) -> anyhow::Result<Outcome> {
    let mut cmd = if measure_rss {
        let mut c = ns.tokio_command("/usr/bin/time");
        c.args(["-f", "KNB_MAXRSS_KIB %M", "nft", "-f", "-"]);
        c
    } else {
        let mut c = ns.tokio_command("nft");
        c.args(["-f", "-"]);
        c
    };
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child = cmd.spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let work = async {
        stdin.write_all(script.as_bytes()).await?;
        stdin.shutdown().await?;
        drop(stdin);
        child.wait_with_output().await
    };
    let out = match tokio::time::timeout(cap, work).await {
        Ok(out) => out?,
        Err(_) => return Ok(Outcome::TimedOut(cap)),
    };
    let wall = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        anyhow::bail!("nft failed ({}): {}", out.status, clip(&stderr));
    }
    let max_rss = stderr
        .lines()
        .find_map(|l| l.strip_prefix("KNB_MAXRSS_KIB "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024);
    Ok(Outcome::Done { wall, max_rss })
}

/// Runs a script that must succeed within `cap`, returning its wall time.
pub async fn run_ok(ns: &Netns, script: &str, cap: Duration) -> anyhow::Result<Duration> {
    match run(ns, script, cap, false).await? {
        Outcome::Done { wall, .. } => Ok(wall),
        Outcome::TimedOut(cap) => anyhow::bail!("nft did not finish within {cap:?}"),
    }
}

fn clip(text: &str) -> &str {
    let end = text.char_indices().nth(2000).map_or(text.len(), |(i, _)| i);
    &text[..end]
}

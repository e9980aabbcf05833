//! Real traffic through the churning traffic Services: from the client pod, one long-running
//! `kubenft-echo probe` per Service and protocol — TCP a new connection per attempt, UDP every
//! datagram from one fixed source port (one conntrack entry, refreshed for as long as the
//! probe runs: the flow a stale entry would keep sending to a former endpoint). Every answer
//! is checked against the Service's endpoints at the time.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use kubenft_lab::{ProbeOpts, ProbeResult, Proto};

use super::world::World;

/// An answer from a pod that stopped being an endpoint more than this long before counts as
/// stale (programming takes milliseconds; this leaves room for a loaded machine).
pub const GRACE: Duration = Duration::from_secs(3);
/// Per-phase timeout of one attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);
/// The fixed source port of the UDP probes (one per traffic Service: this + its index).
const UDP_SOURCE_PORT: u16 = 40_000;
const MAX_ATTEMPTS: u32 = 100_000;

/// Outcomes of one probe stream.
#[derive(Default)]
pub struct Tally {
    pub answered: AtomicU64,
    pub failed: AtomicU64,
    /// Answered by a pod that was not an endpoint of the Service within [`GRACE`].
    pub stale: AtomicU64,
}

/// One probe process and the thread reading its results.
pub struct Probe {
    pub service: usize,
    pub proto: Proto,
    pub tally: Arc<Tally>,
    child: Child,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Probe {
    /// Starts probing traffic Service `service` at `vip` over `proto` from namespace `ns`.
    pub fn start(
        echo: &Path,
        ns: &str,
        service: usize,
        proto: Proto,
        vip: SocketAddr,
        interval: Duration,
        world: Arc<Mutex<World>>,
    ) -> anyhow::Result<Probe> {
        let mut opts = ProbeOpts::count(MAX_ATTEMPTS).timeout(ATTEMPT_TIMEOUT);
        if proto == Proto::Udp {
            opts = opts.source_port(UDP_SOURCE_PORT + service as u16);
        }
        let mut argv: Vec<String> = vec![
            echo.display().to_string(),
            "probe".into(),
            proto.flag().into(),
            vip.to_string(),
        ];
        argv.extend(opts.to_args());
        argv.extend(["--interval-ms".into(), interval.as_millis().to_string()]);
        let mut child = kubenft_lab::netns::exec_cmd(ns, &argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting a probe")?;
        let stdout = child.stdout.take().context("the probe's stdout")?;
        let tally = Arc::new(Tally::default());
        let t = tally.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                let Ok(result) = ProbeResult::parse_line(&line) else {
                    t.failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                judge(&t, &world, service, &result, at);
            }
        });
        Ok(Probe {
            service,
            proto,
            tally,
            child,
            reader: Some(reader),
        })
    }
}

fn judge(t: &Tally, world: &Mutex<World>, service: usize, r: &ProbeResult, at: Instant) {
    let Some(server) = r.server() else {
        t.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    t.answered.fetch_add(1, Ordering::Relaxed);
    let since = at.checked_sub(GRACE).unwrap_or(at);
    let ok = world
        .lock()
        .expect("lock")
        .was_endpoint(service, server, since);
    if !ok {
        t.stale.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

//! `kubenft-controller drain-wait`: a pod's preStop hook. Asks the controllers' drain gate
//! (`ControllerInspect/DrainStatus`) until no node sends new connections to the pod's address,
//! or the timeout: so a pod exits once no node still sends it new traffic, instead of sleeping
//! a guessed time.
//!
//! Each controller replica knows only the agents connected to it, so with several replicas
//! every replica is asked (`--controller` repeated) and, per node, the answer of a replica it
//! is connected to wins.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use kubenft_proto::v1::controller_inspect_client::ControllerInspectClient;
use kubenft_proto::v1::{DrainState, DrainStatusRequest, NodeDrain};
use tokio::time::Instant;

/// The exit codes.
pub const DRAINED: i32 = 0;
pub const NOT_DRAINED: i32 = 1;
pub const NO_ANSWER: i32 = 3;
/// A command line refused (as clap refuses flags).
pub const BAD_USAGE: i32 = 2;

/// The longest one call waits with a single controller (the server's own maximum is 30 s);
/// with several, calls are short so the answers are merged often.
const LONG_POLL: Duration = Duration::from_secs(25);
const SHORT_POLL: Duration = Duration::from_secs(1);
/// Pause before asking again after a failed call (a controller restarting, inspection busy).
const RETRY_PAUSE: Duration = Duration::from_millis(250);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Debug, clap::Args)]
pub struct DrainWaitArgs {
    /// A controller to ask (repeatable: ask every replica), `https://HOST:PORT`, or
    /// `http://HOST:PORT` with --insecure; a bare HOST:PORT takes the scheme --insecure says.
    #[arg(long = "controller", value_name = "URL", required = true)]
    pub controllers: Vec<String>,
    /// The endpoint address to drain: the pod's IP.
    #[arg(long, value_name = "IP", env = "POD_IP")]
    pub address: std::net::IpAddr,
    /// How long to wait at most (keep it under the pod's terminationGracePeriodSeconds): a
    /// number with s, m or h.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = crate::cli::parse_duration)]
    pub timeout: Duration,
    /// Client certificate (PEM) signed by the controllers' --client-ca-file.
    #[arg(long, value_name = "PATH")]
    pub tls_cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "PATH")]
    pub tls_private_key_file: Option<PathBuf>,
    /// The CA that signs the controllers' serving certificates (PEM).
    #[arg(long, value_name = "PATH")]
    pub controller_ca_file: Option<PathBuf>,
    /// The name the controllers' certificate is checked against [default: the URL's host].
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Plaintext (only without the TLS flags).
    #[arg(long)]
    pub insecure: bool,
}

impl DrainWaitArgs {
    /// The client TLS files (`None` with --insecure), or why the command line is refused.
    fn tls(&self) -> Result<Option<kubenft_tls::ClientFiles>, String> {
        match (
            &self.tls_cert_file,
            &self.tls_private_key_file,
            &self.controller_ca_file,
            self.insecure,
        ) {
            (Some(cert), Some(key), Some(ca), false) => Ok(Some(kubenft_tls::ClientFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            })),
            (None, None, None, true) => Ok(None),
            (None, None, None, false) => Err(
                "--tls-cert-file, --tls-private-key-file and --controller-ca-file are required (or --insecure for plaintext)".into(),
            ),
            (_, _, _, true) => Err("--insecure cannot be combined with the TLS flags".into()),
            _ => Err(
                "--tls-cert-file, --tls-private-key-file and --controller-ca-file go together"
                    .into(),
            ),
        }
    }

    /// Each `--controller` as a URL with the scheme TLS implies, or why one is refused.
    fn urls(&self) -> Result<Vec<String>, String> {
        self.controllers
            .iter()
            .map(|c| {
                let url = if c.contains("://") {
                    c.clone()
                } else if self.insecure {
                    format!("http://{c}")
                } else {
                    format!("https://{c}")
                };
                match (url.split_once("://").map(|s| s.0), self.insecure) {
                    (Some("https"), false) | (Some("http"), true) => Ok(url),
                    (Some("http"), false) => {
                        Err(format!("--controller {c}: http:// only with --insecure"))
                    }
                    (Some("https"), true) => Err(format!(
                        "--controller {c}: https:// cannot be used with --insecure"
                    )),
                    _ => Err(format!("--controller {c}: not an http:// or https:// URL")),
                }
            })
            .collect()
    }
}

/// What one controller said, or why it said nothing.
type Answer = Result<Vec<NodeDrain>, String>;

/// Runs the command: the exit code and the line to print (stdout for 0, stderr otherwise).
pub async fn run(args: DrainWaitArgs) -> (i32, String) {
    let (tls, urls) = match (args.tls(), args.urls()) {
        (Ok(tls), Ok(urls)) => (tls, urls),
        (Err(e), _) | (_, Err(e)) => return (BAD_USAGE, e),
    };
    let deadline = Instant::now() + args.timeout;
    let poll = if urls.len() == 1 {
        LONG_POLL
    } else {
        SHORT_POLL
    };
    let last = loop {
        let started = Instant::now();
        let remaining = deadline.saturating_duration_since(started);
        let wait = remaining.min(poll);
        let calls = urls
            .iter()
            .map(|url| ask(url, tls.as_ref(), &args, wait, remaining));
        let answers: Vec<Answer> = futures::future::join_all(calls).await;
        let answered: Vec<&Vec<NodeDrain>> =
            answers.iter().filter_map(|a| a.as_ref().ok()).collect();
        if !answered.is_empty() {
            let merged = merge(&answered);
            if merged.values().all(|n| n.state() == DrainState::DrainDone) {
                return (
                    DRAINED,
                    format!(
                        "{}: no node sends new connections to it ({} nodes)",
                        args.address,
                        merged.len()
                    ),
                );
            }
        }
        if Instant::now() >= deadline {
            break answers;
        }
        // A failed call, or a wait under a second (answered at once): not again at once.
        tokio::time::sleep_until(deadline.min(started + RETRY_PAUSE)).await;
    };
    report_timeout(&args, &urls, &last)
}

/// The line printed when the timeout came first.
fn report_timeout(args: &DrainWaitArgs, urls: &[String], last: &[Answer]) -> (i32, String) {
    let answered: Vec<&Vec<NodeDrain>> = last.iter().filter_map(|a| a.as_ref().ok()).collect();
    if answered.is_empty() {
        let errors: Vec<String> = urls
            .iter()
            .zip(last)
            .filter_map(|(u, a)| a.as_ref().err().map(|e| format!("{u}: {e}")))
            .collect();
        return (
            NO_ANSWER,
            format!(
                "{}: no controller answered within {:?}: {}",
                args.address,
                args.timeout,
                errors.join("; ")
            ),
        );
    }
    let waiting: Vec<String> = merge(&answered)
        .into_values()
        .filter(|n| n.state() != DrainState::DrainDone)
        .map(|n| match n.state() {
            DrainState::DrainPending if n.needed_version.is_empty() => {
                format!("{} (pending: still an endpoint)", n.node)
            }
            DrainState::DrainPending => format!(
                "{} (pending: has {}, needs {})",
                n.node,
                if n.acked_version.is_empty() {
                    "nothing"
                } else {
                    &n.acked_version
                },
                n.needed_version
            ),
            _ => format!("{} (not connected)", n.node),
        })
        .collect();
    (
        NOT_DRAINED,
        format!(
            "{}: timed out after {:?}; nodes that may still send new connections: {}",
            args.address,
            args.timeout,
            waiting.join(", ")
        ),
    )
}

/// One DrainStatus call to `url`, waiting up to `wait`, within `remaining`.
async fn ask(
    url: &str,
    tls: Option<&kubenft_tls::ClientFiles>,
    args: &DrainWaitArgs,
    wait: Duration,
    remaining: Duration,
) -> Answer {
    let mut endpoint =
        tonic::transport::Endpoint::from_shared(url.to_owned()).map_err(|e| e.to_string())?;
    if let Some(files) = tls {
        let mut config = files.load().map_err(|e| e.to_string())?;
        if let Some(name) = &args.tls_server_name {
            config = config.domain_name(name.clone());
        }
        endpoint = endpoint.tls_config(config).map_err(|e| e.to_string())?;
    }
    let channel = endpoint
        .connect_timeout(CONNECT_TIMEOUT.min(remaining.max(Duration::from_millis(100))))
        .connect()
        .await
        .map_err(|e| one_line(&e))?;
    let mut request = tonic::Request::new(DrainStatusRequest {
        address: args.address.to_string(),
        wait_seconds: u32::try_from(wait.as_secs()).unwrap_or(u32::MAX),
    });
    // The server answers a little before this deadline with what is still pending.
    request.set_timeout(remaining.max(Duration::from_millis(100)));
    ControllerInspectClient::new(channel)
        .drain_status(request)
        .await
        .map(|r| r.into_inner().nodes)
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

/// An error and its causes on one line.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Per node, the answer to believe: from a replica its agent is connected to (the less
/// advanced if two are, during a handover); else from a replica that knows what it last
/// acknowledged (not-connected over done if they differ); else not connected.
fn merge(answers: &[&Vec<NodeDrain>]) -> BTreeMap<String, NodeDrain> {
    let mut by_node: BTreeMap<String, Vec<&NodeDrain>> = BTreeMap::new();
    for n in answers.iter().flat_map(|a| a.iter()) {
        by_node.entry(n.node.clone()).or_default().push(n);
    }
    let severity = |n: &&NodeDrain| match n.state() {
        DrainState::DrainDone => 0,
        DrainState::DrainPending => 1,
        _ => 2,
    };
    by_node
        .into_iter()
        .map(|(node, views)| {
            let connected: Vec<&NodeDrain> =
                views.iter().copied().filter(|n| n.connected).collect();
            let known: Vec<&NodeDrain> = views
                .iter()
                .copied()
                .filter(|n| !n.acked_version.is_empty())
                .collect();
            let pick = [connected, known, views]
                .into_iter()
                .find(|v| !v.is_empty())
                .and_then(|v| v.into_iter().max_by_key(severity))
                .cloned()
                .unwrap_or_default();
            (node, pick)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn view(node: &str, state: DrainState, connected: bool, acked: &str) -> NodeDrain {
        NodeDrain {
            node: node.into(),
            state: state as i32,
            connected,
            acked_version: acked.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_replica_a_node_is_connected_to_decides() {
        use DrainState::*;
        // a on replica 1 (done), b on replica 2 (pending); each replica never heard of the
        // other's node.
        let one = vec![
            view("a", DrainDone, true, "v1"),
            view("b", DrainNotConnected, false, ""),
        ];
        let two = vec![
            view("a", DrainNotConnected, false, ""),
            view("b", DrainPending, true, "v0"),
        ];
        let merged = merge(&[&one, &two]);
        assert_eq!(merged["a"].state(), DrainDone);
        assert_eq!(merged["b"].state(), DrainPending);
        // A node connected nowhere: what a replica knows it acknowledged beats ignorance.
        let one = vec![view("c", DrainDone, false, "v1")];
        let two = vec![view("c", DrainNotConnected, false, "")];
        assert_eq!(merge(&[&one, &two])["c"].state(), DrainDone);
        let three = vec![view("c", DrainNotConnected, false, "v0")];
        assert_eq!(merge(&[&one, &three])["c"].state(), DrainNotConnected);
    }

    fn parse(args: &[&str]) -> Result<DrainWaitArgs, String> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: DrainWaitArgs,
        }
        Cli::try_parse_from(std::iter::once("drain-wait").chain(args.iter().copied()))
            .map(|c| c.args)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn tls_and_urls_are_checked() {
        let a = parse(&["--controller", "10.0.0.1:9650", "--address", "10.244.1.5"]).unwrap();
        assert!(a.tls().unwrap_err().contains("--insecure"));
        assert_eq!(a.timeout, Duration::from_secs(30));
        let a = parse(&[
            "--controller",
            "10.0.0.1:9650",
            "--controller",
            "http://10.0.0.2:9650",
            "--address",
            "fd00::5",
            "--insecure",
            "--timeout",
            "2m",
        ])
        .unwrap();
        assert_eq!(a.tls(), Ok(None));
        assert_eq!(
            a.urls().unwrap(),
            ["http://10.0.0.1:9650", "http://10.0.0.2:9650"]
        );
        assert_eq!(a.timeout, Duration::from_secs(120));
        let a = parse(&[
            "--controller",
            "http://10.0.0.1:9650",
            "--address",
            "10.244.1.5",
            "--tls-cert-file",
            "c",
            "--tls-private-key-file",
            "k",
            "--controller-ca-file",
            "ca",
        ])
        .unwrap();
        assert!(a.tls().unwrap().is_some());
        assert!(
            a.urls()
                .unwrap_err()
                .contains("http:// only with --insecure")
        );
        let e = parse(&["--controller", "x:1", "--address", "pod-a", "--insecure"]).unwrap_err();
        assert!(e.contains("--address"), "{e}");
        let e = parse(&[
            "--controller",
            "x:1",
            "--address",
            "10.0.0.1",
            "--timeout",
            "soon",
        ])
        .unwrap_err();
        assert!(e.contains("--timeout"), "{e}");
    }
}

//! The command line (a stable interface: manifests and the lab depend on it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::nft::TableName;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "kubenft-agent",
    version,
    about = "kubenft node agent: enforces its node's rule set with nftables"
)]
pub struct Args {
    /// This node's name [default: $NODE_NAME, else the hostname].
    #[arg(long, env = "NODE_NAME", value_parser = non_empty)]
    pub node_name: Option<String>,

    /// Controller gRPC URL (repeatable; tried in turn), e.g. http://192.168.50.2:9650.
    #[arg(long = "controller", value_name = "URL", value_parser = controller_url, required_unless_present = "cleanup")]
    pub controllers: Vec<String>,

    /// Address of /healthz and /livez.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:10256")]
    pub healthz_listen: SocketAddr,

    /// Address of /metrics and /proxyMode.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10249")]
    pub metrics_listen: SocketAddr,

    /// Address of the agent's inspection gRPC server.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9652")]
    pub grpc_listen: SocketAddr,

    /// Where the applied state is kept across restarts.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/kubenft")]
    pub state_dir: PathBuf,

    /// Name of the agent's nftables tables (one per family).
    #[arg(long, value_name = "NAME", default_value = "kubenft")]
    pub table_name: TableName,

    /// How long the node may fail to converge (changes refused, repairs failing) before
    /// /livez fails and the kubelet restarts the agent: a number with ms, s, m or h.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = duration)]
    pub livez_grace: Duration,

    /// Delete the agent's tables and state file, then exit.
    #[arg(long)]
    pub cleanup: bool,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn non_empty(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s.to_owned())
    }
}

fn controller_url(s: &str) -> Result<String, String> {
    if !(s.starts_with("http://") || s.starts_with("https://")) {
        return Err(format!("{s:?} is not an http:// or https:// URL"));
    }
    tonic::transport::Endpoint::from_shared(s.to_owned())
        .map(|_| s.to_owned())
        .map_err(|e| format!("{s:?} is not a valid URL: {e}"))
}

/// `500ms`, `30s`, `5m`, `1h`: a positive whole number and a unit.
fn duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 500ms, 30s or 5m"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("{s:?} needs a unit: ms, s, m or h")),
    };
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

impl Args {
    /// The node name: the flag, `$NODE_NAME`, or the hostname.
    pub fn node_name(&self) -> std::io::Result<String> {
        if let Some(name) = &self.node_name {
            return Ok(name.clone());
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
        Ok(host.trim().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        Args::try_parse_from(["kubenft-agent"].iter().chain(args)).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let a = parse(&["--controller", "http://192.168.50.2:9650"]).unwrap();
        assert_eq!(a.healthz_listen.to_string(), "0.0.0.0:10256");
        assert_eq!(a.metrics_listen.to_string(), "127.0.0.1:10249");
        assert_eq!(a.grpc_listen.to_string(), "127.0.0.1:9652");
        assert_eq!(a.table_name.as_str(), "kubenft");
        assert_eq!(a.state_dir, PathBuf::from("/var/lib/kubenft"));
        assert_eq!(a.log_format, LogFormat::Text);
        assert_eq!(a.livez_grace, Duration::from_secs(300));
    }

    #[test]
    fn repeatable_controllers_and_cleanup() {
        let a = parse(&["--controller", "http://a:1", "--controller", "http://b:2"]).unwrap();
        assert_eq!(a.controllers, ["http://a:1", "http://b:2"]);
        assert!(parse(&["--cleanup"]).is_ok());
        assert!(parse(&[]).is_err());
    }

    #[test]
    fn livez_grace_units() {
        for (arg, secs) in [("500ms", 0.5), ("30s", 30.0), ("2m", 120.0), ("1h", 3600.0)] {
            let a = parse(&["--cleanup", "--livez-grace", arg]).unwrap();
            assert_eq!(a.livez_grace.as_secs_f64(), secs, "{arg}");
        }
    }

    #[test]
    fn errors_name_the_flag() {
        for (args, flag) in [
            (&["--bogus"][..], "--bogus"),
            (
                &["--cleanup", "--healthz-listen", "nope"],
                "--healthz-listen",
            ),
            (&["--cleanup", "--table-name", "a b"], "--table-name"),
            (&["--controller", "192.168.0.1:9650"], "--controller"),
            (&["--cleanup", "--log-format", "xml"], "--log-format"),
            (&["--cleanup", "--livez-grace", "5"], "--livez-grace"),
            (&["--cleanup", "--livez-grace", "0s"], "--livez-grace"),
            (&["--cleanup", "--livez-grace", "1.5m"], "--livez-grace"),
            (&["--cleanup", "--livez-grace", "1d"], "--livez-grace"),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(flag), "{err}");
        }
    }
}

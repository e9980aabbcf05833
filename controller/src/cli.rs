//! Command line (DESIGN.md §3). Invalid values are refused at start with the flag's name.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use ipnet::IpNet;

use crate::model::parse_cidr;
use crate::plan::NodePortAddresses;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceArg {
    Kube,
    Dir(PathBuf),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Parser)]
#[command(
    name = "kubenft-controller",
    version = kubenft_proto::release::VERSION,
    about = "Computes each node's Service rules and streams them to the kubenft agents"
)]
pub struct Args {
    /// Where objects come from: `kube` (in-cluster config or KUBECONFIG) or `dir:PATH` (a directory of YAML manifests).
    #[arg(long, default_value = "kube", value_parser = parse_source)]
    pub source: SourceArg,
    /// Address of the gRPC server (rule stream, inspection, health, reflection).
    #[arg(long, default_value = "0.0.0.0:9650")]
    pub grpc_listen: SocketAddr,
    /// Address of the HTTP server (/healthz, /livez, /readyz, /metrics).
    #[arg(long, default_value = "0.0.0.0:9651")]
    pub http_listen: SocketAddr,
    /// Pod address range (repeatable): traffic from it is "from a pod".
    #[arg(long = "cluster-cidr", value_parser = parse_cidr_arg)]
    pub cluster_cidrs: Vec<IpNet>,
    /// Service address range (repeatable): unallocated addresses in it are dropped.
    #[arg(long = "service-cidr", value_parser = parse_cidr_arg)]
    pub service_cidrs: Vec<IpNet>,
    /// Masquerade all traffic to ClusterIPs.
    #[arg(long)]
    pub masquerade_all: bool,
    /// Node addresses that serve NodePorts: `primary` (each node's InternalIP), `all`, or CIDR[,CIDR...].
    #[arg(long, default_value = "primary", value_parser = parse_node_port_addresses)]
    pub node_port_addresses: NodePortAddresses,
    /// Allowed NodePort range (the API server's --service-node-port-range).
    #[arg(long, default_value = "30000-32767", value_parser = parse_port_range)]
    pub node_port_range: RangeInclusive<u16>,
    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Kubeconfig for `--source kube` [default: $KUBECONFIG, ~/.kube/config, else in-cluster].
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Parse and validate the command line, print `OK` and exit (manifests are checked with it).
    #[arg(long)]
    pub check_config: bool,
    /// The gRPC port's serving certificate (PEM, chain first); re-read when it changes.
    #[arg(long, value_name = "PATH")]
    pub tls_cert_file: Option<PathBuf>,
    /// The serving certificate's private key (PEM); re-read when it changes.
    #[arg(long, value_name = "PATH")]
    pub tls_private_key_file: Option<PathBuf>,
    /// The CA that signs agents' (CN system:node:NAME) and operators' client certificates
    /// (PEM); re-read when it changes.
    #[arg(long, value_name = "PATH")]
    pub client_ca_file: Option<PathBuf>,
    /// Serve gRPC in plaintext, without client authentication (only without the TLS flags).
    #[arg(long)]
    pub insecure: bool,
}

/// The flags that make the gRPC port TLS.
pub const TLS_FLAGS: &str = "--tls-cert-file, --tls-private-key-file and --client-ca-file";

impl Args {
    /// The gRPC port's TLS files (`None` with `--insecure`), or why the command line is
    /// refused: TLS needs all three files, and plaintext must be asked for.
    pub fn tls(&self) -> Result<Option<kubenft_tls::ServerFiles>, String> {
        let files = [
            &self.tls_cert_file,
            &self.tls_private_key_file,
            &self.client_ca_file,
        ];
        match (files, self.insecure) {
            ([Some(cert), Some(key), Some(ca)], false) => Ok(Some(kubenft_tls::ServerFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: ca.clone(),
            })),
            ([None, None, None], true) => Ok(None),
            ([None, None, None], false) => Err(format!(
                "refusing to serve gRPC in plaintext: give {TLS_FLAGS}, or --insecure to run without TLS"
            )),
            (_, true) => Err(format!("--insecure cannot be combined with {TLS_FLAGS}")),
            (_, false) => Err(format!("TLS needs all of {TLS_FLAGS}")),
        }
    }
}

fn parse_source(s: &str) -> Result<SourceArg, String> {
    match s {
        "kube" => Ok(SourceArg::Kube),
        _ => match s.strip_prefix("dir:") {
            Some(path) if !path.is_empty() => Ok(SourceArg::Dir(PathBuf::from(path))),
            _ => Err("expected `kube` or `dir:PATH`".into()),
        },
    }
}

fn parse_cidr_arg(s: &str) -> Result<IpNet, String> {
    parse_cidr(s).ok_or_else(|| format!("{s:?} is not a CIDR (like 10.244.0.0/16)"))
}

fn parse_node_port_addresses(s: &str) -> Result<NodePortAddresses, String> {
    match s {
        "primary" => Ok(NodePortAddresses::Primary),
        "all" => Ok(NodePortAddresses::All),
        _ => s
            .split(',')
            .map(parse_cidr_arg)
            .collect::<Result<Vec<_>, _>>()
            .map(NodePortAddresses::Cidrs),
    }
}

fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let err = || format!("{s:?} is not a port range LOW-HIGH within 1-65535");
    let (lo, hi) = s.split_once('-').ok_or_else(err)?;
    let lo: u16 = lo.trim().parse().map_err(|_| err())?;
    let hi: u16 = hi.trim().parse().map_err(|_| err())?;
    if lo == 0 || lo > hi {
        return Err(err());
    }
    Ok(lo..=hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_flags() {
        let a = Args::try_parse_from([
            "kubenft-controller",
            "--insecure",
            "--source",
            "dir:/tmp/m",
            "--cluster-cidr",
            "10.244.0.0/16",
            "--cluster-cidr",
            "fd00:244::/48",
            "--node-port-addresses",
            "192.168.50.0/24,fd00:50::/64",
            "--node-port-range",
            "30000-30100",
            "--masquerade-all",
        ])
        .unwrap();
        assert_eq!(a.source, SourceArg::Dir("/tmp/m".into()));
        assert_eq!(a.cluster_cidrs.len(), 2);
        assert!(matches!(a.node_port_addresses, NodePortAddresses::Cidrs(ref c) if c.len() == 2));
        assert_eq!(a.node_port_range, 30000..=30100);
        assert_eq!(a.tls(), Ok(None));
    }

    #[test]
    fn plaintext_only_when_asked_for() {
        let tls = |args: &[&str]| {
            Args::try_parse_from(std::iter::once("kubenft-controller").chain(args.iter().copied()))
                .unwrap()
                .tls()
        };
        let err = tls(&[]).unwrap_err();
        for flag in [
            "--tls-cert-file",
            "--tls-private-key-file",
            "--client-ca-file",
            "--insecure",
        ] {
            assert!(err.contains(flag), "{err}");
        }
        let all = [
            "--tls-cert-file",
            "c.crt",
            "--tls-private-key-file",
            "c.key",
            "--client-ca-file",
            "ca.crt",
        ];
        let files = tls(&all).unwrap().unwrap();
        assert_eq!(files.client_ca, PathBuf::from("ca.crt"));
        assert!(tls(&all[..4]).unwrap_err().contains("needs all"));
        let mut insecure = all.to_vec();
        insecure.push("--insecure");
        assert!(tls(&insecure).unwrap_err().contains("--insecure cannot"));
    }

    #[test]
    fn bad_values_name_the_flag() {
        for args in [
            vec!["--source", "etcd"],
            vec!["--cluster-cidr", "10.0.0.0/40"],
            vec!["--node-port-range", "5-1"],
            vec!["--grpc-listen", "nowhere"],
            vec!["--no-such-flag"],
        ] {
            let flag = args[0];
            let err = Args::try_parse_from(
                std::iter::once("kubenft-controller").chain(args.iter().copied()),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains(flag), "{err}");
        }
    }
}

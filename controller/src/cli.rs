//! Command line (docs/contract.md §3). Invalid values are refused at start with the flag's name.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use ipnet::IpNet;

use crate::signer::review::Policy;
use crate::signer::{CaRef, Serving, SignerConfig};
use kubenft_plan::model::parse_cidr;
use kubenft_plan::{DetectLocal, InterfaceName, NodePortAddresses};

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

/// `--detect-local-mode`: kube-proxy's values, spelled as kube-proxy spells them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum DetectLocalMode {
    /// Traffic from `--cluster-cidr` is from a pod (none given: nothing is).
    #[default]
    #[value(name = "ClusterCIDR")]
    ClusterCidr,
    /// Traffic from the node's own `spec.podCIDRs` is from a pod.
    #[value(name = "NodeCIDR")]
    NodeCidr,
    /// Traffic entering through `--pod-bridge-interface` is from a pod.
    #[value(name = "BridgeInterface")]
    BridgeInterface,
    /// Traffic entering through an interface named `--pod-interface-name-prefix`* is from a pod.
    #[value(name = "InterfaceNamePrefix")]
    InterfaceNamePrefix,
}

#[derive(Debug, Parser)]
#[command(
    name = "kubenft-controller",
    version = kubenft_proto::release::VERSION,
    about = "Computes each node's Service rules and streams them to the kubenft agents",
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    /// A one-shot client instead of the controller (`drain-wait`).
    #[command(subcommand)]
    pub command: Option<Command>,
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
    /// How traffic from a node's own pods is recognised (not masqueraded to ClusterIPs; sent
    /// to every endpoint of an externalTrafficPolicy Local Service), as kube-proxy's flag.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = DetectLocalMode::ClusterCidr)]
    pub detect_local_mode: DetectLocalMode,
    /// The bridge the node's pods are attached to, for `--detect-local-mode BridgeInterface`
    /// (e.g. cbr0, cni0).
    #[arg(long, value_name = "NAME", value_parser = parse_interface_name)]
    pub pod_bridge_interface: Option<InterfaceName>,
    /// The name prefix of the pods' host-side interfaces, for `--detect-local-mode
    /// InterfaceNamePrefix` (e.g. eni for the AWS VPC CNI, cali for Calico).
    #[arg(long, value_name = "PREFIX", value_parser = parse_interface_name)]
    pub pod_interface_name_prefix: Option<InterfaceName>,
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
    /// Sign the agents' certificates (CertificateSigningRequests for signer `kubenft.io/agent`)
    /// with a CA kept in this Secret, NAMESPACE/NAME (created with a new CA if there is none);
    /// its certificate is published as `ca.crt` in the ConfigMap of the same name.
    #[arg(long, value_name = "NAMESPACE/NAME", value_parser = parse_ca_ref)]
    pub signer_ca_secret: Option<CaRef>,
    /// The agents' ServiceAccount, NAMESPACE/NAME: only tokens of its pods may request
    /// certificates, each for the node its pod runs on.
    #[arg(
        long,
        value_name = "NAMESPACE/NAME",
        default_value = "kubenft-system/kubenft-agent",
        value_parser = parse_service_account
    )]
    pub signer_agent_service_account: String,
    /// Lifetime of the certificates the signer issues (agents renew theirs at 70-90% of it):
    /// a number with s, m or h.
    #[arg(long, value_name = "DURATION", default_value = "168h", value_parser = parse_duration)]
    pub signer_cert_duration: Duration,
    /// Issue the gRPC port's serving certificate from the signer's CA into DIR (renewed at two
    /// thirds of its life) and serve with it, instead of --tls-cert-file,
    /// --tls-private-key-file and --client-ca-file (the client CA is the signer's CA).
    #[arg(long, value_name = "DIR", requires = "signer_ca_secret")]
    pub serving_cert_dir: Option<PathBuf>,
    /// A name of the serving certificate: a DNS name or an IP address (repeatable).
    #[arg(
        long = "serving-cert-san",
        value_name = "NAME|IP",
        requires = "serving_cert_dir"
    )]
    pub serving_cert_sans: Vec<String>,
}

/// The controller binary's one-shot clients.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Wait until no node sends new connections to an endpoint address (a pod's preStop
    /// hook): exit 0 once every node acknowledged a rule set without it, 1 if some node is
    /// still pending or not connected at the timeout (named on one line), 3 if no controller
    /// answered.
    DrainWait(crate::drain_wait::DrainWaitArgs),
}

/// The flags that make the gRPC port TLS.
pub const TLS_FLAGS: &str = "--tls-cert-file, --tls-private-key-file and --client-ca-file";

impl Args {
    /// The gRPC port's TLS files (`None` with `--insecure`), or why the command line is
    /// refused: TLS needs all three files, and plaintext must be asked for.
    pub fn tls(&self) -> Result<Option<kubenft_tls::ServerFiles>, String> {
        if let Some(serving) = self.serving() {
            return match (
                &self.tls_cert_file,
                &self.tls_private_key_file,
                &self.client_ca_file,
                self.insecure,
            ) {
                (None, None, None, false) => Ok(Some(serving.files())),
                _ => Err(format!(
                    "--serving-cert-dir replaces {TLS_FLAGS} and cannot be combined with them or with --insecure"
                )),
            };
        }
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

impl Args {
    /// The local-traffic detector, or why the command line is refused: an interface mode
    /// needs its flag, and an interface flag is used only with its mode.
    pub fn detect_local(&self) -> Result<DetectLocal, String> {
        let mode = self.detect_local_mode;
        let bridge = self.pod_bridge_interface.clone();
        let prefix = self.pod_interface_name_prefix.clone();
        if bridge.is_some() && mode != DetectLocalMode::BridgeInterface {
            return Err(
                "--pod-bridge-interface is used only with --detect-local-mode BridgeInterface"
                    .into(),
            );
        }
        if prefix.is_some() && mode != DetectLocalMode::InterfaceNamePrefix {
            return Err("--pod-interface-name-prefix is used only with --detect-local-mode InterfaceNamePrefix".into());
        }
        match mode {
            DetectLocalMode::ClusterCidr => Ok(DetectLocal::ClusterCidr),
            DetectLocalMode::NodeCidr => Ok(DetectLocal::NodeCidr),
            DetectLocalMode::BridgeInterface => bridge.map(DetectLocal::BridgeInterface).ok_or_else(|| {
                "--detect-local-mode BridgeInterface needs --pod-bridge-interface NAME".into()
            }),
            DetectLocalMode::InterfaceNamePrefix => prefix
                .map(DetectLocal::InterfaceNamePrefix)
                .ok_or_else(|| {
                    "--detect-local-mode InterfaceNamePrefix needs --pod-interface-name-prefix PREFIX"
                        .into()
                }),
        }
    }

    /// The signer's settings, with `--signer-ca-secret`.
    pub fn signer(&self) -> Option<SignerConfig> {
        Some(SignerConfig {
            ca: self.signer_ca_secret.clone()?,
            policy: Policy {
                agent_user: self.signer_agent_service_account.clone(),
                max_duration: self.signer_cert_duration,
            },
            serving: self.serving(),
        })
    }

    fn serving(&self) -> Option<Serving> {
        let dir = self.serving_cert_dir.clone()?;
        let (ips, dns_names) = self
            .serving_cert_sans
            .iter()
            .partition::<Vec<_>, _>(|s| s.parse::<IpAddr>().is_ok());
        Some(Serving {
            dir,
            dns_names: dns_names.into_iter().cloned().collect(),
            ips: ips.iter().filter_map(|s| s.parse().ok()).collect(),
        })
    }
}

fn parse_ca_ref(s: &str) -> Result<CaRef, String> {
    let (namespace, name) = kubenft_proto::parse_namespaced_name(s)?;
    Ok(CaRef { namespace, name })
}

/// `NAMESPACE/NAME` to the user name of that ServiceAccount's tokens.
fn parse_service_account(s: &str) -> Result<String, String> {
    let (namespace, name) = kubenft_proto::parse_namespaced_name(s)?;
    Ok(format!("system:serviceaccount:{namespace}:{name}"))
}

/// `90s`, `30m`, `168h`: a positive whole number and a unit.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("{s:?} is not a duration such as 90s, 30m or 168h");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let n: u64 = s[..split].parse().map_err(|_| err())?;
    let unit = match &s[split..] {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(err()),
    };
    match n.checked_mul(unit) {
        Some(secs) if secs > 0 => Ok(Duration::from_secs(secs)),
        _ => Err(err()),
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

fn parse_interface_name(s: &str) -> Result<InterfaceName, String> {
    InterfaceName::new(s).map_err(|why| format!("not an interface name: {why}"))
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
    fn the_signer_issues_the_serving_certificate() {
        let parse = |args: &[&str]| {
            Args::try_parse_from(std::iter::once("kubenft-controller").chain(args.iter().copied()))
        };
        let a = parse(&[
            "--signer-ca-secret",
            "kubenft-system/kubenft-ca",
            "--serving-cert-dir",
            "/run/kubenft",
            "--serving-cert-san",
            "kubenft-controller.kubenft-system.svc",
            "--serving-cert-san",
            "10.0.0.1",
            "--signer-cert-duration",
            "24h",
        ])
        .unwrap();
        let files = a.tls().unwrap().unwrap();
        assert_eq!(files.cert, PathBuf::from("/run/kubenft/serving.pem"));
        assert_eq!(files.client_ca, PathBuf::from("/run/kubenft/ca.crt"));
        let signer = a.signer().unwrap();
        assert_eq!(signer.ca.to_string(), "kubenft-system/kubenft-ca");
        assert_eq!(
            signer.policy.agent_user,
            "system:serviceaccount:kubenft-system:kubenft-agent"
        );
        assert_eq!(signer.policy.max_duration, Duration::from_secs(86400));
        let serving = signer.serving.unwrap();
        assert_eq!(serving.ips, ["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(serving.dns_names, ["kubenft-controller.kubenft-system.svc"]);

        let mixed = parse(&[
            "--signer-ca-secret",
            "ns/ca",
            "--serving-cert-dir",
            "/d",
            "--client-ca-file",
            "ca.crt",
        ])
        .unwrap();
        assert!(
            mixed
                .tls()
                .unwrap_err()
                .contains("--serving-cert-dir replaces")
        );
        assert!(parse(&["--serving-cert-dir", "/d", "--insecure"]).is_err());
        for bad in ["ns", "ns/", "NS/ca", "ns/ca/x"] {
            let e = parse(&["--signer-ca-secret", bad]).unwrap_err().to_string();
            assert!(e.contains("--signer-ca-secret"), "{e}");
        }
        for bad in ["0h", "10", "5d", "h"] {
            assert!(parse(&["--signer-cert-duration", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn detect_local_modes_take_kube_proxys_flags() {
        let parse = |args: &[&str]| {
            Args::try_parse_from(
                ["kubenft-controller", "--insecure"]
                    .into_iter()
                    .chain(args.iter().copied()),
            )
        };
        let mode = |args: &[&str]| parse(args).unwrap().detect_local();
        let name = |s: &str| InterfaceName::new(s).unwrap();
        assert_eq!(mode(&[]), Ok(DetectLocal::ClusterCidr));
        assert_eq!(
            mode(&["--detect-local-mode", "ClusterCIDR"]),
            Ok(DetectLocal::ClusterCidr)
        );
        assert_eq!(
            mode(&["--detect-local-mode", "NodeCIDR"]),
            Ok(DetectLocal::NodeCidr)
        );
        assert_eq!(
            mode(&[
                "--detect-local-mode",
                "BridgeInterface",
                "--pod-bridge-interface",
                "cbr0"
            ]),
            Ok(DetectLocal::BridgeInterface(name("cbr0")))
        );
        assert_eq!(
            mode(&[
                "--detect-local-mode=InterfaceNamePrefix",
                "--pod-interface-name-prefix=eni"
            ]),
            Ok(DetectLocal::InterfaceNamePrefix(name("eni")))
        );
        // A mode without its flag, a flag without its mode: refused, naming both.
        for (args, flags) in [
            (
                &["--detect-local-mode", "BridgeInterface"][..],
                ["--detect-local-mode", "--pod-bridge-interface"],
            ),
            (
                &["--detect-local-mode", "InterfaceNamePrefix"][..],
                ["--detect-local-mode", "--pod-interface-name-prefix"],
            ),
            (
                &["--pod-bridge-interface", "cbr0"][..],
                ["--detect-local-mode", "--pod-bridge-interface"],
            ),
            (
                &[
                    "--detect-local-mode",
                    "BridgeInterface",
                    "--pod-bridge-interface",
                    "cbr0",
                    "--pod-interface-name-prefix",
                    "cali",
                ][..],
                ["--detect-local-mode", "--pod-interface-name-prefix"],
            ),
        ] {
            let err = mode(args).unwrap_err();
            for flag in flags {
                assert!(err.contains(flag), "{args:?}: {err}");
            }
        }
        // kube-proxy's spelling only; names that are not safe interface names are refused.
        for args in [
            &["--detect-local-mode", "clustercidr"][..],
            &["--detect-local-mode", "Bridge"][..],
            &["--pod-bridge-interface", "a-very-long-bridge"][..],
            &["--pod-bridge-interface", ""][..],
            &["--pod-interface-name-prefix", "cali*"][..],
            &["--pod-interface-name-prefix", "x\"; drop"][..],
            &["--pod-bridge-interface", "br 0"][..],
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(args[0]), "{args:?}: {err}");
        }
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

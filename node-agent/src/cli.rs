//! The command line (a stable interface: manifests and the lab depend on it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::nft::TableName;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "kubenft-agent",
    version = kubenft_proto::release::VERSION,
    about = "kubenft node agent: enforces its node's rule set with nftables"
)]
pub struct Args {
    /// This node's name [default: $NODE_NAME, else the hostname].
    #[arg(long, env = "NODE_NAME", value_parser = non_empty)]
    pub node_name: Option<String>,

    /// Controller gRPC URL (repeatable; tried in turn), e.g. https://192.168.50.2:9650 (the
    /// certificate is checked against the host); http:// only with --insecure.
    #[arg(long = "controller", value_name = "URL", value_parser = controller_url, required_unless_present_any = ["cleanup", "cleanup_kube_proxy", "controller_service"])]
    pub controllers: Vec<String>,

    /// Find the controllers instead as the ready endpoints of this Service, NAMESPACE/NAME:
    /// its EndpointSlices are watched through the API server (no Service rule is used), and
    /// the controllers' certificate is checked against NAME.NAMESPACE.svc.
    #[arg(long, value_name = "NAMESPACE/NAME", value_parser = kubenft_proto::parse_namespaced_name, conflicts_with = "controllers")]
    pub controller_service: Option<(String, String)>,

    /// The port (by its name in the Service) the controllers' gRPC is served on [default:
    /// grpc].
    #[arg(long, value_name = "NAME", requires = "controller_service")]
    pub controller_port_name: Option<String>,

    /// The name the controllers' certificate must carry, with --controller-service
    /// [default: NAME.NAMESPACE.svc].
    #[arg(long, value_name = "DNS_NAME", requires = "controller_service")]
    pub controller_server_name: Option<String>,

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

    /// Remove kube-proxy's rules as `kube-proxy --cleanup` does (its nftables tables, its
    /// iptables-nft chains and the jumps to them; nothing else), then exit. Run it on a node
    /// once kube-proxy no longer runs there.
    #[arg(long, conflicts_with = "cleanup")]
    pub cleanup_kube_proxy: bool,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// The agent's certificate (PEM, chain first), Subject CN `system:node:<node name>`: its
    /// client certificate towards the controllers, and the serving certificate of its
    /// inspection port (which then needs a SAN for the address clients dial). Re-read when
    /// it changes.
    #[arg(long, value_name = "PATH")]
    pub tls_cert_file: Option<PathBuf>,

    /// The agent certificate's private key (PEM); re-read when it changes.
    #[arg(long, value_name = "PATH")]
    pub tls_private_key_file: Option<PathBuf>,

    /// The CA that signs the controllers' serving certificates (PEM).
    #[arg(long, value_name = "PATH")]
    pub controller_ca_file: Option<PathBuf>,

    /// The CA that signs the client certificates the inspection port accepts (PEM)
    /// [default: --controller-ca-file].
    #[arg(long, value_name = "PATH")]
    pub client_ca_file: Option<PathBuf>,

    /// Connect to the controllers (http:// URLs) and serve inspection in plaintext, without
    /// TLS (only without the TLS flags).
    #[arg(long)]
    pub insecure: bool,

    /// Obtain the agent's certificate from the controllers' signer through the Kubernetes
    /// CertificateSigningRequest API, keep it (with its key) in DIR and renew it before it
    /// expires, instead of --tls-cert-file and --tls-private-key-file.
    #[arg(long, value_name = "DIR")]
    pub cert_dir: Option<PathBuf>,

    /// Kubeconfig for the API server (--cert-dir, --controller-service) [default:
    /// $KUBECONFIG, else in-cluster].
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
}

/// The flags that turn TLS on.
pub const TLS_FLAGS: &str = "--tls-cert-file, --tls-private-key-file and --controller-ca-file";

/// The agent's TLS files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentTls {
    /// Towards the controllers.
    pub client: kubenft_tls::ClientFiles,
    /// The inspection port's.
    pub inspect: kubenft_tls::ServerFiles,
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
    /// The agent's TLS files (`None` with `--insecure`), or why the command line is refused:
    /// TLS needs all three files and https:// URLs; plaintext must be asked for and takes
    /// http:// URLs only (an https:// URL never falls back to plaintext).
    pub fn tls(&self) -> Result<Option<AgentTls>, String> {
        if self.kubeconfig.is_some() && !self.uses_api_server() {
            return Err("--kubeconfig is for --cert-dir or --controller-service".into());
        }
        if self.controller_service.is_none()
            && (self.controller_port_name.is_some() || self.controller_server_name.is_some())
        {
            return Err(
                "--controller-port-name and --controller-server-name need --controller-service"
                    .into(),
            );
        }
        let issued = self.cert_dir().map(|d| d.file());
        if issued.is_some() && (self.tls_cert_file.is_some() || self.tls_private_key_file.is_some())
        {
            return Err(
                "--cert-dir replaces --tls-cert-file and --tls-private-key-file; give one or the other"
                    .into(),
            );
        }
        let files = [
            &self.tls_cert_file.clone().or(issued.clone()),
            &self.tls_private_key_file.clone().or(issued),
            &self.controller_ca_file,
        ];
        let wrong_scheme = |scheme: &str| {
            self.controllers
                .iter()
                .find(|u| !u.starts_with(scheme))
                .cloned()
        };
        match (files, self.insecure) {
            ([Some(cert), Some(key), Some(ca)], false) => {
                if let Some(url) = wrong_scheme("https://") {
                    return Err(format!(
                        "--controller {url}: TLS is configured ({TLS_FLAGS}), so the URL must be https://"
                    ));
                }
                Ok(Some(AgentTls {
                    client: kubenft_tls::ClientFiles {
                        cert: cert.clone(),
                        key: key.clone(),
                        ca: ca.clone(),
                    },
                    inspect: kubenft_tls::ServerFiles {
                        cert: cert.clone(),
                        key: key.clone(),
                        client_ca: self.client_ca_file.clone().unwrap_or_else(|| ca.clone()),
                    },
                }))
            }
            ([None, None, None], true) => {
                if self.client_ca_file.is_some() {
                    return Err(
                        "--client-ca-file needs TLS; it cannot be combined with --insecure".into(),
                    );
                }
                if let Some(url) = wrong_scheme("http://") {
                    return Err(format!(
                        "--controller {url}: an https:// URL needs {TLS_FLAGS} (it never falls back to plaintext)"
                    ));
                }
                Ok(None)
            }
            ([None, None, None], false) => Err(format!(
                "refusing to talk to the controller in plaintext: give {TLS_FLAGS}, or --insecure to run without TLS"
            )),
            (_, true) => Err(format!("--insecure cannot be combined with {TLS_FLAGS}")),
            (_, false) => Err(format!("TLS needs all of {TLS_FLAGS}")),
        }
    }

    /// Where the agent's certificate is obtained and kept (`--cert-dir`).
    pub fn cert_dir(&self) -> Option<crate::certs::CertDir> {
        Some(crate::certs::CertDir {
            dir: self.cert_dir.clone()?,
        })
    }

    /// The controllers' Service (`--controller-service`), with the certificate name to check
    /// when TLS is on.
    pub fn controller_service(&self) -> Option<crate::discovery::ServiceRef> {
        let (namespace, name) = self.controller_service.clone()?;
        let server_name = (!self.insecure).then(|| {
            self.controller_server_name
                .clone()
                .unwrap_or_else(|| format!("{name}.{namespace}.svc"))
        });
        Some(crate::discovery::ServiceRef {
            namespace,
            name,
            port_name: self
                .controller_port_name
                .clone()
                .unwrap_or_else(|| "grpc".into()),
            server_name,
        })
    }

    /// Whether the agent talks to the API server at all.
    pub fn uses_api_server(&self) -> bool {
        self.cert_dir.is_some() || self.controller_service.is_some()
    }

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
    fn an_issued_certificate_replaces_the_certificate_flags() {
        let base = [
            "--controller",
            "https://c:1",
            "--controller-ca-file",
            "ca.crt",
        ];
        let with = |extra: &[&str]| {
            let mut a = base.to_vec();
            a.extend_from_slice(extra);
            parse(&a).unwrap().tls()
        };
        let tls = with(&["--cert-dir", "/var/lib/kubenft/pki"])
            .unwrap()
            .unwrap();
        let file = PathBuf::from("/var/lib/kubenft/pki/kubenft-agent.pem");
        assert_eq!(
            (tls.client.cert.clone(), tls.client.key.clone()),
            (file.clone(), file.clone())
        );
        assert_eq!(tls.inspect.cert, file);
        let e = with(&["--cert-dir", "/d", "--tls-cert-file", "a.crt"]).unwrap_err();
        assert!(e.contains("--cert-dir replaces"), "{e}");
        assert!(with(&["--cert-dir", "/d", "--insecure"]).is_err());
        assert!(
            parse(&["--controller", "https://c:1", "--kubeconfig", "k"])
                .unwrap()
                .tls()
                .is_err()
        );
    }

    #[test]
    fn controllers_found_through_their_service() {
        let a = parse(&[
            "--controller-service",
            "kubenft-system/kubenft-controller",
            "--controller-ca-file",
            "ca.crt",
            "--cert-dir",
            "/d",
        ])
        .unwrap();
        assert!(a.tls().unwrap().is_some());
        let s = a.controller_service().unwrap();
        assert_eq!(
            s.server_name.as_deref(),
            Some("kubenft-controller.kubenft-system.svc")
        );
        assert_eq!(s.port_name, "grpc");
        let plain = parse(&["--controller-service", "ns/c", "--insecure"]).unwrap();
        assert_eq!(plain.controller_service().unwrap().server_name, None);
        assert!(parse(&["--controller-service", "ns/c", "--controller", "http://a:1"]).is_err());
        assert!(parse(&["--controller-service", "nope"]).is_err());
        let stray = parse(&["--controller", "http://a:1", "--controller-port-name", "x"]);
        assert!(stray.is_err() || stray.unwrap().tls().is_err());
    }

    #[test]
    fn repeatable_controllers_and_cleanup() {
        let a = parse(&["--controller", "http://a:1", "--controller", "http://b:2"]).unwrap();
        assert_eq!(a.controllers, ["http://a:1", "http://b:2"]);
        assert!(parse(&["--cleanup"]).is_ok());
        assert!(parse(&[]).is_err());
        let a = parse(&["--cleanup-kube-proxy"]).unwrap();
        assert!(a.cleanup_kube_proxy && !a.cleanup);
        let err = parse(&["--cleanup-kube-proxy", "--cleanup"]).unwrap_err();
        assert!(err.contains("--cleanup"), "{err}");
    }

    #[test]
    fn plaintext_only_when_asked_for() {
        let tls = |args: &[&str]| parse(args).unwrap().tls();
        let err = tls(&["--controller", "http://a:1"]).unwrap_err();
        for flag in [
            "--tls-cert-file",
            "--tls-private-key-file",
            "--controller-ca-file",
            "--insecure",
        ] {
            assert!(err.contains(flag), "{err}");
        }
        assert_eq!(tls(&["--insecure", "--controller", "http://a:1"]), Ok(None));
        let err = tls(&["--insecure", "--controller", "https://a:1"]).unwrap_err();
        assert!(err.contains("never falls back"), "{err}");
        let files = [
            "--tls-cert-file",
            "n.crt",
            "--tls-private-key-file",
            "n.key",
            "--controller-ca-file",
            "ca.crt",
        ];
        let with = |extra: &[&str]| {
            let mut a = files.to_vec();
            a.extend_from_slice(extra);
            tls(&a)
        };
        let t = with(&["--controller", "https://a:1"]).unwrap().unwrap();
        assert_eq!(t.inspect.client_ca, PathBuf::from("ca.crt"));
        assert_eq!(t.client.cert, PathBuf::from("n.crt"));
        let t = with(&["--controller", "https://a:1", "--client-ca-file", "ops.crt"])
            .unwrap()
            .unwrap();
        assert_eq!(t.inspect.client_ca, PathBuf::from("ops.crt"));
        let err = with(&["--controller", "http://a:1"]).unwrap_err();
        assert!(err.contains("must be https://"), "{err}");
        let err = with(&["--controller", "https://a:1", "--insecure"]).unwrap_err();
        assert!(err.contains("--insecure cannot"), "{err}");
        let err = tls(&["--controller", "https://a:1", "--tls-cert-file", "n.crt"]).unwrap_err();
        assert!(err.contains("needs all"), "{err}");
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

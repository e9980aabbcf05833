//! Health-check node ports: for every LoadBalancer Service with externalTrafficPolicy Local,
//! an HTTP server on its `healthCheckNodePort` that tells load balancers whether this node has
//! ready local endpoints, exactly as kube-proxy answers (docs/semantics.md row 17).
//!
//! Servers follow the applied state: after every commit [`HealthCheckPorts::sync`] opens the
//! ports that appeared, closes the ones that went away and updates the counts in place.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kubenft_nft::rules::{ServicePort, Spec};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::state::AppliedState;

/// What one health-check port reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the Service on this node (terminating ones do not count).
    pub local_endpoints: u32,
}

/// The ports the applied state asks for, and the addresses to serve them on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub ports: BTreeMap<u16, Target>,
    pub addresses: Vec<IpAddr>,
}

/// Reads the health-check ports out of the applied resources. Several ports (and both
/// families) of one Service share its health-check port; the largest count wins.
pub fn desired(state: &AppliedState) -> Desired {
    let mut ports: BTreeMap<u16, Target> = BTreeMap::new();
    for applied in state.applied() {
        let Spec::ServicePort(ServicePort {
            health_check: Some(hc),
            ..
        }) = &applied.spec
        else {
            continue;
        };
        let target = ports.entry(hc.port.get()).or_insert_with(|| Target {
            namespace: hc.namespace.clone(),
            name: hc.service.clone(),
            local_endpoints: 0,
        });
        target.local_endpoints = target.local_endpoints.max(hc.local_ready);
    }
    let node = state.node();
    let addresses = if node.node_port_all_addresses {
        vec![
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ]
    } else {
        node.node_port_ips.clone()
    };
    Desired { ports, addresses }
}

struct Running {
    addresses: Vec<IpAddr>,
    target: Arc<Mutex<Target>>,
    stop: CancellationToken,
}

/// The set of running health-check servers.
pub struct HealthCheckPorts {
    running: Mutex<BTreeMap<u16, Running>>,
    health: Arc<Health>,
    shutdown: CancellationToken,
}

#[derive(Clone)]
struct Shared {
    target: Arc<Mutex<Target>>,
    health: Arc<Health>,
}

impl HealthCheckPorts {
    pub fn new(health: Arc<Health>, shutdown: CancellationToken) -> Self {
        HealthCheckPorts {
            running: Mutex::new(BTreeMap::new()),
            health,
            shutdown,
        }
    }

    /// Brings the running servers to `desired`. Must be called inside a tokio runtime.
    pub fn sync(&self, desired: &Desired) {
        let mut running = self.running.lock();
        running.retain(|port, r| {
            let keep = desired.ports.contains_key(port) && r.addresses == desired.addresses;
            if !keep {
                tracing::info!(port, "closing health-check node port");
                r.stop.cancel();
            }
            keep
        });
        for (&port, target) in &desired.ports {
            if let Some(r) = running.get(&port) {
                *r.target.lock() = target.clone();
                continue;
            }
            let shared = Shared {
                target: Arc::new(Mutex::new(target.clone())),
                health: self.health.clone(),
            };
            let stop = self.shutdown.child_token();
            for &ip in &desired.addresses {
                self.serve(SocketAddr::new(ip, port), shared.clone(), stop.clone());
            }
            tracing::info!(port, service = %format!("{}/{}", target.namespace, target.name), "opened health-check node port");
            running.insert(
                port,
                Running {
                    addresses: desired.addresses.clone(),
                    target: shared.target,
                    stop,
                },
            );
        }
    }

    /// The ports being served (for tests and inspection).
    pub fn ports(&self) -> Vec<u16> {
        self.running.lock().keys().copied().collect()
    }

    fn serve(&self, addr: SocketAddr, shared: Shared, stop: CancellationToken) {
        let app = Router::new().fallback(answer).with_state(shared);
        // Bound at once when free, so that the port answers when `sync` returns.
        let first = bind(addr);
        tokio::spawn(async move {
            let bound = match first {
                Ok(l) => Ok(Some(l)),
                // kube-proxy serves the same port until it leaves the node (a migration).
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    let what = "health-check node port";
                    crate::migrate::ports::bind_when_free(what, addr, || bind(addr), &stop).await
                }
                Err(e) => Err(e),
            };
            let listener = match bound {
                Ok(Some(l)) => l,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "cannot open health-check node port");
                    return;
                }
            };
            let served = kubenft_tls::serve_http(listener, app, HC_LIMITS, stop, |r| {
                tracing::debug!(peer = %r.peer, reason = r.reason, "health-check port: refused a connection");
            })
            .await;
            if let Err(e) = served {
                tracing::warn!(%addr, error = %e, "health-check server failed");
            }
        });
    }
}

/// A health-check port's bounds: load balancers' probes are short requests from a few
/// dozen addresses; a slow or silent client is closed after 5 s without its headers.
const HC_LIMITS: kubenft_tls::HttpLimits = kubenft_tls::HttpLimits {
    max_connections: 64,
    header_read_timeout: std::time::Duration::from_secs(5),
    connection_lifetime: std::time::Duration::from_secs(60),
};

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    // An agent taking over the node (see `crate::lock`) may open these ports while the one
    // that held it is still closing its own.
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(64)
}

/// Any path: 200 when this node has ready local endpoints and the proxy is healthy, else 503.
async fn answer(State(shared): State<Shared>) -> Response {
    let target = shared.target.lock().clone();
    let healthy = shared.health.status().healthy;
    let body = serde_json::json!({
        "service": {"namespace": target.namespace, "name": target.name},
        "localEndpoints": target.local_endpoints,
        "serviceProxyHealthy": healthy,
    });
    let status = if target.local_endpoints > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = (status, body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        "x-load-balancing-endpoint-weight",
        HeaderValue::from(target.local_endpoints),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn answers_like_kube_proxy_and_follows_the_state() {
        let hc = HealthCheckPorts::new(Arc::new(Health::default()), CancellationToken::new());
        let port = free_port();
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        let mut desired = Desired {
            ports: BTreeMap::from([(
                port,
                Target {
                    namespace: "default".into(),
                    name: "web".into(),
                    local_endpoints: 2,
                },
            )]),
            addresses: vec![loopback],
        };
        hc.sync(&desired);
        let addr = SocketAddr::new(loopback, port);
        let reply = get(addr).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains("content-type: application/json"), "{reply}");
        assert!(reply.contains("x-content-type-options: nosniff"), "{reply}");
        assert!(
            reply.contains("x-load-balancing-endpoint-weight: 2"),
            "{reply}"
        );
        assert!(
            reply.contains(r#""localEndpoints":2"#)
                && reply.contains(r#""serviceProxyHealthy":true"#),
            "{reply}"
        );
        assert!(
            reply.contains(r#""service":{"name":"web","namespace":"default"}"#),
            "{reply}"
        );

        desired.ports.get_mut(&port).unwrap().local_endpoints = 0;
        hc.sync(&desired);
        let reply = get(addr).await;
        assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");

        hc.sync(&Desired::default());
        assert!(hc.ports().is_empty());
        let mut closed = false;
        for _ in 0..50 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(closed, "the port is still open");
    }

    /// kube-proxy holds a health-check node port until it leaves the node: the agent answers
    /// on it as soon as it is free.
    #[tokio::test]
    async fn a_port_another_program_holds_is_served_once_free() {
        let hc = HealthCheckPorts::new(Arc::new(Health::default()), CancellationToken::new());
        let kube_proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = kube_proxy.local_addr().unwrap();
        let desired = Desired {
            ports: BTreeMap::from([(
                addr.port(),
                Target {
                    namespace: "default".into(),
                    name: "web".into(),
                    local_endpoints: 1,
                },
            )]),
            addresses: vec![addr.ip()],
        };
        hc.sync(&desired);
        // While the other program holds the port, it gets the connections (and never
        // answers): the agent keeps trying meanwhile.
        tokio::time::sleep(crate::migrate::ports::RETRY * 2).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let read =
            tokio::time::timeout(std::time::Duration::from_millis(300), s.read(&mut buf)).await;
        assert!(
            read.is_err(),
            "answered while another program held the port"
        );
        drop((s, kube_proxy));
        let mut reply = None;
        for _ in 0..100 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                reply = Some(get(addr).await);
                break;
            }
        }
        let reply = reply.expect("the port was never served");
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains(r#""localEndpoints":1"#), "{reply}");
    }
}

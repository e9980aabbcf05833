//! Health-check node ports: for every LoadBalancer Service with externalTrafficPolicy Local,
//! an HTTP server on its `healthCheckNodePort` that tells load balancers whether this node has
//! ready local endpoints, exactly as kube-proxy answers (docs/semantics.md row 17).
//!
//! Servers follow the applied state: after every commit [`HealthCheckPorts::follow`] opens the
//! ports that appeared, closes the ones that went away and updates the counts in place. It
//! looks only at the resources the commit touched (an index, [`Wanted`], remembers the rest),
//! so a change costs what it changes, not the table: it runs before the ACK.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kubenft_nft::rules::{NodeRules, ServicePort, Spec};
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

/// Reads the health-check ports out of the applied resources, walking all of them. Several
/// ports (and both families) of one Service share its health-check port; the largest count
/// wins. [`Wanted`] keeps the same answer change by change.
pub fn desired(state: &AppliedState) -> Desired {
    let mut ports: BTreeMap<u16, Target> = BTreeMap::new();
    for applied in state.applied() {
        let Some((port, asked)) = asks(&applied.spec) else {
            continue;
        };
        let target = ports.entry(port).or_insert(Target {
            local_endpoints: 0,
            ..asked
        });
        target.local_endpoints = target.local_endpoints.max(asked.local_endpoints);
    }
    Desired {
        ports,
        addresses: addresses(state.node()),
    }
}

/// The health-check port one resource asks for, and what it would report for it alone.
fn asks(spec: &Spec) -> Option<(u16, Target)> {
    let Spec::ServicePort(ServicePort {
        health_check: Some(hc),
        ..
    }) = spec
    else {
        return None;
    };
    Some((
        hc.port.get(),
        Target {
            namespace: hc.namespace.clone(),
            name: hc.service.clone(),
            local_endpoints: hc.local_ready,
        },
    ))
}

/// Where the health-check ports listen: the node's NodePort addresses.
fn addresses(node: &NodeRules) -> Vec<IpAddr> {
    if node.node_port_all_addresses {
        vec![
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ]
    } else {
        node.node_port_ips.clone()
    }
}

/// The health-check ports the applied resources ask for, indexed so that a commit updates it
/// for the resources it touched only. Always equal to [`desired`] of the state it follows.
#[derive(Debug, Default)]
pub struct Wanted {
    /// What each resource asking for a port asks.
    by_resource: BTreeMap<String, (u16, Target)>,
    /// The resources asking for each port.
    by_port: BTreeMap<u16, BTreeSet<String>>,
    addresses: Vec<IpAddr>,
}

impl Wanted {
    /// Everything `state` asks for (a walk over every resource: at start only).
    pub fn of(state: &AppliedState) -> Wanted {
        let mut wanted = Wanted {
            addresses: addresses(state.node()),
            ..Wanted::default()
        };
        for applied in state.applied() {
            wanted.set(&applied.name, asks(&applied.spec));
        }
        wanted
    }

    /// Takes in a commit that touched `names` (the node's settings included); returns the
    /// ports whose report changed, or `None` if the addresses did (every port moves).
    pub fn update<'a>(
        &mut self,
        state: &AppliedState,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Option<BTreeSet<u16>> {
        let mut ports = BTreeSet::new();
        for name in names {
            ports.extend(self.set(name, state.spec(name).and_then(asks)));
        }
        let addresses = addresses(state.node());
        if addresses != self.addresses {
            self.addresses = addresses;
            return None;
        }
        Some(ports)
    }

    /// Records what one resource asks for now; returns the ports it asked for before and now.
    fn set(&mut self, name: &str, asked: Option<(u16, Target)>) -> Vec<u16> {
        let mut ports = Vec::new();
        if let Some((old, _)) = self.by_resource.remove(name) {
            if let Some(names) = self.by_port.get_mut(&old) {
                names.remove(name);
                if names.is_empty() {
                    self.by_port.remove(&old);
                }
            }
            ports.push(old);
        }
        if let Some((port, target)) = asked {
            self.by_port
                .entry(port)
                .or_default()
                .insert(name.to_owned());
            self.by_resource.insert(name.to_owned(), (port, target));
            ports.push(port);
        }
        ports
    }

    /// What `port` reports: the first resource's (by name) Service, the largest count.
    pub fn target(&self, port: u16) -> Option<Target> {
        let mut asking = self.by_port.get(&port)?.iter();
        let (_, first) = self.by_resource.get(asking.next()?)?;
        let local_endpoints = asking
            .filter_map(|name| self.by_resource.get(name))
            .map(|(_, t)| t.local_endpoints)
            .fold(first.local_endpoints, u32::max);
        Some(Target {
            local_endpoints,
            ..first.clone()
        })
    }

    /// Every port and the addresses, as [`desired`] gives them.
    pub fn desired(&self) -> Desired {
        Desired {
            ports: self
                .by_port
                .keys()
                .filter_map(|&port| Some((port, self.target(port)?)))
                .collect(),
            addresses: self.addresses.clone(),
        }
    }
}

struct Running {
    addresses: Vec<IpAddr>,
    target: Arc<Mutex<Target>>,
    stop: CancellationToken,
}

/// The set of running health-check servers.
pub struct HealthCheckPorts {
    running: Mutex<BTreeMap<u16, Running>>,
    /// What the applied state asks for, as last followed.
    wanted: Mutex<Wanted>,
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
            wanted: Mutex::new(Wanted::default()),
            health,
            shutdown,
        }
    }

    /// Serves what `state` asks for, from scratch (at start). Must be called inside a tokio
    /// runtime.
    pub fn follow_all(&self, state: &AppliedState) {
        let mut wanted = self.wanted.lock();
        *wanted = Wanted::of(state);
        self.sync(&wanted.desired());
    }

    /// Follows a commit that touched the resources `names`: only their ports are looked at
    /// (all of them if the node's addresses changed). Must be called inside a tokio runtime.
    pub fn follow<'a>(&self, state: &AppliedState, names: impl IntoIterator<Item = &'a str>) {
        let mut wanted = self.wanted.lock();
        let Some(ports) = wanted.update(state, names) else {
            self.sync(&wanted.desired());
            return;
        };
        let mut running = self.running.lock();
        for port in ports {
            self.sync_port(&mut running, port, wanted.target(port), &wanted.addresses);
        }
    }

    /// Brings the running servers to `desired`. Must be called inside a tokio runtime.
    pub fn sync(&self, desired: &Desired) {
        let mut running = self.running.lock();
        let gone: Vec<u16> = running
            .keys()
            .filter(|port| !desired.ports.contains_key(port))
            .copied()
            .collect();
        for port in gone {
            self.sync_port(&mut running, port, None, &desired.addresses);
        }
        for (&port, target) in &desired.ports {
            self.sync_port(&mut running, port, Some(target.clone()), &desired.addresses);
        }
    }

    /// Brings one port to `target` on `addresses`: opened, updated in place, moved (closed
    /// and opened again) or closed.
    fn sync_port(
        &self,
        running: &mut BTreeMap<u16, Running>,
        port: u16,
        target: Option<Target>,
        addresses: &[IpAddr],
    ) {
        if let Some(r) = running.get(&port) {
            match &target {
                Some(t) if r.addresses == addresses => {
                    *r.target.lock() = t.clone();
                    return;
                }
                _ => {
                    tracing::info!(port, "closing health-check node port");
                    r.stop.cancel();
                    running.remove(&port);
                }
            }
        }
        let Some(target) = target else {
            return;
        };
        let shared = Shared {
            target: Arc::new(Mutex::new(target.clone())),
            health: self.health.clone(),
        };
        let stop = self.shutdown.child_token();
        for &ip in addresses {
            self.serve(SocketAddr::new(ip, port), shared.clone(), stop.clone());
        }
        tracing::info!(port, service = %format!("{}/{}", target.namespace, target.name), "opened health-check node port");
        running.insert(
            port,
            Running {
                addresses: addresses.to_vec(),
                target: shared.target,
                stop,
            },
        );
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

    /// The index a commit updates for the resources it touched gives, after every commit,
    /// what a walk over the whole state gives: ports shared by several resources (the
    /// first's Service, the largest count), moved, dropped, and new node addresses.
    #[test]
    fn the_index_kept_change_by_change_matches_a_full_walk() {
        use kubenft_nft::transaction::TableName;
        use kubenft_proto::v1::{self, resource};

        fn lb(name: &str, service: &str, hc: u32, local_ready: u32) -> v1::Resource {
            let sp = v1::ServicePortRules {
                namespace: "ns".into(),
                service: service.into(),
                port_name: name.rsplit('/').next().unwrap_or_default().into(),
                protocol: v1::Protocol::Tcp as i32,
                family: v1::IpFamily::Ipv4 as i32,
                port: 80,
                cluster_ip: "10.96.0.10".into(),
                health_check_node_port: hc,
                local_ready_endpoints: local_ready,
                ..Default::default()
            };
            v1::Resource::versioned(name.into(), resource::Kind::ServicePort(sp))
        }
        fn node(ips: &[&str]) -> v1::Resource {
            let rules = v1::NodeRules {
                node_name: "a".into(),
                node_port_ips: ips.iter().map(|s| (*s).into()).collect(),
                ..Default::default()
            };
            v1::Resource::versioned("node".into(), resource::Kind::Node(rules))
        }
        let steps: Vec<(Vec<v1::Resource>, Vec<&str>)> = vec![
            (
                vec![
                    node(&["192.168.50.11"]),
                    lb("ns/web/b", "web", 30100, 1),
                    lb("ns/web/a", "web", 30100, 3),
                    lb("ns/db/a", "db", 30200, 0),
                ],
                vec![],
            ),
            // One port's count drops: the other port of the Service still reports 3.
            (vec![lb("ns/web/a", "web", 30100, 0)], vec![]),
            // A Service moves to another port; another one's port goes away.
            (vec![lb("ns/db/a", "db", 30300, 2)], vec!["ns/web/b"]),
            // A port name sorting first takes over the report's Service name.
            (vec![lb("ns/api/a", "api", 30300, 1)], vec![]),
            (
                vec![node(&["192.168.50.11", "192.168.50.12"])],
                vec!["ns/db/a"],
            ),
            (vec![], vec!["ns/web/a", "ns/api/a"]),
        ];
        let table = TableName::default();
        let mut state = AppliedState::unknown(0);
        let mut wanted = Wanted::of(&state);
        for (i, (resources, removed)) in steps.into_iter().enumerate() {
            let change = v1::Change {
                change_id: i as u64 + 1,
                resources,
                removed: removed.iter().map(|s| (*s).to_owned()).collect(),
                ..Default::default()
            };
            let diff = kubenft_nft::diff::diff(&state, &change, &table).unwrap();
            state.commit(diff, std::time::SystemTime::now());
            let touched = change
                .resources
                .iter()
                .map(|r| r.name.as_str())
                .chain(change.removed.iter().map(String::as_str));
            let moved = wanted.update(&state, touched).is_none();
            assert_eq!(moved, i == 0 || i == 4, "step {i}: addresses moved");
            assert_eq!(wanted.desired(), desired(&state), "step {i}");
        }
        assert!(wanted.desired().ports.is_empty());
        assert_eq!(desired(&state).ports.len(), 0);
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

//! Which Service serves an address and port, or a NodePort, that several Services claim.
//!
//! A [`Claim`] is one thing a Service asks every node to serve: one of its ports at one of its
//! addresses (ClusterIP, external IP, load-balancer IP), one port's NodePort, or its
//! healthCheckNodePort. Each is granted or refused alone, so a Service that claims what another
//! serves loses that claim only: its other ports (and the port's other addresses) keep working.
//!
//! A claim takes one or more [`Key`]s. The Service holding a key keeps it for as long as it
//! claims it (incumbency: a newcomer never takes away what already serves, whatever its
//! creationTimestamp says). Free keys go to the contenders in rank order: by
//! creationTimestamp, one without a timestamp after any with one, then by namespace/name. A
//! fresh build (the first, or a controller restart) has no incumbents, so every replica
//! computes the same answer from the same inputs; only a challenger that ranks before the
//! incumbent (an older Service edited to claim a held address; with `dir:` manifests, which
//! carry no timestamps, a name that sorts first) can get a different answer on a replica that
//! restarted than on one that saw the claim arrive. The API server's allocators never let
//! ClusterIPs or NodePorts collide, so with `kube` this concerns external and load-balancer
//! IPs, whose creationTimestamps the API server sets.
//!
//! A claim granted is held even where it is not served (an external IP of a port whose
//! ClusterIP:port was refused), so that who holds what never depends on planning.
//!
//! Settling is incremental: only the Services that changed, and those that waited for a key
//! a changed Service let go, are looked at.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use imbl::{OrdMap, OrdSet};
use kubenft_proto::v1::Protocol;

use crate::model::{ObjectName, Rejection, ServiceModel, family_of};
use crate::port::protocol_name;

/// What a node serves once: an address and port, or a NodePort (on every node address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Address(IpAddr, Protocol, u16),
    NodePort(Protocol, u16),
}

/// Which of a Service's addresses an address claim is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    ClusterIp,
    External,
    LoadBalancer,
}

/// One thing a Service asks for, granted or refused as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// `spec.ports[index]` (`protocol`/`port`) at `ip`.
    Address {
        via: Via,
        ip: IpAddr,
        protocol: Protocol,
        port: u16,
        index: usize,
    },
    /// `spec.ports[index].nodePort`.
    NodePort {
        protocol: Protocol,
        port: u16,
        index: usize,
    },
    /// `spec.healthCheckNodePort`: an HTTP server on every node. The API server allocates it
    /// from the same pool as nodePorts, so it conflicts with a nodePort of any protocol.
    HealthCheck(u16),
}

impl Claim {
    fn keys(&self) -> Vec<Key> {
        match *self {
            Claim::Address {
                ip, protocol, port, ..
            } => vec![Key::Address(ip, protocol, port)],
            Claim::NodePort { protocol, port, .. } => vec![Key::NodePort(protocol, port)],
            Claim::HealthCheck(port) => [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
                .into_iter()
                .map(|p| Key::NodePort(p, port))
                .collect(),
        }
    }
}

/// A claim refused, and the Service that holds (one of) its keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub claim: Claim,
    pub holder: ObjectName,
}

impl Refusal {
    /// The refusal as `ListRejected` shows it, naming the field of `svc` at fault.
    pub fn rejection(&self, svc: &ObjectName) -> Rejection {
        let (field, message) = match self.claim {
            Claim::Address {
                via,
                ip,
                protocol,
                port,
                index,
            } => {
                let what = match via {
                    Via::ClusterIp => "ClusterIP",
                    Via::External => "external IP",
                    Via::LoadBalancer => "load-balancer IP",
                };
                (
                    format!("spec.ports[{index}].port"),
                    format!(
                        "{what} {ip} port {port}/{} is already served for Service {}: \
                         this port is not served at that address",
                        upper(protocol),
                        self.holder
                    ),
                )
            }
            Claim::NodePort {
                protocol,
                port,
                index,
            } => (
                format!("spec.ports[{index}].nodePort"),
                format!(
                    "nodePort {port}/{} is already used by Service {}: \
                     this port is not served on node addresses",
                    upper(protocol),
                    self.holder
                ),
            ),
            Claim::HealthCheck(port) => (
                "spec.healthCheckNodePort".to_owned(),
                format!(
                    "node port {port} is already used by Service {}: no health check is served",
                    self.holder
                ),
            ),
        };
        Rejection {
            kind: "Service",
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            field,
            message,
        }
    }
}

fn upper(p: Protocol) -> String {
    protocol_name(p).to_uppercase()
}

/// Everything a Service claims: per port, its addresses of each family, then its NodePort;
/// then its healthCheckNodePort.
pub fn claims_of(svc: &ServiceModel) -> Vec<Claim> {
    let mut out = Vec::new();
    for p in &svc.ports {
        let (protocol, port, index) = (p.protocol, p.port.get(), p.index);
        let addresses = svc
            .cluster_ips
            .iter()
            .map(|ip| (Via::ClusterIp, ip))
            .chain(svc.external_ips.iter().map(|ip| (Via::External, ip)))
            .chain(
                svc.load_balancer_ips
                    .iter()
                    .map(|ip| (Via::LoadBalancer, ip)),
            )
            // Only the families the Service has a ClusterIP of are served at all.
            .filter(|(_, ip)| {
                svc.cluster_ips
                    .iter()
                    .any(|c| family_of(c) == family_of(ip))
            });
        for (via, ip) in addresses {
            out.push(Claim::Address {
                via,
                ip: *ip,
                protocol,
                port,
                index,
            });
        }
        if let Some(np) = p.node_port {
            out.push(Claim::NodePort {
                protocol,
                port: np.get(),
                index,
            });
        }
    }
    if let Some(hc) = svc.health_check_node_port {
        out.push(Claim::HealthCheck(hc.get()));
    }
    out
}

fn keys_of(svc: Option<&Arc<ServiceModel>>) -> BTreeSet<Key> {
    svc.map(|s| claims_of(s).iter().flat_map(Claim::keys).collect())
        .unwrap_or_default()
}

/// Who gets a free key first: the older Service (one without a creationTimestamp after every
/// one with), then by namespace/name.
fn rank(svc: &ServiceModel) -> impl Ord + '_ {
    (svc.created.is_none(), svc.created, &svc.id)
}

/// Who holds what, and which claims are refused. Persistent: a catalog's copy is O(1).
#[derive(Clone, Debug, Default)]
pub struct Claims {
    holders: OrdMap<Key, ObjectName>,
    /// The Services with refused claims, and those claims.
    refused: OrdMap<ObjectName, Arc<[Refusal]>>,
    /// For each key a Service holds, the others that claim it.
    waiting: OrdMap<Key, OrdSet<ObjectName>>,
}

impl Claims {
    /// The refused claims of one Service.
    pub fn refused(&self, id: &ObjectName) -> &[Refusal] {
        self.refused.get(id).map_or(&[], |r| r)
    }

    /// Every refused claim as a rejection.
    pub fn rejections(&self) -> impl Iterator<Item = Rejection> + '_ {
        self.refused
            .iter()
            .flat_map(|(id, refused)| refused.iter().map(move |r| r.rejection(id)))
    }

    /// Settles the claims after the Services named in `changed` went from `before` to `now`
    /// (added, updated or removed). Returns the other Services whose refusals changed (they
    /// gained a key a changed Service let go).
    pub fn update(
        &mut self,
        changed: &BTreeSet<ObjectName>,
        before: &OrdMap<ObjectName, Arc<ServiceModel>>,
        now: &OrdMap<ObjectName, Arc<ServiceModel>>,
    ) -> Vec<ObjectName> {
        // A changed Service lets go of the keys it no longer claims; it keeps the others.
        let mut contenders: BTreeSet<ObjectName> = BTreeSet::new();
        for id in changed {
            self.forget_refusals(id);
            // (A Service that is new holds nothing.)
            let Some(was) = before.get(id) else {
                continue;
            };
            let still = keys_of(now.get(id));
            for key in keys_of(Some(was)).difference(&still) {
                if self.holders.get(key) == Some(id) {
                    self.holders.remove(key);
                    // Those that waited for it contend again.
                    if let Some(waiters) = self.waiting.remove(key) {
                        contenders.extend(waiters.into_iter().filter(|w| !changed.contains(w)));
                    }
                }
            }
        }
        let waiters: Vec<ObjectName> = contenders.iter().cloned().collect();
        let mut order: Vec<&Arc<ServiceModel>> = changed
            .iter()
            .chain(&contenders)
            .filter_map(|id| now.get(id))
            .collect();
        order.sort_by(|a, b| rank(a).cmp(&rank(b)));

        let mut touched = Vec::new();
        for svc in order {
            let id = &svc.id;
            let old = self.forget_refusals(id);
            let mut refused = Vec::new();
            for claim in claims_of(svc) {
                let keys = claim.keys();
                let holder = keys
                    .iter()
                    .find_map(|k| self.holders.get(k).filter(|h| *h != id).cloned());
                match holder {
                    Some(holder) => {
                        for key in &keys {
                            if self.holders.get(key).is_some_and(|h| h != id) {
                                self.waiting.entry(*key).or_default().insert(id.clone());
                            }
                        }
                        refused.push(Refusal { claim, holder });
                    }
                    None => {
                        for key in keys {
                            self.holders.insert(key, id.clone());
                        }
                    }
                }
            }
            if waiters.contains(id) && old.as_deref().unwrap_or(&[]) != refused.as_slice() {
                touched.push(id.clone());
            }
            if !refused.is_empty() {
                self.refused.insert(id.clone(), refused.into());
            }
        }
        touched
    }

    /// Removes a Service's refusals, and it from the keys it waited for; returns them.
    fn forget_refusals(&mut self, id: &ObjectName) -> Option<Arc<[Refusal]>> {
        let old = self.refused.remove(id)?;
        for key in old.iter().flat_map(|r| r.claim.keys()) {
            if let Some(set) = self.waiting.get_mut(&key) {
                set.remove(id);
                if set.is_empty() {
                    self.waiting.remove(&key);
                }
            }
        }
        Some(old)
    }
}

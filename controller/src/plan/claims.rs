//! Which Service keeps an address and port (or a NodePort) that several Services claim: the
//! oldest, as the API server's allocators would have decided; the others are refused whole.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use imbl::OrdMap;
use kubenft_proto::v1::Protocol;

use super::protocol_name;
use crate::model::{ObjectName, Rejection, ServiceModel, family_of};

/// What one Service port claims on every node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Claim {
    Address(IpAddr, Protocol, u16),
    NodePort(Protocol, u16),
}

/// A claim with the index of the `spec.ports` entry making it (for the refusal message).
type Made = (Claim, usize);

/// The Services refused because an older Service (by creation time, then name) already holds
/// one of their claims, each with the reason. Refused Services claim nothing.
pub fn conflicts(
    services: &OrdMap<ObjectName, Arc<ServiceModel>>,
) -> OrdMap<ObjectName, Rejection> {
    let mut order: Vec<&ServiceModel> = services.values().map(|s| &**s).collect();
    order.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
    let mut held: HashMap<Claim, &ObjectName> = HashMap::with_capacity(order.len() * 2);
    let mut refused = OrdMap::new();
    let mut mine = Vec::new();
    for svc in order {
        mine.clear();
        claims_of(svc, &mut mine);
        let taken = mine
            .iter()
            .find_map(|(c, i)| held.get(c).filter(|o| ***o != svc.id).map(|o| (c, *i, *o)));
        match taken {
            Some((claim, index, owner)) => {
                refused.insert(svc.id.clone(), refusal(svc, *claim, index, owner));
            }
            None => held.extend(mine.iter().map(|(c, _)| (*c, &svc.id))),
        }
    }
    refused
}

/// Per family and port (the order of the refusal reported): its addresses, then its NodePort.
fn claims_of(svc: &ServiceModel, out: &mut Vec<Made>) {
    for cluster_ip in &svc.cluster_ips {
        let family = family_of(cluster_ip);
        for p in &svc.ports {
            let addresses = std::iter::once(cluster_ip)
                .chain(&svc.external_ips)
                .chain(&svc.load_balancer_ips)
                .filter(|ip| family_of(ip) == family);
            for ip in addresses {
                out.push((Claim::Address(*ip, p.protocol, p.port.get()), p.index));
            }
            if let Some(np) = p.node_port {
                out.push((Claim::NodePort(p.protocol, np.get()), p.index));
            }
        }
    }
}

fn refusal(svc: &ServiceModel, claim: Claim, index: usize, owner: &ObjectName) -> Rejection {
    let (field, what, protocol) = match claim {
        Claim::Address(ip, protocol, port) => ("port", format!("{ip} port {port}"), protocol),
        Claim::NodePort(protocol, np) => ("nodePort", format!("nodePort {np}"), protocol),
    };
    Rejection {
        kind: "Service",
        namespace: svc.id.namespace.clone(),
        name: svc.id.name.clone(),
        field: format!("spec.ports[{index}].{field}"),
        message: format!(
            "{what}/{} is already used by Service {owner}",
            protocol_name(protocol).to_uppercase()
        ),
    }
}

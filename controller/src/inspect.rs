//! `kubenft.v1.ControllerInspect`: what every node should have, what it has acknowledged, and why.

use std::sync::Arc;
use std::time::Duration;

use kubenft_nft::rules::Spec;
use kubenft_nft::trace::{Flow, NodeView, trace};
use kubenft_proto::release;
use kubenft_proto::v1::{
    GetNodeRulesRequest, GetServiceRequest, ListNodesRequest, ListNodesResponse,
    ListRejectedRequest, ListRejectedResponse, NodeRuleSet, NodeStatus, ObjectError, Resource,
    ServiceView, TraceRequest, TraceResponse, controller_inspect_server::ControllerInspect,
    resource,
};
use std::net::IpAddr;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::hub::Hub;
use crate::skew;
use kubenft_plan::model::{ObjectName, Rejection};

/// Inspection calls answered at once, over every connection, until their answers are sent:
/// each copies a node's rule set or every node's status; beyond it a call is refused with
/// RESOURCE_EXHAUSTED at once (`kubenft_tls::CallLimit`, applied where the server is built).
pub const CONCURRENT_CALLS: usize = 16;

pub struct InspectService {
    hub: Arc<Hub>,
}

impl InspectService {
    pub fn new(hub: Arc<Hub>) -> Self {
        InspectService { hub }
    }
}

fn object_error(r: &Rejection) -> ObjectError {
    ObjectError {
        kind: r.kind.to_owned(),
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        field: r.field.clone(),
        message: r.message.clone(),
    }
}

fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(value)
    }
}

#[tonic::async_trait]
impl ControllerInspect for InspectService {
    async fn list_nodes(
        &self,
        _: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let nodes = self
            .hub
            .statuses()
            .into_iter()
            .map(|(name, desired, s)| {
                let state = s.state(&desired.system_version);
                let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
                NodeStatus {
                    name,
                    connected: s.streams > 0,
                    state: state as i32,
                    desired_version: desired.system_version.clone(),
                    acked_version: s.acked_version,
                    last_nack_version: s.last_nack_version,
                    last_nack_error: s.last_nack_error,
                    lag_ms: s.pending_since.map_or(0, |t| ms(t.elapsed())),
                    resources: u32::try_from(desired.len()).unwrap_or(u32::MAX),
                    version_skew: s.streams > 0 && skew::release_differs(&s.agent_version),
                    agent_protocol_version: s.agent_protocol,
                    refused: s.refused.unwrap_or_default(),
                    agent_version: s.agent_version,
                    agent_addresses: s.agent_addresses.iter().map(ToString::to_string).collect(),
                    dataplane: s.dataplane,
                    nack_retries: s.nack_retries,
                    next_retry_ms: s.next_retry.map_or(0, |t| {
                        // At least 1 while a retry is due, even in the instant it is sent.
                        ms(t.saturating_duration_since(Instant::now())).max(1)
                    }),
                }
            })
            .collect();
        Ok(Response::new(ListNodesResponse {
            nodes,
            controller_version: release::VERSION.to_owned(),
            oldest_agent_protocol_version: release::OLDEST_AGENT_PROTOCOL,
            protocol_version: release::PROTOCOL_VERSION,
        }))
    }

    async fn get_node_rules(
        &self,
        request: Request<GetNodeRulesRequest>,
    ) -> Result<Response<NodeRuleSet>, Status> {
        let node = required(&request.get_ref().node, "node")?;
        let rules = self.hub.rules_for(node);
        Ok(Response::new(NodeRuleSet {
            node: node.to_owned(),
            system_version: rules.system_version.clone(),
            resources: rules.iter().map(|r| Resource::clone(r)).collect(),
        }))
    }

    async fn get_service(
        &self,
        request: Request<GetServiceRequest>,
    ) -> Result<Response<ServiceView>, Status> {
        let req = request.into_inner();
        let node = required(&req.node, "node")?;
        let name = required(&req.name, "name")?;
        let namespace = if req.namespace.is_empty() {
            "default"
        } else {
            req.namespace.as_str()
        };
        let rules = self.hub.rules_for(node);
        let resources: Vec<Resource> = rules
            .iter()
            .filter(|r| {
                matches!(&r.kind, Some(resource::Kind::ServicePort(p)) if p.namespace == namespace && p.service == name)
            })
            .map(|r| Resource::clone(r))
            .collect();
        let errors: Vec<ObjectError> = self
            .hub
            .rejections()
            .iter()
            .filter(|r| r.namespace == namespace && r.name == name && r.kind == "Service")
            .map(object_error)
            .collect();
        let id = ObjectName {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let notes = self.hub.catalog().explain(&self.hub.facts(node), &id);
        if resources.is_empty() && errors.is_empty() && notes.is_empty() {
            return Err(Status::not_found(format!("no Service {namespace}/{name}")));
        }
        Ok(Response::new(ServiceView {
            node: node.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            resources,
            errors,
            notes,
        }))
    }

    async fn list_rejected(
        &self,
        _: Request<ListRejectedRequest>,
    ) -> Result<Response<ListRejectedResponse>, Status> {
        let errors = self.hub.rejections().iter().map(object_error).collect();
        Ok(Response::new(ListRejectedResponse { errors }))
    }

    /// The agent's own trace function over the rule set computed for the node, with the
    /// controller's notes on the Service that matched (topology, refused endpoints...).
    async fn trace(
        &self,
        request: Request<TraceRequest>,
    ) -> Result<Response<TraceResponse>, Status> {
        let req = request.into_inner();
        let node = req.node.as_str();
        if node.is_empty() {
            return Err(Status::invalid_argument(
                "node: required (the node whose rules answer)",
            ));
        }
        if !self.hub.knows(node) {
            return Err(Status::invalid_argument(format!(
                "node: no node {node:?} (neither a Node object nor a connected agent)"
            )));
        }
        let flow = Flow::from_request(&req).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let rules = self.hub.rules_for(node);
        let mut refused = Vec::new();
        let specs: Vec<(&str, Spec)> = rules
            .iter()
            .filter_map(|r| match kubenft_nft::rules::validate(r) {
                Ok(spec) => Some((r.name.as_str(), spec)),
                Err(e) => {
                    refused.push(format!("left out, as the agent would refuse it: {e}"));
                    None
                }
            })
            .collect();
        let addresses = self.node_addresses(node);
        let view = NodeView {
            resources: specs.iter().map(|(n, s)| (*n, s)).collect(),
            addresses: &addresses,
        };
        let traced = trace(&view, &flow);
        let mut answer = traced.to_response(node, &rules.system_version);
        answer.steps.splice(0..0, refused);
        if let Some((namespace, name)) = traced.service_port.as_deref().and_then(service_of) {
            let id = ObjectName { namespace, name };
            let notes = self.hub.catalog().explain(&self.hub.facts(node), &id);
            answer
                .steps
                .extend(notes.into_iter().map(|n| format!("controller: {n}")));
        }
        Ok(Response::new(answer))
    }
}

impl InspectService {
    /// The node's addresses as the controller knows them: its Node's InternalIPs and what
    /// its agent reported.
    fn node_addresses(&self, node: &str) -> Vec<IpAddr> {
        let mut addresses: Vec<IpAddr> = self
            .hub
            .catalog()
            .nodes()
            .get(node)
            .map(|n| n.internal_ips.clone())
            .unwrap_or_default();
        addresses.extend(self.hub.facts(node).agent_addresses);
        addresses.sort();
        addresses.dedup();
        addresses
    }
}

/// The Service of a port resource named `<namespace>/<service>/<protocol>/<port>/<family>`.
fn service_of(resource: &str) -> Option<(String, String)> {
    let mut parts = resource.split('/');
    let namespace = parts.next()?;
    let name = parts.next()?;
    Some((namespace.to_owned(), name.to_owned()))
}

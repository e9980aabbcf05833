//! kubenft-plan: from validated Kubernetes objects to the rule set each node must enforce.
//! Pure: no I/O, no async runtime, so the compiler (not discipline) keeps it testable and
//! deterministic, and every controller replica computes the same bytes from the same inputs.
//!
//! ```text
//!  Service, EndpointSlice, Node ──model──▶ Inputs (validated, persistent maps)
//!  Inputs ──Catalog::build──▶ Catalog: one PortDraft per Service port and family, shared by
//!                             every node (claims settled, endpoints gathered)
//!  Catalog + AgentFacts ──rules_for / update──▶ NodeRuleSet: the node-wide rules plus one
//!                             resource per port, finished for that node (select: local
//!                             endpoints, topology; policy: NodePort addresses, local traffic)
//! ```
#![forbid(unsafe_code)]

pub mod catalog;
mod claims;
pub mod cores;
pub mod model;
pub mod policy;
pub mod port;
pub mod select;
pub mod view;

pub use catalog::Catalog;
pub use model::Inputs;
pub use policy::{ClusterPolicy, DetectLocal, InterfaceName, NodePortAddresses};
pub use port::AgentFacts;
pub use view::NodeRuleSet;

#[cfg(test)]
mod tests;

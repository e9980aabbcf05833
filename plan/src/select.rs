//! Endpoint selection, exactly as upstream `pkg/proxy/topology.go` (`CategorizeEndpoints`).
//!
//! For one Service port and one node it chooses, independently, the endpoints for cluster-wide
//! traffic (ready ones, topology-filtered, else serving-and-terminating ones anywhere) and for
//! Local policies (this node's ready ones, else this node's serving-and-terminating ones).
//! Endpoints that are neither ready nor serving are never used.

use crate::model::Conditions;

/// What selection needs to know of an endpoint.
pub trait Candidate {
    fn conditions(&self) -> Conditions;
    fn node_name(&self) -> Option<&str>;
    fn has_zone_hints(&self) -> bool;
    fn hinted_for_zone(&self, zone: &str) -> bool;
    fn has_node_hints(&self) -> bool;
    fn hinted_for_node(&self, node: &str) -> bool;
}

/// The node the view is for.
pub struct Site<'a> {
    pub name: &'a str,
    pub zone: Option<&'a str>,
}

/// Which topology filter the cluster-wide set uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopologyMode {
    None,
    PreferSameZone,
    PreferSameNode,
}

/// The chosen endpoints, as indices into the candidates.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Selection {
    pub cluster: Vec<usize>,
    pub local: Vec<usize>,
    pub topology: Option<TopologyMode>,
    /// The cluster-wide set fell back to terminating endpoints.
    pub cluster_terminating: bool,
    pub local_terminating: bool,
}

fn is_local<C: Candidate>(c: &C, node: &Site<'_>) -> bool {
    c.node_name() == Some(node.name)
}

fn serving_terminating(c: Conditions) -> bool {
    c.serving && c.terminating
}

/// Upstream `topologyModeFromHints`: all-or-nothing. Hints are used only when every ready
/// endpoint carries them and at least one is meant for this node (or its zone).
pub fn topology_mode<C: Candidate>(candidates: &[C], node: &Site<'_>) -> TopologyMode {
    let ready: Vec<&C> = candidates.iter().filter(|c| c.conditions().ready).collect();
    if ready.is_empty() {
        return TopologyMode::None;
    }
    if ready.iter().all(|c| c.has_node_hints())
        && ready.iter().any(|c| c.hinted_for_node(node.name))
    {
        return TopologyMode::PreferSameNode;
    }
    if let Some(zone) = node.zone
        && ready.iter().all(|c| c.has_zone_hints())
        && ready.iter().any(|c| c.hinted_for_zone(zone))
    {
        return TopologyMode::PreferSameZone;
    }
    TopologyMode::None
}

fn available_for_topology<C: Candidate>(c: &C, mode: TopologyMode, node: &Site<'_>) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::PreferSameNode => c.hinted_for_node(node.name),
        TopologyMode::PreferSameZone => node.zone.is_some_and(|z| c.hinted_for_zone(z)),
    }
}

/// Chooses the cluster-wide and local endpoint sets for one node.
pub fn categorize<C: Candidate>(candidates: &[C], node: &Site<'_>) -> Selection {
    let mode = topology_mode(candidates, node);
    let mut sel = Selection {
        topology: (mode != TopologyMode::None).then_some(mode),
        ..Default::default()
    };
    sel.cluster = indices(candidates, |c| {
        c.conditions().ready && available_for_topology(c, mode, node)
    });
    if sel.cluster.is_empty() {
        sel.cluster = indices(candidates, |c| serving_terminating(c.conditions()));
        sel.cluster_terminating = !sel.cluster.is_empty();
    }
    sel.local = indices(candidates, |c| is_local(c, node) && c.conditions().ready);
    if sel.local.is_empty() {
        sel.local = indices(candidates, |c| {
            is_local(c, node) && serving_terminating(c.conditions())
        });
        sel.local_terminating = !sel.local.is_empty();
    }
    sel
}

fn indices<C>(candidates: &[C], keep: impl Fn(&C) -> bool) -> Vec<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| keep(c))
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ep {
        cond: Conditions,
        node: &'static str,
        zones: Option<Vec<&'static str>>,
        nodes: Option<Vec<&'static str>>,
    }

    impl Candidate for Ep {
        fn conditions(&self) -> Conditions {
            self.cond
        }
        fn node_name(&self) -> Option<&str> {
            Some(self.node)
        }
        fn has_zone_hints(&self) -> bool {
            self.zones.as_ref().is_some_and(|z| !z.is_empty())
        }
        fn hinted_for_zone(&self, zone: &str) -> bool {
            self.zones.as_ref().is_some_and(|z| z.contains(&zone))
        }
        fn has_node_hints(&self) -> bool {
            self.nodes.as_ref().is_some_and(|n| !n.is_empty())
        }
        fn hinted_for_node(&self, node: &str) -> bool {
            self.nodes.as_ref().is_some_and(|n| n.contains(&node))
        }
    }

    const READY: Conditions = Conditions {
        ready: true,
        serving: true,
        terminating: false,
    };
    const TERMINATING: Conditions = Conditions {
        ready: false,
        serving: true,
        terminating: true,
    };
    const DEAD: Conditions = Conditions {
        ready: false,
        serving: false,
        terminating: true,
    };
    const UNREADY: Conditions = Conditions {
        ready: false,
        serving: true,
        terminating: false,
    };

    fn ep(cond: Conditions, node: &'static str) -> Ep {
        Ep {
            cond,
            node,
            zones: None,
            nodes: None,
        }
    }

    const A: Site<'static> = Site {
        name: "a",
        zone: Some("z1"),
    };

    #[test]
    fn ready_endpoints_are_preferred() {
        let eps = [
            ep(READY, "a"),
            ep(TERMINATING, "b"),
            ep(UNREADY, "a"),
            ep(DEAD, "b"),
        ];
        let s = categorize(&eps, &A);
        assert_eq!(s.cluster, vec![0]);
        assert_eq!(s.local, vec![0]);
    }

    #[test]
    fn terminating_fallback_is_chosen_separately_for_each_set() {
        // Only terminating locally, ready remotely: cluster → the remote ready one,
        // local → the local terminating one.
        let eps = [ep(TERMINATING, "a"), ep(READY, "b")];
        let s = categorize(&eps, &A);
        assert_eq!(s.cluster, vec![1]);
        assert_eq!(s.local, vec![0]);
        assert!(s.local_terminating && !s.cluster_terminating);
    }

    #[test]
    fn not_serving_is_never_used() {
        let eps = [ep(DEAD, "a"), ep(UNREADY, "b")];
        let s = categorize(&eps, &A);
        assert!(s.cluster.is_empty() && s.local.is_empty());
    }

    #[test]
    fn zone_hints_are_all_or_nothing() {
        let hinted = |node, zone| Ep {
            cond: READY,
            node,
            zones: Some(vec![zone]),
            nodes: None,
        };
        let eps = [hinted("a", "z1"), hinted("b", "z2")];
        let s = categorize(&eps, &A);
        assert_eq!(s.cluster, vec![0]);
        assert_eq!(s.topology, Some(TopologyMode::PreferSameZone));
        // One ready endpoint without hints: no filtering at all.
        let eps = [hinted("a", "z1"), ep(READY, "b")];
        assert_eq!(categorize(&eps, &A).cluster, vec![0, 1]);
        // No endpoint for this zone: no filtering.
        let eps = [hinted("a", "z3"), hinted("b", "z2")];
        assert_eq!(categorize(&eps, &A).cluster, vec![0, 1]);
        // Node without a zone label: no filtering.
        let eps = [hinted("a", "z1"), hinted("b", "z2")];
        let no_zone = Site {
            name: "a",
            zone: None,
        };
        assert_eq!(categorize(&eps, &no_zone).cluster, vec![0, 1]);
    }

    #[test]
    fn node_hints_win_over_zone_hints() {
        let e = |node, n| Ep {
            cond: READY,
            node,
            zones: Some(vec!["z1"]),
            nodes: Some(vec![n]),
        };
        let eps = [e("a", "a"), e("b", "b")];
        let s = categorize(&eps, &A);
        assert_eq!(s.cluster, vec![0]);
        assert_eq!(s.topology, Some(TopologyMode::PreferSameNode));
    }

    #[test]
    fn topology_does_not_touch_the_local_set() {
        let e = |node, zone| Ep {
            cond: READY,
            node,
            zones: Some(vec![zone]),
            nodes: None,
        };
        // This node's endpoint is hinted for another zone: cluster set excludes it, local keeps it.
        let eps = [e("a", "z2"), e("b", "z1")];
        let s = categorize(&eps, &A);
        assert_eq!(s.cluster, vec![1]);
        assert_eq!(s.local, vec![0]);
    }
}

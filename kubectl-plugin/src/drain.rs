//! `kubectl kubenft drain-status ADDRESS [--wait SECONDS]`: has every node stopped sending new
//! connections to this endpoint address? Every replica is asked; each node is judged by the
//! replica its agent is connected to.

use kubenft_proto::v1::{DrainState, NodeDrain};

use crate::status::{by_node, columns, short};

fn state(n: &NodeDrain) -> &'static str {
    match n.state() {
        DrainState::DrainDone => "DONE",
        DrainState::DrainPending => "PENDING",
        DrainState::DrainNotConnected | DrainState::Unspecified => "NOT_CONNECTED",
    }
}

/// Every node, merged across replicas; whether all are done.
pub fn merge(replies: &[(String, Vec<NodeDrain>)]) -> (Vec<(NodeDrain, String)>, bool) {
    let rows = by_node(replies, |n| n.node.as_str(), |n| n.connected);
    let done = rows.iter().all(|(n, _)| n.state() == DrainState::DrainDone);
    (rows, done)
}

/// What `drain-status` prints.
pub fn render(address: &str, rows: &[(NodeDrain, String)], done: bool) -> String {
    let mut cells = vec![
        ["NODE", "STATE", "ACKED", "NEEDED", "CONTROLLER", "REASON"]
            .map(String::from)
            .to_vec(),
    ];
    for (n, via) in rows {
        cells.push(vec![
            n.node.clone(),
            state(n).into(),
            short(&n.acked_version).into(),
            short(&n.needed_version).into(),
            if via.is_empty() {
                "-".into()
            } else {
                via.clone()
            },
            if n.reason.is_empty() {
                "-".into()
            } else {
                n.reason.clone()
            },
        ]);
    }
    let verdict = if done {
        format!("{address}: drained, no node sends it new connections\n")
    } else {
        format!("{address}: not drained\n")
    };
    verdict + &columns(&cells)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(node: &str, state: DrainState, connected: bool) -> NodeDrain {
        NodeDrain {
            node: node.into(),
            state: state as i32,
            connected,
            ..Default::default()
        }
    }

    #[test]
    fn a_node_is_judged_by_the_replica_it_streams_from() {
        let a = vec![
            drain("n1", DrainState::DrainDone, true),
            drain("n2", DrainState::DrainNotConnected, false),
        ];
        let b = vec![
            drain("n1", DrainState::DrainNotConnected, false),
            drain("n2", DrainState::DrainPending, true),
        ];
        let (rows, done) = merge(&[("cp-a".into(), a.clone()), ("cp-b".into(), b)]);
        assert!(!done);
        assert_eq!(state(&rows[0].0), "DONE");
        assert_eq!(state(&rows[1].0), "PENDING");
        assert_eq!(rows[1].1, "cp-b");
        let text = render("10.244.1.5", &rows, done);
        assert!(text.starts_with("10.244.1.5: not drained\nNODE"), "{text}");

        let b_done = vec![
            drain("n1", DrainState::DrainNotConnected, false),
            drain("n2", DrainState::DrainDone, true),
        ];
        let (_, done) = merge(&[("cp-a".into(), a), ("cp-b".into(), b_done)]);
        assert!(done, "each node is done where it is connected");
    }
}

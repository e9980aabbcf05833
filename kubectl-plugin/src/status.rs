//! `kubectl kubenft status`: every node, whichever replica its agent streams from.
//!
//! Each replica lists every node it knows, but only the one an agent is connected to knows
//! that agent's sync state; the others see it as not connected. So the merge takes, per node,
//! the answer of the replica it is connected to, and says which replica that is.

use std::collections::BTreeMap;
use std::fmt::Write;

use kubenft_proto::v1::{DataplaneState, ListNodesResponse, NodeStatus, SyncState};

/// One node as the cluster's controllers see it together.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub status: NodeStatus,
    /// The replica the node's agent is connected to (empty: none).
    pub via: String,
}

/// Per node, the answer of the replica its agent is connected to (with that replica's
/// address), else the first replica's answer (with no address). Sorted by node name.
pub fn by_node<T: Clone>(
    replies: &[(String, Vec<T>)],
    name: impl Fn(&T) -> &str,
    connected: impl Fn(&T) -> bool,
) -> Vec<(T, String)> {
    let mut rows: BTreeMap<String, (T, String)> = BTreeMap::new();
    for (addr, items) in replies {
        for item in items {
            let held_connected = rows.get(name(item)).map(|(held, _)| connected(held));
            if held_connected == Some(true) || (held_connected.is_some() && !connected(item)) {
                continue;
            }
            let via = if connected(item) {
                addr.clone()
            } else {
                String::new()
            };
            rows.insert(name(item).to_owned(), (item.clone(), via));
        }
    }
    rows.into_values().collect()
}

/// What every replica that answered says, merged by node.
pub fn merge(replies: &[(String, ListNodesResponse)]) -> Vec<Row> {
    let lists: Vec<(String, Vec<NodeStatus>)> = replies
        .iter()
        .map(|(addr, r)| (addr.clone(), r.nodes.clone()))
        .collect();
    by_node(&lists, |n| n.name.as_str(), |n| n.connected)
        .into_iter()
        .map(|(status, via)| Row { status, via })
        .collect()
}

fn state(s: &NodeStatus) -> &'static str {
    match s.state() {
        SyncState::Synced => "SYNCED",
        SyncState::Pending => "PENDING",
        SyncState::Nacked => "NACKED",
        SyncState::Repairing => "REPAIRING",
        SyncState::Diverged => "DIVERGED",
        SyncState::NotConnected | SyncState::Unspecified => "NOT_CONNECTED",
    }
}

fn dataplane(s: &NodeStatus) -> &'static str {
    match s.dataplane.as_ref().map(|d| d.state()) {
        Some(DataplaneState::DataplaneConverged) => "converged",
        Some(DataplaneState::DataplaneRepairing) => "repairing",
        Some(DataplaneState::DataplaneDiverged) => "diverged",
        _ => "-",
    }
}

/// A version as `kubectl` shows hashes: short.
pub fn short(version: &str) -> &str {
    if version.is_empty() {
        "-"
    } else {
        &version[..version.len().min(12)]
    }
}

/// Columns padded to their widest cell, three spaces apart.
pub fn columns(cells: &[Vec<String>]) -> String {
    let width = cells.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..width)
        .map(|i| {
            cells
                .iter()
                .filter_map(|row| row.get(i))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in cells {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("   ").trim_end());
    }
    out
}

/// The table `status` prints, one line per node, then one line per refused change.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "NODE",
        "STATE",
        "DATAPLANE",
        "ACKED",
        "DESIRED",
        "LAG",
        "RESOURCES",
        "CONTROLLER",
        "AGENT",
    ];
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for r in rows {
        let s = &r.status;
        cells.push(vec![
            s.name.clone(),
            state(s).into(),
            dataplane(s).into(),
            short(&s.acked_version).into(),
            short(&s.desired_version).into(),
            if s.lag_ms == 0 {
                "-".into()
            } else {
                format!("{}ms", s.lag_ms)
            },
            s.resources.to_string(),
            if r.via.is_empty() {
                "-".into()
            } else {
                r.via.clone()
            },
            if s.agent_version.is_empty() {
                "-".into()
            } else {
                s.agent_version.clone()
            },
        ]);
    }
    let mut out = columns(&cells);
    for r in rows.iter().filter(|r| !r.status.last_nack_error.is_empty()) {
        let _ = writeln!(
            out,
            "{}: refused {}: {}",
            r.status.name,
            short(&r.status.last_nack_version),
            r.status.last_nack_error.lines().next().unwrap_or_default()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, connected: bool, state: SyncState) -> NodeStatus {
        NodeStatus {
            name: name.into(),
            connected,
            state: state as i32,
            acked_version: if connected {
                "0123456789abcdef".into()
            } else {
                String::new()
            },
            ..Default::default()
        }
    }

    fn reply(nodes: Vec<NodeStatus>) -> ListNodesResponse {
        ListNodesResponse {
            nodes,
            ..Default::default()
        }
    }

    #[test]
    fn each_node_is_reported_by_the_replica_its_agent_streams_from() {
        let a = reply(vec![
            node("n1", true, SyncState::Synced),
            node("n2", false, SyncState::NotConnected),
            node("n3", false, SyncState::NotConnected),
        ]);
        let b = reply(vec![
            node("n1", false, SyncState::NotConnected),
            node("n2", true, SyncState::Pending),
            node("n3", false, SyncState::NotConnected),
        ]);
        let rows = merge(&[("cp-a:9090".into(), a), ("cp-b:9090".into(), b)]);
        let seen: Vec<(&str, &str, &str)> = rows
            .iter()
            .map(|r| (r.status.name.as_str(), state(&r.status), r.via.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                ("n1", "SYNCED", "cp-a:9090"),
                ("n2", "PENDING", "cp-b:9090"),
                ("n3", "NOT_CONNECTED", ""),
            ]
        );
    }

    #[test]
    fn the_table_aligns_columns_and_names_refusals() {
        let mut n1 = node("node-1", true, SyncState::Nacked);
        n1.last_nack_version = "fedcba9876543210".into();
        n1.last_nack_error = "nft: Error: Could not process rule\nmore".into();
        let rows = vec![Row {
            status: n1,
            via: "10.0.0.1:9090".into(),
        }];
        let text = table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("NODE     STATE    DATAPLANE"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("node-1   NACKED   -           0123456789ab"),
            "{text}"
        );
        assert!(lines[1].contains("10.0.0.1:9090"), "{text}");
        assert_eq!(
            lines[2],
            "node-1: refused fedcba987654: nft: Error: Could not process rule"
        );
    }
}

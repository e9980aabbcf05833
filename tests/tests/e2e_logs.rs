//! End to end: what an operator's log pipeline gets from `--log-format json`: one JSON object
//! per line, with the event's fields at the top level and the node on every push.

mod common;

use common::*;
use kubenft_lab::{Host, Proto};
use serde_json::Value;

/// The controller's JSON log lines (the lab's own banner lines are not the controller's).
fn json_lines(c: &Cluster) -> Vec<Value> {
    std::fs::read_to_string(c.controller.stderr_path())
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with("=== kubenft-lab"))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn json_logs_have_one_line_per_push_with_the_node_and_sizes() {
    let c = Cluster::start_with(two_node_web("10.96.0.97"), &["--log-format", "json"]);
    c.wait_answers(Host::Pod("client"), Proto::Tcp, vip("10.96.0.97:80"), START);
    c.wait_synced(START);
    let lines = json_lines(&c);
    assert!(!lines.is_empty(), "the controller logged nothing");
    for node in ["a", "b"] {
        let push = lines
            .iter()
            .find(|l| l["message"] == "pushed a change" && l["node"] == node)
            .unwrap_or_else(|| panic!("no push to {node} in:\n{}", c.controller.log_tail(40)));
        assert!(push["bytes"].as_u64().is_some_and(|b| b > 0), "{push}");
        assert!(push["resources"].as_u64().is_some_and(|r| r >= 2), "{push}");
        assert!(
            push["version"].as_str().is_some_and(|v| !v.is_empty()),
            "{push}"
        );
        assert_eq!(push["level"], "INFO", "{push}");
    }
    // Lines logged inside an agent's session carry that session's span, with the node.
    let status = lines
        .iter()
        .find(|l| l["message"] == "data plane status")
        .unwrap_or_else(|| panic!("no data plane status in:\n{}", c.controller.log_tail(40)));
    assert!(
        status["span"]["node"]
            .as_str()
            .is_some_and(|n| n == "a" || n == "b"),
        "{status}"
    );
}

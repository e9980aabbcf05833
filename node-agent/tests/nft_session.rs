//! Small transactions go through one long-lived `nft -i`: each is still all or nothing, a
//! refusal carries nft's message and leaves the session usable, and a session that died is
//! replaced without losing the next transaction.

mod common;

use std::net::IpAddr;

use kubenft_agent::nft::{
    Command, Element, ElementKey, Nft, NftCli, NftError, SetId, TableName, Transaction,
};
use kubenft_nft::rules::Family;

const TABLE: &str = "kna-session";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn tx(commands: Vec<Command>) -> Transaction {
    let mut tx = Transaction::new(TableName::new(TABLE).unwrap());
    for c in commands {
        tx.push(Family::V4, c);
    }
    tx
}

async fn add_cluster_ip(nft: &NftCli, addr: &str) {
    nft.apply(&tx(vec![Command::AddElement(Element::ClusterIp(ip(addr)))]))
        .await
        .unwrap_or_else(|e| panic!("adding {addr}: {e}"));
}

fn cluster_ips(ns: &common::Netns) -> String {
    let (ok, out, err) = ns.exec(&["nft", "list", "set", "ip", TABLE, "cluster-ips"]);
    assert!(ok, "{err}");
    out
}

/// The pids of the `nft -i` processes in the namespace.
fn sessions(ns: &common::Netns) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "pids", &ns.0])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|b| *b == 0).any(|a| a == b"-i"))
                .unwrap_or(false)
        })
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn transactions_through_the_session_are_atomic_and_survive_its_death() {
    if !common::require_root() {
        return;
    }
    let ns = common::Netns::new();
    let nft = NftCli::in_netns(&ns.0);
    nft.apply(&tx(vec![
        Command::AddTable,
        Command::AddSet(SetId::ClusterIps),
        Command::AddElement(Element::ClusterIp(ip("10.96.0.1"))),
    ]))
    .await
    .unwrap();
    assert!(cluster_ips(&ns).contains("10.96.0.1"));
    assert_eq!(sessions(&ns).len(), 1, "one long-lived nft -i");

    // Refused as a whole: 10.96.0.2 is not added, and nft's message comes back.
    let refused = nft
        .apply(&tx(vec![
            Command::AddElement(Element::ClusterIp(ip("10.96.0.2"))),
            Command::DeleteElement(ElementKey::ClusterIp(ip("10.96.0.99"))),
        ]))
        .await
        .unwrap_err();
    let NftError::Refused { stderr } = refused else {
        panic!("expected a refusal, got {refused:?}");
    };
    assert!(stderr.contains("No such file or directory"), "{stderr}");
    assert!(
        !stderr.contains("kubenft-sync"),
        "the marker leaked: {stderr}"
    );
    assert!(!cluster_ips(&ns).contains("10.96.0.2"));

    // The same session goes on.
    add_cluster_ip(&nft, "10.96.0.3").await;
    assert!(cluster_ips(&ns).contains("10.96.0.3"));

    // Killed while idle: the next transaction starts another and is applied.
    let before = sessions(&ns);
    for pid in &before {
        std::process::Command::new("kill")
            .args(["-9", pid])
            .status()
            .unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    add_cluster_ip(&nft, "10.96.0.4").await;
    assert!(cluster_ips(&ns).contains("10.96.0.4"));
    let after = sessions(&ns);
    assert_eq!(after.len(), 1);
    assert_ne!(after, before);
}

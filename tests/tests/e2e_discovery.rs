//! End to end for issue 13 item 1: agents find the controllers without pinned addresses and
//! without any Service rule, from the EndpointSlices of the controllers' Service watched
//! through the (fake) API server, and follow a controller that moves to another address
//! under continuous traffic: zero failed requests, nothing re-applied. An agent restarted
//! while the API server is away finds the controllers from its last list.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use kubenft_lab::topology::{CONTROLLER_GRPC_PORT, CONTROLLER_HTTP_PORT, CP_V4};
use kubenft_lab::{Host, Lab, ProbeOpts, Process, Proto, wait_until};
use serde_json::{Value, json};

const API: &str = "192.168.50.2:6443";
/// The controller's second home: another address of `cp`.
const MOVED_V4: &str = "192.168.50.3";
const AGENT_USER: &str = "system:serviceaccount:kubenft-system:kubenft-agent";

/// The fake API server over its own manifest directory (the controllers' EndpointSlice),
/// with one token per agent.
fn start_apiserver(lab: &Lab) -> (Process, PathBuf) {
    let dir = lab.dir().join("api-manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let user = |node: &str| json!({"username": AGENT_USER, "extra": {"authentication.kubernetes.io/node-name": [node]}});
    let users = lab.dir().join("users.json");
    std::fs::write(
        &users,
        json!({"token-a": user("a"), "token-b": user("b")}).to_string(),
    )
    .unwrap();
    let bin = lab.binary("kubenft-fake-apiserver").unwrap();
    let argv = [
        bin.to_str().unwrap(),
        "--listen",
        API,
        "--manifests",
        dir.to_str().unwrap(),
        "--watch",
        "--users",
        users.to_str().unwrap(),
    ];
    let api = lab.spawn("apiserver", Host::ControlPlane, &argv).unwrap();
    api.wait_for_stdout(&format!("http://{API}"), START)
        .unwrap_or_else(|e| panic!("fake API server: {e}"));
    (api, dir)
}

/// The controllers' EndpointSlice with one ready endpoint per address.
fn write_controller_slice(dir: &std::path::Path, addresses: &[&str]) {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true}}))
        .collect();
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "kubenft-controller-x1",
            "namespace": "kubenft-system",
            "labels": {"kubernetes.io/service-name": "kubenft-controller"},
        },
        "addressType": "IPv4",
        "ports": [
            {"name": "grpc", "port": CONTROLLER_GRPC_PORT, "protocol": "TCP"},
            {"name": "http", "port": CONTROLLER_HTTP_PORT, "protocol": "TCP"},
        ],
        "endpoints": endpoints,
    });
    let tmp = dir.join(".slice.tmp");
    std::fs::write(&tmp, slice.to_string()).unwrap();
    std::fs::rename(&tmp, dir.join("controller-slice.json")).unwrap();
}

/// An agent that knows no controller address: only the Service's name and the API server.
fn spawn_discovering_agent(lab: &Lab, node: &str) -> Process {
    let kubeconfig = lab.dir().join(format!("agent-{node}.kubeconfig"));
    let server = format!("http://{API}");
    let token = format!("token-{node}");
    std::fs::write(
        &kubeconfig,
        kubenft_fake_apiserver::kubeconfig_for(&server, Some(&token)),
    )
    .unwrap();
    let bin = lab.binary("kubenft-agent").unwrap().display().to_string();
    let mut argv = vec![bin];
    argv.extend(lab.agent_args_without_tls(node).unwrap());
    argv.extend(lab.tls().agent_args(&lab.tls().nodes[node]));
    argv.extend(
        [
            "--controller-service",
            "kubenft-system/kubenft-controller",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ]
        .map(String::from),
    );
    std::fs::create_dir_all(lab.dir().join(format!("state-{node}"))).unwrap();
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    lab.spawn(&format!("agent-{node}"), Host::Node(node), &argv)
        .unwrap()
}

/// The lab's controller, listening on `addr`.
fn spawn_controller_at(lab: &Lab, name: &str, addr: &str) -> Process {
    let mut args = lab.controller_default_args();
    for (flag, port) in [
        ("--grpc-listen", CONTROLLER_GRPC_PORT),
        ("--http-listen", CONTROLLER_HTTP_PORT),
    ] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = format!("{addr}:{port}");
    }
    let bin = lab
        .binary("kubenft-controller")
        .unwrap()
        .display()
        .to_string();
    let mut argv = vec![bin.as_str()];
    argv.extend(args.iter().map(String::as_str));
    lab.spawn(name, Host::ControlPlane, &argv).unwrap()
}

/// ListNodes from the controller at `addr`: node → state.
fn states_at(c: &Cluster, addr: &str) -> Vec<(String, String)> {
    let target = format!("{addr}:{CONTROLLER_GRPC_PORT}");
    let (ok, out, err) = c.grpcurl(
        Host::ControlPlane,
        &[
            "-servername",
            "kubenft-controller.kubenft-system.svc",
            &target,
            "kubenft.v1.ControllerInspect/ListNodes",
        ],
    );
    if !ok {
        eprintln!("ListNodes at {target}: {out} {err}");
        return Vec::new();
    }
    let v: Value = serde_json::from_str(&out).unwrap_or_default();
    v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or_default().to_owned(),
                n["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn all_synced_at(c: &Cluster, addr: &str) -> bool {
    let states = states_at(c, addr);
    states.len() == 2 && states.iter().all(|(_, s)| s == "SYNCED")
}

#[test]
fn agents_find_the_controllers_through_the_api_server_and_follow_them() {
    let lab = two_node_web("10.96.0.90");
    lab.exec_ok(
        Host::ControlPlane,
        &[
            "ip",
            "addr",
            "add",
            &format!("{MOVED_V4}/24"),
            "dev",
            "eth0",
        ],
    )
    .unwrap();
    let (api, api_dir) = start_apiserver(&lab);
    write_controller_slice(&api_dir, &[&CP_V4.to_string()]);
    let first = spawn_controller_at(&lab, "controller", &CP_V4.to_string());
    let agents = ["a", "b"]
        .map(|n| (n.to_string(), spawn_discovering_agent(&lab, n)))
        .into_iter()
        .collect();
    let c = Cluster {
        lab,
        controller: first,
        agents,
    };
    let target = vip("10.96.0.90:80");
    // The agents first list the controllers' EndpointSlice, then connect and sync.
    let started = wait_until(START, POLL, || {
        Ok::<_, String>(all_synced_at(&c, &CP_V4.to_string()))
    });
    if let Err(e) = started {
        panic!(
            "the agents did not sync through the discovered controller: {e}\n{}\n{}\n{}",
            c.agents["a"].log_tail(30),
            c.agents["b"].log_tail(30),
            c.controller.log_tail(30)
        );
    }
    wait_web_spread(&c, target, START);
    wait_until(START, POLL, || {
        Ok::<_, String>(all_synced_at(&c, &CP_V4.to_string()))
    })
    .unwrap_or_else(|e| panic!("not synced through the discovered controller: {e}"));
    let generations: Vec<String> = ["a", "b"].iter().map(|n| c.generation(n)).collect();

    // The controller moves: a replica starts at another address, the Service's endpoints
    // follow it, the old one is stopped. Traffic never stops and nothing is re-applied.
    let moved = spawn_controller_at(&c.lab, "controller-moved", MOVED_V4);
    let to = (Host::Pod("client"), Proto::Tcp, target);
    let every = (1000, Duration::from_millis(20));
    let (results, ()) = with_traffic(&c, to, &ProbeOpts::count(5), every, || {
        wait_until(START, POLL, || {
            let (code, _) = c.http_get(
                Host::ControlPlane,
                &format!("http://{MOVED_V4}:{CONTROLLER_HTTP_PORT}/readyz"),
            );
            Ok::<_, String>(code == 200)
        })
        .unwrap_or_else(|e| panic!("the moved controller is not ready: {e}"));
        write_controller_slice(&api_dir, &[MOVED_V4]);
        wait_until(START, POLL, || {
            Ok::<_, String>(["a", "b"].iter().all(|n| {
                stderr_of(&c.agents[*n])
                    .contains(&format!("https://{MOVED_V4}:{CONTROLLER_GRPC_PORT}"))
            }))
        })
        .unwrap_or_else(|e| panic!("the agents did not learn the new address: {e}"));
        c.controller.stop().unwrap();
        wait_until(START, POLL, || Ok::<_, String>(all_synced_at(&c, MOVED_V4)))
            .unwrap_or_else(|e| panic!("the agents did not follow the controller: {e}"));
        std::thread::sleep(Duration::from_millis(500));
    });
    assert_no_failed_request(&results, "while the controller moved");
    c.assert_trace_agrees("a", Host::Pod("client"), (Proto::Tcp, target), &results);
    let after: Vec<String> = ["a", "b"].iter().map(|n| c.generation(n)).collect();
    assert_eq!(
        after, generations,
        "following the controller re-applied rules"
    );
    for n in ["a", "b"] {
        let log = stderr_of(&c.agents[n]);
        assert!(
            log.contains(&format!(
                "connected to controller controller=https://{MOVED_V4}"
            )),
            "agent {n} did not reconnect to the moved controller:\n{log}"
        );
    }

    // The API server goes away and agent a restarts: its last list finds the controller.
    api.stop().unwrap();
    let agent_a = &c.agents["a"];
    agent_a.stop().unwrap();
    agent_a.start().unwrap();
    wait_until(START, POLL, || {
        Ok::<_, String>(
            stderr_of(agent_a)
                .matches("connected to controller")
                .count()
                >= 3,
        )
    })
    .unwrap_or_else(|e| {
        panic!(
            "agent a found no controller without the API server: {e}\n{}",
            stderr_of(agent_a)
        )
    });
    assert!(stderr_of(agent_a).contains("controllers from the last run"));
    assert!(wait_until(START, POLL, || Ok::<_, String>(all_synced_at(&c, MOVED_V4))).is_ok());
    assert_eq!(
        c.generation("a"),
        generations[0],
        "the restart re-applied rules"
    );
    drop(moved);
}

//! `kubectl kubenft why NAMESPACE/NAME --node N`: one Service as one node enforces it, and why.

use std::fmt::Write;

use kubenft_proto::v1::{Endpoint, ServicePortRules, ServiceView, resource};

fn endpoints(eps: &[Endpoint]) -> String {
    if eps.is_empty() {
        return "none".into();
    }
    let list: Vec<String> = eps
        .iter()
        .map(|e| {
            if e.ip.contains(':') {
                format!("[{}]:{}", e.ip, e.port)
            } else {
                format!("{}:{}", e.ip, e.port)
            }
        })
        .collect();
    list.join(", ")
}

fn port(out: &mut String, name: &str, sp: &ServicePortRules) {
    let _ = writeln!(out, "  {name}");
    let _ = writeln!(out, "    clusterIP {}:{}", sp.cluster_ip, sp.port);
    if sp.node_port != 0 {
        let _ = writeln!(out, "    nodePort {}", sp.node_port);
    }
    for ip in sp.external_ips.iter().chain(&sp.load_balancer_ips) {
        let _ = writeln!(out, "    external {ip}:{}", sp.port);
    }
    let _ = writeln!(out, "    endpoints: {}", endpoints(&sp.cluster_endpoints));
    if sp.external_traffic_local || sp.internal_traffic_local {
        let _ = writeln!(
            out,
            "    local endpoints: {}",
            endpoints(&sp.local_endpoints)
        );
    }
}

/// What `why` prints.
pub fn render(view: &ServiceView) -> String {
    let mut out = format!(
        "Service {}/{} on node {}\n",
        view.namespace, view.name, view.node
    );
    for e in &view.errors {
        let field = if e.field.is_empty() {
            String::new()
        } else {
            format!(" {}", e.field)
        };
        let _ = writeln!(out, "  refused{field}: {}", e.message);
    }
    let ports: Vec<_> = view
        .resources
        .iter()
        .filter_map(|r| match &r.kind {
            Some(resource::Kind::ServicePort(sp)) => Some((r.name.as_str(), sp)),
            _ => None,
        })
        .collect();
    if ports.is_empty() && view.errors.is_empty() {
        out.push_str("  not programmed on this node\n");
    }
    for (name, sp) in ports {
        port(&mut out, name, sp);
    }
    if !view.notes.is_empty() {
        out.push_str("why:\n");
        for n in &view.notes {
            let _ = writeln!(out, "  - {n}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use kubenft_proto::v1::{ObjectError, Resource};

    use super::*;

    #[test]
    fn a_port_its_endpoints_and_the_reasons_are_shown() {
        let sp = ServicePortRules {
            cluster_ip: "10.96.0.10".into(),
            port: 80,
            node_port: 30080,
            cluster_endpoints: vec![
                Endpoint {
                    ip: "10.244.1.2".into(),
                    port: 8080,
                    ..Default::default()
                },
                Endpoint {
                    ip: "fd00::2".into(),
                    port: 8080,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let view = ServiceView {
            node: "a".into(),
            namespace: "default".into(),
            name: "web".into(),
            resources: vec![Resource {
                name: "default/web/tcp/http/ipv4".into(),
                kind: Some(resource::Kind::ServicePort(sp)),
                ..Default::default()
            }],
            errors: vec![ObjectError {
                field: "spec.externalIPs[0]".into(),
                message: "not an IP address".into(),
                ..Default::default()
            }],
            notes: vec!["externalTrafficPolicy Cluster".into()],
        };
        assert_eq!(
            render(&view),
            "Service default/web on node a\n  refused spec.externalIPs[0]: not an IP address\n  default/web/tcp/http/ipv4\n    clusterIP 10.96.0.10:80\n    nodePort 30080\n    endpoints: 10.244.1.2:8080, [fd00::2]:8080\nwhy:\n  - externalTrafficPolicy Cluster\n"
        );
    }
}

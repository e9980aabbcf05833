//! `kubectl kubenft trace --node N --source S --destination D --port P [--protocol TCP]`:
//! where one new connection goes on node N, from the controller's view of that node.

use std::fmt::Write;

use kubenft_proto::v1::{Protocol, TraceResponse};

/// The protocol named on the command line, as the API spells it.
pub fn protocol(name: &str) -> Result<Protocol, String> {
    match name.to_ascii_uppercase().as_str() {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        _ => Err(format!("--protocol {name:?}: TCP, UDP or SCTP")),
    }
}

/// What `trace` prints: the verdict line, then what decided it.
pub fn render(t: &TraceResponse) -> String {
    let mut out = t.verdict().as_str_name().to_owned();
    if !t.endpoints.is_empty() {
        let _ = write!(out, " to {}", t.endpoints.join(", "));
    }
    if t.masquerade {
        out.push_str(" (source masqueraded)");
    } else if !t.hairpin_endpoints.is_empty() {
        let _ = write!(
            out,
            " (masqueraded only to {})",
            t.hairpin_endpoints.join(", ")
        );
    }
    out.push('\n');
    if !t.service_port.is_empty() {
        let _ = writeln!(out, "service port: {}", t.service_port);
    }
    for step in &t.steps {
        let _ = writeln!(out, "  - {step}");
    }
    out
}

#[cfg(test)]
mod tests {
    use kubenft_proto::v1::TraceVerdict;

    use super::*;

    #[test]
    fn the_verdict_comes_first_then_the_steps() {
        let t = TraceResponse {
            verdict: TraceVerdict::Dnat as i32,
            endpoints: vec!["10.244.1.2:8080".into(), "10.244.2.2:8080".into()],
            masquerade: true,
            steps: vec!["ClusterIP of default/web".into()],
            service_port: "default/web/tcp/http/ipv4".into(),
            ..Default::default()
        };
        assert_eq!(
            render(&t),
            "DNAT to 10.244.1.2:8080, 10.244.2.2:8080 (source masqueraded)\nservice port: default/web/tcp/http/ipv4\n  - ClusterIP of default/web\n"
        );
        assert_eq!(protocol("udp"), Ok(Protocol::Udp));
        assert!(protocol("icmp").is_err());
    }
}

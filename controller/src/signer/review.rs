//! What the signer does with one CertificateSigningRequest: a pure function of the request,
//! the policy and the node it claims to be for.
//!
//! A request is approved only if the API server vouches for who sent it: `spec.username` and
//! `spec.extra` are written by the API server from the requester's credentials, never by the
//! requester. The agent's projected ServiceAccount token is bound to its pod, and the API
//! server records that pod's node as `authentication.kubernetes.io/node-name` (Kubernetes
//! 1.30 and later). So an agent can obtain a certificate for the node it runs on and for no
//! other.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use kubenft_tls::pki::{Leaf, Request};

/// The user extra the API server sets from a pod-bound ServiceAccount token.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The group every node certificate names, as the kubelet's does.
pub const NODES_GROUP: &str = "system:nodes";
/// The API server's lower bound on `spec.expirationSeconds`.
const MIN_EXPIRATION: Duration = Duration::from_secs(600);

/// Who may ask and for how long certificates are issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `system:serviceaccount:<namespace>:<name>` of the agents' ServiceAccount.
    pub agent_user: String,
    /// The longest lifetime issued (a request may ask for less).
    pub max_duration: Duration,
}

/// The parts of a CertificateSigningRequest the review reads.
#[derive(Clone, Debug, Default)]
pub struct Csr<'a> {
    pub username: &'a str,
    pub extra: BTreeMap<String, Vec<String>>,
    pub usages: Vec<String>,
    pub request_pem: &'a str,
    pub expiration_seconds: Option<i32>,
}

/// The review's outcome for a request that is still undecided.
#[derive(Clone, Debug)]
pub enum Decision {
    Issue(Box<Issuance>),
    Deny(String),
}

/// What to sign: the checked request (its public key is all the certificate takes from it)
/// and everything the signer decides.
#[derive(Clone, Debug)]
pub struct Issuance {
    pub node: String,
    pub request: Request,
    pub leaf: Leaf,
    pub validity: Duration,
}

/// The node the requester's token is bound to, if exactly one.
pub fn claimed_node<'c>(csr: &'c Csr<'_>) -> Option<&'c str> {
    match csr.extra.get(NODE_NAME_EXTRA).map(Vec::as_slice) {
        Some([node]) if !node.is_empty() => Some(node),
        _ => None,
    }
}

/// Reviews `csr`. `node_addresses` are the claimed node's addresses from its Node object
/// (`None`: no such Node). Every denial says which field is at fault.
pub fn review(csr: &Csr<'_>, policy: &Policy, node_addresses: Option<&[IpAddr]>) -> Decision {
    check(csr, policy, node_addresses).unwrap_or_else(Decision::Deny)
}

fn check(
    csr: &Csr<'_>,
    policy: &Policy,
    node_addresses: Option<&[IpAddr]>,
) -> Result<Decision, String> {
    if csr.username != policy.agent_user {
        return Err(format!(
            "spec.username: requested by {:?}; only {:?} (the agents' ServiceAccount) may request this signer's certificates",
            csr.username, policy.agent_user
        ));
    }
    let node = claimed_node(csr).ok_or_else(|| {
        format!("spec.extra: the requester's token is not bound to a pod on a node (no single {NODE_NAME_EXTRA}); Kubernetes 1.30 or later sets it for projected ServiceAccount tokens")
    })?;
    let request = Request::parse_pem(csr.request_pem)
        .map_err(|e| format!("spec.request: not a valid PEM certificate request: {e}"))?;
    let want = kubenft_tls::node_identity(node);
    if request.common_name.as_deref() != Some(want.as_str()) {
        return Err(format!(
            "spec.request: subject CN {:?} is not {want:?}, the node the requester runs on",
            request.common_name.as_deref().unwrap_or("")
        ));
    }
    if let Some(o) = request.organizations.iter().find(|o| *o != NODES_GROUP) {
        return Err(format!(
            "spec.request: organization {o:?} is not allowed (only {NODES_GROUP:?})"
        ));
    }
    if request.is_ca || !request.dns_names.is_empty() || request.other_names > 0 {
        return Err(
            "spec.request: only IP address names may be requested, and no CA certificate".into(),
        );
    }
    let server = check_usages(&csr.usages)?;
    let addresses =
        node_addresses.ok_or_else(|| format!("spec.extra: node {node:?} has no Node object"))?;
    if let Some(ip) = request.ips.iter().find(|ip| !addresses.contains(ip)) {
        return Err(format!(
            "spec.request: IP address {ip} is not an address of node {node:?}"
        ));
    }
    if !request.ips.is_empty() && !server {
        return Err("spec.usages: IP addresses are only for \"server auth\"".into());
    }
    let leaf = Leaf {
        common_name: want,
        organizations: vec![NODES_GROUP.into()],
        dns_names: Vec::new(),
        ips: request.ips.clone(),
        server,
        client: true,
    };
    Ok(Decision::Issue(Box::new(Issuance {
        node: node.to_owned(),
        request,
        leaf,
        validity: validity(csr.expiration_seconds, policy.max_duration),
    })))
}

/// Checks the requested usages; whether "server auth" is among them.
fn check_usages(usages: &[String]) -> Result<bool, String> {
    const ALLOWED: [&str; 4] = [
        "digital signature",
        "key encipherment",
        "client auth",
        "server auth",
    ];
    if let Some(u) = usages.iter().find(|u| !ALLOWED.contains(&u.as_str())) {
        return Err(format!(
            "spec.usages: {u:?} is not allowed (only {ALLOWED:?})"
        ));
    }
    if !usages.iter().any(|u| u == "client auth") {
        return Err("spec.usages: \"client auth\" is required".into());
    }
    Ok(usages.iter().any(|u| u == "server auth"))
}

fn validity(expiration_seconds: Option<i32>, max: Duration) -> Duration {
    expiration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
        .map_or(max, |asked| asked.max(MIN_EXPIRATION).min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "system:serviceaccount:kubenft-system:kubenft-agent";

    fn policy() -> Policy {
        Policy {
            agent_user: AGENT.into(),
            max_duration: Duration::from_secs(7 * 24 * 3600),
        }
    }

    fn request(cn: &str, ips: &[&str]) -> String {
        kubenft_tls::pki::request(&Leaf {
            common_name: cn.into(),
            organizations: vec![NODES_GROUP.into()],
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            client: true,
            server: true,
            ..Leaf::default()
        })
        .unwrap()
        .0
    }

    fn csr<'a>(pem: &'a str, user: &'a str, node: &str) -> Csr<'a> {
        Csr {
            username: user,
            extra: BTreeMap::from([(NODE_NAME_EXTRA.to_owned(), vec![node.to_owned()])]),
            usages: vec![
                "digital signature".into(),
                "client auth".into(),
                "server auth".into(),
            ],
            request_pem: pem,
            expiration_seconds: None,
        }
    }

    fn addrs(a: &[&str]) -> Vec<IpAddr> {
        a.iter().map(|i| i.parse().unwrap()).collect()
    }

    fn issued(d: Decision) -> Issuance {
        match d {
            Decision::Issue(issuance) => *issuance,
            other => panic!("expected a certificate, got {other:?}"),
        }
    }

    fn denial(d: Decision) -> String {
        match d {
            Decision::Deny(why) => why,
            other => panic!("expected a denial, got {other:?}"),
        }
    }

    #[test]
    fn the_agent_of_a_node_gets_that_nodes_certificate() {
        let pem = request("system:node:a", &["10.0.0.1"]);
        let node = addrs(&["10.0.0.1", "fd00::1"]);
        let d = review(&csr(&pem, AGENT, "a"), &policy(), Some(&node));
        let Issuance {
            node,
            leaf,
            validity,
            ..
        } = issued(d);
        assert_eq!(node, "a");
        assert_eq!(leaf.common_name, "system:node:a");
        assert_eq!(leaf.ips, addrs(&["10.0.0.1"]));
        assert!(leaf.client && leaf.server);
        assert_eq!(validity, policy().max_duration);
    }

    #[test]
    fn a_request_for_another_node_is_denied() {
        let pem = request("system:node:b", &[]);
        let why = denial(review(&csr(&pem, AGENT, "a"), &policy(), Some(&[])));
        assert!(
            why.contains("\"system:node:b\"") && why.contains("CN"),
            "{why}"
        );
    }

    #[test]
    fn only_the_agents_service_account_may_ask() {
        let pem = request("system:node:a", &[]);
        let other = "system:serviceaccount:default:web";
        let why = denial(review(&csr(&pem, other, "a"), &policy(), Some(&[])));
        assert!(why.starts_with("spec.username"), "{why}");
    }

    #[test]
    fn a_token_not_bound_to_a_node_is_denied() {
        let pem = request("system:node:a", &[]);
        let mut c = csr(&pem, AGENT, "a");
        c.extra.clear();
        let why = denial(review(&c, &policy(), Some(&[])));
        assert!(why.starts_with("spec.extra"), "{why}");
        c.extra
            .insert(NODE_NAME_EXTRA.into(), vec!["a".into(), "b".into()]);
        assert!(matches!(
            review(&c, &policy(), Some(&[])),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn addresses_must_be_the_nodes_and_names_are_refused() {
        let pem = request("system:node:a", &["10.0.0.9"]);
        let why = denial(review(
            &csr(&pem, AGENT, "a"),
            &policy(),
            Some(&addrs(&["10.0.0.1"])),
        ));
        assert!(why.contains("10.0.0.9"), "{why}");
        let why = denial(review(&csr(&pem, AGENT, "a"), &policy(), None));
        assert!(why.contains("no Node object"), "{why}");
        let dns = kubenft_tls::pki::request(&Leaf {
            common_name: "system:node:a".into(),
            dns_names: vec!["evil.example".into()],
            client: true,
            ..Leaf::default()
        })
        .unwrap()
        .0;
        let why = denial(review(&csr(&dns, AGENT, "a"), &policy(), Some(&[])));
        assert!(why.contains("only IP address names"), "{why}");
    }

    #[test]
    fn usages_and_lifetime_are_bounded() {
        let pem = request("system:node:a", &[]);
        let mut c = csr(&pem, AGENT, "a");
        c.usages = vec!["digital signature".into(), "cert sign".into()];
        assert!(denial(review(&c, &policy(), Some(&[]))).contains("cert sign"));
        c.usages = vec!["server auth".into()];
        assert!(denial(review(&c, &policy(), Some(&[]))).contains("client auth"));
        c.usages = vec!["client auth".into()];
        c.expiration_seconds = Some(60);
        let Issuance { validity, leaf, .. } = issued(review(&c, &policy(), Some(&[])));
        assert_eq!(validity, MIN_EXPIRATION);
        assert!(!leaf.server);
        c.expiration_seconds = Some(i32::MAX);
        let Issuance { validity, .. } = issued(review(&c, &policy(), Some(&[])));
        assert_eq!(validity, policy().max_duration);
    }

    #[test]
    fn garbage_is_denied_not_panicked_on() {
        let c = csr(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            AGENT,
            "a",
        );
        assert!(denial(review(&c, &policy(), Some(&[]))).starts_with("spec.request"));
    }
}

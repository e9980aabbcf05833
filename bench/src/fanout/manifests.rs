//! The workload as Kubernetes manifests for `--source dir:`: one file of Services per
//! namespace, one EndpointSlice file per Service (so a change rewrites one small file).

use std::fmt::Write as _;
use std::path::Path;

use crate::workload::{self, SERVICE_PORT, Service, TARGET_PORT, Workload};

/// Every 10th Service (index ≡ 5 mod 10) has internalTrafficPolicy Local.
pub fn is_local_policy(index: u32) -> bool {
    index % 10 == 5
}

fn service_yaml(out: &mut String, svc: &Service) {
    let policy = if is_local_policy(svc.index) {
        "  internalTrafficPolicy: Local\n"
    } else {
        ""
    };
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  clusterIP: {}\n{policy}  ports:\n  - name: http\n    port: {SERVICE_PORT}\n    protocol: TCP\n",
        svc.name(),
        svc.namespace(),
        svc.cluster_ip
    );
}

fn slice_yaml(svc: &Service) -> String {
    let mut out = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {0}-1\n  namespace: {1}\n  labels:\n    kubernetes.io/service-name: {0}\naddressType: IPv4\nports:\n- name: http\n  port: {TARGET_PORT}\n  protocol: TCP\nendpoints:\n",
        svc.name(),
        svc.namespace()
    );
    for e in &svc.endpoints {
        let _ = write!(
            out,
            "- addresses: [\"{}\"]\n  nodeName: {}\n  conditions: {{ready: true}}\n",
            e.ip,
            workload::node_name(e.node)
        );
    }
    out
}

/// Writes every Service and EndpointSlice of `w` into `dir`.
pub fn write_all(dir: &Path, w: &Workload) -> std::io::Result<()> {
    let mut by_namespace = vec![String::new(); 100];
    for svc in w.all() {
        service_yaml(&mut by_namespace[(svc.index % 100) as usize], &svc);
        std::fs::write(
            dir.join(format!("eps-{}.yaml", svc.index)),
            slice_yaml(&svc),
        )?;
    }
    for (ns, text) in by_namespace.iter().enumerate() {
        if !text.is_empty() {
            std::fs::write(dir.join(format!("svc-ns{ns}.yaml")), text)?;
        }
    }
    Ok(())
}

/// The Service change `c` touches (distinct Services for distinct `c`), with its first endpoint
/// moved to a fresh address on the same node.
pub fn changed_service(w: &Workload, c: u32, local: bool) -> Service {
    let groups = (w.services / 10).max(1);
    let group = (c * 101) % groups;
    let index = (group * 10 + if local { 5 } else { 1 }).min(w.services - 1);
    let mut svc = w.service(index);
    svc.endpoints[0].ip = workload::moved_ip(c);
    svc
}

/// Rewrites one Service's EndpointSlice atomically (the controller never sees half a file).
pub fn write_slice(dir: &Path, svc: &Service) -> std::io::Result<()> {
    let name = format!("eps-{}.yaml", svc.index);
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, slice_yaml(svc))?;
    std::fs::rename(&tmp, dir.join(name))
}

//! Refused objects reported where `kubectl describe` shows them: a Warning Event
//! (`events.k8s.io/v1`) on the object, reason `Rejected`, note `FIELD: MESSAGE`.
//!
//! Rate-limited twice over: one Event per refusal (object, field and message) per
//! [`RESEND`] while it lasts, and at most [`BURST`] Events at once across the cluster,
//! refilled one per [`REFILL`]; what does not fit waits for the next round. A thousand bad
//! manifests thus never become a thousand writes at once, and a refusal that lasts is said
//! again now and then (Events expire), not on every replan. Only `--source kube` runs it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kubenft_plan::model::Rejection;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::hub::Hub;

/// How often the refusals are looked at.
const ROUND: Duration = Duration::from_secs(2);
/// A refusal that lasts is reported again after this.
pub const RESEND: Duration = Duration::from_secs(600);
/// Events that may be written at once.
pub const BURST: u32 = 25;
/// One more Event may be written per this much time.
pub const REFILL: Duration = Duration::from_secs(1);
/// Who reports (`reportingController`).
pub const REPORTING_CONTROLLER: &str = "kubenft.io/controller";
/// Kubernetes refuses longer notes.
const MAX_NOTE: usize = 1024;

/// Which refusals are due for an Event, with their own clock so tests need not wait.
#[derive(Debug)]
pub struct Recorder {
    /// Each refusal reported, and when.
    reported: BTreeMap<Rejection, Instant>,
    tokens: u32,
    refilled: Instant,
}

impl Recorder {
    pub fn new(now: Instant) -> Recorder {
        Recorder {
            reported: BTreeMap::new(),
            tokens: BURST,
            refilled: now,
        }
    }

    /// The refusals to report now, among those that hold now. Forgets refusals that went
    /// away, so one that comes back is reported again at once.
    pub fn due(&mut self, current: &[Rejection], now: Instant) -> Vec<Rejection> {
        self.refill(now);
        self.reported.retain(|r, _| current.contains(r));
        let mut out = Vec::new();
        for r in current.iter().filter(|r| reportable(r)) {
            if self.tokens == 0 {
                break;
            }
            let fresh = self
                .reported
                .get(r)
                .is_none_or(|at| now.duration_since(*at) >= RESEND);
            if fresh {
                self.tokens -= 1;
                self.reported.insert(r.clone(), now);
                out.push(r.clone());
            }
        }
        out
    }

    fn refill(&mut self, now: Instant) {
        let earned = now.duration_since(self.refilled).as_secs_f64() / REFILL.as_secs_f64();
        let whole = earned.floor().min(f64::from(BURST)) as u32;
        if whole > 0 {
            self.tokens = (self.tokens + whole).min(BURST);
            self.refilled = now;
        }
    }
}

/// Only API objects get Events (not `File`, the directory source's unreadable files).
fn reportable(r: &Rejection) -> bool {
    matches!(r.kind, "Service" | "EndpointSlice" | "Node")
}

/// The Event for one refusal. Node Events go to `default`, as the kubelet's do.
pub fn event(r: &Rejection, instance: &str, now: k8s_openapi::jiff::Timestamp) -> Event {
    let (api_version, namespace) = match r.kind {
        "EndpointSlice" => ("discovery.k8s.io/v1", Some(r.namespace.clone())),
        "Node" => ("v1", None),
        _ => ("v1", Some(r.namespace.clone())),
    };
    let mut note = if r.field.is_empty() {
        r.message.clone()
    } else {
        format!("{}: {}", r.field, r.message)
    };
    if note.len() > MAX_NOTE {
        let mut cut = MAX_NOTE;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}.", r.name)),
            namespace: Some(namespace.clone().unwrap_or_else(|| "default".into())),
            ..Default::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some("Warning".into()),
        reason: Some("Rejected".into()),
        action: Some("Proxy".into()),
        note: Some(note),
        reporting_controller: Some(REPORTING_CONTROLLER.into()),
        reporting_instance: Some(instance.into()),
        regarding: Some(ObjectReference {
            api_version: Some(api_version.into()),
            kind: Some(r.kind.into()),
            name: Some(r.name.clone()),
            namespace,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// This replica's name in `reportingInstance`: the pod's (`POD_NAME`, set by the
/// Deployment) or the host's.
pub fn instance() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "kubenft-controller".into())
}

/// Reports the hub's refusals as Events until `shutdown`.
pub async fn run(client: kube::Client, hub: Arc<Hub>, shutdown: CancellationToken) {
    let instance = instance();
    let mut recorder = Recorder::new(Instant::now());
    let mut failing = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(ROUND) => {}
        }
        let now = k8s_openapi::jiff::Timestamp::now();
        for r in recorder.due(&hub.rejections(), Instant::now()) {
            let e = event(&r, &instance, now);
            let ns = e.metadata.namespace.clone().unwrap_or_default();
            let api: Api<Event> = Api::namespaced(client.clone(), &ns);
            match api.create(&PostParams::default(), &e).await {
                Ok(_) => {
                    failing = false;
                    debug!(kind = r.kind, namespace = %r.namespace, name = %r.name, "reported a refusal as an Event");
                }
                // Said once until it works again: a missing RBAC grant would otherwise log
                // every round.
                Err(error) if !failing => {
                    failing = true;
                    warn!(%error, "cannot write Events for refused objects (RBAC: create events.k8s.io/events)");
                }
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(name: &str) -> Rejection {
        Rejection {
            kind: "Service",
            namespace: "default".into(),
            name: name.into(),
            field: "spec.ports[0].nodePort".into(),
            message: "80 is outside 30000-32767".into(),
        }
    }

    #[test]
    fn a_refusal_is_reported_once_then_again_after_resend() {
        let t0 = Instant::now();
        let mut r = Recorder::new(t0);
        let bad = vec![refused("a")];
        assert_eq!(r.due(&bad, t0), bad);
        assert!(r.due(&bad, t0 + ROUND).is_empty());
        assert_eq!(r.due(&bad, t0 + RESEND), bad);
    }

    #[test]
    fn a_refusal_that_goes_and_comes_back_is_reported_again() {
        let t0 = Instant::now();
        let mut r = Recorder::new(t0);
        let bad = vec![refused("a")];
        r.due(&bad, t0);
        assert!(r.due(&[], t0 + ROUND).is_empty());
        assert_eq!(r.due(&bad, t0 + 2 * ROUND), bad);
    }

    #[test]
    fn a_flood_of_refusals_is_spread_by_the_budget() {
        let t0 = Instant::now();
        let mut r = Recorder::new(t0);
        let many: Vec<Rejection> = (0..100).map(|i| refused(&format!("s{i:03}"))).collect();
        assert_eq!(r.due(&many, t0).len(), BURST as usize);
        assert!(r.due(&many, t0).is_empty(), "no tokens left");
        let later = r.due(&many, t0 + 10 * REFILL);
        assert_eq!(later.len(), 10);
        // The next ones, not those already said.
        assert_eq!(later[0].name, "s025");
    }

    #[test]
    fn files_get_no_event_and_nodes_report_in_default() {
        let t0 = Instant::now();
        let mut r = Recorder::new(t0);
        let file = Rejection {
            kind: "File",
            ..refused("x.yaml")
        };
        assert!(r.due(&[file], t0).is_empty());
        let node = Rejection {
            kind: "Node",
            namespace: String::new(),
            ..refused("n1")
        };
        let e = event(&node, "cp-0", k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        assert_eq!(e.metadata.namespace.as_deref(), Some("default"));
        let regarding = e.regarding.unwrap();
        assert_eq!(regarding.kind.as_deref(), Some("Node"));
        assert_eq!(regarding.namespace, None);
        assert_eq!(
            e.note.as_deref(),
            Some("spec.ports[0].nodePort: 80 is outside 30000-32767")
        );
        assert_eq!(e.type_.as_deref(), Some("Warning"));
    }
}

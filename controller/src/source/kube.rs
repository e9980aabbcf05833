//! `--source kube`: Services, EndpointSlices and Nodes from the Kubernetes API.
//!
//! ```text
//!  watcher(Service)       ─┐  (default_backoff: list, watch, relist on 410, bounded retries)
//!  watcher(EndpointSlice) ─┼─▶ reflector Writers ─▶ debounce ─▶ objects_to_inputs ─▶ watch::Sender
//!  watcher(Node)          ─┘   (one Store per kind)  (≤20 ms quiet, ≤100 ms total)
//! ```
//!
//! Nothing is published until every kind's initial list is complete: a cold cache must never
//! push an empty rule set (an agent would delete every Service's rules). After that, each burst
//! of events becomes one snapshot of the three stores, so a rolling update that touches many
//! EndpointSlices costs one replan rather than one per event. Watch restarts, `410 Gone` and
//! relists are the watcher's job; here they are logged and counted. During a relist the
//! reflector keeps serving the previous complete list until the new one is done, so a relist
//! never publishes a partial view either.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{Objects, objects_to_inputs};
use crate::metrics::Metrics;
use crate::model::Limits;
use crate::plan::Inputs;

/// Quiet time after an event before publishing (more events in it are merged).
pub const DEBOUNCE: Duration = Duration::from_millis(20);
/// The longest a burst of events can delay publishing.
pub const MAX_DELAY: Duration = Duration::from_millis(100);
/// The label linking an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes configuration (neither KUBECONFIG/~/.kube/config nor in-cluster): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("creating the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from an explicit kubeconfig, else `KUBECONFIG` / `~/.kube/config`, else the
/// in-cluster environment (`KUBERNETES_SERVICE_HOST`/`PORT` and the service account token).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |source| Error::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(err)?
        }
        None => kube::Config::infer().await?,
    };
    info!(server = %config.cluster_url, "Kubernetes API");
    Ok(Client::try_from(config)?)
}

/// The kinds watched, as metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What one watcher step did, reduced to what the publishing loop needs.
#[derive(Clone, Debug)]
enum Outcome {
    /// A (re)list started.
    Init,
    /// An object of a list in progress (not visible in the store until `InitDone`).
    InitApply,
    /// A list completed: the store now holds it.
    InitDone,
    Apply,
    Delete,
    Error(String),
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Init => "init",
            Outcome::InitApply => "init_apply",
            Outcome::InitDone => "init_done",
            Outcome::Apply => "apply",
            Outcome::Delete => "delete",
            Outcome::Error(_) => "error",
        }
    }

    /// Whether the store's visible content may have changed.
    fn changes_store(&self) -> bool {
        matches!(self, Outcome::InitDone | Outcome::Apply | Outcome::Delete)
    }
}

type Steps = Pin<Box<dyn Stream<Item = (Kind, Outcome)> + Send>>;

/// One kind's watcher feeding its reflector writer; yields what each step did.
fn watch_kind<K>(api: Api<K>, config: watcher::Config, kind: Kind) -> (Store<K>, Steps)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, mut writer) = reflector::store::<K>();
    let steps = watcher(api, config).default_backoff().map(move |r| {
        let outcome = match r {
            Ok(event) => {
                writer.apply_watcher_event(&event);
                match event {
                    watcher::Event::Init => Outcome::Init,
                    watcher::Event::InitApply(_) => Outcome::InitApply,
                    watcher::Event::InitDone => Outcome::InitDone,
                    watcher::Event::Apply(_) => Outcome::Apply,
                    watcher::Event::Delete(_) => Outcome::Delete,
                }
            }
            Err(e) => Outcome::Error(describe(&e)),
        };
        (kind, outcome)
    });
    (store, Box::pin(steps))
}

/// A watcher error in one line, saying what the watcher will do about it.
fn describe(e: &watcher::Error) -> String {
    match e {
        watcher::Error::WatchError(status) if status.code == 410 => {
            format!("watch expired (410 Gone), relisting: {}", status.message)
        }
        other => format!("{other}; retrying with backoff"),
    }
}

/// The three stores.
struct Stores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
}

impl Stores {
    fn snapshot(&self) -> Objects {
        fn owned<K: Clone>(v: Vec<Arc<K>>) -> Vec<K> {
            v.into_iter().map(Arc::unwrap_or_clone).collect()
        }
        Objects {
            services: owned(self.services.state()),
            slices: owned(self.slices.state()),
            nodes: owned(self.nodes.state()),
            rejections: Vec::new(),
        }
    }
}

/// Watches the cluster and publishes validated inputs after every burst of changes, once all
/// initial lists are complete. Returns when `shutdown` is cancelled.
pub async fn run_kube(
    client: Client,
    limits: Limits,
    tx: watch::Sender<Option<Arc<Inputs>>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let (services, s1) = watch_kind(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        Kind::Service,
    );
    let (slices, s2) = watch_kind(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(SERVICE_NAME_LABEL),
        Kind::EndpointSlice,
    );
    let (nodes, s3) = watch_kind(
        Api::<Node>::all(client),
        watcher::Config::default(),
        Kind::Node,
    );
    let stores = Stores {
        services,
        slices,
        nodes,
    };
    let steps = futures::stream::select_all([s1, s2, s3]);
    publish_loop(steps, &stores, &limits, &tx, &metrics, &shutdown)
        .instrument(info_span!("source", kind = "kube"))
        .await;
}

/// Debounces store changes into published snapshots.
async fn publish_loop(
    mut steps: impl Stream<Item = (Kind, Outcome)> + Unpin,
    stores: &Stores,
    limits: &Limits,
    tx: &watch::Sender<Option<Arc<Inputs>>>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) {
    let mut listed = [false; 3];
    let mut pending = Debounce::default();
    loop {
        let deadline = pending.deadline();
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            () = sleep_until_opt(deadline) => {
                pending = Debounce::default();
                publish(stores, limits, tx);
            }
            step = steps.next() => {
                let Some((kind, outcome)) = step else { return };
                record(kind, &outcome, &mut listed, metrics);
                if outcome.changes_store() && listed.iter().all(|l| *l) {
                    pending.touch(Instant::now());
                }
            }
        }
    }
}

/// Counts and logs one watcher step; tracks which kinds have completed a list.
fn record(kind: Kind, outcome: &Outcome, listed: &mut [bool; 3], metrics: &Metrics) {
    metrics.source_event(kind.label(), outcome.label());
    match outcome {
        Outcome::Init if listed[kind.index()] => info!(kind = kind.label(), "relisting"),
        Outcome::Init => debug!(kind = kind.label(), "listing"),
        Outcome::InitDone => {
            if !listed[kind.index()] {
                info!(kind = kind.label(), "initial list complete");
            }
            listed[kind.index()] = true;
        }
        Outcome::Error(e) => {
            metrics.source_error(kind.label());
            warn!(kind = kind.label(), error = %e, "watch error");
        }
        Outcome::InitApply | Outcome::Apply | Outcome::Delete => {}
    }
}

fn publish(stores: &Stores, limits: &Limits, tx: &watch::Sender<Option<Arc<Inputs>>>) {
    let inputs = objects_to_inputs(stores.snapshot(), limits);
    info!(
        services = inputs.services.len(),
        slices = inputs.slices.len(),
        nodes = inputs.nodes.len(),
        rejected = inputs.rejections.len(),
        "cluster view updated"
    );
    for r in &inputs.rejections {
        debug!(rejection = %r, "object refused");
    }
    tx.send_replace(Some(Arc::new(inputs)));
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// When to publish a burst: `DEBOUNCE` after its last event, at most `MAX_DELAY` after its first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Debounce {
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Debounce {
    fn touch(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    fn deadline(&self) -> Option<Instant> {
        Some((self.last? + DEBOUNCE).min(self.first? + MAX_DELAY))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debounce_waits_for_quiet_but_not_forever() {
        let t0 = Instant::now();
        let mut d = Debounce::default();
        assert_eq!(d.deadline(), None);
        d.touch(t0);
        assert_eq!(d.deadline(), Some(t0 + DEBOUNCE));
        d.touch(t0 + Duration::from_millis(15));
        assert_eq!(d.deadline(), Some(t0 + Duration::from_millis(35)));
        for ms in (30..200).step_by(10) {
            d.touch(t0 + Duration::from_millis(ms));
        }
        assert_eq!(d.deadline(), Some(t0 + MAX_DELAY));
    }

    #[test]
    fn only_visible_changes_trigger_a_publish() {
        assert!(Outcome::InitDone.changes_store());
        assert!(Outcome::Delete.changes_store());
        assert!(!Outcome::InitApply.changes_store());
        assert!(!Outcome::Init.changes_store());
        assert!(!Outcome::Error(String::new()).changes_store());
    }
}

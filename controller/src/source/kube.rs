//! `--source kube`: Services, EndpointSlices and Nodes from the Kubernetes API.
//!
//! ```text
//!  watcher(Service)       ─┐  (default_backoff: list, watch, relist on 410, bounded retries)
//!  watcher(EndpointSlice) ─┼─▶ validate each object ─▶ Cache (Store) ─▶ debounce ─▶ watch::Sender
//!  watcher(Node)          ─┘                       (at once after a quiet spell, else ≤20 ms
//!                                                     quiet, ≤100 ms total)
//! ```
//!
//! Nothing is published until every kind's initial list is complete: a cold cache must never
//! push an empty rule set (an agent would delete every Service's rules). After that, a change
//! that comes after a quiet spell is published at once (waiting would only add its wait to
//! the programming latency), and a burst of events that follows becomes one published view,
//! so a rolling update that touches many EndpointSlices costs a replan or two rather than one
//! per event. Each object is validated once, when it arrives,
//! and only what it defines is updated. Watch restarts, `410 Gone` and relists are the
//! watcher's job; here they are logged and counted. During a relist the cache keeps the
//! previous complete list until the new one is done, so a relist never publishes a partial
//! view either.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{Batch, Objects, Store};
use crate::metrics::Metrics;
use kubenft_plan::Inputs;
use kubenft_plan::model::{Limits, ObjectName, one_line};

/// Quiet time after an event before publishing (more events in it are merged), when the last
/// publish was less than this long ago; a change after a longer quiet spell is published at
/// once.
pub const DEBOUNCE: Duration = Duration::from_millis(20);
/// The longest a burst of events can delay publishing.
pub const MAX_DELAY: Duration = Duration::from_millis(100);
/// Watcher steps already delivered that are taken in with the one awaited, before the next
/// publish (what a watch sends together is published together); bounded so that a flood
/// still lets the loop publish and stop.
const READY_STEPS: usize = 1024;
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
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

/// What one watcher step did, with its object already validated.
#[derive(Debug)]
enum Outcome {
    /// A (re)list started.
    Init,
    /// An object of a list in progress (not visible until `InitDone`).
    InitApply(ObjectName, Batch),
    /// A list completed: it replaces what was known of the kind.
    InitDone,
    Apply(ObjectName, Batch),
    Delete(ObjectName),
    /// A watcher error (the watcher retries), and whether it is a failure rather than the
    /// ordinary end of a watch (`410 Gone`, answered by a relist).
    Error(String, bool),
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Init => "init",
            Outcome::InitApply(..) => "init_apply",
            Outcome::InitDone => "init_done",
            Outcome::Apply(..) => "apply",
            Outcome::Delete(_) => "delete",
            Outcome::Error(..) => "error",
        }
    }

    /// Whether the visible view may have changed.
    fn changes_store(&self) -> bool {
        matches!(
            self,
            Outcome::InitDone | Outcome::Apply(..) | Outcome::Delete(_)
        )
    }
}

type Steps = Pin<Box<dyn Stream<Item = (Kind, Outcome)> + Send>>;

/// One object as the validation step sees it.
trait Watched:
    kube::Resource<DynamicType = ()>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
    fn into_objects(self) -> Objects;
}

impl Watched for Service {
    fn into_objects(self) -> Objects {
        Objects {
            services: vec![self],
            ..Default::default()
        }
    }
}

impl Watched for EndpointSlice {
    fn into_objects(self) -> Objects {
        Objects {
            slices: vec![self],
            ..Default::default()
        }
    }
}

impl Watched for Node {
    fn into_objects(self) -> Objects {
        Objects {
            nodes: vec![self],
            ..Default::default()
        }
    }
}

fn key_of<K: kube::Resource>(obj: &K) -> ObjectName {
    let meta = obj.meta();
    ObjectName {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
    }
}

/// One kind's watcher, each object validated as it arrives; yields what each step did.
fn watch_kind<K: Watched>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    limits: Limits,
) -> Steps {
    let validated = move |obj: K| (key_of(&obj), Batch::validate(&obj.into_objects(), &limits));
    let steps = watcher(api, config).default_backoff().map(move |r| {
        let outcome = match r {
            Ok(watcher::Event::Init) => Outcome::Init,
            Ok(watcher::Event::InitApply(obj)) => {
                let (key, batch) = validated(obj);
                Outcome::InitApply(key, batch)
            }
            Ok(watcher::Event::InitDone) => Outcome::InitDone,
            Ok(watcher::Event::Apply(obj)) => {
                let (key, batch) = validated(obj);
                Outcome::Apply(key, batch)
            }
            Ok(watcher::Event::Delete(obj)) => Outcome::Delete(key_of(&obj)),
            Err(e) => Outcome::Error(describe(&e), !is_gone(&e)),
        };
        (kind, outcome)
    });
    Box::pin(steps)
}

fn is_gone(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchError(status) if status.code == 410)
}

/// A watcher error in one line, saying what the watcher will do about it (the API server's
/// message is its own text: control characters are escaped).
fn describe(e: &watcher::Error) -> String {
    let text = match e {
        watcher::Error::WatchError(status) if status.code == 410 => {
            format!("watch expired (410 Gone), relisting: {}", status.message)
        }
        other => format!("{other}; retrying with backoff"),
    };
    one_line(&text).into_owned()
}

/// What the watchers have delivered: the visible objects of every kind, and the lists in
/// progress (a relist becomes visible whole, when it completes, as the reflector does).
#[derive(Default)]
struct Cache {
    store: Store<(Kind, ObjectName)>,
    listing: [Option<Vec<(ObjectName, Batch)>>; 3],
}

impl Cache {
    fn apply(&mut self, kind: Kind, outcome: Outcome) {
        match outcome {
            Outcome::Init => self.listing[kind.index()] = Some(Vec::new()),
            Outcome::InitApply(key, batch) => self.listing[kind.index()]
                .get_or_insert_with(Vec::new)
                .push((key, batch)),
            Outcome::InitDone => {
                let listed = self.listing[kind.index()].take().unwrap_or_default();
                let keep: std::collections::BTreeSet<&ObjectName> =
                    listed.iter().map(|(k, _)| k).collect();
                let gone: Vec<(Kind, ObjectName)> = self
                    .store
                    .keys()
                    .filter(|(k, name)| *k == kind && !keep.contains(name))
                    .cloned()
                    .collect();
                for key in &gone {
                    self.store.remove(key);
                }
                for (key, batch) in listed {
                    self.store.set((kind, key), batch);
                }
            }
            Outcome::Apply(key, batch) => self.store.set((kind, key), batch),
            Outcome::Delete(key) => self.store.remove(&(kind, key)),
            Outcome::Error(..) => {}
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
    let steps = futures::stream::select_all([
        watch_kind(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            Kind::Service,
            limits.clone(),
        ),
        watch_kind(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(SERVICE_NAME_LABEL),
            Kind::EndpointSlice,
            limits.clone(),
        ),
        watch_kind(
            Api::<Node>::all(client),
            watcher::Config::default(),
            Kind::Node,
            limits,
        ),
    ]);
    publish_loop(steps, &tx, &metrics, &shutdown)
        .instrument(info_span!("source", kind = "kube"))
        .await;
}

/// A kind whose watcher reported an error is failing until it delivers something again, or
/// until no further error came for a while: a watch re-established after an error says
/// nothing until something changes, so recovery can only be inferred from the silence. The
/// watcher retries with a backoff that doubles (0.8 s up to 30 s), so the silence must last
/// three times the last gap between errors, within these bounds.
const QUIET_MIN: Duration = Duration::from_secs(5);
const QUIET_MAX: Duration = Duration::from_secs(65);

/// One kind's last error: what it said, when, and how long after the one before.
struct LastError {
    error: String,
    at: Instant,
    gap: Option<Duration>,
}

impl LastError {
    fn expires(&self) -> Instant {
        let quiet = self
            .gap
            .map_or(QUIET_MIN, |g| (g * 3).clamp(QUIET_MIN, QUIET_MAX));
        self.at + quiet
    }
}

/// Which kinds are failing.
#[derive(Default)]
struct Failing([Option<LastError>; 3]);

impl Failing {
    /// Notes one step; `true` if it may change what is failing.
    fn note(&mut self, kind: Kind, outcome: &Outcome, now: Instant) -> bool {
        let slot = &mut self.0[kind.index()];
        match outcome {
            Outcome::Error(error, true) => {
                let gap = slot
                    .as_ref()
                    .map(|last| now.saturating_duration_since(last.at));
                *slot = Some(LastError {
                    error: error.clone(),
                    at: now,
                    gap,
                });
                true
            }
            Outcome::Error(_, false) | Outcome::Init => false,
            Outcome::InitApply(..)
            | Outcome::InitDone
            | Outcome::Apply(..)
            | Outcome::Delete(_) => slot.take().is_some(),
        }
    }

    /// Forgets the errors followed by a long enough silence.
    fn expire(&mut self, now: Instant) {
        for slot in &mut self.0 {
            if slot.as_ref().is_some_and(|last| now >= last.expires()) {
                *slot = None;
            }
        }
    }

    fn next_expiry(&self) -> Option<Instant> {
        self.0.iter().flatten().map(LastError::expires).min()
    }

    fn failures(&self) -> Vec<String> {
        [Kind::Service, Kind::EndpointSlice, Kind::Node]
            .into_iter()
            .filter_map(|k| {
                let last = self.0[k.index()].as_ref()?;
                Some(format!("{} watch failing: {}", k.label(), last.error))
            })
            .collect()
    }
}

/// Applies watcher steps to the cache and debounces its changes into published views.
async fn publish_loop(
    mut steps: impl Stream<Item = (Kind, Outcome)> + Unpin,
    tx: &watch::Sender<Option<Arc<Inputs>>>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) {
    let mut cache = Cache::default();
    let mut listed = [false; 3];
    let mut pending = Debounce::default();
    let mut failing = Failing::default();
    loop {
        let deadline = pending.deadline();
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            () = sleep_until_opt(deadline) => {
                pending.published(Instant::now());
                publish(&cache, tx);
            }
            () = sleep_until_opt(failing.next_expiry()) => {
                failing.expire(Instant::now());
                metrics.source_health.report(&failing.failures());
            }
            step = steps.next() => {
                let Some(mut step) = step else { return };
                for _ in 0..READY_STEPS {
                    let (kind, outcome) = step;
                    record(kind, &outcome, &mut listed, metrics);
                    if failing.note(kind, &outcome, Instant::now()) {
                        metrics.source_health.report(&failing.failures());
                    }
                    let visible = outcome.changes_store();
                    cache.apply(kind, outcome);
                    if visible && listed.iter().all(|l| *l) {
                        pending.touch(Instant::now());
                    }
                    // An ended stream is seen (and returned on) at the next `select!`.
                    match steps.next().now_or_never().flatten() {
                        Some(next) => step = next,
                        None => break,
                    }
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
        Outcome::Error(e, _) => {
            metrics.source_error(kind.label());
            warn!(kind = kind.label(), error = %e, "watch error");
        }
        Outcome::InitApply(..) | Outcome::Apply(..) | Outcome::Delete(_) => {}
    }
}

fn publish(cache: &Cache, tx: &watch::Sender<Option<Arc<Inputs>>>) {
    let inputs = cache.store.inputs();
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

/// When to publish the changes not yet published: at once if they began after a quiet spell
/// (nothing published for [`DEBOUNCE`]); otherwise once they pause for [`DEBOUNCE`], at most
/// [`MAX_DELAY`] after the first of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Debounce {
    first: Option<Instant>,
    last: Option<Instant>,
    published: Option<Instant>,
}

impl Debounce {
    fn touch(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    fn deadline(&self) -> Option<Instant> {
        let (first, last) = (self.first?, self.last?);
        if self.published.is_none_or(|p| first >= p + DEBOUNCE) {
            return Some(first);
        }
        Some((last + DEBOUNCE).min(first + MAX_DELAY))
    }

    fn published(&mut self, now: Instant) {
        *self = Debounce {
            published: Some(now),
            ..Debounce::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debounce_publishes_a_lone_change_at_once_and_waits_for_a_burst_to_pause() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut d = Debounce::default();
        assert_eq!(d.deadline(), None);
        // The first change, and one after a quiet spell: at once.
        d.touch(t0);
        assert_eq!(d.deadline(), Some(t0));
        d.published(t0);
        assert_eq!(d.deadline(), None);
        // What follows within DEBOUNCE of a publish is a burst: merged until it pauses ...
        d.touch(ms(5));
        assert_eq!(d.deadline(), Some(ms(25)));
        d.touch(ms(15));
        assert_eq!(d.deadline(), Some(ms(35)));
        // ... but not forever.
        for n in (30..200).step_by(10) {
            d.touch(ms(n));
        }
        assert_eq!(d.deadline(), Some(ms(5) + MAX_DELAY));
        d.published(ms(105));
        d.touch(ms(105) + DEBOUNCE);
        assert_eq!(d.deadline(), Some(ms(105) + DEBOUNCE));
    }

    #[test]
    fn a_kind_fails_until_it_delivers_or_falls_silent() {
        let t0 = Instant::now();
        let mut f = Failing::default();
        let error = || Outcome::Error("500".into(), true);
        assert!(!f.note(Kind::Node, &Outcome::Error("410".into(), false), t0));
        assert!(f.failures().is_empty(), "410 Gone is no failure");
        assert!(f.note(Kind::Node, &error(), t0));
        assert!(f.note(Kind::Service, &error(), t0));
        assert_eq!(f.failures().len(), 2);
        // Service delivers again: recovered. Node keeps failing, its retries further apart.
        assert!(f.note(Kind::Service, &Outcome::InitDone, t0));
        let t1 = t0 + Duration::from_secs(4);
        f.note(Kind::Node, &error(), t1);
        f.expire(t1 + Duration::from_secs(11));
        assert_eq!(f.failures(), ["Node watch failing: 500"]);
        assert_eq!(f.next_expiry(), Some(t1 + Duration::from_secs(12)));
        f.expire(t1 + Duration::from_secs(12));
        assert!(f.failures().is_empty());
    }

    #[test]
    fn only_visible_changes_trigger_a_publish() {
        assert!(Outcome::InitDone.changes_store());
        assert!(Outcome::Delete(ObjectName::default()).changes_store());
        assert!(!Outcome::InitApply(ObjectName::default(), Batch::default()).changes_store());
        assert!(!Outcome::Init.changes_store());
        assert!(!Outcome::Error(String::new(), true).changes_store());
    }
}

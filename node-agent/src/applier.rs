//! The one owner of the applied state's writes: plans each change, runs it through nft,
//! commits and persists it, and records health, metrics and logs.
//!
//! Other tasks (inspection) only read the state, through the shared lock.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use kubenft_proto::v1;
use parking_lot::RwLock;

use crate::apply;
use crate::conntrack;
use crate::hcport::{self, HealthCheckPorts};
use crate::health::Health;
use crate::metrics::{ChangeResult, Metrics};
use crate::model::Family;
use crate::nft::{Nft, TableName};
use crate::state::{self, AppliedState};

pub type SharedState = Arc<RwLock<AppliedState>>;

pub struct Applier<N> {
    nft: Arc<N>,
    table: TableName,
    state_dir: PathBuf,
    state: SharedState,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Health-check node ports follow the applied state (None in tests that do not serve them).
    hc_ports: Option<Arc<HealthCheckPorts>>,
}

impl<N: Nft> Applier<N> {
    pub fn new(
        nft: Arc<N>,
        table: TableName,
        state_dir: PathBuf,
        state: AppliedState,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Self {
        Applier {
            nft,
            table,
            state_dir,
            state: Arc::new(RwLock::new(state)),
            metrics,
            health,
            hc_ports: None,
        }
    }

    /// Serves the health-check node ports the applied state asks for, now and after every
    /// commit. Needs a tokio runtime.
    pub fn with_health_check_ports(mut self, ports: Arc<HealthCheckPorts>) -> Self {
        ports.sync(&hcport::desired(&self.state.read()));
        self.hc_ports = Some(ports);
        self
    }

    pub fn state(&self) -> &SharedState {
        &self.state
    }

    /// Applies one change; `Err` carries the NACK text (nft's stderr verbatim if nft refused).
    pub async fn handle(&self, change: &v1::Change) -> Result<(), String> {
        self.health.received();
        let result = self.apply(change).await;
        match &result {
            Ok(()) => {
                self.health.committed();
                self.health.converged();
                self.metrics.change(ChangeResult::ack);
            }
            Err(error) => {
                self.health.not_converged();
                self.metrics.change(ChangeResult::nack);
                self.state.write().last_error = error.clone();
            }
        }
        result
    }

    async fn apply(&self, change: &v1::Change) -> Result<(), String> {
        if change.resources.is_empty() && change.removed.is_empty() {
            tracing::debug!(
                change_id = change.change_id,
                "controller confirms we are current"
            );
            return Ok(());
        }
        let plan = apply::plan(&self.state.read(), change, &self.table).map_err(|e| {
            tracing::error!(change_id = change.change_id, error = %e, "refusing change");
            e.to_string()
        })?;
        let started = Instant::now();
        if let Err(e) = self.nft.apply(&plan.tx).await {
            self.metrics.sync_failed();
            tracing::error!(change_id = change.change_id, error = %e, "nft refused the transaction");
            return Err(e.to_string());
        }
        let elapsed = started.elapsed();
        self.metrics
            .synced(&plan.tx.changed_families(), elapsed.as_secs_f64());
        let (ops, full) = (plan.tx.element_ops(), plan.full);
        let (file, cleanup) = {
            let mut state = self.state.write();
            let touched: std::collections::BTreeSet<&str> = change
                .resources
                .iter()
                .map(|r| r.name.as_str())
                .chain(change.removed.iter().map(String::as_str))
                .collect();
            let old: Vec<v1::Resource> = touched
                .iter()
                .filter_map(|name| state.resource(name))
                .collect();
            state.commit(plan);
            if let Some(ports) = &self.hc_ports {
                ports.sync(&hcport::desired(&state));
            }
            self.health.set_deleting(state.node().deleting);
            (
                state.to_file(&self.table),
                conntrack::plan(&old, &change.resources),
            )
        };
        if !cleanup.is_empty() {
            // After the commit, off the ACK's path: new flows already follow the new rules.
            let metrics = self.metrics.clone();
            tokio::spawn(async move {
                let deleted = conntrack::run(cleanup).await;
                metrics.conntrack_deleted(deleted);
            });
        }
        tracing::info!(
            change_id = change.change_id,
            changed = change.resources.len(),
            removed = change.removed.len(),
            element_ops = ops,
            full_reconcile = full,
            generation = file.generation,
            duration_ms = elapsed.as_secs_f64() * 1e3,
            "applied change"
        );
        self.observe_programming(change);
        self.persist(file).await;
        Ok(())
    }

    /// Network programming latency: from each change's trigger time to now (committed).
    fn observe_programming(&self, change: &v1::Change) {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        for trigger in &change.trigger_times {
            let family = change
                .resources
                .iter()
                .find(|r| r.name == trigger.resource)
                .and_then(|r| match &r.kind {
                    Some(v1::resource::Kind::ServicePort(sp)) => Some(sp.family),
                    _ => None,
                });
            let family = match family.map(v1::IpFamily::try_from) {
                Some(Ok(v1::IpFamily::Ipv6)) => Family::V6,
                Some(Ok(_)) => Family::V4,
                _ => continue,
            };
            let elapsed_ms = now_ms.saturating_sub(trigger.unix_ms).max(0);
            self.metrics
                .network_programmed(family, elapsed_ms as f64 / 1000.0);
        }
    }

    /// Writes the state file. A failure only costs a full reconcile after a restart (the
    /// file's generation will not match the table's), so it is not fatal: it is logged when
    /// writing starts failing and when it works again (not after every change), and shown
    /// by `/healthz` while it lasts.
    async fn persist(&self, file: state::EncodedStateFile) {
        let dir = self.state_dir.clone();
        let saved = tokio::task::spawn_blocking(move || state::save(&dir, &file)).await;
        let error = match saved {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(format!("writing the state file panicked: {e}")),
        };
        if self.health.set_persist_error(error.clone()) {
            match error {
                Some(error) => tracing::warn!(
                    %error,
                    "cannot persist the applied state: a restart will reconcile in full (logged again once it works)"
                ),
                None => tracing::info!("the applied state is persisted again"),
            }
        }
    }
}

/// The state to start from: the state file if the kernel's tables carry its generation,
/// otherwise "unknown" (report nothing applied; the first change is a full reconcile).
pub async fn recover<N: Nft>(
    nft: &N,
    table: &TableName,
    state_dir: &std::path::Path,
) -> AppliedState {
    let file = match state::load(state_dir) {
        Ok(Some(file)) => file,
        Ok(None) => {
            tracing::info!("no state file: starting with a full reconcile");
            return AppliedState::unknown(0);
        }
        Err(e) => {
            tracing::warn!(error = %e, "unreadable state file: starting with a full reconcile");
            return AppliedState::unknown(0);
        }
    };
    let mut kernel = Vec::new();
    for f in Family::ALL {
        match nft.generation(table, f).await {
            Ok(g) => kernel.push(g),
            Err(e) => {
                tracing::warn!(error = %e, family = f.nft(), "cannot read the table's generation");
                kernel.push(None);
            }
        }
    }
    let next = kernel
        .iter()
        .flatten()
        .copied()
        .chain([file.generation])
        .max()
        .unwrap_or(0);
    if file.table != table.as_str() || kernel.iter().any(|g| *g != Some(file.generation)) {
        tracing::info!(file = file.generation, kernel = ?kernel, "state file does not match the tables: starting with a full reconcile");
        return AppliedState::unknown(next);
    }
    match AppliedState::adopt(file, table) {
        Ok(state) => {
            tracing::info!(
                generation = state.generation(),
                resources = state.len(),
                "adopted the applied state"
            );
            state
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot adopt the state file: starting with a full reconcile");
            AppliedState::unknown(next)
        }
    }
}

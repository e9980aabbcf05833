//! The one owner of the applied state's writes: plans each change, runs it through nft,
//! commits it, and records health, metrics and logs; the state file is written after the
//! ACK ([`crate::persist`]).
//!
//! Other tasks (inspection) only read the state, through the shared lock.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kubenft_proto::v1;
use parking_lot::RwLock;

use crate::conntrack;
use crate::drift::Dataplane;
use crate::hcport::HealthCheckPorts;
use crate::health::Health;
use crate::metrics::{ChangeResult, Metrics, transaction_family};
use crate::nft::{Chain, Nft, NftError, SetId, TableName, Transaction};
use crate::persist::StateWriter;
use crate::state::{self, AppliedState};
use kubenft_nft::diff;
use kubenft_nft::repair::{self, Damage, RepairKind};
use kubenft_nft::rules::Family;

/// Attempts of the same transaction before falling back to a full reconcile, and the wait
/// before each retry.
pub const RETRIES: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(400)];
/// What a NACK or a log line keeps of nft's error: its first lines name the failing command
/// and object; the rest is the whole script echoed back.
const ERROR_LINES: usize = 3;
const ERROR_CHARS: usize = 512;

/// One item of a change: a resource to apply, or the name of one to remove.
#[derive(Clone)]
enum Part {
    Resource(Box<v1::Resource>),
    Removal(String),
}

impl Part {
    fn name(&self) -> &str {
        match self {
            Part::Resource(r) => &r.name,
            Part::Removal(n) => n,
        }
    }

    /// A change made of some of `whole`'s items (with their trigger times).
    fn change(whole: &v1::Change, parts: &[Part]) -> v1::Change {
        let mut out = v1::Change {
            change_id: whole.change_id,
            ..Default::default()
        };
        for part in parts {
            match part {
                Part::Resource(r) => out.resources.push((**r).clone()),
                Part::Removal(n) => out.removed.push(n.clone()),
            }
        }
        out.trigger_times = whole
            .trigger_times
            .iter()
            .filter(|t| out.resources.iter().any(|r| r.name == t.resource))
            .cloned()
            .collect();
        out
    }
}

/// The first lines of an nft error, short enough for a NACK, a log line and `ListNodes`.
pub fn short_error(error: &str) -> String {
    let lines: Vec<&str> = error
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let mut kept: Vec<String> = Vec::new();
    let mut i = 0;
    while i < lines.len() && kept.len() < ERROR_LINES {
        // The `nft -i` session sends a transaction as one line: nft's echo of the failing
        // input is then the whole transaction. Keep the command its carets point at.
        if let Some(command) = lines.get(i + 1).and_then(|c| pointed_command(lines[i], c)) {
            kept.push(command.to_owned());
            i += 2;
            continue;
        }
        kept.push(lines[i].to_owned());
        i += 1;
    }
    let mut out = String::new();
    for line in &kept {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(line);
    }
    if out.len() > ERROR_CHARS {
        let mut cut = ERROR_CHARS;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

/// The `;`-separated command of `echo` under the first caret of `carets` (a line of spaces
/// and `^`), if `echo` holds several commands (`;` inside braces separates no commands).
fn pointed_command<'a>(echo: &'a str, carets: &str) -> Option<&'a str> {
    let col = carets.find('^')?;
    if !carets.chars().all(|c| c == ' ' || c == '^') {
        return None;
    }
    let mut depth = 0i32;
    let mut separators = Vec::new();
    for (i, c) in echo.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ';' if depth == 0 => separators.push(i),
            _ => {}
        }
    }
    if separators.is_empty() || col >= echo.len() {
        return None;
    }
    let start = separators
        .iter()
        .rev()
        .find(|&&i| i < col)
        .map_or(0, |i| i + 1);
    let end = separators
        .iter()
        .find(|&&i| i >= col)
        .map_or(echo.len(), |i| *i);
    Some(echo[start..end].trim())
}

/// The family a refused change's failure is counted under: that of the resource `name` nft
/// refused first if it is a Service port, else IPv4 (see [`transaction_family`]).
fn change_family(change: &v1::Change, name: &str) -> Family {
    let family = change
        .resources
        .iter()
        .find(|r| r.name == name)
        .and_then(|r| match &r.kind {
            Some(v1::resource::Kind::ServicePort(sp)) => v1::IpFamily::try_from(sp.family).ok(),
            _ => None,
        });
    match family {
        Some(v1::IpFamily::Ipv6) => Family::V6,
        _ => Family::V4,
    }
}

pub type SharedState = Arc<RwLock<AppliedState>>;

pub struct Applier<N> {
    nft: Arc<N>,
    table: TableName,
    state: SharedState,
    /// Writes the state file after commits, off the ACK's path.
    writer: Arc<StateWriter>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Health-check node ports follow the applied state (None in tests that do not serve them).
    hc_ports: Option<Arc<HealthCheckPorts>>,
    /// Whether the kernel holds the applied state (drift and repairs).
    dataplane: Arc<Dataplane>,
    /// One transaction at a time: changes and repairs both diff against the state and must
    /// see each other's commits.
    writing: tokio::sync::Mutex<()>,
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
        metrics.no_local_endpoints(&crate::proxy_counts::no_local_endpoints(&state));
        let state = Arc::new(RwLock::new(state));
        let writer = StateWriter::new(state_dir, table.clone(), state.clone(), health.clone());
        Applier {
            nft,
            table,
            state,
            writer: Arc::new(writer),
            metrics: metrics.clone(),
            health: health.clone(),
            hc_ports: None,
            dataplane: Arc::new(Dataplane::new(metrics.clone(), health.clone())),
            writing: tokio::sync::Mutex::new(()),
        }
    }

    pub fn dataplane(&self) -> &Arc<Dataplane> {
        &self.dataplane
    }

    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// How the kernel is watched for other programs' changes (`nft monitor`), if it can be.
    pub fn monitor_argv(&self) -> Option<Vec<String>> {
        self.nft.monitor_argv()
    }

    pub fn own_processes(&self) -> crate::nft::OwnProcesses {
        self.nft.own_processes()
    }

    /// Repairs damage other programs did to our tables, in one transaction; if that is
    /// refused (the damage was not what the notifications said), by a full reconcile.
    /// Returns the kinds of repair made (none if the state is unknown: the next change
    /// rewrites everything anyway).
    pub async fn repair(&self, damage: &Damage) -> Result<BTreeSet<RepairKind>, String> {
        let _writing = self.writing.lock().await;
        let mut tx = {
            let state = self.state.read();
            if !state.is_synced() {
                return Ok(BTreeSet::new());
            }
            repair::transaction(&state, damage, &self.table)
        };
        if damage.full {
            self.skip_existing(&mut tx).await;
        }
        if tx.is_empty() {
            return Ok(BTreeSet::new());
        }
        let started = Instant::now();
        match self.nft.apply(&tx).await {
            Ok(()) => {
                let kinds = damage.kinds();
                self.metrics
                    .repaired(&kinds, started.elapsed().as_secs_f64());
                return Ok(kinds);
            }
            Err(e) if damage.full => return Err(short_error(&e.to_string())),
            Err(e) => {
                tracing::warn!(error = %short_error(&e.to_string()), "targeted repair refused; reconciling the whole tables")
            }
        }
        let mut tx = repair::transaction(&self.state.read(), &Damage::full(), &self.table);
        self.skip_existing(&mut tx).await;
        self.nft
            .apply(&tx)
            .await
            .map_err(|e| short_error(&e.to_string()))?;
        let kinds = BTreeSet::from([RepairKind::Full]);
        self.metrics
            .repaired(&kinds, started.elapsed().as_secs_f64());
        Ok(kinds)
    }

    /// Compares every element of our sets in the kernel with the applied state (sticky sets
    /// are the kernel's own). Costs what the tables hold, in nft's listing, about 1 s per
    /// 30,000 elements here; the applied state is not locked meanwhile. `None` if a change
    /// committed during the listing (the comparison would be meaningless).
    pub async fn verify_content(&self) -> Result<Option<Damage>, NftError> {
        let (generation, sets) = {
            let state = self.state.read();
            if !state.is_synced() {
                return Ok(Some(Damage::default()));
            }
            let sets: Vec<(Family, SetId)> = Family::ALL
                .into_iter()
                .flat_map(|f| {
                    repair::expected_sets(&state, f)
                        .filter(|s| !matches!(s, SetId::Sticky(_)))
                        .map(move |s| (f, s))
                        .collect::<Vec<_>>()
                })
                .collect();
            (state.generation(), sets)
        };
        let mut damage = Damage::default();
        for (f, set) in sets {
            let kernel = self.nft.list_elements(&self.table, f, set).await?;
            let state = self.state.read();
            if state.generation() != generation {
                return Ok(None);
            }
            damage.merge(repair::compare_set(&state, f, set, &kernel));
        }
        Ok(Some(damage))
    }

    /// Compares the chains and sets in the kernel with those the applied state needs (names
    /// only: a few milliseconds at any size). What differs is returned as damage.
    pub async fn check_structure(&self) -> Result<Damage, NftError> {
        let mut damage = Damage::default();
        for f in Family::ALL {
            let objects = self.nft.list_objects(&self.table, f).await?;
            let state = self.state.read();
            if !state.is_synced() {
                return Ok(Damage::default());
            }
            let Some(objects) = objects else {
                return Ok(Damage::full());
            };
            let chains: BTreeSet<&str> = objects.chains.iter().map(String::as_str).collect();
            for chain in repair::expected_chains(&state, f) {
                if !chains.contains(chain.to_string().as_str()) {
                    match chain.base() {
                        Some(_) => {
                            damage.chains.insert((f, chain));
                        }
                        None => return Ok(Damage::full()),
                    }
                }
            }
            let sets: BTreeSet<&str> = objects.sets.iter().map(|(n, _)| n.as_str()).collect();
            if repair::expected_sets(&state, f)
                .any(|set: SetId| !sets.contains(set.to_string().as_str()))
            {
                return Ok(Damage::full());
            }
            let expected: BTreeSet<Chain> =
                repair::expected_chains(&state, f).into_iter().collect();
            for name in &objects.chains {
                match Chain::parse(name) {
                    None => damage.note(&crate::nft::monitor::Event::added_chain(f, name)),
                    Some(chain) if !expected.contains(&chain) => {
                        damage.stale_chains.insert((f, chain));
                    }
                    Some(_) => {}
                }
            }
            let expected: BTreeSet<SetId> = repair::expected_sets(&state, f).collect();
            for (name, map) in &objects.sets {
                match SetId::parse(name) {
                    None => damage.note(&crate::nft::monitor::Event::added_set(f, name, *map)),
                    Some(set) if !expected.contains(&set) => {
                        damage.stale_sets.insert((f, set));
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(damage)
    }

    /// Serves the health-check node ports the applied state asks for, now and after every
    /// commit. Needs a tokio runtime.
    pub fn with_health_check_ports(mut self, ports: Arc<HealthCheckPorts>) -> Self {
        ports.follow_all(&self.state.read());
        self.hc_ports = Some(ports);
        self
    }

    pub fn state(&self) -> &SharedState {
        &self.state
    }

    /// Waits until the state file holds every change committed so far (or writing it
    /// failed, which `/healthz` reports): changes are ACKed before their state is written.
    pub async fn flush_state_file(&self) {
        self.writer.flush().await;
    }

    /// Applies one change; `Err` carries the NACK text (nft's stderr verbatim if nft refused).
    pub async fn handle(&self, change: &v1::Change) -> Result<(), String> {
        self.health.received();
        self.metrics.queued();
        let _writing = self.writing.lock().await;
        let counts = crate::proxy_counts::count(&self.state.read(), change);
        self.metrics.changes_pending(counts);
        let result = self.apply(change).await;
        match &result {
            Ok(()) => {
                self.health.committed();
                self.health.converged();
                self.metrics.change(ChangeResult::ack);
                self.metrics.changes_applied(counts);
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
            self.metrics.in_sync();
            return Ok(());
        }
        let diff = diff::diff(&self.state.read(), change, &self.table).map_err(|e| {
            tracing::error!(change_id = change.change_id, error = %e, "refusing change");
            e.to_string()
        })?;
        let started = Instant::now();
        let diff = match self.run(diff, change).await {
            Ok(diff) => diff,
            Err(error) if change.resources.len() + change.removed.len() > 1 => {
                return self.isolate(change, error).await;
            }
            Err(error) => return Err(error),
        };
        self.finish(diff, change, started.elapsed()).await;
        Ok(())
    }

    /// Records a committed diff: the applied state, health-check ports, health, conntrack
    /// cleanup, metrics and the log line, each at the cost of the change (this is the ACK's
    /// path); the state file, which costs the whole table, is written after.
    async fn finish(&self, diff: diff::Diff, change: &v1::Change, elapsed: Duration) {
        self.metrics.synced(
            &diff.tx.changed_families(),
            diff.full,
            elapsed.as_secs_f64(),
        );
        let (ops, full) = (diff.tx.element_ops(), diff.full);
        let (generation, cleanup) = {
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
            let old_specs: Vec<_> = touched
                .iter()
                .filter_map(|name| state.spec(name).cloned())
                .collect();
            state.commit(diff, SystemTime::now());
            let new_specs = touched.iter().filter_map(|name| state.spec(name));
            self.metrics
                .no_local_endpoints_moved(&crate::proxy_counts::no_local_change(
                    &old_specs, new_specs,
                ));
            if let Some(ports) = &self.hc_ports {
                ports.follow(&state, touched.iter().copied());
            }
            self.health.set_deleting(state.node().deleting);
            (
                state.generation(),
                conntrack::cleanup_for(&old, &change.resources),
            )
        };
        self.writer.request();
        if !cleanup.is_empty() {
            // After the commit, off the ACK's path: new flows already follow the new rules.
            let metrics = self.metrics.clone();
            tokio::spawn(async move {
                for r in conntrack::run(cleanup).await {
                    metrics.conntrack_reconciled(r.family, r.duration.as_secs_f64(), r.deleted);
                }
            });
        }
        tracing::info!(
            change_id = change.change_id,
            changed = change.resources.len(),
            removed = change.removed.len(),
            element_ops = ops,
            full_reconcile = full,
            generation,
            duration_ms = elapsed.as_secs_f64() * 1e3,
            "applied change"
        );
        self.observe_programming(change);
    }

    /// A change refused as a whole: applies it in parts, halving the parts that fail, so
    /// that one resource nft cannot take (or takes too long on) does not hold back the
    /// others. Everything else is applied; the NACK names what was not.
    async fn isolate(&self, change: &v1::Change, error: String) -> Result<(), String> {
        tracing::warn!(change_id = change.change_id, %error, "applying the change resource by resource to isolate what nft refuses");
        let items: Vec<Part> = change
            .resources
            .iter()
            .map(|r| Part::Resource(Box::new(r.clone())))
            .chain(change.removed.iter().map(|n| Part::Removal(n.clone())))
            .collect();
        let total = items.len();
        let mut groups = vec![items];
        let mut refused: Vec<(String, String)> = Vec::new();
        while let Some(group) = groups.pop() {
            let sub = Part::change(change, &group);
            let diffed = diff::diff(&self.state.read(), &sub, &self.table);
            let attempt = match diffed {
                Ok(diff) => {
                    let started = Instant::now();
                    match self.nft.apply(&diff.tx).await {
                        Ok(()) => Ok((diff, started.elapsed())),
                        Err(e) => Err(short_error(&e.to_string())),
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            match attempt {
                Ok((diff, elapsed)) => self.finish(diff, &sub, elapsed).await,
                Err(e) if group.len() == 1 => refused.push((group[0].name().to_owned(), e)),
                Err(_) => {
                    let mut first = group;
                    let second = first.split_off(first.len() / 2);
                    // Popped last-in first-out: the first half is tried first.
                    groups.push(second);
                    groups.push(first);
                }
            }
        }
        let (name, why) = refused.first().cloned().unwrap_or_default();
        if !refused.is_empty() {
            self.metrics.sync_failed(change_family(change, &name));
        }
        let message = match refused.len() {
            0 => return Ok(()),
            1 => format!(
                "resource {name:?} refused ({} other resources applied): {why}",
                total - 1
            ),
            n => format!(
                "{n} resources refused, first {name:?} ({} others applied): {why}",
                total - n
            ),
        };
        tracing::error!(change_id = change.change_id, refused = ?refused.iter().map(|(n, _)| n).collect::<Vec<_>>(), "nft refused part of the change; the rest is applied");
        Err(message)
    }

    /// Runs a diffed change. A refusal is retried with backoff (a transient failure, or
    /// drift being repaired meanwhile); if the same transaction keeps failing, the change is
    /// applied as a full reconcile of our tables; only if that fails too is it refused, with
    /// the first lines of nft's error.
    async fn run(&self, mut diff: diff::Diff, change: &v1::Change) -> Result<diff::Diff, String> {
        let id = change.change_id;
        let family = transaction_family(&diff.tx.changed_families());
        if diff.full {
            self.skip_existing(&mut diff.tx).await;
        }
        let mut last = match self.nft.apply(&diff.tx).await {
            Ok(()) => return Ok(diff),
            // Too big to finish: the same again, or all of it at once, would only wait as long.
            Err(e @ NftError::Timeout(_)) => {
                self.metrics.sync_failed(family);
                return Err(self.refused(id, &e));
            }
            Err(e) => e,
        };
        for wait in RETRIES {
            self.metrics.sync_failed(family);
            tracing::warn!(change_id = id, error = %short_error(&last.to_string()), retry_in = ?wait, "nft refused the transaction");
            tokio::time::sleep(wait).await;
            match self.nft.apply(&diff.tx).await {
                Ok(()) => return Ok(diff),
                Err(e) => last = e,
            }
        }
        self.metrics.sync_failed(family);
        if diff.full {
            return Err(self.refused(id, &last));
        }
        tracing::warn!(change_id = id, error = %short_error(&last.to_string()), "the change keeps failing; applying it as a full reconcile");
        let mut full =
            diff::full(&self.state.read(), change, &self.table).map_err(|e| e.to_string())?;
        self.skip_existing(&mut full.tx).await;
        match self.nft.apply(&full.tx).await {
            Ok(()) => Ok(full),
            Err(e) => {
                self.metrics.sync_failed(family);
                Err(self.refused(id, &e))
            }
        }
    }

    /// Leaves out of a full reconcile the declarations of objects that exist (see
    /// [`Transaction::skip_existing`]); if the tables cannot be listed, declares everything.
    async fn skip_existing(&self, tx: &mut Transaction) {
        let mut existing = [None, None];
        for f in Family::ALL {
            match self.nft.list_objects(&self.table, f).await {
                Ok(objects) => existing[f as usize] = objects,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot list the tables; declaring every object");
                    return;
                }
            }
        }
        tx.skip_existing(&existing);
    }

    fn refused(&self, change_id: u64, error: &NftError) -> String {
        let short = short_error(&error.to_string());
        tracing::error!(change_id, error = %short, "nft refused the change, also as a full reconcile");
        short
    }

    /// Network programming latency, from each trigger time to now (committed): once per
    /// Service, family and trigger time, as kube-proxy observes once per endpoints change (a
    /// Service's ports share their EndpointSlices' trigger time: one observation, not one per
    /// port).
    fn observe_programming(&self, change: &v1::Change) {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let mut seen: BTreeSet<(Family, &str, &str, i64)> = BTreeSet::new();
        for trigger in &change.trigger_times {
            let Some(sp) = change
                .resources
                .iter()
                .find(|r| r.name == trigger.resource)
                .and_then(|r| match &r.kind {
                    Some(v1::resource::Kind::ServicePort(sp)) => Some(sp),
                    _ => None,
                })
            else {
                continue;
            };
            let family = match v1::IpFamily::try_from(sp.family) {
                Ok(v1::IpFamily::Ipv6) => Family::V6,
                _ => Family::V4,
            };
            if !seen.insert((family, &sp.namespace, &sp.service, trigger.unix_ms)) {
                continue;
            }
            let elapsed_ms = now_ms.saturating_sub(trigger.unix_ms).max(0);
            self.metrics
                .network_programmed(family, elapsed_ms as f64 / 1000.0);
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

#[cfg(test)]
mod diff_tests;

#[cfg(test)]
mod tests {
    use super::short_error;

    #[test]
    fn a_session_error_names_the_command_its_carets_point_at() {
        let echo = "flush set ip kubenft generation; add element ip kubenft ip-c-1-eps { 10.96.0.63 . tcp . 80 : 10.244.1.5 . 8080 }; add element ip kubenft generation { 7 }";
        let col = echo.find(": 10.244").unwrap() + 2;
        let carets = format!("{}^^^^^^^^^^", " ".repeat(col));
        let error = format!("Error: Can't parse symbolic invalid expressions\n{echo}\n{carets}\n");
        assert_eq!(
            short_error(&error),
            "Error: Can't parse symbolic invalid expressions\nadd element ip kubenft ip-c-1-eps { 10.96.0.63 . tcp . 80 : 10.244.1.5 . 8080 }"
        );
        // One command per line (`nft -f`): kept as nft printed it.
        let error = "/dev/stdin:3:1-20: Error: Could not process rule: File exists\nadd map ip kubenft ip-c-1-eps { type ipv4_addr : ipv4_addr ; }\n    ^^^^\n";
        assert_eq!(short_error(error).lines().count(), 3);
    }
}

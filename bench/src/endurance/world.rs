//! Suite 9's workload: what every Service's endpoints are now (the truth the checks compare
//! against), how one change alters them, and their manifests for `--source dir:`.
//!
//! Bulk Services have one TCP port and 8-12 endpoints at fake addresses spread over all the
//! nodes (nothing ever connects to them); a change replaces, adds or removes one endpoint.
//! Traffic Services have a TCP and a UDP port and two endpoints taken from a pool of real lab
//! pods; a change swaps one of them for another pool pod. Every slice written carries the
//! write time as `endpoints.kubernetes.io/last-change-trigger-time`, the clock the controller
//! reports programming latency from.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kubenft_lab::Pod;

/// Endpoints per bulk Service: a change keeps the count within these bounds.
const MIN_ENDPOINTS: usize = 8;
const MAX_ENDPOINTS: usize = 12;
const INITIAL_ENDPOINTS: usize = 10;
/// Fake endpoint addresses: 10.128.0.0 + n, far from the lab's Service (10.96.0.0/16) and
/// pod (10.244.0.0/16) ranges; 2^22 of them before wrapping around.
const FAKE_BASE: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 0);
const FAKE_SPAN: u32 = 1 << 22;
/// Bulk Service `i` has ClusterIP 10.96.16.0 + i; traffic Service `k` 10.96.0.10 + k.
const BULK_VIP_BASE: Ipv4Addr = Ipv4Addr::new(10, 96, 16, 0);
const TRAFFIC_VIP_BASE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const BULK_PORT: u16 = 80;
pub const BULK_TARGET: u16 = 8080;
pub const TRAFFIC_TCP_PORT: u16 = 80;
pub const TRAFFIC_UDP_PORT: u16 = 53;
pub const POD_TCP_PORT: u16 = 8080;
pub const POD_UDP_PORT: u16 = 5353;
const TRAFFIC_NAMESPACE: &str = "traffic";
/// One change in this many goes to a traffic Service (in turn).
pub const TRAFFIC_EVERY: u64 = 40;
pub const TRIGGER_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// A fake endpoint: address and the node it is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FakeEndpoint {
    pub ip: Ipv4Addr,
    pub node: usize,
}

#[derive(Clone, Debug)]
pub struct BulkService {
    pub index: usize,
    pub endpoints: Vec<FakeEndpoint>,
}

impl BulkService {
    pub fn namespace(&self) -> String {
        format!("ns{}", self.index % 10)
    }

    pub fn name(&self) -> String {
        format!("svc{}", self.index)
    }

    pub fn vip(&self) -> Ipv4Addr {
        offset(BULK_VIP_BASE, self.index as u32)
    }
}

/// A traffic Service: its endpoints are pool pods (by index into the pool), with when each
/// set took effect (written), for the check that answers come from endpoints.
#[derive(Clone, Debug)]
pub struct TrafficService {
    pub index: usize,
    pub endpoints: Vec<usize>,
    pub history: Vec<(Instant, BTreeSet<String>)>,
}

impl TrafficService {
    pub fn name(&self) -> String {
        format!("t{}", self.index)
    }

    pub fn vip(&self) -> Ipv4Addr {
        offset(TRAFFIC_VIP_BASE, self.index as u32)
    }
}

/// What the churn writes next: a file and its contents.
pub struct Write {
    pub file: String,
    pub text: String,
}

/// The whole workload and its current state.
pub struct World {
    pub nodes: Vec<String>,
    pub pool: Vec<Pod>,
    pub bulk: Vec<BulkService>,
    pub traffic: Vec<TrafficService>,
    next_fake: u32,
    rng: Rng,
    /// Changes made so far (slice files written by the churn).
    pub changes: u64,
    /// The churn writes nothing while this is set (a checkpoint is reading the truth).
    pub paused: bool,
}

impl World {
    /// `services` Services in all, `traffic` of them traffic Services over `pool`, endpoints
    /// spread over `nodes`.
    pub fn new(services: usize, traffic: usize, nodes: Vec<String>, pool: Vec<Pod>) -> World {
        let mut w = World {
            nodes,
            pool,
            bulk: Vec::new(),
            traffic: Vec::new(),
            next_fake: 0,
            rng: Rng(0x9e37_79b9_7f4a_7c15),
            changes: 0,
            paused: false,
        };
        for index in 0..services.saturating_sub(traffic) {
            let endpoints = (0..INITIAL_ENDPOINTS).map(|_| w.fresh_endpoint()).collect();
            w.bulk.push(BulkService { index, endpoints });
        }
        let now = Instant::now();
        for index in 0..traffic {
            let n = w.pool.len();
            let endpoints = vec![(2 * index) % n, (2 * index + 1) % n];
            let names = w.names(&endpoints);
            w.traffic.push(TrafficService {
                index,
                endpoints,
                history: vec![(now, names)],
            });
        }
        w
    }

    fn fresh_endpoint(&mut self) -> FakeEndpoint {
        let ip = offset(FAKE_BASE, self.next_fake % FAKE_SPAN);
        self.next_fake = self.next_fake.wrapping_add(1);
        let node = self.rng.below(self.nodes.len());
        FakeEndpoint { ip, node }
    }

    fn names(&self, endpoints: &[usize]) -> BTreeSet<String> {
        endpoints
            .iter()
            .map(|&p| self.pool[p].name.clone())
            .collect()
    }

    /// Every file of the initial workload: Services by namespace, one slice per Service.
    pub fn initial_files(&self) -> Vec<Write> {
        let mut out = Vec::new();
        let mut by_ns = vec![String::new(); 10];
        for s in &self.bulk {
            bulk_service_yaml(&mut by_ns[s.index % 10], s);
            out.push(self.bulk_slice(s.index, SystemTime::now()));
        }
        for (ns, text) in by_ns.into_iter().enumerate() {
            if !text.is_empty() {
                out.push(Write {
                    file: format!("svc-ns{ns}.yaml"),
                    text,
                });
            }
        }
        let mut services = String::new();
        for t in &self.traffic {
            traffic_service_yaml(&mut services, t);
            out.push(self.traffic_slice(t.index, SystemTime::now()));
        }
        if !services.is_empty() {
            out.push(Write {
                file: "traffic-svc.yaml".into(),
                text: services,
            });
        }
        out
    }

    /// Makes change number `self.changes` and returns the slice file to write.
    pub fn change(&mut self) -> Write {
        let c = self.changes;
        self.changes += 1;
        let now = SystemTime::now();
        if !self.traffic.is_empty() && c.is_multiple_of(TRAFFIC_EVERY) {
            let k = ((c / TRAFFIC_EVERY) % self.traffic.len() as u64) as usize;
            self.swap_traffic_endpoint(k);
            return self.traffic_slice(k, now);
        }
        let i = self.rng.below(self.bulk.len());
        self.alter_bulk(i);
        self.bulk_slice(i, now)
    }

    fn alter_bulk(&mut self, i: usize) {
        let fresh = self.fresh_endpoint();
        let roll = self.rng.below(4);
        let len = self.bulk[i].endpoints.len();
        let at = self.rng.below(len.max(1));
        let eps = &mut self.bulk[i].endpoints;
        match roll {
            0 if len < MAX_ENDPOINTS => eps.push(fresh),
            1 if len > MIN_ENDPOINTS => {
                eps.remove(at);
            }
            _ => eps[at] = fresh,
        }
    }

    fn swap_traffic_endpoint(&mut self, k: usize) {
        let n = self.pool.len();
        let current = &self.traffic[k].endpoints;
        let candidates: Vec<usize> = (0..n).filter(|p| !current.contains(p)).collect();
        if candidates.is_empty() {
            return;
        }
        let new = candidates[self.rng.below(candidates.len())];
        let at = self.rng.below(current.len());
        self.traffic[k].endpoints[at] = new;
        let names = self.names(&self.traffic[k].endpoints);
        self.traffic[k].history.push((Instant::now(), names));
    }

    fn bulk_slice(&self, i: usize, at: SystemTime) -> Write {
        let s = &self.bulk[i];
        let mut text = slice_head(&s.name(), &s.namespace(), at);
        let _ = write!(
            text,
            "ports:\n- name: http\n  port: {BULK_TARGET}\n  protocol: TCP\nendpoints:\n"
        );
        for e in &s.endpoints {
            endpoint_yaml(&mut text, e.ip, &self.nodes[e.node]);
        }
        Write {
            file: format!("eps-{i}.yaml"),
            text,
        }
    }

    fn traffic_slice(&self, k: usize, at: SystemTime) -> Write {
        let t = &self.traffic[k];
        let mut text = slice_head(&t.name(), TRAFFIC_NAMESPACE, at);
        let _ = write!(
            text,
            "ports:\n- name: tcp\n  port: {POD_TCP_PORT}\n  protocol: TCP\n- name: udp\n  port: {POD_UDP_PORT}\n  protocol: UDP\nendpoints:\n"
        );
        for &p in &t.endpoints {
            let pod = &self.pool[p];
            endpoint_yaml(&mut text, pod.ipv4, &pod.node);
        }
        Write {
            file: format!("traffic-eps-{k}.yaml"),
            text,
        }
    }

    /// Each Service port's endpoint addresses now, keyed as the controller names the port's
    /// resource's Service: (namespace, Service, port name).
    pub fn expected_ports(&self) -> Vec<((String, String, String), BTreeSet<String>)> {
        let mut out = Vec::new();
        for s in &self.bulk {
            let ips = s.endpoints.iter().map(|e| e.ip.to_string()).collect();
            out.push(((s.namespace(), s.name(), "http".to_owned()), ips));
        }
        for t in &self.traffic {
            let ips: BTreeSet<String> = t
                .endpoints
                .iter()
                .map(|&p| self.pool[p].ipv4.to_string())
                .collect();
            for port in ["tcp", "udp"] {
                out.push((
                    (TRAFFIC_NAMESPACE.to_owned(), t.name(), port.to_owned()),
                    ips.clone(),
                ));
            }
        }
        out
    }

    /// The pool pods serving traffic Service `k` now (addresses).
    pub fn traffic_endpoint_ips(&self, k: usize) -> BTreeSet<Ipv4Addr> {
        self.traffic[k]
            .endpoints
            .iter()
            .map(|&p| self.pool[p].ipv4)
            .collect()
    }

    /// Whether `server` was an endpoint of traffic Service `k` at any moment in
    /// `[since, now]`.
    pub fn was_endpoint(&self, k: usize, server: &str, since: Instant) -> bool {
        let history = &self.traffic[k].history;
        // The set in effect at `since` is the last one that started at or before it.
        let first = history
            .iter()
            .rposition(|(at, _)| *at <= since)
            .unwrap_or(0);
        history[first..].iter().any(|(_, set)| set.contains(server))
    }

    /// Endpoints of every bulk Service (for the table's note).
    pub fn bulk_endpoints(&self) -> usize {
        self.bulk.iter().map(|s| s.endpoints.len()).sum()
    }
}

fn offset(base: Ipv4Addr, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base).wrapping_add(n))
}

fn bulk_service_yaml(out: &mut String, s: &BulkService) {
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  clusterIP: {}\n  ports:\n  - name: http\n    port: {BULK_PORT}\n    targetPort: {BULK_TARGET}\n    protocol: TCP\n",
        s.name(),
        s.namespace(),
        s.vip()
    );
}

fn traffic_service_yaml(out: &mut String, t: &TrafficService) {
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {TRAFFIC_NAMESPACE}\nspec:\n  clusterIP: {}\n  ports:\n  - name: tcp\n    port: {TRAFFIC_TCP_PORT}\n    targetPort: {POD_TCP_PORT}\n    protocol: TCP\n  - name: udp\n    port: {TRAFFIC_UDP_PORT}\n    targetPort: {POD_UDP_PORT}\n    protocol: UDP\n",
        t.name(),
        t.vip()
    );
}

fn slice_head(service: &str, namespace: &str, at: SystemTime) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-1\n  namespace: {namespace}\n  labels:\n    kubernetes.io/service-name: {service}\n  annotations:\n    {TRIGGER_ANNOTATION}: \"{}\"\naddressType: IPv4\n",
        rfc3339_millis(at)
    )
}

fn endpoint_yaml(out: &mut String, ip: Ipv4Addr, node: &str) {
    let _ = write!(
        out,
        "- addresses: [\"{ip}\"]\n  nodeName: {node}\n  conditions: {{ready: true}}\n"
    );
}

/// `2026-01-02T03:04:05.678Z`: the trigger-time annotation with millisecond precision.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// xorshift64*: a fixed seed, so every run churns the same way.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-enough in `0..n` (0 if `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next() % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn trigger_time_format() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_320_000_123);
        assert_eq!(rfc3339_millis(t), "2026-11-22T04:00:00.123Z");
        assert_eq!(rfc3339_millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339_millis(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn bulk_changes_keep_endpoint_counts_in_bounds() {
        let nodes = vec!["a".to_owned(), "b".to_owned(), "n3".to_owned()];
        let mut w = World::new(50, 0, nodes, Vec::new());
        for _ in 0..5_000 {
            let write = w.change();
            assert!(write.file.starts_with("eps-"));
        }
        for s in &w.bulk {
            assert!((MIN_ENDPOINTS..=MAX_ENDPOINTS).contains(&s.endpoints.len()));
            let unique: BTreeSet<_> = s.endpoints.iter().map(|e| e.ip).collect();
            assert_eq!(
                unique.len(),
                s.endpoints.len(),
                "fresh addresses never repeat"
            );
        }
        assert_eq!(w.changes, 5_000);
    }
}

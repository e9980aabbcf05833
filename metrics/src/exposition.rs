//! A reader of the OpenMetrics text exposition both binaries serve, and of the list of
//! metrics kept in the repository (`deploy/monitoring/metrics.txt`), so tests can check a
//! real `/metrics` against that list: names, types and label names.

use std::collections::{BTreeMap, BTreeSet};

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// One metric family: its `# TYPE` line and its samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Family {
    /// `counter`, `gauge`, `histogram`, …
    pub kind: String,
    pub samples: Vec<Sample>,
}

impl Family {
    /// The label names of its samples, without the histogram's `le`.
    pub fn label_names(&self) -> BTreeSet<String> {
        self.samples
            .iter()
            .flat_map(|s| s.labels.keys())
            .filter(|k| *k != "le")
            .cloned()
            .collect()
    }

    /// The sum of the values of samples named `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }
}

/// A scraped exposition, by family name (as in `# TYPE`: counters without `_total`).
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    pub families: BTreeMap<String, Family>,
}

/// Parses the text exposition.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    let mut current: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or_else(|| bad("TYPE without a type"))?;
            out.families.insert(
                name.to_owned(),
                Family {
                    kind: kind.trim().to_owned(),
                    samples: Vec::new(),
                },
            );
            current = Some(name.to_owned());
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let sample = parse_sample(line).map_err(|e| bad(&e))?;
        let family = current
            .as_ref()
            .filter(|f| sample.name.starts_with(f.as_str()))
            .ok_or_else(|| bad("a sample outside its family"))?;
        out.families
            .get_mut(family)
            .expect("inserted at its TYPE line")
            .samples
            .push(sample);
    }
    Ok(out)
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let i = line.find(['{', ' ']).ok_or("no value")?;
    let (name, mut rest) = line.split_at(i);
    let mut labels = BTreeMap::new();
    if let Some(body) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(body)?;
        labels = parsed;
        rest = after;
    }
    let value = rest
        .split_whitespace()
        .next()
        .ok_or("no value")?
        .parse::<f64>()
        .map_err(|e| format!("value: {e}"))?;
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `a="x",b="y"}` (after the `{`): the labels, and what follows the `}`.
fn parse_labels(body: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut s = body;
    loop {
        s = s.trim_start_matches(',');
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let (key, after) = s.split_once("=\"").ok_or("a label without a value")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated escape".into()),
                },
                Some((i, '"')) => break i + 1,
                Some((_, c)) => value.push(c),
                None => return Err("unterminated label value".into()),
            }
        };
        labels.insert(key.to_owned(), value);
        s = &after[end..];
    }
}

/// One entry of the list kept in the repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    /// As queried in Prometheus (counters with `_total`).
    pub name: String,
    pub kind: String,
    pub labels: BTreeSet<String>,
    /// `agent`, `controller` or `both`.
    pub component: String,
    /// `kube-proxy`, `kubernetes`, `prometheus` or `kubenft`.
    pub origin: String,
}

impl Expected {
    pub fn served_by(&self, component: &str) -> bool {
        self.component == component || self.component == "both"
    }

    /// The family name in `# TYPE` (OpenMetrics names a counter's family without `_total`).
    pub fn family_name(&self) -> &str {
        match self.kind.as_str() {
            "counter" => self.name.strip_suffix("_total").unwrap_or(&self.name),
            _ => &self.name,
        }
    }

    /// The series names a query may use: a histogram's `_bucket`, `_sum` and `_count`.
    pub fn series_names(&self) -> Vec<String> {
        match self.kind.as_str() {
            "histogram" => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|s| format!("{}{s}", self.name))
                .collect(),
            _ => vec![self.name.clone()],
        }
    }
}

/// Parses the list: `name type labels component origin` per line (labels comma-separated,
/// `-` for none); `#` starts a comment.
pub fn parse_list(text: &str) -> Result<Vec<Expected>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let [name, kind, labels, component, origin] = f[..] else {
            return Err(format!("line {}: 5 fields expected: {line:?}", n + 1));
        };
        if !["counter", "gauge", "histogram"].contains(&kind) {
            return Err(format!("line {}: unknown type {kind:?}", n + 1));
        }
        if !["agent", "controller", "both"].contains(&component) {
            return Err(format!("line {}: unknown component {component:?}", n + 1));
        }
        let labels = match labels {
            "-" => BTreeSet::new(),
            l => l.split(',').map(str::to_owned).collect(),
        };
        out.push(Expected {
            name: name.to_owned(),
            kind: kind.to_owned(),
            labels,
            component: component.to_owned(),
            origin: origin.to_owned(),
        });
    }
    Ok(out)
}

impl Exposition {
    /// Whether `expected` is served here as listed: its family present with the listed type,
    /// at least one sample, and exactly the listed label names.
    pub fn check(&self, expected: &Expected) -> Result<(), String> {
        let name = expected.family_name();
        let family = self
            .families
            .get(name)
            .ok_or_else(|| format!("{}: not served", expected.name))?;
        if family.kind != expected.kind {
            return Err(format!(
                "{}: type {} (listed: {})",
                expected.name, family.kind, expected.kind
            ));
        }
        if family.samples.is_empty() {
            return Err(format!("{}: no samples", expected.name));
        }
        let labels = family.label_names();
        if labels != expected.labels {
            return Err(format!(
                "{}: labels {labels:?} (listed: {:?})",
                expected.name, expected.labels
            ));
        }
        Ok(())
    }

    /// A family by the name a query uses (counters with `_total`).
    pub fn get(&self, name: &str) -> Option<&Family> {
        self.families.get(name).or_else(|| {
            let f = self.families.get(name.strip_suffix("_total")?)?;
            (f.kind == "counter").then_some(f)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_families_samples_and_escaped_labels() {
        let text = "# HELP a_total x.\n# TYPE a counter\na_total{code=\"200\"} 3\n# TYPE h histogram\nh_bucket{ip_family=\"IPv4\",le=\"0.5\"} 1\nh_bucket{ip_family=\"IPv4\",le=\"+Inf\"} 2\nh_sum{ip_family=\"IPv4\"} 0.7\nh_count{ip_family=\"IPv4\"} 2\n# TYPE i gauge\ni{v=\"a \\\"q\\\" , b}\"} 1\n# EOF\n";
        let e = parse(text).unwrap();
        assert_eq!(e.families["a"].kind, "counter");
        assert_eq!(
            e.get("a_total").unwrap().sum("a_total", &[("code", "200")]),
            3.0
        );
        assert_eq!(
            e.families["h"].label_names(),
            BTreeSet::from(["ip_family".to_owned()])
        );
        assert_eq!(e.families["h"].sum("h_count", &[]), 2.0);
        assert_eq!(e.families["i"].samples[0].labels["v"], "a \"q\" , b}");
        let list = parse_list(
            "a_total counter code agent kube-proxy # c\n\nh histogram ip_family both kubenft\n",
        )
        .unwrap();
        assert!(e.check(&list[0]).is_ok());
        assert!(e.check(&list[1]).is_ok());
        let wrong = parse_list("h histogram ip_family,traffic_policy agent kube-proxy\ni_total counter - agent x\nz gauge - agent x").unwrap();
        assert!(e.check(&wrong[0]).unwrap_err().contains("labels"));
        assert!(e.check(&wrong[1]).unwrap_err().contains("type gauge"));
        assert!(e.check(&wrong[2]).unwrap_err().contains("not served"));
        assert!(parse("x_total 1\n").is_err());
    }
}

//! Where a create's time goes: the nodes' stage histograms (`/metrics`) read before and after a
//! load run, summed over the members, as counts, means and estimated 99th percentiles of what
//! the run added.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::cluster::Cluster;

/// The series a create passes through, in order, with what to call them.
pub const STAGES: &[(&str, &str)] = &[
    (
        r#"runtimeai_http_request_duration_seconds{method="POST",route="/v1/runtimes",status="201"}"#,
        "REST create, routing to answer (any node)",
    ),
    ("runtimeai_raft_forward_seconds", "forwarding hop, follower to leader and back"),
    ("runtimeai_raft_batch_wait_seconds", "wait at the leader before its batch is proposed"),
    ("runtimeai_raft_commit_seconds", "a batch's commit on the leader (append, fsync, quorum, apply)"),
    ("runtimeai_raft_log_sync_seconds", "one fsync of the raft log (every member)"),
    ("runtimeai_raft_replicate_seconds", "one AppendEntries round trip with entries"),
    ("runtimeai_raft_append_served_seconds", "the follower's part of it, gRPC handler to answer"),
    ("runtimeai_raft_log_flush_seconds", "an append until durable: write, syncer hand-off, fsync (every member)"),
    ("runtimeai_raft_apply_seconds", "one apply of committed entries (every member)"),
];

/// One histogram series: cumulative bucket counts by upper bound, sum and count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Series {
    /// What `self` holds beyond `before`.
    fn since(&self, before: Option<&Series>) -> Series {
        let Some(before) = before else { return self.clone() };
        let buckets =
            self.buckets.iter().zip(&before.buckets).map(|((le, now), (_, then))| (*le, now - then)).collect();
        Series { buckets, sum: self.sum - before.sum, count: self.count - before.count }
    }

    /// The upper bound of the bucket the `q` quantile falls in (as Prometheus'
    /// `histogram_quantile` does before interpolating).
    fn quantile(&self, q: f64) -> f64 {
        let rank = q * self.count;
        self.buckets.iter().find(|(_, cumulative)| *cumulative >= rank).map_or(f64::INFINITY, |(le, _)| *le)
    }
}

/// Every histogram series of an OpenMetrics text, keyed by name (without `_bucket`) and its
/// labels but `le`.
pub fn parse(text: &str) -> BTreeMap<String, Series> {
    let mut all: BTreeMap<String, Series> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name_and_labels, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = match name_and_labels.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (name_and_labels, ""),
        };
        let mut le = None;
        let kept: Vec<&str> = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .filter(|l| match l.strip_prefix("le=") {
                Some(bound) => {
                    le = Some(bound.trim_matches('"').parse::<f64>().unwrap_or(f64::INFINITY));
                    false
                }
                None => true,
            })
            .collect();
        let key = |base: &str| if kept.is_empty() { base.to_string() } else { format!("{base}{{{}}}", kept.join(",")) };
        if let (Some(base), Some(le)) = (name.strip_suffix("_bucket"), le) {
            all.entry(key(base)).or_default().buckets.push((le, value));
        } else if let Some(base) = name.strip_suffix("_sum") {
            all.entry(key(base)).or_default().sum = value;
        } else if let Some(base) = name.strip_suffix("_count") {
            all.entry(key(base)).or_default().count = value;
        }
    }
    all
}

/// The gauges of an OpenMetrics text whose names start with `prefix`, each summed over its
/// labels (a store's figure over its column families).
pub fn gauge_sums(text: &str, prefix: &str) -> BTreeMap<String, f64> {
    let mut sums = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with(prefix)) {
        let Some((name_and_labels, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let name = name_and_labels.split_once('{').map_or(name_and_labels, |(name, _)| name);
        *sums.entry(name.to_string()).or_default() += value;
    }
    sums
}

/// The stage histograms of every running member of `cluster`, summed.
pub async fn scrape(cluster: &Cluster) -> BTreeMap<String, Series> {
    let mut total: BTreeMap<String, Series> = BTreeMap::new();
    for id in cluster.running() {
        let Ok(response) = cluster.call(id, reqwest::Method::GET, "/metrics", None, &[]).await else { continue };
        let Some(text) = response.body.as_str() else { continue };
        for (key, series) in parse(text) {
            let sum = total.entry(key).or_default();
            if sum.buckets.is_empty() {
                sum.buckets = series.buckets.iter().map(|(le, _)| (*le, 0.0)).collect();
            }
            for ((_, into), (_, add)) in sum.buckets.iter_mut().zip(&series.buckets) {
                *into += add;
            }
            sum.sum += series.sum;
            sum.count += series.count;
        }
    }
    total
}

/// One stage of one load run.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    pub clients: usize,
    pub stage: &'static str,
    pub count: u64,
    pub mean_ms: f64,
    /// The upper bound of the bucket holding the 99th percentile.
    pub p99_ms: f64,
}

/// What each stage of [`STAGES`] took between the scrapes `before` and `after`.
pub fn between(clients: usize, before: &BTreeMap<String, Series>, after: &BTreeMap<String, Series>) -> Vec<Stage> {
    STAGES
        .iter()
        .filter_map(|(series, stage)| {
            let run = after.get(*series)?.since(before.get(*series));
            (run.count > 0.0).then(|| Stage {
                clients,
                stage,
                count: run.count as u64,
                mean_ms: run.sum / run.count * 1000.0,
                p99_ms: run.quantile(0.99) * 1000.0,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# TYPE runtimeai_raft_apply_seconds histogram\n\
        runtimeai_raft_apply_seconds_sum 0.5\nruntimeai_raft_apply_seconds_count 10\n\
        runtimeai_raft_apply_seconds_bucket{le=\"0.001\"} 5\nruntimeai_raft_apply_seconds_bucket{le=\"0.01\"} 10\n\
        runtimeai_raft_apply_seconds_bucket{le=\"+Inf\"} 10\n";
    const AFTER: &str = "runtimeai_raft_apply_seconds_sum 2.5\nruntimeai_raft_apply_seconds_count 110\n\
        runtimeai_raft_apply_seconds_bucket{le=\"0.001\"} 55\nruntimeai_raft_apply_seconds_bucket{le=\"0.01\"} 109\n\
        runtimeai_raft_apply_seconds_bucket{le=\"+Inf\"} 110\n\
        runtimeai_http_request_duration_seconds_count{method=\"POST\",route=\"/v1/runtimes\",status=\"201\"} 3\n";

    #[test]
    fn a_run_s_stages_are_what_it_added_to_the_histograms() {
        let (before, after) = (parse(BEFORE), parse(AFTER));
        let key = r#"runtimeai_http_request_duration_seconds{method="POST",route="/v1/runtimes",status="201"}"#;
        assert_eq!(after[key].count, 3.0);
        let stages = between(8, &before, &after);
        let apply = stages.iter().find(|s| s.stage.starts_with("one apply")).expect("apply");
        assert_eq!(apply.count, 100);
        assert!((apply.mean_ms - 20.0).abs() < 1e-9, "{apply:?}");
        // 50 of the 100 under 1 ms, 49 more under 10 ms, the last above: p99 is in the 10 ms bucket.
        assert_eq!(apply.p99_ms, 10.0);
    }

    #[test]
    fn a_store_gauge_is_summed_over_its_column_families() {
        let text = "# TYPE runtimeai_storage_memtable_bytes gauge\n\
            runtimeai_storage_memtable_bytes{family=\"log\"} 1024\n\
            runtimeai_storage_memtable_bytes{family=\"runtimes\"} 2048\n\
            runtimeai_storage_running_flushes 1\nruntimeai_process_resident_bytes 9\n";
        let sums = gauge_sums(text, "runtimeai_storage_");
        assert_eq!(sums["runtimeai_storage_memtable_bytes"], 3072.0);
        assert_eq!(sums["runtimeai_storage_running_flushes"], 1.0);
        assert!(!sums.contains_key("runtimeai_process_resident_bytes"));
    }
}

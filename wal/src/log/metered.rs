//! The log's metrics (through the `metrics` facade), registered once at open with the labels of
//! [`crate::Config::metrics_labels`]: one handle per metric instead of a name lookup per round,
//! and one series per log when a process runs several (an engine runs one per shard).

use metrics::{Counter, Gauge, Histogram, Label};

/// Every metric a [`crate::Wal`] records.
pub(crate) struct WalMetrics {
    /// `flotilla_wal_fdatasyncs_total`: fdatasyncs of segment files, rotation's included.
    pub(crate) fdatasyncs: Counter,
    /// `flotilla_wal_fdatasync_seconds`: a synced round's fdatasync, from its start until the
    /// writer has its result. With io_uring the writer reaps it only after finishing the round
    /// before, so a sync shorter than that finish is recorded as long as the finish.
    pub(crate) fdatasync_seconds: Histogram,
    /// `flotilla_wal_rounds_total`: group-commit rounds written.
    pub(crate) rounds: Counter,
    /// `flotilla_wal_entries_total`: entries written.
    pub(crate) entries: Counter,
    /// `flotilla_wal_bytes_total`: record bytes written.
    pub(crate) bytes: Counter,
    /// `flotilla_wal_round_bytes`: the size of each round (the batch size).
    pub(crate) round_bytes: Histogram,
    /// `flotilla_wal_segments_live`: segments holding live records.
    pub(crate) segments_live: Gauge,
    /// `flotilla_wal_segments_recycled_total`: segments reused in place.
    pub(crate) segments_recycled: Counter,
    /// `flotilla_wal_segments_created_total`: segment files created (pre-written with zeros).
    pub(crate) segments_created: Counter,
    /// `flotilla_wal_poisoned_total`: the log refusing all further work after an IO failure.
    pub(crate) poisoned: Counter,
}

impl WalMetrics {
    /// Registers the metrics with `labels`, and sets `flotilla_wal_backend{backend}` to 1.
    pub(crate) fn new(labels: &[(String, String)], backend: &'static str) -> Self {
        let labels: Vec<Label> =
            labels.iter().map(|(key, value)| Label::new(key.clone(), value.clone())).collect();
        let mut with_backend = labels.clone();
        with_backend.push(Label::new("backend", backend));
        metrics::gauge!("flotilla_wal_backend", with_backend).set(1.0);
        Self {
            fdatasyncs: metrics::counter!("flotilla_wal_fdatasyncs_total", labels.clone()),
            fdatasync_seconds: metrics::histogram!(
                "flotilla_wal_fdatasync_seconds",
                labels.clone()
            ),
            rounds: metrics::counter!("flotilla_wal_rounds_total", labels.clone()),
            entries: metrics::counter!("flotilla_wal_entries_total", labels.clone()),
            bytes: metrics::counter!("flotilla_wal_bytes_total", labels.clone()),
            round_bytes: metrics::histogram!("flotilla_wal_round_bytes", labels.clone()),
            segments_live: metrics::gauge!("flotilla_wal_segments_live", labels.clone()),
            segments_recycled: metrics::counter!(
                "flotilla_wal_segments_recycled_total",
                labels.clone()
            ),
            segments_created: metrics::counter!(
                "flotilla_wal_segments_created_total",
                labels.clone()
            ),
            poisoned: metrics::counter!("flotilla_wal_poisoned_total", labels),
        }
    }
}

//! The log's metrics carry `Config::metrics_labels`, so the logs of an engine's shards (one log
//! per shard, all in one process) report separate series.

use bytes::Bytes;
use flotilla_wal::{Backend, Config, GroupId, HardState, Wal, WriteBatch, block_on};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::{CompositeKey, MetricKind};

type Row = (CompositeKey, Option<metrics::Unit>, Option<metrics::SharedString>, DebugValue);

fn label<'a>(key: &'a CompositeKey, name: &str) -> Option<&'a str> {
    key.key().labels().find(|l| l.key() == name).map(metrics::Label::value)
}

fn counter(rows: &[Row], name: &str, shard: &str) -> u64 {
    rows.iter()
        .filter(|(key, ..)| key.key().name() == name && label(key, "shard") == Some(shard))
        .map(|(.., value)| match value {
            DebugValue::Counter(count) => *count,
            other => panic!("{name} is not a counter: {other:?}"),
        })
        .sum()
}

#[test]
fn each_log_s_metrics_carry_its_labels() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let dirs = [tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir")];
    metrics::with_local_recorder(&recorder, || {
        // Two logs, as two shards would have: 3 synced rounds in one, 1 in the other.
        for (dir, (shard, rounds)) in dirs.iter().zip([("0", 3u64), ("1", 1)]) {
            let config = Config {
                segment_bytes: 1 << 20,
                batch_bytes_max: 64 << 10,
                backend: Backend::Portable,
                metrics_labels: vec![("shard".into(), shard.into())],
                ..Config::default()
            };
            let (wal, _) = Wal::open(dir.path(), config).expect("open");
            for index in 1..=rounds {
                let mut batch = WriteBatch::new();
                batch.add_entries(GroupId(1), index, [(1, Bytes::from_static(b"entry"))]);
                batch.set_hard_state(GroupId(1), HardState { term: 1, vote: 1, commit: index });
                block_on(wal.append(batch)).expect("append");
            }
            wal.close().expect("close");
        }
    });
    let rows = snapshotter.snapshot().into_vec();
    assert!(!rows.is_empty(), "the log recorded metrics");
    for (key, ..) in &rows {
        let shard = label(key, "shard");
        assert!(
            shard == Some("0") || shard == Some("1"),
            "{} has no shard label",
            key.key().name()
        );
    }
    // Each synced round is one fdatasync; `close` adds its seal, one more synced round.
    for (shard, rounds) in [("0", 3), ("1", 1)] {
        assert_eq!(counter(&rows, "flotilla_wal_rounds_total", shard), rounds + 1, "shard {shard}");
        assert_eq!(counter(&rows, "flotilla_wal_entries_total", shard), rounds, "shard {shard}");
        assert_eq!(counter(&rows, "flotilla_wal_fdatasyncs_total", shard), rounds + 1);
    }
    let latencies = rows
        .iter()
        .filter(|(key, ..)| {
            key.kind() == MetricKind::Histogram
                && key.key().name() == "flotilla_wal_fdatasync_seconds"
                && label(key, "shard") == Some("0")
        })
        .map(|(.., value)| match value {
            DebugValue::Histogram(values) => values.len(),
            other => panic!("not a histogram: {other:?}"),
        })
        .sum::<usize>();
    assert_eq!(latencies, 4, "one fdatasync latency per synced round of shard 0");
    let backend = rows
        .iter()
        .find(|(key, ..)| {
            key.key().name() == "flotilla_wal_backend" && label(key, "shard") == Some("1")
        })
        .expect("backend gauge");
    assert_eq!(label(&backend.0, "backend"), Some("portable"));
}

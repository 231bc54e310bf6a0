//! TiKV's raft-engine (0.4, from crates.io, bench-only) against Flotilla's log on the identical
//! workload, side by side in one process run: W writer threads, each looping "append one entry of
//! B bytes to one of its own groups, durably" (`Engine::write(batch, sync = true)` there,
//! `wal.append(batch).wait()` here), compacting in the same batch every 64 entries of a group.
//!
//! Both engines get incompressible payloads. raft-engine runs with its default configuration (only
//! `dir` set); its entries are protobuf messages (`BytesValue` with the entry index in the first
//! eight payload bytes), built per write as TiKV builds its `Entry`s. Its fdatasyncs are counted
//! from its own Prometheus histogram `raft_engine_sync_log_duration_seconds`.
//!
//! A group has one writer in both engines: raft-engine applies each writer's batch to its
//! memtable after the shared write, so two threads appending to one region could reach it out of
//! order. Hence 16 and 256 writers run over 100 and 1024 groups.
//!
//! The last row (`…/g1024/tasks`) gives each engine its own way of having many producers:
//! raft-engine's API blocks, so its 256 writers are threads; Flotilla's appends are futures, so
//! its 256 writers are tasks on one thread, as a shard's event loop drives them (T5: "16–128 B
//! entries on one core … with many producers"). The rows before compare thread with thread.
//!
//! `cargo bench -p flotilla-bench --bench raft_engine`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use flotilla_bench::disk;
use flotilla_bench::load::{KEEP_ENTRIES, Measured, ProducerPool, Shape, WalLoad, Work};
use flotilla_bench::{count, full_mode, median, quick_mode, selected};
use flotilla_wal::Config as WalConfig;
use protobuf::well_known_types::BytesValue;
use raft_engine::{Command, Config, Engine, LogBatch, MessageExt, ReadableSize};

/// raft-engine's view of our entries: the index is the payload's first eight bytes.
struct Entries;

impl MessageExt for Entries {
    type Entry = BytesValue;

    fn index(entry: &BytesValue) -> u64 {
        u64::from_le_bytes(entry.value[..8].try_into().expect("payloads have 8+ bytes"))
    }
}

/// fdatasyncs raft-engine has performed in this process (its sync histogram's count).
fn raft_engine_syncs() -> u64 {
    prometheus::gather()
        .iter()
        .filter(|family| family.get_name() == "raft_engine_sync_log_duration_seconds")
        .flat_map(|family| family.get_metric().iter())
        .map(|metric| metric.get_histogram().get_sample_count())
        .sum()
}

struct RaftEngineLoad {
    pool: ProducerPool,
    appended: Arc<AtomicU64>,
}

impl RaftEngineLoad {
    fn open(dir: &std::path::Path, shape: Shape) -> RaftEngineLoad {
        let config = Config {
            dir: dir.to_str().expect("utf-8 path").to_owned(),
            // Quick mode keeps files small; the default is 128 MB.
            target_file_size: if quick_mode() {
                ReadableSize::mb(8)
            } else {
                Config::default().target_file_size
            },
            ..Config::default()
        };
        let engine = Arc::new(Engine::open(config).expect("opening raft-engine"));
        let appended = Arc::new(AtomicU64::new(0));
        let next: Arc<Vec<AtomicU64>> =
            Arc::new((0..shape.groups).map(|_| AtomicU64::new(1)).collect());
        let cursors: Arc<Vec<AtomicU64>> =
            Arc::new((0..shape.producers).map(|_| AtomicU64::new(0)).collect());
        let payloads: Arc<Vec<Vec<u8>>> = Arc::new(
            (0..shape.producers)
                .map(|p| disk::noise(shape.payload_bytes.max(8), 100 + p as u64))
                .collect(),
        );
        let counter = Arc::clone(&appended);
        let work: Arc<Work> = Arc::new(move |producer, appends| {
            let owned = (shape.groups - producer).div_ceil(shape.producers) as u64;
            for _ in 0..appends {
                let turn = cursors[producer].fetch_add(1, Ordering::Relaxed) % owned;
                let group = producer + turn as usize * shape.producers;
                let index = next[group].fetch_add(1, Ordering::Relaxed);
                let mut value = payloads[producer].clone();
                value[..8].copy_from_slice(&index.to_le_bytes());
                let entry = BytesValue { value, ..BytesValue::default() };
                let mut batch = LogBatch::with_capacity(1);
                let region = group as u64 + 1;
                batch.add_entries::<Entries>(region, &[entry]).expect("add_entries");
                if index > KEEP_ENTRIES && index.is_multiple_of(KEEP_ENTRIES) {
                    batch.add_command(region, Command::Compact { index: index - KEEP_ENTRIES });
                }
                engine.write(&mut batch, shape.sync).expect("raft-engine write");
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        RaftEngineLoad { pool: ProducerPool::new(shape.producers, &work), appended }
    }
}

#[expect(clippy::too_many_lines, reason = "one linear script: set up, measure, report")]
fn main() {
    let quick = quick_mode();
    let mut criterion = Criterion::default().configure_from_args();
    let mut results = Vec::new();
    let mut group = criterion.benchmark_group("raft_engine_vs_flotilla");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(if full_mode() { 4 } else { 2 }))
        .warm_up_time(Duration::from_millis(500));
    // (payload, groups, writers, Flotilla's writers are tasks on one thread)
    let mut matrix = Vec::new();
    for payload in [128, 1024] {
        for (groups, writers) in [(1, 1), (100, 1), (100, 16)] {
            matrix.push((payload, groups, writers, false));
        }
    }
    matrix.push((128, 1024, 256, false));
    if full_mode() {
        matrix.push((1024, 1024, 256, false));
        matrix.push((128, 1024, 16, false));
    }
    matrix.push((128, 1024, 256, true));
    for (payload, groups, writers, tasks) in matrix {
        let shape = Shape {
            payload_bytes: payload,
            producers: writers,
            groups,
            entries_each: 1,
            sync: true,
            tasks,
        };
        let appends_each = flotilla_bench::appends_per_producer(writers);
        group.throughput(Throughput::Elements(appends_each * writers as u64));
        // Criterion's ids must be unique: the tasks row's raft-engine side repeats a threads row.
        let name = format!("{payload}B/g{groups}{}", if tasks { "/tasks" } else { "" });
        if !selected(&format!("raft_engine_vs_flotilla/raft_engine/{name}/w{writers}"))
            && !selected(&format!("raft_engine_vs_flotilla/flotilla/{name}/w{writers}"))
        {
            continue;
        }

        // Both engines stay open; every sample of one is followed by the same appends on the
        // other, so each pair of rates saw the same disk (it drifts by the second here).
        let peer_dir = disk::bench_dir("raft-engine");
        let peer = RaftEngineLoad::open(peer_dir.path(), Shape { tasks: false, ..shape });
        let dir = disk::bench_dir("flotilla");
        let config = WalConfig {
            segment_bytes: if quick { 8 << 20 } else { WalConfig::default().segment_bytes },
            ..WalConfig::default()
        };
        let load = WalLoad::open(dir.path(), config, shape);
        let (syncs_before, peer_appended) =
            (raft_engine_syncs(), peer.appended.load(Ordering::Relaxed));
        let (before, appended) = (load.wal.stats(), load.appended());
        let (mut peer_time, mut time) = (Duration::ZERO, Duration::ZERO);
        let mut pairs: Vec<(f64, f64)> = Vec::new();
        // Every iteration (N appends by W writers) of one engine is followed by the same on the
        // other: the disk drifts within a second here, so only neighbouring figures compare.
        let mut sample = |first_peer: bool, iters: u64| {
            let entries = (appends_each * writers as u64) as f64;
            let mut measured = Duration::ZERO;
            for _ in 0..iters {
                let (took_peer, took_ours) = if first_peer {
                    (peer.pool.run(appends_each), load.run(appends_each))
                } else {
                    let took_ours = load.run(appends_each);
                    (peer.pool.run(appends_each), took_ours)
                };
                peer_time += took_peer;
                time += took_ours;
                pairs.push((
                    flotilla_bench::rate(entries, took_peer),
                    flotilla_bench::rate(entries, took_ours),
                ));
                measured += if first_peer { took_peer } else { took_ours };
            }
            measured
        };
        group.bench_function(
            BenchmarkId::new(format!("raft_engine/{name}"), format!("w{writers}")),
            |b| b.iter_custom(|iters| sample(true, iters)),
        );
        group.bench_function(
            BenchmarkId::new(format!("flotilla/{name}"), format!("w{writers}")),
            |b| b.iter_custom(|iters| sample(false, iters)),
        );
        let peer_entries = peer.appended.load(Ordering::Relaxed) - peer_appended;
        let peer_syncs = raft_engine_syncs() - syncs_before;
        let ours = Measured::between(&before, &load.wal.stats(), load.appended() - appended, time);
        let backend = load.wal.backend().name();
        drop(load);
        drop(peer);
        let ratios: Vec<f64> = pairs.iter().map(|(peer, ours)| ours / peer).collect();
        let peer_rate = flotilla_bench::rate(peer_entries as f64, peer_time);
        let writers_are = if tasks {
            " (raft-engine: threads; flotilla: tasks on one thread)"
        } else {
            " (threads)"
        };
        let line = format!(
            "RESULT raft_engine payload={payload}B groups={groups} writers={writers}{writers_are} sync: \
             raft-engine {}entries/s, {}fdatasyncs/s, {:.1} entries/fdatasync | flotilla({backend}) \
             {}entries/s, {}fdatasyncs/s, {:.1} entries/fdatasync | flotilla/raft-engine: median of \
             {} interleaved pairs {:.2}, of totals {:.2}",
            count(peer_rate),
            count(flotilla_bench::rate(peer_syncs as f64, peer_time)),
            peer_entries as f64 / peer_syncs.max(1) as f64,
            count(ours.entries_per_second()),
            count(ours.fdatasyncs_per_second()),
            ours.entries_per_fdatasync(),
            ratios.len(),
            median(&ratios),
            ours.entries_per_second() / peer_rate,
        );
        println!("{line}");
        results.push(line);
    }
    group.finish();
    criterion.final_summary();
    println!("\n==== summary (this run) ====");
    for line in &results {
        println!("{line}");
    }
}

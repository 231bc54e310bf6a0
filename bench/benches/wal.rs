//! The write-ahead log's benchmarks, each next to its reference measured in the same run:
//!
//! * `wal_synced`: durable appends (one entry each) by 1, 16, 256 producers over 1 or 1024
//!   groups, payloads 16 B … 4 KiB, both backends — against `pwrite` + `fdatasync` of the same
//!   bytes per sync into a pre-written file (T1, T3, T5 synced).
//! * `idle_append`: one small durable append on an idle log, p50/p99 — against one raw 4 KiB
//!   write + fdatasync (T4); awaited with `block_on` (the appending thread writes its own round),
//!   and `_polled` as an executor's task would (the log's writer thread writes it).
//! * `wal_unsynced`: 16–128 B entries, 1024 per append, `sync: false` (T5 unsynced).
//! * `wal_read`: 10,000 entries at once, zero-copy slices of the segments' maps (T6).
//!
//! `cargo bench -p flotilla-bench --bench wal` runs the default subset;
//! `FLOTILLA_BENCH_FULL=1` the whole matrix; `cargo test -p flotilla-bench --benches` each
//! benchmark once, shrunk. Every figure is printed as a `RESULT` line.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use flotilla_bench::disk::{self, PrewrittenFile};
use flotilla_bench::load::{KEEP_ENTRIES, Measured, Shape, WalLoad};
use flotilla_bench::{count, full_mode, mb, median, quick_mode, selected, size};
use flotilla_wal::{Backend, Config, GroupId, Wal, WriteBatch, block_on};

/// Size of the raw reference's pre-written file (it wraps around).
const RAW_FILE_BYTES: u64 = 64 << 20;

struct Settings {
    quick: bool,
    full: bool,
    measurement: Duration,
    warm_up: Duration,
    raw_duration: Duration,
    segment_bytes: u64,
}

impl Settings {
    fn from_env() -> Settings {
        let quick = quick_mode();
        Settings {
            quick,
            full: full_mode(),
            measurement: Duration::from_millis(if full_mode() { 3000 } else { 2000 }),
            warm_up: Duration::from_millis(500),
            raw_duration: Duration::from_millis(if quick { 20 } else { 1000 }),
            // Test mode opens dozens of logs: small segments keep their pre-writing cheap.
            segment_bytes: if quick { 8 << 20 } else { Config::default().segment_bytes },
        }
    }

    fn config(&self, backend: Backend) -> Config {
        Config { segment_bytes: self.segment_bytes, backend, ..Config::default() }
    }
}

fn backends() -> Vec<(Backend, &'static str)> {
    let mut out = Vec::new();
    match flotilla_wal::probe_io_uring() {
        Ok(()) => out.push((Backend::IoUring, "io_uring")),
        Err(error) => println!("NOTE io_uring backend skipped: {error}"),
    }
    out.push((Backend::Portable, "portable"));
    out
}

fn main() {
    let settings = Settings::from_env();
    let mut criterion = Criterion::default().configure_from_args();
    let raw_dir = disk::bench_dir("raw");
    let raw_len = if settings.quick { 8 << 20 } else { RAW_FILE_BYTES };
    let mut raw =
        PrewrittenFile::create(&raw_dir.path().join("raw"), raw_len).expect("pre-writing");
    let mut results = Vec::new();
    synced(&mut criterion, &settings, &mut raw, &mut results);
    idle_latency(&mut criterion, &settings, &mut raw, &mut results);
    unsynced(&mut criterion, &settings, &mut results);
    reads(&mut criterion, &settings, &mut results);
    criterion.final_summary();
    println!("\n==== summary (this run) ====");
    for line in &results {
        println!("{line}");
    }
}

/// `(payload, producers, groups, tasks)` of the synced matrix.
fn synced_matrix(settings: &Settings) -> Vec<(usize, usize, usize, bool)> {
    let mut out = Vec::new();
    let payloads: &[usize] =
        if settings.full { &[16, 128, 1024, 4096] } else { &[128, 1024, 4096] };
    for &payload in payloads {
        for producers in [1, 16, 256] {
            out.push((payload, producers, 1024, false));
            if settings.full {
                out.push((payload, producers, 1, false));
            }
        }
        for producers in [16, 256] {
            if settings.full || (producers == 256 && payload <= 1024) {
                out.push((payload, producers, 1024, true));
            }
        }
    }
    if !settings.full {
        for producers in [16, 256] {
            out.push((1024, producers, 1, false));
        }
    }
    out
}

#[expect(clippy::too_many_lines, reason = "one linear script per configuration: measure, report")]
fn synced(
    criterion: &mut Criterion,
    settings: &Settings,
    raw: &mut PrewrittenFile,
    results: &mut Vec<String>,
) {
    for (backend, backend_name) in backends() {
        let mut group = criterion.benchmark_group(format!("wal_synced/{backend_name}"));
        group
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .measurement_time(settings.measurement)
            .warm_up_time(settings.warm_up);
        for (payload, producers, groups, tasks) in synced_matrix(settings) {
            let kind = if tasks { "tasks" } else { "p" };
            let full_id =
                format!("wal_synced/{backend_name}/{payload}B/{kind}{producers}/g{groups}");
            if !selected(&full_id) {
                continue;
            }
            let dir = disk::bench_dir("wal");
            let shape = Shape {
                payload_bytes: payload,
                producers,
                groups,
                entries_each: 1,
                sync: true,
                tasks,
            };
            let load = WalLoad::open(dir.path(), settings.config(backend), shape);
            // Each producer's share of one iteration: long enough that starting and draining the
            // pool is a small part of it.
            let appends_each = flotilla_bench::appends_per_producer(producers);
            let per_iteration = appends_each * producers as u64;
            let before = load.wal.stats();
            let appended_before = load.appended();
            let mut elapsed = Duration::ZERO;
            group.throughput(Throughput::Elements(per_iteration));
            let id =
                BenchmarkId::new(format!("{payload}B/{kind}{producers}"), format!("g{groups}"));
            // The reference runs right after each iteration (N appends by P producers), for as
            // long as it took, at the bytes per fdatasync it achieved: the disk's mood drifts
            // within a second here, so only contemporaneous figures compare.
            let mut ratios: Vec<f64> = Vec::new();
            let (mut raw_bytes, mut raw_syncs, mut raw_time) = (0u64, 0u64, Duration::ZERO);
            // What the raw loop would need for the log's own fdatasyncs at its own sizes.
            let mut raw_equivalent = Duration::ZERO;
            // CPU of the whole process while the producers run (the raw loop is outside it).
            let mut cpu = Duration::ZERO;
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let sample_before = load.wal.stats();
                        let cpu_before = flotilla_bench::cpu_time();
                        let took = load.run(appends_each);
                        cpu += flotilla_bench::cpu_time().saturating_sub(cpu_before);
                        let sample_after = load.wal.stats();
                        total += took;
                        let syncs = sample_after.fdatasyncs - sample_before.fdatasyncs;
                        let bytes = sample_after.bytes - sample_before.bytes;
                        let Some(per_sync) = bytes.checked_div(syncs) else { continue };
                        let per_sync = per_sync as usize;
                        let reference =
                            raw.write_sync_rate(per_sync, took.min(settings.raw_duration));
                        raw_bytes += reference.syncs * per_sync as u64;
                        raw_syncs += reference.syncs;
                        raw_time += reference.elapsed;
                        let per_raw_sync = reference.elapsed / reference.syncs as u32;
                        raw_equivalent += per_raw_sync * syncs as u32;
                        ratios.push(
                            flotilla_bench::rate(bytes as f64, took) / reference.bytes_per_second(),
                        );
                    }
                    elapsed += total;
                    total
                });
            });
            let after = load.wal.stats();
            let measured =
                Measured::between(&before, &after, load.appended() - appended_before, elapsed);
            let ratio = raw_equivalent.as_secs_f64() / elapsed.as_secs_f64();
            let (low, high) = ratios
                .iter()
                .fold((f64::MAX, 0.0f64), |(low, high), r| (low.min(*r), high.max(*r)));
            let line = format!(
                "RESULT wal_synced backend={backend_name} payload={payload}B producers={producers}{} \
                 groups={groups}: {}entries/s, {} (records), {}fdatasyncs/s, {:.1} entries/fdatasync, \
                 {}/fdatasync, fdatasyncs/round={:.3}, rotations={} stalls={} created={} rewritten={} \
                 | raw pwrite+fdatasync interleaved, same bytes/sync: {}, {}syncs/s | ratio {ratio:.2} \
                 (raw time for the same syncs / log time; per-iteration median {:.2}, min {low:.2}, \
                 max {high:.2}, n={}) | entries copied by the log {} | cpu {:.2} µs/append",
                if tasks { " (tasks on 1 thread)" } else { " (threads)" },
                count(measured.entries_per_second()),
                mb(measured.bytes_per_second()),
                count(measured.fdatasyncs_per_second()),
                measured.entries_per_fdatasync(),
                size(measured.bytes_per_fdatasync()),
                measured.fdatasyncs_per_round(),
                measured.rotations,
                measured.rotation_stalls,
                measured.segments_created,
                measured.groups_rewritten,
                mb(flotilla_bench::rate(raw_bytes as f64, raw_time)),
                count(flotilla_bench::rate(raw_syncs as f64, raw_time)),
                median(&ratios),
                ratios.len(),
                (after.entries - before.entries).saturating_sub(measured.entries),
                cpu.as_secs_f64() * 1e6 / measured.entries.max(1) as f64,
            );
            println!("{line}");
            results.push(line);
            drop(load);
        }
        group.finish();
    }
}

/// Appends one entry of `payload` to group 1 of `wal` and waits until it is durable; compacts
/// inside the same batch now and then so the log recycles its segments.
fn append_one(wal: &Wal, index: u64, payload: &Bytes, sync: bool) {
    let mut batch = WriteBatch::new();
    batch.add_entries(GroupId(1), index, [(1, payload.clone())]);
    if index > KEEP_ENTRIES && index.is_multiple_of(KEEP_ENTRIES) {
        batch.compact(GroupId(1), index - KEEP_ENTRIES, 1);
    }
    block_on(wal.append_with(batch, sync)).expect("append");
}

/// Like [`append_one`] (synced), but polls the append with a waker that unparks this thread
/// instead of `block_on`, as an executor would.
fn append_one_polled(wal: &Wal, index: u64, payload: &Bytes) {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let mut batch = WriteBatch::new();
    batch.add_entries(GroupId(1), index, [(1, payload.clone())]);
    if index > KEEP_ENTRIES && index.is_multiple_of(KEEP_ENTRIES) {
        batch.compact(GroupId(1), index - KEEP_ENTRIES, 1);
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut future = wal.append(batch);
    loop {
        if let std::task::Poll::Ready(result) = std::pin::Pin::new(&mut future).poll(&mut cx) {
            result.expect("append");
            return;
        }
        std::thread::park();
    }
}

fn idle_latency(
    criterion: &mut Criterion,
    settings: &Settings,
    raw: &mut PrewrittenFile,
    results: &mut Vec<String>,
) {
    const PAYLOAD: usize = 128;
    if !backends().iter().any(|(_, name)| selected(&format!("idle_append/{name}_128B"))) {
        return;
    }
    let mut group = criterion.benchmark_group("idle_append");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(settings.measurement.max(Duration::from_secs(3)))
        .warm_up_time(settings.warm_up)
        .throughput(Throughput::Elements(1));
    let mut raw_histogram = disk::latency_histogram();
    group.bench_function("raw_4KiB_pwrite_fdatasync", |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            raw.write_sync_latency(4096, iters, &mut raw_histogram);
            started.elapsed()
        });
    });
    let alone_us = disk::percentiles_us(&raw_histogram);
    let line = format!(
        "RESULT idle_append raw 4 KiB pwrite+fdatasync alone: p50 {:.1} µs, p99 {:.1} µs, p99.9 \
         {:.1} µs over {}",
        alone_us[0],
        alone_us[1],
        alone_us[2],
        raw_histogram.len()
    );
    println!("{line}");
    results.push(line);
    // `_polled`: the append is polled by a plain waker, as an executor's task would (no
    // `block_on`, so the log's writer thread writes the round), for comparison.
    let cases = backends()
        .into_iter()
        .flat_map(|(backend, name)| [(backend, name, ""), (backend, name, "_polled")]);
    for (backend, backend_name, variant) in cases {
        let case = format!("{backend_name}_128B{variant}");
        if !selected(&format!("idle_append/{case}")) {
            continue;
        }
        let polled = !variant.is_empty();
        let dir = disk::bench_dir("idle");
        let (wal, _) = Wal::open(dir.path(), settings.config(backend)).expect("open");
        let payload = Bytes::from(disk::noise(PAYLOAD, 7));
        let mut histogram = disk::latency_histogram();
        // A raw 4 KiB write + fdatasync after every append, so both see the same disk.
        let mut interleaved = disk::latency_histogram();
        let mut index = 1u64;
        let before = wal.stats();
        group.bench_function(&case, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let started = Instant::now();
                    if polled {
                        append_one_polled(&wal, index, &payload);
                    } else {
                        append_one(&wal, index, &payload, true);
                    }
                    let took = started.elapsed();
                    histogram.saturating_record(took.as_nanos() as u64);
                    total += took;
                    index += 1;
                    raw.write_sync_latency(4096, 1, &mut interleaved);
                }
                total
            });
        });
        let after = wal.stats();
        let us = disk::percentiles_us(&histogram);
        let raw_us = disk::percentiles_us(&interleaved);
        let line = format!(
            "RESULT idle_append backend={backend_name}{variant} payload={PAYLOAD}B: p50 {:.1} µs, p99 {:.1} µs, \
             p99.9 {:.1} µs, max {:.0} µs over {} appends ({} fdatasyncs, {} rounds) | raw 4 KiB \
             pwrite+fdatasync interleaved: p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs over {} | p50 delta \
             {:+.1} µs, p99 ratio {:.2}",
            us[0],
            us[1],
            us[2],
            us[3],
            histogram.len(),
            after.fdatasyncs - before.fdatasyncs,
            after.rounds - before.rounds,
            raw_us[0],
            raw_us[1],
            raw_us[2],
            interleaved.len(),
            us[0] - raw_us[0],
            us[1] / raw_us[1],
        );
        println!("{line}");
        results.push(line);
    }
    group.finish();
}

fn unsynced(criterion: &mut Criterion, settings: &Settings, results: &mut Vec<String>) {
    const ENTRIES_EACH: usize = 1024;
    let mut group = criterion.benchmark_group("wal_unsynced");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(settings.measurement)
        .warm_up_time(settings.warm_up);
    // (payload, producers, entries per append, tasks): many entries per append from one thread,
    // and one entry per append from 256 tasks (the log's CPU cost per append, without the disk).
    let mut matrix: Vec<(usize, usize, usize, bool)> = Vec::new();
    for payload in [16, 64, 128] {
        matrix.push((payload, 1, ENTRIES_EACH, false));
        if settings.full {
            matrix.push((payload, 2, ENTRIES_EACH, false));
        }
    }
    matrix.push((128, 256, 1, true));
    for (backend, backend_name) in backends() {
        for &(payload, producers, entries_each, tasks) in &matrix {
            {
                let kind = if tasks { "tasks" } else { "p" };
                let name = format!("{backend_name}/{payload}B/{kind}{producers}x{entries_each}");
                if !selected(&format!("wal_unsynced/{name}")) {
                    continue;
                }
                let dir = disk::bench_dir("unsynced");
                let shape = Shape {
                    payload_bytes: payload,
                    producers,
                    groups: if tasks { 1024 } else { 64 },
                    entries_each,
                    sync: false,
                    tasks,
                };
                let load = WalLoad::open(dir.path(), settings.config(backend), shape);
                let appends_each =
                    if tasks { flotilla_bench::appends_per_producer(producers) } else { 16 };
                let before = load.wal.stats();
                let appended_before = load.appended();
                let mut elapsed = Duration::ZERO;
                let mut cpu = Duration::ZERO;
                group.throughput(Throughput::Elements(
                    appends_each * (producers * entries_each) as u64,
                ));
                let id = BenchmarkId::new(
                    format!("{backend_name}/{payload}B"),
                    format!("{kind}{producers}x{entries_each}"),
                );
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let cpu_before = flotilla_bench::cpu_time();
                        let took = load.run(iters * appends_each);
                        cpu += flotilla_bench::cpu_time().saturating_sub(cpu_before);
                        elapsed += took;
                        // Untimed: a synced round lets garbage collection recycle segments.
                        block_on(load.wal.flush()).expect("flush");
                        took
                    });
                });
                let after = load.wal.stats();
                let measured =
                    Measured::between(&before, &after, load.appended() - appended_before, elapsed);
                let line = format!(
                    "RESULT wal_unsynced backend={backend_name} payload={payload}B producers={producers}{} \
                     entries/append={entries_each}: {}entries/s, {} (records), {:.0} entries/round, \
                     fdatasyncs={} (flushes between iterations, untimed) rotations={} created={} | cpu \
                     {:.2} µs/entry",
                    if tasks { " (tasks on 1 thread)" } else { "" },
                    count(measured.entries_per_second()),
                    mb(measured.bytes_per_second()),
                    measured.entries as f64 / measured.rounds.max(1) as f64,
                    measured.fdatasyncs,
                    measured.rotations,
                    measured.segments_created,
                    cpu.as_secs_f64() * 1e6 / measured.entries.max(1) as f64,
                );
                println!("{line}");
                results.push(line);
            }
        }
    }
    group.finish();
}

fn reads(criterion: &mut Criterion, settings: &Settings, results: &mut Vec<String>) {
    const ENTRIES: u64 = 10_000;
    let mut group = criterion.benchmark_group("wal_read");
    group
        .sample_size(10)
        .measurement_time(settings.measurement)
        .warm_up_time(settings.warm_up)
        .throughput(Throughput::Elements(ENTRIES));
    for payload in [128usize, 4096] {
        if !selected(&format!("wal_read/{payload}B_x10000")) {
            continue;
        }
        let dir = disk::bench_dir("read");
        let config = Config { segment_bytes: 64 << 20, ..settings.config(Backend::Auto) };
        let (wal, _) = Wal::open(dir.path(), config).expect("open");
        let wal = Arc::new(wal);
        let data = Bytes::from(disk::noise(payload, 11));
        let mut index = 1u64;
        while index <= ENTRIES {
            let count = 500.min(ENTRIES + 1 - index);
            let mut batch = WriteBatch::new();
            batch.add_entries(GroupId(3), index, (0..count).map(|_| (1, data.clone())));
            block_on(wal.append_with(batch, false)).expect("append");
            index += count;
        }
        block_on(wal.flush()).expect("flush");
        let mut out = Vec::with_capacity(ENTRIES as usize);
        wal.entries_into(GroupId(3), 1..ENTRIES + 1, &mut out).expect("read");
        // Zero-copy: consecutive payloads of one round sit at a fixed stride in one mapping
        // (the entry header: term, length and tag between them), which separate heap copies
        // would not.
        let stride = out[1].payload.as_ptr() as usize - out[0].payload.as_ptr() as usize;
        let zero_copy = stride == payload + flotilla_wal::record::ENTRY_HEADER_LEN
            && out.iter().all(|e| e.payload == data);
        let mut read_time = Duration::ZERO;
        let mut reads = 0u64;
        group.bench_function(format!("{payload}B_x10000"), |b| {
            b.iter_custom(|iters| {
                let started = Instant::now();
                for _ in 0..iters {
                    out.clear();
                    wal.entries_into(GroupId(3), 1..ENTRIES + 1, &mut out).expect("read");
                    std::hint::black_box(&out);
                }
                reads += iters;
                let took = started.elapsed();
                read_time += took;
                took
            });
        });
        let line = format!(
            "RESULT wal_read payload={payload}B entries=10000 per call: {}entries/s, {:.1} ns/entry; payload stride {stride} B => zero-copy {zero_copy}",
            count(flotilla_bench::rate((reads * ENTRIES) as f64, read_time)),
            read_time.as_nanos() as f64 / (reads * ENTRIES).max(1) as f64,
        );
        println!("{line}");
        results.push(line);
        drop(out);
        drop(wal);
    }
    group.finish();
}

//! Recovery: open (verify every record, rebuild the index) a log of 256 MiB of 1 KiB entries over
//! 1024 groups (1 GiB with `FLOTILLA_BENCH_FULL=1`), against reading the same segment files
//! front to back with 1 MiB reads — both after dropping the files from the page cache with
//! `posix_fadvise(DONTNEED)`, in the same run. Also the index's memory per live entry.
//!
//! `cargo bench -p flotilla-bench --bench recovery`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, SamplingMode, Throughput};
use flotilla_bench::disk;
use flotilla_bench::{full_mode, mb, median, quick_mode, size};
use flotilla_wal::segment::SEGMENT_SUFFIX;
use flotilla_wal::{Config, GroupId, Wal, WriteBatch, block_on};

const PAYLOAD: usize = 1024;
const GROUPS: u64 = 1024;
const ENTRIES_PER_APPEND: u64 = 64;

/// The live segment files of the log in `dir`.
fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("listing the log")
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.to_string_lossy().ends_with(SEGMENT_SUFFIX))
        .collect();
    files.sort();
    files
}

fn drop_all(files: &[PathBuf]) {
    for file in files {
        disk::drop_from_cache(file).expect("dropping a file from the page cache");
    }
}

/// Writes `target` bytes of entries: batches of 64 entries for one group at a time, groups in
/// turn, unsynced but flushed at the end.
fn fill(dir: &Path, config: &Config, target: u64) -> u64 {
    let (wal, _) = Wal::open(dir, config.clone()).expect("open");
    let payload = Bytes::from(disk::noise(PAYLOAD, 5));
    let mut next = vec![1u64; GROUPS as usize];
    let mut written = 0u64;
    let mut turn = 0u64;
    while written < target {
        let group = turn % GROUPS;
        let index = &mut next[group as usize];
        let mut batch = WriteBatch::new();
        batch.add_entries(
            GroupId(group),
            *index,
            (0..ENTRIES_PER_APPEND).map(|_| (1, payload.clone())),
        );
        *index += ENTRIES_PER_APPEND;
        block_on(wal.append_with(batch, false)).expect("append");
        written += ENTRIES_PER_APPEND * PAYLOAD as u64;
        turn += 1;
    }
    block_on(wal.flush()).expect("flush");
    let entries = wal.stats().entries;
    wal.close().expect("close");
    entries
}

fn main() {
    let quick = quick_mode();
    let target: u64 = if quick {
        8 << 20
    } else if full_mode() {
        1 << 30
    } else {
        256 << 20
    };
    let config = Config {
        segment_bytes: if quick { 8 << 20 } else { Config::default().segment_bytes },
        ..Config::default()
    };
    let dir = disk::bench_dir("recovery");
    let filled = Instant::now();
    let entries = fill(dir.path(), &config, target);
    println!(
        "filled {} of payload ({entries} entries) in {:.1} s",
        size(target as f64),
        filled.elapsed().as_secs_f64()
    );
    let file_bytes: u64 = segment_files(dir.path())
        .iter()
        .map(|p| std::fs::metadata(p).expect("metadata").len())
        .sum();

    let mut criterion = Criterion::default().configure_from_args();
    let mut group = criterion.benchmark_group("recovery");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(if quick { 1 } else { 5 }))
        .warm_up_time(Duration::from_millis(1))
        .throughput(Throughput::Bytes(file_bytes));

    // Open times and the files' bytes at each open (closing adds a small seal round, and a
    // prepared segment may join the live ones).
    let mut opens: Vec<(Duration, u64)> = Vec::new();
    let mut index_per_entry = 0.0;
    let mut live_entries = 0;
    group.bench_function("open_1KiB_x1024_groups", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let files = segment_files(dir.path());
                let bytes: u64 =
                    files.iter().map(|p| std::fs::metadata(p).expect("metadata").len()).sum();
                drop_all(&files);
                let started = Instant::now();
                let (wal, _recovery) = Wal::open(dir.path(), config.clone()).expect("recover");
                let took = started.elapsed();
                let stats = wal.stats();
                live_entries = stats.live_entries;
                index_per_entry = stats.index_bytes as f64 / stats.live_entries.max(1) as f64;
                wal.close().expect("close");
                opens.push((took, bytes));
                total += took;
            }
            total
        });
    });
    let mut reads: Vec<(Duration, u64)> = Vec::new();
    group.bench_function("sequential_read_same_files_1MiB", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let files = segment_files(dir.path());
                drop_all(&files);
                let started = Instant::now();
                let bytes = disk::read_sequentially(&files, 1 << 20).expect("reading");
                let took = started.elapsed();
                reads.push((took, bytes));
                total += took;
            }
            total
        });
    });
    group.finish();
    criterion.final_summary();

    let open_rates: Vec<f64> =
        opens.iter().map(|(took, bytes)| flotilla_bench::rate(*bytes as f64, *took)).collect();
    let read_rates: Vec<f64> =
        reads.iter().map(|(took, bytes)| flotilla_bench::rate(*bytes as f64, *took)).collect();
    let open_ms: Vec<f64> = opens.iter().map(|(took, _)| took.as_secs_f64() * 1e3).collect();
    let (open_rate, read_rate) = (median(&open_rates), median(&read_rates));
    println!(
        "RESULT recovery log={} files={} entries={live_entries} ({} B each, {GROUPS} groups): open \
         median {:.0} ms = {} over {} opens | sequential read (1 MiB reads, same files, cache \
         dropped): {} over {} reads | ratio {:.2} | index {:.2} B per live entry",
        size(target as f64),
        size(file_bytes as f64),
        PAYLOAD,
        median(&open_ms),
        mb(open_rate),
        opens.len(),
        mb(read_rate),
        reads.len(),
        open_rate / read_rate,
        index_per_entry,
    );
}

//! The engine end to end: three Flotilla nodes in one process on loopback TCP, fdatasync on, every
//! node hosting the same groups, proposers writing KV Puts through each group's leader
//! (`flotilla_bench::cluster`, modelled on `engine/examples/cluster.rs`).
//!
//! * `engine/writes/{16,128,1024}B/g{1,64,1024}`: committed writes/s with many concurrent
//!   proposers (criterion's throughput; one measured iteration is "N proposals completed by P
//!   proposers" on a cluster started once per group count, outside the timed loop), measured in
//!   the steady state: the same load first runs until every WAL has recycled a segment and no
//!   new one was needed for 3 s (the ramp, at most 20 s — 1,024 groups of small writes do not
//!   get there and say so; its duration and rate are printed too; see `ramp`). The figures
//!   include criterion's warm-up iterations (segments created and recycled too). Printed
//!   alongside, from the same iterations: p50/p99/p99.9 latency, fdatasyncs/s per shard, entries per
//!   fdatasync, frames/s and messages per frame, CPU per write (T8), of the whole process and of
//!   the nodes alone (the process less the thread running the proposers).
//! * The ratio of throughput with 64 groups to 1 group, per payload (goal ≥ 5×).
//! * `engine/idle_write/128B`: one small write at a time on an idle one-group cluster, p50, next to
//!   a loopback TCP round trip and a raw 4 KiB `pwrite` + `fdatasync` on the same disk, measured
//!   after every write (T7: p50 ≤ RTT + fdatasync + 50 µs).
//! * Tail at half load: an open-loop load at half the maximum 64-group 128 B throughput measured
//!   in the same run; p99.9 ÷ p50 (T9: ≤ 10×).
//!
//! `cargo bench -p flotilla-bench --bench engine` (≈ 3 min with the ramps; criterion's options shorten it:
//! `-- --warm-up-time 1 --measurement-time 5`; a filter such as `-- 'engine/writes/128B'` skips the
//! other clusters). `FLOTILLA_BENCH_SHARDS` sets shards per node (default 1, as the example),
//! `FLOTILLA_BENCH_PROPOSERS` the proposers (default 4,096 — 64 per group at 64 groups; at least
//! one per group). The default saturates the three nodes: with 512 (8 per group at 64 groups)
//! each group's round carries a handful of entries, so per-round costs decide throughput
//! (`bench/RESULTS.md` has the sweep). The load runs on a current-thread runtime without an IO
//! driver (see `flotilla::Engine`: with one, every answer costs an eventfd write). The process
//! allocates with mimalloc, as Flotilla's binaries do: 14–23 % more writes/s than glibc malloc at
//! 64 groups × 128 B (`bench/RESULTS.md`). Under `cargo test --benches` (criterion's test mode)
//! every measurement runs once, shrunk.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use flotilla_bench::cluster::{Cluster, LoopbackPing, Refusals, Run, Totals};
use flotilla_bench::disk::{self, PrewrittenFile};
use flotilla_bench::{count, quick_mode, selected};
use hdrhistogram::Histogram;

// The engine as its binaries run it (`flotilla-load`, `flotilla`): on mimalloc. A user embedding
// Flotilla picks the allocator; glibc's malloc/free were ~10 % of this bench's profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PAYLOADS: [usize; 3] = [16, 128, 1024];
const GROUPS: [u64; 3] = [1, 64, 1024];
/// The payload of the idle write and of the half-load tail.
const SMALL: usize = 128;
/// The group count of the headline goals (T8, T9).
const HEADLINE_GROUPS: u64 = 64;

struct Settings {
    quick: bool,
    shards: usize,
    proposers: usize,
    /// Proposals per proposer in one measured iteration.
    each: u64,
    /// How long the paced half-load run lasts.
    paced: Duration,
}

impl Settings {
    fn from_env() -> Settings {
        let quick = quick_mode();
        let env = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&v| v > 0)
                .unwrap_or(default)
        };
        Settings {
            quick,
            shards: env("FLOTILLA_BENCH_SHARDS", 1),
            proposers: env("FLOTILLA_BENCH_PROPOSERS", 4096),
            each: if quick { 1 } else { 16 },
            paced: if quick { Duration::from_millis(300) } else { Duration::from_secs(5) },
        }
    }

    /// Proposers for `groups` groups: every group has at least one.
    fn proposers(&self, groups: u64) -> usize {
        self.proposers.max(groups as usize)
    }
}

/// What the iterations of one throughput configuration did, summed.
struct Measured {
    elapsed: Duration,
    committed: u64,
    refused: Refusals,
    latency: Histogram<u64>,
    totals: Totals,
    /// CPU of the whole process: the three nodes and the load.
    cpu: Duration,
    /// CPU of the thread running the load (the proposers), included in `cpu`.
    load_cpu: Duration,
    shards: usize,
    /// The load that ran before the measured iterations (none in criterion's test mode).
    ramp: Option<Ramp>,
}

impl Measured {
    fn new(shards: usize) -> Measured {
        Measured {
            elapsed: Duration::ZERO,
            committed: 0,
            refused: Refusals::default(),
            latency: disk::latency_histogram(),
            totals: Totals::default(),
            cpu: Duration::ZERO,
            load_cpu: Duration::ZERO,
            shards,
            ramp: None,
        }
    }

    fn add(&mut self, run: &Run, totals: &Totals, cpu: Duration, load_cpu: Duration) {
        self.elapsed += run.elapsed;
        self.committed += run.committed;
        self.refused.add(&run.refused);
        self.latency.add(&run.latency).expect("same bounds");
        self.totals.add(totals);
        self.cpu += cpu;
        self.load_cpu += load_cpu;
    }

    /// CPU per committed write, µs: the whole process, and the nodes alone (T8's "over all
    /// replicas": the process less the load's thread).
    fn cpu_per_write_us(&self) -> (f64, f64) {
        let per = |cpu: Duration| cpu.as_secs_f64() * 1e6 / self.committed.max(1) as f64;
        (per(self.cpu), per(self.cpu.saturating_sub(self.load_cpu)))
    }

    fn writes_per_second(&self) -> f64 {
        flotilla_bench::rate(self.committed as f64, self.elapsed)
    }

    fn entries_per_fdatasync(&self) -> f64 {
        self.totals.entries as f64 / self.totals.fdatasyncs.max(1) as f64
    }

    fn messages_per_frame(&self) -> f64 {
        self.totals.messages as f64 / self.totals.frames.max(1) as f64
    }

    fn line(&self) -> String {
        let [p50, p99, p999, max] = disk::percentiles_us(&self.latency);
        let (cpu_all, cpu_nodes) = self.cpu_per_write_us();
        format!(
            "{}writes/s ({} writes; {}) | latency p50 {p50:.0} µs, p99 {p99:.0} µs, \
             p99.9 {p999:.0} µs, max {max:.0} µs | {:.0} fdatasyncs/s per shard ({} shards), \
             {:.1} entries/fdatasync | {}frames/s, {:.1} messages/frame | {cpu_all:.1} µs CPU/write ({cpu_nodes:.1} µs in the nodes' threads) | WAL \
             segments {} created, {} recycled, {} deleted{}",
            count(self.writes_per_second()),
            self.committed,
            self.refused,
            flotilla_bench::rate(self.totals.fdatasyncs as f64, self.elapsed) / self.shards as f64,
            self.shards,
            self.entries_per_fdatasync(),
            count(flotilla_bench::rate(self.totals.frames as f64, self.elapsed)),
            self.messages_per_frame(),
            self.totals.segments_created,
            self.totals.segments_recycled,
            self.totals.segments_deleted,
            self.ramp.as_ref().map_or(String::new(), |ramp| format!(" | {}", ramp.describe())),
        )
    }
}

fn writes_id(payload: usize, groups: u64) -> String {
    format!("engine/writes/{payload}B/g{groups}")
}

const IDLE_ID: &str = "engine/idle_write/128B";
const HALF_ID: &str = "engine/half_load/128B/g64";

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        // Criterion would list the benchmarks only as they run: each cluster would start, and
        // every RESULT line would print zeros.
        let writes = GROUPS.into_iter().flat_map(|g| PAYLOADS.map(|p| writes_id(p, g)));
        for id in std::iter::once(IDLE_ID.to_owned()).chain(writes).filter(|id| selected(id)) {
            println!("{id}: benchmark");
        }
        return;
    }
    let settings = Settings::from_env();
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let mut summary: Vec<String> = Vec::new();
    let mut measured: BTreeMap<(u64, usize), Measured> = BTreeMap::new();
    for groups in GROUPS {
        let wanted: Vec<usize> =
            PAYLOADS.into_iter().filter(|&p| selected(&writes_id(p, groups))).collect();
        let idle = groups == 1 && selected(IDLE_ID);
        let half = groups == HEADLINE_GROUPS && selected(HALF_ID);
        if wanted.is_empty() && !idle && !half {
            continue;
        }
        let cluster = Cluster::start(groups, settings.shards).expect("starting the cluster");
        eprintln!(
            "cluster: 3 nodes × {} shard(s), WAL backend {}, {groups} groups × 3 nodes created in \
             {:.2} s, nodes started, groups created and led in {:.2} s, leaders per node {:?}",
            settings.shards,
            cluster.backend(),
            cluster.create_time().as_secs_f64(),
            cluster.setup_time().as_secs_f64(),
            cluster.leaders_per_node()
        );
        if idle {
            // The same, side by side, with the shard's own writes of idle rounds turned off.
            let handed_off =
                Cluster::start_with(groups, settings.shards, |c| c.inline_idle_writes = false)
                    .expect("starting the second cluster");
            summary.push(idle_write(&mut criterion, &cluster, &handed_off));
            handed_off.shutdown();
        }
        for payload in wanted {
            let result = throughput(&mut criterion, &settings, &cluster, payload);
            let line = format!("RESULT {} {}", writes_id(payload, groups), result.line());
            eprintln!("{line}");
            summary.push(line);
            measured.insert((groups, payload), result);
        }
        if half {
            let max = measured.get(&(groups, SMALL)).map(Measured::writes_per_second);
            summary.push(half_load(&settings, &cluster, max));
        }
        cluster.shutdown();
    }
    for payload in PAYLOADS {
        if let (Some(one), Some(many)) =
            (measured.get(&(1, payload)), measured.get(&(HEADLINE_GROUPS, payload)))
        {
            let ratio = many.writes_per_second() / one.writes_per_second();
            summary.push(format!(
                "RESULT engine/scaling/{payload}B: 64 groups {}writes/s ÷ 1 group {}writes/s = \
                 {ratio:.2}× (goal ≥ 5×)",
                count(many.writes_per_second()),
                count(one.writes_per_second())
            ));
        }
    }
    if let Some(headline) = measured.get(&(HEADLINE_GROUPS, SMALL)) {
        summary.push(format!(
            "RESULT engine/goals 64 groups × 128 B: {}writes/s (goal ≥ 500 k), {:.1} µs CPU per \
             write in the nodes' threads (goal ≤ 4), {:.1} messages/frame (goal ≥ 50), {:.1} \
             entries/fdatasync (goal ≥ 100)",
            count(headline.writes_per_second()),
            headline.cpu_per_write_us().1,
            headline.messages_per_frame(),
            headline.entries_per_fdatasync()
        ));
    }
    criterion.final_summary();
    eprintln!("\n==== engine summary (this run) ====");
    for line in &summary {
        eprintln!("{line}");
    }
}

/// The longest a ramp runs: 64 groups recycle within a few seconds; 1,024 groups of 16 B writes
/// fill the WAL's segment target (which forces their snapshots) only after ~20 s.
const RAMP_MAX: Duration = Duration::from_secs(20);
/// How long the logs must go without a new segment (every WAL having recycled) to count as
/// steady: longer than the 2 s between the bursts of new segments while 64 groups' logs grow.
const RAMP_QUIET: Duration = Duration::from_secs(3);

/// What the load did before measurement began.
struct Ramp {
    elapsed: Duration,
    committed: u64,
    /// Whether the logs reached their steady state before [`RAMP_MAX`] (see [`ramp`]).
    steady: bool,
}

impl Ramp {
    fn describe(&self) -> String {
        format!(
            "ramp {:.1} s at {}writes/s{}",
            self.elapsed.as_secs_f64(),
            count(flotilla_bench::rate(self.committed as f64, self.elapsed)),
            if self.steady { "" } else { ", stopped before the logs were steady" }
        )
    }
}

/// Runs the measured load on `cluster` until its logs are in their steady state — every shard's
/// WAL has recycled a segment and then none created one for [`RAMP_QUIET`], so
/// the logs stopped growing into new pre-written files (64 MiB of zeros each, ~10 % of the CPU
/// of a run that includes them) and the nodes' memory reached its working size — or for
/// [`RAMP_MAX`]. T8 is a sustained rate: a cluster's first seconds, while every log grows from
/// nothing (or to the size a larger payload needs), are a one-time cost the ramp's own rate
/// (printed with the result) shows.
fn ramp(cluster: &Cluster, value: &Bytes, proposers: usize, each: u64) -> Ramp {
    let before = cluster.segments_per_wal();
    let mut last = before.clone();
    let mut ramp = Ramp { elapsed: Duration::ZERO, committed: 0, steady: false };
    let mut quiet = Duration::ZERO;
    while ramp.elapsed < RAMP_MAX {
        let run = cluster.run(value, proposers, each);
        ramp.elapsed += run.elapsed;
        ramp.committed += run.committed;
        let now = cluster.segments_per_wal();
        let created = now.iter().zip(&last).any(|(now, then)| now.0 > then.0);
        quiet = if created { Duration::ZERO } else { quiet + run.elapsed };
        let every_wal_recycled = now.iter().zip(&before).all(|(now, then)| now.1 > then.1);
        if every_wal_recycled && quiet >= RAMP_QUIET {
            ramp.steady = true;
            break;
        }
        last = now;
    }
    ramp
}

/// Committed writes/s with `payload`-byte values on `cluster`, many proposers, measured after a
/// [`ramp`] to the steady state.
fn throughput(
    criterion: &mut Criterion,
    settings: &Settings,
    cluster: &Cluster,
    payload: usize,
) -> Measured {
    let groups = cluster.groups();
    let proposers = settings.proposers(groups);
    let each = settings.each;
    let value = Bytes::from(disk::noise(payload, 0xB0B));
    let mut measured = Measured::new(cluster.shards());
    if !settings.quick {
        measured.ramp = Some(ramp(cluster, &value, proposers, each));
    }
    let mut group = criterion.benchmark_group("engine/writes");
    group
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(proposers as u64 * each));
    group.bench_function(BenchmarkId::new(format!("{payload}B"), format!("g{groups}")), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let before = cluster.totals();
                let cpu_before = flotilla_bench::cpu_time();
                let load_before = flotilla_bench::thread_cpu_time();
                let run = cluster.run(&value, proposers, each);
                let load_cpu = flotilla_bench::thread_cpu_time().saturating_sub(load_before);
                let cpu = flotilla_bench::cpu_time().saturating_sub(cpu_before);
                let done = cluster.totals().since(&before);
                measured.add(&run, &done, cpu, load_cpu);
                total += run.elapsed;
            }
            total
        });
    });
    group.finish();
    measured
}

/// One small write at a time on an idle cluster, each followed (untimed) by a loopback round trip
/// and a raw 4 KiB write + fdatasync on the same disk — and by the same write on `handed_off`, a
/// cluster whose shards never write idle rounds themselves (`inline_idle_writes = false`), so
/// the two are compared in one run.
fn idle_write(criterion: &mut Criterion, cluster: &Cluster, handed_off: &Cluster) -> String {
    let value = Bytes::from(disk::noise(SMALL, 0x1D1E));
    let raw_dir = disk::bench_dir("engine-raw");
    let mut raw =
        PrewrittenFile::create(&raw_dir.path().join("raw"), 8 << 20).expect("pre-writing");
    let mut ping = LoopbackPing::start().expect("loopback echo");
    let three = disk::ConcurrentSyncs::start(raw_dir.path(), 3).expect("three syncing threads");
    let mut second_of_three = disk::latency_histogram();
    let mut writes = disk::latency_histogram();
    let mut handed = disk::latency_histogram();
    let mut rtts = disk::latency_histogram();
    let mut syncs = disk::latency_histogram();
    let mut group = criterion.benchmark_group("engine/idle_write");
    group.sampling_mode(SamplingMode::Flat).throughput(Throughput::Elements(1));
    group.bench_function(format!("{SMALL}B"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let took = cluster.write_once(&value);
                writes.saturating_record(took.as_nanos() as u64);
                total += took;
                let rtt = ping.round_trip().expect("loopback round trip");
                rtts.saturating_record(rtt.as_nanos() as u64);
                raw.write_sync_latency(4096, 1, &mut syncs);
                let took = three.round()[1];
                second_of_three.saturating_record(took.as_nanos() as u64);
                let took = handed_off.write_once(&value);
                handed.saturating_record(took.as_nanos() as u64);
            }
            total
        });
    });
    group.finish();
    let [write_p50, write_p99, ..] = disk::percentiles_us(&writes);
    let [handed_p50, handed_p99, ..] = disk::percentiles_us(&handed);
    let [rtt_p50, ..] = disk::percentiles_us(&rtts);
    let [sync_p50, sync_p99, ..] = disk::percentiles_us(&syncs);
    let [shared_p50, ..] = disk::percentiles_us(&second_of_three);
    let budget = rtt_p50 + sync_p50 + 50.0;
    let line = format!(
        "RESULT {IDLE_ID}: {} writes, p50 {write_p50:.0} µs (p99 {write_p99:.0} µs) | loopback RTT \
         p50 {rtt_p50:.0} µs + raw 4 KiB write+fdatasync p50 {sync_p50:.0} µs (p99 \
         {sync_p99:.0} µs) + 50 µs = {budget:.0} µs | p50 − (RTT + fdatasync) = {:+.0} µs \
         (goal ≤ +50 µs: {}) | the three nodes share one disk: the 2nd of 3 concurrent 4 KiB \
         write+fdatasync p50 {shared_p50:.0} µs, p50 − (RTT + that) = {:+.0} µs | without the \
         shards' own idle writes: p50 {handed_p50:.0} µs (p99 {handed_p99:.0} µs), {:.2}× the \
         p50 with them",
        writes.len(),
        write_p50 - rtt_p50 - sync_p50,
        if write_p50 <= budget { "met" } else { "missed" },
        write_p50 - rtt_p50 - shared_p50,
        handed_p50 / write_p50,
    );
    eprintln!("{line}");
    line
}

/// An open-loop load at half the maximum throughput of `cluster` with 128 B values (measured in
/// this run by `engine/writes`, or here for a second if that was filtered out): p99.9 ÷ p50.
fn half_load(settings: &Settings, cluster: &Cluster, max: Option<f64>) -> String {
    let value = Bytes::from(disk::noise(SMALL, 0x4A1F));
    let max = max.unwrap_or_else(|| {
        let proposers = settings.proposers(cluster.groups());
        let run = cluster.run(&value, proposers, if settings.quick { 1 } else { 128 });
        flotilla_bench::rate(run.committed as f64, run.elapsed)
    });
    let rate = max / 2.0;
    let before = cluster.totals();
    let run = cluster.run_paced(&value, rate, settings.paced, 1 << 16);
    let done = cluster.totals().since(&before);
    let [p50, p99, p999, top] = disk::percentiles_us(&run.latency);
    let ratio = p999 / p50.max(1.0);
    let line = format!(
        "RESULT {HALF_ID}: target {}writes/s (half of {}), achieved {}writes/s ({} writes, {} skipped; \
         {}) | p50 {p50:.0} µs, p99 {p99:.0} µs, p99.9 {p999:.0} µs, max {top:.0} µs \
         | p99.9 ÷ p50 = {ratio:.1}× (goal ≤ 10×: {}) | {:.1} entries/fdatasync, {:.1} \
         messages/frame",
        count(rate),
        count(max),
        count(flotilla_bench::rate(run.committed as f64, run.elapsed)),
        run.committed,
        run.skipped,
        run.refused,
        if ratio <= 10.0 { "met" } else { "missed" },
        done.entries as f64 / done.fdatasyncs.max(1) as f64,
        done.messages as f64 / done.frames.max(1) as f64,
    );
    eprintln!("{line}");
    line
}

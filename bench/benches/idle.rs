//! Idle groups (issue 5): what tens of thousands of groups cost a node when nothing happens, and
//! how a node's death is handled while they are quiet.
//!
//! Three nodes in one process on loopback (one shard each), every node hosting every group:
//! 1. `quiet`: with quiescence (the default), after one write per group, wait until every group
//!    is quiet, then measure the process's CPU time over a window (per node: divided by three)
//!    and, at the end of that window, its resident memory per replica (RSS growth since before
//!    the nodes started, divided by 3 × groups; live heap is counted at the window's start);
//! 2. `dead node`: kill the node leading the most groups, time until every group has a leader
//!    on the survivors, until they are all quiet again, and the survivors' idle CPU after;
//! 3. the same idle measurement side by side with quiescence off, on fewer groups (every group
//!    then heartbeats; 10,000 of them would saturate this machine) — the ratio is the figure.
//!
//! Not a criterion benchmark: the figures are a steady-state CPU share and times, printed as a
//! table. `cargo bench -p flotilla-bench --bench idle` (`IDLE_GROUPS`, default 10,000;
//! `IDLE_WINDOW_SECS`, default 10); `cargo test --benches` runs it shrunk. `IDLE_TRACE=1` prints
//! the survivors' leader count and awake groups at every poll after the kill.
//!
//! `IDLE_BREAKDOWN=1` also prints where the memory per replica goes: anonymous against
//! file-backed RSS (`/proc/self/smaps_rollup`), glibc's arenas (`mallinfo2`), the live heap's
//! growth by size class, and the RSS left after `malloc_trim(0)` (which then changes the later
//! phases' figures). With `IDLE_EXIT_AT_QUIET=1` as well, the process exits right after that
//! first breakdown, so that what heaptrack reports as leaked is what the quiet groups hold:
//! `heaptrack <bench binary> --bench`, then `heaptrack_print --print-leaks 1` (or
//! `--flamegraph-cost-type leaked -F stacks.txt`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla::raftgroup::Role;
use flotilla::{Engine, GroupId, NodeId};
use flotilla_bench::cluster::Cluster;
use flotilla_bench::{cpu_time, quick_mode, rss_bytes};

/// Counts live heap bytes, so the figure per replica can be told apart from what the allocator
/// keeps resident after the write burst (RSS).
struct Counting;

static LIVE_HEAP: AtomicUsize = AtomicUsize::new(0);

/// Live allocations by size class (class `c` holds sizes in `2^(c-1) + 1 ..= 2^c`), for the
/// breakdown (`IDLE_BREAKDOWN=1`).
static CLASS_LIVE: [AtomicUsize; CLASSES] = [const { AtomicUsize::new(0) }; CLASSES];
static CLASS_BYTES: [AtomicUsize; CLASSES] = [const { AtomicUsize::new(0) }; CLASSES];
const CLASSES: usize = 40;

fn class(size: usize) -> usize {
    (usize::BITS - size.saturating_sub(1).leading_zeros()) as usize
}

fn count_alloc(size: usize) {
    LIVE_HEAP.fetch_add(size, Ordering::Relaxed);
    CLASS_LIVE[class(size)].fetch_add(1, Ordering::Relaxed);
    CLASS_BYTES[class(size)].fetch_add(size, Ordering::Relaxed);
}

fn count_dealloc(size: usize) {
    LIVE_HEAP.fetch_sub(size, Ordering::Relaxed);
    CLASS_LIVE[class(size)].fetch_sub(1, Ordering::Relaxed);
    CLASS_BYTES[class(size)].fetch_sub(size, Ordering::Relaxed);
}

// SAFETY: every call forwards to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_alloc(layout.size());
        // SAFETY: the caller's contract is passed through.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_alloc(layout.size());
        // SAFETY: the caller's contract is passed through.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count_dealloc(layout.size());
        // SAFETY: the caller's contract is passed through.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_alloc(new_size);
        count_dealloc(layout.size());
        // SAFETY: the caller's contract is passed through.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The share of one core the process used over `window`, per node (`nodes` of them).
fn idle_cpu(window: Duration, nodes: usize) -> f64 {
    let (cpu, wall) = (cpu_time(), Instant::now());
    std::thread::sleep(window);
    let used = cpu_time().saturating_sub(cpu);
    used.as_secs_f64() / wall.elapsed().as_secs_f64() / nodes as f64
}

async fn awake(engines: &[Engine]) -> usize {
    let mut sum = 0;
    for engine in engines {
        sum += engine
            .shard_stats()
            .await
            .expect("stats")
            .iter()
            .map(|s| s.groups_awake)
            .sum::<usize>();
    }
    sum
}

/// Waits until no group of `engines` is awake; returns how long that took.
fn wait_quiet(cluster: &Cluster, patience: Duration) -> Duration {
    let started = Instant::now();
    cluster.block_on(async {
        while awake(cluster.engines()).await > 0 {
            assert!(started.elapsed() < patience, "groups never went quiet");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    started.elapsed()
}

/// Groups whose replica on one of `engines` leads, summed (a group counts twice while a
/// deposed leader has not yet heard of its successor).
async fn leaders_led(engines: &[Engine]) -> u64 {
    let mut sum = 0;
    for engine in engines {
        let stats = engine.shard_stats().await.expect("stats");
        sum += stats.iter().map(|s| s.leaders as u64).sum::<u64>();
    }
    sum
}

/// Groups without a leader among `engines` (a leader counts only if its own node says so).
async fn leaderless(engines: &[Engine], groups: u64) -> u64 {
    let mut missing = 0;
    for group in (1..=groups).map(GroupId) {
        let mut led = false;
        for engine in engines {
            if let Ok(status) = engine.status(group).await
                && status.role == Role::Leader
            {
                led = true;
                break;
            }
        }
        missing += u64::from(!led);
    }
    missing
}

/// `(Rss, Anonymous)` of `/proc/self/smaps_rollup`, in bytes.
fn smaps_rollup() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("Rss:"), field("Anonymous:"))
}

fn classes() -> Vec<(usize, usize)> {
    (0..CLASSES)
        .map(|c| (CLASS_LIVE[c].load(Ordering::Relaxed), CLASS_BYTES[c].load(Ordering::Relaxed)))
        .collect()
}

/// Where the memory per replica goes (`IDLE_BREAKDOWN=1`): anonymous against file-backed RSS,
/// glibc's arenas, and the live heap's growth by size class, each per replica.
fn breakdown(replicas: f64, smaps_before: (u64, u64), classes_before: &[(usize, usize)]) {
    let (rss, anon) = smaps_rollup();
    let per = |bytes: u64, before: u64| bytes.saturating_sub(before) as f64 / replicas;
    println!(
        "  breakdown per replica: RSS {:.0} B = anonymous {:.0} B + file-backed {:.0} B",
        per(rss, smaps_before.0),
        per(anon, smaps_before.1),
        per(rss - anon, smaps_before.0 - smaps_before.1),
    );
    println!(
        "  sizes: Replica {} B, KvStateMachine {} B",
        std::mem::size_of::<flotilla::raftgroup::Replica>(),
        std::mem::size_of::<flotilla::kv::KvStateMachine>(),
    );
    // SAFETY: mallinfo2 has no preconditions.
    let info = unsafe { libc::mallinfo2() };
    println!(
        "  glibc (process): arena {} KiB, in use {} KiB, free in arenas {} KiB, mmapped {} KiB, \
         free chunks {}",
        info.arena / 1024,
        info.uordblks / 1024,
        info.fordblks / 1024,
        info.hblkhd / 1024,
        info.ordblks,
    );
    let now = classes();
    for (c, ((live, bytes), (live_before, bytes_before))) in
        now.iter().zip(classes_before).enumerate()
    {
        let (live, bytes) = (live.wrapping_sub(*live_before), bytes.wrapping_sub(*bytes_before));
        if bytes.cast_signed().unsigned_abs() as f64 / replicas >= 1.0 {
            println!(
                "  live heap size class {:>8}..={:<8} B: {:7.2} allocations, {:6.0} B per replica",
                if c == 0 { 0 } else { (1usize << (c - 1)) + 1 },
                1usize << c,
                live.cast_signed() as f64 / replicas,
                bytes.cast_signed() as f64 / replicas,
            );
        }
    }
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
    std::thread::sleep(Duration::from_millis(200));
    let (rss_trimmed, anon_trimmed) = smaps_rollup();
    println!(
        "  after malloc_trim(0): RSS {:.0} B per replica (anonymous {:.0} B)",
        per(rss_trimmed, smaps_before.0),
        per(anon_trimmed, smaps_before.1),
    );
}

struct Figures {
    groups: u64,
    quiesce: bool,
    rss_per_replica: f64,
    heap_per_replica: f64,
    idle_cpu: f64,
    quiet_after: Duration,
}

fn idle(groups: u64, quiesce: bool, window: Duration) -> (Cluster, Figures) {
    let rss_before = rss_bytes();
    let heap_before = LIVE_HEAP.load(Ordering::Relaxed);
    let (smaps_before, classes_before) = (smaps_rollup(), classes());
    let cluster = Cluster::start_with(groups, 1, |config| {
        config.quiesce = quiesce;
        // Small segments: 30,000 replicas' first entries fit in one; the default 64 MiB
        // preallocations would dominate the disk, not the memory.
        config.wal.segment_bytes = 8 << 20;
        // Every group is created (and written) at once: room for all of those requests.
        config.inbox_capacity =
            config.inbox_capacity.max(usize::try_from(groups).expect("fits") * 2);
    })
    .expect("cluster");
    eprintln!("{groups} groups, quiesce {quiesce}: set up in {:?}", cluster.setup_time());
    // One write per group, so every replica has an entry and an applied state machine.
    let value = Bytes::from_static(b"v");
    let run = cluster.run(&value, usize::try_from(groups).expect("fits"), 1);
    assert_eq!(run.committed, groups);
    let quiet_after =
        if quiesce { wait_quiet(&cluster, Duration::from_secs(120)) } else { Duration::ZERO };
    // Let allocator caches and the last rounds settle before measuring.
    std::thread::sleep(Duration::from_millis(500));
    let heap = LIVE_HEAP.load(Ordering::Relaxed).saturating_sub(heap_before);
    let idle_cpu = idle_cpu(window, 3);
    // Resident memory once idle: after the CPU window, by when every shard has been idle long
    // enough to release its burst buffers and hand freed heap back (`trim_heap` in the driver).
    let rss = rss_bytes().saturating_sub(rss_before);
    if std::env::var_os("IDLE_BREAKDOWN").is_some() {
        breakdown((3 * groups) as f64, smaps_before, &classes_before);
        if std::env::var_os("IDLE_EXIT_AT_QUIET").is_some() {
            // What is live now is what heaptrack reports as leaked.
            std::process::exit(0);
        }
    }
    let figures = Figures {
        groups,
        quiesce,
        rss_per_replica: rss as f64 / (3 * groups) as f64,
        heap_per_replica: heap as f64 / (3 * groups) as f64,
        idle_cpu,
        quiet_after,
    };
    (cluster, figures)
}

fn print(figures: &Figures) {
    println!(
        "idle/{}groups/quiesce={:<5}  idle CPU per node {:6.2} % of a core   per replica: RSS {:6.0} B, live heap {:6.0} B   quiet {:?} after the writes",
        figures.groups,
        figures.quiesce,
        figures.idle_cpu * 100.0,
        figures.rss_per_replica,
        figures.heap_per_replica,
        figures.quiet_after,
    );
}

fn main() {
    let quick = quick_mode();
    let groups = if quick { 64 } else { env_or("IDLE_GROUPS", 10_000) };
    let compare_groups = if quick { 64 } else { env_or("IDLE_COMPARE_GROUPS", 1_000) };
    let window = Duration::from_secs(if quick { 1 } else { env_or("IDLE_WINDOW_SECS", 10) });

    // 1. Quiet groups.
    let (mut cluster, quiet) = idle(groups, true, window);
    print(&quiet);

    // 2. The node leading the most groups dies.
    let leaders = cluster.leaders_per_node();
    let victim_index = (0..3).max_by_key(|i| leaders[*i]).expect("three nodes");
    let killed_at = Instant::now();
    let victim = cluster.kill(victim_index);
    let survivors: Vec<NodeId> = cluster.engines().iter().map(Engine::node).collect();
    let patience = Duration::from_secs(120);
    let trace = std::env::var_os("IDLE_TRACE").is_some();
    let elected = cluster.block_on(async {
        loop {
            // The survivors' leader counts cost two requests; asking every group's status
            // costs thousands and takes a few hundred milliseconds — a poll that slow would
            // add up to its own length to the figure. So: poll the counts, and only once they
            // add up to every group, confirm group by group (and take the time of that poll).
            let (led, at) = (leaders_led(cluster.engines()).await, killed_at.elapsed());
            if trace {
                let awake = awake(cluster.engines()).await;
                eprintln!("  {at:?}: {led} groups led, {awake} awake");
            }
            if led >= groups {
                let missing = leaderless(cluster.engines(), groups).await;
                if missing == 0 {
                    return at;
                }
            }
            assert!(killed_at.elapsed() < patience, "groups never all elected a leader");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let quiet_again = wait_quiet(&cluster, patience) + elected;
    std::thread::sleep(Duration::from_millis(500));
    let after_cpu = idle_cpu(window, survivors.len());
    println!(
        "idle/{groups}groups/dead-node  {victim} (leading {} groups) killed: every group led by \
         {survivors:?} after {elected:?}, all quiet after {quiet_again:?}; idle CPU per survivor \
         {:.2} % of a core",
        leaders[victim_index],
        after_cpu * 100.0,
    );
    cluster.shutdown();

    // 3. Side by side: the same idle measurement with and without quiescence.
    let mut side = Vec::new();
    for quiesce in [true, false] {
        let (cluster, figures) = idle(compare_groups, quiesce, window);
        print(&figures);
        side.push(figures);
        cluster.shutdown();
    }
    let ratio = side[1].idle_cpu / side[0].idle_cpu.max(1e-9);
    // After the larger phase the process's resident set may not grow at all for these groups
    // (freed memory is reused): then there is no ratio to give.
    let rss = if side.iter().all(|figures| figures.rss_per_replica >= 1.0) {
        format!("{:.2}x", side[1].rss_per_replica / side[0].rss_per_replica)
    } else {
        "n/a (no RSS growth to compare)".to_owned()
    };
    println!(
        "idle/{compare_groups}groups  idle CPU without quiescence / with: {ratio:.1}x   RSS per replica without / with: {rss}"
    );
}

//! The Raft core alone, in memory, no IO: a three-replica group driven through the Ready loop
//! (persist into `MemStorage`, deliver every message, report persistence), committed entries per
//! second for 16 B / 128 B / 1 KiB proposals, batched (many proposals per Ready cycle) and
//! unbatched (one). Also the idle cost: heap bytes per replica and the time of one tick of an idle
//! follower, over 100,000 replicas in one process (a counting allocator measures the bytes).
//!
//! Goals (issue 3): ≥ 2 M committed 16-byte entries/s on one core with batching; ≤ 1 KiB per idle
//! replica; an idle tick is O(1) and allocates nothing.
//!
//! `cargo bench -p flotilla-bench --bench raftgroup`

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use flotilla_raftgroup::{Config, MemStorage, Message, NodeId, RecoveredState, Replica, Role};

struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Three replicas, their stores, and the messages in flight.
struct Group {
    replicas: Vec<Replica>,
    stores: Vec<MemStorage>,
    wire: VecDeque<Message>,
    applied: u64,
}

impl Group {
    fn new() -> Group {
        let voters: Vec<NodeId> = (1..=3).map(NodeId).collect();
        let replicas = (1..=3)
            .map(|id| {
                let config = Config {
                    seed: id,
                    max_inflight_messages: 256,
                    max_uncommitted_bytes: 1 << 30,
                    ..Config::new(NodeId(id), voters.clone())
                };
                Replica::new(config, RecoveredState::default()).expect("valid config")
            })
            .collect();
        let mut group = Group {
            replicas,
            stores: vec![MemStorage::new(); 3],
            wire: VecDeque::new(),
            applied: 0,
        };
        group.replicas[0].campaign_now();
        while group.replicas[0].role() != Role::Leader {
            group.cycle();
        }
        group.cycle();
        group
    }

    /// One Ready cycle on every replica, then delivery of every message.
    fn cycle(&mut self) {
        for (i, replica) in self.replicas.iter_mut().enumerate() {
            while replica.has_ready() {
                let mut ready = replica.ready();
                // Moved, not cloned: the harness should cost as little as a real driver.
                self.wire.extend(ready.messages.drain(..));
                let persisted = self.stores[i].persist(&ready);
                let after_persist = std::mem::take(&mut ready.persisted_messages);
                self.wire.extend(after_persist.into_messages_after_persist());
                if let Some(last) = ready.committed_entries.last() {
                    replica.on_applied(last.index);
                    if i == 0 {
                        self.applied += ready.committed_entries.len() as u64;
                    }
                }
                for fetch in &ready.fetches {
                    let entries = self.stores[i].fetch(fetch);
                    replica.on_fetched(*fetch, entries).expect("a valid fetch answer");
                }
                replica.advance(ready);
                if let Some((term, index)) = persisted {
                    replica.on_persisted(term, index);
                }
            }
        }
        while let Some(message) = self.wire.pop_front() {
            let to = usize::try_from(message.to.0 - 1).expect("small ids");
            self.replicas[to].step(message).expect("a valid message");
        }
    }

    /// Proposes `count` entries, `per_cycle` per Ready cycle, and runs until the leader applied
    /// them all; returns how long it took.
    fn commit(&mut self, payload: &Bytes, count: u64, per_cycle: u64) -> Duration {
        let target = self.applied + count;
        let started = Instant::now();
        let mut proposed = 0;
        while self.applied < target {
            let mut this_cycle = 0;
            while proposed < count && this_cycle < per_cycle {
                if self.replicas[0].propose(payload.clone()).is_err() {
                    break; // backpressure: let the cycle drain
                }
                proposed += 1;
                this_cycle += 1;
            }
            self.cycle();
        }
        let elapsed = started.elapsed();
        // Keep the stores small: the leader snapshots now and then, as the engine would.
        for (i, replica) in self.replicas.iter_mut().enumerate() {
            let index = replica.status().applied;
            if index.0 > 0 && replica.compact(index, Bytes::new()).is_ok() {
                let snapshot = replica_snapshot(replica);
                self.stores[i].compact(snapshot);
            }
        }
        elapsed
    }
}

fn replica_snapshot(replica: &Replica) -> flotilla_raftgroup::Snapshot {
    let status = replica.status();
    flotilla_raftgroup::Snapshot {
        meta: flotilla_raftgroup::SnapshotMeta {
            index: status.snapshot_index,
            term: replica.term_at(status.snapshot_index).unwrap_or(replica.term()),
            membership: replica.membership().clone(),
        },
        data: Bytes::new(),
    }
}

fn committed_entries(c: &mut Criterion) {
    let mut bench = c.benchmark_group("raftgroup/commit");
    bench.sample_size(10).measurement_time(Duration::from_secs(3));
    for size in [16usize, 128, 1024] {
        for (label, per_cycle) in [("batched", 256u64), ("unbatched", 1)] {
            let count = if per_cycle == 1 { 2_000 } else { 20_000 };
            bench.throughput(Throughput::Elements(count));
            let payload = Bytes::from(vec![7u8; size]);
            bench.bench_with_input(BenchmarkId::new(label, size), &size, |b, _| {
                let mut group = Group::new();
                b.iter_custom(|iterations| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iterations {
                        total += group.commit(&payload, count, per_cycle);
                    }
                    total
                });
            });
        }
    }
    bench.finish();
}

/// 100,000 idle followers: heap bytes per replica and one tick each. Printed, not sampled by
/// criterion (the figure is a memory measurement and a mean over the whole population).
fn idle_replicas(c: &mut Criterion) {
    let count = if std::env::var("FLOTILLA_BENCH_QUICK").is_ok() { 1_000 } else { 100_000 };
    let voters: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let before = ALLOCATED.load(Ordering::Relaxed);
    let mut replicas: Vec<Replica> = (0..count)
        .map(|i| {
            let config = Config { seed: i, ..Config::new(NodeId(2), voters.clone()) };
            Replica::new(config, RecoveredState::default()).expect("valid config")
        })
        .collect();
    let heap = ALLOCATED.load(Ordering::Relaxed) - before;
    let per_replica = heap as f64 / count as f64;
    // A tick of a follower inside its election timeout: nothing to do but count.
    let allocations_before = ALLOCATIONS.load(Ordering::Relaxed);
    let started = Instant::now();
    for replica in &mut replicas {
        replica.tick();
    }
    let tick_ns = started.elapsed().as_nanos() as f64 / count as f64;
    let tick_allocations = ALLOCATIONS.load(Ordering::Relaxed) - allocations_before;
    println!(
        "raftgroup/idle: {count} replicas, {per_replica:.0} bytes each (heap, Vec slot included: \
         {} bytes inline), one idle tick {tick_ns:.1} ns, {tick_allocations} allocations for all ticks",
        std::mem::size_of::<Replica>()
    );
    let mut bench = c.benchmark_group("raftgroup/idle");
    bench.sample_size(10);
    bench.bench_function("tick 1000 idle followers", |b| {
        b.iter(|| {
            for replica in replicas.iter_mut().take(1000) {
                replica.tick();
            }
        });
    });
    bench.finish();
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    committed_entries(&mut criterion);
    idle_replicas(&mut criterion);
    criterion.final_summary();
}

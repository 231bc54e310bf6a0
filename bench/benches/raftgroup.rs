//! The Raft core alone, in memory, no IO: a three-replica group driven through the Ready loop
//! (persist into `MemStorage`, deliver every message, report persistence), committed entries per
//! second for 16 B / 128 B / 1 KiB proposals, batched (many proposals per Ready cycle) and
//! unbatched (one). Also the idle cost: heap bytes per replica and the time of one tick of an idle
//! follower, over 100,000 replicas in one process (a counting allocator measures the bytes).
//!
//! Goals (issue 3): ≥ 2 M committed 16-byte entries/s on one core with batching; ≤ 1 KiB per idle
//! replica; an idle tick is O(1) and allocates nothing.
//!
//! The same workloads run against raft-rs (the `raft` crate: `RawNode` over its `MemStorage`) in
//! the same process and run, as the reference: same group of three on one thread, same proposals
//! per cycle, same message delivery (everything a cycle produced, in order, after all three nodes
//! handled their Ready), same configuration where the two have the same knob. Ratios
//! (flotilla / raft-rs) are printed from paired, interleaved rounds; criterion also samples both.
//! Differences that cannot be removed are noted at [`RsGroup`].
//!
//! `cargo bench -p flotilla-bench --bench raftgroup` (under `cargo test --benches`, criterion's test
//! mode, every workload runs once on small populations)

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use flotilla_raftgroup::{Config, MemStorage, Message, NodeId, RecoveredState, Replica, Role};
use raft::eraftpb::{Entry as RsEntry, Message as RsMessage};
use raft::storage::MemStorage as RsMemStorage;
use raft::{RawNode, StateRole};

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

/// Append messages in flight per follower, for both cores in the commit workloads.
const MAX_INFLIGHT: u32 = 256;
/// Uncommitted bytes the leader accepts, for both cores: high enough never to refuse a proposal.
const MAX_UNCOMMITTED: u64 = 1 << 30;

/// The workloads: payload size, label, proposals per Ready cycle, proposals per measured run.
const WORKLOADS: [(usize, &str, u64, u64); 6] = [
    (16, "batched", 256, 20_000),
    (16, "unbatched", 1, 2_000),
    (128, "batched", 256, 20_000),
    (128, "unbatched", 1, 2_000),
    (1024, "batched", 256, 20_000),
    (1024, "unbatched", 1, 2_000),
];

/// Criterion's test mode (`cargo test --benches` passes no `--bench`) or an explicit request:
/// small populations, one round.
fn quick() -> bool {
    std::env::var("FLOTILLA_BENCH_QUICK").is_ok() || !std::env::args().any(|arg| arg == "--bench")
}

/// Three replicas, their stores, and the messages in flight.
struct Group {
    replicas: Vec<Replica>,
    stores: Vec<MemStorage>,
    wire: VecDeque<Message>,
    applied: u64,
    /// Messages delivered, to compare how the cores batch.
    delivered: u64,
}

impl Group {
    fn new() -> Group {
        let voters: Vec<NodeId> = (1..=3).map(NodeId).collect();
        let replicas = (1..=3)
            .map(|id| {
                let config = Config {
                    seed: id,
                    max_inflight_messages: MAX_INFLIGHT,
                    max_uncommitted_bytes: MAX_UNCOMMITTED,
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
            delivered: 0,
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
            self.delivered += 1;
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

/// raft-rs's configuration with the same values as flotilla's [`Config`] where the two share a
/// knob: elections after 10–20 ticks, heartbeats every tick, pre-vote and check-quorum on, 1 MiB
/// per Append message and per batch of committed entries in a Ready.
///
/// `batch_append`: by default raft-rs sends one Append per proposal and follower, as flotilla does
/// today; with it, a proposal's entries join the Append already waiting for that follower, so a
/// cycle of 256 proposals sends one Append per follower. Flotilla has no such knob, so the commit
/// workloads measure raft-rs both ways.
fn rs_config(id: u64, max_inflight: u32, max_uncommitted: u64, batch_append: bool) -> raft::Config {
    let flotilla = Config::new(NodeId(id), vec![NodeId(1), NodeId(2), NodeId(3)]);
    let config = raft::Config {
        id,
        election_tick: flotilla.election_ticks as usize,
        heartbeat_tick: flotilla.heartbeat_ticks as usize,
        pre_vote: flotilla.pre_vote,
        check_quorum: flotilla.check_quorum,
        max_inflight_msgs: max_inflight as usize,
        max_size_per_msg: flotilla.max_batch_bytes,
        max_committed_size_per_ready: flotilla.max_batch_bytes,
        max_uncommitted_size: max_uncommitted,
        batch_append,
        ..raft::Config::default()
    };
    config.validate().expect("valid raft-rs config");
    config
}

/// raft-rs wants an `slog` logger; this one drops every record.
fn rs_logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

/// The same group of three on raft-rs: `RawNode`s over raft-rs's `MemStorage`, driven through
/// raft-rs's documented Ready loop (send messages, persist entries and hard state, send the
/// messages that wait for persistence, apply, `advance`, handle the `LightReady`,
/// `advance_apply`).
///
/// Differences that the harness cannot remove:
/// - `RawNode::propose` takes the payload as an owned `Vec<u8>`, so each proposal allocates and
///   copies its payload; flotilla's takes `Bytes` (a reference count). Inside, raft-rs 0.7 with the
///   protobuf codec also carries payloads as `Bytes`.
/// - raft-rs's `MemStorage` sits behind an `Arc<RwLock<…>>` (locked once or twice per Ready here) and the
///   leader reads persisted entries back from it to build Appends; flotilla keeps persisted
///   entries in a log cache inside the replica and its `MemStorage` is a plain value outside it.
/// - raft-rs logs through `slog` (here to `Discard`; records are built, then dropped).
struct RsGroup {
    nodes: Vec<RawNode<RsMemStorage>>,
    wire: VecDeque<RsMessage>,
    /// Committed entries the leader (node 1) applied.
    applied: u64,
    /// Last applied index of each node, for compaction between runs.
    applied_index: [u64; 3],
    /// Messages delivered.
    delivered: u64,
}

impl RsGroup {
    fn new(batch_append: bool) -> RsGroup {
        let logger = rs_logger();
        let nodes = (1..=3)
            .map(|id| {
                let store = RsMemStorage::new_with_conf_state((vec![1, 2, 3], vec![]));
                let config = rs_config(id, MAX_INFLIGHT, MAX_UNCOMMITTED, batch_append);
                RawNode::new(&config, store, &logger).expect("valid config")
            })
            .collect();
        let mut group = RsGroup {
            nodes,
            wire: VecDeque::new(),
            applied: 0,
            applied_index: [0; 3],
            delivered: 0,
        };
        group.nodes[0].campaign().expect("node 1 campaigns");
        while group.nodes[0].raft.state != StateRole::Leader {
            group.cycle();
        }
        group.cycle();
        group
    }

    fn apply(&mut self, i: usize, committed: &[RsEntry]) {
        if let Some(last) = committed.last() {
            self.applied_index[i] = last.index;
            if i == 0 {
                self.applied += committed.len() as u64;
            }
        }
    }

    /// One Ready cycle on every node, then delivery of every message (as [`Group::cycle`]).
    fn cycle(&mut self) {
        for i in 0..self.nodes.len() {
            while self.nodes[i].has_ready() {
                let node = &mut self.nodes[i];
                let mut ready = node.ready();
                self.wire.extend(ready.take_messages());
                {
                    let mut store = node.mut_store().wl();
                    if !ready.snapshot().is_empty() {
                        store.apply_snapshot(ready.snapshot().clone()).expect("snapshot applies");
                    }
                    store.append(ready.entries()).expect("entries continue the log");
                    if let Some(hard_state) = ready.hs() {
                        store.set_hardstate(hard_state.clone());
                    }
                }
                self.wire.extend(ready.take_persisted_messages());
                let committed = ready.take_committed_entries();
                let mut light = node.advance(ready);
                if let Some(commit) = light.commit_index() {
                    node.mut_store().wl().mut_hard_state().commit = commit;
                }
                self.wire.extend(light.take_messages());
                let committed_after = light.take_committed_entries();
                node.advance_apply();
                self.apply(i, &committed);
                self.apply(i, &committed_after);
            }
        }
        while let Some(message) = self.wire.pop_front() {
            let to = usize::try_from(message.to - 1).expect("small ids");
            self.nodes[to].step(message).expect("a valid message");
            self.delivered += 1;
        }
    }

    /// As [`Group::commit`].
    fn commit(&mut self, payload: &[u8], count: u64, per_cycle: u64) -> Duration {
        let target = self.applied + count;
        let started = Instant::now();
        let mut proposed = 0;
        while self.applied < target {
            let mut this_cycle = 0;
            while proposed < count && this_cycle < per_cycle {
                if self.nodes[0].propose(Vec::new(), payload.to_vec()).is_err() {
                    break; // backpressure: let the cycle drain
                }
                proposed += 1;
                this_cycle += 1;
            }
            self.cycle();
        }
        let elapsed = started.elapsed();
        // Keep the stores small, as `Group::commit` does: drop the applied prefix of each log.
        for (node, applied) in self.nodes.iter_mut().zip(self.applied_index) {
            node.mut_store().wl().compact(applied).expect("compaction below the last index");
        }
        elapsed
    }
}

/// The raft-rs variants measured: criterion id prefix and `batch_append`.
const RS_VARIANTS: [(&str, bool); 2] = [("raft-rs-batch-append", true), ("raft-rs-default", false)];

fn committed_entries(c: &mut Criterion) {
    let mut bench = c.benchmark_group("raftgroup/commit");
    bench.sample_size(10).measurement_time(Duration::from_secs(3));
    for (size, label, per_cycle, count) in WORKLOADS {
        bench.throughput(Throughput::Elements(count));
        let payload = Bytes::from(vec![7u8; size]);
        // The cores back to back for each workload, so they see the same machine.
        bench.bench_with_input(
            BenchmarkId::new(format!("flotilla/{label}"), size),
            &size,
            |b, _| {
                let mut group = Group::new();
                b.iter_custom(|iterations| {
                    (0..iterations).map(|_| group.commit(&payload, count, per_cycle)).sum()
                });
            },
        );
        for (name, batch_append) in RS_VARIANTS {
            bench.bench_with_input(
                BenchmarkId::new(format!("{name}/{label}"), size),
                &size,
                |b, _| {
                    let mut group = RsGroup::new(batch_append);
                    b.iter_custom(|iterations| {
                        (0..iterations).map(|_| group.commit(&payload, count, per_cycle)).sum()
                    });
                },
            );
        }
    }
    bench.finish();
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        f64::midpoint(values[middle - 1], values[middle])
    }
}

/// One of the measured groups, for the paired rounds.
enum AnyGroup {
    Flotilla(Group),
    RaftRs(RsGroup),
}

impl AnyGroup {
    fn commit(&mut self, payload: &Bytes, count: u64, per_cycle: u64) -> Duration {
        match self {
            AnyGroup::Flotilla(group) => group.commit(payload, count, per_cycle),
            AnyGroup::RaftRs(group) => group.commit(payload, count, per_cycle),
        }
    }

    fn delivered(&self) -> u64 {
        match self {
            AnyGroup::Flotilla(group) => group.delivered,
            AnyGroup::RaftRs(group) => group.delivered,
        }
    }
}

/// The ratios per workload, from rounds that run flotilla and both raft-rs variants one after
/// the other on long-lived groups (the order rotates every round), after one unmeasured round
/// each: committed entries/s, the median of each core, and the median of the per-round ratios
/// (robust to a noisy neighbour that slows one round down). Also the messages delivered per
/// committed entry, which shows how each core batches.
fn side_by_side() {
    let rounds = if quick() { 1 } else { 21 };
    println!(
        "raftgroup/side-by-side: committed entries/s, medians of {rounds} rounds of flotilla, \
         raft-rs with batch_append, raft-rs default (order rotating); ratio = flotilla / raft-rs \
         (median of the per-round ratios)"
    );
    for (size, label, per_cycle, count) in WORKLOADS {
        let payload = Bytes::from(vec![7u8; size]);
        let mut groups = [
            AnyGroup::Flotilla(Group::new()),
            AnyGroup::RaftRs(RsGroup::new(true)),
            AnyGroup::RaftRs(RsGroup::new(false)),
        ];
        for group in &mut groups {
            group.commit(&payload, count, per_cycle);
        }
        let delivered_before: Vec<u64> = groups.iter().map(AnyGroup::delivered).collect();
        let mut rates = [Vec::new(), Vec::new(), Vec::new()];
        let mut ratios = [Vec::new(), Vec::new()];
        for round in 0..rounds {
            let mut rate = [0.0; 3];
            for k in 0..3 {
                let which = (round + k) % 3;
                let took = groups[which].commit(&payload, count, per_cycle);
                rate[which] = count as f64 / took.as_secs_f64();
            }
            for which in 0..3 {
                rates[which].push(rate[which]);
            }
            ratios[0].push(rate[0] / rate[1]);
            ratios[1].push(rate[0] / rate[2]);
        }
        let entries = (rounds as u64 * count) as f64;
        let per_entry: Vec<f64> = groups
            .iter()
            .zip(&delivered_before)
            .map(|(group, before)| (group.delivered() - before) as f64 / entries)
            .collect();
        println!(
            "raftgroup/side-by-side: {label:>9} {size:>4} B ({per_cycle:>3} per cycle): flotilla \
             {:.3} M/s; raft-rs batch_append {:.3} M/s, ratio {:.2}; raft-rs default {:.3} M/s, \
             ratio {:.2}; messages per entry {:.3} / {:.3} / {:.3}",
            median(&mut rates[0]) / 1e6,
            median(&mut rates[1]) / 1e6,
            median(&mut ratios[0]),
            median(&mut rates[2]) / 1e6,
            median(&mut ratios[1]),
            per_entry[0],
            per_entry[1],
            per_entry[2],
        );
    }
}

/// 100,000 idle followers of each core: heap bytes per replica and one tick each. Printed, not
/// sampled by criterion (the figure is a memory measurement and a mean over the whole population).
///
/// Both populations use their core's default configuration for the rest (max inflight 64 each)
/// but an election timeout of 2^30 ticks: criterion's tick loop ticks the same 1,000 followers
/// hundreds of thousands of times, and with a timeout of 10–20 ticks they would soon be
/// campaigning instead of idling. The timeout changes neither the memory nor an idle tick's work.
fn idle_replicas(c: &mut Criterion) {
    const ELECTION_TICKS: u32 = 1 << 30;
    let count = if quick() { 1_000 } else { 100_000 };
    let voters: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let before = ALLOCATED.load(Ordering::Relaxed);
    let mut replicas: Vec<Replica> = (0..count)
        .map(|i| {
            let config = Config {
                seed: i,
                election_ticks: ELECTION_TICKS,
                ..Config::new(NodeId(2), voters.clone())
            };
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
        "raftgroup/idle: flotilla: {count} replicas, {per_replica:.0} bytes each (heap, Vec slot \
         included: {} bytes inline), one idle tick {tick_ns:.1} ns, {tick_allocations} allocations \
         for all ticks",
        std::mem::size_of::<Replica>()
    );

    // raft-rs: each RawNode owns its storage (a `MemStorage` handle to an empty log holding the
    // conf state), so the figure includes it; the storage alone is measured first, for the
    // breakdown. Flotilla's replica holds no storage at all.
    let rs_idle_config = raft::Config {
        election_tick: ELECTION_TICKS as usize,
        ..rs_config(2, 64, raft::NO_LIMIT, false)
    };
    let before = ALLOCATED.load(Ordering::Relaxed);
    let stores: Vec<RsMemStorage> =
        (0..count).map(|_| RsMemStorage::new_with_conf_state((vec![1, 2, 3], vec![]))).collect();
    let store_heap = ALLOCATED.load(Ordering::Relaxed) - before;
    drop(stores);
    let logger = rs_logger();
    let before = ALLOCATED.load(Ordering::Relaxed);
    let mut nodes: Vec<RawNode<RsMemStorage>> = (0..count)
        .map(|_| {
            let store = RsMemStorage::new_with_conf_state((vec![1, 2, 3], vec![]));
            RawNode::new(&rs_idle_config, store, &logger).expect("valid config")
        })
        .collect();
    let rs_heap = ALLOCATED.load(Ordering::Relaxed) - before;
    let rs_per_node = rs_heap as f64 / count as f64;
    let allocations_before = ALLOCATIONS.load(Ordering::Relaxed);
    let started = Instant::now();
    for node in &mut nodes {
        node.tick();
    }
    let rs_tick_ns = started.elapsed().as_nanos() as f64 / count as f64;
    let rs_tick_allocations = ALLOCATIONS.load(Ordering::Relaxed) - allocations_before;
    println!(
        "raftgroup/idle: raft-rs: {count} RawNodes, {rs_per_node:.0} bytes each (heap, Vec slot \
         included: {} bytes inline; of which MemStorage {:.0}), one idle tick {rs_tick_ns:.1} ns, \
         {rs_tick_allocations} allocations for all ticks",
        std::mem::size_of::<RawNode<RsMemStorage>>(),
        store_heap as f64 / count as f64,
    );
    println!(
        "raftgroup/idle: ratio flotilla / raft-rs: bytes {:.2} ({:.2} against raft-rs without \
         its MemStorage), tick time {:.2}",
        per_replica / rs_per_node,
        per_replica / (rs_per_node - store_heap as f64 / count as f64),
        tick_ns / rs_tick_ns
    );

    let mut bench = c.benchmark_group("raftgroup/idle");
    bench.sample_size(10);
    bench.bench_function("flotilla: tick 1000 idle followers", |b| {
        b.iter(|| {
            for replica in replicas.iter_mut().take(1000) {
                replica.tick();
            }
        });
    });
    bench.bench_function("raft-rs: tick 1000 idle followers", |b| {
        b.iter(|| {
            for node in nodes.iter_mut().take(1000) {
                node.tick();
            }
        });
    });
    bench.finish();
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    side_by_side();
    committed_entries(&mut criterion);
    idle_replicas(&mut criterion);
    criterion.final_summary();
}

//! The KV state machine's map and snapshots, side by side in one run:
//!
//! - `kv/map/{btree,ordmap}`: the same puts (replacing values of random existing keys) and gets
//!   on `std::collections::BTreeMap` and on `imbl::OrdMap` — the persistent B-tree the store
//!   keeps beyond eight keys so that a snapshot is O(1) — each holding 100,000 keys.
//! - `kv/apply`: `KvStateMachine::apply` of batches of 1,000 puts into a store of 100,000 keys.
//! - `kv/snapshot/{view,encode}`: what the shard thread pays to snapshot a store of 100,000
//!   keys: taking the view (now) against encoding the whole image (what it did before).
//!
//! `cargo bench -p flotilla-bench --bench kv`.

use std::collections::BTreeMap;
use std::hint::black_box;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput};
use flotilla::kv::{Command, KvStateMachine, Proposal, Request, SnapshotImage, StateMachine};
use flotilla::raftgroup::{Entry, EntryKind, LogIndex, Term};
use flotilla_bench::quick_mode;

const KEYS: u64 = 100_000;
const BATCH: u64 = 1_000;

/// A fixed pseudo-random sequence (xorshift), so every run and both maps see the same keys.
fn keys(count: u64, seed: u64) -> Vec<Bytes> {
    let mut x = seed | 1;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Bytes::from(format!("user/{:08}", x % KEYS))
        })
        .collect()
}

fn value(n: u64) -> Bytes {
    Bytes::from(vec![n as u8; 128])
}

fn maps(c: &mut Criterion) {
    let all: Vec<Bytes> = (0..KEYS).map(|n| Bytes::from(format!("user/{n:08}"))).collect();
    let btree: BTreeMap<Bytes, Bytes> = all.iter().map(|k| (k.clone(), value(0))).collect();
    let ordmap: imbl::OrdMap<Bytes, Bytes> = all.iter().map(|k| (k.clone(), value(0))).collect();
    let touched = keys(BATCH, 7);
    let mut group = c.benchmark_group("kv/map");
    group.throughput(Throughput::Elements(BATCH));
    let mut map = btree.clone();
    group.bench_function("btree/put", |b| {
        b.iter(|| {
            for key in &touched {
                *map.get_mut(&key[..]).expect("present") = value(1);
            }
        });
    });
    let mut map = ordmap.clone();
    drop(ordmap);
    group.bench_function("ordmap/put", |b| {
        b.iter(|| {
            for key in &touched {
                *map.get_mut(&key[..]).expect("present") = value(1);
            }
        });
    });
    // While a snapshot is being written its view shares the nodes: the first write to each
    // node copies it (the view is taken afresh before every batch, the worst case).
    group.bench_function("ordmap/put-while-a-view-is-alive", |b| {
        b.iter_batched_ref(
            || map.clone(),
            |view| {
                for key in &touched {
                    *view.get_mut(&key[..]).expect("present") = value(1);
                }
            },
            BatchSize::LargeInput,
        );
    });
    group.bench_function("btree/get", |b| {
        b.iter(|| {
            touched.iter().map(|key| btree.get(&key[..]).map_or(0, Bytes::len)).sum::<usize>()
        });
    });
    group.bench_function("ordmap/get", |b| {
        b.iter(|| touched.iter().map(|key| map.get(&key[..]).map_or(0, Bytes::len)).sum::<usize>());
    });
    group.finish();
}

fn put_entries(from: u64, keys: &[Bytes]) -> Vec<Entry> {
    keys.iter()
        .zip(from..)
        .map(|(key, index)| Entry {
            index: LogIndex(index),
            term: Term(1),
            kind: EntryKind::Normal,
            payload: Proposal {
                leader_time_ms: 0,
                request: Request::Unsessioned(Command::Put {
                    key: key.clone(),
                    value: value(index),
                }),
            }
            .to_bytes(),
        })
        .collect()
}

/// A store of `KEYS` keys, and the index it applied through.
fn full_store() -> (KvStateMachine, u64) {
    let mut kv = KvStateMachine::default();
    let all: Vec<Bytes> = (0..KEYS).map(|n| Bytes::from(format!("user/{n:08}"))).collect();
    let mut responses = Vec::new();
    kv.apply(&put_entries(1, &all), &mut responses);
    (kv, KEYS + 1)
}

fn apply(c: &mut Criterion) {
    let (mut kv, mut next) = full_store();
    let touched = keys(BATCH, 11);
    let mut responses = Vec::new();
    let mut group = c.benchmark_group("kv/apply");
    group.throughput(Throughput::Elements(BATCH));
    group.bench_function("put", |b| {
        b.iter_batched(
            || {
                let entries = put_entries(next, &touched);
                next += BATCH;
                entries
            },
            |entries| {
                responses.clear();
                kv.apply(&entries, &mut responses);
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn snapshot(c: &mut Criterion) {
    let (kv, _) = full_store();
    let mut group = c.benchmark_group("kv/snapshot");
    group.bench_function("view", |b| b.iter(|| black_box(kv.snapshot())));
    if !quick_mode() {
        group.sample_size(10);
    }
    group.bench_function("encode", |b| b.iter(|| black_box(kv.snapshot().to_bytes())));
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    maps(&mut c);
    apply(&mut c);
    snapshot(&mut c);
    c.final_summary();
}

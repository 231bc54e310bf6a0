//! Flotilla's three-node cluster side by side with openraft's, in the same process and run.
//!
//! * **Flotilla**: three engines on loopback TCP, one shard each, the WAL with fdatasync (io_uring
//!   backend where available), the built-in KV state machine (`flotilla_bench::cluster`, as in
//!   `benches/engine.rs`).
//! * **openraft**, twice: 0.9.25, the latest release on crates.io, and 0.10.0-alpha.37, the
//!   latest pre-release, whose core no longer waits for each log flush before it goes on. Each is
//!   three `Raft` nodes on one two-worker tokio runtime, wired by an in-process router (an RPC is a
//!   direct call on the target's `Raft` handle: no serialization, no sockets), each node with a
//!   log store written for this bench that gives it Flotilla's durability: `append` encodes the
//!   entries into one checksummed record and hands it to the node's writer thread, which writes it
//!   into a pre-written 64 MiB file (used as a ring, like a recycled WAL segment) and fdatasyncs
//!   before it signals openraft that the entries are flushed; everything queued meanwhile shares
//!   that write and fdatasync. Votes and truncations are written and synced the same way before
//!   they return. Entries are also kept in memory, which is what reads are served from; the file
//!   is never read back (no recovery path: the bench never restarts a node). The state machine is
//!   an in-memory map of the same 1,024 keys, snapshotted (in memory) every 10,000 entries.
//!
//! All: one Raft group, 128 B values, 512 concurrent proposers writing puts through the leader,
//! elections after 100–200 ms, heartbeats every 20 ms. A write counts once the leader has applied
//! it (so it is fdatasync'd on a majority). Work Flotilla does here that openraft does not: TCP
//! and the frame codec between nodes, the KV request codec, snapshot files written to disk.
//! openraft's other settings are its defaults (e.g. at most 300 entries per AppendEntries).
//!
//! The clusters run in turn: each round is one run of N writes on each (the order rotates), and
//! the ratio printed is the median of the per-round ratios, Flotilla ÷ openraft. Criterion also
//! samples each on its own.
//!
//! `cargo bench -p flotilla-bench --bench openraft` (≈ 3 min on the shared 2-core VM). Under
//! `cargo test --benches` (criterion's test mode) every measurement runs once, shrunk.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use flotilla_bench::cluster::Cluster;
use flotilla_bench::disk::{self, PrewrittenFile};
use flotilla_bench::{count, median, quick_mode};
use hdrhistogram::Histogram;
use tokio::task::JoinSet;

const PAYLOAD: usize = 128;
const PROPOSERS: usize = 512;
/// Keys the proposers cycle through, as `flotilla_bench::cluster` does.
const KEYS: u32 = 1024;
/// The ring file each openraft node logs into (a WAL segment's size).
const LOG_FILE_BYTES: u64 = 64 << 20;
/// Snapshot every this many applied entries (Flotilla's default `snapshot_entries`).
const SNAPSHOT_ENTRIES: u64 = 10_000;
const ID: &str = "openraft/writes/128B/g1";

/// What an openraft client proposes: one key's new value.
#[derive(Clone, Debug)]
pub struct Put {
    key: u32,
    value: Bytes,
}

impl std::fmt::Display for Put {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "put {} ({} bytes)", self.key, self.value.len())
    }
}

fn main() {
    let quick = quick_mode();
    let each: u64 = if quick { 1 } else { 16 };
    let rounds = if quick { 1 } else { 9 };
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    if !flotilla_bench::selected(ID) {
        return;
    }
    let value = Bytes::from(disk::noise(PAYLOAD, 0x0BE2));
    let flotilla = Cluster::start(1, 1).expect("starting the Flotilla cluster");
    let old = v09::OpenraftCluster::start().expect("starting the openraft 0.9 cluster");
    let new = v010::OpenraftCluster::start().expect("starting the openraft 0.10 cluster");
    eprintln!(
        "flotilla: 3 nodes × 1 shard, WAL backend {}; openraft 0.9.25 and 0.10.0-alpha.37: \
         3 nodes each, log files under {}",
        flotilla.backend(),
        std::env::var("FLOTILLA_BENCH_DIR").unwrap_or_else(|_| "the temp dir".into())
    );

    let mut group = criterion.benchmark_group("openraft/writes");
    group
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(PROPOSERS as u64 * each));
    group.bench_function(BenchmarkId::new("flotilla", "128B/g1"), |b| {
        b.iter_custom(|iters| {
            (0..iters).map(|_| flotilla.run(&value, PROPOSERS, each).elapsed).sum()
        });
    });
    group.bench_function(BenchmarkId::new("openraft-0.9", "128B/g1"), |b| {
        b.iter_custom(|iters| (0..iters).map(|_| old.run(&value, PROPOSERS, each).elapsed).sum());
    });
    group.bench_function(BenchmarkId::new("openraft-0.10", "128B/g1"), |b| {
        b.iter_custom(|iters| (0..iters).map(|_| new.run(&value, PROPOSERS, each).elapsed).sum());
    });
    group.finish();

    // Interleaved rounds: the ratios of each round are of runs a few seconds apart at most.
    let mut sides = [Side::new("flotilla"), Side::new("openraft 0.9"), Side::new("openraft 0.10")];
    for round in 0..rounds {
        for turn in 0..3 {
            let index = (round + turn) % 3;
            let side = &mut sides[index];
            let rate = match index {
                0 => {
                    let before = flotilla.totals();
                    let run = flotilla.run(&value, PROPOSERS, each);
                    let done = flotilla.totals().since(&before);
                    side.add(&run.latency, run.elapsed, done.fdatasyncs, done.entries, 0)
                }
                1 => side.measure(&old.disks, || old.run(&value, PROPOSERS, each)),
                _ => side.measure(&new.disks, || new.run(&value, PROPOSERS, each)),
            };
            side.rates.push(rate);
        }
        let [ours, old_rate, new_rate] = [0, 1, 2].map(|i| *sides[i].rates.last().expect("a rate"));
        eprintln!(
            "openraft/side-by-side round {round}: flotilla {}writes/s, openraft 0.9 {}writes/s, \
             openraft 0.10 {}writes/s; ratios {:.2} / {:.2}",
            count(ours),
            count(old_rate),
            count(new_rate),
            ours / old_rate,
            ours / new_rate
        );
    }
    let mut summary: Vec<String> = sides.iter().map(Side::line).collect();
    for peer in &sides[1..] {
        let ratios: Vec<f64> =
            sides[0].rates.iter().zip(&peer.rates).map(|(ours, theirs)| ours / theirs).collect();
        summary.push(format!(
            "RESULT {ID} ratio flotilla ÷ {}: {:.2} (median of per-round ratios {:?})",
            peer.name,
            median(&ratios),
            ratios.iter().map(|r| (r * 100.0).round() / 100.0).collect::<Vec<_>>()
        ));
    }
    criterion.final_summary();
    eprintln!("\n==== openraft side by side (this run) ====");
    for line in &summary {
        eprintln!("{line}");
    }
    old.shutdown();
    new.shutdown();
    flotilla.shutdown();
}

/// One cluster's interleaved runs, summed.
struct Side {
    name: &'static str,
    rates: Vec<f64>,
    latency: Histogram<u64>,
    elapsed: Duration,
    fdatasyncs: u64,
    entries: u64,
    sync_nanos: u64,
}

impl Side {
    fn new(name: &'static str) -> Side {
        Side {
            name,
            rates: Vec::new(),
            latency: disk::latency_histogram(),
            elapsed: Duration::ZERO,
            fdatasyncs: 0,
            entries: 0,
            sync_nanos: 0,
        }
    }

    fn add(
        &mut self,
        latency: &Histogram<u64>,
        elapsed: Duration,
        fdatasyncs: u64,
        entries: u64,
        sync_nanos: u64,
    ) -> f64 {
        self.latency.add(latency).expect("same bounds");
        self.elapsed += elapsed;
        self.fdatasyncs += fdatasyncs;
        self.entries += entries;
        self.sync_nanos += sync_nanos;
        flotilla_bench::rate(latency.len() as f64, elapsed)
    }

    /// Runs `run` on an openraft cluster whose log files are `disks`; returns its writes/s.
    fn measure(&mut self, disks: &[Arc<DiskCounters>], run: impl FnOnce() -> Run) -> f64 {
        let before = DiskCounters::sum(disks);
        let run = run();
        let after = DiskCounters::sum(disks);
        self.add(
            &run.latency,
            run.elapsed,
            after[0] - before[0],
            after[1] - before[1],
            after[2] - before[2],
        )
    }

    fn line(&self) -> String {
        let [p50, p99, p999, _] = disk::percentiles_us(&self.latency);
        let mut line = format!(
            "RESULT {ID} {} {}writes/s (median of {} rounds), p50 {p50:.0} µs, p99 {p99:.0} µs, \
             p99.9 {p999:.0} µs, {:.0} fdatasyncs/s over 3 nodes, {:.1} entries/fdatasync",
            self.name,
            count(median(&self.rates)),
            self.rates.len(),
            flotilla_bench::rate(self.fdatasyncs as f64, self.elapsed),
            self.entries as f64 / self.fdatasyncs.max(1) as f64
        );
        if self.sync_nanos > 0 {
            let _ = write!(
                line,
                ", write + fdatasync {:.0} µs on average",
                self.sync_nanos as f64 / 1e3 / self.fdatasyncs.max(1) as f64
            );
        }
        line
    }
}

/// What one run of proposals on an openraft cluster did.
struct Run {
    elapsed: Duration,
    latency: Histogram<u64>,
}

/// Why a write did not commit: the leader it was sent to is not the leader (and a hint, if any),
/// or anything else.
enum Refused {
    Forward(Option<u64>),
    Other,
}

/// `proposers` concurrent proposers each commit `each` puts, sending each to the node they believe
/// leads (`write(node, put)`), following hints.
fn run_proposers<W, F>(
    runtime: &tokio::runtime::Runtime,
    leader: u64,
    value: &Bytes,
    proposers: usize,
    each: u64,
    write: W,
) -> Run
where
    W: Fn(u64, Put) -> F + Clone + Send + 'static,
    F: Future<Output = Result<(), Refused>> + Send,
{
    let leader = Arc::new(AtomicU64::new(leader));
    runtime.block_on(async {
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        for proposer in 0..proposers {
            let value = value.clone();
            let leader = Arc::clone(&leader);
            let write = write.clone();
            tasks.spawn(async move {
                let mut latencies = Vec::with_capacity(each as usize);
                for n in 0..each {
                    let key = ((proposer as u64 + n * proposers as u64) % u64::from(KEYS)) as u32;
                    let asked = Instant::now();
                    loop {
                        let node = leader.load(Ordering::Relaxed);
                        match write(node, Put { key, value: value.clone() }).await {
                            Ok(()) => break,
                            Err(Refused::Forward(Some(hint))) => {
                                leader.store(hint, Ordering::Relaxed);
                            }
                            Err(Refused::Forward(None) | Refused::Other) => {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                                leader.store(node % 3 + 1, Ordering::Relaxed);
                            }
                        }
                    }
                    latencies.push(asked.elapsed());
                }
                latencies
            });
        }
        let mut latency = disk::latency_histogram();
        while let Some(result) = tasks.join_next().await {
            for took in result.expect("a proposer panicked") {
                latency.saturating_record(took.as_nanos() as u64);
            }
        }
        Run { elapsed: started.elapsed(), latency }
    })
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
}

// ---- the durable part of the log stores: one writer thread and one ring file per node -----------

/// What a node's writer thread has done.
#[derive(Default)]
struct DiskCounters {
    fdatasyncs: AtomicU64,
    entries: AtomicU64,
    /// Time spent in write + fdatasync, in nanoseconds.
    sync_nanos: AtomicU64,
}

impl DiskCounters {
    /// [fdatasyncs, entries, nanoseconds in write + fdatasync], summed over `disks`.
    fn sum(disks: &[Arc<DiskCounters>]) -> [u64; 3] {
        let mut sum = [0; 3];
        for disk in disks {
            sum[0] += disk.fdatasyncs.load(Ordering::Relaxed);
            sum[1] += disk.entries.load(Ordering::Relaxed);
            sum[2] += disk.sync_nanos.load(Ordering::Relaxed);
        }
        sum
    }
}

/// Called once the write is durable (or failed).
type Completion = Box<dyn FnOnce(std::io::Result<()>) + Send>;

/// A record for a node's writer thread, and what to do once it is synced.
struct LogWrite {
    record: Vec<u8>,
    entries: u64,
    done: Completion,
}

/// Starts a node's writer thread over a pre-written ring file at `path`. Group commit: every
/// record queued while the previous fdatasync ran goes into one write and one fdatasync.
fn spawn_writer(
    path: &std::path::Path,
) -> std::io::Result<(std::sync::mpsc::Sender<LogWrite>, Arc<DiskCounters>)> {
    let mut file = PrewrittenFile::create(path, LOG_FILE_BYTES)?;
    let counters = Arc::new(DiskCounters::default());
    let (writes, queue) = std::sync::mpsc::channel::<LogWrite>();
    let thread_counters = Arc::clone(&counters);
    std::thread::Builder::new().name("openraft-log".into()).spawn(move || {
        let mut buffer = Vec::new();
        let mut batch = Vec::new();
        while let Ok(first) = queue.recv() {
            batch.push(first);
            batch.extend(queue.try_iter());
            buffer.clear();
            let mut entries = 0;
            for write in &batch {
                buffer.extend_from_slice(&write.record);
                entries += write.entries;
            }
            let started = Instant::now();
            let result = file.write_sync(&buffer);
            let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            thread_counters.sync_nanos.fetch_add(took, Ordering::Relaxed);
            thread_counters.fdatasyncs.fetch_add(1, Ordering::Relaxed);
            thread_counters.entries.fetch_add(entries, Ordering::Relaxed);
            for write in batch.drain(..) {
                let outcome = match &result {
                    Ok(()) => Ok(()),
                    Err(error) => Err(std::io::Error::new(error.kind(), error.to_string())),
                };
                (write.done)(outcome);
            }
        }
    })?;
    Ok((writes, counters))
}

/// Writes `body` as one record through `writes` and waits until it is synced.
async fn write_synced(
    writes: &std::sync::mpsc::Sender<LogWrite>,
    body: &[u8],
) -> std::io::Result<()> {
    let (done, answer) = tokio::sync::oneshot::channel();
    let done: Completion = Box::new(move |result| {
        let _ = done.send(result);
    });
    writes.send(LogWrite { record: frame(body), entries: 0, done }).map_err(|_| writer_gone())?;
    answer.await.map_err(|_| writer_gone())?
}

fn writer_gone() -> std::io::Error {
    std::io::Error::other("the log's writer thread stopped")
}

/// A record: body length, CRC32 of the body, body.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(8 + body.len());
    record.extend_from_slice(&(body.len() as u32).to_le_bytes());
    record.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    record.extend_from_slice(body);
    record
}

/// One entry's bytes: index, term, leader node, kind, then the payload (`put`) or the voter sets
/// of a membership (`voters`).
fn encode_entry(
    index: u64,
    term: u64,
    leader: u64,
    put: Option<&Put>,
    voters: Option<&Vec<std::collections::BTreeSet<u64>>>,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&term.to_le_bytes());
    out.extend_from_slice(&leader.to_le_bytes());
    if let Some(put) = put {
        out.push(1);
        out.extend_from_slice(&put.key.to_le_bytes());
        out.extend_from_slice(&(put.value.len() as u32).to_le_bytes());
        out.extend_from_slice(&put.value);
    } else if let Some(voters) = voters {
        out.push(2);
        for config in voters {
            out.extend_from_slice(&(config.len() as u32).to_le_bytes());
            for id in config {
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
    } else {
        out.push(0);
    }
}

fn encode_data(data: &BTreeMap<u32, Bytes>) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in data {
        out.extend_from_slice(&key.to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }
    out
}

fn decode_data(mut bytes: &[u8]) -> BTreeMap<u32, Bytes> {
    let mut data = BTreeMap::new();
    while bytes.len() >= 8 {
        let key = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) as usize;
        let Some(value) = bytes.get(8..8 + len) else { break };
        data.insert(key, Bytes::copy_from_slice(value));
        bytes = &bytes[8 + len..];
    }
    data
}

/// openraft 0.9.25 (storage v2 API).
mod v09 {
    use std::collections::BTreeMap;
    use std::fmt::Debug;
    use std::io::Cursor;
    use std::ops::RangeBounds;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::Bytes;
    use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
    use openraft::network::RPCOption;
    use openraft::raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest,
        InstallSnapshotResponse, VoteRequest, VoteResponse,
    };
    use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
    use openraft::{
        BasicNode, Entry, EntryPayload, LogId, Raft, RaftLogReader, RaftNetwork,
        RaftNetworkFactory, RaftSnapshotBuilder, SnapshotMeta, SnapshotPolicy, StorageError,
        StorageIOError, StoredMembership, Vote,
    };

    use super::{
        Completion, DiskCounters, LogWrite, Put, Refused, Run, SNAPSHOT_ENTRIES, decode_data,
        encode_data, encode_entry, frame, run_proposers, runtime, spawn_writer, write_synced,
        writer_gone,
    };

    openraft::declare_raft_types!(
        /// openraft 0.9's types for this bench: puts in, nothing out, node ids `u64`.
        pub TypeConfig:
            D = Put,
            R = (),
    );

    type NodeId = u64;
    type RaftNode = Raft<TypeConfig>;

    /// Three openraft 0.9 nodes in this process.
    pub(super) struct OpenraftCluster {
        runtime: tokio::runtime::Runtime,
        router: Router,
        pub(super) disks: Vec<Arc<DiskCounters>>,
        _dirs: Vec<tempfile::TempDir>,
    }

    impl OpenraftCluster {
        pub(super) fn start() -> Result<OpenraftCluster, Box<dyn std::error::Error>> {
            let runtime = runtime()?;
            let config = Arc::new(
                openraft::Config {
                    heartbeat_interval: 20,
                    election_timeout_min: 100,
                    election_timeout_max: 200,
                    snapshot_policy: SnapshotPolicy::LogsSinceLast(SNAPSHOT_ENTRIES),
                    ..openraft::Config::default()
                }
                .validate()?,
            );
            let router = Router::default();
            let mut dirs = Vec::new();
            let mut disks = Vec::new();
            for id in 1..=3u64 {
                let dir = flotilla_bench::disk::bench_dir("openraft09");
                let (writes, counters) = spawn_writer(&dir.path().join("log"))?;
                disks.push(counters);
                dirs.push(dir);
                let log_store = LogStore { memory: Arc::default(), writes };
                let raft = runtime.block_on(RaftNode::new(
                    id,
                    Arc::clone(&config),
                    router.clone(),
                    log_store,
                    StateMachine::default(),
                ))?;
                router.nodes.lock().expect("router").insert(id, raft);
            }
            let first = router.get(1).expect("node 1");
            let members: BTreeMap<NodeId, BasicNode> =
                (1..=3).map(|id| (id, BasicNode::default())).collect();
            runtime.block_on(first.initialize(members))?;
            runtime.block_on(
                first
                    .wait(Some(Duration::from_secs(10)))
                    .metrics(|m| m.current_leader.is_some(), "a leader"),
            )?;
            Ok(OpenraftCluster { runtime, router, disks, _dirs: dirs })
        }

        pub(super) fn run(&self, value: &Bytes, proposers: usize, each: u64) -> Run {
            let first = self.router.get(1).expect("node 1");
            let leader = self.runtime.block_on(first.current_leader()).unwrap_or(1);
            let router = self.router.clone();
            run_proposers(&self.runtime, leader, value, proposers, each, move |node, put| {
                let raft = router.get(node).expect("a known node");
                async move {
                    match raft.client_write(put).await {
                        Ok(_) => Ok(()),
                        Err(error) => match error.forward_to_leader() {
                            Some(forward) => Err(Refused::Forward(forward.leader_id)),
                            None => Err(Refused::Other),
                        },
                    }
                }
            })
        }

        pub(super) fn shutdown(self) {
            let nodes: Vec<RaftNode> =
                std::mem::take(&mut *self.router.nodes.lock().expect("router"))
                    .into_values()
                    .collect();
            self.runtime.block_on(async {
                for node in nodes {
                    if let Err(error) = node.shutdown().await {
                        eprintln!("shutting an openraft 0.9 node down: {error}");
                    }
                }
            });
        }
    }

    /// Every node's `Raft` handle; an RPC is a direct call on the target's handle.
    #[derive(Clone, Default)]
    struct Router {
        nodes: Arc<Mutex<BTreeMap<NodeId, RaftNode>>>,
    }

    impl Router {
        fn get(&self, id: NodeId) -> Option<RaftNode> {
            self.nodes.lock().expect("router").get(&id).cloned()
        }
    }

    struct Connection {
        router: Router,
        target: NodeId,
    }

    impl Connection {
        #[expect(
            clippy::result_large_err,
            reason = "openraft's RPC error, as its trait returns it"
        )]
        fn target<E: std::error::Error>(&self) -> Result<RaftNode, RPCError<NodeId, BasicNode, E>> {
            self.router.get(self.target).ok_or_else(|| {
                RPCError::Unreachable(Unreachable::new(&std::io::Error::other("node not started")))
            })
        }
    }

    impl RaftNetworkFactory<TypeConfig> for Router {
        type Network = Connection;

        async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Connection {
            Connection { router: self.clone(), target }
        }
    }

    impl RaftNetwork<TypeConfig> for Connection {
        async fn append_entries(
            &mut self,
            rpc: AppendEntriesRequest<TypeConfig>,
            _option: RPCOption,
        ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>>
        {
            let raft = self.target()?;
            raft.append_entries(rpc)
                .await
                .map_err(|error| RPCError::RemoteError(RemoteError::new(self.target, error)))
        }

        async fn install_snapshot(
            &mut self,
            rpc: InstallSnapshotRequest<TypeConfig>,
            _option: RPCOption,
        ) -> Result<
            InstallSnapshotResponse<NodeId>,
            RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
        > {
            let raft = self.target()?;
            raft.install_snapshot(rpc)
                .await
                .map_err(|error| RPCError::RemoteError(RemoteError::new(self.target, error)))
        }

        async fn vote(
            &mut self,
            rpc: VoteRequest<NodeId>,
            _option: RPCOption,
        ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
            let raft = self.target()?;
            raft.vote(rpc)
                .await
                .map_err(|error| RPCError::RemoteError(RemoteError::new(self.target, error)))
        }
    }

    #[derive(Default)]
    struct LogMemory {
        entries: BTreeMap<u64, Entry<TypeConfig>>,
        last_purged: Option<LogId<NodeId>>,
        vote: Option<Vote<NodeId>>,
    }

    /// Entries in memory; every change written to the node's file and fdatasync'd (by its writer
    /// thread) before openraft is told it is durable.
    #[derive(Clone)]
    struct LogStore {
        memory: Arc<Mutex<LogMemory>>,
        writes: std::sync::mpsc::Sender<LogWrite>,
    }

    fn storage_error(error: &std::io::Error) -> StorageError<NodeId> {
        StorageIOError::write_logs(error).into()
    }

    impl RaftLogReader<TypeConfig> for LogStore {
        async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
            &mut self,
            range: RB,
        ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
            let memory = self.memory.lock().expect("log memory");
            Ok(memory.entries.range(range).map(|(_, entry)| entry.clone()).collect())
        }
    }

    impl RaftLogStorage<TypeConfig> for LogStore {
        type LogReader = LogStore;

        async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
            let memory = self.memory.lock().expect("log memory");
            let last_log_id = memory
                .entries
                .last_key_value()
                .map(|(_, entry)| entry.log_id)
                .or(memory.last_purged);
            Ok(LogState { last_purged_log_id: memory.last_purged, last_log_id })
        }

        async fn get_log_reader(&mut self) -> LogStore {
            self.clone()
        }

        async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
            let mut body = vec![3u8];
            body.extend_from_slice(&vote.leader_id.term.to_le_bytes());
            body.extend_from_slice(&vote.leader_id.node_id.to_le_bytes());
            body.push(u8::from(vote.committed));
            write_synced(&self.writes, &body).await.map_err(|e| storage_error(&e))?;
            self.memory.lock().expect("log memory").vote = Some(*vote);
            Ok(())
        }

        async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
            Ok(self.memory.lock().expect("log memory").vote)
        }

        async fn append<I>(
            &mut self,
            entries: I,
            callback: LogFlushed<TypeConfig>,
        ) -> Result<(), StorageError<NodeId>>
        where
            I: IntoIterator<Item = Entry<TypeConfig>> + Send,
            I::IntoIter: Send,
        {
            let mut body = Vec::new();
            let mut count = 0u64;
            {
                let mut memory = self.memory.lock().expect("log memory");
                for entry in entries {
                    let (put, voters) = match &entry.payload {
                        EntryPayload::Blank => (None, None),
                        EntryPayload::Normal(put) => (Some(put), None),
                        EntryPayload::Membership(m) => (None, Some(m.get_joint_config())),
                    };
                    let leader = entry.log_id.leader_id;
                    encode_entry(
                        entry.log_id.index,
                        leader.term,
                        leader.node_id,
                        put,
                        voters,
                        &mut body,
                    );
                    count += 1;
                    memory.entries.insert(entry.log_id.index, entry);
                }
            }
            let done: Completion = Box::new(move |result| callback.log_io_completed(result));
            self.writes
                .send(LogWrite { record: frame(&body), entries: count, done })
                .map_err(|_| storage_error(&writer_gone()))
        }

        async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
            let mut body = vec![4u8];
            body.extend_from_slice(&log_id.index.to_le_bytes());
            write_synced(&self.writes, &body).await.map_err(|e| storage_error(&e))?;
            self.memory.lock().expect("log memory").entries.split_off(&log_id.index);
            Ok(())
        }

        async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
            let mut memory = self.memory.lock().expect("log memory");
            let keep = memory.entries.split_off(&(log_id.index + 1));
            memory.entries = keep;
            memory.last_purged = Some(log_id);
            Ok(())
        }
    }

    #[derive(Default)]
    struct MachineState {
        last_applied: Option<LogId<NodeId>>,
        membership: StoredMembership<NodeId, BasicNode>,
        data: BTreeMap<u32, Bytes>,
        snapshot: Option<(SnapshotMeta<NodeId, BasicNode>, Vec<u8>)>,
        snapshots_built: u64,
    }

    /// The same keys as Flotilla's KV, in memory; snapshots kept in memory.
    #[derive(Clone, Default)]
    struct StateMachine {
        state: Arc<Mutex<MachineState>>,
    }

    impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
        async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
            let mut state = self.state.lock().expect("state machine");
            state.snapshots_built += 1;
            let bytes = encode_data(&state.data);
            let meta = SnapshotMeta {
                last_log_id: state.last_applied,
                last_membership: state.membership.clone(),
                snapshot_id: state.snapshots_built.to_string(),
            };
            state.snapshot = Some((meta.clone(), bytes.clone()));
            Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
        }
    }

    impl RaftStateMachine<TypeConfig> for StateMachine {
        type SnapshotBuilder = StateMachine;

        async fn applied_state(
            &mut self,
        ) -> Result<
            (Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>),
            StorageError<NodeId>,
        > {
            let state = self.state.lock().expect("state machine");
            Ok((state.last_applied, state.membership.clone()))
        }

        async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError<NodeId>>
        where
            I: IntoIterator<Item = Entry<TypeConfig>> + Send,
            I::IntoIter: Send,
        {
            let mut state = self.state.lock().expect("state machine");
            let mut responses = Vec::new();
            for entry in entries {
                state.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Normal(put) => {
                        state.data.insert(put.key, put.value);
                    }
                    EntryPayload::Membership(membership) => {
                        state.membership = StoredMembership::new(Some(entry.log_id), membership);
                    }
                }
                responses.push(());
            }
            Ok(responses)
        }

        async fn get_snapshot_builder(&mut self) -> StateMachine {
            self.clone()
        }

        async fn begin_receiving_snapshot(
            &mut self,
        ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
            Ok(Box::new(Cursor::new(Vec::new())))
        }

        async fn install_snapshot(
            &mut self,
            meta: &SnapshotMeta<NodeId, BasicNode>,
            snapshot: Box<Cursor<Vec<u8>>>,
        ) -> Result<(), StorageError<NodeId>> {
            let bytes = snapshot.into_inner();
            let mut state = self.state.lock().expect("state machine");
            state.data = decode_data(&bytes);
            state.last_applied = meta.last_log_id;
            state.membership = meta.last_membership.clone();
            state.snapshot = Some((meta.clone(), bytes));
            Ok(())
        }

        async fn get_current_snapshot(
            &mut self,
        ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
            let state = self.state.lock().expect("state machine");
            Ok(state.snapshot.as_ref().map(|(meta, bytes)| Snapshot {
                meta: meta.clone(),
                snapshot: Box::new(Cursor::new(bytes.clone())),
            }))
        }
    }
}

/// openraft 0.10.0-alpha.37.
mod v010 {
    use std::collections::BTreeMap;
    use std::fmt::Debug;
    use std::future::Future;
    use std::io::{self, Cursor};
    use std::ops::RangeBounds;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::Bytes;
    use futures_util::{Stream, StreamExt};
    use openraft::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf, VoteOf};
    use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
    use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
    use openraft::raft::{
        AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
    };
    use openraft::storage::{
        EntryResponder, IOFlushed, LogState, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder,
        RaftStateMachine,
    };
    use openraft::{BasicNode, EntryPayload, Raft, SnapshotPolicy};
    use openraft010 as openraft;

    use super::{
        Completion, DiskCounters, LogWrite, Put, Refused, Run, SNAPSHOT_ENTRIES, decode_data,
        encode_data, encode_entry, frame, run_proposers, runtime, spawn_writer, write_synced,
        writer_gone,
    };

    openraft::declare_raft_types!(
        /// openraft 0.10's types for this bench: puts in, nothing out, node ids `u64`.
        pub TypeConfig:
            D = Put,
            R = (),
    );

    type NodeId = u64;
    type Entry = <TypeConfig as openraft::RaftTypeConfig>::Entry;
    type RaftNode = Raft<TypeConfig, StateMachine>;

    /// Three openraft 0.10 nodes in this process.
    pub(super) struct OpenraftCluster {
        runtime: tokio::runtime::Runtime,
        router: Router,
        pub(super) disks: Vec<Arc<DiskCounters>>,
        _dirs: Vec<tempfile::TempDir>,
    }

    impl OpenraftCluster {
        pub(super) fn start() -> Result<OpenraftCluster, Box<dyn std::error::Error>> {
            let runtime = runtime()?;
            let config = Arc::new(
                openraft::Config {
                    heartbeat_interval: 20,
                    election_timeout_min: 100,
                    election_timeout_max: 200,
                    snapshot_policy: SnapshotPolicy::LogsSinceLast(SNAPSHOT_ENTRIES),
                    ..openraft::Config::default()
                }
                .validate()?,
            );
            let router = Router::default();
            let mut dirs = Vec::new();
            let mut disks = Vec::new();
            for id in 1..=3u64 {
                let dir = flotilla_bench::disk::bench_dir("openraft010");
                let (writes, counters) = spawn_writer(&dir.path().join("log"))?;
                disks.push(counters);
                dirs.push(dir);
                let log_store = LogStore { memory: Arc::default(), writes };
                let raft = runtime.block_on(RaftNode::new(
                    id,
                    Arc::clone(&config),
                    router.clone(),
                    log_store,
                    StateMachine::default(),
                ))?;
                router.nodes.lock().expect("router").insert(id, raft);
            }
            let first = router.get(1).expect("node 1");
            let members: BTreeMap<NodeId, BasicNode> =
                (1..=3).map(|id| (id, BasicNode::default())).collect();
            runtime.block_on(first.initialize(members))?;
            runtime.block_on(
                first
                    .wait(Some(Duration::from_secs(10)))
                    .metrics(|m| m.current_leader.is_some(), "a leader"),
            )?;
            Ok(OpenraftCluster { runtime, router, disks, _dirs: dirs })
        }

        pub(super) fn run(&self, value: &Bytes, proposers: usize, each: u64) -> Run {
            let first = self.router.get(1).expect("node 1");
            let leader = self.runtime.block_on(first.current_leader()).unwrap_or(1);
            let router = self.router.clone();
            run_proposers(&self.runtime, leader, value, proposers, each, move |node, put| {
                let raft = router.get(node).expect("a known node");
                async move {
                    match raft.client_write(put).await {
                        Ok(_) => Ok(()),
                        Err(error) => match error.forward_to_leader() {
                            Some(forward) => Err(Refused::Forward(forward.leader_id)),
                            None => Err(Refused::Other),
                        },
                    }
                }
            })
        }

        pub(super) fn shutdown(self) {
            let nodes: Vec<RaftNode> =
                std::mem::take(&mut *self.router.nodes.lock().expect("router"))
                    .into_values()
                    .collect();
            self.runtime.block_on(async {
                for node in nodes {
                    if let Err(error) = node.shutdown().await {
                        eprintln!("shutting an openraft 0.10 node down: {error}");
                    }
                }
            });
        }
    }

    /// Every node's `Raft` handle; an RPC is a direct call on the target's handle.
    #[derive(Clone, Default)]
    struct Router {
        nodes: Arc<Mutex<BTreeMap<NodeId, RaftNode>>>,
    }

    impl Router {
        fn get(&self, id: NodeId) -> Option<RaftNode> {
            self.nodes.lock().expect("router").get(&id).cloned()
        }
    }

    struct Connection {
        router: Router,
        target: NodeId,
    }

    fn unreachable() -> Unreachable<TypeConfig> {
        Unreachable::new(&io::Error::other("node not started"))
    }

    impl Connection {
        fn target(&self) -> Result<RaftNode, RPCError<TypeConfig>> {
            self.router.get(self.target).ok_or_else(|| RPCError::Unreachable(unreachable()))
        }
    }

    impl RaftNetworkFactory<TypeConfig> for Router {
        type Network = Connection;

        async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Connection {
            Connection { router: self.clone(), target }
        }
    }

    impl RaftNetworkV2<TypeConfig> for Connection {
        type SnapshotData = Cursor<Vec<u8>>;

        async fn append_entries(
            &mut self,
            rpc: AppendEntriesRequest<TypeConfig>,
            _option: RPCOption,
        ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
            let raft = self.target()?;
            raft.append_entries(rpc)
                .await
                .map_err(|error| RPCError::Network(NetworkError::new(&error)))
        }

        async fn vote(
            &mut self,
            rpc: VoteRequest<TypeConfig>,
            _option: RPCOption,
        ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
            let raft = self.target()?;
            raft.vote(rpc).await.map_err(|error| RPCError::Network(NetworkError::new(&error)))
        }

        async fn full_snapshot(
            &mut self,
            vote: VoteOf<TypeConfig>,
            snapshot: SnapshotOf<TypeConfig, Cursor<Vec<u8>>>,
            _cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
            _option: RPCOption,
        ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
            let raft = self
                .router
                .get(self.target)
                .ok_or_else(|| StreamingError::Unreachable(unreachable()))?;
            raft.install_full_snapshot(vote, snapshot)
                .await
                .map_err(|error| StreamingError::Network(NetworkError::new(&error)))
        }
    }

    #[derive(Default)]
    struct LogMemory {
        entries: BTreeMap<u64, Entry>,
        last_purged: Option<LogIdOf<TypeConfig>>,
        vote: Option<VoteOf<TypeConfig>>,
    }

    /// Entries in memory; every change written to the node's file and fdatasync'd (by its writer
    /// thread) before openraft is told it is durable.
    #[derive(Clone)]
    struct LogStore {
        memory: Arc<Mutex<LogMemory>>,
        writes: std::sync::mpsc::Sender<LogWrite>,
    }

    impl RaftLogReader<TypeConfig> for LogStore {
        async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
            &mut self,
            range: RB,
        ) -> Result<Vec<Entry>, io::Error> {
            let memory = self.memory.lock().expect("log memory");
            Ok(memory.entries.range(range).map(|(_, entry)| entry.clone()).collect())
        }

        async fn read_vote(&mut self) -> Result<Option<VoteOf<TypeConfig>>, io::Error> {
            Ok(self.memory.lock().expect("log memory").vote)
        }
    }

    impl RaftLogStorage<TypeConfig> for LogStore {
        type LogReader = LogStore;

        async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
            let memory = self.memory.lock().expect("log memory");
            let last_log_id = memory
                .entries
                .last_key_value()
                .map(|(_, entry)| entry.log_id)
                .or(memory.last_purged);
            Ok(LogState { last_purged_log_id: memory.last_purged, last_log_id })
        }

        async fn get_log_reader(&mut self) -> LogStore {
            self.clone()
        }

        async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> Result<(), io::Error> {
            let mut body = vec![3u8];
            body.extend_from_slice(&vote.leader_id.term.to_le_bytes());
            body.extend_from_slice(&vote.leader_id.node_id.to_le_bytes());
            body.push(u8::from(vote.committed));
            write_synced(&self.writes, &body).await?;
            self.memory.lock().expect("log memory").vote = Some(*vote);
            Ok(())
        }

        async fn append<I>(
            &mut self,
            entries: I,
            callback: IOFlushed<TypeConfig>,
        ) -> Result<(), io::Error>
        where
            I: IntoIterator<Item = Entry> + Send,
            I::IntoIter: Send,
        {
            let mut body = Vec::new();
            let mut count = 0u64;
            {
                let mut memory = self.memory.lock().expect("log memory");
                for entry in entries {
                    let (put, voters) = match &entry.payload {
                        EntryPayload::Blank => (None, None),
                        EntryPayload::Normal(put) => (Some(put), None),
                        EntryPayload::Membership(m) => (None, Some(m.get_joint_config())),
                    };
                    let leader = entry.log_id.leader_id;
                    encode_entry(
                        entry.log_id.index,
                        leader.term,
                        leader.node_id,
                        put,
                        voters,
                        &mut body,
                    );
                    count += 1;
                    memory.entries.insert(entry.log_id.index, entry);
                }
            }
            let done: Completion = Box::new(move |result| callback.io_completed(result));
            self.writes
                .send(LogWrite { record: frame(&body), entries: count, done })
                .map_err(|_| writer_gone())
        }

        async fn truncate_after(
            &mut self,
            last_log_id: Option<LogIdOf<TypeConfig>>,
        ) -> Result<(), io::Error> {
            let from = last_log_id.map_or(0, |log_id| log_id.index + 1);
            let mut body = vec![4u8];
            body.extend_from_slice(&from.to_le_bytes());
            write_synced(&self.writes, &body).await?;
            self.memory.lock().expect("log memory").entries.split_off(&from);
            Ok(())
        }

        async fn purge(&mut self, log_id: LogIdOf<TypeConfig>) -> Result<(), io::Error> {
            let mut memory = self.memory.lock().expect("log memory");
            let keep = memory.entries.split_off(&(log_id.index + 1));
            memory.entries = keep;
            memory.last_purged = Some(log_id);
            Ok(())
        }
    }

    #[derive(Default)]
    struct MachineState {
        last_applied: Option<LogIdOf<TypeConfig>>,
        membership: StoredMembershipOf<TypeConfig>,
        data: BTreeMap<u32, Bytes>,
        snapshot: Option<(SnapshotMetaOf<TypeConfig>, Vec<u8>)>,
    }

    /// The same keys as Flotilla's KV, in memory; snapshots kept in memory.
    #[derive(Clone, Default)]
    pub(super) struct StateMachine {
        state: Arc<Mutex<MachineState>>,
    }

    impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
        type SnapshotData = Cursor<Vec<u8>>;

        async fn build_snapshot(
            &mut self,
        ) -> Result<SnapshotOf<TypeConfig, Cursor<Vec<u8>>>, io::Error> {
            let mut state = self.state.lock().expect("state machine");
            let bytes = encode_data(&state.data);
            let meta = SnapshotMetaOf::<TypeConfig> {
                last_log_id: state.last_applied,
                last_membership: state.membership.clone(),
            };
            state.snapshot = Some((meta.clone(), bytes.clone()));
            Ok(SnapshotOf::<TypeConfig, _> { meta, snapshot: Cursor::new(bytes) })
        }
    }

    impl RaftStateMachine<TypeConfig> for StateMachine {
        type SnapshotData = Cursor<Vec<u8>>;
        type SnapshotBuilder = StateMachine;

        async fn applied_state(
            &mut self,
        ) -> Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>), io::Error>
        {
            let state = self.state.lock().expect("state machine");
            Ok((state.last_applied, state.membership.clone()))
        }

        async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
        where
            Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
        {
            while let Some(item) = entries.next().await {
                let (entry, responder) = item?;
                {
                    let mut state = self.state.lock().expect("state machine");
                    state.last_applied = Some(entry.log_id);
                    match entry.payload {
                        EntryPayload::Blank => {}
                        EntryPayload::Normal(put) => {
                            state.data.insert(put.key, put.value);
                        }
                        EntryPayload::Membership(membership) => {
                            state.membership = StoredMembershipOf::<TypeConfig>::new(
                                Some(entry.log_id),
                                membership,
                            );
                        }
                    }
                }
                if let Some(responder) = responder {
                    responder.send(());
                }
            }
            Ok(())
        }

        async fn get_snapshot_builder(&mut self) -> StateMachine {
            self.clone()
        }

        async fn install_snapshot(
            &mut self,
            meta: &SnapshotMetaOf<TypeConfig>,
            snapshot: Cursor<Vec<u8>>,
        ) -> Result<(), io::Error> {
            let bytes = snapshot.into_inner();
            let mut state = self.state.lock().expect("state machine");
            state.data = decode_data(&bytes);
            state.last_applied = meta.last_log_id;
            state.membership = meta.last_membership.clone();
            state.snapshot = Some((meta.clone(), bytes));
            Ok(())
        }

        async fn get_current_snapshot(
            &mut self,
        ) -> Result<Option<SnapshotOf<TypeConfig, Cursor<Vec<u8>>>>, io::Error> {
            let state = self.state.lock().expect("state machine");
            Ok(state.snapshot.as_ref().map(|(meta, bytes)| SnapshotOf::<TypeConfig, _> {
                meta: meta.clone(),
                snapshot: Cursor::new(bytes.clone()),
            }))
        }
    }
}

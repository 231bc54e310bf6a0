//! A three-node Flotilla cluster in one process on loopback TCP, for the engine benchmarks: every
//! node hosts the same groups, proposers write through each group's leader (as
//! `engine/examples/cluster.rs` does), and the cluster's shards report what they did.
//!
//! The cluster is started once per configuration; a measured iteration is then "N proposals
//! completed by P proposers" ([`Cluster::run`]), or a paced load at a fixed rate
//! ([`Cluster::run_paced`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla::kv::{Command, Request};
use flotilla::{Engine, EngineConfig, Error, GroupId, NodeId};
use hdrhistogram::Histogram;
use tokio::task::JoinSet;

use crate::disk;

/// Keys the proposers cycle through (so the state machines stay small).
const KEYS: usize = 1024;

/// What a cluster's shards did, summed over every shard of every node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// fdatasyncs issued by the shards' WALs.
    pub fdatasyncs: u64,
    /// Entries the WALs wrote (Raft entries and hard states of every group).
    pub entries: u64,
    /// WAL rounds (records).
    pub rounds: u64,
    /// Frames sent to peers.
    pub frames: u64,
    /// Raft messages those frames carried.
    pub messages: u64,
    /// WAL segments created (pre-written with zeros by the WAL's preparer thread).
    pub segments_created: u64,
    /// WAL segments recycled in place (no pre-writing).
    pub segments_recycled: u64,
    /// WAL segments deleted when retired instead of recycled (a reader still mapped them, or
    /// their size is not the configured one): each is a segment the preparer has to create
    /// again.
    pub segments_deleted: u64,
}

impl Totals {
    /// `self - before`, field by field.
    #[must_use]
    pub fn since(&self, before: &Totals) -> Totals {
        Totals {
            fdatasyncs: self.fdatasyncs - before.fdatasyncs,
            entries: self.entries - before.entries,
            rounds: self.rounds - before.rounds,
            frames: self.frames - before.frames,
            messages: self.messages - before.messages,
            segments_created: self.segments_created - before.segments_created,
            segments_recycled: self.segments_recycled - before.segments_recycled,
            segments_deleted: self.segments_deleted - before.segments_deleted,
        }
    }

    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Totals) {
        self.fdatasyncs += other.fdatasyncs;
        self.entries += other.entries;
        self.rounds += other.rounds;
        self.frames += other.frames;
        self.messages += other.messages;
        self.segments_created += other.segments_created;
        self.segments_recycled += other.segments_recycled;
        self.segments_deleted += other.segments_deleted;
    }
}

/// Proposal attempts the leader refused, by reason; each was retried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Refusals {
    /// `Busy`: backpressure (the group's in-flight window or uncommitted bytes, or the shard's
    /// inbox); retried after a millisecond.
    pub busy: u64,
    /// `NotLeader`: retried at the hinted leader.
    pub not_leader: u64,
    /// Anything else (no quorum, timeout, dropped by a leader change): retried at the next node
    /// after 5 ms.
    pub other: u64,
}

impl Refusals {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Refusals) {
        self.busy += other.busy;
        self.not_leader += other.not_leader;
        self.other += other.other;
    }
}

impl std::fmt::Display for Refusals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "refused: {} busy, {} not leader, {} other",
            self.busy, self.not_leader, self.other
        )
    }
}

/// What one run of proposals did.
#[derive(Debug)]
pub struct Run {
    /// Wall time from the first proposal to the last answer.
    pub elapsed: Duration,
    /// Latency of every committed proposal, in nanoseconds.
    pub latency: Histogram<u64>,
    /// Proposals committed.
    pub committed: u64,
    /// Attempts refused and retried.
    pub refused: Refusals,
    /// Proposals a paced run did not start because too many were outstanding.
    pub skipped: u64,
}

/// Three nodes on loopback, each with its own data directory on the work disk, hosting the same
/// groups, each group with an elected leader.
pub struct Cluster {
    runtime: tokio::runtime::Runtime,
    engines: Vec<Engine>,
    /// The engine (index) that leads each group (index `group - 1`), as the proposers last saw.
    leaders: Arc<[AtomicUsize]>,
    keys: Arc<[Bytes]>,
    groups: u64,
    shards: usize,
    setup: Duration,
    created: Duration,
    _dirs: Vec<tempfile::TempDir>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("groups", &self.groups)
            .field("shards", &self.shards)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Starts three nodes with `shards` shards each (fdatasync on), creates `groups` groups on
    /// every node (concurrently), and waits until every group has a leader.
    pub fn start(groups: u64, shards: usize) -> Result<Cluster, Box<dyn std::error::Error>> {
        Self::start_with(groups, shards, |_| {})
    }

    /// [`Cluster::start`] with every node's configuration passed through `adjust` first.
    pub fn start_with(
        groups: u64,
        shards: usize,
        adjust: impl Fn(&mut EngineConfig),
    ) -> Result<Cluster, Box<dyn std::error::Error>> {
        assert!(groups > 0, "at least one group");
        let started = Instant::now();
        let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| disk::bench_dir("engine")).collect();
        let mut addrs = BTreeMap::new();
        for id in 1..=3 {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            addrs.insert(NodeId(id), listener.local_addr()?);
        }
        let nodes: Vec<NodeId> = addrs.keys().copied().collect();
        let mut engines = Vec::new();
        for (node, dir) in nodes.iter().zip(&dirs) {
            let mut config = EngineConfig::new(*node, addrs[node], dir.path());
            config.peers = addrs.clone();
            config.shards = shards;
            adjust(&mut config);
            engines.push(Engine::open_kv(config)?);
        }
        // Time only, no IO driver: the proposers need nothing else, and a runtime with one wakes
        // its thread with an eventfd write for every task another thread wakes (each answer
        // from a shard), where this one only signals a parked thread — the load generator
        // should not spend the CPU the measured nodes need.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
        let (leaders, created) = runtime.block_on(setup(&engines, &nodes, groups))?;
        let leaders: Arc<[AtomicUsize]> = leaders.into_iter().map(AtomicUsize::new).collect();
        Ok(Cluster {
            runtime,
            engines,
            leaders,
            keys: (0..KEYS).map(|k| Bytes::from(format!("key-{k}"))).collect(),
            groups,
            shards: shards * 3,
            setup: started.elapsed(),
            created,
            _dirs: dirs,
        })
    }

    /// Groups hosted.
    pub fn groups(&self) -> u64 {
        self.groups
    }

    /// Shards over all three nodes.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// How long [`Cluster::start`] took (nodes, groups, elections).
    pub fn setup_time(&self) -> Duration {
        self.setup
    }

    /// How long creating the groups on the three nodes took (all at once), within
    /// [`Cluster::setup_time`].
    pub fn create_time(&self) -> Duration {
        self.created
    }

    /// The WAL backend of the first node's first shard.
    pub fn backend(&self) -> String {
        format!("{:?}", self.engines[0].backends()[0])
    }

    /// Groups whose leader is on each node (as the proposers last saw).
    pub fn leaders_per_node(&self) -> [usize; 3] {
        let mut out = [0; 3];
        for leader in self.leaders.iter() {
            out[leader.load(Ordering::Relaxed) % 3] += 1;
        }
        out
    }

    /// Runs `future` on the cluster's client runtime (a current-thread runtime: the proposers
    /// share one thread; the nodes' shards run on their own threads).
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// What every shard of every node has done so far, summed.
    pub fn totals(&self) -> Totals {
        self.block_on(totals(&self.engines)).expect("shard stats")
    }

    /// Segments each shard's WAL has created and recycled so far, node by node and shard by
    /// shard.
    pub fn segments_per_wal(&self) -> Vec<(u64, u64)> {
        self.block_on(async {
            let mut segments = Vec::new();
            for engine in &self.engines {
                let shards = engine.shard_stats().await.expect("shard stats");
                segments.extend(
                    shards
                        .iter()
                        .map(|shard| (shard.wal.segments_created, shard.wal.segments_recycled)),
                );
            }
            segments
        })
    }

    /// `proposers` concurrent proposers (proposer `i` writes to group `i % groups`) each commit
    /// `each` Put requests with `payload`-sized values; returns when the last one is answered.
    /// Latencies are kept in plain vectors while the clock runs and go into the histogram after.
    /// The proposers run on the calling thread (the cluster's current-thread runtime), so that
    /// thread's CPU is the load's and the rest of the process's is the nodes'.
    pub fn run(&self, payload: &Bytes, proposers: usize, each: u64) -> Run {
        let clients: Vec<Client> =
            (0..proposers).map(|proposer| self.client(proposer, payload)).collect();
        let (elapsed, parts) = self.block_on(async {
            let started = Instant::now();
            let mut tasks = JoinSet::new();
            for mut client in clients {
                tasks.spawn(async move {
                    let mut latencies = Vec::with_capacity(each as usize);
                    let mut refused = Refusals::default();
                    for _ in 0..each {
                        let (took, refusals) = client.commit().await;
                        latencies.push(took);
                        refused.add(&refusals);
                    }
                    (latencies, refused)
                });
            }
            let mut parts = Vec::with_capacity(proposers);
            while let Some(result) = tasks.join_next().await {
                parts.push(result.expect("a proposer panicked"));
            }
            (started.elapsed(), parts)
        });
        let mut run = Run {
            elapsed,
            latency: disk::latency_histogram(),
            committed: 0,
            refused: Refusals::default(),
            skipped: 0,
        };
        for (latencies, refused) in parts {
            for took in latencies {
                run.latency.saturating_record(took.as_nanos() as u64);
            }
            run.refused.add(&refused);
        }
        run.committed = run.latency.len();
        run
    }

    /// An open-loop load: proposals are started at `rate` per second (a pacer releases what is
    /// due every millisecond, round-robin over the groups) for `duration`, each as its own task,
    /// whatever the earlier ones are doing (at most `max_outstanding` at once: beyond that the
    /// pacer skips them, and counts them in `skipped`). Latency is measured from each proposal's
    /// release.
    pub fn run_paced(
        &self,
        payload: &Bytes,
        rate: f64,
        duration: Duration,
        max_outstanding: usize,
    ) -> Run {
        self.block_on(async {
            let started = Instant::now();
            let mut tasks = JoinSet::new();
            let mut latency = disk::latency_histogram();
            let mut released = 0u64;
            let mut skipped = 0u64;
            let mut refused = Refusals::default();
            let mut interval = tokio::time::interval(Duration::from_millis(1));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                interval.tick().await;
                let now = started.elapsed();
                if now >= duration {
                    break;
                }
                #[expect(clippy::cast_sign_loss, reason = "a positive rate times a duration")]
                let due = (rate * now.as_secs_f64()) as u64;
                while released < due {
                    if tasks.len() >= max_outstanding {
                        skipped += due - released;
                        released = due;
                        break;
                    }
                    let mut client = self.client(released as usize, payload);
                    tasks.spawn(async move { client.commit().await });
                    released += 1;
                }
                while let Some(result) = tasks.try_join_next() {
                    let (took, refusals) = result.expect("a proposal task panicked");
                    latency.saturating_record(took.as_nanos() as u64);
                    refused.add(&refusals);
                }
            }
            while let Some(result) = tasks.join_next().await {
                let (took, refusals) = result.expect("a proposal task panicked");
                latency.saturating_record(took.as_nanos() as u64);
                refused.add(&refusals);
            }
            Run { elapsed: started.elapsed(), committed: latency.len(), latency, refused, skipped }
        })
    }

    /// Commits one Put with a `payload`-sized value to group 1 through its leader; returns how
    /// long it took.
    pub fn write_once(&self, payload: &Bytes) -> Duration {
        let mut client = self.client(0, payload);
        self.block_on(client.commit()).0
    }

    /// A client for proposer `proposer`: it writes to group `proposer % groups + 1`.
    fn client(&self, proposer: usize, payload: &Bytes) -> Client {
        let group = proposer as u64 % self.groups;
        Client {
            engines: self.engines.clone(),
            leaders: Arc::clone(&self.leaders),
            keys: Arc::clone(&self.keys),
            group: GroupId(group + 1),
            slot: group as usize,
            next: proposer,
            value: payload.clone(),
        }
    }

    /// The running nodes, in node order (fewer than three after [`Cluster::kill`]).
    pub fn engines(&self) -> &[Engine] {
        &self.engines
    }

    /// Drops node `index` (0-based) without a graceful shutdown, as a crash would leave it (the
    /// nodes lose nothing acknowledged either way). Afterwards only [`Cluster::engines`],
    /// [`Cluster::block_on`] and [`Cluster::shutdown`] make sense: the proposers' leader table
    /// indexes the original three nodes.
    pub fn kill(&mut self, index: usize) -> NodeId {
        let engine = self.engines.remove(index);
        let node = engine.node();
        drop(engine);
        node
    }

    /// Stops the three nodes (each drains, syncs and closes its WALs).
    pub fn shutdown(self) {
        for engine in self.engines {
            if let Err(error) = engine.shutdown() {
                eprintln!("shutting a node down: {error}");
            }
        }
    }
}

/// One proposer's view: the group it writes to and where it believes the leader is.
struct Client {
    engines: Vec<Engine>,
    leaders: Arc<[AtomicUsize]>,
    keys: Arc<[Bytes]>,
    group: GroupId,
    slot: usize,
    next: usize,
    value: Bytes,
}

impl Client {
    /// Commits one Put through the group's leader, following leader hints and retrying refusals;
    /// returns the time from the first attempt to the answer, and the attempts refused.
    async fn commit(&mut self) -> (Duration, Refusals) {
        let key = self.keys[self.next % self.keys.len()].clone();
        self.next += 1;
        let asked = Instant::now();
        let mut refused = Refusals::default();
        let mut last_refusal = None;
        loop {
            let leader = self.leaders[self.slot].load(Ordering::Relaxed);
            let command = Command::Put { key: key.clone(), value: self.value.clone() };
            match self.engines[leader].propose_kv(self.group, Request::Unsessioned(command)).await {
                Ok(_) => return (asked.elapsed(), refused),
                Err(Error::NotLeader { leader_hint: Some(hint) }) => {
                    refused.not_leader += 1;
                    let index = usize::try_from(hint.0 - 1).unwrap_or(0) % self.engines.len();
                    self.leaders[self.slot].store(index, Ordering::Relaxed);
                }
                Err(Error::Busy) => {
                    refused.busy += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(error) => {
                    refused.other += 1;
                    last_refusal = Some(error);
                    let next = (leader + 1) % self.engines.len();
                    self.leaders[self.slot].store(next, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            assert!(
                asked.elapsed() < Duration::from_secs(60),
                "group {} could not commit a write in 60 s ({refused:?}; last other refusal: \
                 {last_refusal:?})",
                self.group
            );
        }
    }
}

/// Creates every group on every node, all at once, then waits until each has a leader; returns
/// the index of each group's leader, and how long creating the groups took.
async fn setup(
    engines: &[Engine],
    nodes: &[NodeId],
    groups: u64,
) -> Result<(Vec<usize>, Duration), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let mut creating = JoinSet::new();
    for engine in engines {
        for group in 1..=groups {
            let engine = engine.clone();
            let nodes = nodes.to_vec();
            creating.spawn(async move { engine.create_group(GroupId(group), &nodes).await });
        }
    }
    while let Some(result) = creating.join_next().await {
        result??;
    }
    let created = started.elapsed();
    let started = Instant::now();
    let mut leaders: Vec<Option<usize>> = vec![None; groups as usize];
    loop {
        let mut asking = JoinSet::new();
        for (slot, _) in leaders.iter().enumerate().filter(|(_, leader)| leader.is_none()) {
            for (index, engine) in engines.iter().enumerate() {
                let engine = engine.clone();
                let group = GroupId(slot as u64 + 1);
                asking.spawn(async move { (slot, index, engine.status(group).await) });
            }
        }
        while let Some(result) = asking.join_next().await {
            let (slot, index, status) = result?;
            if let Ok(status) = status
                && status.leader == Some(engines[index].node())
            {
                leaders[slot] = Some(index);
            }
        }
        if leaders.iter().all(Option::is_some) {
            return Ok((leaders.into_iter().map(|leader| leader.unwrap_or(0)).collect(), created));
        }
        // Thousands of groups elect at once on a small machine: allow for them.
        let patience = Duration::from_secs(30) + Duration::from_millis(groups);
        if started.elapsed() > patience {
            return Err(format!("groups did not elect leaders within {patience:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn totals(engines: &[Engine]) -> Result<Totals, Error> {
    let mut totals = Totals::default();
    for engine in engines {
        for shard in engine.shard_stats().await? {
            totals.fdatasyncs += shard.wal.fdatasyncs;
            totals.entries += shard.wal.entries;
            totals.rounds += shard.wal.rounds;
            totals.frames += shard.frames_sent;
            totals.messages += shard.messages_sent;
            totals.segments_created += shard.wal.segments_created;
            totals.segments_recycled += shard.wal.segments_recycled;
            totals.segments_deleted += shard.wal.segments_deleted;
        }
    }
    Ok(totals)
}

/// A TCP echo peer on loopback, for the round-trip reference: one thread that answers every
/// 64-byte message with the same bytes.
#[derive(Debug)]
pub struct LoopbackPing {
    stream: std::net::TcpStream,
    _thread: std::thread::JoinHandle<()>,
}

impl LoopbackPing {
    /// Starts the echo thread and connects to it (TCP_NODELAY on both ends).
    pub fn start() -> std::io::Result<LoopbackPing> {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let thread = std::thread::Builder::new().name("loopback-echo".into()).spawn(move || {
            let Ok((mut peer, _)) = listener.accept() else { return };
            let _ = peer.set_nodelay(true);
            let mut buf = [0u8; 64];
            while peer.read_exact(&mut buf).is_ok() {
                if peer.write_all(&buf).is_err() {
                    return;
                }
            }
        })?;
        let stream = std::net::TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(LoopbackPing { stream, _thread: thread })
    }

    /// One round trip of a 64-byte message.
    pub fn round_trip(&mut self) -> std::io::Result<Duration> {
        use std::io::{Read, Write};
        let mut buf = [7u8; 64];
        let started = Instant::now();
        self.stream.write_all(&buf)?;
        self.stream.read_exact(&mut buf)?;
        Ok(started.elapsed())
    }
}

//! [`Engine`]: the node applications embed. It starts one shard thread per core, each with its
//! own runtime, WAL, groups and connections; routes every call to the shard that owns the group
//! (by a stable hash of its id); and turns the shards' answers into typed results.
//!
//! ```no_run
//! # async fn demo() -> Result<(), flotilla::Error> {
//! use flotilla::kv::{Command, Query, QueryResult, Request};
//! use flotilla::{Consistency, Engine, EngineConfig, GroupId, NodeId};
//!
//! let config = EngineConfig::new(NodeId(1), "127.0.0.1:7001".parse().unwrap(), "/tmp/node1");
//! let engine = Engine::open_kv(config)?;
//! engine.create_group(GroupId(1), &[NodeId(1)]).await?;
//! let put = Command::Put { key: "k".into(), value: "v".into() };
//! engine.propose_kv(GroupId(1), Request::Unsessioned(put)).await?;
//! let get = Query::Get { key: "k".into() };
//! let value = engine.read(GroupId(1), get, Consistency::Linearizable).await?;
//! assert_eq!(value, QueryResult::Value(Some("v".into())));
//! engine.shutdown()?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use flotilla_raftgroup::{LogIndex, Membership, MembershipChange, NodeId, Role, Term};
use flotilla_wal::{ActiveBackend, GroupId};
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::kv::{self, KvConfig, KvStateMachine, StateMachine};
use crate::liveness::Liveness;
use crate::shard::driver::{self, Request, ShardContext};
use crate::shard::transfer::{SnapshotTransferStats, Transfers};
use crate::shard::{MembershipEdit, ShardCore};
use crate::transport::ClusterId;
use crate::transport::faults::Faults;

/// Why a call failed. Every call ends with a result: nothing waits forever (see
/// [`EngineConfig::request_timeout`]).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// This node's replica is not the group's leader; retry at `leader_hint` if given.
    #[error("not leader (hint: {leader_hint:?})")]
    NotLeader {
        /// The leader this replica knows of.
        leader_hint: Option<NodeId>,
    },
    /// The group has no leader this replica can reach: it is on the minority side of a
    /// partition, or an election is under way. Retry later or elsewhere.
    #[error("no quorum: the group has no reachable leader")]
    NoQuorum,
    /// This node does not host the group.
    #[error("group {0} not found")]
    GroupNotFound(GroupId),
    /// The group already exists on this node.
    #[error("group {0} already exists")]
    GroupExists(GroupId),
    /// Too much is queued (the shard's inbox, the group's in-flight window or its uncommitted
    /// bytes): back off and retry.
    #[error("busy")]
    Busy,
    /// The engine is shutting down or has shut down.
    #[error("shutting down")]
    ShuttingDown,
    /// The request's deadline passed. A proposal may still have been applied (or may be later):
    /// retry through a client session to apply it exactly once.
    #[error("deadline exceeded")]
    Timeout,
    /// The proposal may or may not have been applied (a snapshot from the leader replaced the
    /// log before its fate was known): like [`Error::Timeout`], retry through a client session
    /// to apply it exactly once.
    #[error("outcome unknown")]
    OutcomeUnknown,
    /// A leader change overwrote the proposal's log position: it was not applied.
    #[error("proposal dropped by a leader change")]
    ProposalDropped,
    /// The arguments are wrong (a bad member list, an unknown node, promoting a node that is not
    /// a learner, removing the last voter...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Another membership change of the group is still under way (one at a time, as in etcd):
    /// retry once [`Engine::membership`] shows it done.
    #[error("a membership change is already in progress")]
    MembershipChangePending,
    /// The learner to promote lags the leader's log by more than
    /// [`crate::shard::PROMOTE_LAG_ENTRIES_MAX`] entries: as a voter it would stall commits
    /// until it caught up. Retry later.
    #[error("learner {node} has not caught up with the leader yet")]
    LearnerNotReady {
        /// The learner.
        node: NodeId,
    },
    /// The configuration is wrong, or does not match the data directory.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The shard's storage failed; the shard refuses all further work (no write is retried).
    /// A proposal answered with this error may still have been committed by the other replicas
    /// (its entry may have left before the failure): like a timeout, its outcome is unknown.
    #[error("storage failure: {0}")]
    Storage(Arc<str>),
    /// The group refused the request for another reason.
    #[error("rejected: {0}")]
    Rejected(String),
    /// A proposal larger than [`EngineConfig::proposal_bytes_max`] (refused before it reaches
    /// the group: every replica would have to log it).
    #[error("proposal of {bytes} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// The proposal's length.
        bytes: usize,
        /// The limit in force.
        max: usize,
    },
}

/// How fresh a read must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// Reflects every write acknowledged before the read started: the leader confirms it still
    /// leads with a heartbeat round (ReadIndex), on the leader or forwarded by a follower.
    Linearizable,
    /// Like `Linearizable`, but the leader may answer from its lease without a heartbeat round
    /// when [`EngineConfig::lease_reads`] is on; safe while clocks drift less than configured.
    Lease,
    /// Served at once from this node's replica, which heard from its leader within `max_lag`:
    /// may miss the latest writes, never shows an uncommitted one.
    Stale {
        /// How long ago the replica may have last heard from its leader.
        max_lag: Duration,
    },
}

/// A proposal's result: where it landed in the log and what the state machine answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied<R> {
    /// Its log index.
    pub index: LogIndex,
    /// The state machine's answer.
    pub response: R,
}

/// A group's replica on this node, for tools, tests and routing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupStatus {
    /// Its role.
    pub role: Role,
    /// The leader it knows of.
    pub leader: Option<NodeId>,
    /// Its term.
    pub term: Term,
    /// Its commit index.
    pub commit: LogIndex,
    /// Its state machine's applied index.
    pub applied: LogIndex,
    /// Its last log index.
    pub last_index: LogIndex,
    /// Its latest snapshot's index: the log before it is compacted away.
    pub snapshot_index: LogIndex,
}

/// What one shard has done since the node started: for tools, benchmarks and tests.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ShardStats {
    /// The WAL backend it runs on.
    pub backend: ActiveBackend,
    /// Its WAL's counters (rounds, entries, fdatasyncs, …).
    pub wal: flotilla_wal::Stats,
    /// Groups it hosts.
    pub groups: usize,
    /// Groups not quiet (being ticked); see [`EngineConfig::quiesce`].
    pub groups_awake: usize,
    /// Groups whose replica here leads.
    pub leaders: usize,
    /// Frames sent to peers (one per peer per flush, cut at 1 MiB).
    pub frames_sent: u64,
    /// Raft messages those frames carried.
    pub messages_sent: u64,
}

/// How a node runs. [`EngineConfig::new`] gives working defaults for a node on one machine.
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent switches of a configuration, each documented"
)]
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// This node's id (never 0); every node of the cluster has its own.
    pub node: NodeId,
    /// The cluster's id: connections from other clusters are refused.
    pub cluster: ClusterId,
    /// Address to listen on for peers.
    pub listen: SocketAddr,
    /// Where the other nodes listen (this node may be listed too; it is ignored).
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// Where this node keeps its data: one directory per shard.
    pub data_dir: PathBuf,
    /// Shard threads; 0 means one per available core. Fixed for the life of a data directory.
    pub shards: usize,
    /// The Raft clock: one tick per interval.
    pub tick: Duration,
    /// Ticks without a leader before a follower campaigns (randomized up to twice that).
    pub election_ticks: u32,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: u32,
    /// Let a leader answer [`Consistency::Lease`] reads from its lease.
    pub lease_reads: bool,
    /// How long a proposal or a read may take before it fails: a proposal with
    /// [`Error::Timeout`] (it may still be applied), a read with [`Error::Timeout`],
    /// [`Error::NoQuorum`] or [`Error::NotLeader`] (whichever says why).
    pub request_timeout: Duration,
    /// Requests queued per shard before calls fail with [`Error::Busy`].
    pub inbox_capacity: usize,
    /// The longest proposal accepted, in bytes; longer ones fail with [`Error::TooLarge`]. The
    /// limit in force is at most the WAL's `batch_bytes_max` less an entry's framing, since an
    /// entry is written in one WAL record. etcd's default is 1.5 MiB, TiKV's 8 MiB.
    pub proposal_bytes_max: usize,
    /// Snapshot a group's state machine (and compact its log) after this many applied entries.
    pub snapshot_entries: u64,
    /// Bytes per second this node spends sending snapshots to peers, all streams together
    /// (0: unlimited). A follower too far behind for the log receives its group's snapshot
    /// file as a stream of chunks on a connection of its own; this bound keeps such streams
    /// from starving the WAL and the Raft traffic of the node's other groups.
    pub snapshot_bytes_per_sec: u64,
    /// The bytes of one snapshot chunk: the most a stream holds in memory at once on either
    /// side (4 KiB to 8 MiB).
    pub snapshot_chunk_bytes: usize,
    /// The largest snapshot file this node accepts from a peer: a larger offer is refused
    /// (`RefuseReason::TooLarge`) before anything is spooled, so a peer's bad offer cannot fill
    /// the disk the WAL needs. Every node of a cluster should use the same value, above the
    /// largest state any group holds. A leader whose snapshot is refused logs an error and
    /// does not offer that snapshot again (only a newer one).
    pub snapshot_bytes_max: u64,
    /// Live WAL segments per shard above which the groups pinning the oldest segment are
    /// snapshotted (or copied forward) so it can be recycled: bounds disk use when many groups
    /// each write less than `snapshot_entries` between snapshots.
    pub wal_segments_target: u64,
    /// Let idle groups go quiet: no ticks, no heartbeats, until they have work again
    /// (see [`crate::shard::Quiescence`]). Node-level liveness (an empty frame per peer per
    /// heartbeat interval) stands in for their heartbeats; a node unheard of for two
    /// election timeouts counts as down.
    pub quiesce: bool,
    /// With `quiesce`: at most this many quiet groups wake per tick and shard after a node
    /// goes down or returns, or at start — so a node blip never wakes every group at once.
    /// The default, 512, wakes the groups a shard campaigns for after the death of a node that
    /// led 5,000 of them (about half go to each of two survivors) within five ticks, half an
    /// election timeout; a smaller value trades a slower failover for a smaller burst.
    pub wakes_per_tick: usize,
    /// fdatasync every WAL round that holds entries, a snapshot's compaction, or a new term or
    /// vote before anything that depends on it is acknowledged (a round holding nothing but new
    /// commit indexes is written without one: see `flotilla_raftgroup::Ready::must_sync`).
    /// `false` is unsafe, for benchmarks only (like etcd's `--unsafe-no-fsync`): rounds are written but
    /// not synced, so a power failure or kernel crash can lose acknowledged writes and votes (a
    /// process crash cannot: the bytes are in the page cache).
    pub sync: bool,
    /// When a shard loop iteration's only output is a write that everything else waits for (a
    /// follower's new entries, whose acknowledgement leaves after the write) and the shard's
    /// WAL is idle, the shard thread writes and syncs that round itself
    /// ([`flotilla_wal::waiting_caller`]) instead of handing it to the WAL's writer thread and
    /// being woken back: two thread wake-ups fewer on the path of a lone write. Under load the
    /// WAL is never idle and rounds go through the writer thread as usual.
    pub inline_idle_writes: bool,
    /// The WAL of each shard.
    pub wal: flotilla_wal::Config,
    /// The fault hook (tests): traffic rules consulted for every frame sent and received.
    pub faults: Option<Arc<Faults>>,
}

impl EngineConfig {
    /// A node `node` listening on `listen`, keeping its data in `data_dir`: 10 ms ticks,
    /// elections after 10–20 ticks, heartbeats every 2, 5 s request deadline, one shard per core.
    pub fn new(node: NodeId, listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            node,
            cluster: ClusterId(1),
            listen,
            peers: BTreeMap::new(),
            data_dir: data_dir.into(),
            shards: 0,
            tick: Duration::from_millis(10),
            election_ticks: 10,
            heartbeat_ticks: 2,
            lease_reads: false,
            request_timeout: Duration::from_secs(5),
            inbox_capacity: 16 << 10,
            proposal_bytes_max: 1 << 20,
            snapshot_entries: 10_000,
            snapshot_bytes_per_sec: 128 << 20,
            snapshot_chunk_bytes: 256 << 10,
            snapshot_bytes_max: 16 << 30,
            wal_segments_target: 4,
            quiesce: true,
            wakes_per_tick: 512,
            sync: true,
            inline_idle_writes: true,
            wal: flotilla_wal::Config::default(),
            faults: None,
        }
    }

    /// The proposal limit in force: [`EngineConfig::proposal_bytes_max`], bounded by what one
    /// WAL record holds.
    pub fn proposal_limit(&self) -> usize {
        let framing =
            flotilla_wal::record::ENTRIES_ITEM_HEADER_LEN + flotilla_wal::record::ENTRY_HEADER_LEN;
        self.proposal_bytes_max.min(self.wal.batch_bytes_max.saturating_sub(framing))
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |what: &str| Err(Error::Config(what.to_string()));
        if self.node.0 == 0 {
            return bad("node id 0 is reserved");
        }
        if self.tick.is_zero() {
            return bad("tick must be positive");
        }
        if self.heartbeat_ticks == 0 || self.heartbeat_ticks >= self.election_ticks {
            return bad("heartbeat_ticks must be in 1..election_ticks");
        }
        if self.request_timeout < self.tick {
            return bad("request_timeout must be at least one tick");
        }
        // Every call's deadline is `now + request_timeout`, and a shard adds a tick to some.
        if Instant::now().checked_add(self.request_timeout.saturating_mul(2)).is_none() {
            return bad("request_timeout is too long to be a deadline");
        }
        if self.proposal_limit() == 0 {
            return bad("proposal_bytes_max must be positive");
        }
        if self.inbox_capacity == 0 {
            return bad("inbox_capacity must be positive");
        }
        if self.quiesce && self.wakes_per_tick == 0 {
            return bad("wakes_per_tick must be positive when quiesce is on");
        }
        if !(4 << 10..=8 << 20).contains(&self.snapshot_chunk_bytes) {
            return bad("snapshot_chunk_bytes must be in 4 KiB..=8 MiB");
        }
        if self.snapshot_bytes_max < 1 << 20 {
            return bad("snapshot_bytes_max must be at least 1 MiB");
        }
        if self.peers.keys().any(|id| id.0 == 0) {
            return bad("peer id 0 is reserved");
        }
        self.wal.validate().map_err(|error| Error::Config(format!("wal: {error}")))
    }
}

/// Makes the state machine of each group a shard hosts.
pub type MachineFactory<S> = Arc<dyn Fn(GroupId) -> S + Send + Sync>;

/// A running node. Cloning gives another handle to the same node; the node stops when
/// [`Engine::shutdown`] is called or the last handle is dropped (dropping loses nothing that was
/// acknowledged: every acknowledged write is already durable).
///
/// Calls are answered from the shard threads, which wake the caller's task. On a tokio
/// current-thread runtime built with an IO driver (`enable_all`), each such wake writes to an
/// eventfd — about one syscall per call, which cost a quarter of the CPU per write in the
/// engine benchmark; a runtime without an IO driver (`enable_time` only), or a multi-thread
/// one whose workers are busy, signals a thread only when it is parked.
pub struct Engine<S: StateMachine = KvStateMachine> {
    inner: Arc<Inner<S>>,
}

impl<S: StateMachine> Clone for Engine<S> {
    fn clone(&self) -> Self {
        Self { inner: Arc::clone(&self.inner) }
    }
}

impl<S: StateMachine> std::fmt::Debug for Engine<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("node", &self.inner.node)
            .field("shards", &self.inner.shards.len())
            .finish_non_exhaustive()
    }
}

struct ShardHandle<S: StateMachine> {
    inbox: mpsc::Sender<Request<S>>,
    stop: Arc<Notify>,
    thread: Mutex<Option<JoinHandle<Result<(), Error>>>>,
}

struct Inner<S: StateMachine> {
    node: NodeId,
    request_timeout: Duration,
    shards: Vec<ShardHandle<S>>,
    local_addr: SocketAddr,
    backends: Vec<ActiveBackend>,
    transfers: Arc<Transfers>,
    proposal_limit: usize,
}

impl<S: StateMachine> Drop for Inner<S> {
    fn drop(&mut self) {
        // Errors were logged by the shards; a drop has no one to report them to.
        let _ = stop_shards(&self.shards);
    }
}

fn stop_shards<S: StateMachine>(shards: &[ShardHandle<S>]) -> Result<(), Error> {
    for shard in shards {
        shard.stop.notify_one();
    }
    let mut result = Ok(());
    for shard in shards {
        if let Some(thread) = shard.thread.lock().take() {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(error)) => result = Err(error),
                Err(_) => result = Err(Error::Storage("a shard thread panicked".into())),
            }
        }
    }
    result
}

/// The shard that owns `group` among `shards`: a fixed hash, so a group stays on its shard (and
/// its WAL) across restarts.
pub fn shard_of(group: GroupId, shards: usize) -> usize {
    let mut z = group.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z % shards as u64) as usize
}

impl Engine<KvStateMachine> {
    /// Starts a node whose groups run the built-in ordered KV state machine.
    pub fn open_kv(config: EngineConfig) -> Result<Self, Error> {
        let factory: MachineFactory<KvStateMachine> =
            Arc::new(|_| KvStateMachine::new(KvConfig::default()));
        Self::open(config, &factory)
    }

    /// Proposes a KV request, stamped with this node's wall clock as the log time that sessions
    /// expire by (the state machine never reads a clock: every replica sees the same time).
    pub async fn propose_kv(
        &self,
        group: GroupId,
        request: kv::Request,
    ) -> Result<Applied<Result<kv::Reply, kv::ApplyError>>, Error> {
        let leader_time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
        self.propose(group, kv::Proposal { leader_time_ms, request }.to_bytes()).await
    }
}

impl<S> Engine<S>
where
    S: StateMachine + Send + 'static,
    S::Query: Send + 'static,
    S::Response: Send + 'static,
    S::QueryResult: Send + 'static,
{
    /// Starts a node: checks the configuration against the data directory, binds the listening
    /// socket, starts the shards and recovers every group they host (each from its snapshot and
    /// log). Returns once every shard is serving.
    pub fn open(config: EngineConfig, factory: &MachineFactory<S>) -> Result<Self, Error> {
        config.validate()?;
        let shards = if config.shards == 0 {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        } else {
            config.shards
        };
        check_node_meta(&config, shards)?;
        let listener = std::net::TcpListener::bind(config.listen)
            .map_err(|error| Error::Config(format!("binding {}: {error}", config.listen)))?;
        listener
            .set_nonblocking(true)
            .map_err(|error| Error::Config(format!("listener: {error}")))?;
        let local_addr =
            listener.local_addr().map_err(|error| Error::Config(format!("listener: {error}")))?;

        let mut senders = Vec::with_capacity(shards);
        let mut receivers = Vec::with_capacity(shards);
        for _ in 0..shards {
            let (tx, rx) = mpsc::channel(config.inbox_capacity);
            senders.push(tx);
            receivers.push(rx);
        }
        let routes: Arc<[mpsc::Sender<Request<S>>]> = senders.clone().into();
        let liveness = Arc::new(Liveness::new(config.peers.keys().copied()));
        let transfers = Arc::new(Transfers::new(&config));
        let config = Arc::new(config);
        let mut handles = Vec::with_capacity(shards);
        let mut starts = Vec::with_capacity(shards);
        let mut listener = Some(listener);
        for (index, inbox) in receivers.into_iter().enumerate() {
            let stop = Arc::new(Notify::new());
            let (started_tx, started_rx) = std::sync::mpsc::channel();
            let context = ShardContext {
                index,
                config: Arc::clone(&config),
                routes: Arc::clone(&routes),
                factory: Arc::clone(factory),
                liveness: Arc::clone(&liveness),
                transfers: Arc::clone(&transfers),
            };
            let shard_listener = if index == 0 { listener.take() } else { None };
            let shard_stop = Arc::clone(&stop);
            let thread = std::thread::Builder::new()
                .name(format!("flotilla-shard-{index}"))
                .spawn(move || driver::run(context, inbox, shard_listener, shard_stop, started_tx))
                .map_err(|error| Error::Config(format!("spawning a shard thread: {error}")))?;
            handles.push(ShardHandle {
                inbox: senders[index].clone(),
                stop,
                thread: Mutex::new(Some(thread)),
            });
            starts.push(started_rx);
        }
        let mut backends = Vec::with_capacity(shards);
        let mut failure = None;
        for start in starts {
            match start.recv() {
                Ok(Ok(backend)) => backends.push(backend),
                Ok(Err(error)) => failure = Some(error),
                Err(_) => failure = Some(Error::Storage("a shard thread died starting".into())),
            }
        }
        if let Some(error) = failure {
            let _ = stop_shards(&handles);
            return Err(error);
        }
        tracing::info!(node = %config.node, shards, %local_addr, ?backends, "flotilla node serving");
        Ok(Self {
            inner: Arc::new(Inner {
                node: config.node,
                request_timeout: config.request_timeout,
                shards: handles,
                local_addr,
                backends,
                transfers,
                proposal_limit: config.proposal_limit(),
            }),
        })
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.inner.node
    }

    /// The address peers reach this node at (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Counters of the snapshots this node streamed to and received from its peers.
    pub fn snapshot_transfers(&self) -> SnapshotTransferStats {
        self.inner.transfers.stats()
    }

    /// The WAL backend each shard runs on (io_uring or portable).
    pub fn backends(&self) -> &[ActiveBackend] {
        &self.inner.backends
    }

    fn submit(&self, group: GroupId, request: Request<S>) -> Result<(), Error> {
        self.submit_to(shard_of(group, self.inner.shards.len()), request)
    }

    fn submit_to(&self, shard: usize, request: Request<S>) -> Result<(), Error> {
        self.inner.shards[shard].inbox.try_send(request).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => Error::Busy,
            mpsc::error::TrySendError::Closed(_) => Error::ShuttingDown,
        })
    }

    async fn call<T>(
        &self,
        group: GroupId,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Request<S>,
    ) -> Result<T, Error> {
        let (reply, answer) = oneshot::channel();
        self.submit(group, make(reply))?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Hosts a replica of `group` whose initial voters are `voters` (this node among them).
    /// Every voter's node is asked the same; the group elects a leader once a majority hosts it.
    /// Durable before it returns: the node hosts the group again after a restart.
    pub async fn create_group(&self, group: GroupId, voters: &[NodeId]) -> Result<(), Error> {
        let voters = voters.to_vec();
        self.call(group, |reply| Request::CreateGroup { group, voters, reply }).await
    }

    /// Hosts an empty replica of an existing `group`, to be added by
    /// [`Engine::add_learner`] (before or after this call): it neither votes nor campaigns and
    /// learns everything — membership included — from the leader's snapshot or log, as etcd's
    /// `--initial-cluster-state existing`. Durable before it returns. The node must be among
    /// the other nodes' [`EngineConfig::peers`].
    pub async fn join_group(&self, group: GroupId) -> Result<(), Error> {
        self.call(group, |reply| Request::JoinGroup { group, reply }).await
    }

    /// Adds `node` to `group` as a learner (it receives the log, does not vote). Asked of the
    /// leader; returns the membership once the change is committed and applied here (its joint
    /// configuration entered and left) and every member the leader hears from acknowledged
    /// that commit (a heartbeat round later). `node` hosts the group through
    /// [`Engine::join_group`].
    pub async fn add_learner(&self, group: GroupId, node: NodeId) -> Result<Membership, Error> {
        self.edit_membership(group, MembershipEdit::AddLearner(node)).await
    }

    /// Makes the learner `node` a voter of `group`; as [`Engine::add_learner`]. Refused with
    /// [`Error::LearnerNotReady`] while it still lags far behind the leader.
    pub async fn promote(&self, group: GroupId, node: NodeId) -> Result<Membership, Error> {
        self.edit_membership(group, MembershipEdit::Promote(node)).await
    }

    /// Removes the voter or learner `node` from `group` (never the last voter); as
    /// [`Engine::add_learner`]. The leader may remove itself: it keeps leading until the
    /// remaining members acknowledged the change's commit (at most an election timeout), then
    /// hands leadership to a voter holding its whole log and steps down. A removed replica
    /// stops (no ticks, no campaigns) but keeps its data until [`Engine::remove_group`]
    /// deletes it there — which may be done as soon as this call returns: a member that had
    /// not learned the commit would still be in the joint configuration and could need the
    /// removed replica's vote to elect anyone (found by the cluster simulator, seed 357), and
    /// the call waits for exactly that. (A member that was down meanwhile learns the commit
    /// from whoever leads next; the acknowledgement is in the members' memory, made durable
    /// with their next write.)
    pub async fn remove_member(&self, group: GroupId, node: NodeId) -> Result<Membership, Error> {
        self.edit_membership(group, MembershipEdit::Remove(node)).await
    }

    /// Moves `group` to exactly `change`'s voters and learners in one joint-consensus change
    /// (any number of nodes at once); as [`Engine::add_learner`].
    pub async fn change_membership(
        &self,
        group: GroupId,
        change: MembershipChange,
    ) -> Result<Membership, Error> {
        self.edit_membership(group, MembershipEdit::Replace(change)).await
    }

    async fn edit_membership(
        &self,
        group: GroupId,
        edit: MembershipEdit,
    ) -> Result<Membership, Error> {
        let deadline = Instant::now() + self.inner.request_timeout;
        self.call(group, |reply| Request::ChangeMembership { group, edit, deadline, reply }).await
    }

    /// The membership in effect on this node's replica of `group` (the last one it applied:
    /// on a follower it may trail the leader's).
    pub async fn membership(&self, group: GroupId) -> Result<Membership, Error> {
        self.call(group, |reply| Request::Membership { group, reply }).await
    }

    /// Stops hosting `group` and deletes its data here; its pending requests fail. After
    /// [`Engine::remove_member`], see there for when this is safe.
    pub async fn remove_group(&self, group: GroupId) -> Result<(), Error> {
        self.call(group, |reply| Request::RemoveGroup { group, reply }).await
    }

    /// Replicates `command` through `group`'s log and applies it; returns its log index and the
    /// state machine's answer. Only the leader's replica accepts proposals (others answer
    /// [`Error::NotLeader`] at once).
    pub async fn propose(
        &self,
        group: GroupId,
        command: Bytes,
    ) -> Result<Applied<S::Response>, Error> {
        self.propose_with_timeout(group, command, self.inner.request_timeout).await
    }

    /// [`Engine::propose`] with its own deadline.
    pub async fn propose_with_timeout(
        &self,
        group: GroupId,
        command: Bytes,
        timeout: Duration,
    ) -> Result<Applied<S::Response>, Error> {
        let max = self.inner.proposal_limit;
        if command.len() > max {
            return Err(Error::TooLarge { bytes: command.len(), max });
        }
        // A timeout too long to be an instant is refused, not a panic.
        let deadline = Instant::now().checked_add(timeout).ok_or_else(|| {
            Error::InvalidArgument(format!("timeout {timeout:?} is too long to be a deadline"))
        })?;
        self.call(group, |reply| Request::Propose { group, payload: command, deadline, reply })
            .await
    }

    /// Answers `query` from `group`'s state machine with the chosen freshness.
    pub async fn read(
        &self,
        group: GroupId,
        query: S::Query,
        consistency: Consistency,
    ) -> Result<S::QueryResult, Error> {
        let deadline = Instant::now() + self.inner.request_timeout;
        self.call(group, |reply| Request::Read { group, query, consistency, deadline, reply }).await
    }

    /// Hands `group`'s leadership from this node (which must lead it) to `to`, a voter: the
    /// leader stops taking proposals, brings `to` up to date and tells it to campaign. Returns
    /// once the transfer started; watch [`Engine::status`] for its outcome (it is abandoned
    /// after an election timeout). Used to spread leaders over nodes, or before maintenance.
    pub async fn transfer_leadership(&self, group: GroupId, to: NodeId) -> Result<(), Error> {
        self.call(group, |reply| Request::TransferLeadership { group, to, reply }).await
    }

    /// The state of this node's replica of `group`.
    pub async fn status(&self, group: GroupId) -> Result<GroupStatus, Error> {
        self.call(group, |reply| Request::Status { group, reply }).await
    }

    /// Runs `f` on `group`'s state machine on its shard thread (`None` if the group is not
    /// hosted here): for tools and tests that compare replicas. It holds up the shard while it
    /// runs, so keep it short.
    pub async fn inspect<T: Send + 'static>(
        &self,
        group: GroupId,
        f: impl FnOnce(&S) -> T + Send + 'static,
    ) -> Result<Option<T>, Error> {
        self.call(group, |reply| {
            Request::Inspect(Box::new(move |core: &ShardCore<S>| {
                let _ = reply.send(Ok(core.machine(group).map(f)));
            }))
        })
        .await
    }

    /// Every shard's counters, in shard order.
    pub async fn shard_stats(&self) -> Result<Vec<ShardStats>, Error> {
        let mut all = Vec::with_capacity(self.inner.shards.len());
        for shard in 0..self.inner.shards.len() {
            let (reply, answer) = oneshot::channel();
            self.submit_to(shard, Request::Stats(reply))?;
            all.push(answer.await.map_err(|_| Error::ShuttingDown)??);
        }
        Ok(all)
    }

    /// Stops the node: pending requests fail with [`Error::ShuttingDown`], every shard waits for
    /// its in-flight writes, syncs and closes its WAL. Returns the first shard's storage error,
    /// if any.
    pub fn shutdown(self) -> Result<(), Error> {
        stop_shards(&self.inner.shards)
    }
}

/// Records the node id, cluster and shard count of a data directory the first time and refuses
/// to open it with others later: groups are placed on shards by a hash modulo the shard count.
fn check_node_meta(config: &EngineConfig, shards: usize) -> Result<(), Error> {
    let io = |error: std::io::Error| {
        Error::Config(format!("data dir {}: {error}", config.data_dir.display()))
    };
    std::fs::create_dir_all(&config.data_dir).map_err(io)?;
    let path = config.data_dir.join("node.meta");
    let expected = format!(
        "flotilla node v1\nnode {}\ncluster {}\nshards {shards}\n",
        config.node.0, config.cluster.0
    );
    match std::fs::read_to_string(&path) {
        Ok(found) if found == expected => Ok(()),
        Ok(found) => Err(Error::Config(format!(
            "{} was written for another node, cluster or shard count:\n{found}wanted:\n{expected}",
            path.display()
        ))),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let tmp = config.data_dir.join("node.meta.tmp");
            std::fs::write(&tmp, &expected).map_err(io)?;
            std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            std::fs::File::open(&config.data_dir).and_then(|d| d.sync_all()).map_err(io)
        }
        Err(error) => Err(io(error)),
    }
}

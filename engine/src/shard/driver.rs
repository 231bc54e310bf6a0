//! The thin IO driver around [`ShardCore`]: one thread per shard, with its own current-thread
//! runtime. It owns the shard's [`ShardStore`] (WAL, snapshots, catalog), its outbound
//! connections (a [`super::peer::PeerLink`] per peer node) and the readers of the connections
//! handed to it, and runs the loop of DESIGN.md §2:
//!
//! ```text
//! wait for: a request or frame in the inbox | a tick | the oldest WAL append completing
//! drain the inbox (bounded) → ShardCore::collect (applies what is committed) → answer fetches
//! from the WAL → complete requests → one frame per peer of the messages that may go now →
//! ONE WAL append for every group's entries and hard state (polled at once, so appends queue in
//! order) → when an append is durable: send the messages that waited for it,
//! ShardCore::on_persisted
//! ```
//!
//! Requests are answered before anything is sent or written: what they report is committed or
//! read already, and a caller woken later waits for every send and, when the WAL was idle, for
//! its writer thread, which the scheduler may run on this very CPU. Sends go before the append
//! for the same reason: the peers' path (round trip + their fdatasync) is longer than this
//! node's own fdatasync.
//!
//! Appends are pipelined: the loop keeps stepping groups while earlier rounds are in the WAL's
//! writer; they complete in order, so "after the append" means "after every append before it".

use std::collections::btree_map::Entry as MapEntry;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_raftgroup::{
    Config, Entry, LogIndex, Membership, Message, MessageBody, NodeId, ReadMode, RecoveredState,
    SnapshotMeta, Term,
};
use flotilla_wal::{ActiveBackend, AppendFuture, GroupId, WalError, WriteBatch};
use tokio::sync::{Notify, mpsc, oneshot};

use super::core::{
    Completion, MembershipEdit, PendingSnapshot, Quiescence, RequestError, ShardCore, ShardOutput,
    Token,
};
use super::peer::PeerLink;
use super::pending::PendingTable;
use super::store::{ShardStore, StoreError, map_snapshot, write_snapshot_image};
use super::transfer::{self, Job, Receiver, Transfers};
use crate::engine::{
    Applied, Consistency, EngineConfig, Error, GroupStatus, MachineFactory, ShardStats, shard_of,
};
use crate::kv::StateMachine;
use crate::liveness::Liveness;
use crate::transport::batch;
use crate::transport::connection::{Connection, ConnectionConfig};
use crate::transport::faults::Verdict;
use crate::transport::frame::FrameKind;
use crate::transport::handshake::Identity;

/// Inbox requests handled per loop iteration before the loop collects, so ticks and WAL
/// completions are never starved by a flood.
const DRAIN_MAX: usize = 4096;
/// Snapshot files being written at once per shard: bounds the state kept alive by images
/// being written (a write after a snapshot copies the nodes it changes) and the disk bandwidth
/// taken from the WAL.
const SNAPSHOTS_IN_FLIGHT_MAX: usize = 4;

/// A closure run on a shard thread with its core (see [`crate::Engine::inspect`]).
pub(crate) type Inspector<S> = Box<dyn FnOnce(&ShardCore<S>) + Send>;

/// What reaches a shard's inbox.
pub(crate) enum Request<S: StateMachine> {
    Propose {
        group: GroupId,
        payload: Bytes,
        deadline: Instant,
        reply: oneshot::Sender<Result<Applied<S::Response>, Error>>,
    },
    Read {
        group: GroupId,
        query: S::Query,
        consistency: Consistency,
        deadline: Instant,
        reply: oneshot::Sender<Result<S::QueryResult, Error>>,
    },
    CreateGroup {
        group: GroupId,
        voters: Vec<NodeId>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// Hosts an empty replica that learns its membership from the leader (see
    /// [`crate::Engine::join_group`]).
    JoinGroup {
        group: GroupId,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    ChangeMembership {
        group: GroupId,
        edit: MembershipEdit,
        deadline: Instant,
        reply: oneshot::Sender<Result<Membership, Error>>,
    },
    Membership {
        group: GroupId,
        reply: oneshot::Sender<Result<Membership, Error>>,
    },
    RemoveGroup {
        group: GroupId,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Status {
        group: GroupId,
        reply: oneshot::Sender<Result<GroupStatus, Error>>,
    },
    TransferLeadership {
        group: GroupId,
        to: NodeId,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Inspect(Inspector<S>),
    Stats(oneshot::Sender<Result<ShardStats, Error>>),
    /// Raft messages from a peer, for groups of this shard.
    Messages(NodeId, Vec<(GroupId, Message)>),
    /// An accepted connection for this shard to read.
    Accepted(std::net::TcpStream),
    /// A leader's snapshot, and a fresh state machine restored from it off the shard thread
    /// (`None` if it did not restore). Boxed: a rare request, and every request is moved
    /// through the inbox at the size of the largest (264 bytes with it inline, for a proposal
    /// that needs 64).
    SnapshotRestored(Box<Restored<S>>),
    /// A snapshot file was written (or failed to be) off the shard thread.
    SnapshotSaved {
        group: GroupId,
        meta: SnapshotMeta,
        /// The image as a map of the file written (if the file still holds this snapshot).
        result: Result<Option<Bytes>, Error>,
    },
}

/// A snapshot restored off the shard thread ([`Request::SnapshotRestored`]).
pub(crate) struct Restored<S> {
    group: GroupId,
    message: Message,
    machine: Option<S>,
}

/// What a shard thread shares with the node.
pub(crate) struct ShardContext<S: StateMachine> {
    pub index: usize,
    pub config: Arc<EngineConfig>,
    pub routes: Arc<[mpsc::Sender<Request<S>>]>,
    pub factory: MachineFactory<S>,
    pub liveness: Arc<Liveness>,
    /// Node-wide snapshot-transfer rate limit and counters.
    pub transfers: Arc<Transfers>,
}

/// The directory of shard `index` under the node's data directory.
pub(crate) fn shard_dir(config: &EngineConfig, index: usize) -> std::path::PathBuf {
    config.data_dir.join(format!("shard-{index}"))
}

enum Pending<S: StateMachine> {
    Propose {
        group: GroupId,
        started: Instant,
        reply: oneshot::Sender<Result<Applied<S::Response>, Error>>,
    },
    Read {
        group: GroupId,
        reply: oneshot::Sender<Result<S::QueryResult, Error>>,
    },
    Membership {
        group: GroupId,
        reply: oneshot::Sender<Result<Membership, Error>>,
    },
}

impl<S: StateMachine> Pending<S> {
    fn group(&self) -> GroupId {
        match self {
            Pending::Propose { group, .. }
            | Pending::Read { group, .. }
            | Pending::Membership { group, .. } => *group,
        }
    }

    fn fail(self, error: Error) {
        // A caller that stopped waiting does not need the answer.
        match self {
            Pending::Propose { reply, .. } => drop(reply.send(Err(error))),
            Pending::Read { reply, .. } => drop(reply.send(Err(error))),
            Pending::Membership { reply, .. } => drop(reply.send(Err(error))),
        }
    }
}

/// One WAL append and what waits for it.
struct InFlight {
    append: AppendFuture,
    done: Option<Result<(), WalError>>,
    persisted: Vec<(GroupId, Term, LogIndex)>,
    after: BTreeMap<NodeId, Vec<(GroupId, Message)>>,
    reply: Option<oneshot::Sender<Result<(), Error>>>,
    started: Instant,
}

struct Metrics {
    proposals: metrics::Counter,
    proposals_failed: metrics::Counter,
    reads: metrics::Counter,
    applied: metrics::Counter,
    propose_seconds: metrics::Histogram,
    wal_appends: metrics::Counter,
    wal_batch_entries: metrics::Histogram,
    wal_append_seconds: metrics::Histogram,
    frames_sent: metrics::Counter,
    messages_sent: metrics::Counter,
    inbox_depth: metrics::Gauge,
    leaders: metrics::Gauge,
    groups: metrics::Gauge,
    /// Groups not quiet (being ticked).
    groups_awake: metrics::Gauge,
}

impl Metrics {
    /// The shard's metrics; its WAL records its own (`flotilla_wal_*`, backend included) with
    /// the same `shard` label (see `Shard::open`).
    fn new(shard: usize) -> Self {
        let label = shard.to_string();
        Self {
            proposals: metrics::counter!("flotilla_proposals_total", "shard" => label.clone()),
            proposals_failed: metrics::counter!("flotilla_proposals_failed_total", "shard" => label.clone()),
            reads: metrics::counter!("flotilla_reads_total", "shard" => label.clone()),
            applied: metrics::counter!("flotilla_proposals_applied_total", "shard" => label.clone()),
            propose_seconds: metrics::histogram!("flotilla_propose_seconds", "shard" => label.clone()),
            wal_appends: metrics::counter!("flotilla_wal_appends_total", "shard" => label.clone()),
            wal_batch_entries: metrics::histogram!("flotilla_wal_batch_entries", "shard" => label.clone()),
            wal_append_seconds: metrics::histogram!("flotilla_wal_append_seconds", "shard" => label.clone()),
            frames_sent: metrics::counter!("flotilla_frames_sent_total", "shard" => label.clone()),
            messages_sent: metrics::counter!("flotilla_messages_sent_total", "shard" => label.clone()),
            inbox_depth: metrics::gauge!("flotilla_inbox_depth", "shard" => label.clone()),
            leaders: metrics::gauge!("flotilla_leaders", "shard" => label.clone()),
            groups: metrics::gauge!("flotilla_groups", "shard" => label.clone()),
            groups_awake: metrics::gauge!("flotilla_groups_awake", "shard" => label),
        }
    }
}

/// The shard thread's body: starts the runtime, recovers, reports through `started`, serves until
/// `stop`, then drains and closes the WAL.
pub(crate) fn run<S>(
    context: ShardContext<S>,
    inbox: mpsc::Receiver<Request<S>>,
    listener: Option<std::net::TcpListener>,
    stop: Arc<Notify>,
    started: std::sync::mpsc::Sender<Result<ActiveBackend, Error>>,
) -> Result<(), Error>
where
    S: StateMachine + Send + 'static,
    S::Query: Send + 'static,
    S::Response: Send + 'static,
    S::QueryResult: Send + 'static,
{
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            let error = Error::Config(format!("starting a shard runtime: {error}"));
            let _ = started.send(Err(error.clone()));
            return Err(error);
        }
    };
    // Opened outside the runtime: the WAL's io_uring probe runs (and drops) a runtime of its own.
    let shard = match Shard::open(context, inbox) {
        Ok(shard) => shard,
        Err(error) => {
            let _ = started.send(Err(error.clone()));
            return Err(error);
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        if let Some(listener) = listener {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => {
                    tokio::task::spawn_local(accept_loop(
                        listener,
                        Arc::clone(&shard.context.routes),
                    ));
                }
                Err(error) => {
                    let error = Error::Config(format!("listener: {error}"));
                    let _ = started.send(Err(error.clone()));
                    return Err(error);
                }
            }
        }
        let _ = started.send(Ok(shard.store.wal().backend()));
        shard.serve(stop).await
    })
}

struct Shard<S: StateMachine> {
    context: ShardContext<S>,
    core: ShardCore<S>,
    store: ShardStore,
    out: ShardOutput<S>,
    inbox: mpsc::Receiver<Request<S>>,
    /// Requests accepted and not answered, with their deadlines; issues their tokens.
    pending: PendingTable<Pending<S>>,
    inflight: VecDeque<InFlight>,
    peers: BTreeMap<NodeId, PeerLink>,
    /// Per peer, the task streaming snapshots to it (see [`super::transfer`]).
    snapshot_senders: BTreeMap<NodeId, mpsc::Sender<Job>>,
    fetched: Vec<Entry>,
    snapshots: Vec<(GroupId, PendingSnapshot<S>)>,
    /// Replies to `create_group` calls waiting for the catalog write.
    created: Vec<oneshot::Sender<Result<(), Error>>>,
    /// Groups whose snapshot file is being written: not removed or re-created meanwhile.
    snapshotting: HashSet<GroupId>,
    failed: Option<Error>,
    ticks: u64,
    /// When `on_tick` last ran (a gap means this thread stalled).
    last_tick: Instant,
    /// The replicas' clocks against real time: ticks delivered since `clock_origin`, one per
    /// tick period (see `check_clock`).
    clock_origin: Instant,
    clock_ticks: u64,
    frames_sent: u64,
    messages_sent: u64,
    metrics: Metrics,
}

impl<S> Shard<S>
where
    S: StateMachine + Send + 'static,
    S::Query: Send + 'static,
    S::Response: Send + 'static,
    S::QueryResult: Send + 'static,
{
    fn open(context: ShardContext<S>, inbox: mpsc::Receiver<Request<S>>) -> Result<Self, Error> {
        let config = &context.config;
        let dir = shard_dir(config, context.index);
        let mut wal = config.wal.clone();
        wal.metrics_labels.push(("shard".into(), context.index.to_string()));
        let (store, recovery) = ShardStore::open(&dir, wal).map_err(storage_error)?;
        tracing::info!(shard = context.index, report = ?recovery.report, "shard log recovered");
        let mut core = ShardCore::new(config.node);
        core.set_read_context_base(random_u64());
        core.set_compaction_defer_entries(config.snapshot_entries.saturating_mul(4));
        if config.quiesce {
            core.enable_quiescence(Quiescence {
                // Two election timeouts: a node whose shard thread stalls for one (a busy
                // machine) is not declared down, which would wake groups and add to the load.
                dead_after_ticks: config.election_ticks.saturating_mul(2),
                wakes_per_tick: config.wakes_per_tick,
            });
        }
        let groups: Vec<(GroupId, Vec<NodeId>)> =
            store.groups().map(|(group, voters)| (group, voters.to_vec())).collect();
        for (group, voters) in groups {
            let recovered = store.recover_group(group).map_err(storage_error)?;
            let machine = restore_machine(&context.factory, group, &recovered)?;
            let replica_config = replica_config(config, group, voters);
            core.create_group(group, replica_config, recovered, machine).map_err(|error| {
                Error::Storage(format!("recovering group {group}: {error}").into())
            })?;
            // Woken a bounded number per tick, so a restart does not wake every group at once.
            core.defer_wake(group);
        }
        let metrics = Metrics::new(context.index);
        metrics.groups.set(core.groups().count() as f64);
        let (request_timeout, tick) = (context.config.request_timeout, context.config.tick);
        Ok(Self {
            context,
            core,
            store,
            out: ShardOutput::default(),
            inbox,
            pending: PendingTable::new(request_timeout, tick, 1),
            inflight: VecDeque::new(),
            peers: BTreeMap::new(),
            snapshot_senders: BTreeMap::new(),
            fetched: Vec::new(),
            snapshots: Vec::new(),
            created: Vec::new(),
            snapshotting: HashSet::new(),
            failed: None,
            ticks: 0,
            last_tick: Instant::now(),
            clock_origin: Instant::now(),
            clock_ticks: 0,
            frames_sent: 0,
            messages_sent: 0,
            metrics,
        })
    }

    async fn serve(mut self, stop: Arc<Notify>) -> Result<(), Error> {
        let mut ticker = tokio::time::interval(self.context.config.tick);
        // Ticks missed while this thread stood still or ran busy are not replayed: the replicas'
        // clocks lose that time, and their leases are dropped instead (`check_clock`, before
        // any input and on every tick). A burst made leaders step down and followers time out
        // before the messages that arrived meanwhile were read.
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        self.clock_origin = Instant::now();
        self.clock_ticks = 0;
        let stopped = stop.notified();
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                biased;
                () = &mut stopped => break,
                () = poll_fn(|cx| poll_inflight(&mut self.inflight, cx)) => {}
                request = self.inbox.recv() => match request {
                    Some(request) => self.handle(request),
                    None => break,
                },
                _ = ticker.tick() => self.on_tick(),
            }
            self.drain_inbox();
            // Before the iteration's output is built, let this thread's connection readers whose
            // frames have arrived run (a yield lets the runtime poll for IO first), so that one
            // iteration answers all of them.
            tokio::task::yield_now().await;
            self.drain_inbox();
            self.retire_done().await;
            self.pump().await;
            self.retire_done().await;
        }
        self.close().await
    }

    /// Handles what is waiting in the inbox, at most [`DRAIN_MAX`] requests.
    fn drain_inbox(&mut self) {
        for _ in 0..DRAIN_MAX {
            match self.inbox.try_recv() {
                Ok(request) => self.handle(request),
                Err(_) => break,
            }
        }
    }

    /// Fails what is pending, waits for the appends in flight and closes the WAL.
    async fn close(mut self) -> Result<(), Error> {
        let tokens: HashSet<Token> = self.pending.tokens().collect();
        self.core.fail_requests(|token| tokens.contains(&token), &mut self.out);
        self.out.completions.clear();
        for (_, pending) in self.pending.drain() {
            pending.fail(Error::ShuttingDown);
        }
        if self.failed.is_none() {
            let result = self.store.sync_catalog().map_err(storage_error);
            for reply in self.created.drain(..) {
                let _ = reply.send(result.clone());
            }
        }
        while let Some(mut front) = self.inflight.pop_front() {
            let result = match front.done.take() {
                Some(result) => result,
                None => (&mut front.append).await,
            };
            if let Some(reply) = front.reply.take() {
                let _ = reply.send(result.map_err(|error| storage_error(error.into())));
            }
        }
        self.inbox.close();
        while let Ok(request) = self.inbox.try_recv() {
            refuse(request, &Error::ShuttingDown);
        }
        if let Some(error) = self.failed {
            return Err(error);
        }
        self.store.close().map_err(storage_error)
    }

    /// Drops the replicas' leases (`ShardCore::clock_stalled`) if their clocks — the ticks
    /// delivered, one per period since `clock_origin` — are more than two periods behind real
    /// time, and counts from now. Ticks fall behind when this thread stands still, or runs busy
    /// long enough that the ticker skips some, and are never replayed; a lease judged on a clock
    /// that lags would outlive real time. Called before every input is handled (a lease read,
    /// or a follower's read index, is judged as it is stepped) and on every tick.
    fn check_clock(&mut self, now: Instant) {
        let period = self.context.config.tick.as_nanos();
        let counted = period.saturating_mul(u128::from(self.clock_ticks));
        let elapsed = now.saturating_duration_since(self.clock_origin).as_nanos();
        if elapsed.saturating_sub(counted) > 2 * period {
            self.core.clock_stalled();
            self.clock_origin = now;
            self.clock_ticks = 0;
        }
    }

    fn handle(&mut self, request: Request<S>) {
        let now = Instant::now();
        self.check_clock(now);
        if let Some(error) = &self.failed {
            refuse(request, &error.clone());
            return;
        }
        match request {
            Request::Propose { group, payload, deadline, reply } => {
                self.metrics.proposals.increment(1);
                let token = self.pending.next_token();
                match self.core.propose(group, payload, token) {
                    Ok(()) => {
                        // Read before `core.propose`, so the latency metric includes it.
                        let started = now;
                        let pending = Pending::Propose { group, started, reply };
                        let issued = self.pending.insert(pending, deadline, now);
                        assert_eq!(issued, token, "the token the core was given");
                    }
                    Err(error) => {
                        self.metrics.proposals_failed.increment(1);
                        let _ = reply.send(Err(request_error(error)));
                    }
                }
            }
            Request::Read { group, query, consistency, deadline, reply } => {
                self.read(group, query, consistency, (deadline, now), reply);
            }
            Request::CreateGroup { group, voters, reply } => match self.create_group(group, voters)
            {
                // Answered once the catalog is durable (`pump`).
                Ok(()) => self.created.push(reply),
                Err(error) => drop(reply.send(Err(error))),
            },
            Request::JoinGroup { group, reply } => match self.host_group(group, Vec::new()) {
                Ok(()) => self.created.push(reply),
                Err(error) => drop(reply.send(Err(error))),
            },
            Request::ChangeMembership { group, edit, deadline, reply } => {
                self.change_membership(group, &edit, (deadline, now), reply);
            }
            Request::Membership { group, reply } => {
                let membership = self.core.replica(group).map(|r| r.membership().clone());
                let _ = reply.send(membership.ok_or(Error::GroupNotFound(group)));
            }
            Request::RemoveGroup { group, reply } => self.remove_group(group, reply),
            Request::TransferLeadership { group, to, reply } => {
                let result = self.core.transfer_leadership(group, to).map_err(request_error);
                let _ = reply.send(result);
            }
            Request::Status { group, reply } => {
                let status = self.core.replica(group).map(|replica| {
                    let status = replica.status();
                    GroupStatus {
                        role: status.role,
                        leader: status.leader,
                        term: status.term,
                        commit: status.commit,
                        applied: status.applied,
                        last_index: status.last_index,
                        snapshot_index: status.snapshot_index,
                    }
                });
                let _ = reply.send(status.ok_or(Error::GroupNotFound(group)));
            }
            Request::Inspect(f) => f(&self.core),
            Request::Stats(reply) => {
                let leaders =
                    self.core.groups().filter(|group| self.core.is_leader(*group)).count();
                let _ = reply.send(Ok(ShardStats {
                    backend: self.store.wal().backend(),
                    wal: self.store.wal().stats(),
                    groups: self.core.groups().count(),
                    groups_awake: self.core.awake_count(),
                    leaders,
                    frames_sent: self.frames_sent,
                    messages_sent: self.messages_sent,
                }));
            }
            Request::Messages(from, messages) => self.on_messages(from, messages),
            Request::SnapshotRestored(restored) => {
                let Restored { group, message, machine } = *restored;
                match machine {
                    Some(machine) => self.core.step_restored(group, message, machine),
                    // It does not restore: stepped as it is, Raft installs it and the shard's
                    // own restore reports why (the group cannot apply past it).
                    None => self.core.step(group, message),
                }
            }
            Request::SnapshotSaved { group, meta, result } => {
                self.on_snapshot_saved(group, &meta, result);
            }
            Request::Accepted(stream) => match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => {
                    tokio::task::spawn_local(read_connection(
                        stream,
                        Arc::clone(&self.context.config),
                        Arc::clone(&self.context.routes),
                        Arc::clone(&self.context.liveness),
                        Arc::clone(&self.context.transfers),
                    ));
                }
                Err(error) => tracing::warn!(%error, "could not adopt an accepted connection"),
            },
        }
    }

    fn read(
        &mut self,
        group: GroupId,
        query: S::Query,
        consistency: Consistency,
        (deadline, now): (Instant, Instant),
        reply: oneshot::Sender<Result<S::QueryResult, Error>>,
    ) {
        self.metrics.reads.increment(1);
        match consistency {
            Consistency::Stale { max_lag } => {
                let tick = self.context.config.tick.as_nanos().max(1);
                let lag_ticks = u32::try_from(max_lag.as_nanos() / tick).unwrap_or(u32::MAX);
                let answer = self.core.stale_read(group, &query, lag_ticks);
                let _ = reply.send(answer.map(|(_, result)| result).map_err(request_error));
            }
            Consistency::Linearizable | Consistency::Lease => {
                // `handle` checked the clock before this (`check_clock`).
                let mode = if consistency == Consistency::Lease {
                    ReadMode::Lease
                } else {
                    ReadMode::Quorum
                };
                let token = self.pending.next_token();
                match self.core.read_with(group, query, mode, token) {
                    Ok(()) => {
                        let issued =
                            self.pending.insert(Pending::Read { group, reply }, deadline, now);
                        assert_eq!(issued, token, "the token the core was given");
                    }
                    Err(error) => drop(reply.send(Err(request_error(error)))),
                }
            }
        }
    }

    fn create_group(&mut self, group: GroupId, voters: Vec<NodeId>) -> Result<(), Error> {
        let config = Arc::clone(&self.context.config);
        let mut sorted = voters.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != voters.len() || voters.is_empty() || voters.len() > 64 {
            return Err(Error::InvalidArgument(format!("voters {voters:?}: 1–64 distinct nodes")));
        }
        if !voters.contains(&config.node) {
            return Err(Error::InvalidArgument(format!(
                "voters {voters:?} do not include this node"
            )));
        }
        if let Some(unknown) =
            voters.iter().find(|v| **v != config.node && !config.peers.contains_key(v))
        {
            return Err(Error::InvalidArgument(format!("voter {unknown} is not a known peer")));
        }
        self.host_group(group, voters)
    }

    /// Starts a replica of `group` here and stages its catalog record. `voters` is the group's
    /// initial membership — the one at log index 0, before any membership entry — or empty for
    /// a node joining an existing group: it learns the membership from the leader's snapshot or
    /// log, like every replica after a restart (the catalog never overrides the log).
    fn host_group(&mut self, group: GroupId, voters: Vec<NodeId>) -> Result<(), Error> {
        let config = Arc::clone(&self.context.config);
        if self.core.replica(group).is_some() || self.store.contains(group) {
            return Err(Error::GroupExists(group));
        }
        if self.snapshotting.contains(&group) {
            return Err(Error::Busy);
        }
        if self.store.wal().group_state(group).is_some() {
            // Leftovers of a removal that did not finish: start clean.
            let removal = self.store.remove_group(group).map_err(storage_error)?;
            self.start_append(removal, None);
        }
        self.store.stage_group(group, &voters);
        let machine = (self.context.factory)(group);
        let replica_config = replica_config(&config, group, voters);
        self.core
            .create_group(group, replica_config, RecoveredState::default(), machine)
            .map_err(request_error)?;
        self.metrics.groups.set(self.core.groups().count() as f64);
        Ok(())
    }

    fn change_membership(
        &mut self,
        group: GroupId,
        edit: &MembershipEdit,
        (deadline, now): (Instant, Instant),
        reply: oneshot::Sender<Result<Membership, Error>>,
    ) {
        let config = &self.context.config;
        // The leader must be able to reach every node it adds; an unknown id is a typo.
        if let Some(unknown) = edit
            .nodes()
            .into_iter()
            .find(|node| *node != config.node && !config.peers.contains_key(node))
        {
            let error = Error::InvalidArgument(format!("{unknown} is not a known peer"));
            let _ = reply.send(Err(error));
            return;
        }
        let token = self.pending.next_token();
        match self.core.change_membership(group, edit, token) {
            Ok(()) => {
                let issued =
                    self.pending.insert(Pending::Membership { group, reply }, deadline, now);
                assert_eq!(issued, token, "the token the core was given");
            }
            Err(error) => drop(reply.send(Err(request_error(error)))),
        }
    }

    fn remove_group(&mut self, group: GroupId, reply: oneshot::Sender<Result<(), Error>>) {
        // Its snapshot file is being written: removing now could leave that file behind.
        if self.snapshotting.contains(&group) {
            let _ = reply.send(Err(Error::Busy));
            return;
        }
        if !self.core.remove_group(group, &mut self.out) {
            let _ = reply.send(Err(Error::GroupNotFound(group)));
            return;
        }
        self.metrics.groups.set(self.core.groups().count() as f64);
        match self.store.remove_group(group) {
            Ok(append) => self.start_append(append, Some(reply)),
            Err(error) => {
                let error = storage_error(error);
                let _ = reply.send(Err(error.clone()));
                self.fail(error);
            }
        }
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        let now = Instant::now();
        let config = Arc::clone(&self.context.config);
        let tick = config.tick.as_nanos().max(1);
        // After this thread stalled, its own connection readers (tasks on this thread) have not
        // stamped what arrived meanwhile: judge the peers from the next tick on.
        let stalled = now.saturating_duration_since(self.last_tick) > config.tick * 2;
        self.last_tick = now;
        self.check_clock(now);
        self.clock_ticks += 1;
        if !stalled {
            for (peer, age) in self.context.liveness.ages(now) {
                if peer != config.node {
                    let age_ticks = u32::try_from(age.as_nanos() / tick).unwrap_or(u32::MAX);
                    self.core.node_contact(peer, age_ticks);
                }
            }
        }
        self.core.tick();
        // Node-level heartbeat: one empty frame per peer per heartbeat interval from shard 0
        // stands in for the heartbeats of every quiet group.
        if self.context.index == 0 && self.ticks.is_multiple_of(u64::from(config.heartbeat_ticks)) {
            for peer in config.peers.keys().copied().filter(|peer| *peer != config.node) {
                if let Some(link) = self.peer(peer) {
                    // Dropped if the peer's queue is full: traffic is flowing anyway, as good.
                    link.send(std::iter::empty::<(GroupId, Message)>());
                }
            }
        }
        let expired: HashSet<Token> = self.pending.expired(now).into_iter().collect();
        if !expired.is_empty() {
            self.core.fail_requests(|token| expired.contains(&token), &mut self.out);
            // The core's own reasons are not what a caller at its deadline needs to hear.
            self.out.completions.clear();
            for token in expired {
                let pending = self.pending.remove(token).expect("listed");
                let leader = self
                    .core
                    .replica(pending.group())
                    .and_then(flotilla_raftgroup::Replica::leader);
                let error = match (&pending, leader) {
                    // A write accepted into the log may still be applied: only `Timeout` says
                    // so; `NotLeader` or `NoQuorum` would tell the caller it was not.
                    (Pending::Propose { .. } | Pending::Membership { .. }, _) => Error::Timeout,
                    (Pending::Read { .. }, None) => Error::NoQuorum,
                    (Pending::Read { .. }, Some(leader)) if leader == self.context.config.node => {
                        Error::Timeout
                    }
                    (Pending::Read { .. }, Some(leader)) => {
                        Error::NotLeader { leader_hint: Some(leader) }
                    }
                };
                if matches!(pending, Pending::Propose { .. }) {
                    self.metrics.proposals_failed.increment(1);
                }
                pending.fail(error);
            }
        }
        // Every 8 ticks: snapshot groups that applied enough or pin the log; every 64, gauges.
        if self.ticks.is_multiple_of(8) {
            self.compact();
        }
        if self.ticks.is_multiple_of(64) {
            self.metrics.groups_awake.set(self.core.awake_count() as f64);
            self.metrics
                .inbox_depth
                .set((self.inbox.max_capacity() - self.inbox.capacity()) as f64);
            let leaders = self.core.groups().filter(|group| self.core.is_leader(*group)).count();
            self.metrics.leaders.set(leaders as f64);
        }
    }

    /// Snapshots groups that applied enough since their last snapshot. The state machine's
    /// image is taken here (a cheap view, see [`StateMachine::snapshot`]) and written to the
    /// group's file on a blocking thread; only once the file is durable are the replica's log
    /// and the WAL compacted (`SnapshotSaved`), with the file's map as the snapshot's data.
    fn compact(&mut self) {
        let room = SNAPSHOTS_IN_FLIGHT_MAX.saturating_sub(self.snapshotting.len());
        if room == 0 {
            return;
        }
        let mut snapshots = std::mem::take(&mut self.snapshots);
        // The log has grown past its target: the groups holding its oldest segment go first,
        // so that segment can be recycled (a group compacting only every `snapshot_entries`
        // would otherwise keep every segment since alive).
        let wal = self.store.wal();
        if wal.segments_live() > self.context.config.wal_segments_target {
            let mut writing = false;
            for group in wal.pinning_groups() {
                if snapshots.len() >= room {
                    break;
                }
                if self.snapshotting.contains(&group) {
                    writing = true;
                } else if let Some(snapshot) = self.core.compact_now(group) {
                    snapshots.push((group, snapshot));
                }
            }
            if snapshots.is_empty() && !writing {
                // Pinned by groups with nothing new to snapshot (an old hard state or a few
                // entries), none of them being written: the WAL copies those forward.
                let rewrite = self.store.wal().rewrite_pinning();
                self.start_append(rewrite, None);
            }
        }
        let busy = &self.snapshotting;
        let min_entries = self.context.config.snapshot_entries;
        let room = room - snapshots.len();
        self.core.compact_due(min_entries, room, |group| busy.contains(&group), &mut snapshots);
        for (group, PendingSnapshot { meta, image }) in snapshots.drain(..) {
            self.snapshotting.insert(group);
            let path = self.store.snapshot_path(group);
            let inbox = self.context.routes[self.context.index].clone();
            tokio::task::spawn_local(async move {
                let index = meta.index;
                let written = meta.clone();
                let write = move || {
                    write_snapshot_image(&path, group, &written, &image)?;
                    // The replica sends followers the file's map, not a heap copy (unless a
                    // newer snapshot, a leader's, replaced the file meanwhile).
                    let mapped = map_snapshot(&path, group)?;
                    Ok::<_, StoreError>((mapped.meta.index == index).then_some(mapped.data))
                };
                let result = match tokio::task::spawn_blocking(write).await {
                    Ok(result) => result.map_err(storage_error),
                    Err(error) => Err(Error::Storage(format!("snapshot writer: {error}").into())),
                };
                // The shard may be stopping: then recovery redoes the compaction from the file.
                let _ = inbox.send(Request::SnapshotSaved { group, meta, result }).await;
            });
        }
        self.snapshots = snapshots;
    }

    fn on_messages(&mut self, from: NodeId, messages: Vec<(GroupId, Message)>) {
        if let Some(faults) = &self.context.config.faults
            && faults.verdict(from, self.context.config.node) == Verdict::Drop
        {
            return;
        }
        for (group, message) in messages {
            match &message.body {
                MessageBody::Snapshot { snapshot }
                    if self.core.would_restore(group, snapshot.meta.index) =>
                {
                    self.restore_off_thread(group, message);
                }
                _ => self.core.step(group, message),
            }
        }
    }

    /// Restores a leader's snapshot into a fresh state machine on a blocking thread, then
    /// steps the message with it (`SnapshotRestored`): parsing a large image on the shard
    /// thread would hold up every other group's heartbeats and votes for as long. Messages of
    /// the group that arrive meanwhile are stepped as usual (appends past the snapshot are
    /// refused and re-sent by the leader once the snapshot is in).
    fn restore_off_thread(&self, group: GroupId, message: Message) {
        let MessageBody::Snapshot { snapshot } = &message.body else { return };
        let data = snapshot.data.clone();
        let factory = Arc::clone(&self.context.factory);
        let inbox = self.context.routes[self.context.index].clone();
        tokio::task::spawn_local(async move {
            let restore = move || {
                let mut machine = factory(group);
                machine.restore(&data).map(|()| machine)
            };
            let machine = match tokio::task::spawn_blocking(restore).await {
                Ok(Ok(machine)) => Some(machine),
                Ok(Err(error)) => {
                    tracing::warn!(%group, %error, "a leader's snapshot does not restore");
                    None
                }
                Err(error) => {
                    tracing::warn!(%group, %error, "restoring a leader's snapshot failed");
                    None
                }
            };
            // The shard may be stopping: the leader sends the snapshot again.
            let restored = Box::new(Restored { group, message, machine });
            let _ = inbox.send(Request::SnapshotRestored(restored)).await;
        });
    }

    fn on_snapshot_saved(
        &mut self,
        group: GroupId,
        meta: &SnapshotMeta,
        result: Result<Option<Bytes>, Error>,
    ) {
        self.snapshotting.remove(&group);
        let mapped = match result {
            Ok(mapped) => mapped,
            Err(error) => {
                self.fail(error);
                return;
            }
        };
        // No map: a newer snapshot was installed meanwhile, and compacted the log itself.
        if let Some(data) = mapped
            && self.core.snapshot_written(group, meta, data)
        {
            let append = self.store.compact_log(group, meta);
            self.start_append(append, None);
        }
    }

    /// Appends what this loop iteration persists (cut into WAL records) behind the appends in
    /// flight; what waits for it (persisted acknowledgements, messages) waits for the last.
    fn append_iteration(&mut self, nothing_else: bool) -> Result<(), Error> {
        // Nothing but new commit indexes: written, not synced (see `Ready::must_sync`).
        let sync =
            self.context.config.sync && self.out.persist.iter().any(|(_, item)| item.must_sync);
        // Cut to the WAL's record size: a loop iteration may gather more than one record holds
        // (many groups, large entries). Appends persist in order, so what waits for this
        // iteration's writes waits for the last of them.
        let mut batches = Vec::new();
        let max_bytes = self.context.config.wal.batch_bytes_max;
        self.store
            .stage_split(&mut self.out.persist, max_bytes, &mut batches)
            .map_err(storage_error)?;
        if batches.is_empty() {
            // Nothing to write after all (a stale snapshot's compaction): an empty append still
            // orders what waits for this iteration behind earlier ones.
            batches.push(WriteBatch::new());
        }
        // The iteration's only output waits for this write (`nothing_else`: it had nothing to
        // send now and nobody to answer), and the WAL is idle: this thread writes it itself
        // (see `EngineConfig::inline_idle_writes`).
        let own_round = self.context.config.inline_idle_writes
            && nothing_else
            && batches.len() == 1
            && self.inflight.is_empty();
        for batch in batches {
            let entries: usize = batch
                .ops()
                .iter()
                .map(|op| match op {
                    flotilla_wal::Op::Entries { entries, .. } => entries.len(),
                    _ => 0,
                })
                .sum();
            self.metrics.wal_batch_entries.record(entries as f64);
            let append = self.store.wal().append_with(batch, sync);
            if own_round {
                flotilla_wal::waiting_caller(|| self.start_append(append, None));
            } else {
                self.start_append(append, None);
            }
        }
        let last = self.inflight.back_mut().expect("just pushed");
        last.persisted = std::mem::take(&mut self.out.persisted);
        last.after = std::mem::take(&mut self.out.send_after_persist);
        Ok(())
    }

    /// Queues an append behind the ones in flight. It is polled at once if every earlier one
    /// has joined the WAL's queue (appends must join in the order they were made); otherwise
    /// [`poll_inflight`] joins it in turn.
    fn start_append(
        &mut self,
        mut append: AppendFuture,
        reply: Option<oneshot::Sender<Result<(), Error>>>,
    ) {
        let mut done = None;
        if self.inflight.iter().all(|earlier| earlier.done.is_some() || earlier.append.joined()) {
            // The loop polls it again with its own waker before sleeping.
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            if let Poll::Ready(result) = Pin::new(&mut append).poll(&mut cx) {
                done = Some(result);
            }
        }
        self.metrics.wal_appends.increment(1);
        self.inflight.push_back(InFlight {
            append,
            done,
            persisted: Vec::new(),
            after: BTreeMap::new(),
            reply,
            started: Instant::now(),
        });
    }

    /// Pops every finished append at the front: sends what waited for it, tells the replicas.
    async fn retire_done(&mut self) {
        // Registers this task's waker with every append in flight (and joins waiting ones).
        poll_fn(|cx| {
            let _ = poll_inflight(&mut self.inflight, cx);
            Poll::Ready(())
        })
        .await;
        while self.inflight.front().is_some_and(|front| front.done.is_some()) {
            let mut front = self.inflight.pop_front().expect("checked");
            self.metrics.wal_append_seconds.record(front.started.elapsed().as_secs_f64());
            let result = front.done.take().expect("checked");
            if let Some(reply) = front.reply.take() {
                let _ = reply.send(result.clone().map_err(|error| storage_error(error.into())));
            }
            if let Err(error) = result {
                self.fail(storage_error(error.into()));
                return;
            }
            for (group, term, index) in front.persisted.drain(..) {
                self.core.on_persisted(group, term, index);
            }
            let mut after = std::mem::take(&mut front.after);
            self.send_messages(&mut after);
        }
    }

    /// Collects every dirty group until nothing is left to do this iteration.
    async fn pump(&mut self) {
        // Groups created since the last iteration become durable before any of their output
        // leaves: one catalog write for all of them.
        if self.failed.is_none() && (self.store.catalog_dirty() || !self.created.is_empty()) {
            let result = self.store.sync_catalog().map_err(storage_error);
            for reply in self.created.drain(..) {
                let _ = reply.send(result.clone());
            }
            if let Err(error) = result {
                self.fail(error);
            }
        }
        while self.failed.is_none() {
            self.core.collect(&mut self.out);
            if self.out.just_went_idle() {
                trim_heap();
            }
            let mut fetches = std::mem::take(&mut self.out.fetches);
            for (group, fetch) in &fetches {
                self.fetched.clear();
                if let Err(error) = self.store.fetch(*group, fetch, &mut self.fetched) {
                    self.fail(storage_error(error));
                    return;
                }
                self.core.on_fetched(*group, *fetch, std::mem::take(&mut self.fetched));
            }
            let again = !fetches.is_empty();
            fetches.clear();
            self.out.fetches = fetches;

            // Decided before anything below leaves: a shard may write its own round only when
            // the iteration had nothing to send and nobody to answer (see `append_iteration`).
            let nothing_else = self.out.send_now.values().all(Vec::is_empty)
                && self.out.completions.is_empty()
                && self.out.memberships.is_empty();
            // Answers first: what is applied is committed (durable on a quorum) and does not wait
            // for this iteration's write or sends, and a caller woken after them waits for
            // every send and for the WAL's writer thread taking the CPU (T7's path). Under load
            // this puts thousands of answers before the appends leave; throughput did not
            // change (bench/RESULTS.md, session 10).
            let completions = std::mem::take(&mut self.out.completions);
            if !completions.is_empty() {
                let answered = Instant::now();
                for completion in completions {
                    self.complete(completion, answered);
                }
            }
            for (token, membership) in self.out.memberships.drain(..) {
                if let Some(Pending::Membership { reply, .. }) = self.pending.remove(token) {
                    let _ = reply.send(Ok(membership));
                }
            }
            if self.out.persist.is_empty() {
                // Nothing new to write, but these may still wait for writes in flight.
                if let Some(last) = self.inflight.back_mut() {
                    last.persisted.append(&mut self.out.persisted);
                    for (peer, messages) in &mut self.out.send_after_persist {
                        last.after.entry(*peer).or_default().append(messages);
                    }
                } else {
                    for (group, term, index) in std::mem::take(&mut self.out.persisted) {
                        self.core.on_persisted(group, term, index);
                    }
                    let mut after = std::mem::take(&mut self.out.send_after_persist);
                    self.send_messages(&mut after);
                    self.out.send_after_persist = after;
                }
            }
            // Sends before the write: handing a round to an idle WAL wakes its writer thread,
            // which the scheduler may run on this very CPU at once, and the peers' path (round
            // trip + their fdatasync) is longer than this node's own fdatasync.
            let mut send_now = std::mem::take(&mut self.out.send_now);
            self.send_messages(&mut send_now);
            self.out.send_now = send_now;
            if !self.out.persist.is_empty()
                && let Err(error) = self.append_iteration(nothing_else)
            {
                self.fail(error);
                return;
            }
            if !self.out.retired.is_empty() {
                let retired = std::mem::take(&mut self.out.retired);
                tokio::task::spawn_blocking(move || drop(retired));
            }
            self.out.clear();
            if !again {
                break;
            }
        }
        // Let the WAL's writer see the appends before the loop sleeps.
        tokio::task::yield_now().await;
    }

    /// Answers one request; `answered` is when the iteration began answering (one clock read
    /// for all of them, for the latency metric).
    fn complete(&mut self, completion: Completion<S>, answered: Instant) {
        match completion {
            Completion::Applied { token, index, response } => {
                if let Some(Pending::Propose { reply, started, .. }) = self.pending.remove(token) {
                    self.metrics.applied.increment(1);
                    let took = answered.saturating_duration_since(started);
                    self.metrics.propose_seconds.record(took.as_secs_f64());
                    let _ = reply.send(Ok(Applied { index, response }));
                }
            }
            Completion::Read { token, result, .. } => {
                if let Some(Pending::Read { reply, .. }) = self.pending.remove(token) {
                    let _ = reply.send(Ok(result));
                }
            }
            Completion::Failed { token, error } => {
                if let Some(pending) = self.pending.remove(token) {
                    if matches!(pending, Pending::Propose { .. }) {
                        self.metrics.proposals_failed.increment(1);
                    }
                    pending.fail(request_error(error));
                }
            }
        }
    }

    /// Sends one frame per peer (cut at [`super::peer::FRAME_BODY_TARGET`]) and empties the lists.
    fn send_messages(&mut self, messages: &mut BTreeMap<NodeId, Vec<(GroupId, Message)>>) {
        for (peer, list) in messages.iter_mut() {
            if list.is_empty() {
                continue;
            }
            // A snapshot goes as a stream of its file, on a connection of its own.
            if list.iter().any(|(_, message)| matches!(message.body, MessageBody::Snapshot { .. }))
            {
                let (snapshots, rest) = std::mem::take(list)
                    .into_iter()
                    .partition(|(_, message)| matches!(message.body, MessageBody::Snapshot { .. }));
                *list = rest;
                for (group, message) in snapshots {
                    self.send_snapshot(*peer, group, message);
                }
                if list.is_empty() {
                    continue;
                }
            }
            let Some(link) = self.peer(*peer) else {
                list.clear();
                continue;
            };
            let sent = link.send(list.drain(..));
            self.metrics.messages_sent.increment(sent.messages);
            self.metrics.frames_sent.increment(sent.frames);
            self.messages_sent += sent.messages;
            self.frames_sent += sent.frames;
        }
    }

    /// Hands a snapshot Raft wants sent to `peer` to the task streaming snapshots to it.
    fn send_snapshot(&mut self, peer: NodeId, group: GroupId, message: Message) {
        let config = &self.context.config;
        let Some(addr) = config.peers.get(&peer).copied() else { return };
        let sender = self.snapshot_senders.entry(peer).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(transfer::QUEUE_MAX);
            let identity = Identity { cluster: config.cluster, node: config.node };
            tokio::task::spawn_local(transfer::send_snapshots(
                identity,
                peer,
                addr,
                rx,
                config.faults.clone(),
                Arc::clone(&self.context.transfers),
                config.snapshot_chunk_bytes,
            ));
            tx
        });
        // A full queue drops the offer: Raft offers again after an election timeout.
        let _ = sender.try_send(Job::new(group, message, self.store.snapshot_path(group)));
    }

    /// The link to `peer`, started on first use; `None` for a node this one does not know.
    fn peer(&mut self, peer: NodeId) -> Option<&PeerLink> {
        let config = &self.context.config;
        match self.peers.entry(peer) {
            MapEntry::Occupied(link) => Some(link.into_mut()),
            MapEntry::Vacant(vacant) => {
                let Some(addr) = config.peers.get(&peer).copied() else {
                    tracing::debug!(%peer, "message for an unknown node dropped");
                    return None;
                };
                let identity = Identity { cluster: config.cluster, node: config.node };
                Some(vacant.insert(PeerLink::spawn(identity, peer, addr, config.faults.clone())))
            }
        }
    }

    /// The shard's storage failed: it refuses everything from now on (nothing is retried).
    fn fail(&mut self, error: Error) {
        tracing::error!(shard = self.context.index, %error, "shard storage failed; refusing work");
        for (_, pending) in self.pending.drain() {
            pending.fail(error.clone());
        }
        for reply in self.created.drain(..) {
            let _ = reply.send(Err(error.clone()));
        }
        self.failed = Some(error);
    }
}

/// Hands the heap's free memory back to the system once a shard has gone idle: glibc keeps what
/// a burst freed resident (about 2 KiB per quiet replica in the idle bench, where the replicas
/// themselves hold 2.5–3 KiB). Once per idle period per shard, never on the busy path; a no-op
/// with other C libraries (and under another global allocator, such as the binaries' mimalloc,
/// it only trims what glibc itself holds).
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Polls the appends in flight in order: joins those still waiting to join (stopping at the
/// first that cannot yet, so the order holds) and records the ones that finished. Ready once the
/// oldest has finished.
fn poll_inflight(inflight: &mut VecDeque<InFlight>, cx: &mut std::task::Context<'_>) -> Poll<()> {
    // Rounds complete in order: past the oldest unfinished append, only those still waiting
    // to join need a poll (polling the others would only take the WAL's locks again).
    let mut oldest = true;
    for item in inflight.iter_mut() {
        if item.done.is_some() || (!oldest && item.append.joined()) {
            continue;
        }
        if let Poll::Ready(result) = Pin::new(&mut item.append).poll(cx) {
            item.done = Some(result);
        } else if item.append.joined() {
            oldest = false;
        } else {
            break;
        }
    }
    match inflight.front() {
        Some(front) if front.done.is_some() => Poll::Ready(()),
        _ => Poll::Pending,
    }
}

fn refuse<S: StateMachine>(request: Request<S>, error: &Error) {
    let error = error.clone();
    match request {
        Request::Propose { reply, .. } => drop(reply.send(Err(error))),
        Request::Read { reply, .. } => drop(reply.send(Err(error))),
        Request::CreateGroup { reply, .. }
        | Request::JoinGroup { reply, .. }
        | Request::RemoveGroup { reply, .. }
        | Request::TransferLeadership { reply, .. } => {
            drop(reply.send(Err(error)));
        }
        Request::ChangeMembership { reply, .. } | Request::Membership { reply, .. } => {
            drop(reply.send(Err(error)));
        }
        Request::Status { reply, .. } => drop(reply.send(Err(error))),
        Request::Stats(reply) => drop(reply.send(Err(error))),
        Request::Inspect(_)
        | Request::Messages(..)
        | Request::Accepted(_)
        | Request::SnapshotRestored(_)
        | Request::SnapshotSaved { .. } => {}
    }
}

/// A number no earlier run of this process or another is likely to have drawn: the standard
/// library's randomly keyed hasher (seeded from the OS) over the wall clock.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    hasher.write_u128(now);
    hasher.finish()
}

#[allow(clippy::needless_pass_by_value)] // used as `map_err(storage_error)`
fn storage_error(error: StoreError) -> Error {
    Error::Storage(error.to_string().into())
}

fn request_error(error: RequestError) -> Error {
    match error {
        RequestError::GroupNotFound(group) => Error::GroupNotFound(group),
        RequestError::NotLeader { leader_hint: None } | RequestError::NoQuorum => Error::NoQuorum,
        RequestError::NotLeader { leader_hint } => Error::NotLeader { leader_hint },
        RequestError::ProposalDropped => Error::ProposalDropped,
        RequestError::OutcomeUnknown => Error::OutcomeUnknown,
        RequestError::Busy => Error::Busy,
        RequestError::MembershipChangePending => Error::MembershipChangePending,
        RequestError::LearnerNotReady(node) => Error::LearnerNotReady { node },
        RequestError::InvalidArgument(reason) => Error::InvalidArgument(reason),
        RequestError::Rejected(reason) => Error::Rejected(reason),
    }
}

fn replica_config(config: &EngineConfig, group: GroupId, voters: Vec<NodeId>) -> Config {
    let mut replica = Config::new(config.node, voters);
    replica.election_ticks = config.election_ticks;
    replica.heartbeat_ticks = config.heartbeat_ticks;
    replica.lease_reads = config.lease_reads;
    replica.seed = group.0.rotate_left(17) ^ config.node.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    replica
}

fn restore_machine<S: StateMachine>(
    factory: &MachineFactory<S>,
    group: GroupId,
    recovered: &RecoveredState,
) -> Result<S, Error> {
    let mut machine = factory(group);
    if let Some(snapshot) = &recovered.snapshot {
        machine.restore(&snapshot.data).map_err(|error| {
            Error::Storage(format!("group {group}: snapshot does not restore: {error}").into())
        })?;
    }
    Ok(machine)
}

/// Accepts peers' connections and hands them to the shards in turn.
async fn accept_loop<S: StateMachine>(
    listener: tokio::net::TcpListener,
    routes: Arc<[mpsc::Sender<Request<S>>]>,
) {
    let mut next = 0usize;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of descriptors, usually: wait a little rather than spin.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(stream) = stream.into_std() else { continue };
        let shard = &routes[next % routes.len()];
        next = next.wrapping_add(1);
        if shard.send(Request::Accepted(stream)).await.is_err() {
            return;
        }
    }
}

/// Reads one accepted connection: handshake, then frames whose messages go to the shards that
/// own their groups. Any error closes the connection; the peer reconnects.
async fn read_connection<S: StateMachine>(
    stream: tokio::net::TcpStream,
    config: Arc<EngineConfig>,
    routes: Arc<[mpsc::Sender<Request<S>>]>,
    liveness: Arc<Liveness>,
    transfers: Arc<Transfers>,
) {
    let identity = Identity { cluster: config.cluster, node: config.node };
    let members = config.peers.keys().copied().filter(|id| *id != config.node).collect();
    let accepted = Connection::accept(stream, members, ConnectionConfig::new(identity)).await;
    // A refused or failed handshake was logged by `Connection::accept`.
    let Ok(mut connection) = accepted else { return };
    let peer = connection.peer();
    let mut messages = Vec::new();
    let mut per_shard: Vec<Vec<(GroupId, Message)>> = vec![Vec::new(); routes.len()];
    let mut snapshots = None;
    loop {
        let frame = match connection.recv().await {
            Ok(frame) => frame,
            Err(error) => {
                tracing::debug!(%peer, %error, "peer connection closed");
                return;
            }
        };
        if frame.header.kind == FrameKind::Snapshot {
            let receiver = snapshots.get_or_insert_with(|| {
                Receiver::new(
                    Arc::clone(&config),
                    Arc::clone(&routes),
                    Arc::clone(&transfers),
                    peer,
                )
            });
            if let Err(error) = receiver.on_frame(&frame.body, &mut connection).await {
                tracing::warn!(%peer, %error, "bad snapshot stream from a peer; closing it");
                return;
            }
            continue;
        }
        if let Err(error) = batch::decode_shared(&frame.body, &mut messages) {
            tracing::warn!(%peer, %error, "bad batch from a peer; closing its connection");
            return;
        }
        // Any well-formed frame, an empty one included, says the peer node is up (unless the
        // fault hook cuts this link, in which case the shard drops the messages too).
        if config.faults.as_ref().is_none_or(|f| f.verdict(peer, config.node) != Verdict::Drop) {
            liveness.heard(peer);
        }
        for (group, message) in messages.drain(..) {
            per_shard[shard_of(group, routes.len())].push((group, message));
        }
        for (shard, list) in per_shard.iter_mut().enumerate() {
            if !list.is_empty()
                && routes[shard].send(Request::Messages(peer, std::mem::take(list))).await.is_err()
            {
                return;
            }
        }
    }
}

#[cfg(test)]
mod request_size {
    /// Every proposal moves through the inbox at the size of the largest request: a rare
    /// request with a large payload is boxed (`SnapshotRestored` made it 264 bytes). The
    /// largest inline ones now are `SnapshotSaved` and `Read`.
    #[test]
    fn a_shard_request_stays_small() {
        let size = std::mem::size_of::<super::Request<crate::kv::KvStateMachine>>();
        assert!(size <= 136, "Request<KvStateMachine> grew to {size} bytes");
    }
}

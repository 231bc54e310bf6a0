//! One simulated node: a `ShardCore` and a `ShardStore` whose WAL lives on a [`SimStorage`], run
//! by a driver that mirrors `engine/src/shard/driver.rs` step for step — one WAL append per loop
//! iteration for every group, appends completing in order after a simulated disk delay,
//! messages that wait for persistence, fetches answered from the WAL, snapshots every 8 ticks
//! written "off the shard thread" (after a delay) before the WAL drops what they cover, node-level
//! liveness reported to the core on every tick (not on the first tick after a stall) and an
//! empty frame to every peer each heartbeat interval, recovered groups woken through
//! `defer_wake` — but with simulated time and no threads.
//!
//! Snapshot files and the catalog live in a real per-node directory (on tmpfs when there is
//! one). The store replaces both atomically (temp file, fsync, rename, directory fsync) and only
//! the simulator's single thread writes them, so at a crash each is exactly the old or the new
//! file; a snapshot still "being written" at a crash lands or not, at random.
//!
//! Membership, as the driver does it: [`Node::host_group`] (the driver's `host_group`, behind
//! `JoinGroup`) starts an empty replica that learns everything from the leader, its catalog record
//! made durable at the start of the next loop iteration, before any of its output;
//! [`Node::change_membership`] asks the core for a joint-consensus change, finished changes leave
//! in [`Outbox::memberships`]; [`Node::remove_group`] (the driver's `remove_group`) drops a
//! replica and its data. The node remembers which groups its durable catalog lists, and a restart
//! must find exactly those.
//!
//! Outputs that `ShardCore` produces in hash-map order (groups' persist items, messages, fetches,
//! completions, finished membership changes) are put in group or token order first, so a run is
//! a function of its seed.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use flotilla::kv::{Query, StateMachine};
use flotilla::raftgroup::testkit::SimRng;
use flotilla::raftgroup::{
    Config, LogIndex, Membership, Message, MessageBody, NodeId, RecoveredState, Term,
};
use flotilla::shard::store::{ShardStore, map_snapshot, write_snapshot_image};
use flotilla::shard::{
    Completion, MembershipEdit, PendingSnapshot, Quiescence, RequestError, ShardCore, ShardOutput,
    Token,
};
use flotilla::wal::sim::{CrashMode, SimStorage};
use flotilla::wal::{AppendFuture, GroupId, WalError, WriteBatch};

use super::machine::{Oracle, TracedKv, mix};

/// Snapshot files written at once per node (the driver's `SNAPSHOTS_IN_FLIGHT_MAX`).
const SNAPSHOTS_IN_FLIGHT_MAX: usize = 4;

/// Raft messages for one peer, as one frame.
pub type Frame = Vec<(GroupId, Message)>;

/// How every node of a run is configured.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The WAL's configuration (inline writer: deterministic).
    pub wal: flotilla::wal::Config,
    /// Raft election timeout, in ticks.
    pub election_ticks: u32,
    /// Raft heartbeat interval, in ticks.
    pub heartbeat_ticks: u32,
    /// Entries applied before a group is snapshotted.
    pub snapshot_entries: u64,
    /// Live WAL segments before the groups pinning the oldest are snapshotted first.
    pub segments_target: u64,
    /// Longest time a WAL round takes to become durable.
    pub disk_delay_max: u64,
    /// Longest time a snapshot file takes to be written.
    pub snapshot_delay_max: u64,
    /// Quiet idle groups (`EngineConfig::quiesce`), or `None`.
    pub quiescence: Option<Quiescence>,
    /// A deliberate driver bug, to prove the simulation catches what it claims to (`None` in
    /// real runs).
    pub bug: Option<DriverBug>,
}

/// Mistakes a driver could make, injected to check that the simulation notices them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverBug {
    /// Sends the messages that must wait for persistence (votes, acknowledgements) and reports
    /// persistence at once, while the WAL round is still on its way to the disk.
    AckBeforePersist,
    /// Answers reads from the local state machine of whichever node gets them, without a
    /// ReadIndex round.
    LocalReads,
}

/// What nodes hand back to the cluster.
#[derive(Default)]
pub struct Outbox {
    /// `(from, to, frame)`.
    pub frames: Vec<(NodeId, NodeId, Frame)>,
    /// Finished requests.
    pub completions: Vec<Completion<TracedKv>>,
    /// Requests held while the node was paused and refused when it resumed (never accepted).
    pub refusals: Vec<(Token, RequestError)>,
    /// Membership changes that finished, with the membership they left in effect (their
    /// failures are in `completions`).
    pub memberships: Vec<(Token, Membership)>,
}

/// A client request that reached a paused node: handled when it resumes (the driver's inbox).
#[derive(Debug)]
enum Held {
    Propose { group: GroupId, payload: Bytes, token: Token },
    Read { group: GroupId, key: Bytes, token: Token },
    Membership { group: GroupId, edit: MembershipEdit, token: Token },
}

/// One WAL append and what waits for it (the driver's `InFlight`).
struct Round {
    due: u64,
    append: AppendFuture,
    persisted: Vec<(GroupId, Term, LogIndex)>,
    after: BTreeMap<NodeId, Frame>,
}

/// A snapshot file being written off the shard thread.
struct SnapshotWrite {
    due: u64,
    group: GroupId,
    snapshot: PendingSnapshot<TracedKv>,
}

/// A running incarnation of the node.
struct Running {
    core: ShardCore<TracedKv>,
    store: ShardStore,
    out: ShardOutput<TracedKv>,
    rounds: VecDeque<Round>,
    snapshot_writes: Vec<SnapshotWrite>,
    snapshotting: BTreeSet<GroupId>,
    ticks: u64,
}

/// One node.
pub struct Node {
    /// Its id.
    pub id: NodeId,
    dir: PathBuf,
    /// The WAL's disk (after a crash: the image a restart finds).
    disk: SimStorage,
    running: Option<Running>,
    /// Frozen (SIGSTOP): no ticks, no input handled, no IO completed.
    pub paused: bool,
    /// Time units between two ticks (clock skew).
    pub tick_units: u64,
    next_tick: u64,
    /// When the last tick ran (the driver's `last_tick`: a gap means the node stalled).
    last_tick: u64,
    /// The other nodes.
    peers: Vec<NodeId>,
    /// When each peer was last heard from (the driver's `Liveness`; a restart resets it to
    /// the start, as `Liveness::new` does).
    heard: BTreeMap<NodeId, u64>,
    /// Frames that reached the node while it was paused, with their sender: read (and their
    /// peers stamped) when it resumes.
    held_frames: Vec<(NodeId, Frame)>,
    held_requests: Vec<Held>,
    /// Until then, WAL rounds take up to ten times longer (a stalled device).
    pub slow_disk_until: u64,
    /// The disk was told to die soon (a crash in the middle of a write): the errors it returns
    /// are expected, and the cluster crashes the node when one surfaces.
    pub dying: bool,
    /// Incarnations started.
    pub incarnation: u64,
    /// The groups the durable catalog lists (what a restart must find).
    catalog: BTreeSet<GroupId>,
    bug: Option<DriverBug>,
}

/// The replica configuration the driver builds (`driver::replica_config`).
fn replica_config(
    config: &NodeConfig,
    node: NodeId,
    group: GroupId,
    voters: Vec<NodeId>,
) -> Config {
    let mut replica = Config::new(node, voters);
    replica.election_ticks = config.election_ticks;
    replica.heartbeat_ticks = config.heartbeat_ticks;
    replica.seed = group.0.rotate_left(17) ^ node.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    replica
}

/// Whether `CLUSTER_SIM_DEBUG` asks for a log of every node's storage steps.
pub fn debug() -> bool {
    static DEBUG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("CLUSTER_SIM_DEBUG").is_some())
}

/// Polls an append of the inline WAL until it finishes: it writes its own round when polled.
fn finish(mut append: AppendFuture) -> Result<(), WalError> {
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..16 {
        if let Poll::Ready(result) = Pin::new(&mut append).poll(&mut cx) {
            return result;
        }
    }
    panic!("an inline WAL append did not finish when polled");
}

impl Node {
    /// A node that has never run.
    pub fn new(
        id: NodeId,
        dir: PathBuf,
        tick_units: u64,
        first_tick: u64,
        bug: Option<DriverBug>,
    ) -> Self {
        Self {
            id,
            dir,
            disk: SimStorage::new(),
            running: None,
            paused: false,
            tick_units,
            next_tick: first_tick,
            last_tick: 0,
            peers: Vec::new(),
            heard: BTreeMap::new(),
            held_frames: Vec::new(),
            held_requests: Vec::new(),
            slow_disk_until: 0,
            dying: false,
            incarnation: 0,
            catalog: BTreeSet::new(),
            bug,
        }
    }

    /// Whether the node runs (it may be paused).
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Whether the node runs and is not paused.
    pub fn is_up(&self) -> bool {
        self.running.is_some() && !self.paused
    }

    /// The shard, while running.
    pub fn core(&self) -> Option<&ShardCore<TracedKv>> {
        self.running.as_ref().map(|running| &running.core)
    }

    /// WAL rounds and snapshot files not yet durable.
    pub fn io_pending(&self) -> usize {
        self.running.as_ref().map_or(0, |r| r.rounds.len() + r.snapshot_writes.len())
    }

    /// The simulated disk (to count operations or make it die).
    pub fn disk(&self) -> &SimStorage {
        &self.disk
    }

    /// Starts the node from its disk and directory as the driver's `Shard::open` does: every
    /// group of the catalog recovered through `ShardStore::recover_group` (its catalog must list
    /// exactly the groups it made durable there). On the first start the node creates `groups`
    /// with `voters` (catalog durable before any output); `voters` are also its peers.
    pub fn start(
        &mut self,
        now: u64,
        config: &NodeConfig,
        groups: &[GroupId],
        voters: &[NodeId],
        oracle: &Rc<RefCell<Oracle>>,
    ) -> Result<(), String> {
        assert!(self.running.is_none(), "{} is already running", self.id);
        self.incarnation += 1;
        self.dying = false;
        let storage: Arc<dyn flotilla::wal::io::Storage> = Arc::new(self.disk.clone());
        let (mut store, _recovery) = ShardStore::open_with(&self.dir, storage, config.wal.clone())
            .map_err(|error| format!("{} cannot open its store: {error}", self.id))?;
        let mut core = ShardCore::new(self.id);
        // As the driver's random base: read contexts never repeat across incarnations (seed
        // 4718), and the run stays a function of the seed.
        core.set_read_context_base(self.incarnation << 40);
        if let Some(quiescence) = config.quiescence {
            core.enable_quiescence(quiescence);
        }
        if self.incarnation == 1 {
            for &group in groups {
                store.stage_group(group, voters);
            }
            store.sync_catalog().map_err(|error| format!("{}: catalog: {error}", self.id))?;
            self.catalog = groups.iter().copied().collect();
            for &group in groups {
                let machine = TracedKv::new(self.id, group, Rc::clone(oracle));
                let replica = replica_config(config, self.id, group, voters.to_vec());
                core.create_group(group, replica, RecoveredState::default(), machine)
                    .map_err(|error| format!("{}: create {group}: {error}", self.id))?;
            }
        } else {
            let catalog: Vec<(GroupId, Vec<NodeId>)> =
                store.groups().map(|(group, voters)| (group, voters.to_vec())).collect();
            let listed: BTreeSet<GroupId> = catalog.iter().map(|(group, _)| *group).collect();
            if listed != self.catalog {
                return Err(format!(
                    "{} lost catalog changes: it lists {listed:?}, not {:?}",
                    self.id, self.catalog
                ));
            }
            for (group, voters) in catalog {
                let recovered = store.recover_group(group).map_err(|error| {
                    format!("{} cannot recover group {group}: {error}", self.id)
                })?;
                if debug() {
                    eprintln!(
                        "t{now} {} g{group} recovered: hs {:?} last {} applied {} snapshot {:?} \
                         entries {:?}",
                        self.id,
                        recovered.hard_state,
                        recovered.last_index.0,
                        recovered.applied.0,
                        recovered.snapshot.as_ref().map(|s| s.meta.index.0),
                        recovered.entries.first().map(|e| e.index.0)
                            ..recovered.entries.last().map(|e| e.index.0)
                    );
                }
                let mut machine = TracedKv::new(self.id, group, Rc::clone(oracle));
                if let Some(snapshot) = &recovered.snapshot {
                    machine.restore(&snapshot.data).map_err(|error| {
                        format!("{}: group {group}: snapshot does not restore: {error}", self.id)
                    })?;
                }
                let replica = replica_config(config, self.id, group, voters);
                core.create_group(group, replica, recovered, machine).map_err(|error| {
                    format!("{} cannot restart group {group}: {error}", self.id)
                })?;
                // As `Shard::open`: recovered groups wake a bounded number per tick.
                core.defer_wake(group);
            }
        }
        self.peers = voters.iter().copied().filter(|peer| *peer != self.id).collect();
        self.heard = self.peers.iter().map(|peer| (*peer, now)).collect();
        self.last_tick = now;
        self.running = Some(Running {
            core,
            store,
            out: ShardOutput::default(),
            rounds: VecDeque::new(),
            snapshot_writes: Vec::new(),
            snapshotting: BTreeSet::new(),
            ticks: 0,
        });
        self.paused = false;
        self.next_tick = now + 1;
        Ok(())
    }

    /// Power loss: the disk keeps what `mode` says of its unsynced writes; every snapshot file
    /// being written lands (renamed before the crash) if `lands` says so; everything in memory
    /// is gone.
    pub fn crash(&mut self, mode: CrashMode, mut lands: impl FnMut() -> bool) {
        let Some(running) = self.running.take() else { return };
        if debug() {
            eprintln!("{} crashes ({mode:?}), {} rounds in flight", self.id, running.rounds.len());
        }
        let image = self.disk.crash(mode);
        for write in &running.snapshot_writes {
            if lands() {
                write_snapshot_image(
                    &running.store.snapshot_path(write.group),
                    write.group,
                    &write.snapshot.meta,
                    &write.snapshot.image,
                )
                .expect("snapshot file written");
            }
        }
        // Dropping the store closes the WAL on the crashed disk: every operation fails there.
        drop(running);
        self.disk = image;
        self.paused = false;
        self.dying = false;
        self.held_frames.clear();
        self.held_requests.clear();
    }

    /// Runs the ticks due by `now` (all of them after a pause: the driver's burst), as the
    /// driver's `on_tick`: node-level liveness reported to the core (unless the node just
    /// stalled), the core's tick, a node heartbeat (an empty frame) to every peer each heartbeat
    /// interval, and the snapshot cadence.
    pub fn run_ticks(
        &mut self,
        now: u64,
        config: &NodeConfig,
        rng: &mut SimRng,
        outbox: &mut Outbox,
    ) {
        while !self.paused && self.next_tick <= now {
            self.next_tick += self.tick_units;
            let Some(running) = self.running.as_mut() else { continue };
            running.ticks += 1;
            // The driver's rule: after a stall, what arrived meanwhile is not stamped yet, so
            // the peers are judged from the next tick on (only the first tick of a burst).
            let stalled = now.saturating_sub(self.last_tick) > 2 * self.tick_units;
            self.last_tick = now;
            if !stalled {
                for (&peer, &heard) in &self.heard {
                    let age = now.saturating_sub(heard) / self.tick_units.max(1);
                    let was = running.core.is_node_down(peer);
                    running.core.node_contact(peer, u32::try_from(age).unwrap_or(u32::MAX));
                    if debug() && was != running.core.is_node_down(peer) {
                        eprintln!("t{now} {} sees {peer} down: {}", self.id, !was);
                    }
                }
            }
            let awake = debug().then(|| running.core.awake_count());
            running.core.tick();
            if let Some(before) = awake
                && before != running.core.awake_count()
            {
                eprintln!(
                    "t{now} {} tick: awake {before} -> {}",
                    self.id,
                    running.core.awake_count()
                );
            }
            if running.ticks.is_multiple_of(u64::from(config.heartbeat_ticks.max(1))) {
                for &peer in &self.peers {
                    outbox.frames.push((self.id, peer, Vec::new()));
                }
            }
            if running.ticks.is_multiple_of(8) {
                self.compact(now, config, rng);
            }
        }
    }

    /// A frame from peer `from` (empty: a node heartbeat). Any frame, read, says its sender is up.
    pub fn deliver(&mut self, now: u64, from: NodeId, frame: Frame) {
        if self.paused {
            self.held_frames.push((from, frame));
            return;
        }
        let Some(running) = self.running.as_mut() else { return };
        if let Some(heard) = self.heard.get_mut(&from) {
            *heard = now;
        }
        for (group, message) in frame {
            if debug() {
                let before = running.core.is_asleep(group);
                let body = format!("{:?}", message.body);
                let term = message.term;
                step(&mut running.core, group, message);
                eprintln!(
                    "t{now} {from}->{} g{group} t{term:?} {:.120} asleep {before}->{}",
                    self.id,
                    body,
                    running.core.is_asleep(group)
                );
            } else {
                step(&mut running.core, group, message);
            }
        }
    }

    /// Fails every request still pending here, as their deadlines would (the clients are gone).
    pub fn expire_all(&mut self) {
        self.held_requests.clear();
        let Some(running) = self.running.as_mut() else { return };
        running.core.fail_requests(|_| true, &mut running.out);
        running.out.completions.clear();
    }

    /// A client's proposal. `Ok` means the node has it (accepted, or held while paused).
    pub fn propose(
        &mut self,
        group: GroupId,
        payload: Bytes,
        token: Token,
    ) -> Result<(), RequestError> {
        if self.paused && self.running.is_some() {
            self.held_requests.push(Held::Propose { group, payload, token });
            return Ok(());
        }
        let running = self.running.as_mut().ok_or(RequestError::NotLeader { leader_hint: None })?;
        running.core.propose(group, payload, token)
    }

    /// A client's linearizable read of `key`.
    pub fn read(&mut self, group: GroupId, key: Bytes, token: Token) -> Result<(), RequestError> {
        if self.paused && self.running.is_some() {
            self.held_requests.push(Held::Read { group, key, token });
            return Ok(());
        }
        let running = self.running.as_mut().ok_or(RequestError::NotLeader { leader_hint: None })?;
        if self.bug == Some(DriverBug::LocalReads) {
            let machine = running.core.machine(group).ok_or(RequestError::GroupNotFound(group))?;
            let (applied, result) = (machine.applied_index(), machine.query(&Query::Get { key }));
            running.out.completions.push(Completion::Read { token, applied, result });
            return Ok(());
        }
        running.core.read(group, Query::Get { key }, token)
    }

    /// A joint-consensus change of `group`'s membership, asked of this node (the driver's
    /// `change_membership`): `Ok` means the node has it (accepted, or held while paused); it
    /// finishes in [`Outbox::memberships`] or fails in `completions`.
    pub fn change_membership(
        &mut self,
        group: GroupId,
        edit: MembershipEdit,
        token: Token,
    ) -> Result<(), RequestError> {
        if self.paused && self.running.is_some() {
            self.held_requests.push(Held::Membership { group, edit, token });
            return Ok(());
        }
        let running = self.running.as_mut().ok_or(RequestError::NotLeader { leader_hint: None })?;
        running.core.change_membership(group, &edit, token)
    }

    /// The driver's `host_group` for a node joining `group` (`Engine::join_group`): an empty
    /// replica with no voters, which learns everything from the leader; its catalog record is
    /// staged, and made durable before the replica's first output ([`Node::pump`]). Refused
    /// while a snapshot file of the group is being written, or if the group is hosted here.
    pub fn host_group(
        &mut self,
        now: u64,
        config: &NodeConfig,
        rng: &mut SimRng,
        group: GroupId,
        oracle: &Rc<RefCell<Oracle>>,
    ) -> Result<(), RequestError> {
        let id = self.id;
        let running = self.running.as_mut().ok_or(RequestError::NotLeader { leader_hint: None })?;
        if running.core.replica(group).is_some() || running.store.contains(group) {
            return Err(RequestError::Rejected(format!("group {group} exists")));
        }
        if running.snapshotting.contains(&group) {
            return Err(RequestError::Busy);
        }
        if running.store.wal().group_state(group).is_some() {
            // Leftovers of a removal that did not finish: start clean.
            let removal = running
                .store
                .remove_group(group)
                .unwrap_or_else(|error| panic!("{id}: removing leftovers of {group}: {error}"));
            self.start_append(now, config, rng, removal);
        }
        let running = self.running.as_mut().expect("running");
        running.store.stage_group(group, &[]);
        let machine = TracedKv::new(id, group, Rc::clone(oracle));
        let replica = replica_config(config, id, group, Vec::new());
        running.core.create_group(group, replica, RecoveredState::default(), machine)?;
        if debug() {
            eprintln!("t{now} {id} g{group} hosted (empty, joining)");
        }
        Ok(())
    }

    /// The driver's `remove_group`: stops hosting `group` (its pending requests fail) and
    /// deletes its data — the catalog record at once, then its snapshot file, and a WAL record.
    /// Refused while a snapshot file of the group is being written.
    pub fn remove_group(
        &mut self,
        now: u64,
        config: &NodeConfig,
        rng: &mut SimRng,
        group: GroupId,
    ) -> Result<(), RequestError> {
        let id = self.id;
        let running = self.running.as_mut().ok_or(RequestError::NotLeader { leader_hint: None })?;
        if running.snapshotting.contains(&group) {
            return Err(RequestError::Busy);
        }
        if !running.core.remove_group(group, &mut running.out) {
            return Err(RequestError::GroupNotFound(group));
        }
        let append = running
            .store
            .remove_group(group)
            .unwrap_or_else(|error| panic!("{id}: removing {group}: {error}"));
        if running.store.catalog_dirty() {
            self.catalog.remove(&group);
        } else {
            // The catalog was written: with whatever else was staged in it.
            self.catalog = running.store.groups().map(|(group, _)| group).collect();
        }
        if debug() {
            eprintln!("t{now} {id} g{group} removed");
        }
        self.start_append(now, config, rng, append);
        Ok(())
    }

    /// The highest index of `group` the node's WAL durably knows committed (its hard state's
    /// commit, or its compaction point), while it runs.
    pub fn durable_commit(&self, group: GroupId) -> Option<u64> {
        let state = self.running.as_ref()?.store.wal().group_state(group)?;
        let commit = state.hard_state.map_or(0, |hard_state| hard_state.commit);
        Some(commit.max(state.compacted.map_or(0, |(index, _)| index)))
    }

    /// Whether the node runs and hosts a replica of `group`.
    pub fn hosts(&self, group: GroupId) -> bool {
        self.core().is_some_and(|core| core.replica(group).is_some())
    }

    /// The membership in effect on this node's replica of `group`, if it runs and hosts one.
    pub fn membership(&self, group: GroupId) -> Option<&Membership> {
        Some(self.core()?.replica(group)?.membership())
    }

    /// Asks the leader of `group` here to hand over to `to`.
    pub fn transfer(&mut self, group: GroupId, to: NodeId) -> bool {
        if self.paused {
            return false;
        }
        self.running.as_mut().is_some_and(|r| r.core.transfer_leadership(group, to).is_ok())
    }

    /// The client gave up on `tokens`: fail them as the driver does at a deadline.
    pub fn expire(&mut self, tokens: &[Token]) {
        let Some(running) = self.running.as_mut() else { return };
        self.held_requests.retain(|held| match held {
            Held::Propose { token, .. }
            | Held::Read { token, .. }
            | Held::Membership { token, .. } => !tokens.contains(token),
        });
        running.core.fail_requests(|token| tokens.contains(&token), &mut running.out);
        // The caller stopped waiting: the core's answers are not needed.
        running.out.completions.clear();
    }

    /// Unfreezes the node: missed ticks first, then what arrived meanwhile.
    pub fn resume(&mut self, now: u64, config: &NodeConfig, rng: &mut SimRng, outbox: &mut Outbox) {
        if !self.paused {
            return;
        }
        self.paused = false;
        self.run_ticks(now, config, rng, outbox);
        for (from, frame) in std::mem::take(&mut self.held_frames) {
            self.deliver(now, from, frame);
        }
        for held in std::mem::take(&mut self.held_requests) {
            let (token, result) = match held {
                Held::Propose { group, payload, token } => {
                    (token, self.propose(group, payload, token))
                }
                Held::Read { group, key, token } => (token, self.read(group, key, token)),
                Held::Membership { group, edit, token } => {
                    (token, self.change_membership(group, edit, token))
                }
            };
            if let Err(error) = result {
                outbox.refusals.push((token, error));
            }
        }
    }

    fn disk_delay(&self, now: u64, config: &NodeConfig, rng: &mut SimRng) -> u64 {
        let max = if now < self.slow_disk_until {
            10 * config.disk_delay_max
        } else {
            config.disk_delay_max
        };
        rng.between(1, max.max(1))
    }

    /// Queues an append behind the ones in flight; rounds become durable in order.
    fn start_append(
        &mut self,
        now: u64,
        config: &NodeConfig,
        rng: &mut SimRng,
        append: AppendFuture,
    ) {
        let delay = self.disk_delay(now, config, rng);
        let running = self.running.as_mut().expect("running");
        let due = running.rounds.back().map_or(0, |round| round.due).max(now + delay);
        running.rounds.push_back(Round {
            due,
            append,
            persisted: Vec::new(),
            after: BTreeMap::new(),
        });
    }

    /// The driver's `compact`: snapshots groups that applied `snapshot_entries` since their last
    /// snapshot or that pin the oldest WAL segment, at most four files in flight.
    fn compact(&mut self, now: u64, config: &NodeConfig, rng: &mut SimRng) {
        let running = self.running.as_mut().expect("running");
        let room = SNAPSHOTS_IN_FLIGHT_MAX.saturating_sub(running.snapshotting.len());
        if room == 0 {
            return;
        }
        let mut snapshots: Vec<(GroupId, PendingSnapshot<TracedKv>)> = Vec::new();
        let mut rewrite = None;
        let wal = running.store.wal();
        if wal.stats().segments_live > config.segments_target {
            let mut writing = false;
            for group in wal.pinning_groups() {
                if snapshots.len() >= room {
                    break;
                }
                if running.snapshotting.contains(&group) {
                    writing = true;
                } else if let Some(snapshot) = running.core.compact_now(group) {
                    snapshots.push((group, snapshot));
                }
            }
            if snapshots.is_empty() && !writing {
                rewrite = Some(running.store.wal().rewrite_pinning());
            }
        }
        // `compact_due` walks a hash map: ask it about one group at a time, in group order, so
        // the groups chosen do not depend on the map's order.
        let mut groups: Vec<GroupId> = running.core.groups().collect();
        groups.sort_unstable();
        for group in groups {
            if snapshots.len() >= room {
                break;
            }
            if running.snapshotting.contains(&group) || snapshots.iter().any(|(g, _)| *g == group) {
                continue;
            }
            running.core.compact_due(config.snapshot_entries, 1, |g| g != group, &mut snapshots);
        }
        for (group, snapshot) in snapshots {
            if debug() {
                eprintln!(
                    "t{now} {} g{group} snapshot taken at {}",
                    self.id, snapshot.meta.index.0
                );
            }
            running.snapshotting.insert(group);
            let due = now + rng.between(1, config.snapshot_delay_max.max(1));
            running.snapshot_writes.push(SnapshotWrite { due, group, snapshot });
        }
        if let Some(rewrite) = rewrite {
            self.start_append(now, config, rng, rewrite);
        }
    }

    /// Writes every WAL round in flight now, whatever its due time (the disk is about to die).
    pub fn flush_wal(&mut self, outbox: &mut Outbox) -> Result<(), String> {
        let id = self.id;
        let Some(running) = self.running.as_mut() else { return Ok(()) };
        while let Some(round) = running.rounds.pop_front() {
            finish(round.append).map_err(|error| format!("{id}: WAL append failed: {error}"))?;
            for (group, term, index) in round.persisted {
                running.core.on_persisted(group, term, index);
            }
            for (to, frame) in round.after {
                if !frame.is_empty() {
                    outbox.frames.push((id, to, frame));
                }
            }
        }
        Ok(())
    }

    /// Completes the WAL rounds and snapshot files due by `now`. An error is a storage failure.
    pub fn complete_io(
        &mut self,
        now: u64,
        config: &NodeConfig,
        rng: &mut SimRng,
        outbox: &mut Outbox,
    ) -> Result<(), String> {
        if self.paused {
            return Ok(());
        }
        let id = self.id;
        loop {
            let Some(running) = self.running.as_mut() else { return Ok(()) };
            if running.rounds.front().is_none_or(|round| round.due > now) {
                break;
            }
            let round = running.rounds.pop_front().expect("due");
            finish(round.append).map_err(|error| format!("{id}: WAL append failed: {error}"))?;
            for (group, term, index) in round.persisted {
                running.core.on_persisted(group, term, index);
            }
            for (to, frame) in round.after {
                if !frame.is_empty() {
                    outbox.frames.push((id, to, frame));
                }
            }
        }
        let Some(running) = self.running.as_mut() else { return Ok(()) };
        let (due, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut running.snapshot_writes).into_iter().partition(|w| w.due <= now);
        running.snapshot_writes = later;
        for SnapshotWrite { group, snapshot, .. } in due {
            let running = self.running.as_mut().expect("running");
            // As the driver: write the image, map the file, compact the replica with the map
            // as its snapshot's data, then the WAL.
            let path = running.store.snapshot_path(group);
            write_snapshot_image(&path, group, &snapshot.meta, &snapshot.image)
                .map_err(|error| format!("{id}: snapshot file: {error}"))?;
            let mapped = map_snapshot(&path, group)
                .map_err(|error| format!("{id}: snapshot map: {error}"))?;
            running.snapshotting.remove(&group);
            let compacted = mapped.meta.index == snapshot.meta.index
                && running.core.snapshot_written(group, &snapshot.meta, mapped.data);
            if debug() {
                eprintln!(
                    "t{now} {id} g{group} snapshot file written at {}, compacting: {compacted} (wal {:?})",
                    snapshot.meta.index.0,
                    running.store.wal().group_state(group)
                );
            }
            if compacted {
                let append = running.store.compact_log(group, &snapshot.meta);
                self.start_append(now, config, rng, append);
            }
        }
        Ok(())
    }

    /// The driver's `pump`: collects every dirty group until nothing is left, staging one WAL
    /// append per iteration, answering fetches, sending what may go now. Returns a digest of what
    /// it did, for the trace.
    pub fn pump(
        &mut self,
        now: u64,
        config: &NodeConfig,
        rng: &mut SimRng,
        outbox: &mut Outbox,
    ) -> Result<u64, String> {
        if self.paused {
            return Ok(0);
        }
        let id = self.id;
        let mut trace = 0;
        // Groups hosted since the last iteration become durable before any of their output
        // leaves: one catalog write for all of them.
        if let Some(running) = self.running.as_mut()
            && running.store.catalog_dirty()
        {
            running.store.sync_catalog().map_err(|error| format!("{id}: catalog: {error}"))?;
            self.catalog = running.store.groups().map(|(group, _)| group).collect();
            trace = mix(trace, self.catalog.len() as u64);
        }
        loop {
            let Some(running) = self.running.as_mut() else { return Ok(trace) };
            running.core.collect(&mut running.out);
            canonicalize(&mut running.out);
            let fetches = std::mem::take(&mut running.out.fetches);
            for (group, fetch) in &fetches {
                let mut entries = Vec::new();
                running
                    .store
                    .fetch(*group, fetch, &mut entries)
                    .map_err(|error| format!("{id}: fetch failed: {error}"))?;
                trace = mix(trace, fetch.low.0 ^ entries.len() as u64);
                running.core.on_fetched(*group, *fetch, entries);
            }
            let again = !fetches.is_empty();
            if self.bug == Some(DriverBug::AckBeforePersist) {
                for (group, term, index) in std::mem::take(&mut running.out.persisted) {
                    running.core.on_persisted(group, term, index);
                }
                for (peer, frame) in std::mem::take(&mut running.out.send_after_persist) {
                    if !frame.is_empty() {
                        outbox.frames.push((id, peer, frame));
                    }
                }
            }
            // As the driver: answers first, then the sends that may go now, then the round.
            outbox.completions.append(&mut running.out.completions);
            outbox.memberships.append(&mut running.out.memberships);
            if running.out.persist.is_empty() {
                let persisted = std::mem::take(&mut running.out.persisted);
                let after = std::mem::take(&mut running.out.send_after_persist);
                if let Some(last) = running.rounds.back_mut() {
                    last.persisted.extend(persisted);
                    for (peer, mut messages) in after {
                        last.after.entry(peer).or_default().append(&mut messages);
                    }
                } else {
                    for (group, term, index) in persisted {
                        running.core.on_persisted(group, term, index);
                    }
                    for (peer, frame) in after {
                        if !frame.is_empty() {
                            outbox.frames.push((id, peer, frame));
                        }
                    }
                }
            }
            for (peer, frame) in std::mem::take(&mut running.out.send_now) {
                if !frame.is_empty() {
                    trace = mix(trace, peer.0 ^ ((frame.len() as u64) << 8));
                    outbox.frames.push((id, peer, frame));
                }
            }
            if !running.out.persist.is_empty() {
                if debug() {
                    for (group, item) in &running.out.persist {
                        eprintln!(
                            "t{now} {id} g{group} persist snapshot {:?} entries {:?} hs {:?}",
                            item.snapshot.as_ref().map(|s| (s.meta.index.0, s.meta.term.0)),
                            item.entries.first().map(|e| e.index.0)
                                ..item.entries.last().map(|e| e.index.0),
                            item.hard_state
                        );
                    }
                }
                // As the driver: a round holding nothing but new commit indexes is not synced.
                let must_sync = running.out.persist.iter().any(|(_, item)| item.must_sync);
                let mut batch = WriteBatch::new();
                running
                    .store
                    .stage(&mut running.out.persist, &mut batch)
                    .map_err(|error| format!("{id}: staging failed: {error}"))?;
                trace = mix(trace, batch.ops().len() as u64);
                let append = running.store.wal().append_with(batch, must_sync);
                let persisted = std::mem::take(&mut running.out.persisted);
                let after = std::mem::take(&mut running.out.send_after_persist);
                self.start_append(now, config, rng, append);
                let running = self.running.as_mut().expect("running");
                let last = running.rounds.back_mut().expect("just pushed");
                last.persisted = persisted;
                last.after = after;
            }
            let running = self.running.as_mut().expect("running");
            running.out.clear();
            if !again {
                return Ok(trace);
            }
        }
    }

    /// Calls `check` with every replica of this node, while it runs.
    pub fn replicas(&self) -> Vec<(GroupId, &flotilla::raftgroup::Replica)> {
        let Some(core) = self.core() else { return Vec::new() };
        let mut groups: Vec<GroupId> = core.groups().collect();
        groups.sort_unstable();
        groups.into_iter().map(|group| (group, core.replica(group).expect("hosted"))).collect()
    }
}

/// Puts what `ShardCore::collect` produced in hash-map order into group (or token) order; the
/// relative order of one group's items is kept (stable sorts).
fn canonicalize(out: &mut ShardOutput<TracedKv>) {
    out.persist.sort_by_key(|(group, _)| *group);
    out.persisted.sort_by_key(|(group, _, _)| *group);
    for list in out.send_now.values_mut().chain(out.send_after_persist.values_mut()) {
        list.sort_by_key(|(group, _)| *group);
    }
    out.fetches.sort_by_key(|(group, _)| *group);
    out.completions.sort_by_key(|completion| match completion {
        Completion::Applied { token, .. }
        | Completion::Read { token, .. }
        | Completion::Failed { token, .. } => *token,
    });
    out.memberships.sort_by_key(|(token, _)| *token);
}

/// The driver's delivery of a message: a leader's snapshot that would replace the state machine
/// is restored into a fresh machine first (the driver does it on a blocking thread; here at
/// once) and swapped in by the core.
fn step(core: &mut ShardCore<TracedKv>, group: GroupId, message: Message) {
    let restored = match &message.body {
        MessageBody::Snapshot { snapshot } if core.would_restore(group, snapshot.meta.index) => {
            core.machine(group).and_then(|machine| {
                let mut fresh = machine.fresh();
                fresh.restore(&snapshot.data).ok().map(|()| fresh)
            })
        }
        _ => None,
    };
    match restored {
        Some(machine) => core.step_restored(group, message, machine),
        None => core.step(group, message),
    }
}

//! The simulated cluster: real [`Replica`]s driven through their Ready loop, each with a simulated
//! disk and a state machine, connected by the simulated network; all in one thread, all randomness
//! from one seed, time a counter.
//!
//! Every violation panics with a description; the seed runner catches it and prints the seed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::mem;

use flotilla_raftgroup::testkit::{KvOutput, NetConfig, NetStats, Network, SimRng};
use flotilla_raftgroup::{
    Config, Entry, EntryKind, Fetch, LogIndex, Message, NodeId, ProposeError, ReadError, Ready,
    Replica, Role, Snapshot, Term,
};

use super::disk::{Disk, Write, durable_view};
use super::invariants::{EntryFact, RaftInvariants};
use super::kv::{Command, KvStateMachine, hash_entry, mix};
use super::workload::{Frontend, Rejected};

/// Room for history timestamps within one unit of time.
const STAMPS_PER_TIME: u64 = 1_000_000;

/// Time units per tick of a replica with no clock skew.
pub const TICK_UNITS: u64 = 20;

/// How the replicas are configured and how fast their environment is.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Number of replicas (ids 1..=replicas).
    pub replicas: u64,
    /// Time units between two ticks, per replica (clock skew).
    pub tick_units: Vec<u64>,
    /// Longest time a write takes to become durable.
    pub disk_delay_max: u64,
    /// Longest time a log read from storage takes.
    pub fetch_delay_max: u64,
    /// The replicas' Raft settings (`id`, `voters` and `seed` are set per replica).
    pub raft: Config,
    /// A deliberate driver bug, to prove the simulation catches what it claims to (`None` in
    /// real runs).
    pub driver_bug: Option<DriverBug>,
}

/// Mistakes a driver could make, injected to check that the simulation notices them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverBug {
    /// Sends `persisted_messages` and reports persistence as soon as a Ready is handed out,
    /// while the disk still holds the write: a crash then loses acknowledged entries and votes.
    AckBeforePersist,
    /// Serves reads from the local state machine of whichever replica gets them, without
    /// ReadIndex: followers and deposed leaders answer stale values.
    LocalReads,
}

/// Something for a client: a command applied at a node, or a read served.
#[derive(Clone, Debug)]
pub enum Response {
    /// `node` applied `command`, which returned `output`.
    Applied {
        /// The node that applied it.
        node: u64,
        /// When (a history timestamp).
        at: u64,
        /// The command.
        command: Command,
        /// Its result.
        output: KvOutput<u64>,
    },
    /// A read for `(client, seq)` was served with `value`.
    Read {
        /// When (a history timestamp).
        at: u64,
        /// The client.
        client: u64,
        /// Its operation number.
        seq: u64,
        /// The value read.
        value: Option<u64>,
    },
}

/// What faults and recoveries the cluster went through.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClusterStats {
    /// Replicas crashed (losing unsynced writes).
    pub crashes: u64,
    /// Crashes after which more than what was reported durable had landed (maybe torn).
    pub torn_writes: u64,
    /// Replicas paused.
    pub pauses: u64,
    /// Log compactions.
    pub compactions: u64,
    /// Snapshots installed from a leader.
    pub snapshots_installed: u64,
    /// Storage reads served.
    pub fetches: u64,
    /// Disk stalls.
    pub disk_stalls: u64,
    /// Leadership transfers started.
    pub transfers: u64,
    /// Highest term reached.
    pub max_term: u64,
    /// Entries committed.
    pub committed: u64,
}

/// What to do once a write is durable.
#[derive(Debug, Default)]
struct AfterWrite {
    /// `(term, index)` of the last entry written, for `on_persisted`.
    persisted: Option<(Term, LogIndex)>,
    /// Messages that had to wait for the write.
    messages: Vec<Message>,
}

/// A client request that reached a paused replica: handled when it resumes.
#[derive(Debug)]
enum HeldRequest {
    Propose(Command),
    Read(u64),
}

#[derive(Debug)]
struct Node {
    id: u64,
    /// `None` while crashed.
    replica: Option<Replica>,
    disk: Disk<AfterWrite>,
    machine: KvStateMachine,
    incarnation: u64,
    paused: bool,
    /// Messages that arrived while paused.
    held: Vec<Message>,
    held_requests: Vec<HeldRequest>,
    tick_units: u64,
    next_tick: u64,
    /// Until this time the disk is very slow (a stalled device).
    slow_disk_until: u64,
    /// Storage reads in progress, by completion time.
    fetches: VecDeque<(u64, Fetch)>,
    /// Read contexts sent to the replica: `(client, seq, key)`.
    reads: BTreeMap<u64, (u64, u64, u64)>,
    /// Confirmed reads waiting for the state machine: `(index, context)`.
    confirmed_reads: Vec<(u64, u64)>,
}

/// The whole simulated cluster.
pub struct Cluster {
    config: ClusterConfig,
    seed: u64,
    now: u64,
    nodes: Vec<Node>,
    ids: Vec<u64>,
    network: Network<Message>,
    rng: SimRng,
    invariants: RaftInvariants,
    responses: Vec<Response>,
    next_context: u64,
    /// `(client, seq)` of every command any state machine applied → the timestamp of the first.
    applied_commands: HashMap<(u64, u64), u64>,
    /// History timestamps handed out at the current time (see [`Cluster::stamp`]).
    stamps_now: u64,
    /// A hash of everything that happened, to prove runs replay exactly.
    trace: u64,
    stats: ClusterStats,
}

/// Position of node `node` in `Cluster::nodes`.
fn index_of(node: u64) -> usize {
    (node - 1) as usize
}

fn fact(entry: &Entry) -> EntryFact {
    EntryFact { index: entry.index.get(), term: entry.term.get(), hash: hash_entry(entry) }
}

impl Cluster {
    /// A fresh cluster: every replica new, empty disks, a network behaving as `network`.
    pub fn new(config: ClusterConfig, network: NetConfig, seed: u64, mut rng: SimRng) -> Self {
        let ids: Vec<u64> = (1..=config.replicas).collect();
        let nodes = ids
            .iter()
            .map(|&id| Node {
                id,
                replica: None,
                disk: Disk::new(),
                machine: KvStateMachine::default(),
                incarnation: 0,
                paused: false,
                held: Vec::new(),
                held_requests: Vec::new(),
                tick_units: config.tick_units[(id - 1) as usize],
                next_tick: rng.below(TICK_UNITS),
                slow_disk_until: 0,
                fetches: VecDeque::new(),
                reads: BTreeMap::new(),
                confirmed_reads: Vec::new(),
            })
            .collect();
        let network = Network::new(rng.fork(), network);
        let mut cluster = Cluster {
            config,
            seed,
            now: 0,
            nodes,
            ids,
            network,
            rng,
            invariants: RaftInvariants::new(),
            responses: Vec::new(),
            next_context: 0,
            applied_commands: HashMap::new(),
            stamps_now: 0,
            trace: seed,
            stats: ClusterStats::default(),
        };
        for index in 0..cluster.nodes.len() {
            cluster.start(index);
        }
        cluster
    }

    /// The node ids.
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }

    /// Current time.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// The trace hash so far.
    pub fn trace(&self) -> u64 {
        self.trace
    }

    /// Fault and recovery counts.
    pub fn stats(&self) -> ClusterStats {
        self.stats
    }

    /// Network counts.
    pub fn network_stats(&self) -> NetStats {
        self.network.stats()
    }

    /// The network, to change its behaviour or partition it.
    pub fn network(&mut self) -> &mut Network<Message> {
        &mut self.network
    }

    /// `(client, seq)` of every command some state machine applied → the timestamp of the first
    /// application.
    pub fn applied_commands(&self) -> &HashMap<(u64, u64), u64> {
        &self.applied_commands
    }

    /// Responses produced since the last call.
    pub fn take_responses(&mut self) -> Vec<Response> {
        mem::take(&mut self.responses)
    }

    fn record(&mut self, value: u64) {
        self.trace = mix(self.trace, value);
    }

    fn fail(&self, what: &str) -> ! {
        panic!("violation at time {} (seed {}): {what}", self.now, self.seed)
    }

    fn check(&self, result: Result<(), String>) {
        if let Err(what) = result {
            self.fail(&what);
        }
    }

    /// A history timestamp: `now * STAMPS_PER_TIME + events stamped earlier at this time`.
    pub fn stamp(&mut self) -> u64 {
        assert!(self.stamps_now < STAMPS_PER_TIME, "too many events at time {}", self.now);
        self.stamps_now += 1;
        self.now * STAMPS_PER_TIME + self.stamps_now - 1
    }

    // ----- lifecycle -----

    /// Starts (or restarts) replica `index` from its durable state.
    fn start(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        node.incarnation += 1;
        let durable = node.disk.durable();
        let mut config = self.config.raft.clone();
        config.id = NodeId(node.id);
        config.voters = self.ids.iter().map(|&id| NodeId(id)).collect();
        config.seed = mix(mix(self.seed, node.id), node.incarnation);
        node.machine = durable.snapshot().map_or_else(KvStateMachine::default, |snapshot| {
            KvStateMachine::restore(&snapshot.data)
        });
        let recovered = durable.recover(LogIndex(node.machine.applied()), None);
        let view = durable_view(durable);
        let commit = durable.hard_state().commit.get().max(view.snapshot_index);
        let replica = match Replica::new(config, recovered) {
            Ok(replica) => replica,
            Err(error) => self.fail(&format!("n{} cannot restart: {error}", index + 1)),
        };
        node.replica = Some(replica);
        node.next_tick = self.now + 1 + self.rng.below(node.tick_units);
        let id = node.id;
        let result = self.invariants.start(id, view, commit);
        self.check(result);
        self.record(mix(id, 0xC0DE));
        self.process(index);
    }

    /// Power loss at `node`: it stops, and every write not yet durable is lost.
    pub fn crash(&mut self, node: u64) {
        let index = index_of(node);
        let state = &mut self.nodes[index];
        if state.replica.is_none() {
            return;
        }
        state.replica = None;
        // Half the time the disk had got further than it reported (see `Disk::crash`).
        let tear = self.rng.percent(50).then(|| self.rng.next_u64());
        let state = &mut self.nodes[index];
        if state.disk.crash(tear) {
            self.stats.torn_writes += 1;
        }
        let state = &mut self.nodes[index];
        state.paused = false;
        state.held.clear();
        state.held_requests.clear();
        state.fetches.clear();
        state.reads.clear();
        state.confirmed_reads.clear();
        state.machine = KvStateMachine::default();
        self.stats.crashes += 1;
        self.record(mix(node, 0xDEAD));
    }

    /// Restarts a crashed `node` from its disk.
    pub fn restart(&mut self, node: u64) {
        let index = index_of(node);
        if self.nodes[index].replica.is_none() {
            self.start(index);
        }
    }

    /// Freezes `node`: no ticks, no input handled, until resumed (like SIGSTOP).
    pub fn pause(&mut self, node: u64) {
        let index = index_of(node);
        let state = &mut self.nodes[index];
        if state.replica.is_some() && !state.paused {
            state.paused = true;
            self.stats.pauses += 1;
            self.record(mix(node, 0x5700));
        }
    }

    /// Unfreezes `node`: it first catches up on the ticks it missed (its clock kept running), then
    /// handles what arrived meanwhile.
    pub fn resume(&mut self, node: u64) {
        let index = index_of(node);
        if !self.nodes[index].paused {
            return;
        }
        self.nodes[index].paused = false;
        self.record(mix(node, 0x60));
        self.run_ticks(index);
        for message in mem::take(&mut self.nodes[index].held) {
            self.deliver(index, message);
        }
        for request in mem::take(&mut self.nodes[index].held_requests) {
            match request {
                HeldRequest::Propose(command) => {
                    // The client waits either way; a refusal now just means it times out.
                    let _ = self.propose_at(index, &command);
                }
                HeldRequest::Read(context) => {
                    let _ = self.read_at(index, context);
                }
            }
        }
        self.complete_io(index);
    }

    /// True if `node` is running (neither crashed nor paused).
    pub fn is_up(&self, node: u64) -> bool {
        let state = &self.nodes[index_of(node)];
        state.replica.is_some() && !state.paused
    }

    /// The running replica that leads the highest term, if any.
    pub fn leader(&self) -> Option<u64> {
        self.nodes
            .iter()
            .filter(|node| !node.paused)
            .filter_map(|node| node.replica.as_ref().map(|replica| (node.id, replica)))
            .filter(|(_, replica)| replica.role() == Role::Leader)
            .max_by_key(|(_, replica)| replica.term())
            .map(|(id, _)| id)
    }

    /// Snapshots `node`'s state machine at its applied index and compacts its log there.
    pub fn compact(&mut self, node: u64) {
        let index = index_of(node);
        if !self.is_up(node) {
            return;
        }
        let state = &mut self.nodes[index];
        let applied = state.machine.applied();
        let replica = state.replica.as_mut().expect("up");
        let status = replica.status();
        // The state machine's image is at `applied`: only compactable there, and only once the
        // log through it is durable (a snapshot must not cover entries a crash could lose).
        if applied <= status.snapshot_index.get() || applied > status.persisted.get() {
            return;
        }
        let data = state.machine.snapshot();
        let meta = match replica.compact(LogIndex(applied), data.clone()) {
            Ok(meta) => meta,
            Err(error) => self.fail(&format!("n{node} refused to compact at i{applied}: {error}")),
        };
        let term = meta.term.get();
        let delay = self.disk_delay(index);
        let write = Write::Compact(Snapshot { meta, data });
        self.nodes[index].disk.submit(self.now + delay, write, AfterWrite::default());
        self.invariants.snapshot(node, applied, term);
        self.stats.compactions += 1;
        self.record(mix(node, applied));
        self.process(index);
    }

    /// Makes `node`'s disk take up to `delay_max` per write until `until` (a stalled device:
    /// the leader's own disk is not on the commit path, a follower's is).
    pub fn stall_disk(&mut self, node: u64, until: u64) {
        self.nodes[index_of(node)].slow_disk_until = until;
        self.stats.disk_stalls += 1;
        self.record(mix(node, until));
    }

    fn disk_delay(&mut self, index: usize) -> u64 {
        let delay_max = if self.nodes[index].slow_disk_until > self.now {
            // Up to two election timeouts per write.
            2 * u64::from(self.config.raft.election_ticks) * TICK_UNITS
        } else {
            self.config.disk_delay_max
        };
        self.rng.between(1, delay_max)
    }

    /// Asks the leader `from` to hand leadership to `to`.
    pub fn transfer(&mut self, from: u64, to: u64) {
        let index = index_of(from);
        if !self.is_up(from) {
            return;
        }
        let replica = self.nodes[index].replica.as_mut().expect("up");
        if replica.transfer_leadership(NodeId(to)).is_ok() {
            self.stats.transfers += 1;
            self.record(mix(from, to));
            self.process(index);
        }
    }

    // ----- time -----

    /// Advances time by one unit: ticks, deliveries, completed writes and reads.
    pub fn advance(&mut self) {
        self.now += 1;
        self.stamps_now = 0;
        for index in 0..self.nodes.len() {
            self.run_ticks(index);
        }
        while let Some(envelope) = self.network.pop_due(self.now) {
            let index = index_of(envelope.to);
            self.deliver(index, envelope.message);
        }
        for index in 0..self.nodes.len() {
            self.complete_io(index);
        }
    }

    fn run_ticks(&mut self, index: usize) {
        loop {
            let node = &mut self.nodes[index];
            if node.paused || node.next_tick > self.now {
                return;
            }
            node.next_tick += node.tick_units;
            let Some(replica) = node.replica.as_mut() else { return };
            replica.tick();
            self.process(index);
        }
    }

    fn deliver(&mut self, index: usize, message: Message) {
        let node = &mut self.nodes[index];
        if node.paused {
            node.held.push(message);
            return;
        }
        let Some(replica) = node.replica.as_mut() else { return };
        let summary = (message.from.get(), message.term.get(), message.body.name());
        if let Err(error) = replica.step(message) {
            self.fail(&format!(
                "n{} refused a message from n{} (t{}, {}): {error}",
                index + 1,
                summary.0,
                summary.1,
                summary.2
            ));
        }
        self.record(mix(mix(index as u64, summary.0), summary.1));
        self.process(index);
    }

    /// Completes due writes and storage reads of replica `index`.
    fn complete_io(&mut self, index: usize) {
        if self.nodes[index].paused {
            return;
        }
        while let Some(after) = self.nodes[index].disk.complete_due(self.now) {
            let node = &mut self.nodes[index];
            let replica = node.replica.as_mut().expect("a crashed disk has no writes");
            if let Some((term, last)) = after.persisted {
                replica.on_persisted(term, last);
            }
            for message in after.messages {
                self.send(message);
            }
            self.record(mix(index as u64, 0xD15C));
            self.process(index);
        }
        while self.nodes[index].fetches.front().is_some_and(|&(at, _)| at <= self.now) {
            let node = &mut self.nodes[index];
            let (_, fetch) = node.fetches.pop_front().expect("due");
            let entries = node.disk.durable().fetch(&fetch);
            let replica = node.replica.as_mut().expect("a crashed replica has no reads");
            let terms: Vec<(u64, u64, Option<u64>)> = entries
                .iter()
                .map(|entry| {
                    let index = entry.index;
                    (index.get(), entry.term.get(), replica.term_at(index).map(Term::get))
                })
                .collect();
            if let Err(error) = replica.on_fetched(fetch, entries) {
                self.fail(&format!(
                    "n{} refused storage's answer to {fetch:?}: {error}; (index, term stored, \
                     term in the replica's log): {terms:?}; {}",
                    index + 1,
                    self.describe()
                ));
            }
            self.stats.fetches += 1;
            self.record(mix(index as u64, fetch.low.get()));
            self.process(index);
        }
    }

    fn send(&mut self, message: Message) {
        self.record(mix(mix(message.from.get(), message.to.get()), message.term.get()));
        self.network.send(self.now, message.from.get(), message.to.get(), message);
    }

    // ----- the Ready loop -----

    /// Drains replica `index`'s Readys, then checks every invariant.
    fn process(&mut self, index: usize) {
        loop {
            let Some(replica) = self.nodes[index].replica.as_mut() else { return };
            if !replica.has_ready() {
                break;
            }
            let term = replica.term().get();
            let mut ready = replica.ready();
            let early = (self.config.driver_bug == Some(DriverBug::AckBeforePersist))
                .then(|| ready.last_entry())
                .flatten();
            self.handle_ready(index, term, &mut ready);
            let replica = self.nodes[index].replica.as_mut().expect("still up");
            replica.advance(ready);
            if let Some((term, last)) = early {
                replica.on_persisted(term, last);
            }
        }
        let node = &self.nodes[index];
        let replica = node.replica.as_ref().expect("still up");
        if let Err(error) = replica.check_invariants() {
            self.fail(&format!("n{}: {error}", node.id));
        }
        let (id, term, leader, commit) = (
            node.id,
            replica.term().get(),
            replica.role() == Role::Leader,
            replica.commit_index().get(),
        );
        self.stats.max_term = self.stats.max_term.max(term);
        let result = self.invariants.status(id, term, leader, commit);
        self.check(result);
    }

    fn handle_ready(&mut self, index: usize, term: u64, ready: &mut Ready) {
        let id = self.nodes[index].id;
        for message in mem::take(&mut ready.messages) {
            self.send(message);
        }
        // Persistence: the snapshot, then the entries, then the hard state, after a delay.
        if let Some(snapshot) = &ready.snapshot {
            let node = &mut self.nodes[index];
            node.machine = KvStateMachine::restore(&snapshot.data);
            self.invariants.snapshot(id, snapshot.meta.index.get(), snapshot.meta.term.get());
            self.stats.snapshots_installed += 1;
            self.record(mix(id, snapshot.meta.index.get()));
        }
        let facts: Vec<EntryFact> = ready.entries.iter().map(fact).collect();
        let result = self.invariants.append(id, &facts);
        self.check(result);
        let mut after = AfterWrite {
            persisted: ready.last_entry(),
            messages: mem::take(&mut ready.persisted_messages).into_messages_after_persist(),
        };
        if self.config.driver_bug == Some(DriverBug::AckBeforePersist) {
            after.persisted = None;
            for message in mem::take(&mut after.messages) {
                self.send(message);
            }
        }
        let empty = ready.hard_state.is_none()
            && ready.snapshot.is_none()
            && ready.entries.is_empty()
            && after.messages.is_empty();
        if !empty {
            let write = Write::Ready(Ready {
                hard_state: ready.hard_state,
                snapshot: ready.snapshot.clone(),
                entries: ready.entries.clone(),
                ..Ready::default()
            });
            let delay = self.disk_delay(index);
            self.nodes[index].disk.submit(self.now + delay, write, after);
            self.record(mix(id, facts.last().map_or(0, |fact| fact.index)));
        }
        // Apply what is committed.
        for entry in &ready.committed_entries {
            let result = self.invariants.committed(id, term, fact(entry));
            self.check(result);
            let payload = (entry.kind == EntryKind::Normal).then_some(&entry.payload);
            let applied =
                self.nodes[index].machine.apply(entry.index.get(), entry.term.get(), payload);
            if let Some((command, output)) = applied {
                let at = self.stamp();
                self.applied_commands.entry((command.client, command.seq)).or_insert(at);
                self.responses.push(Response::Applied { node: id, at, command, output });
            }
            let chain = self.nodes[index].machine.chain();
            let result = self.invariants.applied(id, entry.index.get(), chain);
            self.check(result);
        }
        if let Some(last) = ready.committed_entries.last() {
            self.stats.committed = self.stats.committed.max(last.index.get());
            self.record(mix(id, self.nodes[index].machine.chain()));
            self.nodes[index].replica.as_mut().expect("up").on_applied(last.index);
        }
        // Reads: confirmed ones wait until the state machine has caught up.
        let node = &mut self.nodes[index];
        for read in &ready.read_states {
            if node.reads.contains_key(&read.context) {
                node.confirmed_reads.push((read.index.get(), read.context));
            }
        }
        self.serve_reads(index);
        for fetch in mem::take(&mut ready.fetches) {
            let delay = self.rng.below(self.config.fetch_delay_max + 1);
            let node = &mut self.nodes[index];
            let at = node.fetches.back().map_or(0, |&(at, _)| at).max(self.now + delay);
            node.fetches.push_back((at, fetch));
        }
    }

    fn serve_reads(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        let applied = node.machine.applied();
        let mut served = Vec::new();
        node.confirmed_reads.retain(|&(at, context)| {
            if at > applied {
                return true;
            }
            if let Some((client, seq, key)) = node.reads.remove(&context) {
                served.push((context, client, seq, node.machine.get(key)));
            }
            false
        });
        for (context, client, seq, value) in served {
            let at = self.stamp();
            self.responses.push(Response::Read { at, client, seq, value });
            self.record(mix(context, value.unwrap_or(0)));
        }
    }

    // ----- clients -----

    fn propose_at(&mut self, index: usize, command: &Command) -> Result<(), Rejected> {
        let node = &mut self.nodes[index];
        let Some(replica) = node.replica.as_mut() else {
            return Err(Rejected { leader_hint: None });
        };
        if node.paused {
            node.held_requests.push(HeldRequest::Propose(command.clone()));
            return Ok(());
        }
        let result = replica.propose(command.encode());
        self.record(mix(command.client, command.seq));
        match result {
            Ok(_) => {
                self.process(index);
                Ok(())
            }
            Err(ProposeError::NotLeader { leader_hint }) => {
                Err(Rejected { leader_hint: leader_hint.map(NodeId::get) })
            }
            Err(_) => Err(Rejected { leader_hint: None }),
        }
    }

    fn read_at(&mut self, index: usize, context: u64) -> Result<(), Rejected> {
        let node = &mut self.nodes[index];
        let Some(replica) = node.replica.as_mut() else {
            return Err(Rejected { leader_hint: None });
        };
        if node.paused {
            node.held_requests.push(HeldRequest::Read(context));
            return Ok(());
        }
        let result = replica.read_index(context);
        self.record(context);
        match result {
            Ok(()) => {
                self.process(index);
                Ok(())
            }
            Err(error) => {
                self.nodes[index].reads.remove(&context);
                match error {
                    ReadError::NotLeader { leader_hint } => {
                        Err(Rejected { leader_hint: leader_hint.map(NodeId::get) })
                    }
                    _ => Err(Rejected { leader_hint: None }),
                }
            }
        }
    }

    // ----- the end -----

    /// True if every replica runs, has applied the same last index as every other and the same
    /// state, no write is in the air, and one of them leads.
    pub fn converged(&self) -> bool {
        let Some(first) = self.nodes.first() else { return true };
        self.leader().is_some()
            && self.nodes.iter().all(|node| {
                node.replica.as_ref().is_some_and(|replica| {
                    !node.paused
                        && node.disk.pending() == 0
                        && replica.commit_index().get() == node.machine.applied()
                        && node.machine.applied() == first.machine.applied()
                        && node.machine.registers() == first.machine.registers()
                        && node.machine.chain() == first.machine.chain()
                })
            })
    }

    /// True if every replica's state machine has a value for `key`.
    pub fn probe_applied(&self, key: u64) -> bool {
        self.nodes.iter().all(|node| node.machine.get(key).is_some())
    }

    /// A one-line summary of every replica, for failure reports.
    pub fn describe(&self) -> String {
        self.nodes
            .iter()
            .map(|node| match &node.replica {
                None => format!("n{}: crashed", node.id),
                Some(replica) => {
                    let status = replica.status();
                    format!(
                        "n{}: {:?} t{} commit i{} last i{} persisted i{} applied i{} \
                         snapshot i{}{}",
                        node.id,
                        status.role,
                        status.term.get(),
                        status.commit.get(),
                        status.last_index.get(),
                        status.persisted.get(),
                        node.machine.applied(),
                        status.snapshot_index.get(),
                        if node.paused { " (paused)" } else { "" }
                    )
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl Frontend for Cluster {
    fn stamp(&mut self) -> u64 {
        Cluster::stamp(self)
    }

    fn propose(&mut self, node: u64, command: &Command) -> Result<(), Rejected> {
        let index = index_of(node);
        self.propose_at(index, command)
    }

    fn read(&mut self, node: u64, client: u64, seq: u64, key: u64) -> Result<(), Rejected> {
        let index = index_of(node);
        self.next_context += 1;
        let context = self.next_context;
        let state = &mut self.nodes[index];
        if state.replica.is_none() {
            return Err(Rejected { leader_hint: None });
        }
        if self.config.driver_bug == Some(DriverBug::LocalReads) {
            let value = state.machine.get(key);
            let at = self.stamp();
            self.responses.push(Response::Read { at, client, seq, value });
            return Ok(());
        }
        state.reads.insert(context, (client, seq, key));
        self.read_at(index, context)
    }
}

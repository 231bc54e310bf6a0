//! The state machine every simulated replica runs: the built-in [`KvStateMachine`], wrapped so
//! that the simulator sees every entry applied on every replica (the shard applies inside
//! `ShardCore::collect`, where nothing else could look). The wrapper reports to one [`Oracle`]
//! per run, which knows what every replica of every group applied and checks, entry by entry:
//!
//! - state machine safety: one entry per `(group, index)`, whoever applies it;
//! - identical state at the same applied index: a digest of the key-value contents after each
//!   entry and after each snapshot restore, equal on every replica;
//! - each client operation sits at one index of its group's log (never applied twice);
//! - when each operation first took effect, so unanswered writes can be resolved in the
//!   history (see `workload.rs`).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use bytes::Bytes;
use flotilla::kv::{
    Command, KvConfig, KvStateMachine, Proposal, Query, QueryResult, Request, StateMachine,
};
use flotilla::raftgroup::{Entry, EntryKind, LogIndex, NodeId};
use flotilla::wal::GroupId;

/// FNV-1a over `bytes`, continuing from `hash`: fixed forever, so traces replay across builds.
pub fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Mixes `value` into `hash` (for trace hashes).
pub fn mix(hash: u64, value: u64) -> u64 {
    fnv(hash, &value.to_le_bytes())
}

/// The FNV offset basis: the start of every hash.
pub const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// The operation id a written value carries (values are operation ids, 8 bytes little-endian).
pub fn op_of(value: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(value.try_into().ok()?))
}

/// The operation a log entry carries, if it is a client write.
pub fn op_of_entry(entry: &Entry) -> Option<u64> {
    if entry.kind != EntryKind::Normal {
        return None;
    }
    let proposal = Proposal::decode(&entry.payload).ok()?;
    match proposal.request {
        Request::Unsessioned(Command::Put { value, .. }) => op_of(&value),
        Request::Unsessioned(Command::CompareAndSet { new: Some(new), .. }) => op_of(&new),
        _ => None,
    }
}

/// A digest of a key-value state at its applied index: equal states, equal digests.
pub fn digest(machine: &KvStateMachine) -> u64 {
    let mut hash = mix(FNV_START, machine.applied_index().0);
    for (key, value) in machine.iter() {
        hash = fnv(mix(hash, key.len() as u64), key);
        hash = fnv(mix(hash, value.len() as u64), value);
    }
    hash
}

fn entry_hash(entry: &Entry) -> u64 {
    let kind = match entry.kind {
        EntryKind::Normal => 0,
        EntryKind::Membership => 1,
        EntryKind::Empty => 2,
    };
    fnv(mix(mix(mix(FNV_START, entry.index.0), entry.term.0), kind), &entry.payload)
}

/// What the simulator knows of everything every replica applied.
#[derive(Debug, Default)]
pub struct Oracle {
    /// The history timestamp of what happens now (set by the cluster before each shard step).
    pub now_stamp: u64,
    /// Per group, per index: the entry applied there and the state digest right after it.
    applied: HashMap<GroupId, BTreeMap<u64, (Option<u64>, u64)>>,
    /// Operation id → when it first took effect (a history timestamp).
    took_effect: HashMap<u64, u64>,
    /// Operation id → where it sits in its group's log.
    position: HashMap<u64, (GroupId, u64)>,
    /// What went wrong, in order.
    pub violations: Vec<String>,
    /// Entries applied, over all replicas.
    pub applies: u64,
    /// Snapshots restored, over all replicas.
    pub restores: u64,
}

impl Oracle {
    /// When operation `op` first took effect on some replica, if it did.
    pub fn took_effect(&self, op: u64) -> Option<u64> {
        self.took_effect.get(&op).copied()
    }

    fn on_entry(&mut self, node: NodeId, group: GroupId, entry: &Entry, state: u64) {
        self.applies += 1;
        let index = entry.index.0;
        let hash = entry_hash(entry);
        let slot = self.applied.entry(group).or_default().entry(index).or_insert((None, state));
        match slot.0 {
            None => slot.0 = Some(hash),
            Some(seen) if seen != hash => self.violations.push(format!(
                "state machine safety: {node} applied a different entry at group {group} index \
                 {index} (term {}) than another replica",
                entry.term
            )),
            Some(_) => {}
        }
        if slot.1 != state {
            self.violations.push(format!(
                "{node}'s state of group {group} after index {index} differs from another \
                 replica's at the same index"
            ));
        }
        if let Some(op) = op_of_entry(entry) {
            let stamp = self.now_stamp;
            self.took_effect.entry(op).and_modify(|at| *at = (*at).min(stamp)).or_insert(stamp);
            match self.position.get(&op) {
                None => {
                    self.position.insert(op, (group, index));
                }
                Some(&(g, i)) if (g, i) != (group, index) => self.violations.push(format!(
                    "operation {op} applied twice: group {g} index {i} and group {group} index \
                     {index} ({node})"
                )),
                Some(_) => {}
            }
        }
    }

    fn on_restore(&mut self, node: NodeId, group: GroupId, index: u64, state: u64) {
        self.restores += 1;
        let slot = self.applied.entry(group).or_default().entry(index).or_insert((None, state));
        if slot.1 != state {
            self.violations.push(format!(
                "{node} restored a snapshot of group {group} at index {index} whose state \
                 differs from what replicas applied up to that index"
            ));
        }
    }
}

/// [`KvStateMachine`] reporting to the run's [`Oracle`].
#[derive(Debug)]
pub struct TracedKv {
    node: NodeId,
    group: GroupId,
    inner: KvStateMachine,
    oracle: Rc<RefCell<Oracle>>,
}

impl TracedKv {
    /// A new (empty) state machine of `group` on `node`.
    pub fn new(node: NodeId, group: GroupId, oracle: Rc<RefCell<Oracle>>) -> Self {
        // Sessions are not used (clients write unsessioned commands with unique values), and
        // leader time stays 0: no expiry can differ between replicas.
        Self { node, group, inner: KvStateMachine::new(KvConfig::default()), oracle }
    }

    /// An empty state machine of the same group, node and oracle (what the driver's factory
    /// makes to restore a leader's snapshot into).
    pub fn fresh(&self) -> Self {
        Self::new(self.node, self.group, Rc::clone(&self.oracle))
    }

    /// The wrapped store.
    pub fn inner(&self) -> &KvStateMachine {
        &self.inner
    }
}

impl StateMachine for TracedKv {
    type Response = <KvStateMachine as StateMachine>::Response;
    type Query = Query;
    type QueryResult = QueryResult;
    type RestoreError = <KvStateMachine as StateMachine>::RestoreError;
    type Snapshot = <KvStateMachine as StateMachine>::Snapshot;

    fn apply(&mut self, entries: &[Entry], responses: &mut Vec<Self::Response>) {
        // One entry at a time, so the state after every index can be compared across replicas.
        let mut oracle = self.oracle.borrow_mut();
        for entry in entries {
            self.inner.apply(std::slice::from_ref(entry), responses);
            oracle.on_entry(self.node, self.group, entry, digest(&self.inner));
        }
    }

    fn query(&self, query: &Query) -> QueryResult {
        self.inner.query(query)
    }

    fn applied_index(&self) -> LogIndex {
        self.inner.applied_index()
    }

    fn snapshot(&self) -> Self::Snapshot {
        self.inner.snapshot()
    }

    fn restore(&mut self, snapshot: &Bytes) -> Result<(), Self::RestoreError> {
        self.inner.restore(snapshot)?;
        let index = self.inner.applied_index().0;
        self.oracle.borrow_mut().on_restore(self.node, self.group, index, digest(&self.inner));
        Ok(())
    }
}

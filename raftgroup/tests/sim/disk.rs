//! A simulated disk per replica: what a replica hands out to persist reaches its [`MemStorage`]
//! only after a delay, in order, and a crash loses every write not yet complete.

use std::collections::VecDeque;

use flotilla_raftgroup::{MemStorage, Ready, Snapshot};

use super::invariants::LogView;
use super::kv::hash_entry;

/// One write handed to the disk.
#[derive(Debug)]
pub enum Write {
    /// A Ready's snapshot, entries and hard state (its other fields are empty).
    Ready(Ready),
    /// A compaction of the log into a snapshot taken by the application.
    Compact(Snapshot),
}

/// A replica's disk: the durable state and the writes still in the air.
#[derive(Debug)]
pub struct Disk<T> {
    durable: MemStorage,
    /// Writes in submission order with their completion times (non-decreasing) and what to do
    /// once they are durable.
    queue: VecDeque<(u64, Write, T)>,
}

impl<T> Disk<T> {
    /// An empty disk.
    pub fn new() -> Self {
        Disk { durable: MemStorage::new(), queue: VecDeque::new() }
    }

    /// What is durable.
    pub fn durable(&self) -> &MemStorage {
        &self.durable
    }

    /// Queues `write`, durable at `done_at` or when the write before it is, whichever is later;
    /// `then` is handed back when it completes.
    pub fn submit(&mut self, done_at: u64, write: Write, then: T) {
        let done_at = self.queue.back().map_or(done_at, |&(last, _, _)| last.max(done_at));
        self.queue.push_back((done_at, write, then));
    }

    /// Completes the next write if it is due by `now`, returning its `then`.
    pub fn complete_due(&mut self, now: u64) -> Option<T> {
        if self.queue.front()?.0 > now {
            return None;
        }
        let (_, write, then) = self.queue.pop_front().expect("a write is due");
        match write {
            Write::Ready(ready) => {
                let _ = self.durable.persist(&ready);
            }
            Write::Compact(snapshot) => self.durable.compact(snapshot),
        }
        Some(then)
    }

    /// Writes in the air.
    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    /// Power loss: every write not yet complete is lost.
    pub fn crash(&mut self) {
        self.queue.clear();
    }
}

/// The durable log as the invariant checker sees it.
pub fn durable_view(storage: &MemStorage) -> LogView {
    let snapshot = storage.snapshot().map(|snapshot| &snapshot.meta);
    LogView {
        snapshot_index: snapshot.map_or(0, |meta| meta.index.get()),
        snapshot_term: snapshot.map_or(0, |meta| meta.term.get()),
        entries: storage
            .entries()
            .iter()
            .map(|entry| (entry.term.get(), hash_entry(entry)))
            .collect(),
    }
}

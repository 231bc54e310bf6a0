//! A simulated disk per replica: what a replica hands out to persist reaches its [`MemStorage`]
//! only after a delay, in order, and a crash loses every write not yet complete (tearing the one
//! in progress).

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
        self.land(write);
        Some(then)
    }

    /// Writes in the air.
    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    /// Power loss: every write not yet reported complete is lost, except that with
    /// `tear = Some(random)` the disk had got further than reported: `random` picks a point in
    /// the entries in the air; the writes before it landed whole, and the write it falls in landed
    /// up to it, without its hard state (storage writes a Ready's snapshot, entries and hard
    /// state in that order). A write carrying a snapshot is never torn, only landed whole or not
    /// at all. Returns true if something not reported landed.
    pub fn crash(&mut self, tear: Option<u64>) -> bool {
        let mut landed = false;
        if let Some(random) = tear {
            let in_air: u64 = self.queue.iter().map(|(_, write, _)| entry_count(write)).sum();
            let mut cut = if in_air == 0 { 0 } else { random % in_air };
            while let Some((_, write, _)) = self.queue.pop_front() {
                let count = entry_count(&write);
                if cut >= count {
                    // Landed whole.
                    cut -= count;
                    self.land(write);
                    landed = true;
                    continue;
                }
                if let Write::Ready(ready) = &write
                    && ready.snapshot.is_none()
                    && cut > 0
                {
                    let torn = Ready {
                        entries: ready.entries[..cut as usize].to_vec(),
                        ..Ready::default()
                    };
                    let _ = self.durable.persist(&torn);
                    landed = true;
                }
                break;
            }
        }
        self.queue.clear();
        landed
    }

    fn land(&mut self, write: Write) {
        match write {
            Write::Ready(ready) => {
                let _ = self.durable.persist(&ready);
            }
            Write::Compact(snapshot) => self.durable.compact(snapshot),
        }
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

/// Entries a write carries (what a tear can cut into).
fn entry_count(write: &Write) -> u64 {
    match write {
        Write::Ready(ready) => ready.entries.len() as u64,
        Write::Compact(_) => 0,
    }
}

//! [`MemStorage`]: an in-memory log store for tests and simulators.

use crate::ready::{Fetch, Ready};
use crate::replica::RecoveredState;
use crate::types::{Entry, HardState, LogIndex, Membership, Snapshot, Term};

/// Durable state of one replica, kept in memory: what a real storage would have on disk.
///
/// It does what a driver does with a [`Ready`]: [`MemStorage::persist`] writes the snapshot,
/// entries and hard state; [`MemStorage::fetch`] answers [`Fetch`]es; [`MemStorage::recover`]
/// builds the [`RecoveredState`] of a restart.
#[derive(Clone, Debug, Default)]
pub struct MemStorage {
    hard_state: HardState,
    snapshot: Option<Snapshot>,
    /// Entries after the snapshot, consecutive.
    entries: Vec<Entry>,
}

impl MemStorage {
    /// Empty storage: a new replica.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes a Ready's snapshot, entries and hard state durable, in that order. Returns the
    /// `(term, index)` of the last entry written, for [`crate::Replica::on_persisted`].
    pub fn persist(&mut self, ready: &Ready) -> Option<(Term, LogIndex)> {
        if let Some(snapshot) = &ready.snapshot {
            self.install_snapshot(snapshot.clone());
        }
        if let Some(first) = ready.entries.first() {
            let keep = first.index.0.saturating_sub(self.first_index().0) as usize;
            assert!(
                first.index <= self.last_index().next() && first.index >= self.first_index(),
                "entries must continue the stored log"
            );
            self.entries.truncate(keep);
            self.entries.extend(ready.entries.iter().cloned());
        }
        if let Some(hard_state) = ready.hard_state {
            self.hard_state = hard_state;
        }
        ready.last_entry()
    }

    /// Replaces everything by `snapshot`.
    pub fn install_snapshot(&mut self, snapshot: Snapshot) {
        let index = snapshot.meta.index;
        let keep_from = self.entries.partition_point(|entry| entry.index <= index);
        let matches = self
            .entries
            .get(keep_from.wrapping_sub(1))
            .is_some_and(|entry| entry.index == index && entry.term == snapshot.meta.term);
        if matches {
            self.entries.drain(..keep_from);
        } else {
            self.entries.clear();
        }
        self.hard_state.commit = self.hard_state.commit.max(index);
        self.snapshot = Some(snapshot);
    }

    /// Drops the entries the application compacted into `snapshot` (as returned with the meta
    /// by [`crate::Replica::compact`]).
    pub fn compact(&mut self, snapshot: Snapshot) {
        self.install_snapshot(snapshot);
    }

    /// Answers a [`Fetch`]: entries from `fetch.low`, at most `fetch.max_bytes` (at least one),
    /// or nothing if they were compacted.
    pub fn fetch(&self, fetch: &Fetch) -> Vec<Entry> {
        let mut out = Vec::new();
        if fetch.low < self.first_index() {
            return out;
        }
        let mut bytes = 0;
        let start = (fetch.low.0 - self.first_index().0) as usize;
        for entry in self.entries.iter().skip(start) {
            if entry.index > fetch.high {
                break;
            }
            bytes += entry.size_bytes();
            if bytes > fetch.max_bytes && !out.is_empty() {
                break;
            }
            out.push(entry.clone());
        }
        out
    }

    /// What a restarted replica recovers; `applied` and `membership` come from the state machine.
    ///
    /// Like a real log store, it hands over the term starts and only the last
    /// [`MemStorage::RECOVERED_TAIL_ENTRIES`] entries: the replica fetches older ones when needed.
    pub fn recover(
        &self,
        applied: LogIndex,
        membership: Option<(LogIndex, Membership)>,
    ) -> RecoveredState {
        let mut term_starts: Vec<(LogIndex, Term)> = Vec::new();
        for entry in &self.entries {
            if term_starts.last().is_none_or(|&(_, term)| term != entry.term) {
                term_starts.push((entry.index, entry.term));
            }
        }
        let tail = self.entries.len().saturating_sub(Self::RECOVERED_TAIL_ENTRIES);
        RecoveredState {
            hard_state: self.hard_state,
            snapshot: self.snapshot.clone(),
            entries: self.entries[tail..].to_vec(),
            term_starts,
            last_index: self.last_index(),
            applied,
            membership,
        }
    }

    /// Entries [`MemStorage::recover`] hands over with the term starts.
    pub const RECOVERED_TAIL_ENTRIES: usize = 4;

    /// Loses every entry after `index` (a crash that lost unsynced writes in a simulator).
    pub fn truncate_after(&mut self, index: LogIndex) {
        let keep = self.entries.partition_point(|entry| entry.index <= index);
        self.entries.truncate(keep);
    }

    /// The persisted hard state.
    pub fn hard_state(&self) -> HardState {
        self.hard_state
    }

    /// The persisted snapshot.
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref()
    }

    /// The persisted entries after the snapshot.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Index of the first entry after the snapshot.
    pub fn first_index(&self) -> LogIndex {
        self.snapshot.as_ref().map_or(LogIndex(1), |snapshot| snapshot.meta.index.next())
    }

    /// Index of the last entry (the snapshot's if none).
    pub fn last_index(&self) -> LogIndex {
        LogIndex(self.first_index().0 + self.entries.len() as u64 - 1)
    }
}

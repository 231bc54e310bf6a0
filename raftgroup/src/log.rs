//! The replica's view of its log: positions, terms, and the entries it holds in memory.
//!
//! Storage owns the durable log; this keeps only what consensus needs without IO:
//! - the term of *every* index from the snapshot onward, as runs `(first index, term)` — terms
//!   change rarely, so this is a handful of pairs, and log matching never needs a storage read;
//! - a contiguous in-memory suffix of entries: the unstable tail (not yet durable, never evicted)
//!   preceded by a cache of durable entries bounded in bytes. Older entries are fetched.

use std::collections::VecDeque;

use crate::types::{Entry, LogIndex, SnapshotMeta, Term};

/// The in-memory log. See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct RaftLog {
    /// Index and term of the last entry covered by the snapshot (zero without one).
    snapshot_index: LogIndex,
    snapshot_term: Term,
    /// Index of the last entry.
    last: LogIndex,
    /// Term runs covering `snapshot_index + 1 ..= last`: each `(start, term)` holds until the next.
    terms: Vec<(LogIndex, Term)>,
    /// Entries `last - len + 1 ..= last`.
    entries: VecDeque<Entry>,
    /// Sum of `size_bytes` of `entries`.
    entries_bytes: u64,
    /// Entries through this index are durable.
    pub(crate) stable: LogIndex,
    /// Entries through this index were handed to storage in a `Ready`.
    pub(crate) handed: LogIndex,
    /// The commit index.
    pub(crate) commit: LogIndex,
}

/// The entries wanted are not in memory: read `low..=high` from storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NotInMemory {
    pub(crate) low: LogIndex,
    pub(crate) high: LogIndex,
}

impl RaftLog {
    /// A log that starts after `snapshot_index`/`snapshot_term`, all durable. Without
    /// `term_starts`, `entries` are all the entries after the snapshot; with them (the first
    /// index of each term and the last index), `entries` may be any suffix, kept as the cache.
    pub(crate) fn recover(
        snapshot_index: LogIndex,
        snapshot_term: Term,
        term_starts: Option<(&[(LogIndex, Term)], LogIndex)>,
        entries: Vec<Entry>,
        commit: LogIndex,
    ) -> Result<Self, &'static str> {
        let mut log =
            Self { snapshot_index, snapshot_term, last: snapshot_index, ..Self::default() };
        if let Some((starts, last)) = term_starts {
            let increasing =
                starts.windows(2).all(|pair| pair[0].0 < pair[1].0 && pair[0].1 < pair[1].1);
            if !increasing {
                return Err("recovered term starts do not increase");
            }
            match starts.first() {
                None if last > snapshot_index => return Err("recovered log without term starts"),
                Some(&(start, term)) if start != snapshot_index.next() || term < snapshot_term => {
                    return Err("recovered term starts do not begin after the snapshot");
                }
                _ => {}
            }
            if starts.last().is_some_and(|&(start, _)| start > last) || last < snapshot_index {
                return Err("recovered last index before the term starts or the snapshot");
            }
            log.terms = starts.to_vec();
            log.last = last;
            let suffix_first = entries.first().map_or(last.next(), |entry| entry.index);
            for (offset, entry) in entries.iter().enumerate() {
                if entry.index.0 != suffix_first.0 + offset as u64
                    || log.term(entry.index) != Some(entry.term)
                {
                    return Err("recovered entries do not match the term starts");
                }
            }
            if entries.last().is_some_and(|entry| entry.index != last)
                || suffix_first <= snapshot_index
            {
                return Err("recovered entries are not a suffix of the log");
            }
            log.entries_bytes = entries.iter().map(Entry::size_bytes).sum();
            log.entries = entries.into();
        } else {
            let mut previous_term = snapshot_term;
            for entry in entries {
                if entry.index != log.last.next() {
                    return Err("recovered entries are not consecutive after the snapshot");
                }
                if entry.term < previous_term {
                    return Err("recovered entry terms decrease");
                }
                previous_term = entry.term;
                log.push(entry);
            }
        }
        log.stable = log.last;
        log.handed = log.last;
        if commit > log.last {
            return Err("recovered commit index is beyond the last entry");
        }
        log.commit = commit.max(snapshot_index);
        Ok(log)
    }

    pub(crate) fn last_index(&self) -> LogIndex {
        self.last
    }

    pub(crate) fn snapshot_index(&self) -> LogIndex {
        self.snapshot_index
    }

    pub(crate) fn last_term(&self) -> Term {
        self.terms.last().map_or(self.snapshot_term, |&(_, term)| term)
    }

    /// First index held in memory (`last + 1` if none).
    fn memory_first(&self) -> LogIndex {
        LogIndex(self.last.0 + 1 - self.entries.len() as u64)
    }

    /// The term of the entry at `index`, if the log covers it (the snapshot point included).
    pub(crate) fn term(&self, index: LogIndex) -> Option<Term> {
        if index == self.snapshot_index {
            return Some(self.snapshot_term);
        }
        if index < self.snapshot_index || index > self.last {
            return None;
        }
        let run = self.terms.partition_point(|&(start, _)| start <= index);
        Some(self.terms[run - 1].1)
    }

    /// True if a log ending at `(last_index, last_term)` is at least as up to date as this one.
    pub(crate) fn is_up_to_date(&self, last_index: LogIndex, last_term: Term) -> bool {
        (last_term, last_index) >= (self.last_term(), self.last)
    }

    /// The largest index at most `index` whose term is at most `term`, with its term: where a
    /// leader should probe after a rejection (fast backtracking). Never below the snapshot.
    pub(crate) fn find_conflict_by_term(&self, index: LogIndex, term: Term) -> (LogIndex, Term) {
        let mut index = index.min(self.last);
        if index < self.snapshot_index {
            // Compacted: the term is unknown, and the leader will send a snapshot from here.
            return (index, Term::ZERO);
        }
        if index == self.snapshot_index {
            return (self.snapshot_index, self.snapshot_term);
        }
        for &(start, run_term) in self.terms.iter().rev() {
            if start > index {
                continue;
            }
            if run_term <= term {
                return (index, run_term);
            }
            index = start.prev();
        }
        (self.snapshot_index, self.snapshot_term)
    }

    fn push(&mut self, entry: Entry) {
        assert_eq!(entry.index, self.last.next(), "log entries must be consecutive");
        if self.last_term() != entry.term || self.terms.is_empty() {
            self.terms.push((entry.index, entry.term));
        }
        self.last = entry.index;
        self.entries_bytes += entry.size_bytes();
        self.entries.push_back(entry);
    }

    /// Appends entries created by this replica as leader.
    pub(crate) fn append(&mut self, entry: Entry) {
        assert!(entry.term >= self.last_term(), "a leader appends only entries of its own term");
        self.push(entry);
    }

    /// Removes every entry after `index`.
    fn truncate_after(&mut self, index: LogIndex) {
        assert!(index >= self.commit, "never truncate committed entries");
        while self.terms.last().is_some_and(|&(start, _)| start > index) {
            self.terms.pop();
        }
        while self.entries.back().is_some_and(|entry| entry.index > index) {
            let entry = self.entries.pop_back().expect("checked non-empty");
            self.entries_bytes -= entry.size_bytes();
        }
        self.last = index;
        self.stable = self.stable.min(index);
        self.handed = self.handed.min(index);
    }

    /// Follower append after `prev` matched: skips entries already present, truncates at the first
    /// conflict and appends the rest. Returns the conflict index if it is committed (a broken
    /// leader), leaving the log unchanged.
    pub(crate) fn merge(&mut self, entries: Vec<Entry>) -> Result<(), LogIndex> {
        let conflict = entries.iter().position(|entry| self.term(entry.index) != Some(entry.term));
        let Some(position) = conflict else { return Ok(()) };
        let conflict_index = entries[position].index;
        if conflict_index <= self.commit {
            return Err(conflict_index);
        }
        if conflict_index <= self.last {
            self.truncate_after(conflict_index.prev());
        }
        for entry in entries.into_iter().skip(position) {
            self.push(entry);
        }
        Ok(())
    }

    /// Entries `low..` up to `max_bytes` (at least one) and `high`, from memory.
    pub(crate) fn entries(
        &self,
        low: LogIndex,
        high: LogIndex,
        max_bytes: u64,
        out: &mut Vec<Entry>,
    ) -> Result<(), NotInMemory> {
        if low > high || low > self.last {
            return Ok(());
        }
        let memory_first = self.memory_first();
        if low < memory_first {
            return Err(NotInMemory { low, high: high.min(memory_first.prev()) });
        }
        let mut bytes = 0;
        let skip = (low.0 - memory_first.0) as usize;
        for entry in self.entries.iter().skip(skip) {
            if entry.index > high {
                break;
            }
            bytes += entry.size_bytes();
            if bytes > max_bytes && !out.is_empty() {
                break;
            }
            out.push(entry.clone());
        }
        Ok(())
    }

    /// Hands the entries not yet given to storage: `handed + 1 ..= last`.
    pub(crate) fn take_unstable(&mut self, out: &mut Vec<Entry>) {
        if self.handed == self.last {
            return;
        }
        let low = self.handed.next();
        let result = self.entries(low, self.last, u64::MAX, out);
        assert!(result.is_ok(), "unstable entries are never evicted");
        self.handed = self.last;
    }

    /// Storage reports entries through `index` (whose term is `term`) durable.
    pub(crate) fn on_persisted(&mut self, term: Term, index: LogIndex) -> bool {
        if index <= self.stable || index > self.handed || self.term(index) != Some(term) {
            return false;
        }
        self.stable = index;
        true
    }

    /// Evicts durable entries from memory: all of those at or below `unneeded`, then more from
    /// the front while memory exceeds `cache_bytes`.
    pub(crate) fn evict(&mut self, unneeded: LogIndex, cache_bytes: u64) {
        while let Some(front) = self.entries.front() {
            let durable = front.index <= self.stable;
            if !(durable && (front.index <= unneeded || self.entries_bytes > cache_bytes)) {
                break;
            }
            self.entries_bytes -= front.size_bytes();
            self.entries.pop_front();
        }
        if self.entries.is_empty() && self.entries.capacity() > 0 {
            // An idle replica should hold no buffers.
            self.entries = VecDeque::new();
        }
    }

    /// Releases spare capacity (a quiet replica keeps no buffers); changes no state.
    pub(crate) fn shrink(&mut self) {
        self.terms.shrink_to_fit();
        self.entries.shrink_to_fit();
    }

    /// Forgets everything through `index`, now covered by a snapshot.
    pub(crate) fn compact(&mut self, index: LogIndex) {
        assert!(index <= self.commit, "only committed entries are compacted");
        let term = self.term(index).expect("compaction point is in the log");
        let first_kept = self.terms.partition_point(|&(start, _)| start <= index.next());
        if first_kept > 0 {
            self.terms.drain(..first_kept - 1);
            self.terms[0].0 = self.terms[0].0.max(index.next());
        }
        if self.last == index {
            self.terms.clear();
        }
        while self.entries.front().is_some_and(|entry| entry.index <= index) {
            let entry = self.entries.pop_front().expect("checked non-empty");
            self.entries_bytes -= entry.size_bytes();
        }
        self.snapshot_index = index;
        self.snapshot_term = term;
    }

    /// Replaces the whole log by a snapshot.
    pub(crate) fn restore(&mut self, meta: &SnapshotMeta) {
        *self = Self {
            snapshot_index: meta.index,
            snapshot_term: meta.term,
            last: meta.index,
            stable: meta.index,
            handed: meta.index,
            commit: meta.index,
            ..Self::default()
        };
    }

    /// Self-checks; returns the first broken property.
    pub(crate) fn check(&self) -> Result<(), &'static str> {
        if self.commit > self.last {
            return Err("commit beyond last index");
        }
        if self.stable > self.handed || self.handed > self.last {
            return Err("stable <= handed <= last violated");
        }
        if self.commit < self.snapshot_index {
            return Err("commit below snapshot");
        }
        if self.terms.windows(2).any(|pair| pair[0].0 >= pair[1].0 || pair[0].1 >= pair[1].1) {
            return Err("term runs not increasing");
        }
        if self.terms.first().is_some_and(|&(start, term)| {
            start != self.snapshot_index.next() || term < self.snapshot_term
        }) {
            return Err("term runs do not start after the snapshot");
        }
        if self.last > self.snapshot_index && self.terms.is_empty() {
            return Err("entries without term runs");
        }
        if self.memory_first() <= self.snapshot_index {
            return Err("memory holds compacted entries");
        }
        if self.memory_first() > self.handed.next() {
            return Err("unstable entries were evicted");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::types::EntryKind;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index: LogIndex(index),
            term: Term(term),
            kind: EntryKind::Normal,
            payload: Bytes::new(),
        }
    }

    fn log_with_terms(terms: &[u64]) -> RaftLog {
        let entries = terms.iter().enumerate().map(|(i, &t)| entry(i as u64 + 1, t)).collect();
        RaftLog::recover(LogIndex(0), Term(0), None, entries, LogIndex(0)).expect("valid")
    }

    #[test]
    fn terms_are_answered_from_runs() {
        let log = log_with_terms(&[1, 1, 2, 2, 2, 5]);
        assert_eq!(log.term(LogIndex(0)), Some(Term(0)));
        assert_eq!(log.term(LogIndex(2)), Some(Term(1)));
        assert_eq!(log.term(LogIndex(5)), Some(Term(2)));
        assert_eq!(log.term(LogIndex(6)), Some(Term(5)));
        assert_eq!(log.term(LogIndex(7)), None);
        log.check().expect("consistent");
    }

    #[test]
    fn recovery_from_term_starts_needs_only_a_suffix_of_entries() {
        let starts = [(LogIndex(1), Term(1)), (LogIndex(3), Term(2)), (LogIndex(6), Term(5))];
        let suffix = vec![entry(6, 5), entry(7, 5)];
        let log = RaftLog::recover(
            LogIndex(0),
            Term(0),
            Some((&starts, LogIndex(7))),
            suffix,
            LogIndex(4),
        )
        .expect("valid");
        assert_eq!(log.term(LogIndex(2)), Some(Term(1)));
        assert_eq!(log.term(LogIndex(5)), Some(Term(2)));
        assert_eq!(log.last_index(), LogIndex(7));
        assert_eq!(log.memory_first(), LogIndex(6));
        assert_eq!(log.terms, starts);
        log.check().expect("consistent");
        let wrong_term = vec![entry(7, 4)];
        let result = RaftLog::recover(
            LogIndex(0),
            Term(0),
            Some((&starts, LogIndex(7))),
            wrong_term,
            LogIndex(0),
        );
        assert!(result.is_err(), "entries must agree with the term starts");
        let not_suffix = vec![entry(5, 2)];
        let result = RaftLog::recover(
            LogIndex(0),
            Term(0),
            Some((&starts, LogIndex(7))),
            not_suffix,
            LogIndex(0),
        );
        assert!(result.is_err(), "entries must end at the last index");
    }

    #[test]
    fn conflict_truncates_and_replaces_the_tail() {
        let mut log = log_with_terms(&[1, 1, 2, 2]);
        log.merge(vec![entry(3, 3), entry(4, 3), entry(5, 3)]).expect("uncommitted conflict");
        assert_eq!(log.last_index(), LogIndex(5));
        assert_eq!(log.term(LogIndex(2)), Some(Term(1)));
        assert_eq!(log.term(LogIndex(3)), Some(Term(3)));
        assert_eq!(log.stable, LogIndex(2), "the durable tail was overwritten");
        log.check().expect("consistent");
    }

    #[test]
    fn conflict_on_committed_entry_is_refused() {
        let mut log = log_with_terms(&[1, 1, 2]);
        log.commit = LogIndex(3);
        assert_eq!(log.merge(vec![entry(3, 3)]), Err(LogIndex(3)));
        assert_eq!(log.term(LogIndex(3)), Some(Term(2)));
    }

    #[test]
    fn find_conflict_by_term_skips_whole_terms() {
        let log = log_with_terms(&[1, 1, 2, 2, 2, 4, 4]);
        assert_eq!(log.find_conflict_by_term(LogIndex(7), Term(3)), (LogIndex(5), Term(2)));
        assert_eq!(log.find_conflict_by_term(LogIndex(9), Term(4)), (LogIndex(7), Term(4)));
        assert_eq!(log.find_conflict_by_term(LogIndex(4), Term(1)), (LogIndex(2), Term(1)));
        assert_eq!(log.find_conflict_by_term(LogIndex(4), Term(0)), (LogIndex(0), Term(0)));
    }

    #[test]
    fn eviction_keeps_unstable_entries_and_compaction_keeps_terms() {
        let mut log = log_with_terms(&[1, 1, 2, 2]);
        log.append(entry(5, 3));
        log.evict(LogIndex(100), 0);
        assert_eq!(log.memory_first(), LogIndex(5), "index 5 is not durable yet");
        let mut out = Vec::new();
        assert_eq!(
            log.entries(LogIndex(2), LogIndex(5), u64::MAX, &mut out),
            Err(NotInMemory { low: LogIndex(2), high: LogIndex(4) })
        );
        log.commit = LogIndex(3);
        log.compact(LogIndex(3));
        assert_eq!(log.term(LogIndex(3)), Some(Term(2)));
        assert_eq!(log.term(LogIndex(4)), Some(Term(2)));
        assert_eq!(log.term(LogIndex(2)), None);
        log.check().expect("consistent");
    }
}

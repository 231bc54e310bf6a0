//! The in-memory index: per group, where each live entry's payload is (segment, offset, length),
//! the terms as runs, the latest hard state and the compaction point — and which segment each of
//! those lives in, so garbage collection knows what a segment still holds.
//!
//! Live appends and recovery replay go through the same [`Index::apply`], so the state after a
//! restart is, by construction, the state before it.

use std::collections::{HashMap, VecDeque};

use crate::GroupId;
use crate::record::HardState;

/// Where a payload lives. 12 bytes; the segment is its sequence number's low 32 bits, resolved
/// against the oldest live segment (live segments never span 2^32 sequence numbers). The entry's
/// tag is not kept here: it is the byte at `offset - 1` of the segment (the last byte of the
/// entry's header), read from the mapping along with the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    pub seg: u32,
    pub offset: u32,
    pub len: u32,
}

const _: () = assert!(std::mem::size_of::<Loc>() == 12);

/// Why an operation does not fit a group's log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidOp {
    /// Entries would leave a gap after the group's last entry.
    #[error("entries start at {first_index} but the next index is {next_index}")]
    Gap {
        /// First index of the entries.
        first_index: u64,
        /// The group's next index.
        next_index: u64,
    },
    /// An entries operation with no entries.
    #[error("an entries operation holds no entries")]
    Empty,
    /// Index 0 is not a log index (logs start at 1).
    #[error("index 0 is not a log index")]
    ZeroIndex,
    /// The operation would reach past the largest index (`u64::MAX - 1`).
    #[error("index {index} overflows the index range")]
    Overflow {
        /// The first index that does not fit.
        index: u64,
    },
    /// The operation touches entries that were compacted away.
    #[error("index {index} is at or below the compaction point {compacted}")]
    Compacted {
        /// Index the operation touches.
        index: u64,
        /// The group's compaction point.
        compacted: u64,
    },
}

/// An operation on the index, with payload positions relative to the start of its record body.
pub(crate) enum IndexOp<I> {
    Entries { group: GroupId, first_index: u64, entries: I },
    HardState { group: GroupId, state: HardState },
    Truncate { group: GroupId, from: u64 },
    Compact { group: GroupId, index: u64, term: u64 },
    Remove { group: GroupId },
}

/// The bounds of a group's log: what validation needs, without positions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Bounds {
    /// Entries at or below this index are gone (0: never compacted).
    pub compacted: u64,
    /// The index the next appended entry gets.
    pub next_index: u64,
}

impl Bounds {
    pub(crate) fn new() -> Bounds {
        Bounds { compacted: 0, next_index: 1 }
    }

    /// Checks an entries operation. With `strict` off (recovery replay, which may start after the
    /// group's earlier records were recycled) a gap resets the log to start at `first_index`.
    pub(crate) fn check_entries(&self, first_index: u64, strict: bool) -> Result<(), InvalidOp> {
        if first_index <= self.compacted {
            return Err(InvalidOp::Compacted { index: first_index, compacted: self.compacted });
        }
        if strict && first_index > self.next_index {
            return Err(InvalidOp::Gap { first_index, next_index: self.next_index });
        }
        Ok(())
    }

    pub(crate) fn check_truncate(&self, from: u64) -> Result<(), InvalidOp> {
        if from <= self.compacted {
            return Err(InvalidOp::Compacted { index: from, compacted: self.compacted });
        }
        Ok(())
    }

    /// After a gap (replay only) the log simply starts at `first_index`: the group's earlier
    /// records were recycled, and garbage collection keeps its latest compaction record live, so
    /// the real compaction point arrives in the replay. It must not be guessed here — a guessed
    /// floor would reject a later, valid overwrite below it.
    pub(crate) fn apply_entries(&mut self, first_index: u64, count: u64) {
        self.next_index = first_index + count;
    }

    pub(crate) fn apply_truncate(&mut self, from: u64) {
        self.next_index = self.next_index.min(from);
    }

    pub(crate) fn apply_compact(&mut self, index: u64) {
        if index > self.compacted {
            self.compacted = index;
            self.next_index = self.next_index.max(index + 1);
        }
    }
}

/// What the log knows of one group.
#[derive(Debug)]
pub(crate) struct GroupIndex {
    pub bounds: Bounds,
    /// Positions of entries `bounds.compacted + 1 ..` — but see `first_index`.
    pub locs: VecDeque<Loc>,
    /// Index of `locs[0]`.
    pub first_index: u64,
    /// `(first index, term)` runs covering `locs`, ascending.
    pub terms: Vec<(u64, u64)>,
    pub compact_term: u64,
    pub hard_state: Option<HardState>,
    /// Segments (low 32 bits) holding the latest hard state and compaction records.
    pub hard_state_seg: Option<u32>,
    pub compact_seg: Option<u32>,
}

/// The group's state as the log reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupState {
    /// Index of the first live entry (one past the compaction point when the log is empty).
    pub first_index: u64,
    /// Index of the last entry (the compaction point, or 0, when the log is empty).
    pub last_index: u64,
    /// The latest hard state recorded.
    pub hard_state: Option<HardState>,
    /// `(index, term)` the log was compacted through, if ever.
    pub compacted: Option<(u64, u64)>,
}

impl Default for GroupIndex {
    fn default() -> GroupIndex {
        GroupIndex {
            bounds: Bounds::new(),
            locs: VecDeque::new(),
            first_index: 1,
            terms: Vec::new(),
            compact_term: 0,
            hard_state: None,
            hard_state_seg: None,
            compact_seg: None,
        }
    }
}

impl GroupIndex {
    pub(crate) fn state(&self) -> GroupState {
        GroupState {
            first_index: self.first_index,
            last_index: self.bounds.next_index - 1,
            hard_state: self.hard_state,
            compacted: (self.bounds.compacted > 0)
                .then_some((self.bounds.compacted, self.compact_term)),
        }
    }

    /// The term of entry `index`, if it is live (or is the compaction point).
    pub(crate) fn term(&self, index: u64) -> Option<u64> {
        if index == self.bounds.compacted && index > 0 {
            return Some(self.compact_term);
        }
        if index < self.first_index || index >= self.bounds.next_index {
            return None;
        }
        let run = self.terms.partition_point(|&(start, _)| start <= index);
        Some(self.terms[run - 1].1)
    }

    /// `(first index, term)` of each term run among the live entries from `from` on (the
    /// first run starting at `from` or at the first live entry, whichever is later).
    pub(crate) fn term_starts(&self, from: u64) -> Vec<(u64, u64)> {
        if self.locs.is_empty() {
            return Vec::new();
        }
        let from = from.max(self.first_index);
        if from >= self.bounds.next_index {
            return Vec::new();
        }
        let covering = self.terms.partition_point(|&(start, _)| start <= from);
        let mut starts = self.terms[covering - 1..].to_vec();
        starts[0].0 = from;
        starts
    }

    pub(crate) fn loc(&self, index: u64) -> Option<Loc> {
        let offset = index.checked_sub(self.first_index)?;
        self.locs.get(usize::try_from(offset).ok()?).copied()
    }

    fn cut_from(&mut self, from: u64) {
        let keep = from.saturating_sub(self.first_index);
        let keep = usize::try_from(keep).unwrap_or(usize::MAX).min(self.locs.len());
        self.locs.truncate(keep);
        let runs = self.terms.partition_point(|&(start, _)| start < from);
        self.terms.truncate(runs);
    }

    fn drop_through(&mut self, index: u64) {
        while self.first_index <= index && self.locs.pop_front().is_some() {
            self.first_index += 1;
        }
        self.first_index = self.first_index.max(index + 1);
        // Keep the run covering the new first index; drop those entirely before it.
        let covering = self.terms.partition_point(|&(start, _)| start <= self.first_index);
        if covering > 1 {
            self.terms.drain(..covering - 1);
        }
        if self.locs.is_empty() {
            self.terms.clear();
        }
    }

    /// The lowest segment (low 32 bits, compared relative to `base`) this group still needs.
    pub(crate) fn min_segment(&self, base: u64) -> Option<u64> {
        let entries = self.locs.front().map(|loc| loc.seg);
        [entries, self.hard_state_seg, self.compact_seg]
            .into_iter()
            .flatten()
            .map(|seg| resolve_seq(base, seg))
            .min()
    }
}

/// The full sequence number of a segment whose low 32 bits are `seg`, given the oldest live one.
pub(crate) fn resolve_seq(base: u64, seg: u32) -> u64 {
    base + u64::from(seg.wrapping_sub(base as u32))
}

/// The index of every group.
#[derive(Debug, Default)]
pub(crate) struct Index {
    pub groups: HashMap<GroupId, GroupIndex>,
}

impl Index {
    /// Applies one operation whose record body starts at `body_offset` of segment `seq`.
    pub(crate) fn apply<I>(
        &mut self,
        op: IndexOp<I>,
        seq: u64,
        body_offset: u64,
        strict: bool,
    ) -> Result<(), InvalidOp>
    where
        I: Iterator<Item = (u64, usize, usize)>,
    {
        let seg = seq as u32;
        let op_group = match &op {
            IndexOp::Entries { group, .. }
            | IndexOp::HardState { group, .. }
            | IndexOp::Truncate { group, .. }
            | IndexOp::Compact { group, .. } => Some(*group),
            IndexOp::Remove { .. } => None,
        };
        match op {
            IndexOp::Entries { group, first_index, entries } => {
                let index = self.groups.entry(group).or_default();
                index.bounds.check_entries(first_index, strict)?;
                if first_index > index.bounds.next_index {
                    // Replay after recycled history: the log starts here.
                    index.locs.clear();
                    index.terms.clear();
                    index.first_index = first_index;
                } else {
                    index.cut_from(first_index);
                }
                if index.locs.is_empty() {
                    index.first_index = first_index;
                }
                let mut count = 0u64;
                for (term, offset, len) in entries {
                    let at = first_index + count;
                    if index.terms.last().is_none_or(|&(_, last)| last != term) {
                        index.terms.push((at, term));
                    }
                    let offset = u32::try_from(body_offset + offset as u64)
                        .expect("segment offsets fit u32 (segments are at most 4 GiB)");
                    index.locs.push_back(Loc { seg, offset, len: len as u32 });
                    count += 1;
                }
                index.bounds.apply_entries(first_index, count);
            }
            IndexOp::HardState { group, state } => {
                let index = self.groups.entry(group).or_default();
                index.hard_state = Some(state);
                index.hard_state_seg = Some(seg);
            }
            IndexOp::Truncate { group, from } => {
                let index = self.groups.entry(group).or_default();
                index.bounds.check_truncate(from)?;
                index.cut_from(from);
                index.bounds.apply_truncate(from);
            }
            IndexOp::Compact { group, index: through, term } => {
                let index = self.groups.entry(group).or_default();
                if through > index.bounds.compacted {
                    index.drop_through(through);
                    index.bounds.apply_compact(through);
                }
                if through == index.bounds.compacted && through > 0 {
                    // Also a re-record of the same point (copied forward): it now lives here.
                    index.compact_term = term;
                    index.compact_seg = Some(seg);
                }
            }
            IndexOp::Remove { group } => {
                self.groups.remove(&group);
                return Ok(());
            }
        }
        let group = match &op_group {
            Some(group) => *group,
            None => unreachable!("every other operation names its group"),
        };
        let index = self.groups.get_mut(&group).expect("touched above");
        // An emptied log starts where the next entry goes (after a cut below the first live
        // entry, possible when replay began after recycled history).
        if index.locs.is_empty() {
            index.first_index = index.bounds.next_index;
        }
        assert_eq!(
            index.first_index + index.locs.len() as u64,
            index.bounds.next_index,
            "group {group}: positions and bounds disagree"
        );
        Ok(())
    }

    /// Bytes of heap the index uses for entry positions and term runs.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.groups
            .values()
            .map(|g| {
                g.locs.capacity() * std::mem::size_of::<Loc>()
                    + g.terms.capacity() * std::mem::size_of::<(u64, u64)>()
                    + std::mem::size_of::<GroupIndex>()
            })
            .sum()
    }

    /// Live entries over all groups.
    pub(crate) fn live_entries(&self) -> usize {
        self.groups.values().map(|g| g.locs.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(index: &mut Index, group: u64, first: u64, terms: &[u64]) -> Result<(), InvalidOp> {
        let items: Vec<(u64, usize, usize)> =
            terms.iter().enumerate().map(|(i, &t)| (t, i * 10, 10)).collect();
        index.apply(
            IndexOp::Entries {
                group: GroupId(group),
                first_index: first,
                entries: items.into_iter(),
            },
            1,
            64,
            true,
        )
    }

    fn op(index: &mut Index, op: IndexOp<std::iter::Empty<(u64, usize, usize)>>) {
        index.apply(op, 1, 64, true).unwrap();
    }

    #[test]
    fn overwrite_truncates_and_terms_follow() {
        let mut index = Index::default();
        entries(&mut index, 1, 1, &[1, 1, 2, 2]).unwrap();
        entries(&mut index, 1, 3, &[3]).unwrap();
        let group = &index.groups[&GroupId(1)];
        assert_eq!(group.state().last_index, 3);
        assert_eq!((group.term(2), group.term(3), group.term(4)), (Some(1), Some(3), None));
        assert_eq!(
            entries(&mut index, 1, 5, &[3]),
            Err(InvalidOp::Gap { first_index: 5, next_index: 4 })
        );
    }

    #[test]
    fn term_starts_follow_overwrites_and_compaction() {
        let mut index = Index::default();
        entries(&mut index, 1, 1, &[1, 1, 2, 2, 2, 3]).unwrap();
        let group = |index: &Index| index.groups[&GroupId(1)].term_starts(0);
        assert_eq!(group(&index), [(1, 1), (3, 2), (6, 3)]);
        assert_eq!(index.groups[&GroupId(1)].term_starts(4), [(4, 2), (6, 3)]);
        assert!(index.groups[&GroupId(1)].term_starts(7).is_empty());
        entries(&mut index, 1, 5, &[4, 4]).unwrap();
        assert_eq!(group(&index), [(1, 1), (3, 2), (5, 4)]);
        op(&mut index, IndexOp::Compact { group: GroupId(1), index: 3, term: 2 });
        assert_eq!(group(&index), [(4, 2), (5, 4)]);
        op(&mut index, IndexOp::Compact { group: GroupId(1), index: 6, term: 4 });
        assert!(group(&index).is_empty());
    }

    #[test]
    fn compaction_beyond_the_log_moves_its_start() {
        let mut index = Index::default();
        entries(&mut index, 1, 1, &[1, 1]).unwrap();
        op(&mut index, IndexOp::Compact { group: GroupId(1), index: 10, term: 4 });
        let state = index.groups[&GroupId(1)].state();
        assert_eq!((state.first_index, state.last_index), (11, 10));
        assert_eq!(index.groups[&GroupId(1)].term(10), Some(4));
        assert!(entries(&mut index, 1, 10, &[5]).is_err());
        entries(&mut index, 1, 11, &[5]).unwrap();
        assert_eq!(index.groups[&GroupId(1)].term(11), Some(5));
    }

    #[test]
    fn compaction_inside_the_log_keeps_the_covering_term_run() {
        let mut index = Index::default();
        entries(&mut index, 1, 1, &[1, 1, 2, 2, 2]).unwrap();
        op(&mut index, IndexOp::Compact { group: GroupId(1), index: 3, term: 2 });
        let group = &index.groups[&GroupId(1)];
        assert_eq!(group.first_index, 4);
        assert_eq!((group.term(4), group.term(5)), (Some(2), Some(2)));
        assert_eq!(group.loc(4).unwrap().offset, 64 + 30);
    }

    #[test]
    fn truncate_then_append_and_remove() {
        let mut index = Index::default();
        entries(&mut index, 1, 1, &[1, 1, 1]).unwrap();
        op(&mut index, IndexOp::Truncate { group: GroupId(1), from: 2 });
        assert_eq!(index.groups[&GroupId(1)].state().last_index, 1);
        entries(&mut index, 1, 2, &[2]).unwrap();
        op(&mut index, IndexOp::Remove { group: GroupId(1) });
        assert!(index.groups.is_empty());
    }

    #[test]
    fn replay_accepts_a_log_that_starts_late() {
        let mut index = Index::default();
        let items = vec![(7u64, 0usize, 4usize)];
        index
            .apply(
                IndexOp::Entries { group: GroupId(2), first_index: 50, entries: items.into_iter() },
                3,
                64,
                false,
            )
            .unwrap();
        let state = index.groups[&GroupId(2)].state();
        assert_eq!((state.first_index, state.last_index), (50, 50));
        // A later overwrite below that first entry was valid when written: it replays.
        let items = vec![(8u64, 0usize, 4usize)];
        index
            .apply(
                IndexOp::Entries { group: GroupId(2), first_index: 40, entries: items.into_iter() },
                3,
                64,
                false,
            )
            .unwrap();
        let state = index.groups[&GroupId(2)].state();
        assert_eq!((state.first_index, state.last_index), (40, 40));
        // A truncation below everything replay has seen empties the log from there.
        index
            .apply::<std::iter::Empty<_>>(
                IndexOp::Truncate { group: GroupId(2), from: 30 },
                3,
                64,
                false,
            )
            .unwrap();
        let state = index.groups[&GroupId(2)].state();
        assert_eq!((state.first_index, state.last_index), (30, 29));
    }
}

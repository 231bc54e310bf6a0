//! What the log holds per group after replaying its rounds: the same rules as the WAL's index
//! (`wal/src/index.rs`, replay mode), re-implemented over the public codec so the tool never opens
//! the log.

use std::collections::{BTreeMap, HashMap, VecDeque};

use flotilla_wal::record::{self, HardState, Item};

/// Where one live entry's payload lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    segment: u64,
    len: u32,
}

/// One group's state, as recovery would rebuild it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// Entries at or below this index were compacted away (0: never compacted).
    pub compacted: u64,
    /// Term of the entry at `compacted`.
    pub compact_term: u64,
    /// Index of the first live entry (`next_index` when there is none).
    pub first_index: u64,
    /// The index the next entry gets.
    pub next_index: u64,
    /// The latest hard state recorded.
    pub hard_state: Option<HardState>,
    /// Segment holding the latest hard state.
    pub hard_state_segment: Option<u64>,
    /// Segment holding the latest compaction record.
    pub compact_segment: Option<u64>,
    /// Entries written for the group in the rounds read (live or not).
    pub entries_written: u64,
    /// Payload bytes of those entries.
    pub payload_bytes_written: u64,
    locs: VecDeque<Loc>,
}

impl Default for GroupInfo {
    fn default() -> GroupInfo {
        GroupInfo {
            compacted: 0,
            compact_term: 0,
            first_index: 1,
            next_index: 1,
            hard_state: None,
            hard_state_segment: None,
            compact_segment: None,
            entries_written: 0,
            payload_bytes_written: 0,
            locs: VecDeque::new(),
        }
    }
}

impl GroupInfo {
    /// Live entries.
    pub fn live_entries(&self) -> u64 {
        self.locs.len() as u64
    }

    /// Index of the last entry (the compaction point, or 0, when the log is empty).
    pub fn last_index(&self) -> u64 {
        self.next_index - 1
    }

    /// Payload bytes of the live entries.
    pub fn live_payload_bytes(&self) -> u64 {
        self.locs.iter().map(|loc| u64::from(loc.len)).sum()
    }

    /// The oldest segment the group still needs: its first live entry, its latest hard state or
    /// its compaction record (what keeps the WAL from recycling a segment).
    pub fn oldest_segment(&self) -> Option<u64> {
        [self.locs.front().map(|loc| loc.segment), self.hard_state_segment, self.compact_segment]
            .into_iter()
            .flatten()
            .min()
    }

    /// Live entries per segment.
    pub fn entries_per_segment(&self) -> BTreeMap<u64, u64> {
        let mut out = BTreeMap::new();
        for loc in &self.locs {
            *out.entry(loc.segment).or_insert(0) += 1;
        }
        out
    }

    fn cut_from(&mut self, from: u64) {
        let keep = from.saturating_sub(self.first_index);
        let keep = usize::try_from(keep).unwrap_or(usize::MAX).min(self.locs.len());
        self.locs.truncate(keep);
    }

    fn drop_through(&mut self, index: u64) {
        while self.first_index <= index && self.locs.pop_front().is_some() {
            self.first_index += 1;
        }
        self.first_index = self.first_index.max(index + 1);
    }
}

/// The bounds replay validates against: `(compacted, next_index)`.
type Bounds = (u64, u64);

/// Every group's state after the rounds replayed so far.
#[derive(Debug, Clone, Default)]
pub struct LogState {
    /// Per group id.
    pub groups: BTreeMap<u64, GroupInfo>,
    /// Entries in the rounds replayed, of every group (removed ones included).
    pub entries_read: u64,
    /// Payload bytes of those entries.
    pub payload_bytes_read: u64,
}

impl LogState {
    /// Replays one round found in `segment`, all or nothing: a body that does not decode, or an
    /// item that does not fit its group's log (entries or a truncation at or below the compaction
    /// point), leaves the state unchanged and is returned as the reason (recovery calls such a
    /// round corrupt).
    pub fn apply(&mut self, body: &[u8], segment: u64) -> Result<(), String> {
        record::validate_body(body).map_err(|e| format!("malformed body: {e}"))?;
        let mut bounds: HashMap<u64, Bounds> = HashMap::new();
        for item in record::items(body) {
            let item = item.map_err(|e| e.to_string())?;
            let group = item_group(&item);
            let (compacted, next) = bounds.entry(group).or_insert_with(|| {
                self.groups.get(&group).map_or((0, 1), |g| (g.compacted, g.next_index))
            });
            match item {
                Item::Entries { first_index, entries, .. } => {
                    if first_index <= *compacted {
                        return Err(format!(
                            "group {group}: entries at {first_index} are at or below the \
                             compaction point {compacted}"
                        ));
                    }
                    *next = first_index + entries.len() as u64;
                }
                Item::Truncate { from, .. } => {
                    if from <= *compacted {
                        return Err(format!(
                            "group {group}: truncation from {from} is at or below the compaction \
                             point {compacted}"
                        ));
                    }
                    *next = (*next).min(from);
                }
                Item::Compact { index, .. } => {
                    if index > *compacted {
                        *compacted = index;
                        *next = (*next).max(index + 1);
                    }
                }
                Item::RemoveGroup { .. } => (*compacted, *next) = (0, 1),
                Item::HardState { .. } => {}
            }
        }
        for item in record::items(body) {
            self.apply_item(item.map_err(|e| e.to_string())?, segment);
        }
        Ok(())
    }

    fn apply_item(&mut self, item: Item<'_>, segment: u64) {
        let group = item_group(&item);
        match item {
            Item::Entries { first_index, entries, .. } => {
                let g = self.groups.entry(group).or_default();
                if first_index > g.next_index {
                    // Replay after recycled history: the group's log starts here.
                    g.locs.clear();
                    g.first_index = first_index;
                } else {
                    g.cut_from(first_index);
                }
                if g.locs.is_empty() {
                    g.first_index = first_index;
                }
                let count = entries.len() as u64;
                for (_term, _tag, _offset, payload) in entries {
                    let len = payload.len() as u32;
                    g.locs.push_back(Loc { segment, len });
                    g.payload_bytes_written += u64::from(len);
                    self.payload_bytes_read += u64::from(len);
                }
                g.entries_written += count;
                self.entries_read += count;
                g.next_index = first_index + count;
            }
            Item::HardState { state, .. } => {
                let g = self.groups.entry(group).or_default();
                g.hard_state = Some(state);
                g.hard_state_segment = Some(segment);
            }
            Item::Truncate { from, .. } => {
                let g = self.groups.entry(group).or_default();
                g.cut_from(from);
                g.next_index = g.next_index.min(from);
            }
            Item::Compact { index, term, .. } => {
                let g = self.groups.entry(group).or_default();
                if index > g.compacted {
                    g.drop_through(index);
                    g.compacted = index;
                    g.next_index = g.next_index.max(index + 1);
                }
                if index == g.compacted && index > 0 {
                    // Also a re-record of the same point (copied forward): it now lives here.
                    g.compact_term = term;
                    g.compact_segment = Some(segment);
                }
            }
            Item::RemoveGroup { .. } => {
                self.groups.remove(&group);
                return;
            }
        }
        let g = self.groups.get_mut(&group).expect("touched above");
        if g.locs.is_empty() {
            g.first_index = g.next_index;
        }
    }

    /// The groups that still need segment `segment` (by their first live entry, latest hard state
    /// or compaction record being there): what keeps it from being recycled when it is the
    /// oldest.
    pub fn pinning(&self, segment: u64) -> Vec<u64> {
        self.groups
            .iter()
            .filter(|(_, g)| g.oldest_segment() == Some(segment))
            .map(|(&id, _)| id)
            .collect()
    }
}

/// The group an item is about.
pub fn item_group(item: &Item<'_>) -> u64 {
    match item {
        Item::Entries { group, .. }
        | Item::HardState { group, .. }
        | Item::Truncate { group, .. }
        | Item::Compact { group, .. }
        | Item::RemoveGroup { group } => group.0,
    }
}

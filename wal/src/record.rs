//! The record codec: pure functions from bytes to values and back (see `wal/FORMAT.md`).
//!
//! Every function here is total: any byte string decodes to a value or a typed [`DecodeError`],
//! never a panic, and no allocation is larger than the input can justify (decoding borrows from
//! the input; the owned form allocates at most one `Vec` slot per 20 bytes of input).

use bytes::Bytes;

use crate::GroupId;

/// Length of a record header in bytes.
pub const RECORD_HEADER_LEN: usize = 32;
/// Records start at offsets that are multiples of this (so a forward search after damage only
/// tries aligned offsets, and the padding is checked to be zero).
pub const RECORD_ALIGN: usize = 8;
/// Record type of a batch: one group-commit round.
pub const RECORD_TYPE_BATCH: u8 = 1;

const ITEM_ENTRIES: u8 = 1;
const ITEM_HARD_STATE: u8 = 2;
const ITEM_TRUNCATE: u8 = 3;
const ITEM_COMPACT: u8 = 4;
const ITEM_REMOVE_GROUP: u8 = 5;

/// Bytes of an entries item before its entries: kind, group, first index, count (what a
/// caller cutting batches to a size adds per run of entries).
pub const ENTRIES_ITEM_HEADER_LEN: usize = 1 + 8 + 8 + 4;
/// Bytes of each entry before its payload: term (u64), payload length (u32), tag (u8). The tag is
/// the last byte, so it sits immediately before the payload: a reader holding a payload's offset
/// finds the tag at `offset - 1`.
pub const ENTRY_HEADER_LEN: usize = 8 + 4 + 1;

const _: () = assert!(RECORD_HEADER_LEN.is_multiple_of(RECORD_ALIGN));

/// Why bytes did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended before the structure did.
    #[error("truncated: need {needed} bytes at {offset}, have {available}")]
    Truncated {
        /// Offset within the decoded slice where the missing bytes begin.
        offset: usize,
        /// Bytes the structure needs from there.
        needed: usize,
        /// Bytes the input still had.
        available: usize,
    },
    /// A header checksum did not match.
    #[error("header checksum mismatch")]
    HeaderChecksum,
    /// A body checksum did not match.
    #[error("body checksum mismatch")]
    BodyChecksum,
    /// A record type this version does not know.
    #[error("unknown record type {0}")]
    UnknownRecordType(u8),
    /// An item kind this version does not know.
    #[error("unknown item kind {kind} at {offset}")]
    UnknownItemKind {
        /// The kind byte.
        kind: u8,
        /// Offset of the item within the body.
        offset: usize,
    },
    /// A field has a value the format forbids (reserved bytes set, empty entries item, …).
    #[error("invalid field {field} at {offset}")]
    InvalidField {
        /// Which field.
        field: &'static str,
        /// Offset within the decoded slice.
        offset: usize,
    },
}

/// Per-group Raft hard state as stored in the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct HardState {
    /// Current term.
    pub term: u64,
    /// Node voted for in `term` (0: none).
    pub vote: u64,
    /// Highest index known committed.
    pub commit: u64,
}

/// The fixed part of a record, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Length of the body in bytes (without padding).
    pub body_len: u32,
    /// Record type.
    pub record_type: u8,
    /// Sequence number of the round (one per write), starting at 1, +1 per round.
    pub write_seq: u64,
    /// Every round with a sequence number up to this one was fdatasync'd before this round was
    /// written. Recovery uses it to tell corruption of synced data from a torn unsynced tail.
    pub durable_seq: u64,
    /// Checksum of the body (seeded like the header checksum).
    pub body_crc: u32,
}

impl RecordHeader {
    /// Bytes the record occupies on disk, header and padding included.
    pub fn padded_len(&self) -> usize {
        padded_record_len(self.body_len as usize)
    }
}

/// Bytes a record with a body of `body_len` bytes occupies, header and padding included.
pub fn padded_record_len(body_len: usize) -> usize {
    (RECORD_HEADER_LEN + body_len).next_multiple_of(RECORD_ALIGN)
}

/// The checksum seed of a segment: the segment's sequence number folded to 32 bits and mixed, so
/// bytes left over from a segment's previous life (another sequence number) never validate.
pub fn crc_seed(segment_seq: u64) -> u32 {
    let folded = (segment_seq as u32) ^ ((segment_seq >> 32) as u32);
    folded.wrapping_mul(0x9E37_79B1) ^ 0x5EED_F10A
}

fn crc(seed: u32, bytes: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new_with_initial(seed);
    hasher.update(bytes);
    hasher.finalize()
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Whether a record header slot holds nothing but zeros: never written since the segment was
/// pre-written (or since recovery zeroed a torn tail).
pub fn is_zero_header(bytes: &[u8]) -> bool {
    bytes.len() >= RECORD_HEADER_LEN && bytes[..RECORD_HEADER_LEN].iter().all(|&b| b == 0)
}

/// Encodes a record header into `out[..RECORD_HEADER_LEN]`, computing both checksums over the
/// header and `body`.
pub fn encode_header(
    out: &mut [u8],
    segment_seq: u64,
    write_seq: u64,
    durable_seq: u64,
    body: &[u8],
) {
    assert!(out.len() >= RECORD_HEADER_LEN, "header slot too small");
    let body_len = u32::try_from(body.len()).expect("record body fits u32");
    let seed = crc_seed(segment_seq);
    out[0..4].copy_from_slice(&body_len.to_le_bytes());
    out[4] = RECORD_TYPE_BATCH;
    out[5..8].fill(0);
    out[8..16].copy_from_slice(&write_seq.to_le_bytes());
    out[16..24].copy_from_slice(&durable_seq.to_le_bytes());
    let header_crc = crc(seed, &out[0..24]);
    out[24..28].copy_from_slice(&header_crc.to_le_bytes());
    out[28..32].copy_from_slice(&crc(seed, body).to_le_bytes());
}

/// Decodes and verifies a record header (not its body).
pub fn decode_header(bytes: &[u8], segment_seq: u64) -> Result<RecordHeader, DecodeError> {
    if bytes.len() < RECORD_HEADER_LEN {
        return Err(DecodeError::Truncated {
            offset: 0,
            needed: RECORD_HEADER_LEN,
            available: bytes.len(),
        });
    }
    let seed = crc_seed(segment_seq);
    if crc(seed, &bytes[0..24]) != u32_at(bytes, 24) {
        return Err(DecodeError::HeaderChecksum);
    }
    if bytes[5..8] != [0, 0, 0] {
        return Err(DecodeError::InvalidField { field: "reserved", offset: 5 });
    }
    let record_type = bytes[4];
    if record_type != RECORD_TYPE_BATCH {
        return Err(DecodeError::UnknownRecordType(record_type));
    }
    let header = RecordHeader {
        body_len: u32_at(bytes, 0),
        record_type,
        write_seq: u64_at(bytes, 8),
        durable_seq: u64_at(bytes, 16),
        body_crc: u32_at(bytes, 28),
    };
    if header.write_seq == 0 {
        return Err(DecodeError::InvalidField { field: "write_seq", offset: 8 });
    }
    if header.durable_seq >= header.write_seq {
        return Err(DecodeError::InvalidField { field: "durable_seq", offset: 16 });
    }
    Ok(header)
}

/// Verifies a body against its header's checksum.
pub fn verify_body(
    header: &RecordHeader,
    body: &[u8],
    segment_seq: u64,
) -> Result<(), DecodeError> {
    if body.len() != header.body_len as usize {
        return Err(DecodeError::Truncated {
            offset: RECORD_HEADER_LEN,
            needed: header.body_len as usize,
            available: body.len(),
        });
    }
    if crc(crc_seed(segment_seq), body) != header.body_crc {
        return Err(DecodeError::BodyChecksum);
    }
    Ok(())
}

/// Decodes a whole record (header, body, zero padding) at the start of `bytes`: the header, and
/// the body as a slice of `bytes`.
pub fn decode_record(bytes: &[u8], segment_seq: u64) -> Result<(RecordHeader, &[u8]), DecodeError> {
    let header = decode_header(bytes, segment_seq)?;
    let body_end = RECORD_HEADER_LEN
        .checked_add(header.body_len as usize)
        .ok_or(DecodeError::InvalidField { field: "body_len", offset: 0 })?;
    let padded = header.padded_len();
    if bytes.len() < padded {
        return Err(DecodeError::Truncated {
            offset: RECORD_HEADER_LEN,
            needed: padded - RECORD_HEADER_LEN,
            available: bytes.len() - RECORD_HEADER_LEN,
        });
    }
    let body = &bytes[RECORD_HEADER_LEN..body_end];
    verify_body(&header, body, segment_seq)?;
    if bytes[body_end..padded].iter().any(|&b| b != 0) {
        return Err(DecodeError::InvalidField { field: "padding", offset: body_end });
    }
    Ok((header, body))
}

/// One item of a batch body, borrowing from the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item<'a> {
    /// Consecutive entries of one group starting at `first_index`. Appending at an index at or
    /// below the group's last index replaces everything from there (Raft's conflict rule).
    Entries {
        /// The group.
        group: GroupId,
        /// Index of the first entry.
        first_index: u64,
        /// The entries, in index order.
        entries: EntryIter<'a>,
    },
    /// The group's hard state; the latest one wins.
    HardState {
        /// The group.
        group: GroupId,
        /// The state.
        state: HardState,
    },
    /// Removes the group's entries with index `>= from`.
    Truncate {
        /// The group.
        group: GroupId,
        /// First index removed.
        from: u64,
    },
    /// Removes the group's entries with index `<= index` and records `(index, term)` as its
    /// compaction point (the snapshot the entries were folded into).
    Compact {
        /// The group.
        group: GroupId,
        /// Last index removed.
        index: u64,
        /// Term of the entry at `index`.
        term: u64,
    },
    /// Forgets the group entirely.
    RemoveGroup {
        /// The group.
        group: GroupId,
    },
}

/// The entries of an [`Item::Entries`], decoded lazily; yields `(term, tag, payload offset within
/// the body, payload)`. Its bounds were checked when the item was decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryIter<'a> {
    body: &'a [u8],
    at: usize,
    remaining: u32,
}

impl EntryIter<'_> {
    /// Number of entries not yet yielded.
    pub fn len(&self) -> usize {
        self.remaining as usize
    }

    /// Whether every entry has been yielded.
    pub fn is_empty(&self) -> bool {
        self.remaining == 0
    }
}

impl<'a> Iterator for EntryIter<'a> {
    type Item = (u64, u8, usize, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let term = u64_at(self.body, self.at);
        let len = u32_at(self.body, self.at + 8) as usize;
        let tag = self.body[self.at + 12];
        let start = self.at + ENTRY_HEADER_LEN;
        self.at = start + len;
        Some((term, tag, start, &self.body[start..start + len]))
    }
}

/// Iterates over the items of a batch body, validating each before yielding it.
#[derive(Debug, Clone)]
pub struct ItemIter<'a> {
    body: &'a [u8],
    at: usize,
    failed: bool,
}

/// Iterates over the items of a batch body.
pub fn items(body: &[u8]) -> ItemIter<'_> {
    ItemIter { body, at: 0, failed: false }
}

/// Checks that a whole batch body decodes, so a record is applied all or nothing.
pub fn validate_body(body: &[u8]) -> Result<(), DecodeError> {
    for item in items(body) {
        item?;
    }
    Ok(())
}

impl ItemIter<'_> {
    fn need(&self, at: usize, needed: usize) -> Result<(), DecodeError> {
        let available = self.body.len().saturating_sub(at);
        if available < needed {
            return Err(DecodeError::Truncated { offset: at, needed, available });
        }
        Ok(())
    }
}

impl<'a> Iterator for ItemIter<'a> {
    type Item = Result<Item<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.at >= self.body.len() {
            return None;
        }
        let result = self.decode_one();
        if result.is_err() {
            self.failed = true;
        }
        Some(result)
    }
}

impl<'a> ItemIter<'a> {
    fn decode_one(&mut self) -> Result<Item<'a>, DecodeError> {
        let start = self.at;
        self.need(start, 9)?;
        let body = self.body;
        let kind = body[start];
        let group = GroupId(u64_at(body, start + 1));
        let fields = start + 9;
        let item = match kind {
            ITEM_ENTRIES => {
                self.need(fields, 12)?;
                let first_index = u64_at(body, fields);
                let count = u32_at(body, fields + 8);
                if count == 0 {
                    return Err(DecodeError::InvalidField { field: "count", offset: fields + 8 });
                }
                if first_index == 0 || first_index.checked_add(u64::from(count)).is_none() {
                    return Err(DecodeError::InvalidField { field: "first_index", offset: fields });
                }
                let entries_start = fields + 12;
                let mut at = entries_start;
                for _ in 0..count {
                    self.need(at, ENTRY_HEADER_LEN)?;
                    let len = u32_at(body, at + 8) as usize;
                    self.need(at + ENTRY_HEADER_LEN, len)?;
                    at += ENTRY_HEADER_LEN + len;
                }
                self.at = at;
                Item::Entries {
                    group,
                    first_index,
                    entries: EntryIter { body, at: entries_start, remaining: count },
                }
            }
            ITEM_HARD_STATE => {
                self.need(fields, 24)?;
                self.at = fields + 24;
                Item::HardState {
                    group,
                    state: HardState {
                        term: u64_at(body, fields),
                        vote: u64_at(body, fields + 8),
                        commit: u64_at(body, fields + 16),
                    },
                }
            }
            ITEM_TRUNCATE => {
                self.need(fields, 8)?;
                self.at = fields + 8;
                let from = u64_at(body, fields);
                if from == 0 {
                    return Err(DecodeError::InvalidField { field: "from", offset: fields });
                }
                Item::Truncate { group, from }
            }
            ITEM_COMPACT => {
                self.need(fields, 16)?;
                self.at = fields + 16;
                Item::Compact { group, index: u64_at(body, fields), term: u64_at(body, fields + 8) }
            }
            ITEM_REMOVE_GROUP => {
                self.at = fields;
                Item::RemoveGroup { group }
            }
            kind => return Err(DecodeError::UnknownItemKind { kind, offset: start }),
        };
        Ok(item)
    }
}

/// An operation of a [`WriteBatch`], holding payloads by reference (no copy until encoding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// See [`Item::Entries`].
    Entries {
        /// The group.
        group: GroupId,
        /// Index of the first entry.
        first_index: u64,
        /// `(term, tag, payload)` of each entry, in index order; never empty. The tag is opaque
        /// to the log: stored with the entry and returned by reads, never interpreted.
        entries: Vec<(u64, u8, Bytes)>,
    },
    /// See [`Item::HardState`].
    HardState {
        /// The group.
        group: GroupId,
        /// The state.
        state: HardState,
    },
    /// See [`Item::Truncate`].
    Truncate {
        /// The group.
        group: GroupId,
        /// First index removed.
        from: u64,
    },
    /// See [`Item::Compact`].
    Compact {
        /// The group.
        group: GroupId,
        /// Last index removed.
        index: u64,
        /// Term of the entry at `index`.
        term: u64,
    },
    /// See [`Item::RemoveGroup`].
    RemoveGroup {
        /// The group.
        group: GroupId,
    },
}

impl Op {
    /// The group this operation is about.
    pub fn group(&self) -> GroupId {
        match self {
            Op::Entries { group, .. }
            | Op::HardState { group, .. }
            | Op::Truncate { group, .. }
            | Op::Compact { group, .. }
            | Op::RemoveGroup { group } => *group,
        }
    }

    /// Bytes this operation takes in a batch body.
    pub fn encoded_len(&self) -> usize {
        match self {
            Op::Entries { entries, .. } => {
                ENTRIES_ITEM_HEADER_LEN
                    + entries.iter().map(|(_, _, p)| ENTRY_HEADER_LEN + p.len()).sum::<usize>()
            }
            Op::HardState { .. } => 9 + 24,
            Op::Truncate { .. } => 9 + 8,
            Op::Compact { .. } => 9 + 16,
            Op::RemoveGroup { .. } => 9,
        }
    }

    /// Appends the encoded item to `out`, calling `on_payload(term, offset in out, len)` for each
    /// entry so the caller can index payloads without decoding them again.
    pub fn encode(&self, out: &mut Vec<u8>, mut on_payload: impl FnMut(u64, usize, usize)) {
        let group = self.group().0;
        match self {
            Op::Entries { first_index, entries, .. } => {
                assert!(!entries.is_empty(), "an entries item holds at least one entry");
                out.push(ITEM_ENTRIES);
                out.extend_from_slice(&group.to_le_bytes());
                out.extend_from_slice(&first_index.to_le_bytes());
                let count = u32::try_from(entries.len()).expect("entry count fits u32");
                out.extend_from_slice(&count.to_le_bytes());
                for (term, tag, payload) in entries {
                    out.extend_from_slice(&term.to_le_bytes());
                    let len = u32::try_from(payload.len()).expect("payload fits u32");
                    out.extend_from_slice(&len.to_le_bytes());
                    out.push(*tag);
                    on_payload(*term, out.len(), payload.len());
                    out.extend_from_slice(payload);
                }
            }
            Op::HardState { state, .. } => {
                out.push(ITEM_HARD_STATE);
                out.extend_from_slice(&group.to_le_bytes());
                out.extend_from_slice(&state.term.to_le_bytes());
                out.extend_from_slice(&state.vote.to_le_bytes());
                out.extend_from_slice(&state.commit.to_le_bytes());
            }
            Op::Truncate { from, .. } => {
                out.push(ITEM_TRUNCATE);
                out.extend_from_slice(&group.to_le_bytes());
                out.extend_from_slice(&from.to_le_bytes());
            }
            Op::Compact { index, term, .. } => {
                out.push(ITEM_COMPACT);
                out.extend_from_slice(&group.to_le_bytes());
                out.extend_from_slice(&index.to_le_bytes());
                out.extend_from_slice(&term.to_le_bytes());
            }
            Op::RemoveGroup { .. } => {
                out.push(ITEM_REMOVE_GROUP);
                out.extend_from_slice(&group.to_le_bytes());
            }
        }
    }

    /// The owned form of a decoded item (copies payloads; for tests, tools and fuzzing).
    pub fn from_item(item: Item<'_>) -> Op {
        match item {
            Item::Entries { group, first_index, entries } => Op::Entries {
                group,
                first_index,
                entries: entries
                    .map(|(term, tag, _, p)| (term, tag, Bytes::copy_from_slice(p)))
                    .collect(),
            },
            Item::HardState { group, state } => Op::HardState { group, state },
            Item::Truncate { group, from } => Op::Truncate { group, from },
            Item::Compact { group, index, term } => Op::Compact { group, index, term },
            Item::RemoveGroup { group } => Op::RemoveGroup { group },
        }
    }
}

/// A batch of operations appended atomically: after a crash either all of it is recovered or none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub(crate) ops: Vec<Op>,
    pub(crate) encoded_len: usize,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds consecutive entries `(term, payload)` of `group` starting at `first_index`, each with
    /// tag 0. An empty `entries` adds nothing.
    pub fn add_entries(
        &mut self,
        group: GroupId,
        first_index: u64,
        entries: impl IntoIterator<Item = (u64, Bytes)>,
    ) -> &mut Self {
        self.add_tagged_entries(
            group,
            first_index,
            entries.into_iter().map(|(term, payload)| (term, 0, payload)),
        )
    }

    /// Adds consecutive entries `(term, tag, payload)` of `group` starting at `first_index`. The
    /// tag is opaque to the log, chosen by the caller (the engine stores an entry's kind in it):
    /// it is stored with the entry and returned by reads ([`crate::Entry::tag`]). An empty
    /// `entries` adds nothing.
    pub fn add_tagged_entries(
        &mut self,
        group: GroupId,
        first_index: u64,
        entries: impl IntoIterator<Item = (u64, u8, Bytes)>,
    ) -> &mut Self {
        let entries: Vec<(u64, u8, Bytes)> = entries.into_iter().collect();
        if !entries.is_empty() {
            self.push(Op::Entries { group, first_index, entries });
        }
        self
    }

    /// Records `group`'s hard state.
    pub fn set_hard_state(&mut self, group: GroupId, state: HardState) -> &mut Self {
        self.push(Op::HardState { group, state })
    }

    /// Removes `group`'s entries from index `from` on.
    pub fn truncate_suffix(&mut self, group: GroupId, from: u64) -> &mut Self {
        self.push(Op::Truncate { group, from })
    }

    /// Removes `group`'s entries through `index`, whose term is `term`.
    pub fn compact(&mut self, group: GroupId, index: u64, term: u64) -> &mut Self {
        self.push(Op::Compact { group, index, term })
    }

    /// Forgets `group` entirely.
    pub fn remove_group(&mut self, group: GroupId) -> &mut Self {
        self.push(Op::RemoveGroup { group })
    }

    /// Adds an operation.
    pub fn push(&mut self, op: Op) -> &mut Self {
        self.encoded_len += op.encoded_len();
        self.ops.push(op);
        self
    }

    /// The operations, in order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// The operations, in order, taken out of the batch.
    pub fn into_ops(self) -> Vec<Op> {
        self.ops
    }

    /// Whether the batch has no operations.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Bytes the batch takes in a record body.
    pub fn encoded_len(&self) -> usize {
        self.encoded_len
    }

    /// Whether every operation is maintenance (no new entries), which may use the reserved segment
    /// when the disk is full.
    pub fn is_maintenance(&self) -> bool {
        self.ops.iter().all(|op| !matches!(op, Op::Entries { .. }))
    }

    /// Encodes the batch body (for tests, tools and fuzzing; the log encodes straight into its
    /// round buffer).
    pub fn encode_body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len);
        for op in &self.ops {
            op.encode(&mut out, |_, _, _| {});
        }
        out
    }

    /// Decodes a batch body into its owned form.
    pub fn decode_body(body: &[u8]) -> Result<WriteBatch, DecodeError> {
        let mut batch = WriteBatch::new();
        for item in items(body) {
            batch.push(Op::from_item(item?));
        }
        Ok(batch)
    }
}

/// Encodes a complete record (header, body, padding) into `out`: used by tests and tools; the log
/// builds records in place.
pub fn encode_record(
    out: &mut Vec<u8>,
    segment_seq: u64,
    write_seq: u64,
    durable_seq: u64,
    body: &[u8],
) {
    let start = out.len();
    out.resize(start + RECORD_HEADER_LEN, 0);
    out.extend_from_slice(body);
    out.resize(start + padded_record_len(body.len()), 0);
    let (head, rest) = out[start..].split_at_mut(RECORD_HEADER_LEN);
    encode_header(head, segment_seq, write_seq, durable_seq, &rest[..body.len()]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WriteBatch {
        let mut batch = WriteBatch::new();
        batch
            .add_entries(GroupId(7), 1, [(1, Bytes::from_static(b"a")), (1, Bytes::new())])
            .add_tagged_entries(GroupId(8), 3, [(2, 0xA5, Bytes::from_static(b"t"))])
            .set_hard_state(GroupId(7), HardState { term: 1, vote: 2, commit: 1 })
            .truncate_suffix(GroupId(9), 4)
            .compact(GroupId(7), 1, 1)
            .remove_group(GroupId(3));
        batch
    }

    #[test]
    fn batch_round_trips() {
        let batch = sample();
        let body = batch.encode_body();
        assert_eq!(body.len(), batch.encoded_len());
        assert_eq!(WriteBatch::decode_body(&body).unwrap(), batch);
    }

    #[test]
    fn record_round_trips_and_checks_seed() {
        let body = sample().encode_body();
        let mut out = Vec::new();
        encode_record(&mut out, 42, 5, 4, &body);
        assert_eq!(out.len() % RECORD_ALIGN, 0);
        let (header, decoded) = decode_record(&out, 42).unwrap();
        assert_eq!((header.write_seq, header.durable_seq), (5, 4));
        assert_eq!(decoded, &body[..]);
        assert_eq!(decode_record(&out, 43), Err(DecodeError::HeaderChecksum));
    }

    #[test]
    fn every_bit_flip_of_a_record_is_detected() {
        let body = sample().encode_body();
        let mut record = Vec::new();
        encode_record(&mut record, 1, 2, 1, &body);
        for bit in 0..record.len() * 8 {
            let mut damaged = record.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_record(&damaged, 1).is_err(), "flip of bit {bit} went unnoticed");
        }
    }

    #[test]
    fn every_truncation_of_a_body_is_an_error() {
        let body = sample().encode_body();
        for len in 0..body.len() {
            let result = validate_body(&body[..len]);
            // A cut that falls exactly between items is a shorter valid body.
            if result.is_ok() {
                let decoded = WriteBatch::decode_body(&body[..len]).unwrap();
                assert!(decoded.ops().len() < sample().ops().len());
            }
        }
        assert!(validate_body(&body[..body.len() - 1]).is_err());
    }

    #[test]
    fn entry_tags_round_trip_and_sit_just_before_the_payload() {
        let mut batch = WriteBatch::new();
        batch
            .add_tagged_entries(
                GroupId(5),
                10,
                [
                    (3, 1, Bytes::from_static(b"membership")),
                    (3, 2, Bytes::new()),
                    (4, 0xFF, Bytes::from_static(b"x")),
                ],
            )
            .add_entries(GroupId(6), 1, [(1, Bytes::from_static(b"untagged"))]);
        assert_eq!(
            batch.ops()[1],
            Op::Entries {
                group: GroupId(6),
                first_index: 1,
                entries: vec![(1, 0, Bytes::from_static(b"untagged"))],
            },
            "add_entries writes tag 0"
        );
        let body = batch.encode_body();
        assert_eq!(body.len(), batch.encoded_len());
        // The first entry's header, byte for byte: term, length, tag; then the payload.
        let first = ENTRIES_ITEM_HEADER_LEN;
        assert_eq!(&body[first..first + 8], &3u64.to_le_bytes());
        assert_eq!(&body[first + 8..first + 12], &10u32.to_le_bytes());
        assert_eq!(body[first + 12], 1);
        assert_eq!(&body[first + ENTRY_HEADER_LEN..first + ENTRY_HEADER_LEN + 10], b"membership");

        let mut seen = Vec::new();
        for item in items(&body) {
            let Item::Entries { group, entries, .. } = item.unwrap() else {
                panic!("only entries were written")
            };
            for (term, tag, offset, payload) in entries {
                assert_eq!(body[offset - 1], tag, "the tag is the last byte before the payload");
                assert_eq!(&body[offset..offset + payload.len()], payload);
                seen.push((group.0, term, tag, payload.to_vec()));
            }
        }
        assert_eq!(
            seen,
            vec![
                (5, 3, 1, b"membership".to_vec()),
                (5, 3, 2, Vec::new()),
                (5, 4, 0xFF, b"x".to_vec()),
                (6, 1, 0, b"untagged".to_vec()),
            ]
        );
        assert_eq!(WriteBatch::decode_body(&body).unwrap(), batch);

        let mut record = Vec::new();
        encode_record(&mut record, 9, 2, 1, &body);
        let (_, decoded) = decode_record(&record, 9).unwrap();
        assert_eq!(WriteBatch::decode_body(decoded).unwrap(), batch);
        // The tag is covered by the body checksum.
        let tag_at = RECORD_HEADER_LEN + first + 12;
        record[tag_at] ^= 0x80;
        assert_eq!(decode_record(&record, 9), Err(DecodeError::BodyChecksum));
    }

    #[test]
    fn huge_counts_do_not_allocate() {
        // An entries item claiming 2^32-1 entries in a few bytes must fail without allocating.
        let mut body = vec![ITEM_ENTRIES];
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(validate_body(&body), Err(DecodeError::Truncated { .. })));
    }
}

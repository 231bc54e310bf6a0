//! The wire format of [`Message`]: total, allocation-bounded, little-endian.
//!
//! ```text
//! message  = version:u8 (=1) from:u64 to:u64 term:u64 tag:u8 body
//! body     = per tag, fields in declaration order; u64 little-endian, bool as u8 0/1,
//!            Option<LogIndex> as u8 0/1 then u64 if 1
//! entries  = count:u32 entry*        entry = index:u64 term:u64 kind:u8 len:u32 payload
//! snapshot = index:u64 term:u64 membership len:u32 data
//! membership = voters outgoing learners,   each = count:u32 id:u64*
//! ```
//!
//! Decoding never panics and never allocates more than a constant factor of the input length:
//! every count is checked against the bytes left before anything is reserved. Trailing bytes are
//! an error, so each message has exactly one encoding. [`decode_shared`] slices payloads out of
//! the receive buffer instead of copying them.

use bytes::Bytes;
use thiserror::Error;

use crate::message::{Message, MessageBody};
use crate::types::{Entry, EntryKind, LogIndex, Membership, NodeId, Snapshot, SnapshotMeta, Term};

/// Version byte at the start of every encoded message.
pub const VERSION: u8 = 1;

/// Smallest encoded entry: index, term, kind, payload length. Entry counts are checked against
/// it before anything is allocated.
const MIN_ENTRY_BYTES: usize = 8 + 8 + 1 + 4;
const _: () = assert!(MIN_ENTRY_BYTES as u64 <= crate::types::ENTRY_OVERHEAD_BYTES);

/// Why bytes are not a message.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended inside a field.
    #[error("truncated input")]
    Truncated,
    /// Unknown format version.
    #[error("unknown version {0}")]
    Version(u8),
    /// Unknown message tag.
    #[error("unknown message tag {0}")]
    Tag(u8),
    /// Unknown entry kind.
    #[error("unknown entry kind {0}")]
    EntryKind(u8),
    /// A boolean or option flag other than 0 or 1.
    #[error("invalid flag byte {0}")]
    Flag(u8),
    /// A count larger than the remaining input can hold.
    #[error("count {count} exceeds remaining input")]
    Count {
        /// The count read.
        count: u32,
    },
    /// Bytes after the end of the message.
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

mod tag {
    pub const PRE_VOTE: u8 = 1;
    pub const PRE_VOTE_RESPONSE: u8 = 2;
    pub const VOTE: u8 = 3;
    pub const VOTE_RESPONSE: u8 = 4;
    pub const APPEND: u8 = 5;
    pub const APPEND_RESPONSE: u8 = 6;
    pub const HEARTBEAT: u8 = 7;
    pub const HEARTBEAT_RESPONSE: u8 = 8;
    pub const SNAPSHOT: u8 = 9;
    pub const READ_INDEX: u8 = 10;
    pub const READ_INDEX_RESPONSE: u8 = 11;
    pub const TIMEOUT_NOW: u8 = 12;
    pub const READ_INDEX_QUORUM: u8 = 13;
    pub const QUIESCE: u8 = 14;
}

/// Appends the encoding of `message` to `out`.
pub fn encode(message: &Message, out: &mut Vec<u8>) {
    out.push(VERSION);
    put_u64(out, message.from.0);
    put_u64(out, message.to.0);
    put_u64(out, message.term.0);
    match &message.body {
        MessageBody::PreVote { last_index, last_term } => {
            out.push(tag::PRE_VOTE);
            put_u64(out, last_index.0);
            put_u64(out, last_term.0);
        }
        MessageBody::PreVoteResponse { reject } => {
            out.push(tag::PRE_VOTE_RESPONSE);
            out.push(u8::from(*reject));
        }
        MessageBody::Vote { last_index, last_term, transfer } => {
            out.push(tag::VOTE);
            put_u64(out, last_index.0);
            put_u64(out, last_term.0);
            out.push(u8::from(*transfer));
        }
        MessageBody::VoteResponse { reject } => {
            out.push(tag::VOTE_RESPONSE);
            out.push(u8::from(*reject));
        }
        MessageBody::Append { prev_index, prev_term, entries, commit } => {
            out.push(tag::APPEND);
            put_u64(out, prev_index.0);
            put_u64(out, prev_term.0);
            put_u64(out, commit.0);
            put_len(out, entries.len());
            for entry in entries {
                put_u64(out, entry.index.0);
                put_u64(out, entry.term.0);
                out.push(match entry.kind {
                    EntryKind::Normal => 0,
                    EntryKind::Membership => 1,
                    EntryKind::Empty => 2,
                });
                put_bytes(out, &entry.payload);
            }
        }
        MessageBody::AppendResponse { reject, index, hint_index, hint_term } => {
            out.push(tag::APPEND_RESPONSE);
            out.push(u8::from(*reject));
            put_u64(out, index.0);
            put_u64(out, hint_index.0);
            put_u64(out, hint_term.0);
        }
        MessageBody::Heartbeat { commit, seq, sent_tick } => {
            out.push(tag::HEARTBEAT);
            put_u64(out, commit.0);
            put_u64(out, *seq);
            put_u64(out, *sent_tick);
        }
        MessageBody::HeartbeatResponse { seq, sent_tick, ticks } => {
            out.push(tag::HEARTBEAT_RESPONSE);
            put_u64(out, *seq);
            put_u64(out, *sent_tick);
            put_u64(out, *ticks);
        }
        MessageBody::Snapshot { snapshot } => {
            out.push(tag::SNAPSHOT);
            put_u64(out, snapshot.meta.index.0);
            put_u64(out, snapshot.meta.term.0);
            encode_membership(&snapshot.meta.membership, out);
            put_bytes(out, &snapshot.data);
        }
        MessageBody::ReadIndex { context } => {
            out.push(tag::READ_INDEX);
            put_u64(out, *context);
        }
        MessageBody::ReadIndexQuorum { context } => {
            out.push(tag::READ_INDEX_QUORUM);
            put_u64(out, *context);
        }
        MessageBody::ReadIndexResponse { context, index } => {
            out.push(tag::READ_INDEX_RESPONSE);
            put_u64(out, *context);
            match index {
                Some(index) => {
                    out.push(1);
                    put_u64(out, index.0);
                }
                None => out.push(0),
            }
        }
        MessageBody::TimeoutNow => out.push(tag::TIMEOUT_NOW),
        MessageBody::Quiesce { commit } => {
            out.push(tag::QUIESCE);
            put_u64(out, commit.0);
        }
    }
}

/// Parses one message occupying all of `input`; payloads are copied out of it.
pub fn decode(input: &[u8]) -> Result<Message, DecodeError> {
    decode_from(Reader::new(input, None))
}

/// Parses one message occupying all of `input`; payloads are slices of `input` (no copy), so a
/// receive buffer is shared by the entries decoded from it.
pub fn decode_shared(input: &Bytes) -> Result<Message, DecodeError> {
    decode_from(Reader::new(input, Some(input)))
}

fn decode_from(mut reader: Reader<'_>) -> Result<Message, DecodeError> {
    let version = reader.u8()?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let from = NodeId(reader.u64()?);
    let to = NodeId(reader.u64()?);
    let term = Term(reader.u64()?);
    let body = match reader.u8()? {
        tag::PRE_VOTE => MessageBody::PreVote {
            last_index: LogIndex(reader.u64()?),
            last_term: Term(reader.u64()?),
        },
        tag::PRE_VOTE_RESPONSE => MessageBody::PreVoteResponse { reject: reader.flag()? },
        tag::VOTE => MessageBody::Vote {
            last_index: LogIndex(reader.u64()?),
            last_term: Term(reader.u64()?),
            transfer: reader.flag()?,
        },
        tag::VOTE_RESPONSE => MessageBody::VoteResponse { reject: reader.flag()? },
        tag::APPEND => {
            let prev_index = LogIndex(reader.u64()?);
            let prev_term = Term(reader.u64()?);
            let commit = LogIndex(reader.u64()?);
            let count = reader.count(MIN_ENTRY_BYTES)?;
            let mut entries = Vec::with_capacity(count);
            for _ in 0..count {
                let index = LogIndex(reader.u64()?);
                let term = Term(reader.u64()?);
                let kind = match reader.u8()? {
                    0 => EntryKind::Normal,
                    1 => EntryKind::Membership,
                    2 => EntryKind::Empty,
                    other => return Err(DecodeError::EntryKind(other)),
                };
                let payload = reader.bytes()?;
                entries.push(Entry { index, term, kind, payload });
            }
            MessageBody::Append { prev_index, prev_term, entries, commit }
        }
        tag::APPEND_RESPONSE => MessageBody::AppendResponse {
            reject: reader.flag()?,
            index: LogIndex(reader.u64()?),
            hint_index: LogIndex(reader.u64()?),
            hint_term: Term(reader.u64()?),
        },
        tag::HEARTBEAT => MessageBody::Heartbeat {
            commit: LogIndex(reader.u64()?),
            seq: reader.u64()?,
            sent_tick: reader.u64()?,
        },
        tag::HEARTBEAT_RESPONSE => MessageBody::HeartbeatResponse {
            seq: reader.u64()?,
            sent_tick: reader.u64()?,
            ticks: reader.u64()?,
        },
        tag::SNAPSHOT => {
            let index = LogIndex(reader.u64()?);
            let term = Term(reader.u64()?);
            let membership = reader.membership()?;
            let data = reader.bytes()?;
            MessageBody::Snapshot {
                snapshot: Snapshot { meta: SnapshotMeta { index, term, membership }, data },
            }
        }
        tag::READ_INDEX => MessageBody::ReadIndex { context: reader.u64()? },
        tag::READ_INDEX_QUORUM => MessageBody::ReadIndexQuorum { context: reader.u64()? },
        tag::READ_INDEX_RESPONSE => {
            let context = reader.u64()?;
            let index = if reader.flag()? { Some(LogIndex(reader.u64()?)) } else { None };
            MessageBody::ReadIndexResponse { context, index }
        }
        tag::TIMEOUT_NOW => MessageBody::TimeoutNow,
        tag::QUIESCE => MessageBody::Quiesce { commit: LogIndex(reader.u64()?) },
        other => return Err(DecodeError::Tag(other)),
    };
    reader.finish()?;
    Ok(Message { from, to, term, body })
}

/// Appends the encoding of a membership (the payload of [`EntryKind::Membership`] entries).
pub fn encode_membership(membership: &Membership, out: &mut Vec<u8>) {
    for list in [&membership.voters, &membership.outgoing, &membership.learners] {
        put_len(out, list.len());
        for id in list {
            put_u64(out, id.0);
        }
    }
}

/// Parses a membership occupying all of `input`.
pub fn decode_membership(input: &[u8]) -> Result<Membership, DecodeError> {
    let mut reader = Reader::new(input, None);
    let membership = reader.membership()?;
    reader.finish()?;
    Ok(membership)
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    let len = u32::try_from(len).expect("lengths on the wire fit in u32");
    out.extend_from_slice(&len.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

struct Reader<'a> {
    input: &'a [u8],
    /// Bytes consumed so far.
    position: usize,
    /// The same bytes as a shared buffer, to slice payloads from instead of copying them.
    shared: Option<&'a Bytes>,
}

impl<'a> Reader<'a> {
    fn new(input: &'a [u8], shared: Option<&'a Bytes>) -> Self {
        Self { input, position: 0, shared }
    }

    fn remaining(&self) -> usize {
        self.input.len() - self.position
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < len {
            return Err(DecodeError::Truncated);
        }
        let start = self.position;
        self.position += len;
        Ok(&self.input[start..self.position])
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            trailing => Err(DecodeError::Trailing(trailing)),
        }
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes(bytes.try_into().expect("took 4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let bytes = self.take(8)?;
        Ok(u64::from_le_bytes(bytes.try_into().expect("took 8 bytes")))
    }

    fn flag(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(DecodeError::Flag(other)),
        }
    }

    /// A count of items of at least `item_bytes` each, checked against the input left.
    fn count(&mut self, item_bytes: usize) -> Result<usize, DecodeError> {
        let count = self.u32()?;
        let fits = (count as usize).checked_mul(item_bytes).is_some_and(|n| n <= self.remaining());
        if fits { Ok(count as usize) } else { Err(DecodeError::Count { count }) }
    }

    fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.count(1)?;
        let start = self.position;
        let bytes = self.take(len)?;
        Ok(match self.shared {
            Some(shared) => shared.slice(start..start + len),
            None => Bytes::copy_from_slice(bytes),
        })
    }

    fn ids(&mut self) -> Result<Vec<NodeId>, DecodeError> {
        let count = self.count(8)?;
        let mut ids = Vec::with_capacity(count);
        for _ in 0..count {
            ids.push(NodeId(self.u64()?));
        }
        Ok(ids)
    }

    fn membership(&mut self) -> Result<Membership, DecodeError> {
        Ok(Membership { voters: self.ids()?, outgoing: self.ids()?, learners: self.ids()? })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn any_ids() -> impl Strategy<Value = Vec<NodeId>> {
        proptest::collection::vec(any::<u64>().prop_map(NodeId), 0..4)
    }

    fn any_body() -> impl Strategy<Value = MessageBody> {
        let entry =
            (any::<u64>(), any::<u64>(), 0u8..3, proptest::collection::vec(any::<u8>(), 0..8))
                .prop_map(|(index, term, kind, payload)| Entry {
                    index: LogIndex(index),
                    term: Term(term),
                    kind: [EntryKind::Normal, EntryKind::Membership, EntryKind::Empty]
                        [kind as usize],
                    payload: Bytes::from(payload),
                });
        prop_oneof![
            (any::<u64>(), any::<u64>()).prop_map(|(i, t)| MessageBody::PreVote {
                last_index: LogIndex(i),
                last_term: Term(t)
            }),
            any::<bool>().prop_map(|reject| MessageBody::PreVoteResponse { reject }),
            (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(i, t, transfer)| {
                MessageBody::Vote { last_index: LogIndex(i), last_term: Term(t), transfer }
            }),
            any::<bool>().prop_map(|reject| MessageBody::VoteResponse { reject }),
            (any::<u64>(), any::<u64>(), proptest::collection::vec(entry, 0..4), any::<u64>())
                .prop_map(|(i, t, entries, c)| MessageBody::Append {
                    prev_index: LogIndex(i),
                    prev_term: Term(t),
                    entries,
                    commit: LogIndex(c)
                }),
            (any::<bool>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
                |(reject, i, hi, ht)| MessageBody::AppendResponse {
                    reject,
                    index: LogIndex(i),
                    hint_index: LogIndex(hi),
                    hint_term: Term(ht)
                }
            ),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(c, seq, sent_tick)| {
                MessageBody::Heartbeat { commit: LogIndex(c), seq, sent_tick }
            }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(seq, sent_tick, ticks)| {
                MessageBody::HeartbeatResponse { seq, sent_tick, ticks }
            }),
            (any::<u64>(), any::<u64>(), any_ids(), any_ids(), any_ids(), any::<Vec<u8>>())
                .prop_map(|(i, t, voters, outgoing, learners, data)| MessageBody::Snapshot {
                    snapshot: Snapshot {
                        meta: SnapshotMeta {
                            index: LogIndex(i),
                            term: Term(t),
                            membership: Membership { voters, outgoing, learners }
                        },
                        data: Bytes::from(data)
                    }
                }),
            any::<u64>().prop_map(|context| MessageBody::ReadIndex { context }),
            any::<u64>().prop_map(|context| MessageBody::ReadIndexQuorum { context }),
            (any::<u64>(), proptest::option::of(any::<u64>())).prop_map(|(context, index)| {
                MessageBody::ReadIndexResponse { context, index: index.map(LogIndex) }
            }),
            Just(MessageBody::TimeoutNow),
            any::<u64>().prop_map(|c| MessageBody::Quiesce { commit: LogIndex(c) }),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips(from: u64, to: u64, term: u64, body in any_body()) {
            let message = Message { from: NodeId(from), to: NodeId(to), term: Term(term), body };
            let mut bytes = Vec::new();
            encode(&message, &mut bytes);
            prop_assert_eq!(decode(&bytes), Ok(message.clone()));
            prop_assert_eq!(decode_shared(&Bytes::from(bytes.clone())), Ok(message));
            // Every strict prefix is an error, not a panic.
            for len in 0..bytes.len() {
                prop_assert!(decode(&bytes[..len]).is_err());
            }
        }

        #[test]
        fn arbitrary_bytes_decode_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            prop_assert_eq!(decode(&bytes), decode_shared(&Bytes::from(bytes.clone())));
            if let Ok(message) = decode(&bytes) {
                let mut again = Vec::new();
                encode(&message, &mut again);
                prop_assert_eq!(again, bytes, "decoding is injective");
            }
        }
    }

    #[test]
    fn quorum_reads_and_quiesce_have_their_own_tags_and_the_lease_read_is_unchanged() {
        let header = |tag: u8| {
            let mut bytes = vec![VERSION];
            for field in [2u64, 1, 3] {
                bytes.extend_from_slice(&field.to_le_bytes());
            }
            bytes.push(tag);
            bytes.extend_from_slice(&77u64.to_le_bytes());
            bytes
        };
        let message = |body| Message { from: NodeId(2), to: NodeId(1), term: Term(3), body };
        for (tag, body) in [
            (10, MessageBody::ReadIndex { context: 77 }),
            (13, MessageBody::ReadIndexQuorum { context: 77 }),
            (14, MessageBody::Quiesce { commit: LogIndex(77) }),
        ] {
            let mut bytes = Vec::new();
            encode(&message(body.clone()), &mut bytes);
            assert_eq!(bytes, header(tag), "{}", body.name());
            assert_eq!(decode(&bytes), Ok(message(body)));
        }
        assert_eq!(decode(&header(15)), Err(DecodeError::Tag(15)));
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        let mut bytes = vec![VERSION];
        bytes.extend_from_slice(&[0; 24]);
        bytes.push(tag::APPEND);
        bytes.extend_from_slice(&[0; 24]);
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&bytes), Err(DecodeError::Count { count: u32::MAX }));
        assert_eq!(decode(&[2]), Err(DecodeError::Version(2)));
        assert_eq!(decode(&[]), Err(DecodeError::Truncated));
    }
}

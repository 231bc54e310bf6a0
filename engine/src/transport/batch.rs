//! The body of a data frame: the Raft messages of many groups bound for one peer node.
//!
//! ```text
//! batch = count:u32 item*
//! item  = group:u64 len:u32 message      message: exactly len bytes of
//!                                         flotilla_raftgroup::codec (its own version byte first)
//! ```
//!
//! Little-endian. Decoding is total: any bytes give the messages or a typed [`BatchError`], and
//! nothing is allocated beyond a constant factor of the input (the count is trusted only as far as
//! the bytes left could hold that many items). A batch decodes whole or not at all, so a damaged
//! or hostile frame changes no Raft state: the caller steps nothing and closes the connection.

use std::borrow::Borrow;

use bytes::Bytes;
use flotilla_raftgroup::Message;
use flotilla_raftgroup::codec::{self, DecodeError};
use flotilla_wal::GroupId;
use thiserror::Error;

/// Bytes of the item count at the start of a batch.
pub const COUNT_BYTES: usize = 4;
/// Bytes of an item before its message: group id and message length.
pub const ITEM_HEADER_BYTES: usize = 12;
/// The shortest message the codec produces: version, from, to, term, tag.
const MESSAGE_BYTES_MIN: usize = 1 + 8 + 8 + 8 + 1;
/// The shortest item, which bounds how many items a body can hold.
const ITEM_BYTES_MIN: usize = ITEM_HEADER_BYTES + MESSAGE_BYTES_MIN;

/// Why a frame body is not a batch.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BatchError {
    /// The body ended inside an item or inside the count.
    #[error("batch truncated at byte {offset}")]
    Truncated {
        /// Offset in the body where the missing bytes begin.
        offset: u64,
    },
    /// The count claims more items than the body could hold.
    #[error("batch claims {count} items, more than its {len} bytes can hold")]
    Count {
        /// The count read.
        count: u32,
        /// The body's length.
        len: u64,
    },
    /// An item's message does not decode.
    #[error("message {item} (group {group}) does not decode: {error}")]
    Message {
        /// Position of the item in the batch, from 0.
        item: u32,
        /// Its group.
        group: GroupId,
        /// What the message codec said.
        #[source]
        error: DecodeError,
    },
    /// Bytes after the last item.
    #[error("{len} trailing bytes after the batch")]
    Trailing {
        /// How many.
        len: u64,
    },
}

/// Appends a batch to a caller-owned buffer, item by item, encoding each message in place.
///
/// The count at the batch's start is kept up to date after every [`BatchWriter::push`], so the
/// bytes are a valid batch at any moment; there is nothing to finish.
#[derive(Debug)]
pub struct BatchWriter<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
    count: u32,
}

impl<'a> BatchWriter<'a> {
    /// Starts an empty batch at the end of `out` (typically a reused per-peer buffer, right after
    /// [`super::frame::begin`]).
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        let start = out.len();
        out.extend_from_slice(&0u32.to_le_bytes());
        Self { out, start, count: 0 }
    }

    /// Appends `message` of `group`.
    pub fn push(&mut self, group: GroupId, message: &Message) {
        self.out.extend_from_slice(&group.0.to_le_bytes());
        let len_offset = self.out.len();
        self.out.extend_from_slice(&0u32.to_le_bytes());
        codec::encode(message, self.out);
        let len = self.out.len() - len_offset - 4;
        let len = u32::try_from(len).expect("a message fits in a frame, far below 4 GiB");
        self.out[len_offset..len_offset + 4].copy_from_slice(&len.to_le_bytes());
        self.count = self.count.checked_add(1).expect("fewer than 2^32 messages per batch");
        self.out[self.start..self.start + COUNT_BYTES].copy_from_slice(&self.count.to_le_bytes());
    }

    /// Pushes the next `items` until the batch holds `bytes_target` bytes or they run out: how
    /// a sender cuts a stream of messages into frames of about that size.
    pub fn fill<M: Borrow<Message>>(
        &mut self,
        items: &mut impl Iterator<Item = (GroupId, M)>,
        bytes_target: usize,
    ) {
        while self.len_bytes() < bytes_target {
            let Some((group, message)) = items.next() else { break };
            self.push(group, message.borrow());
        }
    }

    /// Items pushed so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Bytes of the batch so far, count included: what a flush threshold compares.
    pub fn len_bytes(&self) -> usize {
        self.out.len() - self.start
    }
}

/// Appends a whole batch of `items` to `out`; returns how many there were.
pub fn encode<'m>(
    items: impl IntoIterator<Item = (GroupId, &'m Message)>,
    out: &mut Vec<u8>,
) -> u32 {
    let mut writer = BatchWriter::new(out);
    for (group, message) in items {
        writer.push(group, message);
    }
    writer.count()
}

/// The most items `decode` reserves room for before any has decoded.
const RESERVE_ITEMS_MAX: usize = 4096;

/// Decodes a whole batch into `out` (cleared first). On error `out` is left empty: a batch is
/// taken whole or not at all.
pub fn decode(body: &[u8], out: &mut Vec<(GroupId, Message)>) -> Result<(), BatchError> {
    out.clear();
    let result = decode_into(body, out);
    if result.is_err() {
        out.clear();
    }
    result
}

/// Like [`decode`], but the messages' payloads are slices of `body` (no copy): what a receiver
/// uses on a frame body it owns.
pub fn decode_shared(body: &Bytes, out: &mut Vec<(GroupId, Message)>) -> Result<(), BatchError> {
    out.clear();
    let result = decode_into_with(body, out, |bytes| codec::decode_shared(&body.slice_ref(bytes)));
    if result.is_err() {
        out.clear();
    }
    result
}

fn decode_into(body: &[u8], out: &mut Vec<(GroupId, Message)>) -> Result<(), BatchError> {
    decode_into_with(body, out, codec::decode)
}

fn decode_into_with(
    body: &[u8],
    out: &mut Vec<(GroupId, Message)>,
    decode_message: impl Fn(&[u8]) -> Result<Message, DecodeError>,
) -> Result<(), BatchError> {
    let items = RawItems::new(body)?;
    // The count is bounded by the body length, but a `(GroupId, Message)` is much larger than the
    // smallest encoded item: reserving for a maximal frame up front would take ~60 MiB at once.
    // Reserve a bounded start and let the vector grow with items that actually decode.
    out.reserve((items.remaining() as usize).min(RESERVE_ITEMS_MAX));
    for (item, raw) in (0..).zip(items) {
        let (group, bytes) = raw?;
        let message =
            decode_message(bytes).map_err(|error| BatchError::Message { item, group, error })?;
        out.push((group, message));
    }
    Ok(())
}

/// The items of a batch with their messages still encoded: for routing each group's bytes to the
/// shard that owns it without decoding them twice. Yields at most the count's items, then checks
/// that nothing trails them; after an error it yields nothing more.
#[derive(Clone, Debug)]
pub struct RawItems<'a> {
    body: &'a [u8],
    offset: usize,
    remaining: u32,
    done: bool,
}

impl<'a> RawItems<'a> {
    /// Reads the count of `body` and checks that the body could hold that many items.
    pub fn new(body: &'a [u8]) -> Result<Self, BatchError> {
        let Some(count_bytes) = body.first_chunk::<COUNT_BYTES>() else {
            return Err(BatchError::Truncated { offset: 0 });
        };
        let count = u32::from_le_bytes(*count_bytes);
        let room = body.len() - COUNT_BYTES;
        if (count as usize).checked_mul(ITEM_BYTES_MIN).is_none_or(|needed| needed > room) {
            return Err(BatchError::Count { count, len: body.len() as u64 });
        }
        Ok(Self { body, offset: COUNT_BYTES, remaining: count, done: false })
    }

    /// Items not yet yielded.
    pub fn remaining(&self) -> u32 {
        self.remaining
    }

    fn next_item(&mut self) -> Result<(GroupId, &'a [u8]), BatchError> {
        let truncated = BatchError::Truncated { offset: self.body.len() as u64 };
        let rest = &self.body[self.offset..];
        let Some((header, rest)) = rest.split_first_chunk::<ITEM_HEADER_BYTES>() else {
            return Err(truncated);
        };
        let (group_bytes, len_bytes) = header.split_at(8);
        let group = GroupId(u64::from_le_bytes(group_bytes.try_into().expect("8 bytes")));
        let len = u32::from_le_bytes(len_bytes.try_into().expect("4 bytes")) as usize;
        let Some(message) = rest.get(..len) else {
            return Err(truncated);
        };
        self.offset += ITEM_HEADER_BYTES + len;
        Ok((group, message))
    }
}

impl<'a> Iterator for RawItems<'a> {
    type Item = Result<(GroupId, &'a [u8]), BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.remaining == 0 {
            self.done = true;
            let trailing = self.body.len() - self.offset;
            return (trailing != 0).then_some(Err(BatchError::Trailing { len: trailing as u64 }));
        }
        self.remaining -= 1;
        let item = self.next_item();
        self.done = item.is_err();
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use flotilla_raftgroup::{
        Entry, EntryKind, LogIndex, Membership, MessageBody, NodeId, Snapshot, SnapshotMeta, Term,
    };
    use proptest::prelude::*;

    use super::*;

    fn message(body: MessageBody) -> Message {
        Message { from: NodeId(1), to: NodeId(2), term: Term(5), body }
    }

    fn any_message() -> impl Strategy<Value = Message> {
        let entry = (any::<u64>(), 0u8..3, proptest::collection::vec(any::<u8>(), 0..16)).prop_map(
            |(index, kind, payload)| Entry {
                index: LogIndex(index),
                term: Term(3),
                kind: [EntryKind::Normal, EntryKind::Membership, EntryKind::Empty]
                    [usize::from(kind)],
                payload: Bytes::from(payload),
            },
        );
        let body = prop_oneof![
            (any::<u64>(), any::<u64>()).prop_map(|(index, term)| MessageBody::PreVote {
                last_index: LogIndex(index),
                last_term: Term(term)
            }),
            any::<bool>().prop_map(|reject| MessageBody::VoteResponse { reject }),
            (any::<u64>(), proptest::collection::vec(entry, 0..4), any::<u64>()).prop_map(
                |(prev, entries, commit)| MessageBody::Append {
                    prev_index: LogIndex(prev),
                    prev_term: Term(2),
                    entries,
                    commit: LogIndex(commit)
                }
            ),
            (any::<u64>(), any::<u64>()).prop_map(|(seq, sent_tick)| MessageBody::Heartbeat {
                commit: LogIndex(seq),
                seq,
                sent_tick
            }),
            proptest::collection::vec(any::<u8>(), 0..64).prop_map(|data| MessageBody::Snapshot {
                snapshot: Snapshot {
                    meta: SnapshotMeta {
                        index: LogIndex(9),
                        term: Term(2),
                        membership: Membership {
                            voters: vec![NodeId(1), NodeId(2)],
                            outgoing: vec![],
                            learners: vec![NodeId(3)],
                        },
                    },
                    data: Bytes::from(data),
                }
            }),
            Just(MessageBody::TimeoutNow),
        ];
        (any::<u64>(), any::<u64>(), any::<u64>(), body).prop_map(|(from, to, term, body)| {
            Message { from: NodeId(from), to: NodeId(to), term: Term(term), body }
        })
    }

    #[test]
    fn layout_matches_the_documented_format() {
        let timeout = message(MessageBody::TimeoutNow);
        let mut out = vec![0xAA];
        assert_eq!(encode([(GroupId(3), &timeout)], &mut out), 1);
        let mut expected = vec![0xAA, 1, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0];
        let mut message_bytes = Vec::new();
        codec::encode(&timeout, &mut message_bytes);
        expected.extend_from_slice(&(message_bytes.len() as u32).to_le_bytes());
        expected.extend_from_slice(&message_bytes);
        assert_eq!(out, expected);
        assert_eq!(message_bytes.len(), MESSAGE_BYTES_MIN, "the shortest message");
    }

    #[test]
    fn an_empty_batch_is_four_zero_bytes() {
        let mut out = Vec::new();
        assert_eq!(encode([], &mut out), 0);
        assert_eq!(out, [0, 0, 0, 0]);
        let mut decoded = vec![(GroupId(1), message(MessageBody::TimeoutNow))];
        decode(&out, &mut decoded).unwrap();
        assert!(decoded.is_empty(), "the output is cleared");
    }

    #[test]
    fn a_count_beyond_the_body_is_refused_before_allocating() {
        let mut body = u32::MAX.to_le_bytes().to_vec();
        body.extend_from_slice(&[0; 100]);
        let mut out = Vec::new();
        assert_eq!(decode(&body, &mut out), Err(BatchError::Count { count: u32::MAX, len: 104 }));
        assert_eq!(out.capacity(), 0);
        // Two items need at least 2 * 38 bytes after the count.
        let mut body = 2u32.to_le_bytes().to_vec();
        body.extend_from_slice(&[0; 2 * ITEM_BYTES_MIN - 1]);
        assert!(matches!(decode(&body, &mut out), Err(BatchError::Count { count: 2, .. })));
        assert_eq!(decode(&[1, 0], &mut out), Err(BatchError::Truncated { offset: 0 }));
    }

    #[test]
    fn errors_name_the_item_and_leave_no_partial_batch() {
        let good = message(MessageBody::VoteResponse { reject: false });
        let mut body = Vec::new();
        let mut writer = BatchWriter::new(&mut body);
        writer.push(GroupId(1), &good);
        writer.push(GroupId(2), &good);
        assert_eq!((writer.count(), writer.len_bytes()), (2, body.len()));
        // Corrupt the second message's version byte.
        let second = COUNT_BYTES + 2 * ITEM_HEADER_BYTES + MESSAGE_BYTES_MIN + 1;
        let mut bad = body.clone();
        bad[second] = 9;
        let mut out = Vec::new();
        assert_eq!(
            decode(&bad, &mut out),
            Err(BatchError::Message { item: 1, group: GroupId(2), error: DecodeError::Version(9) })
        );
        assert!(out.is_empty(), "the first message is not handed out");
        let mut trailing = body.clone();
        trailing.push(0);
        assert_eq!(decode(&trailing, &mut out), Err(BatchError::Trailing { len: 1 }));
        // A length running past the end is truncation, whatever the count says.
        let mut long = body.clone();
        long[COUNT_BYTES + 8..COUNT_BYTES + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&long, &mut out), Err(BatchError::Truncated { .. })));
        decode(&body, &mut out).unwrap();
        assert_eq!(out, vec![(GroupId(1), good.clone()), (GroupId(2), good)]);
    }

    proptest! {
        #[test]
        fn batches_round_trip(
            items in proptest::collection::vec((any::<u64>(), any_message()), 0..8),
            prefix in proptest::collection::vec(any::<u8>(), 0..4),
        ) {
            let mut out = prefix.clone();
            let count = encode(items.iter().map(|(group, m)| (GroupId(*group), m)), &mut out);
            prop_assert_eq!(count as usize, items.len());
            let body = &out[prefix.len()..];
            let mut decoded = Vec::new();
            decode(body, &mut decoded).unwrap();
            let expected: Vec<_> = items.into_iter().map(|(g, m)| (GroupId(g), m)).collect();
            prop_assert_eq!(&decoded, &expected);
            let raw: Vec<_> = RawItems::new(body).unwrap().collect::<Result<_, _>>().unwrap();
            prop_assert_eq!(raw.len(), expected.len());
            for len in 0..body.len() {
                prop_assert!(decode(&body[..len], &mut decoded).is_err());
                prop_assert!(decoded.is_empty());
            }
        }

        #[test]
        fn arbitrary_bodies_decode_or_fail(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut out = Vec::new();
            if decode(&body, &mut out).is_ok() {
                let mut again = Vec::new();
                encode(out.iter().map(|(group, m)| (*group, m)), &mut again);
                prop_assert_eq!(again, body, "one encoding per batch");
            } else {
                prop_assert!(out.is_empty());
            }
        }
    }
}

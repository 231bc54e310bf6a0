//! The snapshot stream: how a group's snapshot reaches a follower too far behind for the log.
//!
//! A snapshot is never a Raft message on the data connection: it may be gigabytes, and a frame
//! that large would hold up every other group's heartbeats and votes behind it (and exceed the
//! frame limit). The leader's node streams the group's snapshot *file* instead, byte for byte,
//! on a connection of its own, in bounded chunks paced by a per-node rate limit; the follower's
//! node spools them to disk, and only once the whole file is there and verified does the Raft
//! message reach the group — carrying the file's data as a memory map, not a copy. A stream cut
//! by a disconnect resumes where it stopped: the receiver answers each offer with how much of
//! that very file it already holds.
//!
//! Every message is the body of one [`FrameKind::Snapshot`](super::frame::FrameKind) frame:
//!
//! ```text
//! message = tag:u8 group:u64 index:u64 term:u64 rest         integers little-endian
//!   tag 1 Offer     file_len:u64 file_crc:u32 raft_len:u32 raft   sender → receiver
//!   tag 2 Resume    offset:u64                                     receiver → sender
//!   tag 3 Chunk     offset:u64 data (the rest of the body)         sender → receiver
//!   tag 4 Installed                                                receiver → sender
//!   tag 5 Refused   reason:u8                                      receiver → sender
//!   reason 1 Storage, 2 Corrupt, 3 UnknownGroup, 4 TooLarge (see RefuseReason)
//! ```
//!
//! `group`, `index` and `term` name the snapshot (a [`StreamId`]); `file_len` and `file_crc` (the
//! CRC the file ends with, which covers all of it) pin down the exact bytes, so a resumed stream
//! never splices two different files. `raft` is the Raft `Snapshot` message, encoded by
//! `flotilla_raftgroup::codec` with empty data: the receiver attaches the file's data. Decoding
//! is total and allocates nothing: any bytes give a message borrowing from the body or a typed
//! [`StreamError`].

use bytes::{BufMut, Bytes};
use flotilla_raftgroup::{LogIndex, Term};
use flotilla_wal::GroupId;
use thiserror::Error;

/// Bytes of every message before its kind-specific part: tag, group, index, term.
pub const PREFIX_BYTES: usize = 1 + 8 + 8 + 8;

const TAG_OFFER: u8 = 1;
const TAG_RESUME: u8 = 2;
const TAG_CHUNK: u8 = 3;
const TAG_INSTALLED: u8 = 4;
const TAG_REFUSED: u8 = 5;

/// Names one snapshot of one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StreamId {
    /// The group.
    pub group: GroupId,
    /// The last log index the snapshot covers.
    pub index: LogIndex,
    /// The term of that entry.
    pub term: Term,
}

/// Why a receiver refused a stream. The sender gives up on this offer; the leader's Raft
/// retries with a fresh one after an election timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefuseReason {
    /// The receiver could not write the file (disk full, IO error).
    Storage,
    /// The file received does not verify (length, checksum, or not the snapshot offered).
    Corrupt,
    /// The group is not hosted by the receiving node.
    UnknownGroup,
    /// The offered file is larger than the receiver accepts (`EngineConfig::snapshot_bytes_max`).
    TooLarge,
}

impl RefuseReason {
    fn code(self) -> u8 {
        match self {
            Self::Storage => 1,
            Self::Corrupt => 2,
            Self::UnknownGroup => 3,
            Self::TooLarge => 4,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Storage),
            2 => Some(Self::Corrupt),
            3 => Some(Self::UnknownGroup),
            4 => Some(Self::TooLarge),
            _ => None,
        }
    }
}

/// One message of a snapshot stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamMessage {
    /// The sender has this file to send.
    Offer {
        /// Which snapshot.
        id: StreamId,
        /// The file's length in bytes.
        file_len: u64,
        /// The CRC-32 the file ends with.
        file_crc: u32,
        /// The Raft `Snapshot` message to deliver once the file is complete, with empty data.
        raft: Bytes,
    },
    /// The receiver holds the first `offset` bytes of the offered file: send the rest.
    Resume {
        /// Which snapshot.
        id: StreamId,
        /// Bytes already held.
        offset: u64,
    },
    /// Bytes of the file from `offset`.
    Chunk {
        /// Which snapshot.
        id: StreamId,
        /// Where `data` starts in the file.
        offset: u64,
        /// The bytes (a slice of the frame body).
        data: Bytes,
    },
    /// The receiver has the whole file, verified, and handed the snapshot to the group.
    Installed {
        /// Which snapshot.
        id: StreamId,
    },
    /// The receiver gave up on this file.
    Refused {
        /// Which snapshot.
        id: StreamId,
        /// Why.
        reason: RefuseReason,
    },
}

/// Why bytes are not a snapshot-stream message.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The body ends before the message does.
    #[error("snapshot stream message truncated: {len} bytes")]
    Truncated {
        /// The body's length.
        len: usize,
    },
    /// An unknown message tag.
    #[error("unknown snapshot stream message tag {tag}")]
    Tag {
        /// The tag read.
        tag: u8,
    },
    /// An unknown refusal reason.
    #[error("unknown refusal reason {code}")]
    Reason {
        /// The code read.
        code: u8,
    },
    /// Bytes after a fixed-size message.
    #[error("{len} trailing bytes after a snapshot stream message")]
    Trailing {
        /// How many.
        len: usize,
    },
}

impl StreamMessage {
    /// The snapshot this message is about.
    pub fn id(&self) -> StreamId {
        match self {
            Self::Offer { id, .. }
            | Self::Resume { id, .. }
            | Self::Chunk { id, .. }
            | Self::Installed { id }
            | Self::Refused { id, .. } => *id,
        }
    }

    /// Appends the encoded message to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (tag, id) = match self {
            Self::Offer { id, .. } => (TAG_OFFER, id),
            Self::Resume { id, .. } => (TAG_RESUME, id),
            Self::Chunk { id, .. } => (TAG_CHUNK, id),
            Self::Installed { id } => (TAG_INSTALLED, id),
            Self::Refused { id, .. } => (TAG_REFUSED, id),
        };
        out.put_u8(tag);
        out.put_u64_le(id.group.0);
        out.put_u64_le(id.index.0);
        out.put_u64_le(id.term.0);
        match self {
            Self::Offer { file_len, file_crc, raft, .. } => {
                out.put_u64_le(*file_len);
                out.put_u32_le(*file_crc);
                // A Raft message without data is a few hundred bytes at most (a membership).
                out.put_u32_le(u32::try_from(raft.len()).expect("raft message under 4 GiB"));
                out.extend_from_slice(raft);
            }
            Self::Resume { offset, .. } => out.put_u64_le(*offset),
            Self::Chunk { offset, data, .. } => {
                out.put_u64_le(*offset);
                out.extend_from_slice(data);
            }
            Self::Installed { .. } => {}
            Self::Refused { reason, .. } => out.put_u8(reason.code()),
        }
    }

    /// Decodes one message from a whole frame body; [`StreamMessage::Chunk`] data and the
    /// offer's Raft message are slices of `body`.
    pub fn decode(body: &Bytes) -> Result<Self, StreamError> {
        let truncated = || StreamError::Truncated { len: body.len() };
        let mut at = PREFIX_BYTES;
        if body.len() < at {
            return Err(truncated());
        }
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
        let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().expect("4 bytes"));
        let id = StreamId {
            group: GroupId(u64_at(1)),
            index: LogIndex(u64_at(9)),
            term: Term(u64_at(17)),
        };
        let need =
            |at: usize, n: usize| if body.len() - at < n { Err(truncated()) } else { Ok(()) };
        let message = match body[0] {
            TAG_OFFER => {
                need(at, 16)?;
                let file_len = u64_at(at);
                let file_crc = u32_at(at + 8);
                let raft_len = u32_at(at + 12) as usize;
                at += 16;
                need(at, raft_len)?;
                let raft = body.slice(at..at + raft_len);
                at += raft_len;
                Self::Offer { id, file_len, file_crc, raft }
            }
            TAG_RESUME => {
                need(at, 8)?;
                at += 8;
                Self::Resume { id, offset: u64_at(at - 8) }
            }
            TAG_CHUNK => {
                need(at, 8)?;
                let offset = u64_at(at);
                let data = body.slice(at + 8..);
                at = body.len();
                Self::Chunk { id, offset, data }
            }
            TAG_INSTALLED => Self::Installed { id },
            TAG_REFUSED => {
                need(at, 1)?;
                let code = body[at];
                at += 1;
                let reason = RefuseReason::from_code(code).ok_or(StreamError::Reason { code })?;
                Self::Refused { id, reason }
            }
            tag => return Err(StreamError::Tag { tag }),
        };
        if at != body.len() {
            return Err(StreamError::Trailing { len: body.len() - at });
        }
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn id() -> StreamId {
        StreamId { group: GroupId(7), index: LogIndex(1000), term: Term(3) }
    }

    fn all() -> Vec<StreamMessage> {
        vec![
            StreamMessage::Offer {
                id: id(),
                file_len: 1 << 33,
                file_crc: 0xdead_beef,
                raft: Bytes::from_static(b"raft message"),
            },
            StreamMessage::Resume { id: id(), offset: 4096 },
            StreamMessage::Chunk { id: id(), offset: 8192, data: Bytes::from(vec![5u8; 300]) },
            StreamMessage::Chunk { id: id(), offset: 0, data: Bytes::new() },
            StreamMessage::Installed { id: id() },
            StreamMessage::Refused { id: id(), reason: RefuseReason::Storage },
            StreamMessage::Refused { id: id(), reason: RefuseReason::Corrupt },
            StreamMessage::Refused { id: id(), reason: RefuseReason::UnknownGroup },
            StreamMessage::Refused { id: id(), reason: RefuseReason::TooLarge },
        ]
    }

    fn encoded(message: &StreamMessage) -> Bytes {
        let mut out = Vec::new();
        message.encode(&mut out);
        Bytes::from(out)
    }

    #[test]
    fn every_message_round_trips() {
        for message in all() {
            assert_eq!(StreamMessage::decode(&encoded(&message)), Ok(message.clone()));
            assert_eq!(message.id(), id());
        }
    }

    #[test]
    fn every_truncation_and_extension_of_a_fixed_message_is_refused() {
        for message in all() {
            let bytes = encoded(&message);
            let chunk = matches!(message, StreamMessage::Chunk { .. });
            for len in 0..bytes.len() {
                let cut = bytes.slice(..len);
                // A chunk cut inside its data is a shorter chunk: the offer's length and the
                // file's checksum catch that, not the message codec.
                if chunk && len >= PREFIX_BYTES + 8 {
                    continue;
                }
                assert!(StreamMessage::decode(&cut).is_err(), "{message:?} cut at {len}");
            }
            if !chunk {
                let mut longer = bytes.to_vec();
                longer.push(0);
                assert_eq!(
                    StreamMessage::decode(&Bytes::from(longer)),
                    Err(StreamError::Trailing { len: 1 })
                );
            }
        }
    }

    #[test]
    fn unknown_tags_and_reasons_are_refused() {
        let mut bytes = encoded(&StreamMessage::Installed { id: id() }).to_vec();
        bytes[0] = 9;
        assert_eq!(StreamMessage::decode(&Bytes::from(bytes)), Err(StreamError::Tag { tag: 9 }));
        let mut bytes =
            encoded(&StreamMessage::Refused { id: id(), reason: RefuseReason::Storage }).to_vec();
        *bytes.last_mut().unwrap() = 0;
        assert_eq!(
            StreamMessage::decode(&Bytes::from(bytes)),
            Err(StreamError::Reason { code: 0 })
        );
    }

    #[test]
    fn an_offer_claiming_a_huge_raft_message_is_refused_without_allocating() {
        let mut bytes = encoded(&all()[0]).to_vec();
        let at = PREFIX_BYTES + 12;
        bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            StreamMessage::decode(&Bytes::from(bytes)),
            Err(StreamError::Truncated { .. })
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_decode_or_fail_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let body = Bytes::from(bytes);
            if let Ok(message) = StreamMessage::decode(&body) {
                prop_assert_eq!(encoded(&message), body);
            }
        }
    }
}

//! The client protocol's bytes: frames, requests and responses.
//!
//! ```text
//! frame    = header body
//! header   = magic:"FLCP" version:u8 (=1) kind:u8 (1 request, 2 response) reserved:u16 (=0)
//!            id:u64 length:u32 body_crc:u32 header_crc:u32          (28 bytes)
//! body     = length bytes (at most BODY_MAX); body_crc is its CRC-32, header_crc the CRC-32 of
//!            the 24 header bytes before it
//! request  = tag:u8 then, per tag:
//!            1 put      group:u64 key:bytes value:bytes
//!            2 get      group:u64 consistency key:bytes
//!            3 delete   group:u64 key:bytes
//!            4 cas      group:u64 key:bytes expected:option new:option
//!            5 status   group:u64
//!            6 stats
//!            7 dump     group:u64
//! consistency = 1 linearizable | 2 lease | 3 stale max_lag_ms:u64
//! response = tag:u8 then, per tag:
//!            1 written  index:u64
//!            2 value    option
//!            3 deleted  index:u64 existed:u8
//!            4 swapped  index:u64
//!            5 mismatch index:u64 actual:option
//!            6 status   role:u8 leader:u64 (0: none) term:u64 commit:u64 applied:u64 last:u64
//!            7 stats    node:u64 backend:bytes shards:u32 groups:u64 leaders:u64
//!                       fdatasyncs:u64 entries:u64 frames:u64 messages:u64
//!            8 dump     applied:u64 count:u32 (key:bytes value:bytes)*count
//!            9 error    error
//! error    = tag:u8 then: 1 not-leader hint:u64 (0: none) | 2 no-quorum | 3 busy | 4 timeout
//!            | 5 group-not-found group:u64 | 6 shutting-down | 7 proposal-dropped
//!            | 8 invalid-argument text | 9 storage text | 10 rejected text | 11 bad-request text
//!            | 12 too-large
//! bytes    = len:u32 data          option = 0:u8 | 1:u8 bytes          text = bytes (UTF-8)
//! ```
//!
//! Integers are little-endian. A response carries the id of its request, so a connection can
//! have many requests in flight. Decoding is total: any input gives a value or a typed error,
//! never a panic. The header (magic, version, checksum) is checked before its length is trusted,
//! and a length above [`BODY_MAX`] is refused before anything is allocated for it, so a bad peer
//! makes the reader buffer at most one header plus [`BODY_MAX`].

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FLCP";
/// The protocol version this code speaks.
pub const VERSION: u8 = 1;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 28;
/// The largest body accepted: bounds what a bad peer can make a reader allocate.
pub const BODY_MAX: usize = 4 << 20;

const _: () = assert!(BODY_MAX <= u32::MAX as usize);

/// Who sent a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// A client's request.
    Request,
    /// A node's answer.
    Response,
}

/// One decoded frame: its kind, request id and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Request or response.
    pub kind: FrameKind,
    /// The request id (a response echoes its request's).
    pub id: u64,
    /// The encoded request or response.
    pub body: Bytes,
}

/// Why bytes are not a frame. Every one of them ends the connection: after a bad frame the
/// stream's framing cannot be trusted.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The stream does not start with [`MAGIC`]: not this protocol.
    #[error("bad magic {0:02x?}")]
    Magic([u8; 4]),
    /// A protocol version this code does not speak.
    #[error("unsupported version {0}")]
    Version(u8),
    /// The header's checksum does not match.
    #[error("header checksum mismatch")]
    HeaderChecksum,
    /// A frame kind other than request or response.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// The reserved field is not zero.
    #[error("reserved field is {0}, not 0")]
    Reserved(u16),
    /// The body is longer than [`BODY_MAX`].
    #[error("body of {length} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The length the header claims.
        length: u64,
        /// [`BODY_MAX`].
        max: usize,
    },
    /// The body's checksum does not match.
    #[error("body checksum mismatch")]
    BodyChecksum,
}

/// Appends a frame of `kind` with request `id` around `body` to `out`.
///
/// # Panics
/// If `body` is longer than [`BODY_MAX`]: callers bound what they encode (see
/// [`Response::encode_bounded`]).
pub fn encode_frame(kind: FrameKind, id: u64, body: &[u8], out: &mut Vec<u8>) {
    assert!(body.len() <= BODY_MAX, "frame body of {} bytes over the limit", body.len());
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(match kind {
        FrameKind::Request => 1,
        FrameKind::Response => 2,
    });
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    let header_crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(body);
}

/// Takes one frame off the front of `buffer`: `Ok(None)` if it does not hold a whole frame yet
/// (read more and call again), an error as soon as the bytes present prove it bad.
///
/// Checks, in order: magic (from 4 bytes on), version (from 5), then with the whole header its
/// checksum, kind, reserved field and length bound — all before the length is used — and with
/// the whole body its checksum.
pub fn decode_frame(buffer: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if buffer.len() >= 4 && buffer[..4] != MAGIC {
        let mut magic = [0; 4];
        magic.copy_from_slice(&buffer[..4]);
        return Err(FrameError::Magic(magic));
    }
    if buffer.len() >= 5 && buffer[4] != VERSION {
        return Err(FrameError::Version(buffer[4]));
    }
    let Some(header) = buffer.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    if crc32fast::hash(&header[..24]) != word(24) {
        return Err(FrameError::HeaderChecksum);
    }
    let kind = match header[5] {
        1 => FrameKind::Request,
        2 => FrameKind::Response,
        other => return Err(FrameError::Kind(other)),
    };
    let reserved = u16::from_le_bytes([header[6], header[7]]);
    if reserved != 0 {
        return Err(FrameError::Reserved(reserved));
    }
    let id = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let length = word(16) as usize;
    if length > BODY_MAX {
        return Err(FrameError::TooLarge { length: length as u64, max: BODY_MAX });
    }
    let body_crc = word(20);
    if buffer.len() < HEADER_LEN + length {
        return Ok(None);
    }
    buffer.advance(HEADER_LEN);
    let body = buffer.split_to(length).freeze();
    if crc32fast::hash(&body) != body_crc {
        return Err(FrameError::BodyChecksum);
    }
    Ok(Some(Frame { kind, id, body }))
}

/// How fresh a read must be (the engine's [`flotilla::Consistency`] on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadConsistency {
    /// A quorum-confirmed read on the leader (ReadIndex).
    Linearizable,
    /// The leader's lease (linearizable when the node runs without lease reads).
    Lease,
    /// Any replica that heard from its leader within `max_lag_ms`.
    Stale {
        /// How long ago, in milliseconds.
        max_lag_ms: u64,
    },
}

/// What a client asks a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Sets `key` to `value` in `group`.
    Put {
        /// The group.
        group: u64,
        /// The key.
        key: Bytes,
        /// The value.
        value: Bytes,
    },
    /// Reads `key` in `group`.
    Get {
        /// The group.
        group: u64,
        /// How fresh.
        consistency: ReadConsistency,
        /// The key.
        key: Bytes,
    },
    /// Removes `key` from `group`.
    Delete {
        /// The group.
        group: u64,
        /// The key.
        key: Bytes,
    },
    /// Sets `key` to `new` if it holds `expected` (`None`: absent on either side).
    CompareAndSet {
        /// The group.
        group: u64,
        /// The key.
        key: Bytes,
        /// The value required.
        expected: Option<Bytes>,
        /// The value stored (`None`: delete).
        new: Option<Bytes>,
    },
    /// This node's replica of `group`: role, leader, positions.
    Status {
        /// The group.
        group: u64,
    },
    /// The node's counters, summed over its shards.
    Stats,
    /// Every key and value of this node's replica of `group`, with its applied index: to
    /// compare replicas.
    Dump {
        /// The group.
        group: u64,
    },
}

/// A replica's role (the engine's [`flotilla::raftgroup::Role`] on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Follows a leader.
    Follower,
    /// Asks whether it could win an election.
    PreCandidate,
    /// Campaigns.
    Candidate,
    /// Leads.
    Leader,
}

/// A replica's state, as [`Request::Status`] answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// Its role.
    pub role: Role,
    /// The leader it knows of.
    pub leader: Option<u64>,
    /// Its term.
    pub term: u64,
    /// Its commit index.
    pub commit: u64,
    /// Its applied index.
    pub applied: u64,
    /// Its last log index.
    pub last_index: u64,
}

/// A node's counters since it started, summed over its shards ([`Request::Stats`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stats {
    /// The node's id.
    pub node: u64,
    /// Its WAL backend (`io_uring` or `portable`).
    pub backend: String,
    /// Its shard threads.
    pub shards: u32,
    /// Groups it hosts.
    pub groups: u64,
    /// Groups it leads.
    pub leaders: u64,
    /// WAL fdatasyncs.
    pub fdatasyncs: u64,
    /// WAL entries written.
    pub entries: u64,
    /// Frames sent to peers.
    pub frames: u64,
    /// Raft messages those frames carried.
    pub messages: u64,
}

/// Why a node refused or failed a request: the engine's [`flotilla::Error`] on the wire, plus
/// the protocol's own refusals.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// This node does not lead the group; `hint` is the leader it knows of.
    #[error("not leader (hint: {hint:?})")]
    NotLeader {
        /// The leader's node id, if known.
        hint: Option<u64>,
    },
    /// No reachable leader.
    #[error("no quorum")]
    NoQuorum,
    /// Too much queued: back off.
    #[error("busy")]
    Busy,
    /// The node's deadline passed; a write may still apply.
    #[error("deadline exceeded on the node")]
    Timeout,
    /// The node does not host the group.
    #[error("group {group} not found")]
    GroupNotFound {
        /// The group.
        group: u64,
    },
    /// The node is stopping.
    #[error("shutting down")]
    ShuttingDown,
    /// A leader change overwrote the proposal.
    #[error("proposal dropped by a leader change")]
    ProposalDropped,
    /// The arguments are wrong.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The node's storage failed.
    #[error("storage failure: {0}")]
    Storage(String),
    /// Refused for another reason.
    #[error("rejected: {0}")]
    Rejected(String),
    /// The node could not decode the request (the connection is closed after this answer).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The answer would exceed [`BODY_MAX`].
    #[error("response too large")]
    TooLarge,
}

/// A node's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// A put applied at `index`.
    Written {
        /// Its log index.
        index: u64,
    },
    /// A get's value (`None`: absent).
    Value(Option<Bytes>),
    /// A delete applied at `index`.
    Deleted {
        /// Its log index.
        index: u64,
        /// Whether the key was there.
        existed: bool,
    },
    /// A compare-and-set matched and wrote.
    Swapped {
        /// Its log index.
        index: u64,
    },
    /// A compare-and-set did not match and changed nothing.
    Mismatch {
        /// Its log index.
        index: u64,
        /// The value found.
        actual: Option<Bytes>,
    },
    /// A replica's state.
    Status(Status),
    /// The node's counters.
    Stats(Stats),
    /// A replica's whole map, at `applied`.
    Dump {
        /// The applied index the map is at.
        applied: u64,
        /// Keys and values, in key order.
        entries: Vec<(Bytes, Bytes)>,
    },
    /// The request failed.
    Error(RemoteError),
}

/// Why a body is not a request or a response.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The body ended inside a field.
    #[error("truncated body")]
    Truncated,
    /// An unknown tag.
    #[error("unknown {what} tag {tag}")]
    Tag {
        /// Which tag.
        what: &'static str,
        /// Its value.
        tag: u8,
    },
    /// A flag byte other than 0 or 1.
    #[error("invalid flag {0}")]
    Flag(u8),
    /// Text that is not UTF-8.
    #[error("text is not UTF-8")]
    Utf8,
    /// Bytes after the value.
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

mod tag {
    pub const PUT: u8 = 1;
    pub const GET: u8 = 2;
    pub const DELETE: u8 = 3;
    pub const CAS: u8 = 4;
    pub const STATUS: u8 = 5;
    pub const STATS: u8 = 6;
    pub const DUMP: u8 = 7;

    pub const WRITTEN: u8 = 1;
    pub const VALUE: u8 = 2;
    pub const DELETED: u8 = 3;
    pub const SWAPPED: u8 = 4;
    pub const MISMATCH: u8 = 5;
    pub const STATUS_REPLY: u8 = 6;
    pub const STATS_REPLY: u8 = 7;
    pub const DUMP_REPLY: u8 = 8;
    pub const ERROR: u8 = 9;
}

impl Request {
    /// Appends the encoding of this request (a frame body) to `out`.
    ///
    /// # Panics
    /// If a key or value is longer than `u32::MAX` bytes (a frame bounds them far below).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Put { group, key, value } => {
                out.push(tag::PUT);
                out.extend_from_slice(&group.to_le_bytes());
                put_bytes(out, key);
                put_bytes(out, value);
            }
            Self::Get { group, consistency, key } => {
                out.push(tag::GET);
                out.extend_from_slice(&group.to_le_bytes());
                match consistency {
                    ReadConsistency::Linearizable => out.push(1),
                    ReadConsistency::Lease => out.push(2),
                    ReadConsistency::Stale { max_lag_ms } => {
                        out.push(3);
                        out.extend_from_slice(&max_lag_ms.to_le_bytes());
                    }
                }
                put_bytes(out, key);
            }
            Self::Delete { group, key } => {
                out.push(tag::DELETE);
                out.extend_from_slice(&group.to_le_bytes());
                put_bytes(out, key);
            }
            Self::CompareAndSet { group, key, expected, new } => {
                out.push(tag::CAS);
                out.extend_from_slice(&group.to_le_bytes());
                put_bytes(out, key);
                put_option(out, expected.as_ref());
                put_option(out, new.as_ref());
            }
            Self::Status { group } => {
                out.push(tag::STATUS);
                out.extend_from_slice(&group.to_le_bytes());
            }
            Self::Stats => out.push(tag::STATS),
            Self::Dump { group } => {
                out.push(tag::DUMP);
                out.extend_from_slice(&group.to_le_bytes());
            }
        }
    }

    /// Decodes a request body. Keys and values are slices of `body`.
    pub fn decode(body: &Bytes) -> Result<Self, DecodeError> {
        let mut reader = Reader { input: body, at: 0 };
        let request = match reader.u8()? {
            tag::PUT => {
                Self::Put { group: reader.u64()?, key: reader.bytes()?, value: reader.bytes()? }
            }
            tag::GET => {
                let group = reader.u64()?;
                let consistency = match reader.u8()? {
                    1 => ReadConsistency::Linearizable,
                    2 => ReadConsistency::Lease,
                    3 => ReadConsistency::Stale { max_lag_ms: reader.u64()? },
                    tag => return Err(DecodeError::Tag { what: "consistency", tag }),
                };
                Self::Get { group, consistency, key: reader.bytes()? }
            }
            tag::DELETE => Self::Delete { group: reader.u64()?, key: reader.bytes()? },
            tag::CAS => Self::CompareAndSet {
                group: reader.u64()?,
                key: reader.bytes()?,
                expected: reader.option()?,
                new: reader.option()?,
            },
            tag::STATUS => Self::Status { group: reader.u64()? },
            tag::STATS => Self::Stats,
            tag::DUMP => Self::Dump { group: reader.u64()? },
            tag => return Err(DecodeError::Tag { what: "request", tag }),
        };
        reader.finish()?;
        Ok(request)
    }
}

impl Response {
    /// Appends the encoding of this response (a frame body) to `out`.
    ///
    /// # Panics
    /// If a key, value or text is longer than `u32::MAX` bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Written { index } => {
                out.push(tag::WRITTEN);
                out.extend_from_slice(&index.to_le_bytes());
            }
            Self::Value(value) => {
                out.push(tag::VALUE);
                put_option(out, value.as_ref());
            }
            Self::Deleted { index, existed } => {
                out.push(tag::DELETED);
                out.extend_from_slice(&index.to_le_bytes());
                out.push(u8::from(*existed));
            }
            Self::Swapped { index } => {
                out.push(tag::SWAPPED);
                out.extend_from_slice(&index.to_le_bytes());
            }
            Self::Mismatch { index, actual } => {
                out.push(tag::MISMATCH);
                out.extend_from_slice(&index.to_le_bytes());
                put_option(out, actual.as_ref());
            }
            Self::Status(status) => {
                out.push(tag::STATUS_REPLY);
                out.push(match status.role {
                    Role::Follower => 1,
                    Role::PreCandidate => 2,
                    Role::Candidate => 3,
                    Role::Leader => 4,
                });
                for field in [
                    status.leader.unwrap_or(0),
                    status.term,
                    status.commit,
                    status.applied,
                    status.last_index,
                ] {
                    out.extend_from_slice(&field.to_le_bytes());
                }
            }
            Self::Stats(stats) => {
                out.push(tag::STATS_REPLY);
                out.extend_from_slice(&stats.node.to_le_bytes());
                put_bytes(out, stats.backend.as_bytes());
                out.extend_from_slice(&stats.shards.to_le_bytes());
                for field in [
                    stats.groups,
                    stats.leaders,
                    stats.fdatasyncs,
                    stats.entries,
                    stats.frames,
                    stats.messages,
                ] {
                    out.extend_from_slice(&field.to_le_bytes());
                }
            }
            Self::Dump { applied, entries } => {
                out.push(tag::DUMP_REPLY);
                out.extend_from_slice(&applied.to_le_bytes());
                let count = u32::try_from(entries.len()).expect("entry count fits u32");
                out.extend_from_slice(&count.to_le_bytes());
                for (key, value) in entries {
                    put_bytes(out, key);
                    put_bytes(out, value);
                }
            }
            Self::Error(error) => {
                out.push(tag::ERROR);
                encode_error(error, out);
            }
        }
    }

    /// Encodes this response into `out`, or [`RemoteError::TooLarge`] in its place when it would
    /// not fit in a frame (a dump of a large group): the node answers rather than panics.
    pub fn encode_bounded(&self, out: &mut Vec<u8>) {
        let start = out.len();
        self.encode(out);
        if out.len() - start > BODY_MAX {
            out.truncate(start);
            Self::Error(RemoteError::TooLarge).encode(out);
        }
    }

    /// Decodes a response body. Values are slices of `body`.
    pub fn decode(body: &Bytes) -> Result<Self, DecodeError> {
        let mut reader = Reader { input: body, at: 0 };
        let response = match reader.u8()? {
            tag::WRITTEN => Self::Written { index: reader.u64()? },
            tag::VALUE => Self::Value(reader.option()?),
            tag::DELETED => Self::Deleted { index: reader.u64()?, existed: reader.flag()? },
            tag::SWAPPED => Self::Swapped { index: reader.u64()? },
            tag::MISMATCH => Self::Mismatch { index: reader.u64()?, actual: reader.option()? },
            tag::STATUS_REPLY => {
                let role = match reader.u8()? {
                    1 => Role::Follower,
                    2 => Role::PreCandidate,
                    3 => Role::Candidate,
                    4 => Role::Leader,
                    tag => return Err(DecodeError::Tag { what: "role", tag }),
                };
                let leader = reader.u64()?;
                Self::Status(Status {
                    role,
                    leader: (leader != 0).then_some(leader),
                    term: reader.u64()?,
                    commit: reader.u64()?,
                    applied: reader.u64()?,
                    last_index: reader.u64()?,
                })
            }
            tag::STATS_REPLY => Self::Stats(Stats {
                node: reader.u64()?,
                backend: reader.text()?,
                shards: reader.u32()?,
                groups: reader.u64()?,
                leaders: reader.u64()?,
                fdatasyncs: reader.u64()?,
                entries: reader.u64()?,
                frames: reader.u64()?,
                messages: reader.u64()?,
            }),
            tag::DUMP_REPLY => {
                let applied = reader.u64()?;
                let count = reader.u32()?;
                // No allocation sized by the count: a lying count runs out of input first.
                let mut entries = Vec::new();
                for _ in 0..count {
                    entries.push((reader.bytes()?, reader.bytes()?));
                }
                Self::Dump { applied, entries }
            }
            tag::ERROR => Self::Error(decode_error(&mut reader)?),
            tag => return Err(DecodeError::Tag { what: "response", tag }),
        };
        reader.finish()?;
        Ok(response)
    }
}

fn encode_error(error: &RemoteError, out: &mut Vec<u8>) {
    match error {
        RemoteError::NotLeader { hint } => {
            out.push(1);
            out.extend_from_slice(&hint.unwrap_or(0).to_le_bytes());
        }
        RemoteError::NoQuorum => out.push(2),
        RemoteError::Busy => out.push(3),
        RemoteError::Timeout => out.push(4),
        RemoteError::GroupNotFound { group } => {
            out.push(5);
            out.extend_from_slice(&group.to_le_bytes());
        }
        RemoteError::ShuttingDown => out.push(6),
        RemoteError::ProposalDropped => out.push(7),
        RemoteError::InvalidArgument(text) => {
            out.push(8);
            put_bytes(out, text.as_bytes());
        }
        RemoteError::Storage(text) => {
            out.push(9);
            put_bytes(out, text.as_bytes());
        }
        RemoteError::Rejected(text) => {
            out.push(10);
            put_bytes(out, text.as_bytes());
        }
        RemoteError::BadRequest(text) => {
            out.push(11);
            put_bytes(out, text.as_bytes());
        }
        RemoteError::TooLarge => out.push(12),
    }
}

fn decode_error(reader: &mut Reader<'_>) -> Result<RemoteError, DecodeError> {
    Ok(match reader.u8()? {
        1 => {
            let hint = reader.u64()?;
            RemoteError::NotLeader { hint: (hint != 0).then_some(hint) }
        }
        2 => RemoteError::NoQuorum,
        3 => RemoteError::Busy,
        4 => RemoteError::Timeout,
        5 => RemoteError::GroupNotFound { group: reader.u64()? },
        6 => RemoteError::ShuttingDown,
        7 => RemoteError::ProposalDropped,
        8 => RemoteError::InvalidArgument(reader.text()?),
        9 => RemoteError::Storage(reader.text()?),
        10 => RemoteError::Rejected(reader.text()?),
        11 => RemoteError::BadRequest(reader.text()?),
        12 => RemoteError::TooLarge,
        tag => return Err(DecodeError::Tag { what: "error", tag }),
    })
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).expect("field longer than u32::MAX");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_option(out: &mut Vec<u8>, value: Option<&Bytes>) {
    match value {
        None => out.push(0),
        Some(bytes) => {
            out.push(1);
            put_bytes(out, bytes);
        }
    }
}

/// A cursor over a body; every read is bounds-checked.
struct Reader<'a> {
    input: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, len: usize) -> Result<std::ops::Range<usize>, DecodeError> {
        let end = self.at.checked_add(len).ok_or(DecodeError::Truncated)?;
        if end > self.input.len() {
            return Err(DecodeError::Truncated);
        }
        let range = self.at..end;
        self.at = end;
        Ok(range)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        let range = self.take(1)?;
        Ok(self.input[range.start])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let range = self.take(4)?;
        Ok(u32::from_le_bytes(self.input[range].try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let range = self.take(8)?;
        Ok(u64::from_le_bytes(self.input[range].try_into().expect("8 bytes")))
    }

    fn flag(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(DecodeError::Flag(other)),
        }
    }

    fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u32()? as usize;
        let range = self.take(len)?;
        Ok(self.input.slice(range))
    }

    fn option(&mut self) -> Result<Option<Bytes>, DecodeError> {
        Ok(if self.flag()? { Some(self.bytes()?) } else { None })
    }

    fn text(&mut self) -> Result<String, DecodeError> {
        let bytes = self.bytes()?;
        std::str::from_utf8(&bytes).map(str::to_owned).map_err(|_| DecodeError::Utf8)
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.input.len() - self.at {
            0 => Ok(()),
            trailing => Err(DecodeError::Trailing(trailing)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests() -> Vec<Request> {
        let key = Bytes::from_static(b"key");
        let value = Bytes::from_static(b"value");
        vec![
            Request::Put { group: 7, key: key.clone(), value: value.clone() },
            Request::Put { group: 0, key: Bytes::new(), value: Bytes::new() },
            Request::Get { group: 1, consistency: ReadConsistency::Linearizable, key: key.clone() },
            Request::Get { group: 2, consistency: ReadConsistency::Lease, key: key.clone() },
            Request::Get {
                group: u64::MAX,
                consistency: ReadConsistency::Stale { max_lag_ms: 250 },
                key: key.clone(),
            },
            Request::Delete { group: 3, key: key.clone() },
            Request::CompareAndSet {
                group: 4,
                key: key.clone(),
                expected: None,
                new: Some(value.clone()),
            },
            Request::CompareAndSet { group: 4, key, expected: Some(value), new: None },
            Request::Status { group: 5 },
            Request::Stats,
            Request::Dump { group: 6 },
        ]
    }

    fn responses() -> Vec<Response> {
        let value = Bytes::from_static(b"value");
        let mut all = vec![
            Response::Written { index: 9 },
            Response::Value(None),
            Response::Value(Some(value.clone())),
            Response::Deleted { index: 10, existed: true },
            Response::Deleted { index: 11, existed: false },
            Response::Swapped { index: 12 },
            Response::Mismatch { index: 13, actual: Some(value.clone()) },
            Response::Mismatch { index: 14, actual: None },
            Response::Status(Status {
                role: Role::Leader,
                leader: Some(2),
                term: 3,
                commit: 40,
                applied: 39,
                last_index: 41,
            }),
            Response::Status(Status {
                role: Role::PreCandidate,
                leader: None,
                term: 0,
                commit: 0,
                applied: 0,
                last_index: 0,
            }),
            Response::Stats(Stats {
                node: 1,
                backend: "io_uring".into(),
                shards: 2,
                groups: 64,
                leaders: 21,
                fdatasyncs: 1000,
                entries: 5000,
                frames: 700,
                messages: 2100,
            }),
            Response::Dump { applied: 5, entries: vec![] },
            Response::Dump {
                applied: 6,
                entries: vec![(Bytes::from_static(b"a"), value), (Bytes::new(), Bytes::new())],
            },
        ];
        for error in [
            RemoteError::NotLeader { hint: Some(3) },
            RemoteError::NotLeader { hint: None },
            RemoteError::NoQuorum,
            RemoteError::Busy,
            RemoteError::Timeout,
            RemoteError::GroupNotFound { group: 8 },
            RemoteError::ShuttingDown,
            RemoteError::ProposalDropped,
            RemoteError::InvalidArgument("bad".into()),
            RemoteError::Storage("eio".into()),
            RemoteError::Rejected("no".into()),
            RemoteError::BadRequest("garbage".into()),
            RemoteError::TooLarge,
        ] {
            all.push(Response::Error(error));
        }
        all
    }

    fn frame_of(kind: FrameKind, id: u64, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(kind, id, body, &mut out);
        out
    }

    #[test]
    fn requests_and_responses_round_trip_through_frames() {
        for (id, request) in requests().into_iter().enumerate() {
            let mut body = Vec::new();
            request.encode(&mut body);
            let mut buffer = BytesMut::from(&frame_of(FrameKind::Request, id as u64, &body)[..]);
            let frame = decode_frame(&mut buffer).unwrap().expect("a whole frame");
            assert!(buffer.is_empty());
            assert_eq!((frame.kind, frame.id), (FrameKind::Request, id as u64));
            assert_eq!(Request::decode(&frame.body).unwrap(), request);
        }
        for (id, response) in responses().into_iter().enumerate() {
            let mut body = Vec::new();
            response.encode_bounded(&mut body);
            let mut buffer = BytesMut::from(&frame_of(FrameKind::Response, id as u64, &body)[..]);
            let frame = decode_frame(&mut buffer).unwrap().expect("a whole frame");
            assert_eq!((frame.kind, frame.id), (FrameKind::Response, id as u64));
            assert_eq!(Response::decode(&frame.body).unwrap(), response);
        }
    }

    #[test]
    fn frames_decode_one_at_a_time_from_a_stream() {
        let mut stream = Vec::new();
        encode_frame(FrameKind::Request, 1, b"one", &mut stream);
        encode_frame(FrameKind::Response, 2, b"", &mut stream);
        encode_frame(FrameKind::Request, 3, b"three", &mut stream);
        let mut buffer = BytesMut::new();
        let mut frames = Vec::new();
        // Fed a byte at a time: every prefix is "need more", never an error.
        for byte in stream {
            buffer.extend_from_slice(&[byte]);
            if let Some(frame) = decode_frame(&mut buffer).unwrap() {
                frames.push((frame.id, frame.body));
            }
        }
        assert!(buffer.is_empty());
        let expected: Vec<(u64, Bytes)> = vec![
            (1, Bytes::from_static(b"one")),
            (2, Bytes::new()),
            (3, Bytes::from_static(b"three")),
        ];
        assert_eq!(frames, expected);
    }

    #[test]
    fn every_truncated_body_is_an_error() {
        for request in requests() {
            let mut body = Vec::new();
            request.encode(&mut body);
            for len in 0..body.len() {
                let cut = Bytes::copy_from_slice(&body[..len]);
                assert!(Request::decode(&cut).is_err(), "{request:?} cut at {len}");
            }
            body.push(0);
            assert_eq!(Request::decode(&Bytes::from(body)), Err(DecodeError::Trailing(1)));
        }
        for response in responses() {
            let mut body = Vec::new();
            response.encode(&mut body);
            for len in 0..body.len() {
                let cut = Bytes::copy_from_slice(&body[..len]);
                assert!(Response::decode(&cut).is_err(), "{response:?} cut at {len}");
            }
        }
    }

    #[test]
    fn every_bit_flip_in_a_frame_is_detected() {
        let mut body = Vec::new();
        requests()[0].encode(&mut body);
        let frame = frame_of(FrameKind::Request, 42, &body);
        for byte in 0..frame.len() {
            for bit in 0..8 {
                let mut damaged = frame.clone();
                damaged[byte] ^= 1 << bit;
                let mut buffer = BytesMut::from(&damaged[..]);
                // A flipped length bit may also just ask for more bytes; never a wrong frame.
                match decode_frame(&mut buffer) {
                    Err(_) | Ok(None) => {}
                    Ok(Some(frame)) => panic!("flip at {byte}.{bit} accepted: {frame:?}"),
                }
            }
        }
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        let mut header = frame_of(FrameKind::Request, 1, b"");
        header[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        let crc = crc32fast::hash(&header[..24]);
        header[24..28].copy_from_slice(&crc.to_le_bytes());
        let mut buffer = BytesMut::from(&header[..]);
        assert_eq!(
            decode_frame(&mut buffer),
            Err(FrameError::TooLarge { length: u64::from(u32::MAX), max: BODY_MAX })
        );
    }

    #[test]
    fn garbage_is_refused_with_a_typed_error() {
        let mut buffer = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
        assert!(matches!(decode_frame(&mut buffer), Err(FrameError::Magic(_))));
        let mut buffer = BytesMut::from(&b"FLCP\x09"[..]);
        assert_eq!(decode_frame(&mut buffer), Err(FrameError::Version(9)));
        let mut frame = frame_of(FrameKind::Request, 1, b"x");
        frame[5] = 7;
        let crc = crc32fast::hash(&frame[..24]);
        frame[24..28].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_frame(&mut BytesMut::from(&frame[..])), Err(FrameError::Kind(7)));

        // Pseudo-random bodies: decoding ends in a value or an error, never a panic.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 40) as usize;
            let body: Vec<u8> =
                (0..len).map(|i| (state.rotate_left(i as u32 * 8) as u8) % 16).collect();
            let body = Bytes::from(body);
            let _ = Request::decode(&body);
            let _ = Response::decode(&body);
        }
        let lying_count =
            Bytes::from_static(&[tag::DUMP_REPLY, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255]);
        assert_eq!(Response::decode(&lying_count), Err(DecodeError::Truncated));
        let bad_text = Bytes::from_static(&[tag::ERROR, 8, 1, 0, 0, 0, 0xff]);
        assert_eq!(Response::decode(&bad_text), Err(DecodeError::Utf8));
    }

    #[test]
    fn a_response_too_large_for_a_frame_becomes_an_error() {
        let big = Bytes::from(vec![0u8; BODY_MAX]);
        let response = Response::Dump { applied: 1, entries: vec![(Bytes::new(), big)] };
        let mut body = Vec::new();
        response.encode_bounded(&mut body);
        assert_eq!(
            Response::decode(&Bytes::from(body)).unwrap(),
            Response::Error(RemoteError::TooLarge)
        );
    }
}

//! What the KV accepts: commands (through the log, inside a [`Proposal`]) and queries (served
//! from the applied state), with their binary codec.
//!
//! ```text
//! proposal = version:u8 (=1) leader_time_ms:u64 request
//! request  = tag:u8 then, per tag:
//!            1 register-session   (nothing)
//!            2 keep-alive         client_id:u64
//!            3 close-session      client_id:u64
//!            4 session command    client_id:u64 sequence:u64 command
//!            5 unsessioned        command
//! command  = tag:u8 then, per tag:
//!            1 put                key:bytes value:bytes
//!            2 delete             key:bytes
//!            3 compare-and-set    key:bytes expected:option new:option
//! query    = version:u8 (=1) tag:u8 then, per tag:
//!            1 get                key:bytes
//!            2 range              start:bytes end:option limit:u32
//! bytes    = len:u32 data          option = 0:u8 | 1:u8 bytes
//! ```
//!
//! Integers are little-endian. Decoding is total: any byte string gives `Ok` or a typed
//! [`DecodeError`], never a panic. It allocates nothing: keys and values are slices of the input
//! [`Bytes`] (the state machine copies what it keeps, so that it never pins a WAL segment's
//! memory map). Trailing bytes are an error, so every value has exactly one encoding — which
//! matters because replicas compare nothing but the bytes of the log.

use bytes::Bytes;
use thiserror::Error;

/// Version byte at the start of every encoded [`Proposal`] and [`Query`].
pub const VERSION: u8 = 1;

/// Why bytes are not a [`Proposal`] or a [`Query`].
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended inside a field.
    #[error("truncated input")]
    Truncated,
    /// Unknown format version.
    #[error("unknown version {0}")]
    Version(u8),
    /// Unknown request, command or query tag.
    #[error("unknown tag {0}")]
    Tag(u8),
    /// An option flag other than 0 or 1.
    #[error("invalid option flag {0}")]
    Flag(u8),
    /// Bytes after the end of the value.
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

/// A change to the key-value map. Applied through the log, so every replica applies it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// Sets `key` to `value`, creating or replacing it.
    Put {
        /// The key.
        key: Bytes,
        /// The new value.
        value: Bytes,
    },
    /// Removes `key` if present.
    Delete {
        /// The key.
        key: Bytes,
    },
    /// Sets `key` to `new` only if its current value is `expected`; `None` means "absent" on
    /// both sides, so this one command can create-if-absent, delete-if-equal and swap.
    CompareAndSet {
        /// The key.
        key: Bytes,
        /// The value the key must hold (`None`: the key must be absent).
        expected: Option<Bytes>,
        /// The value to store (`None`: delete the key).
        new: Option<Bytes>,
    },
}

/// A command tagged with its client session, for exactly-once execution.
///
/// A client registers a session ([`Request::RegisterSession`]), then numbers its commands
/// 1, 2, 3, … and keeps **one command outstanding**: it sends `sequence + 1` only after it has
/// the answer to `sequence`, and retries `sequence` (same number, same command) until it gets
/// one. The state machine applies each `(client_id, sequence)` at most once and answers a retry
/// from its cache (see [`KvStateMachine`](super::KvStateMachine)).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionCommand {
    /// The session, as returned by [`Reply::Registered`](super::Reply::Registered).
    pub client_id: u64,
    /// The client's number for this command: starts at 1, grows with each new command.
    pub sequence: u64,
    /// The command.
    pub command: Command,
}

/// What a client asks the replicated state machine to do.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Request {
    /// Opens a session; its client id is the log index of this entry (unique forever, agreed by
    /// every replica without coordination — LogCabin's choice). Registration itself is not
    /// deduplicated: a retry after a lost answer opens a second session, and the unused one
    /// expires or is evicted.
    RegisterSession,
    /// Marks a session as alive so that it does not expire.
    KeepAlive {
        /// The session.
        client_id: u64,
    },
    /// Closes a session and forgets its cached answer.
    CloseSession {
        /// The session.
        client_id: u64,
    },
    /// A command executed at most once per `(client_id, sequence)`.
    Session(SessionCommand),
    /// A command without a session: a retry after a lost answer may apply it twice. For
    /// idempotent writes and for internal use.
    Unsessioned(Command),
}

/// One Raft entry payload: a request stamped with the leader's time.
///
/// Session expiry is measured in this time, never by a replica's own clock, so every replica
/// expires the same sessions at the same log position. The state machine's clock is the largest
/// time seen so far (it never goes back when a leader with a slower clock takes over). The leader
/// should stamp "cluster time" — the previous leader's last committed time plus the time elapsed
/// since it became leader, as in LogCabin — so that a leader change neither resets nor extends
/// a session's lease by the clock difference between nodes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Proposal {
    /// The proposing leader's time, in milliseconds.
    pub leader_time_ms: u64,
    /// What to do.
    pub request: Request,
}

/// A read, served from the applied state (after a ReadIndex, a lease check or a lag check); never
/// goes through the log.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Query {
    /// The value of `key`.
    Get {
        /// The key.
        key: Bytes,
    },
    /// Up to `limit` entries with `start <= key < end`, in key order.
    Range {
        /// First key, inclusive.
        start: Bytes,
        /// End key, exclusive; `None` reads to the end of the key space.
        end: Option<Bytes>,
        /// The most entries to return.
        limit: u32,
    },
}

mod tag {
    pub const REGISTER_SESSION: u8 = 1;
    pub const KEEP_ALIVE: u8 = 2;
    pub const CLOSE_SESSION: u8 = 3;
    pub const SESSION: u8 = 4;
    pub const UNSESSIONED: u8 = 5;

    pub const PUT: u8 = 1;
    pub const DELETE: u8 = 2;
    pub const COMPARE_AND_SET: u8 = 3;

    pub const GET: u8 = 1;
    pub const RANGE: u8 = 2;
}

impl Command {
    /// Appends the encoding of this command (without version byte) to `out`.
    ///
    /// # Panics
    /// If a key or value is longer than `u32::MAX` bytes (the engine bounds proposals far below).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Put { key, value } => {
                out.push(tag::PUT);
                put_bytes(out, key);
                put_bytes(out, value);
            }
            Self::Delete { key } => {
                out.push(tag::DELETE);
                put_bytes(out, key);
            }
            Self::CompareAndSet { key, expected, new } => {
                out.push(tag::COMPARE_AND_SET);
                put_bytes(out, key);
                put_option(out, expected.as_ref());
                put_option(out, new.as_ref());
            }
        }
    }

    /// The length of [`Command::encode`]'s output, so a buffer is allocated once at its size.
    pub fn encoded_len(&self) -> usize {
        let bytes = |b: &[u8]| 4 + b.len();
        let option = |b: Option<&Bytes>| 1 + b.map_or(0, |b| bytes(b));
        1 + match self {
            Self::Put { key, value } => bytes(key) + bytes(value),
            Self::Delete { key } => bytes(key),
            Self::CompareAndSet { key, expected, new } => {
                bytes(key) + option(expected.as_ref()) + option(new.as_ref())
            }
        }
    }

    /// The key this command changes.
    pub fn key(&self) -> &Bytes {
        match self {
            Self::Put { key, .. } | Self::Delete { key } | Self::CompareAndSet { key, .. } => key,
        }
    }
}

impl Proposal {
    /// Appends the encoding of this proposal to `out`.
    ///
    /// # Panics
    /// If a key or value is longer than `u32::MAX` bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(VERSION);
        put_u64(out, self.leader_time_ms);
        match &self.request {
            Request::RegisterSession => out.push(tag::REGISTER_SESSION),
            Request::KeepAlive { client_id } => {
                out.push(tag::KEEP_ALIVE);
                put_u64(out, *client_id);
            }
            Request::CloseSession { client_id } => {
                out.push(tag::CLOSE_SESSION);
                put_u64(out, *client_id);
            }
            Request::Session(SessionCommand { client_id, sequence, command }) => {
                out.push(tag::SESSION);
                put_u64(out, *client_id);
                put_u64(out, *sequence);
                command.encode(out);
            }
            Request::Unsessioned(command) => {
                out.push(tag::UNSESSIONED);
                command.encode(out);
            }
        }
    }

    /// The length of [`Proposal::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        // Version, leader time, request tag.
        1 + 8
            + 1
            + match &self.request {
                Request::RegisterSession => 0,
                Request::KeepAlive { .. } | Request::CloseSession { .. } => 8,
                Request::Session(SessionCommand { command, .. }) => 16 + command.encoded_len(),
                Request::Unsessioned(command) => command.encoded_len(),
            }
    }

    /// The encoding as an entry payload, in one allocation of its exact size (growing an empty
    /// vector took five reallocations for a 128-byte value, on every proposal).
    pub fn to_bytes(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode(&mut out);
        debug_assert_eq!(out.len(), self.encoded_len(), "encoded_len matches encode");
        Bytes::from(out)
    }

    /// Parses one proposal occupying all of `input`. Keys and values borrow from `input`.
    pub fn decode(input: &Bytes) -> Result<Self, DecodeError> {
        Ok(ProposalRef::decode(input)?.to_owned(input))
    }
}

/// A [`Proposal`] whose keys and values are slices of the bytes it was decoded from: what the
/// apply path reads (it copies what it keeps), so decoding an entry touches no reference count
/// and allocates nothing. The one parser of proposals; [`Proposal::decode`] converts its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProposalRef<'a> {
    pub(crate) leader_time_ms: u64,
    pub(crate) request: RequestRef<'a>,
}

/// A [`Request`] borrowing from its encoding (see [`ProposalRef`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RequestRef<'a> {
    RegisterSession,
    KeepAlive { client_id: u64 },
    CloseSession { client_id: u64 },
    Session { client_id: u64, sequence: u64, command: CommandRef<'a> },
    Unsessioned(CommandRef<'a>),
}

/// A [`Command`] borrowing from its encoding (see [`ProposalRef`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CommandRef<'a> {
    Put { key: &'a [u8], value: &'a [u8] },
    Delete { key: &'a [u8] },
    CompareAndSet { key: &'a [u8], expected: Option<&'a [u8]>, new: Option<&'a [u8]> },
}

impl<'a> ProposalRef<'a> {
    /// Parses one proposal occupying all of `input`.
    pub(crate) fn decode(input: &'a [u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::versioned(input)?;
        let leader_time_ms = reader.u64()?;
        let request = match reader.u8()? {
            tag::REGISTER_SESSION => RequestRef::RegisterSession,
            tag::KEEP_ALIVE => RequestRef::KeepAlive { client_id: reader.u64()? },
            tag::CLOSE_SESSION => RequestRef::CloseSession { client_id: reader.u64()? },
            tag::SESSION => RequestRef::Session {
                client_id: reader.u64()?,
                sequence: reader.u64()?,
                command: CommandRef::decode_from(&mut reader)?,
            },
            tag::UNSESSIONED => RequestRef::Unsessioned(CommandRef::decode_from(&mut reader)?),
            other => return Err(DecodeError::Tag(other)),
        };
        reader.finish()?;
        Ok(Self { leader_time_ms, request })
    }

    /// The owned proposal, its keys and values slices of `input` — the bytes this was decoded
    /// from (a slice outside them panics).
    fn to_owned(self, input: &Bytes) -> Proposal {
        let request = match self.request {
            RequestRef::RegisterSession => Request::RegisterSession,
            RequestRef::KeepAlive { client_id } => Request::KeepAlive { client_id },
            RequestRef::CloseSession { client_id } => Request::CloseSession { client_id },
            RequestRef::Session { client_id, sequence, command } => {
                Request::Session(SessionCommand {
                    client_id,
                    sequence,
                    command: command.to_owned(input),
                })
            }
            RequestRef::Unsessioned(command) => Request::Unsessioned(command.to_owned(input)),
        };
        Proposal { leader_time_ms: self.leader_time_ms, request }
    }
}

impl<'a> CommandRef<'a> {
    fn decode_from(reader: &mut Reader<'a>) -> Result<Self, DecodeError> {
        Ok(match reader.u8()? {
            tag::PUT => Self::Put { key: reader.bytes()?, value: reader.bytes()? },
            tag::DELETE => Self::Delete { key: reader.bytes()? },
            tag::COMPARE_AND_SET => Self::CompareAndSet {
                key: reader.bytes()?,
                expected: reader.option()?,
                new: reader.option()?,
            },
            other => return Err(DecodeError::Tag(other)),
        })
    }

    fn to_owned(self, input: &Bytes) -> Command {
        let share = |slice: &[u8]| input.slice_ref(slice);
        match self {
            Self::Put { key, value } => Command::Put { key: share(key), value: share(value) },
            Self::Delete { key } => Command::Delete { key: share(key) },
            Self::CompareAndSet { key, expected, new } => Command::CompareAndSet {
                key: share(key),
                expected: expected.map(share),
                new: new.map(share),
            },
        }
    }
}

impl Query {
    /// Appends the encoding of this query to `out`.
    ///
    /// # Panics
    /// If a key is longer than `u32::MAX` bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(VERSION);
        match self {
            Self::Get { key } => {
                out.push(tag::GET);
                put_bytes(out, key);
            }
            Self::Range { start, end, limit } => {
                out.push(tag::RANGE);
                put_bytes(out, start);
                put_option(out, end.as_ref());
                out.extend_from_slice(&limit.to_le_bytes());
            }
        }
    }

    /// The encoding as bytes.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = Vec::new();
        self.encode(&mut out);
        Bytes::from(out)
    }

    /// Parses one query occupying all of `input`. Keys borrow from `input`.
    pub fn decode(input: &Bytes) -> Result<Self, DecodeError> {
        let mut reader = Reader::versioned(input)?;
        let query = match reader.u8()? {
            tag::GET => Self::Get { key: input.slice_ref(reader.bytes()?) },
            tag::RANGE => Self::Range {
                start: input.slice_ref(reader.bytes()?),
                end: reader.option()?.map(|end| input.slice_ref(end)),
                limit: reader.u32()?,
            },
            other => return Err(DecodeError::Tag(other)),
        };
        reader.finish()?;
        Ok(query)
    }
}

pub(crate) fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

pub(crate) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).expect("keys and values are at most u32::MAX bytes");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

pub(crate) fn put_option(out: &mut Vec<u8>, bytes: Option<&Bytes>) {
    match bytes {
        None => out.push(0),
        Some(bytes) => {
            out.push(1);
            put_bytes(out, bytes);
        }
    }
}

/// A cursor over untrusted input. Every read checks the bytes left first, so nothing is ever
/// indexed out of bounds and no length is trusted before it is checked.
pub(crate) struct Reader<'a> {
    input: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(input: &'a [u8]) -> Self {
        Self { input, position: 0 }
    }

    /// A reader past the leading version byte, which must be [`VERSION`].
    fn versioned(input: &'a [u8]) -> Result<Self, DecodeError> {
        let mut reader = Self::new(input);
        match reader.u8()? {
            VERSION => Ok(reader),
            version => Err(DecodeError::Version(version)),
        }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.input.len() - self.position
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if len > self.remaining() {
            return Err(DecodeError::Truncated);
        }
        let taken = &self.input[self.position..self.position + len];
        self.position += len;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A length-prefixed byte string, as a slice of the input (no copy, no allocation).
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    pub(crate) fn option(&mut self) -> Result<Option<&'a [u8]>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.bytes()?)),
            other => Err(DecodeError::Flag(other)),
        }
    }

    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            trailing => Err(DecodeError::Trailing(trailing)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(proposal: &Proposal) {
        let bytes = proposal.to_bytes();
        assert_eq!(bytes.len(), proposal.encoded_len(), "{proposal:?}");
        assert_eq!(Proposal::decode(&bytes).as_ref(), Ok(proposal));
    }

    #[test]
    fn every_request_round_trips() {
        let key = Bytes::from_static(b"k");
        let commands = [
            Command::Put { key: key.clone(), value: Bytes::from_static(b"v") },
            Command::Put { key: Bytes::new(), value: Bytes::new() },
            Command::Delete { key: key.clone() },
            Command::CompareAndSet { key: key.clone(), expected: None, new: None },
            Command::CompareAndSet {
                key: key.clone(),
                expected: Some(Bytes::from_static(b"old")),
                new: Some(Bytes::from_static(b"new")),
            },
            Command::CompareAndSet {
                key: key.clone(),
                expected: None,
                new: Some(Bytes::from(vec![7; 300])),
            },
            Command::CompareAndSet {
                key: key.clone(),
                expected: Some(Bytes::from(vec![8; 30])),
                new: None,
            },
            Command::Put { key: Bytes::from(vec![1; 40]), value: Bytes::from(vec![2; 1024]) },
        ];
        for request in [
            Request::RegisterSession,
            Request::KeepAlive { client_id: 7 },
            Request::CloseSession { client_id: u64::MAX },
        ] {
            round_trip(&Proposal { leader_time_ms: 12, request });
        }
        for command in commands {
            round_trip(&Proposal {
                leader_time_ms: u64::MAX,
                request: Request::Session(SessionCommand {
                    client_id: 3,
                    sequence: 9,
                    command: command.clone(),
                }),
            });
            round_trip(&Proposal { leader_time_ms: 0, request: Request::Unsessioned(command) });
        }
    }

    #[test]
    fn every_query_round_trips() {
        for query in [
            Query::Get { key: Bytes::from_static(b"a") },
            Query::Range { start: Bytes::new(), end: None, limit: 0 },
            Query::Range {
                start: Bytes::from_static(b"a"),
                end: Some(Bytes::from_static(b"z")),
                limit: u32::MAX,
            },
        ] {
            assert_eq!(Query::decode(&query.to_bytes()), Ok(query));
        }
    }

    #[test]
    fn the_layout_is_as_documented() {
        let proposal = Proposal {
            leader_time_ms: 0x0102,
            request: Request::Session(SessionCommand {
                client_id: 5,
                sequence: 6,
                command: Command::CompareAndSet {
                    key: Bytes::from_static(b"k"),
                    expected: None,
                    new: Some(Bytes::from_static(b"v")),
                },
            }),
        };
        let expected: Vec<u8> = [
            &[1][..],
            &0x0102_u64.to_le_bytes(),
            &[4],
            &5_u64.to_le_bytes(),
            &6_u64.to_le_bytes(),
            &[3, 1, 0, 0, 0, b'k', 0, 1, 1, 0, 0, 0, b'v'],
        ]
        .concat();
        assert_eq!(proposal.to_bytes(), expected);
    }

    #[test]
    fn damaged_input_gives_typed_errors() {
        let put = Proposal {
            leader_time_ms: 1,
            request: Request::Unsessioned(Command::Put {
                key: Bytes::from_static(b"key"),
                value: Bytes::from_static(b"value"),
            }),
        }
        .to_bytes();
        assert_eq!(Proposal::decode(&Bytes::new()), Err(DecodeError::Truncated));
        for len in 0..put.len() {
            assert_eq!(Proposal::decode(&put.slice(..len)), Err(DecodeError::Truncated));
        }
        let mut bad = put.to_vec();
        bad[0] = 2;
        assert_eq!(Proposal::decode(&Bytes::from(bad)), Err(DecodeError::Version(2)));
        let mut bad = put.to_vec();
        bad[9] = 99;
        assert_eq!(Proposal::decode(&Bytes::from(bad)), Err(DecodeError::Tag(99)));
        let mut bad = put.to_vec();
        bad[10] = 0;
        assert_eq!(Proposal::decode(&Bytes::from(bad)), Err(DecodeError::Tag(0)));
        let mut bad = put.to_vec();
        bad.push(0);
        assert_eq!(Proposal::decode(&Bytes::from(bad)), Err(DecodeError::Trailing(1)));
        // A length prefix larger than the input is refused before anything is sliced.
        let mut bad = put[..11].to_vec();
        bad.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Proposal::decode(&Bytes::from(bad)), Err(DecodeError::Truncated));
        let cas_flag = Query::Range { start: Bytes::new(), end: None, limit: 1 }.to_bytes();
        let mut bad = cas_flag.to_vec();
        bad[6] = 2;
        assert_eq!(Query::decode(&Bytes::from(bad)), Err(DecodeError::Flag(2)));
    }

    #[test]
    fn decoded_keys_share_the_input_buffer() {
        let bytes = Proposal {
            leader_time_ms: 1,
            request: Request::Unsessioned(Command::Delete { key: Bytes::from_static(b"key") }),
        }
        .to_bytes();
        let Ok(Proposal { request: Request::Unsessioned(Command::Delete { key }), .. }) =
            Proposal::decode(&bytes)
        else {
            panic!("decodes");
        };
        assert_eq!(key.as_ptr(), bytes[bytes.len() - 3..].as_ptr());
    }
}

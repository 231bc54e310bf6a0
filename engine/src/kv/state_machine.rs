//! The contract between the engine and a replicated state machine ([`StateMachine`]), and the
//! built-in ordered key-value store that fulfils it ([`KvStateMachine`]).

use std::io;
use std::ops::Bound;

use bytes::Bytes;
use flotilla_raftgroup::{Entry, EntryKind, LogIndex};
use thiserror::Error;

use super::command::{CommandRef, DecodeError, ProposalRef, Query, RequestRef};
use super::map::{Iter, KvMap};
use super::session::{Session, Sessions};
use super::snapshot::{self, KvSnapshot, SnapshotError};

/// A replicated state machine: what a group's committed log is applied to.
///
/// The engine drives it from one shard thread. Its contract:
///
/// - **Order.** [`apply`](Self::apply) receives every committed entry exactly once, in log
///   order, without gaps: the first index after [`applied_index`](Self::applied_index) comes
///   first. That includes entries that carry nothing for the state machine (the no-op a new
///   leader appends, [`EntryKind::Empty`], and membership changes, [`EntryKind::Membership`]):
///   they only advance the applied index, so that a snapshot taken afterwards covers them.
/// - **Determinism.** The result of `apply` — the new state and every response — depends only
///   on the state and the entries: no clock, no randomness, no iteration over a `HashMap`, no
///   environment. Time, if needed, must travel inside the entries (the proposer stamps it).
///   Replicas that apply the same log hold the same state; this is what replication means.
/// - **Totality.** A payload the state machine cannot interpret yields an error *response*, never
///   a panic: every replica would panic at the same entry, again after every restart.
/// - **Responses.** `apply` pushes exactly one response per entry, in order, onto `responses`.
///   The engine returns each to the proposer of that entry, if it is still waiting on this node;
///   on other replicas responses are dropped.
/// - **Snapshots.** [`snapshot`](Self::snapshot) captures the state *at*
///   [`applied_index`](Self::applied_index) as a [`SnapshotImage`], and
///   [`restore`](Self::restore) of the bytes it writes — on any replica, into any instance —
///   gives back exactly that state, applied index included, so that applying the next entries
///   gives the same responses and the same later snapshots. Restore verifies what it reads and,
///   on error, leaves the state machine unchanged.
/// - **Snapshots are cheap to take.** `snapshot` runs on the shard thread, between the loop
///   iterations of every group on the shard; the image is written to its file on another thread
///   while this state machine goes on applying. So `snapshot` should return a *view* — shared,
///   copy-on-write structure, as [`KvStateMachine`]'s persistent map — not serialize the state
///   (returning [`Bytes`] is allowed, and right for a state of a few kilobytes).
/// - **Restores may happen elsewhere.** To install a leader's snapshot the engine makes a fresh
///   instance with the group's factory, restores the image into it on a blocking thread, and
///   swaps it in for this one (which it drops on a blocking thread too): so an engine's state
///   machine is `Send`, and everything `restore` needs must come from the factory.
/// - **Reads.** [`query`](Self::query) reads the state as of `applied_index`, changes nothing,
///   and is never replicated; the engine calls it only once the applied index covers the read's
///   index (ReadIndex, lease or staleness bound).
pub trait StateMachine {
    /// The outcome of one entry, returned to its proposer.
    type Response;
    /// A read request.
    type Query;
    /// The answer to a read.
    type QueryResult;
    /// Why snapshot bytes could not be restored.
    type RestoreError: std::error::Error + Send + Sync + 'static;
    /// A point-in-time image of the state (see [`StateMachine::snapshot`]).
    type Snapshot: SnapshotImage;

    /// Applies `entries`, pushing one response per entry onto `responses`.
    fn apply(&mut self, entries: &[Entry], responses: &mut Vec<Self::Response>);

    /// Answers a read from the state at [`applied_index`](Self::applied_index).
    fn query(&self, query: &Self::Query) -> Self::QueryResult;

    /// The index of the last entry applied (or covered by the last snapshot restored);
    /// [`LogIndex::ZERO`] for a new state machine.
    fn applied_index(&self) -> LogIndex;

    /// An image of the whole state at [`applied_index`](Self::applied_index), unaffected by
    /// what is applied after it. Called on the shard thread: see "Snapshots are cheap to take"
    /// above.
    fn snapshot(&self) -> Self::Snapshot;

    /// Replaces the whole state with the image in `snapshot`.
    fn restore(&mut self, snapshot: &Bytes) -> Result<(), Self::RestoreError>;
}

/// A snapshot of a [`StateMachine`], taken on the shard thread and written out on another: the
/// engine streams it into the group's snapshot file, never asking for it as one buffer.
pub trait SnapshotImage: Send + 'static {
    /// Writes the whole image to `out`. The bytes must be the same every time (the engine may
    /// write an image more than once), and [`StateMachine::restore`] of them must give back the
    /// state the image was taken of. Runs on a blocking thread, concurrently with the state
    /// machine applying later entries.
    fn write_to(&self, out: &mut dyn io::Write) -> io::Result<()>;

    /// The whole image in one buffer: for tests, and for images small enough to hold.
    fn to_bytes(&self) -> Bytes {
        let mut out = Vec::new();
        self.write_to(&mut out).expect("writing to a Vec does not fail");
        Bytes::from(out)
    }
}

/// An image already serialized: for a state machine whose whole state is small.
impl SnapshotImage for Bytes {
    fn write_to(&self, out: &mut dyn io::Write) -> io::Result<()> {
        out.write_all(self)
    }

    fn to_bytes(&self) -> Bytes {
        self.clone()
    }
}

/// Limits of [`KvStateMachine`]. They decide which sessions survive, so every replica of a group
/// must use the same values (like the log itself, they are part of what makes replicas agree).
/// Snapshots record them, and restoring an image written with other limits fails with
/// [`SnapshotError::Config`] rather than letting replicas silently diverge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvConfig {
    /// A session not named by any request for longer than this much log time expires.
    pub session_ttl_ms: u64,
    /// The most sessions kept; registering one more evicts the least recently active.
    pub sessions_max: usize,
}

impl Default for KvConfig {
    /// One minute of idleness, 4096 sessions (Dragonboat's default session count).
    fn default() -> Self {
        Self { session_ttl_ms: 60_000, sessions_max: 4096 }
    }
}

/// What a [`Command`] did. This is what a session caches and answers a retry with.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A put stored its value.
    Written,
    /// A delete ran; `existed` says whether the key was there.
    Deleted {
        /// Whether the key existed before.
        existed: bool,
    },
    /// A compare-and-set matched and stored its new value (or deleted the key).
    Swapped,
    /// A compare-and-set did not match and changed nothing.
    Mismatch {
        /// The value the key held (`None`: absent).
        actual: Option<Bytes>,
    },
}

/// The successful result of one entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reply {
    /// A session was opened.
    Registered {
        /// Its id, to put in every [`SessionCommand`]: the index of the registering entry.
        client_id: u64,
    },
    /// A keep-alive renewed its session.
    KeptAlive,
    /// A session was closed.
    Closed,
    /// A command ran (or, for a retried session command, had run: this is the cached outcome).
    Done(Outcome),
    /// The entry was not for the state machine (a leader's no-op, a membership change).
    Skipped,
}

/// Why an entry did nothing.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The payload is not a [`Proposal`].
    #[error("undecodable proposal: {0}")]
    Decode(#[from] DecodeError),
    /// The session was never registered, was closed, or expired or was evicted. The client
    /// cannot know whether its unanswered command ran, so it must not retry it in a new session
    /// blindly: it reads the state and decides (this is the thesis' "session expired" error).
    #[error("session {client_id} is unknown or expired")]
    UnknownSession {
        /// The session named.
        client_id: u64,
    },
    /// The sequence is lower than the last one applied for this session (or is 0): a delayed
    /// duplicate of a command whose answer the client already received, since it keeps one
    /// command outstanding. Its answer is no longer cached; it is not applied again.
    #[error("sequence {sequence} of session {client_id} is stale (last applied: {last})")]
    StaleSequence {
        /// The session.
        client_id: u64,
        /// The sequence proposed.
        sequence: u64,
        /// The last sequence applied for the session (0: none yet).
        last: u64,
    },
}

/// The answer to a [`Query`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum QueryResult {
    /// The value of a [`Query::Get`] (`None`: absent).
    Value(Option<Bytes>),
    /// The entries of a [`Query::Range`], in key order.
    Range {
        /// Key-value pairs, at most `limit`.
        entries: Vec<(Bytes, Bytes)>,
        /// Whether more keys in the range follow the last one returned; continue from that key
        /// with a zero byte appended.
        more: bool,
    },
}

/// The built-in replicated key-value store: an ordered map of byte strings with exactly-once
/// client sessions.
///
/// # Exactly once
/// A [`Request::Session`] command `(client_id, sequence)`:
/// - on an unknown session, fails with [`ApplyError::UnknownSession`];
/// - with `sequence` above the session's last, is applied and its [`Outcome`] cached;
/// - with `sequence` equal to the last, is **not** applied again: the cached outcome is returned,
///   identical to the first answer — this is the retry after a lost response;
/// - with `sequence` below the last, fails with [`ApplyError::StaleSequence`] and is not
///   applied. Only the last answer is kept — the basic scheme of the Raft thesis (§6.3): a
///   client numbers a new command only after the previous one was answered (or given up), so
///   a lower number is a stray duplicate nobody waits for, and its answer cannot be given
///   because it is gone. Commands of one session therefore apply in sequence order, each at
///   most once. A client that wants several commands in flight opens several sessions.
///   (LogCabin and Dragonboat keep several answers per session, dropped once the client
///   reports them received; that extension would change the envelope, not this rule.)
///
/// Every request that names a session renews it. Sessions idle for more than
/// [`KvConfig::session_ttl_ms`] of log time expire (checked at every entry, against the largest
/// leader time seen), and registering beyond [`KvConfig::sessions_max`] evicts the least
/// recently active. Sessions and their cached outcomes are part of the snapshot.
///
/// Keys and values from entries are copied into the map: an entry's payload may be a slice of a
/// WAL segment's memory map, and a live slice would keep the segment from being recycled.
#[derive(Clone, Debug)]
pub struct KvStateMachine {
    config: KvConfig,
    data: KvMap,
    sessions: Sessions,
    applied_index: LogIndex,
    /// The largest leader time applied so far: the clock that sessions expire by.
    now_ms: u64,
}

impl KvStateMachine {
    /// An empty store at index 0.
    pub fn new(config: KvConfig) -> Self {
        assert!(config.sessions_max > 0, "sessions_max must allow at least one session");
        Self {
            config,
            data: KvMap::default(),
            sessions: Sessions::default(),
            applied_index: LogIndex::ZERO,
            now_ms: 0,
        }
    }

    /// The limits this store was created with.
    pub fn config(&self) -> KvConfig {
        self.config
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&Bytes> {
        self.data.get(key)
    }

    /// How many keys are stored.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether no key is stored.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Every key-value pair, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &Bytes)> {
        let pairs: Iter<'_> = self.data.iter();
        pairs.map(|(key, value)| (&**key, value))
    }

    /// How many sessions are open.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Whether `client_id` names an open session.
    pub fn has_session(&self, client_id: u64) -> bool {
        self.sessions.get(client_id).is_some()
    }

    /// The last sequence applied for `client_id` (0 before its first command), if it is open.
    pub fn last_sequence(&self, client_id: u64) -> Option<u64> {
        self.sessions.get(client_id).map(|session| session.last.as_ref().map_or(0, |last| last.0))
    }

    /// The log time sessions are expired by: the largest leader time applied.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Answers a read from the applied state.
    pub fn query(&self, query: &Query) -> QueryResult {
        match query {
            Query::Get { key } => QueryResult::Value(self.data.get(&key[..]).cloned()),
            Query::Range { start, end, limit } => self.range(start, end.as_ref(), *limit),
        }
    }

    fn range(&self, start: &Bytes, end: Option<&Bytes>, limit: u32) -> QueryResult {
        // `BTreeMap::range` panics when start > end; an empty range is simply empty.
        if end.is_some_and(|end| start >= end) {
            return QueryResult::Range { entries: Vec::new(), more: false };
        }
        let end = end.map_or(Bound::Unbounded, |end| Bound::Excluded(&end[..]));
        let mut matching = self.data.range(&start[..], end);
        // No capacity from `limit`: it is the reader's number and may be huge.
        let mut entries = Vec::new();
        for _ in 0..limit {
            let Some((key, value)) = matching.next() else { break };
            entries.push((key.to_bytes(), value.clone()));
        }
        QueryResult::Range { entries, more: matching.next().is_some() }
    }

    /// Asserts the internal invariants (for tests and simulators; O(sessions)).
    pub fn check_invariants(&self) {
        self.sessions.check_invariants(self.now_ms);
        for (client_id, _) in self.sessions.iter() {
            assert!(
                client_id <= self.applied_index.get(),
                "session {client_id} registered after the applied index"
            );
        }
    }

    fn apply_entry(&mut self, entry: &Entry) -> Result<Reply, ApplyError> {
        match entry.kind {
            EntryKind::Normal => {}
            EntryKind::Empty | EntryKind::Membership => return Ok(Reply::Skipped),
        }
        let proposal = ProposalRef::decode(&entry.payload).inspect_err(|error| {
            metrics::counter!("flotilla_kv_undecodable_entries_total").increment(1);
            tracing::warn!(index = entry.index.get(), %error, "kv entry does not decode");
        })?;
        self.now_ms = self.now_ms.max(proposal.leader_time_ms);
        let expired = self.sessions.expire(self.now_ms, self.config.session_ttl_ms);
        if expired > 0 {
            metrics::counter!("flotilla_kv_sessions_expired_total").increment(expired as u64);
        }
        match proposal.request {
            RequestRef::RegisterSession => {
                let evicted = self.sessions.make_room(self.config.sessions_max);
                if evicted > 0 {
                    metrics::counter!("flotilla_kv_sessions_evicted_total")
                        .increment(evicted as u64);
                }
                let client_id = entry.index.get();
                self.sessions
                    .insert(client_id, Session { last_active_ms: self.now_ms, last: None });
                Ok(Reply::Registered { client_id })
            }
            RequestRef::KeepAlive { client_id } => {
                match self.sessions.touch(client_id, self.now_ms) {
                    Some(_) => Ok(Reply::KeptAlive),
                    None => Err(ApplyError::UnknownSession { client_id }),
                }
            }
            RequestRef::CloseSession { client_id } => match self.sessions.remove(client_id) {
                Some(_) => Ok(Reply::Closed),
                None => Err(ApplyError::UnknownSession { client_id }),
            },
            RequestRef::Session { client_id, sequence, command } => {
                let Some(session) = self.sessions.touch(client_id, self.now_ms) else {
                    return Err(ApplyError::UnknownSession { client_id });
                };
                let last = match &session.last {
                    Some((last, outcome)) if *last == sequence => {
                        metrics::counter!("flotilla_kv_retries_answered_total").increment(1);
                        return Ok(Reply::Done(outcome.clone()));
                    }
                    Some((last, _)) => *last,
                    None => 0,
                };
                if sequence <= last {
                    metrics::counter!("flotilla_kv_stale_proposals_total").increment(1);
                    return Err(ApplyError::StaleSequence { client_id, sequence, last });
                }
                let outcome = execute(&mut self.data, command);
                session.last = Some((sequence, outcome.clone()));
                Ok(Reply::Done(outcome))
            }
            RequestRef::Unsessioned(command) => Ok(Reply::Done(execute(&mut self.data, command))),
        }
    }
}

impl Default for KvStateMachine {
    fn default() -> Self {
        Self::new(KvConfig::default())
    }
}

/// Runs one command against the map. Keys and values are copied (see [`KvStateMachine`]).
fn execute(data: &mut KvMap, command: CommandRef<'_>) -> Outcome {
    match command {
        CommandRef::Put { key, value } => {
            store(data, key, value);
            Outcome::Written
        }
        CommandRef::Delete { key } => Outcome::Deleted { existed: data.remove(key).is_some() },
        CommandRef::CompareAndSet { key, expected, new } => {
            let actual = data.get(key);
            if actual.map(|value| &value[..]) != expected {
                return Outcome::Mismatch { actual: actual.cloned() };
            }
            match new {
                Some(value) => store(data, key, value),
                None => {
                    data.remove(key);
                }
            }
            Outcome::Swapped
        }
    }
}

fn store(data: &mut KvMap, key: &[u8], value: &[u8]) {
    let value = Bytes::copy_from_slice(value);
    // Replacing a value keeps the stored key: no second copy of it.
    match data.get_mut(key) {
        Some(slot) => *slot = value,
        None => {
            data.insert_new(key, value);
        }
    }
}

impl StateMachine for KvStateMachine {
    type Response = Result<Reply, ApplyError>;
    type Query = Query;
    type QueryResult = QueryResult;
    type RestoreError = SnapshotError;
    type Snapshot = KvSnapshot;

    fn apply(&mut self, entries: &[Entry], responses: &mut Vec<Self::Response>) {
        responses.reserve(entries.len());
        for entry in entries {
            assert_eq!(
                entry.index,
                self.applied_index.next(),
                "entries must be applied in log order without gaps"
            );
            let response = self.apply_entry(entry);
            self.applied_index = entry.index;
            responses.push(response);
        }
    }

    fn query(&self, query: &Query) -> QueryResult {
        KvStateMachine::query(self, query)
    }

    fn applied_index(&self) -> LogIndex {
        self.applied_index
    }

    /// O(1) in the keys: see [`KvSnapshot`].
    fn snapshot(&self) -> KvSnapshot {
        KvSnapshot::new(
            self.config,
            self.applied_index,
            self.now_ms,
            self.data.clone(),
            self.sessions.clone(),
        )
    }

    fn restore(&mut self, snapshot: &Bytes) -> Result<(), SnapshotError> {
        let image = snapshot::decode(snapshot, self.config)?;
        self.applied_index = image.applied_index;
        self.now_ms = image.now_ms;
        self.data = image.data;
        self.sessions = image.sessions;
        Ok(())
    }
}

//! The built-in ordered key-value state machine, and the [`StateMachine`] contract it fulfils.
//!
//! - [`command`]: what goes through the log ([`Proposal`] = leader time + [`Request`]) and what
//!   reads ask ([`Query`]), with a total binary codec;
//! - [`state_machine`]: the [`StateMachine`] trait (the engine's contract with any replicated
//!   state machine) and [`KvStateMachine`] (an ordered map of byte strings, exactly-once sessions);
//! - [`snapshot`]: the checksummed snapshot image, drawn byte by byte.
//!
//! ```
//! use bytes::Bytes;
//! use flotilla::kv::{
//!     Command, KvStateMachine, Outcome, Proposal, Query, QueryResult, Reply, Request,
//!     SessionCommand, SnapshotImage, StateMachine,
//! };
//! use flotilla::raftgroup::{Entry, EntryKind, LogIndex, Term};
//!
//! // What the engine does with committed entries: apply them in order, keep the responses.
//! let entry = |index: u64, request: Request| Entry {
//!     index: LogIndex(index),
//!     term: Term(1),
//!     kind: EntryKind::Normal,
//!     payload: Proposal { leader_time_ms: 1_000, request }.to_bytes(),
//! };
//! let mut kv = KvStateMachine::default();
//! let mut responses = Vec::new();
//! kv.apply(&[entry(1, Request::RegisterSession)], &mut responses);
//! assert_eq!(responses[0], Ok(Reply::Registered { client_id: 1 }));
//!
//! // A command and its retry (same client id and sequence): applied once, same answer twice.
//! let put = Request::Session(SessionCommand {
//!     client_id: 1,
//!     sequence: 1,
//!     command: Command::Put { key: Bytes::from("k"), value: Bytes::from("v") },
//! });
//! kv.apply(&[entry(2, put.clone()), entry(3, put)], &mut responses);
//! assert_eq!(responses[1], Ok(Reply::Done(Outcome::Written)));
//! assert_eq!(responses[2], responses[1]);
//!
//! // Reads come from the applied state; snapshots restore it exactly.
//! let read = Query::Get { key: Bytes::from("k") };
//! assert_eq!(kv.query(&read), QueryResult::Value(Some(Bytes::from("v"))));
//! let mut copy = KvStateMachine::default();
//! copy.restore(&kv.snapshot().to_bytes()).unwrap();
//! assert_eq!(copy.applied_index(), LogIndex(3));
//! assert_eq!(copy.snapshot().to_bytes(), kv.snapshot().to_bytes());
//! ```

pub mod command;
mod map;
mod session;
pub mod snapshot;
pub mod state_machine;

pub use command::{Command, DecodeError, Proposal, Query, Request, SessionCommand};
pub use snapshot::{KvSnapshot, SnapshotError};
pub use state_machine::{
    ApplyError, KvConfig, KvStateMachine, Outcome, QueryResult, Reply, SnapshotImage, StateMachine,
};

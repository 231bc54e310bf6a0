//! Raft consensus for one group, as a pure deterministic state machine (sans-IO).
//!
//! A [`Replica`] never touches a clock, a thread, a file or a socket: time arrives as
//! [`Replica::tick`], messages as [`Replica::step`], client requests as [`Replica::propose`] and
//! [`Replica::read_index`], and everything it wants done comes out of [`Replica::ready`] as data.
//! Randomness (election timeouts) comes from a PRNG seeded by [`Config::seed`]. The same inputs
//! always give the same outputs, which is what lets a simulator replay any failure from a seed.
//! `clippy.toml` in this crate forbids clocks, threads, IO and global RNGs (checked once by
//! adding `std::time::Instant::now()` to `tick`: clippy failed with `disallowed_methods`).
//!
//! # The Ready loop
//!
//! ```
//! use bytes::Bytes;
//! use flotilla_raftgroup::{Config, MemStorage, NodeId, RecoveredState, Replica, Role};
//!
//! // A one-voter group, so the example needs no network.
//! let config = Config::new(NodeId(1), vec![NodeId(1)]);
//! let mut storage = MemStorage::new();
//! let mut replica = Replica::new(config, RecoveredState::default()).unwrap();
//! let mut applied = Vec::new();
//!
//! for _ in 0..100 {
//!     replica.tick(); // the driver's timer, e.g. every 10 ms
//!     if replica.role() == Role::Leader && applied.is_empty() {
//!         replica.propose(Bytes::from_static(b"x = 1")).unwrap();
//!     }
//!     while replica.has_ready() {
//!         let ready = replica.ready();
//!         // 1. `messages` may go out at once (a leader replicates while it writes its disk).
//!         for _message in &ready.messages { /* transport.send(message) */ }
//!         // 2. Persist snapshot, entries and hard state; wait until durable.
//!         let persisted = storage.persist(&ready);
//!         // 3. Only now: messages that promise something about our disk (votes, acks).
//!         for _message in ready.persisted_messages.peek() { /* transport.send(message) */ }
//!         // 4. Apply committed entries; serve read states once applied; answer fetches.
//!         for entry in &ready.committed_entries {
//!             applied.push(entry.clone());
//!             replica.on_applied(entry.index);
//!         }
//!         for fetch in &ready.fetches {
//!             replica.on_fetched(*fetch, storage.fetch(fetch)).unwrap();
//!         }
//!         replica.advance(ready);
//!         // 5. Report durability: the leader counts its own copy only now.
//!         if let Some((term, index)) = persisted {
//!             replica.on_persisted(term, index);
//!         }
//!     }
//! }
//! assert!(applied.iter().any(|entry| entry.payload == Bytes::from_static(b"x = 1")));
//! ```
//!
//! **The persistence rule.** [`Ready::persisted_messages`] (type [`SendAfterPersist`]) may be
//! sent only after that Ready's hard state, snapshot and entries — and those of every earlier
//! Ready — are durable: they are votes and append acknowledgements, and sending them early lets a
//! crash lose a vote (two leaders in one term) or an acknowledged entry. [`Ready::messages`]
//! carry no such promise and go out immediately. Storage must apply Readies in order.
//!
//! **Batching.** A leader replicates when [`Replica::ready`] is called, not at each input: the
//! proposals (and commit index advances) between two Readies leave as one Append per follower,
//! split only by [`Config::max_batch_bytes`] and the inflight window. The more a driver proposes
//! between two Readies, the fewer messages it sends; [`Replica::has_ready`] is true while
//! Appends are owed.
//!
//! # The API at a glance
//!
//! - Create: [`Replica::new`]`(`[`Config`]`, `[`RecoveredState`]`)`; [`Config::validate`] says
//!   what is wrong with a configuration ([`ConfigError`]).
//! - Inputs: [`Replica::tick`], [`Replica::step`] (a [`Message`]; [`codec::encode`] and
//!   [`codec::decode`] put it on the wire), [`Replica::propose`], [`Replica::propose_membership`]
//!   (joint consensus, learners), [`Replica::read_index`] (or [`Replica::read_index_with`] a
//!   [`ReadMode`]), [`Replica::transfer_leadership`],
//!   [`Replica::campaign_now`]; from storage and the state machine: [`Replica::on_persisted`],
//!   [`Replica::on_fetched`], [`Replica::on_applied`], [`Replica::compact`].
//! - Output: [`Replica::has_ready`], [`Replica::ready`] → [`Ready`], [`Replica::advance`].
//! - Introspection: [`Replica::status`], [`Replica::role`], [`Replica::term`],
//!   [`Replica::leader`], [`Replica::membership`], [`Replica::progress`],
//!   [`Replica::check_invariants`] (call it after every input in simulations).
//! - Errors are typed per operation: [`Error`] (step), [`ProposeError`] (`NotLeader {
//!   leader_hint }`, `ProposalDropped`, `Busy`...), [`ReadError`], [`TransferError`],
//!   [`CompactError`].
//!
//! # What storage must do
//!
//! Write each Ready's snapshot, then entries (replacing any stored entries from the first one's
//! index on), then hard state, Readies in order; answer [`Fetch`]es with durable entries
//! ([`MemStorage::fetch`] shows how); drop entries through a compaction point when the
//! application calls [`Replica::compact`]. Only the unsynced tail may be lost in a crash; the
//! [`RecoveredState`] after a restart is what was synced — the snapshot, the first index of each
//! term and a tail of entries are enough ([`MemStorage::recover`]); the rest is fetched.
//!
//! # Map
//! - `replica.rs`: inputs, introspection, invariants; `ready.rs`: the [`Ready`] output;
//!   `raft.rs`: the protocol rules (elections, replication, commit, reads, leases, transfer);
//! - `log.rs`: terms of every index (as runs) plus an in-memory suffix of entries; older entries
//!   are read through [`Ready::fetches`] and [`Replica::on_fetched`];
//! - `progress.rs`: per-follower replication (probe / replicate / snapshot, inflight window);
//! - `quorum.rs`: pure quorum arithmetic; `membership.rs`: joint consensus and learners;
//! - `read_index.rs`: reads waiting for their heartbeat round; `codec.rs`: the wire format;
//! - `types.rs`, `message.rs`, `config.rs`, `error.rs`: the vocabulary;
//! - `storage.rs`: [`MemStorage`] for tests and simulators.
//!
//! Tests: unit tests beside the code and in `tests.rs` (the persistence rule, idle cost);
//! `tests/scenarios.rs` runs the data-driven scenarios in `testdata/*.txt` and a randomized
//! cluster test (`RAFT_SEEDS=n` for more seeds).

mod config;
mod error;
mod log;
mod membership;
mod message;
mod progress;
mod raft;
mod read_index;
mod ready;
mod replica;
mod storage;
mod types;

#[cfg(test)]
mod tests;

pub mod codec;
pub mod quorum;

pub use config::Config;
pub use error::{
    BusyReason, CompactError, ConfigError, Error, InvariantError, ProposeError, ReadError,
    TransferError,
};
pub use membership::MembershipChange;
pub use message::{Message, MessageBody};
pub use progress::ProgressState;
pub use read_index::{ReadMode, ReadState};
pub use ready::{Fetch, FetchPurpose, Ready, SendAfterPersist};
pub use replica::{RecoveredState, Replica, Role, Status};
pub use storage::MemStorage;
pub use types::{
    ENTRY_OVERHEAD_BYTES, Entry, EntryKind, HardState, LogIndex, Membership, NodeId, Snapshot,
    SnapshotMeta, Term,
};

#[cfg(feature = "testkit")]
pub mod testkit;

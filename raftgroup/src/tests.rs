//! Unit tests of the replica as a whole: the persistence rule, idle cost, fetches.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::Bytes;

use crate::{
    CompactError, Config, Entry, EntryKind, LogIndex, MemStorage, Message, MessageBody, NodeId,
    Ready, RecoveredState, Replica, Role, Term,
};

/// Counts this thread's allocations, so tests can assert that a path allocates nothing.
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    /// Bytes allocated minus bytes freed, wrapping (differences of it are what count).
    static LIVE_BYTES: Cell<usize> = const { Cell::new(0) };
}

fn record(count: u64, allocated: usize, freed: usize) {
    // `try_with`: the allocator may run while thread-locals are being torn down.
    let _ = ALLOCATIONS.try_with(|cell| cell.set(cell.get() + count));
    let _ = LIVE_BYTES
        .try_with(|cell| cell.set(cell.get().wrapping_add(allocated).wrapping_sub(freed)));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the counters
// are plain thread-local cells that never allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(1, layout.size(), 0);
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        record(0, 0, layout.size());
        // SAFETY: `ptr` was allocated by `System` with `layout`, as the caller guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(1, new_size, layout.size());
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

fn live_bytes() -> usize {
    LIVE_BYTES.with(Cell::get)
}

fn three_voters(id: u64) -> Replica {
    let mut config = Config::new(NodeId(id), vec![NodeId(1), NodeId(2), NodeId(3)]);
    config.pre_vote = false;
    Replica::new(config, RecoveredState::default()).expect("valid config")
}

fn message(from: u64, to: u64, term: u64, body: MessageBody) -> Message {
    Message { from: NodeId(from), to: NodeId(to), term: Term(term), body }
}

fn ack(from: u64, index: u64) -> Message {
    let body = MessageBody::AppendResponse {
        reject: false,
        index: LogIndex(index),
        hint_index: LogIndex::ZERO,
        hint_term: Term::ZERO,
    };
    message(from, 1, 1, body)
}

/// Node 1 as leader of term 1, its no-op (index 1) handed to storage but not yet durable.
fn leader_with_unpersisted_noop() -> (Replica, Ready) {
    let mut leader = three_voters(1);
    leader.campaign_now();
    let ready = leader.ready();
    assert!(
        ready.messages.iter().all(|m| !matches!(m.body, MessageBody::Vote { .. })),
        "vote requests must wait for the candidate's own vote to be durable"
    );
    assert_eq!(ready.persisted_messages.peek().len(), 2);
    assert_eq!(ready.hard_state.map(|h| h.vote), Some(Some(NodeId(1))));
    leader.advance(ready);
    let grant = message(2, 1, 1, MessageBody::VoteResponse { reject: false });
    leader.step(grant).expect("valid");
    assert_eq!(leader.role(), Role::Leader);
    let ready = leader.ready();
    assert_eq!(ready.entries.len(), 1, "the no-op");
    assert_eq!(ready.messages.len(), 2, "replication starts before the local write ends");
    (leader, ready)
}

/// Entries, a new term and a new vote need an fsync; a new commit index alone does not (etcd's
/// `MustSync`): a follower whose heartbeat only raised its commit writes without one.
#[test]
fn only_entries_terms_and_votes_must_be_synced() {
    let mut follower = three_voters(2);
    let ready = follower.ready();
    assert!(!ready.must_sync, "nothing changed");
    follower.advance(ready);
    let noop =
        Entry { index: LogIndex(1), term: Term(1), kind: EntryKind::Empty, payload: Bytes::new() };
    let append = MessageBody::Append {
        prev_index: LogIndex::ZERO,
        prev_term: Term::ZERO,
        entries: vec![noop],
        commit: LogIndex::ZERO,
    };
    follower.step(message(1, 2, 1, append)).expect("valid");
    let ready = follower.ready();
    assert_eq!(ready.hard_state.map(|h| h.term), Some(Term(1)));
    assert!(ready.must_sync, "a new term and an entry");
    follower.advance(ready);
    follower.on_persisted(Term(1), LogIndex(1));
    let heartbeat = MessageBody::Heartbeat { commit: LogIndex(1), seq: 1, sent_tick: 1 };
    follower.step(message(1, 2, 1, heartbeat)).expect("valid");
    let ready = follower.ready();
    assert_eq!(ready.hard_state.map(|h| h.commit), Some(LogIndex(1)));
    assert!(ready.entries.is_empty());
    assert!(!ready.must_sync, "only the commit index moved");
    follower.advance(ready);
}

#[test]
fn leader_counts_its_own_entry_only_after_persisting_it() {
    let (mut leader, ready) = leader_with_unpersisted_noop();
    leader.advance(ready);
    leader.step(ack(2, 1)).expect("valid");
    assert_eq!(leader.commit_index(), LogIndex(0), "one follower plus an unpersisted leader");
    leader.on_persisted(Term(1), LogIndex(1));
    assert_eq!(leader.commit_index(), LogIndex(1));
    leader.check_invariants().expect("invariants");
}

#[test]
fn two_followers_commit_without_the_leaders_disk() {
    let (mut leader, ready) = leader_with_unpersisted_noop();
    leader.advance(ready);
    leader.step(ack(2, 1)).expect("valid");
    leader.step(ack(3, 1)).expect("valid");
    assert_eq!(leader.commit_index(), LogIndex(1), "a quorum of followers is enough");
}

#[test]
fn stale_persistence_acks_are_ignored() {
    let (mut leader, ready) = leader_with_unpersisted_noop();
    leader.advance(ready);
    leader.on_persisted(Term(7), LogIndex(1));
    leader.on_persisted(Term(1), LogIndex(9));
    assert_eq!(leader.status().persisted, LogIndex(0));
}

#[test]
fn follower_votes_and_acks_only_after_persisting() {
    let mut follower = three_voters(2);
    let vote = MessageBody::Vote { last_index: LogIndex(0), last_term: Term(0), transfer: false };
    follower.step(message(1, 2, 1, vote)).expect("valid");
    let ready = follower.ready();
    assert!(ready.messages.is_empty(), "a vote may leave only after it is durable");
    assert_eq!(ready.hard_state.map(|h| (h.term, h.vote)), Some((Term(1), Some(NodeId(1)))));
    let answer = ready.persisted_messages.peek();
    assert!(matches!(answer, [Message { body: MessageBody::VoteResponse { reject: false }, .. }]));
    follower.advance(ready);

    let entry = Entry {
        index: LogIndex(1),
        term: Term(1),
        kind: EntryKind::Normal,
        payload: Bytes::from_static(b"x"),
    };
    let append = MessageBody::Append {
        prev_index: LogIndex(0),
        prev_term: Term(0),
        entries: vec![entry],
        commit: LogIndex(0),
    };
    follower.step(message(1, 2, 1, append)).expect("valid");
    let ready = follower.ready();
    assert_eq!(ready.entries.len(), 1);
    assert!(ready.messages.is_empty(), "an ack may leave only after the entries are durable");
    let answer = ready.persisted_messages.peek();
    assert!(matches!(
        answer,
        [Message {
            body: MessageBody::AppendResponse { reject: false, index: LogIndex(1), .. },
            ..
        }]
    ));
}

#[test]
fn a_second_vote_in_the_same_term_is_refused() {
    let mut follower = three_voters(2);
    let vote = MessageBody::Vote { last_index: LogIndex(0), last_term: Term(0), transfer: false };
    follower.step(message(1, 2, 1, vote.clone())).expect("valid");
    follower.step(message(3, 2, 1, vote)).expect("valid");
    let ready = follower.ready();
    let answers: Vec<bool> = ready
        .persisted_messages
        .peek()
        .iter()
        .map(|m| matches!(m.body, MessageBody::VoteResponse { reject: false }))
        .collect();
    assert_eq!(answers, [true, false]);
    follower.check_invariants().expect("invariants");
}

#[test]
fn malformed_appends_are_typed_errors_and_change_nothing() {
    let mut follower = three_voters(2);
    let entry = |index, term| Entry {
        index: LogIndex(index),
        term: Term(term),
        kind: EntryKind::Normal,
        payload: Bytes::new(),
    };
    let gap = MessageBody::Append {
        prev_index: LogIndex(0),
        prev_term: Term(0),
        entries: vec![entry(1, 1), entry(3, 1)],
        commit: LogIndex(0),
    };
    assert!(follower.step(message(1, 2, 1, gap)).is_err());
    let future = MessageBody::Append {
        prev_index: LogIndex(0),
        prev_term: Term(0),
        entries: vec![entry(1, 5)],
        commit: LogIndex(0),
    };
    assert!(follower.step(message(1, 2, 1, future)).is_err());
    assert_eq!(follower.last_index(), LogIndex(0));
    assert_eq!(follower.term(), Term(0), "a refused message changes no state");
    let misaddressed = message(1, 3, 1, MessageBody::TimeoutNow);
    assert!(follower.step(misaddressed).is_err());
}

/// Runs a follower through an election and some replication, then measures it idle.
#[test]
fn an_idle_follower_ticks_without_allocating_and_stays_under_1_kib() {
    let before = live_bytes();
    let mut follower = three_voters(2);
    let mut storage = MemStorage::new();
    let drive = |follower: &mut Replica, storage: &mut MemStorage| {
        while follower.has_ready() {
            let ready = follower.ready();
            let persisted = storage.persist(&ready);
            for entry in &ready.committed_entries {
                follower.on_applied(entry.index);
            }
            follower.advance(ready);
            if let Some((term, index)) = persisted {
                follower.on_persisted(term, index);
            }
        }
    };
    for index in 1..=3 {
        let entry = Entry {
            index: LogIndex(index),
            term: Term(1),
            kind: EntryKind::Normal,
            payload: Bytes::from_static(b"payload"),
        };
        let append = MessageBody::Append {
            prev_index: LogIndex(index - 1),
            prev_term: Term(u64::from(index > 1)),
            entries: vec![entry],
            commit: LogIndex(index - 1),
        };
        follower.step(message(1, 2, 1, append)).expect("valid");
        drive(&mut follower, &mut storage);
    }
    let heartbeat = MessageBody::Heartbeat { commit: LogIndex(3), seq: 1, sent_tick: 1 };
    follower.step(message(1, 2, 1, heartbeat)).expect("valid");
    drive(&mut follower, &mut storage);
    assert_eq!(follower.commit_index(), LogIndex(3));
    drop(storage);
    // Everything else this test allocated is gone: what is left is the replica's heap.
    let retained = live_bytes().wrapping_sub(before);
    let total = std::mem::size_of::<Replica>() + retained;
    eprintln!("idle follower: {total} bytes ({retained} on the heap)");
    assert!(total <= 1024, "idle follower holds {total} bytes");

    let allocations_before = allocations();
    for _ in 0..5 {
        follower.tick();
    }
    assert_eq!(allocations() - allocations_before, 0, "an idle tick allocates nothing");
    assert_eq!(follower.role(), Role::Follower);
}

#[test]
fn a_stale_fetch_answer_is_dropped_quietly() {
    // A follower that once led asked storage for entries; by the time they come back its log
    // was overwritten in a newer term: the answer must neither be applied nor be an error.
    let mut follower = three_voters(2);
    let fetch = crate::Fetch {
        purpose: crate::FetchPurpose::Replicate { to: NodeId(3) },
        term: Term(1),
        low: LogIndex(1),
        high: LogIndex(1),
        max_bytes: 1024,
    };
    let stale =
        Entry { index: LogIndex(1), term: Term(1), kind: EntryKind::Normal, payload: Bytes::new() };
    assert_eq!(follower.on_fetched(fetch, vec![stale.clone()]), Ok(()));
    let apply = crate::Fetch { purpose: crate::FetchPurpose::Apply, ..fetch };
    assert_eq!(follower.on_fetched(apply, vec![stale]), Ok(()));
    assert!(!follower.has_ready(), "nothing was applied or sent");
}

#[test]
fn inconsistent_recovered_state_is_a_typed_error() {
    let config = Config::new(NodeId(1), vec![NodeId(1)]);
    let mut recovered = RecoveredState::default();
    recovered.hard_state.commit = LogIndex(3);
    let error = Replica::new(config.clone(), recovered).expect_err("commit beyond the log");
    assert!(matches!(error, crate::ConfigError::BadRecoveredState { .. }));
    let entry = |index| Entry {
        index: LogIndex(index),
        term: Term(1),
        kind: EntryKind::Normal,
        payload: Bytes::new(),
    };
    let gap = RecoveredState { entries: vec![entry(1), entry(3)], ..RecoveredState::default() };
    assert!(Replica::new(config, gap).is_err(), "entries with a gap");
}

/// Node 1 as leader of term 1 with both followers in `Replicate` and everything through the
/// no-op committed, acknowledged and durable; its outbox is empty.
fn replicating_leader(config: Config) -> Replica {
    let mut leader = Replica::new(config, RecoveredState::default()).expect("valid config");
    leader.campaign_now();
    let ready = leader.ready();
    leader.advance(ready);
    leader.step(message(2, 1, 1, MessageBody::VoteResponse { reject: false })).expect("valid");
    assert_eq!(leader.role(), Role::Leader);
    let ready = leader.ready();
    leader.advance(ready);
    leader.on_persisted(Term(1), LogIndex(1));
    leader.step(ack(2, 1)).expect("valid");
    leader.step(ack(3, 1)).expect("valid");
    assert_eq!(leader.commit_index(), LogIndex(1));
    while leader.has_ready() {
        let ready = leader.ready();
        for entry in &ready.committed_entries {
            leader.on_applied(entry.index);
        }
        leader.advance(ready);
    }
    for id in [2, 3] {
        let state = leader.progress(NodeId(id)).map(|(_, _, state)| state);
        assert_eq!(state, Some(crate::ProgressState::Replicate));
    }
    leader
}

fn leader_config() -> Config {
    let mut config = Config::new(NodeId(1), vec![NodeId(1), NodeId(2), NodeId(3)]);
    config.pre_vote = false;
    config
}

/// The Appends in `messages`, per follower: (prev_index, first..=last index, commit).
fn appends_to(messages: &[Message], to: u64) -> Vec<(u64, u64, u64, u64)> {
    messages
        .iter()
        .filter(|m| m.to == NodeId(to))
        .filter_map(|m| match &m.body {
            MessageBody::Append { prev_index, entries, commit, .. } => Some((
                prev_index.0,
                entries.first().map_or(0, |e| e.index.0),
                entries.last().map_or(0, |e| e.index.0),
                commit.0,
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn proposals_between_two_readies_leave_as_one_append_per_follower() {
    let mut leader = replicating_leader(leader_config());
    for _ in 0..100 {
        leader.propose(Bytes::from_static(b"sixteen bytes!!!")).expect("accepted");
    }
    assert!(leader.has_ready(), "the Appends are owed until the next Ready");
    let ready = leader.ready();
    assert_eq!(ready.entries.len(), 100);
    for to in [2, 3] {
        assert_eq!(appends_to(&ready.messages, to), [(1, 2, 101, 1)], "one Append to n{to}");
    }
    assert_eq!(ready.messages.len(), 2);
    leader.advance(ready);
    leader.on_persisted(Term(1), LogIndex(101));
    assert!(!leader.has_ready(), "the leader's own write alone commits nothing");

    // A commit index that advances between two Readies goes out once per follower, in the
    // same Append as the entries proposed meanwhile.
    leader.step(ack(2, 101)).expect("valid");
    assert_eq!(leader.commit_index(), LogIndex(101));
    assert!(leader.has_ready(), "the new commit index is owed to the followers");
    leader.step(ack(3, 101)).expect("valid");
    leader.propose(Bytes::from_static(b"x")).expect("accepted");
    leader.propose(Bytes::from_static(b"y")).expect("accepted");
    let ready = leader.ready();
    for to in [2, 3] {
        assert_eq!(appends_to(&ready.messages, to), [(101, 102, 103, 101)]);
    }
    assert_eq!(ready.messages.len(), 2);
    leader.advance(ready);

    // With nothing new, the commit index alone still goes out (an empty Append).
    leader.on_persisted(Term(1), LogIndex(103));
    leader.step(ack(2, 103)).expect("valid");
    let ready = leader.ready();
    for to in [2, 3] {
        assert_eq!(appends_to(&ready.messages, to), [(103, 0, 0, 103)]);
    }
    leader.check_invariants().expect("invariants");
}

#[test]
fn coalesced_appends_are_split_by_max_batch_bytes_and_bounded_by_the_window() {
    let entry_bytes = 16 + crate::ENTRY_OVERHEAD_BYTES;
    let mut config = leader_config();
    config.max_batch_bytes = 10 * entry_bytes;
    config.max_inflight_messages = 4;
    let mut leader = replicating_leader(config);
    for _ in 0..60 {
        leader.propose(Bytes::from_static(b"sixteen bytes!!!")).expect("accepted");
    }
    let ready = leader.ready();
    for to in [2, 3] {
        let expected = [(1, 2, 11, 1), (11, 12, 21, 1), (21, 22, 31, 1), (31, 32, 41, 1)];
        assert_eq!(appends_to(&ready.messages, to), expected, "4 in flight of 10 entries");
    }
    leader.advance(ready);
    assert!(leader.propose(Bytes::new()).is_err(), "the windows to a quorum are full");

    // Acknowledgements free the window; the rest leaves with the next Ready, pipelined again.
    leader.step(ack(2, 21)).expect("valid");
    assert!(leader.has_ready());
    let ready = leader.ready();
    assert_eq!(appends_to(&ready.messages, 2), [(41, 42, 51, 1), (51, 52, 61, 1)]);
    assert!(appends_to(&ready.messages, 3).is_empty(), "n3's window is still full");
    leader.check_invariants().expect("invariants");
}

/// `snapshot_meta_at` says what `compact` will record without compacting (the engine writes the
/// image out first and compacts once the file is durable); followers needing a snapshot then get
/// the data `compact` was given, and indexes not applied, not durable or already compacted are
/// refused by both.
#[test]
fn snapshot_meta_at_says_what_compact_records_without_compacting() {
    let (mut leader, ready) = leader_with_unpersisted_noop();
    leader.advance(ready);
    leader.on_persisted(Term(1), LogIndex(1));
    leader.step(ack(2, 1)).expect("valid");
    leader.propose(Bytes::from_static(b"x")).expect("leader");
    let ready = leader.ready();
    leader.advance(ready);
    leader.on_persisted(Term(1), LogIndex(2));
    leader.step(ack(2, 2)).expect("valid");
    assert_eq!(leader.commit_index(), LogIndex(2));
    let ready = leader.ready();
    leader.advance(ready);
    assert!(matches!(leader.snapshot_meta_at(LogIndex(2)), Err(CompactError::NotApplied { .. })));
    leader.on_applied(LogIndex(2));
    let meta = leader.snapshot_meta_at(LogIndex(2)).expect("applied and durable");
    assert_eq!((meta.index, meta.term), (LogIndex(2), Term(1)));
    assert_eq!(meta.membership, *leader.membership());
    assert_eq!(leader.status().snapshot_index, LogIndex::ZERO, "nothing compacted yet");
    let compacted =
        leader.compact(LogIndex(2), Bytes::from_static(b"mapped")).expect("compactable");
    assert_eq!(compacted, meta);
    assert!(matches!(
        leader.snapshot_meta_at(LogIndex(2)),
        Err(CompactError::AlreadyCompacted { .. })
    ));
    // Follower 3 (still probed from the election) rejects; the log it needs is compacted.
    let reject = MessageBody::AppendResponse {
        reject: true,
        index: LogIndex(0),
        hint_index: LogIndex::ZERO,
        hint_term: Term::ZERO,
    };
    leader.step(message(3, 1, 1, reject)).expect("valid");
    let ready = leader.ready();
    let sent = ready.messages.iter().find_map(|m| match &m.body {
        MessageBody::Snapshot { snapshot } if m.to == NodeId(3) => Some(snapshot.data.clone()),
        _ => None,
    });
    assert_eq!(sent, Some(Bytes::from_static(b"mapped")));
}

/// A quiet leader can tell one follower again to stop ticking; a follower cannot.
#[test]
fn a_leader_requiesces_one_follower_and_a_follower_cannot() {
    let (mut leader, ready) = leader_with_unpersisted_noop();
    leader.advance(ready);
    leader.on_persisted(Term(1), LogIndex(1));
    leader.step(ack(2, 1)).expect("valid");
    let ready = leader.ready();
    leader.advance(ready);
    assert!(leader.requiesce(NodeId(3)));
    assert!(!leader.requiesce(NodeId(1)), "not to itself");
    assert!(!leader.requiesce(NodeId(9)), "not to a stranger");
    let ready = leader.ready();
    let sent: Vec<_> = ready.messages.iter().map(|m| (m.to, m.body.clone())).collect();
    // Node 3 has acknowledged nothing: the commit it may take is what it holds.
    assert_eq!(sent, vec![(NodeId(3), MessageBody::Quiesce { commit: LogIndex(0) })]);
    let mut follower = three_voters(2);
    assert!(!follower.requiesce(NodeId(3)));
}

/// A replica that is no voter in its own view (one hosted empty to join, or one removed) is
/// never ticked by the engine, so its clock says it heard from a leader just now, forever.
/// Leader stickiness must not make it refuse pre-votes: a joint configuration it has not
/// learned yet may need its vote to elect anyone (cluster simulator seed 1548).
#[test]
fn a_replica_that_is_no_voter_does_not_refuse_pre_votes_for_a_leader_it_heard() {
    let mut config = Config::new(NodeId(4), vec![NodeId(1), NodeId(2), NodeId(3)]);
    config.check_quorum = true;
    let mut outsider = Replica::new(config, RecoveredState::default()).expect("valid config");
    let heartbeat = MessageBody::Heartbeat { commit: LogIndex::ZERO, seq: 1, sent_tick: 0 };
    outsider.step(message(1, 4, 1, heartbeat)).expect("valid");
    assert_eq!(outsider.leader(), Some(NodeId(1)));
    let pre_vote = MessageBody::PreVote { last_index: LogIndex::ZERO, last_term: Term::ZERO };
    outsider.step(message(2, 4, 2, pre_vote)).expect("valid");
    let ready = outsider.ready();
    let answer =
        ready.messages.iter().chain(ready.persisted_messages.peek()).find_map(|m| match m.body {
            MessageBody::PreVoteResponse { reject } if m.to == NodeId(2) => Some(reject),
            _ => None,
        });
    assert_eq!(answer, Some(false), "the pre-vote is granted");
}

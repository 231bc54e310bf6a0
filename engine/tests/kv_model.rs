//! The KV state machine against models: a `BTreeMap` for the commands and queries, a per-client
//! ledger for exactly-once sessions, and itself (snapshotted and restored mid-log, or fed in other
//! batch sizes) for determinism.

use std::collections::BTreeMap;

use bytes::Bytes;
use flotilla::kv::{
    ApplyError, Command, KvConfig, KvStateMachine, Outcome, Proposal, Query, QueryResult, Reply,
    Request, SessionCommand, SnapshotImage, StateMachine,
};
use flotilla::raftgroup::{Entry, EntryKind, LogIndex, Term};
use proptest::prelude::*;
use proptest::strategy::ValueTree;

type Response = Result<Reply, ApplyError>;

fn key() -> impl Strategy<Value = Bytes> {
    // The last three straddle the map's inline-key limit (23 bytes): 23, 23 + a zero byte, 24.
    prop::sample::select(vec![
        "",
        "a",
        "aa",
        "ab",
        "b",
        "c",
        "d",
        "bbbbbbbbbbbbbbbbbbbbbbb",
        "bbbbbbbbbbbbbbbbbbbbbbb\0",
        "bbbbbbbbbbbbbbbbbbbbbbbb",
    ])
    .prop_map(|key: &'static str| Bytes::from_static(key.as_bytes()))
}

fn value() -> impl Strategy<Value = Bytes> {
    prop::sample::select(vec!["", "0", "1", "2"])
        .prop_map(|value: &'static str| Bytes::from_static(value.as_bytes()))
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        3 => (key(), value()).prop_map(|(key, value)| Command::Put { key, value }),
        2 => key().prop_map(|key| Command::Delete { key }),
        4 => (key(), prop::option::of(value()), prop::option::of(value()))
            .prop_map(|(key, expected, new)| Command::CompareAndSet { key, expected, new }),
    ]
}

fn query() -> impl Strategy<Value = Query> {
    prop_oneof![
        key().prop_map(|key| Query::Get { key }),
        (key(), prop::option::of(key()), 0_u32..6).prop_map(|(start, end, limit)| Query::Range {
            start,
            end,
            limit
        }),
    ]
}

fn entry(index: u64, payload: Bytes) -> Entry {
    Entry { index: LogIndex(index), term: Term(1), kind: EntryKind::Normal, payload }
}

fn proposal(leader_time_ms: u64, request: Request) -> Bytes {
    Proposal { leader_time_ms, request }.to_bytes()
}

fn apply_one(kv: &mut KvStateMachine, payload: Bytes) -> Response {
    let mut responses = Vec::new();
    kv.apply(&[entry(kv.applied_index().get() + 1, payload)], &mut responses);
    kv.check_invariants();
    responses.pop().expect("one response per entry")
}

/// The reference: the obvious implementation of each command on a `BTreeMap`.
fn model_execute(model: &mut BTreeMap<Bytes, Bytes>, command: &Command) -> Outcome {
    match command {
        Command::Put { key, value } => {
            model.insert(key.clone(), value.clone());
            Outcome::Written
        }
        Command::Delete { key } => Outcome::Deleted { existed: model.remove(key).is_some() },
        Command::CompareAndSet { key, expected, new } => {
            let actual = model.get(key).cloned();
            if actual != *expected {
                return Outcome::Mismatch { actual };
            }
            match new {
                Some(value) => model.insert(key.clone(), value.clone()),
                None => model.remove(key),
            };
            Outcome::Swapped
        }
    }
}

/// The reference for reads: a linear filter over the whole map, not `BTreeMap::range`.
fn model_query(model: &BTreeMap<Bytes, Bytes>, query: &Query) -> QueryResult {
    match query {
        Query::Get { key } => QueryResult::Value(model.get(key).cloned()),
        Query::Range { start, end, limit } => {
            let matching: Vec<(Bytes, Bytes)> = model
                .iter()
                .filter(|(key, _)| *key >= start && end.as_ref().is_none_or(|end| *key < end))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect();
            let limit = *limit as usize;
            let more = matching.len() > limit;
            QueryResult::Range { entries: matching.into_iter().take(limit).collect(), more }
        }
    }
}

#[derive(Clone, Debug)]
enum Step {
    Command(Command),
    Query(Query),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![3 => command().prop_map(Step::Command), 2 => query().prop_map(Step::Query)]
}

proptest! {
    /// Unsessioned commands and queries give exactly what the `BTreeMap` model gives.
    #[test]
    fn commands_and_queries_match_a_btreemap(steps in prop::collection::vec(step(), 1..200)) {
        let mut kv = KvStateMachine::default();
        let mut model = BTreeMap::new();
        for step in &steps {
            match step {
                Step::Command(command) => {
                    let response =
                        apply_one(&mut kv, proposal(0, Request::Unsessioned(command.clone())));
                    let expected = model_execute(&mut model, command);
                    prop_assert_eq!(response, Ok(Reply::Done(expected)));
                }
                Step::Query(query) => {
                    prop_assert_eq!(kv.query(query), model_query(&model, query));
                }
            }
        }
        let state: Vec<_> = kv.iter().map(|(key, value)| (Bytes::copy_from_slice(key), value.clone())).collect();
        let expected: Vec<_> = model.into_iter().collect();
        prop_assert_eq!(state, expected);
    }
}

/// What a client does next in the exactly-once test.
#[derive(Clone, Debug)]
enum ClientAction {
    /// Sends its next command.
    New(Command),
    /// Retries its current command (its answer was lost).
    Retry,
    /// An old copy of one of its earlier commands, delayed in the network, reaches the leader.
    Stray(u8),
}

fn client_action() -> impl Strategy<Value = (u8, ClientAction)> {
    let action = prop_oneof![
        5 => command().prop_map(ClientAction::New),
        3 => Just(ClientAction::Retry),
        1 => any::<u8>().prop_map(ClientAction::Stray),
    ];
    (0_u8..3, action)
}

proptest! {
    /// Retries and stray duplicates never apply a command twice: the state is the model's with
    /// each `(client, sequence)` applied once, every retry gets the first answer, and a copy of
    /// an older command is refused.
    #[test]
    fn retried_and_duplicated_proposals_apply_once(
        actions in prop::collection::vec(client_action(), 1..300),
    ) {
        let mut kv = KvStateMachine::default();
        let clients: Vec<u64> = (0..3)
            .map(|_| match apply_one(&mut kv, proposal(0, Request::RegisterSession)) {
                Ok(Reply::Registered { client_id }) => client_id,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        let mut model = BTreeMap::new();
        // Per client: the commands issued, in order (sequence = position + 1), and the first
        // answer to each.
        let mut issued: Vec<Vec<Command>> = vec![Vec::new(); 3];
        let mut answers: BTreeMap<(u64, u64), Outcome> = BTreeMap::new();
        for (client, action) in actions {
            let client = usize::from(client);
            let client_id = clients[client];
            let sequence = match action {
                ClientAction::New(command) => {
                    issued[client].push(command);
                    issued[client].len() as u64
                }
                ClientAction::Retry if !issued[client].is_empty() => issued[client].len() as u64,
                ClientAction::Stray(pick) if issued[client].len() > 1 => {
                    1 + u64::from(pick) % (issued[client].len() as u64 - 1)
                }
                ClientAction::Retry | ClientAction::Stray(_) => continue,
            };
            let command = issued[client][sequence as usize - 1].clone();
            let request = Request::Session(SessionCommand { client_id, sequence, command });
            let response = apply_one(&mut kv, proposal(0, request));
            let last = issued[client].len() as u64;
            if sequence < last {
                prop_assert_eq!(
                    response,
                    Err(ApplyError::StaleSequence { client_id, sequence, last })
                );
            } else if let Some(first) = answers.get(&(client_id, sequence)) {
                prop_assert_eq!(response, Ok(Reply::Done(first.clone())));
            } else {
                let outcome = model_execute(&mut model, &issued[client][sequence as usize - 1]);
                prop_assert_eq!(&response, &Ok(Reply::Done(outcome.clone())));
                answers.insert((client_id, sequence), outcome);
            }
            prop_assert_eq!(kv.last_sequence(client_id), Some(last));
        }
        let state: Vec<_> = kv.iter().map(|(key, value)| (Bytes::copy_from_slice(key), value.clone())).collect();
        let expected: Vec<_> = model.into_iter().collect();
        prop_assert_eq!(state, expected);
    }
}

/// One entry of a mixed log: every kind of request, sessions that expire and get evicted, time
/// that jumps and goes back, junk payloads and entries without a command.
#[derive(Clone, Debug)]
enum LogOp {
    Register,
    KeepAlive(u8),
    Close(u8),
    /// A session command: which registration, how to pick the sequence (0: next, 1: same, 2:
    /// older), what.
    Session(u8, u8, Command),
    Unsessioned(Command),
    Junk(Vec<u8>),
    Empty,
}

fn log_op() -> impl Strategy<Value = (i16, LogOp)> {
    let op = prop_oneof![
        2 => Just(LogOp::Register),
        1 => any::<u8>().prop_map(LogOp::KeepAlive),
        1 => any::<u8>().prop_map(LogOp::Close),
        8 => (any::<u8>(), 0_u8..3, command())
            .prop_map(|(client, pick, command)| LogOp::Session(client, pick, command)),
        3 => command().prop_map(LogOp::Unsessioned),
        1 => prop::collection::vec(any::<u8>(), 0..12).prop_map(LogOp::Junk),
        1 => Just(LogOp::Empty),
    ];
    // Leader time moves mostly forward, sometimes back (a new leader with a slower clock).
    (-40_i16..120, op)
}

const MIXED_CONFIG: KvConfig = KvConfig { session_ttl_ms: 300, sessions_max: 3 };

/// Turns generated operations into entries 1, 2, 3, … (client ids are registration indexes).
fn build_log(ops: &[(i16, LogOp)]) -> Vec<Entry> {
    let mut time_ms: u64 = 1_000;
    let mut registrations: Vec<u64> = Vec::new();
    let mut issued: BTreeMap<u64, u64> = BTreeMap::new();
    let mut entries = Vec::new();
    for (delta, op) in ops {
        let index = entries.len() as u64 + 1;
        time_ms = time_ms.saturating_add_signed(i64::from(*delta));
        let pick = |choice: u8| {
            if registrations.is_empty() {
                u64::from(choice)
            } else {
                registrations[usize::from(choice) % registrations.len()]
            }
        };
        let request = match op {
            LogOp::Register => {
                registrations.push(index);
                Request::RegisterSession
            }
            LogOp::KeepAlive(choice) => Request::KeepAlive { client_id: pick(*choice) },
            LogOp::Close(choice) => Request::CloseSession { client_id: pick(*choice) },
            LogOp::Session(choice, how, command) => {
                let client_id = pick(*choice);
                let last = issued.entry(client_id).or_insert(0);
                let sequence = match how {
                    0 => {
                        *last += 1;
                        *last
                    }
                    1 => *last,
                    _ => last.saturating_sub(1),
                };
                Request::Session(SessionCommand { client_id, sequence, command: command.clone() })
            }
            LogOp::Unsessioned(command) => Request::Unsessioned(command.clone()),
            LogOp::Junk(bytes) => {
                entries.push(entry(index, Bytes::copy_from_slice(bytes)));
                continue;
            }
            LogOp::Empty => {
                entries.push(Entry {
                    index: LogIndex(index),
                    term: Term(1),
                    kind: EntryKind::Empty,
                    payload: Bytes::new(),
                });
                continue;
            }
        };
        entries.push(entry(index, proposal(time_ms, request)));
    }
    entries
}

/// Applies `entries` in batches of the given sizes (cycled), returning every response.
fn apply_in_batches(kv: &mut KvStateMachine, entries: &[Entry], sizes: &[usize]) -> Vec<Response> {
    let mut responses = Vec::new();
    let mut rest = entries;
    let mut size = sizes.iter().copied().cycle();
    while !rest.is_empty() {
        let take = size.next().unwrap_or(1).clamp(1, rest.len());
        let (batch, tail) = rest.split_at(take);
        kv.apply(batch, &mut responses);
        kv.check_invariants();
        rest = tail;
    }
    responses
}

proptest! {
    /// Snapshot at a random point, restore into another instance (one that already holds other
    /// state), continue: the same later responses and the same final image as never stopping.
    #[test]
    fn snapshot_restore_and_continue_is_invisible(
        ops in prop::collection::vec(log_op(), 1..200),
        cut in any::<prop::sample::Index>(),
        sizes in prop::collection::vec(1_usize..8, 1..4),
    ) {
        let log = build_log(&ops);
        let cut = cut.index(log.len() + 1);
        let mut straight = KvStateMachine::new(MIXED_CONFIG);
        let mut responses = apply_in_batches(&mut straight, &log[..cut], &sizes);
        let image = straight.snapshot().to_bytes();
        responses.extend(apply_in_batches(&mut straight, &log[cut..], &sizes));

        let mut resumed = straight.clone();
        resumed.restore(&image).expect("a fresh image restores");
        prop_assert_eq!(resumed.applied_index(), LogIndex(cut as u64));
        prop_assert_eq!(resumed.snapshot().to_bytes(), image.clone(), "restore is exact");
        resumed.check_invariants();
        let later = apply_in_batches(&mut resumed, &log[cut..], &[1]);
        prop_assert_eq!(&later[..], &responses[cut..]);
        prop_assert_eq!(resumed.snapshot().to_bytes(), straight.snapshot().to_bytes());
    }

    /// Two instances fed the same log — in different batch sizes — hold byte-identical images
    /// at every index.
    #[test]
    fn the_same_log_gives_byte_identical_snapshots(
        ops in prop::collection::vec(log_op(), 1..150),
        sizes in prop::collection::vec(1_usize..8, 1..4),
    ) {
        let log = build_log(&ops);
        let mut one_by_one = KvStateMachine::new(MIXED_CONFIG);
        let mut images = vec![one_by_one.snapshot().to_bytes()];
        for entry in &log {
            one_by_one.apply(std::slice::from_ref(entry), &mut Vec::new());
            images.push(one_by_one.snapshot().to_bytes());
        }
        let mut batched = KvStateMachine::new(MIXED_CONFIG);
        let mut rest = &log[..];
        let mut size = sizes.iter().copied().cycle();
        while !rest.is_empty() {
            let take = size.next().unwrap_or(1).clamp(1, rest.len());
            let (batch, tail) = rest.split_at(take);
            batched.apply(batch, &mut Vec::new());
            let index = batched.applied_index().get() as usize;
            prop_assert_eq!(batched.snapshot().to_bytes(), images[index].clone());
            rest = tail;
        }
    }
}

/// Guards the generator: the mixed logs above must reach every kind of response, or the
/// snapshot and determinism properties would be checking less than they claim.
#[test]
fn mixed_logs_reach_every_response() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = prop::collection::vec(log_op(), 100..200);
    let mut seen = BTreeMap::new();
    let mut full_table = false;
    for _ in 0..20 {
        let ops = strategy.new_tree(&mut runner).expect("a value").current();
        let mut kv = KvStateMachine::new(MIXED_CONFIG);
        for entry in build_log(&ops) {
            let mut responses = Vec::new();
            kv.apply(&[entry], &mut responses);
            full_table |= kv.session_count() == MIXED_CONFIG.sessions_max;
            let kind = match &responses[0] {
                Ok(Reply::Registered { .. }) => "registered",
                Ok(Reply::KeptAlive) => "kept alive",
                Ok(Reply::Closed) => "closed",
                Ok(Reply::Done(Outcome::Mismatch { .. })) => "mismatch",
                Ok(Reply::Done(_)) => "done",
                Ok(Reply::Skipped) => "skipped",
                Err(ApplyError::Decode(_)) => "decode",
                Err(ApplyError::UnknownSession { .. }) => "unknown session",
                Err(ApplyError::StaleSequence { .. }) => "stale",
                Err(_) => "other error",
            };
            *seen.entry(kind).or_insert(0_u32) += 1;
        }
    }
    for kind in [
        "registered",
        "kept alive",
        "closed",
        "mismatch",
        "done",
        "skipped",
        "decode",
        "unknown session",
        "stale",
    ] {
        assert!(seen.get(kind).copied().unwrap_or(0) >= 5, "{kind} too rare: {seen:?}");
    }
    assert!(full_table, "the session table never filled up");
}

//! The KV state machine, one behaviour at a time: each command, each query, each session rule.

use bytes::Bytes;
use flotilla::kv::{
    ApplyError, Command, KvConfig, KvStateMachine, Outcome, Proposal, Query, QueryResult, Reply,
    Request, SessionCommand, SnapshotImage, StateMachine,
};
use flotilla::raftgroup::{Entry, EntryKind, LogIndex, Term};

/// Feeds entries to a state machine as the engine would: consecutive indexes from 1.
struct Log {
    kv: KvStateMachine,
    time_ms: u64,
}

impl Log {
    fn new(config: KvConfig) -> Self {
        Self { kv: KvStateMachine::new(config), time_ms: 0 }
    }

    fn entry(&mut self, kind: EntryKind, payload: Bytes) -> Result<Reply, ApplyError> {
        let entry = Entry { index: self.kv.applied_index().next(), term: Term(1), kind, payload };
        let mut responses = Vec::new();
        self.kv.apply(&[entry], &mut responses);
        assert_eq!(responses.len(), 1);
        self.kv.check_invariants();
        responses.pop().expect("one response")
    }

    fn request(&mut self, request: Request) -> Result<Reply, ApplyError> {
        let payload = Proposal { leader_time_ms: self.time_ms, request }.to_bytes();
        self.entry(EntryKind::Normal, payload)
    }

    fn run(&mut self, command: Command) -> Outcome {
        match self.request(Request::Unsessioned(command)) {
            Ok(Reply::Done(outcome)) => outcome,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn register(&mut self) -> u64 {
        match self.request(Request::RegisterSession) {
            Ok(Reply::Registered { client_id }) => client_id,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn session(
        &mut self,
        client_id: u64,
        sequence: u64,
        command: Command,
    ) -> Result<Reply, ApplyError> {
        self.request(Request::Session(SessionCommand { client_id, sequence, command }))
    }

    fn get(&self, key: &str) -> Option<Bytes> {
        match self.kv.query(&Query::Get { key: b(key) }) {
            QueryResult::Value(value) => value,
            other @ QueryResult::Range { .. } => panic!("unexpected {other:?}"),
        }
    }
}

fn b(text: &str) -> Bytes {
    Bytes::copy_from_slice(text.as_bytes())
}

fn put(key: &str, value: &str) -> Command {
    Command::Put { key: b(key), value: b(value) }
}

fn cas(key: &str, expected: Option<&str>, new: Option<&str>) -> Command {
    Command::CompareAndSet { key: b(key), expected: expected.map(b), new: new.map(b) }
}

fn log() -> Log {
    Log::new(KvConfig::default())
}

#[test]
fn put_creates_and_replaces() {
    let mut log = log();
    assert_eq!(log.run(put("k", "1")), Outcome::Written);
    assert_eq!(log.get("k"), Some(b("1")));
    assert_eq!(log.run(put("k", "2")), Outcome::Written);
    assert_eq!(log.get("k"), Some(b("2")));
    assert_eq!(log.run(put("", "")), Outcome::Written);
    assert_eq!(log.get(""), Some(Bytes::new()), "empty keys and values are ordinary");
    assert_eq!(log.kv.len(), 2);
}

#[test]
fn delete_reports_whether_the_key_existed() {
    let mut log = log();
    log.run(put("k", "1"));
    assert_eq!(log.run(Command::Delete { key: b("k") }), Outcome::Deleted { existed: true });
    assert_eq!(log.run(Command::Delete { key: b("k") }), Outcome::Deleted { existed: false });
    assert_eq!(log.get("k"), None);
    assert!(log.kv.is_empty());
}

#[test]
fn compare_and_set_creates_only_when_absent() {
    let mut log = log();
    assert_eq!(log.run(cas("k", None, Some("1"))), Outcome::Swapped);
    assert_eq!(log.run(cas("k", None, Some("2"))), Outcome::Mismatch { actual: Some(b("1")) });
    assert_eq!(log.get("k"), Some(b("1")));
}

#[test]
fn compare_and_set_swaps_only_the_expected_value() {
    let mut log = log();
    log.run(put("k", "1"));
    assert_eq!(log.run(cas("k", Some("0"), Some("2"))), Outcome::Mismatch { actual: Some(b("1")) });
    assert_eq!(log.run(cas("k", Some("1"), Some("2"))), Outcome::Swapped);
    assert_eq!(log.get("k"), Some(b("2")));
    // An empty value is a value, not absence.
    assert_eq!(log.run(cas("k", Some(""), Some("3"))), Outcome::Mismatch { actual: Some(b("2")) });
}

#[test]
fn compare_and_set_deletes_only_the_expected_value() {
    let mut log = log();
    log.run(put("k", "1"));
    assert_eq!(log.run(cas("k", Some("2"), None)), Outcome::Mismatch { actual: Some(b("1")) });
    assert_eq!(log.run(cas("k", Some("1"), None)), Outcome::Swapped);
    assert_eq!(log.get("k"), None);
    assert_eq!(log.run(cas("k", Some("1"), None)), Outcome::Mismatch { actual: None });
    // Absent and expected absent: matches, and deleting nothing changes nothing.
    assert_eq!(log.run(cas("k", None, None)), Outcome::Swapped);
    assert!(log.kv.is_empty());
}

#[test]
fn get_reads_the_applied_state() {
    let mut log = log();
    assert_eq!(log.get("k"), None);
    log.run(put("k", "v"));
    assert_eq!(log.get("k"), Some(b("v")));
    assert_eq!(log.get("k\0"), None);
}

fn range(log: &Log, start: &str, end: Option<&str>, limit: u32) -> (Vec<String>, bool) {
    match log.kv.query(&Query::Range { start: b(start), end: end.map(b), limit }) {
        QueryResult::Range { entries, more } => {
            let keys = entries
                .into_iter()
                .map(|(key, value)| {
                    assert_eq!(key, value, "values mirror keys in this test");
                    String::from_utf8(key.to_vec()).expect("utf-8 keys")
                })
                .collect();
            (keys, more)
        }
        other @ QueryResult::Value(_) => panic!("unexpected {other:?}"),
    }
}

#[test]
fn range_is_start_inclusive_end_exclusive_and_limited() {
    let mut log = log();
    for key in ["a", "b", "ba", "c", "d"] {
        log.run(put(key, key));
    }
    assert_eq!(range(&log, "b", Some("c"), 10), (vec!["b".into(), "ba".into()], false));
    assert_eq!(range(&log, "", None, 10).0.len(), 5);
    assert_eq!(range(&log, "", None, 2), (vec!["a".into(), "b".into()], true));
    assert!(!range(&log, "", None, 5).1, "more is false when nothing follows");
    assert_eq!(range(&log, "b", None, 0), (vec![], true));
    assert_eq!(range(&log, "e", None, 0), (vec![], false));
    assert_eq!(range(&log, "bb", Some("d"), 10), (vec!["c".into()], false));
    assert_eq!(range(&log, "c", Some("c"), 10), (vec![], false), "empty range");
    assert_eq!(range(&log, "d", Some("a"), 10), (vec![], false), "reversed range is empty");
    // Continuing after `more` from the last key plus a zero byte reads the rest.
    assert_eq!(range(&log, "b\0", None, 2), (vec!["ba".into(), "c".into()], true));
    assert_eq!(range(&log, "", None, u32::MAX).0.len(), 5, "a huge limit reserves nothing");
}

#[test]
fn registering_returns_the_entry_index_as_client_id() {
    let mut log = log();
    log.run(put("k", "v"));
    assert_eq!(log.register(), 2);
    assert_eq!(log.register(), 3);
    assert!(log.kv.has_session(2));
    assert_eq!(log.kv.session_count(), 2);
    assert_eq!(log.kv.last_sequence(2), Some(0));
}

#[test]
fn a_retried_command_is_answered_from_the_cache_without_applying() {
    let mut log = log();
    let client = log.register();
    let first = log.session(client, 1, cas("k", None, Some("1")));
    assert_eq!(first, Ok(Reply::Done(Outcome::Swapped)));
    // Another writer changes the key; a retry must not re-run the CAS (it would now mismatch).
    log.run(put("k", "other"));
    assert_eq!(log.session(client, 1, cas("k", None, Some("1"))), first);
    assert_eq!(log.get("k"), Some(b("other")));
    assert_eq!(log.kv.last_sequence(client), Some(1));
}

#[test]
fn a_lower_sequence_is_refused_and_not_applied() {
    let mut log = log();
    let client = log.register();
    assert_eq!(log.session(client, 1, put("a", "1")), Ok(Reply::Done(Outcome::Written)));
    assert_eq!(log.session(client, 2, put("b", "2")), Ok(Reply::Done(Outcome::Written)));
    assert_eq!(
        log.session(client, 1, put("c", "1")),
        Err(ApplyError::StaleSequence { client_id: client, sequence: 1, last: 2 })
    );
    assert_eq!(log.get("c"), None);
    let fresh = log.register();
    assert_eq!(
        log.session(fresh, 0, put("c", "1")),
        Err(ApplyError::StaleSequence { client_id: fresh, sequence: 0, last: 0 }),
        "sequences start at 1"
    );
    assert_eq!(log.get("c"), None);
}

#[test]
fn sequences_may_skip_numbers() {
    let mut log = log();
    let client = log.register();
    assert!(log.session(client, 5, put("a", "1")).is_ok());
    assert!(log.session(client, 9, put("b", "1")).is_ok());
    assert_eq!(log.kv.last_sequence(client), Some(9));
}

#[test]
fn an_unknown_session_is_refused() {
    let mut log = log();
    assert_eq!(
        log.session(42, 1, put("a", "1")),
        Err(ApplyError::UnknownSession { client_id: 42 })
    );
    assert_eq!(
        log.request(Request::KeepAlive { client_id: 42 }),
        Err(ApplyError::UnknownSession { client_id: 42 })
    );
    assert_eq!(log.get("a"), None);
}

#[test]
fn closing_a_session_forgets_it() {
    let mut log = log();
    let client = log.register();
    assert_eq!(log.request(Request::CloseSession { client_id: client }), Ok(Reply::Closed));
    assert_eq!(
        log.request(Request::CloseSession { client_id: client }),
        Err(ApplyError::UnknownSession { client_id: client })
    );
    assert_eq!(
        log.session(client, 1, put("a", "1")),
        Err(ApplyError::UnknownSession { client_id: client })
    );
}

#[test]
fn sessions_expire_by_leader_time_and_keep_alive_renews_them() {
    let mut log = Log::new(KvConfig { session_ttl_ms: 100, sessions_max: 10 });
    log.time_ms = 1_000;
    let idle = log.register();
    let busy = log.register();
    log.time_ms = 1_080;
    assert_eq!(log.request(Request::KeepAlive { client_id: busy }), Ok(Reply::KeptAlive));
    log.time_ms = 1_100;
    log.run(put("tick", ""));
    assert!(log.kv.has_session(idle), "idle for exactly the ttl is still alive");
    log.time_ms = 1_101;
    log.run(put("tick", ""));
    assert!(!log.kv.has_session(idle));
    assert!(log.kv.has_session(busy));
    log.time_ms = 1_180;
    assert!(log.session(busy, 1, put("a", "1")).is_ok(), "commands renew too");
    log.time_ms = 1_280;
    assert!(log.session(busy, 2, put("a", "2")).is_ok());
    log.time_ms = 1_381;
    assert_eq!(
        log.session(busy, 3, put("a", "3")),
        Err(ApplyError::UnknownSession { client_id: busy }),
        "a command arriving after the ttl finds its session gone"
    );
}

#[test]
fn log_time_never_goes_back() {
    let mut log = Log::new(KvConfig { session_ttl_ms: 100, sessions_max: 10 });
    log.time_ms = 1_000;
    let client = log.register();
    log.time_ms = 1_150;
    log.run(put("tick", ""));
    assert!(!log.kv.has_session(client));
    // A new leader whose clock is behind does not bring the session back or rewind time.
    log.time_ms = 900;
    let late = log.register();
    assert_eq!(log.kv.now_ms(), 1_150);
    log.time_ms = 1_200;
    log.run(put("tick", ""));
    assert!(log.kv.has_session(late), "registered at log time 1150, not 900");
}

#[test]
fn a_full_table_evicts_the_least_recently_active_session() {
    let mut log = Log::new(KvConfig { session_ttl_ms: 1_000_000, sessions_max: 2 });
    let first = log.register();
    log.time_ms = 1;
    let second = log.register();
    log.time_ms = 2;
    assert!(log.session(first, 1, put("a", "1")).is_ok());
    log.time_ms = 3;
    let third = log.register();
    assert_eq!(log.kv.session_count(), 2);
    assert!(log.kv.has_session(first));
    assert!(!log.kv.has_session(second));
    assert!(log.kv.has_session(third));
}

#[test]
fn entries_without_a_command_only_advance_the_index() {
    let mut log = log();
    assert_eq!(log.entry(EntryKind::Empty, Bytes::new()), Ok(Reply::Skipped));
    assert_eq!(log.entry(EntryKind::Membership, b("whatever")), Ok(Reply::Skipped));
    assert_eq!(log.kv.applied_index(), LogIndex(2));
    assert!(log.kv.is_empty());
}

#[test]
fn an_undecodable_payload_is_an_error_response_not_a_panic() {
    let mut log = log();
    assert!(matches!(log.entry(EntryKind::Normal, Bytes::new()), Err(ApplyError::Decode(_))));
    assert!(matches!(log.entry(EntryKind::Normal, b("junk")), Err(ApplyError::Decode(_))));
    assert_eq!(log.kv.applied_index(), LogIndex(2));
    assert_eq!(log.run(put("k", "v")), Outcome::Written);
}

#[test]
fn one_batch_gives_one_response_per_entry_in_order() {
    let mut kv = KvStateMachine::default();
    let entries: Vec<Entry> = (1..=3)
        .map(|index| Entry {
            index: LogIndex(index),
            term: Term(1),
            kind: EntryKind::Normal,
            payload: Proposal {
                leader_time_ms: 0,
                request: Request::Unsessioned(Command::Delete { key: b("k") }),
            }
            .to_bytes(),
        })
        .collect();
    kv.apply(&[], &mut Vec::new());
    let mut responses = vec![Ok(Reply::Skipped)];
    kv.apply(&entries, &mut responses);
    assert_eq!(responses.len(), 4, "responses are appended");
    assert_eq!(kv.applied_index(), LogIndex(3));
}

#[test]
#[should_panic(expected = "without gaps")]
fn a_gap_in_the_log_is_a_bug() {
    let mut kv = KvStateMachine::default();
    let entry =
        Entry { index: LogIndex(2), term: Term(1), kind: EntryKind::Empty, payload: Bytes::new() };
    kv.apply(&[entry], &mut Vec::new());
}

#[test]
fn stored_keys_and_values_do_not_share_the_entry_buffer() {
    // A key short enough to be held inline, and one past that limit, held in its own buffer.
    for name in ["key", "a-key-longer-than-twenty-three-bytes"] {
        let mut kv = KvStateMachine::default();
        let payload =
            Proposal { leader_time_ms: 0, request: Request::Unsessioned(put(name, "value")) }
                .to_bytes();
        let range = payload.as_ptr() as usize..payload.as_ptr() as usize + payload.len();
        let entry = Entry { index: LogIndex(1), term: Term(1), kind: EntryKind::Normal, payload };
        kv.apply(&[entry], &mut Vec::new());
        let (key, value) = kv.iter().next().expect("one pair");
        assert_eq!(key, name.as_bytes());
        assert!(!range.contains(&(key.as_ptr() as usize)), "{name}");
        assert!(!range.contains(&(value.as_ptr() as usize)), "{name}");
    }
}

#[test]
fn a_failed_restore_leaves_the_state_unchanged() {
    let mut log = log();
    log.run(put("k", "v"));
    let before = log.kv.snapshot().to_bytes();
    let mut damaged = before.to_vec();
    let last = damaged.len() - 1;
    damaged[last] ^= 1;
    assert!(log.kv.restore(&Bytes::from(damaged)).is_err());
    assert_eq!(log.kv.snapshot().to_bytes(), before);
}

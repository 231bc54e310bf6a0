//! The codecs under hostile input: proposals and queries from random and mutated bytes, snapshot
//! images with every bit flipped, truncated, extended or resealed around a random body.

use bytes::Bytes;
use flotilla::kv::{
    Command, DecodeError, KvConfig, KvStateMachine, Proposal, Query, Request, SessionCommand,
    SnapshotError, SnapshotImage, StateMachine,
};
use flotilla::raftgroup::testkit::SimRng;
use flotilla::raftgroup::{Entry, EntryKind, LogIndex, Term};
use proptest::prelude::*;

const RANDOM_INPUTS: usize = 100_000;

fn random_bytes(rng: &mut SimRng, len_max: u64) -> Bytes {
    let len = rng.below(len_max + 1);
    Bytes::from((0..len).map(|_| rng.next_u64() as u8).collect::<Vec<u8>>())
}

fn random_option(rng: &mut SimRng) -> Option<Bytes> {
    rng.percent(50).then(|| random_bytes(rng, 6))
}

fn random_command(rng: &mut SimRng) -> Command {
    match rng.below(3) {
        0 => Command::Put { key: random_bytes(rng, 6), value: random_bytes(rng, 6) },
        1 => Command::Delete { key: random_bytes(rng, 6) },
        _ => Command::CompareAndSet {
            key: random_bytes(rng, 6),
            expected: random_option(rng),
            new: random_option(rng),
        },
    }
}

fn random_proposal(rng: &mut SimRng) -> Proposal {
    let request = match rng.below(5) {
        0 => Request::RegisterSession,
        1 => Request::KeepAlive { client_id: rng.below(4) },
        2 => Request::CloseSession { client_id: rng.below(4) },
        3 => Request::Session(SessionCommand {
            client_id: rng.below(4),
            sequence: rng.below(4),
            command: random_command(rng),
        }),
        _ => Request::Unsessioned(random_command(rng)),
    };
    Proposal { leader_time_ms: rng.below(1_000), request }
}

fn random_query(rng: &mut SimRng) -> Query {
    if rng.percent(50) {
        Query::Get { key: random_bytes(rng, 6) }
    } else {
        Query::Range {
            start: random_bytes(rng, 6),
            end: random_option(rng),
            limit: rng.next_u64() as u32,
        }
    }
}

/// One to three random edits of a valid encoding: flip, overwrite, insert, delete, truncate,
/// or plant a huge length.
fn mutate(rng: &mut SimRng, bytes: &[u8]) -> Bytes {
    let mut bytes = bytes.to_vec();
    for _ in 0..rng.between(1, 3) {
        let position = rng.index(bytes.len() + 1);
        match rng.below(6) {
            0 if position < bytes.len() => bytes[position] ^= 1 << rng.below(8),
            1 if position < bytes.len() => bytes[position] = rng.next_u64() as u8,
            2 => bytes.insert(position, rng.next_u64() as u8),
            3 if position < bytes.len() => {
                bytes.remove(position);
            }
            4 => bytes.truncate(position),
            _ if position + 4 <= bytes.len() => {
                bytes[position..position + 4].copy_from_slice(&u32::MAX.to_le_bytes());
            }
            _ => bytes.push(0),
        }
    }
    Bytes::from(bytes)
}

/// Decodes `input` as a proposal and as a query; whatever decodes must re-encode to exactly the
/// input (one encoding per value). Returns how many of the two decoded.
fn check_decoders(input: &Bytes) -> usize {
    let mut decoded = 0;
    if let Ok(proposal) = Proposal::decode(input) {
        assert_eq!(proposal.to_bytes(), *input, "non-canonical proposal {proposal:?}");
        decoded += 1;
    }
    if let Ok(query) = Query::decode(input) {
        assert_eq!(query.to_bytes(), *input, "non-canonical query {query:?}");
        decoded += 1;
    }
    decoded
}

#[test]
fn random_bytes_never_panic_and_whatever_decodes_is_canonical() {
    let mut rng = SimRng::new(0x6b76_636f_6465_6331);
    let mut decoded = 0;
    for _ in 0..RANDOM_INPUTS {
        let mut input = random_bytes(&mut rng, 40).to_vec();
        // Mostly the right version byte, so that decoding gets past the first field.
        if !input.is_empty() && rng.percent(80) {
            input[0] = flotilla::kv::command::VERSION;
        }
        decoded += check_decoders(&Bytes::from(input));
    }
    assert!(decoded > 0, "some random inputs should decode");
}

#[test]
fn mutated_encodings_never_panic_and_whatever_decodes_is_canonical() {
    let mut rng = SimRng::new(0x6b76_6d75_7461_7465);
    let mut kv = KvStateMachine::new(KvConfig { session_ttl_ms: 100, sessions_max: 2 });
    let mut decoded = 0;
    for round in 0..RANDOM_INPUTS {
        let valid = if round % 2 == 0 {
            random_proposal(&mut rng).to_bytes()
        } else {
            random_query(&mut rng).to_bytes()
        };
        let input = mutate(&mut rng, &valid);
        decoded += check_decoders(&input);
        // The state machine takes the same bytes as entries without panicking.
        let entry = Entry {
            index: kv.applied_index().next(),
            term: Term(1),
            kind: EntryKind::Normal,
            payload: input,
        };
        kv.apply(&[entry], &mut Vec::new());
    }
    kv.check_invariants();
    assert!(decoded > RANDOM_INPUTS / 20, "mutations should often stay decodable: {decoded}");
}

fn bytes() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..16).prop_map(Bytes::from)
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        (bytes(), bytes()).prop_map(|(key, value)| Command::Put { key, value }),
        bytes().prop_map(|key| Command::Delete { key }),
        (bytes(), prop::option::of(bytes()), prop::option::of(bytes()))
            .prop_map(|(key, expected, new)| Command::CompareAndSet { key, expected, new }),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::RegisterSession),
        any::<u64>().prop_map(|client_id| Request::KeepAlive { client_id }),
        any::<u64>().prop_map(|client_id| Request::CloseSession { client_id }),
        (any::<u64>(), any::<u64>(), command()).prop_map(|(client_id, sequence, command)| {
            Request::Session(SessionCommand { client_id, sequence, command })
        }),
        command().prop_map(Request::Unsessioned),
    ]
}

proptest! {
    #[test]
    fn proposals_round_trip(leader_time_ms in any::<u64>(), request in request()) {
        let proposal = Proposal { leader_time_ms, request };
        let bytes = proposal.to_bytes();
        prop_assert_eq!(bytes.len(), proposal.encoded_len());
        prop_assert_eq!(Proposal::decode(&bytes), Ok(proposal));
        // Every strict prefix is truncated, never misread.
        for len in 0..bytes.len() {
            prop_assert_eq!(Proposal::decode(&bytes.slice(..len)), Err(DecodeError::Truncated));
        }
    }

    #[test]
    fn queries_round_trip(
        get in bytes(),
        start in bytes(),
        end in prop::option::of(bytes()),
        limit in any::<u32>(),
    ) {
        for query in [Query::Get { key: get }, Query::Range { start, end, limit }] {
            prop_assert_eq!(Query::decode(&query.to_bytes()), Ok(query));
        }
    }
}

/// A state with keys, empty values, and sessions in every state (fresh, each outcome cached).
const POPULATED_CONFIG: KvConfig = KvConfig { session_ttl_ms: 10_000, sessions_max: 8 };

fn populated() -> KvStateMachine {
    let mut kv = KvStateMachine::new(POPULATED_CONFIG);
    let key = |text: &str| Bytes::copy_from_slice(text.as_bytes());
    let mut requests = vec![Request::RegisterSession, Request::RegisterSession];
    let commands = [
        Command::Put { key: key("alpha"), value: key("1") },
        Command::Put { key: key("beta"), value: Bytes::new() },
        Command::Delete { key: key("gamma") },
        Command::CompareAndSet { key: key("alpha"), expected: None, new: None },
        Command::CompareAndSet { key: key("delta"), expected: None, new: Some(key("4")) },
    ];
    for (sequence, command) in commands.into_iter().enumerate() {
        requests.push(Request::RegisterSession);
        let client_id = requests.len() as u64;
        requests.push(Request::Session(SessionCommand {
            client_id,
            sequence: sequence as u64 + 1,
            command,
        }));
    }
    let entries: Vec<Entry> = requests
        .into_iter()
        .enumerate()
        .map(|(position, request)| Entry {
            index: LogIndex(position as u64 + 1),
            term: Term(1),
            kind: EntryKind::Normal,
            payload: Proposal { leader_time_ms: position as u64 * 10, request }.to_bytes(),
        })
        .collect();
    kv.apply(&entries, &mut Vec::new());
    assert_eq!(kv.len(), 3);
    assert_eq!(kv.session_count(), 7);
    kv
}

#[test]
fn every_single_bit_flip_of_a_snapshot_is_detected() {
    let kv = populated();
    let image = kv.snapshot().to_bytes();
    let mut restored = KvStateMachine::new(POPULATED_CONFIG);
    restored.restore(&image).expect("the intact image restores");
    assert_eq!(restored.snapshot().to_bytes(), image);
    let mut target = populated();
    for bit in 0..image.len() * 8 {
        let mut damaged = image.to_vec();
        damaged[bit / 8] ^= 1 << (bit % 8);
        let error = target.restore(&Bytes::from(damaged)).expect_err("a flipped bit is detected");
        let expected_kind = match bit / 8 {
            0..8 => matches!(error, SnapshotError::Magic),
            8..12 => matches!(error, SnapshotError::Version { .. }),
            60..68 => matches!(error, SnapshotError::Length { .. }),
            _ => matches!(error, SnapshotError::Checksum { .. }),
        };
        assert!(expected_kind, "bit {bit}: {error}");
    }
    assert_eq!(target.snapshot().to_bytes(), image, "failed restores changed nothing");
}

#[test]
fn every_truncation_and_extension_of_a_snapshot_is_detected() {
    let image = populated().snapshot().to_bytes();
    let mut target = KvStateMachine::new(POPULATED_CONFIG);
    for len in 0..image.len() {
        assert!(target.restore(&image.slice(..len)).is_err(), "truncated to {len}");
    }
    let mut extended = image.to_vec();
    extended.push(0);
    assert!(matches!(target.restore(&Bytes::from(extended)), Err(SnapshotError::Length { .. })));
    assert_eq!(target.applied_index(), LogIndex::ZERO);
}

#[test]
fn an_image_from_a_replica_with_other_limits_is_refused() {
    let image = populated().snapshot().to_bytes();
    let mut other = KvStateMachine::new(KvConfig { session_ttl_ms: 10_000, sessions_max: 9 });
    assert!(matches!(other.restore(&image), Err(SnapshotError::Config { .. })));
    assert_eq!(other.applied_index(), LogIndex::ZERO);
}

/// Random bodies behind a valid header and CRC reach the body parser, which must refuse or
/// accept them without panicking — and what it accepts must be a canonical image.
#[test]
fn random_resealed_images_never_panic() {
    let mut rng = SimRng::new(0x6b76_7365_616c_6564);
    let image = populated().snapshot().to_bytes();
    let mut accepted = 0;
    for _ in 0..20_000 {
        let mut forged = if rng.percent(50) {
            mutate(&mut rng, &image[72..]).to_vec()
        } else {
            random_bytes(&mut rng, 64).to_vec()
        };
        let mut header = image[..72].to_vec();
        // Random counts, sometimes huge, must not make the parser reserve anything.
        for (offset, field) in [(44, rng.below(12)), (52, rng.below(9))] {
            let field = if rng.percent(5) { u64::MAX } else { field };
            header[offset..offset + 8].copy_from_slice(&field.to_le_bytes());
        }
        header[60..68].copy_from_slice(&(forged.len() as u64).to_le_bytes());
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&header[..68]);
        hasher.update(&forged);
        header[68..72].copy_from_slice(&hasher.finalize().to_le_bytes());
        header.append(&mut forged);
        let forged = Bytes::from(header);
        let mut kv = KvStateMachine::new(POPULATED_CONFIG);
        if kv.restore(&forged).is_ok() {
            kv.check_invariants();
            assert_eq!(kv.snapshot().to_bytes(), forged, "an accepted image is canonical");
            accepted += 1;
        }
    }
    assert!(accepted > 0, "some forged images should be valid");
}

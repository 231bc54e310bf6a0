//! The pure transport stack end to end, as two nodes would run it: handshake, then batches of
//! Raft messages both ways through sessions, with the bytes cut into arbitrary pieces. What goes
//! in comes out, in order, whole.

use std::collections::BTreeSet;

use bytes::{Bytes, BytesMut};
use flotilla::raftgroup::{Entry, EntryKind, LogIndex, Message, MessageBody, NodeId, Term};
use flotilla::transport::ClusterId;
use flotilla::transport::batch::{self, BatchWriter};
use flotilla::transport::frame;
use flotilla::transport::handshake::{Handshake, Identity, Session, Verdict};
use flotilla::wal::GroupId;
use proptest::prelude::*;

const CLUSTER: ClusterId = ClusterId(3);

fn identity(node: u64) -> Identity {
    Identity { cluster: CLUSTER, node: NodeId(node) }
}

/// Delivers `bytes` to `input` in pieces of the sizes in `pieces` (cycled), calling `on_piece`
/// after each.
fn deliver(
    bytes: &[u8],
    pieces: &[usize],
    input: &mut BytesMut,
    mut on_piece: impl FnMut(&mut BytesMut),
) {
    let mut offset = 0;
    for piece in pieces.iter().cycle() {
        if offset == bytes.len() {
            break;
        }
        let end = (offset + piece).min(bytes.len());
        input.extend_from_slice(&bytes[offset..end]);
        offset = end;
        on_piece(input);
    }
}

/// Both ends of a connection between nodes 1 and 2, after a handshake delivered in `pieces`.
fn connect(pieces: &[usize]) -> (Session, Session) {
    let mut hello = Vec::new();
    let mut client = Handshake::initiate(identity(1), NodeId(2), &mut hello);
    let members: BTreeSet<NodeId> = [NodeId(1), NodeId(3)].into();
    let mut server = Handshake::accept(identity(2), members);
    let mut answer = Vec::new();
    deliver(&hello, pieces, &mut BytesMut::new(), |input| {
        server.on_bytes(input, &mut answer);
    });
    deliver(&answer, pieces, &mut BytesMut::new(), |input| {
        client.on_bytes(input, &mut Vec::new());
    });
    assert_eq!(server.verdict(), Some(&Verdict::Accepted { peer: NodeId(1) }));
    assert_eq!(client.verdict(), Some(&Verdict::Accepted { peer: NodeId(2) }));
    (client.into_session().unwrap(), server.into_session().unwrap())
}

fn any_message() -> impl Strategy<Value = Message> {
    let entries = proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..5);
    let body = prop_oneof![
        (any::<u64>(), entries).prop_map(|(commit, payloads)| MessageBody::Append {
            prev_index: LogIndex(10),
            prev_term: Term(2),
            entries: payloads
                .into_iter()
                .zip(11..)
                .map(|(payload, index)| Entry {
                    index: LogIndex(index),
                    term: Term(2),
                    kind: EntryKind::Normal,
                    payload: Bytes::from(payload),
                })
                .collect(),
            commit: LogIndex(commit),
        }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(seq, sent_tick, ticks)| {
            MessageBody::HeartbeatResponse { seq, sent_tick, ticks }
        }),
        any::<bool>().prop_map(|reject| MessageBody::PreVoteResponse { reject }),
        Just(MessageBody::TimeoutNow),
    ];
    (any::<u64>(), body).prop_map(|(term, body)| Message {
        from: NodeId(1),
        to: NodeId(2),
        term: Term(term),
        body,
    })
}

/// Encodes `batches` as frames from `sender`, delivers them in `pieces` to `receiver`, and
/// returns what came out.
fn transmit(
    sender: &Session,
    receiver: &mut Session,
    batches: &[Vec<(u64, Message)>],
    pieces: &[usize],
) -> Vec<Vec<(GroupId, Message)>> {
    let mut wire = Vec::new();
    for items in batches {
        let start = frame::begin(&mut wire);
        let mut writer = BatchWriter::new(&mut wire);
        for (group, message) in items {
            writer.push(GroupId(*group), message);
        }
        sender.finish(&mut wire, start).unwrap();
    }
    let mut received = Vec::new();
    let mut input = BytesMut::new();
    deliver(&wire, pieces, &mut input, |input| {
        while let Some(frame) = receiver.decode(input).unwrap() {
            let mut messages = Vec::new();
            batch::decode(&frame.body, &mut messages).unwrap();
            received.push(messages);
        }
    });
    assert_eq!(receiver.on_eof(&input), Ok(()));
    received
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn batches_cross_a_connection_both_ways_intact(
        batches in proptest::collection::vec(
            proptest::collection::vec((0u64..1000, any_message()), 0..6), 1..6),
        pieces in proptest::collection::vec(1usize..200, 1..8),
    ) {
        let (mut client, mut server) = connect(&pieces);
        let expected: Vec<Vec<(GroupId, Message)>> = batches
            .iter()
            .map(|items| items.iter().map(|(group, m)| (GroupId(*group), m.clone())).collect())
            .collect();
        prop_assert_eq!(&transmit(&client, &mut server, &batches, &pieces), &expected);
        prop_assert_eq!(&transmit(&server, &mut client, &batches, &pieces), &expected);
    }
}

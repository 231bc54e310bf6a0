//! Replays the committed fuzz corpus of the engine's targets (`fuzz/corpus/{transport_frame,
//! raft_message,snapshot_stream,kv_command}/*`) through their checks under `cargo test` (TESTING.md S4);
//! `-- --ignored write_seeds` regenerates the seed files.
//!
//! The checks are the fuzz targets' own, included from `fuzz/src/engine_checks.rs` (this crate
//! cannot depend on the fuzz crate, which builds only under `cargo fuzz`). So is the allocator
//! the fuzz crate installs (`fuzz/src/capped_alloc.rs`), so the replay holds the checks to the
//! same 64 MiB cap.

use std::alloc::Layout;

include!("../../fuzz/src/capped_alloc.rs");

#[global_allocator]
static ALLOCATOR: CappedAlloc = CappedAlloc;

include!("../../fuzz/src/engine_checks.rs");

#[cfg(test)]
mod corpus {
    use std::path::{Path, PathBuf};

    use flotilla::transport::snapshot::{RefuseReason, StreamId};
    use flotilla_raftgroup::{Membership, Snapshot, SnapshotMeta};

    use super::*;

    type Check = fn(&[u8]);

    const TARGETS: [(&str, Check); 4] = [
        ("transport_frame", check_transport_frame),
        ("raft_message", check_raft_message),
        ("snapshot_stream", check_snapshot_stream),
        ("kv_command", check_kv_command),
    ];

    include!("../../fuzz/corpus_replay.rs");

    #[test]
    fn transport_frame_corpus() {
        assert!(replay("corpus", "transport_frame") >= 5);
    }

    #[test]
    fn raft_message_corpus() {
        assert!(replay("corpus", "raft_message") >= 5);
    }

    #[test]
    fn snapshot_stream_corpus() {
        assert!(replay("corpus", "snapshot_stream") >= 5);
    }

    #[test]
    fn kv_command_corpus() {
        assert!(replay("corpus", "kv_command") >= 5);
    }

    /// Inputs of bugs found by fuzzing and not fixed yet (see `fuzz/regressions/*/README.md`):
    /// run with `-- --ignored` to check a fix.
    #[test]
    #[ignore = "open bugs, if any: see fuzz/regressions/*/README.md"]
    fn open_regressions() {
        for (target, _) in TARGETS {
            replay("regressions", target);
        }
    }

    /// The allocation cap is installed: a request over it fails instead of succeeding.
    #[test]
    fn allocations_over_the_cap_fail() {
        let layout = Layout::from_size_align(ALLOC_LIMIT, 1).expect("a valid layout");
        // SAFETY: a non-zero-sized layout; the pointer is freed below if the allocation succeeded.
        // `black_box`: an optimizer may otherwise elide an allocation whose pointer goes unused,
        // and the allocator would never be asked (release builds did exactly that).
        let pointer = std::hint::black_box(unsafe { std::alloc::alloc(layout) });
        let refused = pointer.is_null();
        if !refused {
            // SAFETY: allocated just above with this layout.
            unsafe { std::alloc::dealloc(pointer, layout) };
        }
        assert!(refused, "an allocation of {ALLOC_LIMIT} bytes was allowed");
    }

    // ---- Seed corpus: `cargo test -p flotilla --test fuzz_corpus -- --ignored write_seeds` ----

    fn message(from: u64, to: u64, body: MessageBody) -> Message {
        Message { from: NodeId(from), to: NodeId(to), term: Term(3), body }
    }

    fn membership() -> Membership {
        Membership {
            voters: vec![NodeId(1), NodeId(2), NodeId(3)],
            outgoing: vec![NodeId(1)],
            learners: vec![NodeId(4)],
        }
    }

    /// One message of every kind, with entries of every kind and a snapshot.
    fn every_message() -> Vec<(&'static str, Message)> {
        let mut membership_bytes = Vec::new();
        codec::encode_membership(&membership(), &mut membership_bytes);
        let entry = |index: u64, kind: EntryKind, payload: Vec<u8>| Entry {
            index: LogIndex(index),
            term: Term(2),
            kind,
            payload: Bytes::from(payload),
        };
        let put = Proposal {
            leader_time_ms: 5,
            request: Request::Unsessioned(Command::Put {
                key: Bytes::from_static(b"k"),
                value: Bytes::from_static(b"v"),
            }),
        };
        let snapshot = Snapshot {
            meta: SnapshotMeta { index: LogIndex(9), term: Term(2), membership: membership() },
            data: populated_kv().snapshot().to_bytes(),
        };
        vec![
            (
                "pre-vote",
                message(1, 2, MessageBody::PreVote { last_index: LogIndex(7), last_term: Term(2) }),
            ),
            ("pre-vote-response", message(2, 1, MessageBody::PreVoteResponse { reject: true })),
            (
                "vote",
                message(
                    1,
                    2,
                    MessageBody::Vote {
                        last_index: LogIndex(7),
                        last_term: Term(2),
                        transfer: true,
                    },
                ),
            ),
            ("vote-response", message(2, 1, MessageBody::VoteResponse { reject: false })),
            (
                "append",
                message(
                    1,
                    2,
                    MessageBody::Append {
                        prev_index: LogIndex(6),
                        prev_term: Term(2),
                        entries: vec![
                            entry(7, EntryKind::Normal, put.to_bytes().to_vec()),
                            entry(8, EntryKind::Membership, membership_bytes),
                            entry(9, EntryKind::Empty, Vec::new()),
                        ],
                        commit: LogIndex(6),
                    },
                ),
            ),
            (
                "append-response",
                message(
                    2,
                    1,
                    MessageBody::AppendResponse {
                        reject: true,
                        index: LogIndex(9),
                        hint_index: LogIndex(4),
                        hint_term: Term(1),
                    },
                ),
            ),
            (
                "heartbeat",
                message(
                    1,
                    2,
                    MessageBody::Heartbeat { commit: LogIndex(6), seq: 11, sent_tick: 40 },
                ),
            ),
            (
                "heartbeat-response",
                message(2, 1, MessageBody::HeartbeatResponse { seq: 11, sent_tick: 40, ticks: 41 }),
            ),
            ("snapshot", message(1, 2, MessageBody::Snapshot { snapshot })),
            ("read-index", message(2, 1, MessageBody::ReadIndex { context: 77 })),
            (
                "read-index-response",
                message(
                    1,
                    2,
                    MessageBody::ReadIndexResponse { context: 77, index: Some(LogIndex(9)) },
                ),
            ),
            (
                "read-index-response-none",
                message(1, 2, MessageBody::ReadIndexResponse { context: 78, index: None }),
            ),
            ("timeout-now", message(1, 2, MessageBody::TimeoutNow)),
        ]
    }

    fn raft_message_seeds() -> Vec<(&'static str, Vec<u8>)> {
        every_message()
            .into_iter()
            .map(|(name, message)| {
                let mut out = Vec::new();
                codec::encode(&message, &mut out);
                (name, out)
            })
            .collect()
    }

    /// A data frame from `DIALLER` to `LOCAL` carrying a batch of `messages`.
    fn data_frame(messages: &[(GroupId, Message)], out: &mut Vec<u8>) {
        let header =
            FrameHeader { kind: FrameKind::Data, cluster: CLUSTER, source: DIALLER, target: LOCAL };
        let start = frame::begin(out);
        batch::encode(messages.iter().map(|(group, message)| (*group, message)), out);
        frame::finish(&header, out, start, frame::BODY_BYTES_MAX_DEFAULT).expect("a small frame");
    }

    fn hello(cluster: u64, from: u64, to: u64) -> Vec<u8> {
        let mut out = Vec::new();
        Handshake::initiate(
            Identity { cluster: ClusterId(cluster), node: NodeId(from) },
            NodeId(to),
            &mut out,
        );
        out
    }

    /// What the acceptor (`LOCAL`, knowing `known`) answers to `hello`.
    fn answer(known: &[u64], hello: &[u8]) -> Vec<u8> {
        let mut acceptor = Handshake::accept(local(), known.iter().copied().map(NodeId).collect());
        let mut out = Vec::new();
        acceptor
            .on_bytes(&mut BytesMut::from(hello), &mut out)
            .expect("a whole hello gets a verdict");
        out
    }

    /// A `transport_frame` input: flags, piece sizes, stream.
    fn frame_input(seal: bool, config: u8, sizes: &[u8], stream: &[u8]) -> Vec<u8> {
        let count = u8::try_from(sizes.len()).expect("at most 7 piece sizes");
        assert!(count <= 7 && config <= 3);
        let flags = u8::from(seal) | config << 1 | count << 3;
        [&[flags][..], sizes, stream].concat()
    }

    fn transport_frame_seeds() -> Vec<(&'static str, Vec<u8>)> {
        let messages: Vec<(GroupId, Message)> = every_message()
            .into_iter()
            .zip(1..)
            .map(|((_, message), group)| (GroupId(group), message))
            .collect();
        let mut connection = hello(CLUSTER.0, DIALLER.0, LOCAL.0);
        data_frame(&messages[..4], &mut connection);
        data_frame(&[], &mut connection);
        data_frame(&messages[4..], &mut connection);
        let mut every = Vec::new();
        data_frame(&messages, &mut every);
        // A batch whose second item is cut short (the frame's checksums are resealed).
        let mut damaged = Vec::new();
        data_frame(&messages[..2], &mut damaged);
        damaged[HEADER_BYTES + 4] = 0xFF;
        let mut huge = Vec::new();
        frame::encode(
            &FrameHeader {
                kind: FrameKind::Data,
                cluster: CLUSTER,
                source: DIALLER,
                target: LOCAL,
            },
            b"",
            &mut huge,
            0,
        )
        .expect("an empty frame");
        huge[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut large = Vec::new();
        frame::encode(
            &FrameHeader {
                kind: FrameKind::Data,
                cluster: CLUSTER,
                source: DIALLER,
                target: LOCAL,
            },
            &[7; 100],
            &mut large,
            1000,
        )
        .expect("a 100-byte frame");
        let dialled = hello(CLUSTER.0, DIALLER.0, LOCAL.0);
        let cut = connection.len() - 30;
        vec![
            ("connection-hello-then-batches", frame_input(false, 0, &[0, 16, 200], &connection)),
            ("connection-one-byte-at-a-time-cut", frame_input(false, 0, &[0], &connection[..cut])),
            ("batch-of-every-message", frame_input(false, 2, &[], &every)),
            ("sealed-damaged-batch", frame_input(true, 0, &[], &damaged)),
            ("accept-answer", frame_input(false, 0, &[5], &answer(&MEMBERS, &dialled))),
            ("reject-answer-unknown-node", frame_input(false, 1, &[], &answer(&[3], &dialled))),
            ("hello-foreign-cluster", frame_input(false, 0, &[3, 3], &hello(8, 1, 2))),
            ("hello-unknown-node", frame_input(false, 0, &[], &hello(CLUSTER.0, 9, 2))),
            ("hello-wrong-target", frame_input(false, 1, &[], &hello(CLUSTER.0, 1, 3))),
            ("sealed-huge-length", frame_input(true, 0, &[], &huge)),
            ("body-over-small-maximum", frame_input(false, 3, &[], &large)),
            ("http-garbage", frame_input(false, 0, &[1], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")),
        ]
    }

    /// One snapshot-stream message of every kind (a chunk with data and an empty one, a refusal
    /// for every reason); the offer carries a Raft `Snapshot` message with empty data, as a
    /// leader's node sends it.
    fn snapshot_stream_seeds() -> Vec<(&'static str, Vec<u8>)> {
        let id = StreamId { group: GroupId(7), index: LogIndex(9), term: Term(2) };
        let snapshot = Snapshot {
            meta: SnapshotMeta { index: id.index, term: id.term, membership: membership() },
            data: Bytes::new(),
        };
        let mut raft = Vec::new();
        codec::encode(&message(1, 2, MessageBody::Snapshot { snapshot }), &mut raft);
        let messages = [
            (
                "offer",
                StreamMessage::Offer {
                    id,
                    file_len: 70_000,
                    file_crc: 0x1234_5678,
                    raft: Bytes::from(raft),
                },
            ),
            ("resume", StreamMessage::Resume { id, offset: 4096 }),
            (
                "chunk",
                StreamMessage::Chunk { id, offset: 4096, data: Bytes::from_static(b"file bytes") },
            ),
            ("chunk-empty", StreamMessage::Chunk { id, offset: 70_000, data: Bytes::new() }),
            ("installed", StreamMessage::Installed { id }),
            ("refused-storage", StreamMessage::Refused { id, reason: RefuseReason::Storage }),
            ("refused-corrupt", StreamMessage::Refused { id, reason: RefuseReason::Corrupt }),
            (
                "refused-unknown-group",
                StreamMessage::Refused { id, reason: RefuseReason::UnknownGroup },
            ),
        ];
        messages
            .into_iter()
            .map(|(name, message)| {
                let mut out = Vec::new();
                message.encode(&mut out);
                (name, out)
            })
            .collect()
    }

    /// A `kv_command` input: flags, payload length, payload, image.
    fn kv_input(flags: u8, payload: &[u8], image: &[u8]) -> Vec<u8> {
        let len = u16::try_from(payload.len()).expect("a short payload");
        [&[flags][..], &len.to_le_bytes(), payload, image].concat()
    }

    fn kv_command_seeds() -> Vec<(&'static str, Vec<u8>)> {
        let key = |k: &'static [u8]| Bytes::from_static(k);
        let populated = populated_kv().snapshot().to_bytes();
        let empty = KvStateMachine::new(KV_CONFIG).snapshot().to_bytes();
        let put = proposal(2_000, session(1, 3, Command::Put { key: key(b"a"), value: key(b"2") }));
        let cas = proposal(
            2_100,
            session(
                9,
                2,
                Command::CompareAndSet {
                    key: key(b"b"),
                    expected: Some(key(b"x")),
                    new: Some(key(b"y")),
                },
            ),
        );
        let delete = proposal(2_200, Request::Unsessioned(Command::Delete { key: key(b"c\0") }));
        let range = Query::Range { start: key(b"a"), end: Some(key(b"c")), limit: 1 }.to_bytes();
        let get = Query::Get { key: key(b"a") }.to_bytes();
        // A body that parses but keys out of order; sealed by the check, so its header is raw.
        let mut unordered = vec![0u8; HEADER_LEN];
        unordered[12..20].copy_from_slice(&5u64.to_le_bytes()); // applied index
        unordered[20..28].copy_from_slice(&100u64.to_le_bytes()); // now
        unordered[44..52].copy_from_slice(&2u64.to_le_bytes()); // entries
        unordered[52..60].copy_from_slice(&1u64.to_le_bytes()); // sessions
        for key in [b"b", b"a"] {
            unordered.extend_from_slice(&1u32.to_le_bytes());
            unordered.extend_from_slice(key);
            unordered.extend_from_slice(&0u32.to_le_bytes());
        }
        unordered.extend_from_slice(&3u64.to_le_bytes());
        unordered.extend_from_slice(&50u64.to_le_bytes());
        unordered.extend_from_slice(&[1]);
        unordered.extend_from_slice(&2u64.to_le_bytes());
        unordered.extend_from_slice(&[4, 1]);
        unordered.extend_from_slice(&1u32.to_le_bytes());
        unordered.extend_from_slice(b"z");
        vec![
            ("put-restore-populated", kv_input(4, &put, &populated)),
            ("register-restore-empty", kv_input(0, &proposal(5, Request::RegisterSession), &empty)),
            ("cas-sealed-populated-image", kv_input(1 | 4, &cas, &populated)),
            ("delete-as-membership-entry", kv_input(2 << 3 | 4, &delete, &populated)),
            (
                "stale-sequence",
                kv_input(
                    4,
                    &proposal(3_000, session(2, 1, Command::Delete { key: key(b"a") })),
                    b"",
                ),
            ),
            (
                "keep-alive-foreign-limits",
                kv_input(
                    4,
                    &proposal(9, Request::KeepAlive { client_id: 2 }),
                    &KvStateMachine::default().snapshot().to_bytes(),
                ),
            ),
            (
                "close-session-truncated-image",
                kv_input(
                    4,
                    &proposal(9, Request::CloseSession { client_id: 1 }),
                    &populated[..populated.len() - 3],
                ),
            ),
            ("query-range", kv_input(4, &range, &populated[..HEADER_LEN])),
            ("query-get-sealed-raw-limits", kv_input(1 | 2 | 4, &get, &populated)),
            ("sealed-keys-out-of-order", kv_input(1, &put, &unordered)),
        ]
    }

    #[test]
    #[ignore = "writes the seed corpus into fuzz/corpus"]
    fn write_seeds() {
        let seeds = [
            ("transport_frame", transport_frame_seeds()),
            ("raft_message", raft_message_seeds()),
            ("snapshot_stream", snapshot_stream_seeds()),
            ("kv_command", kv_command_seeds()),
        ];
        for (target, files) in seeds {
            let dir = fuzz_dir().join("corpus").join(target);
            std::fs::create_dir_all(&dir).expect("the corpus directory");
            for (name, data) in files {
                std::fs::write(dir.join(name), data).expect("a seed file");
            }
        }
    }
}

//! S11 (TESTING.md): hostile and broken transport input — oversized, truncated, garbage and slow
//! frames, wrong cluster id, unknown node. Each must end in the right typed error (connection
//! refused or closed) or in a wait for more bytes, with under 1 MiB allocated per bad connection
//! and nothing handed to Raft. The allocation figure is measured, not estimated: this test binary
//! counts the heap bytes live on each thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeSet;

use bytes::BytesMut;
use flotilla::raftgroup::{Message, MessageBody, NodeId, Term};
use flotilla::transport::ClusterId;
use flotilla::transport::batch::{self, BatchError};
use flotilla::transport::frame::{
    self, BODY_BYTES_MAX_DEFAULT, DecoderConfig, FrameDecoder, FrameError, FrameHeader, FrameKind,
    HEADER_BYTES,
};
use flotilla::transport::handshake::{
    Handshake, HandshakeError, Identity, RejectReason, Session, Verdict,
};
use flotilla::wal::GroupId;

const ONE_MIB: usize = 1 << 20;
const CLUSTER: ClusterId = ClusterId(0xF107);

// ---- a heap counter per thread -------------------------------------------------------------

/// The system allocator, counting live and peak bytes per thread (tests run on many threads; a
/// thread's own figures are unaffected by the others).
struct Counting;

thread_local! {
    static LIVE_BYTES: Cell<isize> = const { Cell::new(0) };
    static PEAK_BYTES: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    // `try_with`: the allocator also runs while a thread's locals are being torn down.
    let _ = LIVE_BYTES.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK_BYTES.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call forwards to `System` with the caller's arguments unchanged; counting only
// touches const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` shares.
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            count(layout.size().cast_signed());
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: `pointer` came from this allocator, i.e. from `System`, with `layout`.
        unsafe { System.dealloc(pointer, layout) };
        count(-layout.size().cast_signed());
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`, and the caller upholds `realloc`'s contract on `new_size`.
        let new_pointer = unsafe { System.realloc(pointer, layout, new_size) };
        if !new_pointer.is_null() {
            count(new_size.cast_signed() - layout.size().cast_signed());
        }
        new_pointer
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result and the most heap it held live at once, in bytes, on top of
/// what the thread held before.
fn peak_heap_bytes<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let baseline = LIVE_BYTES.with(Cell::get);
    PEAK_BYTES.with(|peak| peak.set(baseline));
    let result = f();
    let peak = PEAK_BYTES.with(Cell::get);
    (result, (peak - baseline).unsigned_abs())
}

// ---- helpers -------------------------------------------------------------------------------

fn identity(node: u64) -> Identity {
    Identity { cluster: CLUSTER, node: NodeId(node) }
}

fn members() -> BTreeSet<NodeId> {
    (1..=5).map(NodeId).collect()
}

fn data_header(source: u64, target: u64) -> FrameHeader {
    FrameHeader {
        kind: FrameKind::Data,
        cluster: CLUSTER,
        source: NodeId(source),
        target: NodeId(target),
    }
}

/// A valid header (checksum included) claiming a body of `len` bytes, with no body.
fn header_claiming(header: &FrameHeader, len: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    frame::encode(header, &[], &mut bytes, 0).unwrap();
    bytes.truncate(HEADER_BYTES);
    bytes[32..36].copy_from_slice(&len.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..36]);
    bytes[36..40].copy_from_slice(&crc.to_le_bytes());
    bytes
}

/// An established session of node 2 with node 1 (both ends, through a real handshake).
fn sessions() -> (Session, Session) {
    let mut hello = Vec::new();
    let mut client = Handshake::initiate(identity(1), NodeId(2), &mut hello);
    let mut server = Handshake::accept(identity(2), members());
    let mut answer = Vec::new();
    server.on_bytes(&mut BytesMut::from(&hello[..]), &mut answer).unwrap();
    client.on_bytes(&mut BytesMut::from(&answer[..]), &mut Vec::new()).unwrap();
    (client.into_session().unwrap(), server.into_session().unwrap())
}

fn message(term: u64) -> Message {
    Message { from: NodeId(1), to: NodeId(2), term: Term(term), body: MessageBody::TimeoutNow }
}

/// What the engine's receive path does with a connection's bytes: a frame's messages reach Raft
/// only if the frame and its whole batch verify. Returns the messages handed over and the error
/// that closed the connection, if any.
fn receive(
    session: &mut Session,
    input: &mut BytesMut,
) -> (Vec<(GroupId, Message)>, Option<String>) {
    let mut stepped = Vec::new();
    let mut batch = Vec::new();
    loop {
        match session.decode(input) {
            Ok(Some(frame)) => match batch::decode(&frame.body, &mut batch) {
                Ok(()) => stepped.append(&mut batch),
                Err(error) => return (stepped, Some(error.to_string())),
            },
            Ok(None) => return (stepped, None),
            Err(error) => return (stepped, Some(error.to_string())),
        }
    }
}

// ---- S11 cases -----------------------------------------------------------------------------

#[test]
fn an_oversized_length_is_refused_at_the_header_before_any_allocation() {
    for len in [BODY_BYTES_MAX_DEFAULT + 1, u32::MAX] {
        let bytes = header_claiming(&data_header(1, 2), len);
        let mut input = BytesMut::from(&bytes[..]);
        let capacity_before = input.capacity();
        let (result, peak) = peak_heap_bytes(|| {
            FrameDecoder::new(DecoderConfig::new(CLUSTER, NodeId(2))).decode(&mut input)
        });
        assert_eq!(
            result,
            Err(FrameError::TooLarge { len: u64::from(len), max: BODY_BYTES_MAX_DEFAULT })
        );
        assert_eq!(input.capacity(), capacity_before, "nothing reserved for the claimed body");
        assert!(peak < 1024, "decoding a bad header allocated {peak} bytes");
    }
}

#[test]
fn a_slow_bad_connection_claiming_a_huge_frame_stays_under_one_mib() {
    let (_, mut server) = sessions();
    let claimed_bytes = BODY_BYTES_MAX_DEFAULT;
    let mut input = BytesMut::new();
    let ((), peak) = peak_heap_bytes(|| {
        input.extend_from_slice(&header_claiming(&data_header(1, 2), claimed_bytes));
        assert_eq!(server.decode(&mut input), Ok(None));
        // A quarter MiB of body, one byte at a time, then the sender stalls.
        for _ in 0..(256 << 10) {
            input.extend_from_slice(&[0xAB]);
            assert_eq!(server.decode(&mut input), Ok(None));
            assert!(input.capacity() < ONE_MIB, "buffer capacity {}", input.capacity());
        }
    });
    assert!(peak < ONE_MIB, "a stalled 16 MiB claim held {peak} bytes after 256 KiB");
    assert!(peak >= 256 << 10, "the counter sees the received bytes ({peak})");
    assert!(matches!(server.on_eof(&input), Err(FrameError::Truncated { .. })));
}

#[test]
fn before_the_handshake_even_an_allowed_frame_size_is_too_large() {
    // An unauthenticated peer may not make this node buffer more than a handshake's bytes.
    let mut hello =
        header_claiming(&FrameHeader { kind: FrameKind::Handshake, ..data_header(1, 2) }, 1 << 20);
    hello.extend_from_slice(&[0; 4096]);
    let mut server = Handshake::accept(identity(2), members());
    let mut answer = Vec::new();
    let (verdict, peak) =
        peak_heap_bytes(|| server.on_bytes(&mut BytesMut::from(&hello[..]), &mut answer));
    assert!(matches!(
        verdict,
        Some(Verdict::Rejected(HandshakeError::Frame(FrameError::TooLarge { len: 1_048_576, .. })))
    ));
    assert!(answer.is_empty());
    assert!(peak < 16 << 10, "peak {peak} bytes, mostly the copy of the input");
}

#[test]
fn truncated_frames_wait_then_fail_at_end_of_stream() {
    let (client, mut server) = sessions();
    let mut wire = Vec::new();
    let start = frame::begin(&mut wire);
    batch::encode([(GroupId(1), &message(3)), (GroupId(2), &message(4))], &mut wire);
    client.finish(&mut wire, start).unwrap();
    for len in 0..wire.len() {
        let mut decoder = FrameDecoder::new(DecoderConfig::new(CLUSTER, NodeId(2)));
        let mut input = BytesMut::from(&wire[..len]);
        assert_eq!(decoder.decode(&mut input), Ok(None), "prefix of {len} bytes");
        let expected =
            if len == 0 { Ok(()) } else { Err(FrameError::Truncated { buffered: len as u64 }) };
        assert_eq!(decoder.on_eof(&input), expected);
    }
    let mut input = BytesMut::from(&wire[..]);
    let (stepped, error) = receive(&mut server, &mut input);
    assert_eq!((stepped.len(), error), (2, None));
}

#[test]
fn garbage_is_refused_on_its_first_bytes() {
    let garbage: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        &[0; 64],
    ];
    for bytes in garbage {
        let mut server = Handshake::accept(identity(2), members());
        let mut answer = Vec::new();
        // Four bytes are enough to see it is not a Flotilla peer.
        let verdict = server.on_bytes(&mut BytesMut::from(&bytes[..4]), &mut answer);
        assert!(
            matches!(
                verdict,
                Some(Verdict::Rejected(HandshakeError::Frame(FrameError::BadMagic { .. })))
            ),
            "{verdict:?}"
        );
        assert!(answer.is_empty(), "garbage gets no answer");
    }
    // Right magic and version, garbage after: the header checksum catches it.
    let mut bytes = b"FLTF\x01\x00".to_vec();
    bytes.extend_from_slice(&[0x5A; 60]);
    let mut server = Handshake::accept(identity(2), members());
    assert!(matches!(
        server.on_bytes(&mut BytesMut::from(&bytes[..]), &mut Vec::new()),
        Some(Verdict::Rejected(HandshakeError::Frame(FrameError::HeaderChecksum { .. })))
    ));
}

#[test]
fn a_valid_header_with_a_bad_body_checksum_reaches_no_replica() {
    let (client, mut server) = sessions();
    let mut wire = Vec::new();
    let mut body = Vec::new();
    batch::encode([(GroupId(1), &message(3))], &mut body);
    client.encode(&body, &mut wire).unwrap();
    let good = wire.clone();
    let body_crc_offset = wire.len() - 1;
    wire[body_crc_offset] ^= 0x01;
    wire.extend_from_slice(&good); // a good frame after the bad one is never reached
    let (stepped, error) = receive(&mut server, &mut BytesMut::from(&wire[..]));
    assert!(stepped.is_empty());
    assert!(error.unwrap().contains("body checksum"));
    // The same for a body that verifies but whose batch does not decode.
    let (client, mut server) = sessions();
    let mut wire = Vec::new();
    let mut body = Vec::new();
    batch::encode([(GroupId(1), &message(3)), (GroupId(2), &message(4))], &mut body);
    *body.last_mut().unwrap() = 0xEE; // the second message's tag
    client.encode(&body, &mut wire).unwrap();
    let (stepped, error) = receive(&mut server, &mut BytesMut::from(&wire[..]));
    assert!(stepped.is_empty(), "the first message of a bad batch is not stepped either");
    assert!(error.unwrap().contains("message 1 (group 2)"));
    let mut out = Vec::new();
    assert!(matches!(batch::decode(&body, &mut out), Err(BatchError::Message { item: 1, .. })));
}

#[test]
fn a_wrong_cluster_id_is_refused_at_the_frame_and_at_the_handshake() {
    let (_, mut server) = sessions();
    let mut wire = Vec::new();
    let foreign = FrameHeader { cluster: ClusterId(1), ..data_header(1, 2) };
    frame::encode(&foreign, &[0, 0, 0, 0], &mut wire, BODY_BYTES_MAX_DEFAULT).unwrap();
    assert_eq!(
        server.decode(&mut BytesMut::from(&wire[..])),
        Err(FrameError::WrongCluster { expected: CLUSTER, found: ClusterId(1) })
    );
    let mut hello = Vec::new();
    let foreign = Identity { cluster: ClusterId(1), node: NodeId(1) };
    let mut client = Handshake::initiate(foreign, NodeId(2), &mut hello);
    let mut server = Handshake::accept(identity(2), members());
    let mut answer = Vec::new();
    assert_eq!(
        server.on_bytes(&mut BytesMut::from(&hello[..]), &mut answer),
        Some(Verdict::Rejected(HandshakeError::ForeignCluster {
            expected: CLUSTER,
            found: ClusterId(1)
        }))
    );
    assert_eq!(
        client.on_bytes(&mut BytesMut::from(&answer[..]), &mut Vec::new()),
        Some(Verdict::Rejected(HandshakeError::Rejected(RejectReason::ForeignCluster {
            cluster: CLUSTER
        })))
    );
}

#[test]
fn an_unknown_node_is_refused_and_its_data_never_read() {
    let mut wire = Vec::new();
    let mut client = Handshake::initiate(identity(42), NodeId(2), &mut wire);
    // The stranger pipelines data right behind its hello.
    frame::encode(&data_header(42, 2), &[0, 0, 0, 0], &mut wire, BODY_BYTES_MAX_DEFAULT).unwrap();
    let mut server = Handshake::accept(identity(2), members());
    let mut input = BytesMut::from(&wire[..]);
    let mut answer = Vec::new();
    assert_eq!(
        server.on_bytes(&mut input, &mut answer),
        Some(Verdict::Rejected(HandshakeError::UnknownNode { node: NodeId(42) }))
    );
    assert!(server.into_session().is_err(), "no session, so the pipelined frame is never decoded");
    assert_eq!(
        client.on_bytes(&mut BytesMut::from(&answer[..]), &mut Vec::new()),
        Some(Verdict::Rejected(HandshakeError::Rejected(RejectReason::UnknownNode {
            node: NodeId(42)
        })))
    );
}

#[test]
fn a_slow_sender_one_byte_at_a_time_gets_through() {
    let mut hello = Vec::new();
    let mut client = Handshake::initiate(identity(1), NodeId(2), &mut hello);
    let mut server = Handshake::accept(identity(2), members());
    let mut input = BytesMut::new();
    let mut answer = Vec::new();
    let mut verdict = None;
    for byte in &hello {
        assert!(verdict.is_none(), "a verdict before the whole hello");
        input.extend_from_slice(&[*byte]);
        verdict = server.on_bytes(&mut input, &mut answer);
    }
    assert_eq!(verdict, Some(Verdict::Accepted { peer: NodeId(1) }));
    let mut client_input = BytesMut::new();
    let mut client_verdict = None;
    for byte in &answer {
        client_input.extend_from_slice(&[*byte]);
        client_verdict = client.on_bytes(&mut client_input, &mut Vec::new());
    }
    assert_eq!(client_verdict, Some(Verdict::Accepted { peer: NodeId(2) }));
    let client = client.into_session().unwrap();
    let mut server = server.into_session().unwrap();
    let mut wire = Vec::new();
    for term in 1..=3 {
        let mut body = Vec::new();
        batch::encode([(GroupId(term), &message(term))], &mut body);
        client.encode(&body, &mut wire).unwrap();
    }
    let mut stepped = Vec::new();
    for byte in &wire {
        input.extend_from_slice(&[*byte]);
        let (mut messages, error) = receive(&mut server, &mut input);
        assert_eq!(error, None);
        stepped.append(&mut messages);
    }
    let terms: Vec<u64> = stepped.iter().map(|(_, message)| message.term.0).collect();
    assert_eq!(terms, [1, 2, 3]);
    assert_eq!(server.on_eof(&input), Ok(()));
}

// ---- fuzz-style ----------------------------------------------------------------------------

/// SplitMix64: a tiny seeded generator, so every run sees the same inputs and a failure replays.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next_u64() % bound as u64) as usize
    }
}

/// One input: pure noise, or a valid stream (handshake then data frames) damaged in a few places,
/// so that the fuzzing gets past the magic and the checksums, where the interesting code is.
fn fuzz_input(rng: &mut SplitMix64, valid: &[u8]) -> Vec<u8> {
    if rng.below(2) == 0 {
        let len = rng.below(257);
        return (0..len).map(|_| rng.next_u64() as u8).collect();
    }
    let mut bytes = valid[..rng.below(valid.len() + 1)].to_vec();
    for _ in 0..rng.below(4) {
        if bytes.is_empty() {
            break;
        }
        let at = rng.below(bytes.len());
        match rng.below(3) {
            0 => bytes[at] ^= 1 << rng.below(8),
            1 => bytes[at] = rng.next_u64() as u8,
            _ => bytes.insert(at, rng.next_u64() as u8),
        }
    }
    bytes
}

#[test]
fn a_hundred_thousand_random_inputs_never_panic_and_stay_bounded() {
    // The valid stream the mutations start from: a hello, then two data frames.
    let mut valid = Vec::new();
    Handshake::initiate(identity(1), NodeId(2), &mut valid);
    let header = data_header(1, 2);
    for term in 0..2 {
        let start = frame::begin(&mut valid);
        batch::encode([(GroupId(9), &message(term)), (GroupId(10), &message(term))], &mut valid);
        frame::finish(&header, &mut valid, start, BODY_BYTES_MAX_DEFAULT).unwrap();
    }
    let mut valid_batch = Vec::new();
    batch::encode([(GroupId(9), &message(1)), (GroupId(10), &message(2))], &mut valid_batch);
    let mut rng = SplitMix64(0x5EED_0011);
    // Accepted handshakes, messages stepped, mutated batch bodies that still decoded.
    let mut outcomes = [0usize; 3];
    let mut batch_out = Vec::new();
    for _ in 0..100_000 {
        let input = fuzz_input(&mut rng, &valid);
        // 1. A connection: the handshake, then a session, fed in random pieces.
        let mut server = Handshake::accept(identity(2), members());
        let mut buffer = BytesMut::new();
        let mut answer = Vec::new();
        let mut session: Option<Session> = None;
        let mut offset = 0;
        while offset < input.len() {
            let piece = 1 + rng.below(input.len() - offset);
            buffer.extend_from_slice(&input[offset..offset + piece]);
            offset += piece;
            if session.is_none() {
                match server.on_bytes(&mut buffer, &mut answer) {
                    Some(Verdict::Accepted { .. }) => {
                        outcomes[0] += 1;
                        session = Some(server.clone().into_session().unwrap());
                    }
                    Some(Verdict::Rejected(_)) => break,
                    None => {}
                }
            }
            if let Some(session) = &mut session {
                let (stepped, error) = receive(session, &mut buffer);
                outcomes[1] += stepped.len();
                if error.is_some() {
                    break;
                }
            }
            assert!(buffer.capacity() < ONE_MIB, "capacity {}", buffer.capacity());
        }
        // 2. The whole input as exactly one frame, and incrementally as a stream of frames.
        if let Ok(frame) = frame::decode_exact(&input, DecoderConfig::any()) {
            assert!(frame.body.len() <= input.len());
        }
        let mut decoder = FrameDecoder::new(DecoderConfig::any());
        let mut whole = BytesMut::from(&input[..]);
        while let Ok(Some(_)) = decoder.decode(&mut whole) {}
        // 3. Batch bodies: noise, and a valid batch damaged in a few places.
        let _ = batch::decode(&input, &mut batch_out);
        if batch::decode(&fuzz_input(&mut rng, &valid_batch), &mut batch_out).is_ok() {
            outcomes[2] += 1;
        }
    }
    // The damage leaves enough inputs intact that every layer is reached.
    println!("accepted handshakes, stepped messages, intact batches: {outcomes:?}");
    assert!(outcomes.iter().all(|&count| count > 100), "{outcomes:?}");
}

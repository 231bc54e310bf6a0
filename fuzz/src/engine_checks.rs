// The checks shared by the engine's fuzz targets (`fuzz/src/engine.rs`) and the corpus replay
// under `cargo test -p flotilla` (`engine/tests/fuzz_corpus.rs`): both `include!` this one file,
// so they cannot drift apart. Items only; self-contained (its own byte `Cursor`) because it sits
// in a module there and at the crate root here.

use std::cell::RefCell;
use std::collections::BTreeSet;

use bytes::{Bytes, BytesMut};
use flotilla::kv::snapshot::{HEADER_LEN, MAGIC, SNAPSHOT_VERSION};
use flotilla::kv::{
    ApplyError, Command, KvConfig, KvStateMachine, Proposal, Query, QueryResult, Reply, Request,
    SessionCommand, SnapshotImage, StateMachine,
};
use flotilla::transport::ClusterId;
use flotilla::transport::batch::{self, RawItems};
use flotilla::transport::frame::{
    self, DecoderConfig, Frame, FrameDecoder, FrameError, FrameHeader, FrameKind, HEADER_BYTES,
    RESERVE_BYTES_MAX, TRAILER_BYTES,
};
use flotilla::transport::handshake::{
    HANDSHAKE_BODY_BYTES_MAX, Handshake, HandshakeError, Identity, RejectReason, Verdict,
};
use flotilla::transport::snapshot::{PREFIX_BYTES, StreamError, StreamMessage};
use flotilla::wal::GroupId;
use flotilla_raftgroup::codec;
use flotilla_raftgroup::{Entry, EntryKind, LogIndex, Message, MessageBody, NodeId, Term};

/// Reads a fuzz input front to back; past its end every read yields zeros (or nothing), so any
/// byte string is a valid input.
pub struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { data }
    }

    /// The next `n` bytes, or as many as are left.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// The next byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    /// The next 2 bytes, little-endian (zero-padded past the end).
    pub fn u16(&mut self) -> u16 {
        let mut bytes = [0u8; 2];
        let taken = self.take(2);
        bytes[..taken.len()].copy_from_slice(taken);
        u16::from_le_bytes(bytes)
    }
}

/// Whether `part` lies inside `whole`'s memory: a zero-copy slice of it.
fn is_slice_of(part: &[u8], whole: &[u8]) -> bool {
    let range = whole.as_ptr_range();
    part.is_empty() || (range.start <= part.as_ptr() && part.as_ptr_range().end <= range.end)
}

// ---- transport_frame ---------------------------------------------------------------------------

/// The cluster of every node driven here.
const CLUSTER: ClusterId = ClusterId(7);
/// The acceptor (and the target a node's decoder checks).
const LOCAL: NodeId = NodeId(2);
/// The members the acceptor lets in.
const MEMBERS: [u64; 3] = [1, 2, 3];
/// The initiator driven over the same bytes: node 1 of `CLUSTER`, dialling `LOCAL`.
const DIALLER: NodeId = NodeId(1);

/// S11: a connection that has not completed its handshake holds less than this much buffer.
pub const UNAUTHENTICATED_BUFFER_MAX: usize = 1 << 20;

fn local() -> Identity {
    Identity { cluster: CLUSTER, node: LOCAL }
}

fn members() -> BTreeSet<NodeId> {
    MEMBERS.into_iter().map(NodeId).collect()
}

/// The decoder configurations a `transport_frame` input can pick (flags bits 1–2).
fn decoder_config(choice: u8) -> DecoderConfig {
    match choice & 3 {
        0 => DecoderConfig::any(),
        1 => DecoderConfig::new(CLUSTER, LOCAL),
        2 => DecoderConfig {
            source: Some(DIALLER),
            kind: Some(FrameKind::Data),
            ..DecoderConfig::new(CLUSTER, LOCAL)
        },
        _ => DecoderConfig { body_bytes_max: 64, ..DecoderConfig::any() },
    }
}

/// A piece size from one input byte: 1–128 bytes, or 64–8,192 in steps of 64.
fn piece_size(byte: u8) -> usize {
    if byte < 128 { usize::from(byte) + 1 } else { usize::from(byte - 127) * 64 }
}

/// `stream` cut into pieces of the sizes in `sizes`, cycling; one piece if `sizes` is empty.
fn pieces<'a>(stream: &'a [u8], sizes: &'a [usize]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut rest = stream;
    let mut next = 0;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let size = if sizes.is_empty() { rest.len() } else { sizes[next % sizes.len()] };
        next += 1;
        let (piece, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        Some(piece)
    })
}

/// Rewrites the header and body checksums of every frame in `stream` (as far as the lengths
/// lead), so that the fuzzer reaches the bodies without solving CRC-32.
pub fn seal_frames(stream: &mut [u8]) {
    let mut at = 0;
    while stream.len() - at >= HEADER_BYTES {
        let header_crc = crc32fast::hash(&stream[at..at + 36]);
        stream[at + 36..at + HEADER_BYTES].copy_from_slice(&header_crc.to_le_bytes());
        let mut len = [0; 4];
        len.copy_from_slice(&stream[at + 32..at + 36]);
        let body_start = at + HEADER_BYTES;
        let Some(body_end) = body_start.checked_add(u32::from_le_bytes(len) as usize) else {
            return;
        };
        if body_end.saturating_add(TRAILER_BYTES) > stream.len() {
            return;
        }
        let mut hasher = crc32fast::Hasher::new_with_initial(header_crc);
        hasher.update(&stream[body_start..body_end]);
        stream[body_end..body_end + TRAILER_BYTES]
            .copy_from_slice(&hasher.finalize().to_le_bytes());
        at = body_end + TRAILER_BYTES;
    }
}

/// What a [`FrameDecoder`] made of a whole stream.
#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    frames: Vec<Frame>,
    error: Option<FrameError>,
    eof: Result<(), FrameError>,
}

/// The bound on a read buffer that a decoder may grow by reserving at most `reserve_max` bytes
/// ahead, after `fed` bytes were appended to it: `BytesMut` at most doubles what it needs, or
/// allocates its original capacity (at most 64 KiB) again.
fn buffer_bound(fed: usize, reserve_max: usize) -> usize {
    2 * (fed + reserve_max) + (64 << 10)
}

/// Feeds `stream` to a decoder in pieces, taking every frame out as soon as it is whole.
fn run_decoder(config: DecoderConfig, stream: &[u8], sizes: &[usize]) -> Decoded {
    let mut decoder = FrameDecoder::new(config);
    let mut input = BytesMut::new();
    let mut frames = Vec::new();
    let mut error = None;
    let mut fed = 0;
    'feed: for piece in pieces(stream, sizes) {
        input.extend_from_slice(piece);
        fed += piece.len();
        loop {
            match decoder.decode(&mut input) {
                Ok(Some(frame)) => {
                    assert!(frame.body.len() <= config.body_bytes_max as usize);
                    frames.push(frame);
                }
                Ok(None) => break,
                Err(failure) => {
                    assert!(decoder.has_failed());
                    let len = input.len();
                    assert_eq!(decoder.decode(&mut input), Err(failure.clone()), "errors stick");
                    assert_eq!(input.len(), len, "a failed decoder consumes nothing");
                    error = Some(failure);
                    break 'feed;
                }
            }
        }
        assert!(
            input.capacity() <= buffer_bound(fed, RESERVE_BYTES_MAX),
            "read buffer of {} bytes after {fed} bytes received",
            input.capacity()
        );
    }
    let eof = decoder.on_eof(&input);
    Decoded { frames, error, eof }
}

/// A batch body decodes whole or not at all, agrees with its raw items, and re-encodes to itself.
fn check_batch(body: &[u8]) {
    let filler =
        Message { from: NodeId(0), to: NodeId(0), term: Term(0), body: MessageBody::TimeoutNow };
    let mut messages = vec![(GroupId(0), filler)];
    let result = batch::decode(body, &mut messages);
    let raw: Result<Vec<(GroupId, &[u8])>, _> = RawItems::new(body).and_then(Iterator::collect);
    if result.is_err() {
        assert!(messages.is_empty(), "a refused batch yields no message");
        return;
    }
    let raw = raw.expect("the raw items of a decoded batch are whole");
    assert_eq!(raw.len(), messages.len());
    for ((group, bytes), (decoded_group, message)) in raw.iter().zip(&messages) {
        assert_eq!(group, decoded_group);
        assert_eq!(codec::decode(bytes).as_ref(), Ok(message));
    }
    let mut again = Vec::new();
    let count =
        batch::encode(messages.iter().map(|(group, message)| (*group, message)), &mut again);
    assert_eq!(count as usize, messages.len());
    assert_eq!(again, body, "a batch decodes from one encoding only");
}

/// The frames of `decoded` re-encode to the start of `stream`; their bodies go through
/// [`check_batch`].
fn check_frames(decoded: &Decoded, stream: &[u8], body_bytes_max: u32) {
    let mut again = Vec::new();
    for frame in &decoded.frames {
        frame::encode(&frame.header, &frame.body, &mut again, body_bytes_max)
            .expect("a decoded frame re-encodes");
        check_batch(&frame.body);
    }
    assert_eq!(again, stream[..again.len()], "a frame decodes from one encoding only");
}

/// Drives `handshake` over `pieces` until its verdict (or the end of the stream). Returns the
/// verdict, what it wrote, the bytes left unread and how many bytes were fed.
fn drive_handshake<'a>(
    handshake: &mut Handshake,
    pieces: &mut impl Iterator<Item = &'a [u8]>,
) -> (Verdict, Vec<u8>, BytesMut, usize) {
    let mut input = BytesMut::new();
    let mut out = Vec::new();
    let mut fed = 0;
    loop {
        let Some(piece) = pieces.next() else {
            return (handshake.on_eof(), out, input, fed);
        };
        input.extend_from_slice(piece);
        fed += piece.len();
        if let Some(verdict) = handshake.on_bytes(&mut input, &mut out) {
            assert!(input.capacity() < UNAUTHENTICATED_BUFFER_MAX);
            return (verdict, out, input, fed);
        }
        assert!(out.is_empty(), "nothing is sent before the verdict");
        let reserve = (HANDSHAKE_BODY_BYTES_MAX as usize) + TRAILER_BYTES;
        assert!(
            input.capacity() < UNAUTHENTICATED_BUFFER_MAX
                && input.capacity() <= 2 * (fed + reserve),
            "handshake buffer of {} bytes after {fed} bytes received",
            input.capacity()
        );
    }
}

/// After a verdict, more bytes change nothing and are not read.
fn check_verdict_final(handshake: &mut Handshake, verdict: &Verdict, input: &mut BytesMut) {
    let len = input.len();
    let mut out = Vec::new();
    assert_eq!(handshake.on_bytes(input, &mut out).as_ref(), Some(verdict));
    assert_eq!(handshake.on_eof(), *verdict);
    assert!(out.is_empty());
    if matches!(verdict, Verdict::Rejected(_)) {
        assert_eq!(input.len(), len, "nothing is read after a rejection");
    }
}

/// Feeds the rest of a connection to the session an accepted handshake gives: it takes data
/// frames from `peer` only, each re-encodes to the bytes received and carries a batch (or, in a
/// snapshot frame, a snapshot-stream message).
fn check_session(handshake: Handshake, peer: NodeId, rest: &[u8], sizes: &[usize]) {
    let mut session = handshake.into_session().expect("an accepted handshake gives a session");
    assert_eq!(session.peer(), peer);
    let mut input = BytesMut::new();
    let mut frames = Vec::new();
    let mut fed = 0;
    'feed: for piece in pieces(rest, sizes) {
        input.extend_from_slice(piece);
        fed += piece.len();
        loop {
            match session.decode(&mut input) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(_) => break 'feed,
            }
        }
        assert!(input.capacity() <= buffer_bound(fed, RESERVE_BYTES_MAX));
    }
    let mut again = Vec::new();
    for frame in &frames {
        // After the handshake a connection carries batches or snapshot-stream messages.
        let kind = frame.header.kind;
        assert!(kind != FrameKind::Handshake, "no handshake frame after the handshake");
        let expected = FrameHeader { kind, cluster: CLUSTER, source: peer, target: LOCAL };
        assert_eq!(frame.header, expected, "a session takes only its peer's frames");
        frame::encode(&frame.header, &frame.body, &mut again, session.body_bytes_max())
            .expect("a received body fits");
        if kind == FrameKind::Snapshot {
            check_snapshot_stream(&frame.body);
        } else {
            check_batch(&frame.body);
        }
    }
    assert_eq!(again, rest[..again.len()], "a data frame decodes from one encoding only");
}

/// The acceptor: a hello it accepts is exactly what [`Handshake::initiate`] writes; its answer
/// (accept or reject) is read by the initiator as the same verdict; after the verdict nothing
/// more is read; the buffer stays small throughout.
fn check_acceptor(stream: &[u8], sizes: &[usize]) {
    let mut acceptor = Handshake::accept(local(), members());
    let (verdict, out, mut input, fed) = drive_handshake(&mut acceptor, &mut pieces(stream, sizes));
    let consumed = fed - input.len();
    match &verdict {
        Verdict::Accepted { peer } => {
            assert!(members().contains(peer));
            let mut hello = Vec::new();
            let mut initiator =
                Handshake::initiate(Identity { cluster: CLUSTER, node: *peer }, LOCAL, &mut hello);
            assert_eq!(hello, stream[..consumed], "an accepted hello has one encoding");
            let mut answer = BytesMut::from(&out[..]);
            let mut unused = Vec::new();
            let answered = initiator.on_bytes(&mut answer, &mut unused);
            assert_eq!(answered, Some(Verdict::Accepted { peer: LOCAL }));
            assert!(answer.is_empty() && unused.is_empty());
            check_verdict_final(&mut acceptor, &verdict, &mut input);
            check_session(acceptor, *peer, &stream[consumed..], sizes);
        }
        Verdict::Rejected(error) => {
            check_verdict_final(&mut acceptor, &verdict, &mut input);
            assert!(acceptor.into_session().is_err());
            let answered = matches!(
                error,
                HandshakeError::ForeignCluster { .. }
                    | HandshakeError::UnknownNode { .. }
                    | HandshakeError::WrongTarget { .. }
                    | HandshakeError::UnsupportedProtocol { .. }
            );
            assert_eq!(!out.is_empty(), answered, "a reject is sent for {error:?}");
            if out.is_empty() {
                return;
            }
            // The initiator that sent this hello reads the reason.
            let reply = frame::decode_exact(&out, DecoderConfig::any()).expect("a whole reject");
            assert_eq!(reply.header.kind, FrameKind::Handshake);
            assert_eq!(reply.header.source, LOCAL);
            let dialler = Identity { cluster: reply.header.cluster, node: reply.header.target };
            let mut initiator = Handshake::initiate(dialler, LOCAL, &mut Vec::new());
            let mut unused = Vec::new();
            let reason = match initiator.on_bytes(&mut BytesMut::from(&out[..]), &mut unused) {
                Some(Verdict::Rejected(HandshakeError::Rejected(reason))) => reason,
                other => panic!("the initiator read {other:?} from the reject for {error:?}"),
            };
            let agrees = matches!(
                (error, reason),
                (HandshakeError::ForeignCluster { .. }, RejectReason::ForeignCluster { cluster })
                    if cluster == CLUSTER
            ) || matches!(
                (error, reason),
                (HandshakeError::UnknownNode { node }, RejectReason::UnknownNode { node: named })
                    if *node == named
            ) || matches!(
                (error, reason),
                (HandshakeError::WrongTarget { .. }, RejectReason::WrongTarget { node })
                    if node == LOCAL
            ) || matches!(
                (error, reason),
                (
                    HandshakeError::UnsupportedProtocol { .. },
                    RejectReason::UnsupportedProtocol { .. }
                )
            );
            assert!(agrees, "acceptor error {error:?} sent as {reason:?}");
        }
    }
}

/// The initiator (node 1 dialling node 2) reading the same bytes as an answer: it sends nothing
/// more, and an answer it accepts is exactly what an acceptor writes.
fn check_initiator(stream: &[u8], sizes: &[usize]) {
    let mut hello = Vec::new();
    let mut initiator =
        Handshake::initiate(Identity { cluster: CLUSTER, node: DIALLER }, LOCAL, &mut hello);
    let (verdict, out, mut input, fed) =
        drive_handshake(&mut initiator, &mut pieces(stream, sizes));
    assert!(out.is_empty(), "the initiator answers nothing");
    check_verdict_final(&mut initiator, &verdict, &mut input);
    if let Verdict::Accepted { peer } = verdict {
        assert_eq!(peer, LOCAL);
        let mut acceptor = Handshake::accept(local(), members());
        let mut accept = Vec::new();
        let accepted = acceptor.on_bytes(&mut BytesMut::from(&hello[..]), &mut accept);
        assert_eq!(accepted, Some(Verdict::Accepted { peer: DIALLER }));
        assert_eq!(accept, stream[..fed - input.len()], "an accepted answer has one encoding");
    }
}

/// Target `transport_frame`. Input: a flags byte (bit 0: rewrite the frames' checksums, see
/// [`seal_frames`]; bits 1–2: the decoder configuration, see [`decoder_config`]; bits 3–5: how
/// many piece sizes follow), the piece sizes ([`piece_size`]), then the stream. The stream goes
/// through `decode_exact`, a [`FrameDecoder`] fed whole and in pieces (same frames, same error),
/// `batch::decode` of every body and of the raw stream, and a handshake on each side. Nothing
/// panics; what decodes re-encodes to the bytes it came from; buffers stay bounded (under 1 MiB
/// before the handshake completes).
pub fn check_transport_frame(data: &[u8]) {
    let mut cursor = Cursor::new(data);
    let flags = cursor.u8();
    let config = decoder_config(flags >> 1);
    let sizes: Vec<usize> =
        cursor.take(usize::from((flags >> 3) & 7)).iter().map(|&byte| piece_size(byte)).collect();
    let mut stream = cursor.take(usize::MAX).to_vec();
    if flags & 1 == 1 {
        seal_frames(&mut stream);
    }

    let whole = run_decoder(config, &stream, &[]);
    let split = run_decoder(config, &stream, &sizes);
    assert_eq!(whole, split, "a stream decodes the same in any pieces");
    check_frames(&whole, &stream, config.body_bytes_max);

    let exact = frame::decode_exact(&stream, config);
    match (whole.frames.first(), &whole.error) {
        (Some(first), _) => {
            let len = frame::frame_bytes(first.body.len());
            if len == stream.len() {
                assert_eq!(exact.as_ref(), Ok(first));
            } else {
                assert_eq!(exact, Err(FrameError::Trailing { len: (stream.len() - len) as u64 }));
            }
        }
        (None, Some(error)) => assert_eq!(exact.as_ref(), Err(error)),
        (None, None) => {
            assert_eq!(exact, Err(FrameError::Truncated { buffered: stream.len() as u64 }));
        }
    }

    check_batch(&stream);
    check_acceptor(&stream, &sizes);
    check_initiator(&stream, &sizes);
}

// ---- raft_message ------------------------------------------------------------------------------

/// The non-empty payloads a message carries (entry payloads, snapshot data).
fn payloads(message: &Message) -> Vec<&Bytes> {
    match &message.body {
        MessageBody::Append { entries, .. } => entries.iter().map(|entry| &entry.payload).collect(),
        MessageBody::Snapshot { snapshot } => vec![&snapshot.data],
        _ => Vec::new(),
    }
}

/// Target `raft_message`: arbitrary bytes through `codec::decode`, `decode_shared` and
/// `decode_membership`. Nothing panics; the two decoders agree, and `decode_shared` slices
/// payloads out of its input; a decoded message re-encodes to exactly its bytes and decodes
/// again to an equal message; membership payloads of entries do the same.
pub fn check_raft_message(data: &[u8]) {
    let decoded = codec::decode(data);
    let input = Bytes::copy_from_slice(data);
    let shared = codec::decode_shared(&input);
    assert_eq!(decoded, shared, "decode and decode_shared agree");
    if let Ok(message) = &shared {
        let mut again = Vec::new();
        codec::encode(message, &mut again);
        assert_eq!(again, data, "a message decodes from one encoding only");
        assert_eq!(codec::decode(&again).as_ref(), Ok(message));
        for payload in payloads(message) {
            assert!(is_slice_of(payload, &input), "decode_shared copied a payload");
        }
        if let MessageBody::Append { entries, .. } = &message.body {
            for entry in entries.iter().filter(|entry| entry.kind == EntryKind::Membership) {
                check_membership(&entry.payload);
            }
        }
    }
    check_membership(data);
}

fn check_membership(bytes: &[u8]) {
    if let Ok(membership) = codec::decode_membership(bytes) {
        let mut again = Vec::new();
        codec::encode_membership(&membership, &mut again);
        assert_eq!(again, bytes, "a membership decodes from one encoding only");
    }
}

// ---- snapshot_stream ---------------------------------------------------------------------------

/// Target `snapshot_stream`: arbitrary bytes as the body of a `FrameKind::Snapshot` frame through
/// `StreamMessage::decode`. Nothing panics and nothing is copied: a message re-encodes to exactly
/// the body, its `id()` is the body's prefix, and an offer's Raft message and a chunk's data are
/// slices of the body; an error fits the bytes (a truncation names the body's length, an unknown
/// tag or refusal reason is the byte read, and the message before trailing bytes decodes). An
/// offer's Raft message, which the receiver decodes with `codec::decode`, goes through
/// [`check_raft_message`].
pub fn check_snapshot_stream(data: &[u8]) {
    let body = Bytes::copy_from_slice(data);
    let message = match StreamMessage::decode(&body) {
        Ok(message) => message,
        Err(StreamError::Truncated { len }) => {
            assert_eq!(len, data.len(), "a truncation names the body's length");
            return;
        }
        Err(StreamError::Tag { tag }) => {
            assert_eq!(data.first(), Some(&tag), "the unknown tag is the first byte");
            assert!(!(1..=5).contains(&tag), "tag {tag} is known");
            assert!(data.len() >= PREFIX_BYTES, "a tag read from a truncated body");
            return;
        }
        Err(StreamError::Reason { code }) => {
            assert_eq!(
                (data.first(), data.get(PREFIX_BYTES)),
                (Some(&5), Some(&code)),
                "a refusal"
            );
            assert!(!(1..=3).contains(&code), "reason {code} is known");
            return;
        }
        Err(StreamError::Trailing { len }) => {
            assert!(0 < len && len < data.len(), "{len} trailing bytes of {}", data.len());
            let head = body.slice(..data.len() - len);
            assert!(StreamMessage::decode(&head).is_ok(), "the message before trailing bytes");
            return;
        }
        // `StreamError` is non-exhaustive: a new variant is a typed error too.
        Err(_) => return,
    };

    let mut again = Vec::new();
    message.encode(&mut again);
    assert_eq!(again, data, "a stream message decodes from one encoding only");
    let id = message.id();
    let prefix = [id.group.0, id.index.0, id.term.0].map(u64::to_le_bytes).concat();
    assert_eq!(prefix, data[1..PREFIX_BYTES], "id() is the encoded prefix");
    match &message {
        StreamMessage::Offer { raft, .. } => {
            assert!(is_slice_of(raft, &body), "decode copied an offer's Raft message");
            check_raft_message(raft);
        }
        StreamMessage::Chunk { data: chunk, .. } => {
            assert!(is_slice_of(chunk, &body), "decode copied a chunk's data");
        }
        _ => {}
    }
}

// ---- kv_command --------------------------------------------------------------------------------

/// Small limits, so that a few entries expire and evict sessions.
pub const KV_CONFIG: KvConfig = KvConfig { session_ttl_ms: 1_000, sessions_max: 4 };

/// Offsets in the snapshot header (see `engine/src/kv/snapshot.rs`).
const SNAPSHOT_CONFIG: std::ops::Range<usize> = 28..44;
const SNAPSHOT_BODY_LEN: usize = 60;
const SNAPSHOT_CRC: usize = 68;

fn proposal(time: u64, request: Request) -> Bytes {
    Proposal { leader_time_ms: time, request }.to_bytes()
}

fn session(client_id: u64, sequence: u64, command: Command) -> Request {
    Request::Session(SessionCommand { client_id, sequence, command })
}

/// A store with keys and a full table of sessions (one expired, one evicted by the next
/// registration) with every kind of cached outcome or none.
pub fn populated_kv() -> KvStateMachine {
    let key = |k: &'static str| Bytes::from_static(k.as_bytes());
    let payloads = [
        proposal(10, Request::RegisterSession),
        proposal(20, Request::RegisterSession),
        proposal(30, session(1, 1, Command::Put { key: key("a"), value: key("1") })),
        proposal(40, Request::Unsessioned(Command::Put { key: key("b"), value: key("") })),
        proposal(
            50,
            session(2, 4, Command::CompareAndSet { key: key("a"), expected: None, new: None }),
        ),
        proposal(60, Request::RegisterSession),
        proposal(900, Request::KeepAlive { client_id: 2 }),
        proposal(950, session(1, 2, Command::Delete { key: key("zz") })),
        // Session 6 expires here.
        proposal(1_100, Request::RegisterSession),
        proposal(1_200, Request::Unsessioned(Command::Put { key: key("c\0"), value: key("3") })),
        proposal(
            1_300,
            session(
                9,
                1,
                Command::CompareAndSet {
                    key: key("b"),
                    expected: Some(key("")),
                    new: Some(key("x")),
                },
            ),
        ),
        // The fourth session: one more registration evicts the least recently active.
        proposal(1_400, Request::RegisterSession),
    ];
    let mut kv = KvStateMachine::new(KV_CONFIG);
    let entries: Vec<Entry> = (1..)
        .zip(payloads)
        .map(|(index, payload)| Entry {
            index: LogIndex(index),
            term: Term(1),
            kind: EntryKind::Normal,
            payload,
        })
        .collect();
    let mut responses = Vec::new();
    kv.apply(&entries, &mut responses);
    kv
}

thread_local! {
    static POPULATED: RefCell<Option<KvStateMachine>> = const { RefCell::new(None) };
}

fn base_kv(populated: bool) -> KvStateMachine {
    if !populated {
        return KvStateMachine::new(KV_CONFIG);
    }
    POPULATED.with(|cell| cell.borrow_mut().get_or_insert_with(populated_kv).clone())
}

/// Makes `raw` a snapshot image that passes the header checks: magic, version, body length,
/// checksum, and (if `config`) this replica's limits. The rest is as read.
pub fn seal_snapshot(raw: &[u8], config: bool) -> Bytes {
    let mut image = raw.to_vec();
    if image.len() < HEADER_LEN {
        image.resize(HEADER_LEN, 0);
    }
    image[..8].copy_from_slice(&MAGIC);
    image[8..12].copy_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    if config {
        let mut limits = KV_CONFIG.session_ttl_ms.to_le_bytes().to_vec();
        limits.extend_from_slice(&(KV_CONFIG.sessions_max as u64).to_le_bytes());
        image[SNAPSHOT_CONFIG].copy_from_slice(&limits);
    }
    let body_len = (image.len() - HEADER_LEN) as u64;
    image[SNAPSHOT_BODY_LEN..SNAPSHOT_CRC].copy_from_slice(&body_len.to_le_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&image[..SNAPSHOT_CRC]);
    hasher.update(&image[HEADER_LEN..]);
    image[SNAPSHOT_CRC..HEADER_LEN].copy_from_slice(&hasher.finalize().to_le_bytes());
    Bytes::from(image)
}

/// A proposal that decodes re-encodes to exactly its bytes, its command to their tail, and its
/// keys and values are slices of the input.
fn check_proposal(payload: &Bytes) {
    let Ok(proposal) = Proposal::decode(payload) else { return };
    assert_eq!(proposal.to_bytes(), *payload, "a proposal decodes from one encoding only");
    let (command, offset) = match &proposal.request {
        Request::Session(SessionCommand { command, .. }) => (command, 1 + 8 + 1 + 8 + 8),
        Request::Unsessioned(command) => (command, 1 + 8 + 1),
        _ => return,
    };
    let mut encoded = Vec::new();
    command.encode(&mut encoded);
    assert_eq!(encoded, payload[offset..], "a command decodes from one encoding only");
    let values: Vec<&Bytes> = match command {
        Command::Put { key, value } => vec![key, value],
        Command::Delete { key } => vec![key],
        Command::CompareAndSet { key, expected, new } => {
            [Some(key), expected.as_ref(), new.as_ref()].into_iter().flatten().collect()
        }
    };
    for value in values {
        assert!(is_slice_of(value, payload), "a proposal copied a key or value");
    }
}

/// A query that decodes re-encodes to exactly its bytes, and a range read of `kv` answers within
/// its bounds and limit, in key order.
fn check_query(payload: &Bytes, kv: &KvStateMachine) {
    let Ok(query) = Query::decode(payload) else { return };
    assert_eq!(query.to_bytes(), *payload, "a query decodes from one encoding only");
    match (&query, kv.query(&query)) {
        (Query::Get { key }, QueryResult::Value(value)) => assert_eq!(value.as_ref(), kv.get(key)),
        (Query::Range { start, end, limit }, QueryResult::Range { entries, more }) => {
            assert!(entries.len() <= *limit as usize);
            assert!(entries.windows(2).all(|pair| pair[0].0 < pair[1].0));
            for (key, value) in &entries {
                assert!(key >= start && end.as_ref().is_none_or(|end| key < end));
                assert_eq!(kv.get(key), Some(value));
            }
            if more {
                assert_eq!(entries.len(), *limit as usize);
            }
        }
        (query, result) => panic!("{query:?} answered with {result:?}"),
    }
}

/// Applies `payload` as the next entry: one response, the applied index moves, the invariants
/// hold, and the new state's snapshot restores to itself.
fn check_apply(kv: &mut KvStateMachine, payload: &Bytes, kind: EntryKind) {
    let Some(index) = kv.applied_index().get().checked_add(1) else { return };
    let entry = Entry { index: LogIndex(index), term: Term(1), kind, payload: payload.clone() };
    let mut responses = Vec::new();
    kv.apply(&[entry], &mut responses);
    assert_eq!(responses.len(), 1);
    assert_eq!(kv.applied_index(), LogIndex(index));
    match (kind, Proposal::decode(payload), &responses[0]) {
        (EntryKind::Normal, Err(error), response) => {
            assert_eq!(response, &Err(ApplyError::Decode(error)));
        }
        (EntryKind::Normal, Ok(_), response) => {
            assert!(!matches!(response, Err(ApplyError::Decode(_)) | Ok(Reply::Skipped)));
        }
        (_, _, response) => assert_eq!(response, &Ok(Reply::Skipped)),
    }
    kv.check_invariants();
    let image = kv.snapshot().to_bytes();
    let mut copy = KvStateMachine::new(KV_CONFIG);
    copy.restore(&image).expect("a snapshot restores");
    assert_eq!(copy.snapshot().to_bytes(), image, "a restored snapshot is the same state");
}

/// Target `kv_command`. Input: a flags byte (bit 0: make the image pass the header checks, see
/// [`seal_snapshot`]; bit 1: but keep the limits as read; bit 2: restore into a populated store
/// rather than an empty one; bits 3–4: the entry kind, 0 and 3 normal), a 2-byte length, that
/// many bytes of entry payload, then the snapshot image. The payload goes through
/// `Proposal::decode` and `Query::decode` (whatever decodes re-encodes to the same bytes) and is
/// applied as an entry; the image is restored: on error the store is unchanged, on success its
/// snapshot is exactly the image, its invariants hold, and it takes the entry.
pub fn check_kv_command(data: &[u8]) {
    let mut cursor = Cursor::new(data);
    let flags = cursor.u8();
    let payload_len = usize::from(cursor.u16());
    let payload = Bytes::copy_from_slice(cursor.take(payload_len));
    let raw_image = cursor.take(usize::MAX);
    let kind = match (flags >> 3) & 3 {
        1 => EntryKind::Empty,
        2 => EntryKind::Membership,
        _ => EntryKind::Normal,
    };
    let image = if flags & 1 == 1 {
        seal_snapshot(raw_image, flags & 2 == 0)
    } else {
        Bytes::copy_from_slice(raw_image)
    };
    let base = base_kv(flags & 4 == 4);

    check_proposal(&payload);
    check_query(&payload, &base);
    check_apply(&mut base.clone(), &payload, kind);

    let mut kv = base.clone();
    let before =
        (kv.snapshot().to_bytes(), kv.applied_index(), kv.now_ms(), kv.len(), kv.session_count());
    match kv.restore(&image) {
        Ok(()) => {
            assert_eq!(kv.snapshot().to_bytes(), image, "a snapshot decodes from one image only");
            kv.check_invariants();
            check_query(&payload, &kv);
            check_apply(&mut kv, &payload, kind);
        }
        Err(_) => {
            let after = (
                kv.snapshot().to_bytes(),
                kv.applied_index(),
                kv.now_ms(),
                kv.len(),
                kv.session_count(),
            );
            assert!(after == before, "a failed restore changed the store");
        }
    }
}

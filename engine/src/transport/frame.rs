//! The frame codec: how bytes on a connection split into verified frames. Pure and total.
//!
//! ```text
//! offset  size  field
//!      0     4  magic          "FLTF" (0x4654_4C46 read little-endian)
//!      4     2  version        1
//!      6     2  flags          bit 0: handshake frame; bit 1: snapshot stream frame;
//!                              other bits (and both together) must be 0
//!      8     8  cluster id
//!     16     8  source node
//!     24     8  target node
//!     32     4  body length    at most the receiver's `body_bytes_max`
//!     36     4  header crc     CRC-32 (IEEE, as crc32fast computes it) of bytes 0..36
//!     40   len  body
//! 40+len     4  body crc       CRC-32 of the body, seeded with the header crc
//! ```
//!
//! All integers are little-endian. The header checksum is verified before the length is used for
//! anything, and the length is checked against the configured maximum before a byte of the body is
//! awaited, so a corrupt or hostile header can neither make the receiver allocate nor make it wait
//! for a body that will never be valid. The body checksum is seeded with the header checksum so a
//! body cannot be spliced under another frame's header.
//!
//! [`FrameDecoder`] takes bytes as they arrive, in pieces of any size (down to one byte at a time),
//! and gives out a [`Frame`] whose body is a zero-copy slice of the read buffer. The buffer grows
//! with the bytes actually received, never with the length a header claims. Any input gives a frame,
//! a request for more bytes, or a typed [`FrameError`] — never a panic. Errors are final: a stream
//! that failed once is out of sync, so the decoder repeats the error and the connection is closed.

use bytes::{Buf, Bytes, BytesMut};
use flotilla_raftgroup::NodeId;
use thiserror::Error;

use super::ClusterId;

/// The first four bytes of every frame.
pub const MAGIC: u32 = u32::from_le_bytes(*b"FLTF");
/// The frame format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Bytes of a frame header, checksum included.
pub const HEADER_BYTES: usize = 40;
/// Bytes after the body: its checksum.
pub const TRAILER_BYTES: usize = 4;
/// The default bound on a frame's body: large enough for a big batch or a snapshot chunk, small
/// enough that one connection cannot hold a shard's memory hostage.
pub const BODY_BYTES_MAX_DEFAULT: u32 = 16 << 20;
/// While a body is arriving, the decoder asks the read buffer for at most this much room beyond
/// what it holds: memory follows the bytes received, not the length claimed.
pub const RESERVE_BYTES_MAX: usize = 64 << 10;

/// Flag bit of a handshake frame.
const FLAG_HANDSHAKE: u16 = 1;
/// Flag bit of a snapshot-stream frame (see [`super::snapshot`]).
const FLAG_SNAPSHOT: u16 = 2;
/// Every flag bit this version knows.
const FLAGS_KNOWN: u16 = FLAG_HANDSHAKE | FLAG_SNAPSHOT;
/// Offset of the header checksum: it covers every byte before it.
const HEADER_CRC_OFFSET: usize = 36;

const _: () = assert!(HEADER_CRC_OFFSET + 4 == HEADER_BYTES);

/// What a frame is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// The first frame of each side of a connection (see [`super::handshake`]).
    Handshake,
    /// Everything after the handshake: a batch of Raft messages (see [`super::batch`]).
    Data,
    /// After the handshake too, on a connection of its own: one message of a snapshot transfer
    /// (see [`super::snapshot`]). A decoder expecting [`FrameKind::Data`] accepts it as well:
    /// both belong to an established connection, and the reader tells them apart by kind.
    Snapshot,
}

impl FrameKind {
    fn flags(self) -> u16 {
        match self {
            Self::Handshake => FLAG_HANDSHAKE,
            Self::Data => 0,
            Self::Snapshot => FLAG_SNAPSHOT,
        }
    }
}

/// The addressing of a frame: everything in the header but the length and checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrameHeader {
    /// Handshake or data.
    pub kind: FrameKind,
    /// The cluster the sender belongs to.
    pub cluster: ClusterId,
    /// The sending node.
    pub source: NodeId,
    /// The node the frame is meant for.
    pub target: NodeId,
}

/// One verified frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Kind and addressing.
    pub header: FrameHeader,
    /// The body: a slice of the read buffer, not a copy.
    pub body: Bytes,
}

/// Why bytes are not a frame (or not one this receiver accepts).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The stream does not start with [`MAGIC`]: not a Flotilla peer, or out of sync.
    #[error("bad magic {found:#010x}")]
    BadMagic {
        /// The four bytes read, as a little-endian integer.
        found: u32,
    },
    /// A frame format this code does not speak.
    #[error("unsupported frame version {version}")]
    UnsupportedVersion {
        /// The version in the header.
        version: u16,
    },
    /// The header checksum does not match: nothing in the header can be trusted.
    #[error("header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderChecksum {
        /// The checksum in the header.
        stored: u32,
        /// The checksum of the header's bytes.
        computed: u32,
    },
    /// Flag bits this version does not know.
    #[error("unknown flags {flags:#06x}")]
    UnknownFlags {
        /// The whole flags field.
        flags: u16,
    },
    /// The body is longer than the configured maximum.
    #[error("frame body of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// The length claimed (decoding) or produced (encoding).
        len: u64,
        /// The configured maximum.
        max: u32,
    },
    /// The body checksum does not match.
    #[error("body checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BodyChecksum {
        /// The checksum after the body.
        stored: u32,
        /// The checksum of the body's bytes.
        computed: u32,
    },
    /// The frame comes from another cluster.
    #[error("frame from {found}, expected {expected}")]
    WrongCluster {
        /// This node's cluster.
        expected: ClusterId,
        /// The cluster in the header.
        found: ClusterId,
    },
    /// The frame is addressed to another node.
    #[error("frame addressed to {found}, expected {expected}")]
    WrongTarget {
        /// This node.
        expected: NodeId,
        /// The target in the header.
        found: NodeId,
    },
    /// The frame claims another sender than the one this connection was established with.
    #[error("frame sent by {found}, expected {expected}")]
    WrongSource {
        /// The peer of this connection.
        expected: NodeId,
        /// The source in the header.
        found: NodeId,
    },
    /// A handshake frame where a data frame belongs, or the reverse.
    #[error("unexpected {found:?} frame, expected {expected:?}")]
    WrongKind {
        /// The kind this stage of the connection accepts.
        expected: FrameKind,
        /// The kind in the header.
        found: FrameKind,
    },
    /// The input ended inside a frame.
    #[error("truncated frame: {buffered} bytes of an incomplete frame")]
    Truncated {
        /// Bytes of the incomplete frame received (header included once it was read).
        buffered: u64,
    },
    /// Bytes followed the one frame expected.
    #[error("{len} trailing bytes after the frame")]
    Trailing {
        /// How many.
        len: u64,
    },
}

/// What a [`FrameDecoder`] accepts. `None` in a field means "any".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderConfig {
    /// Longest body accepted.
    pub body_bytes_max: u32,
    /// The only cluster accepted.
    pub cluster: Option<ClusterId>,
    /// The only target accepted: this node.
    pub target: Option<NodeId>,
    /// The only source accepted: the peer, once the handshake named it.
    pub source: Option<NodeId>,
    /// The only kind accepted.
    pub kind: Option<FrameKind>,
}

impl DecoderConfig {
    /// Accepts frames of any cluster, address and kind up to [`BODY_BYTES_MAX_DEFAULT`]: for
    /// tools and fuzzing; a node uses [`DecoderConfig::new`].
    pub const fn any() -> Self {
        Self {
            body_bytes_max: BODY_BYTES_MAX_DEFAULT,
            cluster: None,
            target: None,
            source: None,
            kind: None,
        }
    }

    /// Accepts frames of `cluster` addressed to `local`, from any source, of any kind.
    pub const fn new(cluster: ClusterId, local: NodeId) -> Self {
        Self { cluster: Some(cluster), target: Some(local), ..Self::any() }
    }
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self::any()
    }
}

/// A header that passed every check, waiting for its body.
#[derive(Clone, Copy, Debug)]
struct Pending {
    header: FrameHeader,
    body_len: usize,
    header_crc: u32,
}

/// Splits a byte stream into verified frames, incrementally.
#[derive(Clone, Debug)]
pub struct FrameDecoder {
    config: DecoderConfig,
    pending: Option<Pending>,
    failed: Option<FrameError>,
}

impl FrameDecoder {
    /// A decoder that accepts what `config` allows.
    pub fn new(config: DecoderConfig) -> Self {
        Self { config, pending: None, failed: None }
    }

    /// What this decoder accepts.
    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// Changes what later frames must satisfy (e.g. the source, once the handshake named the
    /// peer). A header already read and waiting for its body keeps the checks it passed.
    pub fn set_config(&mut self, config: DecoderConfig) {
        self.config = config;
    }

    /// True once a decode failed: the stream is out of sync and every call repeats the error.
    pub fn has_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// Takes the next whole frame off the front of `input`.
    ///
    /// `Ok(None)`: more bytes are needed (append them to `input` and call again); what was
    /// consumed so far is remembered here. `Ok(Some(frame))`: one frame, removed from `input`,
    /// which may hold the start of the next. `Err`: the stream is bad; close the connection.
    /// While a body arrives this reserves room in `input` for at most [`RESERVE_BYTES_MAX`] more
    /// bytes, so its capacity stays proportional to what the peer actually sent.
    pub fn decode(&mut self, input: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let result = self.step(input);
        if let Err(error) = &result {
            self.failed = Some(error.clone());
            self.pending = None;
        }
        result
    }

    /// Says whether the stream may end here, with `input` the unconsumed bytes: an error if a
    /// frame was cut off (or the stream had already failed).
    pub fn on_eof(&self, input: &BytesMut) -> Result<(), FrameError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let header_bytes = if self.pending.is_some() { HEADER_BYTES } else { 0 };
        let buffered = header_bytes + input.len();
        if buffered == 0 {
            Ok(())
        } else {
            Err(FrameError::Truncated { buffered: buffered as u64 })
        }
    }

    fn step(&mut self, input: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let pending = match self.pending {
            Some(pending) => pending,
            None => {
                // Check what is already there, so garbage fails on its first bytes rather than
                // after a whole header's worth of them.
                check_prefix(input)?;
                if input.len() < HEADER_BYTES {
                    return Ok(None);
                }
                let pending = check_header(&input[..HEADER_BYTES], &self.config)?;
                input.advance(HEADER_BYTES);
                self.pending = Some(pending);
                pending
            }
        };
        let frame_rest = pending.body_len + TRAILER_BYTES;
        if input.len() < frame_rest {
            input.reserve((frame_rest - input.len()).min(RESERVE_BYTES_MAX));
            return Ok(None);
        }
        self.pending = None;
        let body = input.split_to(pending.body_len).freeze();
        let stored = input.get_u32_le();
        let computed = body_crc(pending.header_crc, &body);
        if stored != computed {
            return Err(FrameError::BodyChecksum { stored, computed });
        }
        Ok(Some(Frame { header: pending.header, body }))
    }
}

/// Decodes `input` as exactly one frame: the whole-buffer form of [`FrameDecoder`], for tests,
/// tools and fuzzing.
pub fn decode_exact(input: &[u8], config: DecoderConfig) -> Result<Frame, FrameError> {
    let mut buffer = BytesMut::from(input);
    let mut decoder = FrameDecoder::new(config);
    match decoder.decode(&mut buffer)? {
        Some(frame) if buffer.is_empty() => Ok(frame),
        Some(_) => Err(FrameError::Trailing { len: buffer.len() as u64 }),
        // Everything was fed, so the frame is cut off (an empty input is a cut-off frame too).
        None => Err(FrameError::Truncated { buffered: input.len() as u64 }),
    }
}

/// Starts a frame at the end of `out`: reserves room for the header and returns where the frame
/// starts. Append the body to `out`, then call [`finish`] — the body is never copied.
pub fn begin(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_BYTES]);
    start
}

/// Completes the frame begun at `start` (by [`begin`]) whose body is everything after its header
/// in `out`: writes the header and appends the body checksum. A body longer than `body_bytes_max`
/// is refused and the frame removed from `out`, so the peer never sees a frame it would reject.
pub fn finish(
    header: &FrameHeader,
    out: &mut Vec<u8>,
    start: usize,
    body_bytes_max: u32,
) -> Result<(), FrameError> {
    assert!(out.len() >= start + HEADER_BYTES, "finish without begin");
    let body_len = out.len() - start - HEADER_BYTES;
    let len = match u32::try_from(body_len) {
        Ok(len) if len <= body_bytes_max => len,
        _ => {
            out.truncate(start);
            return Err(FrameError::TooLarge { len: body_len as u64, max: body_bytes_max });
        }
    };
    let frame = &mut out[start..];
    frame[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    frame[4..6].copy_from_slice(&VERSION.to_le_bytes());
    frame[6..8].copy_from_slice(&header.kind.flags().to_le_bytes());
    frame[8..16].copy_from_slice(&header.cluster.0.to_le_bytes());
    frame[16..24].copy_from_slice(&header.source.0.to_le_bytes());
    frame[24..32].copy_from_slice(&header.target.0.to_le_bytes());
    frame[32..HEADER_CRC_OFFSET].copy_from_slice(&len.to_le_bytes());
    let header_crc = crc32fast::hash(&frame[..HEADER_CRC_OFFSET]);
    frame[HEADER_CRC_OFFSET..HEADER_BYTES].copy_from_slice(&header_crc.to_le_bytes());
    let crc = body_crc(header_crc, &frame[HEADER_BYTES..]);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Appends one frame with `body` to `out` (a copy of the body; see [`begin`] to avoid it).
pub fn encode(
    header: &FrameHeader,
    body: &[u8],
    out: &mut Vec<u8>,
    body_bytes_max: u32,
) -> Result<(), FrameError> {
    if body.len() > body_bytes_max as usize {
        return Err(FrameError::TooLarge { len: body.len() as u64, max: body_bytes_max });
    }
    let start = begin(out);
    out.extend_from_slice(body);
    finish(header, out, start, body_bytes_max)
}

/// Bytes a frame with a body of `body_len` bytes takes on the wire.
pub const fn frame_bytes(body_len: usize) -> usize {
    HEADER_BYTES + body_len + TRAILER_BYTES
}

fn body_crc(header_crc: u32, body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new_with_initial(header_crc);
    hasher.update(body);
    hasher.finalize()
}

fn u16_at(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes([bytes[offset], bytes[offset + 1]])
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    let mut value = [0; 4];
    value.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(value)
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    let mut value = [0; 8];
    value.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(value)
}

/// Checks magic and version as soon as their bytes are there (before the header is complete).
fn check_prefix(input: &[u8]) -> Result<(), FrameError> {
    if input.len() >= 4 {
        let found = u32_at(input, 0);
        if found != MAGIC {
            return Err(FrameError::BadMagic { found });
        }
    }
    if input.len() >= 6 {
        let version = u16_at(input, 4);
        if version != VERSION {
            return Err(FrameError::UnsupportedVersion { version });
        }
    }
    Ok(())
}

/// Verifies a whole header, checksum first, then every field against `config`.
fn check_header(bytes: &[u8], config: &DecoderConfig) -> Result<Pending, FrameError> {
    debug_assert_eq!(bytes.len(), HEADER_BYTES);
    check_prefix(bytes)?;
    let stored = u32_at(bytes, HEADER_CRC_OFFSET);
    let computed = crc32fast::hash(&bytes[..HEADER_CRC_OFFSET]);
    if stored != computed {
        return Err(FrameError::HeaderChecksum { stored, computed });
    }
    let flags = u16_at(bytes, 6);
    if flags & !FLAGS_KNOWN != 0 {
        return Err(FrameError::UnknownFlags { flags });
    }
    let kind = match flags {
        0 => FrameKind::Data,
        FLAG_HANDSHAKE => FrameKind::Handshake,
        FLAG_SNAPSHOT => FrameKind::Snapshot,
        _ => return Err(FrameError::UnknownFlags { flags }),
    };
    let header = FrameHeader {
        kind,
        cluster: ClusterId(u64_at(bytes, 8)),
        source: NodeId(u64_at(bytes, 16)),
        target: NodeId(u64_at(bytes, 24)),
    };
    let len = u32_at(bytes, 32);
    if len > config.body_bytes_max {
        return Err(FrameError::TooLarge { len: u64::from(len), max: config.body_bytes_max });
    }
    if let Some(expected) = config.cluster
        && header.cluster != expected
    {
        return Err(FrameError::WrongCluster { expected, found: header.cluster });
    }
    if let Some(expected) = config.target
        && header.target != expected
    {
        return Err(FrameError::WrongTarget { expected, found: header.target });
    }
    if let Some(expected) = config.source
        && header.source != expected
    {
        return Err(FrameError::WrongSource { expected, found: header.source });
    }
    // A snapshot-stream frame belongs to the data stage of a connection, like a batch.
    let stage = if kind == FrameKind::Snapshot { FrameKind::Data } else { kind };
    if let Some(expected) = config.kind
        && stage != expected
    {
        return Err(FrameError::WrongKind { expected, found: kind });
    }
    Ok(Pending { header, body_len: len as usize, header_crc: stored })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn header() -> FrameHeader {
        FrameHeader {
            kind: FrameKind::Data,
            cluster: ClusterId(7),
            source: NodeId(1),
            target: NodeId(2),
        }
    }

    fn encoded(header: &FrameHeader, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(header, body, &mut out, BODY_BYTES_MAX_DEFAULT).unwrap();
        out
    }

    /// Rewrites the header checksum after a test changed a header field.
    fn reseal(frame: &mut [u8]) {
        let crc = crc32fast::hash(&frame[..HEADER_CRC_OFFSET]);
        frame[HEADER_CRC_OFFSET..HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn layout_matches_the_documented_offsets() {
        let bytes = encoded(&header(), b"abc");
        assert_eq!(bytes.len(), frame_bytes(3));
        assert_eq!(&bytes[0..4], b"FLTF");
        assert_eq!(u16_at(&bytes, 4), VERSION);
        assert_eq!(u16_at(&bytes, 6), 0);
        assert_eq!(u64_at(&bytes, 8), 7);
        assert_eq!(u64_at(&bytes, 16), 1);
        assert_eq!(u64_at(&bytes, 24), 2);
        assert_eq!(u32_at(&bytes, 32), 3);
        assert_eq!(u32_at(&bytes, 36), crc32fast::hash(&bytes[..36]));
        assert_eq!(&bytes[40..43], b"abc");
        let handshake = encoded(&FrameHeader { kind: FrameKind::Handshake, ..header() }, b"");
        assert_eq!(u16_at(&handshake, 6), FLAG_HANDSHAKE);
    }

    #[test]
    fn body_is_a_slice_of_the_read_buffer() {
        let mut input = BytesMut::from(&encoded(&header(), &[9; 100])[..]);
        let base = input.as_ptr() as usize;
        let frame = FrameDecoder::new(DecoderConfig::any()).decode(&mut input).unwrap().unwrap();
        assert_eq!(frame.body.as_ptr() as usize, base + HEADER_BYTES, "no copy");
        assert!(input.is_empty());
    }

    #[test]
    fn checks_run_in_order_checksum_before_length() {
        // A huge length under a bad checksum is a checksum error: the length is never trusted.
        let mut bytes = encoded(&header(), b"");
        bytes[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_exact(&bytes, DecoderConfig::any()),
            Err(FrameError::HeaderChecksum { .. })
        ));
        reseal(&mut bytes);
        assert_eq!(
            decode_exact(&bytes, DecoderConfig::any()),
            Err(FrameError::TooLarge { len: u64::from(u32::MAX), max: BODY_BYTES_MAX_DEFAULT })
        );
    }

    #[test]
    fn each_header_field_is_checked() {
        let config = DecoderConfig {
            source: Some(NodeId(1)),
            kind: Some(FrameKind::Data),
            ..DecoderConfig::new(ClusterId(7), NodeId(2))
        };
        let good = encoded(&header(), b"x");
        assert_eq!(decode_exact(&good, config).unwrap().body, Bytes::from_static(b"x"));
        let cases: [(FrameHeader, FrameError); 4] = [
            (
                FrameHeader { cluster: ClusterId(8), ..header() },
                FrameError::WrongCluster { expected: ClusterId(7), found: ClusterId(8) },
            ),
            (
                FrameHeader { target: NodeId(3), ..header() },
                FrameError::WrongTarget { expected: NodeId(2), found: NodeId(3) },
            ),
            (
                FrameHeader { source: NodeId(4), ..header() },
                FrameError::WrongSource { expected: NodeId(1), found: NodeId(4) },
            ),
            (
                FrameHeader { kind: FrameKind::Handshake, ..header() },
                FrameError::WrongKind { expected: FrameKind::Data, found: FrameKind::Handshake },
            ),
        ];
        for (header, error) in cases {
            assert_eq!(decode_exact(&encoded(&header, b"x"), config), Err(error));
        }
        let mut bad = good.clone();
        bad[0] ^= 1;
        assert!(matches!(decode_exact(&bad, config), Err(FrameError::BadMagic { .. })));
        let mut bad = good.clone();
        bad[4] = 2;
        assert_eq!(decode_exact(&bad, config), Err(FrameError::UnsupportedVersion { version: 2 }));
        let mut bad = good.clone();
        bad[7] = 0x80;
        reseal(&mut bad);
        assert_eq!(decode_exact(&bad, config), Err(FrameError::UnknownFlags { flags: 0x8000 }));
        let mut bad = good.clone();
        bad[HEADER_BYTES] ^= 0x20;
        assert!(matches!(decode_exact(&bad, config), Err(FrameError::BodyChecksum { .. })));
    }

    #[test]
    fn a_body_under_another_header_fails_its_checksum() {
        let first = encoded(&header(), b"body");
        let mut second = encoded(&FrameHeader { source: NodeId(9), ..header() }, b"body");
        second[HEADER_BYTES..].copy_from_slice(&first[HEADER_BYTES..]);
        assert!(matches!(
            decode_exact(&second, DecoderConfig::any()),
            Err(FrameError::BodyChecksum { .. })
        ));
    }

    #[test]
    fn encoding_refuses_bodies_over_the_maximum_and_leaves_out_intact() {
        let mut out = vec![1, 2, 3];
        assert_eq!(
            encode(&header(), &[0; 11], &mut out, 10),
            Err(FrameError::TooLarge { len: 11, max: 10 })
        );
        let start = begin(&mut out);
        out.extend_from_slice(&[0; 11]);
        assert_eq!(
            finish(&header(), &mut out, start, 10),
            Err(FrameError::TooLarge { len: 11, max: 10 })
        );
        assert_eq!(out, [1, 2, 3]);
        encode(&header(), &[0; 10], &mut out, 10).unwrap();
        assert_eq!(out.len(), 3 + frame_bytes(10));
    }

    #[test]
    fn errors_are_sticky_and_truncation_is_reported_at_eof() {
        let mut decoder = FrameDecoder::new(DecoderConfig::any());
        let bytes = encoded(&header(), b"abc");
        let mut input = BytesMut::from(&bytes[..=HEADER_BYTES]);
        assert_eq!(decoder.decode(&mut input), Ok(None));
        assert_eq!(decoder.on_eof(&input), Err(FrameError::Truncated { buffered: 41 }));
        let mut garbage = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        let mut decoder = FrameDecoder::new(DecoderConfig::any());
        let error = decoder.decode(&mut garbage).unwrap_err();
        assert!(decoder.has_failed());
        let mut good = BytesMut::from(&bytes[..]);
        assert_eq!(decoder.decode(&mut good), Err(error.clone()));
        assert_eq!(decoder.on_eof(&good), Err(error));
        assert_eq!(FrameDecoder::new(DecoderConfig::any()).on_eof(&BytesMut::new()), Ok(()));
    }

    fn any_header() -> impl Strategy<Value = FrameHeader> {
        (any::<bool>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(handshake, cluster, source, target)| FrameHeader {
                kind: if handshake { FrameKind::Handshake } else { FrameKind::Data },
                cluster: ClusterId(cluster),
                source: NodeId(source),
                target: NodeId(target),
            },
        )
    }

    proptest! {
        #[test]
        fn frames_round_trip_in_any_split(
            frames in proptest::collection::vec(
                (any_header(), proptest::collection::vec(any::<u8>(), 0..300)), 1..5),
            piece in 1usize..64,
        ) {
            let mut stream = Vec::new();
            for (header, body) in &frames {
                encode(header, body, &mut stream, BODY_BYTES_MAX_DEFAULT).unwrap();
            }
            let mut decoder = FrameDecoder::new(DecoderConfig::any());
            let mut input = BytesMut::new();
            let mut decoded = Vec::new();
            for chunk in stream.chunks(piece) {
                input.extend_from_slice(chunk);
                while let Some(frame) = decoder.decode(&mut input).unwrap() {
                    decoded.push((frame.header, frame.body.to_vec()));
                }
            }
            prop_assert_eq!(decoded, frames);
            prop_assert_eq!(decoder.on_eof(&input), Ok(()));
        }

        #[test]
        fn every_prefix_waits_and_every_bit_flip_fails(
            header in any_header(),
            body in proptest::collection::vec(any::<u8>(), 0..64),
            bit in any::<prop::sample::Index>(),
        ) {
            let bytes = encoded(&header, &body);
            for len in 0..bytes.len() {
                let mut input = BytesMut::from(&bytes[..len]);
                prop_assert_eq!(FrameDecoder::new(DecoderConfig::any()).decode(&mut input), Ok(None));
                let truncated = matches!(
                    decode_exact(&bytes[..len], DecoderConfig::any()),
                    Err(FrameError::Truncated { .. })
                );
                prop_assert!(truncated);
            }
            let mut flipped = bytes.clone();
            let bit = bit.index(bytes.len() * 8);
            flipped[bit / 8] ^= 1 << (bit % 8);
            // CRC-32 detects every single-bit error; a flipped length bit may instead leave the
            // frame incomplete (a longer length) or be caught by a checksum — never accepted.
            prop_assert!(decode_exact(&flipped, DecoderConfig::any()).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let mut input = BytesMut::from(&bytes[..]);
            let mut decoder = FrameDecoder::new(DecoderConfig::any());
            while let Ok(Some(_)) = decoder.decode(&mut input) {}
        }
    }
}

//! The snapshot image of [`KvStateMachine`](super::KvStateMachine), byte by byte.
//!
//! ```text
//! offset size field
//!  0      8   magic           "FLTKVSNP"
//!  8      4   version         u32 = 1
//! 12      8   applied_index   u64, the last log index the image covers
//! 20      8   now_ms          u64, the state machine's log time
//! 28      8   session_ttl_ms  u64, KvConfig::session_ttl_ms of the writer
//! 36      8   sessions_max    u64, KvConfig::sessions_max of the writer
//! 44      8   entry_count     u64, key-value pairs in the body
//! 52      8   session_count   u64, sessions in the body
//! 60      8   body_len        u64, bytes after the header (the image's length minus 72)
//! 68      4   crc32           of bytes 0..68 followed by the whole body
//! 72          body            entry * entry_count, then session * session_count
//!
//! entry   = key:bytes value:bytes                      (strictly increasing keys)
//! session = client_id:u64 last_active_ms:u64 last:u8    (strictly increasing client ids)
//!           last = 0                                   no command yet
//!                | 1 sequence:u64 outcome              the last command and its outcome
//! outcome = 1 written | 2 deleted existed:u8 | 3 swapped | 4 mismatch actual:option
//! bytes   = len:u32 data        option = 0:u8 | 1:u8 bytes        integers little-endian
//! ```
//!
//! One state has exactly one image: the map and the sessions are written in key and client-id
//! order, and the decoder refuses anything but that order, unknown flags and trailing bytes. So
//! replicas that applied the same log produce byte-identical snapshots.
//!
//! Restore checks, in order: the length covers the header, the magic, the version, `body_len`
//! against the actual length, then the CRC — before it parses a single body byte. CRC-32 detects
//! every single flipped bit and every burst of up to 32 bits, at any length (a flip in the
//! magic, version or length fields is caught even before). Then it parses the body against the
//! counts, without reserving anything from a count.

use std::io;

use bytes::Bytes;
use flotilla_raftgroup::LogIndex;
use thiserror::Error;

use super::command::{DecodeError, Reader, put_bytes, put_option, put_u64};
use super::map::KvMap;
use super::session::{Session, Sessions};
use super::state_machine::{KvConfig, Outcome, SnapshotImage};

/// The first eight bytes of every image.
pub const MAGIC: [u8; 8] = *b"FLTKVSNP";
/// The image format version written.
pub const SNAPSHOT_VERSION: u32 = 1;
/// Bytes before the body.
pub const HEADER_LEN: usize = 72;
const APPLIED_INDEX_OFFSET: usize = 12;
const NOW_OFFSET: usize = 20;
const SESSION_TTL_OFFSET: usize = 28;
const SESSIONS_MAX_OFFSET: usize = 36;
const ENTRY_COUNT_OFFSET: usize = 44;
const SESSION_COUNT_OFFSET: usize = 52;
const BODY_LEN_OFFSET: usize = 60;
const CRC_OFFSET: usize = 68;
const _: () = assert!(CRC_OFFSET + 4 == HEADER_LEN);

/// Why bytes are not a KV snapshot image.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// Shorter than the header.
    #[error("snapshot of {len} bytes is shorter than its header")]
    TooShort {
        /// The length given.
        len: usize,
    },
    /// The magic is wrong: not a KV snapshot.
    #[error("not a kv snapshot (bad magic)")]
    Magic,
    /// A format version this build cannot read.
    #[error("unsupported snapshot version {version}")]
    Version {
        /// The version found.
        version: u32,
    },
    /// The header's body length disagrees with the bytes given (truncated or extended).
    #[error("snapshot body is {actual} bytes but the header says {declared}")]
    Length {
        /// `body_len` from the header.
        declared: u64,
        /// Bytes actually after the header.
        actual: u64,
    },
    /// The checksum does not match: the image is damaged.
    #[error("snapshot checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// The CRC in the header.
        stored: u32,
        /// The CRC of the bytes.
        computed: u32,
    },
    /// The image was written by a state machine with other limits. Sessions would expire
    /// differently here than on the replica that wrote it, and replicas would diverge: every
    /// replica of a group must run with the same [`KvConfig`].
    #[error("snapshot written with {image:?}, this replica runs with {local:?}")]
    Config {
        /// The limits in the image.
        image: KvConfig,
        /// This state machine's limits.
        local: KvConfig,
    },
    /// The body does not parse (reachable only by an image with a valid CRC: a bug or a
    /// forgery).
    #[error("malformed snapshot body: {0}")]
    Body(#[from] DecodeError),
    /// The body parses but breaks a rule of the format.
    #[error("invalid snapshot: {reason}")]
    Invalid {
        /// Which rule.
        reason: &'static str,
    },
}

/// A decoded image.
pub(crate) struct Image {
    pub(crate) applied_index: LogIndex,
    pub(crate) now_ms: u64,
    pub(crate) data: KvMap,
    pub(crate) sessions: Sessions,
}

mod outcome_tag {
    pub const WRITTEN: u8 = 1;
    pub const DELETED: u8 = 2;
    pub const SWAPPED: u8 = 3;
    pub const MISMATCH: u8 = 4;
}

/// Bytes of the body encoded before they are handed on: bounds the buffer of a body of any size.
const PIECE_BYTES: usize = 64 * 1024;

/// A point-in-time view of a [`KvStateMachine`](super::KvStateMachine)'s state: what its
/// [`StateMachine::snapshot`](super::StateMachine::snapshot) returns, cheap to take on the
/// shard thread and written out elsewhere with [`SnapshotImage::write_to`].
///
/// Taking it costs O(1) for the keys (the map's nodes are shared with the store, see the map's
/// documentation; at most eight pairs are copied) plus a copy of the session table, which
/// [`KvConfig::sessions_max`] bounds. Writing it never holds more than 64 KiB of encoded
/// image in memory, whatever the state's size.
#[derive(Clone, Debug)]
pub struct KvSnapshot {
    config: KvConfig,
    applied_index: LogIndex,
    now_ms: u64,
    data: KvMap,
    sessions: Sessions,
}

impl KvSnapshot {
    pub(crate) fn new(
        config: KvConfig,
        applied_index: LogIndex,
        now_ms: u64,
        data: KvMap,
        sessions: Sessions,
    ) -> Self {
        Self { config, applied_index, now_ms, data, sessions }
    }

    /// The index the image covers.
    pub fn applied_index(&self) -> LogIndex {
        self.applied_index
    }

    fn header(&self, body_len: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        put_u64(&mut out, self.applied_index.get());
        put_u64(&mut out, self.now_ms);
        put_u64(&mut out, self.config.session_ttl_ms);
        put_u64(&mut out, self.config.sessions_max as u64);
        put_u64(&mut out, self.data.len() as u64);
        put_u64(&mut out, self.sessions.len() as u64);
        put_u64(&mut out, body_len);
        out.extend_from_slice(&[0; 4]); // crc32, filled in by the caller
        debug_assert_eq!(out.len(), HEADER_LEN);
        out
    }

    /// Encodes the body, handing it to `sink` in pieces of about [`PIECE_BYTES`].
    fn body(&self, sink: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
        let mut out = Vec::with_capacity(PIECE_BYTES);
        for (key, value) in self.data.iter() {
            put_bytes(&mut out, key);
            put_bytes(&mut out, value);
            if out.len() >= PIECE_BYTES {
                sink(&out)?;
                out.clear();
            }
        }
        for (client_id, session) in self.sessions.iter() {
            put_u64(&mut out, client_id);
            put_u64(&mut out, session.last_active_ms);
            match &session.last {
                None => out.push(0),
                Some((sequence, outcome)) => {
                    out.push(1);
                    put_u64(&mut out, *sequence);
                    encode_outcome(&mut out, outcome);
                }
            }
            if out.len() >= PIECE_BYTES {
                sink(&out)?;
                out.clear();
            }
        }
        if out.is_empty() { Ok(()) } else { sink(&out) }
    }
}

impl SnapshotImage for KvSnapshot {
    /// Two passes over the state: the header's length and checksum come before the body, and
    /// the body is never held whole — the first pass only counts and checksums it.
    fn write_to(&self, out: &mut dyn io::Write) -> io::Result<()> {
        let mut body_len = 0u64;
        let mut body_crc = crc32fast::Hasher::new();
        self.body(&mut |piece| {
            body_len += piece.len() as u64;
            body_crc.update(piece);
            Ok(())
        })?;
        let mut header = self.header(body_len);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header[..CRC_OFFSET]);
        crc.combine(&body_crc);
        header[CRC_OFFSET..HEADER_LEN].copy_from_slice(&crc.finalize().to_le_bytes());
        out.write_all(&header)?;
        self.body(&mut |piece| out.write_all(piece))
    }
}

fn encode_outcome(out: &mut Vec<u8>, outcome: &Outcome) {
    match outcome {
        Outcome::Written => out.push(outcome_tag::WRITTEN),
        Outcome::Deleted { existed } => {
            out.push(outcome_tag::DELETED);
            out.push(u8::from(*existed));
        }
        Outcome::Swapped => out.push(outcome_tag::SWAPPED),
        Outcome::Mismatch { actual } => {
            out.push(outcome_tag::MISMATCH);
            put_option(out, actual.as_ref());
        }
    }
}

/// CRC-32 of the header without its CRC field, then the body.
fn checksum(image: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&image[..CRC_OFFSET]);
    hasher.update(&image[HEADER_LEN..]);
    hasher.finalize()
}

fn header_u64(image: &[u8], offset: usize) -> u64 {
    let mut field = [0; 8];
    field.copy_from_slice(&image[offset..offset + 8]);
    u64::from_le_bytes(field)
}

fn header_u32(image: &[u8], offset: usize) -> u32 {
    let mut field = [0; 4];
    field.copy_from_slice(&image[offset..offset + 4]);
    u32::from_le_bytes(field)
}

/// Verifies and parses an image. Keys and values are copied out of `image`, so that the state
/// does not keep the whole image (perhaps a network buffer or a memory map) alive.
pub(crate) fn decode(image: &Bytes, local: KvConfig) -> Result<Image, SnapshotError> {
    if image.len() < HEADER_LEN {
        return Err(SnapshotError::TooShort { len: image.len() });
    }
    if image[..8] != MAGIC {
        return Err(SnapshotError::Magic);
    }
    let version = header_u32(image, 8);
    if version != SNAPSHOT_VERSION {
        return Err(SnapshotError::Version { version });
    }
    let declared = header_u64(image, BODY_LEN_OFFSET);
    let actual = (image.len() - HEADER_LEN) as u64;
    if declared != actual {
        return Err(SnapshotError::Length { declared, actual });
    }
    let stored = header_u32(image, CRC_OFFSET);
    let computed = checksum(image);
    if stored != computed {
        return Err(SnapshotError::Checksum { stored, computed });
    }
    let config = KvConfig {
        session_ttl_ms: header_u64(image, SESSION_TTL_OFFSET),
        // Saturates on a 32-bit target; it then differs from `local` and is refused.
        sessions_max: usize::try_from(header_u64(image, SESSIONS_MAX_OFFSET)).unwrap_or(usize::MAX),
    };
    if config != local {
        return Err(SnapshotError::Config { image: config, local });
    }
    let applied_index = LogIndex(header_u64(image, APPLIED_INDEX_OFFSET));
    let now_ms = header_u64(image, NOW_OFFSET);
    let entry_count = header_u64(image, ENTRY_COUNT_OFFSET);
    let session_count = header_u64(image, SESSION_COUNT_OFFSET);

    let mut reader = Reader::new(&image[HEADER_LEN..]);
    let mut data = Vec::new();
    let mut previous_key: Option<&[u8]> = None;
    // Each iteration consumes at least 8 bytes or fails, so a huge count costs nothing.
    for _ in 0..entry_count {
        let key = reader.bytes()?;
        let value = reader.bytes()?;
        if previous_key.is_some_and(|previous| previous >= key) {
            return Err(SnapshotError::Invalid { reason: "keys out of order" });
        }
        // `from_sorted` copies the key: neither pins the image.
        data.push((key, Bytes::copy_from_slice(value)));
        previous_key = Some(key);
    }
    let data = KvMap::from_sorted(data);
    let mut sessions = Sessions::default();
    let mut previous_client: Option<u64> = None;
    for _ in 0..session_count {
        let client_id = reader.u64()?;
        let last_active_ms = reader.u64()?;
        let last = match reader.u8()? {
            0 => None,
            1 => Some((reader.u64()?, decode_outcome(&mut reader)?)),
            other => return Err(DecodeError::Flag(other).into()),
        };
        if previous_client.is_some_and(|previous| previous >= client_id) {
            return Err(SnapshotError::Invalid { reason: "sessions out of order" });
        }
        if client_id > applied_index.get() {
            return Err(SnapshotError::Invalid { reason: "session registered after the image" });
        }
        if last_active_ms > now_ms {
            return Err(SnapshotError::Invalid { reason: "session active after the image" });
        }
        if matches!(last, Some((0, _))) {
            return Err(SnapshotError::Invalid { reason: "session cached sequence 0" });
        }
        previous_client = Some(client_id);
        sessions.insert(client_id, Session { last_active_ms, last });
    }
    reader.finish()?;
    Ok(Image { applied_index, now_ms, data, sessions })
}

fn decode_outcome(reader: &mut Reader<'_>) -> Result<Outcome, SnapshotError> {
    Ok(match reader.u8()? {
        outcome_tag::WRITTEN => Outcome::Written,
        outcome_tag::DELETED => match reader.u8()? {
            0 => Outcome::Deleted { existed: false },
            1 => Outcome::Deleted { existed: true },
            other => return Err(DecodeError::Flag(other).into()),
        },
        outcome_tag::SWAPPED => Outcome::Swapped,
        outcome_tag::MISMATCH => {
            Outcome::Mismatch { actual: reader.option()?.map(Bytes::copy_from_slice) }
        }
        other => return Err(DecodeError::Tag(other).into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Bytes {
        let data = KvMap::from_sorted(vec![
            (Bytes::from_static(b"a"), Bytes::from_static(b"1")),
            (Bytes::from_static(b"b"), Bytes::from_static(b"")),
        ]);
        let mut sessions = Sessions::default();
        sessions.insert(3, Session { last_active_ms: 5, last: None });
        sessions.insert(
            4,
            Session {
                last_active_ms: 6,
                last: Some((2, Outcome::Mismatch { actual: Some(Bytes::from_static(b"x")) })),
            },
        );
        sessions.insert(
            7,
            Session { last_active_ms: 6, last: Some((9, Outcome::Deleted { existed: true })) },
        );
        encode(CONFIG, LogIndex(9), 6, &data, &sessions)
    }

    const CONFIG: KvConfig = KvConfig { session_ttl_ms: 100, sessions_max: 5 };

    fn encode(
        config: KvConfig,
        applied_index: LogIndex,
        now_ms: u64,
        data: &KvMap,
        sessions: &Sessions,
    ) -> Bytes {
        KvSnapshot::new(config, applied_index, now_ms, data.clone(), sessions.clone()).to_bytes()
    }

    #[test]
    fn an_image_of_many_pieces_checksums_and_decodes_whole() {
        // Past 64 KiB the body leaves in several pieces, and the checksum is combined from the
        // header's and the body's: decoding verifies both.
        let pairs: Vec<_> = (0..5_000u32)
            .map(|n| (Bytes::from(format!("key{n:06}")), Bytes::from(vec![n as u8; 40])))
            .collect();
        let data = KvMap::from_sorted(pairs.clone());
        let mut sessions = Sessions::default();
        for client in 1..=5 {
            sessions.insert(client, Session { last_active_ms: 1, last: None });
        }
        let image = encode(CONFIG, LogIndex(9_000), 3, &data, &sessions);
        assert!(image.len() > 4 * PIECE_BYTES);
        let decoded = decode(&image, CONFIG).expect("valid image");
        assert!(decoded.data.iter().map(|(k, v)| (k.to_bytes(), v.clone())).eq(pairs));
        assert_eq!(decoded.sessions, sessions);
        assert_eq!(encode(CONFIG, LogIndex(9_000), 3, &decoded.data, &decoded.sessions), image);
    }

    /// Keys on both sides of the map's inline limit survive an image byte for byte, and none
    /// of the decoded keys or values points into the image (which they would keep alive).
    #[test]
    fn inline_and_heap_keys_round_trip_without_pinning_the_image() {
        let pairs: Vec<_> = [0, 1, 2, 5, 10, 22, 23, 24, 30, 40]
            .into_iter()
            .map(|len| (Bytes::from(vec![b'k'; len]), Bytes::from(vec![len as u8; 3])))
            .collect();
        // The vector form (at most 8 pairs) and the B-tree.
        for count in [3, pairs.len()] {
            let pairs = &pairs[..count];
            let data = KvMap::from_sorted(pairs.to_vec());
            let image = encode(CONFIG, LogIndex(4), 1, &data, &Sessions::default());
            let decoded = decode(&image, CONFIG).expect("valid image");
            assert!(decoded.data.iter().map(|(k, v)| (k.to_bytes(), v.clone())).eq(pairs.to_vec()));
            assert_eq!(encode(CONFIG, LogIndex(4), 1, &decoded.data, &decoded.sessions), image);
            let inside = image.as_ptr() as usize..image.as_ptr() as usize + image.len();
            for (key, value) in decoded.data.iter() {
                assert!(!inside.contains(&(key.as_ptr() as usize)));
                assert!(!inside.contains(&(value.as_ptr() as usize)));
            }
        }
    }

    #[test]
    fn a_failing_writer_stops_the_image_with_its_error() {
        struct Full(usize);
        impl io::Write for Full {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                if self.0 < buf.len() {
                    return Err(io::Error::new(io::ErrorKind::StorageFull, "full"));
                }
                self.0 -= buf.len();
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let data = KvMap::from_sorted(
            (0..5_000u32)
                .map(|n| (Bytes::from(format!("{n:06}")), Bytes::from(vec![0; 40])))
                .collect(),
        );
        let view = KvSnapshot::new(CONFIG, LogIndex(1), 0, data, Sessions::default());
        let error = view.write_to(&mut Full(100_000)).expect_err("the writer fills up");
        assert_eq!(error.kind(), io::ErrorKind::StorageFull);
    }

    /// Recomputes the CRC so that a test reaches the body checks.
    fn reseal(mut image: Vec<u8>) -> Bytes {
        let crc = checksum(&image);
        image[CRC_OFFSET..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        Bytes::from(image)
    }

    #[test]
    fn the_header_is_as_documented() {
        let image = sample();
        assert_eq!(&image[..8], b"FLTKVSNP");
        assert_eq!(header_u32(&image, 8), 1);
        assert_eq!(header_u64(&image, 12), 9);
        assert_eq!(header_u64(&image, 20), 6);
        assert_eq!(header_u64(&image, 28), 100);
        assert_eq!(header_u64(&image, 36), 5);
        assert_eq!(header_u64(&image, 44), 2);
        assert_eq!(header_u64(&image, 52), 3);
        assert_eq!(header_u64(&image, 60), (image.len() - HEADER_LEN) as u64);
        assert_eq!(&image[HEADER_LEN..HEADER_LEN + 10], &[1, 0, 0, 0, b'a', 1, 0, 0, 0, b'1']);
    }

    #[test]
    fn an_image_decodes_to_what_was_encoded() {
        let image = decode(&sample(), CONFIG).expect("valid image");
        assert_eq!(image.applied_index, LogIndex(9));
        assert_eq!(image.now_ms, 6);
        assert_eq!(image.data.len(), 2);
        assert_eq!(image.sessions.len(), 3);
        assert_eq!(
            encode(CONFIG, image.applied_index, image.now_ms, &image.data, &image.sessions),
            sample()
        );
    }

    #[test]
    fn header_damage_gives_typed_errors() {
        let image = sample().to_vec();
        assert_eq!(decode(&Bytes::new(), CONFIG).err(), Some(SnapshotError::TooShort { len: 0 }));
        let mut bad = image.clone();
        bad[0] ^= 1;
        assert_eq!(decode(&Bytes::from(bad), CONFIG).err(), Some(SnapshotError::Magic));
        let mut bad = image.clone();
        bad[8] = 2;
        assert_eq!(
            decode(&Bytes::from(bad), CONFIG).err(),
            Some(SnapshotError::Version { version: 2 })
        );
        let body = (image.len() - HEADER_LEN) as u64;
        assert_eq!(
            decode(&Bytes::copy_from_slice(&image[..image.len() - 1]), CONFIG).err(),
            Some(SnapshotError::Length { declared: body, actual: body - 1 })
        );
        let mut bad = image.clone();
        bad[HEADER_LEN] ^= 0x80;
        assert!(matches!(decode(&Bytes::from(bad), CONFIG), Err(SnapshotError::Checksum { .. })));
        let mut bad = image;
        bad[12] ^= 1;
        assert!(matches!(decode(&Bytes::from(bad), CONFIG), Err(SnapshotError::Checksum { .. })));
    }

    #[test]
    fn an_image_of_other_limits_is_refused() {
        let local = KvConfig { session_ttl_ms: 100, sessions_max: 6 };
        assert_eq!(
            decode(&sample(), local).err(),
            Some(SnapshotError::Config { image: CONFIG, local })
        );
    }

    #[test]
    fn a_resealed_but_malformed_body_is_refused() {
        let image = sample().to_vec();
        // More entries than the body holds.
        let mut bad = image.clone();
        bad[44] = 200;
        assert!(matches!(decode(&reseal(bad), CONFIG), Err(SnapshotError::Body(_))));
        // Fewer sessions than the body holds: trailing bytes.
        let mut bad = image.clone();
        bad[52] = 2;
        assert!(matches!(
            decode(&reseal(bad), CONFIG),
            Err(SnapshotError::Body(DecodeError::Trailing(_)))
        ));
        // Keys out of order.
        let mut bad = image.clone();
        bad[HEADER_LEN + 4] = b'c';
        assert_eq!(
            decode(&reseal(bad), CONFIG).err(),
            Some(SnapshotError::Invalid { reason: "keys out of order" })
        );
        // A session registered after the image's index.
        let mut bad = image.clone();
        bad[12] = 5;
        assert_eq!(
            decode(&reseal(bad), CONFIG).err(),
            Some(SnapshotError::Invalid { reason: "session registered after the image" })
        );
        // A session active after the image's time.
        let mut bad = image;
        bad[20] = 5;
        assert_eq!(
            decode(&reseal(bad), CONFIG).err(),
            Some(SnapshotError::Invalid { reason: "session active after the image" })
        );
    }
}

//! Segment files: the 64-byte header, file names, and the per-segment read view.

use std::sync::{Arc, Weak};

use bytes::Bytes;

use crate::io::StorageFile;

/// Length of the segment header; the first record starts here.
pub const SEGMENT_HEADER_LEN: usize = 64;
/// Magic bytes at the start of every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"FLOTWAL\0";
/// Format version written by this code, the only one it reads. Version 2 added a one-byte tag to
/// every entry's header; segments of version 1 are refused (`HeaderError::Version`).
pub const FORMAT_VERSION: u16 = 2;
/// Checksum kind: CRC-32 (IEEE, crc32fast) with a per-segment seed.
pub const CHECKSUM_CRC32_SEEDED: u8 = 1;
/// Suffix of a live segment's file name (`{seq:020}.seg`).
pub const SEGMENT_SUFFIX: &str = ".seg";
/// Suffix of a file being prepared or recycled; never holds live data.
pub const SPARE_SUFFIX: &str = ".tmp";

const _: () = assert!(SEGMENT_HEADER_LEN.is_multiple_of(crate::record::RECORD_ALIGN));

/// A decoded segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The segment's sequence number (also its file name and its checksum seed).
    pub seq: u64,
    /// The file's size in bytes; files never grow or shrink.
    pub size: u64,
}

/// Why a segment header did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// Not a Flotilla segment.
    #[error("bad magic")]
    Magic,
    /// A format version this code cannot read.
    #[error("unsupported format version {0}")]
    Version(u16),
    /// A checksum kind this code cannot verify.
    #[error("unsupported checksum kind {0}")]
    ChecksumKind(u8),
    /// The header's own checksum did not match.
    #[error("header checksum mismatch")]
    Checksum,
    /// A field with a value the format forbids.
    #[error("invalid header field {0}")]
    Field(&'static str),
}

impl SegmentHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut out = [0u8; SEGMENT_HEADER_LEN];
        out[0..8].copy_from_slice(&SEGMENT_MAGIC);
        out[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[10] = CHECKSUM_CRC32_SEEDED;
        out[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.seq.to_le_bytes());
        out[24..32].copy_from_slice(&self.size.to_le_bytes());
        let crc = crc32fast::hash(&out[0..60]);
        out[60..64].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and verifies a header.
    pub fn decode(bytes: &[u8; SEGMENT_HEADER_LEN]) -> Result<SegmentHeader, HeaderError> {
        if bytes[0..8] != SEGMENT_MAGIC {
            return Err(HeaderError::Magic);
        }
        let crc = u32::from_le_bytes(bytes[60..64].try_into().expect("4 bytes"));
        if crc32fast::hash(&bytes[0..60]) != crc {
            return Err(HeaderError::Checksum);
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != FORMAT_VERSION {
            return Err(HeaderError::Version(version));
        }
        if bytes[10] != CHECKSUM_CRC32_SEEDED {
            return Err(HeaderError::ChecksumKind(bytes[10]));
        }
        if bytes[11] != 0 || bytes[32..60].iter().any(|&b| b != 0) {
            return Err(HeaderError::Field("reserved"));
        }
        let header_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        if header_len as usize != SEGMENT_HEADER_LEN {
            return Err(HeaderError::Field("header_len"));
        }
        let seq = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        let size = u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes"));
        if size < (SEGMENT_HEADER_LEN + crate::record::RECORD_HEADER_LEN) as u64
            || size > u64::from(u32::MAX)
        {
            return Err(HeaderError::Field("size"));
        }
        Ok(SegmentHeader { seq, size })
    }
}

/// The file name of live segment `seq`.
pub fn segment_file_name(seq: u64) -> String {
    format!("{seq:020}{SEGMENT_SUFFIX}")
}

/// The sequence number in a live segment's file name, if it is one.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A read-only view of a segment from which entry payloads are sliced.
///
/// On a real disk this is a shared read-only mapping of the whole (fixed-size) file wrapped in one
/// [`Bytes`], so every payload handed out is a zero-copy slice of the map. The map's owner holds a
/// token whose [`Weak`] the log keeps: once the log drops its own handle, the token is gone exactly
/// when no slice is alive any more, which is the condition for rewriting the file in place.
#[derive(Clone)]
pub enum ReadView {
    /// A memory map of the file.
    Mapped {
        /// The whole file.
        bytes: Bytes,
        /// Alive while any slice of `bytes` is.
        alive: Weak<()>,
    },
    /// Reads copied out of a file that cannot be mapped (the simulated disk).
    Copied(Arc<dyn StorageFile>),
}

impl std::fmt::Debug for ReadView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadView::Mapped { bytes, .. } => write!(f, "Mapped({} bytes)", bytes.len()),
            ReadView::Copied(_) => write!(f, "Copied"),
        }
    }
}

impl ReadView {
    /// The bytes at `offset..offset + len`.
    pub fn slice(&self, offset: usize, len: usize) -> std::io::Result<Bytes> {
        match self {
            ReadView::Mapped { bytes, .. } => {
                let end = offset.checked_add(len).filter(|&end| end <= bytes.len());
                match end {
                    Some(end) => Ok(bytes.slice(offset..end)),
                    None => Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "read past the end of a segment",
                    )),
                }
            }
            ReadView::Copied(file) => {
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, offset as u64)?;
                Ok(Bytes::from(buf))
            }
        }
    }

    /// The payload at `offset..offset + len` of an entry and its tag: the byte just before the
    /// payload, the last of the entry's header (see `FORMAT.md`). Zero-copy like [`Self::slice`]
    /// on a mapped view.
    pub(crate) fn entry(&self, offset: usize, len: usize) -> std::io::Result<(u8, Bytes)> {
        let out_of_range = || {
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the end of a segment")
        };
        let header_end = offset.checked_sub(1).ok_or_else(out_of_range)?;
        match self {
            ReadView::Mapped { bytes, .. } => {
                let end = offset.checked_add(len).filter(|&end| end <= bytes.len());
                match end {
                    Some(end) => Ok((bytes[header_end], bytes.slice(offset..end))),
                    None => Err(out_of_range()),
                }
            }
            ReadView::Copied(file) => {
                let mut buf = vec![0u8; len + 1];
                file.read_exact_at(&mut buf, header_end as u64)?;
                let tag = buf[0];
                Ok((tag, Bytes::from(buf).slice(1..)))
            }
        }
    }

    /// A handle that says whether any slice of a mapped view is still alive once every [`ReadView`]
    /// has been dropped (`None` for views that copy).
    pub fn liveness(&self) -> Option<Weak<()>> {
        match self {
            ReadView::Mapped { alive, .. } => Some(alive.clone()),
            ReadView::Copied(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_detects_every_bit_flip() {
        let header = SegmentHeader { seq: 77, size: 1 << 20 };
        let bytes = header.encode();
        assert_eq!(SegmentHeader::decode(&bytes), Ok(header));
        for bit in 0..SEGMENT_HEADER_LEN * 8 {
            let mut damaged = bytes;
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(SegmentHeader::decode(&damaged).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn a_version_1_header_is_refused() {
        let mut bytes = SegmentHeader { seq: 3, size: 1 << 20 }.encode();
        bytes[8..10].copy_from_slice(&1u16.to_le_bytes());
        let crc = crc32fast::hash(&bytes[0..60]);
        bytes[60..64].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(SegmentHeader::decode(&bytes), Err(HeaderError::Version(1)));
    }

    #[test]
    fn file_names_round_trip() {
        assert_eq!(parse_segment_file_name(&segment_file_name(12)), Some(12));
        assert_eq!(parse_segment_file_name("12.seg"), None);
        assert_eq!(parse_segment_file_name("0000000000000000001x.seg"), None);
    }
}

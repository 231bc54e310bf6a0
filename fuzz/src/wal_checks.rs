// The checks shared by the fuzz targets (`fuzz/src/lib.rs`) and the corpus replay under
// `cargo test` (`wal/tests/fuzz_corpus.rs`): both `include!` this one file, so they cannot drift
// apart. It holds items only (no inner attributes or doc), and uses nothing but `flotilla-wal`,
// `bytes` and `std`, which both crates have.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use flotilla_wal::io::Storage;
use flotilla_wal::record::{
    Item, RECORD_ALIGN, RECORD_TYPE_BATCH, decode_header, decode_record, encode_record, items,
    padded_record_len, validate_body,
};
use flotilla_wal::segment::{SEGMENT_HEADER_LEN, SegmentHeader, parse_segment_file_name};
use flotilla_wal::sim::SimStorage;
use flotilla_wal::{
    Config, GroupId, GroupState, HardState, Op, RecoveryMode, Wal, WriteBatch, WriterMode,
};

include!("capped_alloc.rs");

#[global_allocator]
static ALLOCATOR: CappedAlloc = CappedAlloc;

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

    /// Whether every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
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

    /// The next 4 bytes, little-endian (zero-padded past the end).
    pub fn u32(&mut self) -> u32 {
        let mut bytes = [0u8; 4];
        let taken = self.take(4);
        bytes[..taken.len()].copy_from_slice(taken);
        u32::from_le_bytes(bytes)
    }

    /// The next 8 bytes, little-endian (zero-padded past the end).
    pub fn u64(&mut self) -> u64 {
        let mut bytes = [0u8; 8];
        let taken = self.take(8);
        bytes[..taken.len()].copy_from_slice(taken);
        u64::from_le_bytes(bytes)
    }
}

/// Target `record_decode`: arbitrary bytes through every decoder. Input: an 8-byte segment
/// sequence number (the checksum seed), then anything. Nothing may panic, and whatever decodes
/// must re-encode to exactly the bytes it came from.
pub fn check_record_decode(data: &[u8]) {
    let mut cursor = Cursor::new(data);
    let seq = cursor.u64();
    let rest = cursor.take(usize::MAX);
    check_record_bytes(data, seq);
    check_record_bytes(rest, seq);
    if let Some(after_header) = rest.get(SEGMENT_HEADER_LEN..) {
        check_record_bytes(after_header, seq);
    }
    for bytes in [data, rest] {
        if let Some(head) = bytes.first_chunk::<SEGMENT_HEADER_LEN>()
            && let Ok(header) = SegmentHeader::decode(head)
        {
            assert_eq!(&header.encode(), head, "a segment header decodes from one encoding only");
        }
        check_body(bytes);
    }
}

fn check_record_bytes(bytes: &[u8], seq: u64) {
    let header = decode_header(bytes, seq);
    if let Ok((decoded, body)) = decode_record(bytes, seq) {
        assert_eq!(header, Ok(decoded));
        assert_eq!(decoded.record_type, RECORD_TYPE_BATCH);
        assert_eq!(body.len(), decoded.body_len as usize);
        assert!(decoded.durable_seq < decoded.write_seq);
        let padded = decoded.padded_len();
        assert!(padded <= bytes.len() && padded.is_multiple_of(RECORD_ALIGN));
        let mut again = Vec::new();
        encode_record(&mut again, seq, decoded.write_seq, decoded.durable_seq, body);
        assert_eq!(again, bytes[..padded], "a record decodes from one encoding only");
        check_body(body);
    }
}

/// Every view of a body agrees: `validate_body`, `items` and `decode_body` accept the same
/// bodies, and an accepted body re-encodes to itself.
fn check_body(body: &[u8]) {
    let valid = validate_body(body);
    let mut count = 0;
    let mut failed = None;
    for item in items(body) {
        match item {
            Ok(Item::Entries { entries, .. }) => {
                let claimed = entries.len();
                let mut seen = 0;
                for (_term, tag, offset, payload) in entries {
                    assert_eq!(body[offset - 1], tag, "the tag is the byte before the payload");
                    assert_eq!(&body[offset..offset + payload.len()], payload);
                    seen += 1;
                }
                assert_eq!(seen, claimed);
                count += 1;
            }
            Ok(_) => count += 1,
            Err(error) => {
                assert!(failed.is_none(), "items() goes on after an error");
                failed = Some(error);
            }
        }
    }
    assert_eq!(valid, failed.map_or(Ok(()), Err));
    match WriteBatch::decode_body(body) {
        Ok(batch) => {
            assert!(valid.is_ok());
            assert_eq!(batch.ops().len(), count);
            assert_eq!(batch.encoded_len(), body.len());
            assert_eq!(batch.encode_body(), body, "a body decodes from one encoding only");
        }
        Err(error) => assert_eq!(valid, Err(error)),
    }
}

/// Reads a batch description: up to 32 operations, each a kind byte and its fields (entries: a
/// count byte, the first index, then per entry its term, tag byte, length byte and payload);
/// indexes are kept valid (`first_index >= 1` without overflow, `from >= 1`), everything else is
/// as read.
pub fn read_batch(cursor: &mut Cursor<'_>) -> WriteBatch {
    let mut batch = WriteBatch::new();
    while !cursor.is_empty() && batch.ops().len() < 32 {
        let kind = cursor.u8() % 5;
        let group = GroupId(cursor.u64());
        let op = match kind {
            0 => {
                let count = 1 + u64::from(cursor.u8() % 8);
                let first_index = cursor.u64().clamp(1, u64::MAX - count);
                let entries = (0..count)
                    .map(|_| {
                        let term = cursor.u64();
                        let tag = cursor.u8();
                        let len = usize::from(cursor.u8());
                        (term, tag, Bytes::copy_from_slice(cursor.take(len)))
                    })
                    .collect();
                Op::Entries { group, first_index, entries }
            }
            1 => {
                let state =
                    HardState { term: cursor.u64(), vote: cursor.u64(), commit: cursor.u64() };
                Op::HardState { group, state }
            }
            2 => Op::Truncate { group, from: cursor.u64().max(1) },
            3 => Op::Compact { group, index: cursor.u64(), term: cursor.u64() },
            _ => Op::RemoveGroup { group },
        };
        batch.push(op);
    }
    batch
}

/// Target `batch_roundtrip`. Input: segment sequence number, write sequence number, durable
/// sequence number (both made valid), a bit to flip, 0–15 trailing bytes, then a batch
/// ([`read_batch`]). The batch and its record round-trip, and the flipped bit, a cut, or trailing
/// bytes are handled as the format says.
pub fn check_batch_roundtrip(data: &[u8]) {
    let mut cursor = Cursor::new(data);
    let segment_seq = cursor.u64();
    let write_seq = cursor.u64().max(1);
    let durable_seq = cursor.u64() % write_seq;
    let damage = cursor.u32() as usize;
    let trailing_len = usize::from(cursor.u8() % 16);
    let trailing = cursor.take(trailing_len);
    let batch = read_batch(&mut cursor);

    let body = batch.encode_body();
    assert_eq!(body.len(), batch.encoded_len());
    assert_eq!(WriteBatch::decode_body(&body).as_ref(), Ok(&batch));

    let mut record = Vec::new();
    encode_record(&mut record, segment_seq, write_seq, durable_seq, &body);
    assert_eq!(record.len(), padded_record_len(body.len()));
    let (header, decoded) = decode_record(&record, segment_seq).expect("a fresh record decodes");
    assert_eq!(
        (header.write_seq, header.durable_seq, header.body_len as usize, header.record_type),
        (write_seq, durable_seq, body.len(), RECORD_TYPE_BATCH)
    );
    assert_eq!(header.padded_len(), record.len());
    assert_eq!(decoded, &body[..]);

    // Bytes after the record (the next one, or garbage) change nothing.
    let mut longer = record.clone();
    longer.extend_from_slice(trailing);
    assert_eq!(decode_record(&longer, segment_seq), Ok((header, &body[..])));
    // A record cut anywhere does not decode.
    let cut = damage % record.len();
    assert!(decode_record(&record[..cut], segment_seq).is_err(), "record cut at {cut} decoded");
    // Nor does one with any single bit flipped.
    let bit = damage % (record.len() * 8);
    record[bit / 8] ^= 1 << (bit % 8);
    assert!(decode_record(&record, segment_seq).is_err(), "flip of bit {bit} went unnoticed");
}

/// A file of the simulated disk: name and contents.
type Image = Vec<(String, Vec<u8>)>;

/// A log written by a deterministic workload, as its files looked before and after `close`, with
/// every entry it appended as `(term, tag, payload)` (each `(group, index)` is written once: no
/// overwrites).
struct Workload {
    unsealed: Image,
    sealed: Image,
    originals: BTreeMap<(GroupId, u64), (u64, u8, Bytes)>,
    states: BTreeMap<GroupId, GroupState>,
}

/// Small segments, so a small workload rotates, recycles and leaves spares: every file kind and
/// boundary is within reach of a few damaged bytes. Copying groups forward (`rewrite`) visits
/// them in `HashMap` order, which differs from process to process, so it is on only where one
/// group can qualify: otherwise an input would not mean the same image on every run.
fn recover_config(recovery: RecoveryMode) -> Config {
    Config {
        segment_bytes: 4096,
        batch_bytes_max: 2048,
        writer: WriterMode::Inline,
        recovery,
        ..Config::default()
    }
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn snapshot(disk: &SimStorage) -> Image {
    let names = disk.file_names();
    names.into_iter().filter_map(|name| Some((name.clone(), disk.contents(&name)?))).collect()
}

fn materialize(image: &Image) -> SimStorage {
    let disk = SimStorage::new();
    for (name, contents) in image {
        disk.create_prewritten(name, 0).expect("a new file on a fresh disk");
        disk.set_contents(name, contents.clone());
    }
    disk.sync_dir().expect("a directory sync on a fresh disk");
    disk
}

/// 1–3 groups (copied forward when there is one), 6–29 rounds of 1–3 distinct entries of 0–299
/// bytes with tags (0 among them), hard states, and for odd seeds a compaction of group 1 two
/// thirds of the way through.
fn run_workload(seed: u8) -> Workload {
    let mut rng = u64::from(seed) ^ 0xF107_111A;
    let groups = 1 + splitmix(&mut rng) % 3;
    let rounds = 6 + splitmix(&mut rng) % 24;
    let disk = SimStorage::new();
    let config = recover_config(RecoveryMode::Strict);
    let (wal, _) = Wal::open_with(Arc::new(disk.clone()), config).expect("a fresh log opens");
    let mut originals = BTreeMap::new();
    let mut next: HashMap<GroupId, u64> = HashMap::new();
    for round in 0..rounds {
        let group = GroupId(1 + splitmix(&mut rng) % groups);
        let first = *next.get(&group).unwrap_or(&1);
        let term = 1 + round / 8;
        let mut batch = WriteBatch::new();
        let count = 1 + splitmix(&mut rng) % 3;
        let entries: Vec<(u64, u8, Bytes)> = (0..count)
            .map(|k| {
                let len = (splitmix(&mut rng) % 300) as usize;
                let mut payload = format!("g{}i{} ", group.0, first + k).into_bytes();
                payload.extend((0..len).map(|_| splitmix(&mut rng) as u8));
                // Not drawn from `rng`: the workload's shape does not depend on the tags.
                let tag = ((group.0 + first + k) % 5 * 60) as u8;
                let payload = Bytes::from(payload);
                originals.insert((group, first + k), (term, tag, payload.clone()));
                (term, tag, payload)
            })
            .collect();
        batch.add_tagged_entries(group, first, entries);
        next.insert(group, first + count);
        if splitmix(&mut rng).is_multiple_of(3) {
            batch.set_hard_state(group, HardState { term, vote: group.0, commit: first });
        }
        if seed % 2 == 1 && round == rounds * 2 / 3 {
            let last = next.get(&GroupId(1)).map_or(0, |n| n - 1);
            if last > 2 {
                let term_at = originals[&(GroupId(1), last - 2)].0;
                batch.compact(GroupId(1), last - 2, term_at);
            }
        }
        wal.append_blocking(batch).expect("a workload append");
    }
    let states = wal.groups().into_iter().filter_map(|g| Some((g, wal.group_state(g)?))).collect();
    let unsealed = snapshot(&disk);
    wal.close().expect("a clean close");
    Workload { unsealed, sealed: snapshot(&disk), originals, states }
}

thread_local! {
    static WORKLOADS: RefCell<HashMap<u8, Rc<Workload>>> = RefCell::new(HashMap::new());
}

fn workload(seed: u8) -> Rc<Workload> {
    WORKLOADS.with(|cache| {
        Rc::clone(cache.borrow_mut().entry(seed).or_insert_with(|| Rc::new(run_workload(seed))))
    })
}

/// Applies one damage read from `cursor`: a kind byte, a file byte (index into the sorted file
/// names, modulo their count), then the kind's fields. Fields are read whatever the image, so an
/// input means the same on every image.
fn damage(image: &mut Image, cursor: &mut Cursor<'_>) {
    let kind = cursor.u8() % 5;
    let file = usize::from(cursor.u8());
    let (at, len, bytes) = match kind {
        0 => {
            let at = cursor.u32() as usize;
            let len = usize::from(cursor.u8() % 32) + 1;
            (at, len, cursor.take(len))
        }
        1 | 3 => (cursor.u32() as usize, 0, &[][..]),
        2 => (cursor.u32() as usize, usize::from(cursor.u8()) * 8, &[][..]),
        _ => (0, 0, &[][..]),
    };
    if image.is_empty() {
        return;
    }
    let file = file % image.len();
    let contents = &mut image[file].1;
    let size = contents.len();
    match kind {
        // Overwrite bytes.
        0 if size > 0 => {
            let at = at % size;
            let end = (at + bytes.len()).min(size);
            contents[at..end].copy_from_slice(&bytes[..end - at]);
        }
        // Flip one bit.
        1 if size > 0 => {
            let bit = at % (size * 8);
            contents[bit / 8] ^= 1 << (bit % 8);
        }
        // Zero a range (a lost write).
        2 if size > 0 => {
            let at = at % size;
            let end = (at + len).min(size);
            contents[at..end].fill(0);
        }
        // Truncate the file.
        3 => contents.truncate(at % (size + 1)),
        // Remove the file.
        4 => {
            image.remove(file);
        }
        _ => {}
    }
}

/// Whether `damaged` holds a checksum-valid record that `original` does not hold at the same
/// place: the damage forged a record (a CRC cannot stop that), so its contents prove nothing.
fn forged(original: &Image, damaged: &Image) -> bool {
    damaged.iter().any(|(name, bytes)| {
        let Some(seq) = parse_segment_file_name(name) else { return false };
        let before = original.iter().find(|(n, _)| n == name).map(|(_, b)| b.as_slice());
        (SEGMENT_HEADER_LEN..bytes.len()).step_by(RECORD_ALIGN).any(|at| {
            decode_record(&bytes[at..], seq).is_ok_and(|(header, _)| {
                let span = at..at + header.padded_len();
                before.and_then(|b| b.get(span.clone())) != Some(&bytes[span])
            })
        })
    })
}

/// Reads every group back and checks each entry (term, tag, payload) against what was written at
/// its index.
fn check_entries(
    wal: &Wal,
    originals: &BTreeMap<(GroupId, u64), (u64, u8, Bytes)>,
    forged: &mut dyn FnMut() -> bool,
) {
    for group in wal.groups() {
        let state = wal.group_state(group).expect("a listed group has a state");
        if state.last_index < state.first_index {
            continue;
        }
        let entries = wal
            .entries(group, state.first_index..state.last_index + 1)
            .expect("the log reads back the range it reports");
        assert_eq!(entries.len() as u64, state.last_index - state.first_index + 1);
        for (entry, index) in entries.iter().zip(state.first_index..) {
            assert_eq!(entry.index, index);
            let right = originals.get(&(group, index)).is_some_and(|(term, tag, payload)| {
                entry.term == *term && entry.tag == *tag && entry.payload == *payload
            });
            assert!(
                right || forged(),
                "recovery returned wrong bytes: group {group} index {index} term {} tag {} \
                 payload {:?}, written: {:?}",
                entry.term,
                entry.tag,
                entry.payload,
                originals.get(&(group, index)),
            );
        }
    }
}

/// Target `recover_image`. Input: a workload seed byte, a flags byte (bit 0: the image before
/// `close`, without the sealing round; bit 1: `RecoveryMode::TruncateCorrupt`), then up to 16
/// damages ([`damage`]). Opening the damaged image returns `Ok` or a typed error, never panics;
/// an opened log returns no entry with bytes other than those written at its index, takes an
/// append, and reopens after `close` with that append and again no wrong bytes.
pub fn check_recover_image(data: &[u8]) {
    let mut cursor = Cursor::new(data);
    let seed = cursor.u8();
    let flags = cursor.u8();
    let workload = workload(seed);
    let original = if flags & 1 == 1 { &workload.unsealed } else { &workload.sealed };
    let mode = if flags & 2 == 2 { RecoveryMode::TruncateCorrupt } else { RecoveryMode::Strict };
    let mut image = original.clone();
    for _ in 0..16 {
        if cursor.is_empty() {
            break;
        }
        damage(&mut image, &mut cursor);
    }
    let disk = materialize(&image);
    let config = recover_config(mode);
    let Ok((wal, _recovery)) = Wal::open_with(Arc::new(disk.clone()), config.clone()) else {
        return;
    };
    let mut forged_memo = None;
    let mut is_forged = || *forged_memo.get_or_insert_with(|| forged(original, &image));
    check_entries(&wal, &workload.originals, &mut is_forged);
    if image == *original {
        for (group, state) in &workload.states {
            assert_eq!(wal.group_state(*group).as_ref(), Some(state), "undamaged group {group}");
        }
    }

    let group = GroupId(1 << 40);
    let payload = Bytes::from_static(b"appended after recovery");
    let mut batch = WriteBatch::new();
    batch.add_tagged_entries(group, 1, [(7, 0xC3, payload.clone())]);
    wal.append_blocking(batch).expect("a recovered log takes an append");
    let appended = &wal.entries(group, 1..2).expect("the append reads back")[0];
    assert_eq!((appended.tag, &appended.payload), (0xC3, &payload));
    wal.close().expect("a recovered log closes");

    let reopened = Wal::open_with(Arc::new(materialize(&snapshot(&disk))), config);
    let wal = match reopened {
        Ok((wal, _)) => wal,
        Err(error) => {
            panic!("a log that opened, took an append and closed does not reopen: {error}")
        }
    };
    let mut originals = workload.originals.clone();
    originals.insert((group, 1), (7, 0xC3, payload));
    check_entries(&wal, &originals, &mut is_forged);
    assert_eq!(wal.group_state(group).map(|s| s.last_index), Some(1), "the append survives");
}

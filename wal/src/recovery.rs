//! Recovery: find the live segments, verify every record, rebuild the index, and decide what a
//! damaged record means.
//!
//! The rule (drawn in `wal/FORMAT.md`): records form one chain of rounds numbered 1, 2, 3, …; each
//! round's header claims (`durable_seq`) that every round up to that number had been fdatasync'd
//! before it was written. Scanning stops at the first slot that does not hold the next round. If
//! any valid round found *after* that slot claims the missing round durable, the damage hit synced
//! data: corruption, and `open` refuses (or, opted in, truncates and reports). Otherwise the slot
//! is the unsynced tail a crash left behind — nothing there was ever acknowledged — and the log is
//! cut there.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::config::RecoveryMode;
use crate::error::WalError;
use crate::index::{Bounds, Index, IndexOp};
use crate::io::{Storage, StorageFile};
use crate::record::{self, Item, RECORD_ALIGN, RECORD_HEADER_LEN, RECORD_TYPE_BATCH};
use crate::segment::{SEGMENT_HEADER_LEN, SPARE_SUFFIX, SegmentHeader, parse_segment_file_name};
use crate::{GroupId, GroupState};

/// What recovery found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// Live segments scanned.
    pub segments: usize,
    /// Valid records (rounds) replayed.
    pub records: u64,
    /// Bytes of valid records replayed.
    pub bytes: u64,
    /// Where an unsynced tail left by a crash was cut: `(segment, offset)`.
    pub torn_tail: Option<(u64, u64)>,
    /// Where damage to synced data was cut under [`RecoveryMode::TruncateCorrupt`]:
    /// `(segment, offset, reason)`. The groups written after it must be repaired from peers.
    pub corruption_truncated: Option<(u64, u64, String)>,
    /// Segments after the cut that were discarded (they held only unacknowledged rounds).
    pub discarded_segments: usize,
}

/// What `Wal::open` returns besides the log: every group's state, and the report.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Recovery {
    /// Per group: first and last index, hard state, compaction point.
    pub groups: BTreeMap<GroupId, GroupState>,
    /// What recovery found and did.
    pub report: RecoveryReport,
}

/// One live segment after recovery.
pub(crate) struct LiveSegment {
    pub seq: u64,
    pub file: Arc<dyn StorageFile>,
    pub size: u64,
}

/// The state recovery hands to the log.
pub(crate) struct Recovered {
    pub index: Index,
    pub segments: Vec<LiveSegment>,
    /// Write offset in the newest segment.
    pub active_offset: u64,
    /// Sequence number of the next round.
    pub next_write_seq: u64,
    /// Files left over from preparation or recycling, free to reuse: `(name, file, size)`.
    pub spares: Vec<(String, Arc<dyn StorageFile>, u64)>,
    /// The highest segment sequence number found in any live segment or readable spare header.
    /// New segments are numbered above it: a number is never reused in a directory, because a
    /// reused file still holds rounds checksummed for the number it had (stale rounds would
    /// validate again), and spare names (`{seq}.tmp`) stay unique.
    pub max_seq_seen: u64,
    pub report: RecoveryReport,
}

/// Where scanning a segment stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The slot is all zeros: never written.
    Zero,
    /// The slot holds bytes that are not the next round.
    Invalid,
    /// The segment has no room for another record header.
    End,
}

struct Scan<'a> {
    storage: &'a dyn Storage,
    mode: RecoveryMode,
    segments: Vec<(u64, Arc<dyn StorageFile>, u64)>,
    buffers: Vec<Option<Contents>>,
}

/// A segment's bytes while recovery reads them.
enum Contents {
    /// A read-only map of a real file: no copy, no zero-filled heap buffer, and the kernel reads
    /// ahead while recovery verifies.
    Mapped(memmap2::Mmap),
    /// Read into memory (files that cannot be mapped: the simulated disk).
    Read(Vec<u8>),
}

impl std::ops::Deref for Contents {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Contents::Mapped(map) => map,
            Contents::Read(buf) => buf,
        }
    }
}

impl Contents {
    fn load(file: &dyn StorageFile, size: u64) -> Result<Contents, WalError> {
        if let Some(std_file) = file.as_std() {
            // SAFETY: read-only and private to recovery; segment files have a fixed size for
            // life and are never truncated, and other processes are kept out by the directory
            // lock. The only write while the map lives is `cut_tail`'s zeroing, after its
            // reads of the map.
            let map = unsafe { memmap2::MmapOptions::new().len(size as usize).map(std_file) }
                .map_err(|e| WalError::io("mapping a segment", e))?;
            // No `madvise`: the kernel's default fault-driven readahead measured fastest here
            // (`WillNeed` + `Sequential` halved the rate).
            return Ok(Contents::Mapped(map));
        }
        let mut buf = vec![0u8; size as usize];
        file.read_exact_at(&mut buf, 0).map_err(|e| WalError::io("reading a segment", e))?;
        Ok(Contents::Read(buf))
    }
}

impl Scan<'_> {
    fn contents(&mut self, i: usize) -> Result<&[u8], WalError> {
        if self.buffers[i].is_none() {
            let (_, file, size) = &self.segments[i];
            self.buffers[i] = Some(Contents::load(file.as_ref(), *size)?);
        }
        Ok(self.buffers[i].as_deref().expect("filled above"))
    }
}

/// A valid round that continues the chain at `expected` (any round when `expected` is `None`).
fn round_at(
    bytes: &[u8],
    pos: usize,
    seq: u64,
    expected: Option<u64>,
) -> Option<(record::RecordHeader, &[u8])> {
    let slot = bytes.get(pos..)?;
    let (header, body) = record::decode_record(slot, seq).ok()?;
    expected.is_none_or(|e| header.write_seq == e).then_some((header, body))
}

/// Cheap test before a checksum: could an aligned slot hold a round numbered `>= min_seq`?
fn plausible(bytes: &[u8], pos: usize, min_seq: u64) -> bool {
    let Some(head) = bytes.get(pos..pos + RECORD_HEADER_LEN) else { return false };
    let write_seq = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    head[4] == RECORD_TYPE_BATCH
        && head[5..8] == [0, 0, 0]
        && write_seq >= min_seq
        && write_seq < min_seq.saturating_add(1 << 32)
}

pub(crate) fn recover(storage: &dyn Storage, mode: RecoveryMode) -> Result<Recovered, WalError> {
    let mut live: Vec<(u64, String)> = Vec::new();
    let mut spares = Vec::new();
    let mut max_seq_seen = 0u64;
    for name in storage.list().map_err(|e| WalError::io("listing the directory", e))? {
        if let Some(seq) = parse_segment_file_name(&name) {
            live.push((seq, name));
        } else if name.ends_with(SPARE_SUFFIX) {
            let file = storage.open(&name).map_err(|e| WalError::io("opening a spare", e))?;
            let size = file.len().map_err(|e| WalError::io("sizing a spare", e))?;
            // Both the header's number and the name's count: a spare is named after the segment
            // it was retired from (or is being prepared as), and its header may be unreadable.
            let named = name.strip_suffix(SPARE_SUFFIX).and_then(|d| d.parse::<u64>().ok());
            max_seq_seen = max_seq_seen.max(spare_seq(file.as_ref(), size)).max(named.unwrap_or(0));
            spares.push((name, file, size));
        }
    }
    if let Some((seq, _)) = live.iter().max() {
        max_seq_seen = max_seq_seen.max(*seq);
    }
    live.sort_unstable();
    for (name, _, _) in &spares {
        let number = name.strip_suffix(SPARE_SUFFIX).and_then(|digits| digits.parse::<u64>().ok());
        if let Some(seq) = number.filter(|seq| live.iter().any(|(live, _)| live == seq)) {
            // Numbers are never reused, so this directory was changed from outside.
            return Err(WalError::Corrupt {
                segment: seq,
                offset: 0,
                reason: format!("spare {name} shares its number with a live segment"),
            });
        }
    }
    // Sequence numbers increase but may skip (numbers of discarded segments are never reused). A
    // missing segment shows as a break in the chain of rounds, which a later round's durability
    // claim turns into `Corrupt`.
    let mut segments = Vec::with_capacity(live.len());
    let mut header_cut: Option<(u64, String)> = None;
    for (seq, name) in &live {
        if header_cut.is_some() {
            // After a damaged header under `TruncateCorrupt`: everything later goes too.
            discard(storage, *seq, name, &mut spares)?;
            continue;
        }
        let file = storage.open(name).map_err(|e| WalError::io("opening a segment", e))?;
        let len = file.len().map_err(|e| WalError::io("sizing a segment", e))?;
        let corrupt = |reason: String| WalError::Corrupt { segment: *seq, offset: 0, reason };
        if len < SEGMENT_HEADER_LEN as u64 {
            return Err(corrupt(format!("file is {len} bytes, shorter than a header")));
        }
        let mut head = [0u8; SEGMENT_HEADER_LEN];
        file.read_exact_at(&mut head, 0).map_err(|e| WalError::io("reading a header", e))?;
        let checked = SegmentHeader::decode(&head).map_err(|e| e.to_string()).and_then(|header| {
            if header.seq != *seq {
                Err(format!("header says segment {}", header.seq))
            } else if header.size != len {
                Err(format!("file is {len} bytes, header says {}", header.size))
            } else {
                Ok(())
            }
        });
        match checked {
            Ok(()) => segments.push((*seq, file, len)),
            Err(reason) if mode == RecoveryMode::TruncateCorrupt => {
                drop(file);
                discard(storage, *seq, name, &mut spares)?;
                header_cut = Some((*seq, reason));
            }
            Err(reason) => return Err(corrupt(reason)),
        }
    }
    if header_cut.is_some() {
        storage.sync_dir().map_err(|e| WalError::io("syncing the directory", e))?;
    }
    let count = segments.len();
    let scan = Scan { storage, mode, segments, buffers: (0..count).map(|_| None).collect() };
    let mut recovered = scan.run(spares)?;
    recovered.max_seq_seen = max_seq_seen;
    if let Some((seq, reason)) = header_cut
        && recovered.report.corruption_truncated.is_none()
    {
        recovered.report.corruption_truncated = Some((seq, 0, reason));
    }
    Ok(recovered)
}

/// Renames live segment `seq` aside as a spare (recovery decided it holds nothing to keep).
fn discard(
    storage: &dyn Storage,
    seq: u64,
    name: &str,
    spares: &mut Vec<(String, Arc<dyn StorageFile>, u64)>,
) -> Result<(), WalError> {
    let spare = format!("{seq:020}{SPARE_SUFFIX}");
    storage.rename(name, &spare).map_err(|e| WalError::io("discarding a segment", e))?;
    let file = storage.open(&spare).map_err(|e| WalError::io("opening a spare", e))?;
    let size = file.len().map_err(|e| WalError::io("sizing a spare", e))?;
    spares.push((spare, file, size));
    Ok(())
}

/// The sequence number in a spare's header, if it has a readable one (0 otherwise; the number in
/// its name then still counts).
fn spare_seq(file: &dyn StorageFile, size: u64) -> u64 {
    if size < SEGMENT_HEADER_LEN as u64 {
        return 0;
    }
    let mut head = [0u8; SEGMENT_HEADER_LEN];
    if file.read_exact_at(&mut head, 0).is_err() {
        return 0;
    }
    SegmentHeader::decode(&head).map_or(0, |header| header.seq)
}

impl Scan<'_> {
    fn run(
        mut self,
        mut spares: Vec<(String, Arc<dyn StorageFile>, u64)>,
    ) -> Result<Recovered, WalError> {
        let mut index = Index::default();
        let mut report = RecoveryReport { segments: self.segments.len(), ..Default::default() };
        let mut expected: Option<u64> = None;
        let mut cut: Option<(usize, usize)> = None;

        for i in 0..self.segments.len() {
            let seq = self.segments[i].0;
            let mut pos = SEGMENT_HEADER_LEN;
            let stop = loop {
                let bytes = self.contents(i)?;
                if pos + RECORD_HEADER_LEN > bytes.len() {
                    break Stop::End;
                }
                if record::is_zero_header(&bytes[pos..]) {
                    break Stop::Zero;
                }
                let Some((header, body)) = round_at(bytes, pos, seq, expected) else {
                    break Stop::Invalid;
                };
                let body_offset = (pos + RECORD_HEADER_LEN) as u64;
                if let Err(reason) = replay(&mut index, body, seq, body_offset) {
                    let reason = format!("round checksummed but does not replay: {reason}");
                    if self.mode == RecoveryMode::Strict {
                        return Err(WalError::Corrupt { segment: seq, offset: pos as u64, reason });
                    }
                    report.corruption_truncated = Some((seq, pos as u64, reason));
                    break Stop::Invalid;
                }
                report.records += 1;
                report.bytes += header.padded_len() as u64;
                expected = Some(header.write_seq + 1);
                pos += header.padded_len();
            };
            if report.corruption_truncated.is_some() {
                cut = Some((i, pos));
                break;
            }
            let continues = i + 1 < self.segments.len() && {
                let next_seq = self.segments[i + 1].0;
                let next = self.contents(i + 1)?;
                round_at(next, SEGMENT_HEADER_LEN, next_seq, expected).is_some()
            };
            let after = self.rounds_in_rest(i, pos, expected)?;
            if continues && !after.in_segment {
                // Done with this segment: recovery holds at most the segments it still reads.
                self.buffers[i] = None;
                continue;
            }
            let after = self.rounds_later(i, expected, after)?;
            let missing = expected.unwrap_or(1);
            if after.claim.is_some_and(|claim| claim >= missing) {
                let reason = format!(
                    "round {missing} is damaged or missing but a later round claims it synced"
                );
                if self.mode == RecoveryMode::Strict {
                    return Err(WalError::Corrupt { segment: seq, offset: pos as u64, reason });
                }
                report.corruption_truncated = Some((seq, pos as u64, reason));
            } else if stop == Stop::Invalid || after.in_segment || after.later {
                report.torn_tail = Some((seq, pos as u64));
            }
            cut = Some((i, pos));
            break;
        }

        let (last, active_offset) = match cut {
            Some((i, pos)) => {
                self.cut_tail(i, pos, expected.unwrap_or(1))?;
                (i, pos as u64)
            }
            None => (self.segments.len().saturating_sub(1), SEGMENT_HEADER_LEN as u64),
        };
        // Segments after the cut hold only rounds that were never acknowledged (or nothing).
        if last + 1 < self.segments.len() {
            for (seq, file, size) in self.segments.drain(last + 1..) {
                let spare = format!("{seq:020}{SPARE_SUFFIX}");
                let name = crate::segment::segment_file_name(seq);
                self.storage.rename(&name, &spare).map_err(|e| WalError::io("discarding", e))?;
                if report.torn_tail.is_some() || report.corruption_truncated.is_some() {
                    report.discarded_segments += 1;
                }
                spares.push((spare, file, size));
            }
            self.storage.sync_dir().map_err(|e| WalError::io("syncing the directory", e))?;
        }
        let mut segments = Vec::with_capacity(self.segments.len());
        for (seq, file, size) in self.segments.drain(..) {
            // What was recovered may sit only in the page cache (the process died, the machine
            // did not): make it durable before any later round claims it.
            file.sync_data().map_err(|e| WalError::io("syncing a recovered segment", e))?;
            segments.push(LiveSegment { seq, file, size });
        }
        Ok(Recovered {
            index,
            segments,
            active_offset,
            next_write_seq: expected.unwrap_or(1),
            spares,
            max_seq_seen: 0,
            report,
        })
    }

    /// Looks for valid rounds numbered at least `expected` in the rest of segment `i` after a
    /// stop at `pos`, at every aligned slot (a damaged first round must not hide the valid ones
    /// behind it, nor their durability claims).
    fn rounds_in_rest(
        &mut self,
        i: usize,
        pos: usize,
        expected: Option<u64>,
    ) -> Result<RoundsAfter, WalError> {
        let seq = self.segments[i].0;
        let min_seq = expected.unwrap_or(1);
        let (claim, in_segment) =
            scan_for_rounds(self.contents(i)?, seq, pos + RECORD_ALIGN, min_seq);
        Ok(RoundsAfter { claim, in_segment, later: false })
    }

    /// Adds to `after` (see [`Scan::rounds_in_rest`]) the valid rounds numbered at least
    /// `expected` in every segment after `i`. Only needed where the chain stops for good: while
    /// it continues into the next segment, the scan reads the later segments itself.
    fn rounds_later(
        &mut self,
        i: usize,
        expected: Option<u64>,
        mut after: RoundsAfter,
    ) -> Result<RoundsAfter, WalError> {
        let min_seq = expected.unwrap_or(1);
        for j in i + 1..self.segments.len() {
            let seq = self.segments[j].0;
            let (claim, found) =
                scan_for_rounds(self.contents(j)?, seq, SEGMENT_HEADER_LEN, min_seq);
            after.claim = after.claim.max(claim);
            after.later |= found;
        }
        Ok(after)
    }

    /// Zeroes segment `i` from `pos` through the last valid round numbered at least `min_seq`
    /// found after it — so a later open cannot take those unacknowledged rounds for a
    /// continuation of rounds written after this one — and syncs it.
    fn cut_tail(&mut self, i: usize, pos: usize, min_seq: u64) -> Result<(), WalError> {
        let seq = self.segments[i].0;
        let bytes = self.contents(i)?;
        if pos + RECORD_HEADER_LEN > bytes.len() || record::is_zero_header(&bytes[pos..]) {
            // Nothing written at the cut: if nothing valid follows either, there is nothing to do.
            let any = (pos + RECORD_ALIGN..bytes.len().saturating_sub(RECORD_HEADER_LEN - 1))
                .step_by(RECORD_ALIGN)
                .any(|at| {
                    plausible(bytes, at, min_seq) && round_at(bytes, at, seq, None).is_some()
                });
            if !any {
                return Ok(());
            }
        }
        let mut end = (pos + RECORD_HEADER_LEN).min(bytes.len());
        let mut at = pos + RECORD_ALIGN;
        while at + RECORD_HEADER_LEN <= bytes.len() {
            if plausible(bytes, at, min_seq)
                && let Some((header, _)) = round_at(bytes, at, seq, None)
            {
                end = end.max(at + header.padded_len());
                at += header.padded_len();
                continue;
            }
            at += RECORD_ALIGN;
        }
        let zeros = vec![0u8; end - pos];
        let file = &self.segments[i].1;
        file.write_all_at(&zeros, pos as u64).map_err(|e| WalError::io("cutting a tail", e))?;
        file.sync_data().map_err(|e| WalError::io("cutting a tail", e))?;
        Ok(())
    }
}

/// Scans every aligned slot of `bytes` from `from` for valid rounds numbered at least `min_seq`,
/// skipping over each one found; returns the highest durability claim and whether any was found.
fn scan_for_rounds(bytes: &[u8], seq: u64, from: usize, min_seq: u64) -> (Option<u64>, bool) {
    let mut claim = None;
    let mut found = false;
    let mut at = from;
    while at + RECORD_HEADER_LEN <= bytes.len() {
        if plausible(bytes, at, min_seq)
            && let Some((header, _)) = round_at(bytes, at, seq, None)
        {
            found = true;
            claim = claim.max(Some(header.durable_seq));
            at += header.padded_len();
            continue;
        }
        at += RECORD_ALIGN;
    }
    (claim, found)
}

/// Valid rounds found after the point where the chain stopped.
#[derive(Debug, Default)]
struct RoundsAfter {
    /// The highest `durable_seq` among them.
    claim: Option<u64>,
    /// Some lie in the same segment, after the stop.
    in_segment: bool,
    /// Some lie in later segments.
    later: bool,
}

/// Replays one round's items into the index, all or nothing: the round is checked against copies
/// of the touched groups' bounds first, so a failure leaves the index as it was.
fn replay(index: &mut Index, body: &[u8], seq: u64, body_offset: u64) -> Result<(), String> {
    record::validate_body(body).map_err(|e| format!("malformed body: {e}"))?;
    let mut bounds: HashMap<GroupId, Bounds> = HashMap::new();
    for item in record::items(body) {
        let item = item.map_err(|e| e.to_string())?;
        let group = item_group(&item);
        let current = bounds
            .entry(group)
            .or_insert_with(|| index.groups.get(&group).map_or_else(Bounds::new, |g| g.bounds));
        match item {
            Item::Entries { first_index, entries, .. } => {
                current.check_entries(first_index, false).map_err(|e| e.to_string())?;
                current.apply_entries(first_index, entries.len() as u64);
            }
            Item::Truncate { from, .. } => {
                current.check_truncate(from).map_err(|e| e.to_string())?;
                current.apply_truncate(from);
            }
            Item::Compact { index, .. } => current.apply_compact(index),
            Item::RemoveGroup { .. } => *current = Bounds::new(),
            Item::HardState { .. } => {}
        }
    }
    for item in record::items(body) {
        let op = match item.map_err(|e| e.to_string())? {
            Item::Entries { group, first_index, entries } => IndexOp::Entries {
                group,
                first_index,
                entries: entries.map(|(term, _tag, offset, payload)| (term, offset, payload.len())),
            },
            Item::HardState { group, state } => IndexOp::HardState { group, state },
            Item::Truncate { group, from } => IndexOp::Truncate { group, from },
            Item::Compact { group, index, term } => IndexOp::Compact { group, index, term },
            Item::RemoveGroup { group } => IndexOp::Remove { group },
        };
        index.apply(op, seq, body_offset, false).expect("checked against the same bounds above");
    }
    Ok(())
}

fn item_group(item: &Item<'_>) -> GroupId {
    match item {
        Item::Entries { group, .. }
        | Item::HardState { group, .. }
        | Item::Truncate { group, .. }
        | Item::Compact { group, .. }
        | Item::RemoveGroup { group } => *group,
    }
}

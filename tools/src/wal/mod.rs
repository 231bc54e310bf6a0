//! `flotilla-ctl wal …`: dump, verify and stat over a WAL directory, read-only.
//!
//! Everything here reads the directory through [`scan::scan`]: files are opened read-only, no lock
//! is taken and nothing is written, so it is safe on a copy of a live node's directory or on the
//! live directory itself (where the newest round may show as a torn tail while it is written).
//! It never calls `Wal::open`, which recovers and may cut the log.

pub mod scan;
pub mod state;

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;

use flotilla_wal::record::{self, Item};
use flotilla_wal::segment::segment_file_name;

use self::scan::{FileKind, Round, Scan, Severity};
use self::state::item_group;

/// What `wal dump` prints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DumpOptions {
    /// Only items of this group (and only records holding one).
    pub group: Option<u64>,
    /// Only entries at or above this index (and items touching it).
    pub from: Option<u64>,
    /// Only entries at or below this index (and items touching it).
    pub to: Option<u64>,
    /// Print every entry's payload (as escaped text).
    pub payloads: bool,
}

impl DumpOptions {
    fn filtered(&self) -> bool {
        self.group.is_some() || self.from.is_some() || self.to.is_some()
    }

    fn group_matches(&self, group: u64) -> bool {
        self.group.is_none_or(|g| g == group)
    }

    fn range(&self) -> (u64, u64) {
        (self.from.unwrap_or(0), self.to.unwrap_or(u64::MAX))
    }
}

/// Prints one round's items that pass the filter into `buf`; returns whether any did.
fn dump_round(buf: &mut String, round: &Round<'_>, options: &DumpOptions) -> bool {
    use std::fmt::Write as _;
    let (from, to) = options.range();
    let mut any = false;
    for item in record::items(round.body) {
        let item = match item {
            Ok(item) => item,
            Err(e) => {
                let _ = writeln!(buf, "  malformed item: {e}");
                return true;
            }
        };
        let group = item_group(&item);
        if !options.group_matches(group) {
            continue;
        }
        match item {
            Item::Entries { first_index, entries, .. } => {
                let count = entries.len() as u64;
                let last = first_index + count - 1;
                if last < from || first_index > to {
                    continue;
                }
                let _ = writeln!(
                    buf,
                    "  entries group {group} index {first_index}..={last} count {count}"
                );
                for (index, (term, tag, _, payload)) in (first_index..).zip(entries) {
                    if index < from || index > to {
                        continue;
                    }
                    let _ = write!(
                        buf,
                        "    entry group {group} index {index} term {term} tag {tag} len {}",
                        payload.len()
                    );
                    if options.payloads {
                        let _ = write!(buf, " payload \"{}\"", payload.escape_ascii());
                    }
                    buf.push('\n');
                }
            }
            Item::HardState { state, .. } => {
                let _ = writeln!(
                    buf,
                    "  hard_state group {group} term {} vote {} commit {}",
                    state.term, state.vote, state.commit
                );
            }
            Item::Truncate { from: cut, .. } => {
                if cut > to {
                    continue;
                }
                let _ = writeln!(buf, "  truncate group {group} from {cut}");
            }
            Item::Compact { index, term, .. } => {
                if index < from {
                    continue;
                }
                let _ = writeln!(buf, "  compact group {group} index {index} term {term}");
            }
            Item::RemoveGroup { .. } => {
                let _ = writeln!(buf, "  remove_group group {group}");
            }
        }
        any = true;
    }
    any
}

/// `wal dump`: every round of the log in order, with its items, filtered by `options`. Findings
/// (damage, a torn tail) go to `err`.
pub fn dump(
    dir: &Path,
    options: &DumpOptions,
    out: &mut impl Write,
    err: &mut impl Write,
) -> io::Result<Scan> {
    let mut failed: Option<io::Error> = None;
    let mut buf = String::new();
    let scan = scan::scan(dir, |round| {
        if failed.is_some() {
            return;
        }
        buf.clear();
        let any = dump_round(&mut buf, round, options);
        if any || !options.filtered() {
            let h = &round.header;
            let result = writeln!(
                out,
                "record {} offset {} write_seq {} durable_seq {} type {} body {}",
                round.file,
                round.offset,
                h.write_seq,
                h.durable_seq,
                record_type_name(h.record_type),
                h.body_len
            )
            .and_then(|()| out.write_all(buf.as_bytes()));
            if let Err(e) = result {
                failed = Some(e);
            }
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    out.flush()?;
    for finding in &scan.findings {
        writeln!(err, "{finding}")?;
    }
    if scan.damaged() {
        writeln!(err, "the log is damaged: run `flotilla-ctl wal verify` for details")?;
    }
    Ok(scan)
}

fn record_type_name(record_type: u8) -> &'static str {
    if record_type == record::RECORD_TYPE_BATCH { "batch" } else { "unknown" }
}

/// `wal verify`: checks every segment header, every record's checksums and structure and the
/// chain of rounds, and prints each finding with its file and offset. Returns the scan; the log
/// is damaged (exit code 1) if [`Scan::damaged`].
pub fn verify(dir: &Path, out: &mut impl Write) -> io::Result<Scan> {
    let scan = scan::scan(dir, |_| {})?;
    let count = |kind: FileKind| scan.files.iter().filter(|f| f.kind == kind).count();
    writeln!(out, "directory {}", dir.display())?;
    writeln!(
        out,
        "segments {} (live {}, prepared {}, discarded {}, bad header {}), spares {}",
        scan.files.iter().filter(|f| !matches!(f.kind, FileKind::Spare | FileKind::Other)).count(),
        count(FileKind::Live),
        count(FileKind::Prepared),
        count(FileKind::Discarded),
        count(FileKind::BadHeader),
        count(FileKind::Spare)
    )?;
    let seqs = scan.seq_range.map_or_else(|| "-".to_owned(), |(a, b)| format!("{a}..={b}"));
    writeln!(out, "rounds {} (write_seq {seqs}), {} bytes", scan.rounds, scan.record_bytes)?;
    if let Some((file, offset)) = &scan.end {
        writeln!(out, "log ends at {file} offset {offset}")?;
    }
    if scan.rounds > 0 && !scan.sealed {
        writeln!(
            out,
            "note: the last round is not the seal close() writes (crashed, or still open): \
             damage to it alone could not be told from a torn tail"
        )?;
    }
    for finding in &scan.findings {
        writeln!(out, "{finding}")?;
    }
    let damage = scan.findings.iter().filter(|f| f.severity == Severity::Damage).count();
    let torn = scan.findings.iter().any(|f| f.severity == Severity::TornTail);
    if damage > 0 {
        writeln!(out, "result: DAMAGED ({damage} problem(s)): Wal::open would refuse this log")?;
    } else if torn {
        writeln!(
            out,
            "result: OK, with a torn unsynced tail (not damage: nothing there was acknowledged; \
             Wal::open cuts it)"
        )?;
    } else {
        writeln!(out, "result: OK")?;
    }
    Ok(scan)
}

/// `wal stat`: segments, groups, bytes, and the groups pinning the oldest segment.
pub fn stat(dir: &Path, out: &mut impl Write, err: &mut impl Write) -> io::Result<Scan> {
    let scan = scan::scan(dir, |_| {})?;
    let state = &scan.state;
    let mut live_per_segment: BTreeMap<u64, u64> = BTreeMap::new();
    for group in state.groups.values() {
        for (segment, n) in group.entries_per_segment() {
            *live_per_segment.entry(segment).or_insert(0) += n;
        }
    }
    let segments: Vec<_> = scan.files.iter().filter(|f| f.kind != FileKind::Other).collect();
    let count = |kind: FileKind| scan.files.iter().filter(|f| f.kind == kind).count();
    let disk: u64 = scan.files.iter().map(|f| f.size).sum();
    writeln!(out, "directory {}", dir.display())?;
    writeln!(
        out,
        "segments {} files, live {}, prepared {}, discarded {}, bad header {}, spares {}; {} \
         bytes on disk",
        segments.len(),
        count(FileKind::Live),
        count(FileKind::Prepared),
        count(FileKind::Discarded),
        count(FileKind::BadHeader),
        count(FileKind::Spare),
        disk
    )?;
    for file in &segments {
        write!(out, "  {} {} size {}", file.name, file.kind, file.size)?;
        match file.kind {
            FileKind::Spare => match file.seq {
                Some(seq) => write!(out, " header segment {seq}")?,
                None => write!(out, " no readable header")?,
            },
            FileKind::BadHeader => {}
            // Never reached by the chain (after the end of the log): nothing to count.
            _ if file.end.is_none() && file.rounds == 0 => {}
            _ => {
                let used = file.end.unwrap_or(0);
                let live = file.seq.and_then(|s| live_per_segment.get(&s)).copied().unwrap_or(0);
                write!(
                    out,
                    " rounds {} record_bytes {} used {used} ({:.1}%) live_entries {live}",
                    file.rounds,
                    file.record_bytes,
                    used as f64 * 100.0 / file.size.max(1) as f64
                )?;
            }
        }
        writeln!(out)?;
    }
    let seqs = scan.seq_range.map_or_else(|| "-".to_owned(), |(a, b)| format!("{a}..={b}"));
    let (written, payload) = (state.entries_read, state.payload_bytes_read);
    let live: u64 = state.groups.values().map(state::GroupInfo::live_entries).sum();
    let live_payload: u64 = state.groups.values().map(state::GroupInfo::live_payload_bytes).sum();
    writeln!(
        out,
        "rounds {} (write_seq {seqs}) record_bytes {} entries_read {written} \
         payload_bytes_read {payload} live_entries {live} live_payload_bytes {live_payload}",
        scan.rounds, scan.record_bytes
    )?;
    writeln!(out, "groups {}", state.groups.len())?;
    for (id, g) in &state.groups {
        write!(out, "  group {id} entries {}", g.live_entries())?;
        if g.live_entries() > 0 {
            write!(out, " index {}..={}", g.first_index, g.last_index())?;
        } else {
            write!(out, " index - (next {})", g.next_index)?;
        }
        if g.compacted > 0 {
            write!(out, " compacted {} term {}", g.compacted, g.compact_term)?;
        } else {
            write!(out, " compacted -")?;
        }
        match g.hard_state {
            Some(hs) => write!(out, " hard_state {}/{}/{}", hs.term, hs.vote, hs.commit)?,
            None => write!(out, " hard_state -")?,
        }
        write!(out, " live_payload_bytes {}", g.live_payload_bytes())?;
        match g.oldest_segment() {
            Some(seq) => writeln!(out, " oldest_segment {seq}")?,
            None => writeln!(out, " oldest_segment -")?,
        }
    }
    match scan.oldest_segment {
        Some(oldest) => {
            let pinning = state.pinning(oldest);
            let list = if pinning.is_empty() {
                "none (recyclable once the log runs)".to_owned()
            } else {
                pinning.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
            };
            writeln!(out, "oldest segment {} pinned by groups: {list}", segment_file_name(oldest))?;
        }
        None => writeln!(out, "oldest segment - (no segments)")?,
    }
    for finding in &scan.findings {
        writeln!(err, "{finding}")?;
    }
    if scan.damaged() {
        writeln!(err, "the log is damaged: run `flotilla-ctl wal verify` for details")?;
    }
    Ok(scan)
}

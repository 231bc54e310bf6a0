//! A read-only walk over a WAL directory: list the files, check every segment header, follow the
//! chain of rounds and classify every place it stops by `wal/FORMAT.md`'s rule — the way
//! `flotilla_wal`'s recovery does, but without opening the log, taking its lock or writing
//! anything, and going on past damage to report everything it can see.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use flotilla_wal::record::{
    self, DecodeError, RECORD_ALIGN, RECORD_HEADER_LEN, RECORD_TYPE_BATCH, RecordHeader,
};
use flotilla_wal::segment::{
    SEGMENT_HEADER_LEN, SEGMENT_SUFFIX, SPARE_SUFFIX, SegmentHeader, parse_segment_file_name,
};

use super::state::LogState;

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Damage to synced data (or to the directory): `Wal::open` would refuse the log.
    Damage,
    /// The unsynced tail a crash left: never acknowledged, cut by `Wal::open`. Not damage.
    TornTail,
    /// Worth knowing, not a problem.
    Note,
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Severity::Damage => "DAMAGE",
            Severity::TornTail => "TORN TAIL",
            Severity::Note => "note",
        })
    }
}

/// One thing the scan found, at a file and an offset in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// How serious it is.
    pub severity: Severity,
    /// The file's name within the directory.
    pub file: String,
    /// Byte offset within the file.
    pub offset: u64,
    /// What is wrong (or worth knowing).
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} offset {}: {}", self.severity, self.file, self.offset, self.message)
    }
}

/// What a file in the directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A segment holding rounds of the log.
    Live,
    /// A segment with a valid header and no rounds: prepared ahead of need (or emptied).
    Prepared,
    /// A segment after the end of the log that holds only rounds recovery would discard.
    Discarded,
    /// A segment whose header is damaged.
    BadHeader,
    /// A spare (`.tmp`): being prepared or retired, never holds live data.
    Spare,
    /// Anything else (the `LOCK` file, foreign files).
    Other,
}

impl std::fmt::Display for FileKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FileKind::Live => "live",
            FileKind::Prepared => "prepared",
            FileKind::Discarded => "discarded",
            FileKind::BadHeader => "bad-header",
            FileKind::Spare => "spare",
            FileKind::Other => "other",
        })
    }
}

/// One file of the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// Its name.
    pub name: String,
    /// What it is.
    pub kind: FileKind,
    /// Its length in bytes.
    pub size: u64,
    /// The segment number: from the name of a segment, from the header of a spare.
    pub seq: Option<u64>,
    /// Rounds of the log read from it.
    pub rounds: u64,
    /// Bytes of those rounds (headers and padding included).
    pub record_bytes: u64,
    /// Offset where the chain of rounds ended in it (segments of the chain only).
    pub end: Option<u64>,
}

/// A round of the log, handed to the visitor in log order.
#[derive(Debug, Clone, Copy)]
pub struct Round<'a> {
    /// Name of the segment file.
    pub file: &'a str,
    /// The segment's sequence number.
    pub segment: u64,
    /// Offset of the record within the file.
    pub offset: u64,
    /// The decoded and verified header.
    pub header: RecordHeader,
    /// The body (checksum verified; its structure is checked by replay).
    pub body: &'a [u8],
}

/// What a scan found.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// Every file of the directory, segments in order, then spares, then others.
    pub files: Vec<FileInfo>,
    /// Every finding, in the order found.
    pub findings: Vec<Finding>,
    /// Rounds read.
    pub rounds: u64,
    /// Bytes of those rounds.
    pub record_bytes: u64,
    /// `write_seq` of the first and the last round read.
    pub seq_range: Option<(u64, u64)>,
    /// Where the log ends: `(file, offset)` of the first slot after its last round.
    pub end: Option<(String, u64)>,
    /// Whether the last round is the empty seal `close()` writes.
    pub sealed: bool,
    /// Every group's state after replaying the rounds read.
    pub state: LogState,
    /// Sequence number of the oldest segment of the chain.
    pub oldest_segment: Option<u64>,
}

impl Scan {
    /// Whether any finding is damage.
    pub fn damaged(&self) -> bool {
        self.findings.iter().any(|f| f.severity == Severity::Damage)
    }

    fn finding(&mut self, severity: Severity, file: &str, offset: u64, message: String) {
        self.findings.push(Finding { severity, file: file.to_owned(), offset, message });
    }
}

/// A segment of the chain: a `.seg` file whose header checked out.
struct Segment {
    seq: u64,
    name: String,
    path: PathBuf,
    /// Index in `Scan::files`.
    file: usize,
}

/// Reads a whole file; `None` if it vanished (a live log recycles segments).
fn read_file(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match File::open(path) {
        Ok(mut file) => {
            let mut buf = Vec::new();
            file.read_to_end(&mut buf)?;
            Ok(Some(buf))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn header_of(bytes: &[u8]) -> Option<[u8; SEGMENT_HEADER_LEN]> {
    bytes.get(..SEGMENT_HEADER_LEN)?.try_into().ok()
}

/// A valid round at `pos` that continues the chain at `expected` (any round when `None`).
fn round_at(
    bytes: &[u8],
    pos: usize,
    seq: u64,
    expected: Option<u64>,
) -> Option<(RecordHeader, &[u8])> {
    let (header, body) = record::decode_record(bytes.get(pos..)?, seq).ok()?;
    expected.is_none_or(|e| header.write_seq == e).then_some((header, body))
}

/// Cheap test before the checksums: could an aligned slot hold a round numbered `>= min_seq`?
fn plausible(bytes: &[u8], pos: usize, min_seq: u64) -> bool {
    let Some(head) = bytes.get(pos..pos + RECORD_HEADER_LEN) else { return false };
    let write_seq = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    head[4] == RECORD_TYPE_BATCH
        && head[5..8] == [0, 0, 0]
        && write_seq >= min_seq
        && write_seq < min_seq.saturating_add(1 << 32)
}

/// A valid round found after the point where the chain stopped.
#[derive(Debug, Clone, Copy)]
struct Found {
    /// Index into the chain's segments.
    segment: usize,
    offset: usize,
    header: RecordHeader,
}

/// Every valid round numbered at least `min_seq` at the aligned slots of `bytes` from `from`,
/// skipping over each one found (as recovery searches).
fn rounds_in(bytes: &[u8], seq: u64, from: usize, min_seq: u64, segment: usize) -> Vec<Found> {
    let mut found = Vec::new();
    let mut at = from;
    while at + RECORD_HEADER_LEN <= bytes.len() {
        if plausible(bytes, at, min_seq)
            && let Some((header, _)) = round_at(bytes, at, seq, None)
        {
            found.push(Found { segment, offset: at, header });
            at += header.padded_len();
            continue;
        }
        at += RECORD_ALIGN;
    }
    found
}

/// Why the slot at `pos` does not hold round `expected`.
fn describe_slot(bytes: &[u8], pos: usize, seq: u64, expected: Option<u64>) -> String {
    let round = expected.map_or_else(|| "the first round".to_owned(), |e| format!("round {e}"));
    if pos + RECORD_HEADER_LEN > bytes.len() {
        return format!("{round} is missing: the segment has no room left for a record");
    }
    if record::is_zero_header(&bytes[pos..]) {
        return format!("{round} is missing: the slot was never written (all zeros)");
    }
    match record::decode_header(&bytes[pos..], seq) {
        Err(e) => format!("{round} is damaged: record header: {e}"),
        Ok(header) if expected.is_some_and(|e| e != header.write_seq) => format!(
            "{round} is missing: the slot holds round {} (durable_seq {})",
            header.write_seq, header.durable_seq
        ),
        Ok(header) => match record::decode_record(&bytes[pos..], seq) {
            Err(DecodeError::Truncated { .. }) => format!(
                "{round} is damaged: its body ({} bytes) runs past the end of the segment",
                header.body_len
            ),
            Err(e) => format!("{round} is damaged: {e}"),
            Ok(_) => format!("{round} is valid here"),
        },
    }
}

/// Where the chain stopped in a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Zero,
    Invalid,
    End,
}

/// The chain's segments and their contents, loaded one or two at a time.
struct Chain {
    segments: Vec<Segment>,
    loaded: Vec<Option<Vec<u8>>>,
    /// Segments that were gone when read (a live log retired them after the listing).
    vanished: Vec<bool>,
}

impl Chain {
    /// The bytes of segment `i` (empty if it vanished since it was listed).
    fn load(&mut self, i: usize) -> io::Result<&[u8]> {
        if self.loaded[i].is_none() {
            let bytes = read_file(&self.segments[i].path)?;
            self.vanished[i] = bytes.is_none();
            self.loaded[i] = Some(bytes.unwrap_or_default());
        }
        Ok(self.loaded[i].as_deref().expect("loaded above"))
    }

    /// The bytes of segment `i` read again (a live log may have written more since).
    fn reload(&mut self, i: usize) -> io::Result<&[u8]> {
        self.loaded[i] = None;
        self.load(i)
    }

    fn unload_before(&mut self, i: usize) {
        for slot in &mut self.loaded[..i] {
            *slot = None;
        }
    }

    /// Valid rounds numbered at least `min_seq` in every segment after `i`, each read and let go.
    fn rounds_later(&mut self, i: usize, min_seq: u64) -> io::Result<Vec<Found>> {
        let mut found = Vec::new();
        for j in i + 1..self.segments.len() {
            let keep = self.loaded[j].is_some();
            let seq = self.segments[j].seq;
            found.extend(rounds_in(self.load(j)?, seq, SEGMENT_HEADER_LEN, min_seq, j));
            if !keep && j > i + 1 {
                self.loaded[j] = None;
            }
        }
        Ok(found)
    }
}

/// The directory's files by role: live segments by number, spares, everything else.
type Listing = (Vec<(u64, String, PathBuf)>, Vec<(String, PathBuf)>, Vec<(String, PathBuf)>);

fn list(dir: &Path) -> io::Result<Listing> {
    let mut names = Vec::new();
    let context = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", dir.display()));
    for entry in std::fs::read_dir(dir).map_err(context)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            names.push((entry.file_name().to_string_lossy().into_owned(), entry.path()));
        }
    }
    names.sort();
    let (mut live, mut spares, mut others) = (Vec::new(), Vec::new(), Vec::new());
    for (name, path) in names {
        if let Some(seq) = parse_segment_file_name(&name) {
            live.push((seq, name, path));
        } else if name.ends_with(SPARE_SUFFIX) {
            spares.push((name, path));
        } else {
            others.push((name, path));
        }
    }
    live.sort();
    Ok((live, spares, others))
}

fn file_info(name: String, kind: FileKind, size: u64, seq: Option<u64>) -> FileInfo {
    FileInfo { name, kind, size, seq, rounds: 0, record_bytes: 0, end: None }
}

/// Scans the WAL directory `dir`, calling `visit` with every round of the log in order. Reads
/// only: files are opened read-only, no lock is taken, nothing is written.
pub fn scan(dir: &Path, mut visit: impl FnMut(&Round<'_>)) -> io::Result<Scan> {
    let mut out = Scan::default();
    let (live, spares, others) = list(dir)?;
    let mut chain = Chain { segments: Vec::new(), loaded: Vec::new(), vanished: Vec::new() };
    for (seq, name, path) in live {
        let Some((len, head)) = read_header_bytes(&path)? else {
            out.finding(Severity::Note, &name, 0, "vanished while being read (a live log?)".into());
            continue;
        };
        // As recovery checks a segment's header.
        let checked = match head.as_ref().map(SegmentHeader::decode) {
            None => Err(format!("file is {len} bytes, shorter than a segment header")),
            Some(Err(e)) => Err(format!("segment header: {e}")),
            Some(Ok(header)) if header.seq != seq => {
                Err(format!("segment header says segment {}", header.seq))
            }
            Some(Ok(header)) if header.size != len => {
                Err(format!("file is {len} bytes, its header says {}", header.size))
            }
            Some(Ok(_)) => Ok(()),
        };
        let kind = if checked.is_ok() { FileKind::Prepared } else { FileKind::BadHeader };
        out.files.push(file_info(name.clone(), kind, len, Some(seq)));
        match checked {
            Ok(()) => chain.segments.push(Segment { seq, name, path, file: out.files.len() - 1 }),
            Err(reason) => out.finding(Severity::Damage, &name, 0, reason),
        }
    }
    for (name, path) in spares {
        let Some((len, head)) = read_header_bytes(&path)? else { continue };
        let header_seq = head.and_then(|h| SegmentHeader::decode(&h).ok()).map(|h| h.seq);
        let named = name.strip_suffix(SPARE_SUFFIX).and_then(|d| d.parse::<u64>().ok());
        // `out.files` holds only the live segments so far.
        if let Some(seq) = named.filter(|n| out.files.iter().any(|f| f.seq == Some(*n))) {
            let live = flotilla_wal::segment::segment_file_name(seq);
            let message =
                format!("spare shares its number with live segment {live} (changed from outside)");
            out.finding(Severity::Damage, &name, 0, message);
        }
        out.files.push(file_info(name, FileKind::Spare, len, header_seq));
    }
    for (name, path) in others {
        let size = std::fs::metadata(&path).map_or(0, |m| m.len());
        if name != "LOCK" {
            let message = if name.ends_with(SEGMENT_SUFFIX) {
                "not a segment name (20 digits + .seg): ignored by the log"
            } else {
                "not a file of the log: ignored"
            };
            out.finding(Severity::Note, &name, 0, message.to_owned());
        }
        out.files.push(file_info(name, FileKind::Other, size, None));
    }
    chain.loaded = chain.segments.iter().map(|_| None).collect();
    chain.vanished = vec![false; chain.segments.len()];
    out.oldest_segment = chain.segments.first().map(|s| s.seq);
    walk(&mut chain, &mut out, &mut visit)?;
    Ok(out)
}

/// The file's length and its first 64 bytes (if it has them); `None` if it vanished.
fn read_header_bytes(path: &Path) -> io::Result<Option<(u64, Option<[u8; SEGMENT_HEADER_LEN]>)>> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let mut head = Vec::with_capacity(SEGMENT_HEADER_LEN);
    file.by_ref().take(SEGMENT_HEADER_LEN as u64).read_to_end(&mut head)?;
    Ok(Some((len, header_of(&head))))
}

/// Where the walk is in the chain of rounds.
#[derive(Debug, Default)]
struct Cursor {
    /// The round the chain needs next (`None`: any, before the first).
    expected: Option<u64>,
    /// Whether the last round read had an empty body (the seal).
    last_body_empty: bool,
}

/// What to do after the chain stopped in a segment.
enum Next {
    /// Go on with the next segment.
    Segment,
    /// Go on at a valid round after damage: `(segment, offset)`.
    Resume(usize, usize),
    /// The log ends here.
    End,
}

/// Follows the chain of rounds through the segments (see `FORMAT.md`, *Recovery*).
fn walk(chain: &mut Chain, out: &mut Scan, visit: &mut impl FnMut(&Round<'_>)) -> io::Result<()> {
    let mut cursor = Cursor::default();
    let mut i = 0;
    let mut start = SEGMENT_HEADER_LEN;
    while i < chain.segments.len() {
        chain.unload_before(i);
        chain.load(i)?;
        if chain.vanished[i] {
            // Retired by a live log since the listing: its rounds were no longer needed, and the
            // chain goes on from whatever round comes next.
            let message = "vanished while the scan ran (retired by a live log?): skipped";
            out.finding(Severity::Note, &chain.segments[i].name.clone(), 0, message.to_owned());
            cursor.expected = None;
            (i, start) = (i + 1, SEGMENT_HEADER_LEN);
            continue;
        }
        let (pos, stop) = read_rounds(chain, out, visit, &mut cursor, i, start)?;
        out.files[chain.segments[i].file].end = Some(pos as u64);
        match classify_stop(chain, out, &mut cursor, i, pos, stop)? {
            Next::Segment => (i, start) = (i + 1, SEGMENT_HEADER_LEN),
            Next::Resume(segment, offset) => (i, start) = (segment, offset),
            Next::End => break,
        }
    }
    out.sealed = out.rounds > 0 && cursor.last_body_empty;
    if out.end.is_none()
        && let Some(last) = chain.segments.last()
    {
        let end = out.files[last.file].end.unwrap_or(SEGMENT_HEADER_LEN as u64);
        out.end = Some((last.name.clone(), end));
    }
    Ok(())
}

/// Reads the rounds of segment `i` that continue the chain from offset `pos`, replaying and
/// visiting each; returns where and why it stopped.
fn read_rounds(
    chain: &mut Chain,
    out: &mut Scan,
    visit: &mut impl FnMut(&Round<'_>),
    cursor: &mut Cursor,
    i: usize,
    mut pos: usize,
) -> io::Result<(usize, Stop)> {
    let seq = chain.segments[i].seq;
    let name = chain.segments[i].name.clone();
    let file = chain.segments[i].file;
    let bytes = chain.load(i)?;
    let stop = loop {
        if pos + RECORD_HEADER_LEN > bytes.len() {
            break Stop::End;
        }
        if record::is_zero_header(&bytes[pos..]) {
            break Stop::Zero;
        }
        let Some((header, body)) = round_at(bytes, pos, seq, cursor.expected) else {
            break Stop::Invalid;
        };
        if let Err(reason) = out.state.apply(body, seq) {
            let round = header.write_seq;
            let message =
                format!("round {round}: checksums match but it does not replay: {reason}");
            out.finding(Severity::Damage, &name, pos as u64, message);
        }
        visit(&Round { file: &name, segment: seq, offset: pos as u64, header, body });
        let padded = header.padded_len() as u64;
        out.rounds += 1;
        out.record_bytes += padded;
        out.files[file].rounds += 1;
        out.files[file].record_bytes += padded;
        out.files[file].kind = FileKind::Live;
        let first = out.seq_range.map_or(header.write_seq, |(first, _)| first);
        out.seq_range = Some((first, header.write_seq));
        cursor.last_body_empty = body.is_empty();
        cursor.expected = Some(header.write_seq + 1);
        pos += header.padded_len();
    };
    Ok((pos, stop))
}

/// Decides what the stop at `pos` of segment `i` means, by the rule of `FORMAT.md`: the end of a
/// segment the log goes on from, damage to synced data (a later round claims the missing round
/// durable), or the end of the log (clean, or a torn unsynced tail).
fn classify_stop(
    chain: &mut Chain,
    out: &mut Scan,
    cursor: &mut Cursor,
    i: usize,
    pos: usize,
    stop: Stop,
) -> io::Result<Next> {
    let seq = chain.segments[i].seq;
    let name = chain.segments[i].name.clone();
    let expected = cursor.expected;
    let continues = i + 1 < chain.segments.len() && {
        let next_seq = chain.segments[i + 1].seq;
        round_at(chain.load(i + 1)?, SEGMENT_HEADER_LEN, next_seq, expected).is_some()
    };
    let min_seq = expected.unwrap_or(1);
    let mut after = rounds_in(chain.load(i)?, seq, pos + RECORD_ALIGN, min_seq, i);
    if continues && after.is_empty() {
        if stop == Stop::Invalid {
            let why = describe_slot(chain.load(i)?, pos, seq, expected);
            let message = format!(
                "the slot after the segment's last round is not zero ({why}); the log goes on in \
                 the next segment, so recovery ignores it"
            );
            out.finding(Severity::Note, &name, pos as u64, message);
        }
        return Ok(Next::Segment);
    }
    after.extend(chain.rounds_later(i, min_seq)?);
    let claim = after.iter().max_by_key(|f| f.header.durable_seq).copied();
    if let Some(claimant) = claim.filter(|c| c.header.durable_seq >= min_seq) {
        // On a live log the segment may have been read before rounds that later ones claim were
        // written to it: read it again before calling anything damage.
        if stop != Stop::End && round_at(chain.reload(i)?, pos, seq, expected).is_some() {
            return Ok(Next::Resume(i, pos));
        }
        return damaged(chain, out, cursor, (i, pos, stop), &after, claimant);
    }
    // The end of the log: clean, or a torn unsynced tail.
    out.end = Some((name.clone(), pos as u64));
    if stop == Stop::Invalid || !after.is_empty() {
        let why = describe_slot(chain.load(i)?, pos, seq, expected);
        let highest = claim.map_or_else(
            || "no valid round follows".to_owned(),
            |c| format!("the highest claim after it is durable_seq {}", c.header.durable_seq),
        );
        let discards = if after.is_empty() {
            String::new()
        } else {
            format!(" and discards {} unacknowledged round(s) after it", after.len())
        };
        let message = format!(
            "{why}; no later round claims it synced ({highest}): the unsynced tail a crash left, \
             never acknowledged; Wal::open cuts the log here{discards}"
        );
        out.finding(Severity::TornTail, &name, pos as u64, message);
        for found in after.iter().filter(|f| f.segment > i) {
            out.files[chain.segments[found.segment].file].kind = FileKind::Discarded;
        }
    }
    Ok(Next::End)
}

/// Reports damage to synced data where the chain stopped (`stopped`: segment, offset, why) and
/// returns where it goes on: the first valid round after the stop.
fn damaged(
    chain: &mut Chain,
    out: &mut Scan,
    cursor: &mut Cursor,
    stopped: (usize, usize, Stop),
    after: &[Found],
    claimant: Found,
) -> io::Result<Next> {
    let (i, pos, stop) = stopped;
    let (seq, name) = (chain.segments[i].seq, chain.segments[i].name.clone());
    let expected = cursor.expected;
    // Where the segment ended cleanly and the next one starts with something that is not the
    // expected round, name that (recovery names the end of this segment, where it stopped).
    let mut at = (i, pos, describe_slot(chain.load(i)?, pos, seq, expected));
    if stop != Stop::Invalid
        && i + 1 < chain.segments.len()
        && !after.iter().any(|f| f.segment == i)
    {
        let next_seq = chain.segments[i + 1].seq;
        let next = chain.load(i + 1)?;
        if next.len() >= SEGMENT_HEADER_LEN + RECORD_HEADER_LEN
            && !record::is_zero_header(&next[SEGMENT_HEADER_LEN..])
        {
            let why = describe_slot(next, SEGMENT_HEADER_LEN, next_seq, expected);
            let why = format!("{why} (the previous segment ends at {name} offset {pos})");
            at = (i + 1, SEGMENT_HEADER_LEN, why);
        }
    }
    let (at_segment, at_pos, why) = at;
    let resume = after
        .iter()
        .min_by_key(|f| (f.segment, f.offset))
        .copied()
        .expect("the claimant lies after the stop");
    let lost = resume.header.write_seq.saturating_sub(expected.unwrap_or(1));
    let claim = &claimant.header;
    let message = format!(
        "{why}; but round {} ({} offset {}) claims every round through {} synced, so synced \
         data is damaged or missing (Wal::open refuses this log); the chain resumes at round {} \
         ({} offset {}), {lost} round(s) lost",
        claim.write_seq,
        chain.segments[claimant.segment].name,
        claimant.offset,
        claim.durable_seq,
        resume.header.write_seq,
        chain.segments[resume.segment].name,
        resume.offset,
    );
    out.finding(Severity::Damage, &chain.segments[at_segment].name.clone(), at_pos as u64, message);
    cursor.expected = Some(resume.header.write_seq);
    Ok(Next::Resume(resume.segment, resume.offset))
}

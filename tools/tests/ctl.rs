//! `flotilla-ctl wal dump|verify|stat` against logs written by the real `flotilla_wal::Wal`:
//! several groups, rotations through small segments, a compaction, a truncation, a removed group,
//! tagged entries; then a torn tail and flipped bytes in synced records. Every run checks that the
//! binary changed nothing in the directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bytes::Bytes;
use flotilla_wal::{
    Backend, Config, GroupId, GroupState, HardState, Wal, WriteBatch, WriterMode, block_on,
};

const SEGMENT_BYTES: u64 = 8192;

/// One entry as written: `(group, index, term, tag, payload)`.
type Written = (u64, u64, u64, u8, Vec<u8>);

struct Log {
    _dir: tempfile::TempDir,
    path: PathBuf,
    /// Every entry written, in write order.
    written: Vec<Written>,
    /// Group states, pinning groups and live segments the log reported before closing.
    groups: BTreeMap<u64, GroupState>,
    pinning: Vec<u64>,
    segments_live: u64,
}

fn config() -> Config {
    Config {
        segment_bytes: SEGMENT_BYTES,
        batch_bytes_max: 4096,
        backend: Backend::Portable,
        writer: WriterMode::Inline,
        // No forward copies: every entry written stays where it was written.
        rewrite_entries_max: 0,
        ..Config::default()
    }
}

fn payload(group: u64, index: u64, round: u64) -> Vec<u8> {
    let len = ((group * 37 + index * 11 + round * 7) % 200) as usize;
    (0..len).map(|i| (i as u64 + index + group) as u8).collect()
}

/// Writes a log: group 1 throughout (never compacted, so it pins the oldest segment and no
/// segment is recycled), group 2 compacted through 10, group 3 truncated from 15 and rewritten
/// with a new term, group 4 written then removed; tags vary.
fn write_log() -> Log {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wal");
    let (wal, _) = Wal::open(&path, config()).unwrap();
    let mut written = Vec::new();
    let mut next = BTreeMap::from([(1u64, 1u64), (2, 1), (3, 1), (4, 1)]);
    let append = |wal: &Wal, batch: WriteBatch| block_on(wal.append(batch)).unwrap();
    let add = |batch: &mut WriteBatch,
               written: &mut Vec<Written>,
               group: u64,
               first: u64,
               count: u64,
               term: u64,
               round: u64| {
        let entries: Vec<(u64, u8, Bytes)> = (first..first + count)
            .map(|index| {
                let tag = ((index + group) % 5) as u8;
                let p = payload(group, index, round);
                written.push((group, index, term, tag, p.clone()));
                (term, tag, Bytes::from(p))
            })
            .collect();
        batch.add_tagged_entries(GroupId(group), first, entries);
    };
    for round in 0..60u64 {
        let mut batch = WriteBatch::new();
        for group in [1, 2, 3] {
            if group == 3 && next[&3] > 20 {
                continue;
            }
            let first = next[&group];
            let count = 1 + (round + group) % 3;
            let count = if group == 3 { count.min(21 - first) } else { count };
            add(&mut batch, &mut written, group, first, count, 1, round);
            next.insert(group, first + count);
        }
        if round < 4 {
            let first = next[&4];
            add(&mut batch, &mut written, 4, first, 2, 1, round);
            next.insert(4, first + 2);
        }
        if round % 10 == 0 {
            batch.set_hard_state(GroupId(1), HardState { term: 1, vote: 1, commit: next[&1] - 1 });
        }
        append(&wal, batch);
        if round == 30 {
            block_on(wal.compact(GroupId(2), 10, 1)).unwrap();
            let mut batch = WriteBatch::new();
            batch.remove_group(GroupId(4));
            append(&wal, batch);
        }
    }
    // Group 3: drop 15.. and rewrite 15..=18 in term 2 (as a new leader would).
    block_on(wal.truncate_suffix(GroupId(3), 15)).unwrap();
    let mut batch = WriteBatch::new();
    add(&mut batch, &mut written, 3, 15, 4, 2, 99);
    batch.set_hard_state(GroupId(3), HardState { term: 2, vote: 3, commit: 12 });
    append(&wal, batch);

    let groups = wal.groups().into_iter().map(|g| (g.0, wal.group_state(g).unwrap())).collect();
    let pinning = wal.pinning_groups().into_iter().map(|g| g.0).collect();
    let stats = wal.stats();
    assert!(stats.rotations >= 3, "the workload must rotate through several segments");
    wal.close().unwrap();
    Log { _dir: dir, path, written, groups, pinning, segments_live: stats.segments_live }
}

/// Every file's name, length and bytes, and the directory's file list.
fn snapshot(dir: &Path) -> BTreeMap<String, (u64, Vec<u8>, std::time::SystemTime)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            let bytes = std::fs::read(e.path()).unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                (meta.len(), bytes, meta.modified().unwrap()),
            )
        })
        .collect()
}

/// Runs `flotilla-ctl wal <args> <dir>` and checks it left the directory exactly as it was.
fn ctl(command: &str, dir: &Path, extra: &[&str]) -> Output {
    let before = snapshot(dir);
    let output = Command::new(env!("CARGO_BIN_EXE_flotilla-ctl"))
        .arg("wal")
        .arg(command)
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    assert_eq!(snapshot(dir), before, "`wal {command}` changed the directory");
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// The entries listed by `wal dump`, in order.
fn dumped_entries(text: &str) -> Vec<(u64, u64, u64, u8, usize)> {
    text.lines()
        .filter_map(|line| line.trim_start().strip_prefix("entry "))
        .map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!((f[0], f[2], f[4], f[6], f[8]), ("group", "index", "term", "tag", "len"));
            (
                f[1].parse().unwrap(),
                f[3].parse().unwrap(),
                f[5].parse().unwrap(),
                f[7].parse().unwrap(),
                f[9].parse().unwrap(),
            )
        })
        .collect()
}

/// `(file, offset, write_seq, body_len)` of every record `wal dump` lists.
fn dumped_records(text: &str) -> Vec<(String, u64, u64, u64)> {
    text.lines()
        .filter_map(|line| line.strip_prefix("record "))
        .map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            (f[0].to_owned(), f[2].parse().unwrap(), f[4].parse().unwrap(), f[10].parse().unwrap())
        })
        .collect()
}

fn summary(written: &[Written]) -> Vec<(u64, u64, u64, u8, usize)> {
    written.iter().map(|(g, i, t, tag, p)| (*g, *i, *t, *tag, p.len())).collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn patch(path: &Path, offset: u64, f: impl FnOnce(&mut [u8])) {
    let mut bytes = std::fs::read(path).unwrap();
    f(&mut bytes[offset as usize..]);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn dump_lists_exactly_the_entries_written_and_filters() {
    let log = write_log();
    let output = ctl("dump", &log.path, &[]);
    assert!(output.status.success(), "{output:?}");
    let text = stdout(&output);
    assert_eq!(dumped_entries(&text), summary(&log.written));
    assert!(text.contains("  compact group 2 index 10 term 1\n"), "{text}");
    assert!(text.contains("  truncate group 3 from 15\n"));
    assert!(text.contains("  remove_group group 4\n"));
    assert!(text.contains("  hard_state group 3 term 2 vote 3 commit 12\n"));
    let records = dumped_records(&text);
    let seqs: Vec<u64> = records.iter().map(|r| r.2).collect();
    assert_eq!(seqs, (1..=records.len() as u64).collect::<Vec<_>>(), "every round, in order");
    assert_eq!(records.last().unwrap().3, 0, "the last round is close()'s empty seal");
    let files: std::collections::BTreeSet<&String> = records.iter().map(|r| &r.0).collect();
    assert!(files.len() >= 4, "rounds in several segments: {files:?}");

    // By group and index range.
    let output = ctl("dump", &log.path, &["--group", "3", "--from", "12", "--to", "16"]);
    let text = stdout(&output);
    let expected: Vec<_> = summary(&log.written)
        .into_iter()
        .filter(|e| e.0 == 3 && (12..=16).contains(&e.1))
        .collect();
    assert_eq!(dumped_entries(&text), expected);
    assert!(expected.iter().any(|e| e.2 == 2), "the rewritten term-2 entries are listed");
    assert!(text.contains("  truncate group 3 from 15\n"));
    assert!(!text.contains("group 1 "), "{text}");
    for line in text.lines().filter(|l| l.starts_with("  ")) {
        assert!(line.contains("group 3 "), "only group 3's items: {line}");
    }

    // Payloads only when asked, escaped.
    assert!(!ctl("dump", &log.path, &[]).stdout.windows(8).any(|w| w == b"payload "));
    let output = ctl("dump", &log.path, &["--group", "1", "--to", "1", "--payloads"]);
    let text = stdout(&output);
    let first = &log.written.iter().find(|e| e.0 == 1 && e.1 == 1).unwrap().4;
    let escaped = format!("payload \"{}\"", first.escape_ascii());
    assert!(text.contains(&escaped), "{text}");
}

#[test]
fn stat_matches_what_the_log_reports() {
    let log = write_log();
    let output = ctl("stat", &log.path, &[]);
    assert!(output.status.success(), "{output:?}");
    let text = stdout(&output);
    assert!(output.stderr.is_empty(), "{}", String::from_utf8_lossy(&output.stderr));

    // Groups: exactly those the log had, with the same ranges, compaction points, hard states.
    assert!(text.contains(&format!("groups {}\n", log.groups.len())), "{text}");
    assert!(!log.groups.contains_key(&4), "group 4 was removed");
    for (id, state) in &log.groups {
        let entries = state.last_index + 1 - state.first_index;
        let compacted =
            state.compacted.map_or_else(|| "-".to_owned(), |(i, t)| format!("{i} term {t}"));
        let hard_state = state
            .hard_state
            .map_or_else(|| "-".to_owned(), |hs| format!("{}/{}/{}", hs.term, hs.vote, hs.commit));
        let expected = format!(
            "  group {id} entries {entries} index {}..={} compacted {compacted} hard_state \
             {hard_state}",
            state.first_index, state.last_index
        );
        assert!(text.contains(&expected), "missing `{expected}` in\n{text}");
    }
    assert_eq!(log.groups[&2].compacted, Some((10, 1)));
    assert_eq!(log.groups[&3].last_index, 18);

    // Live entries and their bytes: what is left of what was written.
    let mut live: BTreeMap<(u64, u64), usize> = BTreeMap::new();
    for (g, i, _, _, p) in &log.written {
        live.insert((*g, *i), p.len());
    }
    live.retain(|(g, i), _| {
        log.groups.get(g).is_some_and(|s| (s.first_index..=s.last_index).contains(i))
    });
    let bytes: usize = live.values().sum();
    assert!(text.contains(&format!(" live_entries {} live_payload_bytes {bytes}\n", live.len())));
    let all: usize = log.written.iter().map(|e| e.4.len()).sum();
    assert!(
        text.contains(&format!(" entries_read {} payload_bytes_read {all} ", log.written.len()))
    );

    // Segments and pinning.
    let live_segments = text.lines().filter(|l| l.contains(".seg live ")).count() as u64;
    assert_eq!(live_segments, log.segments_live, "{text}");
    assert!(text.contains(&format!(", live {live_segments}, ")), "{text}");
    let pinning = log.pinning.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
    assert!(log.pinning.contains(&1));
    assert!(text.contains(&format!(" pinned by groups: {pinning}\n")), "{text}");

    // The same as a real recovery of a copy finds.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&log.path, copy.path());
    let (wal, recovery) = Wal::open(copy.path(), config()).unwrap();
    for (id, state) in &log.groups {
        assert_eq!(recovery.groups[&GroupId(*id)], *state);
    }
    assert_eq!(recovery.groups.len(), log.groups.len());
    let pinned: Vec<u64> = wal.pinning_groups().into_iter().map(|g| g.0).collect();
    assert_eq!(pinned, log.pinning);
    let rounds = text.lines().find_map(|l| l.strip_prefix("rounds ")).unwrap();
    assert!(rounds.starts_with(&format!("{} ", recovery.report.records)), "{rounds}");
}

#[test]
fn verify_passes_a_clean_log_and_a_torn_tail() {
    let log = write_log();
    let output = ctl("verify", &log.path, &[]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("result: OK\n"), "{text}");
    assert!(!text.contains("DAMAGE") && !text.contains("TORN"), "{text}");

    let records = dumped_records(&stdout(&ctl("dump", &log.path, &[])));
    let (seal_file, seal_offset, _, _) = records.last().unwrap().clone();
    let (last_file, last_offset, last_seq, last_len) = records[records.len() - 2].clone();
    assert!(last_len > 0);

    // A torn write of the seal (garbage where it was): never claimed by anything, not damage.
    let torn = tempfile::tempdir().unwrap();
    copy_dir(&log.path, torn.path());
    patch(&torn.path().join(&seal_file), seal_offset, |b| b[3] ^= 0x5A);
    let output = ctl("verify", torn.path(), &[]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains(&format!("TORN TAIL: {seal_file} offset {seal_offset}: ")), "{text}");
    assert!(!text.contains("DAMAGE"), "{text}");

    // A crash mid-write: the seal never came, and the last round reached the disk only in part.
    let torn = tempfile::tempdir().unwrap();
    copy_dir(&log.path, torn.path());
    patch(&torn.path().join(&seal_file), seal_offset, |b| b[..32].fill(0));
    let half = 32 + last_len / 2;
    patch(&torn.path().join(&last_file), last_offset + half, |b| {
        b[..(last_len / 2) as usize].fill(0);
    });
    let output = ctl("verify", torn.path(), &[]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains(&format!("TORN TAIL: {last_file} offset {last_offset}: ")), "{text}");
    assert!(text.contains("result: OK, with a torn unsynced tail"), "{text}");
    // Dump lists every round before the torn one, and stops there.
    let output = ctl("dump", torn.path(), &[]);
    let dumped = dumped_records(&stdout(&output));
    assert_eq!(dumped.last().unwrap().2, last_seq - 1);
    assert!(String::from_utf8_lossy(&output.stderr).contains("TORN TAIL"));
    // And it is what recovery does.
    let (_, recovery) = Wal::open(torn.path(), config()).unwrap();
    assert_eq!(recovery.report.torn_tail, Some((segment_seq(&last_file), last_offset)));
}

fn segment_seq(file: &str) -> u64 {
    flotilla_wal::segment::parse_segment_file_name(file).unwrap()
}

#[test]
fn verify_names_the_segment_and_offset_of_damaged_synced_data() {
    let log = write_log();
    let records = dumped_records(&stdout(&ctl("dump", &log.path, &[])));
    // Rounds in the middle of the log, each followed by rounds that claim them synced: a byte of
    // the body, of the header, and of the first round of a later segment.
    let middle = records[records.len() / 2].clone();
    let first_of_segment = records
        .windows(2)
        .skip(records.len() / 3)
        .find(|w| w[0].0 != w[1].0)
        .map(|w| w[1].clone())
        .unwrap();
    let previous_end = {
        let i = records.iter().position(|r| *r == first_of_segment).unwrap();
        let (file, offset, _, len) = &records[i - 1];
        (segment_seq(file), offset + (32 + len).next_multiple_of(8))
    };
    for (record, at) in [(&middle, 32 + middle.3 / 2), (&middle, 9), (&first_of_segment, 40)] {
        let (file, offset, write_seq, _) = record.clone();
        let damaged = tempfile::tempdir().unwrap();
        copy_dir(&log.path, damaged.path());
        patch(&damaged.path().join(&file), offset + at, |b| b[0] ^= 0x01);
        let output = ctl("verify", damaged.path(), &[]);
        let text = stdout(&output);
        assert_eq!(output.status.code(), Some(1), "{text}");
        let expected = format!("DAMAGE: {file} offset {offset}: round {write_seq} is damaged");
        assert!(text.contains(&expected), "missing `{expected}` in\n{text}");
        assert_eq!(text.matches("DAMAGE:").count(), 1, "{text}");
        assert!(text.contains("result: DAMAGED (1 problem(s))"), "{text}");
        // The real recovery agrees.
        match Wal::open(damaged.path(), config()) {
            // Recovery names where the chain stopped: for a segment's first round, the end of
            // the previous segment; the tool names the damaged round itself.
            Err(flotilla_wal::WalError::Corrupt { segment, offset: at, .. }) => {
                if *record == first_of_segment {
                    assert_eq!((segment, at), previous_end);
                } else {
                    assert_eq!((segment, at), (segment_seq(&file), offset));
                }
            }
            other => panic!("recovery should refuse: {:?}", other.map(|(_, r)| r.report)),
        }
    }

    // A damaged segment header.
    let (file, _, _, _) = records[0].clone();
    let damaged = tempfile::tempdir().unwrap();
    copy_dir(&log.path, damaged.path());
    patch(&damaged.path().join(&file), 20, |b| b[0] ^= 0x80);
    let output = ctl("verify", damaged.path(), &[]);
    let text = stdout(&output);
    assert_ne!(output.status.code(), Some(0), "{text}");
    assert!(text.contains(&format!("DAMAGE: {file} offset 0: segment header")), "{text}");
}

#[test]
fn an_empty_or_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let output = ctl("verify", dir.path(), &[]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let output = ctl("stat", dir.path(), &[]);
    assert!(stdout(&output).contains("groups 0\n"));
    let missing = dir.path().join("nope");
    let output = Command::new(env!("CARGO_BIN_EXE_flotilla-ctl"))
        .args(["wal", "verify"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(!missing.exists());
}

#[test]
fn a_missing_segment_is_damage_and_dump_and_stat_still_read_the_rest() {
    let log = write_log();
    let records = dumped_records(&stdout(&ctl("dump", &log.path, &[])));
    let mut files: Vec<&String> = records.iter().map(|r| &r.0).collect();
    files.dedup();
    assert!(files.len() >= 4);
    let (gone, next) = (files[1].clone(), files[2].clone());
    let first_after = records.iter().find(|r| r.0 == next).unwrap().2;
    let damaged = tempfile::tempdir().unwrap();
    copy_dir(&log.path, damaged.path());
    std::fs::remove_file(damaged.path().join(&gone)).unwrap();

    let output = ctl("verify", damaged.path(), &[]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    let expected = format!("DAMAGE: {next} offset 64: round ");
    assert!(text.contains(&expected), "missing `{expected}` in\n{text}");
    assert!(text.contains(&format!("the slot holds round {first_after} ")), "{text}");

    // Dump and stat still show what is readable, and say the log is damaged.
    let output = ctl("dump", damaged.path(), &[]);
    assert!(output.status.success());
    let lost = records.iter().filter(|r| r.0 == gone).count();
    assert_eq!(dumped_records(&stdout(&output)).len(), records.len() - lost);
    assert!(String::from_utf8_lossy(&output.stderr).contains("DAMAGE: "));
    let output = ctl("stat", damaged.path(), &[]);
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("the log is damaged"));
}

#[test]
fn a_live_log_reads_without_false_damage() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config { writer: WriterMode::Threads, ..config() };
    let (wal, _) = Wal::open(dir.path(), config).unwrap();
    let wal = std::sync::Arc::new(wal);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (wal, stop) = (wal.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut index = 1u64;
            let mut next = [1u64; 3];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let group = (index % 3) as usize;
                let payload = Bytes::from(vec![group as u8; 40 + (index % 90) as usize]);
                let mut batch = WriteBatch::new();
                batch.add_entries(GroupId(1 + group as u64), next[group], [(1, payload)]);
                block_on(wal.append(batch)).unwrap();
                next[group] += 1;
                index += 1;
            }
            index
        })
    };
    let ctl_bin = env!("CARGO_BIN_EXE_flotilla-ctl");
    let started = std::time::Instant::now();
    while wal.stats().rotations < 3 {
        assert!(started.elapsed().as_secs() < 30, "the writer does not rotate");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // Read while the writer goes on through at least five more rotations.
    let rotations = wal.stats().rotations;
    let mut runs = 0;
    while runs < 30 || (wal.stats().rotations < rotations + 5 && runs < 3000) {
        for command in ["verify", "stat", "dump"] {
            let output =
                Command::new(ctl_bin).args(["wal", command]).arg(dir.path()).output().unwrap();
            let all = format!("{}{}", stdout(&output), String::from_utf8_lossy(&output.stderr));
            assert_eq!(output.status.code(), Some(0), "{command}: {all}");
            assert!(!all.contains("DAMAGE"), "{command}: {all}");
            runs += 1;
        }
    }
    assert!(wal.stats().rotations >= rotations + 5);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(writer.join().unwrap() > 10);
    std::sync::Arc::try_unwrap(wal).ok().unwrap().close().unwrap();
    let output = ctl("verify", dir.path(), &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
}

//! S3: damage to a closed log. Every truncation offset and every single-bit flip of a 500-record,
//! multi-segment log is detected; damage to synced data is reported (`Corrupt`), never silently
//! cut; random damage never makes recovery return a wrong byte.

mod common;

use bytes::Bytes;
use common::{Model, Rng, inline_config, open_sim, read_back};
use flotilla_wal::io::Storage;
use flotilla_wal::record::decode_record;
use flotilla_wal::segment::{SEGMENT_HEADER_LEN, parse_segment_file_name};
use flotilla_wal::sim::SimStorage;
use flotilla_wal::{
    GroupId, HardState, Recovery, RecoveryMode, Wal, WalError, WriteBatch, block_on,
};

const SEGMENT_BYTES: u64 = 8 << 10;
const RECORDS: usize = 500;

/// Small segments; no copying forward of small groups, so every round stays where it was written.
fn config() -> flotilla_wal::Config {
    flotilla_wal::Config { rewrite_entries_max: 0, ..inline_config(SEGMENT_BYTES) }
}

/// A closed log of `RECORDS` rounds over a few segments, the model of its contents, and each
/// segment's image.
/// Each segment file's name and image.
type Images = Vec<(String, Vec<u8>)>;

fn build() -> (SimStorage, Model, Images, Vec<WriteBatch>) {
    let disk = SimStorage::new();
    let config = config();
    let (wal, _) = open_sim(&disk, &config).unwrap();
    let mut model = Model::default();
    let mut batches = Vec::with_capacity(RECORDS);
    for i in 0..RECORDS as u64 {
        let group = GroupId(i % 3);
        let mut batch = WriteBatch::new();
        if i % 2 == 0 {
            let next = model.groups.get(&group).map_or(1, common::ModelGroup::next_index);
            batch.add_entries(group, next, [(1, Bytes::from(vec![i as u8; 8]))]);
        } else {
            batch.set_hard_state(group, HardState { term: i, vote: 1, commit: i / 2 });
        }
        block_on(wal.append(batch.clone())).unwrap();
        model.apply(&batch);
        batches.push(batch);
    }
    assert_eq!(read_back(&wal), model);
    wal.close().unwrap();
    let mut segments: Images = disk
        .file_names()
        .into_iter()
        .filter(|name| parse_segment_file_name(name).is_some())
        .map(|name| {
            let contents = disk.contents(&name).unwrap();
            (name, contents)
        })
        .collect();
    segments.sort();
    (disk, model, segments, batches)
}

/// Records of a segment image: `(offset, padded length)`, in order.
fn records(name: &str, image: &[u8]) -> Vec<(usize, usize)> {
    let seq = parse_segment_file_name(name).unwrap();
    let mut out = Vec::new();
    let mut at = SEGMENT_HEADER_LEN;
    while let Ok((header, _)) = decode_record(&image[at..], seq) {
        out.push((at, header.padded_len()));
        at += header.padded_len();
    }
    out
}

/// Opens the damaged disk: `Err(Corrupt)`, or `Ok` with exactly the original contents (and whether
/// it reported cutting a tail). Anything else fails the test.
fn open_damaged(disk: &SimStorage, model: &Model, what: &str) -> Result<bool, ()> {
    match open_sim(disk, &config()) {
        Ok((wal, recovery)) => {
            let recovered = read_back(&wal);
            if recovered != *model {
                let states = |m: &Model| -> Vec<_> {
                    m.groups.iter().map(|(g, mg)| (*g, mg.state())).collect()
                };
                panic!(
                    "{what}: recovered contents differ: {:?} instead of {:?} ({:?})",
                    states(&recovered),
                    states(model),
                    recovery.report
                );
            }
            Ok(recovery.report.torn_tail.is_some())
        }
        Err(WalError::Corrupt { .. }) => Err(()),
        Err(other) => panic!("{what}: unexpected error {other}"),
    }
}

#[test]
fn every_single_bit_flip_is_detected_and_synced_damage_is_refused() {
    let (disk, model, segments, _) = build();
    assert!(segments.len() >= 2, "only {} segments", segments.len());
    let data_segments: Vec<&(String, Vec<u8>)> =
        segments.iter().filter(|(name, image)| !records(name, image).is_empty()).collect();
    let total_records: usize = data_segments.iter().map(|(n, i)| records(n, i).len()).sum();
    assert!(total_records > RECORDS, "{total_records} records (the seal included)");
    // In debug builds the full sweep is slow: there every 7th bit is flipped.
    let step = if cfg!(debug_assertions) { 7 } else { 1 };
    let last = data_segments.len() - 1;
    // Each flip is an independent open of a fresh copy: two threads share the sweep.
    let sweep = |part: usize| -> (u64, u64, u64) {
        let (mut refused, mut cut, mut flips) = (0u64, 0u64, 0u64);
        for (i, (name, image)) in data_segments.iter().enumerate() {
            let recs = records(name, image);
            let (seal_at, seal_len) = *recs.last().unwrap();
            let end = seal_at + seal_len + 32;
            for bit in (0..end * 8).step_by(step).skip(part).step_by(2) {
                let byte = bit / 8;
                let mut damaged = image.clone();
                damaged[byte] ^= 1 << (bit % 8);
                let copy = disk.fork();
                copy.set_contents(name, damaged);
                let what = format!("{name} bit {bit}");
                let outcome = open_damaged(&copy, &model, &what);
                flips += 1;
                let in_header = byte < SEGMENT_HEADER_LEN;
                let in_last_seal = i == last && byte >= seal_at;
                let in_data = byte < seal_at + seal_len && !in_last_seal;
                match outcome {
                    Err(()) => refused += 1,
                    Ok(true) => {
                        assert!(!in_header && !in_data, "{what}: synced data cut as a torn tail");
                        cut += 1;
                    }
                    Ok(false) => {
                        // Only the end-of-chain marker of a segment the next one continues may
                        // be flipped without a word: it holds no data and nothing reads past it.
                        assert!(
                            !in_header && !in_data && !in_last_seal && byte >= seal_at + seal_len,
                            "{what}: damage went unnoticed"
                        );
                    }
                }
            }
        }
        (refused, cut, flips)
    };
    let (a, b) = std::thread::scope(|scope| {
        let other = scope.spawn(|| sweep(1));
        (sweep(0), other.join().unwrap())
    });
    let (refused, cut, flips) = (a.0 + b.0, a.1 + b.1, a.2 + b.2);
    assert!(refused > flips * 9 / 10, "{refused} of {flips} refused");
    assert!(cut > 0, "no flip hit the seal");
}

#[test]
fn every_truncation_of_a_segment_is_detected() {
    let (disk, model, segments, _) = build();
    let step = if cfg!(debug_assertions) { 13 } else { 1 };
    for (name, image) in &segments {
        for len in (0..image.len()).step_by(step) {
            let copy = disk.fork();
            copy.set_contents(name, image[..len].to_vec());
            let outcome = open_damaged(&copy, &model, &format!("{name} cut at {len}"));
            assert!(outcome.is_err(), "{name} cut at {len} was not detected");
        }
    }
    assert_eq!(open_damaged(&disk, &model, "undamaged"), Ok(false));
}

/// Random damage of up to four runs of up to 64 bytes. Damage that hits both the last data round
/// and the seal after it cannot be told from a torn tail (nothing valid claims that round synced
/// any more), so there recovery may return a shorter prefix — but never a wrong byte or a hole.
#[test]
fn random_damage_never_returns_a_wrong_byte() {
    let (disk, _, segments, batches) = build();
    let mut rng = Rng(0x00C0_FFEE);
    let runs = if cfg!(debug_assertions) { 2_000 } else { 20_000 };
    let mut refused = 0;
    for run in 0..runs {
        let (name, image) = &segments[rng.below(segments.len() as u64) as usize];
        let mut damaged = image.clone();
        for _ in 0..=rng.below(4) {
            let at = rng.below(damaged.len() as u64) as usize;
            let len = (1 + rng.below(64) as usize).min(damaged.len() - at);
            for byte in &mut damaged[at..at + len] {
                *byte = rng.next() as u8;
            }
        }
        let copy = disk.fork();
        copy.set_contents(name, damaged);
        match open_sim(&copy, &config()) {
            Ok((wal, _)) => {
                common::check_prefix(&read_back(&wal), &batches, 0);
            }
            Err(WalError::Corrupt { .. }) => refused += 1,
            Err(other) => panic!("run {run}: unexpected error {other}"),
        }
    }
    assert!(refused > 0, "no random damage was detected");
}

/// Opens `images` (every file of a disk) as a real directory and on the simulated disk, in both
/// recovery modes: recovery reads a real segment through a memory map and a simulated one into
/// memory, and both must come to the same verdict, report and contents.
fn same_verdict_on_both_disks(images: &[(String, Vec<u8>)], what: &str) -> bool {
    let mut refused = false;
    for mode in [RecoveryMode::Strict, RecoveryMode::TruncateCorrupt] {
        let config = flotilla_wal::Config { recovery: mode, ..config() };
        let sim = SimStorage::new();
        let dir = tempfile::tempdir().unwrap();
        for (name, image) in images {
            sim.create_prewritten(name, image.len() as u64).unwrap();
            sim.set_contents(name, image.clone());
            std::fs::write(dir.path().join(name), image).unwrap();
        }
        let outcome = |opened: Result<(Wal, Recovery), WalError>| match opened {
            Ok((wal, recovery)) => Ok((read_back(&wal), recovery.groups, recovery.report)),
            Err(error) => Err(error.to_string()),
        };
        let real = outcome(Wal::open(dir.path(), config.clone()));
        let simulated = outcome(open_sim(&sim, &config));
        assert_eq!(real, simulated, "{what} ({mode:?}): real directory vs simulated disk");
        refused |= real.is_err();
    }
    refused
}

#[test]
fn a_real_directory_recovers_exactly_as_the_simulated_disk() {
    let (disk, _, _, _) = build();
    let images: Images = disk
        .file_names()
        .into_iter()
        .map(|name| (name.clone(), disk.contents(&name).unwrap()))
        .collect();
    assert!(!same_verdict_on_both_disks(&images, "undamaged"));
    let mut rng = Rng(0xD1FF);
    let cases = if cfg!(debug_assertions) { 20 } else { 120 };
    let mut refused = 0;
    for case in 0..cases {
        let mut damaged = images.clone();
        let segments: Vec<usize> = (0..damaged.len())
            .filter(|&i| parse_segment_file_name(&damaged[i].0).is_some())
            .collect();
        let (name, image) = &mut damaged[segments[rng.below(segments.len() as u64) as usize]];
        // A bit flip anywhere, or a stretch of a segment zeroed or overwritten from some point on
        // (a torn or lost tail, a recycled file's old bytes).
        let at = rng.below(image.len() as u64) as usize;
        let what = match case % 3 {
            0 => {
                image[at] ^= 1 << rng.below(8);
                format!("{name}: bit flip at {at}")
            }
            1 => {
                image[at..].fill(0);
                format!("{name}: zeroed from {at}")
            }
            _ => {
                let len = (1 + rng.below(4096) as usize).min(image.len() - at);
                for byte in &mut image[at..at + len] {
                    *byte = rng.next() as u8;
                }
                format!("{name}: {len} random bytes at {at}")
            }
        };
        refused += usize::from(same_verdict_on_both_disks(&damaged, &what));
    }
    assert!(refused > 0, "no damage was refused");
}

/// Rounds appended without a sync of their own are synced by the close, so on a cleanly
/// closed log damage to them is corruption like damage to any synced round: refused, never cut
/// as a torn tail (the seal's header must claim them).
#[test]
fn damage_to_unsynced_rounds_of_a_closed_log_is_refused() {
    let disk = SimStorage::new();
    let (wal, _) = open_sim(&disk, &config()).unwrap();
    let mut synced = WriteBatch::new();
    synced.add_entries(GroupId(1), 1, [(1, Bytes::from_static(b"synced"))]);
    block_on(wal.append(synced)).unwrap();
    for index in 2..=3 {
        let mut unsynced = WriteBatch::new();
        unsynced.add_entries(GroupId(1), index, [(1, Bytes::from(vec![index as u8; 16]))]);
        block_on(wal.append_with(unsynced, false)).unwrap();
    }
    wal.close().unwrap();
    let (name, image) = disk
        .file_names()
        .into_iter()
        .filter(|name| parse_segment_file_name(name).is_some())
        .map(|name| {
            let image = disk.contents(&name).unwrap();
            (name, image)
        })
        .find(|(name, image)| records(name, image).len() >= 4)
        .expect("one segment holds the three rounds and the seal");
    let recs = records(&name, &image);
    let (last_data, _) = recs[recs.len() - 2];
    for (at, what) in
        [(recs[recs.len() - 3].0, "the first unsynced round"), (last_data, "the last")]
    {
        let mut damaged = image.clone();
        // A payload byte: past the record header.
        damaged[at + 40] ^= 0x10;
        let copy = disk.fork();
        copy.set_contents(&name, damaged);
        let opened = open_sim(&copy, &config()).map(|(_, recovery)| recovery.report);
        assert!(matches!(opened, Err(WalError::Corrupt { .. })), "{what}: {opened:?}");
    }
}

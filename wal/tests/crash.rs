//! Crash points (S2), failure points (S8) and fsync/write errors and a full disk (S9), all on the
//! simulated disk with the deterministic inline writer, so every IO step has a number.

mod common;

use bytes::Bytes;
use common::{check_prefix, inline_config, open_sim, read_back, run_batches, scripted_batches};
use flotilla_wal::sim::{CrashMode, Keep, SimError, SimOp, SimStorage};
use flotilla_wal::{Config, GroupId, WalError, WriteBatch, WriterMode, block_on};
use std::sync::Arc;

const SEGMENT_BYTES: u64 = 16 << 10;
const ROUNDS: usize = 240;

fn crash_modes(step: u64) -> Vec<CrashMode> {
    let mut modes = vec![CrashMode::LOSE_UNSYNCED, CrashMode::KEEP_UNSYNCED];
    for n in 0..3 {
        modes.push(CrashMode { keep: Keep::Prefix(n), tear_last: Some(step * 31 + n as u64) });
    }
    modes.push(CrashMode { keep: Keep::Random(step), tear_last: None });
    modes.push(CrashMode { keep: Keep::Random(step ^ 0xABCD), tear_last: Some(step) });
    modes
}

/// The workload the crash-point test cuts: at least 200 group commits, several rotations and a
/// compaction that recycles segments.
#[test]
fn scripted_workload_has_the_shape_the_crash_test_needs() {
    let disk = SimStorage::new();
    let config = inline_config(SEGMENT_BYTES);
    let (wal, _) = open_sim(&disk, &config).unwrap();
    let batches = scripted_batches(7, ROUNDS);
    assert_eq!(run_batches(&wal, &batches), ROUNDS);
    let stats = wal.stats();
    assert!(stats.rounds >= 200, "{stats:?}");
    assert!(stats.rotations >= 3, "{stats:?}");
    assert!(stats.segments_recycled + stats.segments_deleted >= 1, "{stats:?}");
    assert_eq!(stats.fdatasyncs, stats.rounds, "one fdatasync per synced round: {stats:?}");
    let expected = read_back(&wal);
    wal.close().unwrap();
    let (wal, recovery) = open_sim(&disk, &config).unwrap();
    assert_eq!(recovery.report.torn_tail, None);
    assert_eq!(read_back(&wal), expected);
    check_prefix(&expected, &batches, ROUNDS);
}

/// S2: crash at every IO step of the workload, under every way unsynced writes can survive:
/// 0 acknowledged records lost, 0 wrong bytes, 0 holes.
#[test]
fn every_crash_point_recovers_every_acknowledged_record() {
    let config = inline_config(SEGMENT_BYTES);
    let batches = scripted_batches(7, ROUNDS);
    let total_ops = {
        let disk = SimStorage::new();
        let (wal, _) = open_sim(&disk, &config).unwrap();
        run_batches(&wal, &batches);
        let ops = disk.op_count();
        drop(wal);
        ops
    };
    let mut recoveries = 0;
    let mut torn = 0;
    for step in 1..=total_ops {
        // Run the workload until the disk dies after `step` operations.
        let disk = SimStorage::new();
        disk.fail_all_after(step);
        let acked = match open_sim(&disk, &config) {
            Ok((wal, _)) => {
                let acked = run_batches(&wal, &batches);
                std::mem::forget(wal); // the process died: no close, no seal
                acked
            }
            Err(_) => 0,
        };
        for mode in crash_modes(step) {
            let image = disk.crash(mode);
            match open_sim(&image, &config) {
                Ok((wal, recovery)) => {
                    let recovered = read_back(&wal);
                    check_prefix(&recovered, &batches, acked);
                    recoveries += 1;
                    torn += usize::from(recovery.report.torn_tail.is_some());
                    // The recovered log keeps working: append, and a reopen sees the same.
                    let next =
                        recovered.groups.get(&GroupId(1)).map_or(1, common::ModelGroup::next_index);
                    let mut more = WriteBatch::new();
                    more.add_entries(GroupId(1), next, [(99, Bytes::from_static(b"after"))]);
                    if let Err(error) = block_on(wal.append(more)) {
                        panic!("step {step} {mode:?}: append after recovery: {error}");
                    }
                    let after = read_back(&wal);
                    drop(wal);
                    let (again, _) = open_sim(&image, &config).unwrap();
                    assert_eq!(read_back(&again), after, "step {step} {mode:?}: reopen differs");
                }
                Err(error) => panic!("step {step} of {total_ops}, {mode:?}: open failed: {error}"),
            }
        }
    }
    assert!(recoveries > 1000, "only {recoveries} recoveries");
    assert!(torn > 0, "no crash left a torn tail: the test is not cutting writes");
}

/// S8: every single IO operation of the workload failing once with EIO. A failed write or
/// fdatasync poisons the log (nothing acknowledged after); a failed preparation step only fails
/// the appends waiting on it. Either way, after a crash, every acknowledged record is there.
#[test]
fn every_failure_point_poisons_or_fails_cleanly_and_loses_nothing_acknowledged() {
    let config = inline_config(SEGMENT_BYTES);
    let batches = scripted_batches(11, ROUNDS);
    let total_ops = {
        let disk = SimStorage::new();
        let (wal, _) = open_sim(&disk, &config).unwrap();
        run_batches(&wal, &batches);
        disk.op_count()
    };
    let mut poisonings = 0;
    for step in 1..=total_ops {
        let disk = SimStorage::new();
        disk.fail_nth_op(step, SimError::Io);
        let Ok((wal, _)) = open_sim(&disk, &config) else { continue };
        let acked = run_batches(&wal, &batches);
        if acked < ROUNDS {
            // An empty flush probes for poisoning without changing what the log holds.
            if let Err(WalError::Poisoned { .. }) = block_on(wal.flush()) {
                poisonings += 1;
                assert!(
                    matches!(wal.entries(GroupId(1), 1..2), Err(WalError::Poisoned { .. })),
                    "step {step}: reads after poisoning must fail"
                );
            }
        }
        std::mem::forget(wal);
        let image = disk.crash(CrashMode::LOSE_UNSYNCED);
        let (wal, _) =
            open_sim(&image, &config).unwrap_or_else(|e| panic!("step {step}: reopen failed: {e}"));
        let recovered = read_back(&wal);
        check_prefix(&recovered, &batches, acked);
    }
    assert!(poisonings > 100, "only {poisonings} poisonings: failures are not hitting writes");
}

/// S9: EIO on fdatasync poisons the log for good: that append and every later call fail, and it
/// is never retried.
#[test]
fn fdatasync_error_poisons_and_is_never_retried() {
    let disk = SimStorage::new();
    let config = inline_config(SEGMENT_BYTES);
    let (wal, _) = open_sim(&disk, &config).unwrap();
    let batches = scripted_batches(3, 20);
    assert_eq!(run_batches(&wal, &batches[..10]), 10);
    disk.fail_all(SimOp::Sync, SimError::Io);
    let syncs_before = disk.op_count_of(SimOp::Sync);
    let error = block_on(wal.append(batches[10].clone())).unwrap_err();
    assert!(matches!(error, WalError::Poisoned { op: "fdatasync", .. }), "{error}");
    disk.heal(SimOp::Sync);
    for batch in &batches[11..] {
        assert!(matches!(block_on(wal.append(batch.clone())), Err(WalError::Poisoned { .. })));
    }
    assert!(matches!(block_on(wal.flush()), Err(WalError::Poisoned { .. })));
    assert_eq!(disk.op_count_of(SimOp::Sync), syncs_before + 1, "a failed fdatasync was retried");
    assert!(matches!(wal.close(), Err(WalError::Poisoned { .. })));
}

/// S9 with a writer thread and threads blocked in `Wal::append_blocking`: a failed fdatasync
/// reaches every one of them as an error (none hangs), and the log stays poisoned. The batching
/// delay keeps the idle log from being written by the first appending thread, so the threads
/// join one round and sleep on it (`log::tests` checks that they do, deterministically).
#[test]
fn fdatasync_error_reaches_every_thread_blocked_in_wait() {
    let disk = SimStorage::new();
    let config = Config {
        writer: WriterMode::Threads,
        batch_delay_us_max: 200_000,
        ..inline_config(SEGMENT_BYTES)
    };
    let (wal, _) = open_sim(&disk, &config).unwrap();
    let wal = Arc::new(wal);
    let batches = scripted_batches(5, 4);
    assert_eq!(run_batches(&wal, &batches), 4);
    disk.fail_all(SimOp::Sync, SimError::Io);
    let syncs_before = disk.op_count_of(SimOp::Sync);
    let threads = 16u64;
    let (tx, rx) = std::sync::mpsc::channel();
    for t in 0..threads {
        let (wal, tx) = (Arc::clone(&wal), tx.clone());
        std::thread::spawn(move || {
            let mut batch = WriteBatch::new();
            batch.add_entries(GroupId(1_000 + t), 1, [(1, Bytes::from_static(b"lost"))]);
            tx.send(wal.append_blocking(batch)).unwrap();
        });
    }
    for _ in 0..threads {
        let result = rx.recv_timeout(std::time::Duration::from_secs(30));
        let Ok(Err(error)) = result else { panic!("a waiter hung or succeeded: {result:?}") };
        assert!(matches!(error, WalError::Poisoned { .. }), "{error}");
    }
    assert_eq!(disk.op_count_of(SimOp::Sync), syncs_before + 1, "a failed fdatasync was retried");
    assert!(matches!(wal.append_blocking(WriteBatch::new()), Err(WalError::Poisoned { .. })));
}

/// S9: ENOSPC is a typed `DiskFull`; maintenance (compaction) still works through the reserved
/// segment, frees segments, and appends work again; nothing acknowledged is lost.
#[test]
fn disk_full_is_typed_and_compaction_still_frees_space() {
    let disk = SimStorage::new();
    let config = inline_config(SEGMENT_BYTES);
    let (wal, _) = open_sim(&disk, &config).unwrap();
    disk.set_space(Some(0));
    let group = GroupId(9);
    let mut index = 1;
    let mut acked = 0;
    let error = loop {
        let mut batch = WriteBatch::new();
        batch.add_entries(group, index, [(1, Bytes::from(vec![index as u8; 500]))]);
        match block_on(wal.append(batch)) {
            Ok(()) => {
                index += 1;
                acked += 1;
            }
            Err(error) => break error,
        }
        assert!(acked < 10_000, "the disk never filled");
    };
    assert!(matches!(error, WalError::DiskFull), "{error}");
    assert!(acked > 10, "only {acked} appends before the disk was full");
    // Nothing was poisoned: reads work, and compaction goes through the reserve.
    assert_eq!(wal.entries(group, 1..2).unwrap()[0].payload[0], 1);
    block_on(wal.compact(group, index - 1, 1)).unwrap();
    // The compaction freed a whole segment: a segment's worth of appends works again without
    // new space, and then the disk is full again.
    let recycled_before = wal.stats().segments_recycled;
    let mut appended_after = 0;
    loop {
        let mut batch = WriteBatch::new();
        batch.add_entries(group, index, [(2, Bytes::from(vec![7u8; 500]))]);
        match block_on(wal.append(batch)) {
            Ok(()) => {
                index += 1;
                appended_after += 1;
            }
            Err(WalError::DiskFull) => break,
            Err(error) => panic!("{error}"),
        }
        assert!(appended_after < 10_000, "the disk never filled again");
    }
    assert!(appended_after >= 20, "only {appended_after} appends after compaction");
    assert!(wal.stats().segments_recycled > recycled_before, "{:?}", wal.stats());
    let expected = read_back(&wal);
    wal.close().unwrap();
    let (wal, _) = open_sim(&disk, &config).unwrap();
    assert_eq!(read_back(&wal), expected);
}

/// A laggard group with a few live entries in the oldest segment would pin it forever; after a
/// rotation its state is copied forward, the segment is recycled, and nothing changes for readers
/// or after a restart.
#[test]
fn a_laggard_group_is_copied_forward_so_its_segment_can_be_recycled() {
    let disk = SimStorage::new();
    let config = inline_config(SEGMENT_BYTES);
    let (wal, _) = open_sim(&disk, &config).unwrap();
    let laggard = GroupId(1);
    let busy = GroupId(2);
    let mut batch = WriteBatch::new();
    batch.add_entries(laggard, 1, [(1, Bytes::from_static(b"a")), (1, Bytes::from_static(b"b"))]);
    block_on(wal.append(batch)).unwrap();
    let mut next = 1;
    let write_busy = |count: u64, next: &mut u64| {
        for _ in 0..count {
            let mut batch = WriteBatch::new();
            batch.add_entries(busy, *next, [(1, Bytes::from(vec![3u8; 700]))]);
            block_on(wal.append(batch)).unwrap();
            *next += 1;
        }
    };
    write_busy(30, &mut next);
    assert_eq!(wal.pinning_groups(), vec![laggard, busy]);
    // The busy group compacts as it goes; only the laggard holds the first segment.
    block_on(wal.compact(busy, next - 1, 1)).unwrap();
    assert_eq!(wal.pinning_groups(), vec![laggard]);
    write_busy(60, &mut next);
    let stats = wal.stats();
    assert!(stats.groups_rewritten >= 1, "{stats:?}");
    assert!(stats.segments_recycled >= 1, "{stats:?}");
    let first_segment = flotilla_wal::segment::segment_file_name(1);
    assert!(
        !disk.file_names().contains(&first_segment),
        "the laggard's first segment is still live: {:?}",
        disk.file_names()
    );
    let entries = wal.entries(laggard, 1..3).unwrap();
    assert_eq!((&entries[0].payload[..], &entries[1].payload[..]), (&b"a"[..], &b"b"[..]));
    let expected = read_back(&wal);
    wal.close().unwrap();
    let (wal, _) = open_sim(&disk, &config).unwrap();
    assert_eq!(read_back(&wal), expected);
}

//! The same suite on a real directory for both real backends (io_uring and portable): concurrent
//! producers, restart, live payload slices surviving segment recycling, the directory lock. The
//! io_uring variant is skipped, with the reason printed, only where io_uring is unavailable.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::{Model, read_back};
use flotilla_wal::{
    ActiveBackend, Backend, Config, GroupId, HardState, Wal, WalError, WriteBatch, block_on,
    probe_io_uring,
};

fn config(backend: Backend) -> Config {
    Config { segment_bytes: 256 << 10, batch_bytes_max: 64 << 10, backend, ..Config::default() }
}

/// Whether the backend can run here; prints why not.
fn available(backend: Backend) -> bool {
    if backend == Backend::IoUring
        && let Err(error) = probe_io_uring()
    {
        eprintln!("skipping the io_uring variant: {error}");
        return false;
    }
    true
}

fn expected_backend(backend: Backend) -> ActiveBackend {
    if backend == Backend::IoUring { ActiveBackend::IoUring } else { ActiveBackend::Portable }
}

/// Many producers on several threads: every future resolves once, only after its round is
/// durable; nothing is lost or reordered within a group; a restart sees all of it.
fn concurrent_producers(backend: Backend) {
    if !available(backend) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), config(backend)).unwrap();
    assert_eq!(wal.backend(), expected_backend(backend));
    let wal = Arc::new(wal);
    let threads = 8u64;
    let appends = 300u64;
    std::thread::scope(|scope| {
        for t in 0..threads {
            let wal = Arc::clone(&wal);
            scope.spawn(move || {
                for i in 1..=appends {
                    let mut batch = WriteBatch::new();
                    let payload = Bytes::from(format!("group {t} entry {i}"));
                    batch.add_entries(GroupId(t), i, [(1, payload)]);
                    batch.set_hard_state(GroupId(t), HardState { term: 1, vote: t, commit: i });
                    block_on(wal.append(batch)).unwrap();
                    // Durable and visible once the future resolved.
                    assert_eq!(wal.group_state(GroupId(t)).unwrap().last_index, i);
                }
            });
        }
    });
    let stats = wal.stats();
    assert_eq!(stats.entries, threads * appends);
    assert!(stats.fdatasyncs <= stats.rounds, "{stats:?}");
    eprintln!(
        "{backend:?}: {} appends in {} rounds ({} written by the appending thread, {} \
         fdatasyncs)",
        threads * appends,
        stats.rounds,
        stats.rounds_inline,
        stats.fdatasyncs
    );
    let before = read_back(&wal);
    for t in 0..threads {
        let entries = wal.entries(GroupId(t), 1..appends + 1).unwrap();
        for (i, entry) in entries.iter().enumerate() {
            assert_eq!(entry.payload, format!("group {t} entry {}", i + 1));
        }
    }
    Arc::into_inner(wal).unwrap().close().unwrap();
    let (wal, recovery) = Wal::open(dir.path(), config(backend)).unwrap();
    assert_eq!(recovery.groups.len(), threads as usize);
    assert_eq!(recovery.report.torn_tail, None);
    assert_eq!(read_back(&wal), before);
}

/// Rotation, compaction and recycling on a real disk: a payload slice taken from an old segment
/// stays byte-for-byte the same after that segment is retired and the log goes on writing (the
/// file is deleted rather than rewritten while the slice lives).
fn live_slices_survive_recycling(backend: Backend) {
    if !available(backend) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), config(backend)).unwrap();
    let group = GroupId(1);
    let payload = |i: u64| Bytes::from(vec![(i % 251) as u8; 1000]);
    let mut next = 1u64;
    let mut append_many = |wal: &Wal, count: u64| {
        for _ in 0..count {
            let mut batch = WriteBatch::new();
            batch.add_entries(group, next, [(1, payload(next))]);
            block_on(wal.append(batch)).unwrap();
            next += 1;
        }
    };
    append_many(&wal, 10);
    let held = wal.entries(group, 1..2).unwrap().remove(0).payload;
    assert_eq!(held, payload(1));
    // Fill several segments, compact everything, keep writing: old segments are retired and
    // their files reused.
    append_many(&wal, 1500);
    let last = wal.group_state(group).unwrap().last_index;
    block_on(wal.compact(group, last, 1)).unwrap();
    append_many(&wal, 1500);
    let stats = wal.stats();
    assert!(stats.rotations >= 8, "{stats:?}");
    assert!(stats.segments_deleted >= 1, "the held segment should be deleted: {stats:?}");
    assert!(stats.segments_recycled >= 1, "other segments should be recycled: {stats:?}");
    assert_eq!(held, payload(1), "a live slice changed under its reader");
    drop(held);
    let model: Model = read_back(&wal);
    wal.close().unwrap();
    let (wal, _) = Wal::open(dir.path(), config(backend)).unwrap();
    assert_eq!(read_back(&wal), model);
}

/// Tags written with the entries come back unchanged: from the live log, after a group pinning
/// the oldest segment was copied forward (the copy reads each tag from the old segment's mapping
/// and writes it again), and after close and reopen (recovery).
fn tags_survive_rewrite_and_reopen(backend: Backend) {
    if !available(backend) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), config(backend)).unwrap();
    let laggard = GroupId(1);
    let busy = GroupId(2);
    let laggard_entries: Vec<(u64, u8, Bytes)> = vec![
        (1, 0, Bytes::from_static(b"normal")),
        (1, 1, Bytes::from_static(b"membership")),
        (2, 2, Bytes::new()),
        (2, 0xFF, Bytes::from_static(b"last")),
    ];
    let mut batch = WriteBatch::new();
    batch.add_tagged_entries(laggard, 1, laggard_entries.clone());
    batch.add_entries(laggard, 5, [(2, Bytes::from_static(b"untagged"))]);
    block_on(wal.append(batch)).unwrap();
    let check_laggard = |wal: &Wal, when: &str| {
        let read = wal.entries(laggard, 1..6).unwrap();
        let got: Vec<(u64, u64, u8, Bytes)> =
            read.into_iter().map(|e| (e.index, e.term, e.tag, e.payload)).collect();
        let mut expected: Vec<(u64, u64, u8, Bytes)> = laggard_entries
            .iter()
            .zip(1..)
            .map(|((term, tag, payload), index)| (index, *term, *tag, payload.clone()))
            .collect();
        expected.push((5, 2, 0, Bytes::from_static(b"untagged")));
        assert_eq!(got, expected, "{when}");
    };
    check_laggard(&wal, "as written");

    // The busy group fills segments with tagged entries and compacts as it goes, so only the
    // laggard pins the first segment; rotations then copy it forward.
    let busy_tag = |index: u64| (index % 7 * 40) as u8;
    let mut next = 1u64;
    for _ in 0..20 {
        for _ in 0..20 {
            let mut batch = WriteBatch::new();
            let payload = Bytes::from(vec![(next % 251) as u8; 4000]);
            batch.add_tagged_entries(busy, next, [(3, busy_tag(next), payload)]);
            block_on(wal.append(batch)).unwrap();
            next += 1;
        }
        block_on(wal.compact(busy, next - 2, 3)).unwrap();
    }
    block_on(wal.rewrite_pinning()).unwrap();
    block_on(wal.flush()).unwrap();
    let stats = wal.stats();
    assert!(stats.groups_rewritten >= 1, "the laggard was never copied forward: {stats:?}");
    let first_segment = dir.path().join(flotilla_wal::segment::segment_file_name(1));
    assert!(!first_segment.exists(), "the laggard's first segment is still live: {stats:?}");
    check_laggard(&wal, "after the copy forward");
    let busy_left = wal.entries(busy, next - 1..next).unwrap();
    assert_eq!(busy_left[0].tag, busy_tag(next - 1));

    let model: Model = read_back(&wal);
    wal.close().unwrap();
    let (wal, _) = Wal::open(dir.path(), config(backend)).unwrap();
    check_laggard(&wal, "after reopen");
    assert_eq!(read_back(&wal), model, "tags (and all else) survive recovery");
}

/// Polls `future` to completion on this thread without `block_on`, as an executor would.
fn poll_like_an_executor<F: std::future::Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        std::thread::park();
    }
}

/// On an idle log, an append awaited with `block_on` is written and synced by the appending
/// thread itself (no hand-off to the writer thread); one polled by an executor, or one made
/// while another append is in flight, goes to the writer thread as before.
fn an_idle_blocking_append_writes_its_own_round(backend: Backend) {
    if !available(backend) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), config(backend)).unwrap();
    let batch = |i: u64| {
        let mut batch = WriteBatch::new();
        batch.add_entries(GroupId(1), i, [(1, Bytes::from(format!("entry {i}")))]);
        batch
    };
    block_on(wal.append(batch(1))).unwrap();
    let stats = wal.stats();
    assert_eq!((stats.rounds, stats.rounds_inline, stats.fdatasyncs), (1, 1, 1), "{stats:?}");

    poll_like_an_executor(wal.append(batch(2))).unwrap();
    let stats = wal.stats();
    assert_eq!((stats.rounds, stats.rounds_inline, stats.fdatasyncs), (2, 1, 2), "{stats:?}");

    // An append in flight (joined, not yet finished): the next one is not alone.
    let mut first = wal.append(batch(3));
    let waker = std::task::Waker::noop();
    let polled = std::pin::Pin::new(&mut first).poll(&mut std::task::Context::from_waker(waker));
    assert!(first.joined(), "{polled:?}");
    block_on(wal.append(batch(4))).unwrap();
    block_on(first).unwrap();
    let stats = wal.stats();
    assert_eq!(stats.rounds_inline, 1, "{stats:?}");
    assert_eq!(stats.fdatasyncs, stats.rounds, "{stats:?}");
    // Whoever writes it (the writer thread may still be finishing round 4), it is durable.
    block_on(wal.append(batch(5))).unwrap();
    let entries = wal.entries(GroupId(1), 1..6).unwrap();
    for (i, entry) in entries.iter().enumerate() {
        assert_eq!(entry.payload, format!("entry {}", i + 1));
    }
    wal.close().unwrap();
    let (wal, recovery) = Wal::open(dir.path(), config(backend)).unwrap();
    assert_eq!(recovery.groups[&GroupId(1)].last_index, 5);
    assert_eq!(wal.entries(GroupId(1), 5..6).unwrap()[0].payload, "entry 5");
}

/// Threads blocked in `AppendFuture::wait` (`Wal::append_blocking`): every append returns
/// once durable, including those that found the open round full (4 KiB rounds of 600 B
/// batches), in order within each group, and a restart sees all of it. `sync: false` appends
/// mixed in return once written and are durable after a later synced round.
fn threads_blocked_in_wait(backend: Backend) {
    if !available(backend) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = Config { batch_bytes_max: 4 << 10, ..config(backend) };
    let (wal, _) = Wal::open(dir.path(), config.clone()).unwrap();
    let wal = Arc::new(wal);
    let threads = 32u64;
    let appends = 40u64;
    std::thread::scope(|scope| {
        for t in 0..threads {
            let wal = Arc::clone(&wal);
            scope.spawn(move || {
                for i in 1..=appends {
                    let mut batch = WriteBatch::new();
                    let payload = Bytes::from(vec![(t * appends + i) as u8; 600]);
                    batch.add_entries(GroupId(t), i, [(1, payload)]);
                    if i % 4 == 0 {
                        wal.append_with(batch, false).wait().unwrap();
                    } else {
                        wal.append_blocking(batch).unwrap();
                    }
                    assert_eq!(wal.group_state(GroupId(t)).unwrap().last_index, i);
                }
                // The last append was `sync: false`: this one makes it durable.
                let mut batch = WriteBatch::new();
                batch.set_hard_state(GroupId(t), HardState { term: 1, vote: t, commit: appends });
                wal.append_blocking(batch).unwrap();
            });
        }
    });
    let stats = wal.stats();
    assert_eq!(stats.entries, threads * appends);
    let before = read_back(&wal);
    for t in 0..threads {
        let entries = wal.entries(GroupId(t), 1..appends + 1).unwrap();
        for (i, entry) in (1..).zip(&entries) {
            assert_eq!(entry.payload, vec![(t * appends + i) as u8; 600]);
        }
    }
    Arc::into_inner(wal).unwrap().close().unwrap();
    let (wal, recovery) = Wal::open(dir.path(), config).unwrap();
    assert_eq!(recovery.groups.len(), threads as usize);
    assert_eq!(read_back(&wal), before);
}

macro_rules! on_both_backends {
    ($($test:ident),*) => {
        mod io_uring {
            $(#[test] fn $test() { super::$test(flotilla_wal::Backend::IoUring) })*
        }
        mod portable {
            $(#[test] fn $test() { super::$test(flotilla_wal::Backend::Portable) })*
        }
    };
}

on_both_backends!(
    concurrent_producers,
    threads_blocked_in_wait,
    an_idle_blocking_append_writes_its_own_round,
    live_slices_survive_recycling,
    tags_survive_rewrite_and_reopen
);

/// Format version 1 (entries without a tag byte) is not read: its segments are refused as
/// corrupt rather than misread.
#[test]
fn a_version_1_segment_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), config(Backend::Portable)).unwrap();
    let mut batch = WriteBatch::new();
    batch.add_entries(GroupId(1), 1, [(1, Bytes::from_static(b"x"))]);
    block_on(wal.append(batch)).unwrap();
    wal.close().unwrap();
    let path = dir.path().join(flotilla_wal::segment::segment_file_name(1));
    let mut bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes[8..10], flotilla_wal::segment::FORMAT_VERSION.to_le_bytes());
    assert_eq!(flotilla_wal::segment::FORMAT_VERSION, 2);
    bytes[8..10].copy_from_slice(&1u16.to_le_bytes());
    let crc = crc32fast::hash(&bytes[0..60]);
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    match Wal::open(dir.path(), config(Backend::Portable)) {
        Err(WalError::Corrupt { segment: 1, offset: 0, reason }) => {
            assert!(reason.contains("version 1"), "{reason}");
        }
        other => panic!("a version-1 segment was not refused: {other:?}"),
    }
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), config(Backend::Portable)).unwrap();
    assert!(matches!(Wal::open(dir.path(), config(Backend::Portable)), Err(WalError::Locked)));
    wal.close().unwrap();
    let (wal, _) = Wal::open(dir.path(), config(Backend::Portable)).unwrap();
    drop(wal);
}

#[test]
fn a_batch_larger_than_a_round_is_refused_before_any_io() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), config(Backend::Portable)).unwrap();
    let mut batch = WriteBatch::new();
    batch.add_entries(GroupId(1), 1, [(1, Bytes::from(vec![0u8; 100 << 10]))]);
    let error = block_on(wal.append(batch)).unwrap_err();
    assert!(matches!(error, WalError::BatchTooLarge { .. }), "{error}");
    let mut gap = WriteBatch::new();
    gap.add_entries(GroupId(1), 5, [(1, Bytes::from_static(b"x"))]);
    assert!(matches!(block_on(wal.append(gap)), Err(WalError::InvalidBatch { .. })));
    assert_eq!(wal.stats().rounds, 0);
}

#[test]
fn invalid_configurations_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bad = [
        Config { segment_bytes: 1000, ..Config::default() },
        Config { segment_bytes: 8192, batch_bytes_max: 8192, ..Config::default() },
        Config { batch_bytes_max: 0, ..Config::default() },
        Config { prepared_segments: 0, ..Config::default() },
    ];
    for config in bad {
        assert!(matches!(Wal::open(dir.path(), config), Err(WalError::InvalidConfig(_))));
    }
}

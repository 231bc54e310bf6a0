//! The log: open and recover, append (group commit), read, compact, recycle, close.
//!
//! `writer.rs` holds the write path, `segments.rs` segment preparation and garbage collection.

mod metered;
mod segments;
mod writer;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};

use crate::commit::{AppendFuture, PANICKED, Queue, Round, RoundDone};
use crate::config::{Config, WriterMode};
use crate::error::WalError;
use crate::index::{Bounds, Index, resolve_seq};
use crate::io::{self, ActiveBackend, Backend, DirStorage, Storage, StorageFile, Syncer};
use crate::record::WriteBatch;
use crate::recovery::{Recovery, recover};
use crate::segment::SEGMENT_HEADER_LEN;
use crate::{GroupId, GroupState, ReadView};

/// An entry read back from the log. `payload` is a zero-copy slice of the segment's memory map
/// on a real disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its index.
    pub index: u64,
    /// Its term.
    pub term: u64,
    /// Its tag: opaque to the WAL, chosen by the caller when the entry was written
    /// ([`WriteBatch::add_tagged_entries`]); 0 for entries added with
    /// [`WriteBatch::add_entries`].
    pub tag: u8,
    /// Its payload.
    pub payload: Bytes,
}

/// Counters describing the log's work since it was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// The IO backend in use.
    pub backend: Option<ActiveBackend>,
    /// Rounds (records) written.
    pub rounds: u64,
    /// Rounds written by the appending thread itself rather than the writer thread (an append
    /// awaited with [`crate::block_on`] or [`AppendFuture::wait`] on an idle log).
    pub rounds_inline: u64,
    /// Rounds whose fdatasync ran while the writer finished the round before (index update,
    /// producers' wake-ups): the io_uring backend and the simulated disk's writer thread. The
    /// portable backend syncs on the writer thread and never overlaps.
    pub rounds_overlapped: u64,
    /// Entries written.
    pub entries: u64,
    /// Record bytes written (headers and padding included).
    pub bytes: u64,
    /// fdatasyncs issued on the write path (one per synced round, plus one per rotation that
    /// follows unsynced rounds).
    pub fdatasyncs: u64,
    /// Segment rotations.
    pub rotations: u64,
    /// Rotations that had to wait for a segment to be prepared.
    pub rotation_stalls: u64,
    /// Segment files created (pre-written).
    pub segments_created: u64,
    /// Segments recycled in place.
    pub segments_recycled: u64,
    /// Segments deleted (their map was still referenced, or their size was stale).
    pub segments_deleted: u64,
    /// Live segments.
    pub segments_live: u64,
    /// Live entries over all groups.
    pub live_entries: u64,
    /// Heap bytes of the in-memory index.
    pub index_bytes: u64,
    /// Groups whose few live entries were copied forward to free the oldest segment.
    pub groups_rewritten: u64,
}

#[derive(Debug, Default)]
struct Counters {
    rounds: AtomicU64,
    rounds_inline: AtomicU64,
    rounds_overlapped: AtomicU64,
    entries: AtomicU64,
    bytes: AtomicU64,
    fdatasyncs: AtomicU64,
    rotations: AtomicU64,
    rotation_stalls: AtomicU64,
    segments_created: AtomicU64,
    segments_recycled: AtomicU64,
    segments_deleted: AtomicU64,
    groups_rewritten: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// What readers see: the index and a view of every live segment.
pub(crate) struct ReadState {
    pub index: Index,
    pub segments: BTreeMap<u64, ReadView>,
}

/// The segment being written.
struct Active {
    seq: u64,
    file: Arc<dyn StorageFile>,
    size: u64,
    offset: u64,
    /// Written since the last fdatasync.
    unsynced: bool,
}

/// The writer's own state.
struct WriterCore {
    active: Active,
    next_write_seq: u64,
    /// Every round up to this one is durable.
    durable_write_seq: u64,
    /// A synced round should run garbage collection (an earlier unsynced one freed something).
    gc_pending: bool,
}

struct Prepared {
    seq: u64,
    file: Arc<dyn StorageFile>,
    size: u64,
}

/// Segments between the writer and the preparer.
#[derive(Default)]
struct Segs {
    prepared: VecDeque<Prepared>,
    next_prepare_seq: u64,
    /// Files free for reuse: `(name, file, size)`.
    recyclable: Vec<(String, Arc<dyn StorageFile>, u64)>,
    /// Segments to recycle or delete, with their (detached) read views.
    retire: VecDeque<(u64, ReadView)>,
    /// Files of live segments.
    files: BTreeMap<u64, Arc<dyn StorageFile>>,
    disk_full: bool,
    error: Option<WalError>,
    preparing: bool,
    closed: bool,
}

/// An accepted batch: its round's completion, and the round itself when the caller is to write
/// it (see [`Shared::enqueue`]).
pub(crate) type Joined = (Arc<RoundDone>, Option<Round>);

/// State shared by the log handle, its futures and its threads.
pub(crate) struct Shared {
    config: Config,
    storage: Arc<dyn Storage>,
    backend: ActiveBackend,
    queue: Mutex<Queue>,
    work: Condvar,
    core: Mutex<WriterCore>,
    segs: Mutex<Segs>,
    segs_changed: Condvar,
    read: RwLock<ReadState>,
    poison: OnceLock<WalError>,
    counters: Counters,
    /// The metrics this log records, labelled once at open.
    metrics: metered::WalMetrics,
    rewrite_requested: std::sync::atomic::AtomicBool,
    /// Mirrors `Segs::disk_full` for the append path: while set, batches with new entries are
    /// refused at once, so rounds hold only maintenance and compaction can always get out.
    disk_full: std::sync::atomic::AtomicBool,
    /// Appends that joined a round and whose future has not finished yet.
    pub(crate) in_flight: std::sync::atomic::AtomicUsize,
}

/// A segmented, group-committed write-ahead log shared by many Raft groups.
///
/// ```
/// use bytes::Bytes;
/// use flotilla_wal::{Config, GroupId, HardState, Wal, WriteBatch, block_on};
///
/// let dir = tempfile::tempdir().unwrap();
/// let config = Config { segment_bytes: 1 << 20, batch_bytes_max: 64 << 10, ..Config::default() };
/// let (wal, recovery) = Wal::open(dir.path(), config.clone()).unwrap();
/// assert!(recovery.groups.is_empty());
///
/// let mut batch = WriteBatch::new();
/// batch.add_entries(GroupId(1), 1, [(1, Bytes::from_static(b"hello"))]);
/// batch.set_hard_state(GroupId(1), HardState { term: 1, vote: 1, commit: 1 });
/// block_on(wal.append(batch)).unwrap(); // durable: written and fdatasync'd
/// assert_eq!(wal.entries(GroupId(1), 1..2).unwrap()[0].payload, "hello");
/// wal.close().unwrap();
///
/// let (_wal, recovery) = Wal::open(dir.path(), config).unwrap();
/// assert_eq!(recovery.groups[&GroupId(1)].last_index, 1);
/// ```
pub struct Wal {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal").field("backend", &self.shared.backend).finish_non_exhaustive()
    }
}

impl Wal {
    /// Opens (creating if needed) the log in directory `dir` and recovers it.
    pub fn open(dir: impl AsRef<Path>, config: Config) -> Result<(Wal, Recovery), WalError> {
        let storage =
            DirStorage::new(dir).map_err(|e| WalError::io("creating the directory", e))?;
        Wal::open_with(Arc::new(storage), config)
    }

    /// Opens the log on any [`Storage`] (the simulated disk in tests).
    #[expect(
        clippy::needless_pass_by_value,
        reason = "the log keeps a clone; callers hand theirs over"
    )]
    pub fn open_with(
        storage: Arc<dyn Storage>,
        config: Config,
    ) -> Result<(Wal, Recovery), WalError> {
        config.validate()?;
        storage.lock().map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                WalError::Locked
            } else {
                WalError::io("locking the directory", e)
            }
        })?;
        let opened = Wal::open_locked(&storage, config);
        if opened.is_err() {
            // A log that failed to open must not keep the directory from the next attempt.
            storage.unlock();
        }
        opened
    }

    fn open_locked(
        storage: &Arc<dyn Storage>,
        config: Config,
    ) -> Result<(Wal, Recovery), WalError> {
        let (backend, syncer) = choose_backend(storage.as_ref(), &config)?;
        let started = Instant::now();
        let recovered = recover(storage.as_ref(), config.recovery)?;
        let mut read = ReadState { index: recovered.index, segments: BTreeMap::new() };
        let mut files = BTreeMap::new();
        for segment in &recovered.segments {
            let view = Arc::clone(&segment.file)
                .read_view()
                .map_err(|e| WalError::io("mapping a segment", e))?;
            read.segments.insert(segment.seq, view);
            files.insert(segment.seq, Arc::clone(&segment.file));
        }
        let groups: BTreeMap<GroupId, GroupState> =
            read.index.groups.iter().map(|(g, index)| (*g, index.state())).collect();
        let bounds: HashMap<GroupId, Bounds> =
            read.index.groups.iter().map(|(g, index)| (*g, index.bounds)).collect();
        let last = recovered.segments.last();
        let next_prepare_seq = recovered.max_seq_seen + 1;
        let mut spares = Vec::new();
        for (name, file, size) in recovered.spares {
            if size == config.segment_bytes {
                spares.push((name, file, size));
            } else {
                storage.remove(&name).map_err(|e| WalError::io("removing a stale spare", e))?;
            }
        }
        let placeholder =
            Active { seq: 0, file: Arc::new(NoFile), size: 0, offset: 0, unsynced: false };
        let shared = Arc::new(Shared {
            storage: Arc::clone(storage),
            backend,
            queue: Mutex::new(Queue::new(bounds)),
            work: Condvar::new(),
            core: Mutex::new(WriterCore {
                active: placeholder,
                next_write_seq: recovered.next_write_seq,
                durable_write_seq: recovered.next_write_seq - 1,
                gc_pending: false,
            }),
            segs: Mutex::new(Segs {
                next_prepare_seq,
                recyclable: spares,
                files,
                ..Segs::default()
            }),
            segs_changed: Condvar::new(),
            read: RwLock::new(read),
            poison: OnceLock::new(),
            counters: Counters::default(),
            metrics: metered::WalMetrics::new(&config.metrics_labels, backend.name()),
            rewrite_requested: std::sync::atomic::AtomicBool::new(false),
            disk_full: std::sync::atomic::AtomicBool::new(false),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            config,
        });
        shared.start_writing(last, recovered.active_offset)?;
        tracing::info!(
            backend = backend.name(),
            storage = storage.kind(),
            segments = recovered.segments.len(),
            records = recovered.report.records,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "wal opened"
        );
        let wal = Wal { shared, threads: Mutex::new(Vec::new()) };
        if wal.shared.config.writer == WriterMode::Threads {
            wal.start_threads(syncer)?;
        }
        Ok((wal, Recovery { groups, report: recovered.report }))
    }

    /// Starts the writer (with the syncer `choose_backend` made, the io_uring ring that passed
    /// the probe) and the preparer.
    fn start_threads(&self, syncer: Syncer) -> Result<(), WalError> {
        let shared = Arc::clone(&self.shared);
        let writer = std::thread::Builder::new()
            .name("flotilla-wal-writer".into())
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| shared.writer_loop(syncer));
                if std::panic::catch_unwind(run).is_err() {
                    // Also outside a round's write (`Writing` covers those): appends must fail,
                    // not wait for this thread.
                    shared.poison_after_panic();
                }
            })
            .map_err(|e| WalError::io("starting the writer thread", e))?;
        // Recorded at once: if the preparer cannot start, shutdown still joins the writer.
        self.threads.lock().push(writer);
        let shared = Arc::clone(&self.shared);
        let preparer = std::thread::Builder::new()
            .name("flotilla-wal-prepare".into())
            .spawn(move || shared.preparer_loop())
            .map_err(|e| WalError::io("starting the preparer thread", e))?;
        self.threads.lock().push(preparer);
        Ok(())
    }

    /// Appends `batch`; the future resolves once it is durable (written and fdatasync'd).
    pub fn append(&self, batch: WriteBatch) -> AppendFuture {
        self.append_with(batch, true)
    }

    /// Appends `batch`; with `sync: false` the future resolves once it is written (it becomes
    /// durable with the next synced round) and the round forces no fdatasync of its own.
    pub fn append_with(&self, batch: WriteBatch, sync: bool) -> AppendFuture {
        AppendFuture::new(Arc::clone(&self.shared), batch, sync)
    }

    /// Appends and waits on the calling thread until the batch is durable
    /// ([`AppendFuture::wait`]: threads blocked on one round are woken together).
    pub fn append_blocking(&self, batch: WriteBatch) -> Result<(), WalError> {
        self.append(batch).wait()
    }

    /// Resolves once everything appended before it is durable.
    pub fn flush(&self) -> AppendFuture {
        self.append(WriteBatch::new())
    }

    /// Removes `group`'s entries from `from` on (durably).
    pub fn truncate_suffix(&self, group: GroupId, from: u64) -> AppendFuture {
        let mut batch = WriteBatch::new();
        batch.truncate_suffix(group, from);
        self.append(batch)
    }

    /// Removes `group`'s entries through `index` (whose term is `term`) and records the compaction
    /// point; segments nobody needs any more are recycled once this is durable.
    pub fn compact(&self, group: GroupId, index: u64, term: u64) -> AppendFuture {
        let mut batch = WriteBatch::new();
        batch.compact(group, index, term);
        self.append(batch)
    }

    /// The entries of `group` with indexes in `range` (zero-copy on a real disk).
    pub fn entries(&self, group: GroupId, range: Range<u64>) -> Result<Vec<Entry>, WalError> {
        let mut out = Vec::with_capacity(
            usize::try_from(range.end.saturating_sub(range.start)).unwrap_or(0).min(4096),
        );
        self.entries_into(group, range, &mut out)?;
        Ok(out)
    }

    /// Like [`Wal::entries`], appending to a caller-owned vector (reuse it to avoid allocating).
    pub fn entries_into(
        &self,
        group: GroupId,
        range: Range<u64>,
        out: &mut Vec<Entry>,
    ) -> Result<(), WalError> {
        self.shared.check_poison()?;
        let read = self.shared.read.read();
        let index = read.index.groups.get(&group).ok_or(WalError::GroupNotFound(group))?;
        if range.start < index.first_index {
            return Err(WalError::Compacted { group, first_index: index.first_index });
        }
        if range.end > index.bounds.next_index {
            return Err(WalError::Unavailable { group, last_index: index.bounds.next_index - 1 });
        }
        let base = read.segments.keys().next().copied().unwrap_or(0);
        let mut run = index.terms.partition_point(|&(start, _)| start <= range.start);
        for at in range {
            while run < index.terms.len() && index.terms[run].0 <= at {
                run += 1;
            }
            let term = index.terms[run - 1].1;
            let loc = index.loc(at).expect("live index has a location");
            let seq = resolve_seq(base, loc.seg);
            let view = read.segments.get(&seq).expect("a live entry's segment is live");
            // The tag is the byte before the payload (the end of the entry's header), read from
            // the same mapping: the index keeps no copy of it.
            let (tag, payload) = view
                .entry(loc.offset as usize, loc.len as usize)
                .map_err(|e| WalError::io("reading an entry", e))?;
            out.push(Entry { index: at, term, tag, payload });
        }
        Ok(())
    }

    /// The term of `group`'s entry at `index` (also answers for the compaction point).
    pub fn term(&self, group: GroupId, index: u64) -> Option<u64> {
        self.shared.read.read().index.groups.get(&group)?.term(index)
    }

    /// Where each term starts among `group`'s live entries from index `from` on, as
    /// `(first index, term)` in increasing order: what a Raft replica needs to know every
    /// entry's term without reading the entries (empty if there are none).
    pub fn term_starts(&self, group: GroupId, from: u64) -> Vec<(u64, u64)> {
        self.shared
            .read
            .read()
            .index
            .groups
            .get(&group)
            .map_or_else(Vec::new, |g| g.term_starts(from))
    }

    /// What the log holds of `group` (written rounds only).
    pub fn group_state(&self, group: GroupId) -> Option<GroupState> {
        self.shared.read.read().index.groups.get(&group).map(crate::index::GroupIndex::state)
    }

    /// The groups the log holds anything of.
    pub fn groups(&self) -> Vec<GroupId> {
        let mut groups: Vec<GroupId> =
            self.shared.read.read().index.groups.keys().copied().collect();
        groups.sort_unstable();
        groups
    }

    /// The groups that hold the oldest segment (by live entries, hard state or compaction point).
    pub fn pinning_groups(&self) -> Vec<GroupId> {
        let read = self.shared.read.read();
        let Some(&oldest) = read.segments.keys().next() else { return Vec::new() };
        let mut groups: Vec<GroupId> = read
            .index
            .groups
            .iter()
            .filter(|(_, index)| index.min_segment(oldest) == Some(oldest))
            .map(|(group, _)| *group)
            .collect();
        groups.sort_unstable();
        groups
    }

    /// Asks the writer to copy forward the state of the groups pinning the oldest segment that
    /// have at most `rewrite_entries_max` live entries, so that segment can be recycled once the
    /// copy is durable. Happens by itself after every rotation; the returned future resolves when
    /// the request has been seen (the copy itself is written in the next round).
    pub fn rewrite_pinning(&self) -> AppendFuture {
        self.shared.rewrite_requested.store(true, Ordering::Relaxed);
        self.flush()
    }

    /// Counters since open.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let read = self.shared.read.read();
        Stats {
            backend: Some(self.shared.backend),
            rounds: c.rounds.load(Ordering::Relaxed),
            rounds_inline: c.rounds_inline.load(Ordering::Relaxed),
            rounds_overlapped: c.rounds_overlapped.load(Ordering::Relaxed),
            entries: c.entries.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            fdatasyncs: c.fdatasyncs.load(Ordering::Relaxed),
            rotations: c.rotations.load(Ordering::Relaxed),
            rotation_stalls: c.rotation_stalls.load(Ordering::Relaxed),
            segments_created: c.segments_created.load(Ordering::Relaxed),
            segments_recycled: c.segments_recycled.load(Ordering::Relaxed),
            segments_deleted: c.segments_deleted.load(Ordering::Relaxed),
            segments_live: read.segments.len() as u64,
            live_entries: read.index.live_entries() as u64,
            index_bytes: read.index.heap_bytes() as u64,
            groups_rewritten: c.groups_rewritten.load(Ordering::Relaxed),
        }
    }

    /// Segments holding live data: [`Stats::segments_live`] without the rest of [`Wal::stats`],
    /// some of which walks the whole index (a caller polling it every few ticks should use this).
    pub fn segments_live(&self) -> u64 {
        self.shared.read.read().segments.len() as u64
    }

    /// The IO backend in use.
    pub fn backend(&self) -> ActiveBackend {
        self.shared.backend
    }

    /// Writes everything pending, seals the log with a final synced round (so recovery can tell
    /// damage to the last data round from a torn tail), stops the threads and releases the
    /// directory.
    pub fn close(self) -> Result<(), WalError> {
        self.shutdown()
    }

    fn shutdown(&self) -> Result<(), WalError> {
        {
            let mut queue = self.shared.queue.lock();
            if queue.closed {
                return self.shared.check_poison();
            }
            // From here appends fail with `Closed`; what was accepted is still written.
            queue.closed = true;
        }
        self.shared.work.notify_all();
        let mut threads = self.threads.lock();
        match self.shared.config.writer {
            WriterMode::Threads => {
                // The writer drains, writes the seal and exits; only then the preparer may go
                // (the writer can be waiting for a segment from it).
                if let Some(writer) = (!threads.is_empty()).then(|| threads.remove(0)) {
                    let _ = writer.join();
                }
            }
            WriterMode::Inline => self.shared.drain_and_seal_inline(),
        }
        self.shared.segs.lock().closed = true;
        self.shared.segs_changed.notify_all();
        for thread in threads.drain(..) {
            let _ = thread.join();
        }
        self.shared.storage.unlock();
        self.shared.check_poison()
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Picks the backend and makes the writer's syncer: the simulated disk always goes through
/// [`StorageFile`]; otherwise the configured choice (or `FLOTILLA_WAL_BACKEND`), probing
/// io_uring for `Auto` and keeping the ring that passed the probe.
fn choose_backend(
    storage: &dyn Storage,
    config: &Config,
) -> Result<(ActiveBackend, Syncer), WalError> {
    if storage.kind() == "sim" {
        return Ok((ActiveBackend::Simulated, Syncer::Deferred(None)));
    }
    let portable = Ok((ActiveBackend::Portable, Syncer::Blocking));
    if config.writer == WriterMode::Inline {
        return portable;
    }
    match config.backend.from_env_or() {
        Backend::Portable => portable,
        Backend::IoUring => Ok((ActiveBackend::IoUring, Syncer::io_uring(io::open_ring()?))),
        _ => match io::open_ring() {
            Ok(ring) => Ok((ActiveBackend::IoUring, Syncer::io_uring(ring))),
            Err(error) => {
                tracing::warn!(%error, "io_uring unavailable; using the portable backend");
                portable
            }
        },
    }
}

/// A stand-in file for the moment between building the shared state and installing the first
/// active segment; never written.
struct NoFile;

impl StorageFile for NoFile {
    fn len(&self) -> std::io::Result<u64> {
        Ok(0)
    }
    fn read_exact_at(&self, _: &mut [u8], _: u64) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    fn write_all_at(&self, _: &[u8], _: u64) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn read_view(self: Arc<Self>) -> std::io::Result<ReadView> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    fn as_std(&self) -> Option<&std::fs::File> {
        None
    }
}

impl Shared {
    /// Installs the segment written next (the newest one, or a fresh one for an empty log) and
    /// readies the segments to rotate into and the reserve for a full disk.
    fn start_writing(
        &self,
        last: Option<&crate::recovery::LiveSegment>,
        active_offset: u64,
    ) -> Result<(), WalError> {
        // The newest segment is written next; an empty log starts with a fresh one.
        let active = match last {
            Some(segment) => Active {
                seq: segment.seq,
                file: Arc::clone(&segment.file),
                size: segment.size,
                offset: active_offset,
                unsynced: false,
            },
            None => {
                self.prepare_one()?;
                let prepared = self.segs.lock().prepared.pop_front().expect("just prepared");
                self.install(&prepared)?;
                Active {
                    seq: prepared.seq,
                    file: prepared.file,
                    size: prepared.size,
                    offset: SEGMENT_HEADER_LEN as u64,
                    unsynced: false,
                }
            }
        };
        self.core.lock().active = active;
        // Segments to rotate into, and the reserve for a full disk, exist before the first append.
        while self.needs_preparation() {
            match self.prepare_one() {
                // A full disk does not stop the log from opening: appends get `DiskFull` until
                // compaction frees segments, and what there is can be read.
                Err(WalError::DiskFull) => {
                    tracing::warn!("disk full at open: no segment prepared ahead");
                    break;
                }
                result => result?,
            }
        }
        Ok(())
    }

    pub(crate) fn check_poison(&self) -> Result<(), WalError> {
        match self.poison.get() {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    fn poison_with(&self, op: &'static str, error: std::io::Error) -> WalError {
        let poisoned = WalError::Poisoned { op, cause: Arc::new(error) };
        if self.poison.set(poisoned.clone()).is_ok() {
            tracing::error!(%poisoned, "wal poisoned: refusing all further operations");
            self.metrics.poisoned.increment(1);
        }
        self.poison.get().cloned().unwrap_or(poisoned)
    }

    /// After a panic while a round was written (a bug): poisons the log and fails the open
    /// round, so no caller waits for a write that will not come (the writer thread may be gone).
    /// Rounds being written are failed as the panic drops them (`Round`'s `Drop`).
    pub(crate) fn poison_after_panic(&self) {
        let error = self.poison_with("writing a round", std::io::Error::other(PANICKED));
        // Taken after the poison is set: an append that locks the queue later sees the poison.
        let open = self.queue.lock().take();
        if let Some(open) = open {
            open.done.complete(Err(error));
        }
    }

    /// Checks what can be checked before queueing.
    pub(crate) fn check_batch(&self, batch: &WriteBatch) -> Result<(), WalError> {
        self.check_poison()?;
        if batch.encoded_len() > self.config.batch_bytes_max {
            return Err(WalError::BatchTooLarge {
                bytes: batch.encoded_len(),
                max: self.config.batch_bytes_max,
            });
        }
        Ok(())
    }

    /// Adds `batch` to the open round, or registers to be woken when the round has room. Hands
    /// the round back for the caller to write itself when the log is idle and the caller only
    /// waits (`blocking_caller`, see [`Shared::write_own_round`]).
    pub(crate) fn enqueue(
        &self,
        batch: &WriteBatch,
        sync: bool,
        cx: &Context<'_>,
        blocking_caller: bool,
    ) -> Poll<Result<Joined, WalError>> {
        if let Err(error) = self.check_poison() {
            return Poll::Ready(Err(error));
        }
        if !batch.is_maintenance() && self.disk_full.load(std::sync::atomic::Ordering::Relaxed) {
            return Poll::Ready(Err(WalError::DiskFull));
        }
        let mut queue = self.queue.lock();
        if queue.closed {
            return Poll::Ready(Err(WalError::Closed));
        }
        // Again under the lock: `poison_after_panic` fails the open round after poisoning, and
        // a batch joining the next one could wait for a writer thread that is gone.
        if let Err(error) = self.check_poison() {
            return Poll::Ready(Err(error));
        }
        if !queue.open.is_empty()
            && queue.open.body_len() + batch.encoded_len() > self.config.batch_bytes_max
        {
            queue.space_waiters.push(cx.waker().clone());
            return Poll::Pending;
        }
        if let Err(error) = queue.accept(batch, sync) {
            return Poll::Ready(Err(error));
        }
        let done = Arc::clone(&queue.open.done);
        let idle = self.in_flight.fetch_add(1, Ordering::Relaxed) == 0;
        // An idle log (no round being written, no other append in flight) and a caller that
        // only waits: it writes its own round. Under load some append is always in flight, so
        // rounds keep growing while the writer thread writes the previous one.
        if blocking_caller
            && idle
            && !queue.writing
            && self.config.writer == WriterMode::Threads
            && self.config.batch_delay_us_max == 0
        {
            queue.writing = true;
            let round = queue.take().expect("holds the batch just accepted");
            return Poll::Ready(Ok((done, Some(round))));
        }
        drop(queue);
        self.work.notify_one();
        Poll::Ready(Ok((done, None)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::Bytes;

    use super::Wal;
    use crate::sim::{SimError, SimOp, SimStorage};
    use crate::{Config, GroupId, WalError, WriteBatch};

    /// Threads in `AppendFuture::wait` (through `Wal::append_blocking`) join one round and sleep
    /// on its completion word — no waker for the writer to wake one by one — and all of them
    /// get that round's failed fdatasync as an error.
    #[test]
    fn threads_in_wait_sleep_on_their_round_and_all_get_its_error() {
        let disk = SimStorage::new();
        let config =
            Config { segment_bytes: 1 << 20, batch_bytes_max: 64 << 10, ..Config::default() };
        let (wal, _) = Wal::open_with(Arc::new(disk.clone()), config).unwrap();
        let wal = Arc::new(wal);
        // Hold the right to write rounds, so the writer thread leaves the open round alone.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut queue = wal.shared.queue.lock();
            if !queue.writing {
                queue.writing = true;
                break;
            }
            drop(queue);
            assert!(Instant::now() < deadline, "the writer never went idle");
            std::thread::yield_now();
        }
        let threads = 8u32;
        let (tx, rx) = std::sync::mpsc::channel();
        for t in 0..threads {
            let (wal, tx) = (Arc::clone(&wal), tx.clone());
            std::thread::spawn(move || {
                let mut batch = WriteBatch::new();
                batch.add_entries(GroupId(u64::from(t)), 1, [(1, Bytes::from_static(b"x"))]);
                tx.send(wal.append_blocking(batch)).unwrap();
            });
        }
        loop {
            let queue = wal.shared.queue.lock();
            let joined = queue.open.ops.len();
            let (sleepers, wakers) = queue.open.done.waiters();
            drop(queue);
            assert_eq!(wakers, 0, "a thread in `wait` registered a waker");
            if joined == threads as usize && sleepers == threads {
                break;
            }
            assert!(Instant::now() < deadline, "{joined} joined, {sleepers} asleep");
            std::thread::yield_now();
        }
        disk.fail_all(SimOp::Sync, SimError::Io);
        let syncs_before = disk.op_count_of(SimOp::Sync);
        wal.shared.queue.lock().writing = false;
        wal.shared.work.notify_all();
        for _ in 0..threads {
            let result = rx.recv_timeout(Duration::from_secs(30)).expect("a waiter was not woken");
            assert!(
                matches!(result, Err(WalError::Poisoned { op: "fdatasync", .. })),
                "{result:?}"
            );
        }
        assert_eq!(disk.op_count_of(SimOp::Sync), syncs_before + 1, "one round, one fdatasync");
    }
}

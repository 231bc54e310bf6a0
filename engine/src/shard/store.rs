//! `ShardStore`: the durable side of one shard — its WAL (Raft entries and hard state of every
//! group on the shard), one snapshot file per group, and the catalog of the groups it hosts.
//!
//! Directory layout under the shard's directory:
//!
//! ```text
//! wal/                 the shard's flotilla-wal log (see wal/FORMAT.md)
//! catalog              the groups hosted here and their initial voters
//! snapshots/<group>    the latest state-machine snapshot of each group (16 hex digits)
//! snapshots/<group>.recv     a snapshot file arriving from the leader, spooled as it streams
//! snapshots/<group>.recv-id  which file that is (so a cut stream resumes only into the same)
//! ```
//!
//! Entries keep their [`EntryKind`] in the WAL's per-entry tag byte ([`tag_of`]), so reads stay
//! zero-copy. Small files (catalog, snapshots) are replaced atomically: written to a temporary
//! name, `fsync`'d, renamed, and the directory `fsync`'d. Their layout (all integers
//! little-endian):
//!
//! ```text
//! catalog:  magic "FLCT" | version u16 | reserved u16 | count u32 |
//!           count × (group u64 | voter count u32 | voters u64 …) | crc32 of everything before
//! snapshot: magic "FLSN" | version u16 | reserved u16 | group u64 | index u64 | term u64 |
//!           membership length u32 | membership (raftgroup's encoding) |
//!           data length u64 | data | crc32 of everything before
//! ```
//!
//! A snapshot file is made durable before the WAL drops the entries it covers, so after a crash
//! the snapshot is at or past the WAL's compaction point; [`ShardStore::recover_group`] repairs
//! the other direction (a snapshot whose compaction record was lost) before the group starts.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use flotilla_raftgroup::{
    Entry, EntryKind, Fetch, HardState, LogIndex, Membership, NodeId, RecoveredState, Snapshot,
    SnapshotMeta, Term,
};
use flotilla_wal::{AppendFuture, GroupId, Recovery, Wal, WalError, WriteBatch};

use super::core::PersistItem;
use crate::kv::SnapshotImage;

/// The WAL tag of a normal entry.
pub const TAG_NORMAL: u8 = 0;
/// The WAL tag of a membership entry.
pub const TAG_MEMBERSHIP: u8 = 1;
/// The WAL tag of a leader's no-op entry.
pub const TAG_EMPTY: u8 = 2;

const CATALOG_MAGIC: &[u8; 4] = b"FLCT";
const SNAPSHOT_MAGIC: &[u8; 4] = b"FLSN";
const FILE_VERSION: u16 = 1;
/// Voters per group a catalog record may list: Raft groups have a handful; this bounds what a
/// damaged file can make us allocate.
const VOTERS_MAX: u32 = 64;
/// Entries read from the WAL per step while answering a fetch, so a byte limit stops the read
/// early without first collecting a huge range.
const FETCH_CHUNK: u64 = 256;
/// Entries handed to a recovering replica with its term starts, to warm its cache.
const RECOVERED_TAIL_ENTRIES: u64 = 1024;

/// The WAL tag that stores `kind`.
pub fn tag_of(kind: EntryKind) -> u8 {
    match kind {
        EntryKind::Normal => TAG_NORMAL,
        EntryKind::Membership => TAG_MEMBERSHIP,
        EntryKind::Empty => TAG_EMPTY,
    }
}

/// The entry kind a WAL tag stands for; `None` for a tag this version never writes.
pub fn kind_of(tag: u8) -> Option<EntryKind> {
    match tag {
        TAG_NORMAL => Some(EntryKind::Normal),
        TAG_MEMBERSHIP => Some(EntryKind::Membership),
        TAG_EMPTY => Some(EntryKind::Empty),
        _ => None,
    }
}

/// Why the shard's durable state could not be read or written. Every variant is fatal for the
/// shard: like the WAL, the store never retries a failed write.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The WAL failed (it is poisoned if the failure was a write or an fsync).
    #[error("wal: {0}")]
    Wal(#[from] WalError),
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file's bytes are not what this version writes (bad magic, checksum or field).
    #[error("corrupt {path}: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A WAL entry carries a kind tag this version does not know.
    #[error("group {group}: entry {index} has unknown kind tag {tag}")]
    UnknownTag {
        /// The group.
        group: GroupId,
        /// The entry's index.
        index: u64,
        /// The tag.
        tag: u8,
    },
}

/// The durable state of one shard.
#[derive(Debug)]
pub struct ShardStore {
    dir: PathBuf,
    wal: Wal,
    /// Group → its initial voters (what `create_group` was given).
    catalog: BTreeMap<GroupId, Vec<NodeId>>,
    /// The catalog has staged changes not yet written.
    catalog_dirty: bool,
}

impl ShardStore {
    /// Opens (or creates) the shard directory `dir`, recovering the WAL with `wal_config`.
    pub fn open(
        dir: &Path,
        wal_config: flotilla_wal::Config,
    ) -> Result<(Self, Recovery), StoreError> {
        fs::create_dir_all(dir.join("snapshots")).map_err(io_error("creating", dir))?;
        let (wal, recovery) = Wal::open(dir.join("wal"), wal_config)?;
        let catalog = read_catalog(&dir.join("catalog"))?;
        Ok((Self { dir: dir.to_path_buf(), wal, catalog, catalog_dirty: false }, recovery))
    }

    /// [`ShardStore::open`] with the WAL on `wal_storage` instead of `dir/wal`: the cluster
    /// simulator puts it on a simulated disk (`flotilla_wal::sim::SimStorage`) that can crash
    /// and tear writes. Snapshot files and the catalog stay in `dir`: they are replaced
    /// atomically (temp file, fsync, rename, directory fsync), so after a crash each is either
    /// the old or the new file, which a real directory models exactly.
    pub fn open_with(
        dir: &Path,
        wal_storage: std::sync::Arc<dyn flotilla_wal::io::Storage>,
        wal_config: flotilla_wal::Config,
    ) -> Result<(Self, Recovery), StoreError> {
        fs::create_dir_all(dir.join("snapshots")).map_err(io_error("creating", dir))?;
        let (wal, recovery) = Wal::open_with(wal_storage, wal_config)?;
        let catalog = read_catalog(&dir.join("catalog"))?;
        Ok((Self { dir: dir.to_path_buf(), wal, catalog, catalog_dirty: false }, recovery))
    }

    /// The shard's log.
    pub fn wal(&self) -> &Wal {
        &self.wal
    }

    /// Closes the log after a final synced round; everything acknowledged stays durable either way.
    pub fn close(self) -> Result<(), StoreError> {
        self.wal.close()?;
        Ok(())
    }

    /// The groups hosted here, with their initial voters.
    pub fn groups(&self) -> impl Iterator<Item = (GroupId, &[NodeId])> + '_ {
        self.catalog.iter().map(|(group, voters)| (*group, voters.as_slice()))
    }

    /// Whether `group` is in the catalog.
    pub fn contains(&self, group: GroupId) -> bool {
        self.catalog.contains_key(&group)
    }

    /// Records durably that this shard hosts `group`, created with `voters`.
    pub fn add_group(&mut self, group: GroupId, voters: &[NodeId]) -> Result<(), StoreError> {
        self.stage_group(group, voters);
        self.sync_catalog()
    }

    /// Adds `group` to the catalog in memory only; [`ShardStore::sync_catalog`] makes it
    /// durable. A driver creating many groups at once pays one catalog write for all of them —
    /// but must sync before the new replicas' first output leaves (a vote given by a group the
    /// node then forgets could be given twice).
    pub fn stage_group(&mut self, group: GroupId, voters: &[NodeId]) {
        self.catalog.insert(group, voters.to_vec());
        self.catalog_dirty = true;
    }

    /// Whether the catalog has changes not yet durable.
    pub fn catalog_dirty(&self) -> bool {
        self.catalog_dirty
    }

    /// Makes staged catalog changes durable (nothing to do if there are none).
    pub fn sync_catalog(&mut self) -> Result<(), StoreError> {
        if self.catalog_dirty { self.write_catalog() } else { Ok(()) }
    }

    /// Forgets `group`: the catalog first (so a crash in between leaves a harmless orphan, not a
    /// group without a log), then its snapshot; the returned future completes once the WAL
    /// recorded the removal.
    pub fn remove_group(&mut self, group: GroupId) -> Result<AppendFuture, StoreError> {
        if let Some(voters) = self.catalog.remove(&group)
            && let Err(error) = self.write_catalog()
        {
            self.catalog.insert(group, voters);
            return Err(error);
        }
        self.delete_snapshot(group)?;
        let mut batch = WriteBatch::new();
        batch.remove_group(group);
        Ok(self.wal.append(batch))
    }

    /// What `group` recovers from: its snapshot (restore the state machine from it; `applied`
    /// is its index) and the log after it. If the snapshot is newer than the WAL's compaction
    /// point — a crash between writing the snapshot file and the WAL's compaction record — the
    /// compaction is written (and synced) first, so the WAL and the replica agree on where the
    /// log starts.
    pub fn recover_group(&self, group: GroupId) -> Result<RecoveredState, StoreError> {
        let snapshot = self.load_snapshot(group)?;
        let snapshot_index = snapshot.as_ref().map_or(0, |s| s.meta.index.0);
        if let Some(snapshot) = &snapshot {
            let compacted = self
                .wal
                .group_state(group)
                .and_then(|state| state.compacted)
                .map_or(0, |(index, _)| index);
            if compacted < snapshot_index {
                let mut batch = WriteBatch::new();
                self.compact_to(group, &snapshot.meta, &mut batch);
                flotilla_wal::block_on(self.wal.append(batch))?;
            }
        }
        let Some(state) = self.wal.group_state(group) else {
            return Ok(RecoveredState {
                applied: LogIndex(snapshot_index),
                hard_state: HardState {
                    commit: LogIndex(snapshot_index),
                    term: snapshot.as_ref().map_or(Term(0), |s| s.meta.term),
                    vote: None,
                },
                last_index: LogIndex(snapshot_index),
                snapshot,
                ..RecoveredState::default()
            });
        };
        // The replica learns every index's term from the term starts and keeps only what its
        // cache allows: read the tail of the log only.
        let first = state.first_index.max(snapshot_index + 1);
        let term_starts: Vec<(LogIndex, Term)> = self
            .wal
            .term_starts(group, first)
            .into_iter()
            .map(|(index, term)| (LogIndex(index), Term(term)))
            .collect();
        let tail_start = first.max((state.last_index + 1).saturating_sub(RECOVERED_TAIL_ENTRIES));
        let mut entries = Vec::new();
        if state.last_index >= tail_start {
            let mut raw = Vec::new();
            self.wal.entries_into(group, tail_start..state.last_index + 1, &mut raw)?;
            entries.reserve(raw.len());
            for entry in raw {
                entries.push(to_raft_entry(group, entry)?);
            }
        }
        let mut hard_state = state.hard_state.map_or_else(HardState::default, |hs| HardState {
            term: Term(hs.term),
            vote: (hs.vote != 0).then_some(NodeId(hs.vote)),
            commit: LogIndex(hs.commit),
        });
        hard_state.commit = hard_state.commit.max(LogIndex(snapshot_index));
        if let Some(snapshot) = &snapshot
            && snapshot.meta.term > hard_state.term
        {
            // The snapshot file outlived the round that would have raised the term (it is written
            // first): no vote in the snapshot's term was ever durable, so none is claimed.
            hard_state.term = snapshot.meta.term;
            hard_state.vote = None;
        }
        Ok(RecoveredState {
            hard_state,
            last_index: LogIndex(state.last_index.max(snapshot_index)),
            applied: LogIndex(snapshot_index),
            snapshot,
            entries,
            term_starts,
            membership: None,
        })
    }

    /// Adds what `items` ask to persist to `batch` (one WAL round for the whole shard). A
    /// snapshot in an item is written to its file (durably, now) before its compaction enters
    /// the batch. The batch may exceed the WAL's `batch_bytes_max`: see [`ShardStore::stage_split`].
    pub fn stage(
        &self,
        items: &mut [(GroupId, PersistItem)],
        batch: &mut WriteBatch,
    ) -> Result<(), StoreError> {
        let mut batches = Vec::new();
        self.stage_split(items, usize::MAX, &mut batches)?;
        for op in batches.into_iter().flat_map(WriteBatch::into_ops) {
            batch.push(op);
        }
        Ok(())
    }

    /// Like [`ShardStore::stage`], cut into batches of at most `max_bytes` each (the WAL's
    /// `batch_bytes_max`), pushed onto `batches` in order. Appended in that order they persist
    /// in that order, so a crash keeps a prefix: a group's entries before its hard state, a
    /// snapshot's compaction before the entries after it. Only an entry larger than `max_bytes`
    /// on its own makes a batch exceed it (the WAL refuses it; proposals are bounded below it).
    pub fn stage_split(
        &self,
        items: &mut [(GroupId, PersistItem)],
        max_bytes: usize,
        batches: &mut Vec<WriteBatch>,
    ) -> Result<(), StoreError> {
        use flotilla_wal::record::{ENTRIES_ITEM_HEADER_LEN, ENTRY_HEADER_LEN};
        // Small items (hard state, compaction, truncation) take at most this much.
        const SMALL_ITEMS: usize = 64;
        let mut batch = WriteBatch::new();
        let mut room = |batch: &mut WriteBatch, need: usize| {
            if !batch.is_empty() && batch.encoded_len().saturating_add(need) > max_bytes {
                batches.push(std::mem::take(batch));
            }
        };
        for (group, item) in items {
            let group = *group;
            if let Some(snapshot) = item.snapshot.take() {
                self.install_snapshot(group, &snapshot)?;
                room(&mut batch, SMALL_ITEMS);
                self.compact_to(group, &snapshot.meta, &mut batch);
            }
            let mut entries = std::mem::take(&mut item.entries).into_iter().peekable();
            while let Some(first) = entries.peek() {
                let first_index = first.index.0;
                room(&mut batch, ENTRIES_ITEM_HEADER_LEN + ENTRY_HEADER_LEN + first.payload.len());
                let mut run_bytes = batch.encoded_len() + ENTRIES_ITEM_HEADER_LEN;
                let mut run = Vec::new();
                while let Some(entry) = entries.peek() {
                    let cost = ENTRY_HEADER_LEN + entry.payload.len();
                    if !run.is_empty() && run_bytes.saturating_add(cost) > max_bytes {
                        break;
                    }
                    run_bytes = run_bytes.saturating_add(cost);
                    let entry = entries.next().expect("peeked");
                    run.push((entry.term.0, tag_of(entry.kind), entry.payload));
                }
                batch.add_tagged_entries(group, first_index, run);
            }
            if let Some(hs) = item.hard_state {
                room(&mut batch, SMALL_ITEMS);
                batch.set_hard_state(group, wal_hard_state(hs));
            }
        }
        if !batch.is_empty() {
            batches.push(batch);
        }
        Ok(())
    }

    /// Makes the WAL drop `group`'s entries through `meta.index`, keeping later ones only if the
    /// entry at `meta.index` has the snapshot's term (Raft's rule for installing a snapshot).
    /// A snapshot at or below the WAL's compaction point changes nothing: it is a local snapshot
    /// whose file was written after a newer one from the leader was installed, and the entries
    /// after it are the newer snapshot's log (the WAL no longer knows the stale index's term, so
    /// the rule above would truncate them).
    fn compact_to(&self, group: GroupId, meta: &SnapshotMeta, batch: &mut WriteBatch) {
        let index = meta.index.0;
        let state = self.wal.group_state(group);
        let compacted = state.and_then(|s| s.compacted).map_or(0, |(i, _)| i);
        if state.is_some() && index <= compacted {
            return;
        }
        let matches = self.wal.term(group, index) == Some(meta.term.0);
        if index > compacted {
            batch.compact(group, index, meta.term.0);
        }
        if !matches && state.is_some_and(|s| s.last_index > index) {
            batch.truncate_suffix(group, index + 1);
        }
    }

    /// Records that the application compacted `group` into `snapshot` (from
    /// [`flotilla_raftgroup::Replica::compact`]): the snapshot file is made durable now; the
    /// returned future completes when the WAL dropped the entries.
    pub fn compact(&self, group: GroupId, snapshot: &Snapshot) -> Result<AppendFuture, StoreError> {
        self.save_snapshot(group, snapshot)?;
        Ok(self.compact_log(group, &snapshot.meta))
    }

    /// The WAL half of [`ShardStore::compact`], for a caller that made the snapshot file durable
    /// itself (off the shard thread, with [`write_snapshot`] at [`ShardStore::snapshot_path`]).
    pub fn compact_log(&self, group: GroupId, meta: &SnapshotMeta) -> AppendFuture {
        let mut batch = WriteBatch::new();
        self.compact_to(group, meta, &mut batch);
        self.wal.append(batch)
    }

    /// Answers `fetch` from the WAL into `out`: entries from `fetch.low`, at most
    /// `fetch.max_bytes` of them (at least one), none if they were compacted.
    pub fn fetch(
        &self,
        group: GroupId,
        fetch: &Fetch,
        out: &mut Vec<Entry>,
    ) -> Result<(), StoreError> {
        let mut raw = Vec::new();
        let mut bytes = 0;
        let mut at = fetch.low.0;
        while at <= fetch.high.0 {
            let end = fetch.high.0.min(at + FETCH_CHUNK - 1) + 1;
            raw.clear();
            match self.wal.entries_into(group, at..end, &mut raw) {
                Ok(()) => {}
                // Compacted or not (yet) there: the replica asks again or sends a snapshot.
                Err(
                    WalError::Compacted { .. }
                    | WalError::Unavailable { .. }
                    | WalError::GroupNotFound(_),
                ) => return Ok(()),
                Err(error) => return Err(error.into()),
            }
            for entry in raw.drain(..) {
                let entry = to_raft_entry(group, entry)?;
                bytes += entry.size_bytes();
                if bytes > fetch.max_bytes && !out.is_empty() {
                    return Ok(());
                }
                out.push(entry);
            }
            at = end;
        }
        Ok(())
    }

    /// Where `group`'s snapshot file lives.
    pub fn snapshot_path(&self, group: GroupId) -> PathBuf {
        snapshot_file(&self.dir, group)
    }

    /// Writes `snapshot` as `group`'s snapshot file, durably.
    pub fn save_snapshot(&self, group: GroupId, snapshot: &Snapshot) -> Result<(), StoreError> {
        write_snapshot(&self.snapshot_path(group), group, snapshot)
    }

    /// Deletes `group`'s snapshot file, if any (durably).
    pub fn delete_snapshot(&self, group: GroupId) -> Result<(), StoreError> {
        let path = self.snapshot_path(group);
        let _writing = file_lock(&path);
        // A half-received stream of the group goes too (unlinking keeps any map of it valid).
        for spooled in [spool_path(&path), spool_id_path(&path)] {
            match fs::remove_file(&spooled) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io_error("removing", &spooled)(error));
                }
                _ => {}
            }
        }
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir.join("snapshots")),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(io_error("removing", &path)(error)),
        }
    }

    /// Maps `group`'s snapshot file, if any, verifying it whole. The data is a slice of the
    /// map, not a copy: a replica keeps its latest snapshot to serve lagging followers, and an
    /// image in memory per group would double the state's footprint.
    pub fn load_snapshot(&self, group: GroupId) -> Result<Option<Snapshot>, StoreError> {
        match map_snapshot(&self.snapshot_path(group), group) {
            Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(None)
            }
            result => result.map(Some),
        }
    }

    /// Makes `snapshot`, which a leader sent, `group`'s snapshot file. A snapshot that arrived
    /// by stream is already on disk, verified and synced, at [`spool_path`]: it is renamed into
    /// place; otherwise the file is written.
    fn install_snapshot(&self, group: GroupId, snapshot: &Snapshot) -> Result<(), StoreError> {
        let path = self.snapshot_path(group);
        let spool = spool_path(&path);
        if peek_snapshot(&spool) == Some((snapshot.meta.index, snapshot.meta.term)) {
            let _writing = file_lock(&path);
            if peek_snapshot(&path).is_some_and(|(index, _)| index > snapshot.meta.index) {
                return Ok(());
            }
            fs::rename(&spool, &path).map_err(io_error("renaming", &spool))?;
            // The resume record now names a file that is gone; a stale one only costs a restart.
            let _ = fs::remove_file(spool_id_path(&path));
            return sync_dir(path.parent().expect("a file in a directory"));
        }
        write_snapshot(&path, group, snapshot)
    }

    fn write_catalog(&mut self) -> Result<(), StoreError> {
        let mut out = Vec::new();
        out.extend_from_slice(CATALOG_MAGIC);
        out.extend_from_slice(&FILE_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(self.catalog.len() as u32).to_le_bytes());
        for (group, voters) in &self.catalog {
            out.extend_from_slice(&group.0.to_le_bytes());
            out.extend_from_slice(&(voters.len() as u32).to_le_bytes());
            for voter in voters {
                out.extend_from_slice(&voter.0.to_le_bytes());
            }
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        write_atomically(&self.dir.join("catalog"), &[&out])?;
        self.catalog_dirty = false;
        Ok(())
    }
}

/// Writes `snapshot` as `group`'s snapshot file at `path`, durably (see the module doc for the
/// layout). Blocking: the shard driver runs it off the shard thread.
///
/// A file already there with a later snapshot is kept: a local snapshot whose write finishes
/// after the leader's newer snapshot was installed must not replace it (the WAL was compacted
/// past the older one, so recovering from it would leave a hole in the log).
pub fn write_snapshot(path: &Path, group: GroupId, snapshot: &Snapshot) -> Result<(), StoreError> {
    write_snapshot_image(path, group, &snapshot.meta, &snapshot.data)
}

/// [`write_snapshot`] of a snapshot whose data is a state machine's [`SnapshotImage`], streamed
/// into the file: the image is never held whole in memory. Blocking; meant for a blocking
/// thread. The data length in the header is filled in once the image is written, and the
/// trailing checksum is the header's combined with the data's (which was summed as it went).
pub fn write_snapshot_image(
    path: &Path,
    group: GroupId,
    meta: &SnapshotMeta,
    image: &dyn SnapshotImage,
) -> Result<(), StoreError> {
    // The shard thread (installing a leader's snapshot) and a blocking thread (writing a local
    // one) may write the same group's file at once: the newer-file check, the temp file and the
    // rename must not interleave, or an older image could replace a newer one.
    let _writing = file_lock(path);
    if peek_snapshot(path).is_some_and(|(index, _)| index > meta.index) {
        return Ok(());
    }
    let membership = meta.membership.encode();
    let mut header = Vec::with_capacity(64 + membership.len());
    header.extend_from_slice(SNAPSHOT_MAGIC);
    header.extend_from_slice(&FILE_VERSION.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&group.0.to_le_bytes());
    header.extend_from_slice(&meta.index.0.to_le_bytes());
    header.extend_from_slice(&meta.term.0.to_le_bytes());
    header.extend_from_slice(&(membership.len() as u32).to_le_bytes());
    header.extend_from_slice(&membership);
    let length_at = header.len();
    header.extend_from_slice(&0u64.to_le_bytes()); // data length, filled in below
    let tmp = path.with_extension("tmp");
    let written = (|| {
        use std::os::unix::fs::FileExt;
        let file = fs::File::create(&tmp).map_err(io_error("creating", &tmp))?;
        let (data_crc, len) = {
            let mut data = SummingWriter {
                out: std::io::BufWriter::with_capacity(SNAPSHOT_WRITE_BUFFER, &file),
                crc: crc32fast::Hasher::new(),
                len: 0,
            };
            data.out.write_all(&header).map_err(io_error("writing", &tmp))?;
            image.write_to(&mut data).map_err(io_error("writing", &tmp))?;
            data.out.flush().map_err(io_error("writing", &tmp))?;
            (data.crc, data.len)
        };
        header[length_at..].copy_from_slice(&len.to_le_bytes());
        file.write_all_at(&header[length_at..], length_at as u64)
            .map_err(io_error("writing", &tmp))?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header);
        crc.combine(&data_crc);
        (&file).write_all(&crc.finalize().to_le_bytes()).map_err(io_error("writing", &tmp))?;
        Ok(file)
    })();
    match written {
        Ok(file) => replace_with(file, &tmp, path),
        Err(error) => {
            // A half-written image must not hold the disk (it may be what filled it).
            let _ = fs::remove_file(&tmp);
            Err(error)
        }
    }
}

/// The buffer between a state machine's image and its snapshot file.
const SNAPSHOT_WRITE_BUFFER: usize = 256 * 1024;

/// Passes bytes on to `out`, counting them and summing their CRC-32.
struct SummingWriter<W> {
    out: W,
    crc: crc32fast::Hasher,
    len: u64,
}

impl<W: Write> Write for SummingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Where a snapshot arriving by stream is spooled until the group installs it: beside the
/// group's snapshot file (`<group>.recv`), so installing it is a rename.
pub fn spool_path(snapshot_path: &Path) -> PathBuf {
    snapshot_path.with_extension("recv")
}

/// Where the identity of the spooled file is kept (`<group>.recv-id`), so a stream cut by a
/// disconnect or a restart resumes only into the same file.
pub fn spool_id_path(snapshot_path: &Path) -> PathBuf {
    snapshot_path.with_extension("recv-id")
}

/// The index and term a snapshot file's header names, without verifying the file (`None` if it
/// is missing or too short): enough to decide which of two files is newer.
pub fn peek_snapshot(path: &Path) -> Option<(LogIndex, Term)> {
    use std::io::Read;
    let mut header = [0u8; 32];
    fs::File::open(path).ok()?.read_exact(&mut header).ok()?;
    if &header[..4] != SNAPSHOT_MAGIC {
        return None;
    }
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    Some((LogIndex(u64_at(16)), Term(u64_at(24))))
}

/// Maps the snapshot file at `path` and verifies it whole (checksum, group, layout); the
/// snapshot's data is a slice of the map. Blocking, and reads the whole file once.
pub fn map_snapshot(path: &Path, group: GroupId) -> Result<Snapshot, StoreError> {
    map_snapshot_whole(path, group).map(|(_, snapshot)| snapshot)
}

/// [`map_snapshot`], also returning the whole file's bytes: what a sender streams.
pub fn map_snapshot_whole(path: &Path, group: GroupId) -> Result<(Bytes, Snapshot), StoreError> {
    let file = fs::File::open(path).map_err(io_error("opening", path))?;
    map_snapshot_file(&file, path, group)
}

/// The CRC-32 a verified snapshot file ends with (covering all of it): names the exact bytes
/// of a streamed file.
pub fn file_crc(whole: &[u8]) -> u32 {
    u32::from_le_bytes(whole[whole.len() - 4..].try_into().expect("a file ends with its crc"))
}

/// [`map_snapshot`] of an open `file` (named `path` in errors), also returning the whole
/// file's bytes (the snapshot's data is a slice of them): what a sender streams.
pub fn map_snapshot_file(
    file: &fs::File,
    path: &Path,
    group: GroupId,
) -> Result<(Bytes, Snapshot), StoreError> {
    // SAFETY: snapshot files are never changed in place once complete: they are written under
    // a temporary name and renamed, or spooled, synced and only then mapped; a file replaced
    // or deleted is unlinked, which leaves a live map of it intact.
    let map = unsafe { memmap2::Mmap::map(file) }.map_err(io_error("mapping", path))?;
    let bytes = Bytes::from_owner(map);
    let snapshot = decode_snapshot(&bytes, group)
        .map_err(|detail| StoreError::Corrupt { path: path.to_path_buf(), detail })?;
    Ok((bytes, snapshot))
}

/// Where the snapshot file of `group` lives under the shard directory `shard_dir`.
pub fn snapshot_file(shard_dir: &Path, group: GroupId) -> PathBuf {
    shard_dir.join("snapshots").join(format!("{:016x}", group.0))
}

fn to_raft_entry(group: GroupId, entry: flotilla_wal::Entry) -> Result<Entry, StoreError> {
    let kind = kind_of(entry.tag).ok_or(StoreError::UnknownTag {
        group,
        index: entry.index,
        tag: entry.tag,
    })?;
    Ok(Entry { index: LogIndex(entry.index), term: Term(entry.term), kind, payload: entry.payload })
}

fn wal_hard_state(hs: HardState) -> flotilla_wal::HardState {
    flotilla_wal::HardState {
        term: hs.term.0,
        vote: hs.vote.map_or(0, |n| n.0),
        commit: hs.commit.0,
    }
}

pub(crate) fn io_error<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { op, path: path.to_path_buf(), source }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_error("syncing directory", dir))
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new file.
/// Serializes the writers of one file (see [`write_snapshot`]): one of 64 process-wide
/// stripes, chosen by the path's hash, so no allocation and no unbounded table.
fn file_lock(path: &Path) -> std::sync::MutexGuard<'static, ()> {
    use std::hash::{Hash, Hasher};
    static STRIPES: [std::sync::Mutex<()>; 64] = [const { std::sync::Mutex::new(()) }; 64];
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    path.hash(&mut hasher);
    let stripe = usize::try_from(hasher.finish() % 64).expect("below 64");
    // The guarded data is `()`: a panic while holding it leaves nothing inconsistent.
    STRIPES[stripe].lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_atomically(path: &Path, pieces: &[&[u8]]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::File::create(&tmp).map_err(io_error("creating", &tmp))?;
    for piece in pieces {
        file.write_all(piece).map_err(io_error("writing", &tmp))?;
    }
    replace_with(file, &tmp, path)
}

/// Makes the whole temporary `file` at `tmp` durable and renames it over `path`, durably.
fn replace_with(file: fs::File, tmp: &Path, path: &Path) -> Result<(), StoreError> {
    file.sync_all().map_err(io_error("syncing", tmp))?;
    drop(file);
    fs::rename(tmp, path).map_err(io_error("renaming", tmp))?;
    sync_dir(path.parent().expect("a file in a directory"))
}

/// A little-endian reader over untrusted bytes: every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.bytes.len());
        let end = end.ok_or_else(|| format!("truncated at {} (wanted {n} bytes)", self.at))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
}

/// Checks the magic, version and trailing checksum; returns the bytes between header and crc.
fn check_file(bytes: &[u8], magic: [u8; 4]) -> Result<Reader<'_>, String> {
    if bytes.len() < 12 {
        return Err(format!("{} bytes is too short", bytes.len()));
    }
    let (content, crc) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    if crc32fast::hash(content) != stored {
        return Err("checksum mismatch".into());
    }
    let mut reader = Reader { bytes: content, at: 0 };
    if reader.take(4)? != magic.as_slice() {
        return Err("bad magic".into());
    }
    let version = reader.u16()?;
    if version != FILE_VERSION {
        return Err(format!("unsupported version {version}"));
    }
    if reader.u16()? != 0 {
        return Err("reserved bytes set".into());
    }
    Ok(reader)
}

fn read_catalog(path: &Path) -> Result<BTreeMap<GroupId, Vec<NodeId>>, StoreError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(error) => return Err(io_error("reading", path)(error)),
    };
    decode_catalog(&bytes)
        .map_err(|detail| StoreError::Corrupt { path: path.to_path_buf(), detail })
}

fn decode_catalog(bytes: &[u8]) -> Result<BTreeMap<GroupId, Vec<NodeId>>, String> {
    let mut reader = check_file(bytes, *CATALOG_MAGIC)?;
    let count = reader.u32()?;
    let mut catalog = BTreeMap::new();
    for _ in 0..count {
        let group = GroupId(reader.u64()?);
        let voters = reader.u32()?;
        if voters > VOTERS_MAX {
            return Err(format!("group {group} lists {voters} voters"));
        }
        let voters =
            (0..voters).map(|_| reader.u64().map(NodeId)).collect::<Result<Vec<_>, _>>()?;
        if catalog.insert(group, voters).is_some() {
            return Err(format!("group {group} listed twice"));
        }
    }
    if reader.at != reader.bytes.len() {
        return Err("trailing bytes".into());
    }
    Ok(catalog)
}

fn decode_snapshot(bytes: &Bytes, group: GroupId) -> Result<Snapshot, String> {
    let mut reader = check_file(bytes, *SNAPSHOT_MAGIC)?;
    let stored_group = reader.u64()?;
    if stored_group != group.0 {
        return Err(format!("holds group {stored_group}"));
    }
    let index = LogIndex(reader.u64()?);
    let term = Term(reader.u64()?);
    let membership_len = reader.u32()? as usize;
    let membership = Membership::decode(reader.take(membership_len)?)
        .map_err(|error| format!("membership: {error}"))?;
    let data_len = usize::try_from(reader.u64()?).map_err(|_| "data length overflows")?;
    let start = reader.at;
    reader.take(data_len)?;
    if reader.at != reader.bytes.len() {
        return Err("trailing bytes".into());
    }
    Ok(Snapshot {
        meta: SnapshotMeta { index, term, membership },
        data: bytes.slice(start..start + data_len),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_unknown_tags_are_refused() {
        for kind in [EntryKind::Normal, EntryKind::Membership, EntryKind::Empty] {
            assert_eq!(kind_of(tag_of(kind)), Some(kind));
        }
        assert_eq!(kind_of(3), None);
        assert_eq!(kind_of(u8::MAX), None);
    }

    fn inline_store(dir: &Path) -> ShardStore {
        let config = flotilla_wal::Config {
            segment_bytes: 1 << 20,
            batch_bytes_max: 64 << 10,
            writer: flotilla_wal::WriterMode::Inline,
            ..flotilla_wal::Config::default()
        };
        ShardStore::open(dir, config).unwrap().0
    }

    /// One loop iteration may gather more than one WAL record holds: the persist is cut into
    /// records of at most `batch_bytes_max`, in order, each group's hard state after its
    /// entries — and all of it recovers.
    #[test]
    fn a_persist_larger_than_a_record_is_cut_into_records_that_recover_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = inline_store(dir.path());
        let max = 64 << 10;
        let entry = |i: u64| Entry {
            index: LogIndex(i),
            term: Term(2),
            kind: EntryKind::Normal,
            payload: Bytes::from(vec![i as u8; 5000]),
        };
        let hard_state = HardState { term: Term(2), vote: None, commit: LogIndex(40) };
        let mut items: Vec<(GroupId, PersistItem)> = (1..=3)
            .map(|group| {
                let item = PersistItem {
                    snapshot: None,
                    entries: (1..=40).map(entry).collect(),
                    hard_state: Some(hard_state),
                    must_sync: true,
                };
                (GroupId(group), item)
            })
            .collect();
        let mut batches = Vec::new();
        store.stage_split(&mut items, max, &mut batches).unwrap();
        assert!(batches.len() >= 600_000 / max, "{} batches", batches.len());
        let mut seen = BTreeMap::<GroupId, u64>::new();
        for batch in &batches {
            assert!(batch.encoded_len() <= max, "{} bytes", batch.encoded_len());
            for op in batch.ops() {
                match op {
                    flotilla_wal::Op::Entries { group, first_index, entries } => {
                        let next = seen.entry(*group).or_insert(1);
                        assert_eq!(*first_index, *next, "entries of {group} in order");
                        *next += entries.len() as u64;
                    }
                    flotilla_wal::Op::HardState { group, .. } => {
                        assert_eq!(seen.get(group), Some(&41), "hard state after all entries");
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        for batch in batches {
            flotilla_wal::block_on(store.wal().append(batch)).unwrap();
        }
        for group in 1..=3 {
            let recovered = store.recover_group(GroupId(group)).unwrap();
            assert_eq!(recovered.last_index, LogIndex(40));
            assert_eq!(recovered.hard_state, hard_state);
        }
    }

    #[test]
    fn a_snapshot_file_that_outlived_its_round_is_recovered_consistently() {
        let dir = tempfile::tempdir().unwrap();
        let group = GroupId(4);
        {
            let mut store = inline_store(dir.path());
            store.add_group(group, &[NodeId(1)]).unwrap();
            // Entries 1..=3 of term 2, and a vote for node 5 in term 2.
            let mut items = vec![(
                group,
                PersistItem {
                    snapshot: None,
                    entries: (1..=3)
                        .map(|i| Entry {
                            index: LogIndex(i),
                            term: Term(2),
                            kind: if i == 1 { EntryKind::Empty } else { EntryKind::Normal },
                            payload: Bytes::from(format!("e{i}")),
                        })
                        .collect(),
                    hard_state: Some(HardState {
                        term: Term(2),
                        vote: Some(NodeId(5)),
                        commit: LogIndex(2),
                    }),
                    must_sync: true,
                },
            )];
            let mut batch = WriteBatch::new();
            store.stage(&mut items, &mut batch).unwrap();
            flotilla_wal::block_on(store.wal().append(batch)).unwrap();
            // A leader's snapshot through index 6 of term 3 reaches its file; the crash comes
            // before the round with its compaction and the new term.
            let snapshot = Snapshot {
                meta: SnapshotMeta {
                    index: LogIndex(6),
                    term: Term(3),
                    membership: Membership { voters: vec![NodeId(1)], ..Membership::default() },
                },
                data: Bytes::from_static(b"image"),
            };
            store.save_snapshot(group, &snapshot).unwrap();
            store.close().unwrap();
        }
        let store = inline_store(dir.path());
        let recovered = store.recover_group(group).unwrap();
        assert_eq!(recovered.snapshot.as_ref().unwrap().meta.index, LogIndex(6));
        assert_eq!(recovered.applied, LogIndex(6));
        // The term moves up to the snapshot's, without a vote nobody made in it.
        assert_eq!(
            recovered.hard_state,
            HardState { term: Term(3), vote: None, commit: LogIndex(6) }
        );
        // The stale log (term 2 entries below the snapshot) is gone, in the WAL too.
        assert!(recovered.entries.is_empty(), "{:?}", recovered.entries);
        assert_eq!(recovered.last_index, LogIndex(6));
        let state = store.wal().group_state(group).unwrap();
        assert_eq!(state.compacted, Some((6, 3)));
        assert_eq!(state.last_index, 6);
        // And the replica accepts what recovery hands it.
        flotilla_raftgroup::Replica::new(
            flotilla_raftgroup::Config::new(NodeId(1), vec![NodeId(1)]),
            recovered,
        )
        .unwrap();
    }

    #[test]
    fn a_stale_local_snapshot_finishing_after_a_newer_installed_one_changes_nothing() {
        // Found by the cluster simulator (seed 1): a shard snapshots a group at 43 and starts
        // writing the file; meanwhile the leader's snapshot at 44 is installed (file written,
        // WAL compacted to 44, entries 45.. appended). Then the local write finishes: it must
        // neither replace the newer file nor truncate the log after 43.
        let dir = tempfile::tempdir().unwrap();
        let group = GroupId(4);
        let snapshot_at = |index: u64| Snapshot {
            meta: SnapshotMeta {
                index: LogIndex(index),
                term: Term(3),
                membership: Membership { voters: vec![NodeId(1)], ..Membership::default() },
            },
            data: Bytes::from(format!("image {index}")),
        };
        let mut store = inline_store(dir.path());
        store.add_group(group, &[NodeId(1)]).unwrap();
        let mut items = vec![(
            group,
            PersistItem {
                snapshot: Some(snapshot_at(44)),
                entries: (45..=47)
                    .map(|i| Entry {
                        index: LogIndex(i),
                        term: Term(3),
                        kind: EntryKind::Normal,
                        payload: Bytes::from(format!("e{i}")),
                    })
                    .collect(),
                hard_state: Some(HardState { term: Term(3), vote: None, commit: LogIndex(45) }),
                must_sync: true,
            },
        )];
        let mut batch = WriteBatch::new();
        store.stage(&mut items, &mut batch).unwrap();
        flotilla_wal::block_on(store.wal().append(batch)).unwrap();

        let stale = snapshot_at(43);
        write_snapshot(&store.snapshot_path(group), group, &stale).unwrap();
        flotilla_wal::block_on(store.compact_log(group, &stale.meta)).unwrap();
        assert_eq!(store.load_snapshot(group).unwrap().unwrap().meta.index, LogIndex(44));
        let state = store.wal().group_state(group).unwrap();
        assert_eq!((state.first_index, state.last_index, state.compacted), (45, 47, Some((44, 3))));
        store.close().unwrap();

        let store = inline_store(dir.path());
        let recovered = store.recover_group(group).unwrap();
        assert_eq!(recovered.applied, LogIndex(44));
        assert_eq!(recovered.last_index, LogIndex(47));
        assert_eq!(recovered.entries.first().map(|e| e.index), Some(LogIndex(45)));
    }

    #[test]
    fn concurrent_writers_of_one_snapshot_file_leave_the_newest_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("7.snap");
        let group = GroupId(7);
        let image = |index: u64| Snapshot {
            meta: SnapshotMeta {
                index: LogIndex(index),
                term: Term(1),
                membership: Membership::new(vec![NodeId(1)], Vec::new()),
            },
            data: Bytes::from(vec![u8::try_from(index % 251).unwrap(); 64 << 10]),
        };
        for round in 0..100u64 {
            let (older, newer) = (image(2 * round + 1), image(2 * round + 2));
            let barrier = std::sync::Barrier::new(2);
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    barrier.wait();
                    write_snapshot(&path, group, &older).unwrap();
                });
                barrier.wait();
                write_snapshot(&path, group, &newer).unwrap();
            });
            let bytes = Bytes::from(fs::read(&path).unwrap());
            let written = decode_snapshot(&bytes, group).unwrap();
            assert_eq!(written.meta.index, newer.meta.index, "round {round}");
        }
    }

    #[test]
    fn recovery_hands_over_term_starts_and_only_the_tail_of_a_long_log() {
        let dir = tempfile::tempdir().unwrap();
        let group = GroupId(9);
        let entry = |i: u64| Entry {
            index: LogIndex(i),
            term: Term(if i < 1000 { 1 } else { 2 }),
            kind: EntryKind::Normal,
            payload: Bytes::from(format!("e{i}")),
        };
        {
            let mut store = inline_store(dir.path());
            store.add_group(group, &[NodeId(1)]).unwrap();
            let item = PersistItem {
                snapshot: None,
                entries: (1..=1500).map(entry).collect(),
                hard_state: Some(HardState { term: Term(2), vote: None, commit: LogIndex(1500) }),
                must_sync: true,
            };
            let mut batch = WriteBatch::new();
            store.stage(&mut [(group, item)], &mut batch).unwrap();
            flotilla_wal::block_on(store.wal().append(batch)).unwrap();
            store.close().unwrap();
        }
        let store = inline_store(dir.path());
        let recovered = store.recover_group(group).unwrap();
        assert_eq!(recovered.term_starts, [(LogIndex(1), Term(1)), (LogIndex(1000), Term(2))]);
        assert_eq!(recovered.last_index, LogIndex(1500));
        let tail: Vec<Entry> = (477..=1500).map(entry).collect();
        assert_eq!(recovered.entries, tail);
        let replica = flotilla_raftgroup::Replica::new(
            flotilla_raftgroup::Config::new(NodeId(1), vec![NodeId(1)]),
            recovered,
        )
        .unwrap();
        assert_eq!(replica.term_at(LogIndex(999)), Some(Term(1)));
        assert_eq!(replica.term_at(LogIndex(1000)), Some(Term(2)));
    }

    #[test]
    fn damaged_catalog_and_snapshot_bytes_are_refused_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let config = flotilla_wal::Config {
            segment_bytes: 1 << 20,
            batch_bytes_max: 64 << 10,
            writer: flotilla_wal::WriterMode::Inline,
            ..flotilla_wal::Config::default()
        };
        let (mut store, _) = ShardStore::open(dir.path(), config).unwrap();
        store.add_group(GroupId(7), &[NodeId(1), NodeId(2), NodeId(3)]).unwrap();
        let snapshot = Snapshot {
            meta: SnapshotMeta {
                index: LogIndex(5),
                term: Term(2),
                membership: Membership { voters: vec![NodeId(1)], ..Membership::default() },
            },
            data: Bytes::from_static(b"state"),
        };
        store.save_snapshot(GroupId(7), &snapshot).unwrap();
        assert_eq!(store.load_snapshot(GroupId(7)).unwrap(), Some(snapshot));

        let catalog = fs::read(dir.path().join("catalog")).unwrap();
        assert_eq!(decode_catalog(&catalog).unwrap().len(), 1);
        let snap = Bytes::from(fs::read(store.snapshot_path(GroupId(7))).unwrap());
        // Every truncation and every single-bit flip is refused with a reason.
        for len in 0..catalog.len() {
            assert!(decode_catalog(&catalog[..len]).is_err());
        }
        for len in 0..snap.len() {
            assert!(decode_snapshot(&snap.slice(..len), GroupId(7)).is_err());
        }
        for bit in 0..catalog.len() * 8 {
            let mut damaged = catalog.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_catalog(&damaged).is_err(), "bit {bit}");
        }
        for bit in 0..snap.len() * 8 {
            let mut damaged = snap.to_vec();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_snapshot(&Bytes::from(damaged), GroupId(7)).is_err(), "bit {bit}");
        }
        // A snapshot file under another group's name is refused too.
        assert!(decode_snapshot(&snap, GroupId(8)).is_err());
    }
}

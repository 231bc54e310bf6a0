//! Segments between the writer and the preparer: preparing pre-written or recycled segments ahead
//! of need, garbage collection, retiring (recycle or delete), and the forward copy of small groups
//! that pin the oldest segment.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Prepared, Shared, bump};
use crate::config::WriterMode;
use crate::error::WalError;
use crate::index::resolve_seq;
use crate::io::StorageFile;
use crate::record::{RECORD_HEADER_LEN, WriteBatch};
use crate::segment::{SEGMENT_HEADER_LEN, SPARE_SUFFIX, SegmentHeader, segment_file_name};
use crate::{GroupId, ReadView};

impl Shared {
    /// Makes a prepared segment live: readable and known to garbage collection.
    pub(super) fn install(&self, prepared: &Prepared) -> Result<(), WalError> {
        let view = Arc::clone(&prepared.file)
            .read_view()
            .map_err(|e| WalError::io("mapping a segment", e))?;
        let live = {
            let mut read = self.read.write();
            read.segments.insert(prepared.seq, view);
            read.segments.len()
        };
        self.segs.lock().files.insert(prepared.seq, Arc::clone(&prepared.file));
        self.metrics.segments_live.set(live as f64);
        Ok(())
    }

    pub(super) fn take_prepared(&self, maintenance: bool) -> Result<Prepared, WalError> {
        let mut segs = self.segs.lock();
        let mut stalled = false;
        loop {
            self.check_poison()?;
            let reserve = if maintenance { 0 } else { self.config.reserved_segments };
            if segs.prepared.len() > reserve {
                let prepared = segs.prepared.pop_front().expect("non-empty");
                drop(segs);
                self.segs_changed.notify_all();
                return Ok(prepared);
            }
            if let Some(error) = segs.error.take() {
                return Err(error);
            }
            if segs.disk_full && !segs.preparing {
                return Err(WalError::DiskFull);
            }
            if segs.closed {
                // The preparer is gone: nothing will come.
                return Err(WalError::Closed);
            }
            if !stalled {
                stalled = true;
                bump(&self.counters.rotation_stalls, 1);
            }
            match self.config.writer {
                WriterMode::Inline => {
                    drop(segs);
                    self.prepare_one()?;
                    segs = self.segs.lock();
                }
                WriterMode::Threads => {
                    self.segs_changed.notify_all();
                    self.segs_changed.wait(&mut segs);
                }
            }
        }
    }

    pub(super) fn needs_preparation(&self) -> bool {
        let segs = self.segs.lock();
        let target = self.config.prepared_segments + self.config.reserved_segments;
        segs.prepared.len() < target && !(segs.disk_full && segs.recyclable.is_empty())
    }

    pub(super) fn preparer_loop(&self) {
        loop {
            {
                let mut segs = self.segs.lock();
                loop {
                    if segs.closed || self.poison.get().is_some() {
                        return;
                    }
                    let target = self.config.prepared_segments + self.config.reserved_segments;
                    let wants = segs.prepared.len() < target
                        && !(segs.disk_full && segs.recyclable.is_empty())
                        && segs.error.is_none();
                    if !segs.retire.is_empty() || wants {
                        break;
                    }
                    self.segs_changed.wait(&mut segs);
                }
            }
            self.retire_pending();
            if self.needs_preparation() && self.segs.lock().error.is_none() {
                if let Err(error) = self.prepare_one()
                    && !matches!(error, WalError::DiskFull)
                {
                    tracing::error!(%error, "preparing a segment failed");
                    self.segs.lock().error = Some(error);
                }
                self.segs_changed.notify_all();
            }
        }
    }

    /// Readies the next segment: a recycled file if there is one, else a new pre-written file;
    /// writes its header and a zeroed first record slot, syncs, and names it.
    pub(super) fn prepare_one(&self) -> Result<(), WalError> {
        let (seq, source) = {
            let mut segs = self.segs.lock();
            segs.preparing = true;
            (segs.next_prepare_seq, segs.recyclable.pop())
        };
        let result = self.prepare_io(seq, source);
        let mut segs = self.segs.lock();
        segs.preparing = false;
        match result {
            Ok(prepared) => {
                segs.next_prepare_seq = seq + 1;
                segs.prepared.push_back(prepared);
                segs.disk_full = false;
                self.disk_full.store(false, Ordering::Relaxed);
                drop(segs);
                self.segs_changed.notify_all();
                Ok(())
            }
            Err((error, source)) => {
                if let Some(source) = source {
                    segs.recyclable.push(source);
                }
                if matches!(error, WalError::DiskFull) {
                    segs.disk_full = true;
                }
                drop(segs);
                self.segs_changed.notify_all();
                Err(error)
            }
        }
    }

    /// Creates (or reuses) the file, writes and syncs its header and a zeroed first record slot,
    /// names it `{seq}.seg` and syncs the directory. A full disk is `DiskFull` and a failed create
    /// just fails; any later failure (a write, an fdatasync, the rename or the directory sync)
    /// poisons the log: after it the directory's state is unknown, and a retry could rename or
    /// rewrite the wrong file (fsyncgate applies to directories too).
    #[expect(clippy::type_complexity, reason = "a failed create hands the unused source back")]
    pub(super) fn prepare_io(
        &self,
        seq: u64,
        source: Option<(String, Arc<dyn StorageFile>, u64)>,
    ) -> Result<Prepared, (WalError, Option<(String, Arc<dyn StorageFile>, u64)>)> {
        let size = self.config.segment_bytes;
        let (name, file, recycled) = match source {
            Some((name, file, _)) => (name, file, true),
            None => {
                let name = format!("{seq:020}{SPARE_SUFFIX}");
                let file = self
                    .storage
                    .create_prewritten(&name, size)
                    .map_err(|e| (WalError::io("creating a segment", e), None))?;
                bump(&self.counters.segments_created, 1);
                (name, file, false)
            }
        };
        let mut head = vec![0u8; SEGMENT_HEADER_LEN + RECORD_HEADER_LEN];
        head[..SEGMENT_HEADER_LEN].copy_from_slice(&SegmentHeader { seq, size }.encode());
        let steps = file
            .write_all_at(&head, 0)
            .map_err(|e| ("write", e))
            .and_then(|()| file.sync_data().map_err(|e| ("fdatasync", e)))
            .and_then(|()| {
                self.storage.rename(&name, &segment_file_name(seq)).map_err(|e| ("rename", e))
            })
            .and_then(|()| self.storage.sync_dir().map_err(|e| ("directory fsync", e)));
        if let Err((op, error)) = steps {
            return Err((self.poison_with(op, error), None));
        }
        if recycled {
            bump(&self.counters.segments_recycled, 1);
            self.metrics.segments_recycled.increment(1);
        } else {
            self.metrics.segments_created.increment(1);
        }
        Ok(Prepared { seq, file, size })
    }

    /// Retires every live segment older than both the active one and the oldest one any group
    /// still needs. Runs only right after a synced round, when what the index says is durable.
    pub(super) fn collect_garbage(&self, active_seq: u64) {
        let retired: Vec<(u64, ReadView)> = {
            let mut read = self.read.write();
            let Some(&oldest) = read.segments.keys().next() else { return };
            let needed = read
                .index
                .groups
                .values()
                .filter_map(|index| index.min_segment(oldest))
                .min()
                .unwrap_or(u64::MAX)
                .min(active_seq);
            let seqs: Vec<u64> = read.segments.range(..needed).map(|(seq, _)| *seq).collect();
            seqs.into_iter()
                .map(|seq| (seq, read.segments.remove(&seq).expect("listed above")))
                .collect()
        };
        if retired.is_empty() {
            return;
        }
        self.metrics.segments_live.set(self.read.read().segments.len() as f64);
        self.segs.lock().retire.extend(retired);
        match self.config.writer {
            WriterMode::Inline => self.retire_pending(),
            WriterMode::Threads => {
                self.segs_changed.notify_all();
            }
        }
    }

    /// Recycles retired segments whose map no reader still holds (renamed aside) and deletes
    /// the others (their maps stay valid for the readers), oldest first, syncing the directory
    /// after each so retirements become durable in order (a crash never keeps a younger one's
    /// rename without the older one's). A recycled file is reused only after that sync: it is
    /// rewritten in place, which must never happen while a crash could bring back its old name.
    /// A failed rename, unlink or directory sync poisons the log (its directory's state is then
    /// unknown).
    pub(super) fn retire_pending(&self) {
        loop {
            if self.poison.get().is_some() {
                return;
            }
            let Some((seq, view)) = self.segs.lock().retire.pop_front() else { break };
            let liveness = view.liveness();
            let Some(file) = self.segs.lock().files.get(&seq).cloned() else { continue };
            // Drop our view first: if no reader holds a slice, the map goes with it.
            let view_alive = {
                drop(view);
                liveness.is_some_and(|weak| weak.upgrade().is_some())
            };
            let size = file.len().unwrap_or(0);
            let name = segment_file_name(seq);
            let spare = format!("{seq:020}{SPARE_SUFFIX}");
            let recycle = !view_alive && size == self.config.segment_bytes;
            let result = if recycle {
                self.storage.rename(&name, &spare).map_err(|e| ("rename", e))
            } else {
                self.storage.remove(&name).map_err(|e| ("unlink", e))
            }
            .and_then(|()| self.storage.sync_dir().map_err(|e| ("directory fsync", e)));
            if let Err((op, error)) = result {
                self.poison_with(op, error);
                break;
            }
            let mut segs = self.segs.lock();
            segs.files.remove(&seq);
            if recycle {
                debug_assert!(
                    !segs.recyclable.iter().any(|(n, _, _)| *n == spare),
                    "sequence numbers are never reused, so spare names are unique"
                );
                segs.recyclable.push((spare, file, size));
                segs.disk_full = false;
                self.disk_full.store(false, Ordering::Relaxed);
            } else {
                bump(&self.counters.segments_deleted, 1);
            }
        }
        self.segs_changed.notify_all();
    }

    /// Copies forward the state of small groups pinning the oldest segment. Runs only on the
    /// writer, right after a round was applied: then the index plus `next` (a round written but
    /// not applied yet, while its fdatasync is in flight) plus the open round is exactly what was
    /// accepted, so a group neither round touches has nothing in flight and its copy is exact
    /// (copying a group with pending writes could resurrect overwritten entries).
    pub(super) fn rewrite_pinning(&self, next: Option<&crate::commit::Round>) {
        let max = self.config.rewrite_entries_max;
        let mut queue = self.queue.lock();
        let read = self.read.read();
        if read.segments.len() < 3 {
            return;
        }
        let oldest = *read.segments.keys().next().expect("non-empty");
        let room = self.config.batch_bytes_max.saturating_sub(queue.open.body_len());
        let mut batch = WriteBatch::new();
        let mut groups = 0u64;
        // In group order, so inline (simulated) runs lay the disk out the same way every time.
        let mut candidates: Vec<(&GroupId, &crate::index::GroupIndex)> = read
            .index
            .groups
            .iter()
            .filter(|(_, index)| {
                index.min_segment(oldest) == Some(oldest) && index.locs.len() <= max
            })
            .collect();
        candidates.sort_unstable_by_key(|(group, _)| **group);
        for (group, index) in candidates {
            if queue.open.touches(*group) || next.is_some_and(|round| round.touches(*group)) {
                continue;
            }
            let mut copy = WriteBatch::new();
            if let Some((through, term)) = index.state().compacted {
                copy.compact(*group, through, term);
            }
            let mut entries = Vec::with_capacity(index.locs.len());
            for (i, loc) in index.locs.iter().enumerate() {
                let at = index.first_index + i as u64;
                let seq = resolve_seq(oldest, loc.seg);
                let view = read.segments.get(&seq).expect("a live entry's segment is live");
                let Ok((tag, payload)) = view.entry(loc.offset as usize, loc.len as usize) else {
                    return;
                };
                entries.push((index.term(at).expect("live index has a term"), tag, payload));
            }
            copy.add_tagged_entries(*group, index.first_index, entries);
            if let Some(state) = index.hard_state {
                copy.set_hard_state(*group, state);
            }
            if batch.encoded_len() + copy.encoded_len() > room {
                break;
            }
            for op in copy.ops {
                batch.push(op);
            }
            groups += 1;
        }
        drop(read);
        if groups == 0 {
            return;
        }
        queue.accept(&batch, true).expect("a copy of a group's own state is valid");
        drop(queue);
        bump(&self.counters.groups_rewritten, groups);
        self.work.notify_one();
    }
}

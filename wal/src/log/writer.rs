//! The write path: the writer loop (or the inline writer) — place a round, seal its header, one
//! write, one fdatasync (while it runs, the round before is finished where the backend allows),
//! update the index, complete the producers — and rotation.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Active, Shared, WriterCore, bump};
use crate::commit::{PendingOp, Round};
use crate::config::WriterMode;
use crate::error::WalError;
use crate::index::IndexOp;
use crate::io::{StorageFile, SyncStart, Syncer};
use crate::record::{RECORD_HEADER_LEN, encode_header, padded_record_len};
use crate::segment::SEGMENT_HEADER_LEN;

/// A round taken while the previous one is synced but not finished is written first only up to
/// this size (or a quarter of `batch_bytes_max`, if smaller): the previous round's producers
/// wait for that write and its checksum, which for a round of `batch_bytes_max` (4 MiB by
/// default) would add about a millisecond.
const OVERLAP_ROUND_BYTES_MAX: usize = 256 << 10;

/// A round written and not yet finished: what its fdatasync and its completion need.
pub(super) struct Written {
    round: Round,
    /// Its segment.
    seq: u64,
    body_offset: u64,
    write_seq: u64,
    padded: usize,
    file: Arc<dyn StorageFile>,
    /// Its placement rotated segments.
    rotated: bool,
    /// When its fdatasync started (the latency metric).
    sync_started: Instant,
}

/// Holds the right to write rounds (`Queue::writing`) and gives it up when dropped, panic or
/// not; then wakes the writer thread if work arrived meanwhile (it waits while someone else
/// writes).
struct Writing<'a>(&'a Shared);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A bug unwound through a round's write: the log's state is unknown.
            self.0.poison_after_panic();
        }
        let pending = {
            let mut queue = self.0.queue.lock();
            queue.writing = false;
            !queue.open.is_empty() || queue.closed
        };
        if pending {
            self.0.work.notify_one();
        }
    }
}

impl Shared {
    /// Whether rounds are written by the appending tasks' polls (no writer thread).
    pub(crate) fn inline_writer(&self) -> bool {
        self.config.writer == WriterMode::Inline
    }

    /// Inline mode: the caller writes rounds itself until none is left (unless another caller is
    /// already doing so, in which case that one will write ours too).
    pub(crate) fn drive_inline(&self) {
        if !self.inline_writer() {
            return;
        }
        let mut syncer = Syncer::Blocking;
        loop {
            let round = {
                let mut queue = self.queue.lock();
                if queue.writing {
                    return;
                }
                match queue.take() {
                    Some(round) => {
                        queue.writing = true;
                        round
                    }
                    None => return,
                }
            };
            // Reset even if writing panics (a bug), so later appends and close do not hang.
            let _writing = Writing(self);
            self.write_round(&mut syncer, round);
        }
    }

    /// Threads mode, idle log: the appending thread, which would only park until its round is
    /// durable, writes the round it took in `enqueue` itself (`pwrite` + `fdatasync` through
    /// [`crate::io::StorageFile`]) instead of waking the writer thread and being woken back.
    pub(crate) fn write_own_round(&self, round: crate::commit::Round) {
        let _writing = Writing(self);
        bump(&self.counters.rounds_inline, 1);
        self.write_round(&mut Syncer::Blocking, round);
    }

    /// The writer thread. With a syncer whose fdatasync runs asynchronously (io_uring, or the
    /// simulated disk's deferred syncs) the writer completes round N — index update, producers'
    /// wake-ups, garbage collection — while round N+1's fdatasync is in flight: once N's sync
    /// returns it takes everything that arrived meanwhile as N+1, writes it, starts its sync,
    /// and only then finishes N. Between two syncs the disk waits only for one write; N's
    /// producers wait for that write too, so a large N+1 (see `OVERLAP_ROUND_BYTES_MAX`) is
    /// written only after N is finished, and a round the writer was idle for, with nothing queued
    /// behind it, is synced on the writer thread itself. Round N+1 is written
    /// after N's sync completed, so at most one fdatasync is in flight and at most one synced
    /// round is unsynced at a time, exactly as without the overlap.
    pub(super) fn writer_loop(&self, mut syncer: Syncer) {
        // The round whose fdatasync is in flight; `_writing` holds the right to write rounds
        // (`Queue::writing`) for as long as a round is in flight or unfinished.
        let mut in_flight: Option<Written> = None;
        let mut _writing: Option<Writing<'_>> = None;
        loop {
            // Durable (or failed), not yet finished: finished once the next round's sync has
            // started (before its write, if it is large).
            let mut synced = in_flight.take().map(|written| {
                let result = syncer.wait();
                let result = self.synced(&written, result);
                (written, result)
            });
            // The writer was idle when this round arrived: no round to finish, none queued.
            let mut waited = false;
            let round = if synced.is_some() {
                // What arrived during the sync: the sync was the batching delay.
                self.queue.lock().take()
            } else {
                _writing = None;
                let mut queue = self.queue.lock();
                // An appending thread may be writing its own round (`write_own_round`): rounds
                // are written one at a time, in the order they were taken.
                while queue.writing || (queue.open.is_empty() && !queue.closed) {
                    waited = true;
                    self.work.wait(&mut queue);
                }
                if queue.open.is_empty() {
                    drop(queue);
                    // Closed and drained: the seal is the last round (see `seal`).
                    self.seal(&mut syncer);
                    return;
                }
                if self.config.batch_delay_us_max > 0 && !queue.closed {
                    let deadline = Instant::now()
                        + std::time::Duration::from_micros(self.config.batch_delay_us_max);
                    while queue.open.body_len() < self.config.batch_bytes_max / 2
                        && !queue.closed
                        && !self.work.wait_until(&mut queue, deadline).timed_out()
                    {
                    }
                }
                queue.writing = true;
                _writing = Some(Writing(self));
                queue.take()
            };
            let Some(round) = round else {
                if let Some((written, result)) = synced {
                    self.finish(written, result, None);
                }
                continue;
            };
            let overlap_max = OVERLAP_ROUND_BYTES_MAX.min(self.config.batch_bytes_max / 4);
            if round.body_len() > overlap_max
                && let Some((previous, result)) = synced.take()
            {
                // `round` is taken and not written: the copy-forward must not touch its groups.
                self.finish(previous, result, Some(&round));
            }
            let Some(mut written) = self.place_and_write(round, &mut synced) else {
                if let Some((previous, result)) = synced {
                    self.finish(previous, result, None);
                }
                continue;
            };
            let own = if written.round.sync {
                written.sync_started = Instant::now();
                // A round that found the writer idle, with nothing queued behind it: an
                // asynchronous sync would only add its completion's thread hop (io_uring's
                // worker) to an idle append, so this thread syncs. Under load the next round is
                // already queued when the writer looks for it, and goes through the ring, which
                // restarts the overlap.
                let idle = waited && self.queue.lock().open.is_empty();
                if idle {
                    Some(self.synced(&written, written.file.sync_data()))
                } else {
                    match syncer.start(&written.file) {
                        SyncStart::InFlight => None,
                        SyncStart::Done(result) => Some(self.synced(&written, result)),
                    }
                }
            } else {
                Some(Ok(()))
            };
            if let Some((previous, result)) = synced {
                if own.is_none() {
                    bump(&self.counters.rounds_overlapped, 1);
                }
                self.finish(previous, result, Some(&written.round));
            }
            match own {
                None => in_flight = Some(written),
                Some(result) => self.finish(written, result, None),
            }
        }
    }

    /// Writes one round and waits for its fdatasync (when any producer asked for durability):
    /// the inline writer, an appending thread writing its own round, and the seal.
    pub(super) fn write_round(&self, syncer: &mut Syncer, round: Round) {
        let Some(mut written) = self.place_and_write(round, &mut None) else { return };
        let result = if written.round.sync {
            written.sync_started = Instant::now();
            let result = syncer.sync_now(&written.file);
            self.synced(&written, result)
        } else {
            Ok(())
        };
        self.finish(written, result, None);
    }

    /// Places a round in the active segment (rotating first when it does not fit, after the
    /// previous round — synced, not yet finished — is finished: the segment it lives in must be
    /// settled before it is left), seals its header and writes it. `None` when it failed (its
    /// producers have heard).
    fn place_and_write(
        &self,
        mut round: Round,
        unfinished: &mut Option<(Written, Result<(), WalError>)>,
    ) -> Option<Written> {
        // A failed sync of the unfinished round has poisoned the log (`synced`).
        if let Err(error) = self.check_poison() {
            round.done.complete(Err(error));
            return None;
        }
        let body_len = round.body_len();
        let padded = padded_record_len(body_len);
        let mut core = self.core.lock();
        let mut rotated = false;
        if core.active.offset + padded as u64 > core.active.size {
            if let Some((previous, result)) = unfinished.take() {
                drop(core);
                // `round` is taken and not written: the copy-forward must not touch its groups.
                self.finish(previous, result, Some(&round));
                if let Err(error) = self.check_poison() {
                    round.done.complete(Err(error));
                    return None;
                }
                core = self.core.lock();
            }
            if let Err(error) = self.rotate(&mut core, round.maintenance) {
                drop(core);
                self.fail_pending(&round, error);
                return None;
            }
            rotated = true;
        }
        // 32 zero bytes after the record (when they fit) mark the end of the chain even in a
        // recycled segment full of old bytes; the next round overwrites them.
        let room = core.active.size - core.active.offset - padded as u64;
        let marker = room.min(RECORD_HEADER_LEN as u64) as usize;
        round.buf.resize(padded + marker, 0);
        let seq = core.active.seq;
        let offset = core.active.offset;
        let write_seq = core.next_write_seq;
        let (head, rest) = round.buf.split_at_mut(RECORD_HEADER_LEN);
        encode_header(head, seq, write_seq, core.durable_write_seq, &rest[..body_len]);
        let file = Arc::clone(&core.active.file);
        if let Err(error) = file.write_all_at(&round.buf, offset) {
            drop(core);
            let error = self.poison_with("write", error);
            round.done.complete(Err(error));
            return None;
        }
        core.active.offset += padded as u64;
        core.next_write_seq += 1;
        core.active.unsynced = true;
        drop(core);
        Some(Written {
            round,
            seq,
            body_offset: offset + RECORD_HEADER_LEN as u64,
            write_seq,
            padded,
            file,
            rotated,
            sync_started: Instant::now(),
        })
    }

    /// Records the outcome of `written`'s fdatasync: durable up to it, or the log poisoned.
    fn synced(&self, written: &Written, result: std::io::Result<()>) -> Result<(), WalError> {
        if let Err(error) = result {
            return Err(self.poison_with("fdatasync", error));
        }
        let mut core = self.core.lock();
        core.durable_write_seq = core.durable_write_seq.max(written.write_seq);
        if written.write_seq + 1 == core.next_write_seq {
            core.active.unsynced = false;
        }
        drop(core);
        bump(&self.counters.fdatasyncs, 1);
        self.metrics.fdatasyncs.increment(1);
        self.metrics.fdatasync_seconds.record(written.sync_started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Finishes a written round once it is durable (or written, for an unsynced one): update
    /// the index, complete the producers, collect garbage, copy laggards forward. `next` is a
    /// round written after this one and not finished yet, whose groups the copy must skip.
    fn finish(&self, written: Written, result: Result<(), WalError>, next: Option<&Round>) {
        let Written { mut round, seq, body_offset, padded, rotated, .. } = written;
        if let Err(error) = result {
            round.done.complete(Err(error));
            return;
        }
        let (run_gc, active_seq) = {
            let mut core = self.core.lock();
            core.gc_pending |= round.frees || rotated;
            let run_gc = round.sync && core.gc_pending;
            if run_gc {
                core.gc_pending = false;
            }
            (run_gc, core.active.seq)
        };
        let entries = self.apply_to_index(&round, seq, body_offset);
        bump(&self.counters.rounds, 1);
        bump(&self.counters.entries, entries);
        bump(&self.counters.bytes, padded as u64);
        self.metrics.rounds.increment(1);
        self.metrics.entries.increment(entries);
        self.metrics.bytes.increment(padded as u64);
        self.metrics.round_bytes.record(padded as f64);
        round.done.complete(Ok(()));
        let buf = std::mem::take(&mut round.buf);
        self.queue.lock().spare_bufs.push(buf);
        if run_gc {
            self.collect_garbage(active_seq);
        }
        let requested = self.rewrite_requested.swap(false, Ordering::Relaxed);
        if (rotated || requested) && self.config.rewrite_entries_max > 0 {
            self.rewrite_pinning(next);
        }
    }

    pub(super) fn apply_to_index(&self, round: &Round, seq: u64, body_offset: u64) -> u64 {
        let mut read = self.read.write();
        let mut entries = 0u64;
        for op in &round.ops {
            let op = match *op {
                PendingOp::Entries { group, first_index, start, count } => {
                    entries += count as u64;
                    IndexOp::Entries {
                        group,
                        first_index,
                        entries: round.payloads[start..start + count]
                            .iter()
                            .map(|&(term, offset, len)| (term, offset as usize, len as usize)),
                    }
                }
                PendingOp::HardState { group, state } => IndexOp::HardState { group, state },
                PendingOp::Truncate { group, from } => IndexOp::Truncate { group, from },
                PendingOp::Compact { group, index, term } => {
                    IndexOp::Compact { group, index, term }
                }
                PendingOp::Remove { group } => IndexOp::Remove { group },
            };
            read.index
                .apply(op, seq, body_offset, true)
                .expect("rounds are checked against the same rules when accepted");
        }
        entries
    }

    /// A round could not be placed (disk full, or preparing a segment failed): it and every round
    /// accepted after it fail, and the accepted bounds fall back to what was written.
    pub(super) fn fail_pending(&self, round: &Round, error: WalError) {
        if matches!(error, WalError::DiskFull) {
            self.disk_full.store(true, Ordering::Relaxed);
        }
        // The open round is taken before anyone hears of the failure: a batch sent in answer to
        // it (a compaction, say) goes into a fresh round and is not failed along.
        let open = {
            let mut queue = self.queue.lock();
            let open = queue.take();
            let read = self.read.read();
            queue.bounds = read.index.groups.iter().map(|(g, index)| (*g, index.bounds)).collect();
            open
        };
        round.done.complete(Err(error.clone()));
        if let Some(open) = open {
            open.done.complete(Err(error));
        }
    }

    /// Writes the closing seal: an empty synced round claiming every round before it durable,
    /// so on a cleanly closed log damage to the last data round is refused, not cut as a tail.
    /// Rounds that rode along unsynced are synced first: a header claims only rounds already
    /// synced when it is written, and the seal must claim them too.
    fn seal(&self, syncer: &mut Syncer) {
        if self.poison.get().is_none() {
            // A failure poisons the log, which `close` reports.
            if self.sync_unsynced(&mut self.core.lock()).is_err() {
                return;
            }
            let mut round = Round::new(Vec::new());
            round.forced = true;
            round.sync = true;
            self.write_round(syncer, round);
        }
    }

    /// Inline mode's close: waits for a caller that is writing rounds (`drive_inline`) — the
    /// seal must follow its last round and that round's fdatasync — then writes what is queued,
    /// then the seal.
    pub(super) fn drain_and_seal_inline(&self) {
        {
            let mut queue = self.queue.lock();
            // `Writing::drop` notifies `work` once the queue is closed.
            while queue.writing {
                self.work.wait(&mut queue);
            }
            queue.writing = true;
        }
        let _writing = Writing(self);
        let mut syncer = Syncer::Blocking;
        loop {
            let Some(round) = self.queue.lock().take() else { break };
            self.write_round(&mut syncer, round);
        }
        self.seal(&mut syncer);
    }

    /// Syncs the active segment if rounds that rode along unsynced are in it (at most one
    /// fdatasync in flight: called only with none in flight).
    fn sync_unsynced(&self, core: &mut WriterCore) -> Result<(), WalError> {
        if core.active.unsynced {
            let started = Instant::now();
            if let Err(error) = core.active.file.sync_data() {
                return Err(self.poison_with("fdatasync", error));
            }
            bump(&self.counters.fdatasyncs, 1);
            self.metrics.fdatasyncs.increment(1);
            self.metrics.fdatasync_seconds.record(started.elapsed().as_secs_f64());
            core.active.unsynced = false;
            core.durable_write_seq = core.next_write_seq - 1;
        }
        Ok(())
    }

    pub(super) fn rotate(&self, core: &mut WriterCore, maintenance: bool) -> Result<(), WalError> {
        // Rounds that rode along unsynced live in the old file: the next round's fdatasync
        // covers only the new one.
        self.sync_unsynced(core)?;
        let next = self.take_prepared(maintenance)?;
        self.install(&next)?;
        core.active = Active {
            seq: next.seq,
            file: next.file,
            size: next.size,
            offset: SEGMENT_HEADER_LEN as u64,
            unsynced: false,
        };
        bump(&self.counters.rotations, 1);
        Ok(())
    }
}

//! The write path: the writer loop (or the inline writer), one round at a time — place it, seal
//! its header, one write, one fdatasync, update the index, complete the producers — and rotation.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Active, Shared, WriterCore, bump};
use crate::commit::{PendingOp, Round};
use crate::config::WriterMode;
use crate::error::WalError;
use crate::index::IndexOp;
use crate::io::Writer;
use crate::record::{RECORD_HEADER_LEN, encode_header, padded_record_len};
use crate::segment::SEGMENT_HEADER_LEN;

/// Holds the right to write rounds (`Queue::writing`) and gives it up when dropped, panic or
/// not; then wakes the writer thread if work arrived meanwhile (it waits while someone else
/// writes).
struct Writing<'a>(&'a Shared);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
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
    /// Inline mode: the caller writes rounds itself until none is left (unless another caller is
    /// already doing so, in which case that one will write ours too).
    pub(crate) fn drive_inline(&self) {
        if self.config.writer != WriterMode::Inline {
            return;
        }
        let mut writer = Writer::Blocking;
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
            self.write_round(&mut writer, round);
        }
    }

    /// Threads mode, idle log: the appending thread, which would only park until its round is
    /// durable, writes the round it took in `enqueue` itself (`pwrite` + `fdatasync` through
    /// [`crate::io::StorageFile`]) instead of waking the writer thread and being woken back.
    pub(crate) fn write_own_round(&self, round: crate::commit::Round) {
        let _writing = Writing(self);
        bump(&self.counters.rounds_inline, 1);
        self.write_round(&mut Writer::Blocking, round);
    }

    pub(super) fn writer_loop(&self, mut writer: Writer) {
        loop {
            let round = {
                let mut queue = self.queue.lock();
                // An appending thread may be writing its own round (`write_own_round`): rounds
                // are written one at a time, in the order they were taken.
                while queue.writing || (queue.open.is_empty() && !queue.closed) {
                    self.work.wait(&mut queue);
                }
                if queue.open.is_empty() {
                    drop(queue);
                    // Closed and drained: the seal is the last round (see `seal`).
                    self.seal(&mut writer);
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
                queue.take().expect("checked non-empty")
            };
            let _writing = Writing(self);
            self.write_round(&mut writer, round);
        }
    }

    /// Writes one round: place it, seal its header, one write, one fdatasync if any producer
    /// asked for durability, update the index, complete the producers.
    pub(super) fn write_round(&self, writer: &mut Writer, mut round: Round) {
        if let Err(error) = self.check_poison() {
            round.done.complete(Err(error));
            return;
        }
        let body_len = round.body_len();
        let padded = padded_record_len(body_len);
        let mut core = self.core.lock();
        let mut rotated = false;
        if core.active.offset + padded as u64 > core.active.size {
            if let Err(error) = self.rotate(&mut core, round.maintenance) {
                drop(core);
                self.fail_pending(&round, error);
                return;
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
        let started = Instant::now();
        let (result, buf) =
            writer.write(seq, &file, std::mem::take(&mut round.buf), offset, round.sync);
        round.buf = buf;
        if let Err((op, error)) = result {
            drop(core);
            let error = self.poison_with(op, error);
            round.done.complete(Err(error));
            return;
        }
        let elapsed = started.elapsed();
        core.active.offset += padded as u64;
        core.next_write_seq += 1;
        if round.sync {
            core.durable_write_seq = write_seq;
            core.active.unsynced = false;
            bump(&self.counters.fdatasyncs, 1);
            self.metrics.fdatasyncs.increment(1);
            self.metrics.fdatasync_seconds.record(elapsed.as_secs_f64());
        } else {
            core.active.unsynced = true;
        }
        core.gc_pending |= round.frees || rotated;
        let run_gc = round.sync && core.gc_pending;
        if run_gc {
            core.gc_pending = false;
        }
        let active_seq = core.active.seq;
        drop(core);

        let body_offset = offset + RECORD_HEADER_LEN as u64;
        let entries = self.apply_to_index(&round, seq, body_offset);
        bump(&self.counters.rounds, 1);
        bump(&self.counters.entries, entries);
        bump(&self.counters.bytes, padded as u64);
        self.metrics.rounds.increment(1);
        self.metrics.entries.increment(entries);
        self.metrics.bytes.increment(padded as u64);
        self.metrics.round_bytes.record(padded as f64);
        round.done.complete(Ok(()));
        let Round { buf, .. } = round;
        self.queue.lock().spare_bufs.push(buf);
        if run_gc {
            self.collect_garbage(active_seq);
        }
        let requested = self.rewrite_requested.swap(false, Ordering::Relaxed);
        if (rotated || requested) && self.config.rewrite_entries_max > 0 {
            self.rewrite_pinning();
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
    fn seal(&self, writer: &mut Writer) {
        if self.poison.get().is_none() {
            let mut round = Round::new(Vec::new());
            round.forced = true;
            round.sync = true;
            self.write_round(writer, round);
        }
    }

    /// Inline mode's close: writes what is queued, then the seal.
    pub(super) fn drain_and_seal_inline(&self) {
        self.drive_inline();
        let mut writer = Writer::Blocking;
        self.seal(&mut writer);
    }

    pub(super) fn rotate(&self, core: &mut WriterCore, maintenance: bool) -> Result<(), WalError> {
        if core.active.unsynced {
            // Rounds that rode along unsynced live in the old file: the next round's fdatasync
            // covers only the new one.
            if let Err(error) = core.active.file.sync_data() {
                return Err(self.poison_with("fdatasync", error));
            }
            bump(&self.counters.fdatasyncs, 1);
            self.metrics.fdatasyncs.increment(1);
            core.active.unsynced = false;
            core.durable_write_seq = core.next_write_seq - 1;
        }
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

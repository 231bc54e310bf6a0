//! Group commit: producers encode their batches straight into the open round (the only copy of
//! each payload byte on the write path); one writer turns a whole round into one record, one write
//! and one fdatasync, while the next round fills; every producer's future completes when its round
//! is durable. On an idle log a caller blocked in [`block_on`] or [`AppendFuture::wait`] writes
//! its own round instead (`Shared::write_own_round`); `Queue::writing` keeps rounds one at a
//! time and in order.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

use crate::GroupId;
use crate::error::WalError;
use crate::index::{Bounds, InvalidOp};
use crate::log::Shared;
use crate::record::{HardState, Op, RECORD_HEADER_LEN, WriteBatch};

/// Completion of one round, shared by every producer in it.
#[derive(Debug, Default)]
pub(crate) struct RoundDone {
    result: OnceLock<Result<(), WalError>>,
    wakers: Mutex<Vec<Waker>>,
    /// 0 until `result` is set, then 1: the futex word threads in [`RoundDone::wait`] sleep on,
    /// so that completing a round wakes all of them with one system call rather than one
    /// `unpark` (a futex wake) per thread, which the writer thread would pay between fdatasyncs.
    completed: AtomicU32,
    /// Threads that went to sleep in [`RoundDone::wait`] (never decremented: it only decides
    /// whether completing the round needs a futex wake at all).
    sleepers: AtomicU32,
}

impl RoundDone {
    pub(crate) fn complete(&self, result: Result<(), WalError>) {
        assert!(self.result.set(result).is_ok(), "a round completes once");
        // SeqCst on both sides (here and in `wait`): either this load sees a sleeper's
        // registration, or that sleeper's check of `completed` sees the store.
        self.completed.store(1, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            atomic_wait::wake_all(std::ptr::from_ref(&self.completed));
        }
        for waker in std::mem::take(&mut *self.wakers.lock()) {
            waker.wake();
        }
    }

    /// `(threads that slept in `wait`, wakers registered)`, for tests.
    #[cfg(test)]
    pub(crate) fn waiters(&self) -> (u32, usize) {
        (self.sleepers.load(Ordering::SeqCst), self.wakers.lock().len())
    }

    /// Blocks the calling thread until the round completes.
    fn wait(&self) -> Result<(), WalError> {
        if let Some(result) = self.result.get() {
            return result.clone();
        }
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        // The kernel compares the word with 0 before sleeping: a completion between the check
        // and the sleep is not lost. Spurious returns just check again.
        while self.completed.load(Ordering::SeqCst) == 0 {
            atomic_wait::wait(&self.completed, 0);
        }
        self.result.get().expect("set before `completed`").clone()
    }

    /// `slot` is where this waiter's waker went on an earlier poll: a re-poll replaces its own
    /// waker instead of searching the round's (hundreds of producers would make a round's
    /// registrations quadratic).
    fn poll(&self, cx: &mut Context<'_>, slot: &mut Option<usize>) -> Poll<Result<(), WalError>> {
        if let Some(result) = self.result.get() {
            return Poll::Ready(result.clone());
        }
        let mut wakers = self.wakers.lock();
        // Checked again under the lock `complete` takes to drain wakers: no lost wake-up.
        if let Some(result) = self.result.get() {
            return Poll::Ready(result.clone());
        }
        // The list only grows until `complete` drains it, and then the result is set: a slot
        // handed out stays this waiter's.
        match slot.and_then(|at| wakers.get_mut(at)) {
            Some(waker) => {
                if !waker.will_wake(cx.waker()) {
                    waker.clone_from(cx.waker());
                }
            }
            None => {
                *slot = Some(wakers.len());
                wakers.push(cx.waker().clone());
            }
        }
        Poll::Pending
    }
}

/// An operation of a round, with payload positions kept aside so the index can be updated after
/// the write without decoding the round again.
#[derive(Debug)]
pub(crate) enum PendingOp {
    Entries { group: GroupId, first_index: u64, start: usize, count: usize },
    HardState { group: GroupId, state: HardState },
    Truncate { group: GroupId, from: u64 },
    Compact { group: GroupId, index: u64, term: u64 },
    Remove { group: GroupId },
}

/// The round being filled (and then written).
#[derive(Debug)]
#[expect(clippy::struct_excessive_bools, reason = "independent facts about one round")]
pub(crate) struct Round {
    /// A record-header placeholder followed by the body.
    pub buf: Vec<u8>,
    pub ops: Vec<PendingOp>,
    /// `(term, offset within the body, length)` of each payload, in order.
    pub payloads: Vec<(u64, u32, u32)>,
    /// Some producer wants durability: fdatasync after the write.
    pub sync: bool,
    /// Write even with no operations (a flush or the closing seal).
    pub forced: bool,
    /// No new entries: may use the reserved segment when the disk is full.
    pub maintenance: bool,
    /// Holds truncations, compactions or removals: garbage collection may have work after it.
    pub frees: bool,
    pub done: Arc<RoundDone>,
}

/// What the waiters of a round dropped before it completed hear (see `Round`'s `Drop`).
pub(crate) const PANICKED: &str = "a panic unwound through the write of this round (a bug)";

impl Drop for Round {
    fn drop(&mut self) {
        // Every round is completed before it is dropped, except when a panic (a bug) unwinds
        // through its write: its waiters must hear of it instead of waiting forever.
        if self.done.result.get().is_none() {
            self.done.complete(Err(WalError::Poisoned {
                op: "writing a round",
                cause: Arc::new(std::io::Error::other(PANICKED)),
            }));
        }
    }
}

impl Round {
    pub(crate) fn new(mut buf: Vec<u8>) -> Round {
        buf.clear();
        buf.resize(RECORD_HEADER_LEN, 0);
        Round {
            buf,
            ops: Vec::new(),
            payloads: Vec::new(),
            sync: false,
            forced: false,
            maintenance: true,
            frees: false,
            done: Arc::new(RoundDone::default()),
        }
    }

    pub(crate) fn body_len(&self) -> usize {
        self.buf.len() - RECORD_HEADER_LEN
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ops.is_empty() && !self.forced
    }

    /// Whether any operation of this round is about `group`.
    pub(crate) fn touches(&self, group: GroupId) -> bool {
        self.ops.iter().any(|op| match op {
            PendingOp::Entries { group: g, .. }
            | PendingOp::HardState { group: g, .. }
            | PendingOp::Truncate { group: g, .. }
            | PendingOp::Compact { group: g, .. }
            | PendingOp::Remove { group: g } => *g == group,
        })
    }

    fn push(&mut self, op: &Op) {
        let payloads = &mut self.payloads;
        let start = payloads.len();
        op.encode(&mut self.buf, |term, at, len| {
            let offset = (at - RECORD_HEADER_LEN) as u32;
            payloads.push((term, offset, len as u32));
        });
        let pending = match op {
            Op::Entries { group, first_index, entries } => {
                self.maintenance = false;
                PendingOp::Entries {
                    group: *group,
                    first_index: *first_index,
                    start,
                    count: entries.len(),
                }
            }
            Op::HardState { group, state } => PendingOp::HardState { group: *group, state: *state },
            Op::Truncate { group, from } => {
                self.frees = true;
                PendingOp::Truncate { group: *group, from: *from }
            }
            Op::Compact { group, index, term } => {
                self.frees = true;
                PendingOp::Compact { group: *group, index: *index, term: *term }
            }
            Op::RemoveGroup { group } => {
                self.frees = true;
                PendingOp::Remove { group: *group }
            }
        };
        self.ops.push(pending);
    }
}

/// What producers share: the open round and the bounds every accepted batch leaves each group.
#[derive(Debug)]
pub(crate) struct Queue {
    pub open: Round,
    /// Bounds after every accepted batch (written or not): what new batches are checked against.
    pub bounds: std::collections::HashMap<GroupId, Bounds>,
    pub closed: bool,
    /// Producers waiting for the open round to be taken (it was full).
    pub space_waiters: Vec<Waker>,
    /// Some thread is writing a round (the writer thread, an appending thread writing its own
    /// round on an idle log, or in inline mode the task driving the log): rounds are taken and
    /// written one at a time.
    pub writing: bool,
    pub spare_bufs: Vec<Vec<u8>>,
    /// `accept`'s per-batch list of the groups it touches, kept (up to [`TOUCHED_KEPT_MAX`]
    /// groups' room) so a batch allocates nothing.
    touched: Vec<(GroupId, Bounds)>,
}

/// The most groups' room `Queue::touched` keeps between batches.
const TOUCHED_KEPT_MAX: usize = 1024;

impl Queue {
    pub(crate) fn new(bounds: std::collections::HashMap<GroupId, Bounds>) -> Queue {
        Queue {
            open: Round::new(Vec::new()),
            bounds,
            closed: false,
            space_waiters: Vec::new(),
            writing: false,
            spare_bufs: Vec::new(),
            touched: Vec::new(),
        }
    }

    /// Takes the open round for writing, if it has anything, and lets waiting producers in.
    pub(crate) fn take(&mut self) -> Option<Round> {
        if self.open.is_empty() {
            return None;
        }
        let buf = self.spare_bufs.pop().unwrap_or_default();
        let round = std::mem::replace(&mut self.open, Round::new(buf));
        for waker in self.space_waiters.drain(..) {
            waker.wake();
        }
        Some(round)
    }

    /// Checks `batch` against the accepted bounds and, if it fits, adds it to the open round.
    /// All or nothing: a batch that does not fit changes nothing.
    pub(crate) fn accept(&mut self, batch: &WriteBatch, sync: bool) -> Result<(), WalError> {
        // Always empty here: the last batch drained it, or dropped it (a failed batch, or one
        // that grew it past `TOUCHED_KEPT_MAX`) and left an unallocated one behind.
        let mut touched = std::mem::take(&mut self.touched);
        for op in batch.ops() {
            let group = op.group();
            let position = match touched.iter().position(|(g, _)| *g == group) {
                Some(position) => position,
                None => {
                    let current = self.bounds.get(&group).copied().unwrap_or_else(Bounds::new);
                    touched.push((group, current));
                    touched.len() - 1
                }
            };
            let bounds = &mut touched[position].1;
            let invalid = |reason| WalError::InvalidBatch { group, reason };
            match op {
                Op::Entries { first_index, entries, .. } => {
                    if entries.is_empty() {
                        return Err(invalid(InvalidOp::Empty));
                    }
                    if *first_index == 0 {
                        return Err(invalid(InvalidOp::ZeroIndex));
                    }
                    // The next index after the last entry must itself fit.
                    if first_index
                        .checked_add(entries.len() as u64)
                        .is_none_or(|next| next == u64::MAX)
                    {
                        return Err(invalid(InvalidOp::Overflow { index: *first_index }));
                    }
                    bounds.check_entries(*first_index, true).map_err(invalid)?;
                    bounds.apply_entries(*first_index, entries.len() as u64);
                }
                Op::Truncate { from, .. } => {
                    if *from == 0 {
                        return Err(invalid(InvalidOp::ZeroIndex));
                    }
                    bounds.check_truncate(*from).map_err(invalid)?;
                    bounds.apply_truncate(*from);
                }
                Op::Compact { index, .. } => {
                    if *index == 0 {
                        return Err(invalid(InvalidOp::ZeroIndex));
                    }
                    if *index == u64::MAX {
                        return Err(invalid(InvalidOp::Overflow { index: *index }));
                    }
                    bounds.apply_compact(*index);
                }
                Op::RemoveGroup { .. } => *bounds = Bounds::new(),
                Op::HardState { .. } => {}
            }
        }
        for (group, bounds) in touched.drain(..) {
            // Fresh bounds and no entry are the same thing: removed groups leave nothing behind.
            if bounds == Bounds::new() {
                self.bounds.remove(&group);
            } else {
                self.bounds.insert(group, bounds);
            }
        }
        // A batch of many groups leaves no lasting large buffer behind.
        if touched.capacity() <= TOUCHED_KEPT_MAX {
            self.touched = touched;
        }
        for op in batch.ops() {
            self.open.push(op);
        }
        self.open.sync |= sync;
        self.open.forced |= batch.is_empty();
        Ok(())
    }
}

/// The future of an append: resolves once the batch is durable (or, for `sync: false`, written).
#[must_use = "an append is not durable until its future resolves"]
pub struct AppendFuture {
    shared: Arc<Shared>,
    state: AppendState,
}

enum AppendState {
    Queued {
        batch: WriteBatch,
        sync: bool,
    },
    /// In a round; where its waker sits in the round's list once registered.
    Waiting(Arc<RoundDone>, Option<usize>),
    Failed(WalError),
    Done,
}

impl AppendFuture {
    pub(crate) fn new(shared: Arc<Shared>, batch: WriteBatch, sync: bool) -> AppendFuture {
        let state = match shared.check_batch(&batch) {
            Ok(()) => AppendState::Queued { batch, sync },
            Err(error) => AppendState::Failed(error),
        };
        AppendFuture { shared, state }
    }
}

impl AppendFuture {
    /// Waits on the calling thread until the append is durable (or, for `sync: false`, written),
    /// like [`block_on`]`(self)` — an idle log is written by this thread itself — except that
    /// once the batch is in a round the thread sleeps on the round's completion word instead of
    /// registering a waker: a round shared by many blocked threads wakes all of them with one
    /// system call, where one waker per thread costs the writer thread one `unpark` each, on its
    /// path between fdatasyncs. For threads that do nothing else meanwhile; a future that must
    /// be combined with others goes through [`block_on`] or an executor. A future already polled
    /// after joining its round keeps the waker it registered then, which is still woken.
    ///
    /// # Panics
    ///
    /// If the future was already polled to completion.
    pub fn wait(mut self) -> Result<(), WalError> {
        if self.shared.inline_writer() {
            // Rounds are written by polls: only polling makes progress.
            return block_on(self);
        }
        let waker = thread_waker();
        let cx = Context::from_waker(&waker);
        let _restore = WaitingCaller::enter();
        loop {
            match std::mem::replace(&mut self.state, AppendState::Done) {
                AppendState::Waiting(done, _) => {
                    let result = done.wait();
                    self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                    return result;
                }
                AppendState::Failed(error) => return Err(error),
                AppendState::Done => panic!("AppendFuture waited on after completion"),
                queued @ AppendState::Queued { .. } => {
                    self.state = queued;
                    if self.try_join(&cx).is_pending() {
                        // The open round was full: the writer taking it unparks this thread.
                        std::thread::park();
                    }
                }
            }
        }
    }

    /// Moves a queued batch into the open round (`Waiting`), writing the round on this thread
    /// when `enqueue` hands it over; `Pending` while the open round is full (the waker is called
    /// once it is taken). Leaves every other state as it is.
    fn try_join(&mut self, cx: &Context<'_>) -> Poll<()> {
        let AppendState::Queued { batch, sync } = &self.state else {
            return Poll::Ready(());
        };
        match self.shared.enqueue(batch, *sync, cx, blocking_caller()) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok((done, own))) => {
                self.state = AppendState::Waiting(done, None);
                if let Some(round) = own {
                    self.shared.write_own_round(round);
                }
                Poll::Ready(())
            }
            Poll::Ready(Err(error)) => {
                self.state = AppendState::Failed(error);
                Poll::Ready(())
            }
        }
    }

    /// Whether the batch has joined the log's queue. Appends join in the order they are first
    /// polled, except that one finding the open round full joins only when polled again after
    /// the writer took the round: a caller keeping several appends in flight polls them in
    /// order and starts a new one only once every earlier one has joined.
    pub fn joined(&self) -> bool {
        !matches!(self.state, AppendState::Queued { .. })
    }
}

impl std::fmt::Debug for AppendFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            AppendState::Queued { .. } => "queued",
            AppendState::Waiting(..) => "waiting",
            AppendState::Failed(_) => "failed",
            AppendState::Done => "done",
        };
        f.debug_struct("AppendFuture").field("state", &state).finish_non_exhaustive()
    }
}

impl Future for AppendFuture {
    type Output = Result<(), WalError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            match std::mem::replace(&mut this.state, AppendState::Done) {
                queued @ AppendState::Queued { .. } => {
                    this.state = queued;
                    if this.try_join(cx).is_pending() {
                        this.shared.drive_inline();
                        return Poll::Pending;
                    }
                }
                AppendState::Waiting(done, mut slot) => {
                    this.shared.drive_inline();
                    let poll = done.poll(cx, &mut slot);
                    if poll.is_pending() {
                        this.state = AppendState::Waiting(done, slot);
                    } else {
                        this.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                    }
                    return poll;
                }
                AppendState::Failed(error) => return Poll::Ready(Err(error)),
                AppendState::Done => panic!("AppendFuture polled after completion"),
            }
        }
    }
}

impl Drop for AppendFuture {
    fn drop(&mut self) {
        if matches!(self.state, AppendState::Waiting(..)) {
            self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

thread_local! {
    /// Set while this thread is inside [`block_on`], [`AppendFuture::wait`] or
    /// [`waiting_caller`]: it does nothing but wait for the future, so
    /// it may write its own round on an idle log instead of waking the writer thread (never done
    /// from an executor's task, which would stall the executor's other tasks).
    static BLOCKING_CALLER: Cell<bool> = const { Cell::new(false) };
}

fn blocking_caller() -> bool {
    BLOCKING_CALLER.with(Cell::get)
}

/// Runs `f` with the calling thread counted as a caller that would only wait for its appends:
/// an append first polled inside `f` on an idle log (no round being written, no other append in
/// flight) is written and synced by this thread — one `pwrite` + `fdatasync` — instead of being
/// handed to the writer thread and woken back, which saves two thread wake-ups on the path of a
/// lone durable write.
///
/// For an event loop at a point where it has nothing else to do until that append is durable
/// (the engine's shard loop when a loop iteration's only output waits for its write): the call
/// blocks for the write and the sync. Under load some append is always in flight, so appends
/// join the open round as usual and the writer thread keeps rounds growing.
pub fn waiting_caller<R>(f: impl FnOnce() -> R) -> R {
    let _restore = WaitingCaller::enter();
    f()
}

/// Marks this thread as a [`blocking_caller`] until dropped, then restores what it was.
struct WaitingCaller(bool);

impl WaitingCaller {
    fn enter() -> Self {
        Self(BLOCKING_CALLER.with(|flag| flag.replace(true)))
    }
}

impl Drop for WaitingCaller {
    fn drop(&mut self) {
        BLOCKING_CALLER.with(|flag| flag.set(self.0));
    }
}

/// Runs a future to completion on the calling thread (for callers outside any async runtime).
///
/// An append awaited this way on an idle log is written by the calling thread itself, saving
/// the hand-off to the log's writer thread and back.
pub fn block_on<F: Future>(future: F) -> F::Output {
    let waker = thread_waker();
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    let _restore = WaitingCaller::enter();
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        std::thread::park();
    }
}

/// A waker that unparks the calling thread: one per thread, made on its first wait and kept,
/// so a blocking append allocates nothing for it (a fresh one per append cost an allocation,
/// a `Thread` clone and their release on every append of every blocked producer).
fn thread_waker() -> Waker {
    struct ThreadWaker(std::thread::Thread);
    impl std::task::Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    fn fresh() -> Waker {
        Waker::from(Arc::new(ThreadWaker(std::thread::current())))
    }
    thread_local! {
        static WAKER: Waker = fresh();
    }
    // A fresh one while the thread's locals are being destroyed (an append from a destructor).
    WAKER.try_with(Waker::clone).unwrap_or_else(|_| fresh())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, Wake, Waker};
    use std::time::Duration;

    use super::RoundDone;

    struct Counting(AtomicUsize);

    impl Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting() -> (Arc<Counting>, Waker) {
        let count = Arc::new(Counting(AtomicUsize::new(0)));
        (Arc::clone(&count), Waker::from(count))
    }

    /// A waiter re-polled with another waker replaces its own registration: the round wakes
    /// the latest waker of every waiter once, and no stale one.
    #[test]
    fn a_repoll_replaces_the_waiters_own_waker_and_completion_wakes_each_waiter_once() {
        let done = RoundDone::default();
        let (first, first_waker) = counting();
        let (second, second_waker) = counting();
        let (other, other_waker) = counting();
        let (mut mine, mut theirs) = (None, None);
        assert!(done.poll(&mut Context::from_waker(&first_waker), &mut mine).is_pending());
        assert!(done.poll(&mut Context::from_waker(&other_waker), &mut theirs).is_pending());
        assert!(done.poll(&mut Context::from_waker(&second_waker), &mut mine).is_pending());
        // The same waker again registers nothing new.
        assert!(done.poll(&mut Context::from_waker(&other_waker), &mut theirs).is_pending());
        assert_eq!((mine, theirs), (Some(0), Some(1)));
        assert_eq!(done.wakers.lock().len(), 2);
        done.complete(Ok(()));
        assert_eq!(first.0.load(Ordering::SeqCst), 0, "the replaced waker is not woken");
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        assert_eq!(other.0.load(Ordering::SeqCst), 1);
        assert!(matches!(
            done.poll(&mut Context::from_waker(&first_waker), &mut mine),
            Poll::Ready(Ok(()))
        ));
    }

    /// Threads in `wait` register no waker (the writer has nothing to wake one by one), all
    /// return with the round's result once it completes, alongside a polled waiter, and a wait
    /// after completion returns at once.
    #[test]
    fn threads_in_wait_share_the_completion_and_register_no_waker() {
        let done = Arc::new(RoundDone::default());
        let threads = 8;
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..threads {
            let (done, tx) = (Arc::clone(&done), tx.clone());
            std::thread::spawn(move || tx.send(done.wait()).unwrap());
        }
        let (polled, polled_waker) = counting();
        assert!(done.poll(&mut Context::from_waker(&polled_waker), &mut None).is_pending());
        while done.waiters().0 < threads {
            std::thread::yield_now();
        }
        assert_eq!(done.waiters(), (threads, 1), "only the polled waiter registered a waker");
        done.complete(Err(crate::WalError::Closed));
        for _ in 0..threads {
            let result = rx.recv_timeout(Duration::from_secs(10)).expect("a waiter was not woken");
            assert!(matches!(result, Err(crate::WalError::Closed)), "{result:?}");
        }
        assert_eq!(polled.0.load(Ordering::SeqCst), 1);
        assert!(matches!(done.wait(), Err(crate::WalError::Closed)));
    }

    /// Completion racing a thread on its way into `wait` (released together by a barrier; every
    /// other round completes only once the thread has registered as a sleeper): never a lost
    /// wake-up.
    #[test]
    fn a_completion_racing_a_waiter_is_never_lost() {
        for round in 0..2_000 {
            let done = Arc::new(RoundDone::default());
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let (tx, rx) = std::sync::mpsc::channel();
            {
                let (done, barrier) = (Arc::clone(&done), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    barrier.wait();
                    tx.send(done.wait()).unwrap();
                });
            }
            barrier.wait();
            if round % 2 == 1 {
                while done.waiters().0 == 0 {
                    std::hint::spin_loop();
                }
            }
            done.complete(Ok(()));
            let result = rx.recv_timeout(Duration::from_secs(10));
            assert!(matches!(result, Ok(Ok(()))), "round {round}: the waiter missed the wake-up");
        }
    }
}

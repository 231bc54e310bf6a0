//! Drives a log (or a peer engine) with many producers: a pool of long-lived producer threads, so
//! a measured iteration is "N appends completed by P producers" without thread start-up in it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_wal::{AppendFuture, Config, GroupId, Stats, Wal, WalError, WriteBatch};

/// The work one producer does for one request: `(producer, appends)`.
pub type Work = dyn Fn(usize, u64) + Send + Sync;

#[derive(Default)]
struct Control {
    generation: u64,
    appends: u64,
    remaining: usize,
    stop: bool,
}

/// Long-lived producer threads that each run the same closure on request.
pub struct ProducerPool {
    control: Arc<(Mutex<Control>, Condvar, Condvar)>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ProducerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProducerPool").field("threads", &self.threads.len()).finish_non_exhaustive()
    }
}

impl ProducerPool {
    /// Starts `producers` threads that will run `work(producer, appends)` on each [`run`].
    ///
    /// [`run`]: ProducerPool::run
    pub fn new(producers: usize, work: &Arc<Work>) -> ProducerPool {
        assert!(producers > 0, "at least one producer");
        let control = Arc::new((Mutex::new(Control::default()), Condvar::new(), Condvar::new()));
        let threads = (0..producers)
            .map(|producer| {
                let control = Arc::clone(&control);
                let work = Arc::clone(work);
                std::thread::Builder::new()
                    .name(format!("producer-{producer}"))
                    .stack_size(256 << 10)
                    .spawn(move || producer_loop(producer, &control, &*work))
                    .expect("spawning a producer")
            })
            .collect();
        ProducerPool { control, threads }
    }

    /// Has every producer perform `appends_each` appends; returns the wall time from the start
    /// signal until the last producer finished.
    pub fn run(&self, appends_each: u64) -> Duration {
        let (lock, start, done) = &*self.control;
        let mut control = lock.lock().expect("pool lock");
        control.generation += 1;
        control.appends = appends_each;
        control.remaining = self.threads.len();
        let started = Instant::now();
        start.notify_all();
        while control.remaining > 0 {
            control = done.wait(control).expect("pool lock");
        }
        started.elapsed()
    }
}

fn producer_loop(producer: usize, control: &(Mutex<Control>, Condvar, Condvar), work: &Work) {
    let (lock, start, done) = control;
    let mut seen = 0u64;
    loop {
        let appends = {
            let mut control = lock.lock().expect("pool lock");
            while control.generation == seen && !control.stop {
                control = start.wait(control).expect("pool lock");
            }
            if control.stop {
                return;
            }
            seen = control.generation;
            control.appends
        };
        work(producer, appends);
        let mut control = lock.lock().expect("pool lock");
        control.remaining -= 1;
        if control.remaining == 0 {
            done.notify_all();
        }
    }
}

impl Drop for ProducerPool {
    fn drop(&mut self) {
        self.control.0.lock().expect("pool lock").stop = true;
        self.control.1.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Entries a group keeps before its producer compacts (inside the same batch), so segments are
/// recycled in steady state and the disk never fills.
pub const KEEP_ENTRIES: u64 = 64;

/// The log's side of a producers × groups workload: each append is one batch of `entries_each`
/// entries of `payload_bytes` for one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Payload bytes of each entry.
    pub payload_bytes: usize,
    /// Concurrent producers.
    pub producers: usize,
    /// Groups the appends are spread over.
    pub groups: usize,
    /// Entries in each append.
    pub entries_each: usize,
    /// Whether each append waits for durability (fdatasync) or only for the write.
    pub sync: bool,
    /// Producers are tasks on one executor thread (as in a shard's event loop) rather than one
    /// OS thread each blocking in `AppendFuture::wait`.
    pub tasks: bool,
}

/// A log under load from a [`ProducerPool`]: producers own disjoint sets of groups when there
/// are at least as many groups as producers; otherwise they share groups and take each group's
/// next index and enqueue under that group's lock, so indexes reach the log in order.
pub struct WalLoad {
    /// The log.
    pub wal: Arc<Wal>,
    shape: Shape,
    pool: ProducerPool,
    appended: Arc<AtomicU64>,
}

impl std::fmt::Debug for WalLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalLoad").field("shape", &self.shape).finish_non_exhaustive()
    }
}

struct Producers {
    wal: Arc<Wal>,
    shape: Shape,
    /// Next index of each group.
    next: Vec<Mutex<u64>>,
    /// One payload per producer (no shared reference count to bounce between cores).
    payloads: Vec<Bytes>,
    appended: Arc<AtomicU64>,
    /// Rotation position of each producer over its groups.
    cursor: Vec<AtomicU64>,
}

impl Producers {
    fn group_for(&self, producer: usize) -> usize {
        let Shape { producers, groups, .. } = self.shape;
        if groups < producers {
            return producer % groups;
        }
        let owned = (groups - producer).div_ceil(producers) as u64;
        let turn = self.cursor[producer].fetch_add(1, Ordering::Relaxed) % owned;
        producer + turn as usize * producers
    }

    /// Takes the next index of the producer's next group and builds its append.
    fn start(&self, producer: usize) -> (AppendFuture, MutexGuard<'_, u64>) {
        let group = self.group_for(producer);
        let mut next = self.next[group].lock().expect("group lock");
        let first = *next;
        let count = self.shape.entries_each as u64;
        *next += count;
        let payload = &self.payloads[producer];
        let mut batch = WriteBatch::new();
        let id = GroupId(group as u64);
        batch.add_entries(id, first, (0..count).map(|_| (1, payload.clone())));
        let last = first + count - 1;
        // Compact about every KEEP_ENTRIES entries, keeping the last KEEP_ENTRIES.
        if last > KEEP_ENTRIES && (last / KEEP_ENTRIES) != ((first - 1) / KEEP_ENTRIES) {
            batch.compact(id, last - KEEP_ENTRIES, 1);
        }
        (self.wal.append_with(batch, self.shape.sync), next)
    }

    fn append(&self, producer: usize) {
        let shared = self.shape.groups < self.shape.producers;
        let (future, next) = self.start(producer);
        let count = self.shape.entries_each as u64;
        let result = if shared {
            enqueue_then_wait(future, next)
        } else {
            drop(next);
            future.wait()
        };
        result.expect("append");
        self.appended.fetch_add(count, Ordering::Relaxed);
    }

    /// Runs every producer as a task on the calling thread, `appends` appends each.
    fn run_tasks(&self, appends: u64) {
        let producers = self.shape.producers;
        let count = self.shape.entries_each as u64;
        let ready = Arc::new(ReadyQueue {
            ids: Mutex::new((0..producers).collect()),
            thread: std::thread::current(),
        });
        let wakers: Vec<Waker> = (0..producers)
            .map(|id| Waker::from(Arc::new(TaskWaker { id, ready: Arc::clone(&ready) })))
            .collect();
        let mut futures: Vec<Option<AppendFuture>> = (0..producers).map(|_| None).collect();
        let mut left = vec![appends; producers];
        let mut running = producers;
        let mut batch = Vec::new();
        while running > 0 {
            std::mem::swap(&mut batch, &mut *ready.ids.lock().expect("ready queue"));
            if batch.is_empty() {
                std::thread::park();
                continue;
            }
            for id in batch.drain(..) {
                let mut cx = Context::from_waker(&wakers[id]);
                loop {
                    if futures[id].is_none() {
                        if left[id] == 0 {
                            running -= 1;
                            break;
                        }
                        // Single-threaded: taking the index and the first poll (which joins the
                        // batch to the open round) happen with no other task in between.
                        let (future, guard) = self.start(id);
                        drop(guard);
                        futures[id] = Some(future);
                        left[id] -= 1;
                    }
                    let future = futures[id].as_mut().expect("set above");
                    match Pin::new(future).poll(&mut cx) {
                        Poll::Ready(result) => {
                            result.expect("append");
                            self.appended.fetch_add(count, Ordering::Relaxed);
                            futures[id] = None;
                        }
                        Poll::Pending => {
                            // Only where tasks share groups can a batch left out of a full
                            // round be overtaken by a later one of its group.
                            if self.shape.groups < producers {
                                assert!(
                                    futures[id].as_ref().expect("set").joined(),
                                    "a full round would let tasks sharing a group reorder"
                                );
                            }
                            break;
                        }
                    }
                }
            }
        }
    }
}

struct ReadyQueue {
    ids: Mutex<Vec<usize>>,
    thread: std::thread::Thread,
}

struct TaskWaker {
    id: usize,
    ready: Arc<ReadyQueue>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.ids.lock().expect("ready queue").push(self.id);
        self.ready.thread.unpark();
    }
}

/// Polls `future` until its batch has joined a round (while `guard` keeps other producers of the
/// group out), then waits for it with the lock released. Polled with a no-op waker: the loop
/// yields rather than sleeps, and a waker registered in the round would be unparked by the
/// writer on top of `wait`'s shared wake-up.
fn enqueue_then_wait(mut future: AppendFuture, guard: MutexGuard<'_, u64>) -> Result<(), WalError> {
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(result) = Pin::new(&mut future).poll(&mut cx) {
            return result;
        }
        // Joined a round: the group's order is settled. Until then the open round was full.
        if future.joined() {
            break;
        }
        std::thread::yield_now();
    }
    drop(guard);
    future.wait()
}

impl WalLoad {
    /// Opens a log in `dir` with `config` and starts `shape.producers` producers.
    pub fn open(dir: &std::path::Path, config: Config, shape: Shape) -> WalLoad {
        let (wal, _) = Wal::open(dir, config).expect("opening the log");
        WalLoad::new(Arc::new(wal), shape)
    }

    /// Starts `shape.producers` producers on `wal` (whose groups must be empty).
    pub fn new(wal: Arc<Wal>, shape: Shape) -> WalLoad {
        assert!(shape.groups > 0 && shape.entries_each > 0, "empty shape");
        let appended = Arc::new(AtomicU64::new(0));
        let producers = Arc::new(Producers {
            wal: Arc::clone(&wal),
            shape,
            next: (0..shape.groups).map(|_| Mutex::new(1)).collect(),
            payloads: (0..shape.producers)
                .map(|p| Bytes::from(crate::disk::noise(shape.payload_bytes, p as u64 + 1)))
                .collect(),
            appended: Arc::clone(&appended),
            cursor: (0..shape.producers).map(|_| AtomicU64::new(0)).collect(),
        });
        let work: Arc<Work> = if shape.tasks {
            Arc::new(move |_, appends| producers.run_tasks(appends))
        } else {
            Arc::new(move |producer, appends| {
                for _ in 0..appends {
                    producers.append(producer);
                }
            })
        };
        let threads = if shape.tasks { 1 } else { shape.producers };
        WalLoad { wal, shape, pool: ProducerPool::new(threads, &work), appended }
    }

    /// The workload's shape.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// Every producer performs `appends_each` appends; returns the wall time.
    pub fn run(&self, appends_each: u64) -> Duration {
        self.pool.run(appends_each)
    }

    /// Entries appended so far by the producers.
    pub fn appended(&self) -> u64 {
        self.appended.load(Ordering::Relaxed)
    }
}

/// What a log did over a measured stretch: the difference of two [`Stats`] plus the wall time
/// and the entries the producers appended.
#[derive(Debug, Clone, Copy, Default)]
pub struct Measured {
    /// Entries appended by the producers.
    pub entries: u64,
    /// Wall time the producers ran.
    pub elapsed: Duration,
    /// Rounds written.
    pub rounds: u64,
    /// Record bytes written.
    pub bytes: u64,
    /// fdatasyncs on the write path.
    pub fdatasyncs: u64,
    /// Segment rotations.
    pub rotations: u64,
    /// Rotations that waited for a prepared segment.
    pub rotation_stalls: u64,
    /// Segment files created (pre-written) while measuring.
    pub segments_created: u64,
    /// Groups copied forward.
    pub groups_rewritten: u64,
}

impl Measured {
    /// The difference between `before` and `after`.
    pub fn between(before: &Stats, after: &Stats, entries: u64, elapsed: Duration) -> Measured {
        Measured {
            entries,
            elapsed,
            rounds: after.rounds - before.rounds,
            bytes: after.bytes - before.bytes,
            fdatasyncs: after.fdatasyncs - before.fdatasyncs,
            rotations: after.rotations - before.rotations,
            rotation_stalls: after.rotation_stalls - before.rotation_stalls,
            segments_created: after.segments_created - before.segments_created,
            groups_rewritten: after.groups_rewritten - before.groups_rewritten,
        }
    }

    /// Entries per second.
    pub fn entries_per_second(&self) -> f64 {
        crate::rate(self.entries as f64, self.elapsed)
    }

    /// Record bytes per second.
    pub fn bytes_per_second(&self) -> f64 {
        crate::rate(self.bytes as f64, self.elapsed)
    }

    /// fdatasyncs per second.
    pub fn fdatasyncs_per_second(&self) -> f64 {
        crate::rate(self.fdatasyncs as f64, self.elapsed)
    }

    /// Entries per fdatasync.
    pub fn entries_per_fdatasync(&self) -> f64 {
        self.entries as f64 / self.fdatasyncs.max(1) as f64
    }

    /// Record bytes per fdatasync.
    pub fn bytes_per_fdatasync(&self) -> f64 {
        self.bytes as f64 / self.fdatasyncs.max(1) as f64
    }

    /// fdatasyncs per round (1.0 when every round was synced exactly once).
    pub fn fdatasyncs_per_round(&self) -> f64 {
        self.fdatasyncs as f64 / self.rounds.max(1) as f64
    }
}

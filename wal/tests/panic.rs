//! A panic (a bug, here injected into the storage layer) while a round is written: the round's
//! waiters get an error instead of waiting forever, the log is poisoned so nothing later is
//! acknowledged or left waiting for a writer thread that is gone, and `close` reports it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use flotilla_wal::io::{Storage, StorageFile};
use flotilla_wal::segment::ReadView;
use flotilla_wal::sim::SimStorage;
use flotilla_wal::{Config, GroupId, Wal, WalError, WriteBatch};

/// The simulated disk, whose file writes panic while `armed` is set.
struct PanickyDisk {
    inner: SimStorage,
    armed: Arc<AtomicBool>,
}

struct PanickyFile {
    inner: Arc<dyn StorageFile>,
    armed: Arc<AtomicBool>,
}

impl StorageFile for PanickyFile {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        assert!(!self.armed.load(Ordering::SeqCst), "injected: a bug in a round's write");
        self.inner.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
    fn read_view(self: Arc<Self>) -> std::io::Result<ReadView> {
        Arc::clone(&self.inner).read_view()
    }
    fn as_std(&self) -> Option<&std::fs::File> {
        self.inner.as_std()
    }
}

impl PanickyDisk {
    fn wrap(&self, file: Arc<dyn StorageFile>) -> Arc<dyn StorageFile> {
        Arc::new(PanickyFile { inner: file, armed: Arc::clone(&self.armed) })
    }
}

impl Storage for PanickyDisk {
    fn list(&self) -> std::io::Result<Vec<String>> {
        self.inner.list()
    }
    fn open(&self, name: &str) -> std::io::Result<Arc<dyn StorageFile>> {
        Ok(self.wrap(self.inner.open(name)?))
    }
    fn create_prewritten(&self, name: &str, len: u64) -> std::io::Result<Arc<dyn StorageFile>> {
        Ok(self.wrap(self.inner.create_prewritten(name, len)?))
    }
    fn rename(&self, from: &str, to: &str) -> std::io::Result<()> {
        self.inner.rename(from, to)
    }
    fn remove(&self, name: &str) -> std::io::Result<()> {
        self.inner.remove(name)
    }
    fn sync_dir(&self) -> std::io::Result<()> {
        self.inner.sync_dir()
    }
    fn lock(&self) -> std::io::Result<()> {
        self.inner.lock()
    }
    fn unlock(&self) {
        self.inner.unlock();
    }
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}

fn open(config: Config) -> (Arc<Wal>, Arc<AtomicBool>) {
    let armed = Arc::new(AtomicBool::new(false));
    let disk = PanickyDisk { inner: SimStorage::new(), armed: Arc::clone(&armed) };
    let (wal, _) = Wal::open_with(Arc::new(disk), config).unwrap();
    (Arc::new(wal), armed)
}

fn batch(group: u64, index: u64) -> WriteBatch {
    let mut batch = WriteBatch::new();
    batch.add_entries(GroupId(group), index, [(1, Bytes::from_static(b"entry"))]);
    batch
}

fn is_panic_poison(result: &Result<(), WalError>) -> bool {
    matches!(result, Err(WalError::Poisoned { op: "writing a round", .. }))
}

/// Runs `close` on another thread: it must return, with the poison.
fn close_reports_the_poison(wal: Arc<Wal>) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(Arc::into_inner(wal).expect("no other handle").close()));
    let result = rx.recv_timeout(Duration::from_secs(30)).expect("close hung");
    assert!(is_panic_poison(&result), "{result:?}");
}

/// The writer thread panics writing a round that several threads wait for (the batching delay
/// keeps the first of them from writing its own round): each gets the error, later appends are
/// refused at once, `close` returns the poison.
#[test]
fn a_panic_on_the_writer_thread_fails_the_round_and_poisons_the_log() {
    let config = Config {
        segment_bytes: 1 << 20,
        batch_bytes_max: 64 << 10,
        batch_delay_us_max: 20_000,
        ..Config::default()
    };
    let (wal, armed) = open(config);
    wal.append_blocking(batch(1, 1)).unwrap();
    armed.store(true, Ordering::SeqCst);
    let threads = 4u64;
    let (tx, rx) = std::sync::mpsc::channel();
    let appenders: Vec<_> = (0..threads)
        .map(|t| {
            let (wal, tx) = (Arc::clone(&wal), tx.clone());
            std::thread::spawn(move || tx.send(wal.append_blocking(batch(10 + t, 1))))
        })
        .collect();
    for _ in 0..threads {
        let result = rx.recv_timeout(Duration::from_secs(30)).expect("a waiter was left waiting");
        assert!(is_panic_poison(&result), "{result:?}");
    }
    for appender in appenders {
        appender.join().unwrap().unwrap();
    }
    armed.store(false, Ordering::SeqCst);
    let later = wal.append_blocking(batch(1, 2));
    assert!(is_panic_poison(&later), "{later:?}");
    close_reports_the_poison(wal);
}

/// An appending thread writing its own round on an idle log panics: the panic reaches that
/// caller, and the log is poisoned for everyone after it.
#[test]
fn a_panic_writing_a_callers_own_round_poisons_the_log() {
    let (wal, armed) =
        open(Config { segment_bytes: 1 << 20, batch_bytes_max: 64 << 10, ..Config::default() });
    wal.append_blocking(batch(1, 1)).unwrap();
    assert_eq!(wal.stats().rounds_inline, 1, "the idle log is written by its caller");
    armed.store(true, Ordering::SeqCst);
    let unwound =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| wal.append_blocking(batch(1, 2))));
    assert!(unwound.is_err(), "the caller's own write did not panic: {unwound:?}");
    armed.store(false, Ordering::SeqCst);
    let later = wal.append_blocking(batch(2, 1));
    assert!(is_panic_poison(&later), "{later:?}");
    close_reports_the_poison(wal);
}

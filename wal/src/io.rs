//! Storage and IO backends.
//!
//! The log reaches the disk only through two small traits, [`Storage`] (a directory) and
//! [`StorageFile`] (one file), so that every IO step can be simulated, crashed and failed in tests
//! ([`crate::sim::SimStorage`]). The hot path — one write and one fdatasync per group-commit round —
//! goes through a [`Backend`]: the fdatasync through io_uring where the kernel allows it (so it
//! runs while the writer finishes the previous round), or plain `fdatasync` on the log's writer
//! thread otherwise.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::segment::ReadView;

/// One file of a [`Storage`].
#[expect(clippy::len_without_is_empty, reason = "files here are never empty")]
pub trait StorageFile: Send + Sync + 'static {
    /// The file's length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// A read-only view of the whole file to slice payloads from.
    fn read_view(self: Arc<Self>) -> io::Result<ReadView>;
    /// The real file, for backends that submit IO themselves (io_uring); `None` when simulated.
    fn as_std(&self) -> Option<&File>;
}

/// A directory of files.
pub trait Storage: Send + Sync + 'static {
    /// Names of the files in the directory.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>>;
    /// Creates a file of exactly `len` bytes whose every byte has been written (zeros) and synced,
    /// so later writes into it never extend the file or allocate blocks. Fails if it exists.
    fn create_prewritten(&self, name: &str, len: u64) -> io::Result<Arc<dyn StorageFile>>;
    /// Atomically renames a file (durable after [`Storage::sync_dir`]).
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Removes a file (durable after [`Storage::sync_dir`]).
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes creations, renames and removals durable.
    fn sync_dir(&self) -> io::Result<()>;
    /// Takes an exclusive lock on the directory for as long as this value lives, failing at once
    /// with [`io::ErrorKind::WouldBlock`] if another process (or another open log) holds it.
    fn lock(&self) -> io::Result<()>;
    /// Releases the lock taken by [`Storage::lock`].
    fn unlock(&self);
    /// A short name for logs and stats (`"dir"`, `"sim"`).
    fn kind(&self) -> &'static str;
}

/// A real directory on a local filesystem.
#[derive(Debug)]
pub struct DirStorage {
    path: PathBuf,
    lock: parking_lot::Mutex<Option<File>>,
}

impl DirStorage {
    /// Uses (and creates if needed) the directory at `path`.
    pub fn new(path: impl AsRef<Path>) -> io::Result<DirStorage> {
        let path = path.as_ref().to_path_buf();
        std::fs::create_dir_all(&path)?;
        Ok(DirStorage { path, lock: parking_lot::Mutex::new(None) })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A real file.
#[derive(Debug)]
struct DirFile {
    file: File,
}

impl StorageFile for DirFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn read_view(self: Arc<Self>) -> io::Result<ReadView> {
        // SAFETY: the map is read-only and shared; the log never truncates a segment file (they
        // have a fixed size for life), never writes through the map, and rewrites a file in place
        // only once no slice of its map is alive (see `ReadView`), so the mapped bytes a reader
        // holds never change under it. Other processes are kept out by the directory lock.
        let map = unsafe { memmap2::MmapOptions::new().map(&self.file)? };
        let token = Arc::new(());
        let alive = Arc::downgrade(&token);
        let bytes = Bytes::from_owner(MapOwner { map, _token: token });
        Ok(ReadView::Mapped { bytes, alive })
    }

    fn as_std(&self) -> Option<&File> {
        Some(&self.file)
    }
}

/// Owns a map for [`Bytes::from_owner`]; the token's liveness tells when every slice is gone.
struct MapOwner {
    map: memmap2::Mmap,
    _token: Arc<()>,
}

impl AsRef<[u8]> for MapOwner {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

const ZERO_CHUNK_BYTES: usize = 1 << 20;

impl Storage for DirStorage {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.path)? {
            let entry = entry?;
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new().read(true).write(true).open(self.path.join(name))?;
        Ok(Arc::new(DirFile { file }))
    }

    fn create_prewritten(&self, name: &str, len: u64) -> io::Result<Arc<dyn StorageFile>> {
        let path = self.path.join(name);
        let file =
            OpenOptions::new().read(true).write(true).create_new(true).mode(0o644).open(&path)?;
        let result = prewrite(&file, len);
        if let Err(error) = result {
            drop(file);
            // Best effort: a half-written spare is useless, and on ENOSPC its blocks are wanted.
            let _ = std::fs::remove_file(&path);
            return Err(error);
        }
        Ok(Arc::new(DirFile { file }))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.path.join(from), self.path.join(to))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.path.join(name))
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.path)?.sync_all()
    }

    fn lock(&self) -> io::Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.path.join("LOCK"))?;
        match file.try_lock() {
            Ok(()) => {
                *self.lock.lock() = Some(file);
                Ok(())
            }
            Err(std::fs::TryLockError::WouldBlock) => Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is locked by another process or log", self.path.display()),
            )),
            Err(std::fs::TryLockError::Error(error)) => Err(error),
        }
    }

    fn unlock(&self) {
        self.lock.lock().take();
    }

    fn kind(&self) -> &'static str {
        "dir"
    }
}

/// Reserves and writes every byte of a new file, then syncs it: ext4 commits metadata on the first
/// fdatasync after writing into unwritten extents, so `fallocate` alone does not make the hot path
/// cheap — measured in BENCHMARKS.md; pre-written files give 1.3–1.8× per sync.
fn prewrite(file: &File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let len_i64 = i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: plain syscall on a file descriptor we own; no memory is passed.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len_i64) };
    if rc != 0 && rc != libc::EOPNOTSUPP && rc != libc::EINVAL {
        return Err(io::Error::from_raw_os_error(rc));
    }
    let zeros = vec![0u8; ZERO_CHUNK_BYTES];
    let mut offset = 0u64;
    while offset < len {
        let chunk = (len - offset).min(ZERO_CHUNK_BYTES as u64) as usize;
        file.write_all_at(&zeros[..chunk], offset)?;
        offset += chunk as u64;
    }
    file.sync_all()
}

/// Which IO backend performs the log's writes and syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Backend {
    /// Probe io_uring at open and use it if it works, else fall back to [`Backend::Portable`].
    Auto,
    /// fdatasync through io_uring, overlapping the previous round's completion (an idle round is
    /// synced on the writer thread); opening fails if io_uring is unavailable.
    IoUring,
    /// `pwrite` + `fdatasync` on the log's writer thread: works everywhere.
    Portable,
}

/// The environment variable that overrides [`crate::Config::backend`]: `io_uring`, `portable` or
/// `auto`.
pub const BACKEND_ENV: &str = "FLOTILLA_WAL_BACKEND";

impl Backend {
    /// Parses `auto`, `io_uring` (or `uring`) and `portable`.
    pub fn parse(text: &str) -> Option<Backend> {
        match text.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(Backend::Auto),
            "io_uring" | "iouring" | "uring" => Some(Backend::IoUring),
            "portable" | "blocking" => Some(Backend::Portable),
            _ => None,
        }
    }

    /// The configured choice, overridden by [`BACKEND_ENV`] when that is set to a valid value.
    #[must_use]
    pub fn from_env_or(self) -> Backend {
        std::env::var(BACKEND_ENV).ok().and_then(|value| Backend::parse(&value)).unwrap_or(self)
    }
}

/// The backend a log actually uses, as reported by [`crate::Wal::backend`] and its stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ActiveBackend {
    /// fdatasync through io_uring.
    IoUring,
    /// `pwrite` + `fdatasync`.
    Portable,
    /// The simulated disk (every operation through [`StorageFile`]).
    Simulated,
}

impl ActiveBackend {
    /// A short name for logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            ActiveBackend::IoUring => "io_uring",
            ActiveBackend::Portable => "portable",
            ActiveBackend::Simulated => "simulated",
        }
    }
}

/// Why io_uring cannot be used here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("io_uring unavailable: {reason}")]
pub struct ProbeError {
    /// What failed: ring creation (seccomp, `io_uring_disabled`, old kernel) or a missing opcode.
    pub reason: String,
}

/// Checks, without panicking, that io_uring works here as the log uses it: a ring of the
/// writer's size can be created, supports the one opcode the log submits (fsync, with the
/// datasync flag), and takes a submission (a no-op through `io_uring_enter`). A blocked
/// io_uring (seccomp, `io_uring_disabled`, an old kernel) is an error here, never a panic.
pub fn probe_io_uring() -> Result<(), ProbeError> {
    open_ring().map(drop)
}

/// The probe of [`probe_io_uring`], keeping the ring: `Wal::open` hands the very ring that
/// passed it to the writer thread, so nothing about io_uring can fail after the choice.
pub(crate) fn open_ring() -> Result<io_uring::IoUring, ProbeError> {
    let fail = |what: &str, error: io::Error| ProbeError { reason: format!("{what}: {error}") };
    let mut ring =
        io_uring::IoUring::new(RING_ENTRIES).map_err(|e| fail("cannot create a ring", e))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|e| fail("cannot probe opcodes", e))?;
    if !probe.is_supported(io_uring::opcode::Fsync::CODE) {
        return Err(ProbeError { reason: "opcode fsync not supported".to_owned() });
    }
    // Some filters allow setting a ring up but refuse `io_uring_enter`: found here, the log
    // falls back (or `Backend::IoUring` fails to open) instead of poisoning itself on its first
    // durable append.
    let nop = io_uring::opcode::Nop::new().build();
    // SAFETY: a no-op refers to no memory and no descriptor.
    if unsafe { ring.submission().push(&nop) }.is_err() {
        return Err(ProbeError { reason: "a fresh ring's submission queue is full".to_owned() });
    }
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => break,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(fail("cannot submit", error)),
        }
    }
    let result = ring.completion().next().map(|completion| completion.result());
    match result {
        Some(result) if result >= 0 => Ok(ring),
        Some(result) => Err(fail("a no-op failed", io::Error::from_raw_os_error(-result))),
        None => Err(ProbeError { reason: "a no-op did not complete".to_owned() }),
    }
}

/// Entries in the writer's ring: it never has more than one fdatasync in flight.
const RING_ENTRIES: u32 = 8;

/// Performs the fdatasyncs of the write path. Round writes are always a plain `pwrite` through
/// [`StorageFile`]: a buffered write submitted through io_uring is punted by ext4 to an io-wq
/// worker thread, one thread hop per round for a memory copy (`bench/RESULTS.md`, T5 unsynced).
/// What io_uring buys is an fdatasync that runs while the writer thread finishes the previous
/// round — index update, producers' wake-ups, garbage collection (`Shared::writer_loop`). A
/// round with nothing to overlap (idle log) is synced with a plain `fdatasync` on the writer
/// thread instead: the ring's completion would cost it a thread hop (~30 µs measured).
pub(crate) enum Syncer {
    /// `fdatasync` on the calling thread: a sync is done when [`Syncer::start`] returns (the
    /// portable backend, the inline writer, and appending threads writing their own round).
    Blocking,
    /// The simulated disk on the writer thread: a sync is performed only when waited for, so
    /// what the writer does meanwhile (the previous round's garbage collection: renames,
    /// unlinks, directory syncs) comes before it, the latest a real asynchronous sync can end,
    /// and the simulated disk's crash tests see that order of operations. (An idle round, and
    /// rotation's and the seal's syncs of unsynced rounds, call `sync_data` directly on every
    /// backend.)
    Deferred(Option<Arc<dyn StorageFile>>),
    /// An fdatasync submitted to the writer thread's own io_uring ring.
    IoUring(Box<UringSyncer>),
}

/// How [`Syncer::start`] went.
pub(crate) enum SyncStart {
    /// Finished already (blocking syncer), or failed to start.
    Done(io::Result<()>),
    /// In flight: [`Syncer::wait`] returns its result.
    InFlight,
}

/// The writer thread's ring, and the file of the fdatasync in flight (held so its descriptor
/// stays open until the completion is reaped).
pub(crate) struct UringSyncer {
    ring: io_uring::IoUring,
    in_flight: Option<Arc<dyn StorageFile>>,
}

impl Syncer {
    /// The io_uring syncer, on a ring that passed [`open_ring`].
    pub(crate) fn io_uring(ring: io_uring::IoUring) -> Syncer {
        Syncer::IoUring(Box::new(UringSyncer { ring, in_flight: None }))
    }

    /// Starts an fdatasync of `file`. At most one may be in flight: the caller waits for the
    /// previous one first.
    pub(crate) fn start(&mut self, file: &Arc<dyn StorageFile>) -> SyncStart {
        match self {
            Syncer::Blocking => SyncStart::Done(file.sync_data()),
            Syncer::Deferred(pending) => {
                debug_assert!(pending.is_none(), "one fdatasync in flight at a time");
                *pending = Some(Arc::clone(file));
                SyncStart::InFlight
            }
            Syncer::IoUring(uring) => uring.start(file),
        }
    }

    /// Waits for the fdatasync in flight, if any, and returns its result. A failed sync is never
    /// retried: the caller poisons the log.
    pub(crate) fn wait(&mut self) -> io::Result<()> {
        match self {
            Syncer::Blocking => Ok(()),
            Syncer::Deferred(pending) => pending.take().map_or(Ok(()), |file| file.sync_data()),
            Syncer::IoUring(uring) => uring.wait(),
        }
    }

    /// Starts an fdatasync and waits for it.
    pub(crate) fn sync_now(&mut self, file: &Arc<dyn StorageFile>) -> io::Result<()> {
        match self.start(file) {
            SyncStart::Done(result) => result,
            SyncStart::InFlight => self.wait(),
        }
    }
}

impl UringSyncer {
    fn start(&mut self, file: &Arc<dyn StorageFile>) -> SyncStart {
        use io_uring::{opcode, types};
        use std::os::fd::AsRawFd;
        debug_assert!(self.in_flight.is_none(), "one fdatasync in flight at a time");
        let Some(std_file) = file.as_std() else {
            return SyncStart::Done(Err(io::Error::other("io_uring backend needs a real file")));
        };
        let entry = opcode::Fsync::new(types::Fd(std_file.as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        // SAFETY: an fsync reads and writes no memory of ours, and its descriptor stays open
        // until the kernel has taken its file: `in_flight` holds it until the completion is
        // reaped (or, if the wait fails, until the syncer is dropped with its ring; the kernel
        // resolved the descriptor at submission, so a reused number is never synced).
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            return SyncStart::Done(Err(io::Error::other("io_uring submission queue full")));
        }
        // Kept even if the submission fails: the entry may still sit in the queue, and the log
        // is poisoned then, so no other sync is started on this ring.
        self.in_flight = Some(Arc::clone(file));
        match self.ring.submit() {
            Ok(_) => SyncStart::InFlight,
            Err(error) => SyncStart::Done(Err(error)),
        }
    }

    fn wait(&mut self) -> io::Result<()> {
        if self.in_flight.is_none() {
            return Ok(());
        }
        loop {
            if let Some(completion) = self.ring.completion().next() {
                self.in_flight = None;
                let result = completion.result();
                return if result < 0 {
                    Err(io::Error::from_raw_os_error(-result))
                } else {
                    Ok(())
                };
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                // The wait was interrupted, not the sync: wait again.
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
    }
}

/// Whether an IO error means the disk (or quota) is full.
pub(crate) fn is_disk_full(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
        || error.kind() == io::ErrorKind::StorageFull
}

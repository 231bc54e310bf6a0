//! The disk's own limits, measured in the same run as the log they judge: `pwrite` + `fdatasync`
//! into a pre-written file at a given number of bytes per sync, the latency of one such sync, and
//! the sequential read rate of a set of files with their pages dropped from the cache first.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// `statfs` magic of tmpfs: a benchmark directory there would measure memory, not the disk.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// A fresh temporary directory on the work disk (`FLOTILLA_BENCH_DIR`, else the system temporary
/// directory), never on tmpfs: the log and its references must hit the same real disk.
pub fn bench_dir(tag: &str) -> tempfile::TempDir {
    let root =
        std::env::var_os("FLOTILLA_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    std::fs::create_dir_all(&root).expect("creating the benchmark root");
    assert!(
        !is_tmpfs(&root),
        "{} is tmpfs: set FLOTILLA_BENCH_DIR to a directory on a real disk",
        root.display()
    );
    tempfile::Builder::new()
        .prefix(&format!("flotilla-bench-{tag}-"))
        .tempdir_in(&root)
        .expect("creating a benchmark directory")
}

fn is_tmpfs(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `statfs` only writes into the zeroed struct we pass; the path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; both pointers are valid for the call.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &raw mut stat) };
    #[expect(clippy::useless_conversion, reason = "f_type's width differs between targets")]
    let kind = i64::from(stat.f_type);
    rc == 0 && kind == TMPFS_MAGIC
}

/// A file whose every byte was written (zeros) and synced before use, so writes into it never
/// allocate blocks or extend it: the same footing as the log's pre-written segments.
#[derive(Debug)]
pub struct PrewrittenFile {
    file: File,
    len: u64,
    offset: u64,
}

impl PrewrittenFile {
    /// Creates `path` with `len` zero bytes, synced.
    pub fn create(path: &Path, len: u64) -> io::Result<PrewrittenFile> {
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        let zeros = vec![0u8; 1 << 20];
        let mut offset = 0u64;
        while offset < len {
            let chunk = (len - offset).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..chunk], offset)?;
            offset += chunk as u64;
        }
        file.sync_all()?;
        Ok(PrewrittenFile { file, len, offset: 0 })
    }

    /// Writes `buf` at the next offset (wrapping to the start when it would pass the end), then
    /// fdatasyncs.
    pub fn write_sync(&mut self, buf: &[u8]) -> io::Result<()> {
        assert!(buf.len() as u64 <= self.len, "a write larger than the file");
        if self.offset + buf.len() as u64 > self.len {
            self.offset = 0;
        }
        self.file.write_all_at(buf, self.offset)?;
        self.offset += buf.len() as u64;
        self.file.sync_data()
    }

    /// Writes `bytes_per_sync` bytes + fdatasync, back to back, for `duration` (at least 8 times).
    pub fn write_sync_rate(&mut self, bytes_per_sync: usize, duration: Duration) -> RawRate {
        let buf = noise(bytes_per_sync.max(1), 0x5EED);
        let started = Instant::now();
        let mut syncs = 0u64;
        while syncs < 8 || started.elapsed() < duration {
            self.write_sync(&buf).expect("raw write + fdatasync");
            syncs += 1;
        }
        RawRate { bytes_per_sync: buf.len(), syncs, elapsed: started.elapsed() }
    }

    /// Writes `bytes` + fdatasync `samples` times, recording each latency in nanoseconds.
    pub fn write_sync_latency(
        &mut self,
        bytes: usize,
        samples: u64,
        histogram: &mut Histogram<u64>,
    ) {
        let buf = noise(bytes, 0x1A7E);
        for _ in 0..samples {
            let started = Instant::now();
            self.write_sync(&buf).expect("raw write + fdatasync");
            histogram.saturating_record(started.elapsed().as_nanos() as u64);
        }
    }
}

/// Several threads, each with its own [`PrewrittenFile`] in one directory, doing one 4 KiB
/// write + fdatasync at the same moment: what a write to a three-node cluster whose nodes share
/// one disk waits for (the leader and both followers sync at once, and a commit needs two of
/// them). On the shared VM disk concurrent fdatasyncs queue behind each other.
pub struct ConcurrentSyncs {
    start: std::sync::Arc<std::sync::Barrier>,
    done: std::sync::Arc<std::sync::Barrier>,
    took: std::sync::Arc<std::sync::Mutex<Vec<Duration>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ConcurrentSyncs {
    /// `count` threads with a pre-written 8 MiB file each under `dir`.
    pub fn start(dir: &Path, count: usize) -> io::Result<ConcurrentSyncs> {
        use std::sync::{Arc, Barrier, Mutex, atomic::AtomicBool};
        let start = Arc::new(Barrier::new(count + 1));
        let done = Arc::new(Barrier::new(count + 1));
        let took = Arc::new(Mutex::new(Vec::with_capacity(count)));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for index in 0..count {
            let mut file = PrewrittenFile::create(&dir.join(format!("sync-{index}")), 8 << 20)?;
            let (start, done, took, stop) =
                (Arc::clone(&start), Arc::clone(&done), Arc::clone(&took), Arc::clone(&stop));
            threads.push(std::thread::spawn(move || {
                let buf = noise(4096, 0xC0C0 + index as u64);
                loop {
                    start.wait();
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    let began = Instant::now();
                    file.write_sync(&buf).expect("raw write + fdatasync");
                    took.lock().expect("not poisoned").push(began.elapsed());
                    done.wait();
                }
            }));
        }
        Ok(ConcurrentSyncs { start, done, took, stop, threads })
    }

    /// One round: every thread writes and syncs at once; returns how long each took, sorted.
    pub fn round(&self) -> Vec<Duration> {
        self.start.wait();
        self.done.wait();
        let mut took = std::mem::take(&mut *self.took.lock().expect("not poisoned"));
        took.sort_unstable();
        took
    }
}

impl Drop for ConcurrentSyncs {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.start.wait();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// What a raw write + fdatasync loop achieved.
#[derive(Debug, Clone, Copy)]
pub struct RawRate {
    /// Bytes written before each fdatasync.
    pub bytes_per_sync: usize,
    /// fdatasyncs performed.
    pub syncs: u64,
    /// Time taken.
    pub elapsed: Duration,
}

impl RawRate {
    /// fdatasyncs per second.
    pub fn syncs_per_second(&self) -> f64 {
        crate::rate(self.syncs as f64, self.elapsed)
    }

    /// Bytes per second.
    pub fn bytes_per_second(&self) -> f64 {
        crate::rate((self.syncs * self.bytes_per_sync as u64) as f64, self.elapsed)
    }
}

/// Incompressible bytes (SplitMix64), so no layer can shortcut them.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Drops `path`'s pages from the page cache (after writing back any dirty ones), so the next read
/// comes from the disk.
pub fn drop_from_cache(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    file.sync_all()?;
    // SAFETY: plain syscall on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(rc)) }
}

/// Reads every file in `paths` front to back with `chunk`-byte reads; returns the bytes read.
pub fn read_sequentially(paths: &[PathBuf], chunk: usize) -> io::Result<u64> {
    let mut buf = vec![0u8; chunk];
    let mut total = 0u64;
    for path in paths {
        let mut file = File::open(path)?;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    Ok(total)
}

/// A latency histogram in nanoseconds (1 µs .. 10 s, 3 significant digits).
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 10_000_000_000, 3).expect("valid bounds")
}

/// `p50 / p99 / p99.9 / max` of a nanosecond histogram, in microseconds.
pub fn percentiles_us(histogram: &Histogram<u64>) -> [f64; 4] {
    [
        histogram.value_at_quantile(0.50) as f64 / 1e3,
        histogram.value_at_quantile(0.99) as f64 / 1e3,
        histogram.value_at_quantile(0.999) as f64 / 1e3,
        histogram.max() as f64 / 1e3,
    ]
}

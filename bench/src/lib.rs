//! Shared helpers for Flotilla's benchmarks: the references every goal is divided by (the raw
//! disk limit for the same access pattern, measured in the same run), a pool of producer threads
//! that drives the log, and small reporting utilities.
//!
//! Every bench target is a criterion `harness = false` binary. Run them with
//! `cargo bench -p flotilla-bench --bench wal` (or `raft_engine`, `recovery`, `raftgroup`,
//! `engine`); `FLOTILLA_BENCH_FULL=1` widens the matrices and sizes;
//! `cargo test -p flotilla-bench --benches` runs every benchmark once, shrunk, so they never rot.

pub mod cluster;
pub mod disk;
pub mod load;

use std::time::Duration;

/// Whether the benchmark binary runs in criterion's test mode (`cargo test --benches`, or
/// `cargo bench -- --test`): then every measurement outside criterion shrinks to a token size.
pub fn quick_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test")
}

/// Whether `FLOTILLA_BENCH_FULL=1` asks for the full matrix and the large sizes.
pub fn full_mode() -> bool {
    std::env::var("FLOTILLA_BENCH_FULL").is_ok_and(|v| v == "1")
}

/// Whether criterion's name filter (the first free argument, a regular expression, as in
/// `cargo bench --bench wal -- 'wal_synced/portable/1024B'`) selects benchmark `id`; used to skip
/// the references and setup of benchmarks the filter leaves out.
pub fn selected(id: &str) -> bool {
    let mut args = std::env::args().skip(1);
    let mut filter = None;
    while let Some(arg) = args.next() {
        if arg.starts_with('-') {
            // Criterion's options that take a value.
            if matches!(
                arg.as_str(),
                "--save-baseline"
                    | "--baseline"
                    | "--baseline-lenient"
                    | "--load-baseline"
                    | "--output-format"
                    | "--plotting-backend"
                    | "--sample-size"
                    | "--warm-up-time"
                    | "--measurement-time"
                    | "--nresamples"
                    | "--noise-threshold"
                    | "--confidence-level"
                    | "--significance-level"
                    | "--profile-time"
                    | "--color"
                    | "--format"
                    | "-c"
                    | "-s"
            ) {
                args.next();
            }
            continue;
        }
        filter = Some(arg);
        break;
    }
    let exact = std::env::args().any(|a| a == "--exact");
    match filter {
        None => true,
        Some(filter) if exact => filter == id,
        Some(filter) => regex::Regex::new(&filter).map_or(true, |re| re.is_match(id)),
    }
}

/// Appends each producer performs in one measured iteration: enough that starting and draining
/// the pool is a small part of it (one or two each in test mode, which only checks the code runs).
pub fn appends_per_producer(producers: usize) -> u64 {
    if quick_mode() { 2 } else { (512 / producers as u64).max(32) }
}

/// CPU time (user + system) used by this process so far, all threads included.
pub fn cpu_time() -> Duration {
    rusage(libc::RUSAGE_SELF)
}

/// CPU time (user + system) used by the calling thread so far. The engine bench's load runs on
/// the thread that calls [`cluster::Cluster::run`], so the process's CPU minus this thread's is
/// what the nodes used.
pub fn thread_cpu_time() -> Duration {
    rusage(libc::RUSAGE_THREAD)
}

fn rusage(who: libc::c_int) -> Duration {
    // SAFETY: `getrusage` only writes into the zeroed struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the pointer is valid for the call.
    let rc = unsafe { libc::getrusage(who, &raw mut usage) };
    assert_eq!(rc, 0, "getrusage");
    let micros = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.unsigned_abs())
            + Duration::from_micros(t.tv_usec.unsigned_abs())
    };
    micros(usage.ru_utime) + micros(usage.ru_stime)
}

/// This process's resident set size in bytes (from `/proc/self/statm`; 0 where unavailable).
pub fn rss_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else { return 0 };
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

/// `per_second` of `count` events in `elapsed`.
pub fn rate(count: f64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 { count / secs } else { 0.0 }
}

/// The median of some figures (the mean of the middle two for an even count; 0 for none).
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 { sorted[mid] } else { f64::midpoint(sorted[mid - 1], sorted[mid]) }
}

/// Formats a byte count per second as MB/s (10^6).
pub fn mb(bytes_per_second: f64) -> String {
    format!("{:.1} MB/s", bytes_per_second / 1e6)
}

/// Formats a byte size with a binary unit.
pub fn size(bytes: f64) -> String {
    if bytes >= f64::from(1u32 << 20) {
        format!("{:.2} MiB", bytes / f64::from(1u32 << 20))
    } else if bytes >= 1024.0 {
        format!("{:.1} KiB", bytes / 1024.0)
    } else {
        format!("{bytes:.0} B")
    }
}

/// Formats a rate with a k/M suffix.
pub fn count(per_second: f64) -> String {
    if per_second >= 1e6 {
        format!("{:.2} M", per_second / 1e6)
    } else if per_second >= 1e3 {
        format!("{:.1} k", per_second / 1e3)
    } else {
        format!("{per_second:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert!((median(&[3.0, 1.0, 2.0]) - 2.0).abs() < 1e-9);
        assert!((median(&[4.0, 1.0, 2.0, 3.0]) - 2.5).abs() < 1e-9);
        assert!(median(&[]).abs() < 1e-9);
    }
}

//! Where io_uring is blocked (Docker's default seccomp profile denies `io_uring_setup`), `Auto`
//! falls back to the portable backend and says so, and a forced `IoUring` is a typed error — no
//! panic. The test installs such a seccomp filter on a thread of its own (threads it spawns, like
//! the log's writer, inherit it).

mod common;

use bytes::Bytes;
use flotilla_wal::{
    ActiveBackend, Backend, Config, GroupId, Wal, WalError, WriteBatch, block_on, probe_io_uring,
};

/// Denies `io_uring_setup` with EPERM on the calling thread, as a seccomp profile would.
fn block_io_uring_setup() {
    use common::{SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO};
    let nr = u32::try_from(libc::SYS_io_uring_setup).unwrap();
    let filter = [
        // Load the syscall number (offset 0 of struct seccomp_data).
        libc::sock_filter { code: 0x20, jt: 0, jf: 0, k: 0 },
        // If it is io_uring_setup, fall through to the deny; else skip it.
        libc::sock_filter { code: 0x15, jt: 0, jf: 1, k: nr },
        libc::sock_filter { code: 0x06, jt: 0, jf: 0, k: SECCOMP_RET_ERRNO | libc::EPERM as u32 },
        libc::sock_filter { code: 0x06, jt: 0, jf: 0, k: SECCOMP_RET_ALLOW },
    ];
    common::install_seccomp_filter(&filter);
}

#[test]
fn blocked_io_uring_falls_back_to_the_portable_backend() {
    std::thread::spawn(|| {
        block_io_uring_setup();
        let error = probe_io_uring().unwrap_err();
        assert!(error.reason.contains("cannot create a ring"), "{error}");

        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            segment_bytes: 1 << 20,
            batch_bytes_max: 64 << 10,
            backend: Backend::IoUring,
            ..Config::default()
        };
        let forced = Wal::open(dir.path(), config.clone());
        assert!(matches!(forced, Err(WalError::IoUringUnavailable(_))), "{forced:?}");

        let (wal, _) = Wal::open(dir.path(), Config { backend: Backend::Auto, ..config }).unwrap();
        assert_eq!(wal.backend(), ActiveBackend::Portable);
        assert_eq!(wal.stats().backend, Some(ActiveBackend::Portable));
        let mut batch = WriteBatch::new();
        batch.add_entries(GroupId(1), 1, [(1, Bytes::from_static(b"still durable"))]);
        block_on(wal.append(batch)).unwrap();
        assert_eq!(wal.entries(GroupId(1), 1..2).unwrap()[0].payload, "still durable");
        wal.close().unwrap();
    })
    .join()
    .unwrap();
}

#[test]
fn backend_names_parse() {
    assert_eq!(Backend::parse("io_uring"), Some(Backend::IoUring));
    assert_eq!(Backend::parse(" Portable "), Some(Backend::Portable));
    assert_eq!(Backend::parse("auto"), Some(Backend::Auto));
    assert_eq!(Backend::parse("epoll"), None);
}

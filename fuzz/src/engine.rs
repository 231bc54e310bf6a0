//! The checks behind the engine's fuzz targets: `transport_frame`, `raft_message`,
//! `snapshot_stream` and `kv_command` (see `README.md`).
//!
//! The checks live in `engine_checks.rs`, which `engine/tests/fuzz_corpus.rs` includes too, to
//! replay the committed corpus through them under `cargo test -p flotilla`. They are
//! self-contained (their own byte [`Cursor`]) because in the test they sit at the crate root and
//! here in a module. The 64 MiB allocation cap is the crate's global allocator
//! ([`crate::CappedAlloc`]); the test installs its own copy of it.

include!("engine_checks.rs");

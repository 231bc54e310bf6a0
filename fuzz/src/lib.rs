//! The checks behind Flotilla's fuzz targets (see `README.md`).
//!
//! The checks live in `wal_checks.rs`, which `wal/tests/fuzz_corpus.rs` includes too, to replay
//! the committed corpus through them under `cargo test`. Inputs are decoded with the small byte
//! [`Cursor`] rather than `arbitrary`'s derive, so that the test needs no dependency the `wal`
//! crate does not already have and reads every corpus file exactly as the fuzzer does.

include!("wal_checks.rs");

/// The checks of the engine's targets (`transport_frame`, `raft_message`, `snapshot_stream`,
/// `kv_command`), in a block of their own shared with `engine/tests/fuzz_corpus.rs`.
pub mod engine;

//! Fuzz target `snapshot_stream`: see `flotilla_fuzz::engine::check_snapshot_stream` and `fuzz/README.md`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::engine::check_snapshot_stream(data));

//! Fuzz target `batch_roundtrip`: see `flotilla_fuzz::check_batch_roundtrip` and `fuzz/README.md`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::check_batch_roundtrip(data));

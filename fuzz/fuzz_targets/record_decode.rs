//! Fuzz target `record_decode`: see `flotilla_fuzz::check_record_decode` and `fuzz/README.md`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::check_record_decode(data));

//! Fuzz target `kv_command`: see `flotilla_fuzz::engine::check_kv_command` and `fuzz/README.md`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::engine::check_kv_command(data));

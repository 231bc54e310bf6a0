//! Fuzz target `raft_message`: see `flotilla_fuzz::engine::check_raft_message` and `fuzz/README.md`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::engine::check_raft_message(data));

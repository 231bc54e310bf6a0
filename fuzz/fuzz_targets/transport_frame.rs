//! Fuzz target `transport_frame`: see `flotilla_fuzz::engine::check_transport_frame` and `fuzz/README.md`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::engine::check_transport_frame(data));

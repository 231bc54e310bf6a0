//! Fuzz target `recover_image`: see `flotilla_fuzz::check_recover_image` and `fuzz/README.md`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::check_recover_image(data));

//! Whole requests through the real warp filter, in memory, against a real store: method,
//! target, token, content type and body from the input. See `src/lib.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| image_replicator_fuzz::check_route(data));

//! The pure request parsers and validators: copy bodies, list queries, tenant ids, statuses,
//! imported token values. See `src/lib.rs` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| image_replicator_fuzz::check_parsers(data));

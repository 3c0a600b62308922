//! Feeds what `codec::decode_received` makes of any input into PostgreSQL through
//! `Store::apply_batch`, the path a consumed message takes: whatever the decoder accepts,
//! the store must commit, and whatever it rejects must commit as a dead letter. Any other
//! outcome (a database error, a panic) is a crash. The first byte picks the input topic,
//! the rest is the message.
//!
//! Needs PostgreSQL: `FUZZ_DATABASE_SERVER` (default
//! `postgres://postgres:postgres@127.0.0.1:5432`); each run makes a database of its own.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    entitlement_worker_fuzz::check_store(data);
});

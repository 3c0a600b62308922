//! Fuzzes `codec::decode(InputKind::WorkspaceUpdated, ..)`: it must never panic nor allocate without
//! bound, and whatever it accepts must satisfy the contract (see `entitlement_worker_fuzz`).
#![no_main]

use entitlement_worker::codec::InputKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    entitlement_worker_fuzz::check_decode(InputKind::WorkspaceUpdated, data);
});

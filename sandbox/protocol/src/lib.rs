//! What the CivicGrid sandbox's host and its Wasm guests share: the output
//! policy a run enforces, the protocol between host and guest (requests,
//! stages, scan predicates, failures), Arrow IPC reading, and on wasm the
//! guest's side of the host imports. It builds for wasm32, which wasmtime
//! does not, so the guests link it without the host.

pub mod ipc;
pub mod policy;
pub mod protocol;

#[cfg(target_family = "wasm")]
pub mod guest;

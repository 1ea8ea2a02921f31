//! The CivicGrid sandbox: consumer SQL and algorithms run in wasmtime with no
//! file system or network, hard limits on fuel, memory and wall time,
//! deterministic metering, and the product's output policy between the query and
//! the released result.
//!
//! Not built yet: see the sandbox issue.

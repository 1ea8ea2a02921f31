//! Guest code that runs inside the CivicGrid sandbox (wasm32-wasip1): the SQL
//! engine over the product's tables, behind the host interface.
//!
//! Not built yet: see the sandbox issue.

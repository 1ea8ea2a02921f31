//! The CivicGrid marketplace: providers register public-data products, enterprises
//! subscribe under contracts and run queries that execute next to the data, and
//! every authorization and use lands in a tamper-evident audit log.
//!
//! Not built yet: see the marketplace issues. The crate exists so the workspace
//! has the layout the architecture names and the binaries have a home.

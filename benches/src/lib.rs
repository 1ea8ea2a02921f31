//! Benchmarks for CivicGrid live in `benches/benches/`; this library holds the
//! workload generators they share.

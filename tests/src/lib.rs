//! CivicGrid's integration and end-to-end tests live in `tests/integration/`
//! (one test binary); this library holds what they share, above all the
//! multi-cluster Kubernetes harness in [`controlplane`].

pub mod controlplane;
pub mod market;
pub mod pool;
pub mod sandbox;
pub mod tpch;

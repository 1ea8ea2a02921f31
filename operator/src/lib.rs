//! The CivicGrid operator: `DataCenter` and `ComputeWorkload` custom resources,
//! a pure placement engine that treats every data center as one compute pool,
//! and the controllers that propagate placements into each data center's own
//! cluster.

//! All of CivicGrid's integration and end-to-end tests, in one test binary so
//! the workspace links it once.

mod controlplane_smoke;
mod crd_validation;
mod data_versions;
mod dependencies;
mod helm_chart;
mod images;
mod leader_election;
mod lineage_property;
mod marketplace;
mod objectstore;
mod operator_e2e;
mod quality_feedback;
mod queries;
mod receipts;
mod red_team;
mod runner;
mod runners_e2e;
mod sandbox;
mod sandbox_split;
mod scale_out;
mod tlog_interop;
mod upgrade;
mod witness;

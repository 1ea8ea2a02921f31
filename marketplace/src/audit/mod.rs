//! The tamper-evident audit log: an RFC 9162 Merkle tree over every
//! authorization, contract, registration and policy change, with checkpoints
//! signed in the C2SP tlog-checkpoint format (the regulator's verifier is
//! `civicgrid_cli::verify`).

pub mod checkpoint;
pub mod log;
pub mod merkle;

/// Most audit entries one `GetEntries` call returns: the server pages by it,
/// and the verifier asks for no more at once.
pub const MAX_ENTRIES_PER_CALL: u64 = 1000;

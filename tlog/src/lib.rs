//! The audit log's formats, in one place for everyone who checks it: the
//! marketplace that writes the log, the regulator's verifier, the consumer's
//! receipt check and the independent witness.
//!
//! - [`merkle`]: RFC 9162 tree hashing and inclusion and consistency proofs.
//! - [`checkpoint`]: C2SP tlog-checkpoint notes signed with Ed25519.
//! - [`cosignature`]: C2SP tlog-cosignature (`cosignature/v1`), what a
//!   witness adds to a checkpoint it found consistent.
//! - [`witness`]: the C2SP tlog-witness `add-checkpoint` request and the
//!   checks a witness makes before it cosigns.
//! - [`key_file`]: a 32-byte Ed25519 seed kept in a file of its own, never in
//!   a database.

pub mod checkpoint;
pub mod cosignature;
pub mod key_file;
pub mod merkle;
pub mod witness;

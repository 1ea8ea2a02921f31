//! What the `civicgrid` command line needs besides the marketplace's API: the
//! regulator's audit-log verifier ([`verify`]) and the sample city that
//! `civicgrid up` serves ([`city`]). The server (`civicgrid-marketplace`)
//! links neither.

pub mod city;
pub mod verify;

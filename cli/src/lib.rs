//! What the `civicgrid` command line needs besides the marketplace's API: the
//! regulator's audit-log verifier and receipt check ([`verify`]), product
//! specs drafted from a data file ([`scaffold`]), the sample city that
//! `civicgrid up` serves ([`city`]) and the runners it runs in the same
//! process ([`local_runners`]). The server (`civicgrid-marketplace`) links
//! none of them.

pub mod city;
pub mod local_runners;
pub mod scaffold;
pub mod verify;

//! DataFusion's planner recurses deeply on nested queries; the default 1 MiB
//! shadow stack of a wasm32 module is too small for it. (The sandbox still
//! bounds the engine's own call stack.)
fn main() {
    if std::env::var("CARGO_CFG_TARGET_FAMILY").as_deref() == Ok("wasm") {
        println!("cargo:rustc-link-arg-cdylib=-zstack-size=8388608");
        // Start with room for a small query's heap. Each `memory.grow` past
        // the initial size is an `mprotect` on the host, and the pool undoes
        // it after the run with another; both take the process's
        // memory-map lock that every other run's page faults wait on.
        println!("cargo:rustc-link-arg-cdylib=--initial-memory=16777216");
    }
}

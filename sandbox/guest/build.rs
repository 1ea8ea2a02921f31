//! DataFusion's planner recurses deeply on nested queries; the default 1 MiB
//! shadow stack of a wasm32 module is too small for it. (The sandbox still
//! bounds the engine's own call stack.)
fn main() {
    if std::env::var("CARGO_CFG_TARGET_FAMILY").as_deref() == Ok("wasm") {
        println!("cargo:rustc-link-arg-cdylib=-zstack-size=8388608");
    }
}

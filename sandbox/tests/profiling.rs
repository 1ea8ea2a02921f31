//! `SandboxConfig::perf_map`: the names `perf` needs to attribute samples in
//! JIT-compiled guest code, written only when asked for.

use std::path::PathBuf;

use civicgrid_sandbox::{GuestRole, Sandbox, SandboxConfig};

/// A guest whose only function carries `name` in the module's name section.
fn named_guest(name: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
            (memory (export "memory") 1)
            (func ${name} (export "civicgrid_run") (result i32) i32.const 0))"#
    ))
    .expect("test guest")
}

fn perf_map_path() -> PathBuf {
    PathBuf::from(format!("/tmp/perf-{}.map", std::process::id()))
}

/// What the process's perf map holds so far; none at all is empty.
fn perf_map() -> String {
    std::fs::read_to_string(perf_map_path()).unwrap_or_default()
}

fn load_named(perf_map: bool, name: &str) {
    let cache = tempfile::tempdir().unwrap();
    let mut config = SandboxConfig::new(cache.path());
    config.perf_map = perf_map;
    let sandbox = Sandbox::new(&config).unwrap();
    sandbox
        .load(&named_guest(name), GuestRole::Algorithm)
        .expect("load");
}

/// One test, in this order, so that the map exists when the unasked-for
/// guest is looked for in it: on its own, a missing map would pass that check
/// without showing anything.
#[test]
fn only_a_sandbox_asked_for_a_perf_map_names_its_guests_functions_in_it() {
    load_named(false, "civicgrid_perf_map_unnamed");
    load_named(true, "civicgrid_perf_map_named");
    let map = perf_map();
    let line = map
        .lines()
        .find(|line| line.contains("civicgrid_perf_map_named"))
        .unwrap_or_else(|| {
            panic!(
                "{} does not name the guest's function",
                perf_map_path().display()
            )
        });
    // perf's format: start address and size in hex, then the name.
    let mut fields = line.split_whitespace();
    let start = fields.next().expect("address");
    let size = fields.next().expect("size");
    assert!(
        u64::from_str_radix(start.trim_start_matches("0x"), 16).is_ok_and(|a| a > 0),
        "{line}"
    );
    assert!(u64::from_str_radix(size, 16).is_ok_and(|s| s > 0), "{line}");
    assert!(
        !map.contains("civicgrid_perf_map_unnamed"),
        "a sandbox not asked for a perf map wrote to it"
    );
    // The map outlives the process: leave nothing behind in /tmp.
    let _ = std::fs::remove_file(perf_map_path());
}

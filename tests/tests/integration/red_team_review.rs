//! Exploration (temporary).
use civicgrid_sandbox::policy::OutputPolicy;

use crate::red_team::{policy, run, table};

fn show(sql: &str, policy: &OutputPolicy) -> String {
    match run(sql, policy) {
        Ok(o) => format!(
            "OK rows={}\n{}",
            o.metering.rows_released,
            table(&o.batches)
        ),
        Err(e) => format!("ERR {e:?}"),
    }
}

#[test]
fn explore() {
    let p = policy();
    let sqls = std::fs::read_to_string("/tmp/rt/queries.sql").unwrap();
    for sql in sqls
        .split(";\n")
        .map(str::trim)
        .filter(|s| !s.is_empty() && !s.starts_with("--"))
    {
        eprintln!("=== {sql}\n{}", show(sql, &p));
    }
}

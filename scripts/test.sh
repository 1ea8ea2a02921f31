#!/usr/bin/env bash
# The whole CivicGrid test suite: set-up, format check, clippy with warnings
# denied, and every test (unit, property, integration on real control planes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

# A run of the suite builds everything once: the incremental caches of the
# workspace's crates would only take several GiB of disk (a CI machine's free
# disk varies from run to run, and a cold run once filled it).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

CIVICGRID_CONTROLPLANE_BIN=$(bash tests/controlplane/build.sh)
export CIVICGRID_CONTROLPLANE_BIN
CIVICGRID_HELM=$(bash tools/helm/build.sh)
export CIVICGRID_HELM
CIVICGRID_VERSITYGW=$(bash tools/versitygw/build.sh)
export CIVICGRID_VERSITYGW
CIVICGRID_UMOCI=$(bash tools/umoci/build.sh)
export CIVICGRID_UMOCI
CIVICGRID_TLOG_REFERENCE=$(bash tools/tlog-reference/build.sh)
export CIVICGRID_TLOG_REFERENCE
CIVICGRID_TEST_POSTGRES_URL=$(bash scripts/postgres.sh)
export CIVICGRID_TEST_POSTGRES_URL
echo "==> Wasm guests (wasm32-wasip1)" >&2
CIVICGRID_GUEST_DIR=$(bash sandbox/build-guests.sh)
export CIVICGRID_GUEST_DIR

echo "==> cargo fmt --check" >&2
cargo fmt --all -- --check

# Clippy lints the workspace's crates while they are compiled for the tests:
# clippy-driver is the compiler for workspace members (what `cargo clippy`
# does, over a `cargo check` of its own). A separate `cargo clippy` would
# type-check every dependency a second time, DataFusion and wasmtime
# included: 13 of CI's 79 minutes. CLIPPY_ARGS is how cargo-clippy hands
# clippy-driver its arguments; the toolchain is pinned, and the probe below
# stops the run if clippy-driver no longer denies a clippy warning this way.
RUSTC_WORKSPACE_WRAPPER="$(rustc --print sysroot)/bin/clippy-driver"
CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
export RUSTC_WORKSPACE_WRAPPER CLIPPY_ARGS
probe_dir=$(mktemp -d)
trap 'rm -rf "$probe_dir"' EXIT
echo 'pub fn probe(bytes: &Vec<u8>) -> usize { bytes.len() }' >"$probe_dir/probe.rs"
if CARGO_PRIMARY_PACKAGE=1 "$RUSTC_WORKSPACE_WRAPPER" rustc --edition 2024 --crate-type lib \
    --out-dir "$probe_dir" "$probe_dir/probe.rs" 2>/dev/null; then
    echo "clippy-driver accepted code clippy denies: CLIPPY_ARGS no longer reaches it" >&2
    exit 1
fi

# Binaries, tests, examples and benchmarks (in test mode) in one build, so
# that the operator binary the e2e tests run and SIGKILL is built with the
# same dependency features as the tests (`cargo build -p civicgrid-operator`
# alone resolves other features and rebuilds serde, tokio and the rest).
echo "==> cargo build, clippy -D warnings on the workspace's crates" >&2
cargo build --workspace --all-targets --locked
CIVICGRID_OPERATOR_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/civicgrid-operator"
export CIVICGRID_OPERATOR_BIN

echo "==> cargo test" >&2
# Not --all-targets: that would run the benchmarks (debug build, minutes) as tests.
cargo test --workspace --lib --bins --tests --examples --locked
# Doc tests: examples in rustdoc must run too.
cargo test --workspace --doc --locked

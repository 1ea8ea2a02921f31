#!/usr/bin/env bash
# The whole CivicGrid test suite: set-up, format check, clippy with warnings
# denied, and every test (unit, property, integration on real control planes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
CIVICGRID_CONTROLPLANE_BIN=$(bash tests/controlplane/build.sh)
export CIVICGRID_CONTROLPLANE_BIN
CIVICGRID_HELM=$(bash tools/helm/build.sh)
export CIVICGRID_HELM
CIVICGRID_TEST_POSTGRES_URL=$(bash scripts/postgres.sh)
export CIVICGRID_TEST_POSTGRES_URL
# The operator e2e tests run and SIGKILL the operator as a process.
echo "==> civicgrid-operator binary" >&2
cargo build -p civicgrid-operator --bin civicgrid-operator --locked
CIVICGRID_OPERATOR_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/civicgrid-operator"
export CIVICGRID_OPERATOR_BIN
echo "==> Wasm guests (wasm32-wasip1)" >&2
CIVICGRID_GUEST_DIR=$(bash sandbox/build-guests.sh)
export CIVICGRID_GUEST_DIR

echo "==> cargo fmt --check" >&2
cargo fmt --all -- --check
echo "==> cargo clippy -D warnings" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test" >&2
# Not --all-targets: that would run the benchmarks (debug build, minutes) as tests.
cargo test --workspace --lib --bins --tests --examples --locked
# Doc tests: examples in rustdoc must run too.
cargo test --workspace --doc --locked

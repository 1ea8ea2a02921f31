#!/usr/bin/env bash
# The whole CivicGrid test suite: set-up, format check, clippy with warnings
# denied, and every test (unit, property, integration on real control planes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The Wasm guests (wasm32-wasip1) share no build with the native workspace,
# and each build leaves a core idle for long stretches on two cores (one big
# crate at a time), so the guests build in the background while the rest of
# the set-up, clippy and the native build run. Cargo locks each profile's
# directory, not the whole target/, so the two builds do not wait on each
# other.
bash scripts/setup.sh --guests-only
guest_log=$(mktemp)
guest_dir_file=$(mktemp)
echo "==> Wasm guests (wasm32-wasip1), in the background" >&2
bash sandbox/build-guests.sh >"$guest_dir_file" 2>"$guest_log" &
guest_build=$!
trap 'pkill -P "$guest_build" 2>/dev/null; kill "$guest_build" 2>/dev/null || true' EXIT

bash scripts/setup.sh
CIVICGRID_CONTROLPLANE_BIN=$(bash tests/controlplane/build.sh)
export CIVICGRID_CONTROLPLANE_BIN
CIVICGRID_HELM=$(bash tools/helm/build.sh)
export CIVICGRID_HELM
CIVICGRID_TEST_POSTGRES_URL=$(bash scripts/postgres.sh)
export CIVICGRID_TEST_POSTGRES_URL

echo "==> cargo fmt --check" >&2
cargo fmt --all -- --check
echo "==> cargo clippy -D warnings" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings

# Binaries, tests and examples in one build, so that the operator binary the
# e2e tests run and SIGKILL is built with the same dependency features as the
# tests (building it alone would rebuild serde, tokio and the rest a second
# time).
echo "==> cargo build (binaries, tests, examples)" >&2
cargo build --workspace --bins --tests --examples --locked
CIVICGRID_OPERATOR_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/civicgrid-operator"
export CIVICGRID_OPERATOR_BIN

echo "==> waiting for the Wasm guests" >&2
if ! wait "$guest_build"; then
    cat "$guest_log" >&2
    echo "the Wasm guest build failed (its output is above)" >&2
    exit 1
fi
trap - EXIT
grep -v '^ *Compiling ' "$guest_log" >&2 || true
CIVICGRID_GUEST_DIR=$(cat "$guest_dir_file")
export CIVICGRID_GUEST_DIR
rm -f "$guest_log" "$guest_dir_file"

echo "==> cargo test" >&2
# Not --all-targets: that would run the benchmarks (debug build, minutes) as tests.
cargo test --workspace --lib --bins --tests --examples --locked
# Doc tests: examples in rustdoc must run too.
cargo test --workspace --doc --locked

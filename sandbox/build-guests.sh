#!/usr/bin/env bash
# Builds the sandbox's Wasm guests into the shared target directory and prints
# the directory holding the .wasm files: the SQL guest, a core module for
# wasm32-wasip1 (needs the packages scripts/setup.sh installs: clang-14 and
# wasi-libc for zstd-sys, a C dependency of Arrow's IPC), and the example
# algorithm, a component of sandbox/wit/algorithm.wit built for
# wasm32-unknown-unknown (see .cargo/config.toml), copied in beside it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --locked --target wasm32-wasip1 --profile guest -p civicgrid-sandbox-guest >&2
cargo build --locked --target wasm32-unknown-unknown --profile guest \
    -p civicgrid-example-algorithm >&2
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
guest_dir="$target_dir/wasm32-wasip1/guest"
cp "$target_dir/wasm32-unknown-unknown/guest/civicgrid_example_algorithm.wasm" "$guest_dir/"
echo "$guest_dir"

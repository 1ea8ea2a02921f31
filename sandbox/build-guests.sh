#!/usr/bin/env bash
# Builds the sandbox's Wasm guests (the SQL guest and the example algorithm)
# for wasm32-wasip1 into the shared target directory and prints the directory
# holding the .wasm files. Needs the packages scripts/setup.sh installs
# (clang-14 and wasi-libc for zstd-sys, a C dependency of Arrow's IPC).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --locked --target wasm32-wasip1 --profile guest \
    -p civicgrid-sandbox-guest -p civicgrid-example-algorithm >&2
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
echo "$target_dir/wasm32-wasip1/guest"

#!/usr/bin/env bash
# The main job on a fresh machine: installs the pinned Rust toolchain and
# clang-14/wasi-libc (scripts/setup.sh --guests-only), builds the sandbox's
# SQL guest (DataFusion for wasm32-wasip1; about half an hour cold on 2 cores,
# seconds afterwards), then runs `civicgrid up`: the marketplace on the
# embedded default — SQLite and Parquet under ./civicgrid-data — seeded with
# the sample city on first start, serving on 127.0.0.1:50051 until stopped.
# Extra arguments go to `civicgrid up` (e.g. --data-dir, --listen).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh --guests-only
echo "==> Wasm guests (wasm32-wasip1)" >&2
guest_dir=$(bash sandbox/build-guests.sh)
echo "==> civicgrid up" >&2
exec cargo run --locked -p civicgrid-cli -- \
    up --sql-guest "$guest_dir/civicgrid_sandbox_guest.wasm" "$@"

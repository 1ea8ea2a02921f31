#!/usr/bin/env bash
# Installs everything CivicGrid's build and tests need on a fresh machine
# (Debian, root or sudo; Go and rustup already present). Idempotent: a second
# run takes seconds. `--guests-only`: just Rust and what the Wasm guests need.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '==> %s\n' "$*" >&2; }

# The toolchain pinned in rust-toolchain.toml, with its components and targets.
toolchain=$(sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)
if ! rustup run "$toolchain" rustc --print target-list >/dev/null 2>&1 ||
    ! rustup target list --installed --toolchain "$toolchain" | grep -qx wasm32-wasip1 ||
    ! rustup target list --installed --toolchain "$toolchain" | grep -qx wasm32-unknown-unknown ||
    ! rustup component list --installed --toolchain "$toolchain" | grep -q '^clippy'; then
    log "installing Rust $toolchain with rustfmt, clippy, wasm32-wasip1 and wasm32-unknown-unknown"
    rustup toolchain install "$toolchain" --profile minimal \
        --component rustfmt --component clippy --target wasm32-wasip1 \
        --target wasm32-unknown-unknown
fi

# The sandbox's SQL guest is built for wasm32-wasip1, and one of its
# dependencies (zstd-sys, under Arrow's IPC) is C: clang-14 and wasi-libc
# compile it (see .cargo/config.toml).
if ! command -v clang-14 >/dev/null || ! command -v llvm-ar-14 >/dev/null ||
    ! dpkg -s wasi-libc libclang-rt-14-dev-wasm32 >/dev/null 2>&1; then
    log "clang-14 and wasi-libc for the Wasm guests"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        clang-14 lld-14 llvm-14 wasi-libc libclang-rt-14-dev-wasm32 >&2
fi

# `scripts/up.sh` needs only the toolchain and the guests' C compiler.
if [ "${1:-}" = "--guests-only" ]; then
    exit 0
fi

command -v go >/dev/null || { echo "Go is required to build the test control planes" >&2; exit 1; }

# Go's build and module caches for Kubernetes and helm come to about 5 GiB and
# are needed only while the binaries below are built (they are cached by
# version on their own): unless the caller chose its own caches, they go into a
# scratch directory beside those binaries (on disk, where /tmp may be memory)
# that is removed when set-up ends.
if [ -z "${GOCACHE:-}" ] && [ -z "${GOMODCACHE:-}" ]; then
    cache_root=${CIVICGRID_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/civicgrid}
    mkdir -p "$cache_root"
    go_scratch=$(mktemp -d "$cache_root/go-scratch.XXXXXX")
    export GOCACHE="$go_scratch/build" GOMODCACHE="$go_scratch/mod"
    # The module cache is read-only by design; `go clean -modcache` knows how
    # to remove it.
    trap 'go clean -modcache >/dev/null 2>&1 || true; rm -rf "$go_scratch"' EXIT
fi

# Real kube-apiserver, etcd, controller-manager, scheduler and kwok, built from
# the Go module proxy into a cache keyed by version.
log "control-plane binaries"
bash tests/controlplane/build.sh >/dev/null

# helm, to lint and render charts/civicgrid (built from the Go module proxy).
log "helm"
bash tools/helm/build.sh >/dev/null

# versitygw, an S3-compatible server over a directory: each data center's
# object store in the tests (built from the Go module proxy).
log "versitygw"
bash tools/versitygw/build.sh >/dev/null

# umoci writes the images' OCI layout (built from the Go module proxy), and
# runc, from Debian's packages, runs them in the tests: no container daemon.
log "umoci and runc"
bash tools/umoci/build.sh >/dev/null
if ! command -v runc >/dev/null; then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq runc >&2
fi

# tlog-reference checks the audit log's formats with the Go reference
# implementations (x/mod's signed notes, transparency-dev's formats and
# merkle; built from the Go module proxy).
log "tlog-reference"
bash tools/tlog-reference/build.sh >/dev/null

# PostgreSQL from Debian's packages, with a cluster of our own for the
# marketplace tests (the same suite runs on SQLite and PostgreSQL).
log "PostgreSQL"
bash scripts/postgres.sh >/dev/null

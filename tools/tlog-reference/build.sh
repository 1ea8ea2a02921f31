#!/usr/bin/env bash
# Builds `tlog-reference` (main.go here) against the Go reference
# implementations of the audit log's formats — golang.org/x/mod/sumdb/note,
# github.com/transparency-dev/formats and github.com/transparency-dev/merkle —
# from the Go module proxy: tests/tests/integration/tlog_interop.rs checks
# CivicGrid's checkpoints, cosignatures and Merkle proofs with it. Cached by
# version and by main.go (go-build.sh keys on go.mod, go.sum and the scripts
# only, so the source's hash goes into the cache directory); prints the path
# of the binary on stdout, progress on stderr.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${CIVICGRID_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/civicgrid}
source_key=$(sha256sum <"$here/main.go" | cut -c1-16)
CIVICGRID_CACHE_DIR="$cache_root/tlog-reference-source/$source_key" \
    exec bash "$here/../go-build.sh" tlog-reference "$here" .

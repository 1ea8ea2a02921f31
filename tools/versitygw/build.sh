#!/usr/bin/env bash
# Builds `versitygw`, the S3-compatible server (Apache-2.0, a POSIX file
# system behind the S3 API) that the tests start as each data center's
# object store, from the Go module proxy. Cached by go.mod, go.sum, this
# script and the Go version; prints the path of the binary on stdout,
# progress on stderr.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${CIVICGRID_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/civicgrid}
export GOFLAGS=-buildvcs=false
key=$( { go version; cat "$here/build.sh" "$here/go.mod" "$here/go.sum"; } | sha256sum | cut -c1-16)
bin="$cache_root/versitygw/$key/versitygw"
if [ -x "$bin" ]; then
    echo "$bin"
    exit 0
fi
scratch="$bin.partial.$$"
mkdir -p "$(dirname "$bin")"
trap 'rm -f "$scratch"' EXIT
start=$(date +%s)
echo "building versitygw into $bin" >&2
(cd "$here" && go build -trimpath -ldflags "-s -w" -o "$scratch" github.com/versity/versitygw/cmd/versitygw) >&2
mv "$scratch" "$bin"
trap - EXIT
echo "versitygw built in $(($(date +%s) - start))s" >&2
echo "$bin"

#!/usr/bin/env bash
# Builds the `helm` binary used to lint and render charts/civicgrid, from the
# Go module proxy (no other way to get helm is allowed on our machines).
# Cached by go.mod, go.sum, this script and the Go version; prints the path
# of the binary on stdout, progress on stderr.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${CIVICGRID_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/civicgrid}
export GOFLAGS=-buildvcs=false
key=$( { go version; cat "$here/build.sh" "$here/go.mod" "$here/go.sum"; } | sha256sum | cut -c1-16)
bin="$cache_root/helm/$key/helm"
if [ -x "$bin" ]; then
    echo "$bin"
    exit 0
fi
scratch="$bin.partial.$$"
mkdir -p "$(dirname "$bin")"
trap 'rm -f "$scratch"' EXIT
start=$(date +%s)
echo "building helm into $bin" >&2
(cd "$here" && go build -trimpath -ldflags "-s -w" -o "$scratch" helm.sh/helm/v3/cmd/helm) >&2
mv "$scratch" "$bin"
trap - EXIT
echo "helm built in $(($(date +%s) - start))s" >&2
echo "$bin"

#!/usr/bin/env bash
# Builds the test control-plane binaries (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kwok) from the Go module proxy.
#
# The binaries land in a cache directory keyed by everything that decides
# their content (go.mod, go.sum, this script, the Go version), so a second run
# with nothing changed returns in well under a second. Prints the bin
# directory on stdout; progress goes to stderr.
#
#   --if-built            print the bin directory if the binaries are built
#                         for this checkout, else exit 3 without building
#   CIVICGRID_CACHE_DIR   cache root (default: ${XDG_CACHE_HOME:-~/.cache}/civicgrid)
set -euo pipefail

if_built=0
[ "${1:-}" = "--if-built" ] && if_built=1

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${CIVICGRID_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/civicgrid}
export GOFLAGS=-buildvcs=false

key=$( {
    go version
    cat "$here/build.sh"
    cat "$here/kubernetes/go.mod" "$here/kubernetes/go.sum"
    cat "$here/kwok/go.mod" "$here/kwok/go.sum"
} | sha256sum | cut -c1-16)
bin="$cache_root/controlplane/$key/bin"

binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)
complete=1
for b in "${binaries[@]}"; do [ -x "$bin/$b" ] || complete=0; done
if [ "$complete" = 1 ]; then
    echo "$bin"
    exit 0
fi
if [ "$if_built" = 1 ]; then
    echo "no complete build in $bin" >&2
    exit 3
fi

# Build into a scratch directory and rename at the end, so an interrupted
# build never leaves a half-filled bin directory that looks complete.
scratch="$cache_root/controlplane/$key/bin.partial.$$"
rm -rf "$scratch"
mkdir -p "$scratch"
trap 'rm -rf "$scratch"' EXIT

start=$(date +%s)
echo "building control-plane binaries into $bin (takes several minutes cold)" >&2
# -trimpath and stripped symbols keep the binaries small; they are test tools.
ldflags="-s -w"
(cd "$here/kubernetes" &&
    go build -trimpath -ldflags "$ldflags" -o "$scratch/etcd" go.etcd.io/etcd/server/v3 &&
    go build -trimpath -ldflags "$ldflags" -o "$scratch/" \
        k8s.io/kubernetes/cmd/kube-apiserver \
        k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler) >&2
(cd "$here/kwok" && go build -trimpath -ldflags "$ldflags" -o "$scratch/kwok" sigs.k8s.io/kwok/cmd/kwok) >&2

mkdir -p "$(dirname "$bin")"
rm -rf "$bin"
mv "$scratch" "$bin"
trap - EXIT
echo "control-plane binaries built in $(($(date +%s) - start))s" >&2
echo "$bin"

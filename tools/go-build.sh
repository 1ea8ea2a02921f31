#!/usr/bin/env bash
# Builds one Go command from the Go module proxy into a cache keyed by its
# module (go.mod, go.sum), the calling script, this script and the Go
# version; prints the binary's path on stdout, progress on stderr.
# Usage: go-build.sh NAME MODULE_DIR PACKAGE
set -euo pipefail
name=$1 module_dir=$2 package=$3
cache_root=${CIVICGRID_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/civicgrid}
export GOFLAGS=-buildvcs=false
key=$( { go version; cat "${BASH_SOURCE[0]}" "$module_dir/build.sh" "$module_dir/go.mod" "$module_dir/go.sum"; } |
    sha256sum | cut -c1-16)
bin="$cache_root/$name/$key/$name"
if [ -x "$bin" ]; then
    echo "$bin"
    exit 0
fi
scratch="$bin.partial.$$"
mkdir -p "$(dirname "$bin")"
trap 'rm -f "$scratch"' EXIT
start=$(date +%s)
echo "building $name into $bin" >&2
(cd "$module_dir" && go build -trimpath -ldflags "-s -w" -o "$scratch" "$package") >&2
mv "$scratch" "$bin"
trap - EXIT
echo "$name built in $(($(date +%s) - start))s" >&2
echo "$bin"

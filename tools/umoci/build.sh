#!/usr/bin/env bash
# Builds `umoci` (Apache-2.0, the Open Container Initiative's own tool for
# OCI image layouts) from the Go module proxy: scripts/build-images.sh
# assembles CivicGrid's images with it, with no container daemon. Cached by
# version; prints the path of the binary on stdout, progress on stderr.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/../go-build.sh" umoci "$here" github.com/opencontainers/umoci/cmd/umoci

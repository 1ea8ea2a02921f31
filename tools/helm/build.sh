#!/usr/bin/env bash
# Builds the `helm` binary used to lint and render charts/civicgrid, from the
# Go module proxy (no other way to get helm is allowed on our machines).
# Cached by version; prints the path of the binary on stdout, progress on
# stderr.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/../go-build.sh" helm "$here" helm.sh/helm/v3/cmd/helm

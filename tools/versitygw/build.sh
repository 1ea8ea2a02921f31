#!/usr/bin/env bash
# Builds `versitygw`, the S3-compatible server (Apache-2.0, a POSIX file
# system behind the S3 API) that the tests start as each data center's
# object store, from the Go module proxy. Cached by version; prints the
# path of the binary on stdout, progress on stderr.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/../go-build.sh" versitygw "$here" github.com/versity/versitygw/cmd/versitygw

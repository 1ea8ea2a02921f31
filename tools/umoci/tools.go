//go:build tools

// Package tools pins umoci for build.sh.
package tools

import _ "github.com/opencontainers/umoci/cmd/umoci"

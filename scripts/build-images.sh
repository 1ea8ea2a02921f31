#!/usr/bin/env bash
# Builds CivicGrid's four images — operator, marketplace, runner, and the
# witness an independent party runs for the audit log — into one
# OCI image layout, with no container daemon: each image's root file system
# is the binary, the few shared libraries it links (glibc, libgcc, from this
# Debian machine), CA certificates, a non-root user and, for the marketplace
# and the runner, the SQL guest; umoci (tools/umoci) writes the layers and
# the image configuration. images/Dockerfile builds the same images where a
# Docker engine runs. Push with any OCI tool, e.g.
#   crane push target/images/oci:marketplace-0.1.0 registry.example/civicgrid/marketplace:0.1.0
#
# Usage: scripts/build-images.sh [--profile release|debug] [--bin-dir DIR]
#                                [--out DIR] [--no-build]
# Prints the layout's path on stdout, progress on stderr.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The layers record modes as they are on disk: nothing in an image may be
# writable by a group or others, whatever the caller's umask.
umask 022

profile=release
out=""
bin_dir=""
build=1
while [ $# -gt 0 ]; do
    case $1 in
        --profile) profile=$2; shift 2 ;;
        --bin-dir) bin_dir=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        *) echo "unknown argument $1 (see the script's header)" >&2; exit 2 ;;
    esac
done
target=${CARGO_TARGET_DIR:-$PWD/target}
out=${out:-$target/images}
case $profile in
    dev | debug) profile=dev profile_dir=debug ;;
    *) profile_dir=$profile ;;
esac
bin_dir=${bin_dir:-$target/$profile_dir}
guest=${CIVICGRID_GUEST_DIR:-$target/wasm32-wasip1/guest}/civicgrid_sandbox_guest.wasm
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
log() { printf '==> %s\n' "$*" >&2; }

if [ "$build" = 1 ]; then
    log "building the binaries ($profile)"
    cargo build --locked --profile "$profile" -p civicgrid-operator -p civicgrid-marketplace \
        -p civicgrid-runner -p civicgrid-witness >&2
    [ -f "$guest" ] || bash sandbox/build-guests.sh >&2
fi
[ -f "$guest" ] || { echo "no SQL guest at $guest: run bash sandbox/build-guests.sh" >&2; exit 1; }
umoci=$(bash tools/umoci/build.sh)
source_date=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
created=$(date -u -d "@$source_date" +%Y-%m-%dT%H:%M:%SZ)
case $(uname -m) in
    x86_64) architecture=amd64 ;;
    aarch64) architecture=arm64 ;;
    *) echo "images for $(uname -m) are not built here" >&2; exit 1 ;;
esac

layout=$out/oci
rm -rf "$layout"
mkdir -p "$out"
"$umoci" init --layout "$layout"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# The files every image shares: the user, CA certificates, writable places
# (mounted over in Kubernetes, where the root file system is read-only).
base_rootfs() {
    local root=$1
    mkdir -p "$root/etc/ssl/certs" "$root/tmp" "$root/var/lib/civicgrid" "$root/usr/share/civicgrid"
    chmod 1777 "$root/tmp"
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/var/lib/civicgrid:/sbin/nologin\n' \
        > "$root/etc/passwd"
    printf 'root:x:0:\nnonroot:x:65532:\n' > "$root/etc/group"
    [ -f /etc/ssl/certs/ca-certificates.crt ] || {
        echo "no CA bundle at /etc/ssl/certs/ca-certificates.crt: apt-get install ca-certificates" >&2
        exit 1
    }
    install -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
    chmod 0644 "$root/etc/passwd" "$root/etc/group"
}

# A binary and the shared libraries it links, at the paths the loader
# looks in, with their Debian copyright files.
add_binary() {
    local root=$1 binary=$2
    install -D -m 0755 "$binary" "$root/usr/local/bin/$(basename "$binary")"
    ldd "$binary" | awk '/=>/ {print $3} /^\t\/[^ ]+ \(/ {print $1}' | while read -r library; do
        [ -e "$library" ] || continue
        mkdir -p "$root$(dirname "$library")"
        install -m 0755 "$(readlink -f "$library")" "$root$library"
        package=$(dpkg -S "$(readlink -f "$library")" 2>/dev/null | head -1 | cut -d: -f1 || true)
        if [ -n "$package" ] && [ -f "/usr/share/doc/$package/copyright" ]; then
            install -D -m 0644 "/usr/share/doc/$package/copyright" \
                "$root/usr/share/doc/$package/copyright"
        fi
    done
}

for image in operator marketplace runner witness; do
    binary=$bin_dir/civicgrid-$image
    [ -x "$binary" ] || { echo "no $binary: build it, or drop --no-build" >&2; exit 1; }
    log "assembling the $image image"
    root=$scratch/$image/files
    base_rootfs "$root"
    add_binary "$root" "$binary"
    # A dynamically linked binary needs its loader; a static one, or one
    # for another machine, would leave the image without one.
    find "$root" -name 'ld-linux*.so*' | grep -q . || {
        echo "$binary: no dynamic loader found by ldd (built for this machine?)" >&2
        exit 1
    }
    env=(--config.env "CIVICGRID_DATA_DIR=/var/lib/civicgrid")
    # The SQL guest goes where queries run.
    if [ "$image" = marketplace ] || [ "$image" = runner ]; then
        install -m 0644 "$guest" "$root/usr/share/civicgrid/civicgrid_sandbox_guest.wasm"
        env+=(--config.env "CIVICGRID_SQL_GUEST=/usr/share/civicgrid/civicgrid_sandbox_guest.wasm")
    fi
    reference="$layout:$image-$version"
    bundle=$scratch/$image/bundle
    "$umoci" new --image "$reference"
    "$umoci" unpack --rootless --image "$reference" "$bundle" >&2
    cp -a "$root/." "$bundle/rootfs/"
    # Every time in the image is the commit's: the same sources and
    # binaries give the same image, byte for byte.
    find "$bundle/rootfs" -exec touch -h -d "@$source_date" {} +
    "$umoci" repack --no-history --image "$reference" "$bundle" >&2
    "$umoci" config --image "$reference" --no-history --created "$created" \
        --os linux --architecture "$architecture" \
        --config.user 65532:65532 \
        --config.workingdir /var/lib/civicgrid \
        --config.entrypoint "/usr/local/bin/civicgrid-$image" \
        "${env[@]}" \
        --config.label "org.opencontainers.image.title=civicgrid-$image" \
        --config.label "org.opencontainers.image.version=$version" \
        --config.label "org.opencontainers.image.licenses=Apache-2.0" \
        --config.label "org.opencontainers.image.source=https://github.com/civicgrid/civicgrid"
done
"$umoci" gc --layout "$layout"
log "images in $layout: $(ls "$layout/blobs/sha256" | wc -l) blobs, $(du -sh "$layout" | cut -f1)"
echo "$layout"

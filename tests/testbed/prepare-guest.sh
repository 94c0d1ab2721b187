#!/usr/bin/env bash
# Prepares what a real guest in the container test bed needs (see tests/src/guest.rs):
#
#   tests/testbed/prepare-guest.sh               build it once (after prepare.sh)
#   tests/testbed/prepare-guest.sh --print-path  print the directory the tests look for
#   tests/testbed/prepare-guest.sh --check       exit 0 when it is there
#
# It builds, from Debian packages only, cached at $CACHE_DIR/guest-<tag>:
#
#   layer/     rootfs additions, an overlay layer the bed mounts above the hosts' rootfs:
#              qemu-system-x86 and socat (what a microvm.nix qemu runner runs), with
#              exactly the dependencies the rootfs lacks, extracted from Debian's .debs;
#              and, as a Nix store would hold them, the guest's kernel and initramfs:
#     nix/store/<hash>-linux-<version>/bzImage        Debian's cloud kernel (8250 serial,
#                                                     i8042 and ACPI built in)
#     nix/store/<hash>-blixard-guest-initrd/initrd    busybox-static and a tiny init
#   manifest   KERNEL=... INITRD=... QEMU=... SOCAT=... (paths inside the hosts)
#
# The guest's init (busybox init) mounts /proc, prints `blixard-guest NAME booted
# runner=R boot=<id>` on its serial console, then `blixard-guest NAME tick N
# boot=<id>` every half second, and on ctrl-alt-del (what microvm.nix's qemu
# `microvm-shutdown` sends over QMP) reboots, printing `blixard-guest NAME shutting
# down`, which ends qemu (-no-reboot). NAME and R come from the kernel command line
# (`blixard.vm=NAME blixard.runner=R`).
#
# Idempotent, flock-protected like prepare.sh; the tag hashes the rootfs tag, the
# package lists and this script's build functions, so a change builds a new tree next
# to the old one.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_DIR=${BLIXARD_TESTBED_CACHE:-/var/cache/blixard-testbed}
MIRROR=${BLIXARD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
# What a microvm.nix qemu runner calls: the hypervisor, and socat for QMP.
LAYER_PACKAGES=(qemu-system-x86 socat)
# Its dependency is resolved to the flavour's current image package.
KERNEL_PACKAGE=linux-image-cloud-amd64
INIT_PACKAGE=busybox-static

die() { echo "prepare-guest.sh: $*" >&2; exit 1; }

ROOTFS=$(bash "$here/prepare.sh" --print-path)

# The guest's init system: busybox init with this inittab and scripts.
write_initramfs_tree() { # DIR BUSYBOX
    local dir=$1 busybox=$2 applet
    mkdir -p "$dir"/{bin,dev,etc,proc,sys,tmp,root}
    install -m 0755 "$busybox" "$dir/bin/busybox"
    for applet in $("$dir/bin/busybox" --list); do
        [[ "$applet" == busybox ]] || ln -sf busybox "$dir/bin/$applet"
    done
    ln -sf bin/busybox "$dir/init"
    cat > "$dir/etc/inittab" <<'EOF'
::sysinit:/etc/rc
::respawn:/bin/blixard-guest
::ctrlaltdel:/bin/reboot
::shutdown:/etc/stop
EOF
    cat > "$dir/etc/rc" <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
arg() { sed -n "s/.*blixard\.$1=\([a-z0-9-]*\).*/\1/p" /proc/cmdline; }
arg vm > /etc/vm-name
arg runner > /etc/runner
cat /proc/sys/kernel/random/boot_id > /etc/boot-id
echo "blixard-guest $(cat /etc/vm-name) booted runner=$(cat /etc/runner) boot=$(cat /etc/boot-id)"
EOF
    cat > "$dir/bin/blixard-guest" <<'EOF'
#!/bin/sh
# The guest's own counter, on its serial console.
name=$(cat /etc/vm-name) boot=$(cat /etc/boot-id) i=0
while :; do
    i=$((i + 1))
    echo "blixard-guest $name tick $i boot=$boot"
    sleep 0.5
done
EOF
    cat > "$dir/etc/stop" <<'EOF'
#!/bin/sh
echo "blixard-guest $(cat /etc/vm-name) shutting down boot=$(cat /etc/boot-id)"
EOF
    chmod 0755 "$dir/etc/rc" "$dir/etc/stop" "$dir/bin/blixard-guest"
}

# Builds everything into "$1" (a fresh directory).
build_guest() {
    local out=$1 work=$1/.work
    mkdir -p "$work"/{state/lists/partial,cache/archives/partial,debs,tree} "$out/layer"
    # apt, resolving against the rootfs's installed packages and the suite it was
    # bootstrapped from (not this machine's sources): exactly what the rootfs lacks.
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $SUITE main" \
        > "$work/sources.list"
    local apt=(
        -o "Dir::State=$work/state" -o "Dir::State::status=$ROOTFS/var/lib/dpkg/status"
        -o "Dir::Cache=$work/cache" -o "Dir::Etc::SourceList=$work/sources.list"
        -o "Dir::Etc::SourceParts=/nonexistent" -o "Dir::Etc::Preferences=/nonexistent"
        -o "Dir::Etc::PreferencesParts=/nonexistent" -o "APT::Install-Recommends=false"
        -o "APT::Sandbox::User=root" -o "Debug::NoLocking=true"
    )
    apt-get "${apt[@]}" -q update
    apt-get "${apt[@]}" -q -y --download-only install "${LAYER_PACKAGES[@]}"
    local deb
    for deb in "$work"/cache/archives/*.deb; do
        dpkg-deb -x "$deb" "$out/layer"
    done
    # The rootfs is merged-/usr (/bin, /lib, ... are symlinks into /usr): a real
    # directory of that name in the layer would hide the symlink, and with it the
    # whole of /usr/lib, in every host. Move such files to where the links lead.
    local top
    for top in bin sbin lib lib64; do
        if [[ -d "$out/layer/$top" && ! -L "$out/layer/$top" ]]; then
            mkdir -p "$out/layer/usr/$top"
            cp -a "$out/layer/$top/." "$out/layer/usr/$top/"
            rm -rf "$out/layer/$top"
        fi
    done
    # Only what runs: no docs, no man pages.
    rm -rf "$out/layer/usr/share/doc" "$out/layer/usr/share/man"

    local image
    image=$(apt-cache "${apt[@]}" depends "$KERNEL_PACKAGE" | sed -n 's/^ *Depends: \(linux-image-[^ ]*\)$/\1/p' | head -n 1)
    [[ -n "$image" ]] || die "cannot resolve $KERNEL_PACKAGE to a kernel image package"
    (cd "$work/debs" && apt-get "${apt[@]}" -q download "$image" "$INIT_PACKAGE")
    mkdir -p "$work/kernel" "$work/busybox"
    dpkg-deb -x "$work"/debs/linux-image-*.deb "$work/kernel"
    dpkg-deb -x "$work"/debs/busybox-static_*.deb "$work/busybox"
    local vmlinuz version
    vmlinuz=$(find "$work/kernel/boot" -name 'vmlinuz-*' | head -n 1)
    [[ -n "$vmlinuz" ]] || die "no vmlinuz in $image"
    version=${vmlinuz##*/vmlinuz-}
    local kernel_dir="nix/store/$(store_hash "linux-$version")-linux-$version"
    mkdir -p "$out/layer/$kernel_dir"
    install -m 0644 "$vmlinuz" "$out/layer/$kernel_dir/bzImage"

    write_initramfs_tree "$work/tree" "$work/busybox/bin/busybox"
    local initrd_dir="nix/store/$(store_hash "initrd-$(tag)")-blixard-guest-initrd"
    mkdir -p "$out/layer/$initrd_dir"
    (cd "$work/tree" && find . | "$work/busybox/bin/busybox" cpio -o -H newc 2> /dev/null) \
        | gzip -9 > "$out/layer/$initrd_dir/initrd"
    chmod 0644 "$out/layer/$initrd_dir/initrd"

    [[ -x "$out/layer/usr/bin/qemu-system-x86_64" ]] || die "qemu-system-x86_64 is missing from the layer"
    [[ -x "$out/layer/usr/bin/socat" ]] || die "socat is missing from the layer"
    rm -rf "$work"
    {
        echo "KERNEL=/$kernel_dir/bzImage"
        echo "INITRD=/$initrd_dir/initrd"
        echo "QEMU=/usr/bin/qemu-system-x86_64"
        echo "SOCAT=/usr/bin/socat"
    } > "$out/manifest.tmp"
    mv "$out/manifest.tmp" "$out/manifest"
}

tag() {
    {
        echo "$SUITE"
        cat "$ROOTFS/etc/blixard-testbed-tag" 2> /dev/null || echo "no rootfs"
        printf '%s\n' "${LAYER_PACKAGES[@]}" "$KERNEL_PACKAGE" "$INIT_PACKAGE"
        declare -f write_initramfs_tree build_guest
    } | sha256sum | cut -c1-12
}

# A stable, store-hash-shaped name (32 characters of Nix's base32 alphabet) for $1.
store_hash() {
    printf '%s' "$1" | sha256sum | cut -c1-32 | tr e p
}

GUEST="$CACHE_DIR/guest-$(tag)"

case "${1:-}" in
    --print-path) echo "$GUEST"; exit 0 ;;
    --check) [[ -f "$GUEST/manifest" ]]; exit $? ;;
    "") ;;
    *) die "unknown argument '$1' (expected --print-path or --check)" ;;
esac

[[ $EUID -eq 0 ]] || die "must run as root (like prepare.sh)"
[[ -f "$ROOTFS/etc/blixard-testbed-tag" ]] || die "the hosts' rootfs is not built: run tests/testbed/prepare.sh first"
[[ -f "$GUEST/manifest" ]] && exit 0

mkdir -p "$CACHE_DIR"
exec 9> "$CACHE_DIR/.guest.lock"
flock 9
[[ -f "$GUEST/manifest" ]] && exit 0
for stale in "$CACHE_DIR"/.guest-build.*; do
    [[ -e "$stale" ]] && rm -rf --one-file-system "$stale"
done
BUILD=$(mktemp -d "$CACHE_DIR/.guest-build.XXXXXX")
trap 'rm -rf --one-file-system "$BUILD"' EXIT
started=$(date +%s)
echo "prepare-guest.sh: building $GUEST" >&2
build_guest "$BUILD/guest" > "$BUILD/build.log" 2>&1 &
if ! wait $!; then
    tail -n 30 "$BUILD/build.log" >&2
    die "building the guest failed (log above)"
fi
mv -T "$BUILD/guest" "$GUEST"
echo "prepare-guest.sh: built $GUEST in $(($(date +%s) - started)) s" >&2

# Older guest trees that no running bed uses as an overlay layer.
for old in "$CACHE_DIR"/guest-*; do
    [[ "$old" == "$GUEST" ]] && continue
    if grep -qF "$old" /proc/self/mountinfo; then
        echo "prepare-guest.sh: keeping $old, a running test bed still uses it" >&2
    else
        rm -rf --one-file-system "$old"
    fi
done

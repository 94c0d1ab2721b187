#!/usr/bin/env bash
# Prepares this machine for the Blixard container test bed (see tests/src/testbed.rs).
#
#   tests/testbed/prepare.sh               install host packages, build the rootfs once
#   tests/testbed/prepare.sh --print-path  print the rootfs path for this script's spec
#   tests/testbed/prepare.sh --check       exit 0 when that rootfs is present
#
# Idempotent and safe to run concurrently: a second caller waits on the lock and then
# finds the rootfs already built. The rootfs is a debootstrapped Debian (the same release
# as the build host, so a binary built here finds its glibc and libgcc_s inside) with real
# systemd and D-Bus, cached at $CACHE_DIR/rootfs-<tag>. The tag is a hash of the suite,
# the package list and the body of configure_rootfs, so changing any of them builds a new
# rootfs next to the old one instead of mutating a tree that running beds use as their
# overlay lower layer.
set -euo pipefail

CACHE_DIR=${BLIXARD_TESTBED_CACHE:-/var/cache/blixard-testbed}
MIRROR=${BLIXARD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm

# Host tools the test bed runs, and the Debian package that provides each.
HOST_TOOLS=(
    debootstrap:debootstrap
    systemd-nspawn:systemd-container
    journalctl:systemd
    ip:iproute2
    nsenter:util-linux
    flock:util-linux
    umount:mount
    sha256sum:coreutils
    iptables:iptables
)

# Inside each host. systemd/systemd-sysv/dbus: a real init and system bus for the agent's
# zbus connection. iproute2/procps/iputils-ping/netcat-openbsd: what tests use to look at
# and poke the network. libgcc-s1 is listed although minbase pulls it in today: Rust
# binaries link libgcc_s for unwinding, so the agent cannot start without it.
ROOTFS_PACKAGES=(
    systemd systemd-sysv dbus libgcc-s1
    iproute2 procps iputils-ping netcat-openbsd
)

# Units that are slow or meaningless in a container without a console or real hardware.
# systemd-networkd-wait-online would hold boot for two minutes without a carrier.
MASKED_UNITS=(
    getty@tty1.service console-getty.service container-getty@.service serial-getty@.service
    systemd-networkd-wait-online.service
    apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer
    e2scrub_reap.service fstrim.timer systemd-tmpfiles-clean.timer
    systemd-pstore.service systemd-firstboot.service systemd-binfmt.service
    proc-sys-fs-binfmt_misc.automount dev-hugepages.mount sys-kernel-debug.mount
    systemd-update-utmp.service systemd-update-utmp-runlevel.service
)

die() { echo "prepare.sh: $*" >&2; exit 1; }

# Lays out the rootfs in "$1". Everything here is part of the tag: edit freely.
configure_rootfs() {
    local root=$1

    # Identity is per host: the test bed writes /etc/hostname and /etc/machine-id into
    # each host's upper layer. An empty machine-id here means "not yet assigned".
    echo testbed > "$root/etc/hostname"
    : > "$root/etc/machine-id"
    ln -sf /etc/machine-id "$root/var/lib/dbus/machine-id"

    # Root without a password: `machinectl login`-style debugging, nothing else logs in.
    chroot "$root" passwd --delete root

    # microvm.nix runs guests as microvm:kvm.
    chroot "$root" sh -c 'getent group kvm > /dev/null || groupadd --system kvm'
    chroot "$root" useradd --system --gid kvm --home-dir /var/lib/microvms \
        --shell /usr/sbin/nologin microvm
    install -d -o root -g root -m 0755 "$root/var/lib/microvms"
    install -d -m 0755 "$root/usr/local/bin" "$root/var/lib/blixard"

    systemctl --root="$root" mask "${MASKED_UNITS[@]}"
    # host0 gets a static address from a per-host .network file, so it comes back by
    # itself when a host boots again after a power-off.
    systemctl --root="$root" enable systemd-networkd.service

    # A persistent journal survives power_off, so a test can read what a dead host said.
    install -d -m 2755 "$root/var/log/journal"
    install -d "$root/etc/systemd/journald.conf.d"
    cat > "$root/etc/systemd/journald.conf.d/testbed.conf" <<'EOF'
[Journal]
Storage=persistent
SystemMaxUse=32M
RateLimitBurst=0
EOF

    # Shorter stop timeouts: a hung unit should fail a test quickly, not in 90 s.
    install -d "$root/etc/systemd/system.conf.d"
    cat > "$root/etc/systemd/system.conf.d/testbed.conf" <<'EOF'
[Manager]
DefaultTimeoutStopSec=15s
EOF

    # microvm.nix's host units (nixos-modules/host/default.nix), written as that module
    # renders them for a host with the defaults: stateDir /var/lib/microvms, user microvm,
    # group kvm, startupTimeout 150, useNotifySockets false. The tap, macvtap, pci and
    # virtiofsd helper units are left out: each only runs when the runner ships its
    # bin/tap-up, bin/macvtap-up, bin/pci-setup or bin/virtiofsd-run, which fake guests
    # never do, so their Condition would skip them anyway.
    cat > "$root/etc/systemd/system/microvm-set-booted@.service" <<'EOF'
[Unit]
Description=Save MicroVM '%i' booted configuration
Before=microvm@%i.service
PartOf=microvm@%i.service

[Service]
Type=oneshot
RemainAfterExit=true
SyslogIdentifier=microvm-set-booted@%i
WorkingDirectory=/var/lib/microvms/%i
User=microvm
Group=kvm
# $$ is systemd's escape for a literal $.
ExecStart=/bin/sh -c 'rm -f booted; ln -s $$(readlink current) booted'
ExecStop=/bin/rm booted
EOF
    cat > "$root/etc/systemd/system/microvm@.service" <<'EOF'
[Unit]
Description=MicroVM '%i'
Requires=microvm-set-booted@%i.service
After=network.target systemd-modules-load.service microvm-set-booted@%i.service
ConditionPathExists=/var/lib/microvms/%i/current/bin/microvm-run

[Service]
Type=simple
WorkingDirectory=/var/lib/microvms/%i
ExecStart=/var/lib/microvms/%i/current/bin/microvm-run
ExecStop=/var/lib/microvms/%i/booted/bin/microvm-shutdown
ExecStartPost=+/bin/sh -c 'if [ -x /var/lib/microvms/%i/current/bin/microvm-register ]; then /var/lib/microvms/%i/current/bin/microvm-register $MAINPID; fi'
ExecStopPost=+/bin/sh -c 'if [ -x /var/lib/microvms/%i/current/bin/microvm-unregister ]; then /var/lib/microvms/%i/current/bin/microvm-unregister; fi'
TimeoutSec=150
Restart=always
RestartSec=5s
User=microvm
Group=kvm
SyslogIdentifier=microvm@%i
# These exceed this sandbox's hard limits (nofile 20000, memlock 8 MiB) and the
# container lacks CAP_SYS_RESOURCE; systemd clamps them to the hard limit and starts
# the unit anyway, as it would on a host with lower limits.
LimitNOFILE=1048576
LimitMEMLOCK=infinity
NotifyAccess=all
EOF
    # The guests' target, as microvm.nix defines it; the agent, not this target, starts
    # guests (autostart = false), so it wants nothing.
    cat > "$root/etc/systemd/system/microvms.target" <<'EOF'
[Unit]
Description=MicroVMs

[Install]
WantedBy=multi-user.target
EOF
    systemctl --root="$root" enable microvms.target

    # Nothing inside is ever upgraded: drop apt's lists and caches and the docs.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
        "$root"/var/cache/apt/archives/*.deb "$root"/usr/share/doc/* "$root"/usr/share/man/*
}

tag() {
    { echo "$SUITE"; printf '%s\n' "${ROOTFS_PACKAGES[@]}" "${MASKED_UNITS[@]}"; declare -f configure_rootfs; } \
        | sha256sum | cut -c1-12
}

ROOTFS="$CACHE_DIR/rootfs-$(tag)"

case "${1:-}" in
    --print-path) echo "$ROOTFS"; exit 0 ;;
    --check) [[ -f "$ROOTFS/etc/blixard-testbed-tag" ]]; exit $? ;;
    "") ;;
    *) die "unknown argument '$1' (expected --print-path or --check)" ;;
esac

[[ $EUID -eq 0 ]] || die "must run as root (it installs packages and runs debootstrap)"

install_host_packages() {
    local missing=() entry tool pkg
    for entry in "${HOST_TOOLS[@]}"; do
        tool=${entry%%:*} pkg=${entry#*:}
        if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" > /dev/null; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]})); then
        echo "prepare.sh: installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -q -y --no-install-recommends "${missing[@]}"
    fi
}

# Unmounts whatever is mounted at or below "$1" (debootstrap mounts /proc and /sys in
# its target and can leave them behind when it fails), deepest first.
unmount_below() {
    local dir
    dir=$(realpath -m "$1")
    awk -v d="$dir" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/self/mounts \
        | sort -r | while read -r m; do umount -l "$m" || true; done
}

remove_tree() {
    unmount_below "$1"
    rm -rf --one-file-system "$1"
}

install_host_packages

[[ -f "$ROOTFS/etc/blixard-testbed-tag" ]] && exit 0

mkdir -p "$CACHE_DIR"
exec 9> "$CACHE_DIR/.lock"
flock 9
# Another caller may have built it while we waited.
[[ -f "$ROOTFS/etc/blixard-testbed-tag" ]] && exit 0

# Leftovers of builds that were killed: we hold the lock, so nobody else is building.
for stale in "$CACHE_DIR"/.build.*; do
    [[ -e "$stale" ]] && remove_tree "$stale"
done

BUILD=$(mktemp -d "$CACHE_DIR/.build.XXXXXX")
trap 'remove_tree "$BUILD"' EXIT

started=$(date +%s)
echo "prepare.sh: building $ROOTFS (debootstrap $SUITE from $MIRROR)" >&2
include=$(IFS=,; echo "${ROOTFS_PACKAGES[*]}")
if ! debootstrap --variant=minbase --include="$include" "$SUITE" "$BUILD/rootfs" "$MIRROR" \
    > "$BUILD/debootstrap.log" 2>&1; then
    tail -n 30 "$BUILD/debootstrap.log" >&2
    die "debootstrap failed (full log above)"
fi
unmount_below "$BUILD/rootfs"
# In the background so that errexit holds inside it (bash ignores -e in a function
# called as an `if` or `||` operand).
configure_rootfs "$BUILD/rootfs" > "$BUILD/configure.log" 2>&1 &
if ! wait $!; then
    tail -n 30 "$BUILD/configure.log" >&2
    die "configuring the rootfs failed (log above)"
fi
tag > "$BUILD/rootfs/etc/blixard-testbed-tag"
# A directory rename is atomic: readers see no rootfs or a whole one.
mv -T "$BUILD/rootfs" "$ROOTFS"
echo "prepare.sh: built $ROOTFS in $(($(date +%s) - started)) s" >&2

# Older rootfs trees nobody uses as an overlay lower layer any more.
for old in "$CACHE_DIR"/rootfs-*; do
    [[ "$old" == "$ROOTFS" ]] && continue
    if grep -qF "$old" /proc/self/mountinfo; then
        echo "prepare.sh: keeping $old, a running test bed still uses it" >&2
    else
        remove_tree "$old"
    fi
done

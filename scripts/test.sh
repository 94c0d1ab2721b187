#!/usr/bin/env bash
# Runs every Blixard test, after installing what the tests need.
#
# On a fresh Debian 12 machine with cargo, run it as root (the container
# test bed needs root):  sudo scripts/test.sh
# It installs the Debian packages the tests use, builds the cached
# container root filesystem and the real guest's image (once each;
# /var/cache/blixard-testbed), checks
# formatting and lints, runs the whole test suite (including 1,000
# simulator seeds) in the `ci` profile, and runs the Nix checks.
#
# Environment:
#   BLIXARD_SIM_SEEDS   simulator seeds to run (default 1000)
#   BLIXARD_REQUIRE_BROWSER  set here: the dashboard's browser test fails,
#                       not skips, when Chromium is missing
#   BLIXARD_TEST_QUICK  set to skip fmt/clippy (for local iteration)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "error: run this as root (sudo $0): the container test bed boots systemd-nspawn hosts" >&2
  exit 2
fi

log "installing Debian packages the tests need"
# chromium, chromium-driver, fonts-liberation: the dashboard's browser test
# (headless over WebDriver; the font makes its screenshots legible).
packages=(debootstrap systemd-container iproute2 nix-bin chromium chromium-driver fonts-liberation)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

log "preparing the container test bed root filesystem"
bash tests/testbed/prepare.sh
log "preparing the test bed's real guest (qemu, a Debian kernel, a busybox initramfs)"
bash tests/testbed/prepare-guest.sh

if [ -z "${BLIXARD_TEST_QUICK:-}" ]; then
  log "cargo fmt --check"
  cargo fmt --all -- --check
  log "cargo clippy"
  cargo clippy --workspace --all-targets --profile ci -- -D warnings
fi

export BLIXARD_SIM_SEEDS="${BLIXARD_SIM_SEEDS:-1000}"
# The system tests run the agent binary this build makes; without this they
# would each run their own `cargo build` while other tests are timing things.
export BLIXARD_AGENT_BIN="${CARGO_TARGET_DIR:-$PWD/target}/ci/blixard-agent"
# The packages above include the browser, so its test must really run.
export BLIXARD_REQUIRE_BROWSER=1
log "cargo tests (profile ci, ${BLIXARD_SIM_SEEDS} simulator seeds)"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --cargo-profile ci --no-run
  test -x "$BLIXARD_AGENT_BIN" || cargo build --profile ci -p blixard-agent --bin blixard-agent
  cargo nextest run --workspace --cargo-profile ci --no-fail-fast
else
  cargo build --profile ci -p blixard-agent --bin blixard-agent
  cargo test --workspace --profile ci --no-fail-fast
fi

log "Nix checks"
nix_log=$(mktemp)
trap 'rm -f "$nix_log"' EXIT
bash tests/nix/check.sh 2>&1 | tee "$nix_log"
nix_summary=$(grep '^nix-checks: ' "$nix_log" | tail -n 1)

# The last line says what did not run: "all tests passed" only when nothing was
# skipped.
if grep -q ' 0 skipped$' <<< "$nix_summary"; then
  log "all tests passed"
else
  log "tests passed, but not all ran: $nix_summary"
fi

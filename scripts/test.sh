#!/usr/bin/env bash
# Runs every Blixard test, after installing what the tests need.
#
# On a fresh Debian 12 machine with cargo, run it as root (the container
# test bed needs root):  sudo scripts/test.sh
# It installs the Debian packages the tests use, builds the cached
# container root filesystem (once; /var/cache/blixard-testbed), checks
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
# Issue 20: prometheus for promtool (the shipped alert rules and Grafana
# board, monitoring/check.sh); libnss3-tools (pk12util, certutil) and
# openssl give the browser test's Chromium its client certificates.
packages+=(prometheus libnss3-tools openssl jq)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Issue 20: only promtool is needed; the package's server is not.
if command -v systemctl >/dev/null && systemctl is-enabled prometheus >/dev/null 2>&1; then
  systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

log "preparing the container test bed root filesystem"
bash tests/testbed/prepare.sh

if [ -z "${BLIXARD_TEST_QUICK:-}" ]; then
  log "cargo fmt --check"
  cargo fmt --all -- --check
  log "cargo clippy"
  cargo clippy --workspace --all-targets --profile ci -- -D warnings
fi

log "monitoring: alert rules (promtool check/test rules) and the Grafana board"
bash monitoring/check.sh

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
bash tests/nix/check.sh

log "all tests passed"

#!/usr/bin/env bash
# Runs every Blixard test, after installing what the tests need.
#
# On a fresh Debian 12 machine with a Rust toolchain from rustup (Debian's
# rustc 1.63 is too old; the script says how to get one), run it as root
# (the container test bed needs root):  sudo scripts/test.sh
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
#   BLIXARD_REQUIRE_SHELLS  set here: the completion test fails, not skips,
#                       when zsh or fish is missing
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# ---- issue 19: the Rust toolchain under sudo, and what was skipped --------
# What this run skipped, listed by the summary at the end.
skipped=()
# `sudo` resets PATH (secure_path), which drops a rustup toolchain in the
# invoking user's ~/.cargo/bin: put it back, with that user's RUSTUP_HOME so
# that rustup's cargo finds its toolchains (the registry and builds stay
# root's: CARGO_HOME is left alone).
if ! command -v cargo >/dev/null 2>&1 && [ -n "${SUDO_USER:-}" ]; then
  sudo_home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
  if [ -n "$sudo_home" ] && [ -x "$sudo_home/.cargo/bin/cargo" ]; then
    export PATH="$sudo_home/.cargo/bin:$PATH"
    if [ -z "${RUSTUP_HOME:-}" ] && [ -d "$sudo_home/.rustup" ]; then
      export RUSTUP_HOME="$sudo_home/.rustup"
    fi
    echo "using $SUDO_USER's Rust toolchain from $sudo_home/.cargo/bin"
  fi
fi
# ---- end issue 19 ---------------------------------------------------------

if [ "$(id -u)" -ne 0 ]; then
  echo "error: run this as root (sudo $0): the container test bed boots systemd-nspawn hosts" >&2
  exit 2
fi

log "installing Debian packages the tests need"
# chromium, chromium-driver, fonts-liberation: the dashboard's browser test
# (headless over WebDriver; the font makes its screenshots legible).
# build-essential: the C compiler and libc headers some crates build with
# (ring). zsh, fish: the shell completion test runs in each shell.
packages=(debootstrap systemd-container iproute2 nix-bin chromium chromium-driver fonts-liberation
  build-essential zsh fish)
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

# ---- issue 19: check the Rust toolchain before anything builds ------------
log "checking the Rust toolchain"
rust_needed=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
how_to_get_rust="install one with rustup (https://rustup.rs: curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh), \
then 'rustup component add rustfmt clippy'; Debian's rustc is too old. Run this script with sudo as the user that \
installed it (it finds ~/.cargo/bin), or as root with root's own rustup"
if ! command -v cargo >/dev/null 2>&1 || ! command -v rustc >/dev/null 2>&1; then
  echo "error: no cargo or rustc on PATH; Rust $rust_needed or newer is needed: $how_to_get_rust" >&2
  exit 2
fi
rust_found=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n%s\n' "$rust_needed" "$rust_found" | sort -V | head -n 1)" != "$rust_needed" ]; then
  echo "error: rustc $rust_found is older than the $rust_needed the workspace needs: $how_to_get_rust" >&2
  exit 2
fi
for component in fmt clippy; do
  if ! cargo "$component" --version >/dev/null 2>&1; then
    if [ -n "${BLIXARD_TEST_QUICK:-}" ]; then
      continue
    fi
    echo "error: cargo $component is missing: rustup component add ${component/fmt/rustfmt} (or set BLIXARD_TEST_QUICK to skip fmt and clippy)" >&2
    exit 2
  fi
done
if ! command -v cc >/dev/null 2>&1; then
  echo "error: no C compiler (cc) although build-essential was installed" >&2
  exit 2
fi
echo "rustc $rust_found (at least $rust_needed), $(cargo --version), cc: $(cc --version | head -n 1)"
# ---- end issue 19 ---------------------------------------------------------

log "preparing the container test bed root filesystem"
bash tests/testbed/prepare.sh
log "preparing the test bed's real guest (qemu, a Debian kernel, a busybox initramfs)"
bash tests/testbed/prepare-guest.sh

if [ -z "${BLIXARD_TEST_QUICK:-}" ]; then
  log "cargo fmt --check"
  cargo fmt --all -- --check
  log "cargo clippy"
  cargo clippy --workspace --all-targets --profile ci -- -D warnings
else
  skipped+=("cargo fmt --check and cargo clippy (BLIXARD_TEST_QUICK is set)")
fi

log "monitoring: alert rules (promtool check/test rules) and the Grafana board"
bash monitoring/check.sh

export BLIXARD_SIM_SEEDS="${BLIXARD_SIM_SEEDS:-1000}"
# The system tests run the agent binary this build makes; without this they
# would each run their own `cargo build` while other tests are timing things.
export BLIXARD_AGENT_BIN="${CARGO_TARGET_DIR:-$PWD/target}/ci/blixard-agent"
# The packages above include the browser, so its test must really run.
export BLIXARD_REQUIRE_BROWSER=1
# And zsh and fish, so the completion test runs in all three shells.
export BLIXARD_REQUIRE_SHELLS=1
log "cargo tests (profile ci, ${BLIXARD_SIM_SEEDS} simulator seeds)"
# (issue 19) The test runner's own summary is kept for the final one.
tests_log=$(mktemp)
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --cargo-profile ci --no-run
  test -x "$BLIXARD_AGENT_BIN" || cargo build --profile ci -p blixard-agent --bin blixard-agent
  cargo nextest run --workspace --cargo-profile ci --no-fail-fast 2>&1 | tee "$tests_log"
  tests_summary=$(grep -E '^ *Summary ' "$tests_log" | tail -n 1 | sed 's/^ *//' || true)
else
  skipped+=("cargo-nextest is not installed: ran cargo test instead (cargo install cargo-nextest)")
  cargo build --profile ci -p blixard-agent --bin blixard-agent
  cargo test --workspace --profile ci --no-fail-fast 2>&1 | tee "$tests_log"
  tests_summary="$(grep -c '^test result: ok' "$tests_log" || true) test binaries passed"
fi
if grep -qE ' [1-9][0-9]* (skipped|ignored)' <<< "$tests_summary"; then
  skipped+=("tests marked #[ignore] (they run on request): $tests_summary")
fi
rm -f "$tests_log"

log "Nix checks"
# The module is evaluated against pinned microvm.nix and nixpkgs lib sources,
# cached outside the repository (/var/cache/blixard). Fetch them when they are
# missing; a machine that cannot reach them still runs every other check, and
# the summary below names the evaluation as skipped.
if ! bash tests/nix/prepare.sh --check; then
  bash tests/nix/prepare.sh || echo "the Nix sources could not be fetched: the module evaluation checks will be skipped"
fi
nix_log=$(mktemp)
trap 'rm -f "$nix_log"' EXIT
bash tests/nix/check.sh 2>&1 | tee "$nix_log"
nix_summary=$(grep '^nix-checks: ' "$nix_log" | tail -n 1)

if ! grep -q ' 0 skipped$' <<< "$nix_summary"; then
  skipped+=("not every Nix check ran: $nix_summary")
fi

# ---- issue 19: the summary: what ran, and everything that was skipped ----
log "summary"
echo "tests: ${tests_summary:-see above}"
echo "${nix_summary:-nix-checks: see above}"
if [ ${#skipped[@]} -eq 0 ]; then
  echo "skipped: nothing"
else
  echo "skipped:"
  printf '  - %s\n' "${skipped[@]}"
fi
# ---- end issue 19 ---------------------------------------------------------

# The last line says what did not run: "all tests passed" only when nothing was
# skipped.
if [ ${#skipped[@]} -eq 0 ]; then
  log "all tests passed"
else
  log "tests passed, but not all ran (see the summary above)"
fi

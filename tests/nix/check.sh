#!/usr/bin/env bash
# The Nix checks that run without nixpkgs, NixOS or KVM:
#   1. every .nix file parses              (nix-instantiate --parse)
#   2. every .nix file is formatted        (nixpkgs-fmt --check; the flake's `formatter`)
#   3. lints                               (statix check, deadnix --fail)
#   4. module evaluation tests             (tests/nix/eval.nix under lib.evalModules)
#
# Step 4 needs nixpkgs' lib (github:nix-community/nixpkgs.lib, or a nixpkgs
# checkout) as a directory: $NIXPKGS_LIB, else /var/cache/blixard/nixpkgs-lib.
# Without one it says SKIPPED. Nothing is downloaded except from crates.io
# (nixpkgs-fmt, deadnix) and Debian (nix-bin), and only when missing.
# The NixOS VM tests and the package build need Nix with nixpkgs: `nix flake check`.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
export PATH="$HOME/.cargo/bin:$PATH"

nixpkgs_fmt_version=1.3.0
deadnix_version=1.3.1
lib_cache=/var/cache/blixard/nixpkgs-lib

passed=0
failed=0
skipped=0
pass() { echo "ok: $1"; passed=$((passed + 1)); }
fail() { echo "FAILED: $1"; failed=$((failed + 1)); }
skip() { echo "SKIPPED: $1"; skipped=$((skipped + 1)); }

# --- tools -------------------------------------------------------------------
if ! command -v nix-instantiate >/dev/null; then
  echo "installing nix-bin (Debian) for nix-instantiate"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nix-bin >/dev/null
  else
    echo "nix-instantiate is missing and this is not root: install Debian's nix-bin" >&2
    exit 1
  fi
fi

cargo_tool() { # BINARY CRATE VERSION
  if ! command -v "$1" >/dev/null; then
    echo "installing $2 $3 from crates.io"
    cargo install --locked --quiet "$2" --version "$3"
  fi
}
cargo_tool nixpkgs-fmt nixpkgs-fmt "$nixpkgs_fmt_version"
cargo_tool deadnix deadnix "$deadnix_version"

# Every .nix file of the repository (tracked or new, not ignored).
mapfile -t nix_files < <(git ls-files --cached --others --exclude-standard -- '*.nix' | sort -u)
if [ "${#nix_files[@]}" -eq 0 ]; then
  echo "no .nix files found" >&2
  exit 1
fi
echo "checking ${#nix_files[@]} .nix files"

# --- 1. parse ------------------------------------------------------------------
parse_ok=true
for file in "${nix_files[@]}"; do
  if ! nix-instantiate --parse "$file" >/dev/null; then
    echo "does not parse: $file"
    parse_ok=false
  fi
done
if $parse_ok; then pass "every .nix file parses"; else fail "nix-instantiate --parse"; fi

# --- 2. format -----------------------------------------------------------------
if nixpkgs-fmt --check "${nix_files[@]}"; then
  pass "nixpkgs-fmt --check"
else
  fail "nixpkgs-fmt --check (run: nixpkgs-fmt <files> or nix fmt)"
fi

# --- 3. lint -------------------------------------------------------------------
# statix is not on crates.io (the crate of that name there is an unrelated
# HTTP server), so it runs where it is installed: `nix develop` has it.
if command -v statix >/dev/null && statix --help 2>&1 | grep -qi lint; then
  if statix check --ignore 'result*' .; then pass "statix check"; else fail "statix check"; fi
else
  skip "statix check: statix is not installed here (it is not on crates.io; nix develop provides it)"
fi

if deadnix --fail "${nix_files[@]}"; then pass "deadnix --fail"; else fail "deadnix --fail"; fi

# --- 4. module evaluation tests ----------------------------------------------
lib_dir=""
if [ -n "${NIXPKGS_LIB:-}" ]; then
  candidate=$NIXPKGS_LIB
elif [ -d "$lib_cache" ]; then
  candidate=$lib_cache
else
  candidate=""
fi
if [ -n "$candidate" ]; then
  # Either a repository root with lib/ (nixpkgs, nixpkgs.lib) or lib itself.
  if [ -f "$candidate/lib/modules.nix" ]; then
    lib_dir=$(cd "$candidate/lib" && pwd)
  elif [ -f "$candidate/modules.nix" ]; then
    lib_dir=$(cd "$candidate" && pwd)
  else
    fail "NIXPKGS_LIB=$candidate holds no nixpkgs lib (no lib/modules.nix)"
  fi
fi

if [ -z "$candidate" ]; then
  skip "module evaluation tests: NIXPKGS_LIB not set (and no $lib_cache)"
elif [ -n "$lib_dir" ]; then
  echo "module evaluation tests with nixpkgs lib at $lib_dir"
  if result=$(nix-instantiate --eval --strict --json tests/nix/eval.nix \
    --arg lib "import $lib_dir"); then
    total=$(jq '.total' <<<"$result")
    count=$(jq '.failures | length' <<<"$result")
    jq -r '.failures[] | "FAILED: eval test \(.name)\n  expected: \(.expected | tojson)\n  got:      \(.result | tojson)"' <<<"$result"
    passed=$((passed + total - count))
    failed=$((failed + count))
    echo "module evaluation tests: $((total - count)) of $total passed"
  else
    fail "module evaluation tests did not evaluate"
  fi
fi

echo "nix-checks: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]

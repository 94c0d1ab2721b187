#!/usr/bin/env bash
# The Nix checks that run without nixpkgs, NixOS or KVM:
#   1. every .nix file parses              (nix-instantiate --parse)
#   2. every .nix file is formatted        (nixfmt --check, RFC 166 style; the flake's `formatter`)
#   3. lints                               (deadnix --fail; statix check where installed)
#   4. docs/nixos.md shows docs/examples/cluster.nix as it is
#   5. module evaluation tests             (tests/nix/eval.nix: the flake's modules with
#                                           the real microvm.nix under lib.evalModules)
#
# Step 5 reads microvm.nix at the revision flake.lock pins and nixpkgs' lib from the
# cache outside the repository (/var/cache/blixard, filled by tests/nix/prepare.sh,
# which this runs first). When a source is missing, the summary line says so in
# capitals; with BLIXARD_REQUIRE_NIX_SOURCES=1 that also fails the run.
# Tools come from crates.io (nixfmt_rs, deadnix) and Debian (nix-bin), installed only
# when missing. statix is on no registry this machine reaches (the crates.io crate of
# that name is an unrelated HTTP server): `nix develop` has it, and here it is a skip
# that the summary line counts.
# The NixOS VM tests and the package build need Nix with nixpkgs: `nix flake check`.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
export PATH="$HOME/.cargo/bin:$PATH"
export NO_COLOR=1

nixfmt_version=0.5.3
deadnix_version=1.3.1
cache=${BLIXARD_NIX_CACHE:-/var/cache/blixard}

passed=0
failed=0
skipped=0
missing=()
pass() { echo "ok: $1"; passed=$((passed + 1)); }
fail() { echo "FAILED: $1"; failed=$((failed + 1)); }
skip() { echo "SKIPPED: $1"; skipped=$((skipped + 1)); }

# --- tools -------------------------------------------------------------------
if ! command -v nix-instantiate > /dev/null; then
  echo "installing nix-bin (Debian) for nix-instantiate"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq > /dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nix-bin > /dev/null
  else
    echo "nix-instantiate is missing and this is not root: install Debian's nix-bin" >&2
    exit 1
  fi
fi
command -v jq > /dev/null || { echo "jq is missing: install Debian's jq" >&2; exit 1; }

cargo_tool() { # BINARY CRATE VERSION
  if ! "$1" --version 2> /dev/null | grep -qF "$3"; then
    echo "installing $2 $3 from crates.io"
    cargo install --locked --quiet "$2" --version "$3"
  fi
}
cargo_tool nixfmt nixfmt_rs "$nixfmt_version"
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
  if ! nix-instantiate --parse "$file" > /dev/null; then
    echo "does not parse: $file"
    parse_ok=false
  fi
done
if $parse_ok; then pass "every .nix file parses"; else fail "nix-instantiate --parse"; fi

# --- 2. format -----------------------------------------------------------------
if nixfmt --check "${nix_files[@]}"; then
  pass "nixfmt --check"
else
  fail "nixfmt --check (run: nixfmt <files>, or nix fmt)"
fi

# --- 3. lint -------------------------------------------------------------------
if command -v statix > /dev/null && statix --help 2>&1 | grep -qi lint; then
  if statix check --ignore 'result*' .; then pass "statix check"; else fail "statix check"; fi
else
  skip "statix check: statix is not installed here (it is on no registry this machine reaches; nix develop provides it)"
fi

if deadnix --fail "${nix_files[@]}"; then pass "deadnix --fail"; else fail "deadnix --fail"; fi

# --- 4. the docs show the example that step 5 evaluates ----------------------
# The block after the marker line `<!-- file: docs/examples/X -->` is that file.
docs_ok=true
while IFS= read -r example; do
  shown=$(awk -v marker="<!-- file: $example -->" '
    $0 == marker { found = 1; next }
    found && /^```/ { if (inside) exit; inside = 1; next }
    inside { print }
  ' docs/nixos.md)
  if [ "$shown" != "$(cat "$example")" ]; then
    echo "docs/nixos.md does not show $example as it is:"
    diff <(echo "$shown") "$example" || true
    docs_ok=false
  fi
done < <(sed -n 's/^<!-- file: \(docs\/examples\/[^ ]*\) -->$/\1/p' docs/nixos.md)
if ! grep -q '^<!-- file: docs/examples/cluster.nix -->$' docs/nixos.md; then
  echo "docs/nixos.md has no block marked <!-- file: docs/examples/cluster.nix -->"
  docs_ok=false
fi
if $docs_ok; then pass "docs/nixos.md shows docs/examples as they are"; else fail "docs/nixos.md examples"; fi

# --- 5. module evaluation tests ----------------------------------------------
microvm_rev=$(jq -r '.nodes.microvm.locked.rev' flake.lock)
microvm_dir="$cache/microvm.nix-$microvm_rev"
lib_dir="$cache/nixpkgs-lib/lib"
if ! BLIXARD_NIX_CACHE=$cache bash tests/nix/prepare.sh; then
  echo "tests/nix/prepare.sh could not fill $cache (see above)"
fi
if ! BLIXARD_NIX_CACHE=$cache bash tests/nix/prepare.sh --check; then
  [ -f "$microvm_dir/.nar-hash" ] || missing+=("microvm.nix $microvm_rev ($microvm_dir)")
  [ -f "$cache/nixpkgs-lib/.rev" ] || missing+=("nixpkgs lib ($cache/nixpkgs-lib)")
  [ ${#missing[@]} -gt 0 ] || missing+=("a verified source cache in $cache")
  skip "module evaluation tests: sources missing: ${missing[*]}"
else
  echo "module evaluation tests with microvm.nix $microvm_rev and nixpkgs lib $(cat "$cache/nixpkgs-lib/.rev")"
  # --read-write-mode: a certificate given as a path literal really is copied into
  # the store, as on a NixOS host (nix-instantiate --eval is read-only otherwise).
  if result=$(nix-instantiate --read-write-mode --eval --strict --json tests/nix/eval.nix \
    --arg lib "import $lib_dir" --arg microvm "$microvm_dir" 2> >(grep -v "build-users-group" >&2)); then
    total=$(jq '.total' <<< "$result")
    count=$(jq '.failures | length' <<< "$result")
    jq -r '.failures[] | "FAILED: eval test \(.name)\n  expected: \(.expected | tojson)\n  got:      \(.result | tojson)"' <<< "$result"
    passed=$((passed + total - count))
    failed=$((failed + count))
    echo "module evaluation tests: $((total - count)) of $total passed"
  else
    fail "module evaluation tests did not evaluate"
  fi
fi

summary="nix-checks: $passed passed, $failed failed, $skipped skipped"
if [ ${#missing[@]} -gt 0 ]; then
  echo "$summary -- MODULE EVALUATION NOT RUN, SOURCES MISSING: ${missing[*]} (run tests/nix/prepare.sh)"
  [ "${BLIXARD_REQUIRE_NIX_SOURCES:-}" != 1 ] || exit 1
else
  echo "$summary"
fi
[ "$failed" -eq 0 ]

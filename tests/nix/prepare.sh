#!/usr/bin/env bash
# Puts the sources the Nix evaluation tests read into the cache outside the repository
# (nothing fetched is ever committed):
#
#   /var/cache/blixard/microvm.nix-<rev>  microvm.nix at the revision flake.lock pins; its
#                                         NAR hash must equal flake.lock's narHash
#   /var/cache/blixard/nixpkgs-lib        nixpkgs' lib (nix-community/nixpkgs.lib) at
#                                         NIXPKGS_LIB_REV below, with a .rev file
#
#   tests/nix/prepare.sh            fill the cache (idempotent; a checked entry is kept)
#   tests/nix/prepare.sh --check    exit 0 when both entries are there and verified
#
# Sources are git repositories: $BLIXARD_MICROVM_GIT and $BLIXARD_NIXPKGS_LIB_GIT (a path
# or URL; default the projects' GitHub repositories). A machine that reaches neither
# leaves the cache empty, and tests/nix/check.sh then says so in its summary line.
#
# Why this nixpkgs lib: flake.lock pins nixpkgs 643809054d65 (lastModified 1785692966,
# 2026-08-02). nixpkgs.lib mirrors only nixpkgs' lib/ and has no commit for that
# revision; NIXPKGS_LIB_REV is its master at 2026-06-14, the newest lib we have that is
# not newer than the lock. The checks use lib.evalModules, lib.types and lib.runTests,
# which did not change in between in any way the checks depend on; move the pin
# forward with the lock.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cache=${BLIXARD_NIX_CACHE:-/var/cache/blixard}
NIXPKGS_LIB_REV=de42d44212d207476489bce163375d8306a26d59
microvm_git=${BLIXARD_MICROVM_GIT:-https://github.com/microvm-nix/microvm.nix}
nixpkgs_lib_git=${BLIXARD_NIXPKGS_LIB_GIT:-https://github.com/nix-community/nixpkgs.lib}

die() { echo "tests/nix/prepare.sh: $*" >&2; exit 1; }

lock() { jq -r "$1" "$repo/flake.lock"; }
microvm_rev=$(lock '.nodes.microvm.locked.rev')
microvm_nar=$(lock '.nodes.microvm.locked.narHash')
microvm_dir="$cache/microvm.nix-$microvm_rev"
lib_dir="$cache/nixpkgs-lib"

nar_hash() { nix --extra-experimental-features nix-command hash path "$1"; }

# Each entry is complete once its marker exists: .nar-hash (microvm.nix, checked against
# the lock) or .rev (nixpkgs-lib, the pinned revision).
microvm_ok() { [[ -f "$microvm_dir/.nar-hash" && $(cat "$microvm_dir/.nar-hash") == "$microvm_nar" ]]; }
lib_ok() { [[ -f "$lib_dir/.rev" && $(cat "$lib_dir/.rev") == "$NIXPKGS_LIB_REV" && -f "$lib_dir/lib/modules.nix" ]]; }

if [[ "${1:-}" == --check ]]; then
  microvm_ok && lib_ok
  exit
fi
[[ -z "${1:-}" ]] || die "unknown argument '$1' (expected --check)"

# Exports REV of the git repository SOURCE into DEST (replacing it), via a bare clone
# in a temp dir unless SOURCE is a local repository that has the commit already.
export_rev() { # SOURCE REV DEST
  local source=$1 rev=$2 dest=$3 work git_dir
  work=$(mktemp -d "$cache/.prepare.XXXXXX")
  # shellcheck disable=SC2064 # expand now: the trap outlives the locals
  trap "rm -rf '$work'" RETURN
  if git -C "$source" cat-file -e "$rev^{commit}" 2> /dev/null; then
    git_dir=$source
  else
    git_dir="$work/repo.git"
    git init --quiet --bare "$git_dir"
    timeout 300 git -C "$git_dir" fetch --quiet --depth 1 "$source" "$rev" ||
      die "cannot fetch $rev from $source (set BLIXARD_MICROVM_GIT / BLIXARD_NIXPKGS_LIB_GIT to a reachable copy)"
  fi
  mkdir "$work/tree"
  git -C "$git_dir" archive "$rev" | tar -x -C "$work/tree"
  rm -rf "$dest"
  mv -T "$work/tree" "$dest"
}

mkdir -p "$cache"
exec 9> "$cache/.lock"
flock 9

if ! microvm_ok; then
  echo "tests/nix/prepare.sh: microvm.nix $microvm_rev into $microvm_dir" >&2
  export_rev "$microvm_git" "$microvm_rev" "$microvm_dir"
  got=$(nar_hash "$microvm_dir")
  if [[ "$got" != "$microvm_nar" ]]; then
    rm -rf "$microvm_dir"
    die "microvm.nix $microvm_rev has NAR hash $got, but flake.lock says $microvm_nar"
  fi
  echo "$got" > "$microvm_dir/.nar-hash"
fi

if ! lib_ok; then
  echo "tests/nix/prepare.sh: nixpkgs.lib $NIXPKGS_LIB_REV into $lib_dir" >&2
  export_rev "$nixpkgs_lib_git" "$NIXPKGS_LIB_REV" "$lib_dir"
  echo "$NIXPKGS_LIB_REV" > "$lib_dir/.rev"
fi
echo "tests/nix/prepare.sh: $microvm_dir and $lib_dir are ready" >&2

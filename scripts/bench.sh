#!/usr/bin/env bash
# Runs every Blixard benchmark and prints its results (BENCHMARKS.md says
# what each measures, its goal, and the numbers recorded so far).
#
#   scripts/bench.sh                   # all of them
#   scripts/bench.sh throughput idle   # some: consensus scheduler throughput idle restart dashboard scale
#
# Run it on a quiet machine: other work on the cores skews every number.
# It installs Debian's etcd-server (the throughput comparison's etcd 3.4)
# if it is missing, which needs root. etcd and the agents listen only on
# 127.x.y.z loopback addresses and store their data under $TMPDIR
# (default /tmp): point TMPDIR at the disk you mean to measure.
#
# Environment:
#   BLIXARD_BENCH_QUICK=1   short runs (to check the tooling, not to record)
set -euo pipefail
cd "$(dirname "$0")/.."

all=(consensus scheduler throughput idle restart dashboard scale)
if [ $# -gt 0 ]; then selected=("$@"); else selected=("${all[@]}"); fi
for name in "${selected[@]}"; do
  case " ${all[*]} " in
    *" $name "*) ;;
    *) echo "error: unknown benchmark '$name' (known: ${all[*]})" >&2; exit 2 ;;
  esac
done
wants() { case " ${selected[*]} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
log() { printf '\n==> %s\n' "$*"; }

if wants throughput || wants idle; then
  if ! command -v etcd >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
      echo "error: etcd is missing; run as root so this can install Debian's etcd-server, or install it" >&2
      exit 2
    fi
    log "installing etcd-server (etcd 3.4, the comparison for the throughput benchmark)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server
  fi
fi

if [ -n "${BLIXARD_BENCH_QUICK:-}" ]; then
  export BLIXARD_BENCH_SECONDS=1
  throughput_args=(--seconds 3 --warmup-seconds 1)
  idle_args=(--seconds 5 --settle-seconds 2)
  restart_args=(--vms 5000 --trials 1 --idle-seconds 3)
  scale_args=(--agents 20 --vms 200 --seconds 3 --idle-seconds 5)
  export BLIXARD_BENCH_DASHBOARD_VMS=${BLIXARD_BENCH_DASHBOARD_VMS:-1000}
else
  throughput_args=()
  idle_args=()
  restart_args=()
  scale_args=()
fi

log "building (release)"
# One invocation for both binaries: building them separately resolves the
# dependencies' features differently and compiles everything twice.
cargo build --release --quiet -p blixard-agent --bin blixard-agent -p blixard-systests --bin blixard-load
cargo bench --quiet -p blixard-agent --no-run
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
export BLIXARD_AGENT_BIN="$target_dir/release/blixard-agent"
load="$target_dir/release/blixard-load"

log "machine"
echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
echo "cores:   $(nproc)"
echo "memory:  $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
echo "os:      $( (. /etc/os-release && echo "$PRETTY_NAME") 2>/dev/null || uname -s), kernel $(uname -r)"
echo "cpu:     $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
echo "disk:    $(df -h "${TMPDIR:-/tmp}" | awk 'NR == 2 {print $1 " (" $NF ")"}') for ${TMPDIR:-/tmp}"
echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min; above 0.5 means the numbers below are noisy)"
if command -v etcd >/dev/null 2>&1; then echo "etcd:    $(etcd --version 2>/dev/null | head -1)"; fi

if wants consensus; then
  log "consensus: proposals/s and commit latency, 3-node in-process cluster, redb with fsync (issue 2)"
  cargo bench --quiet -p blixard-agent --bench consensus
fi
if wants scheduler; then
  log "scheduler: placing 10,000 VMs on 1,000 hosts (issue 4)"
  cargo bench --quiet -p blixard-agent --bench scheduler
fi
if wants throughput; then
  log "throughput: vm create vs etcd put, 1, 16 and 64 clients, 3 members on loopback, mutual TLS (issues 3, 17)"
  "$load" throughput "${throughput_args[@]}"
  "$load" throughput --target leader --clients 64 "${throughput_args[@]}"
  log "throughput in plain text (insecure), to compare with the cost of authentication (issue 17)"
  "$load" throughput --auth insecure --skip-etcd "${throughput_args[@]}"
fi
if wants idle; then
  log "idle: RSS and CPU per member of a 3-member cluster (issue 3)"
  "$load" idle "${idle_args[@]}"
fi
if wants restart; then
  log "restart: a member whose snapshot and log hold 100,000 VMs, to serving requests (issue 3)"
  "$load" restart "${restart_args[@]}"
fi
if wants scale; then
  log "scale: 100 agents on one machine: formation, idle CPU, commit latency vs 3 members, a learner's failover (issue 21)"
  "$load" scale "${scale_args[@]}"
fi
if wants dashboard; then
  log "dashboard: page load and live-update cost at 1,000 and 10,000 VMs, headless Chromium (issue 20)"
  # A program in the browser test's file (it shares its WebDriver client and
  # TLS cluster); it prints a table and asserts nothing.
  cargo test --release --quiet -p blixard-agent --test dashboard_browser -- --ignored --nocapture \
    bench_dashboard_page_load_and_live_updates
fi
# The failover benchmark (issue 4) runs in the container test bed; see
# BENCHMARKS.md, "Failover (issue 4)".
log "done"

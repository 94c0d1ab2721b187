#!/usr/bin/env bash
# A local Blixard cluster in one command: three agents on 127.0.0.1 with
# the `process` runtime and a few demo guests. It shows what runs where,
# stops one agent, and shows its guests running again on the others.
#
#   scripts/demo.sh           # build, demonstrate, then keep the cluster up until Ctrl-C
#   scripts/demo.sh --exit    # build, demonstrate, stop everything
#
# Environment: BLIXARD_AGENT_BIN uses that binary instead of building one;
# BLIXARD_DEMO_DIR keeps the agents' files there instead of a temp dir;
# BLIXARD_DEMO_HOST is the loopback address the agents listen on (127.0.0.1).
# The agents run with `insecure = true` (plain text, no authentication), which
# they accept only on a loopback address; a real cluster uses
# `cluster_secret_file` (see README.md, "Security").
# Needs only cargo (and a C compiler for the build); no root, no systemd.
set -euo pipefail
cd "$(dirname "$0")/.."

keep_running=1
[ "${1:-}" = "--exit" ] && keep_running=0

if [ -n "${BLIXARD_AGENT_BIN:-}" ]; then
  bin=$BLIXARD_AGENT_BIN
else
  echo "==> building blixard-agent (release, whole-program optimised: the first build takes several minutes)"
  cargo build --release -p blixard-agent --bin blixard-agent
  bin=$PWD/target/release/blixard-agent
fi

dir=${BLIXARD_DEMO_DIR:-$(mktemp -d -t blixard-demo.XXXXXX)}
mkdir -p "$dir"
names=(demo1 demo2 demo3)
host=${BLIXARD_DEMO_HOST:-127.0.0.1}
ports=(7101 7102 7103)
guests=(web db cache queue)
pids=()

cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -z "${BLIXARD_DEMO_DIR:-}" ]; then rm -rf "$dir"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

members=""
for i in 0 1 2; do
  members+="\"${names[$i]}=$host:${ports[$i]}\", "
done

for i in 0 1 2; do
  name=${names[$i]}
  home=$dir/$name
  mkdir -p "$home"
  # The guests microvm.nix would install: <state_dir>/<name>/current/bin/microvm-run.
  for guest in "${guests[@]}"; do
    mkdir -p "$home/microvms/$guest/current/bin"
    cat >"$home/microvms/$guest/current/bin/microvm-run" <<EOF
#!/bin/sh
echo "guest $guest booted on $name"
exec sleep 100000
EOF
    chmod +x "$home/microvms/$guest/current/bin/microvm-run"
  done
  cat >"$home/agent.toml" <<EOF
node_name = "$name"
listen = "$host:${ports[$i]}"
data_dir = "$home/data"
initial_members = [${members%, }]
# A demo on one machine: plain text, accepted on loopback only.
insecure = true
log_level = "warn"
[runtime]
kind = "process"
state_dir = "$home/microvms"
[capacity]
vcpu = 4
memory_mib = 4096
EOF
done

start_agent() {
  local i=$1
  "$bin" run --config "$dir/${names[$i]}/agent.toml" >>"$dir/${names[$i]}/agent.log" 2>&1 &
  pids[$i]=$!
}

cli_at() { local port=$1; shift; "$bin" "$@" --endpoint "$host:$port"; }
cli() { cli_at "${ports[0]}" "$@"; }

# Waits up to $1 seconds for the command after it to succeed.
wait_for() {
  local seconds=$1; shift
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      echo "error: timed out after ${seconds}s waiting for: $*" >&2
      tail -n 20 "$dir"/*/agent.log >&2
      exit 1
    fi
    sleep 0.2
  done
}

echo "==> starting three agents (files in $dir)"
for i in 0 1 2; do start_agent "$i"; done
has_leader() { cli cluster status --json | grep -q '"leader": *"demo'; }
wait_for 30 has_leader
# Each agent reports its capacity once it is a member; wait for all three so
# the scheduler can spread the guests.
all_report_capacity() { [ "$(cli node list --json | grep -c '"vcpu_total": *[1-9]')" -eq 3 ]; }
wait_for 30 all_report_capacity
cli cluster status

echo
echo "==> creating ${#guests[@]} guests"
for guest in "${guests[@]}"; do
  cli vm create "$guest" --vcpu 1 --memory 256 >/dev/null
done
all_running() { [ "$(cli vm list --json | grep -o '"state": *"running"' | wc -l)" -eq "${#guests[@]}" ]; }
wait_for 60 all_running
cli vm list
echo
cli node list

# Stop the agent that runs the first guest; its guests die with it.
victim_name=$(cli vm status "${guests[0]}" --json | sed -n 's/.*"node": *"\([a-z0-9-]*\)".*/\1/p')
victim=-1
for i in 0 1 2; do [ "${names[$i]}" = "$victim_name" ] && victim=$i; done
if [ "$victim" -lt 0 ]; then
  echo "error: cannot tell which agent runs ${guests[0]}" >&2
  exit 1
fi
survivor=$(( (victim + 1) % 3 ))
echo
echo "==> stopping $victim_name, which runs ${guests[0]}"
started=$SECONDS
kill -TERM "${pids[$victim]}"
wait "${pids[$victim]}" 2>/dev/null || true
moved() {
  local json
  json=$(cli_at "${ports[$survivor]}" vm list --json)
  [ "$(echo "$json" | grep -o '"state": *"running"' | wc -l)" -eq "${#guests[@]}" ] &&
    ! echo "$json" | grep -q "\"node\": *\"$victim_name\""
}
wait_for 60 moved
echo "    every guest is running again on the other agents after about $((SECONDS - started)) s:"
cli_at "${ports[$survivor]}" vm list
echo
cli_at "${ports[$survivor]}" node list

if [ "$keep_running" -eq 1 ]; then
  echo
  echo "==> the cluster keeps running; try, in another terminal:"
  echo "    $bin vm list --endpoint $host:${ports[$survivor]}"
  echo "    $bin vm migrate db --to ${names[$survivor]} --endpoint $host:${ports[$survivor]}"
  echo "    $bin node drain ${names[$survivor]} --endpoint $host:${ports[$survivor]}"
  echo "    restart $victim_name: $bin run --config $dir/$victim_name/agent.toml"
  echo "Press Ctrl-C to stop every agent."
  wait
fi

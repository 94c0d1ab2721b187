#!/usr/bin/env bash
# Checks the shipped monitoring files (scripts/test.sh runs this; needs
# promtool from Debian's `prometheus` package, and jq):
#   - the alert rules parse, and behave as their unit tests say;
#   - the Grafana board is JSON, and every query on it is valid PromQL
#     (each is checked as a recording rule, with $job filled in).
# The metric names they use are checked against the agent's own export by
# `metrics::tests::the_shipped_rules_and_dashboard_name_real_metrics`.
set -euo pipefail
cd "$(dirname "$0")"

promtool check rules prometheus/blixard.rules.yml
(cd prometheus && promtool test rules blixard.rules.test.yml)

jq empty grafana/blixard.json
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
{
  echo "groups:"
  echo "  - name: grafana-board-queries"
  echo "    rules:"
  jq -r '.panels[] | select(.type != "row") | .targets[].expr' grafana/blixard.json |
    sed 's/\$job/blixard/g' |
    awk '{ gsub(/\\/, "\\\\"); gsub(/"/, "\\\""); printf "      - record: board_query_%d\n        expr: \"%s\"\n", NR, $0 }'
} > "$scratch/board.rules.yml"
promtool check rules "$scratch/board.rules.yml"
echo "monitoring files: OK"

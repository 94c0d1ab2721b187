//! The EXAMPLES sections of `--help`, one per command. Kept here so the
//! argument definitions stay readable; tests check each help shows its own.

pub const ROOT: &str = "\
Examples:
  blixard-agent run --config /etc/blixard/agent.toml
  blixard-agent cluster status
  blixard-agent vm create web --vcpu 2 --memory 1024
  blixard-agent vm list --json
  blixard-agent completions bash > /etc/bash_completion.d/blixard-agent

Every client command takes --endpoint HOST:PORT (default: `listen` from /etc/blixard/agent.toml, else \
127.0.0.1:7000) and --json. Exit codes: 0 success, 1 the operation failed (unreachable, timed out, no \
quorum), 2 bad usage or a request the cluster rejects as invalid.";

pub const RUN: &str = "\
Examples:
  blixard-agent run --config /etc/blixard/agent.toml
  blixard-agent run --config agent.toml --log-level debug
  blixard-agent run --node-name h1 --listen 127.0.0.1:7001 --data-dir /tmp/h1 \\
      --initial-member h1=127.0.0.1:7001 --runtime process --state-dir /tmp/h1-vms
  blixard-agent run --node-name h4 --listen 10.0.0.4:7000 --join 10.0.0.1:7000";

pub const GUARD: &str = "\
The agent starts the guard itself (a transient blixard-guard.service, or the NixOS
module's unit); it is not meant to be run by hand. Never restart it while guests
run: every guest requires it, so a restart of the guard restarts them all.

Examples:
  blixard-agent guard --data-dir /var/lib/blixard --state-dir /var/lib/microvms
  blixard-agent guard --fence-if-stale --data-dir /var/lib/blixard";

pub const VM_RECOVER: &str = "\
Only for a VM whose host is down and known to be dead (powered off, its disk
gone): the cluster takes your word for it and starts the VM on NODE at once.
If the old host is alive after all, both copies run until it stops its own.

Examples:
  blixard-agent vm recover db --to h2";

pub const CLUSTER: &str = "\
Examples:
  blixard-agent cluster status
  blixard-agent cluster join 10.0.0.1:7000 --endpoint 10.0.0.4:7000
  blixard-agent cluster leave h3";

pub const CLUSTER_STATUS: &str = "\
Examples:
  blixard-agent cluster status
  blixard-agent cluster status --endpoint 10.0.0.2:7000 --json";

pub const CLUSTER_JOIN: &str = "\
Examples:
  # on the new host, whose agent runs with neither initial_members nor join:
  blixard-agent cluster join 10.0.0.1:7000
  blixard-agent cluster join 10.0.0.1:7000 --endpoint 10.0.0.4:7000 --token-file /run/keys/join";

pub const CLUSTER_JOIN_TOKEN: &str = "\
Examples:
  # on a member: a token for one new host, valid for 15 minutes
  blixard-agent cluster join-token --ttl 15m > join-token
  # on the new host (its agent runs with neither initial_members nor join):
  blixard-agent cluster join 10.0.0.1:7000 --token-file join-token";

pub const CLUSTER_NEW_SECRET: &str = "\
Examples:
  # once, for a new cluster; give the same file to every initial member
  # (services.blixard.clusterSecretFile, e.g. from agenix or sops-nix):
  blixard-agent cluster new-secret /root/blixard-cluster.secret
  # in each agent's config:
  #   cluster_secret_file = \"/run/keys/blixard-cluster.secret\"";

pub const CLUSTER_ISSUE_CLIENT: &str = "\
Examples:
  # on a member (its config names cluster_secret_file), as root:
  blixard-agent cluster issue-client alice --role admin --dir /root/alice
  blixard-agent cluster issue-client grafana --role read-only --days 90 --dir /root/grafana
  # then, from anywhere:
  blixard-agent vm list --endpoint 10.0.0.1:7000 --ca alice/ca.pem --cert alice/alice.pem --key alice/alice.key";

pub const CLUSTER_LEAVE: &str = "\
A member that runs VMs is drained first: each VM runs on another host before
the member is removed. A removed agent stops every guest it still has at once.
--force removes a member now (for a dead host): its VMs move once it has
certainly stopped them, as after a failure.

Examples:
  blixard-agent cluster leave          # the agent at --endpoint leaves
  blixard-agent cluster leave h3           # drains h3 first; h3 may be down
  blixard-agent cluster leave h3 --force   # h3 is dead: remove it now

To bring a removed host back, give it an empty data dir and `cluster join` again.";

pub const CLUSTER_BACKUP: &str = "\
Examples:
  blixard-agent cluster backup /var/backups/blixard-$(date +%F).bak
  blixard-agent cluster backup state.bak --endpoint 10.0.0.2:7000 --json

The backup holds the whole cluster state (members, VMs, placements) at an index a quorum confirmed, so it \
holds every write acknowledged before the command started. It is written to FILE.partial, checked (SHA-256) \
and renamed: FILE is whole or absent. Restore it with `blixard-agent restore --from FILE`.";

pub const RESTORE: &str = "\
Examples:
  systemctl stop blixard; mv /var/lib/blixard /var/lib/blixard.old
  blixard-agent restore --from state.bak --config /etc/blixard/agent.toml
  systemctl start blixard

The disaster path: writes the first state of a NEW cluster (a new cluster id) into the agent's empty data dir, \
from the backup. The new cluster's members are `initial_members` (run the same restore, same backup, on each \
of them before starting any), or this host alone. VMs come back as desired; those placed on a host of the new \
cluster (same name) stay there, the others are placed again. See docs/operations.md.";

pub const RECOVER: &str = "\
Examples:
  systemctl stop blixard
  blixard-agent recover --force-new-cluster --config /etc/blixard/agent.toml
  systemctl start blixard

Only when a majority of the members is gone for good. Makes this stopped member the only member of a NEW \
cluster from its own state: every other member is removed and their VMs are placed again. Refused while any \
other member still answers as a member of the cluster. What can be lost (writes this member never received, \
entries it never saw committed) is printed before it runs and in docs/operations.md. The other hosts then \
join again with an empty data dir.";

pub const NODE: &str = "\
Examples:
  blixard-agent node list
  blixard-agent node drain h2
  blixard-agent node undrain h2";

pub const NODE_LIST: &str = "\
Examples:
  blixard-agent node list
  blixard-agent node list --json";

pub const NODE_DRAIN: &str = "\
Examples:
  blixard-agent node drain h2          # its VMs move to other hosts
  blixard-agent node drain h2 --json";

pub const NODE_UNDRAIN: &str = "\
Examples:
  blixard-agent node undrain h2";

pub const VM: &str = "\
Examples:
  blixard-agent vm create web --vcpu 2 --memory 1024
  blixard-agent vm list
  blixard-agent vm status web
  blixard-agent vm migrate web --to h2
  blixard-agent vm stop web && blixard-agent vm delete web";

pub const VM_CREATE: &str = "\
Examples:
  blixard-agent vm create web --vcpu 2 --memory 1024
  blixard-agent vm create db --vcpu 4 --memory 8192 --node h2
  blixard-agent vm create cache --vcpu 1 --memory 512 --label rack=r1 --label ssd=yes --stopped
  blixard-agent vm create web-2 --vcpu 2 --memory 1024 --anti-affinity web --json

The VM's runner must be installed on the host it is placed on: declare it with
services.blixard.vms.<name> in the NixOS configuration.";

pub const VM_START: &str = "\
Examples:
  blixard-agent vm start web
  blixard-agent vm start web --wait     # until it runs (exit 1 if it fails)

Without --wait the command returns once the cluster has recorded the request; the VM's host starts it \
shortly after.";

pub const VM_STOP: &str = "\
Examples:
  blixard-agent vm stop web
  blixard-agent vm stop web --wait      # until its host has stopped it

A stopped VM keeps its host and the capacity it takes there, so that `vm start` finds room; \
`vm delete` frees it.";

pub const VM_DELETE: &str = "\
Examples:
  blixard-agent vm delete web
  blixard-agent vm delete web --wait    # stop it, wait until it has stopped, then delete it";

pub const VM_UPDATE: &str = "\
Examples:
  blixard-agent vm update web --vcpu 4 --memory 4096
  blixard-agent vm update web --vcpu 4 --restart --wait
  blixard-agent vm update db --label ssd=yes --remove-label rack
  blixard-agent vm update db --node h2          # pin; --unpin to let it run anywhere
  blixard-agent vm update web --anti-affinity web --json

The change is checked as `vm create` checks a new VM and refused (exit 2) with the reason when it does not \
fit: pinned to a host it does not fit on, or no longer fitting its host and fitting on no other. A running \
VM whose host still satisfies the new spec keeps running as started until its next start (--restart \
restarts it now); one whose host no longer does moves to a host that does. In --json, `changed` lists the \
fields that changed and `takes_effect` is \"unchanged\", \"now\", \"next_start\", \"moving\" or \
\"restarted\".";

pub const VM_MIGRATE: &str = "\
Examples:
  blixard-agent vm migrate web --to h2";

pub const VM_LIST: &str = "\
Examples:
  blixard-agent vm list
  blixard-agent vm list --node h2 --state running
  blixard-agent vm list --label tier=web --prefix web-
  blixard-agent vm list --json | jq -r '.[] | select(.state == \"failed\") | .name'

The list is read page by page (1000 VMs a page), each page a consistent read: a VM created or deleted \
meanwhile may or may not be listed, and none is listed twice.";

pub const VM_STATUS: &str = "\
Examples:
  blixard-agent vm status web
  blixard-agent vm status web --json | jq -r .since

In --json, `since` is an RFC 3339 UTC time (\"2025-01-02T03:04:05.678Z\") and `since_unix_ms` the same \
instant in Unix milliseconds, both null when unknown; `node`, `last_error` and `pending_reason` are null \
when empty.";

pub const COMPLETIONS: &str = "\
Examples:
  blixard-agent completions bash > /etc/bash_completion.d/blixard-agent
  blixard-agent completions zsh > \"${fpath[1]}/_blixard-agent\"
  blixard-agent completions fish > ~/.config/fish/completions/blixard-agent.fish";

pub const EVENTS: &str = "\
Examples:
  blixard-agent events                 # what happened since the agent started
  blixard-agent events -n 20           # the last 20 events
  blixard-agent events --follow        # and keep watching
  blixard-agent events --follow --json # one JSON object per line";

pub const VM_LOGS: &str = "\
Examples:
  blixard-agent vm logs web            # the last 50 lines, from web's host
  blixard-agent vm logs web -n 200 -f  # the last 200, then follow";
pub const CERTS: &str = "\
Examples:
  blixard-agent certs ca --dir /root/blixard-pki
  blixard-agent certs host h1 --address 10.0.0.1 --dir /root/blixard-pki
  blixard-agent certs client alice --dir /root/blixard-pki
  blixard-agent certs client grafana --role read-only --dir /root/blixard-pki
  blixard-agent vm list --endpoint 10.0.0.1:7000 --ca ca.pem --cert alice.pem --key alice.key";

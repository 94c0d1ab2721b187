//! The CLI end to end against real agent processes (`blixard-agent run`
//! with the `process` runtime and fake guests) on loopback.
//!
//! Ignored until the daemon branch is merged: on this branch `run` is a
//! placeholder. Run with `cargo test -p blixard-agent --test cli_cluster
//! -- --ignored`. These tests use nothing but the binary's documented
//! contract (config file, CLI, `--json` shapes, exit codes), so they do not
//! depend on the daemon's test helpers. All but
//! `vms_run_migrate_and_drain_through_the_cli` passed against the daemon
//! branch's work in progress; that one also needs placement, the
//! reconciler and the process runtime.

mod cli_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cli_support::{BIN, Out, http_get, run};
use serde_json::Value;

/// Guests every host has a runner for.
const GUESTS: &[&str] = &["web", "db", "cache"];
/// How long a cluster may take to settle in a test.
const SETTLE: Duration = Duration::from_secs(30);

struct Agent {
    name: String,
    address: String,
    /// The HTTP listener (`metrics_listen`): health, readiness, metrics.
    http: String,
    child: Child,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    agents: Vec<Agent>,
    /// Appended to every agent's config (sections after `[capacity]`).
    tail: String,
}

fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").to_string()
}

fn write_runners(state_dir: &Path) {
    for guest in GUESTS {
        let bin = state_dir.join(guest).join("current/bin");
        std::fs::create_dir_all(&bin).unwrap();
        let runner = bin.join("microvm-run");
        std::fs::write(&runner, format!("#!/bin/sh\necho \"{guest} booted\"\nexec sleep 600\n")).unwrap();
        std::fs::set_permissions(&runner, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

impl Cluster {
    /// `n` agents forming one cluster through `initial_members`.
    fn start(n: usize) -> Cluster {
        Cluster::start_with(n, "")
    }

    /// `n` agents whose configs end with `tail`.
    fn start_with(n: usize, tail: &str) -> Cluster {
        Cluster::start_labelled(n, tail, |_| String::new())
    }

    /// As [`Cluster::start_with`], with agent `i`'s top-level config lines
    /// (its `labels`, say) from `own(i)`.
    fn start_labelled(n: usize, tail: &str, own: impl Fn(usize) -> String) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<(String, String)> = (1..=n).map(|i| (format!("h{i}"), free_address())).collect();
        let initial: Vec<String> = members.iter().map(|(name, addr)| format!("\"{name}={addr}\"")).collect();
        let mut cluster = Cluster { dir, agents: Vec::new(), tail: tail.to_string() };
        for (i, (name, address)) in members.iter().enumerate() {
            let extra = format!("initial_members = [{}]\n{}", initial.join(", "), own(i));
            cluster.spawn(name, address, &extra);
        }
        cluster.wait_for_members(n);
        // Agent 0 knowing the leader does not mean every agent does yet
        // (the leader's first message to one may wait out a connection
        // back-off): every agent ready (`/readyz`: a member that knows the
        // leader).
        cluster.wait_until("every agent to know the leader", |c| {
            c.agents
                .iter()
                .all(|a| std::net::TcpStream::connect(&a.http).is_ok() && http_get(&a.http, "/readyz").0 == 200)
        });
        cluster
    }

    fn spawn(&mut self, name: &str, address: &str, extra: &str) {
        let home = self.dir.path().join(name);
        let state_dir = home.join("vms");
        write_runners(&state_dir);
        let http = free_address();
        let config = format!(
            "node_name = \"{name}\"\nlisten = \"{address}\"\nmetrics_listen = \"{http}\"\n\
             data_dir = \"{}\"\n{}{extra}\
             [runtime]\nkind = \"process\"\nstate_dir = \"{}\"\n[capacity]\nvcpu = 8\nmemory_mib = 8192\n{}",
            home.join("data").display(),
            cli_support::LOOPBACK_INSECURE,
            state_dir.display(),
            self.tail
        );
        let path = home.join("agent.toml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(home.join("agent.log")).unwrap())
            .spawn()
            .expect("spawn agent");
        self.agents.push(Agent { name: name.into(), address: address.into(), http, child });
    }

    fn config_of(&self, name: &str) -> PathBuf {
        self.dir.path().join(name).join("agent.toml")
    }

    fn endpoint(&self, i: usize) -> &str {
        &self.agents[i].address
    }

    /// Runs a client command against agent `i`.
    fn cli(&self, i: usize, args: &[&str]) -> Out {
        let config = self.config_of(&self.agents[i].name);
        let mut all = args.to_vec();
        all.extend(["--config", config.to_str().unwrap()]);
        run(&all)
    }

    fn json(&self, i: usize, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(i, &all);
        out.assert_ok();
        out.json()
    }

    fn wait_for_members(&self, n: usize) {
        self.wait_until("the cluster to have a leader and all members", |c| {
            let out = c.cli(0, &["cluster", "status", "--json"]);
            out.code == 0 && {
                let s = out.json();
                !s["leader"].is_null() && s["members"].as_array().is_some_and(|m| m.len() == n)
            }
        });
    }

    /// `vm migrate` through agent `i`, retried while the cluster refuses it
    /// only because the target has not reported its capacity or runners yet
    /// (a member reports them once it has reached a quorum, just after the
    /// cluster forms). A refusal changes nothing, so retrying is safe.
    fn migrate(&self, i: usize, args: &[&str]) -> Out {
        let deadline = Instant::now() + SETTLE;
        loop {
            let out = self.cli(i, args);
            let early = (out.code == 2 && (out.stderr.contains("runner") || out.stderr.contains("does not fit")))
                || (out.code == 1 && out.stderr.contains("not yet known"));
            if !early || Instant::now() >= deadline {
                return out;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_until(&self, what: &str, mut ok: impl FnMut(&Cluster) -> bool) {
        let deadline = Instant::now() + SETTLE;
        while Instant::now() < deadline {
            if ok(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let logs: Vec<String> = self
            .agents
            .iter()
            .map(|a| {
                let log = std::fs::read_to_string(self.dir.path().join(&a.name).join("agent.log")).unwrap_or_default();
                format!("--- {} ---\n{}", a.name, log.lines().rev().take(20).collect::<Vec<_>>().join("\n"))
            })
            .collect();
        panic!("timed out waiting for {what}\n{}", logs.join("\n"));
    }

    fn vm(&self, i: usize, name: &str) -> Value {
        self.json(i, &["vm", "status", name])
    }

    /// `vm status` for a condition being waited on: a transient failure (a
    /// read that timed out on a loaded machine) reads as `null`, not a panic.
    fn vm_now(&self, i: usize, name: &str) -> Value {
        let out = self.cli(i, &["vm", "status", name, "--json"]);
        if out.code == 0 { out.json() } else { Value::Null }
    }
}

#[test]
fn vm_and_node_requests_through_the_cli() {
    let c = Cluster::start(3);

    let created = c.json(0, &["vm", "create", "web", "--vcpu", "1", "--memory", "64"]);
    for key in ["name", "node", "desired", "state", "vcpu", "memory_mib", "since", "last_error"] {
        assert!(created.get(key).is_some(), "{key} missing from {created}");
    }
    assert_eq!(
        (&created["name"], &created["desired"], &created["vcpu"]),
        (&"web".into(), &"running".into(), &1.into())
    );

    // Duplicate and unknown node: rejected, exit 2, nothing changed.
    c.cli(1, &["vm", "create", "web", "--vcpu", "2", "--memory", "128"]).assert_error(2, "web");
    c.cli(1, &["vm", "create", "db", "--vcpu", "1", "--memory", "64", "--node", "h9"]).assert_error(2, "h9");
    // Any member answers, with the same state.
    for i in 0..3 {
        let list = c.json(i, &["vm", "list"]);
        assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
        assert_eq!(list[0]["vcpu"], 1);
        assert_eq!(list[0]["memory_mib"], 64);
    }
    let status = c.vm(2, "web");
    assert!(status["since"].is_string() || status["since"].is_null(), "{status}");
    assert!(status["node"].is_string() || status["node"].is_null(), "{status}");

    assert_eq!(c.json(1, &["vm", "stop", "web"])["desired"], "stopped");
    assert_eq!(c.vm(2, "web")["desired"], "stopped");
    assert_eq!(c.json(2, &["vm", "start", "web"])["desired"], "running");
    c.cli(0, &["vm", "migrate", "web", "--to", "h9"]).assert_error(2, "h9");
    c.cli(0, &["vm", "start", "nope"]).assert_error(2, "nope");

    let drained = c.json(0, &["node", "drain", "h2"]);
    assert_eq!((&drained["name"], &drained["status"]), (&"h2".into(), &"draining".into()));
    let nodes = c.json(1, &["node", "list"]);
    let h2 = nodes.as_array().unwrap().iter().find(|n| n["name"] == "h2").cloned().unwrap();
    assert_eq!(h2["status"], "draining", "{nodes}");
    assert_eq!(c.json(0, &["node", "undrain", "h2"])["status"], "up");
    c.cli(0, &["node", "drain", "h9"]).assert_error(2, "h9");

    assert_eq!(c.json(0, &["vm", "delete", "web"]), serde_json::json!({"name": "web"}));
    c.cli(1, &["vm", "status", "web"]).assert_error(2, "web");
    assert_eq!(c.json(2, &["vm", "list"]), serde_json::json!([]));
}

#[test]
fn vms_run_migrate_and_drain_through_the_cli() {
    let c = Cluster::start(3);
    c.cli(0, &["vm", "create", "web", "--vcpu", "1", "--memory", "64"]).assert_ok();
    c.wait_until("web to run", |c| c.vm_now(2, "web")["state"] == "running");
    let status = c.vm(1, "web");
    assert!(status["node"].is_string(), "{status}");
    assert!(status["since"].is_string(), "{status}");
    assert!(status["last_error"].is_null(), "{status}");

    c.cli(0, &["vm", "stop", "web"]).assert_ok();
    c.wait_until("web to stop", |c| c.vm_now(0, "web")["state"] == "stopped");
    c.cli(0, &["vm", "start", "web"]).assert_ok();
    c.wait_until("web to run again", |c| c.vm_now(0, "web")["state"] == "running");

    let from = c.vm(0, "web")["node"].as_str().unwrap().to_string();
    let to = if from == "h1" { "h2" } else { "h1" };
    c.migrate(0, &["vm", "migrate", "web", "--to", to]).assert_ok();
    c.wait_until("web to run on the target", |c| {
        let v = c.vm_now(0, "web");
        v["node"] == to && v["state"] == "running"
    });

    c.cli(0, &["node", "drain", to]).assert_ok();
    c.wait_until("web to leave the drained node", |c| {
        let v = c.vm_now(0, "web");
        v["node"] != to && v["state"] == "running"
    });
    c.cli(0, &["node", "undrain", to]).assert_ok();
    c.cli(0, &["vm", "delete", "web"]).assert_ok();
    assert_eq!(c.json(0, &["vm", "list"]), serde_json::json!([]));
}

#[test]
fn join_and_leave_through_the_cli() {
    let mut c = Cluster::start(3);
    let seed = c.endpoint(0).to_string();
    let address = free_address();
    // A fourth host with neither initial_members nor join: uninitialised.
    c.spawn("h4", &address, "");
    c.wait_until("h4 to listen", |_| std::net::TcpStream::connect(&address).is_ok());
    // Without TLS, joining needs a one-time token from a member.
    let token_file = c.dir.path().join("join-token");
    c.cli(3, &["cluster", "join", &seed]).assert_error(1, "join token");
    let token = c.cli(1, &["cluster", "join-token", "--ttl", "10m"]);
    token.assert_ok();
    std::fs::write(&token_file, &token.stdout).unwrap();
    let joined = c.json(3, &["cluster", "join", &seed, "--token-file", token_file.to_str().unwrap()]);
    assert_eq!(joined["name"], "h4");
    assert!(joined["id"].as_str().and_then(|id| id.parse::<u64>().ok()).is_some_and(|id| id > 0), "{joined}");
    c.wait_for_members(4);
    // h4 answers from its own state, which lists h4 once it has applied its
    // own admission.
    c.wait_until("h4 to list itself with its address", |c| {
        let out = c.cli(3, &["cluster", "status", "--json"]);
        out.code == 0
            && out.json()["members"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["name"] == "h4" && m["address"] == address.as_str()))
    });

    c.cli(0, &["cluster", "leave", "h9"]).assert_error(2, "h9");
    assert_eq!(c.json(0, &["cluster", "leave", "h4"]), serde_json::json!({"name": "h4"}));
    c.wait_for_members(3);
}

/// The names of the members `cluster status` at agent `i` shows voting
/// (`voter`), or `None` while it cannot answer.
fn voters_at(c: &Cluster, i: usize) -> Option<Vec<String>> {
    let out = c.cli(i, &["cluster", "status", "--json"]);
    if out.code != 0 {
        return None;
    }
    let status = out.json();
    let members = status["members"].as_array()?;
    Some(members.iter().filter(|m| m["voter"] == true).filter_map(|m| m["name"].as_str().map(String::from)).collect())
}

/// Bounded voters (`raft.voters`): of five initial members the leader
/// demotes two to learners; a voter that dies is replaced by a learner
/// (promoted, then the dead one demoted) once it has been silent for
/// `raft.replace_voter_after_ms`, and writes keep committing.
#[test]
fn bounded_voters_demote_extras_and_replace_a_dead_voter() {
    // Zones a, a, b, b, c; h1 and h3 also name a rack.
    const ZONES: [&str; 5] = ["a", "a", "b", "b", "c"];
    let labels = |i: usize| match i {
        0 | 2 => format!("labels = {{ zone = \"{}\", rack = \"r{i}\" }}\n", ZONES[i]),
        _ => format!("labels = {{ zone = \"{}\" }}\n", ZONES[i]),
    };
    let mut c = Cluster::start_labelled(5, "[raft]\nvoters = 3\nreplace_voter_after_ms = 2000\n", labels);
    // Three voters, one in each zone (the demotions keep the spread widest),
    // and every host's labels shown.
    c.wait_until("three voters in three zones, and two learners", |c| {
        let out = c.cli(0, &["cluster", "status", "--json"]);
        let status = if out.code == 0 { out.json() } else { return false };
        let members = status["members"].as_array().cloned().unwrap_or_default();
        let zones: std::collections::BTreeSet<String> = members
            .iter()
            .filter(|m| m["voter"] == true)
            .filter_map(|m| m["zone"].as_str().map(String::from))
            .collect();
        // (A host's labels arrive with its first report.)
        status["voters"] == 3 && zones.len() == 3 && members.iter().all(|m| m["zone"].is_string())
    });
    let status = c.json(0, &["cluster", "status"]);
    assert_eq!((status["voters"].clone(), status["voters_wanted"].clone()), (3.into(), 3.into()), "{status}");
    for m in status["members"].as_array().unwrap() {
        let i: usize = m["name"].as_str().unwrap()[1..].parse::<usize>().unwrap() - 1;
        assert_eq!(m["voter"], m["role"] != "learner", "{status}");
        assert_eq!(m["zone"], ZONES[i], "{status}");
        let rack = if i == 0 || i == 2 { Value::from(format!("r{i}")) } else { Value::Null };
        assert_eq!(m["rack"], rack, "{status}");
    }
    let table = c.cli(0, &["cluster", "status"]);
    table.assert_ok();
    assert!(table.stdout.contains("\nvoters: 3 of 3 wanted\n"), "{}", table.stdout);
    let header = table.stdout.lines().find(|l| l.starts_with("NAME")).unwrap_or_default().to_string();
    let columns: Vec<&str> = header.split_whitespace().collect();
    assert_eq!(columns, ["NAME", "ID", "ADDRESS", "ROLE", "VOTER", "HEALTHY", "ZONE", "RACK"], "{}", table.stdout);
    let votes = table.stdout.lines().filter(|l| l.split_whitespace().nth(4) == Some("yes")).count();
    assert_eq!(votes, 3, "{}", table.stdout);
    let leader = status["leader"].as_str().expect("a leader").to_string();
    let before = voters_at(&c, 0).expect("status");
    let victim = before.iter().find(|name| **name != leader).expect("a voter that does not lead").clone();
    let dead = c.agents.iter().position(|a| a.name == victim).expect("the victim's agent");
    c.agents[dead].child.kill().unwrap();
    c.agents[dead].child.wait().unwrap();
    let alive = (0..c.agents.len()).find(|&i| i != dead).unwrap();
    c.wait_until("a learner to replace the dead voter", |c| {
        voters_at(c, alive).is_some_and(|v| v.len() == 3 && !v.contains(&victim))
    });
    let status = c.json(alive, &["cluster", "status"]);
    let member = status["members"].as_array().unwrap().iter().find(|m| m["name"] == victim.as_str()).cloned();
    let member = member.expect("the dead voter stays a member");
    assert_eq!(member["role"], "learner", "{status}");
    assert_eq!(member["voter"], false, "{status}");
    assert_eq!(member["healthy"], false, "{status}");
    assert_eq!(status["voters"], 3, "{status}");
    c.cli(alive, &["vm", "create", "after-replacement", "--vcpu", "1", "--memory", "64"]).assert_ok();
}

#[test]
fn a_stopped_cluster_is_unreachable_with_exit_1() {
    let mut c = Cluster::start(1);
    let endpoint = c.endpoint(0).to_string();
    c.agents.clear(); // kills the agent
    let out = run(&["vm", "list", "--endpoint", &endpoint, "--config", "/dev/null", "--timeout", "2"]);
    out.assert_error(1, &endpoint);
}

/// `GET path` on `address` over plain HTTP/1.1: (status code, body).
/// The value of the sample `name` with exactly `labels` in a parsed scrape.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape.samples.iter().find_map(|s| {
        let matches = s.metric == name
            && s.labels.iter().count() == labels.len()
            && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v));
        match (matches, &s.value) {
            (true, prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Counter(v)) => Some(*v),
            (true, prometheus_parse::Value::Untyped(v)) => Some(*v),
            _ => None,
        }
    })
}

fn scrape(address: &str) -> prometheus_parse::Scrape {
    let (code, body) = http_get(address, "/metrics");
    assert_eq!(code, 200, "{body}");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("the scrape parses as Prometheus text")
}

#[test]
fn metrics_are_scraped_as_prometheus_text() {
    let c = Cluster::start(3);
    let (code, body) = http_get(&c.agents[1].http, "/readyz");
    assert_eq!(code, 200, "{body}");
    // The CLI pointed at the HTTP port by mistake says so, in one sentence.
    run(&["cluster", "status", "--endpoint", &c.agents[1].http, "--config", "/dev/null"])
        .assert_error(1, "answered in plain HTTP, not gRPC");
    c.cli(0, &["vm", "create", "web", "--vcpu", "1", "--memory", "64"]).assert_ok();
    c.wait_until("web to run", |c| c.vm_now(0, "web")["state"] == "running");
    let host = c.vm(0, "web")["node"].as_str().unwrap().to_string();
    let leader = c.json(0, &["cluster", "status"])["leader"].as_str().unwrap().to_string();
    let leader_index = c.agents.iter().position(|a| a.name == leader).unwrap();

    // Every member counts the VM where it runs, once the report applied.
    for agent in &c.agents {
        let mut last = None;
        c.wait_until("the scrape to count web as running", |_| {
            let s = scrape(&agent.http);
            last = sample(&s, "blixard_vms", &[("host", &host), ("state", "running")]);
            last == Some(1.0)
        });
        let s = scrape(&agent.http);
        assert!(sample(&s, "blixard_raft_term", &[]).unwrap() >= 1.0);
        assert!(sample(&s, "blixard_raft_applied_index", &[]).unwrap() > 0.0);
        assert!(sample(&s, "blixard_raft_commit_index", &[]).unwrap() > 0.0);
        assert!(sample(&s, "blixard_raft_leader_changes_total", &[]).unwrap() >= 1.0);
        assert!(sample(&s, "blixard_raft_reachable_peers", &[]).unwrap() >= 1.0);
        assert!(s.docs.contains_key("blixard_raft_proposal_duration_seconds"), "{:?}", s.docs.keys());
        assert!(s.docs.contains_key("blixard_reconcile_duration_seconds"));
    }
    let s = scrape(&c.agents[leader_index].http);
    assert_eq!(sample(&s, "blixard_raft_is_leader", &[]), Some(1.0));
    // (Raft's activity flags are cleared at each quorum check until each
    // peer's next answer, a heartbeat later at most.)
    c.wait_until("the leader to count both peers reachable", |_| {
        sample(&scrape(&c.agents[leader_index].http), "blixard_raft_reachable_peers", &[]) == Some(2.0)
    });
    assert!(sample(&s, "blixard_scheduler_decisions_total", &[("kind", "place")]).unwrap() >= 1.0);
    assert!(s.docs.contains_key("blixard_scheduler_plan_duration_seconds"), "{:?}", s.docs.keys());
    // A VM no host has a runner for fits nowhere, and the leader says so.
    c.cli(0, &["vm", "create", "ghost", "--vcpu", "1", "--memory", "64"]).assert_ok();
    c.wait_until("the leader to count ghost as fitting nowhere", |_| {
        sample(&scrape(&c.agents[leader_index].http), "blixard_scheduler_blocked_vms", &[]) == Some(1.0)
    });
    // The histograms have observations: the reconciler's on every host,
    // proposals on the host that reported web's state.
    let host_index = c.agents.iter().position(|a| a.name == host).unwrap();
    let s = scrape(&c.agents[host_index].http);
    let count = |s: &prometheus_parse::Scrape, name: &str| {
        s.samples.iter().find_map(|x| match &x.value {
            prometheus_parse::Value::Histogram(h) if x.metric == name => {
                Some(h.iter().map(|b| b.count).fold(0.0, f64::max))
            }
            _ => None,
        })
    };
    assert!(count(&s, "blixard_reconcile_duration_seconds").unwrap() > 0.0);
    let s = scrape(&c.agents[leader_index].http);
    assert!(count(&s, "blixard_scheduler_plan_duration_seconds").unwrap() > 0.0);

    // At rest the leader's heartbeats carry every host's quorum contact: a
    // host reads it itself only when those confirmations stop (an election,
    // a stall), once its contact is 600 ms old. Over 40 reconciler passes
    // (a pass a tick, 150 ms, and one per read), a host without
    // confirmations reads about 7 times; allow a hiccup, not a habit.
    let counters = |c: &Cluster| -> Vec<(f64, f64)> {
        c.agents
            .iter()
            .map(|a| {
                let s = scrape(&a.http);
                let reads = sample(&s, "blixard_contact_reads_total", &[]).unwrap_or(0.0);
                (reads, count(&s, "blixard_reconcile_duration_seconds").unwrap_or(0.0))
            })
            .collect()
    };
    let before = counters(&c);
    c.wait_until("40 reconciler passes on every host", |c| {
        counters(c).iter().zip(&before).all(|(now, then)| now.1 >= then.1 + 40.0)
    });
    for ((now, then), agent) in counters(&c).iter().zip(&before).zip(&c.agents) {
        assert!(now.0 - then.0 <= 2.0, "{} read its quorum contact {} times", agent.name, now.0 - then.0);
    }
}

/// The `--json` events of agent `i`.
/// (Empty when the call fails, as a condition being waited on.)
fn events(c: &Cluster, i: usize) -> Vec<Value> {
    let out = c.cli(i, &["events", "--json"]);
    if out.code != 0 {
        return Vec::new();
    }
    out.json().as_array().cloned().expect("events --json is an array")
}

fn has_event(events: &[Value], kind: &str, vm: &str, node: &str) -> bool {
    events.iter().any(|e| e["kind"] == kind && e["vm"] == vm && e["node"] == node)
}

#[test]
fn events_show_placement_and_failover_on_every_member() {
    let mut c = Cluster::start(3);
    // Bad input: exit 2, nothing sent.
    c.cli(0, &["events", "-n", "0"]).assert_error(2, "");
    c.cli(0, &["vm", "create", "web", "--vcpu", "1", "--memory", "64"]).assert_ok();
    c.wait_until("web to run", |c| c.vm_now(0, "web")["state"] == "running");
    let host = c.vm(0, "web")["node"].as_str().unwrap().to_string();
    // Every member derived the same VM events, with the same Raft index.
    c.wait_until("every member to see web placed and running", |c| {
        (0..3).all(|i| {
            let e = events(c, i);
            has_event(&e, "vm_placed", "web", &host) && has_event(&e, "vm_started", "web", &host)
        })
    });
    let placed_index = |e: &[Value]| e.iter().find(|e| e["kind"] == "vm_placed").map(|e| e["index"].clone());
    let index0 = placed_index(&events(&c, 0));
    assert!((1..3).all(|i| placed_index(&events(&c, i)) == index0));
    let last = c.cli(0, &["events", "-n", "1"]);
    last.assert_ok();
    assert_eq!(last.stdout.lines().count(), 1, "{}", last.stdout);

    // A follower of a surviving member sees the failover as it happens.
    let survivor = c.agents.iter().position(|a| a.name != host).unwrap();
    let survivor_name = c.agents[survivor].name.clone();
    let config = c.config_of(&survivor_name);
    let mut follow = Command::new(BIN)
        .args(["events", "--follow", "--json", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });

    let victim = c.agents.iter().position(|a| a.name == host).unwrap();
    c.agents.remove(victim); // kills web's host
    let survivor = c.agents.iter().position(|a| a.name == survivor_name).unwrap();
    c.wait_until("web to run on a survivor", |c| {
        let v = c.vm_now(survivor, "web");
        v["node"] != host.as_str() && v["state"] == "running"
    });
    let e = events(&c, survivor);
    assert!(e.iter().any(|e| e["kind"] == "host_down" && e["node"] == host), "{e:?}");
    assert!(e.iter().any(|e| e["kind"] == "vm_moved" && e["vm"] == "web" && e["from"] == host), "{e:?}");

    // The follower printed the move, one JSON object per line.
    let deadline = Instant::now() + SETTLE;
    let mut seen = Vec::new();
    let moved = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = lines.recv_timeout(left) else { break false };
        let event: Value = serde_json::from_str(&line).expect("each followed line is a JSON object");
        seen.push(line);
        if event["kind"] == "vm_moved" && event["vm"] == "web" && event["from"] == host {
            break true;
        }
    };
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(moved, "the follower never printed web's move: {seen:#?}");
}

#[test]
fn grpc_health_and_reflection_answer_standard_clients() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let c = Cluster::start(1);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let endpoint = format!("http://{}", c.endpoint(0));
    runtime.block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(endpoint).unwrap().connect().await.unwrap();
        let mut health = HealthClient::new(channel.clone());
        let check = |service: &str| HealthCheckRequest { service: service.into() };
        let overall = health.check(check("")).await.unwrap().into_inner();
        assert_eq!(overall.status(), ServingStatus::Serving);
        // The API service is serving once the member knows a leader.
        let deadline = Instant::now() + SETTLE;
        loop {
            let s = health.check(check("blixard.v1.Blixard")).await.unwrap().into_inner();
            if s.status() == ServingStatus::Serving {
                break;
            }
            assert!(Instant::now() < deadline, "blixard.v1.Blixard never became SERVING: {s:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let unknown = health.check(check("no.such.Service")).await.unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);

        let mut reflection = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses =
            reflection.server_reflection_info(futures_util::stream::iter([request])).await.unwrap().into_inner();
        let response = responses.message().await.unwrap().expect("one answer");
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("not a service list: {response:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for name in ["blixard.v1.Blixard", "blixard.v1.Peer", "grpc.health.v1.Health"] {
            assert!(names.iter().any(|n| n == name), "{name} missing from {names:?}");
        }
    });
}

#[test]
fn migrate_and_drain_wait_until_done_and_show_progress() {
    let c = Cluster::start(3);
    c.cli(0, &["vm", "create", "web", "--vcpu", "1", "--memory", "64"]).assert_ok();
    c.cli(0, &["vm", "create", "db", "--vcpu", "1", "--memory", "64"]).assert_ok();
    c.wait_until("web and db to run", |c| {
        c.vm_now(0, "web")["state"] == "running" && c.vm_now(0, "db")["state"] == "running"
    });
    // --wait-timeout without --wait is bad usage.
    c.cli(0, &["node", "drain", "h1", "--wait-timeout", "5"]).assert_error(2, "--wait");

    let from = c.vm(0, "web")["node"].as_str().unwrap().to_string();
    let to = if from == "h1" { "h2" } else { "h1" };
    let out = c.migrate(1, &["vm", "migrate", "web", "--to", to, "--wait"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("migrated"), "{out:?}");
    assert!(out.stderr.contains(&format!("moving web to {to}")), "{out:?}");
    // Returned only once done: no waiting here.
    let web = c.vm(0, "web");
    assert_eq!((web["node"].as_str(), web["state"].as_str()), (Some(to), Some("running")), "{web}");

    let out = c.cli(2, &["node", "drain", to, "--wait", "--wait-timeout", "60"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains(&format!("draining {to}:")), "{out:?}");
    assert!(out.stderr.contains(&format!("{to} is drained")), "{out:?}");
    for vm in ["web", "db"] {
        let v = c.vm(0, vm);
        assert!(v["node"] != to && v["state"] == "running", "{vm} after drain --wait: {v}");
    }
}

#[test]
fn vm_logs_come_from_the_guests_host_through_any_member() {
    let c = Cluster::start(3);
    c.cli(0, &["vm", "logs", "web", "-n", "0"]).assert_error(2, "--lines");
    c.cli(0, &["vm", "logs", "nope"]).assert_error(2, "nope");
    c.cli(0, &["vm", "create", "web", "--vcpu", "1", "--memory", "64"]).assert_ok();
    c.wait_until("web to run", |c| c.vm_now(0, "web")["state"] == "running");
    let host = c.vm(0, "web")["node"].as_str().unwrap().to_string();
    let other = c.agents.iter().position(|a| a.name != host).unwrap();
    // The runner prints its line right after it starts.
    c.wait_until("web's log to show its boot line", |c| {
        let out = c.cli(other, &["vm", "logs", "web"]);
        out.code == 0 && out.stdout.lines().any(|l| l == "web booted")
    });
    let out = c.cli(other, &["vm", "logs", "web", "--json", "-n", "1"]);
    out.assert_ok();
    let line: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!((line["node"].as_str(), line["line"].as_str()), (Some(host.as_str()), Some("web booted")));

    // Following: the past lines come at once and the stream stays open.
    let config = c.config_of(&c.agents[other].name);
    let mut follow = Command::new(BIN)
        .args(["vm", "logs", "web", "-f", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut first = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut first);
        let _ = tx.send(first);
    });
    let first = rx.recv_timeout(SETTLE).expect("a followed line");
    assert_eq!(first.trim_end(), "web booted");
    assert!(follow.try_wait().unwrap().is_none(), "vm logs -f ended by itself");
    let _ = follow.kill();
    let _ = follow.wait();
}

/// The process ids of live processes whose working directory is `dir`
/// (a process-runtime guest runs in `<state_dir>/<name>`).
fn processes_in(dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|pid| {
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
                .unwrap_or(true);
            !zombie && std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir)
        })
        .collect()
}

/// The agent's fence guard: its child running `blixard-agent guard`.
fn guard_of(agent: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let ppid: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let guard = cmdline.split(|b| *b == 0).nth(1) == Some(b"guard".as_slice());
        (ppid == agent && guard).then_some(pid)
    })
}

/// Samples, 20 times a second, on which hosts each guest has a live
/// process; remembers any moment a guest had one on two hosts.
struct CopySampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<(usize, Vec<String>)>>,
}

impl CopySampler {
    fn start(c: &Cluster) -> CopySampler {
        let homes: Vec<(String, PathBuf)> =
            c.agents.iter().map(|a| (a.name.clone(), c.dir.path().join(&a.name).join("vms"))).collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut rounds, mut doubles) = (0, Vec::new());
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                for guest in GUESTS {
                    let on: Vec<&str> = homes
                        .iter()
                        .filter(|(_, vms)| !processes_in(&vms.join(guest)).is_empty())
                        .map(|(name, _)| name.as_str())
                        .collect();
                    if on.len() > 1 {
                        doubles.push(format!("{guest} on {on:?} in round {rounds}"));
                    }
                }
                rounds += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            (rounds, doubles)
        });
        CopySampler { stop, thread: Some(thread) }
    }

    fn assert_never_two_copies(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (rounds, doubles) = self.thread.take().unwrap().join().unwrap();
        assert!(rounds > 20, "the sampler ran only {rounds} rounds");
        assert!(doubles.is_empty(), "two copies at once: {doubles:#?}");
    }
}

/// The process runtime gets the guard too: a frozen agent's guests are
/// killed by it (they do not outlive the freeze), each VM runs on exactly
/// one other host, and a killed guard is started again by its agent.
#[test]
fn a_frozen_agent_s_guests_are_stopped_by_its_guard_and_run_once_elsewhere() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let c = Cluster::start(3);
    for guest in GUESTS {
        c.cli(0, &["vm", "create", guest, "--vcpu", "1", "--memory", "64"]).assert_ok();
    }
    c.wait_until("every guest to run", |c| GUESTS.iter().all(|g| c.vm_now(0, g)["state"] == "running"));
    let sampler = CopySampler::start(&c);
    let host_name = c.vm(0, "web")["node"].as_str().unwrap().to_string();
    let host = c.agents.iter().position(|a| a.name == host_name).unwrap();
    let survivor = (host + 1) % 3;
    let agent = c.agents[host].child.id();
    c.wait_until("the guard to run", |_| guard_of(agent).is_some());
    let on_host: Vec<&str> =
        GUESTS.iter().copied().filter(|g| c.vm(survivor, g)["node"] == host_name.as_str()).collect();
    let vms = c.dir.path().join(&host_name).join("vms");

    kill(Pid::from_raw(agent as i32), Signal::SIGSTOP).unwrap();
    let frozen_at = Instant::now();
    c.wait_until("the frozen agent's guests to be killed", |_| {
        on_host.iter().all(|g| processes_in(&vms.join(g)).is_empty())
    });
    eprintln!("{host_name} frozen: its guests {on_host:?} were gone {:?} later", frozen_at.elapsed());
    c.wait_until("the guests to run elsewhere", |c| {
        on_host.iter().all(|g| {
            let v = c.vm_now(survivor, g);
            v["node"] != host_name.as_str() && v["state"] == "running"
        })
    });
    kill(Pid::from_raw(agent as i32), Signal::SIGCONT).unwrap();
    c.wait_until("the thawed agent to have quorum again", |c| {
        let out = c.cli(host, &["cluster", "status", "--json"]);
        out.code == 0 && out.json()["quorum"] == true
    });
    // It takes nothing back.
    assert!(GUESTS.iter().all(|g| processes_in(&vms.join(g)).is_empty()), "the thawed host restarted a guest");

    // A killed guard is started again by its agent.
    let agent = c.agents[survivor].child.id();
    let guard = guard_of(agent).expect("the survivor's guard");
    kill(Pid::from_raw(guard as i32), Signal::SIGKILL).unwrap();
    c.wait_until("the guard to be started again", |_| guard_of(agent).is_some_and(|g| g != guard));
    sampler.assert_never_two_copies();
}

/// A member that cannot reach a quorum says so: reads fail with one
/// sentence saying why, `--stale` gives its last known state on purpose
/// (and says how old), `cluster status` shows it; a VM pinned to a host
/// that is down is `lost`, with the reason it cannot fail over; a manual
/// VM waits there (while an automatic one fails over) until `vm recover`.
#[test]
fn lost_vms_stale_views_and_vm_recover() {
    let mut c = Cluster::start(3);
    let placed = |c: &Cluster, i: usize, vm: &str| c.vm_now(i, vm)["node"].as_str().map(str::to_string);
    // (Retried like a migrate while h3 has not reported its capacity yet.)
    c.migrate(0, &["vm", "create", "web", "--vcpu", "1", "--memory", "64", "--node", "h3"]).assert_ok();
    c.cli(0, &["vm", "create", "db", "--vcpu", "1", "--memory", "64", "--failover", "manual"]).assert_ok();
    c.cli(0, &["vm", "create", "cache", "--vcpu", "1", "--memory", "64"]).assert_ok();
    c.cli(0, &["vm", "create", "x", "--vcpu", "1", "--memory", "64", "--failover", "bogus"]).assert_error(2, "manual");
    c.wait_until("every VM to run", |c| GUESTS.iter().all(|vm| c.vm_now(0, vm)["state"] == "running"));
    for vm in ["db", "cache"] {
        let out = c.migrate(0, &["vm", "migrate", vm, "--to", "h3", "--wait"]);
        assert_eq!(out.code, 0, "{out:?}");
    }
    assert_eq!(c.vm(0, "db")["failover"], "manual");

    // h3 dies (its guests die with it: the process runtime).
    let h3 = c.agents.iter().position(|a| a.name == "h3").unwrap();
    let _ = c.agents[h3].child.kill();
    let _ = c.agents[h3].child.wait();
    c.wait_until("the automatic VM to fail over", |c| {
        c.vm_now(0, "cache")["state"] == "running" && placed(c, 0, "cache").as_deref() != Some("h3")
    });
    // By then the others would have moved too, if they could.
    for vm in ["web", "db"] {
        assert_eq!((c.vm(0, vm)["state"].clone(), placed(&c, 0, vm)), ("lost".into(), Some("h3".into())), "{vm}");
    }
    let web = c.vm(1, "web");
    let why = web["pending_reason"].as_str().unwrap_or_default();
    assert!(why.contains("h3 is down; cannot fail over: pinned to h3"), "{web}");
    let text = c.cli(1, &["vm", "status", "web"]);
    text.assert_ok();
    assert!(text.stdout.contains("lost because:"), "{}", text.stdout);
    let db = c.vm(1, "db");
    assert!(db["pending_reason"].as_str().unwrap_or_default().contains("vm recover db --to NODE"), "{db}");
    let e = events(&c, 0);
    assert!(e.iter().any(|e| e["kind"] == "vm_lost" && e["vm"] == "db"), "{e:?}");
    // The operator vouches h3 is dead: db runs on h2.
    c.cli(0, &["vm", "recover", "db", "--to", "h2"]).assert_ok();
    c.cli(0, &["vm", "recover", "web", "--to", "h9"]).assert_error(2, "h9");
    c.wait_until("db to run on h2", |c| {
        c.vm_now(0, "db")["state"] == "running" && placed(c, 0, "db").as_deref() == Some("h2")
    });
    // Recovering a VM whose host is up is refused: that is `vm migrate`.
    c.cli(0, &["vm", "recover", "db", "--to", "h1"]).assert_error(2, "vm migrate");

    // h2 goes too: h1 alone has no quorum, and says so.
    let h2 = c.agents.iter().position(|a| a.name == "h2").unwrap();
    let _ = c.agents[h2].child.kill();
    let _ = c.agents[h2].child.wait();
    let h1 = c.agents.iter().position(|a| a.name == "h1").unwrap();
    c.wait_until("h1 to know it has no quorum", |c| {
        let out = c.cli(h1, &["cluster", "status", "--json"]);
        out.code == 0 && out.json()["quorum"] == false
    });
    let out = c.cli(h1, &["vm", "list"]);
    out.assert_error(1, "cannot reach a quorum");
    assert!(out.stderr.contains("--stale"), "{}", out.stderr);
    let stale = c.cli(h1, &["vm", "list", "--stale", "--json"]);
    assert_eq!(stale.code, 0, "{stale:?}");
    assert_eq!(stale.json().as_array().map(Vec::len), Some(GUESTS.len()), "{}", stale.stdout);
    assert!(stale.stderr.contains("no quorum contact for"), "{}", stale.stderr);
    let status = c.cli(h1, &["cluster", "status"]);
    assert!(status.stdout.contains("quorum: NO"), "{}", status.stdout);
}

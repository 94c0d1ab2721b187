//! The built `blixard-agent` binary against a fake agent: exit codes,
//! one-sentence errors, nothing sent on bad input, output shapes, and the
//! mapping of every gRPC status to an exit code.

mod cli_support;

use std::io::Write;
use std::time::{Duration, Instant};

use cli_support::{Fake, SINCE_UNIX_MS, run};
use serde_json::json;
use tonic::Code;

/// Bad input: (arguments, a piece of the one-sentence error). Each is run
/// with `--endpoint` pointing at a fake agent that must receive nothing.
#[rustfmt::skip]
const BAD_INPUT: &[(&[&str], &str)] = &[
    (&["vm", "create", "web", "--vcpu", "1", "--memory", "64", "--frobnicate"], "unknown flag --frobnicate for `vm create`; see `blixard-agent vm create --help`"),
    (&["vm", "frobnicate"], "unknown subcommand \"frobnicate\" for `vm`"),
    (&["frobnicate"], "unknown subcommand \"frobnicate\" for blixard-agent"),
    (&["vm", "create", "web"], "`vm create` needs --vcpu N and --memory MIB"),
    (&["vm", "create", "--vcpu", "1", "--memory", "64"], "`vm create` needs NAME"),
    (&["vm", "migrate", "web"], "`vm migrate` needs --to NODE"),
    (&["vm", "start"], "`vm start` needs NAME"),
    (&["node", "drain"], "`node drain` needs NODE"),
    (&["vm", "list", "extra"], "unexpected argument \"extra\" for `vm list`"),
    (&["vm", "create", "../x", "--vcpu", "1", "--memory", "64"], "name \"../x\" must start with a lower-case letter"),
    (&["vm", "create", "a b", "--vcpu", "1", "--memory", "64"], "name \"a b\""),
    (&["vm", "create", "x.service", "--vcpu", "1", "--memory", "64"], "name \"x.service\""),
    (&["vm", "create", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "--vcpu", "1", "--memory", "64"], "is 64 characters long; the limit is 63"),
    (&["vm", "create", "Web", "--vcpu", "1", "--memory", "64"], "name \"Web\""),
    (&["vm", "create", "wéb", "--vcpu", "1", "--memory", "64"], "name \"wéb\""),
    (&["vm", "create", "ｗｅｂ", "--vcpu", "1", "--memory", "64"], "name \"ｗｅｂ\""),
    (&["vm", "status", "../x"], "invalid NAME for `vm status`"),
    (&["vm", "delete", "x.service"], "invalid NAME for `vm delete`"),
    (&["vm", "migrate", "web", "--to", "../h2"], "invalid --to NODE for `vm migrate`"),
    (&["node", "drain", "H1"], "invalid NODE for `node drain`"),
    (&["cluster", "leave", "a b"], "invalid NODE for `cluster leave`"),
    (&["vm", "create", "web", "--vcpu", "0", "--memory", "64"], "0 is not between 1 and 1024 vcpus"),
    (&["vm", "create", "web", "--vcpu", "-1", "--memory", "64"], "-1 is not between 1 and 1024 vcpus"),
    (&["vm", "create", "web", "--vcpu", "100000", "--memory", "64"], "100000 is not between 1 and 1024 vcpus"),
    (&["vm", "create", "web", "--vcpu", "18446744073709551617", "--memory", "64"], "is not between 1 and 1024 vcpus"),
    (&["vm", "create", "web", "--vcpu", "1", "--memory", "0"], "0 is not between 16 and 16777216 MiB"),
    (&["vm", "create", "web", "--vcpu", "1", "--memory", "-512"], "-512 is not between 16 and 16777216 MiB"),
    (&["vm", "create", "web", "--vcpu", "1", "--memory", "99999999999"], "99999999999 is not between 16 and 16777216 MiB"),
    (&["vm", "create", "web", "--vcpu", "two", "--memory", "64"], "\"two\" is not a whole number"),
    (&["vm", "create", "web", "--vcpu", "1", "--memory", "64", "--label", "rack"], "\"rack\" is not KEY=VALUE"),
    (&["vm", "create", "web", "--vcpu", "1", "--memory", "64", "--label", "=r1"], "label key \"\""),
    (&["vm", "create", "web", "--vcpu", "1", "--memory", "64", "--label", "rack=a b"], "label value for \"rack\""),
    (&["vm", "create", "web", "--vcpu", "1", "--memory", "64", "--label", "k=1", "--label", "k=2"], "label \"k\" is given twice"),
    (&["vm", "create", "web", "--vcpu", "1", "--memory", "64", "--node", "../h1"], "invalid --node NODE"),
    (&["cluster", "join", "nowhere"], "\"nowhere\" is not HOST:PORT"),
    (&["cluster", "join", "10.0.0.1:99999"], "is not HOST:PORT"),
    (&["vm", "list", "--timeout", "0"], "0 is not between 1 and 86400 seconds"),
    (&["cluster", "join-token", "--ttl", "8d"], "a join token lives from 1 s to 7 days"),
    (&["cluster", "join-token", "--ttl", "soon"], "\"soon\" is not a duration"),
];

#[test]
fn bad_input_is_one_sentence_exit_2_and_sends_nothing() {
    let fake = Fake::start();
    for (args, needle) in BAD_INPUT {
        let out = fake.cli(args);
        out.assert_error(2, needle);
    }
    assert_eq!(fake.calls(), Vec::<String>::new(), "bad input reached the agent");
}

#[test]
fn malformed_endpoints_are_refused_before_connecting() {
    for endpoint in ["nope", "10.0.0.1", "10.0.0.1:0", "ftp://10.0.0.1:7000", "http://h1:7000/x", "a b:7000", ""] {
        let out = run(&["vm", "list", "--endpoint", endpoint]);
        out.assert_error(2, "for `vm list`");
    }
    run(&["vm", "list", "--endpoint"]).assert_error(2, "--endpoint HOST:PORT needs a value");
}

#[test]
fn missing_subcommands_are_one_sentence() {
    run(&[]).assert_error(
        2,
        "blixard-agent needs a subcommand (run, cluster, node, vm, events, guard, restore, recover, certs, completions",
    );
    run(&["vm"]).assert_error(
        2,
        "`vm` needs a subcommand (create, start, stop, delete, update, migrate, recover, list, status, logs); see `blixard-agent vm --help`",
    );
    run(&["cluster"]).assert_error(
        2,
        "`cluster` needs a subcommand (status, join, backup, join-token, new-secret, issue-client, leave)",
    );
    run(&["node"]).assert_error(2, "`node` needs a subcommand (list, drain, undrain)");
    run(&["completions"]).assert_error(2, "`completions` needs SHELL");
    run(&["completions", "powershell"]).assert_error(2, "\"powershell\" is not a valid SHELL: use bash, zsh or fish");
}

#[test]
fn tls_mistakes_are_refused_before_connecting() {
    let fake = Fake::start();
    fake.cli(&["vm", "list", "--ca", "/nonexistent/ca.pem"]).assert_error(2, "cannot read --ca /nonexistent/ca.pem");
    fake.cli(&["vm", "list", "--cert", "/c.pem"]).assert_error(2, "--cert needs --key");
    run(&["vm", "list", "--endpoint", "https://127.0.0.1:1", "--config", "/dev/null"])
        .assert_error(2, "an https:// endpoint needs --ca");
    run(&["vm", "list", "--config", "/nonexistent/agent.toml"]).assert_error(2, "cannot use the agent's config");
    assert!(fake.calls().is_empty());
}

#[test]
fn every_status_maps_to_its_exit_code() {
    let fake = Fake::start();
    let cases = [
        (Code::InvalidArgument, 2),
        (Code::NotFound, 2),
        (Code::AlreadyExists, 2),
        (Code::FailedPrecondition, 2),
        (Code::Unavailable, 1),
        (Code::DeadlineExceeded, 1),
        (Code::Aborted, 1),
        (Code::Internal, 1),
        (Code::Unknown, 1),
        (Code::ResourceExhausted, 1),
        (Code::PermissionDenied, 1),
        (Code::Unauthenticated, 1),
        (Code::Unimplemented, 1),
    ];
    for (code, exit) in cases {
        let message = format!("the agent says {code:?}");
        fake.fail_with(code, &message);
        for args in
            [&["vm", "list"][..], &["vm", "create", "web", "--vcpu", "1", "--memory", "64"], &["cluster", "status"]]
        {
            fake.cli(args).assert_error(exit, &format!("error: {message}\n"));
        }
    }
    // A multi-line message from a server is still one line.
    fake.fail_with(Code::Unavailable, "no quorum:\n1 of 3 members reachable\n");
    fake.cli(&["vm", "list"]).assert_error(1, "error: no quorum: 1 of 3 members reachable\n");
}

#[test]
fn unreachable_endpoint_fails_with_1() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let endpoint = format!("127.0.0.1:{port}");
    let out = run(&["vm", "list", "--endpoint", &endpoint, "--config", "/dev/null"]);
    out.assert_error(1, &format!("error: cannot reach the agent at {endpoint}: connection refused\n"));
    let out = run(&["cluster", "status", "--endpoint", &format!("http://{endpoint}"), "--config", "/dev/null"]);
    out.assert_error(1, "connection refused");
}

#[test]
fn a_silent_endpoint_times_out_with_1() {
    // Accepts TCP connections but never speaks HTTP/2.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = listener.local_addr().unwrap().to_string();
    let start = Instant::now();
    let out = run(&["vm", "list", "--endpoint", &endpoint, "--config", "/dev/null", "--timeout", "1"]);
    out.assert_error(1, &format!("timed out after 1 s waiting for the agent at {endpoint}"));
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    drop(listener);
}

#[test]
fn a_slow_agent_times_out_with_1() {
    let fake = Fake::start();
    fake.delay(Duration::from_secs(5));
    let start = Instant::now();
    fake.cli(&["vm", "list", "--timeout", "1"]).assert_error(1, "timed out after 1 s");
    assert!(start.elapsed() < Duration::from_secs(4), "{:?}", start.elapsed());
}

#[test]
fn vm_commands_print_the_documented_json() {
    let fake = Fake::start();
    let out = fake.cli(&["vm", "create", "web", "--vcpu", "2", "--memory", "1024", "--label", "tier=web", "--json"]);
    out.assert_ok();
    assert_eq!(
        out.json(),
        json!({"name": "web", "node": "h1", "desired": "running", "state": "starting", "vcpu": 2, "memory_mib": 1024,
               "failover": "auto", "since": "2025-01-02T03:04:05.678Z", "since_unix_ms": SINCE_UNIX_MS, "last_error": null,
               "pending_reason": null, "pinned_node": null, "anti_affinity": null, "labels": {"tier": "web"},
               "generation": 1, "failover": "auto"})
    );
    fake.insert_vm("db", "");

    let out = fake.cli(&["vm", "list", "--json"]);
    out.assert_ok();
    assert_eq!(
        out.json(),
        json!([
            {"name": "db", "node": null, "desired": "running", "state": "pending", "vcpu": 2, "memory_mib": 1024, "failover": "auto"},
            {"name": "web", "node": "h1", "desired": "running", "state": "starting", "vcpu": 2, "memory_mib": 1024, "failover": "auto"}
        ])
    );

    let status = fake.cli(&["vm", "status", "db", "--json"]).json();
    assert_eq!(status["node"], serde_json::Value::Null);
    assert_eq!(status["since"], "2025-01-02T03:04:05.678Z");
    assert_eq!(status["last_error"], serde_json::Value::Null);
    assert_eq!(status["pending_reason"], "no host has the runner installed");

    assert_eq!(fake.cli(&["vm", "stop", "web", "--json"]).json()["desired"], "stopped");
    assert_eq!(fake.cli(&["vm", "start", "web", "--json"]).json()["desired"], "running");
    assert_eq!(fake.cli(&["vm", "migrate", "web", "--to", "h2", "--json"]).json()["node"], "h2");
    assert_eq!(fake.cli(&["vm", "delete", "web", "--json"]).json(), json!({"name": "web"}));
    assert!(!fake.vms().contains_key("web"));
}

#[test]
fn vm_commands_print_tables_and_confirmations() {
    let fake = Fake::start();
    let out = fake.cli(&["vm", "create", "web", "--vcpu", "2", "--memory", "1024"]);
    out.assert_ok();
    assert_eq!(out.stdout, "vm web created: desired running, state starting, on h1\n");
    fake.insert_vm("database", "");
    let out = fake.cli(&["vm", "list"]);
    out.assert_ok();
    assert_eq!(
        out.stdout,
        "NAME      NODE  DESIRED  STATE     VCPU  MEMORY\n\
         database  -     running  pending   2     1024 MiB\n\
         web       h1    running  starting  2     1024 MiB\n"
    );
    let out = fake.cli(&["vm", "status", "database"]);
    out.assert_ok();
    assert!(out.stdout.starts_with("name:           database\nnode:           -\n"), "{}", out.stdout);
    assert!(out.stdout.contains("since:          2025-01-02 03:04:05 UTC ("), "{}", out.stdout);
    assert!(out.stdout.contains("pending reason: no host has the runner installed\n"), "{}", out.stdout);
    // A start or stop is a request the host acts on later: said so.
    assert_eq!(
        fake.cli(&["vm", "stop", "web"]).stdout,
        "vm web: desired stopped, now starting on h1; its host stops it shortly (--wait waits until it has stopped)\n"
    );
    assert_eq!(
        fake.cli(&["vm", "migrate", "web", "--to", "h1"]).stdout,
        "vm web is already on h1; nothing to move\n",
        "a migrate to where it is does nothing, and says so"
    );
    assert!(!fake.calls().iter().any(|c| c.starts_with("VmMigrate")), "{:?}", fake.calls());
    assert_eq!(
        fake.cli(&["vm", "delete", "web"]).stdout,
        "vm web deleted; its host stops the guest shortly (--wait stops it first and waits)\n"
    );
}

#[test]
fn rejected_requests_exit_2_and_change_nothing() {
    let fake = Fake::start();
    fake.cli(&["vm", "create", "web", "--vcpu", "2", "--memory", "1024"]).assert_ok();
    let before = fake.vms();

    fake.cli(&["vm", "create", "web", "--vcpu", "4", "--memory", "2048"]).assert_error(2, "VM \"web\" already exists");
    fake.cli(&["vm", "create", "db", "--vcpu", "1", "--memory", "64", "--node", "h9"])
        .assert_error(2, "no node named \"h9\"");
    fake.cli(&["vm", "migrate", "web", "--to", "h9"]).assert_error(2, "no node named \"h9\"");
    fake.cli(&["vm", "status", "nope"]).assert_error(2, "no VM named \"nope\"");
    fake.cli(&["vm", "delete", "nope"]).assert_error(2, "no VM named \"nope\"");
    fake.cli(&["node", "drain", "h9"]).assert_error(2, "no node named \"h9\"");
    assert_eq!(fake.vms(), before);
}

#[test]
fn cluster_and_node_commands() {
    let fake = Fake::start();
    let out = fake.cli(&["cluster", "status", "--json"]);
    out.assert_ok();
    let status = out.json();
    assert_eq!(status["leader"], "h1");
    assert_eq!(status["term"], 3);
    assert_eq!(
        status["members"][0],
        json!({"id": "1", "name": "h1", "address": "127.0.0.1:7000", "role": "leader", "healthy": true,
               "voter": true, "zone": null, "rack": null})
    );
    // The fake answers as an agent from before `voters_wanted`: who votes
    // follows from the roles.
    assert_eq!(status["voters_wanted"], serde_json::Value::Null, "{status}");
    assert_eq!(status["voters"], 3, "{status}");
    let out = fake.cli(&["cluster", "status"]);
    out.assert_ok();
    assert!(
        out.stdout
            .starts_with("leader: h1\nterm:   3\nvoters: 3\n\nNAME  ID  ADDRESS         ROLE      VOTER  HEALTHY\n"),
        "{}",
        out.stdout
    );

    let out = fake.cli(&["node", "list", "--json"]);
    out.assert_ok();
    let nodes = out.json();
    assert_eq!(nodes.as_array().unwrap().len(), 3);
    for key in ["name", "status", "vcpu_total", "vcpu_used", "memory_mib_total", "memory_mib_used"] {
        assert!(nodes[0].get(key).is_some(), "{key} missing from {}", nodes[0]);
    }
    let out = fake.cli(&["node", "list"]);
    assert!(
        out.stdout.starts_with("NAME  STATUS  VCPU  MEMORY       VMS\nh1    up      0/8   0/16384 MiB  0\n"),
        "{}",
        out.stdout
    );

    assert_eq!(fake.cli(&["node", "drain", "h2", "--json"]).json()["status"], "draining");
    assert_eq!(fake.cli(&["node", "undrain", "h2"]).stdout, "node h2 undrained: status up, 0 VMs\n");

    let mut token = tempfile::NamedTempFile::new().unwrap();
    writeln!(token, "  s3cret  ").unwrap();
    let out = fake.cli(&["cluster", "join", "10.0.0.1:7000", "--token-file", token.path().to_str().unwrap(), "--json"]);
    out.assert_ok();
    assert_eq!(out.json(), json!({"name": "h4", "id": "4"}));
    assert!(fake.calls().contains(&"ClusterJoin(10.0.0.1:7000,s3cret)".to_string()), "{:?}", fake.calls());

    assert_eq!(fake.cli(&["cluster", "leave", "h4"]).stdout, "h4 left the cluster\n");
    fake.cli(&["cluster", "leave", "h9"]).assert_error(2, "no node named \"h9\"");
    fake.cli(&["cluster", "join", "10.0.0.1:7000", "--token-file", "/nonexistent"])
        .assert_error(2, "cannot read --token-file /nonexistent");
    let empty = tempfile::NamedTempFile::new().unwrap();
    fake.cli(&["cluster", "join", "10.0.0.1:7000", "--token-file", empty.path().to_str().unwrap()])
        .assert_error(2, "is empty");

    // Only the token on stdout, so `> FILE` and `$(...)` keep exactly it.
    let out = fake.cli(&["cluster", "join-token", "--ttl", "15m"]);
    out.assert_ok();
    assert_eq!(out.stdout, "blxjt_0123\n");
    assert!(fake.calls().contains(&"ClusterJoinToken(900)".to_string()), "{:?}", fake.calls());
    let out = fake.cli(&["cluster", "join-token", "--json"]);
    assert_eq!(out.json(), json!({"token": "blxjt_0123", "expires_unix_ms": 1_700_000_000_000u64}));
}

#[test]
fn vm_list_pages_through_every_vm_and_passes_its_filters() {
    let fake = Fake::start();
    fake.insert_many("vm-", 2500);
    let out = fake.cli(&["vm", "list", "--json"]);
    out.assert_ok();
    let listed = out.json();
    assert_eq!(listed.as_array().unwrap().len(), 2500);
    assert_eq!(listed[2499]["name"], "vm-002499");
    let pages: Vec<String> = fake.calls().into_iter().filter(|c| c.starts_with("VmList")).collect();
    assert_eq!(
        pages,
        [
            "VmList(token=,size=1000,node=,state=,labels=0,prefix=)",
            "VmList(token=vm-000999,size=1000,node=,state=,labels=0,prefix=)",
            "VmList(token=vm-001999,size=1000,node=,state=,labels=0,prefix=)",
        ]
    );
    let out = fake.cli(&["vm", "list"]);
    out.assert_ok();
    assert_eq!(out.stdout.lines().count(), 2501, "a header and every VM");
    fake.cli(&["vm", "list", "--node", "h1", "--state", "running", "--label", "a=b", "--prefix", "vm-00"]).assert_ok();
    assert!(
        fake.calls().contains(&"VmList(token=,size=1000,node=h1,state=running,labels=1,prefix=vm-00)".to_string()),
        "{:?}",
        fake.calls()
    );
    let none = fake.cli(&["vm", "list", "--prefix", "nothing-", "--json"]);
    none.assert_ok();
    assert_eq!(none.json(), json!([]));
}

/// `vm list | head -1`: the reader goes away; the command ends quietly
/// (exit 0, nothing on stderr), never a panic (exit 101).
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    use std::io::BufRead;
    let fake = Fake::start();
    fake.insert_many("vm-", 20_000);
    let endpoint = fake.endpoint();
    for args in [&["vm", "list"][..], &["vm", "list", "--json"], &["cluster", "status"], &["completions", "bash"]] {
        let mut child = std::process::Command::new(cli_support::BIN)
            .args(args)
            .args(["--endpoint", &endpoint, "--config", "/dev/null"].iter().filter(|_| args[0] != "completions"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut first = String::new();
        std::io::BufReader::new(stdout).read_line(&mut first).unwrap();
        // The reader is gone (dropped) before the command has written it all.
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

#[test]
fn vm_update_prints_what_changed_and_when_it_takes_effect() {
    let fake = Fake::start();
    fake.insert_vm("web", "h1");
    let out = fake.cli(&["vm", "update", "web", "--vcpu", "4", "--label", "tier=web", "--json"]);
    out.assert_ok();
    let j = out.json();
    assert_eq!((j["vcpu"].as_u64(), j["labels"]["tier"].as_str()), (Some(4), Some("web")), "{j}");
    assert_eq!(j["changed"], json!(["vcpu", "labels"]));
    assert_eq!(j["takes_effect"], "next_start", "web runs on a host that still fits it");
    let out = fake.cli(&["vm", "update", "web", "--node", "h2"]);
    out.assert_ok();
    assert_eq!(
        out.stdout,
        "vm web updated (node): its host no longer satisfies it, so it moves to another host; now running on h2\n"
    );
    let out = fake.cli(&["vm", "update", "web", "--vcpu", "4", "--json"]);
    assert_eq!(out.json()["takes_effect"], "unchanged");
    fake.cli(&["vm", "update", "nope", "--vcpu", "2"]).assert_error(2, "no VM named \"nope\"");
    fake.cli(&["vm", "update", "web"]).assert_error(2, "`vm update` needs something to change");
}

#[test]
fn cluster_backup_writes_a_checked_file_and_never_overwrites_one() {
    let fake = Fake::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state.bak");
    let out = fake.cli(&["cluster", "backup", file.to_str().unwrap(), "--json"]);
    out.assert_ok();
    let j = out.json();
    assert_eq!(
        (j["cluster_id"].as_str(), j["index"].as_u64(), j["members"].as_u64()),
        (Some("0000000000000007"), Some(42), Some(1))
    );
    let backup = blixard::backup::read(&file).unwrap();
    assert_eq!(backup.header.index, 42);
    assert_eq!(backup.state.members().len(), 1);
    fake.cli(&["cluster", "backup", file.to_str().unwrap()]).assert_error(2, "already exists");
    assert_eq!(fake.calls().iter().filter(|c| *c == "ClusterBackup").count(), 1, "refused before asking");
}

/// Where the shells are: (bash, zsh, fish). Without zsh or fish the test
/// skips them, unless `BLIXARD_REQUIRE_SHELLS` is set (scripts/test.sh
/// installs both and sets it).
fn shell(name: &str) -> Option<String> {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if found.is_none() {
        assert!(std::env::var_os("BLIXARD_REQUIRE_SHELLS").is_none(), "{name} is required but not installed");
        eprintln!("skipping the {name} completion checks: {name} is not installed");
    }
    found
}

/// One TAB: the words typed before it, the word being completed, what must
/// be offered and what must not.
struct Tab {
    before: &'static [&'static str],
    current: &'static str,
    want: &'static [&'static str],
    not: &'static [&'static str],
}

impl Tab {
    /// Every word of the line, the binary's name first.
    fn words(&self) -> Vec<&'static str> {
        std::iter::once("blixard-agent").chain(self.before.iter().copied()).chain([self.current]).collect()
    }

    fn quoted_words(&self) -> String {
        self.words().iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(" ")
    }

    /// The shell's script that asks for this TAB's completions, one per line.
    fn script(&self, shell: &str) -> String {
        let n = self.words().len();
        match shell {
            "bash" => format!(
                "source <(blixard-agent completions bash)\n\
                 COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_TYPE=9; COMP_LINE=\"${{COMP_WORDS[*]}}\"; \
                 COMP_POINT=${{#COMP_LINE}}\n\
                 _clap_complete_blixard_agent blixard-agent '{current}' '{prev}'\n\
                 printf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
                words = self.quoted_words(),
                cword = n - 1,
                current = self.current,
                prev = self.before.last().copied().unwrap_or("blixard-agent"),
            ),
            // compinit's functions, reduced to what the script calls:
            // `compdef` registers, `_describe` offers (value:help).
            "zsh" => format!(
                "compdef() {{ :; }}\n\
                 _describe() {{ local name=${{@[-1]}}; printf '%s\\n' \"${{(@P)name}}\"; }}\n\
                 eval \"$(blixard-agent completions zsh)\"\n\
                 words=({words}); CURRENT={n}\n\
                 _clap_dynamic_completer_blixard_agent\n",
                words = self.quoted_words(),
            ),
            _ => {
                format!("blixard-agent completions fish | source; complete --do-complete '{}'", self.words().join(" "))
            }
        }
    }

    /// The values in the shell's answer (without zsh's and fish's help).
    fn offered(shell: &str, output: &str) -> Vec<String> {
        let value = |l: &str| match shell {
            "zsh" => l.split(':').next().unwrap_or("").replace('\\', ""),
            "fish" => l.split('\t').next().unwrap_or("").to_string(),
            _ => l.to_string(),
        };
        output.lines().map(|l| value(l).trim().to_string()).collect()
    }

    fn check(&self, shell: &str, got: &[String]) {
        for w in self.want {
            assert!(got.iter().any(|g| g == w), "{shell}: {:?} + TAB offers {got:?}, without {w}", self.before);
        }
        for n in self.not {
            assert!(!got.iter().any(|g| g == n), "{shell}: {:?} + TAB offers {n} in {got:?}", self.before);
        }
    }
}

/// Completions through each shell's own machinery, from the script
/// `completions SHELL` prints: subcommands below the top level, flags of
/// a subcommand, and VM and node names from the (fake) local agent.
#[test]
fn completions_work_in_bash_zsh_and_fish() {
    let fake = Fake::start();
    fake.insert_vm("web", "h1");
    fake.insert_vm("worker", "h2");
    fake.insert_vm("db", "h2");
    let bin_dir = std::path::Path::new(cli_support::BIN).parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let tabs = [
        Tab { before: &["vm"], current: "st", want: &["start", "status", "stop"], not: &["create"] },
        Tab {
            before: &["vm", "update", "web"],
            current: "--re",
            want: &["--restart", "--remove-label"],
            not: &["--to"],
        },
        Tab { before: &["vm", "start"], current: "w", want: &["web", "worker"], not: &["db"] },
        Tab { before: &["node", "drain"], current: "", want: &["h1", "h2", "h3"], not: &[] },
        Tab { before: &["cluster"], current: "ba", want: &["backup"], not: &[] },
        Tab { before: &["vm", "list", "--state"], current: "ru", want: &["running"], not: &["stopped"] },
    ];
    let shells: Vec<(&str, String, &[&str])> =
        [("bash", &["-c"][..]), ("zsh", &["-f", "-c"]), ("fish", &["--no-config", "-c"])]
            .into_iter()
            .filter_map(|(name, args)| shell(name).map(|program| (name, program, args)))
            .collect();
    assert!(shells.iter().any(|(name, ..)| *name == "bash"), "bash is always there");
    for (name, program, args) in &shells {
        for tab in &tabs {
            let script = tab.script(name);
            let out = std::process::Command::new(program)
                .args(*args)
                .arg(&script)
                .env("PATH", &path)
                .env("BLIXARD_ENDPOINT", fake.endpoint())
                .env_remove("COMPLETE")
                .output()
                .unwrap();
            assert!(out.status.success(), "{name}: {}\n{script}", String::from_utf8_lossy(&out.stderr));
            tab.check(name, &Tab::offered(name, &String::from_utf8_lossy(&out.stdout)));
        }
    }
}

#[test]
fn man_writes_a_page_per_command() {
    let dir = tempfile::tempdir().unwrap();
    let outdir = dir.path().join("share/man/man1");
    let out = run(&["man", outdir.to_str().unwrap()]);
    out.assert_ok();
    for page in ["blixard-agent.1", "blixard-agent-run.1", "blixard-agent-vm-create.1", "blixard-agent-cluster-leave.1"]
    {
        let text = std::fs::read_to_string(outdir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.starts_with(".ie"), "{page} is roff: {text}");
    }
}

#[test]
fn help_shows_examples_for_every_command() {
    let commands: &[&[&str]] = &[
        &[],
        &["run"],
        &["cluster"],
        &["cluster", "status"],
        &["cluster", "join"],
        &["cluster", "leave"],
        &["cluster", "backup"],
        &["restore"],
        &["recover"],
        &["cluster", "new-secret"],
        &["cluster", "issue-client"],
        &["node"],
        &["node", "list"],
        &["node", "drain"],
        &["node", "undrain"],
        &["vm"],
        &["vm", "create"],
        &["vm", "start"],
        &["vm", "stop"],
        &["vm", "delete"],
        &["vm", "update"],
        &["vm", "migrate"],
        &["vm", "list"],
        &["vm", "status"],
        &["completions"],
    ];
    for path in commands {
        let mut args = path.to_vec();
        args.push("--help");
        let out = run(&args);
        out.assert_ok();
        assert!(out.stdout.contains("Examples:"), "{path:?}: {}", out.stdout);
        let example = format!("blixard-agent {}", path.join(" "));
        assert!(out.stdout.contains(example.trim_end()), "{path:?} help has no example of itself");
    }
    let out = run(&["vm", "list", "--help"]);
    for flag in ["--endpoint", "--json", "--ca", "--cert", "--key", "--timeout", "--config"] {
        assert!(out.stdout.contains(flag), "{flag} missing from vm list --help");
    }
    let out = run(&["--version"]);
    out.assert_ok();
    assert!(out.stdout.starts_with("blixard-agent "), "{}", out.stdout);
}

#[test]
fn run_config_errors_are_one_sentence_and_exit_2() {
    run(&["run", "--config", "/nonexistent/agent.toml"]).assert_error(2, "cannot read /nonexistent/agent.toml");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let base = ["run", "--config", "/dev/null", "--data-dir", data];
    let cases: &[(&[&str], &str)] = &[
        (&["--listen", "nope"], "`listen`"),
        (&["--listen", "0.0.0.0:7000"], "`listen`"),
        (&["--node-name", "H1"], "`node_name`"),
        (&["--vcpu", "0"], "`capacity.vcpu`: must be positive, not 0"),
        (&["--vcpu", "-4"], "`capacity.vcpu`: must be positive, not -4"),
        (&["--memory-mib", "999999999999"], "`capacity.memory_mib`"),
        (&["--initial-member", "h2=127.0.0.2:7000"], "`initial_members`: does not list this host"),
        (&["--initial-member", "h1=127.0.0.1:7000", "--join", "127.0.0.2:7000"], "`join`"),
        (&["--tls-ca", "/ca.pem"], "`tls`"),
        // Secure by default: no credentials, or insecure off loopback, is refused.
        (&[], "`cluster_secret_file`: this agent has no credentials: give `cluster_secret_file`"),
        (&["--insecure", "--listen", "10.0.0.1:7000"], "`insecure`: is accepted only on a loopback `listen`"),
        (&["--cluster-secret-file", "/nonexistent/secret"], "`cluster_secret_file`: cannot read the cluster secret"),
        (&["--cluster-secret-file", "/dev/null"], "/dev/null is not a cluster secret"),
        (&["--cluster-secret-accepted-file", "/p", "--insecure"], "`cluster_secret_accepted_file`"),
        (&["--cluster-secret-file", "/s", "--tls-ca", "/a", "--tls-cert", "/b", "--tls-key", "/c"], "not both"),
        (&["--label", "nolabel"], "`--label`"),
        (&["--log-level", "[[["], "`log_level`"),
    ];
    for (extra, needle) in cases {
        let mut args = base.to_vec();
        if !extra.contains(&"--node-name") {
            args.extend(["--node-name", "h1"]);
        }
        args.extend_from_slice(extra);
        run(&args).assert_error(2, needle);
    }
    assert!(!std::path::Path::new(data).exists(), "a refused start creates nothing");
    run(&["run", "--runtime", "docker"])
        .assert_error(2, "\"docker\" is not a valid --runtime KIND: use systemd or process");
    run(&["run", "--strategy", "random"]).assert_error(2, "use spread or binpack");
    let bad_file = dir.path().join("agent.toml");
    std::fs::write(&bad_file, "node_name = \"h1\"\nbogus = 1\n").unwrap();
    run(&["run", "--config", bad_file.to_str().unwrap()]).assert_error(2, "bogus");
}

#[test]
fn new_secret_writes_a_private_file_once() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.secret");
    let out = run(&["cluster", "new-secret", path.to_str().unwrap()]);
    out.assert_ok();
    assert_eq!(out.stdout.trim(), path.to_str().unwrap());
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("blxsec_") && text.trim().len() == 7 + 64, "{text}");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    run(&["cluster", "new-secret", path.to_str().unwrap()]).assert_error(2, "already exists");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "never overwritten");
    let other = dir.path().join("other.secret");
    run(&["cluster", "new-secret", other.to_str().unwrap()]).assert_ok();
    assert_ne!(std::fs::read_to_string(&other).unwrap(), text);
}

//! Day-2 operations on clusters of real agents, through the CLI an operator
//! uses (docs/operations.md): a backup under write load restored into a new
//! cluster; a cluster that lost its majority for good recovered on its last
//! member, then grown with new hosts; a dead member removed and a host's
//! disk replaced under the same name; `vm update` of every field, refused
//! when it does not fit; `--wait`; `vm list` paging and filters at 200,000
//! VMs.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use blixard::api::pb;
use blixard_systests::cluster::{CliOut, Cluster, FORM_TIMEOUT, Options};
use blixard_systests::{Probe, wait_for};
use serde_json::Value;

/// `vm status NAME --json` on agent `at` until `ready` holds; the last status.
fn wait_vm(cluster: &Cluster, at: usize, name: &str, what: &str, ready: impl Fn(&Value) -> bool) -> Result<Value> {
    wait_for(&format!("{name}: {what}"), FORM_TIMEOUT, || {
        Ok(match cluster.cli_json(at, &["vm", "status", name]) {
            Ok(v) if ready(&v) => Probe::Ready(v),
            Ok(v) => Probe::NotYet(v.to_string()),
            Err(e) => Probe::NotYet(e.to_string()),
        })
    })
}

/// Every VM name `vm list` shows on agent `at`.
fn listed(cluster: &Cluster, at: usize) -> Result<BTreeSet<String>> {
    let list = cluster.cli_json(at, &["vm", "list"])?;
    Ok(list
        .as_array()
        .context("vm list --json is an array")?
        .iter()
        .filter_map(|v| v["name"].as_str())
        .map(str::to_string)
        .collect())
}

/// A join token from agent `at`, in a file.
fn token_file(cluster: &Cluster, at: usize, name: &str) -> Result<String> {
    let token = cluster.cli(at, &["cluster", "join-token", "--ttl", "10m"])?.ok()?.stdout;
    let path = cluster.dir().join(name);
    std::fs::write(&path, token)?;
    Ok(path.display().to_string())
}

/// `cluster join` of agent `joiner` through `seed`, with a fresh token.
fn join(cluster: &Cluster, joiner: usize, seed: usize) -> Result<CliOut> {
    let token = token_file(cluster, seed, &format!("token-{joiner}"))?;
    let seed_address = cluster.agent(seed).address.clone();
    cluster.cli(joiner, &["cluster", "join", &seed_address, "--token-file", &token])
}

fn cluster_id(cluster: &Cluster, at: usize) -> Result<String> {
    let status = cluster.cli_json(at, &["cluster", "status"])?;
    status["cluster_id"].as_str().map(str::to_string).context("a member has a cluster id")
}

#[test]
fn a_backup_under_write_load_restores_into_a_new_cluster() -> Result<()> {
    let cluster = Cluster::start("backup", 3, Options::default())?;
    let leader = cluster.wait_formed(&[0, 1, 2])?;
    for i in 0..3 {
        cluster.install_runner(i, "web")?;
    }
    let web = cluster.cli_json(leader, &["vm", "create", "web", "--vcpu", "1", "--memory", "64", "--wait"])?;
    ensure!(web["state"] == "running", "{web}");
    let web_host = web["node"].as_str().context("web runs somewhere")?.to_string();
    let old_id = cluster_id(&cluster, 0)?;

    // Creates through every member, recording each acknowledged one.
    let stop = AtomicBool::new(false);
    let acked: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let file = cluster.dir().join("state.bak");
    let before_backup = std::thread::scope(|scope| -> Result<BTreeSet<String>> {
        for writer in 0..3 {
            let (cluster, stop, acked) = (&cluster, &stop, &acked);
            scope.spawn(move || {
                let mut client = cluster.client(writer);
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("load-{writer}-{n}");
                    n += 1;
                    let request =
                        pb::VmCreateRequest { name: name.clone(), vcpu: 1, memory_mib: 16, ..Default::default() };
                    if cluster.block_on(client.vm_create(request)).is_ok() {
                        acked.lock().unwrap().push(name);
                    }
                }
            });
        }
        wait_for("some creates to be acknowledged", FORM_TIMEOUT, || {
            let n = acked.lock().unwrap().len();
            Ok(if n >= 100 { Probe::Ready(()) } else { Probe::NotYet(format!("{n}")) })
        })?;
        // Everything acknowledged before the backup starts must be in it.
        let before: BTreeSet<String> = acked.lock().unwrap().iter().cloned().collect();
        let follower = (0..3).find(|&i| i != leader).expect("3 members");
        let out = cluster.cli(follower, &["cluster", "backup", file.to_str().unwrap(), "--json"]);
        // Let the load go on a little past the backup, then stop it.
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        let out = out?.ok()?;
        let summary: Value = serde_json::from_str(&out.stdout)?;
        ensure!(summary["cluster_id"] == old_id.as_str(), "{summary}");
        Ok(before)
    })?;
    let backup = blixard::backup::read(&file)?;
    let in_backup: BTreeSet<String> = backup.state.vms().keys().cloned().collect();
    let missing: Vec<&String> = before_backup.difference(&in_backup).collect();
    ensure!(missing.is_empty(), "acknowledged before the backup but not in it: {missing:?}");
    ensure!(in_backup.contains("web"));
    // A damaged copy is refused before anything is written.
    let damaged = cluster.dir().join("damaged.bak");
    let mut bytes = std::fs::read(&file)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&damaged, bytes)?;

    // A new cluster of three hosts with the old names, from the backup.
    let restored = Cluster::configure("restored", 3, Options::default())?;
    for i in 0..3 {
        restored.install_runner(i, "web")?;
    }
    let refused = restored.offline(0, &["restore", "--from", damaged.to_str().unwrap()])?;
    ensure!(refused.code == 2 && refused.stderr.contains("damaged"), "{refused:?}");
    for i in 0..3 {
        let out = restored.offline(i, &["restore", "--from", file.to_str().unwrap()])?.ok()?;
        ensure!(out.stdout.contains("NEW cluster"), "{out:?}");
    }
    // A second restore into the same data dir is refused.
    let again = restored.offline(0, &["restore", "--from", file.to_str().unwrap()])?;
    ensure!(again.code == 2 && again.stderr.contains("already holds member h1"), "{again:?}");
    let mut restored = restored;
    for i in 0..3 {
        restored.agent_mut(i).start()?;
    }
    restored.wait_formed(&[0, 1, 2])?;
    let new_id = cluster_id(&restored, 1)?;
    ensure!(new_id != old_id, "a restored cluster has a new cluster id");
    let now = listed(&restored, 2)?;
    ensure!(now == in_backup, "the restored cluster lists the backup's VMs: {} vs {}", now.len(), in_backup.len());
    // web kept its host (same name), and runs there again.
    let web = wait_vm(&restored, 0, "web", "running on its old host", |v| v["state"] == "running")?;
    ensure!(web["node"] == web_host.as_str(), "{web}");
    Ok(())
}

#[test]
fn a_cluster_that_lost_its_majority_recovers_on_one_member_and_grows_again() -> Result<()> {
    let mut cluster = Cluster::start("recover", 3, Options::default())?;
    let leader = cluster.wait_formed(&[0, 1, 2])?;
    for i in 0..3 {
        cluster.install_runner(i, "web")?;
    }
    cluster.cli(leader, &["vm", "create", "web", "--vcpu", "1", "--memory", "64", "--wait"])?.ok()?;
    for i in 0..20 {
        cluster.cli(leader, &["vm", "create", &format!("vm{i}"), "--vcpu", "1", "--memory", "16"])?.ok()?;
    }
    let before = listed(&cluster, 0)?;
    let old_id = cluster_id(&cluster, 0)?;

    // Refused on a running agent (its store is locked), and while the
    // others still answer as members.
    let out = cluster.offline(0, &["recover", "--force-new-cluster"])?;
    ensure!(out.code == 1 && out.stderr.contains("stop it first"), "{out:?}");
    cluster.agent_mut(0).stop()?;
    let out = cluster.offline(0, &["recover", "--force-new-cluster"])?;
    ensure!(out.code == 1 && out.stderr.contains("still answers as a member"), "{out:?}");
    ensure!(out.stdout.is_empty(), "nothing was changed: {out:?}");

    // h2 and h3 are lost for good.
    cluster.agent_mut(1).kill();
    cluster.agent_mut(2).kill();
    std::fs::remove_dir_all(cluster.agent(1).data_dir())?;
    std::fs::remove_dir_all(cluster.agent(2).data_dir())?;
    let out = cluster.offline(0, &["recover", "--force-new-cluster"])?.ok()?;
    ensure!(out.stderr.contains("What can be lost"), "the risk is printed first: {out:?}");
    ensure!(out.stdout.contains("is now the only member") && out.stdout.contains("removed h2"), "{out:?}");
    cluster.agent_mut(0).start()?;
    cluster.wait_formed(&[0])?;
    ensure!(cluster_id(&cluster, 0)? != old_id, "a new cluster id");
    ensure!(listed(&cluster, 0)? == before, "every VM is still there");
    // Wherever web was, it runs on h1 now (after h2 and h3 must have fenced).
    wait_vm(&cluster, 0, "web", "running on h1", |v| v["state"] == "running" && v["node"] == "h1")?;

    // Two new hosts join.
    for _ in 0..2 {
        let joiner = cluster.add_agent("")?;
        cluster.agent_mut(joiner).start()?;
        wait_for("the new agent to answer", FORM_TIMEOUT, || {
            Ok(match cluster.status(joiner) {
                Ok(_) => Probe::Ready(()),
                Err(e) => Probe::NotYet(e.message().to_string()),
            })
        })?;
        join(&cluster, joiner, 0)?.ok()?;
    }
    cluster.wait_formed(&[0, 3, 4])?;
    ensure!(listed(&cluster, 4)? == before);
    Ok(())
}

#[test]
fn a_dead_member_is_removed_and_a_host_with_a_new_disk_rejoins_under_its_name() -> Result<()> {
    let mut cluster = Cluster::start("replace", 3, Options::default())?;
    let leader = cluster.wait_formed(&[0, 1, 2])?;
    for i in 0..3 {
        cluster.install_runner(i, "web")?;
    }
    // web pinned to h3, so that it is on the host that dies; then unpinned.
    cluster.wait_reported(leader, &[0, 1, 2])?;
    cluster.cli(leader, &["vm", "create", "web", "--vcpu", "1", "--memory", "64", "--node", "h3", "--wait"])?.ok()?;
    cluster.cli(leader, &["vm", "update", "web", "--unpin"])?.ok()?;
    let old_h3 = cluster.cli_json(0, &["cluster", "status"])?["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "h3").cloned())
        .context("h3 is a member")?;

    // h3 dies (its disk with it).
    cluster.agent_mut(2).kill();
    std::fs::remove_dir_all(cluster.agent(2).data_dir())?;
    let survivor = if leader == 2 { 0 } else { leader };
    let out = cluster.cli(survivor, &["cluster", "leave", "h3"])?;
    let out = match out.code {
        // The leader was h3: wait for a new one (the request waits 8 s itself).
        1 => cluster.cli(survivor, &["cluster", "leave", "h3"])?,
        _ => out,
    }
    .ok()?;
    ensure!(out.stdout == "h3 left the cluster\n", "{out:?}");
    cluster.wait_formed(&[0, 1])?;
    wait_vm(&cluster, 0, "web", "running on a survivor", |v| v["state"] == "running" && v["node"] != "h3")?;

    // A new disk: h3 starts empty, with no initial_members (it joins).
    cluster.agent(2).replace_config("initial_members", "")?;
    cluster.agent_mut(2).start()?;
    wait_for("the new h3 to answer", FORM_TIMEOUT, || {
        Ok(match cluster.status(2) {
            Ok(_) => Probe::Ready(()),
            Err(e) => Probe::NotYet(e.message().to_string()),
        })
    })?;
    join(&cluster, 2, 0)?.ok()?;
    cluster.wait_formed(&[0, 1, 2])?;
    let new_h3 = cluster.cli_json(1, &["cluster", "status"])?["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "h3").cloned())
        .context("h3 is a member again")?;
    ensure!(new_h3["id"] != old_h3["id"], "the new h3 is a new member: {old_h3} then {new_h3}");
    ensure!(new_h3["id"].is_string(), "ids are strings in JSON: {new_h3}");
    Ok(())
}

#[test]
fn vm_update_changes_every_field_in_place_and_wait_waits() -> Result<()> {
    let mut cluster = Cluster::configure("update", 3, Options::default())?;
    for (i, rack) in ["r1", "r2", "r2"].iter().enumerate() {
        cluster.agent(i).add_config(&format!("labels = {{ rack = \"{rack}\" }}"))?;
        cluster.install_runner(i, "web")?;
        cluster.install_runner(i, "db")?;
    }
    for i in 0..3 {
        cluster.agent_mut(i).start()?;
    }
    cluster.wait_formed(&[0, 1, 2])?;
    let at = 1;
    // Each host reports its capacity and labels once it is a member; the steps below
    // place by them (a pin to a host that has not reported is refused, a label no
    // host has reported yet too).
    cluster.wait_reported(at, &[0, 1, 2])?;
    wait_for("every host's rack label", FORM_TIMEOUT, || {
        let nodes = cluster.cli_json(at, &["node", "list"])?;
        let racks = nodes.as_array().map_or(0, |n| n.iter().filter(|n| n["labels"]["rack"].is_string()).count());
        Ok(if racks == 3 { Probe::Ready(()) } else { Probe::NotYet(nodes.to_string()) })
    })?;
    let created = cluster.cli(at, &["vm", "create", "web", "--vcpu", "1", "--memory", "64", "--wait"])?.ok()?;
    ensure!(created.stdout.starts_with("vm web is running on h"), "{created:?}");
    let first = cluster.cli_json(at, &["vm", "status", "web"])?;
    let host = first["node"].as_str().context("placed")?.to_string();

    // Size: recorded now, for the guest at its next start.
    let up = cluster.cli_json(at, &["vm", "update", "web", "--vcpu", "2", "--memory", "128"])?;
    ensure!(up["changed"] == serde_json::json!(["vcpu", "memory_mib"]) && up["takes_effect"] == "next_start", "{up}");
    ensure!(up["vcpu"] == 2 && up["memory_mib"] == 128 && up["node"] == host.as_str(), "{up}");
    // More than any host has: refused with the reason, nothing changed.
    let out = cluster.cli(at, &["vm", "update", "web", "--vcpu", "64"])?;
    ensure!(out.code == 2 && out.stderr.contains("does not fit") && out.stderr.contains("needs 64 vcpu"), "{out:?}");
    ensure!(cluster.cli_json(at, &["vm", "status", "web"])?["vcpu"] == 2);

    // Labels: a rack only h1 has moves it there.
    // Refused (and nothing changed) while h1 does not accept placements,
    // e.g. judged down for a moment on a loaded machine: asked again.
    let up = wait_for("the label update to be accepted", FORM_TIMEOUT, || {
        let out = cluster.cli(at, &["vm", "update", "web", "--label", "rack=r1", "--wait", "--json"])?;
        if out.code == 2 && out.stderr.contains("does not have") {
            return Ok(Probe::NotYet(out.stderr));
        }
        Ok(Probe::Ready(serde_json::from_str::<Value>(&out.ok()?.stdout)?))
    })?;
    ensure!(up["labels"]["rack"] == "r1" && up["node"] == "h1" && up["state"] == "running", "{up}");
    let expected = if host == "h1" { "next_start" } else { "moving" };
    ensure!(up["takes_effect"] == expected, "{up}");
    let out = cluster.cli(at, &["vm", "update", "web", "--label", "rack=r9"])?;
    ensure!(out.code == 2 && out.stderr.contains("rack=r9"), "no host has rack r9: {out:?}");

    // Pin: to h2 (after removing the label h2 lacks); an unknown node is refused.
    let up = cluster.cli_json(at, &["vm", "update", "web", "--remove-label", "rack", "--node", "h2", "--wait"])?;
    ensure!(up["pinned_node"] == "h2" && up["node"] == "h2" && up["state"] == "running", "{up}");
    ensure!(up["changed"] == serde_json::json!(["labels", "node"]), "{up}");
    let out = cluster.cli(at, &["vm", "update", "web", "--node", "h9"])?;
    ensure!(out.code == 2 && out.stderr.contains("h9"), "{out:?}");

    // Anti-affinity: db in web's group cannot be pinned next to it.
    let up = cluster.cli_json(at, &["vm", "update", "web", "--unpin", "--anti-affinity", "g"])?;
    ensure!(up["pinned_node"].is_null() && up["anti_affinity"] == "g" && up["node"] == "h2", "{up}");
    let db = cluster
        .cli_json(at, &["vm", "create", "db", "--vcpu", "1", "--memory", "64", "--anti-affinity", "g", "--wait"])?;
    ensure!(db["node"] != "h2" && db["state"] == "running", "{db}");
    let out = cluster.cli(at, &["vm", "update", "db", "--node", "h2"])?;
    ensure!(out.code == 2 && out.stderr.contains("anti-affinity group \"g\""), "{out:?}");

    // Failover policy.
    let up = cluster.cli_json(at, &["vm", "update", "web", "--failover", "manual"])?;
    ensure!(up["failover"] == "manual" && up["changed"] == serde_json::json!(["failover"]), "{up}");
    let up = cluster.cli_json(at, &["vm", "update", "web", "--failover", "auto"])?;
    ensure!(up["failover"] == "auto", "{up}");

    // --restart: takes effect now.
    let before = cluster.cli_json(at, &["vm", "status", "web"])?["since_unix_ms"].as_u64().unwrap_or(0);
    let up = cluster.cli_json(at, &["vm", "update", "web", "--no-anti-affinity", "--restart"])?;
    ensure!(up["takes_effect"] == "restarted" && up["state"] == "running" && up["anti_affinity"].is_null(), "{up}");
    ensure!(up["since_unix_ms"].as_u64().unwrap_or(0) > before, "restarted since: {up}");

    // --wait on stop, start, delete; a VM that cannot run gives up in time.
    let stopped = cluster.cli(at, &["vm", "stop", "web", "--wait"])?.ok()?;
    ensure!(stopped.stdout == "vm web is stopped on h2\n", "{stopped:?}");
    let started = cluster.cli(at, &["vm", "start", "web", "--wait"])?.ok()?;
    ensure!(started.stdout == "vm web is running on h2\n", "{started:?}");
    let deleted = cluster.cli(at, &["vm", "delete", "db", "--wait"])?.ok()?;
    ensure!(deleted.stdout == "vm db stopped and deleted\n", "{deleted:?}");
    ensure!(!listed(&cluster, 0)?.contains("db"));
    let started = Instant::now();
    let ghost = cluster
        .cli(at, &["vm", "create", "ghost", "--vcpu", "1", "--memory", "64", "--wait", "--wait-timeout", "2"])?;
    ensure!(ghost.code == 1 && ghost.stderr.contains("gave up after 2 s"), "{ghost:?}");
    ensure!(ghost.stderr.contains("ghost: desired running, pending"), "progress on stderr: {ghost:?}");
    ensure!(started.elapsed() < Duration::from_secs(15));
    Ok(())
}

/// 200,000 VMs through the API (many requests in flight: the raft thread
/// batches them), then every page and filter through the CLI.
#[test]
fn vm_list_pages_and_filters_200000_vms() -> Result<()> {
    const VMS: usize = 200_000;
    const IN_FLIGHT: usize = 256;
    let cluster = Cluster::start("paging", 1, Options::default())?;
    cluster.wait_formed(&[0])?;
    cluster.install_runner(0, "vm-000007")?;
    let started = Instant::now();
    // One connection (the test's admin certificate), shared by every task.
    let client = cluster.client(0);
    let failures = cluster.block_on(async move {
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..IN_FLIGHT {
            let (mut client, next) = (client.clone(), next.clone());
            tasks.spawn(async move {
                let mut failures = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= VMS {
                        return failures;
                    }
                    let mut labels = std::collections::HashMap::new();
                    if i % 10 == 0 {
                        labels.insert("tier".to_string(), "db".to_string());
                    }
                    let request = pb::VmCreateRequest {
                        name: format!("vm-{i:06}"),
                        vcpu: 1,
                        memory_mib: 16,
                        labels,
                        stopped: i % 4 == 1,
                        ..Default::default()
                    };
                    if let Err(e) = client.vm_create(request).await {
                        failures.push(format!("vm-{i:06}: {e}"));
                    }
                }
            });
        }
        let mut failures = Vec::new();
        while let Some(done) = tasks.join_next().await {
            failures.extend(done?);
        }
        anyhow::Ok(failures)
    })?;
    ensure!(failures.is_empty(), "{} creates failed, first {:?}", failures.len(), failures.first());
    eprintln!("created {VMS} VMs in {:.1} s", started.elapsed().as_secs_f64());

    let started = Instant::now();
    let all = cluster.cli(0, &["vm", "list", "--json"])?.ok()?;
    let all: Value = serde_json::from_str(&all.stdout)?;
    let all = all.as_array().context("an array")?;
    ensure!(all.len() == VMS, "{} VMs listed", all.len());
    let names: Vec<&str> = all.iter().filter_map(|v| v["name"].as_str()).collect();
    ensure!(names.windows(2).all(|w| w[0] < w[1]), "in name order, none twice");
    eprintln!("listed {VMS} VMs in {:.1} s", started.elapsed().as_secs_f64());
    let table = cluster.cli(0, &["vm", "list"])?.ok()?;
    ensure!(table.stdout.lines().count() == VMS + 1, "a header and a line per VM");

    let count = |args: &[&str]| -> Result<usize> {
        let mut all = vec!["vm", "list"];
        all.extend_from_slice(args);
        Ok(cluster.cli_json(0, &all)?.as_array().context("an array")?.len())
    };
    ensure!(count(&["--label", "tier=db"])? == VMS / 10);
    ensure!(count(&["--state", "stopped"])? == VMS / 4, "created --stopped, they show stopped");
    ensure!(count(&["--state", "stopped", "--label", "tier=db"])? == 0, "i % 10 == 0 is never i % 4 == 1");
    ensure!(count(&["--prefix", "vm-19999"])? == 10);
    // The one VM with a runner runs on h1; a filter by host finds it.
    wait_vm(&cluster, 0, "vm-000007", "running", |v| v["state"] == "running")?;
    let on_h1 = cluster.cli_json(0, &["vm", "list", "--node", "h1", "--state", "running"])?;
    ensure!(
        on_h1
            == serde_json::json!([{"name": "vm-000007", "node": "h1", "desired": "running", "state": "running",
                                         "vcpu": 1, "memory_mib": 16, "failover": "auto"}]),
        "{on_h1}"
    );
    let out = cluster.cli(0, &["vm", "list", "--node", "h9"])?;
    ensure!(out.code == 2 && out.stderr.contains("h9"), "{out:?}");

    // One page through the API is bounded, and its token moves on.
    let mut client = cluster.client(0);
    let page = cluster.block_on(client.vm_list(pb::VmListRequest::default()))?.into_inner();
    ensure!(!page.next_page_token.is_empty() && page.vms.len() < VMS, "{} VMs in one page", page.vms.len());
    let big = pb::VmListRequest { page_size: 10_001, ..Default::default() };
    let refused = cluster.block_on(client.vm_list(big)).unwrap_err();
    ensure!(refused.code() == tonic::Code::InvalidArgument, "{refused:?}");
    if !refused.message().contains("10000") {
        bail!("{refused:?}");
    }
    Ok(())
}

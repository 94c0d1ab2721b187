//! Real `blixard-agent` processes on loopback addresses, talked to through the
//! generated gRPC client: formation, failover, catch-up by snapshot, join and leave,
//! full restarts, forwarding, and refusals.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use blixard::api::context::leader_hint;
use blixard::api::pb;
use blixard::api::tls::Role;
use blixard_systests::cluster::{ClientCredentials, Cluster, FORM_TIMEOUT, Options};
use blixard_systests::{Probe, agent_binary, wait_for, wait_until};
use tonic::Code;

fn create_request(name: &str) -> pb::VmCreateRequest {
    pb::VmCreateRequest { name: name.into(), vcpu: 1, memory_mib: 128, ..Default::default() }
}

/// Creates a VM the way a careful operator would: an answer that leaves the
/// outcome open (the request timed out, or the leader changed under it) is
/// retried, and "already exists" after such a retry means the first attempt
/// went through. Any other error is returned as it is.
fn create(cluster: &Cluster, at: usize, request: pb::VmCreateRequest) -> Result<pb::VmInfo, tonic::Status> {
    let mut client = cluster.client(at);
    let name = request.name.clone();
    cluster.block_on(async move {
        let deadline = tokio::time::Instant::now() + FORM_TIMEOUT;
        let mut retried = false;
        loop {
            match client.vm_create(request.clone()).await {
                Ok(created) => return Ok(created.into_inner()),
                Err(e) if retried && e.code() == Code::AlreadyExists => {
                    let status = client.vm_status(pb::VmRequest { name: name.clone() }).await?;
                    return Ok(status.into_inner());
                }
                Err(e)
                    if matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded)
                        && tokio::time::Instant::now() < deadline =>
                {
                    retried = true;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    })
}

fn vm_names(cluster: &Cluster, at: usize) -> Result<BTreeSet<String>, tonic::Status> {
    let mut client = cluster.client(at);
    let vms = cluster.block_on(async move { client.vm_list(pb::VmListRequest::default()).await })?.into_inner().vms;
    Ok(vms.into_iter().map(|vm| vm.name).collect())
}

fn names(prefix: &str, count: usize) -> BTreeSet<String> {
    (0..count).map(|i| format!("{prefix}{i}")).collect()
}

fn follower_of(members: &[usize], leader: usize) -> usize {
    *members.iter().find(|&&i| i != leader).expect("more than one member")
}

#[test]
fn three_members_form_a_cluster_and_followers_serve_every_request() -> Result<()> {
    let cluster = Cluster::start("three", 3, Options::default())?;
    let leader = cluster.wait_formed(&[0, 1, 2])?;
    let follower = follower_of(&[0, 1, 2], leader);
    let other = [0, 1, 2].into_iter().find(|&i| i != leader && i != follower).expect("three members");

    // Writes sent to a follower are forwarded; reads on another follower see them.
    let created = create(&cluster, follower, create_request("web"))?;
    assert_eq!(
        (created.name.as_str(), created.desired.as_str(), created.state.as_str()),
        ("web", "running", "pending")
    );
    assert_eq!(vm_names(&cluster, other)?, ["web".to_string()].into());

    // A follower's answer to a write names the leader, for the client's
    // next writes (two trips between members instead of four).
    let leader_address = cluster.agent(leader).address.clone();
    let mut client = cluster.client(other);
    let stopped = cluster.block_on(client.vm_stop(pb::VmRequest { name: "web".into() }))?;
    assert_eq!(leader_hint(&stopped).as_deref(), Some(leader_address.as_str()));
    let stopped = stopped.into_inner();
    assert_eq!(stopped.desired, "stopped");
    let status = cluster.block_on(client.vm_status(pb::VmRequest { name: "web".into() }))?.into_inner();
    assert_eq!(status.desired, "stopped");
    assert!(status.node.is_empty(), "nothing places VMs yet: {status:?}");

    // Every member reported its capacity, so the node list shows it.
    let nodes = wait_for("every member's capacity", FORM_TIMEOUT, || {
        let nodes = cluster.block_on(client.node_list(pb::NodeListRequest {}))?.into_inner().nodes;
        Ok(if nodes.iter().all(|n| n.vcpu_total == 16) {
            Probe::Ready(nodes)
        } else {
            Probe::NotYet(format!("{nodes:?}"))
        })
    })?;
    assert_eq!(nodes.len(), 3);
    assert!(nodes.iter().all(|n| n.status == "up" && n.memory_mib_total == 65536), "{nodes:?}");
    // Forwarded to the leader, and named as it; the leader's own answer
    // names no one.
    let drained = cluster.block_on(client.node_drain(pb::NodeRequest { name: "h2".into() }))?;
    assert_eq!(leader_hint(&drained).as_deref(), Some(leader_address.as_str()));
    assert_eq!(drained.into_inner().status, "draining");
    let undrained = cluster.block_on(cluster.client(leader).node_undrain(pb::NodeRequest { name: "h2".into() }))?;
    assert_eq!(leader_hint(&undrained), None);
    assert_eq!(undrained.into_inner().status, "up");

    // Refusals carry the agreed codes, and change nothing.
    let refused = [
        (create_request("../x"), Code::InvalidArgument),
        (create_request("a b"), Code::InvalidArgument),
        (create_request("x.service"), Code::InvalidArgument),
        (create_request(&"a".repeat(64)), Code::InvalidArgument),
        (pb::VmCreateRequest { vcpu: 0, ..create_request("zero") }, Code::InvalidArgument),
        (pb::VmCreateRequest { memory_mib: u64::MAX, ..create_request("huge") }, Code::InvalidArgument),
        (create_request("web"), Code::AlreadyExists),
        (pb::VmCreateRequest { node: "h9".into(), ..create_request("lost") }, Code::NotFound),
        (pb::VmCreateRequest { node: "h1".into(), vcpu: 64, ..create_request("big") }, Code::FailedPrecondition),
    ];
    for (request, code) in refused {
        let name = request.name.clone();
        let error = create(&cluster, follower, request).expect_err(&name);
        assert_eq!(error.code(), code, "{name}: {}", error.message());
        assert!(!error.message().is_empty() && !error.message().contains('\n'));
    }
    assert_eq!(vm_names(&cluster, leader)?, ["web".to_string()].into());
    let missing = cluster.block_on(client.vm_start(pb::VmRequest { name: "nope".into() })).unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{}", missing.message());
    let unknown = cluster.block_on(client.node_drain(pb::NodeRequest { name: "h9".into() })).unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{}", unknown.message());
    let migrate = pb::VmMigrateRequest { name: "web".into(), to: "h9".into() };
    assert_eq!(cluster.block_on(client.vm_migrate(migrate)).unwrap_err().code(), Code::NotFound);
    // No host has reported the runner for "web", so it cannot move there.
    let migrate = pb::VmMigrateRequest { name: "web".into(), to: "h2".into() };
    let no_runner = cluster.block_on(client.vm_migrate(migrate)).unwrap_err();
    assert_eq!(no_runner.code(), Code::FailedPrecondition, "{}", no_runner.message());

    // Every caller authenticates: a client without a certificate, or with one
    // of another secret's CA, gets nothing; one the cluster issued read-only
    // (`ClusterIssueClient`, for a key that never left this process) reads
    // but is refused every write, which changes nothing.
    let plain = cluster.block_on(cluster.client_with(other, None).vm_list(pb::VmListRequest::default()));
    assert!(plain.is_err(), "plain text reached the agent: {plain:?}");
    let stranger_secret = cluster.dir().join("stranger.secret");
    std::fs::write(&stranger_secret, blixard::pki::ClusterSecret::generate()?.to_text())?;
    let mut stranger = Cluster::client_credentials(&stranger_secret, "tests", Role::Admin)?;
    stranger.ca_pem = cluster.credentials().context("secret mode")?.ca_pem.clone();
    let refused = cluster.block_on(cluster.client_with(other, Some(&stranger)).vm_list(pb::VmListRequest::default()));
    assert!(refused.is_err(), "another CA's client certificate was accepted: {refused:?}");
    let reader = issue_client(&cluster, follower, "viewer", "read-only")?;
    let mut read_only = cluster.client_with(other, Some(&reader));
    assert_eq!(cluster.block_on(read_only.vm_list(pb::VmListRequest::default()))?.into_inner().vms.len(), 1);
    let write = cluster.block_on(read_only.vm_create(create_request("by-viewer"))).unwrap_err();
    assert_eq!(write.code(), Code::PermissionDenied, "{write:?}");
    assert!(write.message().contains("read-only"), "{}", write.message());
    let write = cluster.block_on(read_only.vm_stop(pb::VmRequest { name: "web".into() })).unwrap_err();
    assert_eq!(write.code(), Code::PermissionDenied, "{write:?}");
    let issue = pb::ClusterIssueClientRequest { name: "escalated".into(), role: "admin".into(), ..Default::default() };
    let escalate = cluster.block_on(read_only.cluster_issue_client(issue)).unwrap_err();
    assert_eq!(escalate.code(), Code::PermissionDenied, "{escalate:?}");
    assert_eq!(vm_names(&cluster, leader)?, ["web".to_string()].into());

    // The same through the CLI. `--config FILE` takes the address and the
    // credentials of the agent configured there (from the secret, a client
    // certificate the CLI issues itself); `cluster issue-client` writes a
    // read-only certificate for a key made on the spot, which from anywhere
    // (`--ca/--cert/--key`) reads and is refused a write (exit 1).
    let config = cluster.agent(other).config_path.display().to_string();
    let listed = cli(&["vm", "list", "--json", "--config", &config])?;
    assert!(listed.status.success() && stdout(&listed).contains("\"web\""), "{listed:?}");
    let certs = cluster.dir().join("cli-viewer");
    let dir = certs.display().to_string();
    let issued =
        cli(&["cluster", "issue-client", "cli-viewer", "--role", "read-only", "--dir", &dir, "--config", &config])?;
    assert!(issued.status.success(), "{issued:?}");
    let key_mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(certs.join("cli-viewer.key"))?.permissions());
    assert_eq!(key_mode & 0o077, 0, "the key is private: {key_mode:o}");
    let path = |file: &str| certs.join(file).display().to_string();
    let (ca, cert, key) = (path("ca.pem"), path("cli-viewer.pem"), path("cli-viewer.key"));
    let address = &cluster.agent(follower).address;
    let flags = ["--endpoint", address, "--config", "/dev/null", "--ca", &ca, "--cert", &cert, "--key", &key];
    let listed = cli(&[&["vm", "list", "--json"][..], &flags].concat())?;
    assert!(listed.status.success() && stdout(&listed).contains("\"web\""), "{listed:?}");
    let write = cli(&[&["vm", "create", "by-cli", "--vcpu", "1", "--memory", "16"][..], &flags].concat())?;
    assert_eq!(write.status.code(), Some(1), "{write:?}");
    assert!(String::from_utf8_lossy(&write.stderr).contains("read-only"), "{write:?}");
    assert_eq!(vm_names(&cluster, leader)?, ["web".to_string()].into());

    let admin = issue_client(&cluster, leader, "operator", "admin")?;
    let mut operator = cluster.client_with(follower, Some(&admin));

    let deleted = cluster.block_on(operator.vm_delete(pb::VmRequest { name: "web".into() }))?.into_inner();
    assert_eq!(deleted.name, "web");
    assert!(vm_names(&cluster, follower)?.is_empty());
    Ok(())
}

/// Runs the CLI (`blixard-agent ARGS`) to completion.
fn cli(args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(agent_binary()?).args(args).env_remove("RUST_LOG").output()?)
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A client certificate for `name` with `role`, issued by agent `index` from
/// the cluster's CA for a key made here.
fn issue_client(cluster: &Cluster, index: usize, name: &str, role: &str) -> Result<ClientCredentials> {
    let (key, csr) = blixard::pki::new_key_and_request(name)?;
    let request = pb::ClusterIssueClientRequest { name: name.into(), role: role.into(), csr, days: 1 };
    let issued = cluster.block_on(cluster.client(index).cluster_issue_client(request))?.into_inner();
    Ok(ClientCredentials { ca_pem: issued.ca_pem, cert_pem: issued.certificate_pem, key_pem: key.serialize_pem() })
}

#[test]
fn five_members_form_a_cluster() -> Result<()> {
    let cluster = Cluster::start("five", 5, Options::default())?;
    let leader = cluster.wait_formed(&[0, 1, 2, 3, 4])?;
    create(&cluster, (leader + 1) % 5, create_request("a"))?;
    assert_eq!(vm_names(&cluster, (leader + 2) % 5)?, ["a".to_string()].into());
    Ok(())
}

#[test]
fn a_killed_leader_is_replaced_and_writes_continue() -> Result<()> {
    let mut cluster = Cluster::start("failover", 3, Options::default())?;
    let leader = cluster.wait_formed(&[0, 1, 2])?;
    create(&cluster, leader, create_request("before"))?;
    let old_term = cluster.status(leader)?.term;

    cluster.agent_mut(leader).kill();
    let survivors: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let new_leader = wait_for("a new leader", FORM_TIMEOUT, || {
        let status = match cluster.status(survivors[0]) {
            Ok(status) => status,
            Err(e) => return Ok(Probe::NotYet(e.message().to_string())),
        };
        let old = cluster.agent(leader).name.clone();
        Ok(if !status.leader.is_empty() && status.leader != old && status.term > old_term {
            Probe::Ready(status.leader)
        } else {
            Probe::NotYet(format!("{status:?}"))
        })
    })?;
    let new_leader = cluster.index_of(&new_leader).context("the leader is an agent")?;
    assert_ne!(new_leader, leader);

    // The survivors (a follower asks the leader) see the old leader as unhealthy.
    let old = cluster.agent(leader).name.clone();
    for &at in &survivors {
        wait_until("the killed leader to be reported unhealthy", FORM_TIMEOUT, || {
            let status = cluster.status(at)?;
            Ok(status.members.iter().any(|m| m.name == old && !m.healthy))
        })?;
    }

    // Writes continue, through either survivor.
    for (i, &at) in survivors.iter().enumerate() {
        create(&cluster, at, create_request(&format!("after{i}")))?;
    }
    let expected: BTreeSet<String> = ["before", "after0", "after1"].iter().map(|s| s.to_string()).collect();
    assert_eq!(vm_names(&cluster, survivors[0])?, expected);

    // The old leader comes back as a follower and catches up.
    cluster.agent_mut(leader).start()?;
    cluster.wait_formed(&[0, 1, 2])?;
    assert_eq!(vm_names(&cluster, leader)?, expected);
    Ok(())
}

#[test]
fn a_member_behind_the_compacted_log_catches_up_by_snapshot() -> Result<()> {
    let options = Options { log_compact_entries_max: Some(10), ..Options::default() };
    let mut cluster = Cluster::start("snapshot", 3, options)?;
    let leader = cluster.wait_formed(&[0, 1, 2])?;
    let lagging = follower_of(&[0, 1, 2], leader);
    let status = cluster.agent_mut(lagging).stop()?;
    assert!(status.success(), "a SIGTERM'd agent exits cleanly: {status}");

    // Far more entries than the compaction threshold commit without it.
    let vms = names("vm", 40);
    for name in &vms {
        create(&cluster, leader, create_request(name))?;
    }
    let commit = cluster.status(leader)?.commit_index;

    cluster.agent_mut(lagging).start()?;
    wait_for("the restarted member to catch up", FORM_TIMEOUT, || {
        Ok(match cluster.status(lagging) {
            Ok(status) if status.applied_index >= commit => Probe::Ready(()),
            Ok(status) => Probe::NotYet(format!("applied {} of {commit}", status.applied_index)),
            Err(e) => Probe::NotYet(e.message().to_string()),
        })
    })?;
    let log = cluster.agent(lagging).log();
    assert!(log.contains("installed a snapshot from the leader"), "no snapshot installed:\n{log}");
    assert_eq!(vm_names(&cluster, lagging)?, vms);
    cluster.wait_formed(&[0, 1, 2])?;
    Ok(())
}

#[test]
fn a_host_joins_keeps_its_membership_across_restarts_and_members_leave() -> Result<()> {
    let mut cluster = Cluster::start("join", 3, Options::default())?;
    cluster.wait_formed(&[0, 1, 2])?;
    let joiner = cluster.add_agent("")?;
    cluster.agent_mut(joiner).start()?;

    // Uninitialised: it answers, says it is not a member, refuses everything else.
    let status = wait_for("the new agent to answer", FORM_TIMEOUT, || {
        Ok(match cluster.status(joiner) {
            Ok(status) => Probe::Ready(status),
            Err(e) => Probe::NotYet(e.message().to_string()),
        })
    })?;
    assert!(!status.member && status.members.is_empty(), "{status:?}");
    let refused = vm_names(&cluster, joiner).unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(refused.message().contains("cluster join"), "{}", refused.message());

    // A host with the cluster secret holds a member certificate for its own
    // name: that is its admission. A token given anyway is checked too.
    let mut client = cluster.client(joiner);
    let seed = cluster.agent(0).address.clone();
    let join = |seed: &str, token: &str| pb::ClusterJoinRequest { seed: seed.into(), token: token.into() };
    let forged = cluster.block_on(client.cluster_join(join(&seed, "blxjt_forged"))).unwrap_err();
    assert_eq!(forged.code(), Code::PermissionDenied, "{forged:?}");
    let joined = cluster.block_on(client.cluster_join(join(&seed, "")))?;
    assert_eq!(joined.get_ref().name, "h4");
    let again = cluster.block_on(client.cluster_join(join(&cluster.agent(1).address, "")));
    assert_eq!(again.unwrap_err().code(), Code::FailedPrecondition);
    cluster.wait_formed(&[0, 1, 2, joiner])?;

    // Restarted with its data dir, it is still the same member.
    cluster.agent_mut(joiner).stop()?;
    cluster.agent_mut(joiner).start()?;
    cluster.wait_formed(&[0, 1, 2, joiner])?;
    let id = joined.get_ref().id;
    let member = cluster.status(0)?.members.into_iter().find(|m| m.name == "h4").context("h4 is a member")?;
    assert_eq!(member.id, id);

    // A host without the secret joins with a token (`join` seeds and a
    // `join_token_file`): it checks the cluster's CA against the token, makes
    // its own key and gets its certificate for a request. Killed (SIGKILL) at
    // each step of the way and restarted, it keeps its id and key, and joins
    // as one member. Its token then admits nobody else.
    let token = issue_join_token(&cluster, 1)?;
    let token_file = cluster.dir().join("join-token");
    std::fs::write(&token_file, format!("{token}\n"))?;
    let seeded_config = format!(
        "join = [\"{}\"]\njoin_token_file = {:?}\n",
        cluster.agent(1).address,
        token_file.display().to_string()
    );
    let seeded = cluster.add_agent_without_secret(&seeded_config)?;
    let tls_dir = cluster.agent(seeded).data_dir().join("tls");
    let mut key = None;
    for point in ["join-before-admit", "join-after-admit", "join-after-certificate"] {
        cluster.agent_mut(seeded).start_with_env(&[("BLIXARD_FAILPOINT", point)])?;
        wait_until(&format!("the joiner to crash at {point}"), FORM_TIMEOUT, || {
            Ok(!cluster.agent_mut(seeded).is_running())
        })?;
        cluster.agent_mut(seeded).kill(); // reaps it
        let now = std::fs::read(tls_dir.join("member.key")).context("the key is kept from the first attempt")?;
        assert_eq!(key.get_or_insert_with(|| now.clone()), &now, "the same key after crashing at {point}");
        assert!(
            cluster.agent(seeded).log().contains(&format!("failpoint reached; killing this process point=\"{point}\""))
        );
    }
    let join_id: u64 = std::fs::read_to_string(cluster.agent(seeded).data_dir().join("join-id"))?.trim().parse()?;
    cluster.agent_mut(seeded).start()?;
    cluster.wait_formed(&[0, 1, 2, joiner, seeded])?;
    let members = cluster.status(0)?.members;
    let h5: Vec<_> = members.iter().filter(|m| m.name == "h5").collect();
    assert_eq!(h5.len(), 1, "{members:?}");
    assert_eq!(h5[0].id, join_id, "admitted under the id of its first attempt");
    assert_eq!(std::fs::read(tls_dir.join("member.key"))?, key.context("a key")?);
    // Serving and dialling with the certificate the cluster issued: a write
    // through it is replicated, and the CLI on that host uses it too.
    create(&cluster, seeded, create_request("via-joiner"))?;
    let reused = cluster.add_agent_without_secret(&seeded_config)?;
    cluster.agent_mut(reused).start()?;
    wait_until("the host with a used token to stop", FORM_TIMEOUT, || Ok(!cluster.agent_mut(reused).is_running()))?;
    let log = cluster.agent(reused).log();
    assert!(log.contains("join token is not valid"), "{log}");

    // A man in the middle: the seed is an agent of another cluster (another
    // secret, so another CA). The joiner stops before it sends its token.
    let impostor = Cluster::start("impostor", 1, Options::default())?;
    impostor.wait_formed(&[0])?;
    let second_token = issue_join_token(&cluster, 0)?;
    let mitm_token = cluster.dir().join("mitm-token");
    std::fs::write(&mitm_token, &second_token)?;
    let impostor_address = impostor.agent(0).address.clone();
    let fooled = cluster.add_agent_without_secret(&format!(
        "join = [\"{impostor_address}\"]\njoin_token_file = {:?}\n",
        mitm_token.display().to_string()
    ))?;
    cluster.agent_mut(fooled).start()?;
    wait_until("the joiner to refuse the impostor", FORM_TIMEOUT, || Ok(!cluster.agent_mut(fooled).is_running()))?;
    cluster.agent_mut(fooled).kill(); // reaps it
    let log = cluster.agent(fooled).log();
    assert!(log.contains("presented no certificate of the CA the join token names"), "{log}");
    assert!(log.contains("nothing was sent to it"), "{log}");
    assert!(!cluster.agent(fooled).data_dir().join("tls/member.pem").exists());
    let impostors = impostor.status(0)?.members.into_iter().map(|m| m.name).collect::<Vec<_>>();
    assert_eq!(impostors, ["h1"], "the impostor admitted nobody");
    drop(impostor);
    // The token it kept to itself still admits it, through the real cluster.
    let config_path = cluster.agent(fooled).config_path.clone();
    let config = std::fs::read_to_string(&config_path)?.replace(&impostor_address, &cluster.agent(2).address);
    std::fs::write(&config_path, config)?;
    cluster.agent_mut(fooled).start()?;
    cluster.wait_formed(&[0, 1, 2, joiner, seeded, fooled])?;

    // The tokens are secrets: no agent logs them.
    for i in 0..cluster.len() {
        let log = cluster.agent(i).log();
        assert!(!log.contains(&token) && !log.contains(&second_token), "{} logged a join token", cluster.agent(i).name);
    }
    cluster.agent_mut(reused).kill();
    let everyone = [0, 1, 2, joiner, seeded, fooled];

    // A follower leaves (asked through the new member), then the leader itself.
    let leader = cluster.wait_formed(&everyone)?;
    let follower = follower_of(&[0, 1, 2], leader);
    let name = cluster.agent(follower).name.clone();
    let left = cluster.block_on(client.cluster_leave(pb::ClusterLeaveRequest { node: name.clone(), force: false }))?;
    assert_eq!(left.get_ref().name, name);
    let mut remaining: Vec<usize> = everyone.into_iter().filter(|&i| i != follower).collect();
    cluster.wait_formed(&remaining)?;
    let leader_name = cluster.agent(leader).name.clone();
    cluster.block_on(client.cluster_leave(pb::ClusterLeaveRequest { node: leader_name, force: false }))?;
    remaining.retain(|&i| i != leader);
    let new_leader = cluster.wait_formed(&remaining)?;
    assert_ne!(new_leader, leader);
    create(&cluster, joiner, create_request("after-leave"))?;
    let unknown = cluster
        .block_on(client.cluster_leave(pb::ClusterLeaveRequest { node: "h9".into(), force: false }))
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    // A removed member says so, also after a restart.
    wait_until("the removed member to know it", FORM_TIMEOUT, || Ok(!cluster.status(follower)?.member))?;
    cluster.agent_mut(follower).stop()?;
    cluster.agent_mut(follower).start()?;
    wait_until("the restarted removed member to answer", FORM_TIMEOUT, || {
        Ok(cluster.status(follower).is_ok_and(|s| !s.member))
    })?;
    cluster.wait_formed(&remaining)?;
    Ok(())
}

#[test]
fn the_cluster_secret_rotates_in_three_rolling_restarts() -> Result<()> {
    let mut cluster = Cluster::start("rotate", 3, Options::default())?;
    cluster.wait_formed(&[0, 1, 2])?;
    let old = cluster.secret_path().context("secret mode")?.to_path_buf();
    // A fourth host without the secret, admitted with a token: it follows
    // the rotation through the certificate it renews at every start.
    let token_file = cluster.dir().join("join-token");
    std::fs::write(&token_file, issue_join_token(&cluster, 0)?)?;
    let joined = cluster.add_agent_without_secret(&format!(
        "join = [\"{}\"]\njoin_token_file = {:?}\n",
        cluster.agent(0).address,
        token_file.display().to_string()
    ))?;
    cluster.agent_mut(joined).start()?;
    let everyone = [0, 1, 2, joined];
    cluster.wait_formed(&everyone)?;
    create(&cluster, 1, create_request("before"))?;

    let new = cluster.dir().join("new.secret");
    let made = Command::new(agent_binary()?).args(["cluster", "new-secret"]).arg(&new).output()?;
    assert!(made.status.success(), "{made:?}");
    let both = |cert_from: &std::path::Path| -> Result<ClientCredentials> {
        let mut credentials = Cluster::client_credentials(cert_from, "tests", Role::Admin)?;
        let other = if cert_from == old { &new } else { &old };
        credentials.ca_pem.push_str(&Cluster::client_credentials(other, "x", Role::Admin)?.ca_pem);
        Ok(credentials)
    };
    cluster.set_credentials(both(&old)?);
    let secret_line = |path: &std::path::Path| format!("cluster_secret_file = \"{}\"\n", path.display());
    let accepted_line = |path: &std::path::Path| format!("cluster_secret_accepted_file = \"{}\"\n", path.display());
    // One member at a time, each back in the cluster (every member a healthy
    // voter with the same leader: none refuses another) before the next;
    // then the host that joined with a token.
    let rolling = |cluster: &mut Cluster, edit: &dyn Fn(String) -> String| -> Result<()> {
        for i in [0, 1, 2] {
            let path = cluster.agent(i).config_path.clone();
            std::fs::write(&path, edit(std::fs::read_to_string(&path)?))?;
            // SIGKILL: a restart, without the graceful stop's wait for
            // open streams (which costs the test seconds, not the cluster).
            cluster.agent_mut(i).kill();
            cluster.agent_mut(i).start()?;
            cluster.wait_formed(&everyone)?;
        }
        cluster.agent_mut(joined).kill();
        cluster.agent_mut(joined).start()?;
        cluster.wait_formed(&everyone)?;
        Ok(())
    };
    // 1. Accept the new secret everywhere (still issuing from the old one).
    rolling(&mut cluster, &|config| format!("{}{config}", accepted_line(&new)))?;
    // 2. Issue from the new one, still accepting the old.
    rolling(&mut cluster, &|config| {
        config.replace(&secret_line(&old), &secret_line(&new)).replace(&accepted_line(&new), &accepted_line(&old))
    })?;
    cluster.set_credentials(both(&new)?);
    // 3. Stop accepting the old one.
    rolling(&mut cluster, &|config| config.replace(&accepted_line(&old), ""))?;

    create(&cluster, joined, create_request("after"))?;
    assert_eq!(vm_names(&cluster, 2)?, ["after".to_string(), "before".to_string()].into());
    // The host that joined with a token holds a certificate of the new CA
    // and trusts nothing else.
    let new_ca = Cluster::client_credentials(&new, "x", Role::Admin)?.ca_pem;
    let tls_dir = cluster.agent(joined).data_dir().join("tls");
    assert_eq!(std::fs::read_to_string(tls_dir.join("ca.pem"))?, new_ca, "only the new CA");
    let joined_cert = blixard::pki::certs_of_pem(&std::fs::read(tls_dir.join("member.pem"))?)?.remove(0);
    assert!(blixard::pki::issuer_in(&joined_cert, new_ca.as_bytes()).is_some(), "issued from the new secret");
    // A client certificate of the old secret is refused now.
    let stale = Cluster::client_credentials(&old, "tests", Role::Admin)?;
    let stale = ClientCredentials { ca_pem: new_ca, ..stale };
    assert!(cluster.block_on(cluster.client_with(0, Some(&stale)).vm_list(pb::VmListRequest::default())).is_err());
    Ok(())
}

/// A join token issued through agent `index`.
fn issue_join_token(cluster: &Cluster, index: usize) -> Result<String> {
    let mut client = cluster.client(index);
    let issued = cluster.block_on(client.cluster_join_token(pb::ClusterJoinTokenRequest { ttl_seconds: 600 }))?;
    Ok(issued.into_inner().token)
}

#[test]
fn every_member_restarted_at_once_keeps_all_state() -> Result<()> {
    let mut cluster = Cluster::start("restart", 3, Options::default())?;
    let leader = cluster.wait_formed(&[0, 1, 2])?;
    for name in ["a", "b", "c"] {
        create(&cluster, leader, create_request(name))?;
    }
    let mut client = cluster.client(leader);
    cluster.block_on(client.vm_stop(pb::VmRequest { name: "b".into() }))?;
    cluster.block_on(client.node_drain(pb::NodeRequest { name: "h3".into() }))?;
    let before = cluster.status(leader)?;

    for i in 0..3 {
        let status = cluster.agent_mut(i).stop()?;
        assert!(status.success(), "h{} exited with {status}", i + 1);
    }
    for i in 0..3 {
        cluster.agent_mut(i).start()?;
    }
    cluster.wait_formed(&[0, 1, 2])?;

    let after = cluster.status(0)?;
    let ids = |s: &pb::ClusterStatusResponse| s.members.iter().map(|m| (m.id, m.name.clone())).collect::<Vec<_>>();
    assert_eq!(ids(&after), ids(&before));
    assert!(after.term > before.term, "a new election after the restart");
    assert_eq!(vm_names(&cluster, 1)?, ["a", "b", "c"].iter().map(|s| s.to_string()).collect());
    let mut client = cluster.client(2);
    let b = cluster.block_on(client.vm_status(pb::VmRequest { name: "b".into() }))?.into_inner();
    assert_eq!(b.desired, "stopped");
    let nodes = cluster.block_on(client.node_list(pb::NodeListRequest {}))?.into_inner().nodes;
    let h3 = nodes.iter().find(|n| n.name == "h3").context("h3 listed")?;
    assert_eq!(h3.status, "draining");
    Ok(())
}

/// Runs the agent on `config` and expects it to exit non-zero quickly, saying one line.
fn refused_config(dir: &std::path::Path, name: &str, config: &str) -> Result<String> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config)?;
    let output = Command::new(agent_binary()?).args(["run", "--config"]).arg(&path).output()?;
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if output.status.success() {
        bail!("{name}: the agent accepted the config");
    }
    let last = stderr.lines().last().unwrap_or_default().to_string();
    Ok(last)
}

#[test]
fn bad_configs_a_taken_data_dir_and_a_taken_port_are_refused() -> Result<()> {
    let mut cluster = Cluster::start("refusals", 1, Options::default())?;
    cluster.wait_formed(&[0])?;
    let dir = cluster.dir().to_path_buf();
    let address = cluster.agent(0).address.clone();
    let data_dir = cluster.agent(0).data_dir();
    let other_address = cluster.address_of(5);
    let secret =
        format!("cluster_secret_file = {:?}\n", cluster.secret_path().context("secret mode")?.display().to_string());

    let malformed = refused_config(&dir, "malformed", "node_name = \"x\"\nlisten = \n")?;
    assert!(malformed.contains("invalid configuration"), "{malformed}");
    let unknown_key = refused_config(&dir, "unknown", "node_name = \"x\"\nbogus = 1\n")?;
    assert!(unknown_key.contains("bogus"), "{unknown_key}");
    let contradictory = refused_config(
        &dir,
        "contradictory",
        &format!(
            "node_name = \"h1\"\nlisten = \"{address}\"\ninitial_members = [\"h1={address}\"]\njoin = [\"{other_address}\"]\n"
        ),
    )?;
    assert!(contradictory.contains("`join`"), "{contradictory}");

    // The data dir of a running agent is locked.
    let second =
        format!("node_name = \"h1\"\nlisten = \"{other_address}\"\ndata_dir = \"{}\"\n{secret}", data_dir.display());
    let locked = refused_config(&dir, "locked", &second)?;
    assert!(locked.contains("in use by another blixard-agent"), "{locked}");
    // The port of a running agent is taken.
    let port = format!(
        "node_name = \"h1\"\nlisten = \"{address}\"\ndata_dir = \"{}\"\n{secret}",
        dir.join("elsewhere").display()
    );
    let taken = refused_config(&dir, "port", &port)?;
    assert!(taken.contains("cannot listen"), "{taken}");

    // A data dir belongs to one member name.
    cluster.agent_mut(0).stop()?;
    let renamed =
        format!("node_name = \"h7\"\nlisten = \"{other_address}\"\ndata_dir = \"{}\"\n{secret}", data_dir.display());
    let wrong = refused_config(&dir, "renamed", &renamed)?;
    assert!(wrong.contains("belongs to member \"h1\""), "{wrong}");

    // Secure by default: no credentials, or plain text off loopback, is refused.
    let bare =
        format!("node_name = \"h1\"\nlisten = \"{other_address}\"\ndata_dir = \"{}\"\n", dir.join("bare").display());
    let none = refused_config(&dir, "none", &bare)?;
    assert!(none.contains("this agent has no credentials"), "{none}");

    let started = std::time::Instant::now();
    assert!(started.elapsed() < Duration::from_secs(60));
    Ok(())
}

#[test]
fn systemd_is_told_ready_watchdog_and_stopping() -> Result<()> {
    use std::os::unix::net::UnixDatagram;

    let mut cluster = Cluster::start("notify", 0, Options::default())?;
    // Uninitialised: ready as soon as it serves, member or not.
    let agent = cluster.add_agent("")?;
    let socket_path = cluster.dir().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path)?;
    socket.set_read_timeout(Some(FORM_TIMEOUT))?;
    let socket_env = socket_path.to_string_lossy().to_string();
    cluster.agent_mut(agent).start_with_env(&[("NOTIFY_SOCKET", &socket_env), ("WATCHDOG_USEC", "200000")])?;

    let mut seen = Vec::new();
    let mut receive = |want: &str| -> Result<()> {
        let mut buffer = [0u8; 4096];
        while !seen.iter().any(|m: &String| m.lines().any(|l| l == want)) {
            let n = socket.recv(&mut buffer).with_context(|| format!("waiting for {want}; seen {seen:?}"))?;
            seen.push(String::from_utf8_lossy(&buffer[..n]).to_string());
        }
        Ok(())
    };
    receive("READY=1")?;
    assert!(!cluster.status(agent)?.member);
    receive("WATCHDOG=1")?;
    cluster.agent_mut(agent).stop()?;
    receive("STOPPING=1")?;
    Ok(())
}

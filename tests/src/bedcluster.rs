//! A Blixard cluster on a container test bed: every host runs `blixard-agent` as a
//! systemd service with the systemd runtime, as on a NixOS host, and has the same fake
//! microvm.nix guests installed.
//!
//! ```no_run
//! use blixard_systests::bedcluster::BedCluster;
//!
//! let Some(cluster) = BedCluster::start_or_skip(3, &["a", "b"]) else { return };
//! let leader = cluster.wait_formed(&[0, 1, 2]).unwrap();
//! cluster.create_vm(leader, "a").unwrap();
//! let placed = cluster.wait_settled(&["a"], &[0, 1, 2]).unwrap(); // a -> its host
//! cluster.power_off(placed["a"]).unwrap();
//! ```
//!
//! The test process talks to the agents' gRPC API over the bed's bridge, reads unit
//! states with `systemctl` inside the hosts, and has two observers of the guests running
//! from the start, so that every scenario ends with the check that no guest ever ran on two
//! hosts at once ([`BedCluster::assert_never_two_copies`]): a [`Sampler`] in every host
//! (systemd's exact transition times) and a [`CgroupSampler`] in the test process (whether
//! each guest's unit cgroup has a process, about 50 times a second).
//!
//! Authentication is on, as on a real network (the hosts talk over a bridge, not
//! loopback): one cluster secret, made with `blixard-agent cluster new-secret`, is
//! installed on every host as `/etc/blixard/cluster.secret` (mode 0600) and named by
//! `cluster_secret_file`; the test process presents an admin client certificate issued
//! from it.
//!
//! Each host's agent is `blixard-agent.service`, enabled (it starts again when its host
//! boots again) with the unit settings of the NixOS module that matter here:
//! `Type=notify`, `Restart=always`. Guests are `microvm@NAME.service` units of the
//! host's systemd, so they outlive the agent.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use blixard::api::pb;
use blixard::api::pb::blixard_client::BlixardClient;
use blixard::api::tls::Role;
use tonic::transport::Channel;

use crate::cluster::ClientCredentials;
use crate::guest::RealGuestImage;
use crate::timeline::{
    CgroupSampler, CgroupSamples, CopySpan, Sampler, SeenCopy, Timeline, Unit, monotonic_us, parse_journal, query_units,
};
use crate::{Probe, Testbed, agent_binary, wait_for};

/// The agents' gRPC port, on each host's bridge address.
pub const PORT: u16 = 7000;
/// The agents' HTTP port (`metrics_listen`: /metrics over HTTPS), on the same address.
pub const METRICS_PORT: u16 = 9464;
/// Where the agents keep their data (and `fence-contact`), inside each host.
pub const DATA_DIR: &str = "/var/lib/blixard";
pub const CONFIG_PATH: &str = "/etc/blixard/agent.toml";
/// TOML appended to every host's config (benchmarks of other timings).
pub const CONFIG_EXTRA_ENV: &str = "BLIXARD_BED_CONFIG_EXTRA";
/// The cluster secret, inside each host.
pub const SECRET_PATH: &str = "/etc/blixard/cluster.secret";
pub const AGENT_UNIT: &str = "blixard-agent.service";
/// Each host's capacity: room for every scenario's guests on one survivor.
pub const HOST_VCPU: u32 = 16;
pub const HOST_MEMORY_MIB: u64 = 16384;
/// Each guest's size.
pub const VM_VCPU: u32 = 1;
pub const VM_MEMORY_MIB: u64 = 128;

/// Forming a cluster, or a host rejoining after a boot: generous for a loaded machine.
pub const FORM_TIMEOUT: Duration = Duration::from_secs(90);
/// A placement, a move or a failover settling. Failover takes about 4 s; the rest is
/// margin for a loaded CI machine (the property asserted is what happens, not how fast).
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Connecting to an agent: short, so that probing a cut-off host fails fast.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// One API request; agents wait for a leader up to 8 s themselves.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The agent's service unit: what matters of the NixOS module's unit
/// (a restart well within `fence_after`, never giving up, a watchdog of a
/// few seconds: longer than a failover, so a frozen agent's VMs move before
/// it is restarted, and the CPU ahead of the guests). Nothing else: the agent
/// sets up its fence guard itself.
const AGENT_SERVICE: &str = "[Unit]
Description=Blixard agent
After=network.target dbus.service
StartLimitIntervalSec=0

[Service]
Type=notify
NotifyAccess=main
ExecStart=/usr/local/bin/blixard-agent run --config /etc/blixard/agent.toml
Restart=always
RestartSec=100ms
WatchdogSec=10s
CPUWeight=1000

[Install]
WantedBy=multi-user.target
";

/// The fence guard's unit, which the agent creates (transient).
pub const GUARD_UNIT: &str = "blixard-guard.service";
/// What the NixOS module adds to microvm.nix's `microvm@.service`: a stop waits for
/// the hypervisor to exit (microvm.nix's qemu `microvm-shutdown` at the locked revision
/// returns at once under systemd, and systemd would then terminate qemu before the
/// guest has shut down).
const GUEST_STOP_WAIT_PATH: &str = "/etc/systemd/system/microvm@.service.d/40-blixard-stop-wait.conf";
const GUEST_STOP_WAIT: &str = "[Service]\nExecStop=-/usr/bin/tail --pid=${MAINPID} -f /dev/null\n";

pub struct BedCluster {
    cgroups: CgroupSampler,
    sampler: Sampler,
    bed: Testbed,
    runtime: tokio::runtime::Runtime,
    guests: Vec<String>,
    /// The real guests' image, when there are real guests.
    image: Option<RealGuestImage>,
    /// The admin client certificate the test presents.
    credentials: ClientCredentials,
}

impl BedCluster {
    /// Boots `n_hosts` hosts with `guests` installed on each and the agents running, or
    /// returns `None` where the bed cannot run and `BLIXARD_TESTBED=skip` allows skipping
    /// (see [`Testbed::can_run`]).
    pub fn start_or_skip(n_hosts: usize, guests: &[&str]) -> Option<BedCluster> {
        Testbed::can_run().then(|| BedCluster::start(n_hosts, guests).unwrap_or_else(|e| panic!("{e:#}")))
    }

    pub fn start(n_hosts: usize, guests: &[&str]) -> Result<BedCluster> {
        BedCluster::start_with(n_hosts, guests, &[])
    }

    /// [`BedCluster::start_or_skip`] with `config` (TOML sections, `[raft]` say)
    /// appended to every host's config.
    pub fn start_configured_or_skip(n_hosts: usize, guests: &[&str], config: &str) -> Option<BedCluster> {
        Testbed::can_run()
            .then(|| BedCluster::start_configured(n_hosts, guests, &[], config).unwrap_or_else(|e| panic!("{e:#}")))
    }

    /// [`BedCluster::start_or_skip`] with `real` guests: qemu VMs (see
    /// [`crate::guest`]) instead of fake runners. The real guest's image must be
    /// prepared (`tests/testbed/prepare-guest.sh`); where the bed can run, a missing
    /// image fails the test with what to run.
    pub fn start_real_or_skip(n_hosts: usize, real: &[&str]) -> Option<BedCluster> {
        Testbed::can_run().then(|| BedCluster::start_with(n_hosts, &[], real).unwrap_or_else(|e| panic!("{e:#}")))
    }

    /// Boots `n_hosts` hosts with `fake` and `real` guests installed on each (real
    /// ones at runner generation 1) and the agents running.
    pub fn start_with(n_hosts: usize, fake: &[&str], real: &[&str]) -> Result<BedCluster> {
        BedCluster::start_configured(n_hosts, fake, real, "")
    }

    fn start_configured(n_hosts: usize, fake: &[&str], real: &[&str], extra: &str) -> Result<BedCluster> {
        let binary = agent_binary()?;
        let image = if real.is_empty() { None } else { Some(RealGuestImage::prepared()?) };
        let layers: Vec<_> = image.iter().map(|i| i.layer.clone()).collect();
        let bed = Testbed::start_with_layers(n_hosts, &layers).context("starting the test bed")?;
        let guests: Vec<String> = fake.iter().chain(real).map(|g| (*g).to_owned()).collect();
        // Sampling from before any guest can start: the timeline sees every start.
        let sampler = Sampler::start(&bed, guests.clone())?;
        let cgroups = CgroupSampler::start(&bed, guests.clone())?;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let secret_dir = tempfile::tempdir()?;
        let secret_path = secret_dir.path().join("cluster.secret");
        let made = std::process::Command::new(&binary).args(["cluster", "new-secret"]).arg(&secret_path).output()?;
        if !made.status.success() {
            bail!("cluster new-secret failed: {}", String::from_utf8_lossy(&made.stderr));
        }
        let secret = std::fs::read(&secret_path)?;
        let credentials = crate::cluster::Cluster::client_credentials(&secret_path, "tests", Role::Admin)?;
        let cluster = BedCluster { cgroups, sampler, bed, runtime, guests, image, credentials };
        let members: Vec<String> =
            cluster.bed.hosts().iter().map(|h| format!("\"{}={}:{PORT}\"", h.name(), h.addr())).collect();
        for host in cluster.bed.hosts() {
            host.install_agent(&binary)?;
            for guest in fake {
                host.install_fake_guest(guest)?;
            }
            for guest in real {
                host.install_real_guest(guest, cluster.image.as_ref().expect("loaded above"), 1)?;
            }
            host.write_file(SECRET_PATH, &secret, 0o600)?;
            let config = format!(
                "node_name = \"{name}\"\nlisten = \"{addr}:{PORT}\"\nmetrics_listen = \"{addr}:{METRICS_PORT}\"\n\
                 data_dir = \"{DATA_DIR}\"\n\
                 initial_members = [{members}]\ncluster_secret_file = \"{SECRET_PATH}\"\n\n[runtime]\nkind = \"systemd\"\nstate_dir = \"{state}\"\n\n\
                 [capacity]\nvcpu = {HOST_VCPU}\nmemory_mib = {HOST_MEMORY_MIB}\n",
                name = host.name(),
                addr = host.addr(),
                members = members.join(", "),
                state = crate::guest::STATE_DIR,
            );
            // The test's own settings, then for benchmarks of other settings (`[timing]`,
            // `[raft]`) the environment's: appended as they are.
            let config = config + extra + &std::env::var(CONFIG_EXTRA_ENV).unwrap_or_default();
            host.write_file(CONFIG_PATH, config, 0o644)?;
            host.write_file(&format!("/etc/systemd/system/{AGENT_UNIT}"), AGENT_SERVICE, 0o644)?;
            host.write_file(GUEST_STOP_WAIT_PATH, GUEST_STOP_WAIT, 0o644)?;
            host.run(&["systemctl", "daemon-reload"])?;
            host.run(&["systemctl", "enable", "--now", "--no-block", AGENT_UNIT])?;
        }
        Ok(cluster)
    }

    pub fn bed(&self) -> &Testbed {
        &self.bed
    }

    pub fn guests(&self) -> &[String] {
        &self.guests
    }

    pub fn name(&self, host: usize) -> &str {
        self.bed.host(host).name()
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.bed.hosts().iter().position(|h| h.name() == name)
    }

    fn addr(&self, host: usize) -> Ipv4Addr {
        self.bed.host(host).addr()
    }

    /// Runs a future (a gRPC call) on the cluster's runtime.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// A client of `host`'s agent (connecting lazily).
    pub fn client(&self, host: usize) -> BlixardClient<Channel> {
        let _guard = self.runtime.enter();
        let address = format!("{}:{PORT}", self.addr(host));
        BlixardClient::new(crate::cluster::channel_with(
            &address,
            Some(&self.credentials),
            CONNECT_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
    }

    pub fn status(&self, host: usize) -> Result<pb::ClusterStatusResponse, tonic::Status> {
        let mut client = self.client(host);
        self.block_on(async move { client.cluster_status(pb::ClusterStatusRequest {}).await.map(|r| r.into_inner()) })
    }

    pub fn vm_list(&self, host: usize) -> Result<Vec<pb::VmInfo>, tonic::Status> {
        let mut client = self.client(host);
        self.block_on(async move { client.vm_list(pb::VmListRequest::default()).await.map(|r| r.into_inner().vms) })
    }

    pub fn create_vm(&self, host: usize, name: &str) -> Result<pb::VmInfo, tonic::Status> {
        let request =
            pb::VmCreateRequest { name: name.into(), vcpu: VM_VCPU, memory_mib: VM_MEMORY_MIB, ..Default::default() };
        let mut client = self.client(host);
        self.block_on(async move { client.vm_create(request).await.map(|r| r.into_inner()) })
    }

    pub fn drain(&self, host: usize, node: &str) -> Result<pb::NodeInfo, tonic::Status> {
        let mut client = self.client(host);
        let request = pb::NodeRequest { name: node.into() };
        self.block_on(async move { client.node_drain(request).await.map(|r| r.into_inner()) })
    }

    pub fn undrain(&self, host: usize, node: &str) -> Result<pb::NodeInfo, tonic::Status> {
        let mut client = self.client(host);
        let request = pb::NodeRequest { name: node.into() };
        self.block_on(async move { client.node_undrain(request).await.map(|r| r.into_inner()) })
    }

    /// `vm start` (`running`) or `vm stop` of `vm`, asked of `host`'s agent.
    pub fn set_running(&self, host: usize, vm: &str, running: bool) -> Result<pb::VmInfo, tonic::Status> {
        let mut client = self.client(host);
        let request = pb::VmRequest { name: vm.into() };
        self.block_on(async move {
            if running { client.vm_start(request).await } else { client.vm_stop(request).await }.map(|r| r.into_inner())
        })
    }

    /// `blixard-agent vm logs VM -n LINES`, asked of `host`'s agent.
    pub fn vm_logs(&self, host: usize, vm: &str, lines: u32) -> Result<Vec<pb::LogLine>, tonic::Status> {
        let mut client = self.client(host);
        let request = pb::VmLogsRequest { name: vm.to_string(), follow: false, lines };
        self.block_on(async move {
            let mut stream = client.vm_logs(request).await?.into_inner();
            let mut out = Vec::new();
            while let Some(line) = stream.message().await? {
                out.push(line);
            }
            Ok(out)
        })
    }

    /// The value of the unlabelled metric `name` (`blixard_peer_datagram_batches_total`)
    /// on `host`'s agent, read from its /metrics over HTTPS; 0 while it has no sample.
    pub fn metric(&self, host: usize, name: &str) -> Result<f64> {
        let body = self.metrics_text(host)?;
        let value = body.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' '));
        match value {
            None => Ok(0.0),
            Some(v) => {
                v.trim().parse().with_context(|| format!("{name} on {}: {v:?} is not a number", self.name(host)))
            }
        }
    }

    fn metrics_text(&self, host: usize) -> Result<String> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, ServerName};
        use std::io::{Read as _, Write as _};
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(self.credentials.ca_pem.as_bytes()) {
            roots.add(ca.context("the cluster CA")?)?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let addr = self.addr(host);
        let name = ServerName::from(std::net::IpAddr::V4(addr));
        let connection = rustls::ClientConnection::new(std::sync::Arc::new(config), name)?;
        let at = std::net::SocketAddr::from((addr, METRICS_PORT));
        let stream = std::net::TcpStream::connect_timeout(&at, CONNECT_TIMEOUT)
            .with_context(|| format!("connecting to {}'s metrics at {at}", self.name(host)))?;
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        let mut tls = rustls::StreamOwned::new(connection, stream);
        write!(tls, "GET /metrics HTTP/1.1\r\nHost: {at}\r\nConnection: close\r\n\r\n")?;
        let mut bytes = Vec::new();
        if let Err(e) = tls.read_to_end(&mut bytes) {
            // A peer that closes without close_notify, after the response.
            if e.kind() != std::io::ErrorKind::UnexpectedEof || bytes.is_empty() {
                return Err(e).with_context(|| format!("reading {}'s metrics", self.name(host)));
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        if !head.starts_with("HTTP/1.1 200") {
            bail!("{}'s /metrics answered {:?}", self.name(host), head.lines().next().unwrap_or(""));
        }
        Ok(body.to_string())
    }

    /// The events `host`'s agent has recorded (`blixard-agent events`), oldest first.
    pub fn events(&self, host: usize) -> Result<Vec<pb::Event>, tonic::Status> {
        let mut client = self.client(host);
        self.block_on(async move {
            let mut stream = client.events(pb::EventsRequest { follow: false, limit: 0 }).await?.into_inner();
            let mut out = Vec::new();
            while let Some(event) = stream.message().await? {
                out.push(event);
            }
            Ok(out)
        })
    }

    /// Waits until the cluster, asked at `host`, lists every host with its capacity: a
    /// new member reports it once it has reached a quorum, and until then the scheduler
    /// cannot place on it.
    pub fn wait_capacity_reported(&self, host: usize) -> Result<()> {
        wait_for("every host to report its capacity", FORM_TIMEOUT, || {
            let mut client = self.client(host);
            let nodes = match self.block_on(client.node_list(pb::NodeListRequest {})) {
                Ok(nodes) => nodes.into_inner().nodes,
                Err(e) => return Ok(Probe::NotYet(e.message().to_string())),
            };
            Ok(if nodes.len() == self.bed.hosts().len() && nodes.iter().all(|n| n.vcpu_total > 0) {
                Probe::Ready(())
            } else {
                Probe::NotYet(format!("{nodes:?}"))
            })
        })
    }

    /// Installs runner generation `runner` of real guest `vm` on every running host and
    /// points `current` at it, as a switch to a configuration that changed the guest
    /// does. Returns the new runner's store path.
    pub fn install_runner(&self, vm: &str, runner: u32) -> Result<String> {
        let image = self.image.as_ref().context("this cluster has no real guests")?;
        let mut path = String::new();
        for host in self.bed.hosts().iter().filter(|h| h.is_running()) {
            path = host.install_real_guest(vm, image, runner)?;
        }
        Ok(path)
    }

    pub fn migrate(&self, host: usize, vm: &str, to: &str) -> Result<pb::VmInfo, tonic::Status> {
        let mut client = self.client(host);
        let request = pb::VmMigrateRequest { name: vm.into(), to: to.into() };
        self.block_on(async move { client.vm_migrate(request).await.map(|r| r.into_inner()) })
    }

    /// Waits until every host in `hosts` sees exactly the bed's hosts as members, all
    /// healthy, as many of them voters as `raft.voters` allows (the rest learners), and
    /// the same leader among `hosts`; returns the leader's index.
    pub fn wait_formed(&self, hosts: &[usize]) -> Result<usize> {
        let mut want: Vec<String> = self.bed.hosts().iter().map(|h| h.name().to_owned()).collect();
        want.sort();
        let leader = wait_for(&format!("{hosts:?} to agree on a healthy cluster of {want:?}"), FORM_TIMEOUT, || {
            let mut leaders = Vec::new();
            for &i in hosts {
                let status = match self.status(i) {
                    Ok(status) => status,
                    Err(e) => return Ok(Probe::NotYet(format!("{}: {}", self.name(i), e.message()))),
                };
                let mut names: Vec<String> = status.members.iter().map(|m| m.name.clone()).collect();
                names.sort();
                let voters = status.members.iter().filter(|m| m.voter).count();
                let ready = status.member
                    && !status.leader.is_empty()
                    && names == want
                    && status.members.iter().all(|m| m.healthy)
                    && voters == want.len().min(status.voters_wanted as usize);
                if !ready {
                    return Ok(Probe::NotYet(format!("{}: {status:?}", self.name(i))));
                }
                leaders.push(status.leader);
            }
            leaders.dedup();
            Ok(match leaders.as_slice() {
                [leader] => Probe::Ready(leader.clone()),
                _ => Probe::NotYet(format!("the hosts disagree on the leader: {leaders:?}")),
            })
        })?;
        self.index_of(&leader).with_context(|| format!("leader {leader} is not a host of the bed"))
    }

    /// The leader as `host` sees it, if it sees one.
    pub fn leader_seen_by(&self, host: usize) -> Option<usize> {
        self.status(host).ok().and_then(|s| self.index_of(&s.leader))
    }

    /// The guest units of `host` right now.
    pub fn units(&self, host: usize) -> Result<Vec<Unit>> {
        query_units(&self.bed, host, &self.guests)
    }

    /// `vm`'s unit on `host` right now.
    pub fn unit(&self, host: usize, vm: &str) -> Result<Unit> {
        let units = query_units(&self.bed, host, &[vm.to_owned()])?;
        Ok(units.into_iter().next().expect("query_units returns every unit asked for"))
    }

    /// Which running hosts have each of `vms` active (cut-off hosts included: a copy
    /// there counts).
    pub fn active_hosts(&self, vms: &[&str]) -> Result<BTreeMap<String, Vec<usize>>> {
        let mut out: BTreeMap<String, Vec<usize>> = vms.iter().map(|vm| ((*vm).to_owned(), Vec::new())).collect();
        for host in self.bed.hosts().iter().filter(|h| h.is_running()) {
            for unit in self.units(host.index())? {
                if unit.is_active()
                    && let Some(hosts) = out.get_mut(&unit.vm)
                {
                    hosts.push(host.index());
                }
            }
        }
        Ok(out)
    }

    /// Waits until each of `vms` is active on exactly one host and the cluster, asked at
    /// `api_hosts` (each must answer), reports it `running` on that host. Returns where
    /// each runs.
    pub fn wait_settled(&self, vms: &[&str], api_hosts: &[usize]) -> Result<BTreeMap<String, usize>> {
        self.wait_settled_where(vms, api_hosts, |_, _| true)
    }

    /// [`BedCluster::wait_settled`] with each VM also on a host that `allowed(vm, host)`.
    pub fn wait_settled_where(
        &self,
        vms: &[&str],
        api_hosts: &[usize],
        allowed: impl Fn(&str, usize) -> bool,
    ) -> Result<BTreeMap<String, usize>> {
        wait_for(&format!("{vms:?} to run once each, as the cluster says"), SETTLE_TIMEOUT, || {
            let active = self.active_hosts(vms)?;
            let mut placed = BTreeMap::new();
            for (vm, hosts) in &active {
                match hosts.as_slice() {
                    [host] if allowed(vm, *host) => {
                        placed.insert(vm.clone(), *host);
                    }
                    _ => return Ok(Probe::NotYet(format!("active hosts {active:?}"))),
                }
            }
            for &api in api_hosts {
                let listed = match self.vm_list(api) {
                    Ok(listed) => listed,
                    Err(e) => return Ok(Probe::NotYet(format!("{}: {}", self.name(api), e.message()))),
                };
                for (vm, &host) in &placed {
                    let agrees =
                        listed.iter().any(|i| &i.name == vm && i.node == self.name(host) && i.state == "running");
                    if !agrees {
                        let info = listed.iter().find(|i| &i.name == vm);
                        return Ok(Probe::NotYet(format!(
                            "{vm} active on {}; {} says {info:?}",
                            self.name(host),
                            self.name(api)
                        )));
                    }
                }
            }
            Ok(Probe::Ready(placed))
        })
    }

    /// The last quorum contact `host`'s agent recorded: the send time of its latest
    /// completed Raft read, in CLOCK_MONOTONIC milliseconds.
    pub fn last_contact_ms(&self, host: usize) -> Option<u64> {
        let text = self.bed.host(host).read_file(&format!("{DATA_DIR}/fence-contact")).ok()?;
        text.split_whitespace().nth(1)?.parse().ok()
    }

    /// Waits until `host`'s agent has had quorum contact from a read sent after this call
    /// began, plus a margin: by then its reconciler has run passes on state that includes
    /// everything committed before this call, so whatever it was going to start or stop
    /// because of that state, it has.
    pub fn wait_reconciled(&self, host: usize) -> Result<()> {
        let since_ms = monotonic_us() / 1000 + RECONCILED_MARGIN_MS;
        crate::wait_until(
            &format!("{}'s agent to have quorum contact after {since_ms} ms", self.name(host)),
            SETTLE_TIMEOUT,
            || Ok(self.last_contact_ms(host).is_some_and(|c| c >= since_ms)),
        )
    }

    /// `systemctl restart` of `host`'s agent; returns once systemd has it running again
    /// (`Type=notify`: it has said READY).
    pub fn restart_agent(&self, host: usize) -> Result<()> {
        self.bed.host(host).run(&["systemctl", "restart", AGENT_UNIT]).map(drop)
    }

    /// The agent's main PID inside `host`.
    pub fn agent_pid(&self, host: usize) -> Result<u32> {
        self.main_pid(host, AGENT_UNIT)
    }

    /// The main PID of `unit` inside `host` (0: none).
    pub fn main_pid(&self, host: usize, unit: &str) -> Result<u32> {
        let out = self.bed.host(host).run(&["systemctl", "show", "--property=MainPID", "--value", unit])?;
        out.trim().parse().with_context(|| format!("MainPID of {unit}: {out:?}"))
    }

    /// Sends `signal` to the main process of `unit` on `host` (SIGSTOP freezes it).
    pub fn signal(&self, host: usize, unit: &str, signal: &str) -> Result<()> {
        self.bed
            .host(host)
            .run(&["systemctl", "kill", "--kill-who=main", &format!("--signal={signal}"), unit])
            .map(drop)
    }

    /// Waits until the fence guard runs on `host` (the agent starts it).
    pub fn wait_guard(&self, host: usize) -> Result<u32> {
        wait_for(&format!("the fence guard on {}", self.name(host)), SETTLE_TIMEOUT, || {
            Ok(match self.bed.host(host).unit_state(GUARD_UNIT)?.as_str() {
                "active" => match self.main_pid(host, GUARD_UNIT)? {
                    0 => Probe::NotYet("active without a main pid".into()),
                    pid => Probe::Ready(pid),
                },
                other => Probe::NotYet(format!("{GUARD_UNIT} is {other}")),
            })
        })
    }

    /// Waits until none of `host`'s guests is active; returns when that
    /// was seen (monotonic µs).
    pub fn wait_no_guests(&self, host: usize) -> Result<u64> {
        wait_for(&format!("every guest of {} to stop", self.name(host)), SETTLE_TIMEOUT, || {
            let up: Vec<String> = self.units(host)?.into_iter().filter(|u| u.is_active()).map(|u| u.vm).collect();
            Ok(if up.is_empty() { Probe::Ready(monotonic_us()) } else { Probe::NotYet(format!("still up: {up:?}")) })
        })
    }

    /// Runs the agent's CLI inside `host` (it talks to that host's agent,
    /// as an operator on the host would).
    pub fn cli(&self, host: usize, args: &[&str]) -> Result<String> {
        self.cli_within(host, args, crate::testbed::EXEC_TIMEOUT)
    }

    /// [`BedCluster::cli`] for a command that may take longer than the default
    /// exec timeout (a drain that waits for every VM to move): killed after
    /// `timeout`; a non-zero exit is an error carrying its stderr.
    pub fn cli_within(&self, host: usize, args: &[&str], timeout: Duration) -> Result<String> {
        let mut argv = vec!["/usr/local/bin/blixard-agent"];
        argv.extend(args);
        let endpoint = format!("{}:{PORT}", self.addr(host));
        argv.extend(["--endpoint", endpoint.as_str()]);
        self.bed.host(host).run_within(&argv, timeout)
    }

    /// Replaces `host`'s agent config (keeps the original as `.orig` once).
    pub fn write_config(&self, host: usize, text: &str) -> Result<()> {
        let h = self.bed.host(host);
        let orig = format!("{CONFIG_PATH}.orig");
        if h.read_file(&orig).is_err() {
            h.write_file(&orig, h.read_file(CONFIG_PATH)?, 0o644)?;
        }
        h.write_file(CONFIG_PATH, text, 0o644)
    }

    /// Puts `host`'s original agent config back.
    pub fn restore_config(&self, host: usize) -> Result<()> {
        let h = self.bed.host(host);
        h.write_file(CONFIG_PATH, h.read_file(&format!("{CONFIG_PATH}.orig"))?, 0o644)
    }

    /// A runtime drop-in for the agent's unit on `host` (`None` removes it),
    /// applied with a daemon reload.
    pub fn agent_dropin(&self, host: usize, text: Option<&str>) -> Result<()> {
        // Written from inside: /run is the host's own tmpfs.
        let h = self.bed.host(host);
        let dir = format!("/run/systemd/system/{AGENT_UNIT}.d");
        let script = match text {
            Some(text) => format!("mkdir -p {dir} && printf '%s' '{}' > {dir}/50-test.conf", text.replace('\'', "")),
            None => format!("rm -f {dir}/50-test.conf"),
        };
        h.sh(&script)?;
        h.run(&["systemctl", "daemon-reload"]).map(drop)
    }

    /// Cuts `host`'s power and records the moment in the timeline.
    pub fn power_off(&self, host: usize) -> Result<()> {
        self.bed.power_off(host)?;
        self.sampler.power_cut(host);
        Ok(())
    }

    /// Boots `host` again; its agent starts with it.
    pub fn boot(&self, host: usize) -> Result<()> {
        self.bed.boot(host)
    }

    pub fn cut_link(&self, host: usize) -> Result<()> {
        self.bed.cut_link(host)
    }

    pub fn heal_link(&self, host: usize) -> Result<()> {
        self.bed.heal_link(host)
    }

    /// How many times the fake guest `vm` was started on `host`, from its own log.
    pub fn guest_starts(&self, host: usize, vm: &str) -> Result<usize> {
        Ok(self.bed.host(host).fake_guest_log(vm)?.iter().filter(|l| l.starts_with("start ")).count())
    }

    /// Everything sampled so far, after one more sample of every running host, with the
    /// guest units' transitions from every host's journal.
    pub fn timeline(&self) -> Result<Timeline> {
        self.sampler.catch_up(&self.bed, SETTLE_TIMEOUT)?;
        let mut timeline = self.sampler.timeline(&self.bed)?;
        let mut filter = vec!["--no-hostname"];
        let units: Vec<String> = self.guests.iter().map(|g| crate::guest::unit(g)).collect();
        for unit in &units {
            filter.extend(["-u", unit]);
        }
        for host in self.bed.hosts() {
            let journal = host.journal_args(&filter).with_context(|| format!("reading {}'s journal", host.name()))?;
            timeline.logged.extend(parse_journal(host.index(), &journal));
        }
        Ok(timeline)
    }

    /// The safety property over everything observed since the start, by both observers:
    /// - systemd's exact timeline: no guest ever had copies on two hosts at the same
    ///   moment, and it saw every start each fake guest logged (so no interval escaped it
    ///   between two samples);
    /// - the cgroup rounds: none saw a guest with processes on two hosts, none failed to
    ///   read a cgroup, and they agree with the timeline: they saw every copy it has
    ///   begin, and processes only during its copies (so they did look at the right
    ///   cgroups, and no copy was shorter than their period).
    ///
    /// The rate of the cgroup rounds is left to the caller to assert.
    pub fn assert_never_two_copies(&self) -> Result<Observed> {
        let timeline = self.timeline()?;
        self.cgroups.catch_up(SETTLE_TIMEOUT)?;
        let cgroups = self.cgroups.samples();
        let mut problems = String::new();
        if cgroups.failed_reads > 0 {
            let _ = writeln!(
                problems,
                "{} cgroup reads failed; the last: {}",
                cgroups.failed_reads,
                cgroups.last_error.as_deref().unwrap_or("?")
            );
        }
        for vm in &self.guests {
            let mut trouble = false;
            for (a, b) in timeline.overlaps(vm) {
                trouble = true;
                let _ = writeln!(problems, "{vm} ran on h{} and h{} at once: {a:?} / {b:?}", a.host, b.host);
            }
            for (at_us, hosts) in cgroups.two_copies(vm) {
                trouble = true;
                let _ = writeln!(problems, "{vm} had processes on hosts {hosts:?} at once, at {at_us} µs");
            }
            for host in self.bed.hosts() {
                let logged = self.guest_starts(host.index(), vm)?;
                let seen = timeline.starts(vm, host.index());
                if logged != seen {
                    trouble = true;
                    let _ = writeln!(
                        problems,
                        "{vm} on {}: the guest logged {logged} starts, the systemd sampler saw {seen}",
                        host.name()
                    );
                }
            }
            // The two observers agree: the cgroup rounds saw processes during every copy
            // systemd's timeline has, and at no other time. (Overlapping, not nested:
            // systemd stamps a unit's start just after forking its first process, and
            // the rounds have seen that process up to 20 ms earlier. Not one for one
            // either: a unit's cgroup can be empty for a moment while it stops, between
            // its main process and a stop command.)
            let (exact, seen) = (timeline.copies(vm), cgroups.copies(vm));
            let overlap = |c: &SeenCopy, e: &CopySpan| {
                c.host == e.host
                    && c.from_us <= e.until_us.unwrap_or(u64::MAX)
                    && e.from_us <= c.until_us.unwrap_or(u64::MAX)
            };
            for e in exact.iter().filter(|e| !seen.iter().any(|c| overlap(c, e))) {
                trouble = true;
                let _ = writeln!(problems, "{vm}: the cgroup rounds never saw the copy {e:?}");
            }
            for c in seen.iter().filter(|c| !exact.iter().any(|e| overlap(c, e))) {
                trouble = true;
                let _ = writeln!(problems, "{vm}: the cgroup rounds saw processes outside systemd's copies: {c:?}");
            }
            if trouble {
                let _ = writeln!(problems, "{}\n{}", timeline.describe(vm), cgroups.describe(vm));
            }
        }
        if !problems.is_empty() {
            bail!("{problems}");
        }
        Ok(Observed { timeline, cgroups })
    }
}

/// What [`BedCluster::assert_never_two_copies`] checked.
pub struct Observed {
    /// systemd's transition timestamps, journal lines and power cuts: exact intervals.
    pub timeline: Timeline,
    /// The test process's rounds over the guests' unit cgroups: sampled, about 50 a
    /// second ([`CgroupSamples::rate`]).
    pub cgroups: CgroupSamples,
}

/// See [`BedCluster::wait_reconciled`]: a few of the reconciler's 100 ms passes.
const RECONCILED_MARGIN_MS: u64 = 300;

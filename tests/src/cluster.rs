//! Clusters of real `blixard-agent` processes on loopback addresses, driven through
//! the generated gRPC client (never the CLI).
//!
//! ```no_run
//! use blixard_systests::cluster::{Cluster, Options};
//!
//! let mut cluster = Cluster::start("doc", 3, Options::default()).unwrap();
//! let leader = cluster.wait_formed(&[0, 1, 2]).unwrap();
//! cluster.agent_mut(leader).kill(); // SIGKILL
//! ```
//!
//! Authentication is on, as in production: [`Cluster::start`] writes a cluster secret
//! with `blixard-agent cluster new-secret` and every agent's config names it
//! (`cluster_secret_file`); the test's clients present an admin client certificate
//! issued from that secret and verify the agents against its CA. (A host added with
//! [`Cluster::add_agent_without_secret`] joins with a token and gets its certificate
//! from the cluster; [`Auth::Insecure`] is for comparing with plain text only.)
//!
//! Each cluster takes its own `127.A.B.0/24` (A and B drawn at random, the port fixed),
//! so tests run in parallel without sharing ports. Agents' data dirs, configs and logs
//! live in a temporary directory; when a test panics the logs are printed before it is
//! removed (set `BLIXARD_CLUSTER_KEEP=1` to keep it).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use blixard::api::pb;
use blixard::api::pb::blixard_client::BlixardClient;
use blixard::api::tls::{CertIdentity, Role};
use blixard::pki::{ClusterCa, ClusterSecret};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{Probe, agent_binary, wait_for};

/// The gRPC port every test agent listens on (on its own address).
pub const PORT: u16 = 7000;
/// One client request; agents wait for a leader up to 8 s themselves.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Forming a cluster, electing a leader, catching up: generous for a loaded CI machine.
pub const FORM_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a SIGTERM'd agent may take to exit.
/// `raft.voters` by default: a cluster of more hosts keeps the rest as learners.
const DEFAULT_VOTERS: usize = 5;
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Set to keep the agents' directories (configs, data, logs) after a test.
pub const KEEP_ENV: &str = "BLIXARD_CLUSTER_KEEP";
/// Lines of each agent's log printed when a test fails.
const LOG_TAIL_LINES: usize = 60;

/// How the agents authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// `cluster_secret_file`: mutual TLS between members and with clients.
    Secret,
    /// `insecure = true`: plain text (loopback), to compare against.
    Insecure,
}

/// Knobs for the agents' config files.
#[derive(Debug, Clone)]
pub struct Options {
    /// `[raft] tick_ms`: short ticks make elections (and tests) fast.
    pub tick_ms: u64,
    /// `[raft] log_compact_entries_max`.
    pub log_compact_entries_max: Option<u64>,
    /// Appended to every agent's config verbatim.
    pub extra: String,
    pub auth: Auth,
    /// `[capacity] vcpu` of every agent.
    pub vcpu: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options { tick_ms: 25, log_compact_entries_max: None, extra: String::new(), auth: Auth::Secret, vcpu: 16 }
    }
}

impl Options {
    /// Raft ticks of `tick_ms` (the default: 25), with the failure timing
    /// the agent's rules then require (`failure::Timing::validate`,
    /// docs/config.md): a host fences after the longest election (24 ticks
    /// with the default 12 election ticks) and 5 heartbeats (20 ticks), and
    /// the leader reschedules once that fence is certainly done; never
    /// shorter than the defaults (which 25 ms ticks give).
    pub fn with_tick_ms(mut self, tick_ms: u64) -> Options {
        let fence = (44 * tick_ms).max(1500);
        let fenced_by = fence + 100 + 250;
        let reschedule = (fenced_by * 101).div_ceil(99).div_ceil(100) * 100;
        self.tick_ms = tick_ms;
        self.extra.push_str(&format!(
            "\n[timing]\nfence_after_ms = {fence}\nreschedule_after_ms = {reschedule}\nnode_down_after_ms = {fence}\n"
        ));
        self
    }
}

/// What a test client presents and verifies agents with.
#[derive(Clone)]
pub struct ClientCredentials {
    /// Every CA the cluster trusts (PEM).
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl ClientCredentials {
    /// TLS settings for an agent listening at `address` (`ip:port`).
    pub fn tls_for(&self, address: &str) -> ClientTlsConfig {
        let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(host)
    }
}

/// One agent process (running or not) and its files.
pub struct Agent {
    pub name: String,
    /// `host:port` it listens on.
    pub address: String,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
}

impl Agent {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts the agent; its stderr is appended to [`Agent::log_path`].
    pub fn start(&mut self) -> Result<()> {
        self.start_with_env(&[])
    }

    /// [`Agent::start`] with extra environment variables (`NOTIFY_SOCKET`, ...).
    pub fn start_with_env(&mut self, env: &[(&str, &str)]) -> Result<()> {
        if self.child.is_some() {
            bail!("{} is already running", self.name);
        }
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log_path)?;
        let child = Command::new(agent_binary()?)
            .args(["run", "--config"])
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .envs(env.iter().copied())
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// The process id while it runs (for `/proc` measurements).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit (SIGKILL after [`STOP_TIMEOUT`]).
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else { bail!("{} is not running", self.name) };
        let pid = i32::try_from(child.id()).context("pid")?;
        // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not exit within {STOP_TIMEOUT:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Adds `line` (a top-level key, such as `labels = { rack = "r1" }`)
    /// to the config, for the next start.
    pub fn add_config(&self, line: &str) -> Result<()> {
        let config = fs::read_to_string(&self.config_path)?;
        fs::write(&self.config_path, format!("{line}\n{config}"))?;
        Ok(())
    }

    /// Replaces the config line that starts with `key` (say
    /// `initial_members`) by `line`, or removes it (`line` empty).
    pub fn replace_config(&self, key: &str, line: &str) -> Result<()> {
        let config = fs::read_to_string(&self.config_path)?;
        let kept: Vec<&str> = config.lines().map(|l| if l.starts_with(key) { line } else { l }).collect();
        fs::write(&self.config_path, kept.join("\n") + "\n")?;
        Ok(())
    }
}

/// What a run of the CLI left behind.
#[derive(Debug, Clone)]
pub struct CliOut {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliOut {
    /// Exit 0, or an error that shows the output.
    pub fn ok(self) -> Result<CliOut> {
        if self.code != 0 {
            bail!("the CLI failed: {self:?}");
        }
        Ok(self)
    }
}

fn run_cli(args: &[&str], connection: &[&str]) -> Result<CliOut> {
    let output = Command::new(agent_binary()?)
        .args(args)
        .args(connection)
        .env_remove("RUST_LOG")
        .env_remove("COMPLETE")
        .env_remove("BLIXARD_ENDPOINT")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running blixard-agent {}", args.join(" ")))?;
    Ok(CliOut {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Cluster {
    runtime: tokio::runtime::Runtime,
    /// `127.A.B`; agent i listens on `127.A.B.(i+1)`.
    prefix: [u8; 3],
    options: Options,
    /// The cluster secret file (`Auth::Secret`).
    secret: Option<PathBuf>,
    /// The admin client certificate test clients present (`Auth::Secret`).
    credentials: Option<ClientCredentials>,
    agents: Vec<Agent>,
    // Last: removed after the agents are killed.
    dir: tempfile::TempDir,
}

/// A `127.A.B.0/24` whose first addresses are free on [`PORT`].
fn free_prefix(agents: usize) -> Result<[u8; 3]> {
    for _ in 0..100 {
        let prefix = [127, rand::random_range(16..=250u8), rand::random_range(1..=250u8)];
        let free = (0..agents).all(|i| {
            let ip = Ipv4Addr::new(prefix[0], prefix[1], prefix[2], (i + 1) as u8);
            TcpListener::bind(SocketAddrV4::new(ip, PORT)).is_ok()
        });
        if free {
            return Ok(prefix);
        }
    }
    bail!("found no free 127.A.B.0/24 for {agents} agents")
}

impl Cluster {
    /// Writes configs for `initial` agents `h1..hN` sharing one `initial_members` list
    /// and starts them. `test` names the temporary directory.
    pub fn start(test: &str, initial: usize, options: Options) -> Result<Cluster> {
        let mut cluster = Cluster::configure(test, initial, options)?;
        for agent in &mut cluster.agents {
            agent.start()?;
        }
        Ok(cluster)
    }

    /// `total` agents: the first `initial` form the cluster from one
    /// `initial_members` list, the other `total - initial` join it through
    /// `join` seeds (the initial members); [`Cluster::start_all`] starts
    /// them all at once, as a fleet of hosts booting with one config does.
    /// Raises this process's open-file limit first ([`raise_fd_limit`]):
    /// each agent holds connections to its peers, the test's clients one to
    /// each agent.
    pub fn configure_joined(test: &str, total: usize, initial: usize, options: Options) -> Result<Cluster> {
        if initial == 0 || initial > total || total > AGENTS_MAX {
            bail!("configure_joined needs 1 <= initial ({initial}) <= total ({total}) <= {AGENTS_MAX}");
        }
        raise_fd_limit()?;
        let mut cluster = Cluster::configure_with_room(test, initial, total, options)?;
        let seeds: Vec<String> = (0..initial).map(|i| cluster.address_of(i)).collect();
        for _ in initial..total {
            cluster.add_agent(&format!("join = {}\n", toml_list(&seeds)))?;
        }
        Ok(cluster)
    }

    /// Starts every agent that is not running.
    pub fn start_all(&mut self) -> Result<()> {
        for agent in &mut self.agents {
            if agent.child.is_none() {
                agent.start()?;
            }
        }
        Ok(())
    }

    /// [`Cluster::start`] without starting anyone: the configs are written,
    /// so a test can change them ([`Agent::add_config`]) or prepare data dirs
    /// (`blixard-agent restore`) first.
    pub fn configure(test: &str, initial: usize, options: Options) -> Result<Cluster> {
        Self::configure_with_room(test, initial, initial + 4, options)
    }

    /// [`Cluster::configure`] with addresses free for `room` agents in all
    /// (those added later included).
    fn configure_with_room(test: &str, initial: usize, room: usize, options: Options) -> Result<Cluster> {
        let dir = tempfile::Builder::new().prefix(&format!("blixard-{test}-")).tempdir()?;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let prefix = free_prefix(room)?;
        let (secret, credentials) = match options.auth {
            Auth::Insecure => (None, None),
            Auth::Secret => {
                let path = dir.path().join("cluster.secret");
                let output = Command::new(agent_binary()?).args(["cluster", "new-secret"]).arg(&path).output()?;
                if !output.status.success() {
                    bail!("cluster new-secret failed: {}", String::from_utf8_lossy(&output.stderr));
                }
                let credentials = Self::client_credentials(&path, "tests", Role::Admin)?;
                (Some(path), Some(credentials))
            }
        };
        let mut cluster = Cluster { runtime, prefix, options, secret, credentials, agents: Vec::new(), dir };
        let members: Vec<String> =
            (0..initial).map(|i| format!("{}={}", Self::name_of(i), cluster.address_of(i))).collect();
        for _ in 0..initial {
            cluster.add_agent(&format!("initial_members = {}\n", toml_list(&members)))?;
        }
        Ok(cluster)
    }

    /// Installs a fake runner for guest `vm` on agent `index` (what
    /// microvm.nix lays out: `<state_dir>/<vm>/current/bin/microvm-run`),
    /// which the process runtime runs as the guest.
    pub fn install_runner(&self, index: usize, vm: &str) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let bin = self.agents[index].dir.join("microvms").join(vm).join("current/bin");
        fs::create_dir_all(&bin)?;
        let runner = bin.join("microvm-run");
        fs::write(&runner, format!("#!/bin/sh\necho \"{vm} booted\"\nexec sleep 100000\n"))?;
        fs::set_permissions(&runner, fs::Permissions::from_mode(0o755))?;
        Ok(())
    }

    /// Installs runners for `vms` on agent `index` as links to one shared
    /// runner (`<state_dir>/<vm>/current` -> `<cluster dir>/runner`, as
    /// microvm.nix links `current` into the Nix store): for thousands of
    /// guests, one script instead of one copy each.
    pub fn install_shared_runners(&self, index: usize, vms: &[String]) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let shared = self.dir.path().join("runner");
        let runner = shared.join("bin/microvm-run");
        if !runner.exists() {
            fs::create_dir_all(shared.join("bin"))?;
            // `exec`: the guest is one process (sleep), whose working
            // directory (`<state_dir>/<vm>`, set by the runtime) names it.
            fs::write(&runner, "#!/bin/sh\nexec sleep 100000\n")?;
            fs::set_permissions(&runner, fs::Permissions::from_mode(0o755))?;
        }
        let state_dir = self.agents[index].dir.join("microvms");
        for vm in vms {
            let dir = state_dir.join(vm);
            fs::create_dir_all(&dir)?;
            std::os::unix::fs::symlink(&shared, dir.join("current"))
                .with_context(|| format!("linking the runner of {vm} on {}", self.agents[index].name))?;
        }
        Ok(())
    }

    /// What finds the process runtime's guests that run now
    /// ([`GuestScanner::scan`]); it can move to another thread.
    pub fn guest_scanner(&self) -> Result<GuestScanner> {
        let root = fs::canonicalize(self.dir.path())?;
        Ok(GuestScanner { root, names: self.agents.iter().map(|a| a.name.clone()).collect() })
    }

    /// [`GuestScanner::scan`] now.
    pub fn running_guests(&self) -> Result<BTreeMap<String, Vec<usize>>> {
        self.guest_scanner()?.scan()
    }

    /// Runs the `blixard-agent` CLI with `args` against agent `index`, as an
    /// operator who can read the cluster secret would: `--config` names a
    /// client config that gives only `cluster_secret_file` (the CLI issues
    /// itself an admin certificate from it), or `insecure = true`.
    pub fn cli(&self, index: usize, args: &[&str]) -> Result<CliOut> {
        let address = self.agents[index].address.clone();
        let config = self.dir.path().join("client.toml");
        if !config.exists() {
            let auth = match &self.secret {
                Some(secret) => format!("cluster_secret_file = \"{}\"\n", secret.display()),
                None => "insecure = true\n".to_string(),
            };
            fs::write(&config, auth)?;
        }
        run_cli(args, &["--endpoint", &address, "--config", &config.display().to_string()])
    }

    /// [`Cluster::cli`] with `--json`, which must succeed: its output.
    pub fn cli_json(&self, index: usize, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(index, &all)?;
        if out.code != 0 {
            bail!("blixard-agent {} failed: {out:?}", all.join(" "));
        }
        serde_json::from_str(&out.stdout).with_context(|| format!("{} printed no JSON: {out:?}", all.join(" ")))
    }

    /// Runs a command of the CLI that works on an agent's own config and
    /// data dir (`restore`, `recover`): `args` then `--config` of agent `index`.
    pub fn offline(&self, index: usize, args: &[&str]) -> Result<CliOut> {
        let config = self.agents[index].config_path.display().to_string();
        run_cli(args, &["--config", &config])
    }

    fn name_of(index: usize) -> String {
        format!("h{}", index + 1)
    }

    pub fn address_of(&self, index: usize) -> String {
        let [a, b, c] = self.prefix;
        format!("{a}.{b}.{c}.{}:{PORT}", index + 1)
    }

    /// A client certificate for `name` with `role`, issued from the secret in
    /// `secret_path` (as `cluster issue-client` does), and the secret's CA.
    pub fn client_credentials(secret_path: &Path, name: &str, role: Role) -> Result<ClientCredentials> {
        let secret = ClusterSecret::read(secret_path)?;
        let ca = ClusterCa::from_secret(&secret);
        let issued = ca.issue_with_new_key(&CertIdentity::client(name, role), &[], 1)?;
        Ok(ClientCredentials { ca_pem: ca.cert_pem().to_string(), cert_pem: issued.cert, key_pem: issued.key })
    }

    /// The cluster secret file, unless the cluster runs insecure.
    pub fn secret_path(&self) -> Option<&Path> {
        self.secret.as_deref()
    }

    /// What the test's clients present (`None`: plain text).
    pub fn credentials(&self) -> Option<&ClientCredentials> {
        self.credentials.as_ref()
    }

    /// Makes the test's clients present `credentials` from now on (a
    /// rotated secret).
    pub fn set_credentials(&mut self, credentials: ClientCredentials) {
        self.credentials = Some(credentials);
    }

    /// Adds an agent (not started) whose config has `membership` (its
    /// `initial_members` or `join` line, or nothing) and the cluster's options.
    pub fn add_agent(&mut self, membership: &str) -> Result<usize> {
        let auth = match &self.secret {
            Some(secret) => format!("cluster_secret_file = \"{}\"\n", secret.display()),
            None => "insecure = true\n".to_string(),
        };
        self.add_agent_with(&format!("{membership}{auth}"))
    }

    /// Adds an agent (not started) without the cluster secret: with `join`
    /// seeds and a `join_token_file` in `membership`, it joins with a token and
    /// obtains its certificate from the cluster.
    pub fn add_agent_without_secret(&mut self, membership: &str) -> Result<usize> {
        self.add_agent_with(membership)
    }

    fn add_agent_with(&mut self, membership: &str) -> Result<usize> {
        let index = self.agents.len();
        let name = Self::name_of(index);
        let address = self.address_of(index);
        let dir = self.dir.path().join(&name);
        fs::create_dir_all(&dir)?;
        let mut config = format!(
            "node_name = \"{name}\"\nlisten = \"{address}\"\ndata_dir = \"{}\"\n{membership}",
            dir.join("data").display()
        );
        config.push_str(&self.options.extra);
        write!(
            config,
            "\n[runtime]\nkind = \"process\"\nstate_dir = \"{}\"\n[capacity]\nvcpu = {}\nmemory_mib = 65536\n[raft]\ntick_ms = {}\n",
            dir.join("microvms").display(),
            self.options.vcpu,
            self.options.tick_ms
        )?;
        if let Some(max) = self.options.log_compact_entries_max {
            writeln!(config, "log_compact_entries_max = {max}")?;
        }
        let config_path = dir.join("agent.toml");
        fs::write(&config_path, config)?;
        let log_path = dir.join("agent.log");
        self.agents.push(Agent { name, address, dir, config_path, log_path, child: None });
        Ok(index)
    }

    pub fn agent(&self, index: usize) -> &Agent {
        &self.agents[index]
    }

    pub fn agent_mut(&mut self, index: usize) -> &mut Agent {
        &mut self.agents[index]
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.agents.iter().position(|a| a.name == name)
    }

    /// Runs a future (a gRPC call) on the cluster's runtime.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// A client of agent `index` (connecting lazily), with the cluster's
    /// admin client certificate.
    pub fn client(&self, index: usize) -> BlixardClient<Channel> {
        self.client_with(index, self.credentials.as_ref())
    }

    /// A client of agent `index` presenting `credentials` (`None`: plain text).
    pub fn client_with(&self, index: usize, credentials: Option<&ClientCredentials>) -> BlixardClient<Channel> {
        let _guard = self.runtime.enter();
        BlixardClient::new(channel(&self.agents[index].address, credentials, REQUEST_TIMEOUT))
    }

    /// `ClusterStatus` from agent `index`.
    pub fn status(&self, index: usize) -> Result<pb::ClusterStatusResponse, tonic::Status> {
        let mut client = self.client(index);
        self.block_on(async move { client.cluster_status(pb::ClusterStatusRequest {}).await.map(|r| r.into_inner()) })
    }

    /// Waits until every agent in `agents` sees exactly those agents as healthy
    /// members, as many of them voters as there can be (all, up to the default
    /// `raft.voters`; the rest learners), and the same leader; returns the
    /// leader's index.
    pub fn wait_formed(&self, agents: &[usize]) -> Result<usize> {
        let mut want: Vec<String> = agents.iter().map(|&i| self.agents[i].name.clone()).collect();
        want.sort();
        let leader = wait_for(&format!("a cluster of {want:?}"), FORM_TIMEOUT, || {
            let mut leaders = Vec::new();
            for &i in agents {
                let status = match self.status(i) {
                    Ok(status) => status,
                    Err(e) => return Ok(Probe::NotYet(format!("{}: {}", self.agents[i].name, e.message()))),
                };
                let mut names: Vec<String> = status.members.iter().map(|m| m.name.clone()).collect();
                names.sort();
                let ready = status.member
                    && !status.leader.is_empty()
                    && names == want
                    && status.members.iter().all(|m| m.healthy)
                    && status.members.iter().filter(|m| m.role != "learner").count() == want.len().min(DEFAULT_VOTERS);
                if !ready {
                    return Ok(Probe::NotYet(format!("{}: {status:?}", self.agents[i].name)));
                }
                leaders.push(status.leader);
            }
            leaders.dedup();
            Ok(match leaders.as_slice() {
                [leader] => Probe::Ready(leader.clone()),
                _ => Probe::NotYet(format!("the agents disagree on the leader: {leaders:?}")),
            })
        })?;
        self.index_of(&leader).with_context(|| format!("leader {leader} is not one of the agents"))
    }

    /// Waits until every agent in `agents` is a member that sees exactly
    /// those agents as healthy members (voters or learners) and the same
    /// leader; returns the leader's index. Asks one agent at a time and
    /// starts again from the first that is not there yet, so a wait on 100
    /// agents costs one status call per agent per round.
    pub fn wait_members(&self, agents: &[usize], timeout: Duration) -> Result<usize> {
        let mut want: Vec<String> = agents.iter().map(|&i| self.agents[i].name.clone()).collect();
        want.sort();
        let mut from = 0;
        let leader = wait_for(&format!("a cluster of {} agents", want.len()), timeout, || {
            let mut leader: Option<String> = None;
            for (k, &i) in agents.iter().enumerate().cycle().skip(from).take(agents.len()) {
                let status = match self.status(i) {
                    Ok(status) => status,
                    Err(e) => {
                        from = k;
                        return Ok(Probe::NotYet(format!("{}: {}", self.agents[i].name, e.message())));
                    }
                };
                let mut names: Vec<&str> = status.members.iter().map(|m| m.name.as_str()).collect();
                names.sort_unstable();
                let healthy = status.members.iter().filter(|m| m.healthy).count();
                let same_leader = leader.as_ref().is_none_or(|l| *l == status.leader);
                if !(status.member
                    && !status.leader.is_empty()
                    && names == want
                    && healthy == want.len()
                    && same_leader)
                {
                    from = k;
                    let seen = format!(
                        "{}: member {}, leader {:?}, {} members, {healthy} healthy",
                        self.agents[i].name,
                        status.member,
                        status.leader,
                        names.len()
                    );
                    return Ok(Probe::NotYet(seen));
                }
                leader = Some(status.leader);
            }
            Ok(Probe::Ready(leader.expect("at least one agent")))
        })?;
        self.index_of(&leader).with_context(|| format!("leader {leader} is not one of the agents"))
    }

    /// Waits until the agent `at` sees every agent in `agents` with its capacity
    /// reported (a VM pinned to a host that has not reported is refused: "try again
    /// shortly").
    pub fn wait_reported(&self, at: usize, agents: &[usize]) -> Result<()> {
        let want: Vec<&str> = agents.iter().map(|&i| self.agents[i].name.as_str()).collect();
        wait_for(&format!("{want:?} to report their capacity"), FORM_TIMEOUT, || {
            let mut client = self.client(at);
            let nodes = match self.block_on(client.node_list(pb::NodeListRequest::default())) {
                Ok(nodes) => nodes.into_inner().nodes,
                Err(e) => return Ok(Probe::NotYet(e.message().to_string())),
            };
            let reported = |name: &&str| nodes.iter().any(|n| n.name == *name && n.vcpu_total > 0);
            Ok(if want.iter().all(reported) { Probe::Ready(()) } else { Probe::NotYet(format!("{nodes:?}")) })
        })
    }

    /// Prints every agent's log tail (on a failing test).
    fn dump_logs(&self) {
        for agent in &self.agents {
            let log = agent.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            eprintln!("----- {} ({}) log tail -----\n{}", agent.name, agent.address, tail.join("\n"));
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            agent.kill();
        }
        if std::thread::panicking() {
            self.dump_logs();
        }
        if std::env::var_os(KEEP_ENV).is_some() {
            let dir = std::mem::replace(&mut self.dir, tempfile::TempDir::new().expect("a temporary directory"));
            eprintln!("kept {}", dir.keep().display());
        }
    }
}

/// Finds the process runtime's guests of a [`Cluster`] in `/proc`,
/// independently of the agents.
#[derive(Debug, Clone)]
pub struct GuestScanner {
    /// The cluster's directory, canonical (as `/proc/<pid>/cwd` shows it).
    root: PathBuf,
    /// Agent names by index.
    names: Vec<String>,
}

impl GuestScanner {
    /// The guests that run now, by VM, with the indexes of the agents in
    /// whose state dir each runs (two entries: two copies), in one pass over
    /// `/proc`. A guest is a live process (not a zombie) whose working
    /// directory is `<agent dir>/microvms/<vm>` (the process runtime starts
    /// it there), whichever process is its parent: a guest that outlived
    /// its agent is found too.
    pub fn scan(&self) -> Result<BTreeMap<String, Vec<usize>>> {
        let mut found: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for entry in fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            // Gone between the listing and the read: not running.
            let Ok(cwd) = fs::read_link(format!("/proc/{pid}/cwd")) else { continue };
            let Ok(inside) = cwd.strip_prefix(&self.root) else { continue };
            let parts: Vec<&str> = inside.iter().filter_map(|p| p.to_str()).collect();
            let [host, "microvms", vm] = parts.as_slice() else { continue };
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            if blixard::guard::procfs::parse_stat(&stat).is_none_or(|s| s.state == 'Z') {
                continue;
            }
            if let Some(index) = self.names.iter().position(|n| n == host) {
                found.entry((*vm).to_string()).or_default().push(index);
            }
        }
        Ok(found)
    }
}

/// The most agents one cluster can hold: one `127.A.B.0/24`, `.1` to `.254`.
pub const AGENTS_MAX: usize = 254;

/// Raises this process's soft open-file limit to its hard limit (inherited
/// by the agents it starts): 100 agents on one machine hold thousands of
/// connections, more than the usual soft limit of 1024 allows one process.
pub fn raise_fd_limit() -> Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit write and read only `limit`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            bail!("getrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                bail!("setrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error());
            }
        }
    }
    Ok(limit.rlim_cur)
}

/// A lazily connecting channel to the agent at `address`: mutual TLS with
/// `credentials`, plain text without.
pub fn channel(address: &str, credentials: Option<&ClientCredentials>, timeout: Duration) -> Channel {
    channel_with(address, credentials, Duration::from_secs(2), timeout)
}

/// [`channel`] with a connect timeout of its own.
pub fn channel_with(
    address: &str,
    credentials: Option<&ClientCredentials>,
    connect_timeout: Duration,
    timeout: Duration,
) -> Channel {
    let scheme = if credentials.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
        .expect("a valid URI")
        .connect_timeout(connect_timeout)
        .timeout(timeout);
    if let Some(credentials) = credentials {
        endpoint = endpoint.tls_config(credentials.tls_for(address)).expect("valid TLS settings");
    }
    endpoint.connect_lazy()
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("\"{i}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

//! A 3-member etcd cluster on loopback, for the load client's side-by-side
//! comparison (`blixard-load throughput`).
//!
//! It runs Debian's `etcd` 3.4 (package `etcd-server`; `$BLIXARD_ETCD_BIN`
//! overrides the binary) with its defaults apart from addresses and logging,
//! so fsync is on, as it is for the agent. Members listen only on
//! `127.A.B.{1,2,3}`; their data lives in a temporary directory and they are
//! killed when the [`EtcdCluster`] is dropped. With `tls` (what the agents'
//! benchmark runs against), members and clients authenticate as the agents
//! do: mutual TLS between members and with clients, every certificate
//! issued by one CA (`--client-cert-auth`, `--peer-client-cert-auth`).

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tonic::transport::Channel;

use crate::{Probe, wait_for};

/// etcd's gRPC client API, generated from the subset in `proto/etcd/kv.proto`.
#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

/// etcd's usual client and peer ports (on each member's own address).
pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;
/// Forming the cluster and electing a leader.
const FORM_TIMEOUT: Duration = Duration::from_secs(60);

pub struct EtcdMember {
    pub name: String,
    /// `host:port` of the client API.
    pub client_address: String,
    pub log_path: PathBuf,
    child: Option<Child>,
}

impl EtcdMember {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    /// The client certificate and CA, with TLS.
    tls: Option<crate::cluster::ClientCredentials>,
    // Last: removed after the members are killed.
    dir: tempfile::TempDir,
}

fn etcd_binary() -> PathBuf {
    std::env::var_os("BLIXARD_ETCD_BIN").map_or_else(|| PathBuf::from("etcd"), PathBuf::from)
}

/// A `127.A.B.0/24` whose first `members` addresses have both etcd ports free.
fn free_prefix(members: usize) -> Result<[u8; 3]> {
    for _ in 0..100 {
        let prefix = [127, rand::random_range(16..=250u8), rand::random_range(1..=250u8)];
        let free = (0..members).all(|i| {
            let ip = Ipv4Addr::new(prefix[0], prefix[1], prefix[2], (i + 1) as u8);
            [CLIENT_PORT, PEER_PORT].iter().all(|&port| TcpListener::bind(SocketAddrV4::new(ip, port)).is_ok())
        });
        if free {
            return Ok(prefix);
        }
    }
    bail!("found no free 127.A.B.0/24 for {members} etcd members")
}

impl EtcdCluster {
    /// Starts `size` members `e1..eN` forming one new cluster (not waiting
    /// for it; see [`EtcdCluster::wait_ready`]).
    pub fn start(size: usize, tls: bool) -> Result<EtcdCluster> {
        let dir = tempfile::Builder::new().prefix("blixard-etcd-").tempdir()?;
        let [a, b, c] = free_prefix(size)?;
        let ip = |i: usize| format!("{a}.{b}.{c}.{}", i + 1);
        let scheme = if tls { "https" } else { "http" };
        let ca = tls.then(|| blixard::pki::ClusterSecret::generate().map(|s| blixard::pki::ClusterCa::from_secret(&s)));
        let ca = ca.transpose()?;
        let client_tls = match &ca {
            None => None,
            Some(ca) => {
                let identity = blixard::api::tls::CertIdentity::client("bench", blixard::api::tls::Role::Admin);
                let issued = ca.issue_with_new_key(&identity, &[], 1)?;
                Some(crate::cluster::ClientCredentials {
                    ca_pem: ca.cert_pem().to_string(),
                    cert_pem: issued.cert,
                    key_pem: issued.key,
                })
            }
        };
        let initial: Vec<String> = (0..size).map(|i| format!("e{}={scheme}://{}:{PEER_PORT}", i + 1, ip(i))).collect();
        let initial = initial.join(",");
        let token = format!("blixard-bench-{a}-{b}-{c}");
        let mut members = Vec::new();
        for i in 0..size {
            let name = format!("e{}", i + 1);
            let data = dir.path().join(&name);
            fs::create_dir_all(&data)?;
            let log_path = dir.path().join(format!("{name}.log"));
            let log = fs::File::create(&log_path)?;
            let client = format!("{scheme}://{}:{CLIENT_PORT}", ip(i));
            let peer = format!("{scheme}://{}:{PEER_PORT}", ip(i));
            let mut tls_args = Vec::new();
            if let Some(ca) = &ca {
                let identity = blixard::api::tls::CertIdentity::member(&name);
                // The member's own address, and 127.0.0.1: the source
                // address of its connections to the other members, which
                // etcd checks against a peer's certificate.
                let mut sans = blixard::pki::member_sans(&format!("{}:{CLIENT_PORT}", ip(i)), &name);
                for san in blixard::pki::member_sans("127.0.0.1:0", &name) {
                    if !sans.contains(&san) {
                        sans.push(san);
                    }
                }
                let issued = ca.issue_with_new_key(&identity, &sans, 1)?;
                let (ca_file, cert_file, key_file) =
                    (dir.path().join("ca.pem"), data.with_extension("pem"), data.with_extension("key"));
                fs::write(&ca_file, ca.cert_pem())?;
                fs::write(&cert_file, issued.cert)?;
                fs::write(&key_file, issued.key)?;
                for (flag, path) in [
                    ("--cert-file", &cert_file),
                    ("--key-file", &key_file),
                    ("--trusted-ca-file", &ca_file),
                    ("--peer-cert-file", &cert_file),
                    ("--peer-key-file", &key_file),
                    ("--peer-trusted-ca-file", &ca_file),
                ] {
                    tls_args.push(flag.to_string());
                    tls_args.push(path.display().to_string());
                }
                tls_args.extend(["--client-cert-auth".to_string(), "--peer-client-cert-auth".to_string()]);
            }
            let child = Command::new(etcd_binary())
                .arg("--name")
                .arg(&name)
                .arg("--data-dir")
                .arg(&data)
                .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &initial, "--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &token])
                .args(["--logger", "zap", "--log-level", "warn", "--log-outputs", "stderr"])
                .args(&tls_args)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| {
                    format!("starting {} (install Debian's etcd-server package)", etcd_binary().display())
                })?;
            members.push(EtcdMember {
                name,
                client_address: format!("{}:{CLIENT_PORT}", ip(i)),
                log_path,
                child: Some(child),
            });
        }
        Ok(EtcdCluster { members, tls: client_tls, dir })
    }

    /// A gRPC channel to member `index` (connecting lazily; call within a
    /// runtime), with the client certificate when the cluster runs TLS.
    pub fn channel(&self, index: usize) -> Channel {
        crate::cluster::channel_with(
            &self.members[index].client_address,
            self.tls.as_ref(),
            Duration::from_secs(2),
            Duration::from_secs(15),
        )
    }

    /// Waits until every member reports the same leader.
    pub fn wait_ready(&self, runtime: &tokio::runtime::Runtime) -> Result<()> {
        wait_for("an etcd cluster with a leader", FORM_TIMEOUT, || {
            let mut leaders = Vec::new();
            for (i, member) in self.members.iter().enumerate() {
                let status = runtime.block_on(async {
                    let mut client = pb::maintenance_client::MaintenanceClient::new(self.channel(i));
                    client.status(pb::StatusRequest {}).await.map(tonic::Response::into_inner)
                });
                match status {
                    Ok(s) if s.leader != 0 => leaders.push(s.leader),
                    Ok(_) => return Ok(Probe::NotYet(format!("{}: no leader", member.name))),
                    Err(e) => return Ok(Probe::NotYet(format!("{}: {}", member.name, e.message()))),
                }
            }
            leaders.dedup();
            Ok(if leaders.len() == 1 { Probe::Ready(()) } else { Probe::NotYet(format!("leaders {leaders:?}")) })
        })
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

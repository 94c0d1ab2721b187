//! What the CLI prints: aligned tables for people and the `--json` shapes
//! of design.md for scripts.
//!
//! JSON decisions (fields may be added, none renamed or removed):
//! - `node`, `leader` are `null` when there is none (the API sends "").
//! - `since` is an RFC 3339 UTC timestamp with milliseconds
//!   (`"2025-01-02T03:04:05.678Z"`), chosen over a bare number because it
//!   reads the same in a terminal and in `jq`; the same instant is also
//!   given as `since_unix_ms` for arithmetic. Both are `null` when unknown.
//! - `last_error` and `pending_reason` are `null` when empty.
//! - Labels are objects with keys in sorted order.
//! - Member ids are decimal strings (`"id": "12713832616263891722"`): they
//!   are random 64-bit numbers, which a JSON number cannot carry exactly
//!   past 2^53 (jq and JavaScript round them). The cluster id is a
//!   16-digit hex string, as the logs print it. Counters (terms, indexes,
//!   sizes) stay numbers: they never come near 2^53.
//!
//! Every function here is pure: `now_unix_ms` is passed in, so tests check
//! exact output.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::api::pb;

use super::error::one_line;

// ------------------------------------------------------------ JSON shapes --

#[derive(Debug, Serialize)]
pub struct ClusterStatusJson<'a> {
    pub leader: Option<&'a str>,
    pub term: u64,
    pub members: Vec<MemberJson<'a>>,
    pub commit_index: u64,
    pub applied_index: u64,
    /// Whether the answering member has quorum contact; false: its view
    /// may be stale, and it fences its guests.
    pub quorum: bool,
    /// How old its last quorum contact is, in ms (null: none since it started).
    pub contact_age_ms: Option<u64>,
    /// `null` when the agent asked is not a member.
    pub cluster_id: Option<String>,
    /// How many members vote.
    pub voters: u32,
    /// How many voters the leader keeps (`raft.voters`); `null` from an
    /// agent that predates the field.
    pub voters_wanted: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct MemberJson<'a> {
    pub id: String,
    pub name: &'a str,
    pub address: &'a str,
    pub role: &'a str,
    pub healthy: bool,
    /// Whether it votes in Raft (a learner does not).
    pub voter: bool,
    /// Its `zone` and `rack` labels, `null` when unset.
    pub zone: Option<&'a str>,
    pub rack: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct NodeJson<'a> {
    pub name: &'a str,
    pub status: &'a str,
    pub vcpu_total: u64,
    pub vcpu_used: u64,
    pub memory_mib_total: u64,
    pub memory_mib_used: u64,
    pub id: String,
    pub address: &'a str,
    pub role: &'a str,
    pub vms: u32,
    pub labels: BTreeMap<&'a str, &'a str>,
}

#[derive(Debug, Serialize)]
pub struct VmJson<'a> {
    pub name: &'a str,
    pub node: Option<&'a str>,
    pub desired: &'a str,
    pub state: &'a str,
    pub vcpu: u32,
    pub memory_mib: u64,
    /// "auto" or "manual".
    pub failover: &'a str,
}

#[derive(Debug, Serialize)]
pub struct VmStatusJson<'a> {
    #[serde(flatten)]
    pub vm: VmJson<'a>,
    pub since: Option<String>,
    pub since_unix_ms: Option<u64>,
    pub last_error: Option<&'a str>,
    pub pending_reason: Option<&'a str>,
    pub pinned_node: Option<&'a str>,
    pub anti_affinity: Option<&'a str>,
    pub labels: BTreeMap<&'a str, &'a str>,
    pub generation: u64,
}

#[derive(Debug, Serialize)]
pub struct NameJson<'a> {
    pub name: &'a str,
}

#[derive(Debug, Serialize)]
pub struct JoinJson<'a> {
    pub name: &'a str,
    pub id: String,
}

/// `vm update --json`: the `vm status` object, what changed, and when it
/// takes effect (see [`TakesEffect`]).
#[derive(Debug, Serialize)]
pub struct VmUpdateJson<'a> {
    #[serde(flatten)]
    pub vm: VmStatusJson<'a>,
    pub changed: &'a [String],
    pub takes_effect: &'static str,
}

/// When a `vm update` takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakesEffect {
    /// Nothing changed.
    Unchanged,
    /// No guest runs the VM: it starts with the new spec.
    Now,
    /// Its host no longer satisfies the spec: the VM moves (a running
    /// guest restarts on its new host).
    Moving,
    /// The guest runs on a host that still satisfies the spec: the
    /// cluster accounts for the new spec now, the guest runs as started
    /// until its next start.
    NextStart,
    /// `--restart`: it was stopped and started again.
    Restarted,
}

impl TakesEffect {
    pub fn as_str(self) -> &'static str {
        match self {
            TakesEffect::Unchanged => "unchanged",
            TakesEffect::Now => "now",
            TakesEffect::Moving => "moving",
            TakesEffect::NextStart => "next_start",
            TakesEffect::Restarted => "restarted",
        }
    }

    /// When a change to `vm` (as the update left it) takes effect.
    pub fn of(vm: &pb::VmInfo, changed: bool, moved: bool) -> TakesEffect {
        match (changed, moved) {
            (false, _) => TakesEffect::Unchanged,
            (true, true) => TakesEffect::Moving,
            _ if matches!(vm.state.as_str(), "running" | "starting" | "stopping") => TakesEffect::NextStart,
            _ => TakesEffect::Now,
        }
    }

    pub fn sentence(self) -> &'static str {
        match self {
            TakesEffect::Unchanged => "nothing changed",
            TakesEffect::Now => "it starts with the new spec",
            TakesEffect::Moving => "its host no longer satisfies it, so it moves to another host",
            TakesEffect::NextStart => {
                "the cluster counts the new spec now; the guest keeps running as started until its next start                  (--restart restarts it)"
            }
            TakesEffect::Restarted => "it was restarted",
        }
    }
}

/// `cluster backup FILE --json`.
#[derive(Debug, Serialize)]
pub struct BackupJson<'a> {
    pub file: String,
    pub cluster_id: String,
    pub index: u64,
    pub term: u64,
    pub taken_by: &'a str,
    pub taken_at: String,
    pub taken_unix_ms: u64,
    pub members: u32,
    pub vms: u64,
    pub state_bytes: u64,
    pub state_sha256: String,
}

pub fn backup_json<'a>(file: &std::path::Path, h: &'a crate::backup::Header) -> BackupJson<'a> {
    BackupJson {
        file: file.display().to_string(),
        cluster_id: format!("{:016x}", h.cluster_id),
        index: h.index,
        term: h.term,
        taken_by: &h.taken_by,
        taken_at: rfc3339_utc(h.taken_unix_ms),
        taken_unix_ms: h.taken_unix_ms,
        members: h.members,
        vms: h.vms,
        state_bytes: h.state_bytes,
        state_sha256: h.digest_hex(),
    }
}

pub fn backup_text(file: &std::path::Path, h: &crate::backup::Header) -> String {
    format!(
        "backup of cluster {:016x} at index {} ({} members, {} VMs, {} bytes of state, sha256 {}) written to {}
",
        h.cluster_id,
        h.index,
        h.members,
        h.vms,
        h.state_bytes,
        h.digest_hex(),
        file.display()
    )
}

/// `cluster join-token --json`: `{"token": "blxjt_...", "expires_unix_ms": ...}`.
#[derive(Debug, Serialize)]
pub struct JoinTokenJson<'a> {
    pub token: &'a str,
    pub expires_unix_ms: u64,
}

/// One event: `{"seq": 7, "index": 42, "at": "2025-...Z", "at_unix_ms": ...,
/// "kind": "vm_moved", "vm": "web" | null, "node": "h2" | null,
/// "from": "h1" | null, "message": "..."}`.
#[derive(Debug, Clone, Serialize)]
pub struct EventJson {
    pub seq: u64,
    pub index: u64,
    pub at: String,
    pub at_unix_ms: u64,
    pub kind: String,
    pub vm: Option<String>,
    pub node: Option<String>,
    pub from: Option<String>,
    pub message: String,
}

pub fn event_json(e: &pb::Event) -> EventJson {
    EventJson {
        seq: e.seq,
        index: e.index,
        at: rfc3339_utc(e.at_unix_ms),
        at_unix_ms: e.at_unix_ms,
        kind: e.kind.clone(),
        vm: non_empty(&e.vm).map(str::to_string),
        node: non_empty(&e.node).map(str::to_string),
        from: non_empty(&e.from).map(str::to_string),
        message: e.message.clone(),
    }
}

/// `2025-01-02 03:04:05 UTC  vm_moved        VM web moved from h1 to h2`
pub fn event_line(e: &pb::Event) -> String {
    format!("{}  {:<15} {}\n", human_utc(e.at_unix_ms), one_line(&e.kind), one_line(&e.message))
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn sorted(labels: &std::collections::HashMap<String, String>) -> BTreeMap<&str, &str> {
    labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Whether a member votes. An agent that predates the `voter` field
/// (`voters_wanted` is 0) still says so by its role.
fn votes(s: &pb::ClusterStatusResponse, m: &pb::MemberStatus) -> bool {
    if s.voters_wanted == 0 { m.role != "learner" } else { m.voter }
}

fn voter_count(s: &pb::ClusterStatusResponse) -> u32 {
    if s.voters_wanted == 0 { s.members.iter().filter(|m| votes(s, m)).count() as u32 } else { s.voters }
}

pub fn cluster_status_json(s: &pb::ClusterStatusResponse) -> ClusterStatusJson<'_> {
    ClusterStatusJson {
        leader: non_empty(&s.leader),
        term: s.term,
        members: s
            .members
            .iter()
            .map(|m| MemberJson {
                id: m.id.to_string(),
                name: &m.name,
                address: &m.address,
                role: &m.role,
                healthy: m.healthy,
                voter: votes(s, m),
                zone: non_empty(&m.zone),
                rack: non_empty(&m.rack),
            })
            .collect(),
        commit_index: s.commit_index,
        applied_index: s.applied_index,
        quorum: s.quorum,
        contact_age_ms: s.contact_age_ms,
        cluster_id: (s.cluster_id != 0).then(|| format!("{:016x}", s.cluster_id)),
        voters: voter_count(s),
        voters_wanted: (s.voters_wanted != 0).then_some(s.voters_wanted),
    }
}

pub fn node_json(n: &pb::NodeInfo) -> NodeJson<'_> {
    NodeJson {
        name: &n.name,
        status: &n.status,
        vcpu_total: n.vcpu_total,
        vcpu_used: n.vcpu_used,
        memory_mib_total: n.memory_mib_total,
        memory_mib_used: n.memory_mib_used,
        id: n.id.to_string(),
        address: &n.address,
        role: &n.role,
        vms: n.vms,
        labels: sorted(&n.labels),
    }
}

pub fn vm_json(v: &pb::VmInfo) -> VmJson<'_> {
    VmJson {
        name: &v.name,
        node: non_empty(&v.node),
        desired: &v.desired,
        state: &v.state,
        vcpu: v.vcpu,
        memory_mib: v.memory_mib,
        failover: if v.failover.is_empty() { "auto" } else { &v.failover },
    }
}

pub fn vm_status_json(v: &pb::VmInfo) -> VmStatusJson<'_> {
    let since_unix_ms = (v.since_unix_ms != 0).then_some(v.since_unix_ms);
    VmStatusJson {
        vm: vm_json(v),
        since: since_unix_ms.map(rfc3339_utc),
        since_unix_ms,
        last_error: non_empty(&v.last_error),
        pending_reason: non_empty(&v.pending_reason),
        pinned_node: non_empty(&v.pinned_node),
        anti_affinity: non_empty(&v.anti_affinity),
        labels: sorted(&v.labels),
        generation: v.generation,
    }
}

/// Pretty JSON and a final newline.
pub fn to_json(value: &impl Serialize) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("our JSON shapes always serialize");
    text.push('\n');
    text
}

/// Writes `text` to stdout. A reader that went away (`| head`) ends the
/// output quietly: the command has nothing left to tell it.
pub fn write_stdout(text: &str) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).is_ok()
}

/// Compact JSON on one line (for streams: one object per line).
pub fn to_json_line(value: &impl Serialize) -> String {
    let mut text = serde_json::to_string(value).expect("our JSON shapes always serialize");
    text.push('\n');
    text
}

// ----------------------------------------------------------------- tables --

/// Left-aligned columns two spaces apart; no trailing spaces. Cells are
/// made one line, so a hostile value cannot break the layout.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|c| cell(c)).collect()).collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, c) in row.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let headers: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&headers).chain(&rows) {
        let mut line = String::new();
        for (i, c) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(c);
            if i + 1 < row.len() {
                line.extend(std::iter::repeat_n(' ', widths[i] - c.chars().count()));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn cell(text: &str) -> String {
    let text = one_line(text);
    if text.is_empty() { "-".to_string() } else { text }
}

pub fn cluster_status_table(s: &pb::ClusterStatusResponse) -> String {
    let leader = if s.leader.is_empty() { "none".to_string() } else { cell(&s.leader) };
    let mut out = format!("leader: {leader}\nterm:   {}\n", s.term);
    if s.cluster_id != 0 {
        out.push_str(&format!("cluster: {:016x}\n", s.cluster_id));
    }
    if s.member && !s.quorum {
        let age = match s.contact_age_ms {
            Some(ms) => format!("its last quorum contact was {:.1} s ago", ms as f64 / 1000.0),
            None => "it has had no quorum contact since it started".to_string(),
        };
        out.push_str(&format!(
            "quorum: NO: {} cannot reach a quorum ({age}); what it shows may be stale, and it fences its guests\n",
            cell(&s.name)
        ));
    }
    if !s.members.is_empty() {
        out.push_str(&voters_line(s));
    }
    out.push('\n');
    // Zone and rack columns only when some member carries the label.
    let zones = s.members.iter().any(|m| !m.zone.is_empty());
    let racks = s.members.iter().any(|m| !m.rack.is_empty());
    let rows: Vec<Vec<String>> = s
        .members
        .iter()
        .map(|m| {
            let mut row = vec![
                m.name.clone(),
                m.id.to_string(),
                m.address.clone(),
                m.role.clone(),
                if votes(s, m) { "yes" } else { "no" }.to_string(),
                if m.healthy { "yes" } else { "no" }.to_string(),
            ];
            if zones {
                row.push(m.zone.clone());
            }
            if racks {
                row.push(m.rack.clone());
            }
            row
        })
        .collect();
    let mut headers = vec!["NAME", "ID", "ADDRESS", "ROLE", "VOTER", "HEALTHY"];
    if zones {
        headers.push("ZONE");
    }
    if racks {
        headers.push("RACK");
    }
    out.push_str(&table(&headers, &rows));
    out
}

/// `voters: 3 of 5 wanted`, and why when short: too few members, or the
/// leader is replacing one.
fn voters_line(s: &pb::ClusterStatusResponse) -> String {
    let n = voter_count(s);
    let wanted = s.voters_wanted;
    if wanted == 0 {
        return format!("voters: {n}\n");
    }
    let note = if n < wanted && s.members.iter().all(|m| votes(s, m)) {
        " (every member votes)"
    } else if n != wanted {
        " (the leader promotes or demotes to keep raft.voters)"
    } else {
        ""
    };
    format!("voters: {n} of {wanted} wanted{note}\n")
}

pub fn node_list_table(nodes: &[pb::NodeInfo]) -> String {
    if nodes.is_empty() {
        return "no nodes\n".to_string();
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.status.clone(),
                format!("{}/{}", n.vcpu_used, n.vcpu_total),
                format!("{}/{} MiB", n.memory_mib_used, n.memory_mib_total),
                n.vms.to_string(),
            ]
        })
        .collect();
    table(&["NAME", "STATUS", "VCPU", "MEMORY", "VMS"], &rows)
}

pub fn vm_list_table(vms: &[pb::VmInfo]) -> String {
    if vms.is_empty() {
        return "no VMs\n".to_string();
    }
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.node.clone(),
                v.desired.clone(),
                v.state.clone(),
                v.vcpu.to_string(),
                format!("{} MiB", v.memory_mib),
            ]
        })
        .collect();
    table(&["NAME", "NODE", "DESIRED", "STATE", "VCPU", "MEMORY"], &rows)
}

/// `key: value` lines, values aligned.
pub fn vm_status_text(v: &pb::VmInfo, now_unix_ms: u64) -> String {
    let since = if v.since_unix_ms == 0 {
        "-".to_string()
    } else {
        format!("{} ({})", human_utc(v.since_unix_ms), age(v.since_unix_ms, now_unix_ms))
    };
    let labels = sorted(&v.labels).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ");
    let lines = [
        ("name", v.name.clone()),
        ("node", v.node.clone()),
        ("desired", v.desired.clone()),
        ("state", v.state.clone()),
        ("since", since),
        ("vcpu", v.vcpu.to_string()),
        ("memory", format!("{} MiB", v.memory_mib)),
        ("labels", labels),
        ("pinned to", v.pinned_node.clone()),
        ("anti-affinity", v.anti_affinity.clone()),
        ("last error", v.last_error.clone()),
        ("failover", if v.failover.is_empty() { "auto".into() } else { v.failover.clone() }),
        (if v.state == "lost" { "lost because" } else { "pending reason" }, v.pending_reason.clone()),
        ("generation", v.generation.to_string()),
    ];
    key_values(&lines)
}

fn key_values(lines: &[(&str, String)]) -> String {
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (key, value) in lines {
        out.push_str(&format!("{:<width$} {}\n", format!("{key}:"), cell(value)));
    }
    out
}

// ------------------------------------------------------ write confirmations --

/// Where a VM is, for a sentence: "running on h1", "pending on no host".
pub fn where_is(v: &pb::VmInfo) -> String {
    if v.node.is_empty() {
        format!("{}, on no host", cell(&v.state))
    } else {
        format!("{} on {}", cell(&v.state), cell(&v.node))
    }
}

/// `vm start|stop` without `--wait`: what was asked and where the VM is.
pub fn vm_desired(v: &pb::VmInfo) -> String {
    let name = cell(&v.name);
    let wanted = cell(&v.desired);
    let done = match wanted.as_str() {
        "running" => v.state == "running",
        _ => v.state == "stopped",
    };
    if done {
        let on = if v.node.is_empty() { String::new() } else { format!(" on {}", cell(&v.node)) };
        return format!("vm {name} is {wanted}{on}\n");
    }
    let action = if wanted == "running" { "starts" } else { "stops" };
    let actor = if v.node.is_empty() && wanted == "running" { "the host it is placed on" } else { "its host" };
    let until = if wanted == "running" { "it runs" } else { "it has stopped" };
    let mut text = format!("vm {name}: desired {wanted}, now {}; {actor} {action} it shortly", where_is(v));
    if v.node.is_empty() && !v.pending_reason.is_empty() {
        text.push_str(&format!(" (not placed yet: {})", one_line(&v.pending_reason)));
    }
    text.push_str(&format!(" (--wait waits until {until})\n"));
    text
}

/// The line `vm <verb> --wait` ends with.
pub fn vm_settled(v: &pb::VmInfo) -> String {
    format!("vm {} is {}\n", cell(&v.name), where_is(v))
}

pub fn vm_written(verb: &str, v: &pb::VmInfo) -> String {
    let place = if v.node.is_empty() && v.desired == "stopped" {
        "on no host until it is started".to_string()
    } else if v.node.is_empty() {
        match v.pending_reason.as_str() {
            "" => "not placed yet".to_string(),
            reason => format!("not placed yet: {}", one_line(reason)),
        }
    } else {
        format!("on {}", cell(&v.node))
    };
    format!("vm {} {verb}: desired {}, state {}, {place}\n", cell(&v.name), cell(&v.desired), cell(&v.state))
}

pub fn node_written(verb: &str, n: &pb::NodeInfo) -> String {
    let plural = if n.vms == 1 { "" } else { "s" };
    format!("node {} {verb}: status {}, {} VM{plural}\n", cell(&n.name), cell(&n.status), n.vms)
}

// ------------------------------------------------------------------- time --

/// `2025-01-02T03:04:05.678Z`
pub fn rfc3339_utc(unix_ms: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(unix_ms / 1000);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z", unix_ms % 1000)
}

/// `2025-01-02 03:04:05 UTC`
pub fn human_utc(unix_ms: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(unix_ms / 1000);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC")
}

/// `5s ago`, `3m12s ago`, `4h5m ago`, `2d3h ago`; a time ahead of this
/// host's clock (skew between hosts) reads `just now`.
pub fn age(since_unix_ms: u64, now_unix_ms: u64) -> String {
    let Some(ms) = now_unix_ms.checked_sub(since_unix_ms) else { return "just now".to_string() };
    let s = ms / 1000;
    let text = match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    };
    format!("{text} ago")
}

/// Seconds since the epoch to (year, month, day, hour, minute, second),
/// proleptic Gregorian, UTC (Howard Hinnant's `civil_from_days`).
fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, (rem / 3600) as u32, (rem % 3600 / 60) as u32, (rem % 60) as u32)
}

#[cfg(test)]
// The proto only grows; `..Default::default()` keeps these fixtures
// compiling when it does.
#[allow(clippy::needless_update)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vm(name: &str, node: &str) -> pb::VmInfo {
        pb::VmInfo {
            name: name.into(),
            node: node.into(),
            desired: "running".into(),
            state: if node.is_empty() { "pending" } else { "running" }.into(),
            vcpu: 2,
            memory_mib: 1024,
            since_unix_ms: 1_735_787_045_678,
            labels: [("tier".to_string(), "web".to_string())].into(),
            pending_reason: if node.is_empty() { "no host has room for 2 vcpus".into() } else { String::new() },
            generation: 4,
            ..Default::default()
        }
    }

    fn status() -> pb::ClusterStatusResponse {
        pb::ClusterStatusResponse {
            leader: "h1".into(),
            term: 3,
            members: vec![
                pb::MemberStatus {
                    id: 1,
                    name: "h1".into(),
                    address: "10.0.0.1:7000".into(),
                    role: "leader".into(),
                    healthy: true,
                    voter: true,
                    zone: "a".into(),
                    ..Default::default()
                },
                pb::MemberStatus {
                    id: 22,
                    name: "h2".into(),
                    address: "10.0.0.2:7000".into(),
                    role: "learner".into(),
                    healthy: false,
                    ..Default::default()
                },
            ],
            commit_index: 10,
            applied_index: 9,
            voters: 1,
            voters_wanted: 3,
            ..Default::default()
        }
    }

    fn node() -> pb::NodeInfo {
        pb::NodeInfo {
            name: "h1".into(),
            id: 1,
            address: "10.0.0.1:7000".into(),
            status: "up".into(),
            role: "leader".into(),
            vcpu_total: 8,
            vcpu_used: 2,
            memory_mib_total: 16384,
            memory_mib_used: 1024,
            vms: 1,
            ..Default::default()
        }
    }

    fn value(s: impl Serialize) -> serde_json::Value {
        serde_json::to_value(s).unwrap()
    }

    #[test]
    fn cluster_status_json_shape() {
        assert_eq!(
            value(cluster_status_json(&status())),
            json!({"leader": "h1", "term": 3, "commit_index": 10, "applied_index": 9, "quorum": false,
                   "contact_age_ms": null, "members": [
                {"id": "1", "name": "h1", "address": "10.0.0.1:7000", "role": "leader", "healthy": true,
                 "voter": true, "zone": "a", "rack": null},
                {"id": "22", "name": "h2", "address": "10.0.0.2:7000", "role": "learner", "healthy": false,
                 "voter": false, "zone": null, "rack": null}],
                "cluster_id": null, "voters": 1, "voters_wanted": 3})
        );
        let none = pb::ClusterStatusResponse { leader: String::new(), ..status() };
        assert_eq!(value(cluster_status_json(&none))["leader"], serde_json::Value::Null);
        // An agent from before `voter`: who votes follows from the role.
        let mut old = pb::ClusterStatusResponse { voters: 0, voters_wanted: 0, ..status() };
        old.members[0].voter = false;
        let j = value(cluster_status_json(&old));
        assert_eq!((j["voters"].clone(), j["voters_wanted"].clone()), (json!(1), serde_json::Value::Null));
        assert_eq!((j["members"][0]["voter"].clone(), j["members"][1]["voter"].clone()), (json!(true), json!(false)));
    }

    #[test]
    fn node_json_shape() {
        assert_eq!(
            value(vec![node_json(&node())]),
            json!([{"name": "h1", "status": "up", "vcpu_total": 8, "vcpu_used": 2, "memory_mib_total": 16384,
                    "memory_mib_used": 1024, "id": "1", "address": "10.0.0.1:7000", "role": "leader", "vms": 1,
                    "labels": {}}])
        );
    }

    #[test]
    fn vm_json_shapes() {
        assert_eq!(
            value(vec![vm_json(&vm("web", "h1")), vm_json(&vm("db", ""))]),
            json!([
                {"name": "web", "node": "h1", "desired": "running", "state": "running", "vcpu": 2, "memory_mib": 1024,
                 "failover": "auto"},
                {"name": "db", "node": null, "desired": "running", "state": "pending", "vcpu": 2, "memory_mib": 1024,
                 "failover": "auto"}
            ])
        );
        assert_eq!(
            value(vm_status_json(&vm("db", ""))),
            json!({"name": "db", "node": null, "desired": "running", "state": "pending", "vcpu": 2,
                   "memory_mib": 1024, "failover": "auto", "since": "2025-01-02T03:04:05.678Z", "since_unix_ms": 1_735_787_045_678u64,
                   "last_error": null, "pending_reason": "no host has room for 2 vcpus", "pinned_node": null,
                   "anti_affinity": null, "labels": {"tier": "web"}, "generation": 4})
        );
        let failed = pb::VmInfo { last_error: "exit status 1".into(), since_unix_ms: 0, ..vm("web", "h1") };
        let j = value(vm_status_json(&failed));
        assert_eq!(j["last_error"], "exit status 1");
        assert_eq!(j["since"], serde_json::Value::Null);
        assert_eq!(j["since_unix_ms"], serde_json::Value::Null);
    }

    #[test]
    fn tables_are_aligned() {
        assert_eq!(
            cluster_status_table(&status()),
            "leader: h1\nterm:   3\nvoters: 1 of 3 wanted (the leader promotes or demotes to keep raft.voters)\n\n\
             NAME  ID  ADDRESS        ROLE     VOTER  HEALTHY  ZONE\n\
             h1    1   10.0.0.1:7000  leader   yes    yes      a\n\
             h2    22  10.0.0.2:7000  learner  no     no       -\n"
        );
        let mut all_vote = status();
        all_vote.members.truncate(1);
        assert!(cluster_status_table(&all_vote).contains("\nvoters: 1 of 3 wanted (every member votes)\n"));
        all_vote.voters_wanted = 1;
        assert!(cluster_status_table(&all_vote).contains("\nvoters: 1 of 1 wanted\n"));
        let no_leader = pb::ClusterStatusResponse { leader: String::new(), members: vec![], ..status() };
        assert!(cluster_status_table(&no_leader).starts_with("leader: none\n"));
        assert_eq!(
            node_list_table(&[node()]),
            "NAME  STATUS  VCPU  MEMORY          VMS\n\
             h1    up      2/8   1024/16384 MiB  1\n"
        );
        assert_eq!(
            vm_list_table(&[vm("web", "h1"), vm("database", "")]),
            "NAME      NODE  DESIRED  STATE    VCPU  MEMORY\n\
             web       h1    running  running  2     1024 MiB\n\
             database  -     running  pending  2     1024 MiB\n"
        );
        assert_eq!(vm_list_table(&[]), "no VMs\n");
        assert_eq!(node_list_table(&[]), "no nodes\n");
    }

    #[test]
    fn cells_cannot_break_the_layout() {
        let hostile = pb::VmInfo { name: "a\nb\u{1b}[31m".into(), ..vm("x", "h1") };
        let text = vm_list_table(&[hostile]);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(!text.contains('\u{1b}'));
    }

    #[test]
    fn vm_status_lines() {
        let v = pb::VmInfo { last_error: "exit status 1".into(), ..vm("web", "h1") };
        let text = vm_status_text(&v, 1_735_787_045_678 + 192_000);
        assert_eq!(
            text,
            "name:           web\n\
             node:           h1\n\
             desired:        running\n\
             state:          running\n\
             since:          2025-01-02 03:04:05 UTC (3m12s ago)\n\
             vcpu:           2\n\
             memory:         1024 MiB\n\
             labels:         tier=web\n\
             pinned to:      -\n\
             anti-affinity:  -\n\
             last error:     exit status 1\n\
             failover:       auto\n\
             pending reason: -\n\
             generation:     4\n"
        );
    }

    #[test]
    fn confirmations() {
        assert_eq!(vm_written("created", &vm("web", "h1")), "vm web created: desired running, state running, on h1\n");
        assert_eq!(
            vm_written("created", &vm("db", "")),
            "vm db created: desired running, state pending, not placed yet: no host has room for 2 vcpus\n"
        );
        assert_eq!(node_written("draining", &node()), "node h1 draining: status up, 1 VM\n");
        let stopped = pb::VmInfo { desired: "running".into(), state: "stopped".into(), ..vm("web", "h1") };
        assert_eq!(
            vm_desired(&stopped),
            "vm web: desired running, now stopped on h1; its host starts it shortly (--wait waits until it runs)\n"
        );
        assert_eq!(vm_desired(&vm("web", "h1")), "vm web is running on h1\n");
        let stopping = pb::VmInfo { desired: "stopped".into(), ..vm("web", "h1") };
        assert_eq!(
            vm_desired(&stopping),
            "vm web: desired stopped, now running on h1; its host stops it shortly (--wait waits until it has stopped)\n"
        );
        // A big random id survives JSON exactly, as a string.
        let big = pb::NodeInfo { id: u64::MAX - 1, ..node() };
        assert_eq!(value(node_json(&big))["id"], "18446744073709551614");
    }

    #[test]
    fn times() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_utc(1_735_787_045_678), "2025-01-02T03:04:05.678Z");
        assert_eq!(rfc3339_utc(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
        assert_eq!(human_utc(1_735_787_045_678), "2025-01-02 03:04:05 UTC");
        assert_eq!(age(1000, 1000), "0s ago");
        assert_eq!(age(0, 59_999), "59s ago");
        assert_eq!(age(0, 3_600_000 + 5 * 60_000), "1h5m ago");
        assert_eq!(age(0, 2 * 86_400_000 + 3 * 3_600_000), "2d3h ago");
        assert_eq!(age(5000, 1000), "just now");
    }
}

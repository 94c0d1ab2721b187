//! The dashboard's "recent events" panel, and the one place it gets them.
//!
//! Until the agent records cluster events of its own, this module derives
//! them by comparing successive overviews this agent takes ("vm web running
//! on h2", "host h3 down"). The page reads them only through
//! [`EventLog::recent`], so pointing the panel at a real event stream means
//! replacing this module's insides, not the page.
//!
//! Derived events are what *this* agent saw: a change that came and went
//! between two samples is not seen, and a freshly started agent knows no
//! history.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;

use super::overview::{MemberView, Overview, VmView};

/// How many events the log keeps (older ones are dropped).
pub const EVENTS_MAX: usize = 200;
/// How many events one comparison may add; a larger change (a thousand VMs
/// created at once) is summarised, so one burst cannot flush the history.
pub const EVENTS_PER_CHANGE_MAX: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warning,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    pub at_unix_ms: u64,
    pub level: Level,
    /// `host`, `vm` or `cluster`.
    pub kind: &'static str,
    /// The host or VM it is about (empty for the cluster).
    pub subject: String,
    /// One line for an operator, starting with the subject.
    pub message: String,
}

fn event(at_unix_ms: u64, level: Level, kind: &'static str, subject: &str, message: String) -> Event {
    Event { at_unix_ms, level, kind, subject: subject.to_string(), message }
}

fn vm_message(vm: &VmView) -> (Level, String) {
    let on = vm.node.as_deref().map(|n| format!(" on {n}")).unwrap_or_default();
    match (vm.state, &vm.last_error) {
        ("failed", Some(error)) => (Level::Error, format!("vm {} failed{on}: {error}", vm.name)),
        ("failed", None) => (Level::Error, format!("vm {} failed{on}", vm.name)),
        ("pending", _) => (Level::Warning, format!("vm {} pending", vm.name)),
        (state, _) => (Level::Info, format!("vm {} {state}{on}", vm.name)),
    }
}

/// Joins, leaves and status changes. The leader's moment-to-moment health
/// (heard from within an election timeout) is shown in the members table
/// but is no event: it flaps under load, and the failure detector's
/// verdict (`down`, after `node_down_after`) is the one that counts.
fn member_changes(at: u64, before: &Overview, after: &Overview, out: &mut Vec<Event>) {
    let old: BTreeMap<&str, &MemberView> = before.members.iter().map(|m| (m.name.as_str(), m)).collect();
    let new: BTreeMap<&str, &MemberView> = after.members.iter().map(|m| (m.name.as_str(), m)).collect();
    for (name, m) in &new {
        match old.get(name) {
            None => out.push(event(at, Level::Info, "host", name, format!("host {name} joined ({})", m.address))),
            Some(o) if o.status != m.status => {
                let level = if m.status == "down" { Level::Error } else { Level::Info };
                out.push(event(at, level, "host", name, format!("host {name} {}", m.status)));
            }
            Some(_) => {}
        }
    }
    for name in old.keys().filter(|n| !new.contains_key(*n)) {
        out.push(event(at, Level::Warning, "host", name, format!("host {name} left the cluster")));
    }
}

fn vm_changes(at: u64, before: &Overview, after: &Overview, out: &mut Vec<Event>) {
    let old: BTreeMap<&str, &VmView> = before.vms.iter().map(|v| (v.name.as_str(), v)).collect();
    let new: BTreeMap<&str, &VmView> = after.vms.iter().map(|v| (v.name.as_str(), v)).collect();
    for (name, vm) in &new {
        match old.get(name) {
            None => {
                let size = format!("{} vcpu, {} MiB", vm.vcpu, vm.memory_mib);
                out.push(event(at, Level::Info, "vm", name, format!("vm {name} created ({size})")));
                if vm.state != "pending" {
                    let (level, message) = vm_message(vm);
                    out.push(event(at, level, "vm", name, message));
                }
            }
            Some(o) if o.state != vm.state || o.node != vm.node || o.last_error != vm.last_error => {
                let (level, message) = vm_message(vm);
                out.push(event(at, level, "vm", name, message));
            }
            Some(o) if o.desired != vm.desired => {
                out.push(event(at, Level::Info, "vm", name, format!("vm {name} desired {}", vm.desired)));
            }
            Some(_) => {}
        }
    }
    for name in old.keys().filter(|n| !new.contains_key(*n)) {
        out.push(event(at, Level::Info, "vm", name, format!("vm {name} deleted")));
    }
}

/// What changed from `before` to `after`, as events at `at_unix_ms`, at
/// most [`EVENTS_PER_CHANGE_MAX`] of them (the last one then says how many
/// more there were).
pub fn diff(before: &Overview, after: &Overview, at_unix_ms: u64) -> Vec<Event> {
    let mut out = Vec::new();
    if before.leader != after.leader {
        let message = match &after.leader {
            Some(leader) => format!("{leader} is the leader (term {})", after.term),
            None => format!("no leader known (term {})", after.term),
        };
        let level = if after.leader.is_some() { Level::Info } else { Level::Warning };
        out.push(event(at_unix_ms, level, "cluster", "", message));
    }
    member_changes(at_unix_ms, before, after, &mut out);
    vm_changes(at_unix_ms, before, after, &mut out);
    if out.len() > EVENTS_PER_CHANGE_MAX {
        let more = out.len() - (EVENTS_PER_CHANGE_MAX - 1);
        out.truncate(EVENTS_PER_CHANGE_MAX - 1);
        out.push(event(at_unix_ms, Level::Info, "cluster", "", format!("and {more} more changes")));
    }
    out
}

/// The events this agent has seen, newest last, at most [`EVENTS_MAX`].
#[derive(Debug, Default)]
pub struct EventLog {
    events: Mutex<VecDeque<Event>>,
}

impl EventLog {
    /// Records what changed from `before` (`None`: the first overview this
    /// agent took) to `after`. Returns whether anything was recorded.
    pub fn observe(&self, before: Option<&Overview>, after: &Overview, at_unix_ms: u64) -> bool {
        let new = match before {
            Some(before) => diff(before, after, at_unix_ms),
            None if after.member => {
                let message = format!(
                    "{} started watching: {} hosts, {} VMs, leader {}",
                    after.agent,
                    after.members.len(),
                    after.vms.len(),
                    after.leader.as_deref().unwrap_or("unknown")
                );
                vec![event(at_unix_ms, Level::Info, "cluster", "", message)]
            }
            None => Vec::new(),
        };
        if new.is_empty() {
            return false;
        }
        // A poisoned lock only means a panic elsewhere mid-push; the
        // deque is still a valid list of events.
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.extend(new);
        while events.len() > EVENTS_MAX {
            events.pop_front();
        }
        true
    }

    /// The panel's source: the newest `limit` events, newest first.
    pub fn recent(&self, limit: usize) -> Vec<Event> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.iter().rev().take(limit).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, status: &'static str) -> MemberView {
        MemberView {
            id: 1,
            name: name.into(),
            address: "10.0.0.1:7000".into(),
            role: "follower",
            status,
            healthy: status != "down",
            vcpu_total: 8,
            vcpu_used: 0,
            memory_mib_total: 8192,
            memory_mib_used: 0,
            vms: 0,
        }
    }

    fn vm(name: &str, state: &'static str, node: Option<&str>) -> VmView {
        VmView {
            name: name.into(),
            node: node.map(str::to_string),
            desired: "running".into(),
            state,
            vcpu: 1,
            memory_mib: 64,
            since_unix_ms: 5,
            last_error: None,
        }
    }

    fn overview(members: Vec<MemberView>, vms: Vec<VmView>) -> Overview {
        Overview { agent: "h1".into(), member: true, leader: Some("h1".into()), members, vms, ..Overview::default() }
    }

    fn messages(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.message.as_str()).collect()
    }

    #[test]
    fn state_changes_become_one_line_events() {
        let before = overview(vec![member("h1", "up"), member("h3", "up")], vec![vm("db", "running", Some("h3"))]);
        let after = overview(
            vec![member("h1", "up"), member("h3", "down")],
            vec![vm("db", "pending", None), vm("web", "running", Some("h1"))],
        );
        let events = diff(&before, &after, 9);
        assert_eq!(
            messages(&events),
            ["host h3 down", "vm db pending", "vm web created (1 vcpu, 64 MiB)", "vm web running on h1"]
        );
        assert_eq!(events[0].level, Level::Error);
        assert!(events.iter().all(|e| e.at_unix_ms == 9));
        assert!(diff(&after, &after, 10).is_empty());
        let gone = diff(&after, &overview(vec![member("h1", "up")], vec![]), 11);
        assert_eq!(messages(&gone), ["host h3 left the cluster", "vm db deleted", "vm web deleted"]);
    }

    #[test]
    fn bursts_are_summarised_and_the_log_is_bounded() {
        let before = overview(vec![], vec![]);
        let after = overview(vec![], (0..1000).map(|i| vm(&format!("vm-{i:04}"), "pending", None)).collect());
        let events = diff(&before, &after, 1);
        assert_eq!(events.len(), EVENTS_PER_CHANGE_MAX);
        assert_eq!(events.last().unwrap().message, format!("and {} more changes", 1000 - EVENTS_PER_CHANGE_MAX + 1));

        let log = EventLog::default();
        assert!(log.observe(None, &before, 0));
        for i in 0..10 {
            let (a, b) = if i % 2 == 0 { (&before, &after) } else { (&after, &before) };
            log.observe(Some(a), b, i);
        }
        assert_eq!(log.recent(usize::MAX).len(), EVENTS_MAX);
        assert_eq!(log.recent(3).len(), 3);
        assert_eq!(log.recent(1)[0].at_unix_ms, 9, "newest first");
        assert!(!log.observe(Some(&after), &after, 20));
    }
}

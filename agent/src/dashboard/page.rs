//! The dashboard page, rendered on the server from the latest snapshot so
//! it is complete before any script runs; `assets/app.js` then keeps it
//! current from the live stream. Both build the same markup (ids, classes
//! and `data-*` attributes below are what the script and the browser tests
//! look for).
//!
//! Every string that comes from the cluster goes through [`escape`]: names
//! are validated, but addresses and error messages are free text.

use std::fmt::Write as _;

use super::Snapshot;
use super::events::Event;
use super::overview::{MemberView, VmView};

/// The VM states, in the order the filter offers them.
const STATES: [&str; 7] = ["pending", "starting", "running", "stopping", "stopped", "failed", "lost"];

/// `text` safe to place in HTML text and in double-quoted attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn percent(used: u64, total: u64) -> u64 {
    used.saturating_mul(100).checked_div(total).unwrap_or(0).min(100)
}

fn summary(snapshot: &Snapshot) -> String {
    let o = &snapshot.overview;
    if !o.member {
        return format!("{} is not a member of a cluster yet", o.agent);
    }
    format!(
        "leader {} · term {} · {} hosts · {} VMs · served by {}",
        o.leader.as_deref().unwrap_or("unknown"),
        o.term,
        o.members.len(),
        o.vms.len(),
        o.agent
    )
}

fn member_row(out: &mut String, m: &MemberView) {
    let name = escape(&m.name);
    let health = if m.healthy { "healthy" } else { "unhealthy" };
    let _ = write!(
        out,
        "<tr data-name=\"{name}\" data-status=\"{status}\" data-role=\"{role}\" data-healthy=\"{healthy}\">\
         <td class=\"name\">{name}</td><td>{address}</td><td class=\"role\">{role}</td>\
         <td><span class=\"badge status-{status}\">{status}</span></td>\
         <td><span class=\"badge {health}\">{health}</span></td><td class=\"num\">{vms}</td></tr>",
        status = m.status,
        role = m.role,
        healthy = m.healthy,
        address = escape(&m.address),
        vms = m.vms,
    );
}

fn bar(out: &mut String, label: &str, used: u64, total: u64, unit: &str) {
    let _ = write!(
        out,
        "<div class=\"meter\"><div class=\"meter-label\"><span>{label}</span><span class=\"meter-text\">{used} / {total}{unit} ({pct}%)</span></div>\
         <progress class=\"{label}\" value=\"{used}\" max=\"{max}\"></progress></div>",
        pct = percent(used, total),
        max = total.max(1),
    );
}

fn host_card(out: &mut String, m: &MemberView) {
    let name = escape(&m.name);
    let _ = write!(
        out,
        "<div class=\"host\" data-name=\"{name}\" data-status=\"{status}\"><div class=\"host-head\">\
         <span class=\"name\">{name}</span><span class=\"badge status-{status}\">{status}</span>\
         <span class=\"host-vms\">{vms} VMs</span></div>",
        status = m.status,
        vms = m.vms,
    );
    bar(out, "vcpu", m.vcpu_used, m.vcpu_total, "");
    bar(out, "memory", m.memory_mib_used, m.memory_mib_total, " MiB");
    out.push_str("</div>");
}

fn vm_row(out: &mut String, vm: &VmView) {
    let name = escape(&vm.name);
    let node = escape(vm.node.as_deref().unwrap_or(""));
    let error = escape(vm.last_error.as_deref().unwrap_or(""));
    let _ = write!(
        out,
        "<tr data-name=\"{name}\" data-state=\"{state}\" data-node=\"{node}\">\
         <td class=\"name\">{name}</td><td><span class=\"badge state-{state}\">{state}</span></td>\
         <td>{node_or_dash}</td><td>{desired}</td><td class=\"num\">{vcpu}</td><td class=\"num\">{memory}</td>\
         <td class=\"since\" data-since=\"{since}\"></td><td class=\"error\">{error}</td></tr>",
        state = vm.state,
        node_or_dash = if node.is_empty() { "—" } else { node.as_str() },
        desired = escape(&vm.desired),
        vcpu = vm.vcpu,
        memory = vm.memory_mib,
        since = vm.since_unix_ms,
    );
}

fn event_item(out: &mut String, e: &Event) {
    let _ = write!(
        out,
        "<li class=\"level-{level}\" data-kind=\"{kind}\" data-subject=\"{subject}\">\
         <time data-at=\"{at}\"></time><span class=\"message\">{message}</span></li>",
        level = e.level.as_str(),
        kind = e.kind,
        subject = escape(&e.subject),
        at = e.at_unix_ms,
        message = escape(&e.message),
    );
}

/// The whole page for `snapshot`, rendered at `now_unix_ms` (the agent's
/// clock, against which the browser counts times in state).
pub fn render(snapshot: &Snapshot, now_unix_ms: u64) -> String {
    let o = &snapshot.overview;
    let mut out = String::with_capacity(4096 + o.vms.len() * 400);
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Blixard · {agent}</title><link rel=\"stylesheet\" href=\"/dashboard/app.css\"></head>\
         <body data-generated=\"{generated}\" data-now=\"{now_unix_ms}\"><header><h1>Blixard</h1>\
         <span id=\"summary\">{summary}</span><span id=\"connection\" class=\"badge\">connecting</span></header><main>",
        agent = escape(&o.agent),
        generated = snapshot.generated_unix_ms,
        summary = escape(&summary(snapshot)),
    );

    out.push_str(
        "<section id=\"members\"><h2>Members</h2><table><thead><tr><th>Name</th><th>Address</th><th>Role</th>\
         <th>Status</th><th>Health</th><th class=\"num\">VMs</th></tr></thead><tbody id=\"members-body\">",
    );
    for m in &o.members {
        member_row(&mut out, m);
    }
    out.push_str("</tbody></table></section><section id=\"hosts\"><h2>Capacity</h2><div id=\"hosts-body\">");
    for m in &o.members {
        host_card(&mut out, m);
    }
    out.push_str("</div></section><section id=\"events\"><h2>Recent events</h2><ol id=\"events-body\">");
    for e in &snapshot.events {
        event_item(&mut out, e);
    }
    out.push_str("</ol></section>");

    out.push_str(
        "<section id=\"vms\"><div class=\"vms-head\"><h2>VMs</h2>\
         <input id=\"search\" type=\"search\" placeholder=\"Search by VM or host name\" autocomplete=\"off\">\
         <select id=\"state-filter\"><option value=\"\">all states</option>",
    );
    for state in STATES {
        let _ = write!(out, "<option value=\"{state}\">{state}</option>");
    }
    let _ = write!(
        out,
        "</select><span id=\"vm-count\">{n} of {n}</span></div><div class=\"table-scroll\"><table><thead><tr><th>Name</th><th>State</th>\
         <th>Host</th><th>Desired</th><th class=\"num\">vCPU</th><th class=\"num\">MiB</th><th>In state for</th>\
         <th>Last error</th></tr></thead><tbody id=\"vms-body\">",
        n = o.vms.len()
    );
    for vm in &o.vms {
        vm_row(&mut out, vm);
    }
    out.push_str("</tbody></table></div></section></main><script src=\"/dashboard/app.js\"></script></body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::super::events::Level;
    use super::super::overview::Overview;
    use super::*;

    #[test]
    fn escapes_everything_from_the_cluster() {
        assert_eq!(escape(r#"<a href="x">&'"#), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        let overview = Overview {
            agent: "h1".into(),
            member: true,
            members: vec![MemberView {
                id: 1,
                name: "h1".into(),
                address: "<img src=x onerror=alert(1)>".into(),
                role: "leader",
                status: "up",
                healthy: true,
                vcpu_total: 8,
                vcpu_used: 2,
                memory_mib_total: 1024,
                memory_mib_used: 2048,
                vms: 1,
            }],
            vms: vec![VmView {
                name: "web".into(),
                node: Some("h1".into()),
                desired: "running".into(),
                state: "failed",
                vcpu: 2,
                memory_mib: 512,
                since_unix_ms: 3,
                last_error: Some("exit \"1\" <script>alert(1)</script>".into()),
            }],
            ..Overview::default()
        };
        let events = vec![Event {
            at_unix_ms: 4,
            level: Level::Error,
            kind: "vm",
            subject: "web".into(),
            message: "vm web failed: <script>".into(),
        }];
        let html = render(&Snapshot::new(overview, events, 5), 6);
        assert!(!html.contains("<script>alert") && !html.contains("<img"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("<tr data-name=\"web\" data-state=\"failed\" data-node=\"h1\">"));
        assert!(html.contains("class=\"level-error\""));
        // Over-committed memory shows full, not past the end.
        assert!(html.contains("2048 / 1024 MiB (100%)"));
        assert_eq!(html.matches("<script").count(), 1, "only the bundle's script tag");
    }
}

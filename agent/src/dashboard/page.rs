//! The dashboard page, rendered on the server from the latest snapshot so
//! that it is complete (summary, problems, the first page of VMs, hosts,
//! events) before any script runs; `assets/app.js` then takes it over from
//! the same data, embedded in the page as JSON (`#bootstrap`, so the live
//! stream starts with deltas, not a second copy of every VM). The ids,
//! classes and `data-*` attributes below are what the script and the
//! browser tests look for.
//!
//! Every string that comes from the cluster goes through [`escape`]: names
//! are validated, but addresses, labels and error messages are free text;
//! the embedded JSON has every `<` escaped, so nothing in it can close its
//! script element.

use std::fmt::Write as _;

use super::access::Access;
use super::overview::{MemberView, STATES_BY_URGENCY, VmView};
use super::{EventView, Snapshot};

/// VM rows on one page of the table (the script offers more).
pub const PAGE_ROWS_DEFAULT: usize = 100;
/// Items in the "needs attention" list before "and N more".
pub const ATTENTION_MAX: usize = 8;

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

/// JSON safe inside a `<script type="application/json">` element.
fn embeddable(json: &str) -> String {
    json.replace('<', "\\u003c")
}

/// `1 VM`, `2 VMs`; thousands separated: `5,000 VMs`.
pub fn count(n: u64, one: &str, many: &str) -> String {
    let digits = n.to_string();
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("{grouped} {}", if n == 1 { one } else { many })
}

fn percent(used: u64, total: u64) -> u64 {
    used.saturating_mul(100).checked_div(total).unwrap_or(0).min(100)
}

/// `2026-12-06 22:53:58 UTC` (the script shows it in the browser's zone).
fn utc(unix_ms: u64) -> String {
    crate::cli::output::human_utc(unix_ms)
}

/// What the page needs besides the snapshot.
pub struct PageContext<'a> {
    pub access: &'a Access,
    /// This agent's gRPC address, for the CLI equivalents.
    pub endpoint: &'a str,
    pub history_json: &'a str,
}

fn summary(snapshot: &Snapshot) -> String {
    let o = &snapshot.overview.head;
    if !o.member {
        return format!("{} is not a member of a cluster yet", o.agent);
    }
    format!(
        "{} · {} · leader {} (term {}) · {} voting",
        count(o.members.len() as u64, "host", "hosts"),
        count(snapshot.overview.vms.len() as u64, "VM", "VMs"),
        o.leader.as_deref().unwrap_or("unknown"),
        o.term,
        o.voters
    )
}

/// The banner: what makes this view not the cluster's current truth.
fn banner(snapshot: &Snapshot) -> Option<(&'static str, String)> {
    let o = &snapshot.overview.head;
    if !o.member {
        return Some(("warning", format!("{} is not a member of a cluster yet: there is nothing to show.", o.agent)));
    }
    if !o.quorum {
        let since = match o.frozen_unix_ms {
            Some(at) => format!("since {}", utc(at)),
            None => "since it started".to_string(),
        };
        let fenced = if o.fenced { " This host has fenced itself: its guests are stopped." } else { "" };
        return Some((
            "error",
            format!(
                "No quorum: {} has not reached a majority of the members {since}. This view froze then and may be \
                 stale.{fenced}",
                o.agent
            ),
        ));
    }
    None
}

fn chip(out: &mut String, state: &str, n: u64) {
    let _ = write!(
        out,
        "<a class=\"chip state-{state}\" data-state=\"{state}\" href=\"?state={state}\"><b>{n}</b> {state}</a>"
    );
}

fn attention(out: &mut String, snapshot: &Snapshot) {
    let o = &snapshot.overview;
    let mut items: Vec<String> = Vec::new();
    for m in o.head.members.iter().filter(|m| m.status != "up") {
        let name = escape(&m.name);
        items.push(format!(
            "<li data-kind=\"host\" data-name=\"{name}\" data-state=\"{s}\"><span class=\"badge status-{s}\">{s}</span> \
             <a href=\"?host={name}\">host {name}</a></li>",
            s = m.status
        ));
    }
    let mut problems: Vec<&VmView> = o.vms.iter().filter(|v| v.is_problem()).collect();
    let rank = |state: &str| STATES_BY_URGENCY.iter().position(|s| *s == state).unwrap_or(usize::MAX);
    problems.sort_by_key(|v| rank(v.state));
    let total = items.len() + problems.len();
    for vm in problems.iter().take(ATTENTION_MAX.saturating_sub(items.len())) {
        let name = escape(&vm.name);
        let why = escape(vm.why());
        items.push(format!(
            "<li data-kind=\"vm\" data-name=\"{name}\" data-state=\"{s}\"><span class=\"badge state-{s}\">{s}</span> \
             <a href=\"?vm={name}\">VM {name}</a> <span class=\"reason\">{why}</span></li>",
            s = vm.state
        ));
    }
    let hidden = if total == 0 { " hidden" } else { "" };
    let _ = write!(out, "<section id=\"attention\"{hidden}><h2>Needs attention</h2><ul id=\"attention-body\">");
    for item in &items {
        out.push_str(item);
    }
    out.push_str("</ul>");
    let more = total - items.len();
    let _ = write!(
        out,
        "<a id=\"attention-more\" href=\"?state=problems\"{}>and {more} more</a></section>",
        if more == 0 { " hidden" } else { "" }
    );
}

fn bar(out: &mut String, label: &str, used: u64, total: u64, unit: &str) {
    let _ = write!(
        out,
        "<div class=\"meter\" title=\"{label}\"><progress class=\"{label}\" value=\"{used}\" max=\"{max}\"></progress>\
         <span class=\"meter-text\">{used}/{total}{unit} ({pct}%)</span></div>",
        pct = percent(used, total),
        max = total.max(1),
    );
}

fn host_row(out: &mut String, m: &MemberView) {
    let name = escape(&m.name);
    let health = if m.healthy { "healthy" } else { "unhealthy" };
    let _ = write!(
        out,
        "<tr data-name=\"{name}\" data-status=\"{status}\" data-role=\"{role}\" data-healthy=\"{healthy}\">\
         <td class=\"name\" data-label=\"Host\"><a href=\"?host={name}\">{name}</a></td>\
         <td data-label=\"Status\"><span class=\"badge status-{status}\">{status}</span> \
         <span class=\"badge {health}\">{health}</span></td><td class=\"role\" data-label=\"Role\">{role}</td>\
         <td class=\"num\" data-label=\"VMs\">{vms}</td><td class=\"capacity\" data-label=\"Capacity\">",
        status = m.status,
        role = m.role,
        healthy = m.healthy,
        vms = m.vms,
    );
    bar(out, "vcpu", m.vcpu_used, m.vcpu_total, " vCPU");
    bar(out, "memory", m.memory_mib_used, m.memory_mib_total, " MiB");
    out.push_str("</td></tr>");
}

/// The VM table's columns: (sort key, header, cell class).
pub const VM_COLUMNS: [(&str, &str, &str); 8] = [
    ("name", "Name", "name"),
    ("state", "State", "state"),
    ("node", "Host", "node"),
    ("desired", "Desired", "desired"),
    ("vcpu", "vCPU", "num"),
    ("memory", "MiB", "num"),
    ("since", "In state for", "since"),
    ("reason", "Why / last error", "reason"),
];

fn vm_row(out: &mut String, vm: &VmView) {
    let name = escape(&vm.name);
    let node = escape(vm.node.as_deref().unwrap_or(""));
    let why = escape(vm.why());
    let _ = write!(
        out,
        "<tr data-name=\"{name}\" data-state=\"{state}\" data-node=\"{node}\">\
         <td class=\"name\" data-label=\"Name\"><a href=\"?vm={name}\">{name}</a></td>\
         <td class=\"state\" data-label=\"State\"><span class=\"badge state-{state}\">{state}</span></td>\
         <td class=\"node\" data-label=\"Host\">{node_or_dash}</td><td class=\"desired\" data-label=\"Desired\">{desired}</td>\
         <td class=\"num\" data-label=\"vCPU\">{vcpu}</td><td class=\"num\" data-label=\"MiB\">{memory}</td>\
         <td class=\"since\" data-label=\"In state for\" data-since=\"{since}\"></td>\
         <td class=\"reason\" data-label=\"Why\">{why}</td></tr>",
        state = vm.state,
        node_or_dash = if node.is_empty() { "—" } else { node.as_str() },
        desired = escape(&vm.desired),
        vcpu = vm.vcpu,
        memory = vm.memory_mib,
        since = vm.since_unix_ms,
    );
}

fn event_item(out: &mut String, e: &EventView) {
    let _ = write!(
        out,
        "<li class=\"level-{level}\" data-kind=\"{kind}\" data-subject=\"{subject}\" data-seq=\"{seq}\">\
         <time data-at=\"{at}\">{at_text}</time><span class=\"message\">{message}</span></li>",
        level = e.level,
        kind = e.kind,
        subject = escape(&e.subject),
        seq = e.seq,
        at = e.at_unix_ms,
        at_text = utc(e.at_unix_ms),
        message = escape(&e.message),
    );
}

/// The whole page for `snapshot`, rendered at `now_unix_ms` (the agent's
/// clock, against which the browser counts times in state).
pub fn render(snapshot: &Snapshot, context: &PageContext<'_>, now_unix_ms: u64) -> String {
    let o = &snapshot.overview;
    let head = &o.head;
    let json = snapshot.json();
    let mut out = String::with_capacity(8192 + json.len() + PAGE_ROWS_DEFAULT * 500);
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Blixard · {agent}</title><link rel=\"stylesheet\" href=\"/dashboard/app.css\"></head>\
         <body data-generated=\"{generated}\" data-now=\"{now_unix_ms}\" data-access=\"{access}\">\
         <header id=\"top\"><h1>Blixard</h1><span id=\"summary\">{summary}</span>\
         <span id=\"served\">served by {agent} ({role})</span><span id=\"who\">{who}</span>\
         <span id=\"clock\"></span><span id=\"connection\" class=\"badge\">connecting</span></header>",
        agent = escape(&head.agent),
        role = head.role,
        generated = snapshot.generated_unix_ms,
        access = context.access.word(),
        who = escape(&context.access.who()),
        summary = escape(&summary(snapshot)),
    );
    match banner(snapshot) {
        Some((level, text)) => {
            let _ = write!(out, "<div id=\"banner\" class=\"banner-{level}\" role=\"alert\">{}</div>", escape(&text));
        }
        None => out.push_str("<div id=\"banner\" role=\"alert\" hidden></div>"),
    }
    out.push_str("<main><div id=\"primary\"><section id=\"overview\"><div id=\"counts\">");
    for state in STATES_BY_URGENCY {
        chip(&mut out, state, head.counts.get(state).copied().unwrap_or(0));
    }
    out.push_str("</div><div id=\"host-counts\">");
    for status in crate::metrics::HOST_STATUSES {
        let n = head.host_counts.get(status).copied().unwrap_or(0);
        let _ = write!(out, "<span class=\"chip status-{status}\" data-status=\"{status}\"><b>{n}</b> {status}</span>");
    }
    out.push_str("</div></section>");
    attention(&mut out, snapshot);

    out.push_str(
        "<section id=\"vms\"><div class=\"vms-head\"><h2>VMs</h2>\
         <input id=\"search\" type=\"search\" placeholder=\"Search VMs or hosts\" autocomplete=\"off\" aria-label=\"Search\">\
         <select id=\"state-filter\" aria-label=\"State\"><option value=\"\">all states</option>\
         <option value=\"problems\">problems</option>",
    );
    for state in STATES_BY_URGENCY {
        let _ = write!(out, "<option value=\"{state}\">{state}</option>");
    }
    out.push_str("</select><select id=\"host-filter\" aria-label=\"Host\"><option value=\"\">all hosts</option>");
    for m in &head.members {
        let name = escape(&m.name);
        let _ = write!(out, "<option value=\"{name}\">{name}</option>");
    }
    let shown = o.vms.len().min(PAGE_ROWS_DEFAULT);
    let _ = write!(
        out,
        "</select><span id=\"vm-count\">{range} of {total}</span>\
         <span class=\"pager\"><button id=\"prev\" type=\"button\" disabled>‹</button>\
         <button id=\"next\" type=\"button\"{next}>›</button></span></div>\
         <div class=\"table-wrap\"><table id=\"vm-table\"><thead><tr>",
        range = if shown == 0 { "0".to_string() } else { format!("1–{shown}") },
        total = count(o.vms.len() as u64, "VM", "VMs"),
        next = if o.vms.len() > shown { "" } else { " disabled" },
    );
    for (key, title, class) in VM_COLUMNS {
        let _ = write!(out, "<th class=\"{class}\" data-sort=\"{key}\" tabindex=\"0\">{title}</th>");
    }
    out.push_str("</tr></thead><tbody id=\"vms-body\">");
    // The default order: problems first, then by name.
    let rank = |state: &str| STATES_BY_URGENCY.iter().position(|s| *s == state).unwrap_or(usize::MAX);
    let mut first: Vec<&VmView> = o.vms.iter().collect();
    first.sort_by(|a, b| rank(a.state).cmp(&rank(b.state)).then(a.name.cmp(&b.name)));
    for vm in first.into_iter().take(PAGE_ROWS_DEFAULT) {
        vm_row(&mut out, vm);
    }
    out.push_str("</tbody></table></div></section></div><div id=\"secondary\">");

    let _ = write!(
        out,
        "<section id=\"hosts\"><h2>Hosts</h2><p class=\"note\" id=\"health-note\">{}</p><div class=\"table-wrap\">\
         <table id=\"host-table\"><thead><tr><th>Host</th><th>Status</th><th>Role</th><th class=\"num\">VMs</th>\
         <th>Capacity</th></tr></thead><tbody id=\"hosts-body\">",
        if head.health_from_leader {
            "Health as the leader hears each host."
        } else {
            "Health from the replicated status (this agent is not the leader)."
        }
    );
    for m in &head.members {
        host_row(&mut out, m);
    }
    out.push_str(
        "</tbody></table></div></section>\
         <section id=\"graphs\"><h2>Last hour</h2><div id=\"event-rate\" class=\"chart\"></div>\
         <div id=\"capacity-charts\"></div></section>\
         <section id=\"events\"><div class=\"events-head\"><h2>Events</h2>\
         <label><input type=\"checkbox\" id=\"problems-only\"> problems only</label></div><ol id=\"events-body\">",
    );
    for e in &snapshot.events {
        event_item(&mut out, e);
    }
    out.push_str(
        "</ol></section></div></main>\
         <aside id=\"detail\" hidden aria-live=\"polite\"><div class=\"detail-head\"><h2 id=\"detail-title\"></h2>\
         <button id=\"detail-close\" type=\"button\" aria-label=\"Close\">×</button></div>\
         <div id=\"detail-body\"></div></aside><div id=\"toast\" role=\"status\" hidden></div>",
    );
    let _ = writeln!(
        out,
        "<script type=\"application/json\" id=\"bootstrap\">{{\"snapshot\":{snapshot},\"history\":{history},\
         \"access\":\"{access}\",\"endpoint\":{endpoint}}}</script><script src=\"/dashboard/app.js\"></script>\
         </body></html>",
        snapshot = embeddable(json),
        history = embeddable(context.history_json),
        access = context.access.word(),
        endpoint = embeddable(&serde_json::to_string(context.endpoint).expect("a string encodes")),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::super::Signature;
    use super::super::overview::{Head, Overview};
    use super::*;

    fn snapshot() -> Snapshot {
        let head = Head {
            agent: "h1".into(),
            member: true,
            quorum: false,
            frozen_unix_ms: Some(1_700_000_000_000),
            fenced: true,
            members: vec![MemberView {
                id: 1,
                name: "h1".into(),
                address: "<img src=x onerror=alert(1)>".into(),
                role: "leader",
                voter: true,
                status: "down",
                healthy: false,
                vcpu_total: 8,
                vcpu_used: 2,
                memory_mib_total: 1024,
                memory_mib_used: 2048,
                vms: 1,
                labels: Default::default(),
            }],
            voters: 1,
            ..Head::default()
        };
        let vms = vec![VmView {
            name: "web".into(),
            node: Some("h1".into()),
            desired: "running".into(),
            state: "failed",
            vcpu: 2,
            memory_mib: 512,
            since_unix_ms: 3,
            last_error: Some("exit \"1\" <script>alert(1)</script>".into()),
            reason: None,
            failover: "auto",
        }];
        let events = vec![EventView {
            seq: 1,
            index: 4,
            at_unix_ms: 4,
            kind: "vm_failed",
            level: "error",
            vm: Some("web".into()),
            node: None,
            from: None,
            subject: "web".into(),
            message: "VM web failed: </script><script>alert(2)</script>".into(),
        }];
        Snapshot::new(1, Signature::default(), Overview { head, vms }, events, 5)
    }

    fn context(access: &Access) -> PageContext<'_> {
        PageContext { access, endpoint: "127.0.0.1:7000", history_json: "{\"interval_ms\":10000,\"samples\":[]}" }
    }

    #[test]
    fn escapes_everything_from_the_cluster() {
        assert_eq!(escape(r#"<a href="x">&'"#), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        let html = render(&snapshot(), &context(&Access::Open), 6);
        assert!(!html.contains("<script>alert") && !html.contains("<img"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("<tr data-name=\"web\" data-state=\"failed\" data-node=\"h1\">"));
        assert!(html.contains("class=\"level-error\""));
        // Over-committed memory shows full, not past the end.
        assert!(html.contains("2048/1024 MiB (100%)"));
        assert_eq!(html.matches("<script").count(), 2, "the data block and the bundle's script tag only");
        assert_eq!(html.matches("</script>").count(), 2, "the embedded JSON cannot close its element");
    }

    #[test]
    fn problems_come_first_and_a_stale_view_says_so() {
        let html = render(&snapshot(), &context(&Access::ReadOnly { name: "carol".into() }), 6);
        assert!(html.contains("id=\"banner\" class=\"banner-error\""), "{html}");
        assert!(html.contains("No quorum: h1 has not reached a majority of the members since 2023-11-14 22:13:20 UTC"));
        assert!(html.contains("fenced itself"));
        assert!(html.contains("data-access=\"read-only\""));
        assert!(html.contains("<li data-kind=\"host\" data-name=\"h1\" data-state=\"down\">"));
        assert!(html.contains("<li data-kind=\"vm\" data-name=\"web\" data-state=\"failed\">"));
        assert!(html.contains("1 host · 1 VM · leader unknown (term 0) · 1 voting"), "no \"1 VMs\"");
    }

    #[test]
    fn counts_read_as_english() {
        assert_eq!(count(1, "VM", "VMs"), "1 VM");
        assert_eq!(count(0, "VM", "VMs"), "0 VMs");
        assert_eq!(count(5000, "VM", "VMs"), "5,000 VMs");
        assert_eq!(count(1_234_567, "VM", "VMs"), "1,234,567 VMs");
    }
}

// Blixard dashboard: takes over the server-rendered page from the data
// embedded in it (#bootstrap) and keeps it current from the agent's live
// stream (/api/overview/stream, server-sent events: a full overview, then
// deltas that carry only what changed).
//
// Rules: data from the cluster only ever reaches the DOM through
// textContent, attributes and dataset (never innerHTML); the VM table
// renders one page of rows, so 10,000 VMs cost a sort of an array per
// change, not a re-render of 10,000 rows; the view (search, filters, sort,
// page, the open detail) lives in the URL, so any view can be linked to.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const boot = JSON.parse($("bootstrap").textContent);
  const canAct = boot.access === "admin";
  const endpoint = boot.endpoint;
  const URGENCY = ["failed", "lost", "pending", "starting", "stopping", "running", "stopped"];
  const PROBLEM_STATES = new Set(["failed", "lost", "pending"]);
  const EVENTS_KEEP = 500;
  const PROBLEMS_KEEP = 100;
  const ATTENTION_MAX = 8;
  const PAGE_SIZES = [50, 100, 500, 1000];
  const HISTORY_LEN = 360;
  const SVG = "http://www.w3.org/2000/svg";

  // Milliseconds to add to the browser's clock to get the agent's.
  let clockOffsetMs = Number(document.body.dataset.now || Date.now()) - Date.now();
  let head = null;
  const vms = new Map();
  let version = 0;
  let events = [];
  let problems = [];
  let history = boot.history || { interval_ms: 10000, samples: [] };
  let updates = 0;
  let connected = false;
  let lastMessageMs = 0;
  // The VMs in the table's order, recomputed when they or the view change.
  let ordered = null;
  // Rows built so far, by VM name: { tr, cells, key, since, text }.
  const rows = new Map();

  // ------------------------------------------------------------- the view

  const view = { q: "", state: "", on: "", sort: "state", dir: "asc", page: 1, size: 100, vm: "", host: "" };
  function readUrl() {
    const p = new URLSearchParams(location.search);
    view.q = p.get("q") || "";
    view.state = p.get("state") || "";
    view.on = p.get("on") || "";
    view.sort = p.get("sort") || "state";
    view.dir = p.get("dir") === "desc" ? "desc" : "asc";
    view.page = Math.max(1, Number(p.get("page")) || 1);
    const size = Number(p.get("size"));
    view.size = PAGE_SIZES.includes(size) ? size : 100;
    view.vm = p.get("vm") || "";
    view.host = p.get("host") || "";
  }
  function writeUrl(push) {
    const p = new URLSearchParams();
    if (view.q) p.set("q", view.q);
    if (view.state) p.set("state", view.state);
    if (view.on) p.set("on", view.on);
    if (view.sort !== "state" || view.dir !== "asc") {
      p.set("sort", view.sort);
      p.set("dir", view.dir);
    }
    if (view.page > 1) p.set("page", String(view.page));
    if (view.size !== 100) p.set("size", String(view.size));
    if (view.vm) p.set("vm", view.vm);
    if (view.host) p.set("host", view.host);
    const query = p.toString();
    const url = location.pathname + (query ? "?" + query : "");
    if (url === location.pathname + location.search) return;
    if (push) history_.pushState(null, "", url);
    else history_.replaceState(null, "", url);
  }
  const history_ = window.history;

  // ------------------------------------------------------------ helpers

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function badge(className, text) {
    return el("span", "badge " + className, text);
  }
  function link(text, params, className) {
    const a = el("a", className, text);
    const p = new URLSearchParams(params);
    a.href = "?" + p.toString();
    return a;
  }
  function plural(n, one, many) {
    return n.toLocaleString("en-US") + " " + (n === 1 ? one : many);
  }
  function agentNow() {
    return Date.now() + clockOffsetMs;
  }
  function duration(ms) {
    if (!(ms >= 0)) return "";
    const s = Math.floor(ms / 1000);
    if (s < 60) return s + "s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + "m " + (s % 60) + "s";
    const h = Math.floor(m / 60);
    if (h < 48) return h + "h " + (m % 60) + "m";
    return Math.floor(h / 24) + "d " + (h % 24) + "h";
  }
  function sinceText(since) {
    return since > 0 ? duration(agentNow() - since) : "—";
  }
  // Times always say their zone: "14:03:22 CET", or with the date when
  // not today.
  function clockTime(ms) {
    const d = new Date(ms);
    const sameDay = new Date().toDateString() === d.toDateString();
    const options = { hour12: false, timeZoneName: "short" };
    if (!sameDay) Object.assign(options, { year: "numeric", month: "2-digit", day: "2-digit" });
    return sameDay ? d.toLocaleTimeString([], options) : d.toLocaleString([], options);
  }
  function timeEl(ms) {
    const t = el("time", "", clockTime(ms));
    t.dateTime = new Date(ms).toISOString();
    t.dataset.at = String(ms);
    t.title = new Date(ms).toString();
    return t;
  }
  function rank(state) {
    const i = URGENCY.indexOf(state);
    return i < 0 ? URGENCY.length : i;
  }
  // A failed or lost VM's last error first (its placement explains less),
  // else why it is pending (as VmView::why on the agent).
  function why(vm) {
    if (vm.state === "failed" || vm.state === "lost") return vm.last_error || vm.reason || "";
    return vm.reason || vm.last_error || "";
  }
  // Failed, lost, or pending although it should run (as VmView::is_problem).
  function isProblem(vm) {
    return PROBLEM_STATES.has(vm.state) && !(vm.state === "pending" && vm.desired === "stopped");
  }
  // A VM on this host while it is fenced has been stopped by the fence,
  // whatever its last replicated state says (manual failover VMs are spared).
  function shownState(vm) {
    if (head && head.fenced && vm.node === head.agent && vm.failover !== "manual" && vm.state === "running") {
      return "fenced";
    }
    return vm.state;
  }

  // ------------------------------------------------------------ the model

  function applyFull(o) {
    head = Object.assign({}, o);
    delete head.vms;
    delete head.events;
    delete head.problems;
    vms.clear();
    for (const vm of o.vms) vms.set(vm.name, vm);
    version = o.version;
    events = (o.events || []).slice(0, EVENTS_KEEP);
    problems = (o.problems || []).slice(0, PROBLEMS_KEEP);
    ordered = null;
  }
  function applyDelta(d) {
    if (d.base !== version) return false;
    head = Object.assign({}, d);
    for (const k of ["base", "vms_changed", "vms_removed", "events_added"]) delete head[k];
    for (const name of d.vms_removed) vms.delete(name);
    for (const vm of d.vms_changed) vms.set(vm.name, vm);
    version = d.version;
    if (d.events_added.length) {
      events = d.events_added.concat(events).slice(0, EVENTS_KEEP);
      const added = d.events_added.filter((e) => e.level !== "info");
      problems = added.concat(problems).slice(0, PROBLEMS_KEEP);
    }
    if (d.vms_changed.length || d.vms_removed.length) ordered = null;
    return true;
  }

  // ---------------------------------------------------------- rendering

  function renderHeader() {
    const o = head;
    $("summary").textContent = o.member
      ? plural(o.members.length, "host", "hosts") + " · " + plural(vms.size, "VM", "VMs") + " · leader " +
        (o.leader || "unknown") + " (term " + o.term + ") · " + o.voters + " voting"
      : o.agent + " is not a member of a cluster yet";
    $("served").textContent = "served by " + o.agent + " (" + o.role + ")";
    $("health-note").textContent = o.health_from_leader
      ? "Health as the leader hears each host."
      : "Health from the replicated status (this agent is not the leader" +
        (o.leader ? "; " + o.leader + " is" : "") + ").";
    document.title = "Blixard · " + o.agent + (problemCount() ? " · " + problemCount() + " problems" : "");
  }
  function problemCount() {
    if (!head) return 0;
    return (head.counts.failed || 0) + (head.counts.lost || 0) +
      head.members.filter((m) => m.status === "down").length;
  }

  function renderBanner() {
    const banner = $("banner");
    const o = head;
    let level = "";
    let text = "";
    if (!connected && updates > 0) {
      level = "warning";
      text = "Lost the connection to " + o.agent + "; reconnecting. Last update " + clockTime(lastMessageMs) +
        ": what you see may be stale.";
    } else if (!o.member) {
      level = "warning";
      text = o.agent + " is not a member of a cluster yet: there is nothing to show.";
    } else if (!o.quorum) {
      level = "error";
      const frozen = o.frozen_unix_ms;
      text = "No quorum: " + o.agent + " has not reached a majority of the members " +
        (frozen ? "since " + clockTime(frozen) + " (" + duration(agentNow() - frozen) + ")" : "since it started") +
        ". This view froze then and may be stale: hosts shown up may be down, and guests shown running may have stopped.";
      if (o.fenced) text += " This host has fenced itself: its guests are stopped.";
    }
    banner.hidden = !text;
    banner.className = text ? "banner-" + level : "";
    banner.textContent = text;
    document.body.classList.toggle("stale", !!text && level === "error");
    document.body.dataset.stale = String(!!text && !o.quorum && o.member);
  }

  function renderCounts() {
    const counts = $("counts");
    const fragment = document.createDocumentFragment();
    for (const state of URGENCY) {
      const n = head.counts[state] || 0;
      const chip = link("", { state: view.state === state ? "" : state }, "chip state-" + state);
      chip.dataset.state = state;
      chip.dataset.count = String(n);
      if (view.state === state) chip.classList.add("active");
      if (n === 0) chip.classList.add("zero");
      chip.append(el("b", "", n.toLocaleString("en-US")), document.createTextNode(" " + state));
      chip.addEventListener("click", (e) => {
        e.preventDefault();
        setView({ state: view.state === state ? "" : state, page: 1 });
      });
      fragment.append(chip);
    }
    counts.replaceChildren(fragment);
    const hosts = document.createDocumentFragment();
    for (const status of ["up", "down", "draining"]) {
      const n = head.host_counts[status] || 0;
      const chip = el("span", "chip status-" + status + (n === 0 ? " zero" : ""));
      chip.dataset.status = status;
      chip.append(el("b", "", n), document.createTextNode(" " + (n === 1 ? "host " : "hosts ") + status));
      hosts.append(chip);
    }
    $("host-counts").replaceChildren(hosts);
  }

  function renderAttention() {
    const items = [];
    for (const m of head.members) {
      if (m.status === "up") continue;
      const li = el("li");
      li.dataset.kind = "host";
      li.dataset.name = m.name;
      li.dataset.state = m.status;
      li.append(badge("status-" + m.status, m.status), document.createTextNode(" "),
        hostLink("host " + m.name, m.name));
      items.push(li);
    }
    const bad = [];
    for (const vm of vms.values()) if (isProblem(vm)) bad.push(vm);
    bad.sort((a, b) => rank(a.state) - rank(b.state) || (a.name < b.name ? -1 : 1));
    const total = items.length + bad.length;
    for (const vm of bad.slice(0, Math.max(0, ATTENTION_MAX - items.length))) {
      const li = el("li");
      li.dataset.kind = "vm";
      li.dataset.name = vm.name;
      li.dataset.state = vm.state;
      li.append(badge("state-" + vm.state, vm.state), document.createTextNode(" "), vmLink("VM " + vm.name, vm.name),
        document.createTextNode(" "), el("span", "reason", why(vm)));
      items.push(li);
    }
    $("attention").hidden = total === 0;
    $("attention-body").replaceChildren(...items);
    const more = $("attention-more");
    more.hidden = total <= items.length;
    more.textContent = "and " + (total - items.length).toLocaleString("en-US") + " more";
  }
  function vmLink(text, name) {
    const a = link(text, { vm: name });
    a.addEventListener("click", (e) => {
      e.preventDefault();
      openDetail("vm", name);
    });
    return a;
  }
  function hostLink(text, name) {
    const a = link(text, { host: name });
    a.addEventListener("click", (e) => {
      e.preventDefault();
      openDetail("host", name);
    });
    return a;
  }

  function meter(label, used, total, unit) {
    const box = el("div", "meter");
    box.title = label;
    const pct = total > 0 ? Math.min(100, Math.floor((used * 100) / total)) : 0;
    const bar = el("progress", label);
    bar.max = Math.max(total, 1);
    bar.value = used;
    box.append(bar, el("span", "meter-text", used + "/" + total + unit + " (" + pct + "%)"));
    return box;
  }

  function renderHosts() {
    const fragment = document.createDocumentFragment();
    for (const m of head.members) {
      const tr = el("tr");
      tr.dataset.name = m.name;
      tr.dataset.status = m.status;
      tr.dataset.role = m.role;
      tr.dataset.voter = String(m.voter);
      tr.dataset.healthy = String(m.healthy);
      const health = m.healthy ? "healthy" : "unhealthy";
      const name = el("td", "name");
      name.dataset.label = "Host";
      name.append(hostLink(m.name, m.name));
      const status = el("td");
      status.dataset.label = "Status";
      status.append(badge("status-" + m.status, m.status), document.createTextNode(" "), badge(health, health));
      const role = el("td", "role", m.role);
      role.dataset.label = "Role";
      const count = el("td", "num", m.vms);
      count.dataset.label = "VMs";
      const capacity = el("td", "capacity");
      capacity.dataset.label = "Capacity";
      capacity.append(meter("vcpu", m.vcpu_used, m.vcpu_total, " vCPU"),
        meter("memory", m.memory_mib_used, m.memory_mib_total, " MiB"));
      tr.append(name, status, role, count, capacity);
      fragment.append(tr);
    }
    $("hosts-body").replaceChildren(fragment);
    const hostFilter = $("host-filter");
    const options = [el("option", "", "all hosts")];
    options[0].value = "";
    for (const m of head.members) {
      const option = el("option", "", m.name);
      option.value = m.name;
      options.push(option);
    }
    hostFilter.replaceChildren(...options);
    hostFilter.value = view.on;
  }

  // --------------------------------------------------------- the VM table

  const SORTS = {
    name: (a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0),
    state: (a, b) => rank(a.state) - rank(b.state),
    node: (a, b) => ((a.node || "~") < (b.node || "~") ? -1 : (a.node || "~") > (b.node || "~") ? 1 : 0),
    desired: (a, b) => (a.desired < b.desired ? -1 : a.desired > b.desired ? 1 : 0),
    vcpu: (a, b) => a.vcpu - b.vcpu,
    memory: (a, b) => a.memory_mib - b.memory_mib,
    since: (a, b) => b.since_unix_ms - a.since_unix_ms,
    reason: (a, b) => (why(a) < why(b) ? -1 : why(a) > why(b) ? 1 : 0),
  };
  function matches(vm, needle) {
    if (view.state === "problems" ? !isProblem(vm) : view.state && vm.state !== view.state) {
      return false;
    }
    if (view.on && vm.node !== view.on) return false;
    if (!needle) return true;
    return vm.name.includes(needle) || (vm.node || "").includes(needle);
  }
  function order() {
    if (ordered) return ordered;
    const needle = view.q.trim().toLowerCase();
    const list = [];
    for (const vm of vms.values()) if (matches(vm, needle)) list.push(vm);
    const by = SORTS[view.sort] || SORTS.state;
    const sign = view.dir === "desc" ? -1 : 1;
    list.sort((a, b) => sign * by(a, b) || SORTS.name(a, b));
    ordered = list;
    return list;
  }

  function newRow(name) {
    const tr = el("tr");
    const cells = [];
    const labels = ["Name", "State", "Host", "Desired", "vCPU", "MiB", "In state for", "Why"];
    const classes = ["name", "state", "node", "desired", "num", "num", "since", "reason"];
    for (let i = 0; i < classes.length; i += 1) {
      const td = el("td", classes[i]);
      td.dataset.label = labels[i];
      cells.push(td);
      tr.append(td);
    }
    cells[0].append(vmLink(name, name));
    return { tr, cells, key: "", since: 0, text: "" };
  }
  function fillRow(row, vm) {
    const state = shownState(vm);
    const key = state + "|" + vm.node + "|" + vm.desired + "|" + vm.vcpu + "|" + vm.memory_mib + "|" +
      vm.since_unix_ms + "|" + why(vm);
    if (row.key === key) return;
    row.key = key;
    const [, stateCell, host, desired, vcpu, memory, , reason] = row.cells;
    row.tr.dataset.name = vm.name;
    row.tr.dataset.state = state;
    row.tr.dataset.node = vm.node || "";
    stateCell.replaceChildren(badge("state-" + state, state));
    host.replaceChildren(vm.node ? hostLink(vm.node, vm.node) : document.createTextNode("—"));
    desired.textContent = vm.desired;
    vcpu.textContent = String(vm.vcpu);
    memory.textContent = String(vm.memory_mib);
    reason.textContent = why(vm);
    reason.title = why(vm);
    row.since = vm.since_unix_ms;
    row.text = "";
  }

  function renderVms() {
    const list = order();
    const pages = Math.max(1, Math.ceil(list.length / view.size));
    if (view.page > pages) view.page = pages;
    const start = (view.page - 1) * view.size;
    const shown = list.slice(start, start + view.size);
    const body = $("vms-body");
    const fragment = document.createDocumentFragment();
    for (const vm of shown) {
      let row = rows.get(vm.name);
      if (!row) {
        row = newRow(vm.name);
        rows.set(vm.name, row);
      }
      fillRow(row, vm);
      fragment.append(row.tr);
    }
    body.replaceChildren(fragment);
    for (const name of rows.keys()) if (!vms.has(name)) rows.delete(name);
    $("vm-count").textContent = (list.length === 0 ? "0" : (start + 1).toLocaleString("en-US") + "–" +
      (start + shown.length).toLocaleString("en-US")) + " of " + plural(list.length, "VM", "VMs") +
      (list.length !== vms.size ? " (" + vms.size.toLocaleString("en-US") + " in all)" : "");
    $("prev").disabled = view.page <= 1;
    $("next").disabled = view.page >= pages;
    for (const th of document.querySelectorAll("#vm-table th[data-sort]")) {
      const active = th.dataset.sort === view.sort;
      th.classList.toggle("sorted", active);
      th.setAttribute("aria-sort", active ? (view.dir === "asc" ? "ascending" : "descending") : "none");
      th.dataset.dir = active ? view.dir : "";
    }
    $("search").value !== view.q && document.activeElement !== $("search") && ($("search").value = view.q);
    $("state-filter").value = view.state;
    $("host-filter").value = view.on;
    $("page-size").value = String(view.size);
    tickTimes();
  }

  function tickTimes() {
    for (const tr of $("vms-body").children) {
      const row = rows.get(tr.dataset.name);
      if (!row) continue;
      const text = sinceText(row.since);
      if (text !== row.text) {
        row.text = text;
        row.cells[6].textContent = text;
      }
    }
    $("clock").textContent = clockTime(agentNow());
  }

  // ------------------------------------------------------------- events

  // Consecutive ordinary events of one kind (a burst of creates) read as
  // one line that opens; problems always stand alone.
  function groups(list) {
    const out = [];
    for (const e of list) {
      const last = out[out.length - 1];
      if (last && e.level === "info" && last.level === "info" && last.kind === e.kind) {
        last.items.push(e);
      } else {
        out.push({ kind: e.kind, level: e.level, items: [e] });
      }
    }
    return out;
  }
  function eventLine(e) {
    const li = el("li", "level-" + e.level);
    li.dataset.kind = e.kind;
    li.dataset.subject = e.subject;
    li.dataset.seq = String(e.seq);
    li.append(timeEl(e.at_unix_ms), el("span", "message", e.message));
    return li;
  }
  function eventList(list) {
    const fragment = document.createDocumentFragment();
    for (const g of groups(list)) {
      if (g.items.length < 3) {
        for (const e of g.items) fragment.append(eventLine(e));
        continue;
      }
      const li = el("li", "level-info group");
      li.dataset.kind = g.kind;
      li.dataset.count = String(g.items.length);
      const details = el("details");
      const summary = el("summary");
      const newest = g.items[0];
      const oldest = g.items[g.items.length - 1];
      summary.append(timeEl(newest.at_unix_ms), el("span", "message",
        g.items.length + " × " + g.kind.replace(/_/g, " ") + " (" + oldest.subject + " … " + newest.subject + ")"));
      details.append(summary);
      const inner = el("ol");
      for (const e of g.items) inner.append(eventLine(e));
      details.append(inner);
      li.append(details);
      fragment.append(li);
    }
    return fragment;
  }
  function renderEvents() {
    const onlyProblems = $("problems-only").checked;
    $("events-body").replaceChildren(eventList(onlyProblems ? problems : events));
  }

  // ------------------------------------------------------------- graphs

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const k in attrs) node.setAttribute(k, String(attrs[k]));
    return node;
  }
  // Events per minute over the last hour, stacked by level.
  function renderEventRate() {
    const box = $("event-rate");
    const samples = history.samples;
    const W = 360;
    const H = 70;
    const chart = svg("svg", { viewBox: "0 0 " + W + " " + (H + 14), role: "img", class: "chart-svg" });
    const minutes = 60;
    const buckets = [];
    const now = agentNow();
    for (let i = 0; i < minutes; i += 1) buckets.push({ info: 0, warning: 0, error: 0 });
    for (let i = 1; i < samples.length; i += 1) {
      const a = samples[i - 1];
      const b = samples[i];
      const minute = Math.floor((now - b.at_unix_ms) / 60000);
      if (minute < 0 || minute >= minutes) continue;
      const bucket = buckets[minutes - 1 - minute];
      for (const level of ["info", "warning", "error"]) {
        bucket[level] += Math.max(0, (b.events[level] || 0) - (a.events[level] || 0));
      }
    }
    const max = Math.max(1, ...buckets.map((b) => b.info + b.warning + b.error));
    const w = W / minutes;
    let total = 0;
    buckets.forEach((b, i) => {
      let y = H;
      for (const level of ["info", "warning", "error"]) {
        const h = (b[level] / max) * H;
        total += b[level];
        if (h <= 0) continue;
        y -= h;
        chart.append(svg("rect", { x: i * w + 0.5, y, width: Math.max(1, w - 1), height: h, class: "bar-" + level }));
      }
    });
    const label = svg("text", { x: 0, y: H + 12, class: "axis" });
    label.textContent = samples.length < 2
      ? "collecting samples (one every " + history.interval_ms / 1000 + " s)"
      : total + " events in the last hour; peak " + max + "/min";
    chart.append(label);
    const title = el("div", "chart-title", "Cluster events per minute");
    box.replaceChildren(title, chart);
    box.dataset.events = String(total);
  }
  // One host's vCPU and memory use (%) over the samples.
  function capacityChart(name, big) {
    const W = big ? 420 : 360;
    const H = big ? 100 : 36;
    const chart = svg("svg", { viewBox: "0 0 " + W + " " + H, class: "chart-svg", role: "img" });
    chart.append(svg("rect", { x: 0, y: 0, width: W, height: H, class: "chart-bg" }));
    const samples = history.samples;
    const t0 = agentNow() - HISTORY_LEN * history.interval_ms;
    const x = (at) => Math.max(0, ((at - t0) / (HISTORY_LEN * history.interval_ms)) * W);
    let points = 0;
    for (const [field, total, cls] of [["vcpu_used", "vcpu_total", "line-vcpu"],
      ["memory_mib_used", "memory_mib_total", "line-memory"]]) {
      const pts = [];
      for (const s of samples) {
        const h = s.hosts.find((h) => h.name === name);
        if (!h) continue;
        const pct = h[total] > 0 ? Math.min(1, h[field] / h[total]) : 0;
        pts.push(x(s.at_unix_ms).toFixed(1) + "," + (H - 1 - pct * (H - 2)).toFixed(1));
      }
      points = pts.length;
      if (pts.length) chart.append(svg("polyline", { points: pts.join(" "), class: cls }));
    }
    chart.dataset.points = String(points);
    return chart;
  }
  function renderCapacity() {
    const fragment = document.createDocumentFragment();
    fragment.append(el("div", "chart-title", "Capacity in use per host (vCPU, memory)"));
    for (const m of head.members) {
      const row = el("div", "capacity-row");
      row.dataset.host = m.name;
      row.append(el("span", "name", m.name), capacityChart(m.name, false));
      fragment.append(row);
    }
    $("capacity-charts").replaceChildren(fragment);
  }

  // ------------------------------------------------------------- details

  const detail = $("detail");
  let detailToken = 0;
  function openDetail(kind, name) {
    view.vm = kind === "vm" ? name : "";
    view.host = kind === "host" ? name : "";
    writeUrl(true);
    renderDetail();
  }
  function closeDetail() {
    view.vm = "";
    view.host = "";
    writeUrl(true);
    renderDetail();
  }
  function dl(pairs) {
    const list = el("dl");
    for (const [k, v] of pairs) {
      if (v === null || v === undefined || v === "") continue;
      list.append(el("dt", "", k));
      const dd = el("dd");
      if (v instanceof Node) dd.append(v);
      else dd.textContent = String(v);
      list.append(dd);
    }
    return list;
  }
  function section(title, ...children) {
    const s = el("section", "detail-section");
    s.append(el("h3", "", title), ...children);
    return s;
  }
  function labelsText(labels) {
    const keys = Object.keys(labels || {});
    return keys.length ? keys.map((k) => k + "=" + labels[k]).join(", ") : "none";
  }
  async function getJson(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    const body = await response.json().catch(() => ({ error: response.status + " " + response.statusText }));
    if (!response.ok && !body.error) body.error = response.status + " " + response.statusText;
    return body;
  }

  // Actions: the same requests the CLI sends, through this agent.
  function actionBox(label, request, cli, disabled, extra) {
    const box = el("div", "action");
    const button = el("button", "act", label);
    button.type = "button";
    button.dataset.action = request.action;
    button.disabled = !!disabled;
    const code = el("code", "cli", cli);
    const result = el("div", "result");
    button.addEventListener("click", async () => {
      const body = Object.assign({}, request, extra ? extra() : {});
      button.disabled = true;
      result.className = "result pending";
      result.textContent = "…";
      try {
        const response = await fetch("/api/actions", {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify(body),
        });
        const answer = await response.json();
        result.className = "result " + (answer.ok ? "ok" : "error");
        result.textContent = answer.message;
        if (answer.cli) code.textContent = answer.cli;
        lastResult = { key: detail.dataset.loaded, action: request.action, answer };
        showLastResult();
        toast(answer.ok ? answer.message : "Refused: " + answer.message, answer.ok);
      } catch (e) {
        result.className = "result error";
        result.textContent = "the agent did not answer: " + e;
      }
      button.disabled = false;
    });
    box.append(button, code, result);
    return box;
  }
  // The last action's answer stays at the top of its detail view, across
  // the view's refreshes.
  let lastResult = null;
  function showLastResult() {
    const box = $("action-result");
    if (!box) return;
    const r = lastResult && lastResult.key === detail.dataset.loaded ? lastResult : null;
    box.hidden = !r;
    if (!r) return;
    box.className = r.answer.ok ? "ok" : "error";
    box.dataset.action = r.action;
    box.dataset.ok = String(r.answer.ok);
    box.replaceChildren(el("span", "message", r.answer.message), el("code", "cli", r.answer.cli || ""));
  }
  function resultBox() {
    const box = el("div");
    box.id = "action-result";
    box.setAttribute("role", "status");
    box.hidden = true;
    return box;
  }
  function readOnlyNote() {
    return el("p", "note read-only", boot.access === "open"
      ? "Read-only: this agent runs without authentication, so its dashboard offers no actions."
      : "Read-only: actions need an admin client certificate.");
  }
  function cliFor(args) {
    return "blixard-agent " + args + " --endpoint " + endpoint;
  }

  function eventsSection(title, list) {
    const ol = el("ol", "events");
    ol.append(list.length ? eventList(list) : el("li", "note", "none since this agent started"));
    return section(title, ol);
  }

  async function renderVmDetail(name, token) {
    const d = await getJson("/api/vms/" + encodeURIComponent(name));
    if (token !== detailToken) return;
    const body = $("detail-body");
    $("detail-title").textContent = "VM " + name;
    if (d.error) {
      body.replaceChildren(el("p", "error", d.error));
      return;
    }
    const state = shownState(d);
    const title = $("detail-title");
    title.append(document.createTextNode(" "), badge("state-" + state, state));
    const parts = [];
    if (d.reason || d.last_error) parts.push(el("p", "reason", d.reason || d.last_error));
    if (canAct) {
      const targets = head.members.filter((m) => m.status === "up" && m.name !== d.node);
      const select = el("select", "migrate-to");
      select.setAttribute("aria-label", "Migrate to");
      for (const m of targets) {
        const o = el("option", "", m.name);
        o.value = m.name;
        select.append(o);
      }
      const migrateCli = () => cliFor("vm migrate " + name + " --to " + (select.value || "NODE"));
      const migrate = actionBox("Migrate", { action: "vm_migrate", vm: name }, migrateCli(), !targets.length,
        () => ({ to: select.value }));
      select.addEventListener("change", () => (migrate.querySelector("code").textContent = migrateCli()));
      migrate.insertBefore(select, migrate.children[1]);
      parts.push(section("Actions", resultBox(),
        actionBox("Start", { action: "vm_start", vm: name }, cliFor("vm start " + name), d.desired === "running"),
        actionBox("Stop", { action: "vm_stop", vm: name }, cliFor("vm stop " + name), d.desired === "stopped"),
        migrate));
    } else {
      parts.push(readOnlyNote());
    }
    parts.push(section("Spec", dl([
      ["vCPU", d.vcpu], ["Memory", d.memory_mib + " MiB"], ["Desired", d.desired], ["Failover", d.failover],
      ["Labels", labelsText(d.labels)], ["Pinned to", d.pinned_node || "any host"],
      ["Anti-affinity group", d.anti_affinity || "none"], ["Generation", d.generation],
    ])));
    const host = d.node ? hostLink(d.node, d.node) : "not placed";
    parts.push(section("Placement", dl([
      ["Host", host], ["State", state], ["In state since", d.since_unix_ms ? clockTime(d.since_unix_ms) : "—"],
      ["Old copy on", d.handoff_from], ["Failed on", d.failed_on && d.failed_on.join(", ")],
      ["Why", d.explanation],
    ])));
    parts.push(eventsSection("Placement history", d.placements));
    parts.push(eventsSection("Events", d.events));
    const log = el("pre", "log", "…");
    log.id = "vm-log";
    const refresh = el("button", "", "Refresh");
    refresh.type = "button";
    const loadLog = async () => {
      const r = await getJson("/api/vms/" + encodeURIComponent(name) + "/logs?lines=50");
      if (token !== detailToken) return;
      log.textContent = r.error ? r.error : r.lines.length ? r.lines.join("\n") : "(no lines)";
      log.dataset.loaded = "true";
    };
    refresh.addEventListener("click", loadLog);
    parts.push(section("Guest log (last 50 lines)", refresh, log));
    body.replaceChildren(...parts);
    detail.dataset.loaded = "vm:" + name;
    showLastResult();
    loadLog();
  }

  async function renderHostDetail(name, token) {
    const d = await getJson("/api/hosts/" + encodeURIComponent(name));
    if (token !== detailToken) return;
    const body = $("detail-body");
    $("detail-title").textContent = "Host " + name;
    if (d.error) {
      body.replaceChildren(el("p", "error", d.error));
      return;
    }
    $("detail-title").append(document.createTextNode(" "), badge("status-" + d.status, d.status));
    const parts = [];
    if (canAct) {
      parts.push(section("Actions", resultBox(),
        actionBox("Drain", { action: "node_drain", node: name }, cliFor("node drain " + name), d.status !== "up"),
        actionBox("Undrain", { action: "node_undrain", node: name }, cliFor("node undrain " + name),
          d.status !== "draining")));
    } else {
      parts.push(readOnlyNote());
    }
    parts.push(section("Host", dl([
      ["Address", d.address], ["Role", d.role], ["Health", d.healthy ? "healthy" : "unhealthy"],
      ["Labels", labelsText(d.labels)], ["Runners installed", d.runners.length],
      ["vCPU", d.vcpu_used + " of " + d.vcpu_total + " (overcommit " + d.vcpu_overcommit_pct + "%)"],
      ["Memory", d.memory_mib_used + " of " + d.memory_mib_total + " MiB (overcommit " + d.memory_overcommit_pct + "%)"],
    ])));
    const chart = capacityChart(name, true);
    chart.id = "host-capacity-chart";
    parts.push(section("Capacity in use, last hour (vCPU, memory)", chart));
    const list = el("ul", "host-vms");
    for (const [vm, state] of d.vms) {
      const li = el("li");
      li.append(badge("state-" + state, state), document.createTextNode(" "), vmLink(vm, vm));
      list.append(li);
    }
    parts.push(section(plural(d.vms.length, "VM", "VMs") + " on " + name, list));
    parts.push(eventsSection("Events", d.events));
    body.replaceChildren(...parts);
    detail.dataset.loaded = "host:" + name;
    showLastResult();
  }

  function renderDetail() {
    detailToken += 1;
    const token = detailToken;
    const open = view.vm || view.host;
    detail.hidden = !open;
    document.body.classList.toggle("detail-open", !!open);
    detail.dataset.loaded = "";
    if (!open) return;
    $("detail-body").replaceChildren(el("p", "note", "loading…"));
    if (view.vm) renderVmDetail(view.vm, token);
    else renderHostDetail(view.host, token);
  }

  let toastTimer = 0;
  function toast(text, ok) {
    const t = $("toast");
    t.textContent = text;
    t.className = ok ? "ok" : "error";
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => (t.hidden = true), 6000);
  }

  // -------------------------------------------------------- the whole page

  let pending = null;
  function schedule(parts) {
    if (!pending) {
      pending = new Set();
      requestAnimationFrame(() => {
        const todo = pending;
        pending = null;
        renderParts(todo);
      });
    }
    for (const p of parts) pending.add(p);
  }
  function renderParts(todo) {
    if (!head) return;
    if (todo.has("all") || todo.has("data")) {
      renderHeader();
      renderBanner();
      renderCounts();
      renderAttention();
      renderHosts();
      renderEvents();
    }
    if (todo.has("all") || todo.has("data") || todo.has("vms")) renderVms();
    if (todo.has("all") || todo.has("history")) {
      renderEventRate();
      renderCapacity();
    }
    if (todo.has("all") || todo.has("detail")) renderDetail();
    if (todo.has("events")) renderEvents();
    if (todo.has("banner")) renderBanner();
  }
  function setView(changes) {
    Object.assign(view, changes);
    ordered = null;
    writeUrl(false);
    schedule(["data", "vms"]);
  }

  // Controls.
  let searchTimer = 0;
  const onSearch = () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => setView({ q: $("search").value, page: 1 }), 60);
  };
  for (const type of ["input", "change", "search"]) $("search").addEventListener(type, onSearch);
  $("state-filter").addEventListener("change", () => setView({ state: $("state-filter").value, page: 1 }));
  $("host-filter").addEventListener("change", () => setView({ on: $("host-filter").value, page: 1 }));
  $("prev").addEventListener("click", () => setView({ page: view.page - 1 }));
  $("next").addEventListener("click", () => setView({ page: view.page + 1 }));
  const size = el("select");
  size.id = "page-size";
  size.setAttribute("aria-label", "Rows per page");
  for (const n of PAGE_SIZES) {
    const o = el("option", "", n + " per page");
    o.value = String(n);
    size.append(o);
  }
  size.addEventListener("change", () => setView({ size: Number(size.value), page: 1 }));
  document.querySelector("#vms .pager").append(size);
  for (const th of document.querySelectorAll("#vm-table th[data-sort]")) {
    const sort = () => {
      const key = th.dataset.sort;
      setView({ sort: key, dir: view.sort === key && view.dir === "asc" ? "desc" : "asc", page: 1 });
    };
    th.addEventListener("click", sort);
    th.addEventListener("keydown", (e) => (e.key === "Enter" || e.key === " ") && (e.preventDefault(), sort()));
  }
  $("problems-only").addEventListener("change", () => schedule(["events"]));
  $("attention-more").addEventListener("click", (e) => {
    e.preventDefault();
    setView({ state: "problems", page: 1 });
  });
  $("detail-close").addEventListener("click", closeDetail);
  document.addEventListener("keydown", (e) => e.key === "Escape" && !detail.hidden && closeDetail());
  window.addEventListener("popstate", () => {
    readUrl();
    ordered = null;
    schedule(["all"]);
  });
  setInterval(() => {
    tickTimes();
    if (head && !head.quorum) renderBanner();
  }, 1000);
  // Graphs move with time even when nothing happens.
  setInterval(() => head && schedule(["history"]), 30000);

  function setConnection(state, text) {
    const c = $("connection");
    c.className = "badge connection-" + state;
    c.textContent = text;
    document.body.dataset.connection = state;
  }
  function rendered() {
    updates += 1;
    document.body.dataset.updates = String(updates);
    document.body.dataset.version = String(version);
    document.body.dataset.generated = String(head.generated_unix_ms);
  }

  // First render, from the embedded data.
  readUrl();
  applyFull(boot.snapshot);
  renderParts(new Set(["all"]));
  rendered();
  window.__blixardFirstRenderMs = performance.now();
  document.body.dataset.firstRenderMs = String(Math.round(window.__blixardFirstRenderMs));

  // Bytes of stream data received (for the benchmark in BENCHMARKS.md).
  let streamBytes = 0;
  function received(m) {
    streamBytes += m.data.length;
    document.body.dataset.streamBytes = String(streamBytes);
  }
  function connect() {
    const source = new EventSource("/api/overview/stream?since=" + version);
    source.addEventListener("open", () => {
      connected = true;
      setConnection("live", "live");
      schedule(["banner"]);
    });
    source.addEventListener("error", () => {
      connected = false;
      setConnection("lost", "reconnecting…");
      schedule(["banner"]);
    });
    source.addEventListener("clock", (m) => {
      received(m);
      clockOffsetMs = Number(m.data) - Date.now();
      lastMessageMs = agentNow();
    });
    source.addEventListener("overview", (m) => {
      received(m);
      lastMessageMs = agentNow();
      applyFull(JSON.parse(m.data));
      rendered();
      schedule(["data", "vms"]);
      refreshDetailSoon();
    });
    source.addEventListener("delta", (m) => {
      received(m);
      lastMessageMs = agentNow();
      const d = JSON.parse(m.data);
      if (!applyDelta(d)) {
        // A gap: start again from a full overview.
        source.close();
        version = 0;
        connect();
        return;
      }
      rendered();
      schedule(["data", "vms"]);
      refreshDetailSoon();
    });
    source.addEventListener("sample", (m) => {
      received(m);
      history.samples.push(JSON.parse(m.data));
      if (history.samples.length > HISTORY_LEN) history.samples.shift();
      schedule(["history"]);
    });
  }
  // An open detail view follows changes to what it shows, at most every 2 s.
  let detailRefresh = 0;
  function refreshDetailSoon() {
    if (!(view.vm || view.host) || detailRefresh) return;
    detailRefresh = setTimeout(() => {
      detailRefresh = 0;
      if (!detail.querySelector(".result.pending")) schedule(["detail"]);
    }, 2000);
  }
  connect();
})();

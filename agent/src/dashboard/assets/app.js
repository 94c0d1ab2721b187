// Blixard dashboard: keeps the server-rendered page current from the
// agent's live stream (/api/overview/stream, server-sent events).
//
// Rules: data from the cluster only ever reaches the DOM through
// textContent and dataset (never innerHTML), and the VM table is updated
// row by row (a row is touched only when its VM changed), so a thousand VMs
// cost one pass over an array per update, not a re-render.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const membersBody = $("members-body");
  const hostsBody = $("hosts-body");
  const eventsBody = $("events-body");
  const vmsBody = $("vms-body");
  const search = $("search");
  const stateFilter = $("state-filter");
  const vmCount = $("vm-count");
  const summary = $("summary");
  const connection = $("connection");

  // Milliseconds to add to the browser's clock to get the agent's.
  let clockOffsetMs = Number(document.body.dataset.now || Date.now()) - Date.now();
  // name -> { tr, key, sinceCell, since, text }
  const rows = new Map();
  let updates = 0;

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function badge(className, text) {
    return el("span", "badge " + className, text);
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
    return since > 0 ? duration(Date.now() + clockOffsetMs - since) : "—";
  }

  function clockTime(ms) {
    return new Date(ms).toLocaleTimeString([], { hour12: false });
  }

  function renderSummary(o) {
    summary.textContent = o.member
      ? "leader " + (o.leader || "unknown") + " · term " + o.term + " · " + o.members.length + " hosts · " +
        o.vms.length + " VMs · served by " + o.agent
      : o.agent + " is not a member of a cluster yet";
  }

  function renderMembers(members) {
    const fragment = document.createDocumentFragment();
    for (const m of members) {
      const tr = el("tr");
      tr.dataset.name = m.name;
      tr.dataset.status = m.status;
      tr.dataset.role = m.role;
      tr.dataset.healthy = String(m.healthy);
      const health = m.healthy ? "healthy" : "unhealthy";
      tr.append(el("td", "name", m.name), el("td", "", m.address), el("td", "role", m.role));
      const status = el("td");
      status.append(badge("status-" + m.status, m.status));
      const healthCell = el("td");
      healthCell.append(badge(health, health));
      tr.append(status, healthCell, el("td", "num", m.vms));
      fragment.append(tr);
    }
    membersBody.replaceChildren(fragment);
  }

  function meter(label, used, total, unit) {
    const box = el("div", "meter");
    const head = el("div", "meter-label");
    const pct = total > 0 ? Math.min(100, Math.floor((used * 100) / total)) : 0;
    head.append(el("span", "", label), el("span", "meter-text", used + " / " + total + unit + " (" + pct + "%)"));
    const bar = el("progress", label);
    bar.max = Math.max(total, 1);
    bar.value = used;
    box.append(head, bar);
    return box;
  }

  function renderHosts(members) {
    const fragment = document.createDocumentFragment();
    for (const m of members) {
      const card = el("div", "host");
      card.dataset.name = m.name;
      card.dataset.status = m.status;
      const head = el("div", "host-head");
      head.append(el("span", "name", m.name), badge("status-" + m.status, m.status), el("span", "host-vms", m.vms + " VMs"));
      card.append(head, meter("vcpu", m.vcpu_used, m.vcpu_total, ""), meter("memory", m.memory_mib_used, m.memory_mib_total, " MiB"));
      fragment.append(card);
    }
    hostsBody.replaceChildren(fragment);
  }

  function renderEvents(events) {
    const fragment = document.createDocumentFragment();
    for (const e of events) {
      const li = el("li", "level-" + e.level);
      li.dataset.kind = e.kind;
      li.dataset.subject = e.subject;
      const time = el("time", "", clockTime(e.at_unix_ms));
      time.dataset.at = String(e.at_unix_ms);
      li.append(time, el("span", "message", e.message));
      fragment.append(li);
    }
    eventsBody.replaceChildren(fragment);
  }

  function newRow() {
    const tr = el("tr");
    const cells = [];
    for (const className of ["name", "", "", "", "num", "num", "since", "error"]) {
      const td = el("td", className);
      cells.push(td);
      tr.append(td);
    }
    return { tr, cells, key: "", since: 0, text: "" };
  }

  function fillRow(row, vm) {
    const [name, state, host, desired, vcpu, memory] = row.cells;
    row.tr.dataset.name = vm.name;
    row.tr.dataset.state = vm.state;
    row.tr.dataset.node = vm.node || "";
    name.textContent = vm.name;
    state.replaceChildren(badge("state-" + vm.state, vm.state));
    host.textContent = vm.node || "—";
    desired.textContent = vm.desired;
    vcpu.textContent = String(vm.vcpu);
    memory.textContent = String(vm.memory_mib);
    row.cells[7].textContent = vm.last_error || "";
    row.since = vm.since_unix_ms;
    row.text = "";
  }

  function matches(row, needle, state) {
    if (state && row.tr.dataset.state !== state) return false;
    if (!needle) return true;
    return row.tr.dataset.name.includes(needle) || row.tr.dataset.node.includes(needle);
  }

  function applyFilter() {
    const needle = search.value.trim().toLowerCase();
    const state = stateFilter.value;
    let shown = 0;
    for (const row of rows.values()) {
      const show = matches(row, needle, state);
      if (row.tr.hidden === show) row.tr.hidden = !show;
      if (show) shown += 1;
    }
    vmCount.textContent = shown + " of " + rows.size;
    tickTimes();
  }

  function renderVms(vms) {
    if (updates === 0) {
      // The server-rendered rows are replaced by rows this script owns.
      vmsBody.replaceChildren();
    }
    const seen = new Set();
    let cursor = vmsBody.firstChild;
    for (const vm of vms) {
      seen.add(vm.name);
      let row = rows.get(vm.name);
      if (!row) {
        row = newRow();
        rows.set(vm.name, row);
      }
      const key = vm.state + "|" + vm.node + "|" + vm.desired + "|" + vm.vcpu + "|" + vm.memory_mib + "|" +
        vm.since_unix_ms + "|" + vm.last_error;
      if (row.key !== key) {
        row.key = key;
        fillRow(row, vm);
      }
      // The list comes sorted by name; move a row only when it is out of place.
      if (row.tr === cursor) {
        cursor = cursor.nextSibling;
      } else {
        vmsBody.insertBefore(row.tr, cursor);
      }
    }
    for (const [name, row] of rows) {
      if (!seen.has(name)) {
        row.tr.remove();
        rows.delete(name);
      }
    }
    applyFilter();
  }

  // Time in state, for the rows on screen only.
  function tickTimes() {
    for (const row of rows.values()) {
      if (row.tr.hidden) continue;
      const text = sinceText(row.since);
      if (text !== row.text) {
        row.text = text;
        row.cells[6].textContent = text;
      }
    }
  }

  function render(o) {
    renderSummary(o);
    renderMembers(o.members);
    renderHosts(o.members);
    renderEvents(o.events);
    renderVms(o.vms);
    updates += 1;
    document.body.dataset.updates = String(updates);
    document.body.dataset.generated = String(o.generated_unix_ms);
  }

  let filterPending = false;
  function scheduleFilter() {
    if (filterPending) return;
    filterPending = true;
    requestAnimationFrame(() => {
      filterPending = false;
      applyFilter();
    });
  }
  // "input" for typing; "change" and "search" for clearing (the field's
  // clear button, or a WebDriver clear).
  for (const type of ["input", "change", "search"]) search.addEventListener(type, scheduleFilter);
  stateFilter.addEventListener("change", scheduleFilter);

  // Until the stream's first message, show the server-rendered times.
  for (const li of eventsBody.querySelectorAll("time[data-at]")) {
    li.textContent = clockTime(Number(li.dataset.at));
  }
  for (const td of vmsBody.querySelectorAll("td.since")) {
    td.textContent = sinceText(Number(td.dataset.since));
  }
  setInterval(tickTimes, 1000);

  function setConnection(state, text) {
    connection.className = "badge connection-" + state;
    connection.textContent = text;
    document.body.dataset.connection = state;
  }

  const source = new EventSource("/api/overview/stream");
  source.addEventListener("open", () => setConnection("live", "live"));
  source.addEventListener("error", () => setConnection("lost", "reconnecting…"));
  source.addEventListener("clock", (message) => {
    clockOffsetMs = Number(message.data) - Date.now();
  });
  source.addEventListener("overview", (message) => {
    setConnection("live", "live");
    render(JSON.parse(message.data));
  });
})();

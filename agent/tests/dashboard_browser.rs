//! The dashboard in a real browser: headless Chromium, driven over the W3C
//! WebDriver protocol through Debian's `chromedriver`, against a live
//! three-agent cluster (`blixard-agent run`, process runtime, fake guests)
//! on loopback.
//!
//! It checks what an operator would: the page lists the members and the
//! leader; a VM created through the CLI appears and turns running without a
//! reload; search and the state filter work at a thousand VMs; a stopped
//! agent's host turns down. Screenshots are written to
//! `$CARGO_TARGET_TMPDIR/dashboard/` (kept after the run, for CI artifacts).
//!
//! Needs `chromium` and `chromium-driver` (`apt-get install chromium
//! chromium-driver`). Without them the test is skipped with a message,
//! unless `BLIXARD_REQUIRE_BROWSER` is set (CI sets it), where it fails.
//!
//! The WebDriver client is the few JSON-over-HTTP calls below, on std's
//! TCP stream: the protocol is small and stable, and it keeps a browser
//! crate and its dependency tree out of the workspace.

mod cli_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use cli_support::{BIN, Out, run};
use serde_json::{Value, json};

/// Guests every host has a runner for.
const GUESTS: &[&str] = &["web", "db", "cache"];
/// How long the cluster or the page may take to reach a condition.
const SETTLE: Duration = Duration::from_secs(45);
/// How often a condition is checked again.
const POLL: Duration = Duration::from_millis(200);
/// The scale the page must stay usable at.
const MANY_VMS: usize = 1000;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Polls `ok` until it returns `Some`, or panics with `what` and `context()`
/// after `SETTLE`.
fn wait_for<T>(what: &str, mut ok: impl FnMut() -> Option<T>, context: impl Fn() -> String) -> T {
    let deadline = Instant::now() + SETTLE;
    loop {
        if let Some(value) = ok() {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {SETTLE:?} waiting for {what}\n{}", context());
        }
        std::thread::sleep(POLL);
    }
}

fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").to_string()
}

/// One HTTP/1.1 request; returns status and body. The body is read by its
/// `Content-Length` (chromedriver keeps connections open whatever the
/// client asks), else chunked, else to the end.
fn http(method: &str, address: &str, path: &str, body: Option<&Value>) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\
         Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut received = Vec::new();
    let mut buffer = [0u8; 64 * 1024];
    let head_end = loop {
        if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed in the headers"));
        }
        received.extend_from_slice(&buffer[..n]);
    };
    let head = String::from_utf8_lossy(&received[..head_end]).to_ascii_lowercase();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let length = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok());
    let mut body = received.split_off(head_end);
    match length {
        Some(length) => {
            while body.len() < length {
                let n = stream.read(&mut buffer)?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "connection closed in the body",
                    ));
                }
                body.extend_from_slice(&buffer[..n]);
            }
            body.truncate(length);
        }
        None => {
            stream.read_to_end(&mut body)?;
        }
    }
    let text = String::from_utf8_lossy(&body).into_owned();
    let chunked = head.lines().any(|l| l.starts_with("transfer-encoding: chunked"));
    Ok((status, if chunked { dechunk(&text) } else { text }))
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || tail.len() < size {
            break;
        }
        out.push_str(&tail[..size]);
        rest = tail[size..].trim_start_matches("\r\n");
    }
    out
}

// ---------------------------------------------------------------- cluster

struct Agent {
    name: String,
    metrics: String,
    child: Child,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    agents: Vec<Agent>,
}

fn write_runners(state_dir: &Path) {
    for guest in GUESTS {
        let bin = state_dir.join(guest).join("current/bin");
        std::fs::create_dir_all(&bin).unwrap();
        let runner = bin.join("microvm-run");
        std::fs::write(&runner, "#!/bin/sh\nexec sleep 600\n").unwrap();
        std::fs::set_permissions(&runner, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

impl Cluster {
    /// Three agents forming one cluster through `initial_members`, each
    /// serving the dashboard on its own `metrics_listen`.
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<(String, String)> = (1..=3).map(|i| (format!("h{i}"), free_address())).collect();
        let initial: Vec<String> = members.iter().map(|(name, addr)| format!("\"{name}={addr}\"")).collect();
        let mut cluster = Cluster { dir, agents: Vec::new() };
        for (name, address) in &members {
            let home = cluster.dir.path().join(name);
            let state_dir = home.join("vms");
            write_runners(&state_dir);
            let metrics = free_address();
            let config = format!(
                "node_name = \"{name}\"\nlisten = \"{address}\"\nmetrics_listen = \"{metrics}\"\ndata_dir = \"{}\"\n\
                 initial_members = [{}]\n{}[runtime]\nkind = \"process\"\nstate_dir = \"{}\"\n\
                 [capacity]\nvcpu = 8\nmemory_mib = 8192\n",
                home.join("data").display(),
                initial.join(", "),
                cli_support::LOOPBACK_INSECURE,
                state_dir.display()
            );
            let path = home.join("agent.toml");
            std::fs::write(&path, config).unwrap();
            let child = Command::new(BIN)
                .args(["run", "--config"])
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(home.join("agent.log")).unwrap())
                .spawn()
                .expect("spawn agent");
            cluster.agents.push(Agent { name: name.clone(), metrics, child });
        }
        wait_for(
            "the cluster to have a leader and three members",
            || {
                let out = cluster.cli(0, &["cluster", "status", "--json"]);
                let status = (out.code == 0).then(|| out.json())?;
                (!status["leader"].is_null() && status["members"].as_array()?.len() == 3).then_some(())
            },
            || cluster.logs(),
        );
        cluster
    }

    /// Runs a client command against agent `i`, with a generous timeout: a
    /// loaded CI machine is slow, and a retried create would be a duplicate.
    fn cli(&self, i: usize, args: &[&str]) -> Out {
        let config = self.dir.path().join(&self.agents[i].name).join("agent.toml");
        let mut all = args.to_vec();
        all.extend(["--config", config.to_str().unwrap(), "--timeout", "30"]);
        run(&all)
    }

    fn overview(&self, i: usize) -> Value {
        let (status, body) = http("GET", &self.agents[i].metrics, "/api/overview", None).expect("GET /api/overview");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("overview is JSON")
    }

    fn logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| {
                let log = std::fs::read_to_string(self.dir.path().join(&a.name).join("agent.log")).unwrap_or_default();
                format!("--- {} ---\n{}", a.name, log.lines().rev().take(15).collect::<Vec<_>>().join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

// -------------------------------------------------------------- webdriver

/// A chromedriver process and one headless Chromium session.
struct Browser {
    driver: Child,
    address: String,
    session: String,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http("DELETE", &self.address, &format!("/session/{}", self.session), None);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Whether the browser is installed; `None` (skip) only when it is not and
/// it is not required.
fn browser_available() -> bool {
    let installed = Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists();
    if !installed {
        assert!(
            std::env::var_os("BLIXARD_REQUIRE_BROWSER").is_none(),
            "BLIXARD_REQUIRE_BROWSER is set but {CHROMIUM} or {CHROMEDRIVER} is missing: \
             apt-get install chromium chromium-driver"
        );
        eprintln!(
            "SKIPPED: the dashboard browser test needs {CHROMIUM} and {CHROMEDRIVER} \
             (apt-get install chromium chromium-driver); set BLIXARD_REQUIRE_BROWSER=1 to fail instead"
        );
    }
    installed
}

impl Browser {
    fn start(log_dir: &Path) -> Browser {
        let address = free_address();
        let port = address.rsplit(':').next().unwrap().to_string();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log_dir.join("chromedriver.log")).unwrap())
            .spawn()
            .expect("spawn chromedriver");
        let mut browser = Browser { driver, address, session: String::new() };
        wait_for(
            "chromedriver to be ready",
            || {
                let (_, body) = http("GET", &browser.address, "/status", None).ok()?;
                let status: Value = serde_json::from_str(&body).ok()?;
                (status["value"]["ready"] == true).then_some(())
            },
            String::new,
        );
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1400,1100", "--hide-scrollbars", "--no-first-run"],
            },
        }}});
        let created = browser.call("POST", "/session", Some(&capabilities));
        browser.session = created["sessionId"].as_str().expect("session id").to_string();
        browser
    }

    /// A WebDriver command; returns its `value`, panics on an error.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, text) = http(method, &self.address, path, body).expect("chromedriver answers");
        let mut response: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("chromedriver sent non-JSON ({e}): {text}"));
        assert_eq!(status, 200, "{method} {path}: {response}");
        response["value"].take()
    }

    fn session_call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn goto(&self, url: &str) {
        self.session_call("POST", "/url", Some(&json!({ "url": url })));
    }

    /// Runs `script` (a function body) in the page and returns its result.
    fn eval(&self, script: &str) -> Value {
        self.session_call("POST", "/execute/sync", Some(&json!({ "script": script, "args": [] })))
    }

    fn element(&self, css: &str) -> String {
        let found = self.session_call("POST", "/element", Some(&json!({"using": "css selector", "value": css})));
        found.as_object().and_then(|o| o.values().next()).and_then(Value::as_str).expect("element id").to_string()
    }

    /// Types `text` into the element, as a user would (key events).
    fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css);
        self.session_call("POST", &format!("/element/{id}/value"), Some(&json!({ "text": text })));
    }

    fn clear(&self, css: &str) {
        let id = self.element(css);
        self.session_call("POST", &format!("/element/{id}/clear"), Some(&json!({})));
    }

    /// Picks `state` in the VM state filter (`""`: all), as a change event.
    fn select_state(&self, state: &str) {
        let script = format!(
            "const s = document.getElementById('state-filter'); s.value = {state:?}; \
             s.dispatchEvent(new Event('change')); return s.value;"
        );
        assert_eq!(self.eval(&script), state);
    }

    fn screenshot(&self, path: &Path) {
        let png = self.session_call("GET", "/screenshot", None);
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().expect("base64")).expect("PNG");
        assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(path, bytes).expect("write screenshot");
        eprintln!("screenshot: {}", path.display());
    }

    /// What the page shows, read from its DOM.
    fn page(&self) -> Value {
        self.eval(
            "const rows = (sel) => Array.from(document.querySelectorAll(sel));
             return {
               updates: Number(document.body.dataset.updates || 0),
               connection: document.body.dataset.connection || '',
               summary: document.getElementById('summary').textContent,
               members: rows('#members-body tr').map(tr => ({name: tr.dataset.name, status: tr.dataset.status,
                 role: tr.dataset.role, healthy: tr.dataset.healthy})),
               hosts: rows('#hosts-body .host').map(h => ({name: h.dataset.name, status: h.dataset.status,
                 text: h.textContent})),
               vms: rows('#vms-body tr').map(tr => ({name: tr.dataset.name, state: tr.dataset.state,
                 node: tr.dataset.node, hidden: tr.hidden, since: tr.querySelector('td.since').textContent})),
               events: rows('#events-body li .message').map(m => m.textContent),
               count: document.getElementById('vm-count').textContent,
             };",
        )
    }
}

fn vm<'a>(page: &'a Value, name: &str) -> Option<&'a Value> {
    page["vms"].as_array()?.iter().find(|v| v["name"] == name)
}

fn member<'a>(page: &'a Value, name: &str) -> Option<&'a Value> {
    page["members"].as_array()?.iter().find(|m| m["name"] == name)
}

fn visible(page: &Value) -> Vec<String> {
    page["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["hidden"] == false)
        .filter_map(|v| v["name"].as_str().map(str::to_string))
        .collect()
}

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Creates `count` VMs named `vm-0000`... through the gRPC API, many at a
/// time. None has a runner anywhere, so they stay pending:
/// the cluster records them and the page must list them all.
fn create_many(endpoint: &str, count: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let options = blixard::api::client::ConnectOptions {
            authority: endpoint.to_string(),
            tls: None,
            timeout: Duration::from_secs(30),
        };
        let client = blixard::api::client::Client::connect(options).await.expect("connect");
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..count {
            let client = client.clone();
            tasks.spawn(async move {
                let request = blixard::api::pb::VmCreateRequest {
                    name: format!("vm-{i:04}"),
                    vcpu: 1,
                    memory_mib: 64,
                    ..Default::default()
                };
                client.vm_create(request).await.map(|_| ())
            });
            // At most 64 requests in flight.
            if tasks.len() >= 64 {
                tasks.join_next().await.unwrap().unwrap().expect("create");
            }
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap().expect("create");
        }
    });
}

#[test]
fn the_dashboard_shows_the_live_cluster_in_a_browser() {
    if !browser_available() {
        return;
    }
    let artifacts = artifacts();
    let mut cluster = Cluster::start();
    let browser = Browser::start(cluster.dir.path());
    // The page is served by h1; h3 is the host that will be stopped.
    browser.goto(&format!("http://{}/dashboard", cluster.agents[0].metrics));
    let context = |b: &Browser, c: &Cluster| format!("page: {:#}\n{}", b.page(), c.logs());

    // Members, roles and the leader, kept current by the stream.
    let page = wait_for(
        "the page to list three healthy members, one of them the leader",
        || {
            let page = browser.page();
            let members = page["members"].as_array()?;
            let ok = page["connection"] == "live"
                && members.len() == 3
                && members.iter().filter(|m| m["role"] == "leader").count() == 1
                && members.iter().all(|m| m["status"] == "up");
            ok.then_some(page)
        },
        || context(&browser, &cluster),
    );
    assert!(page["summary"].as_str().unwrap().contains("leader h"), "{page}");
    assert_eq!(page["hosts"].as_array().unwrap().len(), 3, "a capacity card per host: {page}");

    // A marker that a reload would wipe.
    browser.eval("window.__blixardNoReload = 'still here'; return true;");
    let first_update = browser.page()["updates"].as_u64().unwrap();

    cluster.cli(0, &["vm", "create", "web", "--vcpu", "2", "--memory", "512"]).assert_ok();
    cluster.cli(1, &["vm", "create", "db", "--vcpu", "4", "--memory", "2048"]).assert_ok();
    cluster.cli(2, &["vm", "create", "cache", "--vcpu", "1", "--memory", "256", "--stopped"]).assert_ok();
    let page = wait_for(
        "web and db to show running on a host, cache listed and every host's capacity",
        || {
            let page = browser.page();
            let running = |name| vm(&page, name).is_some_and(|v| v["state"] == "running" && v["node"] != "");
            let capacities =
                page["hosts"].as_array()?.iter().all(|h| h["text"].as_str().is_some_and(|t| t.contains("/ 8 (")));
            (running("web") && running("db") && vm(&page, "cache").is_some() && capacities).then_some(page)
        },
        || context(&browser, &cluster),
    );
    assert_eq!(browser.eval("return window.__blixardNoReload;"), "still here", "the page was reloaded");
    assert!(page["updates"].as_u64().unwrap() > first_update, "{page}");
    wait_for(
        "the events panel to tell of web's creation and start, and time in state to count",
        || {
            let page = browser.page();
            let events: Vec<&str> = page["events"].as_array()?.iter().filter_map(Value::as_str).collect();
            let ok = events.iter().any(|e| e.starts_with("vm web created"))
                && events.iter().any(|e| e.starts_with("vm web running on h"))
                && vm(&page, "web")?["since"].as_str()?.ends_with('s');
            ok.then_some(())
        },
        || context(&browser, &cluster),
    );
    // The page and the JSON endpoint agree, from any member.
    let overview = cluster.overview(2);
    assert_eq!(overview["vms"].as_array().unwrap().len(), 3, "{overview}");
    assert_eq!(overview["members"].as_array().unwrap().len(), 3, "{overview}");
    assert!(overview["leader"].is_string(), "{overview}");
    let web_host = vm(&browser.page(), "web").unwrap()["node"].as_str().unwrap().to_string();
    let used: u64 = cluster.overview(0)["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == web_host.as_str())
        .and_then(|m| m["vcpu_used"].as_u64())
        .unwrap();
    assert!(used >= 2, "web's host shows its vcpu in use");
    browser.screenshot(&artifacts.join("dashboard-running.png"));

    // Search and filter, typed as a user would.
    browser.type_into("#search", "we");
    wait_for(
        "the search to leave only web",
        || (visible(&browser.page()) == ["web"]).then_some(()),
        || context(&browser, &cluster),
    );
    browser.clear("#search");
    browser.select_state("running");
    wait_for(
        "the filter to leave web and db",
        || (visible(&browser.page()) == ["db", "web"]).then_some(()),
        || context(&browser, &cluster),
    );
    browser.select_state("");

    // A stopped agent's host turns down, live, on a surviving member's page.
    drop(cluster.agents.remove(2));
    let page = wait_for(
        "h3 to show down in the members table and its capacity card",
        || {
            let page = browser.page();
            let down = member(&page, "h3")?["status"] == "down"
                && page["hosts"].as_array()?.iter().any(|h| h["name"] == "h3" && h["status"] == "down");
            down.then_some(page)
        },
        || context(&browser, &cluster),
    );
    assert_eq!(member(&page, "h1").unwrap()["status"], "up", "{page}");
    wait_for(
        "a 'host h3 down' event, and web and db running on survivors",
        || {
            let page = browser.page();
            let events = page["events"].as_array()?;
            let on_survivor = |name| vm(&page, name).is_some_and(|v| v["state"] == "running" && v["node"] != "h3");
            let ok = events.iter().any(|e| e == "host h3 down") && on_survivor("web") && on_survivor("db");
            ok.then_some(())
        },
        || context(&browser, &cluster),
    );
    browser.screenshot(&artifacts.join("dashboard-host-down.png"));
    assert_eq!(browser.eval("return window.__blixardNoReload;"), "still here", "the page was reloaded");

    // A thousand VMs: all listed, and search and filter still answer.
    create_many(&cluster.agents_endpoint(0), MANY_VMS);
    let page = wait_for(
        "the page to list every VM",
        || {
            let page = browser.page();
            (page["vms"].as_array()?.len() == MANY_VMS + 3).then_some(page)
        },
        || cluster.logs(),
    );
    assert_eq!(page["count"], format!("{0} of {0}", MANY_VMS + 3));
    browser.type_into("#search", "vm-09");
    let shown = wait_for(
        "the search to narrow a thousand rows to a hundred",
        || {
            let shown = visible(&browser.page());
            (shown.len() == 100).then_some(shown)
        },
        String::new,
    );
    assert!(shown.iter().all(|n| n.starts_with("vm-09")), "{shown:?}");
    browser.clear("#search");
    browser.select_state("running");
    wait_for(
        "the filter to pick the two running VMs out of a thousand pending ones",
        || {
            let shown = visible(&browser.page());
            (shown.len() == 2 && shown.iter().all(|n| n == "web" || n == "db")).then_some(())
        },
        String::new,
    );
    browser.select_state("");
    browser.screenshot(&artifacts.join("dashboard-1000-vms.png"));
    assert_eq!(browser.eval("return window.__blixardNoReload;"), "still here", "the page was reloaded");
}

impl Cluster {
    /// The gRPC address of agent `i`.
    fn agents_endpoint(&self, i: usize) -> String {
        let config = std::fs::read_to_string(self.dir.path().join(&self.agents[i].name).join("agent.toml")).unwrap();
        let line = config.lines().find(|l| l.starts_with("listen = ")).expect("listen line");
        line.trim_start_matches("listen = ").trim_matches('"').to_string()
    }
}

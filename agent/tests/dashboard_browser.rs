//! The dashboard in a real browser: headless Chromium, driven over the W3C
//! WebDriver protocol through Debian's `chromedriver`, against a live
//! three-agent cluster (`blixard-agent run`, process runtime, fake guests)
//! on loopback with authentication on: mutual TLS with certificates from
//! `blixard-agent certs`, the dashboard over HTTPS.
//!
//! The browser holds two client certificates of the cluster CA in its own
//! NSS database: an admin one (alice) that it presents to h1's dashboard
//! and a read-only one (carol) that it presents to h2's (the profile's
//! `auto_select_certificate` setting picks one per origin, so no dialog).
//!
//! It checks what an operator would: the problems-first summary (counts by
//! state, a pending VM's reason, a crash-looping VM's failure), sorting
//! and filters kept in the URL, a VM's detail view, times with their zone,
//! that the events on the page are the agent's event log (`blixard-agent
//! events`, the same times on every member), an action performed with the
//! admin certificate and refused with the read-only one, the phone-width
//! layout without horizontal scrolling, 5,000 VMs rendering, and the
//! no-quorum banner when two of the three agents stop. Screenshots are
//! written to `$CARGO_TARGET_TMPDIR/dashboard/` (kept after the run, for CI
//! artifacts and docs/). The first render time at 5,000 VMs is printed, not
//! asserted: BENCHMARKS.md records it (`scripts/bench-dashboard.sh`).
//!
//! Needs `chromium`, `chromium-driver`, `libnss3-tools` and `openssl`
//! (scripts/test.sh installs them). Without them the test is skipped with
//! a message, unless `BLIXARD_REQUIRE_BROWSER` is set (CI sets it), where
//! it fails.
//!
//! The WebDriver client is the few JSON-over-HTTP calls below, on std's
//! TCP stream: the protocol is small and stable, and it keeps a browser
//! crate and its dependency tree out of the workspace.

mod cli_support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use cli_support::{BIN, Out, run};
use serde_json::{Value, json};

/// Guests every host has a runner for; `crashy`'s exits at once.
const GUESTS: &[(&str, &str)] = &[
    ("web", "exec sleep 600"),
    ("db", "exec sleep 600"),
    ("cache", "exec sleep 600"),
    ("huge", "exec sleep 600"),
    ("crashy", "echo 'crashy: out of luck' >&2; exit 3"),
];
/// How long the cluster or the page may take to reach a condition.
const SETTLE: Duration = Duration::from_secs(60);
/// How often a condition is checked again.
const POLL: Duration = Duration::from_millis(200);
/// The scale the page must render at.
const MANY_VMS: usize = 5000;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Tools that give the browser its client certificates.
const TOOLS: &[&str] = &["/usr/bin/pk12util", "/usr/bin/certutil", "/usr/bin/openssl"];
/// The browser's time zone: not the agents' (UTC), so that times on the
/// page must say their zone.
const BROWSER_TZ: &str = "Asia/Tokyo";

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

// ------------------------------------------------------------------ pki

/// Runs a tool, panicking with its output when it fails.
fn tool(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).stdin(Stdio::null()).output().expect("run a tool");
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The cluster CA, a member certificate per host, an admin client (alice,
/// from `blixard-agent certs client`) and a read-only client (carol: the
/// CLI makes no role certificates yet, so rcgen makes it here, as the
/// dashboard's access rules read it).
fn make_pki(dir: &Path, hosts: &[&str]) {
    let d = dir.to_str().unwrap();
    run(&["certs", "ca", "--dir", d, "--common-name", "blixard browser test CA"]).assert_ok();
    for host in hosts {
        run(&["certs", "host", host, "--address", "127.0.0.1", "--dir", d]).assert_ok();
    }
    run(&["certs", "client", "alice", "--dir", d]).assert_ok();
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca.key")).unwrap()).unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(dir.join("ca.pem")).unwrap(), ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "carol");
    params.subject_alt_names = vec![
        rcgen::SanType::URI("urn:blixard:client:carol".try_into().unwrap()),
        rcgen::SanType::URI("urn:blixard:role:read-only".try_into().unwrap()),
    ];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("carol.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("carol.key"), key.serialize_pem()).unwrap();
}

// ---------------------------------------------------------------- cluster

struct Agent {
    name: String,
    /// The dashboard's origin, `https://127.0.0.1:PORT`.
    origin: String,
    /// The gRPC address.
    listen: String,
    child: Option<Child>,
}

impl Agent {
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    agents: Vec<Agent>,
}

fn write_runners(state_dir: &Path) {
    for (guest, body) in GUESTS {
        let bin = state_dir.join(guest).join("current/bin");
        std::fs::create_dir_all(&bin).unwrap();
        let runner = bin.join("microvm-run");
        std::fs::write(&runner, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&runner, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

impl Cluster {
    /// Three agents forming one cluster through `initial_members`, with
    /// mutual TLS, each serving the dashboard over HTTPS on its own
    /// `metrics_listen`.
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        make_pki(&pki, &["h1", "h2", "h3"]);
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
                 initial_members = [{}]\n[runtime]\nkind = \"process\"\nstate_dir = \"{}\"\n\
                 [capacity]\nvcpu = 8\nmemory_mib = 8192\n\
                 [tls]\nca_file = \"{pki}/ca.pem\"\ncert_file = \"{pki}/{name}.pem\"\nkey_file = \"{pki}/{name}.key\"\n",
                home.join("data").display(),
                initial.join(", "),
                state_dir.display(),
                pki = pki.display(),
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
            cluster.agents.push(Agent {
                name: name.clone(),
                origin: format!("https://{metrics}"),
                listen: address.clone(),
                child: Some(child),
            });
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

    /// Runs a client command against agent `i` (as that member), with a
    /// generous timeout: a loaded CI machine is slow.
    fn cli(&self, i: usize, args: &[&str]) -> Out {
        let config = self.dir.path().join(&self.agents[i].name).join("agent.toml");
        let mut all = args.to_vec();
        all.extend(["--config", config.to_str().unwrap(), "--timeout", "30"]);
        run(&all)
    }

    /// `blixard-agent events --json` from agent `i`: (seq, at, kind, message).
    fn events(&self, i: usize) -> BTreeSet<(u64, u64, String, String)> {
        let out = self.cli(i, &["events", "--json"]);
        out.assert_ok();
        out.json()
            .as_array()
            .expect("an array")
            .iter()
            .map(|e| {
                let text = |k: &str| e[k].as_str().unwrap_or_default().to_string();
                (e["seq"].as_u64().unwrap(), e["at_unix_ms"].as_u64().unwrap(), text("kind"), text("message"))
            })
            .collect()
    }

    fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
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

/// Whether the browser and the certificate tools are installed; `false`
/// (skip) only when they are not and they are not required.
fn browser_available() -> bool {
    let mut needed = vec![CHROMIUM, CHROMEDRIVER];
    needed.extend(TOOLS);
    let missing: Vec<&str> = needed.into_iter().filter(|p| !Path::new(p).exists()).collect();
    if !missing.is_empty() {
        assert!(
            std::env::var_os("BLIXARD_REQUIRE_BROWSER").is_none(),
            "BLIXARD_REQUIRE_BROWSER is set but {missing:?} are missing: \
             apt-get install chromium chromium-driver libnss3-tools openssl"
        );
        eprintln!(
            "SKIPPED: the dashboard browser test needs {missing:?} (apt-get install chromium chromium-driver \
             libnss3-tools openssl); set BLIXARD_REQUIRE_BROWSER=1 to fail instead"
        );
    }
    missing.is_empty()
}

impl Browser {
    /// A browser that trusts the cluster CA in `pki` and holds each
    /// `(origin, client)` certificate, presenting it to that origin only.
    fn start(dir: &Path, pki: &Path, clients: &[(&str, &str)]) -> Browser {
        // The NSS database Chromium reads on Linux: $HOME/.pki/nssdb.
        let home = dir.join("browser-home");
        let nssdb = home.join(".pki/nssdb");
        std::fs::create_dir_all(&nssdb).unwrap();
        let db = format!("sql:{}", nssdb.display());
        tool("/usr/bin/certutil", &["-N", "-d", &db, "--empty-password"]);
        let ca = pki.join("ca.pem");
        tool("/usr/bin/certutil", &["-A", "-d", &db, "-n", "blixard test CA", "-t", "C,,", "-i", ca.to_str().unwrap()]);
        let mut exceptions = serde_json::Map::new();
        for (origin, client) in clients {
            let p12 = dir.join(format!("{client}.p12"));
            let (cert, key) = (pki.join(format!("{client}.pem")), pki.join(format!("{client}.key")));
            tool(
                "/usr/bin/openssl",
                &[
                    "pkcs12",
                    "-export",
                    "-in",
                    cert.to_str().unwrap(),
                    "-inkey",
                    key.to_str().unwrap(),
                    "-out",
                    p12.to_str().unwrap(),
                    "-passout",
                    "pass:",
                    "-name",
                    client,
                ],
            );
            tool("/usr/bin/pk12util", &["-i", p12.to_str().unwrap(), "-d", &db, "-W", ""]);
            exceptions.insert(format!("{origin},*"), json!({"setting": {"filters": [{"SUBJECT": {"CN": client}}]}}));
        }
        let profile = dir.join("browser-profile");
        std::fs::create_dir_all(profile.join("Default")).unwrap();
        let preferences =
            json!({"profile": {"content_settings": {"exceptions": {"auto_select_certificate": exceptions}}}});
        std::fs::write(profile.join("Default/Preferences"), preferences.to_string()).unwrap();

        let address = free_address();
        let port = address.rsplit(':').next().unwrap().to_string();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .env("HOME", &home)
            .env("TZ", BROWSER_TZ)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("chromedriver.log")).unwrap())
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
                         "--window-size=1400,1000", "--hide-scrollbars", "--no-first-run", "--lang=en-US",
                         format!("--user-data-dir={}", profile.display())],
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

    /// Runs `script` (an async function body) and returns what it resolves to.
    fn eval_async(&self, script: &str) -> Value {
        let wrapped =
            format!("const done = arguments[0]; (async () => {{ {script} }})().then(done, (e) => done(String(e)));");
        self.session_call("POST", "/execute/async", Some(&json!({ "script": wrapped, "args": [] })))
    }

    fn element(&self, css: &str) -> String {
        let found = self.session_call("POST", "/element", Some(&json!({"using": "css selector", "value": css})));
        found.as_object().and_then(|o| o.values().next()).and_then(Value::as_str).expect("element id").to_string()
    }

    /// Clicks the element, as a user would (WebDriver's pointer click).
    fn click(&self, css: &str) {
        let id = self.element(css);
        self.session_call("POST", &format!("/element/{id}/click"), Some(&json!({})));
    }

    fn window(&self, width: u32, height: u32) {
        self.session_call("POST", "/window/rect", Some(&json!({ "width": width, "height": height })));
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
             const $ = (id) => document.getElementById(id);
             const text = (node, sel) => ((node && node.querySelector(sel)) || {}).textContent || '';
             const detail = $('detail');
             return {
               url: location.search,
               updates: Number(document.body.dataset.updates || 0),
               connection: document.body.dataset.connection || '',
               access: document.body.dataset.access || '',
               summary: $('summary').textContent,
               banner: $('banner').hidden ? '' : $('banner').textContent,
               counts: Object.fromEntries(rows('#counts .chip').map(c => [c.dataset.state, Number(c.dataset.count)])),
               attention: rows('#attention-body li').map(li => ({kind: li.dataset.kind, name: li.dataset.name,
                 state: li.dataset.state, reason: text(li, '.reason')})),
               hosts: rows('#hosts-body tr').map(tr => ({name: tr.dataset.name, status: tr.dataset.status,
                 role: tr.dataset.role, text: tr.textContent})),
               vms: rows('#vms-body tr').map(tr => ({name: tr.dataset.name, state: tr.dataset.state,
                 node: tr.dataset.node, reason: text(tr, 'td.reason'), since: text(tr, 'td.since')})),
               events: rows('#events-body li[data-seq]').map(li => ({seq: Number(li.dataset.seq),
                 at: Number(li.querySelector('time').dataset.at), time: li.querySelector('time').textContent,
                 kind: li.dataset.kind, message: text(li, '.message')})),
               count: $('vm-count').textContent,
               detail: detail.hidden ? null : {loaded: detail.dataset.loaded, title: $('detail-title').textContent,
                 text: $('detail-body').textContent,
                 actions: rows('#detail button.act').map(b => ({action: b.dataset.action, disabled: b.disabled,
                   cli: text(b.parentNode, 'code')})),
                 result: $('action-result') && !$('action-result').hidden ? {ok: $('action-result').dataset.ok,
                   text: $('action-result').textContent} : null,
                 log: $('vm-log') ? {loaded: $('vm-log').dataset.loaded, text: $('vm-log').textContent} : null},
               firstRenderMs: Number(document.body.dataset.firstRenderMs || 0),
             };",
        )
    }

    /// Elements that reach past the right edge of the window (nothing may
    /// at phone width), and how wide the document scrolls.
    fn overflow(&self) -> Value {
        self.eval(
            "const w = document.documentElement.clientWidth;
             const out = [];
             for (const e of document.querySelectorAll('body *')) {
               const r = e.getBoundingClientRect();
               if (r.width > 0 && r.right > w + 1) out.push(e.tagName + '#' + e.id + '.' + e.className + ' ' + Math.round(r.right));
             }
             return {width: w, scroll: document.documentElement.scrollWidth, body: document.body.scrollWidth,
               offenders: out.slice(0, 10)};",
        )
    }
}

fn vm<'a>(page: &'a Value, name: &str) -> Option<&'a Value> {
    page["vms"].as_array()?.iter().find(|v| v["name"] == name)
}

fn names(page: &Value) -> Vec<String> {
    page["vms"].as_array().unwrap().iter().filter_map(|v| v["name"].as_str().map(str::to_string)).collect()
}

/// The page's events as `blixard-agent events --json` gives them.
fn page_events(page: &Value) -> BTreeSet<(u64, u64, String, String)> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let text = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (e["seq"].as_u64().unwrap(), e["at"].as_u64().unwrap(), text("kind"), text("message"))
        })
        .collect()
}

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A gRPC client's options for h1, as the admin client alice (mutual TLS).
fn client_options(cluster: &Cluster) -> blixard::api::client::ConnectOptions {
    let pki = cluster.pki();
    let read = |file: &str| std::fs::read(pki.join(file)).unwrap();
    blixard::api::client::ConnectOptions {
        authority: cluster.agents[0].listen.clone(),
        tls: Some(blixard::api::client::TlsOptions {
            ca_pem: read("ca.pem"),
            identity: Some((read("alice.pem"), read("alice.key"))),
            server_name: "127.0.0.1".into(),
        }),
        timeout: Duration::from_secs(60),
    }
}

/// Creates the VMs `vm-{start:05}`..`vm-{end:05}` (end excluded) through
/// the gRPC API, many at a time. None has a runner anywhere, so they stay
/// pending: the cluster records them and the page must list them all.
fn create_range(cluster: &Cluster, start: usize, end: usize) {
    let options = client_options(cluster);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let client = blixard::api::client::Client::connect(options).await.expect("connect");
        let mut tasks = tokio::task::JoinSet::new();
        for i in start..end {
            let client = client.clone();
            tasks.spawn(async move {
                let request = blixard::api::pb::VmCreateRequest {
                    name: format!("vm-{i:05}"),
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
fn the_dashboard_runs_the_cluster_in_a_browser() {
    if !browser_available() {
        return;
    }
    let artifacts = artifacts();
    let mut cluster = Cluster::start();
    let (h1, h2) = (cluster.agents[0].origin.clone(), cluster.agents[1].origin.clone());
    let browser = Browser::start(cluster.dir.path(), &cluster.pki(), &[(&h1, "alice"), (&h2, "carol")]);
    let context = |b: &Browser, c: &Cluster| format!("page: {:#}\n{}", b.page(), c.logs());
    let live = |what: &str, url: &str| {
        browser.goto(url);
        wait_for(
            what,
            || {
                let page = browser.page();
                (page["connection"] == "live" && page["hosts"].as_array()?.len() == 3).then_some(page)
            },
            || context(&browser, &cluster),
        )
    };

    // h1's page, with the admin certificate.
    let page = live("h1's page to be live over HTTPS with three hosts", &format!("{h1}/dashboard"));
    assert_eq!(page["access"], "admin", "{page}");

    // The problems-first summary: counts by state, and reasons at the top.
    cluster.cli(0, &["vm", "create", "web", "--vcpu", "2", "--memory", "512"]).assert_ok();
    cluster.cli(1, &["vm", "create", "db", "--vcpu", "4", "--memory", "2048"]).assert_ok();
    cluster.cli(2, &["vm", "create", "cache", "--vcpu", "1", "--memory", "256", "--stopped"]).assert_ok();
    cluster.cli(0, &["vm", "create", "huge", "--vcpu", "64", "--memory", "512"]).assert_ok();
    cluster.cli(0, &["vm", "create", "crashy", "--vcpu", "1", "--memory", "64"]).assert_ok();
    let page = wait_for(
        "web and db running, huge pending with its reason and crashy failed with its error, at the top",
        || {
            let page = browser.page();
            let state = |name| vm(&page, name).map(|v| v["state"].clone());
            let attention = page["attention"].as_array()?;
            let flagged = |name: &str, state: &str| {
                attention.iter().any(|a| a["name"] == name && a["state"] == state && a["reason"] != "")
            };
            let ok = state("web")? == "running"
                && state("db")? == "running"
                && flagged("huge", "pending")
                && flagged("crashy", "failed")
                && page["counts"]["running"] == 2
                && page["counts"]["pending"] == 2
                && page["counts"]["failed"] == 1;
            ok.then_some(page)
        },
        || context(&browser, &cluster),
    );
    // Problems first in the default order, each with its reason; a VM
    // created stopped is pending by design, not a problem to flag.
    assert_eq!(&names(&page)[..3], ["crashy", "cache", "huge"], "{page}");
    let crashy = vm(&page, "crashy").unwrap();
    assert!(crashy["reason"].as_str().unwrap().contains("exited with status 3"), "the last error: {crashy}");
    assert!(vm(&page, "huge").unwrap()["reason"].as_str().unwrap().contains("vcpu"), "why pending: {page}");
    assert!(!page["attention"].as_array().unwrap().iter().any(|a| a["name"] == "cache"), "{page}");
    assert!(page["summary"].as_str().unwrap().starts_with("3 hosts · 5 VMs · leader h"), "{page}");
    assert!(page["summary"].as_str().unwrap().ends_with(") · 3 voting"), "{page}");
    // Times say their zone (the browser's, not the agents' UTC).
    let time = page["events"][0]["time"].as_str().unwrap();
    assert!(time.ends_with("GMT+9") || time.ends_with("JST"), "a time with its zone: {time:?}");
    browser.screenshot(&artifacts.join("dashboard-overview.png"));

    // The events on the page are the agent's event log: the same events
    // with the same times as `blixard-agent events`, and every member
    // gives an event the same time.
    wait_for(
        "h1's page to show exactly what `blixard-agent events` shows",
        || (page_events(&browser.page()) == cluster.events(0)).then_some(()),
        || format!("page: {:?}\ncli: {:?}", page_events(&browser.page()), cluster.events(0)),
    );
    let by_entry = |i: usize| -> std::collections::BTreeMap<(String, String), u64> {
        cluster.events(i).into_iter().map(|(_, at, kind, message)| ((kind, message), at)).collect()
    };
    let (e1, e2, e3) = (by_entry(0), by_entry(1), by_entry(2));
    let mut shared = 0;
    for (key, at) in &e1 {
        for other in [&e2, &e3] {
            if let Some(other_at) = other.get(key) {
                assert_eq!(at, other_at, "{key:?} has another time on another member");
                shared += 1;
            }
        }
    }
    assert!(shared >= 10, "the members share their events: {e1:?} {e2:?}");
    assert!(e1.keys().any(|(kind, _)| kind == "vm_exited"), "every crash of crashy is an event: {e1:?}");

    // Sorting by a column, kept in the URL.
    browser.click("#vm-table th[data-sort='name']");
    let page = wait_for(
        "the table sorted by name",
        || {
            let page = browser.page();
            let sorted = names(&page) == ["cache", "crashy", "db", "huge", "web"];
            (sorted && page["url"].as_str()?.contains("sort=name&dir=asc")).then_some(page)
        },
        || format!("{:#}", browser.page()),
    );
    assert_eq!(page["vms"].as_array().unwrap().len(), 5);
    browser.click("#vm-table th[data-sort='name']");
    wait_for(
        "the table sorted by name, descending",
        || {
            let page = browser.page();
            let sorted = names(&page) == ["web", "huge", "db", "crashy", "cache"];
            (sorted && page["url"].as_str()?.contains("dir=desc")).then_some(())
        },
        || format!("{:#}", browser.page()),
    );
    // Filters from a link: a state, then a search.
    live("the failed-VMs link", &format!("{h1}/dashboard?state=running&sort=name"));
    wait_for(
        "only the running VMs",
        || (names(&browser.page()) == ["db", "web"]).then_some(()),
        || format!("{:#}", browser.page()),
    );
    assert_eq!(browser.eval("return document.getElementById('state-filter').value"), "running");
    live("a search link", &format!("{h1}/dashboard?q=cra"));
    wait_for(
        "only crashy",
        || (names(&browser.page()) == ["crashy"]).then_some(()),
        || format!("{:#}", browser.page()),
    );
    assert_eq!(browser.eval("return document.getElementById('search').value"), "cra");

    // A VM's detail view: spec, placement history, events, guest log.
    live("web's detail view", &format!("{h1}/dashboard?vm=web"));
    let detail = wait_for(
        "web's detail with its spec, placement, events and log lines",
        || {
            let detail = browser.page()["detail"].clone();
            let text = detail["text"].as_str()?;
            let ok = detail["loaded"] == "vm:web"
                && text.contains("vCPU2")
                && text.contains("512 MiB")
                && text.contains("Placement history")
                && detail["log"]["loaded"] == "true";
            ok.then_some(detail)
        },
        || format!("{:#}", browser.page()),
    );
    assert!(detail["title"].as_str().unwrap().starts_with("VM web"), "{detail}");
    browser.screenshot(&artifacts.join("dashboard-vm-detail.png"));

    // An action with the admin certificate: start cache, from its detail
    // view, which shows the equivalent CLI command.
    live("cache's detail view", &format!("{h1}/dashboard?vm=cache"));
    let detail = wait_for(
        "cache's actions",
        || {
            let detail = browser.page()["detail"].clone();
            (detail["loaded"] == "vm:cache" && detail["actions"].as_array()?.len() == 3).then_some(detail)
        },
        || format!("{:#}", browser.page()),
    );
    let start = detail["actions"].as_array().unwrap().iter().find(|a| a["action"] == "vm_start").unwrap();
    assert_eq!(start["disabled"], false, "{detail}");
    let endpoint = &cluster.agents[0].listen;
    assert_eq!(start["cli"], format!("blixard-agent vm start cache --endpoint {endpoint}"), "{detail}");
    browser.click("#detail button[data-action='vm_start']");
    let result = wait_for(
        "the start to be accepted and cache to run",
        || {
            let page = browser.page();
            let result = page["detail"]["result"].clone();
            (result["ok"] == "true" && vm(&page, "cache")?["state"] == "running").then_some(result)
        },
        || context(&browser, &cluster),
    );
    assert!(result["text"].as_str().unwrap().contains("blixard-agent vm start cache"), "{result}");

    // h2's page, with the read-only certificate: no actions, and one sent
    // anyway is refused.
    let page = live("h2's page, read-only", &format!("{h2}/dashboard?vm=cache"));
    assert_eq!(page["access"], "read-only", "{page}");
    let detail = wait_for(
        "cache's read-only detail",
        || {
            let detail = browser.page()["detail"].clone();
            (detail["loaded"] == "vm:cache").then_some(detail)
        },
        || format!("{:#}", browser.page()),
    );
    assert_eq!(detail["actions"], json!([]), "a read-only certificate sees no actions: {detail}");
    assert!(detail["text"].as_str().unwrap().contains("Read-only: actions need an admin client certificate"));
    let refused = browser.eval_async(
        "const r = await fetch('/api/actions', {method: 'POST', headers: {'Content-Type': 'application/json'},
           body: JSON.stringify({action: 'vm_stop', vm: 'cache'})});
         const body = await r.json();
         return {status: r.status, ok: body.ok, message: body.message};",
    );
    assert_eq!(refused["status"], 403, "{refused}");
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(refused["message"].as_str().unwrap().contains("read-only"), "{refused}");
    let shown = cluster.cli(1, &["vm", "status", "cache", "--json"]).json();
    assert_eq!(shown["desired"], "running", "the refused stop changed nothing: {shown}");
    // h2's page tells the same events as its own `blixard-agent events`.
    wait_for(
        "h2's page to show exactly what h2's `blixard-agent events` shows",
        || (page_events(&browser.page()) == cluster.events(1)).then_some(()),
        || format!("page: {:?}\ncli: {:?}", page_events(&browser.page()), cluster.events(1)),
    );

    // Phone width: nothing reaches past the window, the detail view neither.
    browser.window(390, 844);
    for (what, url) in
        [("the overview", format!("{h1}/dashboard")), ("a detail view", format!("{h1}/dashboard?vm=web"))]
    {
        live(&format!("{what} at phone width"), &url);
        let overflow = browser.overflow();
        assert_eq!(overflow["offenders"], json!([]), "{what} scrolls sideways at phone width: {overflow}");
        assert!(overflow["scroll"].as_u64() <= overflow["width"].as_u64(), "{overflow}");
        if what == "the overview" {
            browser.screenshot(&artifacts.join("dashboard-phone.png"));
        }
    }
    browser.window(1400, 1000);

    // 5,000 VMs: they render (the time goes to BENCHMARKS.md, not here).
    create_range(&cluster, 0, MANY_VMS);
    let total = MANY_VMS + 5;
    let total_text = format!("{},{:03} VMs", total / 1000, total % 1000);
    let page = live("the page with 5,000 more VMs", &format!("{h1}/dashboard"));
    let page = if page["summary"].as_str().unwrap().contains(&total_text) {
        page
    } else {
        wait_for(
            "every VM to be counted",
            || {
                let page = browser.page();
                page["summary"].as_str()?.contains(&total_text).then_some(page)
            },
            || format!("{}", browser.page()["summary"]),
        )
    };
    assert_eq!(page["count"], format!("1–100 of {total_text}"), "one page of rows: {}", page["count"]);
    assert_eq!(page["vms"].as_array().unwrap().len(), 100);
    assert_eq!(page["counts"]["pending"], MANY_VMS as u64 + 1, "{}", page["counts"]);
    eprintln!("first render with {total} VMs: {} ms after navigation started", page["firstRenderMs"]);
    browser.screenshot(&artifacts.join("dashboard-5000-vms.png"));

    // The stale banner: h1 loses its quorum when h2 and h3 stop; its page
    // says so, with the time its view froze.
    cluster.agents[1].stop();
    cluster.agents[2].stop();
    let page = wait_for(
        "h1's page to say it has no quorum and since when",
        || {
            let page = browser.page();
            let banner = page["banner"].as_str()?;
            (banner.starts_with("No quorum: h1 has not reached a majority") && banner.contains("GMT+9")
                || banner.contains("JST"))
            .then_some(page)
        },
        || context(&browser, &cluster),
    );
    assert!(page["banner"].as_str().unwrap().contains("may be stale"), "{page}");
    browser.screenshot(&artifacts.join("dashboard-no-quorum.png"));
}

/// CPU time (user + system) of process `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the agent's /proc stat");
    // Fields after the command's closing parenthesis: utime is the 12th, stime the 13th.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // Linux reports clock ticks of 1/100 s (USER_HZ) on every supported platform.
    Duration::from_millis(ticks * 10)
}

/// Stops and starts `vm-00000` every 500 ms until `stop` is set: a steady
/// trickle of changes for the live stream to carry.
fn churn(cluster: &Cluster, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<u64> {
    let options = client_options(cluster);
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let client = blixard::api::client::Client::connect(options).await.expect("connect");
            let mut changes = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let name = "vm-00000".to_string();
                let _ = if changes % 2 == 0 { client.vm_stop(name).await } else { client.vm_start(name).await };
                changes += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            changes
        })
    })
}

/// Not a test: the dashboard's page-load and live-update benchmark of
/// BENCHMARKS.md (`scripts/bench.sh dashboard`). It prints numbers and
/// asserts none. `BLIXARD_BENCH_DASHBOARD_VMS` (default `1000,10000`) are
/// the cluster sizes, `BLIXARD_BENCH_SECONDS` (default 20) each CPU window.
#[test]
#[ignore = "a benchmark (scripts/bench.sh dashboard), not a test"]
fn bench_dashboard_page_load_and_live_updates() {
    if !browser_available() {
        return;
    }
    let sizes: Vec<usize> = std::env::var("BLIXARD_BENCH_DASHBOARD_VMS")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .map(|n| n.trim().parse().expect("BLIXARD_BENCH_DASHBOARD_VMS: comma-separated counts"))
        .collect();
    let seconds: u64 = std::env::var("BLIXARD_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let cluster = Cluster::start();
    let h1 = cluster.agents[0].origin.clone();
    let pid = cluster.agents[0].child.as_ref().unwrap().id();
    let browser = Browser::start(cluster.dir.path(), &cluster.pki(), &[(&h1, "alice")]);
    println!(
        "| VMs | first render ms (median of 3) | page bytes (HTML + JS + CSS) | stream bytes/s | agent CPU % idle | with 1 browser | per browser |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut made = 0;
    for &n in &sizes {
        create_range(&cluster, made, n);
        made = n;
        let total_text = format!("{n}");
        let mut renders = Vec::new();
        let mut bytes = 0;
        for _ in 0..3 {
            browser.goto(&format!("{h1}/dashboard"));
            let page = wait_for(
                "the page with every VM",
                || {
                    let page = browser.page();
                    let count = page["count"].as_str()?.replace(',', "");
                    count.ends_with(&format!("of {total_text} VMs")).then_some(page)
                },
                || format!("{}", browser.page()["count"]),
            );
            renders.push(page["firstRenderMs"].as_u64().unwrap());
            bytes = browser
                .eval(
                    "return performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))
                       .filter(e => !e.name.includes('/stream')).reduce((n, e) => n + e.encodedBodySize, 0);",
                )
                .as_u64()
                .unwrap();
        }
        renders.sort_unstable();
        let window = |with_page: bool| {
            if with_page {
                browser.goto(&format!("{h1}/dashboard"));
                wait_for("the page to be live", || (browser.page()["connection"] == "live").then_some(()), String::new);
            } else {
                browser.goto("about:blank");
            }
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let churner = churn(&cluster, stop.clone());
            std::thread::sleep(Duration::from_secs(2));
            let streamed = |b: &Browser| {
                if with_page {
                    b.eval("return Number(document.body.dataset.streamBytes || 0)").as_u64().unwrap()
                } else {
                    0
                }
            };
            let (cpu0, bytes0, t0) = (cpu_time(pid), streamed(&browser), Instant::now());
            std::thread::sleep(Duration::from_secs(seconds));
            let (cpu1, bytes1, elapsed) = (cpu_time(pid), streamed(&browser), t0.elapsed());
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            churner.join().unwrap();
            let pct = (cpu1 - cpu0).as_secs_f64() * 100.0 / elapsed.as_secs_f64();
            (pct, (bytes1 - bytes0) as f64 / elapsed.as_secs_f64())
        };
        let (idle, _) = window(false);
        let (watched, rate) = window(true);
        println!("| {n} | {} | {bytes} | {rate:.0} | {idle:.1} | {watched:.1} | {:.1} |", renders[1], watched - idle);
    }
}

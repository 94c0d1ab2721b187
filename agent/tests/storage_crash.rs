//! A real crash test: a child process writes through a `Store` on a real
//! file and is killed with SIGKILL at a random moment, many times over the
//! same file. After every kill the file must reopen and validate, every
//! entry the child acknowledged must be intact, and the state machine must
//! be exactly the one its applied index says (no torn transaction).
//!
//! The parent is `store_survives_sigkill`. The child is `crash_child`: the
//! same test binary started again with `--exact crash_child --ignored`, the
//! database path in `BLIXARD_CRASH_CHILD_DB`. It speaks one line at a time
//! on stdout, each flushed before it goes on:
//!
//! ```text
//! blixard-crash-child: begin <kind>   about to commit a batch (term, append, apply, compact)
//! blixard-crash-child: done <kind>    the commit returned
//! blixard-crash-child: term <t>       its new term is durable
//! blixard-crash-child: acked <n>      an append ending at n is durable
//! ```
//!
//! Every entry's data is a command computed from its index alone, so the
//! parent can rebuild any entry and the state machine at any applied index.
//! An append commits its own entries in the same synced batch, so every
//! acknowledged entry is committed and may never change again. Applies and
//! compactions are synced or not at random: a kill may lose an unsynced one
//! but never tear it.
//!
//! SIGKILL loses no write the kernel accepted, only what the process had not
//! written yet; losing the page cache is the business of `CrashDisk` and
//! `storage_model`. What this test proves is that no moment inside a real
//! redb commit (or open, or repair) leaves a file that will not reopen or
//! lies about what was acknowledged.
//!
//! A failure prints its seed; `BLIXARD_CRASH_SEED=<n>` replays the same
//! kill schedule (the exact moments still depend on the machine).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use blixard::state::{Command, CommandKind, Desired, State, VmSpec, codec};
use blixard::storage::{Store, WriteBatch};
use raft::eraftpb::{Entry, HardState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CHILD_DB_ENV: &str = "BLIXARD_CRASH_CHILD_DB";
const CHILD_SEED_ENV: &str = "BLIXARD_CRASH_CHILD_SEED";
const SEED_ENV: &str = "BLIXARD_CRASH_SEED";
const LINE_PREFIX: &str = "blixard-crash-child: ";

/// Kills, each continuing on the file the previous ones left.
const ROUNDS: u32 = 60;
/// The parent waits for 0..=this many acknowledged appends before a kill...
const ACKS_BEFORE_KILL_MAX: u32 = 12;
/// ...and then a random delay of up to this long.
const KILL_DELAY_US_MAX: u64 = 3_000;
/// Entries per append batch.
const APPEND_ENTRIES_MAX: u64 = 16;
/// Entries per apply batch.
const APPLY_ENTRIES_MAX: u64 = 24;
/// The child compacts when more applied entries than this are in the log,
/// keeping half of them.
const LOG_APPLIED_MAX: u64 = 48;
/// VM names the commands cycle through; small, so commands collide.
const VM_NAMES_MAX: u64 = 23;

/// The command in the entry at `index`.
fn command_at(index: u64) -> Command {
    let name = format!("vm-{}", index * 7 % VM_NAMES_MAX);
    let kind = match index % 4 {
        0 | 1 => CommandKind::CreateVm {
            name,
            spec: VmSpec { vcpu: 1 + (index % 3) as u32, memory_mib: 64 * (1 + index % 5), ..VmSpec::default() },
        },
        2 => {
            CommandKind::SetDesired { name, desired: if index % 8 == 2 { Desired::Stopped } else { Desired::Running } }
        }
        _ => CommandKind::DeleteVm { name },
    };
    Command { at_unix_ms: index, kind }
}

fn data_at(index: u64) -> Vec<u8> {
    codec::encode_command(&command_at(index))
}

// ---------------------------------------------------------------- the child

/// Writes one protocol line; `false` once the parent is gone.
fn say(line: std::fmt::Arguments<'_>) -> bool {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{LINE_PREFIX}{line}").and_then(|()| out.flush()).is_ok()
}

/// Commits `batch`, announcing it; `false` once the parent is gone.
fn commit(store: &mut Store, kind: &str, batch: WriteBatch) -> bool {
    if !say(format_args!("begin {kind}")) {
        return false;
    }
    store.commit(batch).expect("the child's commit");
    say(format_args!("done {kind}"))
}

/// The child's body. Does nothing unless `store_survives_sigkill` started
/// it; it runs until it is killed (or its stdout goes away).
#[test]
#[ignore = "the child process of store_survives_sigkill"]
fn crash_child() {
    let Some(path) = std::env::var_os(CHILD_DB_ENV) else {
        return;
    };
    let seed: u64 = std::env::var(CHILD_SEED_ENV).expect("the parent passes a seed").parse().expect("a numeric seed");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut store = Store::open(Path::new(&path)).expect("the child opens the store");

    // Every incarnation writes in a new term, like a node that won an
    // election after restarting.
    let term = store.hard_state().term + 1;
    let hard_state = HardState { term, vote: 1, commit: store.hard_state().commit, ..Default::default() };
    let batch = WriteBatch { hard_state: Some(hard_state), sync: true, ..WriteBatch::default() };
    if !commit(&mut store, "term", batch) || !say(format_args!("term {term}")) {
        return;
    }

    loop {
        let alive = match rng.random_range(0..10) {
            0..6 => {
                let first = store.last_index() + 1;
                let last = first + rng.random_range(0..APPEND_ENTRIES_MAX);
                let entries = (first..=last)
                    .map(|index| Entry { index, term, data: data_at(index).into(), ..Default::default() })
                    .collect();
                let mut hard_state = store.hard_state().clone();
                hard_state.commit = last;
                let batch = WriteBatch { entries, hard_state: Some(hard_state), sync: true, ..WriteBatch::default() };
                commit(&mut store, "append", batch) && say(format_args!("acked {last}"))
            }
            6..9 => {
                let applied = store.applied();
                let to = store.hard_state().commit.min(applied + rng.random_range(1..=APPLY_ENTRIES_MAX));
                for index in applied + 1..=to {
                    let data = store.entry(index).expect("committed entries are in the log").data.clone();
                    let command = codec::decode_command(&data).expect("the child wrote a command");
                    let _ = store.state_mut().apply(&command);
                }
                let (snapshot_index, _) = store.snapshot_point();
                let compact_to = (to - snapshot_index > LOG_APPLIED_MAX).then(|| to - LOG_APPLIED_MAX / 2);
                let kind = if compact_to.is_some() { "apply+compact" } else { "apply" };
                let batch =
                    WriteBatch { applied: Some(to), compact_to, sync: rng.random_bool(0.5), ..WriteBatch::default() };
                commit(&mut store, kind, batch)
            }
            _ => {
                let (snapshot_index, _) = store.snapshot_point();
                if store.applied() == snapshot_index {
                    continue;
                }
                let batch = WriteBatch {
                    compact_to: Some(rng.random_range(snapshot_index + 1..=store.applied())),
                    sync: rng.random_bool(0.5),
                    ..WriteBatch::default()
                };
                commit(&mut store, "compact", batch)
            }
        };
        if !alive {
            return;
        }
    }
}

// ---------------------------------------------------------------- the parent

/// Kills the child if the parent panics before it does.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one child printed.
#[derive(Debug, Default)]
struct ChildRun {
    term: Option<u64>,
    acked: Option<u64>,
    acks: u32,
    /// The last `begin`/`done` line: where the kill landed.
    last_step: Option<String>,
}

impl ChildRun {
    fn observe(&mut self, line: &str) {
        // libtest prints its own lines around ours.
        let Some(at) = line.find(LINE_PREFIX) else {
            return;
        };
        let message = &line[at + LINE_PREFIX.len()..];
        let (word, arg) = message.split_once(' ').expect("a protocol line has an argument");
        match word {
            "term" => self.term = Some(arg.parse().expect("a term")),
            "acked" => {
                self.acked = Some(arg.parse().expect("an index"));
                self.acks += 1;
            }
            "begin" | "done" => self.last_step = Some(message.to_string()),
            _ => panic!("unknown line from the child: {line:?}"),
        }
    }

    /// Which kind of moment the kill interrupted.
    fn landed(&self) -> String {
        match &self.last_step {
            None => "before the first commit (startup, open, repair)".to_string(),
            Some(step) => match step.strip_prefix("begin ") {
                Some(kind) => format!("during a commit ({kind})"),
                None => "between commits".to_string(),
            },
        }
    }
}

/// Runs a child until `acks_wanted` acknowledgements plus `delay`, then
/// kills it with SIGKILL and collects everything it printed before dying.
fn run_child(db: &Path, stderr_path: &Path, seed: u64, acks_wanted: u32, delay: Duration) -> ChildRun {
    let stderr = File::create(stderr_path).expect("a file for the child's stderr");
    let child = std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args(["crash_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_DB_ENV, db)
        .env(CHILD_SEED_ENV, seed.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("the child starts");
    let mut child = KillOnDrop(child);
    let child_stderr = || std::fs::read_to_string(stderr_path).unwrap_or_default();
    let mut lines = BufReader::new(child.0.stdout.take().expect("piped stdout")).lines();

    let mut run = ChildRun::default();
    while run.acks < acks_wanted {
        match lines.next() {
            Some(Ok(line)) => run.observe(&line),
            _ => panic!("the child stopped on its own; its stderr:\n{}", child_stderr()),
        }
    }
    // The random moment: not a synchronisation.
    std::thread::sleep(delay);
    child.0.kill().expect("SIGKILL the child");
    // Everything it printed before it died was acknowledged.
    for line in lines {
        run.observe(&line.expect("the child's stdout"));
    }
    let status = child.0.wait().expect("reap the child");
    assert_eq!(
        status.signal(),
        Some(9),
        "the child ended otherwise than by our SIGKILL ({status}); its stderr:\n{}",
        child_stderr()
    );
    run
}

/// What the parent knows must be in the file.
#[derive(Default)]
struct Expected {
    /// Term of every entry known to be durable: acknowledged, or found in
    /// the file by an earlier check (which then closed it cleanly).
    terms: BTreeMap<u64, u64>,
    /// The highest acknowledged index.
    acked: u64,
    /// The last index found by the previous check: the next child appends
    /// after it.
    last_index: u64,
    /// Durable progress, which no later kill may undo.
    term: u64,
    applied: u64,
    snapshot_index: u64,
    /// The state machine rebuilt from `command_at`, at `applied`.
    state: State,
}

impl Expected {
    fn learn(&mut self, run: &ChildRun) {
        if let Some(acked) = run.acked {
            let term = run.term.expect("a child acknowledges appends only after its term");
            for index in self.last_index + 1..=acked {
                self.terms.insert(index, term);
            }
            self.acked = acked;
        }
        if let Some(term) = run.term {
            self.term = term;
        }
    }

    /// Reopens the file after a kill and checks it against what is known;
    /// then learns what it holds (durable once this check closes it).
    fn check(&mut self, db: &Path) -> Result<(), String> {
        let store = Store::open(db).map_err(|e| format!("the store does not reopen: {e}"))?;
        store.validate().map_err(|e| format!("validate: {e}"))?;
        let hard_state = store.hard_state().clone();
        let (first, last) = (store.first_index(), store.last_index());
        let (snapshot_index, snapshot_term) = store.snapshot_point();

        if last < self.acked {
            return Err(format!("acknowledged up to {} but the log ends at {last}", self.acked));
        }
        if hard_state.commit != last {
            return Err(format!(
                "commit {} != last index {last}: every append commits its own entries in the same batch",
                hard_state.commit
            ));
        }
        if hard_state.term < self.term {
            return Err(format!("term {} went back below {}", hard_state.term, self.term));
        }
        if store.applied() < self.applied || snapshot_index < self.snapshot_index {
            return Err(format!(
                "durable progress went back: applied {} (was {}), snapshot {snapshot_index} (was {})",
                store.applied(),
                self.applied,
                self.snapshot_index
            ));
        }
        if let Some(&term) = self.terms.get(&snapshot_index)
            && term != snapshot_term
        {
            return Err(format!("snapshot point {snapshot_index} has term {snapshot_term}, not {term}"));
        }
        for (&index, &term) in self.terms.range(first..) {
            let entry = store.entry(index).ok_or_else(|| format!("entry {index} is missing"))?;
            if entry.index != index || entry.term != term || entry.data.as_ref() != data_at(index).as_slice() {
                return Err(format!(
                    "entry {index} changed: found index {} term {} ({} bytes), expected term {term}",
                    entry.index,
                    entry.term,
                    entry.data.len()
                ));
            }
        }

        // The state machine is the one its applied index says.
        for index in self.applied + 1..=store.applied() {
            let _ = self.state.apply(&command_at(index));
        }
        if store.state().vms() != self.state.vms() || store.state().members() != self.state.members() {
            return Err(format!(
                "the state machine is not the one at applied index {}: {} VMs stored, {} expected",
                store.applied(),
                store.state().vms().len(),
                self.state.vms().len()
            ));
        }

        // Learn what is now in the file, checking entries nobody
        // acknowledged (the kill beat the ack) are whole too.
        for index in first..=last {
            let entry = store.entry(index).expect("validated log");
            if entry.data.as_ref() != data_at(index).as_slice() {
                return Err(format!("unacknowledged entry {index} is not the one the child wrote"));
            }
            self.terms.entry(index).or_insert(entry.term);
        }
        self.terms = self.terms.split_off(&snapshot_index);
        self.last_index = last;
        self.term = hard_state.term;
        self.applied = store.applied();
        self.snapshot_index = snapshot_index;
        Ok(())
    }
}

#[test]
fn store_survives_sigkill() {
    let seed = std::env::var(SEED_ENV)
        .ok()
        .map(|s| s.parse().expect("a numeric BLIXARD_CRASH_SEED"))
        .unwrap_or_else(rand::random::<u64>);
    println!("seed {seed} (replay the kill schedule with {SEED_ENV}={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("a temp dir");
    let db = dir.path().join("node.redb");
    let stderr_path = dir.path().join("child-stderr.txt");

    let started = Instant::now();
    let mut expected = Expected::default();
    let mut landed: BTreeMap<String, u32> = BTreeMap::new();
    for round in 0..ROUNDS {
        let acks_wanted = rng.random_range(0..=ACKS_BEFORE_KILL_MAX);
        let delay = Duration::from_micros(rng.random_range(0..=KILL_DELAY_US_MAX));
        let child_seed: u64 = rng.random();
        let run = run_child(&db, &stderr_path, child_seed, acks_wanted, delay);
        *landed.entry(run.landed()).or_default() += 1;
        expected.learn(&run);
        if let Err(e) = expected.check(&db) {
            panic!(
                "seed {seed}, round {round} (killed {delay:?} after ack {acks_wanted}, {}; {} acks in all): {e}",
                run.landed(),
                run.acks
            );
        }
    }
    println!(
        "{ROUNDS} kills in {:?}; log at {}, applied {}, snapshot {}",
        started.elapsed(),
        expected.last_index,
        expected.applied,
        expected.snapshot_index
    );
    for (moment, kills) in &landed {
        println!("  {kills:3} kills landed {moment}");
    }
}

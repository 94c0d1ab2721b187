//! The deterministic cluster simulator.
//!
//! Several real consensus cores (`blixard::consensus::Core` over redb
//! stores on simulated disks) run against a simulated clock and network
//! with delay, loss, reordering, duplication, two-way and one-way
//! partitions, crashes (losing what was not synced), failed syncs in the
//! middle of a Raft `Ready`, membership changes and snapshot transfers,
//! while clients propose commands and linearizable reads throughout. After
//! every step `checker::Checker` verifies: at most one leader per term; a
//! committed entry is never lost or changed (and every leader holds them
//! all); state machines are identical at equal applied index; the state's
//! own invariants (no over-committed host, every placement satisfies its
//! constraints); the storage pointer invariant. After the faults stop,
//! every member must converge.
//!
//! Everything is drawn from one seed. A failure prints its seed; replay it
//! with `BLIXARD_SIM_SEED=<n>` (add `BLIXARD_SIM_VERBOSE=1` for a trace).
//! `BLIXARD_SIM_SEEDS=<count>` and `BLIXARD_SIM_FIRST_SEED=<n>` choose the
//! range for a long run (see README, "Testing").

mod checker;
mod cluster;
mod workload;

use cluster::Sim;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}")))
}

fn run_seed(seed: u64, verbose: bool) -> cluster::Stats {
    let result = std::panic::catch_unwind(|| Sim::new(seed, verbose).run());
    match result {
        Ok(Ok(stats)) => stats,
        Ok(Err(report)) => panic!("{report}"),
        // An assertion inside the code under test: name the seed too.
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(non-text panic)");
            panic!(
                "simulation seed {seed} panicked: {message}\nreplay with: BLIXARD_SIM_SEED={seed} cargo test -p blixard-agent --test sim -- --nocapture"
            )
        }
    }
}

/// Runs `count` seeds from `first`, `shard` of `shards`. The CI budget is
/// 1,000 seeds in all, split over shards so the test runner can use every
/// core.
fn run_range(shard: u64, shards: u64) {
    if let Some(seed) = env_u64("BLIXARD_SIM_SEED") {
        if shard == 0 {
            let stats = run_seed(seed, std::env::var_os("BLIXARD_SIM_VERBOSE").is_some());
            eprintln!("seed {seed}: {stats:?}");
        }
        return;
    }
    let first = env_u64("BLIXARD_SIM_FIRST_SEED").unwrap_or(0);
    let count = env_u64("BLIXARD_SIM_SEEDS").unwrap_or(1000);
    let mut total = cluster::Stats::default();
    let mut ran = 0;
    for seed in (first..first + count).filter(|s| s % shards == shard) {
        let stats = run_seed(seed, false);
        ran += 1;
        total.steps += stats.steps;
        total.proposals += stats.proposals;
        total.max_commit = total.max_commit.max(stats.max_commit);
        total.accepted += stats.accepted;
        total.rejected += stats.rejected;
        total.dropped += stats.dropped;
        total.crashes += stats.crashes;
        total.sync_failures += stats.sync_failures;
        total.snapshots += stats.snapshots;
        total.reads += stats.reads;
        total.joins += stats.joins;
        total.removals += stats.removals;
        total.demotions += stats.demotions;
    }
    eprintln!("shard {shard}/{shards}: {ran} seeds, totals {total:?}");
}

#[test]
fn seeds_shard_0() {
    run_range(0, 4);
}

#[test]
fn seeds_shard_1() {
    run_range(1, 4);
}

#[test]
fn seeds_shard_2() {
    run_range(2, 4);
}

#[test]
fn seeds_shard_3() {
    run_range(3, 4);
}

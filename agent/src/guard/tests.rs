//! The guard's decisions, and a model of the guard under systemd's
//! watchdog: whatever the agent records and however the guard is frozen,
//! killed and restarted, the host fences by the deadline plus the slack.

use proptest::prelude::*;

use super::*;

const FENCE_AFTER: u64 = 1_750;
const SLACK: u64 = 150;
const BUDGET: u64 = 13_000;

fn guard() -> Guard {
    Guard::new(FENCE_AFTER, SLACK, BUDGET)
}

#[test]
fn fresh_contact_sets_the_watchdog_to_the_deadline_plus_the_slack() {
    let mut g = guard();
    let step = g.step(10_000, Ok(9_000));
    assert_eq!(step.verdict, Verdict::Fresh { contact_ms: 9_000, deadline_ms: 10_750 });
    assert!(!step.fence && !step.changed);
    assert_eq!(10_000 + step.watchdog_timeout_ms, 10_750 + SLACK);
    // At the deadline itself still fresh (as failure::Fence), a millisecond later stale.
    assert!(!g.step(10_750, Ok(9_000)).fence);
    let step = g.step(10_751, Ok(9_000));
    assert!(step.fence && step.changed);
    assert_eq!(step.verdict, Verdict::Stale(Stale::Expired { contact_ms: 9_000, age_ms: 1_751 }));
    assert_eq!(step.watchdog_timeout_ms, BUDGET);
    assert!(!g.step(10_800, Ok(9_000)).changed, "one change, not one per check");
    assert!(g.step(10_900, Ok(10_850)).changed, "contact back");
}

#[test]
fn every_kind_of_missing_contact_fences() {
    for why in [
        NoContact::Missing("no such file".into()),
        NoContact::OtherBoot,
        NoContact::Revoked,
        NoContact::InTheFuture { contact_ms: 20_000, now_ms: 10_000 },
    ] {
        let step = guard().step(10_000, Err(why.clone()));
        assert!(step.fence, "{why}");
        assert_eq!(step.verdict, Verdict::Stale(Stale::NoContact(why)));
    }
}

#[test]
fn a_contact_at_u64_max_is_refused_when_read_and_never_overflows() {
    // What a forged confirmation left in fence-contact before: u64::MAX.
    let contact = record::parse_contact(&format!("b {}", u64::MAX), Some("b"), 10_000);
    assert!(guard().step(10_000, contact).fence);
    // Even handed straight in, the arithmetic saturates instead of wrapping.
    assert_eq!(
        judge(Ok(u64::MAX), u64::MAX, FENCE_AFTER),
        Verdict::Fresh { contact_ms: u64::MAX, deadline_ms: u64::MAX }
    );
}

#[test]
fn the_command_line_round_trips_every_setting() {
    let config = GuardConfig {
        data_dir: "/var/lib/blixard".into(),
        state_dir: "/var/lib/microvms".into(),
        runtime: RuntimeKind::Systemd,
        fence_after_ms: 1_750,
        stop_max_ms: 1_000,
        check_interval_ms: 150,
    };
    let args = config.args(true);
    assert_eq!(&args[..2], ["guard", "--fence-if-stale"]);
    let parsed = crate::cli::parse(std::iter::once("blixard-agent".to_string()).chain(args)).unwrap();
    let crate::cli::Command::Guard(guard) = parsed.command else { panic!("not the guard") };
    assert!(guard.fence_if_stale);
    assert_eq!(guard.config(), config);
    assert_eq!(config.period_ms(), 50);
}

proptest! {
    /// Decisions depend only on the current look at the record: a guard
    /// restarted at any point decides exactly as one that ran all along,
    /// and fences exactly when the contact does not count or is too old.
    #[test]
    fn decisions_are_a_function_of_the_current_record(
        looks in prop::collection::vec((0u64..1_000, prop::option::of(0u64..20_000)), 1..60),
    ) {
        let mut long_running = guard();
        let mut now = 5_000;
        for (advance, contact) in looks {
            now += advance;
            let read = contact.map_or(Err(NoContact::Revoked), |c| record::parse_contact(&format!("b {c}"), Some("b"), now));
            let step = long_running.step(now, read.clone());
            let restarted = guard().step(now, read.clone());
            prop_assert_eq!(&step.verdict, &restarted.verdict);
            prop_assert_eq!(step.fence, restarted.fence);
            prop_assert_eq!(step.watchdog_timeout_ms, restarted.watchdog_timeout_ms);
            let counts = matches!(read, Ok(c) if c <= now && now <= c + FENCE_AFTER);
            prop_assert_eq!(step.fence, !counts);
            if !step.fence {
                let c = read.unwrap();
                prop_assert_eq!(now + step.watchdog_timeout_ms, c + FENCE_AFTER + SLACK);
            }
        }
    }

    /// The guard under systemd, modelled: the agent records a contact
    /// every `contact_every` ms until it stops for good; the guard checks
    /// every `period` but may be frozen for a while, or crash; systemd
    /// kills a guard whose watchdog timeout passes, runs the stop-post
    /// (which fences if the contact is stale) and starts a new guard after
    /// `RestartSec`. The host never fences while the contact is fresh, and
    /// has fenced (by the guard or a stop-post) by the last contact plus
    /// `fence_after` plus the slack, whatever the freezes and crashes.
    #[test]
    fn the_host_fences_by_the_deadline_whatever_happens_to_the_guard(
        contact_every in 50u64..1_500,
        agent_stops_at in 2_000u64..20_000,
        freezes in prop::collection::vec((1_000u64..30_000, 1u64..6_000), 0..4),
        crashes in prop::collection::vec(1_000u64..30_000, 0..4),
        period in 10u64..50,
    ) {
        const START: u64 = 1_000;
        const RESTART_SEC: u64 = 100;
        const WATCHDOG_SEC: u64 = 2_000;
        let contact_at = |t: u64| {
            let last = t.min(agent_stops_at);
            last - (last - START) % contact_every
        };
        let last_contact = contact_at(agent_stops_at);
        let mut g = guard();
        let mut watchdog_at = START + WATCHDOG_SEC;
        let mut restart_at: Option<u64> = None;
        let mut fenced_at: Option<u64> = None;
        // A freeze (SIGSTOP) hits the guard process alive when it begins.
        let mut frozen_until = 0;
        let mut next_check = START;
        for t in START..40_000 {
            let stale = !matches!(judge(Ok(contact_at(t)), t, FENCE_AFTER), Verdict::Fresh { .. });
            let mut fence = false;
            if let Some(&(_, len)) = freezes.iter().find(|(from, _)| *from == t) && restart_at.is_none() {
                frozen_until = t + len;
            }
            match restart_at {
                Some(at) if t >= at => {
                    // A new process, nothing carried over; it checks first thing.
                    restart_at = None;
                    g = guard();
                    frozen_until = 0;
                    watchdog_at = t + WATCHDOG_SEC;
                    next_check = t;
                }
                Some(_) => {}
                None if t >= watchdog_at || crashes.contains(&t) => {
                    // Killed (watchdog) or crashed: the stop-post fences if stale.
                    fence = stale;
                    restart_at = Some(t + RESTART_SEC);
                }
                None => {}
            }
            if restart_at.is_none() && t >= next_check && t >= frozen_until {
                let step = g.step(t, Ok(contact_at(t)));
                watchdog_at = t + step.watchdog_timeout_ms;
                fence |= step.fence;
                next_check = t + period;
            }
            if fence {
                prop_assert!(stale, "fenced at {t} with fresh contact {}", contact_at(t));
                fenced_at.get_or_insert(t);
            }
            if contact_every <= FENCE_AFTER && t <= agent_stops_at {
                prop_assert!(fenced_at.is_none(), "fenced at {fenced_at:?} while the agent kept contact");
            }
            if t > last_contact + FENCE_AFTER + SLACK {
                prop_assert!(
                    fenced_at.is_some_and(|at| at <= last_contact + FENCE_AFTER + SLACK),
                    "not fenced by {} (last contact {last_contact}): fenced at {fenced_at:?}",
                    last_contact + FENCE_AFTER + SLACK
                );
            }
        }
    }
}

/// The passes of one fence, as `run` makes them: `(now, found)` for each
/// check at which the contact is stale, `None` for one at which it is fresh.
fn passes_made(runtime: RuntimeKind, checks: &[(u64, Option<Option<usize>>)]) -> Vec<(u64, bool)> {
    let mut passes = Passes::default();
    let mut made = Vec::new();
    for &(now, found) in checks {
        if let Some(pass) = passes.due(found.is_some(), now) {
            made.push((now, pass.thorough));
            passes.done(runtime, now, found.flatten());
        }
    }
    made
}

#[test]
fn only_the_process_runtime_spaces_out_fence_passes_that_find_nothing_after_the_first_second() {
    let (p, s) = (RuntimeKind::Process, RuntimeKind::Systemd);
    // The fence's first second: every check passes, found or not; the
    // first pass is the thorough one.
    let first_second = [(10_000, Some(Some(0))), (10_050, Some(Some(0))), (10_999, Some(Some(0)))];
    assert_eq!(passes_made(p, &first_second), [(10_000, true), (10_050, false), (10_999, false)]);
    // Then a pass that found nothing waits a second; one that found a
    // guest, or could not list them, does not.
    let later = [(10_000, Some(Some(0))), (11_000, Some(Some(0))), (11_050, Some(Some(0))), (12_000, Some(Some(1)))];
    assert_eq!(passes_made(p, &later), [(10_000, true), (11_000, false), (12_000, false)]);
    let found = [(10_000, Some(Some(0))), (11_000, Some(Some(1))), (11_050, Some(None)), (11_100, Some(Some(0)))];
    assert_eq!(passes_made(p, &found), [(10_000, true), (11_000, false), (11_050, false), (11_100, false)]);
    // systemd's guard passes at every check.
    let long = [(10_000, Some(Some(0))), (60_000, Some(Some(0))), (60_050, Some(Some(0)))];
    assert_eq!(passes_made(s, &long), [(10_000, true), (60_000, false), (60_050, false)]);
}

#[test]
fn a_fence_that_begins_again_passes_at_once_and_thoroughly() {
    // A long fence spaced its passes out; contact came back for a moment
    // and went again before the planned pass: the new fence's first check
    // passes, and looks at everything (a guest may have started meanwhile).
    let checks = [(10_000, Some(Some(0))), (11_000, Some(Some(0))), (11_100, None), (11_150, Some(Some(0)))];
    assert_eq!(passes_made(RuntimeKind::Process, &checks), [(10_000, true), (11_000, false), (11_150, true)]);
}

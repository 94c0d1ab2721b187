//! Proves the container test bed gives system tests what they rely on: real systemd and a
//! system bus in every host, a network between hosts that can be cut, microvm.nix's unit
//! starting a guest, and hosts that lose power and come back with their files.
//!
//! Needs root and `tests/testbed/prepare.sh`; fails (never skips) without them unless
//! BLIXARD_TESTBED=skip.

use std::time::{Duration, Instant};

use blixard_systests::testbed::unit_object_path;
use blixard_systests::{Host, Probe, Testbed, guest, wait_for, wait_until};

/// Bound for conditions that hold within about a second on an idle machine.
const SETTLE: Duration = Duration::from_secs(30);

fn ping(from: &Host, to: &Host) -> bool {
    from.exec(&["ping", "-c1", "-W1", &to.addr().to_string()]).is_ok_and(|o| o.status.success())
}

#[test]
fn three_hosts_boot_with_systemd_a_system_bus_and_a_shared_network() {
    let started = Instant::now();
    let Some(bed) = Testbed::start_or_skip(3) else {
        return;
    };
    eprintln!(
        "MEASURE: Testbed::start(3) took {:.2} s, of which booting {:.2} s",
        started.elapsed().as_secs_f64(),
        bed.boot_time().as_secs_f64()
    );

    for host in bed.hosts() {
        let state = host.exec(&["systemctl", "is-system-running"]).unwrap();
        let state = String::from_utf8_lossy(&state.stdout);
        assert!(matches!(state.trim(), "running" | "degraded"), "{}: {state}", host.name());
        // The socket the agent's zbus connection opens, answering as root.
        host.run(&["test", "-S", "/run/dbus/system_bus_socket"]).unwrap();
        let id = host.run(&[
            "busctl",
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "GetId",
        ]);
        assert!(id.unwrap().starts_with("s \""));
        assert_eq!(host.run(&["hostname"]).unwrap().trim(), host.name());
        let addrs = host.run(&["ip", "-4", "-o", "addr", "show", "dev", "host0"]).unwrap();
        assert!(addrs.contains(&format!(" {}/24 ", host.addr())), "{addrs}");
    }
    let machine_ids: std::collections::BTreeSet<String> =
        bed.hosts().iter().map(|h| h.read_file("/etc/machine-id").unwrap()).collect();
    assert_eq!(machine_ids.len(), 3, "every host has its own machine id");

    for from in bed.hosts() {
        for to in bed.hosts() {
            if from.index() != to.index() {
                assert!(ping(from, to), "{} cannot ping {}", from.name(), to.name());
            }
        }
    }
    // Names resolve to the bed's addresses on every host.
    assert!(bed.host(0).run(&["ping", "-c1", "-W1", "h2"]).is_ok());

    // TCP between hosts: a listener on h1 (a unit of h1's systemd), a client on h0.
    let server = bed.host(1);
    server.spawn_unit("tcp-hello", &["sh", "-c", "while true; do echo hello-from-h1 | nc -N -l 7000; done"]).unwrap();
    let target = format!("{}", server.addr());
    let reply = wait_for("a TCP reply from h1:7000", SETTLE, || {
        let out = bed.host(0).exec(&["nc", "-N", "-w", "2", &target, "7000"])?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok(if out.status.success() && !text.is_empty() {
            Probe::Ready(text)
        } else {
            Probe::NotYet(format!("{out:?}"))
        })
    })
    .unwrap();
    assert_eq!(reply, "hello-from-h1");
    // The test process reaches hosts too, from the bridge's address. The listener
    // restarts nc between connections, so a connect can be refused for a moment.
    let greeting = wait_for("a TCP reply from h1:7000 to the test process", SETTLE, || {
        let addr = (server.addr(), 7000).into();
        let mut stream = match std::net::TcpStream::connect_timeout(&addr, SETTLE) {
            Ok(stream) => stream,
            Err(e) => return Ok(Probe::NotYet(e.to_string())),
        };
        let mut greeting = String::new();
        std::io::Read::read_to_string(&mut stream, &mut greeting)?;
        Ok(Probe::Ready(greeting))
    })
    .unwrap();
    assert_eq!(greeting.trim(), "hello-from-h1");

    for host in bed.hosts() {
        eprintln!("MEASURE: {} uses {} KiB of its own on disk", host.name(), host.disk_usage_bytes() / 1024);
    }
}

#[test]
fn microvm_unit_starts_a_fake_guest_over_the_system_bus() {
    let Some(bed) = Testbed::start_or_skip(1) else {
        return;
    };
    let host = bed.host(0);
    host.install_fake_guest("demo").unwrap();
    let unit = guest::unit("demo");
    assert_eq!(host.unit_state(&unit).unwrap(), "inactive");

    // What the agent does, through the same bus socket: Manager.StartUnit.
    let job = host
        .run(&[
            "busctl",
            "call",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "StartUnit",
            "ss",
            &unit,
            "replace",
        ])
        .unwrap();
    assert!(job.starts_with("o \"/org/freedesktop/systemd1/job/"), "{job}");
    host.wait_unit_state(&unit, "active", SETTLE).unwrap();
    assert!(bed.unit_active(0, &unit).unwrap());

    let path = unit_object_path(&unit);
    assert_eq!(path, "/org/freedesktop/systemd1/unit/microvm_40demo_2eservice");
    let got = host
        .run(&[
            "busctl",
            "call",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "GetUnit",
            "s",
            &unit,
        ])
        .unwrap();
    assert_eq!(got.trim(), format!("o \"{path}\""));
    assert_eq!(host.unit_state_dbus(&unit).unwrap(), "active");

    // The runner really runs, as microvm:kvm, and microvm-set-booted did its part.
    wait_until("the fake guest to log its start", SETTLE, || Ok(host.fake_guest_log("demo")?.len() == 1)).unwrap();
    let user = host.sh("ps -o user= -p $(systemctl show -p MainPID --value microvm@demo.service)").unwrap();
    assert_eq!(user.trim(), "microvm");
    assert!(host.path("/var/lib/microvms/demo/booted").is_symlink());
    assert!(bed.journal(0, &unit).unwrap().contains("Started microvm@demo.service"));

    // StopUnit runs microvm-shutdown and the unit stays down despite Restart=always.
    host.run(&[
        "busctl",
        "call",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "StopUnit",
        "ss",
        &unit,
        "replace",
    ])
    .unwrap();
    host.wait_unit_state(&unit, "inactive", SETTLE).unwrap();
    let log = host.fake_guest_log("demo").unwrap();
    assert!(log.last().unwrap().starts_with("shutdown"), "{log:?}");
}

#[test]
fn cut_link_partitions_a_host_and_heal_link_rejoins_it() {
    let Some(bed) = Testbed::start_or_skip(3) else {
        return;
    };
    let (h0, h1, h2) = (bed.host(0), bed.host(1), bed.host(2));
    assert!(ping(h0, h1));

    bed.cut_link(1).unwrap();
    assert!(!ping(h0, h1), "h1 still reachable from h0 after cut_link");
    assert!(!ping(h1, h2), "h2 still reachable from h1 after cut_link");
    assert!(ping(h0, h2), "the rest of the cluster must still talk");
    // Inside, nothing changed: the address stays, as when a switch port dies.
    assert!(h1.run(&["ip", "-4", "-o", "addr", "show", "dev", "host0"]).unwrap().contains(&h1.addr().to_string()));

    bed.heal_link(1).unwrap();
    wait_until("h0 to reach h1 again", SETTLE, || Ok(ping(h0, h1))).unwrap();
    // Each pair learns again on its own (h1's neighbour entry for h2 may have
    // failed while cut): one lost ping is no verdict.
    wait_until("h1 to reach h2 again", SETTLE, || Ok(ping(h1, h2))).unwrap();
}

#[test]
fn a_host_that_loses_power_comes_back_with_its_files() {
    let Some(bed) = Testbed::start_or_skip(2) else {
        return;
    };
    let (h0, h1) = (bed.host(0), bed.host(1));
    h1.write_file("/var/lib/blixard/marker", "before the power cut\n", 0o644).unwrap();
    h1.install_fake_guest("demo").unwrap();
    h1.run(&["systemctl", "start", "microvm@demo.service"]).unwrap();
    h1.wait_unit_state("microvm@demo.service", "active", SETTLE).unwrap();
    let machine_id = h1.read_file("/etc/machine-id").unwrap();
    let boot_id_before = h1.read_file_inside("/proc/sys/kernel/random/boot_id");

    let started = Instant::now();
    bed.power_off(1).unwrap();
    eprintln!("MEASURE: power_off took {:.3} s", started.elapsed().as_secs_f64());
    assert!(!h1.is_running());
    assert!(h1.exec(&["true"]).is_err(), "a powered-off host runs nothing");
    assert!(!ping(h0, h1));
    assert!(h1.cut_link().is_err(), "no link while powered off");
    // Its journal is still readable from outside, like a disk pulled from a dead host.
    assert!(h1.journal("microvm@demo.service").unwrap().contains("Started microvm@demo.service"));

    let started = Instant::now();
    bed.boot(1).unwrap();
    eprintln!("MEASURE: boot after power_off took {:.3} s", started.elapsed().as_secs_f64());
    assert_eq!(h1.read_file("/var/lib/blixard/marker").unwrap(), "before the power cut\n");
    assert_eq!(h1.read_file("/etc/machine-id").unwrap(), machine_id);
    assert_ne!(h1.read_file_inside("/proc/sys/kernel/random/boot_id"), boot_id_before);
    // The guest did not autostart (only the agent starts guests), but can start again.
    assert_eq!(h1.unit_state("microvm@demo.service").unwrap(), "inactive");
    h1.run(&["systemctl", "start", "microvm@demo.service"]).unwrap();
    h1.wait_unit_state("microvm@demo.service", "active", SETTLE).unwrap();
    wait_until("h0 to reach h1 after its boot", SETTLE, || Ok(ping(h0, h1))).unwrap();
}

trait ReadInside {
    fn read_file_inside(&self, path: &str) -> String;
}

impl ReadInside for Host {
    /// Reads a file through the host's own view (for /proc and /run, which the test
    /// process cannot see through root()).
    fn read_file_inside(&self, path: &str) -> String {
        self.run(&["cat", path]).unwrap()
    }
}

#[test]
fn beds_run_side_by_side_and_drop_removes_everything() {
    let Some(a) = Testbed::start_or_skip(1) else {
        return;
    };
    let b = Testbed::start(1).unwrap();
    assert_ne!(a.bridge(), b.bridge());
    assert_ne!(a.host(0).addr(), b.host(0).addr());
    // Separate cgroups: each host's systemd sees only its own units.
    let a_units = a.host(0).run(&["systemctl", "list-units", "--plain", "--no-legend", "*.scope"]).unwrap();
    assert!(!a_units.contains(b.host(0).machine_name()), "{a_units}");
    // Separate bridges: no path from one bed to the other.
    assert!(!ping(a.host(0), b.host(0)));

    let (bridge, dir, veth) = (b.bridge().to_owned(), b.dir().to_owned(), b.host(0).veth());
    let root = b.host(0).root().to_owned();
    drop(b);
    assert!(!std::path::Path::new("/sys/class/net").join(&bridge).exists(), "bridge {bridge} left behind");
    assert!(!std::path::Path::new("/sys/class/net").join(&veth).exists(), "veth {veth} left behind");
    assert!(!dir.exists(), "{} left behind", dir.display());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(root.to_str().unwrap()), "overlay still mounted");
    assert!(a.host(0).exec(&["true"]).unwrap().status.success(), "the other bed is untouched");
}

#[test]
fn the_agent_binary_runs_inside_a_host() {
    let Some(bed) = Testbed::start_or_skip(1) else {
        return;
    };
    let host = bed.host(0);
    host.install_agent(&blixard_systests::agent_binary().unwrap()).unwrap();
    let libs = host.run(&["ldd", blixard_systests::testbed::AGENT_PATH]).unwrap();
    assert!(!libs.contains("not found"), "{libs}");
    host.run(&[blixard_systests::testbed::AGENT_PATH, "--help"]).unwrap();
}

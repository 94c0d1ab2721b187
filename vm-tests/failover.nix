# Three hosts form a cluster from the module alone; a declared VM runs on
# exactly one of them; crashing that host starts it on another.
{ self, lib }:

let
  common = import ./common.nix { inherit self lib; };
  member = {
    imports = [ common.founder ];
    services.blixard.vms.web = common.vm;
  };
in
{
  name = "blixard-failover";
  meta.timeout = 3600;

  nodes = {
    h1 = member;
    h2 = member;
    h3 = member;
  };

  testScript = common.python + ''
    hosts = [h1, h2, h3]

    start_all()
    for host in hosts:
        host.wait_for_unit("blixard.service")

    with subtest("three hosts form a cluster from the module alone"):
        wait_for_cluster(hosts, 3)
        h1.wait_for_open_port(9464)

    with subtest("every host has the runner installed"):
        for host in hosts:
            host.succeed("test -x /var/lib/microvms/web/current/bin/microvm-run")

    with subtest("the VM runs on exactly one host"):
        owner = wait_runs_once(hosts, "web")
        wait_guest_booted(owner, "web")
        assert_stays_on(hosts, "web", owner)

    with subtest("crashing that host starts the VM on another"):
        owner.crash()
        survivors = [host for host in hosts if host is not owner]
        new_owner = wait_runs_once(survivors, "web", timeout=300)
        wait_guest_booted(new_owner, "web")
        for host in survivors:
            host.wait_until_succeeds(
                "blixard-agent cluster status --json"
                f" | jq -e '.members[] | select(.name == \"{owner.name}\") | .healthy == false'",
                timeout=60,
            )

    with subtest("the crashed host returns as the same member and starts no second copy"):
        owner.start()
        owner.wait_for_unit("blixard.service")
        wait_for_cluster(hosts, 3)
        assert_stays_on(hosts, "web", new_owner)
  '';
}

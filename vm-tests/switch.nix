# Switching every host to a configuration that declares one more VM
# (`switch-to-configuration test` into a specialisation) makes it run, once.
{ self, lib }:

let
  common = import ./common.nix { inherit self lib; };
  member = {
    imports = [ common.founder ];
    services.blixard.vms.web = common.vm;
    specialisation.extra-vm.configuration = {
      services.blixard.vms.extra = common.vm;
    };
  };
in
{
  name = "blixard-switch";
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
    wait_for_cluster(hosts, 3)
    wait_guest_booted(wait_runs_once(hosts, "web"), "web")
    for host in hosts:
        host.fail("test -e /var/lib/microvms/extra")

    with subtest("switching to a configuration that adds a VM makes it run"):
        for host in hosts:
            host.succeed("/run/booted-system/specialisation/extra-vm/bin/switch-to-configuration test")
        for host in hosts:
            host.wait_until_succeeds("test -x /var/lib/microvms/extra/current/bin/microvm-run")
        wait_guest_booted(wait_runs_once(hosts, "extra"), "extra")
        h1.wait_until_succeeds(
            "blixard-agent vm list --json | jq -e 'map(.name) | sort == [\"extra\", \"web\"]'"
        )

    with subtest("the agents' restarts left exactly one copy of the first VM"):
        wait_runs_once(hosts, "web")
  '';
}

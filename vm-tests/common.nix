# Shared pieces of the NixOS VM tests: cluster hosts, a tiny guest, and the
# Python helpers every test script starts with.
{ self, lib }:

let
  port = 7000;
in
rec {
  # `address:port` of a test node. The test driver gives node N (in sorted
  # name order) the static address 192.168.1.N on vlan 1; h1..h4 get .1..4.
  endpoint = node: "${node.networking.primaryIPAddress}:${toString port}";

  # A tiny guest that says on its serial console when it has booted: the
  # tests wait for that line in its host's journal (microvm@NAME.service
  # logs qemu's stdout, which is the guest's ttyS0), not just for the
  # hypervisor process.
  #
  # QEMU: `qemu_test` (host CPU only, built for NixOS tests, so it is in the
  # binary cache; microvm.nix's closure-size override maps it to itself).
  # `cpu = "max"` keeps microvm.nix from passing -enable-kvm: with
  # accel=kvm:tcg, qemu uses KVM where the test VM offers nested
  # virtualisation and falls back to TCG where it does not (slower, so the
  # tests' timeouts allow for it).
  guest =
    { lib, pkgs, ... }:
    {
      microvm = {
        hypervisor = "qemu";
        cpu = "max";
        qemu.package = pkgs.qemu_test;
        # The host's store over 9p: no store image to build per guest.
        shares = [
          {
            tag = "ro-store";
            source = "/nix/store";
            mountPoint = "/nix/.ro-store";
            proto = "9p";
          }
        ];
      };
      systemd.services.blixard-marker = {
        description = "Tell the host that this guest has booted";
        wantedBy = [ "multi-user.target" ];
        serviceConfig = {
          Type = "oneshot";
          StandardOutput = "tty";
          TTYPath = "/dev/ttyS0";
        };
        script = "echo \"${marker} $(cat /proc/sys/kernel/hostname)\"";
      };
      documentation.enable = false;
      system.stateVersion = lib.trivial.release;
    };

  # What a booted guest prints on its console, followed by its host name.
  marker = "BLIXARD-GUEST-BOOTED";

  # A declared blixard guest, sized here (the module sets microvm.vcpu/mem).
  vm = {
    config = guest;
    vcpu = 1;
    memory = 384;
  };

  # The VM tests' cluster secret: a fixed test value, public in this
  # repository, written to a runtime path at boot. A real cluster's secret
  # comes from `blixard-agent cluster new-secret` through agenix or sops-nix
  # and never enters the Nix store.
  testSecret = "blxsec_3cb4d585ef2b1b5923bfe591061c997ff204e5df8c22947527eaeec43862e9c0";
  secretPath = "/run/blixard-test/cluster-secret";

  # A host of the cluster, configured by the module alone, holding the
  # cluster secret (members authenticate each other with it).
  host = { config, pkgs, ... }: {
    imports = [ self.nixosModules.default ];
    virtualisation = {
      # Room for a guest (384 MiB) on every host, and for the failover test's
      # survivors to run the crashed host's guest.
      memorySize = 2048;
      # One for the agent and the host, one for the guest's vCPU (TCG runs a
      # vCPU as a busy thread).
      cores = 3;
    };
    environment.systemPackages = [ pkgs.jq ];
    # Before any service starts (systemd-tmpfiles-setup is part of sysinit).
    systemd.tmpfiles.rules = [
      "d /run/blixard-test 0700 root root -"
      "f ${secretPath} 0600 root root - ${testSecret}"
    ];
    services.blixard = {
      enable = true;
      clusterSecretFile = secretPath;
      listenAddress = config.networking.primaryIPAddress;
      inherit port;
      openFirewall = true;
      # Fixed, so that placement does not depend on what the test VM detects.
      capacity = {
        vcpu = 4;
        memory = 4096;
      };
      metricsListenAddress = "127.0.0.1:9464";
      # Relaxed for test VMs that share a loaded builder (the defaults aim at
      # 5 s failover on real hosts): a starved VM must not look dead, nor fence.
      settings.timing = {
        node_down_after_ms = 5000;
        fence_after_ms = 5000;
        stop_max_ms = 2000;
        reschedule_after_ms = 8000;
      };
    };
  };

  # h1, h2 and h3 bootstrap the cluster from the same initialMembers.
  founder = { nodes, ... }: {
    imports = [ host ];
    services.blixard.initialMembers = lib.genAttrs [ "h1" "h2" "h3" ] (name: endpoint nodes.${name});
  };

  # A standalone host (no test driver) for the evaluation check.
  exampleHost = { lib, ... }: {
    imports = [ self.nixosModules.default ];
    boot.loader.grub.enable = false;
    fileSystems."/" = {
      device = "/dev/vda";
      fsType = "ext4";
    };
    system.stateVersion = lib.trivial.release;
    networking.hostName = "h1";
    services.blixard = {
      enable = true;
      listenAddress = "10.0.0.1";
      clusterSecretFile = "/run/agenix/blixard-cluster-secret";
      openFirewall = true;
      initialMembers = {
        h1 = "10.0.0.1:7000";
        h2 = "10.0.0.2:7000";
        h3 = "10.0.0.3:7000";
      };
      vms.web = vm // {
        labels.tier = "web";
      };
    };
  };

  python = ''
    import json
    import time


    def cluster_status(machine):
        return json.loads(machine.succeed("blixard-agent cluster status --json"))


    def wait_for_cluster(machines, size):
        """Wait until every machine sees `size` healthy voters and a leader."""
        check = (
            "blixard-agent cluster status --json | jq -e '"
            f"(.members | length) == {size}"
            ' and all(.members[]; .healthy and .role != "learner")'
            " and .leader != null'"
        )
        for machine in machines:
            machine.wait_until_succeeds(check, timeout=180)
        leaders = {cluster_status(machine)["leader"] for machine in machines}
        assert len(leaders) == 1, f"the hosts disagree on the leader: {leaders}"


    def running_on(machines, vm):
        """The machines on which microvm@VM.service is active."""
        return [
            machine
            for machine in machines
            if machine.execute(f"systemctl is-active --quiet microvm@{vm}.service")[0] == 0
        ]


    def wait_guest_booted(machine, vm, timeout=900):
        """Wait until guest `vm` has said on its serial console, which its host's
        journal keeps for microvm@VM.service, that it booted on `machine`."""
        machine.wait_until_succeeds(
            f"journalctl --boot --unit microvm@{vm}.service --output cat"
            f" | grep -q '${marker} {vm}'",
            timeout=timeout,
        )


    def wait_runs_once(machines, vm, timeout=300):
        """Wait until VM runs on exactly one of the machines, and the cluster agrees."""
        found = []

        def check(_last_try):
            found[:] = running_on(machines, vm)
            return len(found) == 1

        retry(check, timeout)
        owner = found[0]
        owner.wait_until_succeeds(
            f"blixard-agent vm status {vm} --json"
            f" | jq -e '.node == \"{owner.name}\" and .state == \"running\"'",
            timeout=60,
        )
        return owner


    def assert_stays_on(machines, vm, owner, seconds=10):
        """For a while, VM runs on `owner` and nowhere else."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            where = [machine.name for machine in running_on(machines, vm)]
            assert where == [owner.name], f"{vm} runs on {where}, expected only on {owner.name}"
            time.sleep(1)


  '';
}

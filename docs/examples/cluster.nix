# The three-host cluster of docs/nixos.md: what every host shares, and what each
# founder adds. tests/nix/eval.nix evaluates exactly this file.
{ lib }:

rec {
  founders = {
    h1 = "10.0.0.1";
    h2 = "10.0.0.2";
    h3 = "10.0.0.3";
  };

  # What every host of the cluster shares.
  cluster = {
    services.blixard = {
      enable = true;
      clusterSecretFile = "/run/agenix/blixard-cluster-secret"; # `cluster new-secret`, deployed by agenix
      openFirewall = true; # TCP 7000: peers and clients; UDP 7000: peers' datagrams
      vms.web = {
        config = ./guests/web.nix; # a NixOS module, as microvm.vms.<name>.config
        vcpu = 2;
        memory = 1024; # MiB
      };
    };
  };

  # A founder: its own name and address, and the same initialMembers as the others.
  founder = name: address: {
    networking.hostName = name; # the node name
    services.blixard = {
      listenAddress = address; # peers reach this host here
      initialMembers = lib.mapAttrs (_: ip: "${ip}:7000") founders;
    };
  };
}

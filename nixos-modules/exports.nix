# The flake's nixosModules, as a function of what they need from the flake, so
# that tests/nix/eval.nix evaluates exactly what the flake exports.
#
#   microvm     microvm.nix's flake (only `nixosModules.host` is used)
#   packageFor  pkgs -> the blixard-agent package for that package set
{ microvm, packageFor }:

rec {
  # services.blixard alone, for a configuration that imports microvm.nix's
  # host module itself.
  blixard =
    { lib, pkgs, ... }:
    {
      key = "blixard#nixosModules.blixard";
      imports = [ ./blixard.nix ];
      services.blixard.package = lib.mkDefault (packageFor pkgs);
    };

  # services.blixard with microvm.nix's host module. Importing it changes
  # nothing on the host: microvm.nix's host side (its user, the
  # qemu-bridge-helper wrapper, /etc/qemu/bridge.conf, KSM, kernel modules)
  # follows services.blixard.enable unless microvm.host.enable is set. A
  # configuration that also imports microvm.nixosModules.host gets one copy
  # when blixard's `microvm` input follows its own (the same path is imported
  # once).
  default =
    { config, lib, ... }:
    {
      key = "blixard#nixosModules.default";
      imports = [
        microvm.nixosModules.host
        blixard
      ];
      microvm.host.enable = lib.mkDefault config.services.blixard.enable;
    };
}

# The NixOS options of a guest that microvm.nix's guest option module and host
# module read, for ./nixpkgs/nixos/lib/eval-config.nix. Anything else a guest
# module sets at the top level (services, users, ...) is taken as it is.
{ lib, config, ... }:

let
  inherit (lib) mkOption types;
  fake = name: {
    type = "derivation";
    inherit name;
    outPath = "${builtins.storeDir}/00000000000000000000000000000000-${name}";
  };
in
{
  freeformType = types.lazyAttrsOf types.anything;

  options = {
    networking.hostName = mkOption { type = types.str; };
    system.stateVersion = mkOption { type = types.str; };
    system.build = mkOption {
      type = types.lazyAttrsOf types.unspecified;
      default = { };
    };
    system.boot.loader.initrdFile = mkOption {
      type = types.str;
      default = "initrd";
    };
    boot.kernelPackages = mkOption {
      type = types.unspecified;
      default.kernel = fake "linux" // {
        version = "6.12.0";
      };
    };
  };

  config = {
    system.build = {
      toplevel = fake "nixos-system-${config.networking.hostName}";
      initialRamdisk = fake "initrd";
    };
    # What nixpkgs would build for each hypervisor: microvm.nix's host module
    # links `current` to the declared one and reads its passthru.
    microvm.runner =
      lib.genAttrs
        [
          "qemu"
          "cloud-hypervisor"
          "firecracker"
          "crosvm"
          "kvmtool"
          "stratovirt"
          "alioth"
        ]
        (
          hypervisor:
          fake "microvm-${hypervisor}-${config.networking.hostName}"
          // {
            supportsNotifySocket = false;
            registerWithMachined = false;
          }
        );
  };
}

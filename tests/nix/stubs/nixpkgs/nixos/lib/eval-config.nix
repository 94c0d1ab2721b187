# Stands in for nixpkgs' nixos/lib/eval-config.nix where microvm.nix's host
# module evaluates a guest (the type of `microvm.vms.<name>.config` imports
# "${nixpkgs}/nixos/lib/eval-config.nix"; tests/nix/stubs makes `pkgs.path`
# this directory). It evaluates the guest's modules with lib.evalModules next to
# microvm.nix's real guest option module and ../../../guest.nix, with the
# arguments microvm.nix passes, as NixOS would.
{
  modules,
  pkgs,
  prefix ? [ ],
  specialArgs ? { },
  extraModules ? [ ],
  system ? null,
}:

let
  inherit (pkgs) lib;

  # microvm.nix passes its whole guest module (nixos-modules/microvm). Only its
  # option declarations are evaluated: the rest sets NixOS options of a real
  # guest (boot, fileSystems, systemd...) that ../../../guest.nix does not stub.
  optionsOnly =
    module:
    if
      (lib.isPath module || lib.isString module)
      && lib.hasSuffix "/nixos-modules/microvm" (toString module)
    then
      /. + "${toString module}/options.nix"
    else
      module;
in
lib.evalModules {
  inherit prefix;
  specialArgs = {
    inherit system;
  }
  // specialArgs;
  modules =
    map optionsOnly modules
    ++ extraModules
    ++ [
      ../../../guest.nix
      { _module.args.pkgs = pkgs; }
    ];
}

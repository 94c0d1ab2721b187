# The NixOS VM tests, one runNixOSTest each; the flake exposes them as checks.
{ pkgs, self }:

let
  inherit (pkgs) lib;
  run = file: pkgs.testers.runNixOSTest (import file { inherit self lib; });
in
{
  blixard-failover = run ./failover.nix;
  blixard-join = run ./join.nix;
  blixard-switch = run ./switch.nix;
}

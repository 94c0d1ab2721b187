{ lib, ... }:
{
  microvm = {
    hypervisor = "qemu";
    # Share the host's /nix/store instead of building a store image.
    shares = [
      {
        tag = "ro-store";
        source = "/nix/store";
        mountPoint = "/nix/.ro-store";
        proto = "9p";
      }
    ];
    # Networking: add microvm.interfaces (tap, macvtap, bridge) as usual.
  };
  services.nginx.enable = true;
  system.stateVersion = lib.trivial.release;
}

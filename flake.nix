{
  description = "Blixard: microVMs placed and run across a cluster of NixOS hosts";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    microvm = {
      url = "github:microvm-nix/microvm.nix";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs =
    {
      self,
      nixpkgs,
      microvm,
    }:
    let
      inherit (nixpkgs) lib;

      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});

      workspace = (lib.importTOML ./Cargo.toml).workspace.package;

      # The agent, for callPackage.
      blixardAgent =
        {
          lib,
          stdenv,
          rustPlatform,
          installShellFiles,
        }:
        rustPlatform.buildRustPackage {
          pname = "blixard-agent";
          inherit (workspace) version;

          # Only the Rust workspace: editing Nix files or docs rebuilds nothing.
          src = lib.fileset.toSource {
            root = ./.;
            fileset = lib.fileset.unions [
              ./Cargo.toml
              ./Cargo.lock
              ./agent
              (lib.fileset.difference ./tests ./tests/nix)
            ];
          };
          cargoLock.lockFile = ./Cargo.lock;

          # The system-test crate needs several hosts; the agent's own tests
          # run here and skip those that need root or missing prerequisites.
          cargoBuildFlags = [
            "--package"
            "blixard-agent"
          ];
          cargoTestFlags = [
            "--package"
            "blixard-agent"
          ];
          doCheck = true;

          nativeBuildInputs = [ installShellFiles ];
          postInstall = lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
            installShellCompletion --cmd blixard-agent \
              --bash <($out/bin/blixard-agent completions bash) \
              --zsh <($out/bin/blixard-agent completions zsh) \
              --fish <($out/bin/blixard-agent completions fish)
            mkdir -p man
            $out/bin/blixard-agent man man
            installManPage man/*
          '';

          meta = {
            description = "Blixard host agent: Raft-replicated placement of microvm.nix guests";
            license = with lib.licenses; [
              mit
              asl20
            ];
            platforms = lib.platforms.linux;
            mainProgram = "blixard-agent";
          };
        };

      vmTests =
        system:
        import ./vm-tests {
          inherit self;
          pkgs = nixpkgs.legacyPackages.${system};
        };
    in
    {
      overlays.default = final: _prev: {
        blixard-agent = final.callPackage blixardAgent { };
      };

      packages = forAllSystems (
        _system: pkgs:
        let
          blixard-agent = pkgs.callPackage blixardAgent { };
        in
        {
          inherit blixard-agent;
          default = blixard-agent;
        }
      );

      nixosModules = {
        # services.blixard plus microvm.nix's host module, with the package
        # from this flake (built against this flake's nixpkgs).
        blixard = { lib, pkgs, ... }: {
          key = "blixard#nixosModules.blixard";
          imports = [
            microvm.nixosModules.host
            ./nixos-modules/blixard.nix
          ];
          services.blixard.package =
            lib.mkDefault
              self.packages.${pkgs.stdenv.hostPlatform.system}.blixard-agent;
        };
        default = self.nixosModules.blixard;
      };

      checks = forAllSystems (
        system: pkgs:
        let
          evalTests = import ./tests/nix/eval.nix { inherit lib; };
          exampleHost = lib.nixosSystem {
            modules = [
              (import ./vm-tests/common.nix { inherit self lib; }).exampleHost
              { nixpkgs.hostPlatform = system; }
            ];
          };
        in
        vmTests system
        // {
          package = self.packages.${system}.blixard-agent;

          # The evaluation tests of tests/nix/eval.nix, against the pinned lib.
          module-eval =
            if evalTests.failures == [ ] then
              pkgs.runCommand "blixard-module-eval" { } ''
                echo "${toString evalTests.total} passed, 0 failed" | tee $out
              ''
            else
              throw "module evaluation tests failed: ${builtins.toJSON evalTests.failures}";

          # A whole NixOS host with the module and a guest evaluates (all
          # assertions hold, every unit renders); nothing is built.
          nixos-eval = pkgs.writeText "blixard-nixos-eval" (
            builtins.unsafeDiscardStringContext exampleHost.config.system.build.toplevel.drvPath
          );
        }
      );

      devShells = forAllSystems (
        system: pkgs: {
          default = pkgs.mkShell {
            inputsFrom = [ self.packages.${system}.blixard-agent ];
            packages = with pkgs; [
              clippy
              rustfmt
              rust-analyzer
              nixpkgs-fmt
              statix
              deadnix
              jq
            ];
          };
        }
      );

      formatter = forAllSystems (_system: pkgs: pkgs.nixpkgs-fmt);
    };
}

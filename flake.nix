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

          cargoBuildFlags = [
            "--package"
            "blixard-agent"
          ];
          # The check phase of a package every deploying host may build: only
          # the agent's unit tests (fast, hermetic: no other process, no
          # network beyond loopback, no root), in the dev profile (incremental
          # off, dependencies at opt-level 1) instead of the fat-LTO release
          # profile. The multi-agent cluster tests are `checks.cluster-tests`.
          checkType = "debug";
          cargoTestFlags = [
            "--package"
            "blixard-agent"
            "--lib"
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

      # The agent's integration tests: several agent processes per test on
      # loopback (cluster formation, failover, TLS, storage crashes, the
      # simulator). Those that need root, a system bus or a browser skip
      # themselves in the build sandbox. Built in the `ci` profile (optimised,
      # debug assertions on, no LTO); installs nothing.
      clusterTests =
        package:
        package.overrideAttrs (_old: {
          pname = "blixard-agent-cluster-tests";
          cargoBuildType = "ci";
          cargoCheckType = "ci";
          cargoTestFlags = [
            "--package"
            "blixard-agent"
            "--tests"
          ];
          # Fewer simulator seeds than scripts/test.sh: a check, not the soak.
          BLIXARD_SIM_SEEDS = "200";
          installPhase = ''
            runHook preInstall
            touch $out
            runHook postInstall
          '';
          postInstall = "";
        });

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

      # `blixard`: services.blixard alone, for a configuration that imports
      # microvm.nix's host module itself. `default`: services.blixard with
      # microvm.nix's host module (whose host side follows
      # services.blixard.enable). Both default the package to this flake's
      # (built against this flake's nixpkgs, or yours with `follows`).
      nixosModules = import ./nixos-modules/exports.nix {
        inherit microvm;
        packageFor = pkgs: self.packages.${pkgs.stdenv.hostPlatform.system}.blixard-agent;
      };

      checks = forAllSystems (
        system: pkgs:
        let
          evalTests = import ./tests/nix/eval.nix {
            inherit lib;
            microvm = microvm.outPath;
          };
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

          cluster-tests = clusterTests self.packages.${system}.blixard-agent;

          # The evaluation tests of tests/nix/eval.nix, against the pinned lib
          # and microvm.nix.
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
              nixfmt
              statix
              deadnix
              jq
            ];
          };
        }
      );

      # nixfmt: the RFC 166 style nixpkgs uses.
      formatter = forAllSystems (_system: pkgs: pkgs.nixfmt);
    };
}

# What tests/nix/eval.nix evaluates the module next to, without nixpkgs:
#
# - `nixos`: declarations of the NixOS options that nixos-modules/blixard.nix and
#   microvm.nix's host module (nixos-modules/host) set or read, typed as nixpkgs
#   types them (nixos/lib/systemd-unit-options.nix and systemd-lib.nix): systemd
#   unit options merge as nixpkgs merges them (lists concatenate, single values
#   must agree), dependency lists only take unit names, `serviceConfig` checks Type
#   and Restart, and a unit's own name must be one systemd can load.
# - `pkgs`: a fake package set. `formats.toml { }` hands back the value it was
#   given (so tests look at the agent's config as an attribute set); `path` is
#   ./nixpkgs, whose nixos/lib/eval-config.nix evaluates microvm.nix guests.
{ lib }:

let
  inherit (lib) mkOption types;

  storePath = name: "${builtins.storeDir}/00000000000000000000000000000000-${name}";

  fakePackage = name: {
    type = "derivation";
    inherit name;
    outPath = storePath name;
    out = fakePackage name;
    meta.mainProgram = name;
  };

  tomlValue =
    types.oneOf [
      types.bool
      types.int
      types.float
      types.str
      types.path
      (types.attrsOf tomlValue)
      (types.listOf tomlValue)
    ]
    // {
      description = "TOML value";
    };

  pkgs = {
    inherit lib;
    path = ./nixpkgs;
    stdenv.hostPlatform.system = "x86_64-linux";
    formats.toml = _: {
      type = types.attrsOf tomlValue;
      # The value itself, plus an outPath so that it can stand in a unit file.
      generate = name: value: value // { outPath = storePath name; };
    };
    blixard-agent = fakePackage "blixard-agent";
    callPackage = fn: _args: fakePackage (baseNameOf (toString fn));
    qemu-utils = fakePackage "qemu-utils";
    qemu_test = fakePackage "qemu-test";
    coreutils = fakePackage "coreutils";
    runtimeShell = "${storePath "bash"}/bin/bash";
  };

  # --- systemd units, as nixpkgs declares them ------------------------------

  # nixos/lib/systemd-lib.nix: a type for options that take a unit name.
  unitNameType = types.strMatching "[a-zA-Z0-9@%:_.\\-]+[.](service|socket|device|mount|automount|swap|target|path|timer|scope|slice)";

  # nixos/lib/systemd-unit-options.nix: repeatable options are lists and
  # concatenate; any other value must be defined once, or equally everywhere.
  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge =
      loc: defs:
      let
        defs' = lib.filterOverrides defs;
      in
      if lib.isList (lib.head defs').value then
        lib.concatMap (
          def:
          if lib.isList def.value then
            def.value
          else
            throw "The definitions for systemd unit options should be either all lists, representing repeatable options, or all non-lists, but for the option ${lib.showOption loc}, the definitions are a mix of list and non-list ${lib.options.showDefs defs'}"
        ) defs'
      else
        lib.mergeEqualOption loc defs';
  };

  # checkService of systemd-unit-options.nix: the values systemd accepts.
  serviceTypes = [
    "exec"
    "simple"
    "forking"
    "oneshot"
    "dbus"
    "notify"
    "notify-reload"
    "idle"
  ];
  restartValues = [
    "no"
    "on-success"
    "on-failure"
    "on-abnormal"
    "on-abort"
    "always"
  ];
  checkService =
    attrs:
    let
      # Applied at the attrsOf level: a value may still be an mkIf / override.
      value =
        v:
        if
          lib.elem (v._type or "") [
            "override"
            "if"
          ]
        then
          v.content
        else
          v;
      oneOf =
        name: allowed:
        !(attrs ? ${name})
        || lib.elem (value attrs.${name}) allowed
        || builtins.trace "Systemd Service field `${name}' cannot have value `${toString (value attrs.${name})}'." false;
    in
    oneOf "Type" serviceTypes && oneOf "Restart" restartValues;

  unitNames = mkOption {
    type = types.listOf unitNameType;
    default = [ ];
  };

  commonUnitOptions = {
    enable = mkOption {
      type = types.bool;
      default = true;
    };
    overrideStrategy = mkOption {
      type = types.enum [
        "asDropinIfExists"
        "asDropin"
      ];
      default = "asDropinIfExists";
    };
    description = mkOption {
      type = types.singleLineStr;
      default = "";
    };
    documentation = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    requiredBy = unitNames;
    wantedBy = unitNames;
    upheldBy = unitNames;
    aliases = unitNames;
    requires = unitNames;
    wants = unitNames;
    upholds = unitNames;
    after = unitNames;
    before = unitNames;
    bindsTo = unitNames;
    partOf = unitNames;
    conflicts = unitNames;
    requisite = unitNames;
    onFailure = unitNames;
    onSuccess = unitNames;
    unitConfig = mkOption {
      type = types.attrsOf unitOption;
      default = { };
    };
    startLimitBurst = mkOption { type = types.int; };
    startLimitIntervalSec = mkOption { type = types.int; };
    restartTriggers = mkOption {
      type = types.listOf types.unspecified;
      default = [ ];
    };
    reloadTriggers = mkOption {
      type = types.listOf unitOption;
      default = [ ];
    };
  };

  lines = mkOption {
    type = types.lines;
    default = "";
  };

  # A service as nixpkgs' systemd.services takes it. Shell snippets become
  # Exec* commands the way nixpkgs makes them, so that they merge with (and
  # conflict with) the same keys set directly, as on NixOS.
  service =
    { name, config, ... }:
    {
      options = commonUnitOptions // {
        environment = mkOption {
          type = types.attrsOf (
            types.nullOr (
              types.oneOf [
                types.str
                types.path
                types.package
              ]
            )
          );
          default = { };
        };
        path = mkOption {
          type = types.listOf (
            types.oneOf [
              types.package
              types.str
            ]
          );
          default = [ ];
        };
        serviceConfig = mkOption {
          type = types.addCheck (types.attrsOf unitOption) checkService;
          default = { };
        };
        script = lines;
        scriptArgs = mkOption {
          type = types.str;
          default = "";
        };
        preStart = lines;
        postStart = lines;
        reload = lines;
        preStop = lines;
        postStop = lines;
        restartIfChanged = mkOption {
          type = types.bool;
          default = true;
        };
        reloadIfChanged = mkOption {
          type = types.bool;
          default = false;
        };
        stopIfChanged = mkOption {
          type = types.bool;
          default = true;
        };
        startAt = mkOption {
          type = types.either types.str (types.listOf types.str);
          default = [ ];
        };
      };
      config =
        let
          job = suffix: "${storePath "unit-script-${name}-${suffix}"}/bin/${name}-${suffix}";
        in
        lib.mkMerge [
          (lib.mkIf (config.script != "") {
            serviceConfig.ExecStart = job "start" + " " + config.scriptArgs;
          })
          (lib.mkIf (config.preStart != "") { serviceConfig.ExecStartPre = [ (job "pre-start") ]; })
          (lib.mkIf (config.postStart != "") { serviceConfig.ExecStartPost = [ (job "post-start") ]; })
          (lib.mkIf (config.preStop != "") { serviceConfig.ExecStop = job "pre-stop"; })
          (lib.mkIf (config.postStop != "") { serviceConfig.ExecStopPost = job "post-stop"; })
        ];
    };

  target = {
    options = commonUnitOptions;
  };

  # systemd's rule for a unit file's name (systemd.unit(5)): a template's
  # instance part may be empty ("microvm@.service").
  validUnitFileName = name: builtins.match "[a-zA-Z0-9:_.\\-]+(@[a-zA-Z0-9:_.\\-]*)?" name != null;

  nixos =
    { config, ... }:
    {
      options = {
        assertions = mkOption {
          type = types.listOf types.unspecified;
          default = [ ];
        };
        warnings = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        meta = {
          doc = mkOption {
            type = types.path;
            internal = true;
          };
          maintainers = mkOption {
            type = types.listOf types.raw;
            default = [ ];
          };
        };
        networking.hostName = mkOption {
          type = types.str;
          default = "nixos";
        };
        networking.firewall.allowedTCPPorts = mkOption {
          type = types.listOf types.port;
          default = [ ];
        };
        networking.firewall.allowedUDPPorts = mkOption {
          type = types.listOf types.port;
          default = [ ];
        };
        # nixos/modules/services/monitoring/prometheus: the options
        # services.blixard.prometheus sets, typed as there (a scrape config's
        # unset fields are null).
        services.prometheus.enable = mkOption {
          type = types.bool;
          default = false;
        };
        services.prometheus.ruleFiles = mkOption {
          type = types.listOf types.path;
          default = [ ];
        };
        services.prometheus.scrapeConfigs = mkOption {
          type = types.listOf (
            types.submodule {
              options = {
                job_name = mkOption { type = types.str; };
                scheme = mkOption {
                  type = types.nullOr (
                    types.enum [
                      "http"
                      "https"
                    ]
                  );
                  default = null;
                };
                static_configs = mkOption {
                  type = types.nullOr (
                    types.listOf (
                      types.submodule {
                        options.targets = mkOption { type = types.listOf types.str; };
                      }
                    )
                  );
                  default = null;
                };
                tls_config = mkOption {
                  type = types.nullOr (
                    types.submodule {
                      options.ca_file = mkOption {
                        type = types.nullOr types.str;
                        default = null;
                      };
                    }
                  );
                  default = null;
                };
              };
            }
          );
          default = [ ];
        };
        boot.kernelModules = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        hardware.ksm.enable = mkOption {
          type = types.bool;
          default = false;
        };
        virtualisation.libvirtd.enable = mkOption {
          type = types.bool;
          default = false;
        };
        environment.etc = mkOption {
          type = types.attrsOf (
            types.submodule {
              options = {
                text = mkOption {
                  type = types.nullOr types.lines;
                  default = null;
                };
                source = mkOption { type = types.unspecified; };
                mode = mkOption {
                  type = types.str;
                  default = "symlink";
                };
              };
            }
          );
          default = { };
        };
        environment.systemPackages = mkOption {
          type = types.listOf types.package;
          default = [ ];
        };
        users.users = mkOption {
          type = types.attrsOf (
            types.submodule {
              options = {
                isSystemUser = mkOption {
                  type = types.bool;
                  default = false;
                };
                group = mkOption {
                  type = types.str;
                  default = "";
                };
                description = mkOption {
                  type = types.str;
                  default = "";
                };
              };
            }
          );
          default = { };
        };
        users.groups = mkOption {
          type = types.attrsOf (types.submodule { });
          default = { };
        };
        security.polkit.enable = mkOption {
          type = types.bool;
          default = false;
        };
        security.polkit.extraConfig = mkOption {
          type = types.lines;
          default = "";
        };
        security.pam.loginLimits = mkOption {
          type = types.listOf (types.attrsOf types.anything);
          default = [ ];
        };
        security.wrappers = mkOption {
          type = types.attrsOf (
            types.submodule {
              options = {
                source = mkOption { type = types.path; };
                owner = mkOption { type = types.str; };
                group = mkOption { type = types.str; };
                capabilities = mkOption {
                  type = types.commas;
                  default = "";
                };
              };
            }
          );
          default = { };
        };
        system.activationScripts = mkOption {
          type = types.attrsOf (types.either types.str (types.attrsOf types.anything));
          default = { };
        };
        systemd.package = mkOption {
          type = types.package;
          default = fakePackage "systemd";
        };
        systemd.services = mkOption {
          type = types.attrsOf (types.submodule service);
          default = { };
        };
        systemd.targets = mkOption {
          type = types.attrsOf (types.submodule target);
          default = { };
        };
        systemd.tmpfiles.rules = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        systemd.tmpfiles.settings = mkOption {
          type = types.attrsOf (types.attrsOf (types.attrsOf (types.attrsOf types.anything)));
          default = { };
        };
        systemd.settings.Manager = mkOption {
          type = types.attrsOf unitOption;
          default = { };
        };
      };

      # What systemd would refuse to load.
      config.assertions = lib.mapAttrsToList (name: _: {
        assertion = validUnitFileName name;
        message = "systemd.services.\"${name}\": \"${name}.service\" is not a valid systemd unit name.";
      }) config.systemd.services;
    };
in
{
  inherit
    nixos
    pkgs
    storePath
    fakePackage
    ;
}

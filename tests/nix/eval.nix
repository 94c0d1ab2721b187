# Evaluation tests for nixos-modules/blixard.nix, without nixpkgs or NixOS.
#
#   nix-instantiate --eval --strict --json tests/nix/eval.nix \
#     --arg lib 'import /path/to/nixpkgs.lib/lib'
#
# The module is evaluated with `lib.evalModules` next to stub declarations of
# the NixOS (and microvm.nix) options it sets, and a fake `pkgs` whose
# `formats.toml { }` hands back the value it was given, so the tests can look
# at the agent's config as an attribute set. Returns
# `{ total; failures = [ { name; expected; result; } ]; }`.
{ lib }:

let
  inherit (lib) mkOption types;

  storePath = name: "${builtins.storeDir}/00000000000000000000000000000000-${name}";

  fakePackage = name: {
    type = "derivation";
    inherit name;
    outPath = storePath name;
    meta.mainProgram = name;
  };

  tomlValue = types.oneOf [
    types.bool
    types.int
    types.float
    types.str
    types.path
    (types.attrsOf tomlValue)
    (types.listOf tomlValue)
  ] // { description = "TOML value"; };

  fakePkgs = {
    formats.toml = _: {
      type = types.attrsOf tomlValue;
      # The value itself, plus an outPath so that it can stand in a unit file.
      generate = name: value: value // { outPath = storePath name; };
    };
    blixard-agent = fakePackage "blixard-agent";
  };

  # What microvm.nix does with `microvm.vms.<name>.config`: evaluate the
  # definitions as the guest's NixOS configuration. Here the guest only has
  # the options the module reads.
  guestStub = {
    freeformType = types.attrsOf types.anything;
    options.microvm = {
      vcpu = mkOption { type = types.ints.positive; default = 1; };
      mem = mkOption { type = types.ints.positive; default = 512; };
    };
  };
  guestConfig = lib.mkOptionType {
    name = "microvm-guest";
    merge = _loc: defs: lib.evalModules {
      modules = [ guestStub ] ++ map (def: { _file = def.file; imports = [ def.value ]; }) defs;
    };
  };

  listOfStr = mkOption { type = types.listOf types.str; default = [ ]; };
  anyAttrs = mkOption { type = types.attrsOf (types.attrsOf types.anything); default = { }; };

  stubs = {
    options = {
      assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      warnings = listOfStr;
      networking.hostName = mkOption { type = types.str; default = "nixos"; };
      networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
      environment.etc = anyAttrs;
      environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };
      users.users = anyAttrs;
      users.groups = anyAttrs;
      systemd.tmpfiles.rules = listOfStr;
      systemd.services = mkOption {
        default = { };
        type = types.attrsOf (types.submodule {
          freeformType = types.attrsOf types.anything;
          options = {
            wantedBy = listOfStr;
            wants = listOfStr;
            after = listOfStr;
            serviceConfig = mkOption { type = types.attrsOf types.anything; default = { }; };
          };
        });
      };
      security.polkit.enable = mkOption { type = types.bool; default = false; };
      security.polkit.extraConfig = mkOption { type = types.lines; default = ""; };
      microvm = {
        stateDir = mkOption { type = types.str; default = "/var/lib/microvms"; };
        autostart = listOfStr;
        vms = mkOption {
          default = { };
          type = types.attrsOf (types.submodule {
            options = {
              config = mkOption { type = types.nullOr guestConfig; default = null; };
              flake = mkOption { type = types.nullOr types.path; default = null; };
              autostart = mkOption { type = types.bool; default = true; };
            };
          });
        };
      };
    };
  };

  evalHost = modules: (lib.evalModules {
    modules = [
      stubs
      ../../nixos-modules/blixard.nix
      { _module.args.pkgs = fakePkgs; }
    ] ++ modules;
  }).config;

  failedMessages = cfg: map (a: a.message) (lib.filter (a: !a.assertion) cfg.assertions);

  # The generated config file, as the attribute set given to formats.toml.
  agentConfig = cfg: removeAttrs cfg.environment.etc."blixard/agent.toml".source [ "outPath" ];
  unit = cfg: cfg.systemd.services.blixard.serviceConfig;

  members = {
    h1 = "10.0.0.1:7000";
    h2 = "10.0.0.2:7000";
    h3 = "10.0.0.3:7000";
  };

  # h1 of a three-host cluster.
  base = {
    networking.hostName = "h1";
    services.blixard = {
      enable = true;
      listenAddress = "10.0.0.1";
      initialMembers = members;
    };
  };

  # A fake flake with one guest, as microvm.nix reads it.
  fakeFlake = {
    outPath = storePath "guests-source";
    nixosConfigurations.db.config.microvm = { vcpu = 4; mem = 4096; };
  };

  withVms = vms: [ base { services.blixard.vms = vms; } ];

  # Passes when evaluation reports exactly one failed assertion, and it
  # contains `text`; otherwise shows what it got.
  failsWith = text: modules:
    let
      got = failedMessages (evalHost modules);
    in
    {
      expr = if lib.length got == 1 && lib.hasInfix text (lib.head got) then "failed as expected" else got;
      expected = "failed as expected";
    };

  # Passes when evaluating `attr` of the config throws (a type error).
  rejects = modules: attr: {
    expr = (builtins.tryEval (builtins.deepSeq (attr (evalHost modules)) true)).success;
    expected = false;
  };

  tests = {
    testGoodConfigHasNoFailedAssertion = {
      expr = failedMessages (evalHost [ base ]);
      expected = [ ];
    };

    testMinimalConfigFile = {
      expr = agentConfig (evalHost [ base ]);
      expected = {
        node_name = "h1";
        listen = "10.0.0.1:7000";
        data_dir = "/var/lib/blixard";
        initial_members = [ "h1=10.0.0.1:7000" "h2=10.0.0.2:7000" "h3=10.0.0.3:7000" ];
        join = [ ];
        log_level = "info";
        runtime = { kind = "systemd"; state_dir = "/var/lib/microvms"; };
        vm = [ ];
      };
    };

    testFullConfigFile = {
      expr = agentConfig (evalHost [
        base
        {
          services.blixard = {
            port = 7100;
            initialMembers = lib.mkForce { h1 = "10.0.0.1:7100"; };
            logLevel = "debug";
            metricsListenAddress = "127.0.0.1:9464";
            joinTokenFile = "/run/secrets/join-token";
            capacity = { vcpu = 16; memory = 65536; vcpuOvercommit = 2; memoryOvercommit = 1.5; };
            labels.rack = "r1";
            tls = {
              caFile = "/etc/blixard/ca.pem";
              certFile = "/etc/blixard/h1.pem";
              keyFile = "/run/secrets/h1-key.pem";
            };
            vms.web = {
              config = { };
              vcpu = 2;
              memory = 1024;
              labels.tier = "web";
              node = "h1";
              antiAffinity = "frontends";
              desired = "stopped";
            };
          };
        }
      ]);
      expected = {
        node_name = "h1";
        listen = "10.0.0.1:7100";
        data_dir = "/var/lib/blixard";
        initial_members = [ "h1=10.0.0.1:7100" ];
        join = [ ];
        log_level = "debug";
        metrics_listen = "127.0.0.1:9464";
        join_token_file = "/run/credentials/blixard.service/join-token";
        runtime = { kind = "systemd"; state_dir = "/var/lib/microvms"; };
        capacity = { vcpu = 16; memory_mib = 65536; vcpu_overcommit = 2.0; memory_overcommit = 1.5; };
        labels = { rack = "r1"; };
        tls = {
          ca_file = "/run/credentials/blixard.service/ca.pem";
          cert_file = "/run/credentials/blixard.service/cert.pem";
          key_file = "/run/credentials/blixard.service/key.pem";
        };
        vm = [{
          name = "web";
          vcpu = 2;
          memory_mib = 1024;
          labels = { tier = "web"; };
          node = "h1";
          anti_affinity = "frontends";
          desired = "stopped";
        }];
      };
    };

    testOvercommitIsAFloat = {
      expr = builtins.isFloat (agentConfig (evalHost [ base { services.blixard.capacity.vcpuOvercommit = 3; } ])).capacity.vcpu_overcommit;
      expected = true;
    };

    testIpv6ListenAddress = {
      expr = (agentConfig (evalHost [{
        networking.hostName = "h1";
        services.blixard = { enable = true; listenAddress = "fd00::1"; initialMembers.h1 = "[fd00::1]:7000"; };
      }])).listen;
      expected = "[fd00::1]:7000";
    };

    testBracketedIpv6ListenAddress = {
      expr = (agentConfig (evalHost [{
        networking.hostName = "h1";
        services.blixard = { enable = true; listenAddress = "[fd00::1]"; initialMembers.h1 = "[fd00::1]:7000"; };
      }])).listen;
      expected = "[fd00::1]:7000";
    };

    testSettingsAddsKeys = {
      expr = (agentConfig (evalHost [ base { services.blixard.settings.runtime.kind = "process"; } ])).runtime;
      expected = { kind = "process"; state_dir = "/var/lib/microvms"; };
    };

    testNonSystemdRuntimeWarns = {
      expr = lib.length (evalHost [ base { services.blixard.settings.runtime.kind = "process"; } ]).warnings;
      expected = 1;
    };

    testUnit = {
      expr = {
        inherit (unit (evalHost [ base ])) Type NotifyAccess Restart User Group StateDirectory WatchdogSec;
        inherit ((evalHost [ base ]).systemd.services.blixard) wantedBy;
      };
      expected = {
        Type = "notify";
        NotifyAccess = "main";
        Restart = "always";
        User = "blixard";
        Group = "blixard";
        StateDirectory = "blixard";
        WatchdogSec = "30s";
        wantedBy = [ "multi-user.target" ];
      };
    };

    testExecStartRunsTheGeneratedConfig = {
      expr = (unit (evalHost [ base ])).ExecStart;
      expected = "${storePath "blixard-agent"}/bin/blixard-agent run --config ${storePath "blixard-agent.toml"}";
    };

    testCliReadsTheSameConfig = {
      expr = "${(evalHost [ base ]).environment.etc."blixard/agent.toml".source}";
      expected = storePath "blixard-agent.toml";
    };

    testPackageOnPath = {
      expr = map (p: p.name) (evalHost [ base ]).environment.systemPackages;
      expected = [ "blixard-agent" ];
    };

    testHardening = {
      expr = {
        inherit (unit (evalHost [ base ]))
          ProtectSystem PrivateTmp NoNewPrivileges UMask CapabilityBoundingSet
          ProtectKernelTunables ProtectKernelModules ProtectKernelLogs RestrictNamespaces
          SystemCallFilter RestrictAddressFamilies PrivateDevices ProtectHome;
      };
      expected = {
        ProtectSystem = "strict";
        PrivateTmp = true;
        NoNewPrivileges = true;
        UMask = "0077";
        CapabilityBoundingSet = "";
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        RestrictNamespaces = true;
        SystemCallFilter = [ "@system-service" "~@privileged" ];
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
        PrivateDevices = true;
        ProtectHome = true;
      };
    };

    testPrivilegedPortGetsOnlyBindCapability = {
      expr = (unit (evalHost [ base { services.blixard.port = 700; services.blixard.initialMembers = lib.mkForce { h1 = "10.0.0.1:700"; }; } ])).CapabilityBoundingSet;
      expected = "CAP_NET_BIND_SERVICE";
    };

    testCustomDataDir = {
      expr =
        let cfg = evalHost [ base { services.blixard.dataDir = "/srv/blixard"; } ];
        in {
          stateDirectory = (unit cfg) ? StateDirectory;
          inherit (unit cfg) ReadWritePaths;
          inherit (cfg.systemd.tmpfiles) rules;
          inherit ((agentConfig cfg)) data_dir;
        };
      expected = {
        stateDirectory = false;
        ReadWritePaths = [ "/srv/blixard" ];
        rules = [ "d /srv/blixard 0700 blixard blixard - -" ];
        data_dir = "/srv/blixard";
      };
    };

    testSecretsAreCredentials = {
      expr = (unit (evalHost [
        base
        {
          services.blixard.joinTokenFile = "/run/secrets/join-token";
          services.blixard.tls = {
            caFile = "/etc/blixard/ca.pem";
            certFile = "/etc/blixard/h1.pem";
            keyFile = "/run/secrets/h1-key.pem";
          };
        }
      ])).LoadCredential;
      expected = [
        "ca.pem:/etc/blixard/ca.pem"
        "cert.pem:/etc/blixard/h1.pem"
        "key.pem:/run/secrets/h1-key.pem"
        "join-token:/run/secrets/join-token"
      ];
    };

    testNoCredentialsWithoutSecrets = {
      expr = (unit (evalHost [ base ])).LoadCredential;
      expected = [ ];
    };

    testFirewallClosedByDefault = {
      expr = (evalHost [ base ]).networking.firewall.allowedTCPPorts;
      expected = [ ];
    };

    testOpenFirewallOpensTheAgentPortOnly = {
      expr = (evalHost [ base { services.blixard.openFirewall = true; services.blixard.metricsListenAddress = "0.0.0.0:9464"; } ]).networking.firewall.allowedTCPPorts;
      expected = [ 7000 ];
    };

    testDisabledModuleSetsNothing = {
      expr =
        let cfg = evalHost [{ services.blixard.listenAddress = "10.0.0.1"; services.blixard.vms.web.config = { }; }];
        in { inherit (cfg.systemd) services; inherit (cfg.microvm) vms; inherit (cfg.networking.firewall) allowedTCPPorts; inherit (cfg) assertions; };
      expected = { services = { }; vms = { }; allowedTCPPorts = [ ]; assertions = [ ]; };
    };

    testUserAndPolkit = {
      expr =
        let cfg = evalHost [ base ];
        in {
          user = { inherit (cfg.users.users.blixard) isSystemUser group; };
          group = cfg.users.groups ? blixard;
          polkit = cfg.security.polkit.enable;
          rule = map (text: lib.hasInfix text cfg.security.polkit.extraConfig) [
            ''action.id == "org.freedesktop.systemd1.manage-units"''
            ''subject.user == "blixard"''
            ''/^microvm@[a-z0-9][a-z0-9-]{0,62}\.service$/.test(action.lookup("unit"))''
          ];
        };
      expected = { user = { isSystemUser = true; group = "blixard"; }; group = true; polkit = true; rule = [ true true true ]; };
    };

    testVmsBecomeMicrovmsThatDoNotAutostart = {
      expr = lib.mapAttrs (_: vm: vm.autostart) (evalHost (withVms { web.config = { }; db.flake = fakeFlake; })).microvm.vms;
      expected = { web = false; db = false; };
    };

    testVmSizeIsSetInTheGuest = {
      expr = (evalHost (withVms { web = { config = { }; vcpu = 2; memory = 1024; }; })).microvm.vms.web.config.config.microvm;
      expected = { vcpu = 2; mem = 1024; };
    };

    testGuestConfigIsKept = {
      expr = (evalHost (withVms { web.config = { services.nginx.enable = true; }; })).microvm.vms.web.config.config.services.nginx.enable;
      expected = true;
    };

    testVmEntryTakesTheGuestsNumbers = {
      expr = (agentConfig (evalHost (withVms {
        web = { config = { }; vcpu = 2; memory = 1024; };
        small.config = { };
        sized.config = { microvm.mem = 768; };
      }))).vm;
      expected = [
        { name = "sized"; vcpu = 1; memory_mib = 768; desired = "running"; }
        { name = "small"; vcpu = 1; memory_mib = 512; desired = "running"; }
        { name = "web"; vcpu = 2; memory_mib = 1024; desired = "running"; }
      ];
    };

    testFlakeGuest = {
      expr =
        let cfg = evalHost (withVms { db = { flake = fakeFlake; memory = 4096; }; });
        in {
          inherit (agentConfig cfg) vm;
          flake = "${cfg.microvm.vms.db.flake}";
          config = cfg.microvm.vms.db.config;
          failed = failedMessages cfg;
        };
      expected = {
        vm = [{ name = "db"; vcpu = 4; memory_mib = 4096; desired = "running"; }];
        flake = storePath "guests-source";
        config = null;
        failed = [ ];
      };
    };

    testAgentStartsAfterRunnersAreInstalled = {
      expr = (evalHost (withVms { web.config = { }; })).systemd.services.blixard.after;
      expected = [ "network-online.target" "install-microvm-web.service" ];
    };

    testHostThatJoinsBySeeds = {
      expr =
        let
          cfg = evalHost [{
            networking.hostName = "h4";
            services.blixard = { enable = true; listenAddress = "10.0.0.4"; join = [ "10.0.0.1:7000" ]; };
          }];
        in
        {
          failed = failedMessages cfg;
          inherit (agentConfig cfg) initial_members join;
          # Without TLS or a token file the cluster would refuse it: warned.
          warned = lib.any (lib.hasInfix "joinTokenFile") cfg.warnings;
          warnedWithToken = (evalHost [{
            networking.hostName = "h4";
            services.blixard = {
              enable = true;
              listenAddress = "10.0.0.4";
              join = [ "10.0.0.1:7000" ];
              joinTokenFile = "/run/secrets/join-token";
            };
          }]).warnings;
        };
      expected = {
        failed = [ ];
        initial_members = [ ];
        join = [ "10.0.0.1:7000" ];
        warned = true;
        warnedWithToken = [ ];
      };
    };

    testUninitialisedHostIsAllowed = {
      expr = failedMessages (evalHost [{
        networking.hostName = "h4";
        services.blixard = { enable = true; listenAddress = "10.0.0.4"; };
      }]);
      expected = [ ];
    };

    testNodeNameDefaultsToHostName = {
      expr = (agentConfig (evalHost [ base ])).node_name;
      expected = "h1";
    };

    # Bad values fail with our messages.
    testBadNodeName = failsWith ''services.blixard.nodeName "H1_x" is not a valid node name'' [
      base
      { services.blixard.nodeName = "H1_x"; services.blixard.initialMembers = lib.mkForce { }; }
    ];
    testNodeNameTooLong = failsWith "is not a valid node name" [
      base
      { services.blixard.nodeName = lib.strings.replicate 64 "a"; services.blixard.initialMembers = lib.mkForce { }; }
    ];
    testBadVmName = failsWith ''services.blixard.vms."Web": "Web" is not a valid VM name'' (withVms { Web.config = { }; });
    testVmNeedsConfigOrFlake = failsWith "set exactly one of `config` (a NixOS module) and `flake`" (withVms { web = { }; });
    testVmNotBothConfigAndFlake = failsWith "set exactly one of `config`" (withVms { db = { config = { }; flake = fakeFlake; }; });
    testBadVmNode = failsWith ''services.blixard.vms.web.node "H2" is not a valid node name'' (withVms { web = { config = { }; node = "H2"; }; });
    testFlakeGuestSizeMismatch = failsWith "the flake's nixosConfigurations.db has microvm.vcpu = 4" (withVms { db = { flake = fakeFlake; vcpu = 2; }; });
    testListenAddressRequired = failsWith "services.blixard.listenAddress is not set" [{
      networking.hostName = "h1";
      services.blixard.enable = true;
    }];
    testWildcardListenAddress = failsWith ''services.blixard.listenAddress is "0.0.0.0", but peers connect to it'' [
      base
      { services.blixard.listenAddress = lib.mkForce "0.0.0.0"; services.blixard.initialMembers = lib.mkForce { }; }
    ];
    testInitialMembersMustNameThisHost = failsWith ''services.blixard.initialMembers does not name this host "h4"'' [
      base
      { networking.hostName = lib.mkForce "h4"; }
    ];
    testOwnMemberAddressMustBeTheListenAddress = failsWith ''services.blixard.initialMembers.h1 is "10.0.0.1:7000" but this host listens on "10.0.0.9:7000"'' [
      base
      { services.blixard.listenAddress = lib.mkForce "10.0.0.9"; }
    ];
    testBadMemberAddress = failsWith ''services.blixard.initialMembers.h2 = "10.0.0.2"'' [
      base
      { services.blixard.initialMembers.h2 = lib.mkForce "10.0.0.2"; }
    ];
    testInitialMembersAndJoinExclusive = failsWith "set either initialMembers" [
      base
      { services.blixard.join = [ "10.0.0.2:7000" ]; }
    ];
    testBadJoinSeed = failsWith ''services.blixard.join: "h1" is not "address:port"'' [{
      networking.hostName = "h4";
      services.blixard = { enable = true; listenAddress = "10.0.0.4"; join = [ "h1" ]; };
    }];
    testTlsAllOrNone = failsWith "set all of caFile, certFile and keyFile, or none of them" [
      base
      { services.blixard.tls.certFile = "/etc/blixard/h1.pem"; }
    ];
    testTlsKeyNotInStore = failsWith "services.blixard.tls.keyFile" [
      base
      {
        services.blixard.tls = {
          caFile = "/etc/blixard/ca.pem";
          certFile = "/etc/blixard/h1.pem";
          keyFile = storePath "h1-key.pem";
        };
      }
    ];
    testJoinTokenNotInStore = failsWith "services.blixard.joinTokenFile" [
      base
      { services.blixard.joinTokenFile = storePath "token"; }
    ];
    testOvercommitBelowOne = failsWith "services.blixard.capacity.memoryOvercommit must be at least 1.0" [
      base
      { services.blixard.capacity.memoryOvercommit = 0.5; }
    ];
    testBadMetricsAddress = failsWith "services.blixard.metricsListenAddress" [
      base
      { services.blixard.metricsListenAddress = "9464"; }
    ];
    testStateDirMustBeMicrovms = failsWith "differs from microvm.stateDir" [
      base
      { services.blixard.stateDir = "/srv/microvms"; }
    ];
    testManagedGuestNotInMicrovmAutostart = failsWith "microvm.autostart contains web" [
      base
      { services.blixard.vms.web.config = { }; microvm.autostart = [ "web" ]; }
    ];
    testRelativeDataDir = failsWith "must be an absolute path" [
      base
      { services.blixard.dataDir = "var/lib/blixard"; }
    ];

    # Type errors: a key given as a Nix path would be copied into the store.
    testKeyFileRejectsAPath = rejects [ base { services.blixard.tls.keyFile = ./eval.nix; } ] (cfg: cfg.services.blixard.tls.keyFile);
    testDesiredIsRunningOrStopped = rejects (withVms { web = { config = { }; desired = "paused"; }; }) (cfg: cfg.services.blixard.vms.web.desired);
    testPortIsAPort = rejects [ base { services.blixard.port = 70000; } ] (cfg: cfg.services.blixard.port);
  };

  failures = lib.runTests tests;
in
{
  total = lib.length (lib.filter (lib.hasPrefix "test") (lib.attrNames tests));
  inherit failures;
}

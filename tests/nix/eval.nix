# Evaluation tests for nixos-modules/blixard.nix, next to the real microvm.nix.
#
#   nix-instantiate --eval --strict --json tests/nix/eval.nix \
#     --arg lib 'import /var/cache/blixard/nixpkgs-lib/lib' \
#     --arg microvm /var/cache/blixard/microvm.nix-<rev>
#
# (tests/nix/check.sh runs it; tests/nix/prepare.sh fills the cache.) Each host is
# the flake's own nixosModules (nixos-modules/exports.nix) evaluated with
# `lib.evalModules` together with microvm.nix's real host module
# (nixos-modules/host, at the revision flake.lock pins) and, for every guest, its
# real guest option module; the NixOS options around them are the typed stubs of
# ./stubs. Returns `{ total; failures = [ { name; expected; result; } ]; }`.
{ lib, microvm }:

let
  # A path value, also when the flake hands over its input's store path string.
  microvmDir = /. + toString microvm;
  stubs = import ./stubs { inherit lib; };
  inherit (stubs) storePath;

  # microvm.nix's flake output, as the flake sees it (a path: importing it twice
  # imports it once).
  microvmFlake.nixosModules.host = microvmDir + "/nixos-modules/host";
  exports = import ../../nixos-modules/exports.nix {
    microvm = microvmFlake;
    packageFor = pkgs: pkgs.blixard-agent;
  };
  example = import ../../docs/examples/cluster.nix { inherit lib; };

  eval =
    modules:
    lib.evalModules {
      modules = [
        stubs.nixos
        { _module.args.pkgs = stubs.pkgs; }
      ]
      ++ modules;
    };
  evalHost = modules: (eval ([ exports.default ] ++ modules)).config;

  failedMessages = cfg: map (a: a.message) (lib.filter (a: !a.assertion) cfg.assertions);

  # The generated config file, as the attribute set given to formats.toml.
  agentConfig = cfg: removeAttrs cfg.environment.etc."blixard/agent.toml".source [ "outPath" ];
  unit = cfg: cfg.systemd.services.blixard.serviceConfig;
  guard = cfg: cfg.systemd.services.blixard-guard;

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
      clusterSecretFile = "/run/secrets/blixard/cluster-secret";
    };
  };
  # h1 with certificates from an operator CA instead (the tests set `tls`).
  baseTls = lib.recursiveUpdate base { services.blixard.clusterSecretFile = null; };

  guest = {
    microvm.hypervisor = "qemu";
    system.stateVersion = "26.05";
  };

  # A fake flake with one guest, as microvm.nix reads it.
  fakeFlake = {
    outPath = storePath "guests-source";
    nixosConfigurations.db.config = {
      microvm = {
        vcpu = 4;
        mem = 4096;
        shares = [ ];
        declaredRunner = stubs.fakePackage "microvm-qemu-db" // {
          supportsNotifySocket = false;
          registerWithMachined = false;
        };
      };
      system.build.toplevel = stubs.fakePackage "nixos-system-db";
    };
  };

  withVms = vms: [
    base
    { services.blixard.vms = vms; }
  ];

  # Passes when evaluation reports exactly one failed assertion, and it
  # contains `text`; otherwise shows what it got.
  failsWith =
    text: modules:
    let
      got = failedMessages (evalHost modules);
    in
    {
      expr =
        if lib.length got == 1 && lib.hasInfix text (lib.head got) then "failed as expected" else got;
      expected = "failed as expected";
    };

  # Passes when evaluating `attr` of the config throws (a type error).
  rejects = modules: attr: rejectsEval (attr (evalHost modules));
  rejectsEval = value: {
    expr = (builtins.tryEval (builtins.deepSeq value true)).success;
    expected = false;
  };

  tests = {
    # --- the docs' three hosts ------------------------------------------------
    testDocsHostsEvaluate = {
      expr = lib.mapAttrs (
        name: address:
        let
          cfg = evalHost [
            example.cluster
            (example.founder name address)
          ];
        in
        {
          failed = failedMessages cfg;
          inherit (agentConfig cfg) node_name listen initial_members;
          vm = (agentConfig cfg).vm;
          guest = {
            inherit (cfg.microvm.vms.web) autostart restartIfChanged;
            inherit (cfg.microvm.vms.web.config.config.microvm) vcpu mem hypervisor;
            shares = map (s: s.proto) cfg.microvm.vms.web.config.config.microvm.shares;
          };
          # microvm.nix's host side is on, and installs the runner.
          installs = cfg.systemd.services."install-microvm-web".serviceConfig.Type;
          microvmUser = cfg.users.users ? microvm;
          firewall = cfg.networking.firewall.allowedTCPPorts;
        }
      ) example.founders;
      expected = lib.mapAttrs (name: address: {
        failed = [ ];
        node_name = name;
        listen = "${address}:7000";
        initial_members = [
          "h1=10.0.0.1:7000"
          "h2=10.0.0.2:7000"
          "h3=10.0.0.3:7000"
        ];
        vm = [
          {
            name = "web";
            vcpu = 2;
            memory_mib = 1024;
            desired = "running";
            failover = "auto";
          }
        ];
        guest = {
          autostart = false;
          restartIfChanged = false;
          vcpu = 2;
          mem = 1024;
          hypervisor = "qemu";
          shares = [ "9p" ];
        };
        installs = "oneshot";
        microvmUser = true;
        firewall = [ 7000 ];
      }) example.founders;
    };

    # microvm.nix's unit template and ours merge as systemd units do.
    testGuestsCheckForTheGuardBeforeTheyStart = {
      expr =
        let
          cfg = evalHost [ base ];
          template = cfg.systemd.services."microvm@";
        in
        {
          inherit (template) restartIfChanged;
          check = template.serviceConfig.ExecStartPre;
          after = lib.elem "blixard-guard.service" template.after;
          # microvm.nix's own settings survive the merge.
          inherit (template.serviceConfig) Restart TimeoutSec;
          stop = template.serviceConfig.ExecStop;
        };
      expected = {
        check = [ "${storePath "systemd"}/bin/systemctl is-active --quiet blixard-guard.service" ];
        restartIfChanged = false;
        after = true;
        Restart = "always";
        TimeoutSec = 150;
        # microvm.nix's shutdown, then a wait for qemu itself.
        stop = [
          "/var/lib/microvms/%i/booted/bin/microvm-shutdown"
          "-${storePath "coreutils"}/bin/tail --pid=\${MAINPID} -f /dev/null"
        ];
      };
    };

    testGuardUnit = {
      expr =
        let
          g = guard (evalHost [ base ]);
        in
        {
          inherit (g) restartIfChanged stopIfChanged wantedBy;
          inherit (g.serviceConfig)
            Type
            NotifyAccess
            ExecStart
            ExecStopPost
            Restart
            RestartSec
            WatchdogSec
            WatchdogSignal
            CPUWeight
            PrivateNetwork
            RestrictAddressFamilies
            CapabilityBoundingSet
            ;
          user = g.serviceConfig ? User;
        };
      expected = {
        restartIfChanged = false;
        stopIfChanged = false;
        wantedBy = [ "multi-user.target" ];
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${storePath "blixard-agent"}/bin/blixard-agent guard --data-dir /var/lib/blixard --state-dir /var/lib/microvms --runtime systemd";
        ExecStopPost = "${storePath "blixard-agent"}/bin/blixard-agent guard --fence-if-stale --data-dir /var/lib/blixard --state-dir /var/lib/microvms --runtime systemd";
        Restart = "always";
        RestartSec = "100ms";
        WatchdogSec = "1600ms";
        WatchdogSignal = "SIGKILL";
        CPUWeight = 1000;
        PrivateNetwork = true;
        RestrictAddressFamilies = [ "AF_UNIX" ];
        CapabilityBoundingSet = [ "CAP_DAC_READ_SEARCH" ];
        # root: stopping guests never waits for polkitd
        user = false;
      };
    };

    testGuardTakesTheAgentsTiming = {
      expr =
        (guard (evalHost [
          base
          {
            services.blixard.settings.timing = {
              fence_after_ms = 2500;
              stop_max_ms = 800;
              reschedule_after_ms = 5000;
            };
          }
        ])).serviceConfig.ExecStart;
      expected = "${storePath "blixard-agent"}/bin/blixard-agent guard --data-dir /var/lib/blixard --state-dir /var/lib/microvms --runtime systemd --fence-after-ms 2500 --stop-max-ms 800";
    };

    # --- a user who brings their own microvm.nix ------------------------------
    testOwnMicrovmWithTheModuleAlone = {
      expr =
        let
          cfg =
            (eval [
              microvmFlake.nixosModules.host
              exports.blixard
              base
              { services.blixard.vms.web.config = guest; }
            ]).config;
        in
        {
          failed = failedMessages cfg;
          hostSide = cfg.users.users ? microvm;
          runner = cfg.systemd.services ? "install-microvm-web";
        };
      expected = {
        failed = [ ];
        hostSide = true;
        runner = true;
      };
    };

    # With `inputs.microvm.follows`, the user's microvm.nix and blixard's are the
    # same path, and the module system imports it once.
    testOwnMicrovmFollowedIsImportedOnce = {
      expr = failedMessages (
        (eval [
          microvmFlake.nixosModules.host
          exports.default
          base
        ]).config
      );
      expected = [ ];
    };

    # Without follows there are two copies: NixOS refuses the second (this is
    # why the docs say `follows`, or `nixosModules.blixard`).
    testTwoCopiesOfMicrovmAreRefused = rejectsEval (
      (eval [
        (
          builtins.path {
            path = microvmDir;
            name = "microvm-nix-second-copy";
          }
          + "/nixos-modules/host"
        )
        exports.default
        base
      ]).config.microvm.host.enable
    );

    # --- imported but not enabled ----------------------------------------------
    testImportedButDisabledChangesNothing = {
      expr =
        let
          cfg = evalHost [ { networking.hostName = "h1"; } ];
        in
        {
          hostEnabled = cfg.microvm.host.enable;
          inherit (cfg.users) users groups;
          inherit (cfg.security) wrappers;
          etc = lib.attrNames cfg.environment.etc;
          inherit (cfg.boot) kernelModules;
          ksm = cfg.hardware.ksm.enable;
          services = lib.attrNames cfg.systemd.services;
          targets = lib.attrNames cfg.systemd.targets;
          packages = cfg.environment.systemPackages;
          polkit = cfg.security.polkit.enable;
          inherit (cfg.system) activationScripts;
          inherit (cfg) assertions warnings;
        };
      expected = {
        hostEnabled = false;
        users = { };
        groups = { };
        wrappers = { };
        etc = [ ];
        kernelModules = [ ];
        ksm = false;
        services = [ ];
        targets = [ ];
        packages = [ ];
        polkit = false;
        activationScripts = { };
        assertions = [ ];
        warnings = [ ];
      };
    };

    # Someone who wants microvm.nix's host side without blixard says so.
    testHostSideCanStillBeEnabledByHand = {
      expr = (evalHost [ { microvm.host.enable = true; } ]).users.users ? microvm;
      expected = true;
    };

    testEnablingTurnsTheHostSideOn = {
      expr =
        let
          cfg = evalHost [ base ];
        in
        {
          hostEnabled = cfg.microvm.host.enable;
          wrapper = cfg.security.wrappers ? qemu-bridge-helper;
        };
      expected = {
        hostEnabled = true;
        wrapper = true;
      };
    };

    # --- certificates given as path literals reach the store -------------------
    testTlsPathLiteralsReachTheStore = {
      expr =
        let
          credentials =
            (unit (evalHost [
              baseTls
              {
                services.blixard.tls = {
                  caFile = ./fixtures/ca.pem;
                  certFile = ./fixtures/h1.pem;
                  keyFile = "/run/secrets/h1-key.pem";
                };
              }
            ])).LoadCredential;
          ca = lib.head credentials;
          storeFile = lib.removePrefix "ca.pem:" ca;
        in
        {
          inStore = lib.hasPrefix "${builtins.storeDir}/" storeFile && lib.hasSuffix "-ca.pem" storeFile;
          # The string refers to the store path: it is in the system's closure.
          inClosure = builtins.hasContext ca;
          sameFile = builtins.readFile storeFile == builtins.readFile ./fixtures/ca.pem;
          key = lib.last credentials;
        };
      expected = {
        inStore = true;
        inClosure = true;
        sameFile = true;
        key = "key.pem:/run/secrets/h1-key.pem";
      };
    };

    testTlsRuntimePathsStayRuntimePaths = {
      expr =
        (unit (evalHost [
          baseTls
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

    # A key as a path literal would be copied into the world-readable store.
    testKeyFileRejectsAPathLiteral = rejects [
      base
      { services.blixard.tls.keyFile = ./fixtures/ca.pem; }
    ] (cfg: cfg.services.blixard.tls.keyFile);
    testKeyFileRejectsAStorePath = rejects [
      base
      { services.blixard.tls.keyFile = storePath "h1-key.pem"; }
    ] (cfg: cfg.services.blixard.tls.keyFile);
    testClusterSecretRejectsAStorePath = rejects [
      baseTls
      { services.blixard.clusterSecretFile = storePath "cluster-secret"; }
    ] (cfg: cfg.services.blixard.clusterSecretFile);
    testJoinTokenRejectsAStorePath = rejects [
      base
      { services.blixard.joinTokenFile = storePath "token"; }
    ] (cfg: cfg.services.blixard.joinTokenFile);
    testDataDirIsAnAbsoluteRuntimePath = rejects [
      base
      { services.blixard.dataDir = "var/lib/blixard"; }
    ] (cfg: cfg.services.blixard.dataDir);

    # --- addresses the agent would refuse --------------------------------------
    testHostNameInListenAddress =
      failsWith ''services.blixard.listenAddress is "h1.example.org", which is not an IP address''
        [
          base
          {
            services.blixard.listenAddress = lib.mkForce "h1.example.org";
            services.blixard.initialMembers = lib.mkForce { };
          }
        ];
    testListenAddressOctetsAreChecked = failsWith "which is not an IP address" [
      base
      {
        services.blixard.listenAddress = lib.mkForce "10.0.0.256";
        services.blixard.initialMembers = lib.mkForce { };
      }
    ];
    testHostNameInMetricsAddress = failsWith "services.blixard.metricsListenAddress" [
      base
      { services.blixard.metricsListenAddress = "localhost:9464"; }
    ];
    testIpAddressesAreAccepted = {
      expr =
        map
          (
            address:
            failedMessages (evalHost [
              {
                networking.hostName = "h1";
                services.blixard = {
                  enable = true;
                  listenAddress = address;
                  metricsListenAddress = "[::1]:9464";
                };
              }
            ])
          )
          [
            "10.0.0.1"
            "fd00::1"
            "[fd00::1]"
            "2001:db8:0:0:0:0:0:1"
            "::ffff:10.0.0.1"
          ];
      expected = [
        [ ]
        [ ]
        [ ]
        [ ]
        [ ]
      ];
    };

    # The VM tests' guest is a valid microvm.nix guest, on the QEMU from the
    # binary cache.
    testVmTestGuest = {
      expr =
        let
          vmTests = import ../../vm-tests/common.nix {
            self = null;
            inherit lib;
          };
          cfg = evalHost (withVms {
            web = vmTests.vm;
          });
          microvmCfg = cfg.microvm.vms.web.config.config.microvm;
        in
        {
          failed = failedMessages cfg;
          inherit (microvmCfg) cpu hypervisor mem;
          qemu = microvmCfg.qemu.package.name;
          marker = cfg.microvm.vms.web.config.config.systemd.services.blixard-marker.serviceConfig.TTYPath;
        };
      expected = {
        failed = [ ];
        cpu = "max";
        hypervisor = "qemu";
        mem = 384;
        qemu = "qemu-test";
        marker = "/dev/ttyS0";
      };
    };

    # --- the agent's own unit ---------------------------------------------------
    testAgentUnit = {
      expr =
        let
          cfg = evalHost [ base ];
          agent = cfg.systemd.services.blixard;
        in
        {
          inherit (agent.serviceConfig)
            Type
            NotifyAccess
            Restart
            RestartSec
            RestartSteps
            RestartMaxDelaySec
            User
            Group
            StateDirectory
            WatchdogSec
            CPUWeight
            ;
          inherit (agent)
            wantedBy
            stopIfChanged
            startLimitIntervalSec
            wants
            ;
        };
      expected = {
        Type = "notify";
        NotifyAccess = "main";
        Restart = "always";
        RestartSec = "100ms";
        RestartSteps = 8;
        RestartMaxDelaySec = "10s";
        User = "blixard";
        Group = "blixard";
        StateDirectory = "blixard";
        WatchdogSec = "10s";
        CPUWeight = 1000;
        wantedBy = [ "multi-user.target" ];
        stopIfChanged = false;
        startLimitIntervalSec = 0;
        wants = [
          "network-online.target"
          "blixard-guard.service"
        ];
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
      expr = lib.elem "blixard-agent" (map (p: p.name) (evalHost [ base ]).environment.systemPackages);
      expected = true;
    };

    testHardening = {
      expr = {
        inherit (unit (evalHost [ base ]))
          ProtectSystem
          PrivateTmp
          NoNewPrivileges
          UMask
          CapabilityBoundingSet
          ProtectKernelTunables
          ProtectKernelModules
          ProtectKernelLogs
          RestrictNamespaces
          SystemCallFilter
          RestrictAddressFamilies
          PrivateDevices
          ProtectHome
          ;
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
        SystemCallFilter = [
          "@system-service"
          "~@privileged"
        ];
        RestrictAddressFamilies = [
          "AF_UNIX"
          "AF_INET"
          "AF_INET6"
        ];
        PrivateDevices = true;
        ProtectHome = true;
      };
    };

    testPrivilegedPortGetsOnlyBindCapability = {
      expr =
        (unit (evalHost [
          base
          {
            services.blixard.port = 700;
            services.blixard.initialMembers = lib.mkForce { h1 = "10.0.0.1:700"; };
          }
        ])).CapabilityBoundingSet;
      expected = "CAP_NET_BIND_SERVICE";
    };

    # The typed stubs see what NixOS would: two different values for one
    # single-valued unit key do not merge, nor does a Type systemd lacks.
    testConflictingUnitSettingsDoNotMerge = rejects [
      base
      { systemd.services.blixard.serviceConfig.RestartSec = "5s"; }
    ] (cfg: (unit cfg).RestartSec);
    testUnitTypeIsChecked = rejects [
      base
      { systemd.services.blixard.serviceConfig.Type = lib.mkForce "daemon"; }
    ] (cfg: unit cfg);
    testDependencyListsTakeUnitNames = rejects [
      base
      { systemd.services.blixard.after = [ "blixard-guard" ]; }
    ] (cfg: cfg.systemd.services.blixard.after);

    testPolkitGrantsOnlyTheVerbsTheAgentUses = {
      expr =
        let
          rule = (evalHost [ base ]).security.polkit.extraConfig;
        in
        map (text: lib.hasInfix text rule) [
          ''action.id != "org.freedesktop.systemd1.manage-units" || subject.user != "blixard"''
          ''/^microvm@[a-z0-9][a-z0-9-]{0,62}\.service$/.test(unit)''
          ''["start","stop","kill","reset-failed"].indexOf(verb) >= 0''
          ''unit == "blixard-guard.service"''
          ''["start","reset-failed"].indexOf(verb) >= 0''
        ];
      expected = [
        true
        true
        true
        true
        true
      ];
    };

    testHostWatchdog = {
      expr = {
        set =
          (evalHost [
            base
            { services.blixard.hostWatchdog = "30s"; }
          ]).systemd.settings.Manager;
        unset = (evalHost [ base ]).systemd.settings.Manager;
      };
      expected = {
        set.RuntimeWatchdogSec = "30s";
        unset = { };
      };
    };

    # --- the config file --------------------------------------------------------
    testMinimalConfigFile = {
      expr = agentConfig (evalHost [ base ]);
      expected = {
        node_name = "h1";
        listen = "10.0.0.1:7000";
        data_dir = "/var/lib/blixard";
        initial_members = [
          "h1=10.0.0.1:7000"
          "h2=10.0.0.2:7000"
          "h3=10.0.0.3:7000"
        ];
        join = [ ];
        log_level = "info";
        cluster_secret_file = "/run/credentials/blixard.service/cluster-secret";
        runtime = {
          kind = "systemd";
          state_dir = "/var/lib/microvms";
          start_timeout_ms = 160000;
        };
        vm = [ ];
      };
    };

    testStartTimeoutFollowsMicrovmStartupTimeout = {
      expr =
        (agentConfig (evalHost [
          base
          { microvm.host.startupTimeout = 300; }
        ])).runtime.start_timeout_ms;
      expected = 310000;
    };

    testFullConfigFile = {
      expr = agentConfig (evalHost [
        baseTls
        {
          services.blixard = {
            port = 7100;
            initialMembers = lib.mkForce { h1 = "10.0.0.1:7100"; };
            logLevel = "debug";
            metricsListenAddress = "127.0.0.1:9464";
            joinTokenFile = "/run/secrets/join-token";
            capacity = {
              vcpu = 16;
              memory = 65536;
              vcpuOvercommit = 2;
              memoryOvercommit = 1.5;
            };
            labels.rack = "r1";
            tls = {
              caFile = "/etc/blixard/ca.pem";
              certFile = "/etc/blixard/h1.pem";
              keyFile = "/run/secrets/h1-key.pem";
            };
            vms.web = {
              config = guest;
              vcpu = 2;
              memory = 1024;
              labels.tier = "web";
              node = "h1";
              antiAffinity = "frontends";
              desired = "stopped";
              failover = "manual";
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
        runtime = {
          kind = "systemd";
          state_dir = "/var/lib/microvms";
          start_timeout_ms = 160000;
        };
        capacity = {
          vcpu = 16;
          memory_mib = 65536;
          vcpu_overcommit = 2.0;
          memory_overcommit = 1.5;
        };
        labels = {
          rack = "r1";
        };
        tls = {
          ca_file = "/run/credentials/blixard.service/ca.pem";
          cert_file = "/run/credentials/blixard.service/cert.pem";
          key_file = "/run/credentials/blixard.service/key.pem";
        };
        vm = [
          {
            name = "web";
            vcpu = 2;
            memory_mib = 1024;
            labels = {
              tier = "web";
            };
            node = "h1";
            anti_affinity = "frontends";
            desired = "stopped";
            failover = "manual";
          }
        ];
      };
    };

    testOvercommitIsAFloat = {
      expr =
        builtins.isFloat
          (agentConfig (evalHost [
            base
            { services.blixard.capacity.vcpuOvercommit = 3; }
          ])).capacity.vcpu_overcommit;
      expected = true;
    };

    testIpv6ListenAddress = {
      expr =
        (agentConfig (evalHost [
          {
            networking.hostName = "h1";
            services.blixard = {
              enable = true;
              listenAddress = "fd00::1";
              initialMembers.h1 = "[fd00::1]:7000";
            };
          }
        ])).listen;
      expected = "[fd00::1]:7000";
    };

    testSettingsAddsKeys = {
      expr =
        (agentConfig (evalHost [
          base
          { services.blixard.settings.runtime.kind = "process"; }
        ])).runtime.kind;
      expected = "process";
    };

    testRaftVotersOutsideThreeFiveSevenIsRefused =
      failsWith "services.blixard.settings.raft.voters is 4"
        [
          base
          { services.blixard.settings.raft.voters = 4; }
        ];
    testRaftVotersOfFiveIsAccepted = {
      expr =
        let
          cfg = evalHost [
            base
            { services.blixard.settings.raft.voters = 5; }
          ];
        in
        {
          failed = failedMessages cfg;
          inherit ((agentConfig cfg).raft) voters;
        };
      expected = {
        failed = [ ];
        voters = 5;
      };
    };

    testNonSystemdRuntimeWarns = {
      expr =
        lib.length
          (evalHost [
            base
            { services.blixard.settings.runtime.kind = "process"; }
          ]).warnings;
      expected = 1;
    };

    testCustomDataDir = {
      expr =
        let
          cfg = evalHost [
            base
            { services.blixard.dataDir = "/srv/blixard"; }
          ];
        in
        {
          stateDirectory = (unit cfg) ? StateDirectory;
          inherit (unit cfg) ReadWritePaths;
          inherit (cfg.systemd.tmpfiles) rules;
          inherit (agentConfig cfg) data_dir;
          guard = lib.hasInfix "--data-dir /srv/blixard" (guard cfg).serviceConfig.ExecStart;
        };
      expected = {
        stateDirectory = false;
        ReadWritePaths = [ "/srv/blixard" ];
        rules = [ "d /srv/blixard 0700 blixard blixard - -" ];
        data_dir = "/srv/blixard";
        guard = true;
      };
    };

    # The secret is the one credential: nothing else is passed.
    testClusterSecretIsACredential = {
      expr =
        let
          cfg = evalHost [ base ];
        in
        {
          inherit ((unit cfg)) LoadCredential;
          inherit (agentConfig cfg) cluster_secret_file;
        };
      expected = {
        LoadCredential = [ "cluster-secret:/run/secrets/blixard/cluster-secret" ];
        cluster_secret_file = "/run/credentials/blixard.service/cluster-secret";
      };
    };

    testFirewallClosedByDefault = {
      expr = with (evalHost [ base ]).networking.firewall; allowedTCPPorts ++ allowedUDPPorts;
      expected = [ ];
    };

    # TCP for gRPC, UDP for the peers' datagram path, both on the one port.
    testOpenFirewallOpensTheAgentPortOnly = {
      expr =
        let
          firewall =
            (evalHost [
              base
              {
                services.blixard.openFirewall = true;
                services.blixard.metricsListenAddress = "0.0.0.0:9464";
              }
            ]).networking.firewall;
        in
        {
          tcp = firewall.allowedTCPPorts;
          udp = firewall.allowedUDPPorts;
        };
      expected = {
        tcp = [ 7000 ];
        udp = [ 7000 ];
      };
    };

    testMetricsOpenFirewallOpensTheMetricsPort = {
      expr =
        (evalHost [
          base
          {
            services.blixard.metrics.openFirewall = true;
            services.blixard.metricsListenAddress = "0.0.0.0:9464";
          }
        ]).networking.firewall.allowedTCPPorts;
      expected = [ 9464 ];
    };

    testMetricsOpenFirewallNeedsAListener = {
      expr = failedMessages (evalHost [
        base
        { services.blixard.metrics.openFirewall = true; }
      ]);
      expected = [
        ''services.blixard.metrics.openFirewall is set but services.blixard.metricsListenAddress is null: set the listener's address (e.g. "0.0.0.0:9464") or leave the firewall closed.''
      ];
    };

    # A monitoring host that runs no agent: the scrape job and the rules.
    testPrometheusScrapesTheMembersOverHttpsAndInstallsTheRules =
      let
        cfg = evalHost [
          {
            services.blixard.prometheus = {
              enable = true;
              targets = [
                "10.0.0.1:9464"
                "10.0.0.2:9464"
              ];
              caFile = "/etc/blixard/ca.pem";
            };
          }
        ];
        job = lib.head cfg.services.prometheus.scrapeConfigs;
      in
      {
        expr = {
          inherit (cfg.services.prometheus) enable;
          agent = cfg.systemd.services ? blixard;
          inherit (job) job_name scheme;
          targets = map (s: s.targets) job.static_configs;
          ca = job.tls_config.ca_file;
          rules = map (f: baseNameOf (toString f)) cfg.services.prometheus.ruleFiles;
          rulesExist = lib.all builtins.pathExists cfg.services.prometheus.ruleFiles;
          failed = failedMessages cfg;
        };
        expected = {
          enable = true;
          agent = false;
          job_name = "blixard";
          scheme = "https";
          targets = [
            [
              "10.0.0.1:9464"
              "10.0.0.2:9464"
            ]
          ];
          ca = "/etc/blixard/ca.pem";
          rules = [ "blixard.rules.yml" ];
          rulesExist = true;
          failed = [ ];
        };
      };

    testPrometheusWithoutTlsOrRulesAndWithoutTargetsIsRefused = {
      expr =
        let
          cfg = evalHost [
            {
              services.blixard.prometheus = {
                enable = true;
                alertRules = false;
              };
            }
          ];
        in
        {
          scheme = (lib.head cfg.services.prometheus.scrapeConfigs).scheme;
          rules = cfg.services.prometheus.ruleFiles;
          failed = failedMessages cfg;
        };
      expected = {
        scheme = "http";
        rules = [ ];
        failed = [
          "services.blixard.prometheus.enable is set but services.blixard.prometheus.targets is empty: list every member's metrics listener (host:port)."
        ];
      };
    };

    testPrometheusIsOffByDefault = {
      expr = (evalHost [ base ]).services.prometheus;
      expected = {
        enable = false;
        ruleFiles = [ ];
        scrapeConfigs = [ ];
      };
    };

    # --- guests -----------------------------------------------------------------
    testVmsBecomeMicrovmsThatNeitherAutostartNorRestartOnSwitch = {
      expr =
        lib.mapAttrs (_: vm: { inherit (vm) autostart restartIfChanged; })
          (evalHost (withVms {
            web.config = guest;
            db.flake = fakeFlake;
          })).microvm.vms;
      expected = {
        web = {
          autostart = false;
          restartIfChanged = false;
        };
        db = {
          autostart = false;
          restartIfChanged = false;
        };
      };
    };

    # microvm.nix renders restartIfChanged into its per-guest drop-in.
    testGuestDropInDoesNotRestartOnSwitch = {
      expr =
        (evalHost (withVms {
          web.config = guest;
        })).systemd.services."microvm@web".serviceConfig.X-RestartIfChanged;
      expected = [
        ""
        false
      ];
    };

    testVmSizeIsSetInTheGuest = {
      expr = {
        inherit
          ((evalHost (withVms {
            web = {
              config = guest;
              vcpu = 2;
              memory = 1024;
            };
          })).microvm.vms.web.config.config.microvm
          )
          vcpu
          mem
          ;
      };
      expected = {
        vcpu = 2;
        mem = 1024;
      };
    };

    testGuestConfigIsKept = {
      expr =
        (evalHost (withVms {
          web.config = guest // {
            services.nginx.enable = true;
          };
        })).microvm.vms.web.config.config.services.nginx.enable;
      expected = true;
    };

    testGuestArgumentsPassThrough = {
      expr =
        let
          vm =
            (evalHost (withVms {
              web = {
                config =
                  { role, ... }:
                  guest // { networking.hostName = "web-${role}"; };
                specialArgs.role = "frontend";
                extraModules = [ { microvm.mem = 768; } ];
              };
            })).microvm.vms.web;
        in
        {
          inherit (vm.config.config.networking) hostName;
          inherit (vm.config.config.microvm) mem;
        };
      expected = {
        hostName = "web-frontend";
        mem = 768;
      };
    };

    testVmEntryTakesTheGuestsNumbers = {
      expr =
        (agentConfig (
          evalHost (withVms {
            web = {
              config = guest;
              vcpu = 2;
              memory = 1024;
            };
            small.config = guest;
            sized.config = guest // {
              microvm.mem = 768;
            };
          })
        )).vm;
      expected = [
        {
          name = "sized";
          vcpu = 1;
          memory_mib = 768;
          desired = "running";
          failover = "auto";
        }
        {
          name = "small";
          vcpu = 1;
          memory_mib = 512;
          desired = "running";
          failover = "auto";
        }
        {
          name = "web";
          vcpu = 2;
          memory_mib = 1024;
          desired = "running";
          failover = "auto";
        }
      ];
    };

    testFlakeGuest = {
      expr =
        let
          cfg = evalHost (withVms {
            db = {
              flake = fakeFlake;
              memory = 4096;
            };
          });
        in
        {
          inherit (agentConfig cfg) vm;
          flake = "${cfg.microvm.vms.db.flake}";
          config = cfg.microvm.vms.db.config;
          failed = failedMessages cfg;
        };
      expected = {
        vm = [
          {
            name = "db";
            vcpu = 4;
            memory_mib = 4096;
            desired = "running";
            failover = "auto";
          }
        ];
        flake = storePath "guests-source";
        config = null;
        failed = [ ];
      };
    };

    testAgentStartsAfterRunnersAreInstalled = {
      expr =
        (evalHost (withVms {
          web.config = guest;
        })).systemd.services.blixard.after;
      expected = [
        "network-online.target"
        "blixard-guard.service"
        "install-microvm-web.service"
      ];
    };

    testHostThatJoinsBySeeds = {
      expr =
        let
          joiner = extra: {
            networking.hostName = "h4";
            services.blixard = {
              enable = true;
              listenAddress = "10.0.0.4";
              join = [ "10.0.0.1:7000" ];
            }
            // extra;
          };
          cfg = evalHost [ (joiner { }) ];
        in
        {
          failed = failedMessages cfg;
          inherit (agentConfig cfg) initial_members join;
          # Without TLS or a token file the cluster would refuse it: warned.
          warned = lib.any (lib.hasInfix "joinTokenFile") cfg.warnings;
          warnedWithToken = (evalHost [ (joiner { joinTokenFile = "/run/secrets/join-token"; }) ]).warnings;
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
      expr = failedMessages (evalHost [
        {
          networking.hostName = "h4";
          services.blixard = {
            enable = true;
            listenAddress = "10.0.0.4";
          };
        }
      ]);
      expected = [ ];
    };

    # --- other microvm.nix guests would be stopped by the agent -----------------
    testUnmanagedMicrovmGuestIsRefused =
      failsWith "microvm.vms has legacy, which services.blixard.vms does not declare"
        [
          base
          {
            microvm.vms.legacy = {
              config = guest;
              autostart = false;
            };
          }
        ];
    testMicrovmAutostartIsRefused = failsWith "microvm.autostart is [ imperative ]" [
      base
      { microvm.autostart = [ "imperative" ]; }
    ];
    testManagedGuestForcedToAutostartIsRefused = failsWith "microvm.autostart is [ web ]" [
      base
      {
        services.blixard.vms.web.config = guest;
        microvm.vms.web.autostart = lib.mkForce true;
      }
    ];

    # Bad values fail with our messages.
    testBadNodeName = failsWith ''services.blixard.nodeName "H1_x" is not a valid node name'' [
      base
      {
        services.blixard.nodeName = "H1_x";
        services.blixard.initialMembers = lib.mkForce { };
      }
    ];
    testBadVmName = failsWith ''services.blixard.vms."Web": "Web" is not a valid VM name'' (withVms {
      Web.config = guest;
    });
    testVmNeedsConfigOrFlake =
      failsWith "set exactly one of `config` (a NixOS module) and `flake`"
        (withVms {
          web = { };
        });
    testBadVmNode = failsWith ''services.blixard.vms.web.node "H2" is not a valid node name'' (withVms {
      web = {
        config = guest;
        node = "H2";
      };
    });
    testFlakeGuestSizeMismatch =
      failsWith "the flake's nixosConfigurations.db has microvm.vcpu = 4"
        (withVms {
          db = {
            flake = fakeFlake;
            vcpu = 2;
          };
        });
    testFlakeGuestTakesNoModuleArguments = failsWith "only apply to a `config` guest" (withVms {
      db = {
        flake = fakeFlake;
        specialArgs.x = 1;
      };
    });
    testListenAddressRequired = failsWith "services.blixard.listenAddress is not set" [
      {
        networking.hostName = "h1";
        services.blixard.enable = true;
      }
    ];
    testWildcardListenAddress = {
      expr = lib.any (lib.hasInfix "but peers connect to it") (
        failedMessages (evalHost [
          base
          {
            services.blixard.listenAddress = lib.mkForce "0.0.0.0";
            services.blixard.initialMembers = lib.mkForce { };
          }
        ])
      );
      expected = true;
    };
    testInitialMembersMustNameThisHost =
      failsWith ''services.blixard.initialMembers does not name this host "h4"''
        [
          base
          { networking.hostName = lib.mkForce "h4"; }
        ];
    testOwnMemberAddressMustBeTheListenAddress =
      failsWith
        ''services.blixard.initialMembers.h1 is "10.0.0.1:7000" but this host listens on "10.0.0.9:7000"''
        [
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
    testClusterSecretOrTls = failsWith "set one of them" [
      base
      {
        services.blixard.tls = {
          caFile = ./fixtures/ca.pem;
          certFile = ./fixtures/h1.pem;
          keyFile = "/run/secrets/h1-key.pem";
        };
      }
    ];
    testFounderNeedsCredentials = failsWith "has no credentials" [ baseTls ];
    testInsecureFounderHasNoCredentials = {
      expr =
        let
          cfg = evalHost [
            baseTls
            { services.blixard.settings.insecure = true; }
          ];
        in
        {
          failed = failedMessages cfg;
          inherit ((unit cfg)) LoadCredential;
        };
      expected = {
        failed = [ ];
        LoadCredential = [ ];
      };
    };
    testTlsAllOrNone = failsWith "set all of caFile, certFile and keyFile, or none of them" [
      base
      { services.blixard.tls.certFile = "/etc/blixard/h1.pem"; }
    ];
    testOvercommitBelowOne =
      failsWith "services.blixard.capacity.memoryOvercommit must be at least 1.0"
        [
          base
          { services.blixard.capacity.memoryOvercommit = 0.5; }
        ];
    testStateDirMustBeMicrovms = failsWith "differs from microvm.stateDir" [
      base
      { services.blixard.stateDir = "/srv/microvms"; }
    ];
    testHostSideDisabledByHand = failsWith "microvm.host.enable is false" [
      base
      { microvm.host.enable = false; }
    ];

    # Type errors.
    testDesiredIsRunningOrStopped = rejects (withVms {
      web = {
        config = guest;
        desired = "paused";
      };
    }) (cfg: cfg.services.blixard.vms.web.desired);
    testFailoverIsAutoOrManual = rejects (withVms {
      web = {
        config = guest;
        failover = "sometimes";
      };
    }) (cfg: cfg.services.blixard.vms.web.failover);
    testPortIsAPort = rejects [
      base
      { services.blixard.port = 70000; }
    ] (cfg: cfg.services.blixard.port);
    # The real microvm.nix guest options check what a guest sets.
    testGuestOptionsAreMicrovmsOwn = rejects (withVms {
      web.config = guest // {
        microvm.hypervisor = "vmware";
      };
    }) (cfg: cfg.microvm.vms.web.config.config.microvm.hypervisor);
  };

  failures = lib.runTests tests;
in
{
  total = lib.length (lib.filter (lib.hasPrefix "test") (lib.attrNames tests));
  inherit failures;
}

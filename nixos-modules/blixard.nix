# services.blixard: the blixard-agent daemon and the cluster's declared guests.
#
# Every host of a cluster imports this module with (mostly) the same settings.
# It needs microvm.nix's host module (`microvm.nixosModules.host`) for
# `microvm.vms`: the flake's `nixosModules.default` imports both, its
# `nixosModules.blixard` only this one (for a configuration that imports
# microvm.nix itself).
#
# When enabled, the module writes the agent's TOML config from the typed
# options below (plus the freeform `settings`), runs the agent as the
# unprivileged user `blixard` and lets that user start, stop and kill
# `microvm@<name>.service` through polkit, nothing else; and it runs the fence
# guard (`blixard-guard.service`: root, no network) that every guest is bound
# to. The agent manages every microvm@ guest of its host and stops those the
# cluster does not know, so every `microvm.vms` guest must be declared here.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib) mkOption types literalExpression;

  cfg = config.services.blixard;
  format = pkgs.formats.toml { };

  # Node and VM names: safe in a systemd unit name, a path and DNS.
  namePattern = "[a-z0-9][a-z0-9-]{0,62}";
  validName = name: builtins.match namePattern name != null;
  nameRule = "lowercase letters, digits and '-', starting with a letter or digit, at most 63 characters";

  # IP literals, as the agent's `listen` and `metrics_listen` take them (Rust's
  # SocketAddr): a host name there would make the agent refuse to start.
  validIpv4 =
    text:
    let
      octets = builtins.match "([0-9]{1,3})\\.([0-9]{1,3})\\.([0-9]{1,3})\\.([0-9]{1,3})" text;
    in
    octets != null && lib.all (o: lib.toInt o <= 255 && (o == "0" || !lib.hasPrefix "0" o)) octets;
  # Eight hex groups, or fewer around one "::"; the last two may be an IPv4
  # address. No zone index (the agent takes none).
  validIpv6 =
    text:
    let
      halves = lib.splitString "::" text;
      groupsOf = half: if half == "" then [ ] else lib.splitString ":" half;
      groups = lib.concatMap groupsOf halves;
      last = lib.last groups;
      tailIsV4 = groups != [ ] && validIpv4 last;
      hexGroups = if tailIsV4 then lib.init groups else groups;
      width = lib.length hexGroups + (if tailIsV4 then 2 else 0);
      hexOk = lib.all (g: builtins.match "[0-9A-Fa-f]{1,4}" g != null) hexGroups;
    in
    lib.hasInfix ":" text
    && lib.length halves <= 2
    && hexOk
    && (if lib.length halves == 2 then width <= 7 else width == 8);
  # The port of `metricsListenAddress` ("IP:port", IPv6 in brackets).
  metricsPort = lib.toInt (lib.last (lib.splitString ":" cfg.metricsListenAddress));
  bare = address: lib.removeSuffix "]" (lib.removePrefix "[" address);
  validIp = address: validIpv4 address || validIpv6 (bare address);
  # "IP:PORT" with IPv6 in brackets.
  validSocketAddress =
    text:
    let
      v4 = builtins.match "([0-9.]+):([0-9]{1,5})" text;
      v6 = builtins.match "\\[([^]]+)]:([0-9]{1,5})" text;
      portOk = port: lib.toInt port > 0 && lib.toInt port <= 65535;
    in
    (v4 != null && validIpv4 (lib.head v4) && portOk (lib.last v4))
    || (v6 != null && validIpv6 (lib.head v6) && portOk (lib.last v6));

  # "host:port" or "[v6]:port": members and seeds may be host names.
  validEndpoint =
    endpoint: builtins.match "(\\[[0-9A-Fa-f:.]+]|[^]:/ []+):[0-9]{1,5}" endpoint != null;
  withPort =
    address: port:
    if lib.hasInfix ":" address && !lib.hasPrefix "[" address then
      "[${address}]:${toString port}"
    else
      "${address}:${toString port}";
  listen = withPort cfg.listenAddress cfg.port;

  # Secrets reach the agent through systemd credentials, never the store.
  credentialsDir = "/run/credentials/blixard.service";

  tlsFiles = with cfg.tls; [
    caFile
    certFile
    keyFile
  ];
  tlsEnabled = lib.all (file: file != null) tlsFiles;
  tlsPartial = !tlsEnabled && lib.any (file: file != null) tlsFiles;
  # Where this host's certificate comes from (or `insecure`, which the
  # agent accepts on a loopback address only); a host that joins with a
  # token has none until it is admitted.
  hasCredentials = cfg.clusterSecretFile != null || tlsEnabled || (cfg.settings.insecure or false);

  # The guest's evaluated NixOS configuration: the one microvm.nix evaluates
  # (and then builds), so reading its size here evaluates nothing twice.
  guestOf =
    name: vm:
    if vm.flake != null then
      vm.flake.nixosConfigurations.${name}.config
    else
      config.microvm.vms.${name}.config.config;

  vmEntry =
    name: vm:
    let
      guest = (guestOf name vm).microvm;
    in
    {
      inherit name;
      inherit (guest) vcpu;
      memory_mib = guest.mem;
      inherit (vm) desired failover;
    }
    // lib.optionalAttrs (vm.labels != { }) { inherit (vm) labels; }
    // lib.optionalAttrs (vm.node != null) { inherit (vm) node; }
    // lib.optionalAttrs (vm.antiAffinity != null) { anti_affinity = vm.antiAffinity; };

  capacity =
    lib.optionalAttrs (cfg.capacity.vcpu != null) { inherit (cfg.capacity) vcpu; }
    // lib.optionalAttrs (cfg.capacity.memory != null) { memory_mib = cfg.capacity.memory; }
    # `* 1.0` makes an integer ratio a TOML float.
    // lib.optionalAttrs (cfg.capacity.vcpuOvercommit != null) {
      vcpu_overcommit = cfg.capacity.vcpuOvercommit * 1.0;
    }
    // lib.optionalAttrs (cfg.capacity.memoryOvercommit != null) {
      memory_overcommit = cfg.capacity.memoryOvercommit * 1.0;
    };

  configFile = format.generate "blixard-agent.toml" cfg.settings;
  exe = lib.getExe cfg.package;

  # The guard reads the same timing as the agent: passed only when set, so that
  # both fall back to the same built-in defaults otherwise.
  timing = cfg.settings.timing or { };
  guardFlags = lib.concatLists (
    lib.mapAttrsToList (
      key: flag:
      lib.optionals (timing ? ${key}) [
        flag
        (toString timing.${key})
      ]
    ) guardTimingFlags
  );
  guardTimingFlags = {
    fence_after_ms = "--fence-after-ms";
    stop_max_ms = "--stop-max-ms";
    check_interval_ms = "--check-interval-ms";
  };
  # As the agent computes it for the guard it starts on a host set up by hand.
  guardWatchdogMs = (timing.fence_after_ms or 1500) + (timing.check_interval_ms or 100);
  guardCommand =
    extra:
    lib.escapeShellArgs (
      [
        exe
        "guard"
      ]
      ++ extra
      ++ [
        "--data-dir"
        cfg.dataDir
        "--state-dir"
        cfg.stateDir
        "--runtime"
        "systemd"
      ]
      ++ guardFlags
    );

  # The sandbox both units share, after nixpkgs' headscale unit. The systemd
  # runtime needs no device (guests are started by systemd as microvm@ units,
  # not by the agent), nor does the guard.
  hardening = {
    NoNewPrivileges = true;
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectHostname = true;
    ProtectClock = true;
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
    ];
    SystemCallErrorNumber = "EPERM";
    UMask = "0077";
  };

  # The agent needs no capability unless it binds a privileged port.
  capabilities = lib.optional (cfg.port < 1024) "CAP_NET_BIND_SERVICE";

  dataDirUnderVarLib = lib.hasPrefix "/var/lib/" cfg.dataDir;

  # Guests in microvm.vms that services.blixard.vms does not declare.
  unmanagedGuests = lib.filter (name: !(cfg.vms ? ${name})) (lib.attrNames config.microvm.vms);

  # Implication helpers for assertions about every guest / member.
  forEachVm = f: lib.mapAttrsToList f cfg.vms;

  # The verbs (systemd's polkit detail "verb" of manage-units) the agent may use:
  # StartUnit, StopUnit, KillUnit and ResetFailedUnit on guests; the guard it
  # only starts.
  microvmVerbs = builtins.toJSON [
    "start"
    "stop"
    "kill"
    "reset-failed"
  ];
  guardVerbs = builtins.toJSON [
    "start"
    "reset-failed"
  ];

  vmOptions =
    { name, ... }:
    {
      options = {
        config = mkOption {
          type = types.nullOr types.deferredModule;
          default = null;
          example = literalExpression ''
            { pkgs, ... }: {
              microvm.hypervisor = "cloud-hypervisor";
              services.nginx.enable = true;
            }
          '';
          description = ''
            The guest as a NixOS module, exactly as microvm.nix's
            `microvm.vms.${name}.config`. Its size comes from
            {option}`vcpu` and {option}`memory` here; do not also set
            `microvm.vcpu` or `microvm.mem` inside it.
            Exactly one of `config` and `flake` must be set.
          '';
        };

        flake = mkOption {
          type = types.nullOr types.path;
          default = null;
          example = literalExpression "inputs.my-guests";
          description = ''
            A flake whose `nixosConfigurations.${name}` is the guest, as
            microvm.nix's `microvm.vms.${name}.flake`. The guest's size is the
            flake's `microvm.vcpu` and `microvm.mem`.
            Exactly one of `config` and `flake` must be set.
          '';
        };

        specialArgs = mkOption {
          type = types.attrsOf types.unspecified;
          default = { };
          description = ''
            Extra arguments for the guest's NixOS modules, passed to
            microvm.nix's `microvm.vms.${name}.specialArgs`. Only for a
            `config` guest.
          '';
        };

        extraModules = mkOption {
          type = types.listOf types.deferredModule;
          default = [ ];
          description = ''
            Further NixOS modules of the guest, passed to microvm.nix's
            `microvm.vms.${name}.extraModules`. Only for a `config` guest.
          '';
        };

        pkgs = mkOption {
          type = types.nullOr types.unspecified;
          default = null;
          defaultText = literalExpression "null (microvm.nix's default: the host's pkgs)";
          description = ''
            The package set the guest is built with, passed to microvm.nix's
            `microvm.vms.${name}.pkgs`; null keeps microvm.nix's default. Only
            for a `config` guest.
          '';
        };

        vcpu = mkOption {
          type = types.nullOr types.ints.positive;
          default = null;
          example = 2;
          description = ''
            Virtual CPUs. For a `config` guest this sets the guest's
            `microvm.vcpu`; null keeps microvm.nix's default (1). For a `flake`
            guest it must equal the flake's `microvm.vcpu` (or stay null).
            The agent's `[[vm]]` entry always carries the guest's real value.
          '';
        };

        memory = mkOption {
          type = types.nullOr types.ints.positive;
          default = null;
          example = 1024;
          description = ''
            Memory in MiB. For a `config` guest this sets the guest's
            `microvm.mem`; null keeps microvm.nix's default (512). For a `flake`
            guest it must equal the flake's `microvm.mem` (or stay null).
          '';
        };

        labels = mkOption {
          type = types.attrsOf types.str;
          default = { };
          example = {
            tier = "web";
          };
          description = "Placement constraint: the guest only runs on hosts whose labels include all of these.";
        };

        node = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "h1";
          description = "Pin the guest to this node. null lets the scheduler choose.";
        };

        antiAffinity = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "frontends";
          description = "Guests in the same anti-affinity group are placed on different hosts.";
        };

        desired = mkOption {
          type = types.enum [
            "running"
            "stopped"
          ];
          default = "running";
          description = "Whether the cluster should keep the guest running somewhere.";
        };

        failover = mkOption {
          type = types.enum [
            "auto"
            "manual"
          ];
          default = "auto";
          description = ''
            `auto`: when the guest's host is lost, the cluster starts it on
            another host, and a host cut off from the cluster stops it (the
            fence). `manual`: the fence never stops it and the cluster never
            starts it elsewhere by itself; after losing its host it waits, as
            `lost`, for `blixard-agent vm recover`. For guests that must never
            run twice even when a host only seems dead, or that must not be
            stopped by a network fault.
          '';
        };
      };
    };
in
{
  # The Prometheus side (scrape job, alert rules), for agent and monitoring
  # hosts alike.
  imports = [ ./prometheus.nix ];

  options.services.blixard = {
    enable = lib.mkEnableOption "the Blixard agent, which places and runs microvm.nix guests across a cluster of hosts";

    package = lib.mkPackageOption pkgs "blixard-agent" { };

    nodeName = mkOption {
      type = types.str;
      default = config.networking.hostName;
      defaultText = literalExpression "config.networking.hostName";
      description = "This host's name in the cluster (${nameRule}).";
    };

    listenAddress = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "10.0.0.1";
      description = ''
        The IP address the agent's gRPC port binds to (an address, not a host
        name). The other hosts reach this host there, so it must be a concrete
        address of this host, not a wildcard. Required.
      '';
    };

    port = mkOption {
      type = types.port;
      default = 7000;
      description = "The agent's gRPC port: peer traffic and the client API.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open {option}`port` in the firewall, TCP (gRPC) and UDP (the peers' QUIC datagram path); the metrics listener only with {option}`metrics.openFirewall`.";
    };

    dataDir = mkOption {
      type = types.externalPath;
      default = "/var/lib/blixard";
      description = ''
        The agent's state, a runtime path on the host: its Raft log,
        membership and identity. Keep it across reboots; a host whose data dir
        is wiped is a new host.
      '';
    };

    initialMembers = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = {
        h1 = "10.0.0.1:7000";
        h2 = "10.0.0.2:7000";
        h3 = "10.0.0.3:7000";
      };
      description = ''
        The members that bootstrap a new cluster, node name to `address:port`.
        Give every one of them the same value; they form the cluster by
        themselves on first start (only while their data dirs are empty). A
        one-host cluster names just itself. Leave it empty on a host that
        joins an existing cluster later (see {option}`join`).
      '';
    };

    join = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "10.0.0.1:7000"
        "10.0.0.2:7000"
      ];
      description = ''
        Seed addresses (`address:port`) of an existing cluster for a host
        that is not in {option}`initialMembers`. With neither set, the agent
        starts uninitialised and waits for `blixard-agent cluster join ADDRESS`.
      '';
    };

    capacity = {
      vcpu = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = "vCPUs this host offers to guests. null: detected from the host.";
      };
      memory = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = "Memory (MiB) this host offers to guests. null: detected from the host.";
      };
      vcpuOvercommit = mkOption {
        type = types.nullOr types.number;
        default = null;
        example = 4.0;
        description = "Ratio (at least 1.0) of guest vCPUs to the host's vCPU capacity.";
      };
      memoryOvercommit = mkOption {
        type = types.nullOr types.number;
        default = null;
        example = 1.5;
        description = "Ratio (at least 1.0) of guest memory to the host's memory capacity.";
      };
    };

    labels = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = {
        rack = "r1";
      };
      description = "This host's labels, matched against the guests' {option}`vms.<name>.labels`.";
    };

    stateDir = mkOption {
      type = types.externalPath;
      default = toString config.microvm.stateDir;
      defaultText = literalExpression "toString config.microvm.stateDir";
      description = ''
        microvm.nix's state directory, where the agent finds the installed
        runners (`<stateDir>/<name>/current`). Must equal `microvm.stateDir`.
      '';
    };

    tls = {
      caFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = literalExpression "./pki/ca.pem";
        description = ''
          CA certificate (PEM) that signs every host's certificate: a path
          literal such as `./pki/ca.pem` (copied into the Nix store with the
          configuration, which is fine for a certificate) or a runtime path
          string on the host. Set all three TLS files or none.
        '';
      };
      certFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = literalExpression "./pki/h1.pem";
        description = ''
          This host's certificate (PEM), used as server and client
          certificate: a path literal (copied into the store) or a runtime
          path string.
        '';
      };
      keyFile = mkOption {
        type = types.nullOr types.externalPath;
        default = null;
        example = "/run/secrets/blixard/host-key.pem";
        description = ''
          This host's private key (PEM): a runtime path string outside the
          Nix store, e.g. from sops-nix or agenix (a path literal would copy
          the key into the store, which every user can read, and is refused).
          It may be readable by root only: the agent receives it as a systemd
          credential.
        '';
      };
    };

    logLevel = mkOption {
      type = types.str;
      default = "info";
      example = "info,blixard=debug";
      description = "The agent's tracing filter. `RUST_LOG` in the environment overrides it.";
    };

    metricsListenAddress = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "127.0.0.1:9464";
      description = "`IP:port` (IPv6 in brackets) of the metrics, health and dashboard HTTP listener. null: no listener.";
    };

    clusterSecretFile = mkOption {
      type = types.nullOr types.externalPath;
      default = null;
      example = "/run/agenix/blixard-cluster-secret";
      description = ''
        The cluster secret (from `blixard-agent cluster new-secret FILE`),
        the same file on every initial member: the members derive one
        cluster CA from it and authenticate each other with no further
        step. A runtime path outside the Nix store (agenix, sops-nix),
        passed to the agent as a systemd credential. Set this or `tls`;
        a host joining with `joinTokenFile` needs neither.
      '';
    };

    metrics.openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Open the port of {option}`metricsListenAddress` in the firewall, for a
        Prometheus on another host. With {option}`tls` or {option}`clusterSecretFile` set the listener speaks
        HTTPS: `/metrics`, `/healthz` and `/readyz` need no client certificate;
        the dashboard needs one of the cluster CA (read-only or admin). The
        scrape job and the alert rules: {option}`services.blixard.prometheus`.
      '';
    };

    joinTokenFile = mkOption {
      type = types.nullOr types.externalPath;
      default = null;
      example = "/run/secrets/blixard/join-token";
      description = ''
        A file holding the cluster's join token: a runtime path outside the Nix
        store, passed to the agent as a systemd credential.
      '';
    };

    hostWatchdog = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "30s";
      description = ''
        The host's last resort, as systemd's `RuntimeWatchdogSec`: PID 1 pets
        the hardware watchdog, and a hung PID 1 or kernel reboots the host
        after this long (a systemd time span). Without a hardware watchdog,
        load the `softdog` module (`boot.kernelModules = [ "softdog" ];`).
        null leaves systemd's setting alone.
      '';
    };

    settings = mkOption {
      type = types.submodule { freeformType = format.type; };
      default = { };
      description = ''
        The agent's configuration file (TOML), written from the options above.
        Set further keys here as the agent grows them: the agent rejects
        unknown keys, so set only keys the installed agent knows. The fence
        guard takes `timing.fence_after_ms` and `timing.stop_max_ms` (and
        `timing.check_interval_ms`, where the agent has it) from here too, so
        that the two always agree. `raft.voters` (3, 5 or 7; default 5) is how
        many members vote in Raft, the others being learners that run VMs
        and fence all the same; evaluation refuses any other value. Give
        every host the same value: the leader's is the one that counts.
      '';
    };

    vms = mkOption {
      type = types.attrsOf (types.submodule vmOptions);
      default = { };
      example = literalExpression ''
        {
          web = {
            config = ./web.nix;
            vcpu = 2;
            memory = 1024;
            labels.tier = "web";
            antiAffinity = "frontends";
          };
        }
      '';
      description = ''
        The cluster's declared guests (names: ${nameRule}). Give every host the
        same set: each becomes `microvm.vms.<name>` with `autostart = false`
        and `restartIfChanged = false`, so microvm.nix installs its runner on
        every host, and only the agent starts (and, after a new runner is
        installed, restarts) `microvm@<name>.service`, on the host the
        cluster places it on.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion =
          (cfg.settings.raft.voters or null) != null
          -> lib.elem cfg.settings.raft.voters [
            3
            5
            7
          ];
        message = "services.blixard.settings.raft.voters is ${builtins.toJSON cfg.settings.raft.voters}, but the cluster keeps 3, 5 or 7 voters: set one of those (5, the default, tolerates two failed voters) or leave it unset.";
      }
      {
        assertion = cfg.metrics.openFirewall -> cfg.metricsListenAddress != null;
        message = ''services.blixard.metrics.openFirewall is set but services.blixard.metricsListenAddress is null: set the listener's address (e.g. "0.0.0.0:9464") or leave the firewall closed.'';
      }
      {
        assertion = cfg.listenAddress != null;
        message = ''services.blixard.listenAddress is not set: set it to an address of this host that the other hosts can reach, e.g. "10.0.0.1".'';
      }
      {
        assertion =
          cfg.listenAddress != null
          -> !(lib.elem cfg.listenAddress [
            "0.0.0.0"
            "::"
            "[::]"
            ""
          ]);
        message = ''services.blixard.listenAddress is "${toString cfg.listenAddress}", but peers connect to it: set it to a concrete address of this host, e.g. "10.0.0.1".'';
      }
      {
        assertion = cfg.listenAddress != null -> validIp cfg.listenAddress;
        message = ''services.blixard.listenAddress is "${toString cfg.listenAddress}", which is not an IP address: the agent binds to an address, not a host name; set it to this host's address, e.g. "10.0.0.1" or "fd00::1".'';
      }
      {
        assertion = validName cfg.nodeName;
        message = ''services.blixard.nodeName "${cfg.nodeName}" is not a valid node name (${nameRule}); set services.blixard.nodeName (it defaults to networking.hostName).'';
      }
      {
        assertion = cfg.initialMembers != { } -> cfg.initialMembers ? ${cfg.nodeName};
        message = ''services.blixard.initialMembers does not name this host "${cfg.nodeName}": add ${cfg.nodeName} = "${
          if cfg.listenAddress != null then listen else "ADDRESS:PORT"
        }" when it bootstraps the cluster, or leave initialMembers empty on a host that joins later (set services.blixard.join, or run `blixard-agent cluster join`).'';
      }
      {
        assertion =
          cfg.initialMembers ? ${cfg.nodeName} && cfg.listenAddress != null
          -> cfg.initialMembers.${cfg.nodeName} == listen;
        message = ''services.blixard.initialMembers.${cfg.nodeName} is "${
          cfg.initialMembers.${cfg.nodeName} or ""
        }" but this host listens on "${
          if cfg.listenAddress != null then listen else ""
        }" (listenAddress:port): make them the same.'';
      }
      {
        assertion = cfg.initialMembers != { } -> cfg.join == [ ];
        message = "services.blixard: set either initialMembers (hosts that bootstrap the cluster) or join (a host added to a running cluster), not both.";
      }
      {
        assertion = !tlsPartial;
        message = "services.blixard.tls: set all of caFile, certFile and keyFile, or none of them.";
      }
      {
        assertion = cfg.initialMembers != { } -> hasCredentials;
        message = "services.blixard.initialMembers is set but this host has no credentials, and the agent refuses to start without them (peers always authenticate each other): set services.blixard.clusterSecretFile (one secret every member shares, made with `blixard-agent cluster new-secret FILE`) or services.blixard.tls (certificates from an operator CA).";
      }
      {
        assertion = cfg.clusterSecretFile != null -> !tlsEnabled;
        message = "services.blixard.clusterSecretFile and services.blixard.tls are two sources of the members' certificates: set one of them.";
      }
      {
        assertion = cfg.metricsListenAddress != null -> validSocketAddress cfg.metricsListenAddress;
        message = ''services.blixard.metricsListenAddress "${toString cfg.metricsListenAddress}" must be "IP:port" (IPv6 in brackets), e.g. "127.0.0.1:9464": the agent binds to an address, not a host name.'';
      }
      {
        assertion = cfg.capacity.vcpuOvercommit != null -> cfg.capacity.vcpuOvercommit >= 1;
        message = "services.blixard.capacity.vcpuOvercommit must be at least 1.0 (it is ${builtins.toJSON cfg.capacity.vcpuOvercommit}).";
      }
      {
        assertion = cfg.capacity.memoryOvercommit != null -> cfg.capacity.memoryOvercommit >= 1;
        message = "services.blixard.capacity.memoryOvercommit must be at least 1.0 (it is ${builtins.toJSON cfg.capacity.memoryOvercommit}).";
      }
      {
        assertion = cfg.stateDir == toString config.microvm.stateDir;
        message = ''services.blixard.stateDir "${cfg.stateDir}" differs from microvm.stateDir "${toString config.microvm.stateDir}", where microvm.nix installs the runners: set microvm.stateDir instead.'';
      }
      {
        assertion = config.microvm.host.enable;
        message = "microvm.host.enable is false, but services.blixard runs microvm.nix guests: enable microvm.nix's host module (or disable services.blixard).";
      }
      {
        assertion = unmanagedGuests == [ ];
        message = "microvm.vms has ${lib.concatStringsSep ", " unmanagedGuests}, which services.blixard.vms does not declare: the agent manages every microvm@ guest of this host and stops those the cluster does not know. Declare each as services.blixard.vms.<name> (with the same `config` or `flake`) instead of microvm.vms.<name>, or run it on a host without services.blixard.";
      }
      {
        assertion = config.microvm.autostart == [ ];
        message = "microvm.autostart is [ ${lib.concatStringsSep " " config.microvm.autostart} ], but with services.blixard only the agent starts guests (and it stops those the cluster does not place here): remove them from microvm.autostart (and leave microvm.vms.<name>.autostart false); the cluster starts every desired-running guest in services.blixard.vms by itself.";
      }
    ]
    ++ lib.mapAttrsToList (name: address: {
      assertion = validName name && validEndpoint address;
      message = ''services.blixard.initialMembers.${name} = "${address}": the name must be a valid node name (${nameRule}) and the value "address:port", e.g. "10.0.0.1:7000".'';
    }) cfg.initialMembers
    ++ map (seed: {
      assertion = validEndpoint seed;
      message = ''services.blixard.join: "${seed}" is not "address:port", e.g. "10.0.0.1:7000".'';
    }) cfg.join
    ++ lib.concatLists (
      forEachVm (
        name: vm:
        let
          flakeGuest = vm.flake.nixosConfigurations.${name}.config.microvm;
          isFlake = vm.flake != null && vm.config == null;
        in
        [
          {
            assertion = validName name;
            message = ''services.blixard.vms."${name}": "${name}" is not a valid VM name (${nameRule}); rename it.'';
          }
          {
            assertion = (vm.config == null) != (vm.flake == null);
            message = "services.blixard.vms.${name}: set exactly one of `config` (a NixOS module) and `flake` (a flake with nixosConfigurations.${name}).";
          }
          {
            assertion = vm.node != null -> validName vm.node;
            message = ''services.blixard.vms.${name}.node "${toString vm.node}" is not a valid node name (${nameRule}).'';
          }
          {
            assertion = isFlake && vm.vcpu != null -> vm.vcpu == flakeGuest.vcpu;
            message = "services.blixard.vms.${name}.vcpu is ${toString vm.vcpu} but the flake's nixosConfigurations.${name} has microvm.vcpu = ${toString flakeGuest.vcpu}: a flake guest's size comes from the flake, so change it there or leave vcpu unset.";
          }
          {
            assertion = isFlake && vm.memory != null -> vm.memory == flakeGuest.mem;
            message = "services.blixard.vms.${name}.memory is ${toString vm.memory} but the flake's nixosConfigurations.${name} has microvm.mem = ${toString flakeGuest.mem}: a flake guest's size comes from the flake, so change it there or leave memory unset.";
          }
          {
            assertion =
              vm.flake != null -> (vm.specialArgs == { } && vm.extraModules == [ ] && vm.pkgs == null);
            message = "services.blixard.vms.${name}: specialArgs, extraModules and pkgs only apply to a `config` guest (microvm.nix ignores them for a flake guest): set them in the flake's nixosConfigurations.${name} instead.";
          }
        ]
      )
    );

    warnings =
      lib.optional ((cfg.settings.runtime.kind or "systemd") != "systemd")
        ''services.blixard.settings.runtime.kind is "${cfg.settings.runtime.kind}": the unit's sandbox is made for the systemd runtime (no /dev/kvm, no capabilities), so guests started as the agent's children will most likely fail.''
      ++
        lib.optional
          (cfg.initialMembers == { } && !hasCredentials && (cfg.join == [ ] || cfg.joinTokenFile == null))
          "services.blixard has neither clusterSecretFile nor tls, nor join with a joinTokenFile: the agent refuses to start unless this host already joined with a token (its certificate is then in dataDir); set services.blixard.join and services.blixard.joinTokenFile to a file holding a token from `blixard-agent cluster join-token` on a member, or set clusterSecretFile.";

    services.blixard.settings = {
      node_name = cfg.nodeName;
      listen = lib.mkIf (cfg.listenAddress != null) listen;
      data_dir = cfg.dataDir;
      initial_members = lib.mapAttrsToList (name: address: "${name}=${address}") cfg.initialMembers;
      inherit (cfg) join;
      log_level = cfg.logLevel;
      metrics_listen = lib.mkIf (cfg.metricsListenAddress != null) cfg.metricsListenAddress;
      join_token_file = lib.mkIf (cfg.joinTokenFile != null) "${credentialsDir}/join-token";
      cluster_secret_file = lib.mkIf (cfg.clusterSecretFile != null) "${credentialsDir}/cluster-secret";
      runtime = {
        kind = lib.mkDefault "systemd";
        state_dir = cfg.stateDir;
        # microvm.nix's unit gives up on a start after startupTimeout
        # (TimeoutSec); the agent waits 10 s longer, so that systemd's verdict
        # is what it reports.
        start_timeout_ms = lib.mkDefault ((config.microvm.host.startupTimeout + 10) * 1000);
      };
      capacity = lib.mkIf (capacity != { }) capacity;
      labels = lib.mkIf (cfg.labels != { }) cfg.labels;
      tls = lib.mkIf tlsEnabled {
        ca_file = "${credentialsDir}/ca.pem";
        cert_file = "${credentialsDir}/cert.pem";
        key_file = "${credentialsDir}/key.pem";
      };
      vm = lib.mapAttrsToList vmEntry cfg.vms;
    };

    microvm.vms = lib.mapAttrs (name: vm: {
      # Installed on every host, started only by the agent.
      autostart = false;
      # A switch that installs a new runner leaves a running guest alone;
      # the agent restarts it, on its own host only, once `current` points
      # at the new runner (see docs/nixos.md, "Updating guests").
      restartIfChanged = false;
      inherit (vm) flake extraModules specialArgs;
      pkgs = lib.mkIf (vm.pkgs != null) vm.pkgs;
      config = lib.mkIf (vm.config != null) {
        _file = "services.blixard.vms.${name}";
        imports = [ vm.config ];
        # blixard's numbers are the guest's numbers: the scheduler and the
        # hypervisor never disagree.
        microvm.vcpu = lib.mkIf (vm.vcpu != null) vm.vcpu;
        microvm.mem = lib.mkIf (vm.memory != null) vm.memory;
      };
    }) cfg.vms;

    # The client commands read their defaults (endpoint, TLS paths) from here.
    environment.etc."blixard/agent.toml".source = configFile;
    environment.systemPackages = [ cfg.package ];

    networking.firewall.allowedTCPPorts =
      lib.optional cfg.openFirewall cfg.port
      ++ lib.optional (cfg.metrics.openFirewall && cfg.metricsListenAddress != null) metricsPort;
    # The peers' second path (QUIC datagrams for heartbeats and quorum
    # contact) is on the gRPC port number over UDP.
    networking.firewall.allowedUDPPorts = lib.optional cfg.openFirewall cfg.port;

    users.users.blixard = {
      isSystemUser = true;
      group = "blixard";
      description = "Blixard agent";
    };
    users.groups.blixard = { };

    systemd.tmpfiles.rules = lib.optional (
      !dataDirUnderVarLib
    ) "d ${cfg.dataDir} 0700 blixard blixard - -";

    systemd.settings.Manager = lib.mkIf (cfg.hostWatchdog != null) {
      RuntimeWatchdogSec = cfg.hostWatchdog;
    };

    # The agent drives guests over the system bus (StartUnit/StopUnit/KillUnit).
    # Allow exactly those verbs, on microvm.nix's guest units and the guard, to
    # the agent's user: not set-property, freeze, bind, mount-image, ...
    security.polkit.enable = true;
    security.polkit.extraConfig = ''
      // services.blixard: the agent may start, stop and kill microvm.nix guests
      // and start the fence guard, nothing else.
      polkit.addRule(function (action, subject) {
        if (action.id != "org.freedesktop.systemd1.manage-units" || subject.user != "blixard") {
          return polkit.Result.NOT_HANDLED;
        }
        var unit = action.lookup("unit");
        var verb = action.lookup("verb");
        if (/^microvm@${namePattern}\.service$/.test(unit) &&
            ${microvmVerbs}.indexOf(verb) >= 0) {
          return polkit.Result.YES;
        }
        if (unit == "blixard-guard.service" &&
            ${guardVerbs}.indexOf(verb) >= 0) {
          return polkit.Result.YES;
        }
        return polkit.Result.NOT_HANDLED;
      });
    '';

    # No guard, no guest: every guest checks before it starts that the guard
    # runs, and is ordered after it. A check, not a dependency: on systemd 252
    # BindsTo=, Requires= and Requisite= all pass the guard's restart after a
    # crash on to every guest (see the agent's guard module). The agent writes
    # the same for a host set up by hand.
    systemd.services."microvm@" = {
      after = [ "blixard-guard.service" ];
      serviceConfig.ExecStartPre = [
        "${lib.getExe' config.systemd.package "systemctl"} is-active --quiet blixard-guard.service"
      ];
      # A stop waits for qemu to exit. microvm.nix's qemu `microvm-shutdown`
      # sends ctrl-alt-del, then waits by reading stdin, which systemd makes
      # /dev/null: it returns at once and systemd terminates qemu before the
      # guest has shut down (fixed upstream after the revision flake.lock
      # pins, microvm.nix PR 578; the container test bed showed it). The
      # second command waits for the hypervisor itself, so every stop is a
      # clean shutdown, bounded by the unit's TimeoutStopSec (and the agent's
      # stop timeout, after which it kills the guest). Harmless with a
      # microvm-shutdown that waits by itself.
      serviceConfig.ExecStop = lib.mkForce [
        "${toString config.microvm.stateDir}/%i/booted/bin/microvm-shutdown"
        "-${lib.getExe' pkgs.coreutils "tail"} --pid=\${MAINPID} -f /dev/null"
      ];
    };

    # The fence guard: stops this host's guests when its last confirmed quorum
    # contact is older than fence_after, even when the agent is frozen,
    # stopped, crash-looping or gone. No network, no Raft: it reads the
    # agent's `<dataDir>/fence-contact` and `fence-exempt` and talks to PID 1.
    systemd.services.blixard-guard = {
      description = "Blixard fence guard (stops this host's guests without quorum contact)";
      wantedBy = [ "multi-user.target" ];
      # A restart would stop every guest (they are bound to it): a switch never
      # touches it; a changed guard unit takes effect at its next start (boot).
      restartIfChanged = false;
      stopIfChanged = false;
      # Each death runs the stop-post (the fence, when stale): never give up.
      startLimitIntervalSec = 0;
      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = guardCommand [ ];
        # Also when it was killed by its watchdog (frozen): fence now if stale.
        ExecStopPost = guardCommand [ "--fence-if-stale" ];
        Restart = "always";
        RestartSec = "100ms";
        # It pets the watchdog and moves the deadline to the fence deadline
        # plus a check interval (WATCHDOG_USEC); this is the first one. A
        # frozen guard is killed then, and ExecStopPost fences.
        WatchdogSec = "${toString guardWatchdogMs}ms";
        WatchdogSignal = "SIGKILL";
        # The stop-post waits for the guests' kills (SIGKILL at once, gone within seconds).
        TimeoutStopSec = "30s";
        # Ahead of the guests (system-microvm.slice, weight 100) when the CPU is
        # contended: a guard starved by its guests would fence late.
        CPUWeight = 1000;

        # Root, so that stopping guests never depends on polkitd, but little
        # else: no network at all, a read-only view of the system.
        PrivateNetwork = true;
        IPAddressDeny = "any";
        # Relaxed: AF_UNIX for the system bus / PID 1 and sd_notify.
        RestrictAddressFamilies = [ "AF_UNIX" ];
        # Relaxed: CAP_DAC_READ_SEARCH only, to read fence-contact and
        # fence-exempt in the agent's 0700 data dir (root without capabilities
        # is an ordinary uid there). Talking to PID 1 as uid 0 needs none.
        CapabilityBoundingSet = [ "CAP_DAC_READ_SEARCH" ];
        AmbientCapabilities = [ "CAP_DAC_READ_SEARCH" ];
      }
      // hardening;
    };

    systemd.services.blixard =
      let
        installUnits = map (name: "install-microvm-${name}.service") (lib.attrNames cfg.vms);
      in
      {
        description = "Blixard agent (microVM placement)";
        wantedBy = [ "multi-user.target" ];
        # Peers are reached over the network; the declared guests' runners are
        # in place before the agent reports what this host can run; the guard
        # runs before the agent starts guests (they are bound to it).
        wants = [
          "network-online.target"
          "blixard-guard.service"
        ]
        ++ installUnits;
        after = [
          "network-online.target"
          "blixard-guard.service"
        ]
        ++ installUnits;
        # A changed agent is restarted in one step (`systemctl restart`), not
        # stopped before activation and started after it: a switch then costs
        # the cluster one quick restart, well within fence_after, and the
        # guests (separate units) keep running.
        stopIfChanged = false;
        # A crash loop keeps restarting, with a growing back-off, forever.
        startLimitIntervalSec = 0;

        serviceConfig = {
          Type = "notify";
          NotifyAccess = "main";
          # The store path of the config is in ExecStart: a changed config
          # changes the unit, so switching restarts the agent.
          ExecStart = "${exe} run --config ${configFile}";
          Restart = "always";
          RestartSec = "100ms";
          RestartSteps = 8;
          RestartMaxDelaySec = "10s";
          # Longer than a failover (a frozen agent's VMs move before systemd
          # restarts it), short enough that a hung agent is back in seconds.
          WatchdogSec = "10s";
          # Ahead of the guests (system-microvm.slice, weight 100) when they
          # saturate the CPU: an agent starved of it loses quorum contact, and
          # its host fences every guest although nothing failed.
          CPUWeight = 1000;
          User = "blixard";
          Group = "blixard";
          StateDirectory = lib.mkIf dataDirUnderVarLib (lib.removePrefix "/var/lib/" cfg.dataDir);
          StateDirectoryMode = "0700";
          ReadWritePaths = lib.mkIf (!dataDirUnderVarLib) [ cfg.dataDir ];
          # String interpolation, not toString: a certificate given as a path
          # literal is copied into the store and becomes part of the system's
          # closure, so it exists on the host that is deployed to.
          LoadCredential =
            lib.optionals tlsEnabled [
              "ca.pem:${cfg.tls.caFile}"
              "cert.pem:${cfg.tls.certFile}"
              "key.pem:${cfg.tls.keyFile}"
            ]
            ++ lib.optional (cfg.joinTokenFile != null) "join-token:${cfg.joinTokenFile}"
            ++ lib.optional (cfg.clusterSecretFile != null) "cluster-secret:${cfg.clusterSecretFile}";
          LimitNOFILE = 65536;

          # Hardening (the shared part is `hardening`, after nixpkgs' headscale unit).
          CapabilityBoundingSet = lib.concatStringsSep " " capabilities;
          AmbientCapabilities = lib.concatStringsSep " " capabilities;
          PrivateMounts = true;
          ProtectProc = "invisible";
          # Relaxed: no ProcSubset=pid. Without a configured capacity the
          # agent reads /proc/meminfo and /proc/cpuinfo to detect it.
          RemoveIPC = true;
          # Relaxed: AF_UNIX for the system bus (unit control), journald and
          # sd_notify; AF_INET/AF_INET6 for gRPC and metrics.
          RestrictAddressFamilies = [
            "AF_UNIX"
            "AF_INET"
            "AF_INET6"
          ];
          # Not set: PrivateUsers. Polkit judges the agent by its real uid on
          # the system bus, and with no capabilities a user namespace adds
          # little; it would also remap the owners of the runners it reads
          # under the microvm state dir (which stays readable: ProtectSystem
          # makes it read-only, not hidden).
        }
        // hardening;
      };
  };

  meta = {
    doc = ../docs/nixos.md;
    # No nixpkgs maintainer handle: issues go to the project.
    maintainers = [ ];
  };
}

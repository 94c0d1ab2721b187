# services.blixard: the blixard-agent daemon and the cluster's declared guests.
#
# Every host of a cluster imports this module with (mostly) the same settings.
# It needs microvm.nix's host module (`microvm.nixosModules.host`) for
# `microvm.vms`; the flake's `nixosModules.blixard` imports both.
#
# The module writes the agent's TOML config from the typed options below (plus
# the freeform `settings`), runs the agent as the unprivileged user `blixard`
# and lets that user start and stop `microvm@<name>.service` through polkit —
# nothing else.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkOption types literalExpression;

  cfg = config.services.blixard;
  format = pkgs.formats.toml { };

  # Node and VM names: safe in a systemd unit name, a path and DNS.
  namePattern = "[a-z0-9][a-z0-9-]{0,62}";
  validName = name: builtins.match namePattern name != null;
  nameRule = "lowercase letters, digits and '-', starting with a letter or digit, at most 63 characters";

  # "host:port" or "[v6]:port", as the agent's config takes it.
  validEndpoint = endpoint: builtins.match "(\\[[0-9A-Fa-f:.]+]|[^]:/ []+):[0-9]{1,5}" endpoint != null;
  withPort = address: port:
    if lib.hasInfix ":" address && !lib.hasPrefix "[" address
    then "[${address}]:${toString port}"
    else "${address}:${toString port}";
  listen = withPort cfg.listenAddress cfg.port;

  # Secrets reach the agent through systemd credentials, never the store.
  credentialsDir = "/run/credentials/blixard.service";
  inStore = path: lib.hasPrefix "${builtins.storeDir}/" (toString path);

  tlsFiles = with cfg.tls; [ caFile certFile keyFile ];
  tlsEnabled = lib.all (file: file != null) tlsFiles;
  tlsPartial = !tlsEnabled && lib.any (file: file != null) tlsFiles;

  # The guest's evaluated NixOS configuration: the one microvm.nix evaluates
  # (and then builds), so reading its size here evaluates nothing twice.
  guestOf = name: vm:
    if vm.flake != null
    then vm.flake.nixosConfigurations.${name}.config
    else config.microvm.vms.${name}.config.config;

  vmEntry = name: vm:
    let
      guest = (guestOf name vm).microvm;
    in
    {
      inherit name;
      inherit (guest) vcpu;
      memory_mib = guest.mem;
      inherit (vm) desired;
    }
    // lib.optionalAttrs (vm.labels != { }) { inherit (vm) labels; }
    // lib.optionalAttrs (vm.node != null) { inherit (vm) node; }
    // lib.optionalAttrs (vm.antiAffinity != null) { anti_affinity = vm.antiAffinity; };

  capacity =
    lib.optionalAttrs (cfg.capacity.vcpu != null) { inherit (cfg.capacity) vcpu; }
    // lib.optionalAttrs (cfg.capacity.memory != null) { memory_mib = cfg.capacity.memory; }
    # `* 1.0` makes an integer ratio a TOML float.
    // lib.optionalAttrs (cfg.capacity.vcpuOvercommit != null) { vcpu_overcommit = cfg.capacity.vcpuOvercommit * 1.0; }
    // lib.optionalAttrs (cfg.capacity.memoryOvercommit != null) { memory_overcommit = cfg.capacity.memoryOvercommit * 1.0; };

  configFile = format.generate "blixard-agent.toml" cfg.settings;

  # The agent needs no capability unless it binds a privileged port.
  capabilities = lib.optional (cfg.port < 1024) "CAP_NET_BIND_SERVICE";

  dataDirUnderVarLib = lib.hasPrefix "/var/lib/" cfg.dataDir;

  # Implication helpers for assertions about every guest / member.
  forEachVm = f: lib.mapAttrsToList f cfg.vms;

  vmOptions = { name, ... }: {
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
        example = { tier = "web"; };
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
        type = types.enum [ "running" "stopped" ];
        default = "running";
        description = "Whether the cluster should keep the guest running somewhere.";
      };
    };
  };
in
{
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
        The address the agent's gRPC port binds to. The other hosts reach this
        host there, so it must be a concrete address of this host, not a
        wildcard. Required.
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
      description = "Open {option}`port` in the firewall (the metrics listener is never opened).";
    };

    dataDir = mkOption {
      type = types.str;
      default = "/var/lib/blixard";
      description = ''
        The agent's state: its Raft log, membership and identity. Keep it
        across reboots; a host whose data dir is wiped is a new host.
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
      example = [ "10.0.0.1:7000" "10.0.0.2:7000" ];
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
      example = { rack = "r1"; };
      description = "This host's labels, matched against the guests' {option}`vms.<name>.labels`.";
    };

    stateDir = mkOption {
      type = types.str;
      default = config.microvm.stateDir or "/var/lib/microvms";
      defaultText = literalExpression ''config.microvm.stateDir or "/var/lib/microvms"'';
      description = ''
        microvm.nix's state directory, where the agent finds the installed
        runners (`<stateDir>/<name>/current`). Must equal `microvm.stateDir`.
      '';
    };

    tls = {
      caFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "CA certificate (PEM) that signs every host's certificate. Set all three TLS files or none.";
      };
      certFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "This host's certificate (PEM), used as server and client certificate.";
      };
      keyFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/run/secrets/blixard/host-key.pem";
        description = ''
          This host's private key (PEM): a runtime path outside the Nix store,
          e.g. from sops-nix or agenix. It may be readable by root only: the
          agent receives it as a systemd credential.
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
      description = "`address:port` of the metrics, health and dashboard HTTP listener. null: no listener.";
    };

    joinTokenFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/blixard/join-token";
      description = ''
        A file holding the cluster's join token: a runtime path outside the Nix
        store, passed to the agent as a systemd credential.
      '';
    };

    settings = mkOption {
      type = types.submodule { freeformType = format.type; };
      default = { };
      description = ''
        The agent's configuration file (TOML), written from the options above.
        Set further keys here as the agent grows them: the agent rejects
        unknown keys, so set only keys the installed agent knows.
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
        same set: each becomes `microvm.vms.<name>` with `autostart = false`,
        so microvm.nix installs its runner on every host, and only the agent
        starts `microvm@<name>.service` on the host the cluster places it on.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.listenAddress != null;
        message = ''services.blixard.listenAddress is not set: set it to an address of this host that the other hosts can reach, e.g. "10.0.0.1".'';
      }
      {
        assertion = cfg.listenAddress != null -> !(lib.elem cfg.listenAddress [ "0.0.0.0" "::" "[::]" "" ]);
        message = ''services.blixard.listenAddress is "${toString cfg.listenAddress}", but peers connect to it: set it to a concrete address of this host, e.g. "10.0.0.1".'';
      }
      {
        assertion = validName cfg.nodeName;
        message = ''services.blixard.nodeName "${cfg.nodeName}" is not a valid node name (${nameRule}); set services.blixard.nodeName (it defaults to networking.hostName).'';
      }
      {
        assertion = cfg.initialMembers != { } -> cfg.initialMembers ? ${cfg.nodeName};
        message = ''services.blixard.initialMembers does not name this host "${cfg.nodeName}": add ${cfg.nodeName} = "${if cfg.listenAddress != null then listen else "ADDRESS:PORT"}" when it bootstraps the cluster, or leave initialMembers empty on a host that joins later (set services.blixard.join, or run `blixard-agent cluster join`).'';
      }
      {
        assertion = cfg.initialMembers ? ${cfg.nodeName} && cfg.listenAddress != null
          -> cfg.initialMembers.${cfg.nodeName} == listen;
        message = ''services.blixard.initialMembers.${cfg.nodeName} is "${cfg.initialMembers.${cfg.nodeName} or ""}" but this host listens on "${if cfg.listenAddress != null then listen else ""}" (listenAddress:port): make them the same.'';
      }
      {
        assertion = cfg.initialMembers != { } -> cfg.join == [ ];
        message = "services.blixard: set either initialMembers (hosts that bootstrap the cluster) or join (a host added to a running cluster), not both.";
      }
      {
        assertion = cfg.dataDir != "" -> lib.hasPrefix "/" cfg.dataDir;
        message = ''services.blixard.dataDir "${cfg.dataDir}" must be an absolute path.'';
      }
      {
        assertion = !tlsPartial;
        message = "services.blixard.tls: set all of caFile, certFile and keyFile, or none of them.";
      }
      {
        assertion = cfg.tls.keyFile != null -> (lib.hasPrefix "/" cfg.tls.keyFile && !inStore cfg.tls.keyFile);
        message = ''services.blixard.tls.keyFile "${toString cfg.tls.keyFile}" must be an absolute runtime path outside the Nix store (which every user can read), e.g. from sops-nix or agenix.'';
      }
      {
        assertion = cfg.joinTokenFile != null -> (lib.hasPrefix "/" cfg.joinTokenFile && !inStore cfg.joinTokenFile);
        message = ''services.blixard.joinTokenFile "${toString cfg.joinTokenFile}" must be an absolute runtime path outside the Nix store (which every user can read).'';
      }
      {
        assertion = cfg.metricsListenAddress != null -> validEndpoint cfg.metricsListenAddress;
        message = ''services.blixard.metricsListenAddress "${toString cfg.metricsListenAddress}" must be "address:port", e.g. "127.0.0.1:9464".'';
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
        assertion = (config ? microvm) -> cfg.stateDir == config.microvm.stateDir;
        message = ''services.blixard.stateDir "${cfg.stateDir}" differs from microvm.stateDir "${config.microvm.stateDir or ""}", where microvm.nix installs the runners: set microvm.stateDir instead.'';
      }
    ]
    ++ lib.mapAttrsToList
      (name: address: {
        assertion = validName name && validEndpoint address;
        message = ''services.blixard.initialMembers.${name} = "${address}": the name must be a valid node name (${nameRule}) and the value "address:port", e.g. "10.0.0.1:7000".'';
      })
      cfg.initialMembers
    ++ map
      (seed: {
        assertion = validEndpoint seed;
        message = ''services.blixard.join: "${seed}" is not "address:port", e.g. "10.0.0.1:7000".'';
      })
      cfg.join
    ++ lib.concatLists (forEachVm (name: vm:
      let
        flakeGuest = vm.flake.nixosConfigurations.${name}.config.microvm;
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
          assertion = vm.flake != null && vm.config == null && vm.vcpu != null -> vm.vcpu == flakeGuest.vcpu;
          message = "services.blixard.vms.${name}.vcpu is ${toString vm.vcpu} but the flake's nixosConfigurations.${name} has microvm.vcpu = ${toString flakeGuest.vcpu}: a flake guest's size comes from the flake, so change it there or leave vcpu unset.";
        }
        {
          assertion = vm.flake != null && vm.config == null && vm.memory != null -> vm.memory == flakeGuest.mem;
          message = "services.blixard.vms.${name}.memory is ${toString vm.memory} but the flake's nixosConfigurations.${name} has microvm.mem = ${toString flakeGuest.mem}: a flake guest's size comes from the flake, so change it there or leave memory unset.";
        }
        {
          assertion = !(lib.elem name (config.microvm.autostart or [ ]));
          message = "microvm.autostart contains ${name}, which services.blixard.vms manages: remove it there; only the agent starts blixard's guests.";
        }
      ]));

    warnings = lib.optional ((cfg.settings.runtime.kind or "systemd") != "systemd")
      ''services.blixard.settings.runtime.kind is "${cfg.settings.runtime.kind}": the unit's sandbox is made for the systemd runtime (no /dev/kvm, no capabilities), so guests started as the agent's children will most likely fail.''
    ++ lib.optional (cfg.join != [ ] && !tlsEnabled && cfg.joinTokenFile == null)
      "services.blixard.join is set without tls or joinTokenFile: without TLS the cluster admits a host only with a one-time token (`blixard-agent cluster join-token` on a member), so set services.blixard.joinTokenFile to a file holding one.";

    services.blixard.settings = {
      node_name = cfg.nodeName;
      listen = lib.mkIf (cfg.listenAddress != null) listen;
      data_dir = cfg.dataDir;
      initial_members = lib.mapAttrsToList (name: address: "${name}=${address}") cfg.initialMembers;
      inherit (cfg) join;
      log_level = cfg.logLevel;
      metrics_listen = lib.mkIf (cfg.metricsListenAddress != null) cfg.metricsListenAddress;
      join_token_file = lib.mkIf (cfg.joinTokenFile != null) "${credentialsDir}/join-token";
      runtime = {
        kind = lib.mkDefault "systemd";
        state_dir = cfg.stateDir;
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

    microvm.vms = lib.mapAttrs
      (name: vm: {
        # Installed on every host, started only by the agent.
        autostart = false;
        inherit (vm) flake;
        config = lib.mkIf (vm.config != null) {
          _file = "services.blixard.vms.${name}";
          imports = [ vm.config ];
          # blixard's numbers are the guest's numbers: the scheduler and the
          # hypervisor never disagree.
          microvm.vcpu = lib.mkIf (vm.vcpu != null) vm.vcpu;
          microvm.mem = lib.mkIf (vm.memory != null) vm.memory;
        };
      })
      cfg.vms;

    # The client commands read their defaults (endpoint, TLS paths) from here.
    environment.etc."blixard/agent.toml".source = configFile;
    environment.systemPackages = [ cfg.package ];

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [ cfg.port ];

    users.users.blixard = {
      isSystemUser = true;
      group = "blixard";
      description = "Blixard agent";
    };
    users.groups.blixard = { };

    systemd.tmpfiles.rules = lib.optional (!dataDirUnderVarLib) "d ${cfg.dataDir} 0700 blixard blixard - -";

    # The agent drives guests over the system bus (StartUnit/StopUnit/KillUnit).
    # Allow exactly that, for microvm.nix's guest units, to the agent's user.
    security.polkit.enable = true;
    security.polkit.extraConfig = ''
      // services.blixard: the agent may manage microvm.nix guests, nothing else.
      polkit.addRule(function (action, subject) {
        if (action.id == "org.freedesktop.systemd1.manage-units" &&
            subject.user == "blixard" &&
            /^microvm@${namePattern}\.service$/.test(action.lookup("unit"))) {
          return polkit.Result.YES;
        }
      });
    '';

    systemd.services.blixard =
      let
        installUnits = map (name: "install-microvm-${name}.service") (lib.attrNames cfg.vms);
      in
      {
        description = "Blixard agent (microVM placement)";
        wantedBy = [ "multi-user.target" ];
        # Peers are reached over the network; the declared guests' runners are
        # in place before the agent reports what this host can run.
        wants = [ "network-online.target" ] ++ installUnits;
        after = [ "network-online.target" ] ++ installUnits;

        serviceConfig = {
          Type = "notify";
          NotifyAccess = "main";
          # The store path of the config is in ExecStart: a changed config
          # changes the unit, so switching restarts the agent. Guests are
          # separate units and keep running across agent restarts.
          ExecStart = "${lib.getExe cfg.package} run --config ${configFile}";
          Restart = "always";
          RestartSec = "2s";
          WatchdogSec = "30s";
          User = "blixard";
          Group = "blixard";
          StateDirectory = lib.mkIf dataDirUnderVarLib (lib.removePrefix "/var/lib/" cfg.dataDir);
          StateDirectoryMode = "0700";
          ReadWritePaths = lib.mkIf (!dataDirUnderVarLib) [ cfg.dataDir ];
          LoadCredential =
            lib.optionals tlsEnabled [
              "ca.pem:${toString cfg.tls.caFile}"
              "cert.pem:${toString cfg.tls.certFile}"
              "key.pem:${cfg.tls.keyFile}"
            ]
            ++ lib.optional (cfg.joinTokenFile != null) "join-token:${cfg.joinTokenFile}";
          LimitNOFILE = 65536;

          # Hardening, after nixpkgs' headscale unit.
          CapabilityBoundingSet = lib.concatStringsSep " " capabilities;
          AmbientCapabilities = lib.concatStringsSep " " capabilities;
          NoNewPrivileges = true;
          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          # The systemd runtime needs no device: guests are started by
          # systemd as microvm@ units, not by the agent.
          PrivateDevices = true;
          PrivateMounts = true;
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectHostname = true;
          ProtectClock = true;
          ProtectProc = "invisible";
          # Relaxed: no ProcSubset=pid. Without a configured capacity the
          # agent reads /proc/meminfo and /proc/cpuinfo to detect it.
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          RemoveIPC = true;
          LockPersonality = true;
          MemoryDenyWriteExecute = true;
          UMask = "0077";
          # Relaxed: AF_UNIX for the system bus (unit control), journald and
          # sd_notify; AF_INET/AF_INET6 for gRPC and metrics.
          RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
          SystemCallArchitectures = "native";
          SystemCallFilter = [ "@system-service" "~@privileged" ];
          SystemCallErrorNumber = "EPERM";
          # Not set: PrivateUsers. Polkit judges the agent by its real uid on
          # the system bus, and with no capabilities a user namespace adds
          # little; it would also remap the owners of the runners it reads
          # under the microvm state dir (which stays readable: ProtectSystem
          # makes it read-only, not hidden).
        };
      };
  };
}

# services.blixard.prometheus: a Prometheus that scrapes the cluster's agents
# (job `blixard`, the job name monitoring/prometheus/blixard.rules.yml and the
# Grafana board monitoring/grafana/blixard.json expect) and evaluates the
# shipped alert rules. Independent of services.blixard.enable: a monitoring
# host that runs no agent imports the module for this alone. The agents'
# side is services.blixard.metricsListenAddress (and metrics.openFirewall).
{ config, lib, ... }:

let
  inherit (lib) mkOption types;
  cfg = config.services.blixard.prometheus;
in
{
  options.services.blixard.prometheus = {
    enable = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Set up this host's Prometheus ({option}`services.prometheus`, enabled
        by default then) for the cluster: a scrape job `blixard` for
        {option}`services.blixard.prometheus.targets` and, with
        {option}`services.blixard.prometheus.alertRules`, the shipped alert rules.
      '';
    };
    targets = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "10.0.0.1:9464"
        "10.0.0.2:9464"
        "10.0.0.3:9464"
      ];
      description = "Every member's metrics listener (`host:port`: its {option}`services.blixard.metricsListenAddress`).";
    };
    caFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/etc/blixard/ca.pem";
      description = ''
        With TLS on the agents: the cluster CA, to scrape them over HTTPS
        (`/metrics` needs no client certificate). null: plain HTTP.
      '';
    };
    alertRules = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Install monitoring/prometheus/blixard.rules.yml into
        {option}`services.prometheus.ruleFiles`: host down, VM failed or lost,
        no quorum, no leader, fenced, fence fired, disk errors, leader
        flapping, agent down or restarting, guests crash-looping.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.targets != [ ];
        message = "services.blixard.prometheus.enable is set but services.blixard.prometheus.targets is empty: list every member's metrics listener (host:port).";
      }
    ];
    services.prometheus.enable = lib.mkDefault true;
    services.prometheus.scrapeConfigs = [
      (
        {
          job_name = "blixard";
          scheme = if cfg.caFile == null then "http" else "https";
          static_configs = [ { inherit (cfg) targets; } ];
        }
        // lib.optionalAttrs (cfg.caFile != null) { tls_config.ca_file = cfg.caFile; }
      )
    ];
    services.prometheus.ruleFiles = lib.optional cfg.alertRules ../monitoring/prometheus/blixard.rules.yml;
  };
}

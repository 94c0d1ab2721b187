# A fourth host without the cluster secret joins with a one-time join token
# issued on a member: the token names the cluster's CA, the host checks it
# before it sends anything, and obtains its member certificate by joining.
# It has `join` seeds and `joinTokenFile` from the start; until the token
# file exists its agent cannot start and systemd keeps retrying.
{ self, lib }:

let
  common = import ./common.nix { inherit self lib; };
in
{
  name = "blixard-join";
  meta.timeout = 3600;

  nodes = {
    h1 = common.founder;
    h2 = common.founder;
    h3 = common.founder;
    h4 =
      { nodes, ... }:
      {
        imports = [ common.host ];
        services.blixard = {
          clusterSecretFile = lib.mkForce null;
          join = [ (common.endpoint nodes.h1) ];
          joinTokenFile = "/root/join-token";
        };
      };
  };

  testScript =
    { nodes, ... }:
    common.python
    + ''
      founders = [h1, h2, h3]
      everyone = founders + [h4]

      start_all()
      for host in founders:
          host.wait_for_unit("blixard.service")
      wait_for_cluster(founders, 3)

      with subtest("a fourth host joins with a one-time token, without the secret"):
          token = h1.succeed("blixard-agent cluster join-token --ttl 10m").strip()
          h4.succeed(f"install -m 600 /dev/null /root/join-token && echo {token} > /root/join-token")
          h4.wait_for_unit("blixard.service", timeout=120)
          wait_for_cluster(everyone, 4)
          h1.succeed(
              "blixard-agent cluster status --json"
              " | jq -e '.members[] | select(.name == \"h4\") | .address == \"${common.endpoint nodes.h4}\"'"
          )
          # The certificate the cluster issued for its own key.
          h4.succeed("test -s /var/lib/blixard/tls/member.pem")

      with subtest("the new member keeps its identity across an agent restart"):
          h4.systemctl("restart blixard.service")
          h4.wait_for_unit("blixard.service")
          wait_for_cluster(everyone, 4)
    '';
}

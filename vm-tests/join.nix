# A fourth host, with neither initialMembers nor join, starts uninitialised
# and becomes a member with `blixard-agent cluster join` and a one-time join
# token issued on a member.
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
    h4 = common.host;
  };

  testScript =
    { nodes, ... }:
    common.python
    + ''
      founders = [h1, h2, h3]
      everyone = founders + [h4]

      start_all()
      for host in everyone:
          host.wait_for_unit("blixard.service")
      wait_for_cluster(founders, 3)

      with subtest("without TLS, joining needs a one-time token"):
          h4.fail("blixard-agent cluster join ${common.endpoint nodes.h1}")

      with subtest("a fourth host joins with `blixard-agent cluster join` and a token"):
          token = h1.succeed("blixard-agent cluster join-token --ttl 10m").strip()
          h4.succeed(f"install -m 600 /dev/null /root/join-token && echo {token} > /root/join-token")
          h4.succeed("blixard-agent cluster join ${common.endpoint nodes.h1} --token-file /root/join-token")
          wait_for_cluster(everyone, 4)
          h1.succeed(
              "blixard-agent cluster status --json"
              " | jq -e '.members[] | select(.name == \"h4\") | .address == \"${common.endpoint nodes.h4}\"'"
          )

      with subtest("the new member keeps its identity across an agent restart"):
          h4.systemctl("restart blixard.service")
          h4.wait_for_unit("blixard.service")
          wait_for_cluster(everyone, 4)
    '';
}

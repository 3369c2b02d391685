#!/usr/bin/env bash
# A NAT testbed in network namespaces (root; iproute2 and iptables), for tests/nat.rs:
#
#   clia 192.168.1.2 ── nata (A's NAT) 11.0.1.2 ─┐
#   clib 192.168.2.2 ── natb (B's NAT) 11.0.2.2 ─┼── inet (router; STUN at 11.0.0.1)
#   srv  10.0.3.2 ── srvnat (1:1 NAT) 11.0.3.2 ──┘
#
# kinlink runs in srv behind a 1:1 NAT (a cloud VM's elastic IP) and learns 11.0.3.2 by STUN
# (turn.public_ip). 11.0.0.0/8 stands for the public internet: the addresses exist only in
# these namespaces, and unlike documentation ranges TURN's default peer policy relays to them.
#
#   testbed.sh up <prefix> <nat-a> <nat-b>      nat: full-cone | port-restricted | symmetric |
#                                               udp-blocked | tcp443-only | signaling-only
#   testbed.sh down <prefix>
# Namespaces are <prefix>-inet, -nata, -natb, -clia, -clib, -srvnat, -srv.
set -euo pipefail
cmd=$1 p=$2
names=(inet nata natb clia clib srvnat srv)
ns() { ip netns exec "$p-$1" "${@:2}"; }

if [ "$cmd" = down ]; then
  for n in "${names[@]}"; do ip netns pids "$p-$n" 2>/dev/null | xargs -r kill -9 2>/dev/null || true; done
  for n in "${names[@]}"; do ip netns del "$p-$n" 2>/dev/null || true; done
  exit 0
fi

nat_a=$3 nat_b=$4
for n in "${names[@]}"; do
  ip netns add "$p-$n"
  ns "$n" ip link set lo up
done

# link <ns1> <if1> <addr1> <ns2> <if2> <addr2>: a veth pair between two namespaces.
link() {
  ip link add name "$2" netns "$p-$1" type veth peer name "$5" netns "$p-$4"
  ns "$1" ip addr add "$3" dev "$2" && ns "$1" ip link set dev "$2" up
  ns "$4" ip addr add "$6" dev "$5" && ns "$4" ip link set dev "$5" up
}
link inet a 11.0.1.1/24 nata wan 11.0.1.2/24
link inet b 11.0.2.1/24 natb wan 11.0.2.2/24
link inet s 11.0.3.1/24 srvnat wan 11.0.3.2/24
link nata lan 192.168.1.1/24 clia eth0 192.168.1.2/24
link natb lan 192.168.2.1/24 clib eth0 192.168.2.2/24
link srvnat lan 10.0.3.1/24 srv eth0 10.0.3.2/24
ns inet ip addr add 11.0.0.1/32 dev lo
for n in inet nata natb srvnat; do ns "$n" sysctl -qw net.ipv4.ip_forward=1; done
ns clia ip route add default via 192.168.1.1
ns clib ip route add default via 192.168.2.1
ns srv ip route add default via 10.0.3.1
ns nata ip route add default via 11.0.1.1
ns natb ip route add default via 11.0.2.1
ns srvnat ip route add default via 11.0.3.1

# kinlink's 1:1 NAT, with hairpinning (a client relaying to the other client's relay address
# sends from kinlink to kinlink's own public address).
ns srvnat iptables -t nat -A PREROUTING -d 11.0.3.2 -j DNAT --to-destination 10.0.3.2
ns srvnat iptables -t nat -A POSTROUTING -o wan -s 10.0.3.2 -j SNAT --to-source 11.0.3.2
ns srvnat iptables -t nat -A POSTROUTING -o lan -s 10.0.3.2 -d 10.0.3.2 -j SNAT --to-source 11.0.3.2

# nat <router> <client-ip> <wan-ip> <kind>
nat() {
  local r=$1 client=$2 wan=$3 kind=$4
  case $kind in
    full-cone)
      # Endpoint-independent mapping and filtering: the source port is kept, and anything
      # arriving on the WAN address goes to the client.
      ns "$r" iptables -t nat -A POSTROUTING -o wan -j SNAT --to-source "$wan"
      ns "$r" iptables -t nat -A PREROUTING -i wan -p udp -j DNAT --to-destination "$client"
      ;;
    port-restricted)
      # Linux's own NAT: endpoint-independent mapping (the port is kept when free),
      # address-and-port-dependent filtering (conntrack lets only replies in).
      ns "$r" iptables -t nat -A POSTROUTING -o wan -j MASQUERADE
      ;;
    symmetric)
      # A new random port for every destination: endpoint-dependent mapping.
      ns "$r" iptables -t nat -A POSTROUTING -o wan -j MASQUERADE --random-fully
      ;;
    udp-blocked)
      ns "$r" iptables -t nat -A POSTROUTING -o wan -j MASQUERADE
      ns "$r" iptables -A FORWARD -i lan -p udp -j DROP
      ;;
    tcp443-only | signaling-only)
      # Only TCP to kinlink's signaling port (8080) and, for tcp443-only, to 443 (TURN over
      # TLS); everything else from the LAN is dropped.
      ns "$r" iptables -t nat -A POSTROUTING -o wan -j MASQUERADE
      ns "$r" iptables -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
      ns "$r" iptables -A FORWARD -i lan -p tcp -d 11.0.3.2 --dport 8080 -j ACCEPT
      [ "$kind" = signaling-only ] || ns "$r" iptables -A FORWARD -i lan -p tcp -d 11.0.3.2 --dport 443 -j ACCEPT
      ns "$r" iptables -A FORWARD -i lan -j DROP
      ;;
    *) echo "unknown NAT kind $kind" >&2; exit 2 ;;
  esac
}
nat nata 192.168.1.2 11.0.1.2 "$nat_a"
nat natb 192.168.2.2 11.0.2.2 "$nat_b"
# Like a home router, drop unsolicited packets addressed to the router itself: accepting
# them would confirm a conntrack entry for the peer's first check that then makes the NAT pick
# another port for the client's own packets to that peer (symmetric behaviour by accident).
for r in nata natb; do
  ns "$r" iptables -A INPUT -i wan -m conntrack --ctstate NEW -j DROP
done

# Sourced by the TURN benchmarks (bash, root): puts the server in a network namespace of its
# own and the generator in another, joined by a veth pair, each side's receive processing
# steered to its own CPU (RPS: the server's to CPU 0, the generator's to CPU 1), as between
# two hosts. Sets NS_FLAGS (turn_bench's flags for it) and GEN (the prefix that runs a
# command in the generator's namespace); the namespaces go when the script exits.
srv=klbench-srv gen=klbench-gen
for ns in $srv $gen; do ip netns del $ns 2>/dev/null || true; ip netns add $ns; ip -n $ns link set lo up; done
trap 'ip netns del '$srv'; ip netns del '$gen EXIT
ip link add klb-srv type veth peer name klb-gen
ip link set klb-srv netns $srv && ip link set klb-gen netns $gen
ip -n $srv addr add 10.77.0.2/24 dev klb-srv && ip -n $gen addr add 10.77.0.1/24 dev klb-gen
ip -n $srv link set klb-srv up && ip -n $gen link set klb-gen up
ip netns exec $srv sh -c 'echo 1 > /sys/class/net/klb-srv/queues/rx-0/rps_cpus'
ip netns exec $gen sh -c 'echo 2 > /sys/class/net/klb-gen/queues/rx-0/rps_cpus'
NS_FLAGS=(--server-netns $srv --server-ip 10.77.0.2 --client-ip 10.77.0.1) GEN=(ip netns exec $gen)
echo "topology: network namespaces over veth, receive work steered by RPS (server CPU 0, generator CPU 1)"

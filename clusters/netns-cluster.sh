#!/usr/bin/env bash
# A Ray cluster on shaped links: the head in the root network namespace, N worker nodes each in its own
# network namespace, joined by veth pairs to a bridge, every link shaped both ways from a node profile
# (clusters/*.yaml: bandwidth and latency per node) with tc. Needs root, `ip` and `tc`.
#
#   sudo bash clusters/netns-cluster.sh start     # prints the GCS address for `rayq train --address`
#   sudo bash clusters/netns-cluster.sh status
#   sudo bash clusters/netns-cluster.sh shape PROFILE   # re-shape the running cluster's links
#   sudo bash clusters/netns-cluster.sh cut I     # node I's link goes down (a partition); its processes stay
#   sudo bash clusters/netns-cluster.sh heal I    # node I's link shaped as before
#   sudo bash clusters/netns-cluster.sh stop      # removes exactly what start made; safe to run twice
#
# Topology: bridge <P>br (<NET>.1/24, the head's address) in the root namespace; namespace <P>w<i> holds
# veth <P>p<i> (<NET>.<10+i>/24), whose peer <P>v<i> is on the bridge. Shaping per node i (tc): on <P>p<i>
# (namespace side, egress = the node's upload) and on <P>v<i> (root side, egress = its download), a netem
# root (delay = half the node's one-way latency, so a hop i->j takes (lat_i + lat_j)/2, as rayq.netsim
# assumes; optional loss) with a tbf child (rate = up or down). A kernel without netem (CONFIG_NET_SCH_NETEM)
# gets the tbf alone: rate is shaped, latency is the path's own (tens of microseconds plus scheduling). Each worker node's `ray start` runs
# inside its namespace with GLOO_SOCKET_IFNAME=<P>p<i>, so gloo's collectives cross the shaped links.
#
# Settings (environment):
#   RAYQ_NETNS_DIR        state dir + the head's Ray temp dir (short: Unix sockets)   [/tmp/rqn-<uid>]
#   RAYQ_NETNS_PREFIX     prefix of namespace, link and bridge names (<= 6 chars)     [rqn]
#   RAYQ_NETNS_NET        the /24 the cluster uses (first three octets)               [10.77.0]
#   RAYQ_WORKERS          worker nodes, one namespace each                            [4]
#   RAYQ_WORKER_CPUS      CPUs each worker node offers (1 = one Ray Train worker)    [1]
#   RAYQ_PROFILE          node profile for the links (name or path)                   [shaped-100m]
#   RAYQ_LOSS             extra packet loss on every link, percent                    [0]
#   RAYQ_GCS_PORT / RAYQ_DASHBOARD_PORT   the head's ports                            [6391 / 8267]
#   RAYQ_OBJECT_STORE_MB  object store per node, MB                                   [200]
# The head offers 0 CPUs (it runs the driver and Ray Train's controller, nothing that computes). Auth
# is off (private addresses only). Never `ray stop`: only the processes of our sessions and namespaces
# are ended.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${RAYQ_NETNS_DIR:-/tmp/rqn-$(id -u)}"
P="${RAYQ_NETNS_PREFIX:-rqn}"
NET="${RAYQ_NETNS_NET:-10.77.0}"
WORKERS="${RAYQ_WORKERS:-4}"
WORKER_CPUS="${RAYQ_WORKER_CPUS:-1}"
PROFILE="${RAYQ_PROFILE:-shaped-100m}"
LOSS="${RAYQ_LOSS:-0}"
GCS_PORT="${RAYQ_GCS_PORT:-6391}"
DASHBOARD_PORT="${RAYQ_DASHBOARD_PORT:-8267}"
OBJECT_STORE_BYTES="$(( ${RAYQ_OBJECT_STORE_MB:-200} * 1000 * 1000 ))"
HEAD_IP="$NET.1"
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
if [ -x "$ROOT/.venv/bin/python" ]; then export PATH="$ROOT/.venv/bin:$PATH"; fi
PYTHON="${RAYQ_PYTHON:-$(command -v python || command -v python3)}"

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
die() { echo "netns-cluster: $*" >&2; exit 1; }
ns() { echo "${P}w$1"; }
node_ip() { echo "$NET.$((10 + $1))"; }

preflight() {  # fail fast, before anything is made, where namespaces are not allowed
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces, veth pairs and tc qdiscs); run it with sudo"
  command -v ip >/dev/null || die "the 'ip' command (iproute2) is missing; install iproute2"
  command -v tc >/dev/null || die "the 'tc' command (iproute2) is missing; install iproute2"
  [ "${#P}" -le 6 ] || die "RAYQ_NETNS_PREFIX=$P is too long; at most 6 characters (link names are <= 15)"
  [[ "$NET" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "RAYQ_NETNS_NET=$NET is invalid; expected three octets, e.g. 10.77.0"
  [[ "$WORKERS" =~ ^[0-9]+$ ]] && [ "$WORKERS" -ge 1 ] && [ "$WORKERS" -le 200 ] \
    || die "RAYQ_WORKERS=$WORKERS is invalid; expected 1..200"
  local probe="${P}probe$$"
  ip netns add "$probe" 2>/dev/null || die "cannot create a network namespace here ('ip netns add' failed: no CAP_SYS_ADMIN, or a container without netns support)"
  ip -n "$probe" link set lo up
  ip netns exec "$probe" tc qdisc add dev lo root handle 1: tbf rate 1mbit burst 64k limit 1m 2>/dev/null \
    || { ip netns del "$probe"; die "tc cannot add a tbf qdisc (CONFIG_NET_SCH_TBF missing from the kernel)"; }
  if ip netns exec "$probe" tc qdisc replace dev lo root netem delay 1ms 2>/dev/null; then NETEM=1; else NETEM=0; fi
  ip netns del "$probe"
  if [ "$NETEM" = 0 ] && [ "$LOSS" != 0 ]; then
    die "RAYQ_LOSS=$LOSS needs netem, which this kernel lacks (CONFIG_NET_SCH_NETEM); use 0, or cut/heal for a partition"
  fi
}

made() { echo "$1 $2" >> "$DIR/made"; }  # what start created, one object a line, removed in reverse

# tc settings per node from the profile: lines "i up_bps down_bps latency_s" (rayq.profiles, seed 0).
plan() {
  "$PYTHON" -m rayq.launch.netns plan "$1" "$WORKERS"
}

shape_dev() {  # shape_dev NETNS|- DEV RATE_BPS DELAY_S LOSS_PCT: netem (delay, loss) root, tbf (rate) child
  local where="$1" dev="$2" rate="$3" delay="$4" loss="$5" run=()
  [ "$where" = - ] || run=(ip netns exec "$where")
  # burst: 1 ms at the rate, at least 64 KiB (a GSO super-packet must fit); queue: 100 ms at the rate.
  local burst limit
  burst="$("$PYTHON" -c "print(max(65536, int($rate / 8 / 1000)))")"
  limit="$("$PYTHON" -c "print(max(4 * 65536, int($rate / 8 * 0.1)))")"
  local usec; usec="$("$PYTHON" -c "print(max(0, round($delay * 1e6)))")"
  if [ "$(cat "$DIR/netem" 2>/dev/null || echo 0)" = 1 ]; then
    "${run[@]}" tc qdisc replace dev "$dev" root handle 1: netem delay "${usec}us" loss "${loss}%" limit 100000
    "${run[@]}" tc qdisc replace dev "$dev" parent 1:1 handle 10: tbf rate "${rate}bit" burst "$burst" limit "$limit"
  else  # no netem in this kernel: rate only; the latency is the path's own (veth + bridge + the CPU)
    "${run[@]}" tc qdisc replace dev "$dev" root handle 1: tbf rate "${rate}bit" burst "$burst" limit "$limit"
  fi
}

apply_shape() {  # apply_shape PROFILE [ONLY_NODE [LOSS]]
  local profile="$1" only="${2:-}" loss="${3:-$LOSS}"
  while read -r i up down lat; do
    [ -z "$only" ] || [ "$only" = "$i" ] || continue
    shape_dev "$(ns "$i")" "${P}p$i" "$up" "$(echo "$lat" | awk '{print $1 / 2}')" "$loss"
    shape_dev - "${P}v$i" "$down" "$(echo "$lat" | awk '{print $1 / 2}')" "$loss"
  done < <(plan "$profile")
  echo "$profile" > "$DIR/profile"
}

free_port() {
  "$PYTHON" -c "import socket; s = socket.socket(); s.bind(('$HEAD_IP', 0)); print(s.getsockname()[1])"
}

# Every process of this cluster: members of our recorded sessions that still name our directory or
# live in our namespaces, everything inside our namespaces, processes naming our directory, and all
# their descendants.
cluster_pids() {
  local inside=""
  if [ -f "$DIR/made" ]; then
    for n in $(awk '$1 == "netns" {print $2}' "$DIR/made"); do
      inside="$inside $(ip netns pids "$n" 2>/dev/null | tr '\n' ' ')"
    done
  fi
  local sids; sids="$(cat "$DIR/sessions" 2>/dev/null | tr '\n' ' ' || true)"
  ps -eo pid=,ppid=,sid=,stat=,args= | RAYQ_MATCH="$DIR/" awk -v sids="$sids" -v inside="$inside" -v self="$$" '
    BEGIN { dir = ENVIRON["RAYQ_MATCH"]; n = split(sids, s, " "); for (i = 1; i <= n; i++) recorded[s[i]] = 1
            m = split(inside, q, " "); for (i = 1; i <= m; i++) ns[q[i]] = 1 }
    $4 ~ /^Z/ || $1 == self { next }
    { n_rows++; pid[n_rows] = $1; ppid[n_rows] = $2; sid[n_rows] = $3
      named[n_rows] = index($0, dir) > 0 || ($1 in ns)
      if (named[n_rows] && ($3 in recorded)) ours[$3] = 1 }
    END {
      for (i = 1; i <= n_rows; i++) if (named[i] || (sid[i] in ours)) keep[pid[i]] = 1
      do { grew = 0; for (i = 1; i <= n_rows; i++) if ((ppid[i] in keep) && !(pid[i] in keep)) { keep[pid[i]] = 1; grew = 1 } } while (grew)
      for (p in keep) print p
    }' | sort -n
}

start_node() {  # start_node NAME NETNS|- ENV... -- ray-start-args...: one `ray start` in a new session
  local name="$1" where="$2"; shift 2
  local envs=()
  while [ "$1" != -- ]; do envs+=("$1"); shift; done; shift
  local run=()
  [ "$where" = - ] || run=(ip netns exec "$where")
  setsid --wait "${run[@]}" env "${envs[@]}" bash -c 'echo $$ >> "$0/sessions"; exec "$@"' "$DIR" ray start \
    --disable-usage-stats --object-store-memory="$OBJECT_STORE_BYTES" "$@" > "$DIR/$name.log" 2>&1 \
    || { echo "netns-cluster: $name failed to start; its output ($DIR/$name.log):" >&2; cat "$DIR/$name.log" >&2; return 1; }
}

cmd_start() {
  preflight
  if [ -s "$DIR/made" ] || [ -n "$(cluster_pids)" ]; then
    die "already running under $DIR (bash $0 stop first)"
  fi
  for obj in "${P}br" "${P}v1"; do
    ! ip link show "$obj" >/dev/null 2>&1 || die "link $obj exists and is not ours (RAYQ_NETNS_PREFIX=$P in use); choose another prefix"
  done
  ! ip netns list | grep -q "^$(ns 1)\b" || die "namespace $(ns 1) exists and is not ours; choose another RAYQ_NETNS_PREFIX"
  ! ip -4 addr show | grep -q " $NET\." || die "addresses in $NET.0/24 are in use here; choose another RAYQ_NETNS_NET"
  mkdir -p "$DIR"
  rm -f "$DIR/sessions" "$DIR/made" "$DIR/address"
  echo "$NETEM" > "$DIR/netem"
  [ "$NETEM" = 1 ] || echo "netns-cluster: this kernel has no netem: links are shaped in rate only (tbf); their latency is the path's own"
  plan "$PROFILE" > /dev/null || die "RAYQ_PROFILE=$PROFILE is not a usable profile (see the error above)"
  trap 'echo "netns-cluster: start failed; removing what it made" >&2; cmd_stop >/dev/null 2>&1 || true' ERR
  ip link add "${P}br" type bridge && made link "${P}br"
  ip addr add "$HEAD_IP/24" dev "${P}br"
  ip link set "${P}br" up
  for i in $(seq 1 "$WORKERS"); do
    ip netns add "$(ns "$i")" && made netns "$(ns "$i")"
    ip link add "${P}v$i" type veth peer name "${P}p$i" netns "$(ns "$i")" && made link "${P}v$i"
    ip link set "${P}v$i" master "${P}br" up
    ip -n "$(ns "$i")" link set lo up
    ip -n "$(ns "$i")" addr add "$(node_ip "$i")/24" dev "${P}p$i"
    ip -n "$(ns "$i")" link set "${P}p$i" up
  done
  apply_shape "$PROFILE"
  local client_port; client_port="$(free_port)"
  local head_ports=(); for _ in 1 2 3 4 5 6; do head_ports+=("$(free_port)"); done
  echo "netns-cluster: head in the root namespace at $HEAD_IP:$GCS_PORT (0 CPUs); $WORKERS worker nodes on $PROFILE links"
  start_node head - RAYQ_NETNS=head -- --head --node-ip-address="$HEAD_IP" --port="$GCS_PORT" \
    --dashboard-host="$HEAD_IP" --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port="$client_port" \
    --node-manager-port="${head_ports[0]}" --object-manager-port="${head_ports[1]}" \
    --dashboard-agent-listen-port="${head_ports[2]}" --dashboard-agent-grpc-port="${head_ports[3]}" \
    --runtime-env-agent-port="${head_ports[4]}" --metrics-export-port="${head_ports[5]}" \
    --min-worker-port=0 --max-worker-port=0 --num-cpus=0 --temp-dir="$DIR"
  for i in $(seq 1 "$WORKERS"); do
    start_node "worker$i" "$(ns "$i")" GLOO_SOCKET_IFNAME="${P}p$i" RAYQ_NETNS="$(ns "$i")" -- \
      --address="$HEAD_IP:$GCS_PORT" --node-ip-address="$(node_ip "$i")" --num-cpus="$WORKER_CPUS"
  done
  trap - ERR
  printf 'RAYQ_GCS=%s:%s\nRAYQ_DASHBOARD=http://%s:%s\nRAYQ_WORKERS=%s\nRAYQ_NETNS_PREFIX=%s\nRAYQ_NETNS_NET=%s\n' \
    "$HEAD_IP" "$GCS_PORT" "$HEAD_IP" "$DASHBOARD_PORT" "$WORKERS" "$P" "$NET" > "$DIR/address"
  cat <<EOF
netns-cluster: up, head + $WORKERS worker nodes ($(for i in $(seq 1 "$WORKERS"); do printf '%s ' "$(node_ip "$i")"; done)), links $PROFILE, state $DIR
  drive it:   RAY_AUTH_MODE=disabled rayq train --address $HEAD_IP:$GCS_PORT --set workers=$WORKERS --set cpus_per_worker=$WORKER_CPUS
  benchmark:  rayq bench links --profile $PROFILE
  stop exactly what was made (sessions $(tr '\n' ' ' < "$DIR/sessions"), namespaces, links, qdiscs): bash $0 stop
EOF
}

cmd_status() {
  if [ ! -s "$DIR/made" ]; then echo "netns-cluster: not running (state dir $DIR)"; return 1; fi
  cat "$DIR/address" 2>/dev/null || true
  echo "profile: $(cat "$DIR/profile" 2>/dev/null || echo '?')"
  echo "sessions: $(tr '\n' ' ' < "$DIR/sessions" 2>/dev/null || true)"
  echo "processes: $(cluster_pids | tr '\n' ' ')"
  echo "made: $(tr '\n' ' ' < "$DIR/made")"
  for n in $(awk '$1 == "netns" {print $2}' "$DIR/made"); do
    local i="${n#"${P}w"}"
    echo "$n up:   $(ip netns exec "$n" tc qdisc show dev "${P}p$i" 2>/dev/null | tr '\n' ';')"
    echo "$n down: $(tc qdisc show dev "${P}v$i" 2>/dev/null | tr '\n' ';')"
  done
}

cmd_shape() {
  [ -s "$DIR/made" ] || die "not running under $DIR; start it first"
  apply_shape "${1:?shape needs a profile}"
  echo "netns-cluster: links shaped from $1"
}

cmd_cut() {  # the bridge side of the node's veth goes down: its namespace side loses carrier, packets are lost
  [ -s "$DIR/made" ] || die "not running under $DIR; start it first"
  grep -q "^link ${P}v${1:?cut needs a node number}\$" "$DIR/made" || die "node $1 is not one of ours"
  ip link set "${P}v$1" down
  echo "netns-cluster: node $1 cut off (its link is down; processes and qdiscs stay)"
}

cmd_heal() {
  [ -s "$DIR/made" ] || die "not running under $DIR; start it first"
  grep -q "^link ${P}v${1:?heal needs a node number}\$" "$DIR/made" || die "node $1 is not one of ours"
  ip link set "${P}v$1" up
  echo "netns-cluster: node $1 healed"
}

cmd_stop() {
  local pids; pids="$(cluster_pids)"
  if [ -n "$pids" ]; then
    echo "netns-cluster: stopping $(echo "$pids" | wc -l) processes: $(echo "$pids" | tr '\n' ' ')"
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 20); do [ -z "$(cluster_pids)" ] && break; sleep 0.5; done
    local left; left="$(cluster_pids)"
    # shellcheck disable=SC2086
    [ -z "$left" ] || kill -KILL $left 2>/dev/null || true
    sleep 0.5
    left="$(cluster_pids)"
    [ -z "$left" ] || { echo "netns-cluster: still running: $(echo "$left" | tr '\n' ' ')" >&2; return 1; }
  fi
  if [ -f "$DIR/made" ]; then
    tac "$DIR/made" | while read -r what name; do
      case "$what" in
        link) ! ip link show "$name" >/dev/null 2>&1 || ip link del "$name" ;;   # qdiscs go with their link
        netns) ! ip netns list | grep -q "^$name\b" || ip netns del "$name" ;;
      esac
    done
  fi
  if [ -z "$pids" ] && [ ! -s "$DIR/made" ]; then echo "netns-cluster: nothing running under $DIR"; fi
  rm -f "$DIR/sessions" "$DIR/made" "$DIR/address" "$DIR/profile" "$DIR/netem"
  echo "netns-cluster: stopped"
}

case "${1:-}" in
  start) cmd_start ;;
  status) cmd_status ;;
  shape) cmd_shape "${2:-}" ;;
  cut) cmd_cut "${2:-}" ;;
  heal) cmd_heal "${2:-}" ;;
  stop) cmd_stop ;;
  *) usage ;;
esac

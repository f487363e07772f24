#!/usr/bin/env bash
# A local multi-process Ray "cluster" on loopback: one head node and N worker nodes, each a separate
# `ray start` with its own ports, in its own Unix session, all under one state directory. `stop` ends
# exactly those processes (never `ray stop`, which kills every Ray process on the machine).
#
#   bash clusters/local-cluster.sh start    # prints the dashboard address for `rayq submit --address`
#   bash clusters/local-cluster.sh status
#   bash clusters/local-cluster.sh stop
#
# Settings (environment):
#   RAYQ_CLUSTER_DIR      state + Ray temp dir, keep it short (Unix sockets: 107 chars)  [/tmp/rayq-<uid>]
#   RAYQ_DASHBOARD_PORT   the head's dashboard / Jobs API port                           [8266]
#   RAYQ_GCS_PORT         the head's GCS port (for `rayq train --address 127.0.0.1:PORT`) [6390]
#   RAYQ_HEAD_CPUS        CPUs the head offers                                           [2]
#   RAYQ_WORKERS          worker nodes besides the head                                  [1]
#   RAYQ_WORKER_CPUS      CPUs each worker node offers                                   [2]
#   RAYQ_OBJECT_STORE_MB  object store per node, MB                                      [200]
#   RAY_AUTH_MODE         `disabled` unless you say `token`; with token, the token comes from
#                         RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (`ray get-auth-token --generate`)
# The nodes run the Python of the project's .venv when there is one (put first on PATH), so jobs'
# `python -m rayq` finds torch and ray.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${RAYQ_CLUSTER_DIR:-/tmp/rayq-$(id -u)}"
DASHBOARD_PORT="${RAYQ_DASHBOARD_PORT:-8266}"
GCS_PORT="${RAYQ_GCS_PORT:-6390}"
HEAD_CPUS="${RAYQ_HEAD_CPUS:-2}"
WORKERS="${RAYQ_WORKERS:-1}"
WORKER_CPUS="${RAYQ_WORKER_CPUS:-2}"
OBJECT_STORE_BYTES="$(( ${RAYQ_OBJECT_STORE_MB:-200} * 1000 * 1000 ))"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export RAY_USAGE_STATS_ENABLED=0
if [ -x "$ROOT/.venv/bin/ray" ]; then export PATH="$ROOT/.venv/bin:$PATH"; fi
PYTHON="$(command -v python || command -v python3)"

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

free_ports() {  # N distinct free TCP ports on 127.0.0.1
  "$PYTHON" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# Session ids of our nodes, one per line, recorded at start.
sessions() { cat "$DIR/sessions" 2>/dev/null || true; }

# Every process of this cluster: members of our sessions, processes naming our directory, and all their
# descendants (job drivers start their own sessions under a worker process). A recorded session counts
# only while one of its processes still names our directory (a stale id may belong to someone else by
# now). Zombies are already dead.
cluster_pids() {
  local sids
  sids="$(sessions | tr '\n' ' ')"
  # The directory travels in the environment, so this awk's own command line does not match it.
  ps -eo pid=,ppid=,sid=,stat=,args= | RAYQ_MATCH="$DIR/" awk -v sids="$sids" -v self="$$" '
    BEGIN { dir = ENVIRON["RAYQ_MATCH"]; n = split(sids, s, " "); for (i = 1; i <= n; i++) recorded[s[i]] = 1 }
    $4 ~ /^Z/ || $1 == self { next }
    { n_rows++; pid[n_rows] = $1; ppid[n_rows] = $2; sid[n_rows] = $3; named[n_rows] = index($0, dir) > 0
      if (named[n_rows] && ($3 in recorded)) ours[$3] = 1 }
    END {
      for (i = 1; i <= n_rows; i++) if (named[i] || (sid[i] in ours)) keep[pid[i]] = 1
      do { grew = 0; for (i = 1; i <= n_rows; i++) if ((ppid[i] in keep) && !(pid[i] in keep)) { keep[pid[i]] = 1; grew = 1 } } while (grew)
      for (p in keep) print p
    }' | sort -n
}

start_node() {  # start_node NAME ray-start-args...: one `ray start` in a new session; records the session id
  local name="$1"; shift
  local p; read -r -a p <<< "$(free_ports 7)"
  setsid --wait bash -c 'echo $$ >> "$0/sessions"; exec "$@"' "$DIR" ray start \
    --node-ip-address=127.0.0.1 --disable-usage-stats --object-store-memory="$OBJECT_STORE_BYTES" \
    --node-manager-port="${p[0]}" --object-manager-port="${p[1]}" --dashboard-agent-listen-port="${p[2]}" \
    --dashboard-agent-grpc-port="${p[3]}" --runtime-env-agent-port="${p[4]}" --metrics-export-port="${p[5]}" \
    --min-worker-port=0 --max-worker-port=0 "$@" > "$DIR/$name.log" 2>&1 \
    || { echo "local-cluster: $name failed to start; its output ($DIR/$name.log):" >&2; cat "$DIR/$name.log" >&2; return 1; }
}

cmd_start() {
  if [ -n "$(cluster_pids)" ]; then
    echo "local-cluster: already running under $DIR (bash $0 stop first)" >&2; exit 1
  fi
  mkdir -p "$DIR"
  rm -f "$DIR/sessions"
  local client_port; client_port="$(free_ports 1)"
  echo "local-cluster: starting the head (GCS 127.0.0.1:$GCS_PORT, dashboard 127.0.0.1:$DASHBOARD_PORT, $HEAD_CPUS CPUs, auth $RAY_AUTH_MODE)"
  if ! start_node head --head --port="$GCS_PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
       --ray-client-server-port="$client_port" --num-cpus="$HEAD_CPUS" --temp-dir="$DIR"; then
    cmd_stop >/dev/null; exit 1
  fi
  for i in $(seq 1 "$WORKERS"); do
    echo "local-cluster: starting worker node $i ($WORKER_CPUS CPUs)"
    if ! start_node "worker$i" --address="127.0.0.1:$GCS_PORT" --num-cpus="$WORKER_CPUS"; then
      cmd_stop >/dev/null; exit 1
    fi
  done
  printf 'RAYQ_DASHBOARD=http://127.0.0.1:%s\nRAYQ_GCS=127.0.0.1:%s\n' "$DASHBOARD_PORT" "$GCS_PORT" > "$DIR/address"
  cat <<EOF
local-cluster: up, $((WORKERS + 1)) nodes, Ray temp dir $DIR
  submit a job:     rayq submit --address http://127.0.0.1:$DASHBOARD_PORT --follow -- train --set workers=2
  drive it direct:  rayq train --address 127.0.0.1:$GCS_PORT --set workers=2
  dashboard:        http://127.0.0.1:$DASHBOARD_PORT
  stop exactly these processes (sessions $(sessions | tr '\n' ' ')): bash $0 stop
EOF
}

cmd_status() {
  local pids; pids="$(cluster_pids | tr '\n' ' ')"
  if [ -z "${pids// }" ]; then echo "local-cluster: not running (state dir $DIR)"; return 1; fi
  cat "$DIR/address" 2>/dev/null || true
  echo "sessions: $(sessions | tr '\n' ' ')"
  echo "processes: $pids"
}

cmd_stop() {
  local pids; pids="$(cluster_pids)"
  if [ -z "$pids" ]; then echo "local-cluster: nothing running under $DIR"; rm -f "$DIR/sessions"; return 0; fi
  echo "local-cluster: stopping $(echo "$pids" | wc -l) processes: $(echo "$pids" | tr '\n' ' ')"
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 20); do
    [ -z "$(cluster_pids)" ] && break
    sleep 0.5
  done
  local left; left="$(cluster_pids)"
  # shellcheck disable=SC2086
  [ -z "$left" ] || kill -KILL $left 2>/dev/null || true
  sleep 0.5
  left="$(cluster_pids)"
  if [ -n "$left" ]; then echo "local-cluster: still running: $(echo "$left" | tr '\n' ' ')" >&2; return 1; fi
  rm -f "$DIR/sessions" "$DIR/address"
  echo "local-cluster: stopped"
}

case "${1:-}" in
  start) cmd_start ;;
  status) cmd_status ;;
  stop) cmd_stop ;;
  *) usage ;;
esac

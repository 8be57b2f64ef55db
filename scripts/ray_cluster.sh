#!/usr/bin/env bash
# A FLUX simulation on a two-node Ray cluster, on loopback: what "beyond one machine" looks like
# (README "Simulation on a Ray cluster"). Starts a Ray head and one Ray worker node (`ray start`,
# one CPU each, each with its own temp dir and a custom resource naming it), runs the simulation
# through the normal path (scripts/simulate.py -> `flwr run` -> local SuperLink -> flwr-simulation)
# with RAY_ADDRESS pointing at the head, so that Flower's Ray backend joins the cluster instead of
# starting a Ray of its own, prints on which Ray node every ClientApp actor ran, and stops exactly
# the processes it started.
#
# Usage: scripts/ray_cluster.sh [--workdir DIR] [-n NODES] [--rounds R] [-c 'key=value ...']...
#                               [--timeout S] [--head-ip IP] [--worker-ip IP]
#   --workdir DIR      folder for the Ray temp dirs (DIR/ray-head, DIR/ray-worker), logs, the
#                      private FLWR_HOME and the results (default: a fresh mktemp folder). Ray puts
#                      unix sockets under it, whose paths may not exceed 107 bytes: keep DIR at
#                      most 30 characters long (e.g. under /tmp)
#   -n, --nodes N      simulated SuperNodes (default 4); each client reserves 1 CPU, so at most one
#                      ClientApp actor fits on each one-CPU Ray node and the actor pool spans both
#   --rounds R         num-server-rounds (default 2)
#   -c, --run-config   extra run-config overrides for scripts/simulate.py (repeatable), after the
#                      defaults strategy="flux" dataset="synthetic" num-server-rounds=R
#                      flux-cluster-round=1 local-epochs=1 device="cpu"
#   --timeout S        seconds the simulation may take (default 900)
#   --head-ip IP       node IP of the Ray head (default 127.0.0.2)
#   --worker-ip IP     node IP of the Ray worker node (default 127.0.0.3). Both are loopback
#                      addresses (Linux routes all of 127.0.0.0/8 to lo); 127.0.0.1 itself cannot
#                      be used: `ray start --node-ip-address 127.0.0.1` replaces it by the
#                      machine's routable address (ray/_private/services.py
#                      resolve_ip_for_localhost). Distinct IPs tell the two nodes apart.
# Output: the Ray node table, the simulation log, then one line per ClientApp actor
# ("[ray-cluster] actor ... node=<id> (head|worker) ...") read from Ray's GCS after the run, a
# cross-check from each node's own worker logs (WORKDIR/ray-*/session_latest/logs), and
# "[ray-cluster] OK: ClientApp actors ran on 2 Ray nodes". WORKDIR/evidence.json holds the same.
# Exit status: 0 only when the run finished:completed and ClientApp actors ran on both nodes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/.venv/bin"
NODES=4
ROUNDS=2
TIMEOUT=900
WORKDIR=""
HEAD_IP=127.0.0.2
WORKER_IP=127.0.0.3
CONFIGS=()

die() { echo "[ray-cluster] error: $*" >&2; exit 2; }
usage() { sed -n '2,/^# Exit status/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --workdir) [ $# -ge 2 ] || die "$1 needs a value"; WORKDIR="$2"; shift 2 ;;
    -n|--nodes) [ $# -ge 2 ] || die "$1 needs a value"; NODES="$2"; shift 2 ;;
    --rounds) [ $# -ge 2 ] || die "$1 needs a value"; ROUNDS="$2"; shift 2 ;;
    -c|--run-config) [ $# -ge 2 ] || die "$1 needs a value"; CONFIGS+=("$2"); shift 2 ;;
    --timeout) [ $# -ge 2 ] || die "$1 needs a value"; TIMEOUT="$2"; shift 2 ;;
    --head-ip) [ $# -ge 2 ] || die "$1 needs a value"; HEAD_IP="$2"; shift 2 ;;
    --worker-ip) [ $# -ge 2 ] || die "$1 needs a value"; WORKER_IP="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "-n must be a positive integer, got '$NODES'"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive integer, got '$ROUNDS'"
[[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive integer, got '$TIMEOUT'"
[ "$HEAD_IP" != "$WORKER_IP" ] || die "--head-ip and --worker-ip must differ"
for b in python ray flwr flower-superlink; do
  [ -x "$BIN/$b" ] || die "$BIN/$b not found: run scripts/setup.sh first"
done
command -v setsid >/dev/null || die "setsid (util-linux) not found"

if [ -z "$WORKDIR" ]; then
  WORKDIR="$(mktemp -d /tmp/flux-ray.XXXXXX)"
else
  mkdir -p "$WORKDIR"
  WORKDIR="$(cd "$WORKDIR" && pwd)"
fi
# Ray's longest socket path: WORKDIR/ray-worker/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store
[ "${#WORKDIR}" -le 30 ] || die "--workdir $WORKDIR is ${#WORKDIR} characters; Ray's unix socket paths under it would pass 107 bytes (keep it <= 30, e.g. under /tmp)"
HEAD_TMP="$WORKDIR/ray-head"
WORKER_TMP="$WORKDIR/ray-worker"
FLWR_HOME_DIR="$WORKDIR/flwr-home"
OUT_DIR="$WORKDIR/out"
RUN_NAME="ray-cluster"
mkdir -p "$FLWR_HOME_DIR" "$OUT_DIR"

export PATH="$BIN:$PATH"
export RAY_USAGE_STATS_ENABLED=0
# The same as scripts/simulate.py sets for the driver, but the actors are forked by the raylets,
# so the nodes need it too: an actor that reserved no GPU must not see one.
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1

# Free loopback ports: GCS, Ray client server, the two dashboard agents, the local SuperLink
# (HTTP and Control API; Flower 1.42 reads them from FLWR_LOCAL_*_PORT, else 39091/39093, and
# `flwr run` reuses whatever SuperLink answers there, which would not know RAY_ADDRESS)
read -r GCS_PORT CLIENT_PORT HEAD_AGENT_PORT WORKER_AGENT_PORT LINK_HTTP_PORT LINK_CONTROL_PORT < <(
  "$BIN/python" - <<'EOF_PY'
import socket

socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
EOF_PY
)
RAY_ADDR="$HEAD_IP:$GCS_PORT"

# ------------------------------------------------------------------ cleanup
PIDS=()  # the two `ray start --block` processes, each the leader of its own session (setsid)
SIM_PID=""  # scripts/simulate.py while it runs
cleanup_done=0

descendants() {  # the given PIDs and all their live descendants
  ps -eo pid=,ppid= | awk -v roots="$*" '
    BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
    { parent[$1] = $2; pids[++m] = $1 }
    END {
      changed = 1
      while (changed) {
        changed = 0
        for (i = 1; i <= m; i++) {
          p = pids[i]
          if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 }
        }
      }
      for (i = 1; i <= m; i++) if (pids[i] in keep) print pids[i]
    }'
}

in_sessions() {  # live PIDs whose session id is one of the given ones
  ps -eo pid=,sid= | awk -v s="$*" '
    BEGIN { n = split(s, a, " "); for (i = 1; i <= n; i++) want[a[i]] = 1 }
    ($2 in want) { print $1 }'
}

under_workdir() {  # live PIDs (not this shell's) whose command line names a Ray temp dir of ours
  local p
  for p in /proc/[0-9]*; do
    p="${p#/proc/}"
    [ "$p" = "$$" ] || [ "$p" = "$BASHPID" ] && continue
    { tr '\0' ' ' <"/proc/$p/cmdline"; } 2>/dev/null | grep -qF -e "$HEAD_TMP" -e "$WORKER_TMP" && echo "$p"
  done
  return 0
}

stop_all() {
  [ "$cleanup_done" = 1 ] && return 0
  cleanup_done=1
  local left i tree
  if [ -n "$SIM_PID" ]; then  # interrupted during the run: simulate.py and its `flwr run`
    tree="$(descendants "$SIM_PID" | tr '\n' ' ')"
    # shellcheck disable=SC2086
    kill -TERM ${tree} 2>/dev/null || true
    for i in $(seq 1 50); do
      kill -0 "$SIM_PID" 2>/dev/null || break
      sleep 0.2
    done
    # shellcheck disable=SC2086
    kill -KILL ${tree} 2>/dev/null || true
  fi
  # the local SuperLink of our FLWR_HOME (and its SuperExec), if simulate.py did not stop it
  "$BIN/python" -c "
import importlib.util, sys
spec = importlib.util.spec_from_file_location('sim', sys.argv[1])
sim = importlib.util.module_from_spec(spec); spec.loader.exec_module(sim)
n = sim.stop_local_superlink(sys.argv[2])
print(f'[ray-cluster] stopped {n} leftover SuperLink process(es)') if n else None
" "$ROOT/scripts/simulate.py" "$FLWR_HOME_DIR" || true
  [ "${#PIDS[@]}" -gt 0 ] || return 0
  # `ray start --block` shuts its node down on SIGTERM (gcs_server, raylet, agents and the workers
  # the raylet forked all stay in its session); `ray stop` is not used: it kills every Ray process
  # of the machine, other people's clusters included.
  kill -TERM "${PIDS[@]}" 2>/dev/null || true
  for i in $(seq 1 150); do
    left="$( { in_sessions "${PIDS[@]}"; under_workdir; } | sort -u | tr '\n' ' ')"
    [ -z "${left// /}" ] && break
    # shellcheck disable=SC2086
    [ "$i" = 100 ] && { kill -KILL ${left} 2>/dev/null || true; }
    sleep 0.2
  done
  if [ -n "${left// /}" ]; then
    echo "[ray-cluster] WARNING: processes still running after SIGKILL: ${left}" >&2
    return 1
  fi
  echo "[ray-cluster] stopped both Ray nodes (sessions ${PIDS[*]}); no process of theirs is left"
}

on_exit() {
  local rc=$?
  set +e  # the cleanup must run to its end whatever fails on the way
  trap '' INT TERM
  stop_all || rc=1
  echo "[ray-cluster] workdir: $WORKDIR"
  exit "$rc"
}
trap on_exit EXIT
trap 'echo "[ray-cluster] interrupted" >&2; exit 130' INT
trap 'echo "[ray-cluster] terminated" >&2; exit 143' TERM

# ------------------------------------------------------------------ Ray cluster
wait_node() {  # wait_node NAME PID TEMP_DIR LOG: until `ray start` has written TEMP_DIR/ray_current_cluster
  local i
  for i in $(seq 1 180); do
    [ -s "$3/ray_current_cluster" ] && return 0
    kill -0 "$2" 2>/dev/null || { tail -n 30 "$4" >&2; die "the Ray $1 exited while starting (log: $4)"; }
    sleep 0.5
  done
  tail -n 30 "$4" >&2
  die "the Ray $1 did not start within 90 s (log: $4)"
}

echo "[ray-cluster] workdir $WORKDIR; Ray head $RAY_ADDR, worker node $WORKER_IP"
setsid "$BIN/ray" start --head --block \
  --node-ip-address "$HEAD_IP" --port "$GCS_PORT" \
  --num-cpus 1 --num-gpus 0 --resources '{"flux_ray_head": 1}' \
  --temp-dir "$HEAD_TMP" --include-dashboard false --disable-usage-stats \
  --ray-client-server-port "$CLIENT_PORT" --dashboard-agent-listen-port "$HEAD_AGENT_PORT" \
  --object-store-memory 100000000 >"$WORKDIR/ray-head.log" 2>&1 &
PIDS+=("$!")
wait_node head "${PIDS[0]}" "$HEAD_TMP" "$WORKDIR/ray-head.log"

setsid "$BIN/ray" start --block --address "$RAY_ADDR" \
  --node-ip-address "$WORKER_IP" \
  --num-cpus 1 --num-gpus 0 --resources '{"flux_ray_worker": 1}' \
  --temp-dir "$WORKER_TMP" --disable-usage-stats \
  --dashboard-agent-listen-port "$WORKER_AGENT_PORT" \
  --object-store-memory 100000000 >"$WORKDIR/ray-worker.log" 2>&1 &
PIDS+=("$!")
wait_node "worker node" "${PIDS[1]}" "$WORKER_TMP" "$WORKDIR/ray-worker.log"

# Both nodes registered and alive in the GCS (a short-lived driver of our own)
"$BIN/python" - "$RAY_ADDR" <<'EOF_PY'
import sys
import time
import warnings

import ray

warnings.filterwarnings("ignore", category=FutureWarning)  # Ray's RAY_ACCEL_ENV_VAR tip
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.time() + 60
while True:
    alive = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
    if len(alive) >= 2 or time.time() > deadline:
        break
    time.sleep(0.5)
for n in alive:
    kind = "head" if "flux_ray_head" in n["Resources"] else "worker"
    print(f"[ray-cluster] node {n['NodeID']} {kind:6} ip={n['NodeManagerAddress']} "
          f"CPU={n['Resources'].get('CPU')}")
ray.shutdown()
sys.exit(0 if len(alive) >= 2 else "[ray-cluster] error: fewer than 2 Ray nodes alive")
EOF_PY

# ------------------------------------------------------------------ the simulation
# Flower's Ray backend calls ray.init() without an address (flwr/server/superlink/fleet/vce/
# backend/raybackend.py init_ray); Ray then takes RAY_ADDRESS, which reaches flwr-simulation
# through flwr -> flower-superlink -> flower-superexec (each inherits the environment).
DEFAULTS="strategy=\"flux\" dataset=\"synthetic\" num-server-rounds=$ROUNDS flux-cluster-round=1 local-epochs=1 device=\"cpu\""
SIM_ARGS=(--nodes "$NODES" --cpus-per-node 1 --timeout "$TIMEOUT" --stop-superlink -c "$DEFAULTS")
for c in "${CONFIGS[@]+"${CONFIGS[@]}"}"; do SIM_ARGS+=(-c "$c"); done
SIM_ARGS+=(-c "output-dir=\"$OUT_DIR\" run-name=\"$RUN_NAME\"")
echo "[ray-cluster] RAY_ADDRESS=$RAY_ADDR python scripts/simulate.py ${SIM_ARGS[*]}"
# In the background and waited for, so that INT/TERM reach the traps (and the cleanup) at once.
(
  cd "$ROOT"
  export RAY_ADDRESS="$RAY_ADDR" FLUX_APP_FLWR_HOME="$FLWR_HOME_DIR" \
    FLWR_LOCAL_SUPERLINK_HTTP_API_PORT="$LINK_HTTP_PORT" FLWR_LOCAL_CONTROL_API_PORT="$LINK_CONTROL_PORT"
  exec "$BIN/python" scripts/simulate.py "${SIM_ARGS[@]}"
) > >(tee "$WORKDIR/simulate.log") 2>&1 &
SIM_PID="$!"
sim_rc=0
wait "$SIM_PID" || sim_rc=$?
SIM_PID=""
[ "$sim_rc" = 0 ] || { echo "[ray-cluster] the simulation failed (exit $sim_rc)" >&2; exit 1; }

# ------------------------------------------------------------------ evidence
# Read back from Ray itself, while the cluster is still up, where the ClientApps ran:
#  - the GCS actor table: every ClientAppActor of the run's job with the node id it lived on;
#  - ray.timeline() (the GCS task events): each executed ClientAppActor.run task and the node IP of
#    the worker that executed it (one task = one message through the ClientApp);
#  - each node's own log folder (its --temp-dir): the worker-*.err files Ray writes per worker
#    process, which start with ":actor_name:ClientAppActor" for actor workers.
"$BIN/python" - "$RAY_ADDR" "$HEAD_TMP" "$WORKER_TMP" "$WORKDIR/evidence.json" \
  "$OUT_DIR/$RUN_NAME/results.json" <<'EOF_PY'
import collections
import glob
import json
import os
import sys
import warnings

import ray

warnings.filterwarnings("ignore", category=FutureWarning)  # Ray's RAY_ACCEL_ENV_VAR tip
address, head_tmp, worker_tmp, evidence_path, results_path = sys.argv[1:6]
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
nodes = {n["NodeID"]: n for n in ray.nodes()}
kind = {nid: ("head" if "flux_ray_head" in n["Resources"] else "worker") for nid, n in nodes.items()}
ip_to_node = {n["NodeManagerAddress"]: nid for nid, n in nodes.items()}
own_job = ray.get_runtime_context().get_job_id()

# GCS actor table (ray.util.state.list_actors needs the dashboard, i.e. ray[default]; this is the
# table it reads, through the GCS client that ray.init already holds)
actors = []
for actor_id, a in ray._private.state.actors().items():
    if a.get("ActorClassName") != "ClientAppActor":
        continue
    node_id = (a.get("Address") or {}).get("NodeID", "")
    actors.append({"actor_id": actor_id, "job_id": a.get("JobID"), "node_id": node_id,
                   "node": kind.get(node_id, "?"), "pid": a.get("Pid"), "state": a.get("State")})

# executed ClientAppActor.run tasks per node, from the GCS task events
runs = collections.Counter()
for ev in ray.timeline():
    if ev.get("cat") == "task::ClientAppActor.run":  # one per executed task
        runs[ip_to_node.get(ev.get("pid"), ev.get("pid"))] += 1

# each node's own worker logs
logs = {}
for name, tmp in (("head", head_tmp), ("worker", worker_tmp)):
    found = []
    for path in sorted(glob.glob(os.path.join(tmp, "session_latest", "logs", "worker-*.err"))):
        with open(path, errors="replace") as fh:
            if ":actor_name:ClientAppActor" in fh.read(4096):
                found.append(os.path.basename(path))
    logs[name] = found
ray.shutdown()

for a in actors:
    print(f"[ray-cluster] actor {a['actor_id']} ClientAppActor job={a['job_id']} "
          f"node={a['node_id']} ({a['node']}) pid={a['pid']} state={a['state']} "
          f"ClientAppActor.run tasks on its node={runs.get(a['node_id'], 0)}")
for name, files in logs.items():
    print(f"[ray-cluster] {name} node log folder: {len(files)} ClientAppActor worker log(s) "
          + " ".join(files))
with open(results_path) as fh:
    final = json.load(fh).get("final") or {}
actor_nodes = sorted({a["node_id"] for a in actors if a["node_id"] in nodes})
run_nodes = sorted(n for n, c in runs.items() if n in nodes and c > 0)
evidence = {
    "ray_address": address,
    "nodes": {nid: {"kind": kind[nid], "ip": n["NodeManagerAddress"]} for nid, n in nodes.items()},
    "client_app_actors": actors,
    "client_app_run_tasks_per_node": {n: runs[n] for n in runs},
    "actor_worker_logs": logs,
    "actor_node_ids": actor_nodes,
    "run_task_node_ids": run_nodes,
    "results": results_path,
    "final_present": bool(final),
}
with open(evidence_path, "w") as fh:
    json.dump(evidence, fh, indent=2)
ok = len(actor_nodes) >= 2 and len(run_nodes) >= 2 and all(logs.values()) and bool(final)
if ok:
    print(f"[ray-cluster] OK: ClientApp actors ran on {len(actor_nodes)} Ray nodes "
          f"({', '.join(kind[n] for n in actor_nodes)}); evidence: {evidence_path}")
sys.exit(0 if ok else "[ray-cluster] error: the ClientApps did not run on both Ray nodes "
         f"(actor nodes {actor_nodes}, run-task nodes {run_nodes}); see {evidence_path}")
EOF_PY

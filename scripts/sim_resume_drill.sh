#!/usr/bin/env bash
# Resume in simulation: a FLUX run under `flwr run` (Ray engine, scripts/simulate.py, 4 nodes,
# digits, 5 rounds) whose flwr-simulation process is SIGKILLed once 3 rounds are recorded, then
# submitted again with resume-from; its results are compared with an in-process run of the same
# run-config. Usage: bash scripts/sim_resume_drill.sh   (about 3 minutes on 2 cores)
set -u
cd "$(dirname "$0")/.."
WORK="$(mktemp -d "${TMPDIR:-/tmp}/flux-simres.XXXXXX")"
OUT="$WORK/out"
CFG="strategy=\"flux\" dataset=\"digits\" num-server-rounds=5 flux-cluster-round=2 local-epochs=2 run-name=\"simres\" output-dir=\"$OUT\""
.venv/bin/python scripts/simulate.py --nodes 4 -c "$CFG" >"$WORK/first.log" 2>&1 &
SIM=$!
n=0
for _ in $(seq 1 900); do
  n=$(.venv/bin/python -c "import json;print(len(json.load(open('$OUT/simres/results.json'))['rounds']))" 2>/dev/null || echo 0)
  [ "$n" -ge 3 ] && break
  sleep 1
done
echo "[simres] rounds recorded before the kill: $n"
# the ServerApp of a simulation runs in the flwr-simulation process the local SuperLink started
for p in $(pgrep -f "flwr-simulation"); do kill -9 "$p" && echo "[simres] killed flwr-simulation $p"; done
wait "$SIM"; echo "[simres] first run: exit $? (expected non-zero: finished:failed)"
.venv/bin/python scripts/simulate.py --nodes 4 -c "$CFG resume-from=\"simres\"" >"$WORK/second.log" 2>&1
echo "[simres] resumed run: exit $?"
OUT="$OUT" .venv/bin/python - <<'PY'
import json, os
from flux_app.engine.inprocess import run_inprocess
out = os.environ["OUT"]
res = json.load(open(os.path.join(out, "simres", "results.json")))
cfg = {"strategy": "flux", "dataset": "digits", "num-server-rounds": 5, "flux-cluster-round": 2,
       "local-epochs": 2, "output-dir": os.path.join(out, "ref"), "run-name": "ref"}
ref, _ = run_inprocess(cfg, 4)
keys = ("accuracy_known", "accuracy_by_client", "ari", "num_clusters", "accuracy_routed")
print("[simres] resumed:", res.get("resumed"))
print("[simres] final equal to the in-process run:", {k: res["final"].get(k) == ref["final"].get(k) for k in keys})
rel = max(abs(a["train_loss"] - b["train_loss"]) / abs(b["train_loss"]) for a, b in zip(res["rounds"], ref["rounds"]))
print(f"[simres] largest relative train-loss difference over the rounds: {rel:.1e}")
PY
echo "[simres] logs: $WORK"

#!/usr/bin/env bash
# A whole TLS deployment with authenticated SuperNodes on 127.0.0.1, then one run.
#
#   conf/deploy/run_local.sh
#
# 1. keys:   `fedobj deploy keys` -> CA, SuperLink certificate, SuperNode key pairs
# 2. link:   flower-superlink with TLS and --enable-supernode-auth
# 3. CLI:    $FLWR_HOME/config.toml connection "local-tls" with root-certificates
# 4. admit:  `flwr supernode register supernode-<i>.pub local-tls` for each node
# 5. nodes:  NODES flower-supernodes, each with its own --port, key and data-dir
# 6. run:    flwr run . local-tls --stream
# Everything this script started is stopped when it exits (also on Ctrl-C).
#
# Settings (environment):
#   DEPLOY_DIR      work folder (keys, logs, data, outputs)  [.fedobj/deploy]
#   NODES           number of SuperNodes                      [3]
#   SUPERLINK_PORT  SuperLink port (Fleet, Control, Runtime)  [9092]
#   SUPERNODE_PORT  first SuperNode port; node i uses +i-1    [9094]
#   DATA_ROOT       folder holding device-1 .. device-N image folders
#                   [written from Fashion-MNIST into DEPLOY_DIR/data]
#   RUN_CONFIG      --run-config for flwr run  [num-server-rounds=2 min-nodes=NODES]
#   FORCE_KEYS=1    make new keys even if DEPLOY_DIR/keys has some
#   VENV            virtual environment with fedobj and flwr  [.venv]
#   FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION  [1]: the venv's packages, no
#                   per-run `uv sync` (6 GB under $FLWR_HOME/runtime-envs/<run>)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH"
PY="$VENV/bin/python"

DEPLOY_DIR="$(realpath -m "${DEPLOY_DIR:-$ROOT/.fedobj/deploy}")"
NODES="${NODES:-3}"
SUPERLINK_PORT="${SUPERLINK_PORT:-9092}"
SUPERNODE_PORT="${SUPERNODE_PORT:-9094}"
RUN_CONFIG="${RUN_CONFIG:-num-server-rounds=2 min-nodes=$NODES}"
KEYS="$DEPLOY_DIR/keys"
LOGS="$DEPLOY_DIR/logs"
CONNECTION="local-tls"

# Flower reads its connections from $FLWR_HOME; a folder of our own keeps the
# user's ~/.flwr untouched. Runtime dependency installation would build a fresh
# environment (and download torch) for every run: off, unless the caller says.
export FLWR_HOME="$DEPLOY_DIR/flwr"
: "${FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION:=1}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION
export FLWR_DISABLE_UPDATE_CHECK=1
export FEDOBJ_OUTPUTS_DIR="${FEDOBJ_OUTPUTS_DIR:-$DEPLOY_DIR/outputs}"

log() { printf '[run_local] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "NODES must be a positive integer, got '$NODES'"
command -v flower-superlink >/dev/null || die "flower-superlink not found in $VENV/bin"
mkdir -p "$LOGS" "$FLWR_HOME"

# ------------------------------------------------------------------ cleanup
PIDS=()
any_alive() {
  local pid
  for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  ((${#PIDS[@]})) || exit "$status"
  log "stopping ${#PIDS[*]} processes and what they started"
  # Flower starts SuperExec, ServerApp and ClientApp processes in sessions of
  # their own: collect the whole tree first, then stop it.
  local tree
  tree="$("$PY" -c 'import sys
from fedobj.superlink import descendants
pids = {int(p) for p in sys.argv[1:]}
print(*sorted(pids.union(*(descendants(p) for p in pids))))' "${PIDS[@]}")"
  kill -TERM "${PIDS[@]}" 2>/dev/null || true
  local _ pid
  for _ in $(seq 75); do  # 15 s for a graceful shutdown
    any_alive $tree || break
    sleep 0.2
  done
  for pid in $tree; do kill -TERM "$pid" 2>/dev/null || true; done
  sleep 1
  for pid in $tree; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ 1. keys
have_keys=1
for ((i = 1; i <= NODES; i++)); do
  [[ -f "$KEYS/supernode-$i.key" ]] || have_keys=0
done
[[ -f "$KEYS/ca.crt" && -f "$KEYS/superlink.key" ]] || have_keys=0
if [[ "${FORCE_KEYS:-0}" == 1 || $have_keys == 0 ]]; then
  force=()
  [[ -e "$KEYS/ca.crt" ]] && force=(--force)  # a partial or smaller set: replace it
  fedobj deploy keys --out "$KEYS" --nodes "$NODES" "${force[@]}"
else
  log "reusing the keys in $KEYS (FORCE_KEYS=1 makes new ones)"
fi

# ------------------------------------------------------------------ data
if [[ -z "${DATA_ROOT:-}" ]]; then
  DATA_ROOT="$DEPLOY_DIR/data"
  if [[ ! -d "$DATA_ROOT/device-$NODES" ]]; then
    log "writing $NODES demo image folders from Fashion-MNIST into $DATA_ROOT"
    "$PY" - "$DATA_ROOT" "$NODES" <<'PY'
"""Write device-<i>/<category-slug>/*.png: disjoint Fashion-MNIST images per device."""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fedobj.data.fashion_mnist import load_fashion_mnist

root, nodes, per_class = Path(sys.argv[1]), int(sys.argv[2]), 40
data = load_fashion_mnist("train")
for device in range(nodes):
    for c, slug in enumerate(data.label_slugs):
        folder = root / f"device-{device + 1}" / slug
        folder.mkdir(parents=True, exist_ok=True)
        idx = np.flatnonzero(data.labels == c)[device * per_class:][:per_class]
        for i in idx:
            Image.fromarray(data.images[i, 0]).save(folder / f"{i}.png")
PY
  fi
fi
for ((i = 1; i <= NODES; i++)); do
  [[ -d "$DATA_ROOT/device-$i" ]] || die "no image folder $DATA_ROOT/device-$i"
done

# ------------------------------------------------------------------ 2. SuperLink
# A fresh federation each time: registrations live in this database (delete it
# and every SuperNode must be registered again).
rm -f "$DEPLOY_DIR"/superlink.db{,-shm,-wal}
log "SuperLink on https://127.0.0.1:$SUPERLINK_PORT (log $LOGS/superlink.log)"
flower-superlink \
  --ssl-ca-certfile "$KEYS/ca.crt" \
  --ssl-certfile "$KEYS/superlink.crt" \
  --ssl-keyfile "$KEYS/superlink.key" \
  --enable-supernode-auth \
  --host 127.0.0.1 --port "$SUPERLINK_PORT" \
  --database "$DEPLOY_DIR/superlink.db" \
  >"$LOGS/superlink.log" 2>&1 </dev/null &
SUPERLINK_PID=$!
PIDS+=("$SUPERLINK_PID")

# Healthy = /health answers over TLS, verified against our CA (60 s at most).
"$PY" - "$SUPERLINK_PORT" "$KEYS/ca.crt" "$SUPERLINK_PID" <<'PY' ||
import os, ssl, sys, time, urllib.request

port, ca, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
context = ssl.create_default_context(cafile=ca)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("the SuperLink exited")
    try:
        url = f"https://127.0.0.1:{port}/health"
        with urllib.request.urlopen(url, timeout=0.5, context=context):
            sys.exit(0)
    except OSError:
        time.sleep(0.3)
sys.exit("the SuperLink is not healthy after 60 s")
PY
  { tail -n 20 "$LOGS/superlink.log" >&2; die "SuperLink did not start"; }

# ------------------------------------------------------------------ 3. CLI connection
# The Control API (register, run, ls) shares the SuperLink's TLS port.
cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "$CONNECTION"

[superlink.$CONNECTION]
address = "127.0.0.1:$SUPERLINK_PORT"
root-certificates = "$KEYS/ca.crt"
TOML

# ------------------------------------------------------------------ 4. register
for ((i = 1; i <= NODES; i++)); do
  flwr supernode register "$KEYS/supernode-$i.pub" "$CONNECTION" --name "device-$i"
done

# ------------------------------------------------------------------ 5. SuperNodes
for ((i = 1; i <= NODES; i++)); do
  port=$((SUPERNODE_PORT + i - 1))
  log "SuperNode $i on 127.0.0.1:$port (log $LOGS/supernode-$i.log)"
  flower-supernode \
    --superlink "127.0.0.1:$SUPERLINK_PORT" \
    --root-certificates "$KEYS/ca.crt" \
    --auth-supernode-private-key "$KEYS/supernode-$i.key" \
    --port "$port" \
    --node-config "data-dir='$DATA_ROOT/device-$i' cache-dir='$DEPLOY_DIR/cache/device-$i' device-id='device-$i'" \
    >"$LOGS/supernode-$i.log" 2>&1 </dev/null &
  PIDS+=("$!")
done

# ------------------------------------------------------------------ 6. run
log "fedobj run --app $ROOT --connection $CONNECTION --run-config '$RUN_CONFIG'"
# `fedobj run` is `flwr run --stream` that exits 1 (with the run's error in one
# line) when the run did not complete: `flwr run` itself returns 0 either way.
# In the background + `wait`: a TERM or INT sent to this script then runs the
# cleanup at once instead of after the run (bash defers traps during a foreground
# command).
fedobj run --app "$ROOT" --connection "$CONNECTION" --run-config "$RUN_CONFIG" \
  --outputs "$FEDOBJ_OUTPUTS_DIR" </dev/null &
PIDS+=("$!")
status=0
wait "$!" || status=$?
if [ "$status" -ne 0 ]; then
  log "the run failed (exit $status); logs in $LOGS"
  exit "$status"
fi
log "done; outputs in $FEDOBJ_OUTPUTS_DIR"

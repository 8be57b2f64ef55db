#!/usr/bin/env bash
# Deploy flux-app on loopback: one SuperLink and N SuperNodes (real Flower deployment runtime,
# no simulation engine), run the app once with `flwr run . deploy --stream`, check through
# `flwr ls` that the run ended as finished:completed, and stop every process this script started.
#
# Usage: scripts/deploy_local.sh [-n NODES | --data-dir DIR] [-c 'key=value ...']... [--timeout S]
#                                [--workdir DIR] [--late-nodes] [--tls [--auth] [--proxy]]
#                                [--before-run CMD] [--clientapp warm|cold] [--threads-per-node N]
#                                [--node-poll S|flower]
#   -n, --nodes N      SuperNodes to start (default 3); node i gets
#                      --node-config "partition-id=i num-partitions=N"
#   --data-dir DIR     one SuperNode per DIR/node_* folder, each with its own data:
#                      --node-config 'data-path="DIR/node_i"' (scripts/export_partitions.py
#                      writes such folders); adds min-nodes=<folders> to the run-config
#   -c, --run-config   run-config overrides for `flwr run` (repeatable; 'key=value ...' or a
#                      .toml file); added after the demo defaults
#                      dataset="digits" num-server-rounds=2
#   --timeout S        seconds the run may take before it is stopped (default 900)
#   --workdir DIR      folder for logs, keys and the private FLWR_HOME (default: a fresh mktemp
#                      folder)
#   --late-nodes       submit the run first and start the SuperNodes afterwards (the ServerApp
#                      waits for num-partitions nodes itself)
#   --tls              TLS everywhere: a CA and a server certificate (SAN 127.0.0.1, localhost)
#                      are made in WORKDIR/pki (openssl, else Python's cryptography); the
#                      SuperLink serves HTTPS (--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile),
#                      SuperNodes verify it (--root-certificates pki/ca.crt) and so does `flwr`
#                      (root-certificates in FLWR_HOME/config.toml)
#   --auth             (needs --tls) SuperNode authentication: one ECDSA P-384 key pair per node
#                      in WORKDIR/keys (ssh-keygen, else cryptography), SuperLink started with
#                      --enable-supernode-auth, every public key registered with
#                      `flwr supernode register` before any node starts, each SuperNode started
#                      with --auth-supernode-private-key
#   --proxy            (needs --tls) the deployment as on a real server: scripts/fleet_proxy.py
#                      on a second free loopback port serves HTTPS with the same server
#                      certificate and forwards only POST /v1/fleet/* to the SuperLink (verified
#                      against the CA); any other path (/v1/control/, /v1/runtime/, /health, ...)
#                      gets 403. The SuperNodes connect through the proxy; `flwr` (the operator,
#                      incl. `flwr supernode register`) uses 127.0.0.1:<superlink port> directly.
#                      Its log: WORKDIR/logs/fleet-proxy.log (one line per refused request and a
#                      summary of the forwarded ones when it stops)
#   --before-run CMD   run `bash -c CMD` after the SuperNodes are up (before them with
#                      --late-nodes) and before the run is submitted; it sees DEPLOY_SUPERLINK
#                      (host:port), DEPLOY_FLEET (host:port the SuperNodes use: the proxy with
#                      --proxy, else DEPLOY_SUPERLINK), DEPLOY_CA (the CA certificate, empty
#                      without --tls), DEPLOY_WORKDIR and FLWR_HOME (connection "deploy"); a
#                      failure aborts
#   --clientapp MODE   warm (default): each SuperNode runs with --isolation process and its own
#                      `python -m flux_app.deploy.warm_exec` (Flower's SuperExec whose ClientApp
#                      processes are forked from a process that imported torch once); cold:
#                      Flower's default, --isolation subprocess (a fresh flwr-clientapp program
#                      per message)
#   --threads-per-node N  torch/OpenMP threads of each node's ClientApp processes (default: the
#                      machine's cores / nodes, at least 1, unless OMP_NUM_THREADS is set): the
#                      nodes share this machine, as simulated clients share it
#   --node-poll S      each SuperNode is Flower's, run through `python -m flux_app.deploy.supernode
#                      --poll-interval S` (default 0.3): its pauses between pulls from the
#                      SuperLink (Flower: 3 s when idle) and between looks for a reply (0.5 s)
#                      are capped at S seconds; `flower` runs the plain flower-supernode
# Flower's SuperExec task poll interval is FLWR_SUPEREXEC_TASK_POLL_INTERVAL (default here 0.3 s;
# Flower's default is 1 s).
# Without --tls the deployment is plain HTTP without node authentication (--insecure), as before.
# Every API of the SuperLink (Fleet, Control, ServerAppIo/Runtime: one port in Flower 1.42) and
# every SuperNode's own API are bound to 127.0.0.1 only (so is the proxy here; on a real server it
# listens on the public address: README "Secure deployment").
# Exit status: 0 only when the run finished:completed.
set -euo pipefail

ORIG_PWD="$PWD"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/.venv/bin"
NODES=3
TIMEOUT=900
WORKDIR=""
LATE_NODES=0
DATA_DIR=""
TLS=0
AUTH=0
PROXY=0
BEFORE_RUN=""
CLIENTAPP=warm
NODE_POLL=0.3
THREADS_PER_NODE=""
CONFIGS=()

die() { echo "[deploy] error: $*" >&2; exit 2; }
usage() { sed -n '2,/^# Exit status/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    -n|--nodes) [ $# -ge 2 ] || die "$1 needs a value"; NODES="$2"; shift 2 ;;
    -c|--run-config) [ $# -ge 2 ] || die "$1 needs a value"; CONFIGS+=("$2"); shift 2 ;;
    --timeout) [ $# -ge 2 ] || die "$1 needs a value"; TIMEOUT="$2"; shift 2 ;;
    --workdir) [ $# -ge 2 ] || die "$1 needs a value"; WORKDIR="$2"; shift 2 ;;
    --late-nodes) LATE_NODES=1; shift ;;
    --data-dir) [ $# -ge 2 ] || die "$1 needs a value"; DATA_DIR="$2"; shift 2 ;;
    --tls) TLS=1; shift ;;
    --auth) AUTH=1; shift ;;
    --proxy) PROXY=1; shift ;;
    --before-run) [ $# -ge 2 ] || die "$1 needs a value"; BEFORE_RUN="$2"; shift 2 ;;
    --clientapp) [ $# -ge 2 ] || die "$1 needs a value"; CLIENTAPP="$2"; shift 2 ;;
    --threads-per-node) [ $# -ge 2 ] || die "$1 needs a value"; THREADS_PER_NODE="$2"; shift 2 ;;
    --node-poll) [ $# -ge 2 ] || die "$1 needs a value"; NODE_POLL="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[ "$AUTH" = 1 ] && [ "$TLS" = 0 ] && die "--auth needs --tls (Flower refuses SuperNode authentication without TLS)"
[ "$PROXY" = 1 ] && [ "$TLS" = 0 ] && die "--proxy needs --tls (the Fleet proxy serves and verifies HTTPS only)"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "-n must be a positive integer, got '$NODES'"
case "$CLIENTAPP" in warm|cold) ;; *) die "--clientapp must be warm or cold, got '$CLIENTAPP'" ;; esac
[ "$NODE_POLL" = flower ] || [[ "$NODE_POLL" =~ ^[0-9]*\.?[0-9]+$ ]] \
  || die "--node-poll must be a number of seconds or 'flower', got '$NODE_POLL'"
SUPERNODE=("$BIN/flower-supernode")
[ "$NODE_POLL" = flower ] || SUPERNODE=("$BIN/python" -m flux_app.deploy.supernode --poll-interval "$NODE_POLL")
[ -z "$THREADS_PER_NODE" ] || [[ "$THREADS_PER_NODE" =~ ^[1-9][0-9]*$ ]] \
  || die "--threads-per-node must be a positive integer, got '$THREADS_PER_NODE'"
SITES=()
if [ -n "$DATA_DIR" ]; then
  [ -d "$DATA_DIR" ] || die "--data-dir $DATA_DIR is not a folder"
  DATA_DIR="$(cd "$DATA_DIR" && pwd)"
  while IFS= read -r d; do SITES+=("$d"); done < <(find "$DATA_DIR" -mindepth 1 -maxdepth 1 -type d -name 'node_*' | sort -V)
  [ "${#SITES[@]}" -gt 0 ] || die "no node_* folder in $DATA_DIR"
  NODES="${#SITES[@]}"
fi
[[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive integer, got '$TIMEOUT'"
for b in flower-superlink flower-supernode flwr python; do
  [ -x "$BIN/$b" ] || die "$BIN/$b not found: run scripts/setup.sh first"
done

if [ -z "$WORKDIR" ]; then
  WORKDIR="$(mktemp -d "${TMPDIR:-/tmp}/flux-deploy.XXXXXX")"
else
  mkdir -p "$WORKDIR"
  WORKDIR="$(cd "$WORKDIR" && pwd)"
fi
export FLWR_HOME="$WORKDIR/flwr-home"
mkdir -p "$FLWR_HOME" "$WORKDIR/logs"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 \
  FLWR_DISABLE_UPDATE_CHECK=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
export PATH="$BIN:$PATH"  # SuperLink/SuperNode spawn flower-superexec / flwr-* by name
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.3}"
# The nodes share this machine's cores: without a share each ClientApp would start one torch
# thread per core and N nodes would oversubscribe them N times.
if [ -z "${OMP_NUM_THREADS:-}" ] || [ -n "$THREADS_PER_NODE" ]; then
  [ -n "$THREADS_PER_NODE" ] || THREADS_PER_NODE=$(( $(nproc) / NODES ))
  [ "$THREADS_PER_NODE" -ge 1 ] || THREADS_PER_NODE=1
  export OMP_NUM_THREADS="$THREADS_PER_NODE"
fi

# ------------------------------------------------------------------ cleanup
TAIL_PID=""
PIDS=()  # exactly the processes this script started (each the leader of its own session)
cleanup_done=0

descendants() {  # all live descendants of the given PIDs (pid list on stdout)
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

sessions_of() {  # session ids of the given PIDs
  for p in "$@"; do ps -o sid= -p "$p" 2>/dev/null || true; done | awk '{print $1}' | sort -u
}

in_sessions() {  # live PIDs whose session id is one of the given ones
  ps -eo pid=,sid= | awk -v s="$*" '
    BEGIN { n = split(s, a, " "); for (i = 1; i <= n; i++) want[a[i]] = 1 }
    ($2 in want) { print $1 }'
}

stop_all() {
  [ "$cleanup_done" = 1 ] && return 0
  cleanup_done=1
  [ "${#PIDS[@]}" -gt 0 ] || return 0
  # Everything started below our PIDs: SuperExec (SuperLink starts it in a new session),
  # ServerApp and ClientApp subprocesses. Collect the tree and its sessions before signalling,
  # so that processes re-parented to init are still found.
  local tree sids left i
  tree="$(descendants "${PIDS[@]}" | tr '\n' ' ')"
  # shellcheck disable=SC2086
  sids="$(sessions_of ${tree} | tr '\n' ' ')"
  # shellcheck disable=SC2086
  kill -TERM ${tree} 2>/dev/null || true
  for i in $(seq 1 125); do
    # shellcheck disable=SC2086
    left="$( { in_sessions ${sids}; descendants "${PIDS[@]}"; } | sort -u | tr '\n' ' ')"
    [ -z "${left// /}" ] && break
    # SuperNodes need a few seconds to leave gracefully (they poll every 3 s)
    [ "$i" = 100 ] && { kill -KILL ${left} 2>/dev/null || true; }
    sleep 0.2
  done
  if [ -n "${left// /}" ]; then
    echo "[deploy] WARNING: processes still running after SIGKILL: ${left}" >&2
    return 1
  fi
  echo "[deploy] stopped all started processes (${#PIDS[@]} launched, tree of $(wc -w <<<"$tree"))"
}

on_exit() {
  local rc=$?
  set +e  # the cleanup must run to its end whatever fails on the way
  trap '' INT TERM
  [ -n "${TAIL_PID:-}" ] && kill "$TAIL_PID" 2>/dev/null
  stop_all || rc=1
  echo "[deploy] logs: $WORKDIR/logs"
  exit "$rc"
}
trap on_exit EXIT
trap 'echo "[deploy] interrupted" >&2; exit 130' INT
trap 'echo "[deploy] terminated" >&2; exit 143' TERM

# ------------------------------------------------------------------ TLS and node keys
PKI="$WORKDIR/pki"
KEYS="$WORKDIR/keys"
CA_CERT=""

make_pki_python() {  # the same four files as the openssl branch, with Python's cryptography
  "$BIN/python" - "$PKI" <<'EOF_PY'
import datetime
import ipaddress
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

out = sys.argv[1]
now = datetime.datetime.now(datetime.timezone.utc)
valid = {"not_valid_before": now - datetime.timedelta(minutes=5),
         "not_valid_after": now + datetime.timedelta(days=30)}


def write(name, data, mode):
    fd = os.open(os.path.join(out, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with open(fd, "wb") as fh:
        fh.write(data)


def key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def usage(**on):
    names = ("digital_signature content_commitment key_encipherment data_encipherment "
             "key_agreement key_cert_sign crl_sign encipher_only decipher_only").split()
    return x509.KeyUsage(**{n: on.get(n, False) for n in names})


ca_key = ec.generate_private_key(ec.SECP256R1())
srv_key = ec.generate_private_key(ec.SECP256R1())
ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flux-app deploy CA")])
ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
ca = (
    x509.CertificateBuilder(**valid).subject_name(ca_name).issuer_name(ca_name)
    .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    .add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
    .add_extension(ca_ski, critical=False)
    .sign(ca_key, hashes.SHA256())
)
srv = (
    x509.CertificateBuilder(**valid)
    .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
    .issuer_name(ca_name).public_key(srv_key.public_key())
    .serial_number(x509.random_serial_number())
    .add_extension(x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
        critical=False)
    .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    .add_extension(usage(digital_signature=True), critical=True)
    .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    .add_extension(x509.SubjectKeyIdentifier.from_public_key(srv_key.public_key()),
                   critical=False)
    .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                   critical=False)
    .sign(ca_key, hashes.SHA256())
)
write("ca.key", key_pem(ca_key), 0o600)
write("server.key", key_pem(srv_key), 0o600)
write("ca.crt", ca.public_bytes(serialization.Encoding.PEM), 0o644)
write("server.crt", srv.public_bytes(serialization.Encoding.PEM), 0o644)
EOF_PY
}

make_pki_openssl() {
  (
    umask 077
    cd "$PKI"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
      -subj "/CN=flux-app deploy CA" -keyout ca.key -out ca.crt \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -subj "/CN=localhost" -keyout server.key -out server.csr
    printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" \
      "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
      "extendedKeyUsage=serverAuth" "subjectKeyIdentifier=hash" \
      "authorityKeyIdentifier=keyid:always" >server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -days 30 \
      -set_serial "0x$(openssl rand -hex 8)" -extfile server.ext -out server.crt
    openssl verify -CAfile ca.crt server.crt
    rm -f server.csr server.ext
  ) >"$WORKDIR/logs/pki.log" 2>&1
}

# WORKDIR/pki: ca.key and server.key stay private; ca.crt is all a site (and `flwr`) needs.
# FLUX_DEPLOY_PKI_TOOL=python uses the cryptography branch even where openssl exists.
make_pki() {
  local tool=openssl
  mkdir -p "$PKI"
  chmod 700 "$PKI"
  rm -f "$PKI"/ca.* "$PKI"/server.*
  if command -v openssl >/dev/null 2>&1 && [ "${FLUX_DEPLOY_PKI_TOOL:-}" != python ]; then
    make_pki_openssl || { cat "$WORKDIR/logs/pki.log" >&2; die "openssl could not make the certificates"; }
  else
    tool=cryptography
    make_pki_python || die "Python's cryptography could not make the certificates in $PKI"
  fi
  chmod 600 "$PKI/ca.key" "$PKI/server.key"
  chmod 644 "$PKI/ca.crt" "$PKI/server.crt"
  CA_CERT="$PKI/ca.crt"
  echo "[deploy] TLS: CA $CA_CERT and server certificate (SAN IP:127.0.0.1, DNS:localhost), made with $tool"
}

make_node_key() {  # make_node_key PATH: an ECDSA P-384 key pair in OpenSSH format (PATH, PATH.pub)
  rm -f "$1" "$1.pub"
  if command -v ssh-keygen >/dev/null 2>&1 && [ "${FLUX_DEPLOY_PKI_TOOL:-}" != python ]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$(basename "$1")" -f "$1" </dev/null >/dev/null
  else
    "$BIN/python" - "$1" <<'EOF_PY'
import os
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

path = sys.argv[1]
key = ec.generate_private_key(ec.SECP384R1())
private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
    fh.write(private)
public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                       serialization.PublicFormat.OpenSSH)
with open(path + ".pub", "wb") as fh:
    fh.write(public + b" " + os.path.basename(path).encode() + b"\n")
EOF_PY
  fi
}

LINK_SECURITY=(--insecure)
SCHEME=http
CURL_TLS=()
MODE="INSECURE: plain HTTP, no SuperNode authentication (loopback only; --tls [--auth] to secure)"
if [ "$TLS" = 1 ]; then
  make_pki
  LINK_SECURITY=(--ssl-ca-certfile "$PKI/ca.crt" --ssl-certfile "$PKI/server.crt"
                 --ssl-keyfile "$PKI/server.key")
  SCHEME=https
  CURL_TLS=(--cacert "$CA_CERT")
  MODE="TLS (every connection verified against $CA_CERT), SuperNode authentication OFF"
fi
if [ "$AUTH" = 1 ]; then
  mkdir -p "$KEYS"
  chmod 700 "$KEYS"
  for ((i = 0; i < NODES; i++)); do
    make_node_key "$KEYS/node-$i" || die "could not make the key pair $KEYS/node-$i"
  done
  LINK_SECURITY+=(--enable-supernode-auth)
  MODE="TLS + SuperNode authentication (only the $NODES public keys registered from $KEYS are admitted)"
  echo "[deploy] auth: $NODES ECDSA P-384 key pairs in $KEYS (node-i private, node-i.pub registered)"
fi
[ "$PROXY" = 1 ] && MODE="$MODE; SuperNodes through the Fleet-only proxy (scripts/fleet_proxy.py)"
echo "[deploy] mode: $MODE"

# ------------------------------------------------------------------ ports
# NODES+1 (+1 for the proxy) distinct free loopback ports, bound together so they cannot repeat.
read -r -a PORTS <<<"$("$BIN/python" - "$((NODES + 1 + PROXY))" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)"
LINK_PORT="${PORTS[0]}"
PROXY_PORT="${PORTS[$((NODES + 1))]:-}"  # the last one, with --proxy
FLEET_ADDR="127.0.0.1:$LINK_PORT"       # where the SuperNodes connect

http_ok() {  # http_ok URL: 0 when the URL answers 2xx (over TLS: verified against the CA)
  curl -fsS -o /dev/null --max-time 1 "${CURL_TLS[@]+"${CURL_TLS[@]}"}" "$1" 2>/dev/null
}

# ------------------------------------------------------------------ SuperLink
# Flower 1.42 serves the Fleet, Control and Runtime (ServerAppIo) APIs over HTTP(S) on ONE socket,
# --host/--port (flwr/superlink/cli/flower_superlink.py: --fleet-api-address and
# --control-api-address are deprecated, --serverappio-api-address is rejected). The Control API
# has no authentication in open-source Flower, so that socket is bound to 127.0.0.1, which is
# also the Fleet address the SuperNodes use here. Each SuperNode's own API: 127.0.0.1 too.
cd "$WORKDIR"  # the SuperLink's working directory (the ServerApp's cwd)
setsid "$BIN/flower-superlink" "${LINK_SECURITY[@]}" --isolation subprocess \
  --disable-runtime-dependency-installation \
  --host 127.0.0.1 --port "$LINK_PORT" \
  >"$WORKDIR/logs/superlink.log" 2>&1 </dev/null &
PIDS+=("$!")
LINK_PID="$!"
for _ in $(seq 1 150); do
  http_ok "$SCHEME://127.0.0.1:$LINK_PORT/health" && break
  kill -0 "$LINK_PID" 2>/dev/null || {
    tail -n 30 "$WORKDIR/logs/superlink.log" >&2
    die "flower-superlink exited during start-up"
  }
  sleep 0.2
done
http_ok "$SCHEME://127.0.0.1:$LINK_PORT/health" || die "SuperLink not healthy after 30 s"
echo "[deploy] superlink up on 127.0.0.1:$LINK_PORT (pid $LINK_PID, FLWR_HOME $FLWR_HOME)"

# The `flwr` CLI's connection (flwr/cli/flower_config.py, flwr/cli/typing.py): over TLS it
# verifies the SuperLink against `root-certificates` (an absolute path; `insecure` defaults to
# false).
if [ "$TLS" = 1 ]; then
  CONNECTION_SECURITY="root-certificates = \"$CA_CERT\""
else
  CONNECTION_SECURITY="insecure = true"
fi
cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "deploy"

[superlink.deploy]
address = "127.0.0.1:$LINK_PORT"
$CONNECTION_SECURITY
EOF

# ------------------------------------------------------------------ Fleet proxy
# The SuperNodes' only way in: POST /v1/fleet/* forwarded to the SuperLink, 403 for the rest
# (Control and Runtime API included). In its own session, stopped like every other process.
if [ "$PROXY" = 1 ]; then
  setsid "$BIN/python" "$ROOT/scripts/fleet_proxy.py" --listen "127.0.0.1:$PROXY_PORT" \
    --upstream "127.0.0.1:$LINK_PORT" --certfile "$PKI/server.crt" --keyfile "$PKI/server.key" \
    --ca-certfile "$CA_CERT" >"$WORKDIR/logs/fleet-proxy.log" 2>&1 </dev/null &
  PIDS+=("$!")
  PROXY_PID="$!"
  proxy_code() {  # the HTTP status the proxy gives /health (403 once up; TLS verified)
    curl -sS -o /dev/null -w '%{http_code}' --max-time 1 --cacert "$CA_CERT" \
      "https://127.0.0.1:$PROXY_PORT/health" 2>/dev/null || true
  }
  for _ in $(seq 1 100); do
    [ "$(proxy_code)" = 403 ] && break
    kill -0 "$PROXY_PID" 2>/dev/null || {
      tail -n 30 "$WORKDIR/logs/fleet-proxy.log" >&2
      die "scripts/fleet_proxy.py exited during start-up"
    }
    sleep 0.2
  done
  [ "$(proxy_code)" = 403 ] || die "Fleet proxy not answering on 127.0.0.1:$PROXY_PORT after 20 s"
  FLEET_ADDR="127.0.0.1:$PROXY_PORT"
  echo "[deploy] fleet proxy up on $FLEET_ADDR (pid $PROXY_PID) -> 127.0.0.1:$LINK_PORT:" \
    "SuperNodes connect there (/v1/fleet/ only), flwr uses 127.0.0.1:$LINK_PORT"
fi

# SuperNode authentication: the operator registers every site's public key (through the Control
# API, flwr/cli/supernode/register.py) BEFORE that site's SuperNode connects.
if [ "$AUTH" = 1 ]; then
  for ((i = 0; i < NODES; i++)); do
    reg="$("$BIN/flwr" supernode register "$KEYS/node-$i.pub" deploy --name "node-$i" \
      --format json 2>&1)" || { echo "$reg" >&2; die "flwr supernode register failed for node-$i"; }
    node_id="$(sed -n 's/.*"node-id": *\([0-9][0-9]*\).*/\1/p' <<<"$reg" | head -n 1)"
    [ -n "$node_id" ] || { echo "$reg" >&2; die "flwr supernode register gave no node id for node-$i"; }
    echo "[deploy] registered $KEYS/node-$i.pub as SuperNode $node_id"
  done
fi

# ------------------------------------------------------------------ SuperNodes
SUPERNODE_PIDS=()
start_supernodes() {
  local i port node_config node_security isolation
  for ((i = 0; i < NODES; i++)); do
    port="${PORTS[$((i + 1))]}"
    if [ "${#SITES[@]}" -gt 0 ]; then
      node_config="data-path=\"${SITES[$i]}\""
    else
      node_config="partition-id=$i num-partitions=$NODES"
    fi
    node_security=(--insecure)
    [ "$TLS" = 1 ] && node_security=(--root-certificates "$CA_CERT")
    [ "$AUTH" = 1 ] && node_security+=(--auth-supernode-private-key "$KEYS/node-$i")
    isolation=subprocess
    [ "$CLIENTAPP" = warm ] && isolation=process
    setsid "${SUPERNODE[@]}" "${node_security[@]}" --superlink "$FLEET_ADDR" \
      --isolation "$isolation" --host 127.0.0.1 --port "$port" \
      --node-config "$node_config" \
      >"$WORKDIR/logs/supernode-$i.log" 2>&1 </dev/null &
    PIDS+=("$!")
    SUPERNODE_PIDS+=("$!")
    if [ "$CLIENTAPP" = warm ]; then
      # the node's own SuperExec (what --isolation subprocess would start), with warm ClientApps;
      # it ends with its SuperNode (--parent-pid)
      setsid "$BIN/python" -m flux_app.deploy.warm_exec --insecure \
        --runtime-api-address "127.0.0.1:$port" --parent-pid "$!" \
        >"$WORKDIR/logs/superexec-$i.log" 2>&1 </dev/null &
      PIDS+=("$!")
    fi
  done
}

wait_supernodes() {  # until every SuperNode logged its node id (= registered with the SuperLink)
  local t i up
  for t in $(seq 1 300); do
    up=0
    for ((i = 0; i < NODES; i++)); do
      kill -0 "${SUPERNODE_PIDS[$i]}" 2>/dev/null || {
        tail -n 30 "$WORKDIR/logs/supernode-$i.log" >&2
        die "flower-supernode $i exited during start-up"
      }
      grep -q "SuperNode ID" "$WORKDIR/logs/supernode-$i.log" && up=$((up + 1))
    done
    [ "$up" = "$NODES" ] && break
    sleep 0.2
  done
  [ "$up" = "$NODES" ] || die "only $up of $NODES SuperNodes registered within 60 s"
  echo "[deploy] $NODES supernodes up (pids ${SUPERNODE_PIDS[*]}, runtime ports ${PORTS[*]:1:$NODES}, $CLIENTAPP ClientApps, node poll $NODE_POLL, OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset})"
}

# ------------------------------------------------------------------ the run
OVERRIDES=('dataset="digits" num-server-rounds=2')
OVERRIDES+=("${CONFIGS[@]+"${CONFIGS[@]}"}")
JOINED="${CONFIGS[*]+"${CONFIGS[*]}"}"
EXTRA=()
[[ "$JOINED" == *output-dir* ]] || EXTRA+=("output-dir=\"$ROOT/outputs\"")
[[ "$JOINED" == *run-name* ]] || EXTRA+=("run-name=\"deploy-$(date +%Y%m%d-%H%M%S)-$$\"")
# sites announce no number of partitions: the ServerApp waits for this many nodes
[ "${#SITES[@]}" -gt 0 ] && [[ "$JOINED" != *min-nodes* ]] && EXTRA+=("min-nodes=$NODES")
[ "${#EXTRA[@]}" -gt 0 ] && OVERRIDES+=("${EXTRA[*]}")
RUN_ARGS=()
for o in "${OVERRIDES[@]}"; do
  # a relative .toml path is meant relative to where the user called the script
  if [[ "$o" == *.toml && "$o" != /* && -f "$ORIG_PWD/$o" ]]; then o="$ORIG_PWD/$o"; fi
  RUN_ARGS+=(-c "$o")
done

if [ "$LATE_NODES" = 0 ]; then
  start_supernodes
  wait_supernodes
fi

if [ -n "$BEFORE_RUN" ]; then
  # in its own session and in PIDS, so that the cleanup also stops whatever it leaves running
  echo "[deploy] before-run: $BEFORE_RUN"
  DEPLOY_SUPERLINK="127.0.0.1:$LINK_PORT" DEPLOY_FLEET="$FLEET_ADDR" DEPLOY_CA="$CA_CERT" \
    DEPLOY_WORKDIR="$WORKDIR" \
    setsid bash -c "$BEFORE_RUN" </dev/null &
  HOOK_PID="$!"
  PIDS+=("$HOOK_PID")
  hook_rc=0
  wait "$HOOK_PID" || hook_rc=$?
  [ "$hook_rc" = 0 ] || { echo "[deploy] --before-run failed (exit $hook_rc)" >&2; exit 1; }
fi

cd "$ROOT"
echo "[deploy] flwr run . deploy --stream ${RUN_ARGS[*]}"
RUN_LOG="$WORKDIR/logs/flwr-run.log"
: >"$RUN_LOG"  # exists before `tail -f` opens it
# `flwr run --stream` runs in its own session too, so the cleanup finds it on a timeout/Ctrl-C.
setsid "$BIN/flwr" run . deploy --stream "${RUN_ARGS[@]}" >"$RUN_LOG" 2>&1 </dev/null &
FLWR_PID="$!"
PIDS+=("$FLWR_PID")
tail -n +1 -f --pid="$FLWR_PID" "$RUN_LOG" &
TAIL_PID="$!"

RUN_ID=""
if [ "$LATE_NODES" = 1 ]; then
  for _ in $(seq 1 300); do
    RUN_ID="$(sed -n 's/.*started run \([0-9][0-9]*\).*/\1/p' "$RUN_LOG" | head -n 1)"
    [ -n "$RUN_ID" ] && break
    kill -0 "$FLWR_PID" 2>/dev/null || break
    sleep 0.2
  done
  echo "[deploy] run ${RUN_ID:-?} submitted; starting the SuperNodes now"
  start_supernodes
  wait_supernodes
fi

deadline=$((SECONDS + TIMEOUT))
while kill -0 "$FLWR_PID" 2>/dev/null; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "[deploy] run did not end within ${TIMEOUT} s; stopping it" >&2
    RUN_ID="$(sed -n 's/.*started run \([0-9][0-9]*\).*/\1/p' "$RUN_LOG" | head -n 1)"
    [ -n "$RUN_ID" ] && "$BIN/flwr" stop "$RUN_ID" deploy >/dev/null 2>&1 || true
    break
  fi
  sleep 1
done
wait "$FLWR_PID" 2>/dev/null || true
wait "$TAIL_PID" 2>/dev/null || true

RUN_ID="$(sed -n 's/.*started run \([0-9][0-9]*\).*/\1/p' "$RUN_LOG" | head -n 1)"
RESULTS="$(sed -n 's/.*results written to \([^[:space:]]*\).*/\1/p' "$RUN_LOG" | tail -n 1)"
[ -n "$RUN_ID" ] || { echo "[deploy] no run was started (see $RUN_LOG)" >&2; exit 1; }

# `flwr run --stream` exits 0 even when the run failed: ask the SuperLink.
STATUS=""
for _ in $(seq 1 30); do
  STATUS="$("$BIN/flwr" ls deploy --run-id "$RUN_ID" --format json 2>/dev/null |
    "$BIN/python" -c 'import json,sys
try:
    print(json.load(sys.stdin)["runs"][0]["status"])
except Exception:
    print("")' || true)"
  [[ "$STATUS" == finished* ]] && break
  sleep 1
done
echo "[deploy] run $RUN_ID: ${STATUS:-unknown status}"
if [ "$STATUS" != "finished:completed" ]; then
  echo "[deploy] the run did not complete; see $WORKDIR/logs" >&2
  exit 1
fi
if [ -n "$RESULTS" ] && [ -f "$RESULTS" ]; then
  echo "[deploy] results: $RESULTS"
else
  echo "[deploy] results.json not found (expected under the run's output-dir)" >&2
  exit 1
fi

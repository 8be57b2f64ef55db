"""scripts/deploy_local.sh --tls --auth --proxy: one real loopback deployment (1 SuperLink, the
Fleet-only proxy scripts/fleet_proxy.py, 2 SuperNodes, fedavg on digits, one round) runs to
finished:completed over TLS with SuperNode authentication, the SuperNodes connected through the
proxy, and while it is up the real SuperLink and the proxy refuse what they must refuse:

(a) the run under TLS + auth completes, with exactly the two registered nodes, whose only
    --superlink is the proxy; the proxy forwarded their Fleet calls (activation, message pulls
    and pushes, object pushes and pulls: counted in its log);
(b) a SuperNode (through the proxy) with a valid TLS trust but an unregistered key is refused at
    activation (its log and the SuperLink's log say so) and never becomes a node of the
    federation. Flower 1.42 refuses an unknown key even without --enable-supernode-auth (a node
    with a key never registers itself), so a third probe, a SuperNode with no key at all, is what
    shows that authentication is on: without it that node would register itself and join; with
    it, it is refused;
(c) a SuperNode (through the proxy) that trusts another CA fails the TLS handshake; so does an
    HTTPS client with that CA, at the SuperLink and at the proxy, and a plain-HTTP client gets no
    answer from either (TLS is really on);
(d) the SuperLink's one port (Fleet, Control and ServerAppIo in Flower 1.42) listens on
    127.0.0.1 only: a connection to the same port on 127.0.0.2 (loopback too) is refused, and
    no process of the deployment (proxy included) listens on any other address;
(e) the proxy serves the Fleet API only: the same Control API request (POST
    /v1/control/list-runs, what `flwr ls` sends) that the SuperLink answers 200 directly gets 403
    through the proxy, and so do /v1/runtime/get-nodes, /health and the dot-segment tricks
    /v1/fleet/../control/list-runs and /v1/fleet/%2e%2e/control/list-runs (a proxy that checks
    the prefix and lets httpx build the URL would forward the first one as
    /v1/control/list-runs); `flwr ls` through the proxy fails with the 403, against
    127.0.0.1:<superlink port> it works; each refusal is in the proxy's log.

The probes start as soon as the SuperLink is up; --before-run holds the run until they are done,
so nothing races the end of the deployment. Every process started here is stopped here."""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest
from deploy_helpers import (
    descendants,
    flower_processes_mentioning,
    kill_all,
    listening_sockets,
    stop_session,
)
from flwr.proto.control_pb2 import ListRunsRequest, ListRunsResponse

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "deploy_local.sh")
BIN = os.path.join(ROOT, ".venv", "bin")
# The hook the script runs before submitting the run: wait (at most 240 s) for the probes.
HOLD = (
    'for _ in $(seq 1 2400); do [ -e "$DEPLOY_WORKDIR/hold-go" ] && exit 0; sleep 0.1; done; exit 1'
)


class _Output:
    """The script's stdout, read by a thread so that the test can wait for lines."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines = proc, []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def finish(self) -> str:
        """All of the output, once the script has ended."""
        self._thread.join(timeout=30)
        return self.text()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            if self.proc.poll() is not None:
                self._thread.join(timeout=5)
                found = re.search(pattern, self.text())
                if found:
                    return found
                pytest.fail(f"deploy_local.sh ended before {pattern!r}:\n{self.text()[-4000:]}")
            time.sleep(0.1)
        pytest.fail(f"no {pattern!r} within {timeout} s:\n{self.text()[-4000:]}")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _stranger_key(path) -> str:
    """An ECDSA P-384 key pair nobody registered (OpenSSH private key at ``path``); returns the
    base64 body of its public key as the SuperLink logs it (PEM lines joined by a literal \\n)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "\\n".join(pem.decode().strip().splitlines()[1:-1])


def _other_ca(path) -> None:
    """A self-signed CA certificate unrelated to the deployment's CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "some other CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _get_health(host: str, port: int, context: ssl.SSLContext | None) -> int:
    if context is None:
        conn = http.client.HTTPConnection(host, port, timeout=10)
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=10, context=context)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    finally:
        conn.close()


def _post(host: str, port: int, path: str, body: bytes, context: ssl.SSLContext) -> tuple:
    """(status, body) of an HTTPS POST of a protobuf body, the path sent exactly as given."""
    conn = http.client.HTTPSConnection(host, port, timeout=10, context=context)
    try:
        conn.request(
            "POST",
            path,
            body=body,
            headers={"content-type": "application/protobuf", "accept": "application/protobuf"},
        )
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def _flwr_json(args: list[str], env: dict) -> subprocess.Popen:
    """A `flwr ... --format json` command, started (the caller collects it)."""
    return subprocess.Popen(
        [os.path.join(BIN, "flwr"), *args, "--format", "json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _collect(proc: subprocess.Popen) -> tuple[int, dict | None, str]:
    """(exit status, parsed JSON or None, raw output) of a _flwr_json command."""
    out, _ = proc.communicate(timeout=60)
    try:
        return proc.returncode, json.loads(out), out
    except ValueError:
        return proc.returncode, None, out


def _wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().replace(b"\0", b" ").decode(errors="replace")


def test_auth_needs_tls():
    """--auth alone is refused up front (Flower has no node authentication without TLS)."""
    done = subprocess.run(
        ["bash", SCRIPT, "--auth", "-n", "1"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2 and "--auth needs --tls" in done.stderr
    done = subprocess.run(
        ["bash", SCRIPT, "--proxy", "-n", "1"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2 and "--proxy needs --tls" in done.stderr


def test_tls_auth_deployment_refuses_strangers(tmp_path):
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    stranger_key = probe_dir / "stranger"
    stranger_pub = _stranger_key(stranger_key)
    other_ca = probe_dir / "other-ca.crt"
    _other_ca(other_ca)
    workdir = tmp_path / "deploy"
    out_dir = tmp_path / "out"
    overrides = (
        'strategy="fedavg" dataset="digits" num-server-rounds=1 local-epochs=1 device="cpu" '
        f'output-dir="{out_dir}" run-name="secure"'
    )
    cmd = ["bash", SCRIPT, "--tls", "--auth", "--proxy", "-n", "2", "-c", overrides,
           "--timeout", "240",
           "--workdir", str(workdir), "--before-run", HOLD]  # fmt: skip
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}",
               FLWR_HOME=str(probe_dir / "flwr-home"), FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_UPDATE_CHECK="1")  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out = _Output(proc)
    probes: dict[str, subprocess.Popen] = {}
    probe_ports = _free_ports(3)
    port = link_pid = proxy_port = None
    try:
        link = out.wait_for(r"superlink up on 127\.0\.0\.1:(\d+) \(pid (\d+)", timeout=150)
        port, link_pid = int(link.group(1)), int(link.group(2))
        proxy = out.wait_for(r"fleet proxy up on 127\.0\.0\.1:(\d+) \(pid (\d+)\)", timeout=60)
        proxy_port, proxy_pid = int(proxy.group(1)), int(proxy.group(2))
        ca = str(workdir / "pki" / "ca.crt")

        # (b) and (c): three SuperNodes that must be turned away, started right away; they go
        # through the proxy, as every site does
        common = ["--superlink", f"127.0.0.1:{proxy_port}", "--host", "127.0.0.1"]
        probe_cmds = {
            "stranger": [
                "--root-certificates", ca, "--auth-supernode-private-key", str(stranger_key),
                "--port", str(probe_ports[0]), "--max-retries", "2",
                "--node-config", "partition-id=0 num-partitions=2",
            ],
            "keyless": ["--root-certificates", ca, "--port", str(probe_ports[1]),
                        "--max-retries", "2", "--node-config", "partition-id=1 num-partitions=2"],
            "other-ca": ["--root-certificates", str(other_ca), "--port", str(probe_ports[2]),
                         "--max-retries", "1"],
        }  # fmt: skip
        for name, args in probe_cmds.items():
            with open(probe_dir / f"{name}.log", "w") as log:
                probes[name] = subprocess.Popen(
                    [os.path.join(BIN, "flower-supernode"), *common, *args],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=env, cwd=str(probe_dir), start_new_session=True,
                )  # fmt: skip

        # (c) TLS is on and verified: the right CA gets an answer (IP and DNS SAN), another CA
        # fails the handshake, plain HTTP gets none
        trusted = ssl.create_default_context(cafile=ca)
        assert _get_health("127.0.0.1", port, trusted) == 200
        assert _get_health("localhost", port, trusted) == 200
        stranger_ca = ssl.create_default_context(cafile=str(other_ca))
        for p in (port, proxy_port):
            with pytest.raises(ssl.SSLCertVerificationError):
                _get_health("127.0.0.1", p, stranger_ca)
            with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
                _get_health("127.0.0.1", p, None)

        # (e) the proxy forwards the Fleet API only: the Control API request the SuperLink
        # answers (200, a ListRunsResponse) gets 403 through the proxy, like the other paths
        list_runs = ListRunsRequest().SerializeToString()
        status, body = _post("127.0.0.1", port, "/v1/control/list-runs", list_runs, trusted)
        assert status == 200, body
        ListRunsResponse().ParseFromString(body)  # a real answer of the Control API
        refused_paths = [
            "/v1/control/list-runs",
            "/v1/runtime/get-nodes",
            "/v1/fleet/../control/list-runs",
            "/v1/fleet/%2e%2e/control/list-runs",
        ]
        via_proxy = {
            p: _post("127.0.0.1", proxy_port, p, list_runs, trusted) for p in refused_paths
        }
        health_via_proxy = _get_health("127.0.0.1", proxy_port, trusted)

        # (d) the port exists on 127.0.0.1 and nowhere else, not even on 127.0.0.2
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", port), timeout=5).close()

        # the script holds the run until the probes are done
        out.wait_for(r"\[deploy\] before-run:", timeout=150)
        nodes = out.wait_for(r"2 supernodes up \(pids (\d+) (\d+),", timeout=5)
        deployment = descendants(link_pid) + [int(nodes.group(1)), int(nodes.group(2))]
        node_cmdlines = [_cmdline(int(nodes.group(i))) for i in (1, 2)]
        deployment.append(proxy_pid)
        listening = listening_sockets(deployment)
        assert any(p == port and pid == link_pid for _, p, pid in listening), listening
        assert any(p == proxy_port and pid == proxy_pid for _, p, pid in listening), listening
        assert listening and all(addr == "127.0.0.1" for addr, _, _ in listening), listening

        codes = {name: _wait_exit(p, timeout=60) for name, p in probes.items()}
        logs = {name: (probe_dir / f"{name}.log").read_text() for name in probes}
        registered = re.findall(r"registered \S+node-\d\.pub as SuperNode (\d+)", out.text())
        # the operator's `flwr` against 127.0.0.1:<superlink port> (the deployment's connection)
        # and against the proxy (a connection of its own, same CA), side by side
        (probe_dir / "flwr-home").mkdir(exist_ok=True)
        (probe_dir / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "via-proxy"\n\n[superlink.via-proxy]\n'
            f'address = "127.0.0.1:{proxy_port}"\nroot-certificates = "{ca}"\n'
        )
        operator_env = dict(env, FLWR_HOME=str(workdir / "flwr-home"))
        flwr_cmds = {
            "supernode ls": _flwr_json(["supernode", "ls", "deploy"], operator_env),
            "ls direct": _flwr_json(["ls", "deploy"], operator_env),
            "ls via proxy": _flwr_json(["ls", "via-proxy"], env),
        }
        flwr_out = {name: _collect(p) for name, p in flwr_cmds.items()}
        (workdir / "hold-go").touch()

        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # the script's trap stops what it started
            proc.wait(timeout=60)
            pytest.fail(f"deploy_local.sh did not finish in time:\n{out.text()[-4000:]}")
    finally:
        for p in probes.values():
            stop_session(p)
        if proc.poll() is None:  # a failure above: release the hold, stop the deployment
            with contextlib.suppress(OSError):
                (workdir / "hold-go").touch()
            proc.send_signal(signal.SIGTERM)  # the script's trap stops what it started
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        needles = [str(workdir), str(probe_dir)] + [f"127.0.0.1:{p}" for p in probe_ports]
        needles += [f"127.0.0.1:{p}" for p in (port, proxy_port) if p]
        left = flower_processes_mentioning(needles)
        kill_all(left)  # keep the machine clean even when an assertion below fails
    output = out.finish()

    # (a) the run over TLS with node authentication, with the two registered nodes only
    assert proc.returncode == 0, output[-4000:]
    assert "[deploy] mode: TLS + SuperNode authentication" in output
    assert re.search(r"\[deploy\] run \d+: finished:completed", output), output[-4000:]
    assert not left, f"processes left behind: {left}"
    link_log = (workdir / "logs" / "superlink.log").read_text()
    assert f"Uvicorn running on https://127.0.0.1:{port}" in link_log
    config = (workdir / "flwr-home" / "config.toml").read_text()
    assert "root-certificates" in config and "insecure" not in config
    final = json.loads((out_dir / "secure" / "results.json").read_text())["final"]
    assert sorted(final["accuracy_by_client"]) == ["0", "1"]
    rc, listed, raw = flwr_out["supernode ls"]
    assert rc == 0 and listed and listed.get("success", True), raw
    online = {n["node-id"]: n["status"] for n in listed["nodes"]}
    assert len(registered) == 2 and online == {i: "online" for i in registered}, online
    # ... and they reached the SuperLink through the proxy only, which forwarded their calls
    for cmdline in node_cmdlines:
        assert f"--superlink 127.0.0.1:{proxy_port} " in cmdline, cmdline
    assert f"127.0.0.1:{port}" not in " ".join(node_cmdlines)
    proxy_log = (workdir / "logs" / "fleet-proxy.log").read_text()
    summary = re.search(r"stopped: forwarded (\d+) requests \(([^)]*)\); refused (\d+)", proxy_log)
    assert summary, proxy_log[-3000:]
    forwarded = {k: int(n) for k, n in re.findall(r"(/v1/fleet/[\w-]+) (\d+)", summary.group(2))}
    assert forwarded.get("/v1/fleet/activate-node", 0) >= 2, forwarded
    for call in ("pull-messages", "push-messages", "push-object", "pull-object", "get-run"):
        assert forwarded.get(f"/v1/fleet/{call}", 0) >= 1, forwarded
    assert not any(p.startswith(("/v1/control", "/v1/runtime")) for p in forwarded), forwarded

    # (e) what the proxy refused: the Control API request the SuperLink itself answered, the
    # Runtime API, /health, the dot-segment paths; `flwr ls` fails through it, works directly
    for path, (status, body) in via_proxy.items():
        assert status == 403 and body.startswith(b"403 Forbidden"), (path, status, body)
    assert health_via_proxy == 403
    for path in refused_paths + ["/health"]:
        line = re.escape(f"'{path}' from 127.0.0.1:") + r"\d+: 403"
        assert re.search(r"WARNING fleet_proxy: refused (POST|GET) " + line, proxy_log), path
    rc, direct, raw = flwr_out["ls direct"]
    assert rc == 0 and direct and direct["success"] is True and "runs" in direct, raw
    rc, proxied, raw = flwr_out["ls via proxy"]  # `--format json` exits 0 on errors too
    assert proxied and proxied["success"] is False and "runs" not in proxied, raw
    assert "403 Forbidden" in proxied["error-message"], raw
    assert "/v1/control/list-runs" in proxied["error-message"], raw
    refusals = re.findall(r"refused (\w+) '([^']*)' from", proxy_log)
    assert refusals.count(("POST", "/v1/control/list-runs")) >= 2, refusals  # probe + flwr ls
    # nothing the Fleet API needs was refused (every refusal is one of the probes above)
    assert {p for _, p in refusals} <= set(refused_paths) | {"/health"}, refusals

    # (b) the unregistered key: refused by the SuperLink at activation, the node gave up
    assert codes["stranger"] not in (0, None), logs["stranger"]
    assert "Failed to activate SuperNode" in logs["stranger"], logs["stranger"]
    assert "SuperNode ID" not in logs["stranger"]
    refusal = re.search(r"\[/v1/fleet/activate-node\]\[ApiError:2004\][^\n]*", link_log)
    assert refusal and stranger_pub in refusal.group(0), link_log[-3000:]
    assert "No SuperNode found with the given public key" in refusal.group(0)
    # ... and the node without a key may not register itself: authentication is really on
    assert codes["keyless"] not in (0, None), logs["keyless"]
    assert "[code: 2001] SuperNode authentication is enabled" in logs["keyless"], logs["keyless"]
    assert "SuperNode ID" not in logs["keyless"]
    assert "[/v1/fleet/register-node][ApiError:2001]" in link_log

    # (c) the node that trusts another CA: TLS handshake failure, never connected
    assert codes["other-ca"] not in (0, None), logs["other-ca"]
    assert "CERTIFICATE_VERIFY_FAILED" in logs["other-ca"], logs["other-ca"]
    assert "SuperNode ID" not in logs["other-ca"]
    assert "SuperNode authentication is disabled" not in link_log  # the SuperLink's own word

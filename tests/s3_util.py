"""A real S3-protocol server for tests: moto's standalone server on a free loopback port.

    server = MotoServer.start()          # subprocess; returns once it answers
    server.create_bucket("rsnap")
    env = server.env()                    # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID=testing, ...
    server.stop()                         # by pid

As pytest fixtures: `moto_server` (session scope) and `fault_proxy`, from tests/s3_fixtures.py
(a plugin listed in conftest's `pytest_plugins`); `moto_missing()` gives the skip reason when
moto is not installed. Nothing here talks to anything but 127.0.0.1.
"""
from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

REGION = "us-east-1"
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
# moto checks no signature, but treats a request without one as anonymous (403 on objects)
AUTH = {"Authorization": "AWS4-HMAC-SHA256 Credential=testing/20250101/us-east-1/s3/aws4_request, "
                         "SignedHeaders=host, Signature=0"}


def moto_missing() -> str | None:
    """Why moto's server cannot run here, or None."""
    import importlib.util
    for mod in ("moto", "flask", "werkzeug"):   # flask, werkzeug come with moto[server]
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"moto[server] is not installed ({mod}): pip install 'moto[server]'"
    return None


def signed_request(port: int, method: str, path: str, body: bytes | None = None,
                   timeout: float = 10) -> tuple[int, bytes]:
    """(status, body) of one request to 127.0.0.1:port with the dummy signature."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=AUTH)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_aws_env(env: dict | None = None) -> dict:
    """A copy of env without any AWS_* variable, so a developer's own profile never leaks in."""
    env = dict(os.environ if env is None else env)
    for k in [k for k in env if k.startswith("AWS_")]:
        del env[k]
    return env


class MotoServer:
    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc, self.port = proc, port
        self.endpoint = f"http://127.0.0.1:{port}"

    @classmethod
    def start(cls, timeout: float = 30.0) -> "MotoServer":
        port = free_port()
        exe = shutil.which("moto_server")
        cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
        proc = subprocess.Popen(cmd + ["-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=clean_aws_env(), start_new_session=True)
        server = cls(proc, port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {proc.returncode}")
            try:
                server.request("GET", "/moto-api/")
                return server
            except OSError:
                time.sleep(0.05)
        server.stop()
        raise RuntimeError(f"moto_server did not answer on port {port} within {timeout}s")

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """One request with a dummy signature (moto checks none): bucket admin and resets."""
        return signed_request(self.port, method, path, body)

    def create_bucket(self, name: str) -> None:
        status, body = self.request("PUT", f"/{name}")
        if status != 200:
            raise RuntimeError(f"create bucket {name}: HTTP {status} {body[:200]!r}")

    def reset(self) -> None:
        """Forget every bucket and object (moto's own API)."""
        self.request("POST", "/moto-api/reset")

    def env(self, endpoint: str | None = None, base: dict | None = None) -> dict:
        """Environment for a client process: the standard AWS variables, nothing else of AWS."""
        env = clean_aws_env(base)
        env.update(CREDS, AWS_REGION=REGION, AWS_DEFAULT_REGION=REGION,
                   AWS_ENDPOINT_URL=endpoint or self.endpoint,
                   AWS_EC2_METADATA_DISABLED="true",
                   AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
        return env

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: only its children
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

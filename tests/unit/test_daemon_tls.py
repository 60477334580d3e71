"""``vmkeep daemon`` as a real process on loopback: HTTPS with [api] tls_cert/tls_key, and a
clean exit 0 on SIGTERM (no VMs needed: /healthz and an authenticated read)."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx


def test_https_daemon_and_clean_sigterm(clean_env: Path, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ) | {"VMKEEP_API_TLS_CERT": str(cert), "VMKEEP_API_TLS_KEY": str(key)}
    vk = [sys.executable, "-m", "vmkeep.cli.main"]
    token = subprocess.run(
        [*vk, "token", "create", "t", "--role", "viewer", "--json"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    secret = json.loads(token)["token"]
    proc = subprocess.Popen(
        [*vk, "daemon", "--listen", f"127.0.0.1:{port}"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        trust = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=trust) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    assert client.get("/healthz").json()["ok"] is True
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline and proc.poll() is None
                    time.sleep(0.2)
            r = client.get("/v1/jobs", headers={"Authorization": f"Bearer {secret}"})
            assert r.status_code == 200 and r.json() == []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as plain:
            try:
                plain.get("/healthz")
                raise AssertionError("plain HTTP answered on a TLS port")
            except httpx.TransportError:
                pass
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "https://127.0.0.1" in err and secret not in err

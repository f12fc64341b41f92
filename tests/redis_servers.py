"""redis-server instances of their own for the tests that need a server set up a particular way.

``acl_redis``: the default user off, one ACL user with a password and audioq's recommended
rights (everything but ``@dangerous``, plus ``INFO``, which RQ reads the server version
from). ``tls_redis``: the same user behind TLS only, the client asked for a certificate; the
CA, server and client certificates are made with openssl on the spot. Both listen on free
loopback ports and stop after the test.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from worker_fixtures import free_port, stop_server

USER, PASSWORD = "audioq", "s3cret-for-tests"
ACL_RULE = ["on", f">{PASSWORD}", "~*", "&*", "+@all", "-@dangerous", "+info"]


@dataclass
class RedisServer:
    url: str  # with the user and password
    tls: dict[str, str]  # Settings fields naming the TLS files ({} without TLS)
    tls_dir: Path | None = None


def _start(args: list[str], data: Path, ping: redis.Redis) -> subprocess.Popen:
    server = shutil.which("redis-server")
    if not server:
        pytest.skip("redis-server is not installed")
    log = data / "redis.log"
    proc = subprocess.Popen([server, "--dir", str(data), "--save", "", "--appendonly", "no",
                             "--user", "default", "off", "--user", USER, *ACL_RULE, *args],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        try:
            ping.ping()
            return proc
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"redis-server did not come up: {log.read_text()[-500:]}")
            time.sleep(0.05)


@pytest.fixture
def acl_redis(tmp_path):
    port = free_port()
    url = f"redis://{USER}:{PASSWORD}@127.0.0.1:{port}/0"
    proc = _start(["--port", str(port)], tmp_path, redis.Redis.from_url(url))
    yield RedisServer(url=url, tls={})
    stop_server(proc)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(where: Path) -> None:
    """ca.crt; server.crt/.key for 127.0.0.1 and localhost; client.crt/.key; all signed by the CA."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=audioq test CA",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=where)
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                            ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=audioq test {name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=where)
        (where / f"{name}.ext").write_text(extension + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=where)


@pytest.fixture
def tls_redis(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    certs = tmp_path / "certs"
    certs.mkdir()
    make_certificates(certs)
    port = free_port()
    url = f"rediss://{USER}:{PASSWORD}@127.0.0.1:{port}/0"
    tls = {"redis_tls_ca_file": str(certs / "ca.crt"), "redis_tls_cert_file": str(certs / "client.crt"),
           "redis_tls_key_file": str(certs / "client.key")}
    ping = redis.Redis.from_url(url, ssl_ca_certs=tls["redis_tls_ca_file"], ssl_certfile=tls["redis_tls_cert_file"],
                                ssl_keyfile=tls["redis_tls_key_file"])
    proc = _start(["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(certs / "server.crt"),
                   "--tls-key-file", str(certs / "server.key"), "--tls-ca-cert-file", str(certs / "ca.crt"),
                   "--tls-auth-clients", "yes"], tmp_path, ping)
    yield RedisServer(url=url, tls=tls, tls_dir=certs)
    stop_server(proc)

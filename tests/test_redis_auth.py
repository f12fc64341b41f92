"""Producer and worker against a Redis that wants an ACL user and password, and one behind TLS.

Each test starts its own redis-server set up that way (``redis_servers``), enqueues through
the real ``Client`` built from settings alone (so the connection is made as in production)
and lets a real worker subprocess run the job.
"""

from __future__ import annotations

import pytest
from conftest import make_tone
from pydantic import ValidationError
from redis_servers import PASSWORD, acl_redis, tls_redis  # noqa: F401
from worker_fixtures import start_worker, worker_settings, write_wav

from producer.cli import main
from producer.client import Client


@pytest.fixture
def request_for(tmp_path):
    return {"audio_uri": write_wav(tmp_path / "a.wav", make_tone(1.0)).as_uri()}


def run_one_job(server, model: str, request: dict, tmp_path) -> str:
    """Enqueue ``request`` and run a burst worker on it, both through ``server``; returns the worker log."""
    settings = worker_settings(server.url, model=model, **server.tls)
    client = Client(settings)
    job_id = client.enqueue(request).job_id
    worker = start_worker(settings, tmp_path / "worker.log", burst=True)
    assert worker.wait(timeout=120) == 0
    status = client.status(job_id)
    assert status.state == "finished" and status.result.tokens > 0
    return (tmp_path / "worker.log").read_text()


def refusal(url: str, capsys) -> str:
    """What ``audioq info`` says on stderr when it cannot use the Redis at ``url`` (it must exit 3)."""
    assert main(["--redis-url", url, "info"]) == 3
    return capsys.readouterr().err


@pytest.fixture(autouse=True)
def no_config_file(monkeypatch):
    monkeypatch.delenv("AUDIOQ_CONFIG", raising=False)


def test_producer_and_worker_work_as_an_acl_user_with_a_password(acl_redis, tiny_checkpoint, request_for,
                                                                 tmp_path):
    log = run_one_job(acl_redis, str(tiny_checkpoint()), request_for, tmp_path)
    assert PASSWORD not in log


def test_a_wrong_password_is_refused_in_a_sentence_that_hides_it(acl_redis, capsys):
    err = refusal(acl_redis.url.replace(PASSWORD, "not-the-password"), capsys)
    assert "cannot reach Redis at redis://audioq:***@127.0.0.1" in err and "invalid username-password" in err
    assert "not-the-password" not in err


def test_producer_and_worker_work_over_tls_with_a_client_certificate(tls_redis, tiny_checkpoint, request_for,
                                                                     tmp_path):
    log = run_one_job(tls_redis, str(tiny_checkpoint()), request_for, tmp_path)
    assert PASSWORD not in log


def test_a_tls_server_whose_ca_the_client_does_not_know_is_refused(tls_redis, capsys, monkeypatch):
    """Without redis_tls_ca_file the system store has no such CA: the certificate check fails, loudly."""
    monkeypatch.setenv("AUDIOQ_REDIS_TLS_CERT_FILE", tls_redis.tls["redis_tls_cert_file"])
    monkeypatch.setenv("AUDIOQ_REDIS_TLS_KEY_FILE", tls_redis.tls["redis_tls_key_file"])
    err = refusal(tls_redis.url, capsys)
    assert "cannot reach Redis at rediss://audioq:***@127.0.0.1" in err and "certificate verify failed" in err


def test_tls_files_beside_a_plain_redis_url_are_refused_when_settings_load():
    with pytest.raises(ValidationError, match=r"redis_tls_ca_file set, but redis_url is not rediss://"):
        worker_settings("redis://127.0.0.1:6379/0", redis_tls_ca_file="/etc/ca.pem")

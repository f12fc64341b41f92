"""Downloads that go wrong mid-body, from a real HTTP server that speaks just enough S3:
each ends with its failure code and one plain sentence, never botocore's own text."""

from __future__ import annotations

import http.server
import threading

import pytest

from producer.failures import AudioqError, FailureCode
from producer.settings import Settings
from worker.storage import fetched_audio



class LyingObject(http.server.BaseHTTPRequestHandler):
    """Every object: GET announces ``server.body_size`` bytes (None: no length, the body ends when
    the connection closes), sends ``server.sent`` bytes and hangs up."""

    def do_GET(self):
        self.send_response(200)
        if self.server.body_size is not None:
            self.send_header("Content-Length", str(self.server.body_size))
        self.end_headers()
        self.wfile.write(b"\0" * self.server.sent)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def lying_s3(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LyingObject)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def fetch_fails(server, body_size: int | None, sent: int, **settings) -> AudioqError:
    server.body_size, server.sent = body_size, sent
    settings = Settings(s3_endpoint_url=f"http://127.0.0.1:{server.server_port}", s3_region="us-east-1",
                        s3_addressing_style="path", **settings)
    with pytest.raises(AudioqError) as info:
        with fetched_audio("s3://audio/meeting.flac", settings):
            pass
    return info.value


def test_a_body_cut_short_is_a_retryable_plain_sentence(lying_s3):
    error = fetch_fails(lying_s3, body_size=100_000, sent=1_000)
    assert error.code == FailureCode.STORAGE_UNAVAILABLE and error.retryable
    assert error.message == ("the download of s3://audio/meeting.flac broke off after 1000 of 100000 bytes: "
                             "the storage server closed the connection early")


def test_an_object_announced_over_the_limit_is_refused_before_its_body_is_read(lying_s3):
    error = fetch_fails(lying_s3, body_size=3 << 20, sent=3 << 20, max_audio_bytes=1 << 20)
    assert error.code == FailureCode.AUDIO_TOO_LARGE
    assert error.message == "s3://audio/meeting.flac is 3.1 MB; this worker accepts at most 1.0 MB (max_audio_bytes)"


def test_a_body_without_a_length_stops_at_the_limit_in_plain_words(lying_s3):
    error = fetch_fails(lying_s3, body_size=None, sent=3 << 20, max_audio_bytes=1 << 20)
    assert error.code == FailureCode.AUDIO_TOO_LARGE
    assert error.message == ("the download of s3://audio/meeting.flac passed 1.0 MB before the end; "
                             "this worker accepts at most 1.0 MB (max_audio_bytes)")

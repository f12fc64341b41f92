"""The Redis connection, made one way for producer and worker: the URL plus TLS files.

``redis_url`` carries the ACL user and password (``redis://user:pass@host:6379/0``) and the
transport (``rediss://`` for TLS). Certificate files are settings rather than URL query
arguments, so a path never has to be URL-escaped and a config file can name them plainly:
``redis_tls_ca_file`` (the CA that signed the server's certificate, when the system store
does not hold it) and ``redis_tls_cert_file`` / ``redis_tls_key_file`` (a client
certificate, for a server with ``tls-auth-clients yes``). They only mean something with
``rediss://``; ``Settings`` refuses them beside a plain URL.
"""

from __future__ import annotations

from typing import Any

import redis

from producer.settings import Settings

# Settings field -> redis-py's SSL connection keyword
_TLS_FILES = {"redis_tls_ca_file": "ssl_ca_certs", "redis_tls_cert_file": "ssl_certfile",
              "redis_tls_key_file": "ssl_keyfile"}


def connect(settings: Settings, **options: Any) -> redis.Redis:
    """A client for ``settings.redis_url``; ``options`` are redis-py's (timeouts, ...)."""
    tls = {keyword: getattr(settings, field) for field, keyword in _TLS_FILES.items() if getattr(settings, field)}
    return redis.Redis.from_url(settings.redis_url, **tls, **options)

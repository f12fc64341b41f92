"""The one way audioq reaches S3: a client built from the settings, and ``s3://`` URIs split.

Shared by the producer (``enqueue --prefix`` listings) and the worker (downloads, output
writes), so both sides agree on endpoint, region, addressing style, profile, timeouts and
on what an ``s3://`` URI names. Only boto3 is needed, and it is imported when a client is
built, not when this module is: ``producer.schema`` imports it for ``split_s3_uri``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from producer.settings import Settings

# botocore's own retries per request stay few: a worker retries storage_unavailable with
# backoff itself and must not sit minutes inside one request; a producer reports the error.
# botocore's ``max_attempts`` counts retries after the first request: 2 means 3 requests.
S3_MAX_ATTEMPTS = 2


class StorageError(RuntimeError):
    """The producer could not list or read storage; the text is one sentence for a person."""


def listing_error(exc: Exception, uri: str) -> StorageError:
    """A botocore error raised while listing ``uri`` as a plain sentence (no botocore wording)."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):  # connection refused, timeouts, bad endpoint, no credentials
        return StorageError(f"cannot list {uri}: storage cannot be reached or signed for ({exc})")
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code == "NoSuchBucket" or status == 404:
        return StorageError(f"cannot list {uri}: bucket {split_s3_uri(uri)[0]!r} does not exist")
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
        return StorageError(f"cannot list {uri}: storage refused access ({code}); check the credentials")
    detail = f"{code}: {error['Message']}" if error.get("Message") else code or f"HTTP {status}"
    return StorageError(f"cannot list {uri}: storage answered {detail}")


def s3_client(settings: "Settings", *, max_attempts: int = S3_MAX_ATTEMPTS):
    """A boto3 S3 client configured from ``settings`` (never from a job).

    Credentials come from boto3's own chain (environment, ``s3_profile``, instance role).
    ``max_attempts`` is botocore's retry count (standard mode), the first request excluded.
    """
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(profile_name=settings.s3_profile)
    config = Config(s3={"addressing_style": settings.s3_addressing_style},
                    connect_timeout=settings.s3_connect_timeout, read_timeout=settings.s3_read_timeout,
                    retries={"mode": "standard", "max_attempts": max_attempts})
    return session.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
                          config=config)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` → ``("bucket", "some/key")``; ``s3://bucket`` → ``("bucket", "")``.

    The key is everything after the first ``/`` behind the bucket, byte for byte: unlike
    ``urlparse``, a ``?`` or ``#`` in a key is part of the key, and a leading ``/`` of the
    key (``s3://bucket//x`` names the key ``/x``) is kept. Raises ValueError for anything
    that is not ``s3://`` with a bucket name of at least 3 characters.
    """
    if not isinstance(uri, str) or uri[:5].lower() != "s3://":
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[5:].partition("/")
    if len(bucket) < 3:
        raise ValueError(f"{uri!r} needs a bucket name of at least 3 characters (s3://bucket/key)")
    return bucket, key

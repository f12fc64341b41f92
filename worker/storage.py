"""Fetch a job's audio and write its outputs: ``s3://bucket/key`` or ``file:///abs/path``.

Where and how to reach S3 (endpoint, region, addressing style, profile, timeouts) comes
from the worker's settings, credentials from boto3's own chain; a job only names the
object. Downloads stream to a temporary file that is always removed, under the size limit
checked twice: from HEAD before any byte is read, and while streaming (a HEAD can be
missing or stale). Storage errors become the failure codes a producer can act on:
``audio_not_found``, ``access_denied``, ``audio_too_large``, and ``storage_unavailable``
for what may pass (connection refused, timeouts, 5xx, throttling), which the job retries.

Outputs: ``check_output`` runs before the audio is fetched, so a job whose output location
cannot exist fails at once rather than after the model ran. A missing bucket, a bucket name
S3 rejects, or a ``file://`` prefix that is (or lies under) a non-directory is
``invalid_request`` (the request names a place that cannot hold outputs); a location this
worker may not write is ``access_denied``, as for audio it may not read (the fix is the
worker's credentials or permissions, not the request). For S3 the check is a HEAD of the
bucket: it proves the bucket exists, not that PutObject is allowed, and a 403 from it is
not conclusive (HeadBucket needs ListBucket, which a write-only role may lack), so a
refused write still surfaces, as ``access_denied``, when the outputs are written.
"""

from __future__ import annotations

import errno
import os
import secrets
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import botocore.exceptions as boto_errors

from producer.failures import AudioqError, FailureCode
from producer.s3 import s3_client, split_s3_uri
from producer.schema import DEFAULT_OUTPUT_FORMATS, JobResult, OutputFormat
from producer.settings import Settings
from producer.writers import get_writer

CHUNK_BYTES = 1 << 20

_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound", "InvalidBucketName"}
_DENIED = {"403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "AllAccessDisabled", "AccountProblem", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
           "InvalidObjectState", "RequestTimeTooSkewed"}
_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
              "ServiceUnavailable"}


def file_path(uri: str) -> Path:
    return Path(url2pathname(urlparse(uri).path))


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _too_large(uri: str, size: int | None, limit: int) -> AudioqError:
    if size is None:  # no size announced, or a stream longer than announced
        found = f"the download of {uri} passed {_mb(limit)} before the end"
    else:
        found = f"{uri} is {_mb(size)}"
    return AudioqError(FailureCode.AUDIO_TOO_LARGE,
                       f"{found}; this worker accepts at most {_mb(limit)} (max_audio_bytes)")


def storage_error(exc: Exception, uri: str, client=None, writing: bool = False) -> AudioqError:
    """Map a boto3/botocore exception raised for ``uri`` to a failure code and message.

    ``writing``: ``uri`` is an output, so a missing bucket is the request's fault
    (``invalid_request``), not missing audio.
    """
    if isinstance(exc, boto_errors.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        detail = f"{code}: {error['Message']}" if error.get("Message") else code
        if code in _TRANSIENT or status >= 500 or status == 429:
            return AudioqError(FailureCode.STORAGE_UNAVAILABLE, f"storage answered {detail} for {uri}")
        if writing and (code in _NOT_FOUND or status == 404):
            return AudioqError(FailureCode.INVALID_REQUEST,
                               f"cannot write outputs to {uri}: bucket {split_s3_uri(uri)[0]!r} does not exist")
        if code in _NOT_FOUND or status == 404:
            return AudioqError(FailureCode.AUDIO_NOT_FOUND, _not_found_message(uri, client))
        if code in _DENIED or status == 403:
            return AudioqError(FailureCode.ACCESS_DENIED,
                               f"storage refused access to {uri} ({detail}); check this worker's credentials")
        return AudioqError(FailureCode.INVALID_REQUEST, f"storage rejected the request for {uri}: {detail}")
    if isinstance(exc, (boto_errors.NoCredentialsError, boto_errors.PartialCredentialsError,
                        boto_errors.ProfileNotFound)):
        return AudioqError(FailureCode.ACCESS_DENIED, f"cannot sign the request for {uri}: {exc}")
    if isinstance(exc, (boto_errors.IncompleteReadError, boto_errors.ResponseStreamingError)):
        got = (f" after {exc.kwargs['actual_bytes']} of {exc.kwargs['expected_bytes']} bytes"
               if isinstance(exc, boto_errors.IncompleteReadError) else "")
        return AudioqError(FailureCode.STORAGE_UNAVAILABLE,
                           f"the download of {uri} broke off{got}: the storage server closed the connection early")
    if isinstance(exc, boto_errors.ParamValidationError):
        return AudioqError(FailureCode.INVALID_REQUEST, f"{uri} is not a valid S3 location: {exc}")
    return AudioqError(FailureCode.STORAGE_UNAVAILABLE, f"cannot reach storage for {uri}: {exc}")


def _not_found_message(uri: str, client) -> str:
    """HEAD answers a bare 404 for a missing bucket and a missing key alike: ask which."""
    bucket, key = split_s3_uri(uri)
    if client is not None:
        try:
            client.head_bucket(Bucket=bucket)
        except boto_errors.ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in {"404", "NoSuchBucket"}:
                return f"{uri}: bucket {bucket!r} does not exist"
        except boto_errors.BotoCoreError:
            pass
        else:
            return f"{uri}: bucket {bucket!r} has no object {key!r}"
    return f"{uri}: no such bucket or object"


@contextmanager
def fetched_audio(uri: str, settings: Settings) -> Iterator[Path]:
    """The audio at ``uri`` as a local path for the duration of the ``with`` block."""
    if urlparse(uri).scheme == "file":
        yield _local_file(uri, settings.max_audio_bytes)
        return
    with tempfile.TemporaryDirectory(prefix="audioq-", dir=settings.temp_dir) as tmp:
        path = Path(tmp) / ("audio" + Path(split_s3_uri(uri)[1]).suffix[:16])
        _download(uri, path, settings)
        yield path


def _local_file(uri: str, limit: int) -> Path:
    """A ``file://`` URI is read in place: it is already local, so there is nothing to copy."""
    path = file_path(uri)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise AudioqError(FailureCode.AUDIO_NOT_FOUND, f"{uri} is not a regular file")
        if not os.access(path, os.R_OK):
            raise PermissionError(path)
    except FileNotFoundError:
        raise AudioqError(FailureCode.AUDIO_NOT_FOUND, f"{uri}: no such file on this worker") from None
    except PermissionError:
        raise AudioqError(FailureCode.ACCESS_DENIED, f"{uri}: this worker may not read it") from None
    if size > limit:
        raise _too_large(uri, size, limit)
    return path


def _download(uri: str, path: Path, settings: Settings) -> None:
    bucket, key = split_s3_uri(uri)
    limit = settings.max_audio_bytes
    client = None
    try:
        client = s3_client(settings)
        size = client.head_object(Bucket=bucket, Key=key).get("ContentLength")
        if size is not None and size > limit:
            raise _too_large(uri, size, limit)
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        written = 0
        with body, open(path, "wb") as out:
            for chunk in body.iter_chunks(CHUNK_BYTES):
                written += len(chunk)
                if written > limit:
                    raise _too_large(uri, None, limit)
                out.write(chunk)
    except (boto_errors.BotoCoreError, boto_errors.ClientError) as exc:
        raise storage_error(exc, uri, client) from None


def output_uris(output_uri_prefix: str, job_id: str,
                formats: Sequence[OutputFormat] = DEFAULT_OUTPUT_FORMATS) -> tuple[str, ...]:
    """Where ``write_outputs`` puts each format of a job's result: ``<prefix>/<job_id>.<format>``."""
    base = f"{output_uri_prefix.rstrip('/')}/{job_id}"
    return tuple(f"{base}.{get_writer(f).extension}" for f in formats)


def check_output(output_uri_prefix: str, settings: Settings) -> None:
    """Fail now if ``output_uri_prefix`` cannot receive outputs (see the module's docstring)."""
    if urlparse(output_uri_prefix).scheme == "file":
        path = file_path(output_uri_prefix)
        try:
            path.mkdir(parents=True, exist_ok=True)
            if not os.access(path, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "not writable", str(path))
        except OSError as exc:
            raise _local_write_error(output_uri_prefix, exc) from None
        return
    bucket, _ = split_s3_uri(output_uri_prefix)
    client = None
    try:
        client = s3_client(settings)
        client.head_bucket(Bucket=bucket)
    except (boto_errors.BotoCoreError, boto_errors.ClientError) as exc:
        error = storage_error(exc, output_uri_prefix, client, writing=True)
        # A refused HEAD proves nothing about PutObject; the write itself will tell.
        inconclusive = isinstance(exc, boto_errors.ClientError) and error.code == FailureCode.ACCESS_DENIED
        if not inconclusive:
            raise error from None


def write_outputs(output_uri_prefix: str, job_id: str, result: JobResult, settings: Settings,
                  formats: Sequence[OutputFormat] = DEFAULT_OUTPUT_FORMATS) -> None:
    """Write ``output_uris``: each format rendered by ``producer.writers``."""
    writers = [get_writer(f) for f in formats]
    files = [(uri, writer.render(result).encode(), writer.content_type)
             for uri, writer in zip(output_uris(output_uri_prefix, job_id, formats), writers)]
    if urlparse(output_uri_prefix).scheme == "file":
        for uri, data, _ in files:
            _write_local(uri, data)
        return
    client = None
    for uri, data, content_type in files:
        try:
            client = client or s3_client(settings)
            bucket, key = split_s3_uri(uri)
            client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
        except (boto_errors.BotoCoreError, boto_errors.ClientError) as exc:
            raise storage_error(exc, uri, client, writing=True) from None


# errno values of a local write that name a path which cannot hold a file: the request's fault.
_BAD_PATH = {errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP}


def _local_write_error(uri: str, exc: OSError) -> AudioqError:
    """A ``file://`` write's OSError as a failure: denied, a bad path, or (disk full, I/O) retryable."""
    reason = exc.strerror or type(exc).__name__
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return AudioqError(FailureCode.ACCESS_DENIED, f"{uri}: this worker may not write there ({reason})")
    if exc.errno in _BAD_PATH:
        return AudioqError(FailureCode.INVALID_REQUEST,
                           f"{uri} cannot hold outputs: {reason} ({exc.filename or uri})")
    return AudioqError(FailureCode.STORAGE_UNAVAILABLE, f"cannot write {uri} on this worker: {reason}")


def _write_local(uri: str, data: bytes) -> None:
    """Write through a temporary sibling and rename, so readers never see half a file.

    The sibling is created with mode 0666 less the umask, like any file the worker writes
    (``mkstemp`` would leave it, and so the output, 0600).
    """
    path = file_path(uri)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                break
            except FileExistsError:
                continue
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise _local_write_error(uri, exc) from None

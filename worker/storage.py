"""Fetch a job's audio and write its outputs: ``s3://bucket/key`` or ``file:///abs/path``.

Where and how to reach S3 (endpoint, region, addressing style, profile, timeouts) comes
from the worker's settings, credentials from boto3's own chain; a job only names the
object. Downloads stream to a temporary file that is always removed, under the size limit
checked twice: from the response's Content-Length before any byte of the body is read, and
while streaming (the header can be missing or wrong). Storage errors become the failure codes a producer can act on:
``audio_not_found``, ``access_denied``, ``audio_too_large``, and ``storage_unavailable``
for what may pass (connection refused, timeouts, 5xx, throttling), which the job retries.

Bounds. One storage attempt (a GET and the whole body, or an output check or write)
runs in a helper thread and is waited for at most ``s3_attempt_timeout`` seconds, and never
past the job's deadline: botocore's ``read_timeout`` bounds each socket read only, so a
server that accepts and never answers cost three of them per attempt, and one that drips
a byte at a time was never cut off. An attempt cut off by ``s3_attempt_timeout`` is
``storage_unavailable`` (retried); one cut off by the job's deadline is ``timeout``. The
abandoned thread stops at its next read (its socket timeout is cut short).

Allowlists (settings): ``allowed_buckets`` (empty: any), ``allow_file_uris`` and
``file_roots`` (empty: anywhere this worker's user may read or write). A ``file://`` path
is resolved (symlinks, ``..``) before it is compared with the roots, so a link or ``..``
leading out of them is ``access_denied``. Local paths that cannot name a file (a NUL
byte, a name too long) are ``invalid_request``; a path under a regular file or a symlink
loop is ``audio_not_found``; an output directory that cannot be created where the request
puts it (``/proc/...``) is ``invalid_request``, never a retried ``storage_unavailable``.

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
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

import botocore.exceptions as boto_errors

from producer.failures import AudioqError, FailureCode
from producer.s3 import s3_client, split_s3_uri
from producer.schema import DEFAULT_OUTPUT_FORMATS, JobResult, OutputFormat
from producer.settings import Settings
from producer.writers import get_writer

CHUNK_BYTES = 1 << 20
# what boto3 reads from the environment when it builds a client (credentials, region, endpoint, CA)
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                   "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_CA_BUNDLE", "AWS_DEFAULT_REGION",
                   "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN",
                   "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                   "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
MAX_CLIENTS = 8  # S3 configurations kept at once (a worker has one; tests make many)
_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()
T = TypeVar("T")

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


class _Attempt:
    """One storage attempt run in a helper thread, so that it can be abandoned at its bound."""

    def __init__(self, action: Callable[["_Attempt"], object]):
        self.action = action
        self.stopped = threading.Event()
        self.body = None  # the response body being read, once there is one
        self.outcome: tuple[bool, object] | None = None

    def _run(self) -> None:
        try:
            self.outcome = (True, self.action(self))
        except BaseException as exc:  # handed to the waiting thread
            self.outcome = (False, exc)

    def stop(self) -> None:
        self.stopped.set()
        if self.body is not None:
            with suppress(Exception):  # a read blocked now ends at its next byte
                self.body.set_socket_timeout(0.001)


def _bounded(uri: str, what: str, settings: Settings, deadline: float | None,
             action: Callable[[_Attempt], T]) -> T:
    """``action`` (one attempt against S3), cut off after ``s3_attempt_timeout`` or at ``deadline``."""
    left = None if deadline is None else deadline - time.monotonic()
    by_deadline = left is not None and left < settings.s3_attempt_timeout
    limit = left if by_deadline else settings.s3_attempt_timeout
    if limit <= 0:
        raise AudioqError(FailureCode.TIMEOUT, f"the job's time budget ran out before {what} {uri}")
    attempt = _Attempt(action)
    thread = threading.Thread(target=attempt._run, name="audioq-storage", daemon=True)
    thread.start()
    thread.join(limit)
    if attempt.outcome is None:
        attempt.stop()
        if by_deadline:
            raise AudioqError(FailureCode.TIMEOUT,
                              f"the job's time budget ran out while {what} {uri} ({limit:.1f} s were left)")
        raise AudioqError(FailureCode.STORAGE_UNAVAILABLE,
                          f"storage did not finish {what} {uri} within {limit:g} s (s3_attempt_timeout)")
    done, value = attempt.outcome
    if not done:
        raise value
    return value


def _client(settings: Settings):
    """The S3 client for these settings, whose single reads never wait longer than a whole attempt may last.

    Built once and shared by every thread (boto3 clients are thread-safe; sessions are not):
    building one parses botocore's service model, tens of milliseconds of Python holding the
    interpreter lock that the decode loop needs. Keyed by the S3 settings and the AWS
    variables of the environment, so a change of either gets a client of its own (keys
    rotated inside a credentials file are read at the worker's next start; role and
    instance credentials refresh themselves).
    """
    limit = settings.s3_attempt_timeout
    bounded = settings.model_copy(update={"s3_read_timeout": min(settings.s3_read_timeout, limit),
                                          "s3_connect_timeout": min(settings.s3_connect_timeout, limit)})
    key = (bounded.s3_endpoint_url, bounded.s3_region, bounded.s3_addressing_style, bounded.s3_profile,
           bounded.s3_read_timeout, bounded.s3_connect_timeout, *(os.environ.get(v) for v in CREDENTIAL_VARS))
    with _clients_lock:
        if key not in _clients:
            if len(_clients) >= MAX_CLIENTS:
                del _clients[next(iter(_clients))]
            _clients[key] = s3_client(bounded)
        return _clients[key]


def warm_up(settings: Settings) -> str:
    """Build the S3 client before the first job; returns a line for the worker's log.

    Building it parses botocore's service model and resolves the credentials: 0.1-0.3 s of
    Python that the first job's fetch paid while the model had nothing to run (the start of
    every drain). It is bounded like a storage attempt (``s3_attempt_timeout``): a credential
    chain that hangs (a silent metadata endpoint, a stuck ``credential_process``) delays the
    start by that much at most, and the build goes on in its thread for the jobs to use.
    Settings that cannot build a client (a profile that does not exist) do not stop the
    worker, whose ``file://`` jobs may still run: the line says why, and each S3 job fails
    with that reason.
    """
    started = time.perf_counter()
    try:
        _bounded("the S3 client", "building", settings, None, lambda _: _client(settings))
    except AudioqError as exc:  # cut off: the credentials are slow to resolve
        return f"{exc.message}; the worker goes on, and S3 jobs wait for it within their own bounds"
    except Exception as exc:
        return f"no S3 client ({exc}): its S3 jobs will fail until the S3 settings are fixed"
    return f"S3 client built in {time.perf_counter() - started:.2f} s"


def _check_bucket(uri: str, settings: Settings) -> None:
    bucket = split_s3_uri(uri)[0]
    if settings.allowed_buckets and bucket not in settings.allowed_buckets:
        raise AudioqError(FailureCode.ACCESS_DENIED,
                          f"{uri}: bucket {bucket!r} is not one this worker may use (allowed_buckets: "
                          f"{', '.join(settings.allowed_buckets)})")


@contextmanager
def fetched_audio(uri: str, settings: Settings, deadline: float | None = None) -> Iterator[Path]:
    """The audio at ``uri`` as a local path for the duration of the ``with`` block.

    ``deadline`` (``time.monotonic()``): when the job's budget runs out; the download stops there.
    """
    if urlparse(uri).scheme == "file":
        yield _local_file(uri, settings)
        return
    _check_bucket(uri, settings)
    with tempfile.TemporaryDirectory(prefix="audioq-", dir=settings.temp_dir) as tmp:
        path = Path(tmp) / ("audio" + Path(split_s3_uri(uri)[1]).suffix[:16])
        _bounded(uri, "downloading", settings, deadline, lambda attempt: _download(uri, path, settings, attempt))
        yield path


def _local_path(uri: str, settings: Settings) -> Path:
    """The path a ``file://`` URI names, once this worker's file settings allow it."""
    if not settings.allow_file_uris:
        raise AudioqError(FailureCode.ACCESS_DENIED, f"{uri}: this worker does not take file:// URIs "
                                                     "(allow_file_uris is off)")
    path = file_path(uri)
    if "\0" in str(path):
        raise AudioqError(FailureCode.INVALID_REQUEST, f"{uri} names a path with a NUL byte, which no file has")
    if settings.file_roots:
        real = os.path.realpath(path)
        roots = [os.path.realpath(root) for root in settings.file_roots]
        if not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
            raise AudioqError(FailureCode.ACCESS_DENIED,
                              f"{uri} resolves to {real}, outside the directories this worker may use "
                              f"(file_roots: {', '.join(settings.file_roots)})")
    return path


def _local_file(uri: str, settings: Settings) -> Path:
    """A ``file://`` URI is read in place: it is already local, so there is nothing to copy."""
    path = _local_path(uri, settings)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise AudioqError(FailureCode.AUDIO_NOT_FOUND, f"{uri} is not a regular file")
        if not os.access(path, os.R_OK):
            raise PermissionError(errno.EACCES, "not readable", str(path))
    except OSError as exc:
        raise _local_read_error(uri, exc) from None
    if size > settings.max_audio_bytes:
        raise _too_large(uri, size, settings.max_audio_bytes)
    return path


def _local_read_error(uri: str, exc: OSError) -> AudioqError:
    reason = exc.strerror or type(exc).__name__
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return AudioqError(FailureCode.AUDIO_NOT_FOUND, f"{uri}: no such file on this worker")
    if exc.errno == errno.ELOOP:
        return AudioqError(FailureCode.AUDIO_NOT_FOUND, f"{uri}: no such file on this worker (a symlink loop)")
    if exc.errno == errno.ENAMETOOLONG:
        return AudioqError(FailureCode.INVALID_REQUEST, f"{uri} cannot name a file here: {reason}")
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
        return AudioqError(FailureCode.ACCESS_DENIED, f"{uri}: this worker may not read it")
    return AudioqError(FailureCode.STORAGE_UNAVAILABLE, f"cannot read {uri} on this worker: {reason}")


def _download(uri: str, path: Path, settings: Settings, attempt: _Attempt) -> None:
    bucket, key = split_s3_uri(uri)
    limit = settings.max_audio_bytes
    client = None
    try:
        client = _client(settings)
        response = client.get_object(Bucket=bucket, Key=key)
        body = attempt.body = response["Body"]
        written = 0
        with body:
            size = response.get("ContentLength")
            if size is not None and size > limit:
                raise _too_large(uri, size, limit)
            if attempt.stopped.is_set():
                return
            with open(path, "wb") as out:
                for chunk in body.iter_chunks(CHUNK_BYTES):
                    if attempt.stopped.is_set():
                        return
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


def check_output(output_uri_prefix: str, settings: Settings, deadline: float | None = None) -> None:
    """Fail now if ``output_uri_prefix`` cannot receive outputs (see the module's docstring)."""
    if urlparse(output_uri_prefix).scheme == "file":
        path = _local_path(output_uri_prefix, settings)
        try:
            path.mkdir(parents=True, exist_ok=True)
            if not os.access(path, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "not writable", str(path))
        except OSError as exc:
            raise _local_write_error(output_uri_prefix, exc) from None
        return
    _check_bucket(output_uri_prefix, settings)
    _bounded(output_uri_prefix, "checking", settings, deadline, lambda _: _head_bucket(output_uri_prefix, settings))


def _head_bucket(output_uri_prefix: str, settings: Settings) -> None:
    bucket, _ = split_s3_uri(output_uri_prefix)
    client = None
    try:
        client = _client(settings)
        client.head_bucket(Bucket=bucket)
    except (boto_errors.BotoCoreError, boto_errors.ClientError) as exc:
        error = storage_error(exc, output_uri_prefix, client, writing=True)
        # A refused HEAD proves nothing about PutObject; the write itself will tell.
        inconclusive = isinstance(exc, boto_errors.ClientError) and error.code == FailureCode.ACCESS_DENIED
        if not inconclusive:
            raise error from None


def write_outputs(output_uri_prefix: str, job_id: str, result: JobResult, settings: Settings,
                  formats: Sequence[OutputFormat] = DEFAULT_OUTPUT_FORMATS, deadline: float | None = None) -> None:
    """Write ``output_uris``: each format rendered by ``producer.writers``."""
    writers = [get_writer(f) for f in formats]
    files = [(uri, writer.render(result).encode(), writer.content_type)
             for uri, writer in zip(output_uris(output_uri_prefix, job_id, formats), writers)]
    if urlparse(output_uri_prefix).scheme == "file":
        _local_path(output_uri_prefix, settings)
        for uri, data, _ in files:
            _write_local(uri, data)
        return
    _check_bucket(output_uri_prefix, settings)
    _bounded(output_uri_prefix, "writing to", settings, deadline, lambda _: _put_objects(files, settings))


def _put_objects(files: list[tuple[str, bytes, str]], settings: Settings) -> None:
    client = None
    for uri, data, content_type in files:
        try:
            client = client or _client(settings)
            bucket, key = split_s3_uri(uri)
            client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
        except (boto_errors.BotoCoreError, boto_errors.ClientError) as exc:
            raise storage_error(exc, uri, client, writing=True) from None


# errno values of a local write that name a path which cannot hold a file: the request's fault.
# (ENOENT after ``mkdir(parents=True)``: the file system refuses a directory there, as /proc does.)
_BAD_PATH = {errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOENT}


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

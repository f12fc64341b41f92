"""audioq producer: the light client that enqueues audio jobs and reads their outcome.

This package must never import MLX (or anything from ``worker``) at import time, so that
scripts and services can submit work with only redis, rq, boto3 and pydantic installed.
"""

__all__ = ["Client", "EnqueueOutcome", "JobStatus"]


def __getattr__(name: str):
    # Lazy, so that importing ``producer.schema`` (as the worker does) does not pull in
    # the client and its rq/redis imports.
    if name == "Client":
        from producer.client import Client
        return Client
    if name in ("EnqueueOutcome", "JobStatus"):
        from producer import status
        return getattr(status, name)
    raise AttributeError(f"module 'producer' has no attribute {name!r}")

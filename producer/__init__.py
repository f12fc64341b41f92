"""audioq producer: the light client that enqueues audio jobs and reads their outcome.

This package must never import MLX (or anything from ``worker``) at import time, so that
scripts and services can submit work with only redis, rq, boto3 and pydantic installed.
"""

"""Puts ``engine_timeline`` into every Python process that imports the engine, while ``AUDIOQ_TIMELINE`` is set.

``scripts/bench.py --timeline`` puts this directory first on the worker's ``PYTHONPATH``, so
the worker and its engine process (a child started with ``-m``) both read this file at start
and record their engine's calls. Without the variable nothing happens. Being first on the path,
it hides any other ``sitecustomize`` from those two processes (a distribution's, a venv's).
"""

import importlib.abc
import importlib.machinery
import os
import sys

ENGINE = "worker.gemma4.engine"


class _Instrument(importlib.abc.MetaPathFinder):
    """Finds the engine module as Python would, and instruments it once it has run."""

    def find_spec(self, name, path, target=None):
        if name != ENGINE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            import engine_timeline

            engine_timeline.install(os.environ["AUDIOQ_TIMELINE"])

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("AUDIOQ_TIMELINE"):
    sys.meta_path.insert(0, _Instrument())

"""Rehearsal aid: make Python refuse the project's packages that the GPU machine does not have.

The GPU machine runs the project from source on its own preinstalled packages and has no package
registry (../shared/docs/GPU.md; the device tool's KINDS.md lists them). Of the project's
dependencies it lacks FastAPI, uvicorn (with starlette), Ray and Playwright, so nothing that
scripts/gpu-checks.sh runs may import them. Put this folder first on PYTHONPATH and Python imports
this file at start-up (the `site` module's sitecustomize hook), in every subprocess too:

    PYTHONPATH=scripts/gpu-like PYTHON=.venv-gpu-versions/bin/python QUICK=1 bash scripts/gpu-checks.sh ...
"""

import sys

ABSENT_ON_GPU_MACHINE = {"fastapi", "uvicorn", "starlette", "ray", "playwright"}


class _RefuseAbsent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT_ON_GPU_MACHINE:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU machine)", name=name)
        return None  # everything else: the usual finders


sys.meta_path.insert(0, _RefuseAbsent())

"""Loads the compiled extension fastpeft._C, with an error that says how to build it."""

import torch

_BUILD_HINT = (
    "Build it from the repository root with `make setup` (creates .venv and builds), or inside an "
    "environment that has torch: `pip install --no-build-isolation -e .` "
    "(FASTPEFT_SKIP_CUDA_BUILD=1 for CPU kernels only)."
)

try:
    from fastpeft import _C  # noqa: F401  (loading it registers torch.ops.fastpeft.*)
except ImportError as exc:  # pragma: no cover - exercised by the packaging test in a subprocess
    raise ImportError(
        f"fastpeft's compiled extension fastpeft._C could not be loaded ({exc}). {_BUILD_HINT}"
    ) from exc

_built_torch = _C.build_info()["torch_version"]
if _built_torch != torch.__version__:  # pragma: no cover - needs two torch installs
    raise ImportError(
        f"fastpeft._C was built against torch {_built_torch} but torch {torch.__version__} is "
        f"installed; rebuild the extension. {_BUILD_HINT}"
    )


def build_info() -> dict:
    """What the installed extension was compiled with.

    Returns a dict with ``cuda`` (bool: CUDA kernels compiled), ``cuda_archs`` (e.g. ``"9.0"``,
    empty for a CPU-only build), ``cuda_version`` (nvcc's release, empty for CPU-only) and
    ``torch_version`` (the torch the extension was built against).
    """
    return dict(_C.build_info())

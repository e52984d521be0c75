"""Packaging: build_info says what was compiled; a missing extension gives an actionable error."""

import os
import subprocess
import sys

import torch

import fastpeft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_info_describes_the_build():
    info = fastpeft.build_info()
    assert set(info) == {"cuda", "cuda_archs", "cuda_version", "torch_version"}
    assert info["torch_version"] == torch.__version__
    if info["cuda"]:
        assert info["cuda_archs"] and info["cuda_version"]
        assert hasattr(torch.ops.fastpeft, "lora_shrink_dropout")
    else:
        assert info["cuda_archs"] == "" and info["cuda_version"] == ""


def test_every_op_is_registered_once_with_a_schema():
    ops = ["dequantize_4bit_", "lora_linear", "lora_linear_backward", "lora_linear_4bit", "lora_linear_4bit_backward",
           "lora_shrink_dropout", "lora_grad_A_dropout", "lora_grad_x_dropout_accum_"]  # fmt: skip
    for name in ops:
        op = getattr(torch.ops.fastpeft, name).default
        assert op._schema.name == f"fastpeft::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU"), name


def test_missing_extension_error_says_how_to_build():
    code = "import sys; sys.modules['fastpeft._C'] = None\nimport fastpeft"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    assert "fastpeft's compiled extension fastpeft._C could not be loaded" in proc.stderr
    assert "make setup" in proc.stderr and "pip install --no-build-isolation -e ." in proc.stderr


def test_cuda_smoke_script_runs_every_case_on_the_cpu():
    """tools/cuda_smoke.py is what compute-sanitizer runs on a GPU machine; keep it working."""
    env = dict(os.environ, FASTPEFT_SMOKE_DEVICE="cpu")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "cuda_smoke.py")], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "10/10 cases ran" in done.stdout


def test_every_public_function_class_and_method_has_a_docstring():
    import inspect

    import fastpeft.integrations
    import fastpeft.nn
    import fastpeft.ops
    import fastpeft.optim
    import fastpeft.quant

    missing = []
    for mod in (fastpeft, fastpeft.nn, fastpeft.ops, fastpeft.optim, fastpeft.quant, fastpeft.integrations):
        for name in getattr(mod, "__all__", [n for n in dir(mod) if not n.startswith("_")]):
            obj = getattr(mod, name)
            if inspect.ismodule(obj) or not callable(obj) or getattr(obj, "__module__", "").startswith("typing"):
                continue
            if not (obj.__doc__ or "").strip():
                missing.append(f"{mod.__name__}.{name}")
            if inspect.isclass(obj):
                missing += [f"{mod.__name__}.{name}.{m}" for m, f in vars(obj).items()
                            if not m.startswith("_") and m != "extra_repr" and callable(f) and not (f.__doc__ or "").strip()]  # fmt: skip
    assert not missing, missing

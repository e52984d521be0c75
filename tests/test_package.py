"""Packaging: build_info says what was compiled, every operator is complete (kernels, fake, autograd,
opcheck, smoke case), a missing extension gives an actionable error, public API has docstrings."""

import glob
import os
import re
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


# Ops without autograd, and why: everything else registered must have an Autograd kernel.
NOT_DIFFERENTIABLE = {
    "dequantize_4bit_": "writes a frozen weight into a buffer",
    "dequantize_4bit_scaled_": "writes a frozen weight into a buffer",
    "dequantize_4bit_add_delta_": "writes a frozen weight into a buffer (used inside sparse_delta_linear)",
    "dequantize_int8_rowwise_": "writes a frozen weight into a buffer",
    "lora_shrink_dropout": "a building block of lora_linear's forward",
    "lora_grad_A_dropout": "a building block of lora_linear's backward",
    "lora_grad_x_dropout_accum_": "a building block of lora_linear's backward",
    "dropout_apply": "a building block of dora_linear (the dropped x for a vendor GEMM)",
    "dropout_apply_add_": "a building block of dora_linear's backward",
    "multi_lora_plan": "integer routing plan",
    "sparse_adamw_step_": "optimizer update",
    "sparse_delta_add_": "writes into a buffer (used inside sparse_delta_linear)",
    "sparse_delta_weight_grad": "a building block of sparse_delta_linear's backward",
    "ia3_scale_": "in-place inference scaling",
    "cross_entropy_rows_": "a building block of linear_cross_entropy",
    "linear_cross_entropy": "returns its own gradients; fastpeft.ops.linear_cross_entropy's autograd.Function scales them",
}


def fastpeft_ops() -> list:
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastpeft::"))


def has_kernel(name: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastpeft::{name}", key)


def test_every_op_has_its_kernels_fake_autograd_opcheck_and_smoke_case():
    """Adding an op is checked, not remembered (docs/adding_an_op.md): every fastpeft:: operator
    has a CPU kernel and (in a CUDA build) a CUDA kernel, directly or through
    CompositeExplicitAutograd; a fake kernel; an Autograd kernel unless listed above as not
    differentiable (a *_backward op is differentiated by nobody); an opcheck test; and it runs in
    tools/cuda_smoke.py."""
    from torch._library.simple_registry import singleton

    ops = fastpeft_ops()
    assert len(ops) >= 20, ops
    opchecked = set()
    for path in glob.glob(os.path.join(ROOT, "tests", "**", "*.py"), recursive=True):
        text = open(path).read()
        opchecked |= set(re.findall(r"opcheck\(\s*(?:torch\.ops\.fastpeft|ops)\.(\w+)", text))
        # `op = torch.ops.fastpeft.name` ... `opcheck(op, ...)`
        aliases = dict(re.findall(r"^\s*(\w+) = (?:torch\.ops\.fastpeft|ops)\.(\w+)\s*$", text, re.M))
        opchecked |= {aliases[v] for v in re.findall(r"opcheck\(\s*(\w+)\s*,", text) if v in aliases}
    env = dict(os.environ, FASTPEFT_SMOKE_DEVICE="cpu")
    smoke = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "cuda_smoke.py")], env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    ran = {n.split("::", 1)[1] for n in smoke.stdout.strip().splitlines()[-1].split()[3:]}
    problems = []
    for name in ops:
        composite = has_kernel(name, "CompositeExplicitAutograd")
        if not (composite or has_kernel(name, "CPU")):
            problems.append(f"{name}: no CPU kernel")
        if fastpeft.build_info()["cuda"] and not (composite or has_kernel(name, "CUDA")):
            problems.append(f"{name}: no CUDA kernel")
        if singleton.find(f"fastpeft::{name}").fake_impl.kernel is None:
            problems.append(f"{name}: no fake kernel (torch.library.register_fake in fastpeft/ops/)")
        differentiable = name not in NOT_DIFFERENTIABLE and not name.endswith("_backward")
        if differentiable != has_kernel(name, "Autograd"):
            problems.append(f"{name}: Autograd kernel {'missing' if differentiable else 'unexpected'}")
        if name not in opchecked:
            problems.append(f"{name}: no torch.library.opcheck test")
        if name not in ran:
            problems.append(f"{name}: not run by tools/cuda_smoke.py")
    assert not problems, "\n".join(problems)
    assert set(NOT_DIFFERENTIABLE) <= set(ops), set(NOT_DIFFERENTIABLE) - set(ops)


def test_missing_extension_error_says_how_to_build():
    code = "import sys; sys.modules['fastpeft._C'] = None\nimport fastpeft"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    assert "fastpeft's compiled extension fastpeft._C could not be loaded" in proc.stderr
    assert "make setup" in proc.stderr and "pip install --no-build-isolation -e ." in proc.stderr


def test_every_public_function_class_and_method_has_a_docstring():
    import inspect

    import fastpeft.integrations
    import fastpeft.memory
    import fastpeft.nn
    import fastpeft.ops
    import fastpeft.optim
    import fastpeft.quant

    missing = []
    for mod in (fastpeft, fastpeft.nn, fastpeft.ops, fastpeft.optim, fastpeft.quant, fastpeft.integrations,
                fastpeft.memory):
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

"""SparseDeltaLinear benchmark: fastpeft vs the plain-PyTorch dense-delta practice vs the bare frozen linear.

Providers, on the same frozen base, the same x and the same k trained entries (values) per case:
  fastpeft    SparseDeltaLinear: the delta is added while the base weight is copied / dequantized into
              the workspace (no dense delta), backward forms the gradient of values at the indices only
  reference   the plain-PyTorch practice: a dense delta D = zeros.scatter(indices, values) and W + D
              materialised (W dequantized by bitsandbytes for a 4-bit base), F.linear; autograd forms
              the dense out x in weight gradient and gathers it at the indices
  floor       the frozen base linear with no delta (nn.Linear / bnb Linear4bit): forward, and the
              input gradient in fwd+bwd -- the cost any frozen-base method pays

Cases: dense base (fp32 on CPU, bf16 on GPU) and bitsandbytes NF4 base (double-quantized; bnb runs on
CPU), densities 0.1% / 0.5% / 2%, modes fwd (no grad) and fwd+bwd (x and values need grad); and the
weight gradient alone through both of its paths at 0.1-20% density (mode bwd, cases "weight-grad": where the
sampled product and the dense GEMM + gather cross is the crossover the op uses).
Reports median / p20 / p80 ms of interleaved repetitions after warm-up (CUDA events on GPU; the
ratios to the floor and to fastpeft are summarize.py's, from the rows), and memory: on CPU the bytes autograd saves for backward, exact
(saved_tensors_hooks; frozen weights, quantization state, indices and values not counted), on CUDA
the peak memory allocated during one run.

Default shapes are CPU-sized (the 7B projections at 1/4 width: 1024x1024, 1024->2816, 2816->1024,
512 tokens); --full uses Llama-2-7B's (4096x4096, 4096->11008, 11008->4096) at 2048/4096/8192 tokens
(for a GPU).

  python benchmarks/bench_sparse_delta.py                      # CPU-scaled shapes, one thread
  python benchmarks/bench_sparse_delta.py --device cuda --full # 7B shapes
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from fastpeft.nn import SparseDeltaLinear  # noqa: E402
from fastpeft.optim.masks import index_dtype  # noqa: E402
from fastpeft.optim.random_mask import sample_without_replacement  # noqa: E402

# (in_features, out_features) of the layers: q/o-like square, up/gate (in -> intermediate), down.
CPU_SHAPES = dict(layers=[(1024, 1024), (1024, 2816), (2816, 1024)], tokens=[512])
FULL_SHAPES = dict(layers=[(4096, 4096), (4096, 11008), (11008, 4096)], tokens=[2048, 4096, 8192])
QUICK_SHAPES = dict(layers=[(64, 96)], tokens=[32])
DENSITIES = (0.001, 0.005, 0.02)


def headline():
    """The README row: fwd+bwd time of the dense-delta practice over fastpeft's, and fastpeft's over the floor."""
    return [{"what": "SparseDeltaLinear fwd+bwd (dense and NF4 bases, density 0.1-2%)", "where": {"mode": "fwd+bwd"},
             "cells": [{"text": "{}x vs the dense-delta practice", "values": [{"ratio": ["reference", "fastpeft"]}]},
                       {"text": "{}x the frozen-linear floor", "values": [{"ratio": ["fastpeft", "floor"]}]},
                       {"text": "saves only x for backward; base GEMMs at {} of this machine's GEMM throughput",
                        "values": [{"value": "fastpeft", "metric": "base_tflops_of_roofline"}]}]},
            {"what": "sparse-delta weight gradient alone, density 0.1-20% (the SDDMM / dense crossover)",
             "where": {"mode": "bwd"},
             "cells": [{"text": "dense GEMM + gather takes {}x the SDDMM's time",
                        "values": [{"ratio": ["dense_gather", "sddmm"]}]},
                       {"text": ""}, {"text": "the op switches to the dense path at the density where this crosses 1"}]}]  # fmt: skip


def frozen_dense_weight(base, kind, dtype):
    """The reference's dense W: the weight itself, or bitsandbytes' dequantization of it (per call,
    as a 4-bit base has no dense copy to keep)."""
    if kind == "dense":
        return lambda: base.weight
    import bitsandbytes.functional as bnbf

    return lambda: bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)


def reference_linear(x, weight_fn, bias, indices, values, shape):
    """x (W + D)^T + b with D materialised densely: what one writes without a sparse kernel."""
    w = weight_fn()
    delta = torch.zeros(shape[0] * shape[1], dtype=values.dtype, device=values.device)
    delta = delta.scatter(0, indices, values).view(shape)  # differentiable in values (backward: gather)
    return F.linear(x, (w + delta).to(x.dtype), None if bias is None else bias.to(x.dtype))


def frozen_tensors(base, layer):
    """Tensors that exist whatever the method (frozen weight, bnb quantization state, the trained
    values and their indices): left out of the saved-for-backward count, which is about activations."""
    out = [*base.parameters(), layer.values, layer.indices]
    st = getattr(base.weight, "quant_state", None)
    if st is not None:
        out += [st.absmax, st.code]
        if getattr(st, "state2", None) is not None:
            out += [st.state2.absmax, st.state2.code]
        if isinstance(getattr(st, "offset", None), torch.Tensor):
            out.append(st.offset)
    return tuple(t for t in out if isinstance(t, torch.Tensor))


def check_against_reference(providers, x, values):
    """Max abs differences of y and of d values between fastpeft and the reference (same g)."""
    outs = {}
    for name in ("fastpeft", "reference"):
        x.grad = values.grad = None
        y = providers[name]()
        g = torch.ones_like(y)
        y.backward(g)
        outs[name] = (y.detach().float(), values.grad.float().clone())
    x.grad = values.grad = None
    dy = (outs["fastpeft"][0] - outs["reference"][0]).abs().max().item()
    dv = (outs["fastpeft"][1] - outs["reference"][1]).abs().max().item()
    return dy, dv


def case_rows(kind, in_f, out_f, tokens, dtype, device, reps, densities, gen):
    rows = []
    base = common.make_linear_base(kind, in_f, out_f, dtype, device)
    shape = (out_f, in_f)
    numel = in_f * out_f
    weight_fn = frozen_dense_weight(base, kind, dtype)
    x = torch.randn(tokens, in_f, dtype=dtype, device=device, requires_grad=True)
    for density in densities:
        k = max(1, round(density * numel))
        idx = sample_without_replacement(numel, k, gen).to(index_dtype(numel))
        layer = SparseDeltaLinear(base, idx.to(device))
        with torch.no_grad():
            layer.values.normal_(0, 0.02)
        idx_long = layer.indices.long()
        providers = {
            "fastpeft": lambda: layer(x),
            "reference": lambda: reference_linear(x, weight_fn, base.bias, idx_long, layer.values, shape),
            "floor": lambda: base(x),
        }
        err_y, err_v = check_against_reference(providers, x, layer.values)
        for mode in ("fwd", "fwd+bwd"):
            runs = {name: common.runner(fn, mode, [x, layer.values]) for name, fn in providers.items()}
            stats = common.time_interleaved(runs, device, warmup=2, reps=reps)
            for name, st in stats.items():
                saved = None
                if mode == "fwd+bwd" and not device.startswith("cuda"):
                    saved = common.saved_activation_bytes(providers[name], exclude=frozen_tensors(base, layer))
                row = common.make_row("sparse_delta", f"{kind} {in_f}x{out_f} t{tokens} d{density:g}", mode, dtype,
                                      name, st, base=kind, in_f=in_f, out_f=out_f, tokens=tokens, density=density,
                                      k=k, saved_bytes=saved, peak_bytes=common.peak_memory_bytes(runs[name], device))  # fmt: skip
                # The frozen GEMMs every provider runs (forward; and the input gradient), 2 flops per MAC.
                row["base_tflops"] = (2 if mode == "fwd" else 4) * tokens * in_f * out_f / (st["median_ms"] * 1e-3) / 1e12
                if name == "fastpeft":
                    row.update(max_abs_err_y=err_y, max_abs_err_dvalues=err_v)
                rows.append(row)
        del layer, providers, runs
    return rows


GRAD_DENSITIES = (0.001, 0.005, 0.02, 0.05, 0.1, 0.2)


def weight_grad_rows(in_f, out_f, tokens, dtype, device, reps, gen):
    """dL/dvalues alone (mode "bwd"), both paths of sparse_delta_weight_grad at each density (forced through
    FASTPEFT_SDDMM_CROSSOVER): the sampled product ("sddmm") and one dense GEMM + gather
    ("dense_gather"). Where their times cross is the density crossover the op uses on this device."""
    rows = []
    numel = in_f * out_f
    g = torch.randn(tokens, out_f, dtype=dtype, device=device)
    x = torch.randn(tokens, in_f, dtype=dtype, device=device)
    previous = os.environ.get("FASTPEFT_SDDMM_CROSSOVER")

    def with_crossover(value, idx):
        def run():
            os.environ["FASTPEFT_SDDMM_CROSSOVER"] = value
            return torch.ops.fastpeft.sparse_delta_weight_grad(g, x, idx)
        return run

    try:
        for density in GRAD_DENSITIES:
            k = max(1, round(density * numel))
            idx = sample_without_replacement(numel, k, gen).to(index_dtype(numel)).to(device)
            runs = {"sddmm": with_crossover("2.0", idx), "dense_gather": with_crossover("0.0", idx)}
            stats = common.time_interleaved(runs, device, warmup=2, reps=reps)
            for name, st in stats.items():
                rows.append(common.make_row("sparse_delta", f"weight-grad {in_f}x{out_f} t{tokens} d{density:g}",
                                            "bwd", dtype, name, st, in_f=in_f, out_f=out_f, tokens=tokens,
                                            density=density, k=k))  # fmt: skip
    finally:
        if previous is None:
            os.environ.pop("FASTPEFT_SDDMM_CROSSOVER", None)
        else:
            os.environ["FASTPEFT_SDDMM_CROSSOVER"] = previous
    return rows


def main(argv=None):
    """Run the benchmark; return its rows (in the schema of benchmarks/common.py)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="Llama-2-7B shapes, 2k-8k tokens (needs a GPU)")
    parser.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    parser.add_argument("--no-4bit", action="store_true", help="skip the bitsandbytes NF4 base")
    args = common.add_common_args(parser).parse_args(argv)
    device, dtype = common.setup(args)
    on_cuda = device.startswith("cuda")
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES if args.full else CPU_SHAPES
    reps = args.reps or (50 if on_cuda else 10)
    gen = torch.Generator().manual_seed(0)
    kinds = ["dense"] + ([] if args.no_4bit else ["nf4"])
    rows = []
    for kind in kinds:
        for in_f, out_f in shapes["layers"]:
            for tokens in shapes["tokens"]:
                rows += case_rows(kind, in_f, out_f, tokens, dtype, device, reps, args.densities, gen)
    for in_f, out_f in shapes["layers"]:
        for tokens in shapes["tokens"]:
            rows += weight_grad_rows(in_f, out_f, tokens, dtype, device, reps, gen)
    preset = "_quick" if args.quick else "_full" if args.full else ""
    name = "bench_sparse_delta" + preset + ("" if on_cuda else "_cpu")
    config = dict(shapes=shapes, reps=reps, threads=None if on_cuda else args.threads)
    return common.finish(args, device, name, "sparse_delta", rows, headline(), config)


if __name__ == "__main__":
    main()

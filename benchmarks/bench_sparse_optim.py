"""Step time and optimizer memory of sparse-masked AdamW at FishMask densities.

Providers, on the same weights and the same k trained entries per weight:
  fastpeft              SparseMaskedAdamW: gathers the dense .grad at the indices, updates in place
  torch_fused_k         torch.optim.AdamW(fused=True) on contiguous tensors of the k entries only
                        (the floor: the same arithmetic with no gather/scatter)
  torch_foreach_k       the same with foreach=True
  dense_masked          the reference practice: grad.mul_(dense 0/1 mask) then torch AdamW
                        (fused) over every weight entry

Mode "fwd+bwd" times one layer's seven projections (forward and backward on ``--tokens`` tokens,
input gradients included) at the same densities:
  fastpeft              fastpeft.ops.masked_weight_linear: the weight gradient at the mask only
                        (what FishMaskConfig(masked_weight_grads=True) runs)
  dense_masked          F.linear, then the dense weight gradient multiplied by the 0/1 mask
  floor                 F.linear on a frozen weight (only the input gradient): the lower bound

Default shapes are a CPU-sized model (2 layers, hidden 1024, intermediate 2816: the 7B layer
structure at 1/4 width); --full uses Llama-2-7B's 32 layers (hidden 4096, intermediate 11008,
6.5 B weights; needs a GPU with ~80 GB for the dense-masked baseline in bf16).

On CPU the process CPU time of a step is recorded next to the wall time (shared machines).
Memory is the optimizer's own state, counted exactly from its tensors (the dense masks count
for dense_masked, the indices for fastpeft); on CUDA also the peak extra memory of one step.

  python benchmarks/bench_sparse_optim.py [--device cuda] [--full] [--densities 0.001 0.005 0.02] [--tokens 512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from fastpeft.ops import masked_weight_linear  # noqa: E402
from fastpeft.optim import SparseMaskedAdamW  # noqa: E402
from fastpeft.optim.random_mask import sample_without_replacement  # noqa: E402


def headline(densities):
    """The README rows, one per density: step time and state against dense-masked AdamW, and step
    time against torch's fused AdamW on the k entries alone (the floor)."""
    return [{"what": f"SparseMaskedAdamW step, density {d:.1%}", "where": {"mode": "step", "density": d},
             "cells": [{"text": "{}x faster, {}x less state than dense-masked AdamW",
                        "values": [{"ratio": ["dense_masked", "fastpeft"], "fmt": "{:.1f}"},
                                   {"ratio": ["dense_masked", "fastpeft"], "metric": "state_bytes", "fmt": "{:.0f}"}]},
                       {"text": "{}x the time of torch AdamW(fused) on k entries",
                        "values": [{"ratio": ["fastpeft", "torch_fused_k"]}]},
                       {"text": "cache lines moved at {} of this machine's triad bandwidth (useful bytes at {})",
                        "values": [{"value": "fastpeft", "metric": "line_gbps_of_roofline"},
                                   {"value": "fastpeft", "metric": "gbps_of_roofline"}]}]}
            for d in densities] + [
        {"what": f"FishMask layer fwd+bwd (masked weight gradients), density {d:.1%}",
         "where": {"mode": "fwd+bwd", "density": d},
         "cells": [{"text": "{}x faster than the dense-masked practice",
                    "values": [{"ratio": ["dense_masked", "fastpeft"]}]},
                   {"text": "{}x the frozen-linear floor", "values": [{"ratio": ["fastpeft", "floor"]}]}]}
        for d in densities]  # fmt: skip


def layer_shapes(hidden: int, intermediate: int, layers: int):
    per_layer = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
    return per_layer * layers


def make_weights(shapes, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=device).normal_(std=0.02))
        p.grad = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
        params.append(p)
    return params


def state_tensor_bytes(opt) -> int:
    total = 0
    for state in opt.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def torch_adamw(params, impl: str, device: str):
    kw = dict(lr=1e-4, weight_decay=0.0)
    if impl == "fused":
        kw["fused"] = True
    else:
        kw["foreach"] = True
    return torch.optim.AdamW(params, **kw)


def providers(shapes, masks, dtype, device):
    """name -> (step function, optimizer state bytes) for one density."""
    out = {}

    params = make_weights(shapes, dtype, device)
    opt = SparseMaskedAdamW(params, masks=masks, lr=1e-4, weight_decay=0.0)
    out["fastpeft"] = (opt.step, opt.state_bytes(), opt)

    for impl in ("fused", "foreach"):
        k_params = make_weights([(m.numel(),) for m in masks], dtype, device, seed=1)
        try:
            opt_k = torch_adamw(k_params, impl, device)
            opt_k.step()  # fused may be unsupported on this device/dtype
        except (RuntimeError, ValueError) as exc:
            print(f"torch_{impl}_k unavailable: {exc}")
            continue
        out[f"torch_{impl}_k"] = (opt_k.step, state_tensor_bytes(opt_k), opt_k)

    dense_params = make_weights(shapes, dtype, device, seed=2)
    dense_masks = []
    for p, m in zip(dense_params, masks):
        dm = torch.zeros(p.numel(), dtype=dtype, device=device)
        dm[m.long()] = 1
        dense_masks.append(dm.view_as(p))
    impl = "fused"
    try:
        opt_dense = torch_adamw(dense_params, impl, device)
        opt_dense.step()
    except (RuntimeError, ValueError):
        opt_dense = torch_adamw(dense_params, "foreach", device)
        opt_dense.step()
    grads = [p.grad for p in dense_params]

    def dense_step():
        torch._foreach_mul_(grads, dense_masks)
        opt_dense.step()

    mask_bytes = sum(m.numel() * m.element_size() for m in dense_masks)
    out["dense_masked"] = (dense_step, state_tensor_bytes(opt_dense) + mask_bytes, opt_dense)
    return out


def layer_providers(shapes, masks, tokens, dtype, device, seed=3):
    """name -> fwd+bwd function over one layer's projections (``shapes``, the first seven of the
    model's), each on its own input of ``tokens`` rows that needs a gradient (a middle layer)."""
    gen = torch.Generator().manual_seed(seed)
    ws = [(torch.randn(o, i, generator=gen) * 0.02).to(device, dtype).requires_grad_(True) for o, i in shapes]
    xs = [torch.randn(tokens, i, generator=gen).to(device, dtype).requires_grad_(True) for _, i in shapes]
    gs = [torch.randn(tokens, o, generator=gen).to(device, dtype) for o, _ in shapes]
    dense = []
    for w, m in zip(ws, masks):
        d = torch.zeros(w.numel(), dtype=dtype, device=device)
        d[m.long()] = 1
        dense.append(d.view_as(w))

    def clear():
        for t in (*ws, *xs):
            t.grad = None

    def fast():
        clear()
        for w, x, g, m in zip(ws, xs, gs, masks):
            masked_weight_linear(x, w, None, m).backward(g)

    def dense_masked():
        clear()
        for w, x, g, d in zip(ws, xs, gs, dense):
            F.linear(x, w).backward(g)
            w.grad.mul_(d)

    def floor():
        clear()
        for w, x, g in zip(ws, xs, gs):
            F.linear(x, w.detach()).backward(g)

    return {"fastpeft": fast, "dense_masked": dense_masked, "floor": floor}


def cpu_time_ms(fn, reps: int) -> float:
    """Median process CPU time of fn in ms: on a shared CPU machine wall time also counts the
    time other processes hold the cores; CPU time (all threads of this process) does not."""
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        times.append((time.process_time() - t0) * 1e3)
    return statistics.median(times)


def bytes_per_entry(dtype, index_bytes=4) -> int:
    """Bytes one trained entry moves at least: index, read+write of both moments, read+write of
    the parameter, read of the gradient (gathers counted at element size, not sector size)."""
    e = torch.tensor([], dtype=dtype).element_size()
    return index_bytes + 16 + 3 * e


def cache_line_bytes(masks, dtype, index_bytes=4, line=64) -> int:
    """Bytes of the cache lines one sparse step moves: every line of the parameter holding a trained
    entry is read and written back, every such line of the gradient read (a gather moves whole
    lines), plus the moments (read + write) and the indices, which are contiguous. At 0.5% density a
    trained entry is alone on its line, so this is ~7x the useful bytes; torch's fused AdamW over k
    contiguous entries moves only useful bytes, which bounds how close the sparse step can get."""
    e = torch.tensor([], dtype=dtype).element_size()
    total = 0
    for m in masks:
        lines = torch.unique(m.long().cpu() * e // line).numel()
        total += 3 * lines * line + m.numel() * (16 + index_bytes)
    return total


def main(argv=None):
    """Run the benchmark; return its rows (in the schema of benchmarks/common.py)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="Llama-2-7B shapes (32 layers, 4096/11008)")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.001, 0.005, 0.02])
    ap.add_argument("--tokens", type=int, default=None, help="tokens of the fwd+bwd rows (default 512; --quick 64)")
    args = common.add_common_args(ap, threads=None).parse_args(argv)
    device, dtype = common.setup(args)
    reps = args.reps or 10
    shapes = layer_shapes(4096, 11008, 32) if args.full else layer_shapes(64, 96, 1) if args.quick else layer_shapes(1024, 2816, 2)
    numel = sum(a * b for a, b in shapes)
    print(f"{len(shapes)} weights, {numel / 1e6:.1f} M entries, {dtype}, {common.device_name(device)}")

    peaks = common.device_peaks(device)
    tokens = args.tokens or (64 if args.quick else 512)  # of the fwd+bwd rows
    rows = []
    gen = torch.Generator().manual_seed(0)
    for density in args.densities:
        masks = [sample_without_replacement(a * b, max(1, round(density * a * b)), gen).to(torch.int32).to(device)
                 for a, b in shapes]  # fmt: skip
        k = sum(m.numel() for m in masks)
        provs = providers(shapes, masks, dtype, device)
        for name, (step, state_bytes, _opt) in provs.items():
            t = common.time_fn(step, device, warmup=3, reps=reps)
            if not device.startswith("cuda"):
                t["cpu_time_median_ms"] = cpu_time_ms(step, reps)
            row = common.make_row("sparse_optim", f"density {density:g}", "step", dtype, name, t, density=density,
                                  trained=k, weights=numel, state_bytes=state_bytes,
                                  peak_bytes=common.peak_memory_bytes(step, device))  # fmt: skip
            if name == "fastpeft":
                gbps = k * bytes_per_entry(dtype) / (t["median_ms"] * 1e-3) / 1e9
                row["gbps"] = gbps
                row["line_gbps"] = cache_line_bytes(masks, dtype) / (t["median_ms"] * 1e-3) / 1e9
                if peaks:
                    row["hbm_fraction"] = gbps / peaks["hbm_gbps"]
            rows.append(row)
        del provs
        layer = layer_providers(shapes[:7], masks[:7], tokens, dtype, device)
        for name, t in common.time_interleaved(layer, device, warmup=2, reps=reps).items():
            rows.append(common.make_row("sparse_optim", f"layer density {density:g}", "fwd+bwd", dtype, name, t,
                                        density=density, tokens=tokens,
                                        trained=sum(m.numel() for m in masks[:7])))  # fmt: skip
        del layer
    name = "bench_sparse_optim" + ("_full" if args.full else "_quick" if args.quick else "")
    config = {"shapes": "llama2-7b" if args.full else "64/96 x 1 layer" if args.quick else "1024/2816 x 2 layers",
              "reps": reps, "tokens": tokens}  # fmt: skip
    columns = ["case", "mode", "provider", "median_ms", "p20_ms", "p80_ms", "cpu_time_median_ms", "state_bytes", "gbps",
               "line_gbps"]
    return common.finish(args, device, name, "sparse_optim", rows, headline(args.densities), config, columns)


if __name__ == "__main__":
    main()

"""Prefix-KV attention: fastpeft vs concat + SDPA vs peft's path, forward and forward+backward.

Providers (all compute the same attention over P prefix + S causal sequence positions):
  fastpeft  torch.ops.fastpeft.prefix_attention (sequence part in PyTorch's fused kernels, prefix
            part and LSE merge in fastpeft's kernel; no [prefix; keys], no repeated prefix)
  sdpa      gather the prefix per example, cat in front of the keys, SDPA(enable_gqa) with a mask
  peft      what HF runs for peft's prefix tuning: the prefix repeated over the batch into the
            cache, cat with the keys, K/V heads repeated for GQA (a mask is present), SDPA
  floor     causal SDPA over the sequence alone (no prefix): the frozen op without any PEFT

Shapes: CPU-scaled defaults; ``--gpu-shapes`` runs the issue's Llama-3-8B layout (32 query heads,
8 kv heads, D = 128), P in 16..256, S in 512..8192, about 16k tokens per step, plus a bank of 64
per-example prefixes against one shared prefix. Results: benchmarks/results/<device>/
bench_prefix_attention.json (common.write_results).

    python benchmarks/bench_prefix_attention.py                 # CPU-scaled, CPU
    python benchmarks/bench_prefix_attention.py --device cuda --gpu-shapes
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    device_peaks,
    peak_memory_bytes,
    print_table,
    saved_activation_bytes,
    time_fn,
    write_results,
)
from fastpeft.ops import prefix_attention, prefix_attention_reference  # noqa: E402


def peft_path(q, k, v, prefix_k, prefix_v, prefix_index=None):
    """peft's prefix tuning as HF executes it with SDPA: a [B, Hkv, P, D] prefix per example in
    the cache (peft builds it by running the encoder on a batch-expanded prompt), DynamicCache's
    cat, repeat_kv because the prefix-extended mask is not None, then SDPA with that mask."""
    B, H, S, D = q.shape
    Hkv, P = k.shape[1], prefix_k.shape[2]
    index = torch.zeros(B, dtype=torch.long, device=q.device) if prefix_index is None else prefix_index
    keys = torch.cat([prefix_k[index], k], dim=2)
    values = torch.cat([prefix_v[index], v], dim=2)
    keys = keys[:, :, None].expand(B, Hkv, H // Hkv, P + S, D).reshape(B, H, P + S, D)
    values = values[:, :, None].expand(B, Hkv, H // Hkv, P + S, D).reshape(B, H, P + S, D)
    mask = torch.ones(S, P + S, dtype=torch.bool, device=q.device).tril(P)[None, None]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def floor_path(q, k, v, prefix_k, prefix_v, prefix_index=None):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


PROVIDERS = {
    "fastpeft": lambda q, k, v, pk, pv, idx=None: prefix_attention(q, k, v, pk, pv, idx),
    "sdpa": lambda q, k, v, pk, pv, idx=None: prefix_attention_reference(q, k, v, pk, pv, idx),
    "peft": peft_path,
    "floor": floor_path,
}


def make_inputs(B, H, Hkv, S, D, P, N, dtype, device):
    def leaf(*shape):
        return torch.randn(*shape, dtype=dtype, device=device).requires_grad_()

    index = torch.arange(B, device=device) % N if N > 1 else None
    return leaf(B, H, S, D), leaf(B, Hkv, S, D), leaf(B, Hkv, S, D), leaf(N, Hkv, P, D), leaf(N, Hkv, P, D), index


def useful_flops(B, H, S, D, P, backward):
    """Attention FLOPs of the visible (prefix + causal) scores: 4 per score element and head dim
    forward; backward is 2.5x forward (flash-attention's convention)."""
    forward = 4 * B * H * S * D * (P + (S + 1) / 2)
    return forward * (3.5 if backward else 1.0)


def bench_case(case, provider, dtype, device, reps):
    B, H, Hkv, S, D, P, N = (case[k] for k in ("B", "H", "Hkv", "S", "D", "P", "N"))
    q, k, v, pk, pv, index = make_inputs(B, H, Hkv, S, D, P, N, dtype, device)
    fn = PROVIDERS[provider]
    grad = torch.randn_like(q)
    leaves = (q, k, v, pk, pv)

    def forward():
        with torch.no_grad():
            fn(q, k, v, pk, pv, index)

    def forward_backward():
        torch.autograd.grad(fn(q, k, v, pk, pv, index), leaves, grad, allow_unused=True)

    rows = []
    for mode, run in (("forward", forward), ("forward+backward", forward_backward)):
        t = time_fn(run, device, warmup=2, reps=reps)
        tflops = useful_flops(B, H, S, D, P, mode != "forward") / (t["median_ms"] * 1e-3) / 1e12
        row = {**case, "dtype": str(dtype).replace("torch.", ""), "provider": provider, "mode": mode, **t,
               "tflops": tflops, "peak_memory_bytes": peak_memory_bytes(run, device)}  # fmt: skip
        peaks = device_peaks(device)
        if peaks:
            row["peak_bf16_tflops"] = peaks["bf16_tflops"]
        if mode != "forward":
            row["saved_bytes"] = saved_activation_bytes(lambda: fn(q, k, v, pk, pv, index), exclude=leaves)
        rows.append(row)
    del q, k, v, pk, pv
    return rows


def cases(gpu_shapes):
    if gpu_shapes:  # Llama-3-8B attention layout, ~16k tokens per step
        layout = dict(H=32, Hkv=8, D=128)
        shapes = [dict(S=S, P=P, B=max(1, 16384 // S), N=1) for S in (512, 2048, 8192) for P in (16, 64, 256)]
        shapes += [dict(S=512, P=64, B=64, N=1, label="shared"), dict(S=512, P=64, B=64, N=64, label="bank64")]
    else:  # the same structure scaled for a 2-core CPU
        layout = dict(H=8, Hkv=2, D=64)
        shapes = [dict(S=S, P=P, B=2, N=1) for S in (128, 512) for P in (16, 64)]
        shapes += [dict(S=128, P=16, B=8, N=1, label="shared"), dict(S=128, P=16, B=8, N=8, label="bank8")]
    return [{**layout, **s} for s in shapes]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 / float16 / bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--gpu-shapes", action="store_true", help="the issue's Llama-3-8B shapes")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    reps = args.reps or (20 if device.startswith("cuda") else 5)
    rows = []
    for case in cases(args.gpu_shapes):
        for provider in args.providers.split(","):
            try:
                rows += bench_case(case, provider, dtype, device, reps)
            except torch.OutOfMemoryError:
                rows.append({**case, "provider": provider, "error": "out of memory"})
                torch.cuda.empty_cache()
    print_table(rows, ["label", "B", "S", "P", "N", "provider", "mode", "median_ms", "p20_ms", "p80_ms", "tflops",
                       "peak_memory_bytes", "saved_bytes"])  # fmt: skip
    if not args.no_write:
        extra = {"dtype": str(dtype), "shapes": "gpu" if args.gpu_shapes else "cpu-scaled"}
        print("wrote", write_results("bench_prefix_attention", device, rows, extra))


if __name__ == "__main__":
    main()

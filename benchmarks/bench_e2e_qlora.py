"""End-to-end QLoRA fine-tuning: fastpeft vs peft + bitsandbytes on the same model, data and seed.

A Llama-architecture causal LM (random weights; size by flag) with every linear layer but lm_head in
NF4 (double-quantized), LoRA r=16 on all of them, gradient checkpointing on. Both runs start from
the same adapter weights and see the same batches; the script reports tokens/s, the largest gap
between the two loss curves, and the memory of one more training step measured exactly with
``fastpeft.memory.measure_step`` (bytes saved for backward, frozen weights and adapters excluded, and
the peak of live tensor bytes above the step's start: CUDA allocator or CPU profiler timeline), and
writes a JSON and a PNG plot.

  python benchmarks/bench_e2e_qlora.py                    # tiny model on CPU (minutes)
  python benchmarks/bench_e2e_qlora.py --size 1b-2l       # Llama-3.2-1B widths and vocab, 2 layers (CPU, ~15 min)
  python benchmarks/bench_e2e_qlora.py --size 1b          # Llama-3.2-1B shapes (GPU)
  python benchmarks/bench_e2e_qlora.py --size 8b          # Llama-3-8B shapes (GPU)
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore", message=".*kernels.*")
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    # Llama-3.2-1B's widths and 128256-token vocabulary with 2 of its 16 layers: what a 2-core CPU
    # trains in minutes; the LM head and its logits weigh as much as in the full model.
    "1b-2l": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}  # fmt: skip
PEER = "peft+bitsandbytes"


def model_label(size, batch, seq):
    """How the README names the model and step of a run."""
    c = SIZES[size]
    return (f"Llama {size}: width {c['hidden_size']}, {c['num_hidden_layers']} layers, vocab {c['vocab_size']}; "
            f"{batch} x {seq} tokens a step")  # fmt: skip


def headline(size, r, batch, seq):
    """The README row: tokens/s of fastpeft over peft + bitsandbytes, both figures, and the loss-curve gap."""
    return [{"what": f"end-to-end QLoRA training steps ({model_label(size, batch, seq)}; NF4, LoRA r={r} on all "
                     "linear layers, gradient checkpointing)", "where": {"mode": "step"},
             "cells": [{"text": f"{{}}x the tokens/s of {PEER}",
                        "values": [{"ratio": ["fastpeft", PEER], "metric": "tokens_per_s"}]},
                       {"text": "{} vs {} tokens/s",
                        "values": [{"value": "fastpeft", "metric": "tokens_per_s", "fmt": "{:.0f}"},
                                   {"value": PEER, "metric": "tokens_per_s", "fmt": "{:.0f}"}]},
                       {"text": "loss curves within {}",
                        "values": [{"value": "fastpeft", "metric": "max_loss_gap", "fmt": "{:.1e}"}]}]},
            {"what": f"end-to-end QLoRA step memory ({model_label(size, batch, seq)}; one training step, measured "
                     "exactly by fastpeft.memory)",
             "where": {"mode": "step"},
             "cells": [{"text": f"{{}}x the peak bytes of {PEER}",
                        "values": [{"ratio": ["fastpeft", PEER], "metric": "peak_bytes"}]},
                       {"text": f"{{}}x the saved-for-backward bytes of {PEER}",
                        "values": [{"ratio": ["fastpeft", PEER], "metric": "saved_bytes"}]},
                       {"text": "peak {} vs {} MiB",
                        "values": [{"value": "fastpeft", "metric": "peak_mib", "fmt": "{:.1f}"},
                                   {"value": PEER, "metric": "peak_mib", "fmt": "{:.1f}"}]}]}]  # fmt: skip


def quantize_to_nf4(model: nn.Module, device: str, compute_dtype: torch.dtype) -> nn.Module:
    """Swap every nn.Linear but lm_head for a bitsandbytes NF4 Linear4bit (what BitsAndBytesConfig
    load_in_4bit does), one layer at a time so the dense model never has to fit twice."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.endswith("lm_head"):
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)  # fmt: skip
        q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4")
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q.to(device))
    model.is_loaded_in_4bit = True  # what transformers sets; peft picks its bnb layers by it
    return model.to(device)


def build_model(size: str, device: str, dtype: torch.dtype, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(max_position_embeddings=4096, **SIZES[size])
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return quantize_to_nf4(model, device, dtype)


def make_batches(vocab: int, batch: int, seq: int, steps: int, device: str, seed: int):
    """A learnable stream: each sequence follows t[i+1] = (a * t[i] + b) mod vocab, per-sequence a, b."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        a = torch.randint(1, 8, (batch, 1), generator=g)
        b = torch.randint(0, vocab, (batch, 1), generator=g)
        t = torch.randint(0, vocab, (batch, 1), generator=g)
        seqs = [t]
        for _ in range(seq - 1):
            t = (a * t + b) % vocab
            seqs.append(t)
        ids = torch.cat(seqs, 1).to(device)
        out.append(dict(input_ids=ids, labels=ids))
    return out


def train(model, batches, device, lr, warmup):
    """Train on ``batches`` (timed after ``warmup`` steps), then measure the memory of one more step
    on the first batch (not part of the loss curve): ``saved_bytes`` (activations saved for
    backward, the model's parameters and buffers excluded) and ``peak_bytes`` (peak live tensor
    bytes above the step's start)."""
    from fastpeft.memory import measure_step

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses, tokens, step_ms = [], 0, []

    def one_step(inputs):
        loss = model(**inputs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    start = None
    for step, inputs in enumerate(batches):
        if step == warmup:
            common.synchronize(device)
            start, tokens = time.perf_counter(), 0
        t0 = time.perf_counter()
        loss = one_step(inputs)
        losses.append(loss.item())  # .item() waits for the step: its time is the step's
        if step >= warmup:
            step_ms.append((time.perf_counter() - t0) * 1e3)
        tokens += inputs["input_ids"].numel()
    common.synchronize(device)
    elapsed = time.perf_counter() - start
    result = dict(common.stats_ms(step_ms), losses=losses, tokens_per_s=tokens / elapsed, seconds=elapsed)
    del loss
    memory = measure_step(lambda: one_step(batches[0]).item(), device=device, exclude=[model])
    result.update(saved_bytes=memory.saved_bytes, saved_storages=memory.saved_storages,
                  peak_bytes=memory.peak_bytes, saved_mib=memory.saved_bytes / 2**20,
                  peak_mib=memory.peak_bytes / 2**20)  # fmt: skip
    return result


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, r in results.items():
        ax1.plot(r["losses"], label=name)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.set_title("loss (same data, seed, init)")
    names = list(results)
    ax2.bar(names, [results[n]["tokens_per_s"] for n in names], color=["tab:blue", "tab:orange"][: len(names)])
    ax2.set_ylabel("tokens / s")
    ax2.set_title("training throughput")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    """Train both models; return the rows (in the schema of benchmarks/common.py), fastpeft's first."""
    import peft

    import fastpeft

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default: 1b on GPU, tiny on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    device = args.device
    gpu = device.startswith("cuda")
    size = args.size or ("1b" if gpu else "tiny")
    dtype = torch.bfloat16 if gpu else torch.float32
    wide = size != "tiny"
    batch = args.batch or (4 if gpu else 1 if wide else 4)
    seq = args.seq or (1024 if gpu or wide else 128)
    steps = args.steps or (20 if gpu else 6 if wide else 12)
    warmup = 2

    base = build_model(size, device, dtype, seed=0)
    peft_base = copy.deepcopy(base)
    config = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", task_type="CAUSAL_LM")
    fast = fastpeft.get_peft_model(base, config)
    peft_model = peft.get_peft_model(peft_base, copy.deepcopy(config))
    with torch.no_grad():  # same nonzero start for both: B would be zero at init
        for p in fast.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    peft.set_peft_model_state_dict(peft_model, {k: v.detach() for k, v in fast.adapter_state_dict().items()})
    if not args.no_checkpointing:
        fast.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.base_model.model.enable_input_require_grads()
    fast.train()
    peft_model.train()
    batches = make_batches(SIZES[size]["vocab_size"], batch, seq, steps, device, seed=1)

    results = {}
    for name, model in (("fastpeft", fast), (PEER, peft_model)):
        torch.manual_seed(0)
        results[name] = train(model, batches, device, args.lr, warmup)
        r = results[name]
        mem = f", step: saved {r['saved_mib']:.1f} MiB, peak {r['peak_mib']:.1f} MiB"
        print(f"{name:18s} {r['tokens_per_s']:.0f} tokens/s{mem}, loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}",
              flush=True)  # fmt: skip
    gap = max(abs(a - b) for a, b in zip(results["fastpeft"]["losses"], results[PEER]["losses"]))
    speedup = results["fastpeft"]["tokens_per_s"] / results[PEER]["tokens_per_s"]
    case = f"{size} b{batch}x{seq} r{args.r}"
    rows = [common.make_row("e2e_qlora", case, "step", dtype, name, r, size=size, batch=batch, seq=seq, steps=steps,
                            r=args.r, gradient_checkpointing=not args.no_checkpointing)
            for name, r in results.items()]  # fmt: skip
    rows[0].update(max_loss_gap=gap, loss_gap_vs=PEER)
    memory = {k: results["fastpeft"][k] / results[PEER][k] for k in ("peak_bytes", "saved_bytes")}
    print(f"fastpeft: {speedup:.2f}x the tokens/s of {PEER}; largest loss gap {gap:.2e}; "
          f"{memory['peak_bytes']:.2f}x its peak bytes, {memory['saved_bytes']:.2f}x its saved bytes")
    if not args.no_write:
        path = common.write_results(f"bench_e2e_qlora_{size}", device, "e2e_qlora", rows, headline(size, args.r, batch, seq),
                                    dict(size=size, warmup_steps=warmup, lr=args.lr))  # fmt: skip
        png = path.replace(".json", ".png")
        plot(results, png, f"QLoRA {size} on {common.device_name(device)}: batch {batch} x {seq}, r={args.r}")
        print("wrote", path, "and", png)
    return rows


if __name__ == "__main__":
    main()

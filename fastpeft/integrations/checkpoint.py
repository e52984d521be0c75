"""Adapter checkpoints in HF peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Writes are atomic per file (a temporary file in the same folder, then ``os.replace``), so a crash
never leaves a half-written file under the final name. Loading parses JSON and safetensors only:
nothing is unpickled, so a checkpoint cannot run code. Every problem (missing file, truncated or
corrupted data, missing or unexpected keys, wrong shapes) is reported before any parameter changes.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class CheckpointError(ValueError):
    """An adapter checkpoint that cannot be loaded; the model was left unchanged."""


def _atomic_write(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def config_to_json(config) -> str:
    """peft's serialisation of a config: ``to_dict()``, sets as lists, sorted keys."""
    data = config.to_dict()
    for key, value in data.items():
        if isinstance(value, set):
            data[key] = sorted(value)
    return json.dumps(data, indent=2, sort_keys=True)


def save_adapter(directory: str, config, tensors: dict) -> None:
    """Write ``tensors`` (keys already in peft's naming) and ``config`` into ``directory``."""
    from safetensors.torch import save_file

    if os.path.isfile(directory):
        raise ValueError(f"save_pretrained needs a directory, but {directory} is a file")
    os.makedirs(directory, exist_ok=True)
    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    _atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda p: save_file(contiguous, p, metadata={"format": "pt"}))
    text = config_to_json(config)
    _atomic_write(os.path.join(directory, CONFIG_NAME), lambda p: open(p, "w").write(text))


def load_config(directory: str):
    """The peft config object saved in ``directory``."""
    from peft import PeftConfig

    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"no {CONFIG_NAME} in {directory}: not an adapter checkpoint")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupted?): {exc}") from exc
    if not isinstance(data, dict) or "peft_type" not in data:
        raise CheckpointError(f"{path} has no peft_type; it is not a peft adapter config")
    from fastpeft.integrations.registry import CONFIG_CLASSES

    try:
        if data["peft_type"] in CONFIG_CLASSES:  # fastpeft's own methods: constructed from the JSON fields
            return CONFIG_CLASSES[data["peft_type"]](**data)
        return PeftConfig.from_peft_type(**data)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} does not describe a valid {data.get('peft_type')} config: {exc}") from exc


def load_tensors(directory: str) -> dict:
    """The tensors of ``adapter_model.safetensors`` (read with safetensors: never unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        hint = " (adapter_model.bin is a pickle; fastpeft does not load pickles)" if os.path.isfile(
            os.path.join(directory, "adapter_model.bin")) else ""  # fmt: skip
        raise CheckpointError(f"no {WEIGHTS_NAME} in {directory}{hint}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupted?): {exc}") from exc


def check_tensors(loaded: dict, expected: dict, directory: str) -> None:
    """Every expected key present with its shape, no unexpected key, floating dtypes only."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    wrong = [
        f"{k}: saved {tuple(loaded[k].shape)}, model has {tuple(expected[k].shape)}"
        for k in sorted(set(loaded) & set(expected))
        if loaded[k].shape != expected[k].shape
    ]
    not_float = [k for k, v in loaded.items() if not torch.is_floating_point(v)]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if wrong:
        problems.append("shape mismatches " + "; ".join(wrong[:5]))
    if not_float:
        problems.append(f"non-floating tensors {not_float[:5]}")
    if problems:
        raise CheckpointError(f"the adapter in {directory} does not fit this model: " + "; ".join(problems))

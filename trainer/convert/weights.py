"""Stream an original checkpoint's shards into native safetensors shards, one shard in memory at a time.

Each source shard (``.bin`` read with ``weights_only=True``, or ``.safetensors``) becomes one output shard
``model-0000i-of-0000N.safetensors``; the index maps every native key to its file. Only the tensors of the
shard being converted (and their converted copies) are alive at once, so a 16B model converts in the memory
of about one shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.convert import ConvertError, RawConfig, SourceFamily

INDEX_NAMES = ("pytorch_model.bin.index.json", "model.safetensors.index.json")
SINGLE_NAMES = ("pytorch_model.bin", "model.safetensors")
OUTPUT_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class WeightsReport:
    source_tensors: int
    native_tensors: int
    shards: int
    total_bytes: int


def source_shards(src: Path) -> list[Path]:
    """The checkpoint files of ``src`` in order; ConvertError when none is found or the index names a missing one."""
    for name in INDEX_NAMES:
        index = src / name
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ConvertError(f"{index}: not a checkpoint index (no weight_map): {exc}") from None
            files = list(dict.fromkeys(weight_map.values()))
            for file in files:
                if not (src / file).is_file():
                    raise ConvertError(f"{index}: shard {file} is missing from {src}; download every shard")
            return [src / file for file in files]
    for name in SINGLE_NAMES:
        if (src / name).is_file():
            return [src / name]
    raise ConvertError(f"{src}: no {' / '.join(SINGLE_NAMES + INDEX_NAMES)}; point SRC at the original checkpoint")


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one checkpoint file; ConvertError (one line) for a truncated or foreign file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise several types for a damaged file; the user needs one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConvertError(
            f"{path}: cannot be read ({first}); the file is truncated or damaged, download it again"
        ) from None
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConvertError(f"{path}: not a plain dict of tensors (a state dict); cannot convert it")
    return loaded


def convert_weights(src: Path, dst: Path, family: SourceFamily, raw: RawConfig) -> WeightsReport:
    """Convert every shard of ``src`` into ``dst`` (which must exist); checks keys and shapes against the family."""
    from safetensors.torch import save_file

    expected = family.source_shapes(raw)
    shards = source_shards(src)
    seen: set[str] = set()
    weight_map: dict[str, str] = {}
    native_count = total_bytes = 0
    for number, shard in enumerate(shards, start=1):
        tensors = read_shard(shard)
        converted: dict[str, torch.Tensor] = {}
        for key in list(tensors):
            tensor = tensors.pop(key)  # drop our reference as we go: the shard shrinks while its output grows
            if key not in expected:
                raise ConvertError(
                    f"{shard.name}: unexpected tensor {key!r} for a {family.name} checkpoint; "
                    "the layout differs from the one this converter knows"
                )
            if tuple(tensor.shape) != expected[key]:
                raise ConvertError(
                    f"{shard.name}: {key} has shape {list(tensor.shape)}, config.json implies {list(expected[key])}; "
                    "config.json and the weights disagree"
                )
            seen.add(key)
            for native_key, native in family.convert_tensor(key, tensor, raw):
                if native.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
                    # A view of the source (a split of a fused QKV): safetensors refuses shared storage.
                    native = native.clone(memory_format=torch.contiguous_format)
                converted[native_key] = native.contiguous()
            del tensor
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        if converted:
            save_file(converted, str(dst / name), metadata={"format": "pt"})
            for native_key, native in converted.items():
                weight_map[native_key] = name
                total_bytes += native.numel() * native.element_size()
            native_count += len(converted)
        del converted, tensors
    missing = sorted(set(expected) - seen)
    if missing:
        raise ConvertError(
            f"{src}: tensor {missing[0]} (and {len(missing) - 1} more) is in no shard; the checkpoint is incomplete"
        )
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / OUTPUT_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return WeightsReport(
        source_tensors=len(seen), native_tensors=native_count, shards=len(shards), total_bytes=total_bytes
    )

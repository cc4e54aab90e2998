"""Training data from prepared shards: checks, a resumable deterministic order, and collation.

Order: each epoch is a permutation of all train rows seeded by (train.seed, epoch). An optimizer step takes
the next ``rows_per_step`` = micro_batch_size x grad_accum_steps x world_size rows of that order, sorts them
by length (so micro-batches pad little) and deals micro-batch j to rank j % world_size. The position in the
order is the whole data state (``DataCursor``): resuming recomputes the permutation and slices from the
cursor, O(1), and never replays or skips a row. A tail shorter than a step is dropped each epoch (it is
different rows each epoch, since the order is reshuffled).

Collation: rows are right-padded to the longest row of the micro-batch (labels with IGNORE_INDEX). Packed
rows carry several samples whose position_ids restart at 0; they are passed with position_ids and no
attention mask, which makes transformers build a block-diagonal causal mask (masking_utils'
find_packed_sequence_indices), so samples never attend to each other. The label at each sample start is
set to IGNORE_INDEX so the last token of one sample is never trained to predict the first of the next.
For model families whose attention cannot isolate packed samples, packed rows are split back into their
samples and batched unpacked.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from data_pipeline.schema import (
    IGNORE_INDEX,
    MANIFEST_FILE,
    DataError,
    Manifest,
    load_manifest,
    load_split,
    tokenizer_fingerprint,
    verify_split,
)

if TYPE_CHECKING:
    import datasets


@dataclass(frozen=True)
class DataCursor:
    """Where the data order stands: ``position`` rows of epoch ``epoch``'s permutation are consumed."""

    epoch: int = 0
    position: int = 0


@dataclass(frozen=True)
class Batch:
    """One micro-batch on one rank, ready for the model."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    """None for packed rows: transformers derives the block-diagonal mask from position_ids."""
    tokens: int
    """Real (non-padding) tokens."""
    loss_tokens: int
    """Tokens that are the target of a prediction: labels[:, 1:] != IGNORE_INDEX."""
    sum_seq_sq: int
    """Sum over rows of the padded row length squared (attention FLOPs)."""
    labels_shifted: bool = False
    """True for a sequence-parallel shard (trainer/sequence_parallel.py): labels[:, t] is already the target of
    position t, shifted on the whole row before it was split, so the loss must not shift again."""

    def model_inputs(self, device: torch.device | str) -> dict[str, Any]:
        inputs = {"input_ids": self.input_ids.to(device), "position_ids": self.position_ids.to(device)}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask.to(device)
        return inputs


def check_data(data_dir: str | Path, tokenizer: Any, model_path: str, *, verify_shards: bool) -> Manifest:
    """Refuse a data directory whose manifest, shards or tokenizer do not match (one line naming the file).

    Hashing shards is I/O: call it on one rank and share the outcome (see ``check_data_on_rank0``).
    """
    manifest = load_manifest(data_dir)
    manifest_path = Path(data_dir) / MANIFEST_FILE
    check_tokenizer(manifest, manifest_path, tokenizer, model_path)
    if "train" not in manifest.splits or not manifest.splits["train"].shards:
        raise DataError(f"{manifest_path}: no train shards; re-run prepare")
    if verify_shards:
        problems = [p for split in manifest.splits for p in verify_split(data_dir, split, manifest)]
        if problems:
            raise DataError("; ".join(problems))
    return manifest


def check_tokenizer(manifest: Manifest, manifest_path: Path, tokenizer: Any, model_path: str | Path) -> None:
    """Refuse data tokenized by another tokenizer than the model's: its token ids would mean other text."""
    ours = tokenizer_fingerprint(tokenizer)
    if manifest.tokenizer_fingerprint != ours:
        raise DataError(
            f"{manifest_path}: tokenizer fingerprint {manifest.tokenizer_fingerprint[:12]}… (prepared with another "
            f"tokenizer, {manifest.tokenizer_path}) != {ours[:12]}… of the model's tokenizer in {model_path}; "
            "re-run prepare with the model's tokenizer"
        )


def open_checked_split(
    data_dir: str | Path, split: str, tokenizer: Any, model_path: str | Path, *, verify: bool = True
) -> tuple[datasets.Dataset, bool]:
    """(rows, packed) of one prepared split for a single-process evaluation, refusing a tokenizer mismatch,
    a missing split or a damaged shard in one line."""
    manifest = load_manifest(data_dir)
    where = Path(data_dir) / MANIFEST_FILE
    check_tokenizer(manifest, where, tokenizer, model_path)
    if split not in manifest.splits or not manifest.splits[split].shards:
        raise DataError(f"{where}: no {split!r} split (has {', '.join(manifest.splits)}); prepare with --val-fraction")
    if verify:
        problems = verify_split(data_dir, split, manifest)
        if problems:
            raise DataError("; ".join(problems))
    return load_split(data_dir, split, manifest), manifest.packed


def pad_id_for(tokenizer: Any) -> int:
    """The id that pads training and validation batches: the tokenizer's pad token, else its eos.

    Padding is masked out of attention and labels, so any id gives the same loss; this one fallback is
    shared by the loop and evaluate so their batches are identical.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token; set one")
    return int(pad_id)


def check_data_on_rank0(data_dir: str | Path, tokenizer: Any, model_path: str, *, verify_shards: bool) -> Manifest:
    """``check_data`` on rank 0; every rank raises the same DataError if it failed."""
    import torch.distributed as dist

    error: list[str | None] = [None]
    if dist.get_rank() == 0:
        try:
            check_data(data_dir, tokenizer, model_path, verify_shards=verify_shards)
        except DataError as exc:
            error[0] = str(exc)
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise DataError(error[0])
    return load_manifest(data_dir)


def row_lengths(rows: datasets.Dataset) -> np.ndarray:
    """Length of every row's input_ids, read from the Arrow list offsets (no row is decoded)."""
    import pyarrow.compute as pc

    column = rows.data.column("input_ids")
    return np.asarray(pc.list_value_length(column).to_numpy(zero_copy_only=False), dtype=np.int64)


def epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of row indices for ``epoch``; a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def step_rows(order: np.ndarray, lengths: np.ndarray, position: int, rows_per_step: int) -> np.ndarray:
    """The rows of one optimizer step, longest first (stable), so consecutive micro-batches pad little."""
    chosen = order[position : position + rows_per_step]
    return chosen[np.argsort(-lengths[chosen], kind="stable")]


def rank_micro_batches(rows: np.ndarray, micro_batch_size: int, rank: int, world_size: int) -> list[np.ndarray]:
    """Micro-batch j of the step (j = 0..accum*world-1) goes to rank j % world_size."""
    chunks = [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    return chunks[rank::world_size]


Row = tuple[list[int], list[int], list[int]]
"""(input_ids, labels, position_ids) of one row."""


def split_packed_row(input_ids: list[int], labels: list[int], position_ids: list[int]) -> list[Row]:
    """The samples of a packed row, cut where position_ids restart at 0."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return [(input_ids[a:b], labels[a:b], position_ids[a:b]) for a, b in itertools.pairwise(starts) if b > a]


def collate(rows: list[Row], *, pad_id: int, packed: bool, isolate: bool) -> Batch:
    """Right-pad (input_ids, labels, position_ids) rows into a Batch (see the module docstring)."""
    if packed and not isolate:
        rows = [sample for row in rows for sample in split_packed_row(*row)]
        packed = False
    width = max(len(ids) for ids, _, _ in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (ids, labs, pos) in enumerate(rows):
        length = len(ids)
        input_ids[i, :length] = torch.tensor(ids, dtype=torch.long)
        labels[i, :length] = torch.tensor(labs, dtype=torch.long)
        position_ids[i, :length] = torch.tensor(pos, dtype=torch.long)
        attention_mask[i, :length] = 1
    labels[position_ids == 0] = IGNORE_INDEX
    return Batch(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        attention_mask=None if packed else attention_mask,
        tokens=int(attention_mask.sum()),
        loss_tokens=int((labels[:, 1:] != IGNORE_INDEX).sum()),
        sum_seq_sq=n * width * width,
    )


def empty_batch(pad_id: int) -> Batch:
    """A one-token row with no loss: keeps ranks in lock-step (ZeRO-3 forwards are collective)."""
    return collate([([pad_id], [IGNORE_INDEX], [0])], pad_id=pad_id, packed=False, isolate=True)


class TrainData:
    """The train split of a prepared directory as a resumable sequence of per-rank step batches."""

    def __init__(
        self,
        rows: datasets.Dataset,
        *,
        packed: bool,
        isolate: bool,
        pad_id: int,
        seed: int,
        micro_batch_size: int,
        grad_accum_steps: int,
        rank: int,
        world_size: int,
        source: str,
    ) -> None:
        self.rows = rows
        self.lengths = row_lengths(rows)
        self.packed = packed
        self.isolate = isolate
        self.pad_id = pad_id
        self.seed = seed
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        # e.g. 4 micro x 16 accum x 8 ranks = 512 rows per optimizer step
        self.rows_per_step = micro_batch_size * grad_accum_steps * world_size
        if len(rows) < self.rows_per_step:
            raise DataError(
                f"{source}: {len(rows)} train rows < {self.rows_per_step} rows per optimizer step "
                "(micro_batch_size x grad_accum_steps x world size); prepare more data or lower them"
            )
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.rows) // self.rows_per_step

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order, self._order_epoch = epoch_order(len(self.rows), self.seed, epoch), epoch
        return self._order

    def next_step(self, cursor: DataCursor) -> tuple[list[Batch], DataCursor]:
        """This rank's grad_accum_steps micro-batches of the step at ``cursor``, and the cursor after it."""
        if cursor.position + self.rows_per_step > len(self.rows):
            cursor = DataCursor(epoch=cursor.epoch + 1, position=0)
        rows = step_rows(self._order_for(cursor.epoch), self.lengths, cursor.position, self.rows_per_step)
        batches = []
        for indices in rank_micro_batches(rows, self.micro_batch_size, self.rank, self.world_size):
            picked = self.rows[[int(i) for i in indices]]
            triples = list(zip(picked["input_ids"], picked["labels"], picked["position_ids"], strict=True))
            batches.append(collate(triples, pad_id=self.pad_id, packed=self.packed, isolate=self.isolate))
        return batches, DataCursor(epoch=cursor.epoch, position=cursor.position + self.rows_per_step)


def val_batches(
    rows: datasets.Dataset,
    *,
    packed: bool,
    isolate: bool,
    pad_id: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    max_batches: int,
) -> list[Batch]:
    """This rank's validation micro-batches, in file order; every rank gets the same count (padded with
    empty batches) because ZeRO-3 forwards are collective."""
    per_round = micro_batch_size * world_size
    rounds = -(-len(rows) // per_round)
    if max_batches > 0:
        rounds = min(rounds, max_batches)
    batches = []
    for b in range(rounds):
        start = (b * world_size + rank) * micro_batch_size
        indices = list(range(start, min(start + micro_batch_size, len(rows))))
        if not indices:
            batches.append(empty_batch(pad_id))
            continue
        picked = rows[indices]
        triples = list(zip(picked["input_ids"], picked["labels"], picked["position_ids"], strict=True))
        batches.append(collate(triples, pad_id=pad_id, packed=packed, isolate=isolate))
    return batches


def open_split(data_dir: str | Path, split: str, manifest: Manifest) -> datasets.Dataset | None:
    """The split as a memory-mapped Dataset with torch-free python lists, or None if the manifest has none."""
    if split not in manifest.splits or not manifest.splits[split].shards:
        return None
    return load_split(data_dir, split, manifest)

"""Deterministic train/eval splits and seeded, resumable batch order (`iterate_batches`, `batch_at`)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from flglm.data.files import Example

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Indexable(Protocol[T_co]):
    """Anything with a length and integer indexing: a list, a TokenizedDataset."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> T_co: ...


def _default_stratum(item: object) -> Hashable:
    return item.label if isinstance(item, Example) else None


def train_eval_split(
    items: Sequence[T],
    eval_fraction: float,
    seed: int,
    stratify_by: Callable[[T], Hashable] | None = _default_stratum,
) -> tuple[list[T], list[T]]:
    """Deterministic local train/eval split, stratified by label for classification examples.

    Each stratum gives `round(n * eval_fraction)` items to eval (at least one item overall when
    `eval_fraction > 0` and there are two or more items). Both parts keep the input order.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    rng = random.Random(seed)
    strata: dict[Hashable, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        strata[stratify_by(item) if stratify_by is not None else None].append(index)
    eval_indices: set[int] = set()
    for key in sorted(strata, key=repr):  # a fixed order, so the rng draws are the same every run
        indices = strata[key]
        rng.shuffle(indices)
        eval_indices.update(indices[: round(len(indices) * eval_fraction)])
    if eval_fraction > 0 and not eval_indices and len(items) >= 2:
        eval_indices.add(rng.randrange(len(items)))
    train = [item for i, item in enumerate(items) if i not in eval_indices]
    held_out = [item for i, item in enumerate(items) if i in eval_indices]
    return train, held_out


def _check_batching(dataset: Indexable[Any], batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError("cannot batch an empty dataset")


def _epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    """The permutation of epoch `epoch`: fixed by the seed and the epoch alone."""
    order = list(range(size))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def iterate_batches(
    dataset: Indexable[T], batch_size: int, seed: int, epoch: int = 0, drop_last: bool = False
) -> Iterator[list[T]]:
    """Endless seeded batches: each epoch is a fresh permutation (fixed by seed and epoch), then the next.

    Starting at `epoch` lets a resumed agent continue the same sequence. With `drop_last` a short final batch
    of an epoch is skipped (unless the whole dataset is smaller than one batch, then it is the batch).
    """
    _check_batching(dataset, batch_size)
    while True:
        order = _epoch_order(len(dataset), seed, epoch)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            if drop_last and len(chunk) < batch_size and len(order) >= batch_size:
                break
            yield [dataset[i] for i in chunk]
        epoch += 1


def batch_at(dataset: Indexable[T], batch_size: int, seed: int, index: int) -> list[T]:
    """Batch number `index` of `iterate_batches(dataset, batch_size, seed)`, found without producing the ones
    before it (a resumed agent at step 10,000 shuffles one epoch, not 10,000 batches)."""
    _check_batching(dataset, batch_size)
    if index < 0:
        raise ValueError(f"batch index must be >= 0, got {index}")
    epoch, position = divmod(index, -(-len(dataset) // batch_size))  # ceil: the short last batch counts
    order = _epoch_order(len(dataset), seed, epoch)
    return [dataset[i] for i in order[position * batch_size : (position + 1) * batch_size]]

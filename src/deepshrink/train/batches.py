"""Global batches, split across data-parallel processes.

The training loop thinks in *global* batches: ``TrainConfig.batch_size`` samples per optimizer
step however many processes share the work. Every process draws the same global batch (the same
seeded order) and keeps its contiguous share of it (:func:`deepshrink.distributed.shard_range`),
so N processes step through exactly the batches one process would, and DistributedDataParallel's
gradient average, with each share's loss weighted by its size, is the gradient one process
computes. That is the sharding DistributedSampler does, without its padding (which repeats
samples to even out the last batch and so changes the data one process would see).

The order is re-seeded every epoch (``seed + epoch``), so a run resumed from a checkpoint at
epoch k sees the same batches as one that never stopped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from deepshrink import distributed

LocalBatch = tuple[Sequence[Any], int]  # (this process's share of the batch, global batch size)


class TensorBatches:
    """Shuffled global batches of a TensorDataset (a DataBundle's train split): only this
    process's share of each batch is indexed, so no process loads the others' samples."""

    def __init__(self, dataset: TensorDataset, batch_size: int, seed: int = 0,
                 shuffle: bool = True) -> None:
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle

    def _sizes(self) -> list[int]:
        n, b = len(self.dataset), self.batch_size
        return [min(b, n - i) for i in range(0, n, b)]

    def __len__(self) -> int:
        return sum(1 for s in self._sizes() if s >= distributed.world_size())

    def epoch(self, epoch: int) -> Iterator[LocalBatch]:
        n = len(self.dataset)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            # The draw a DataLoader makes for its worker seed before shuffling: with it, epoch 0
            # is exactly DataBundle.loader("train", seed=seed)'s first order (the loop's order
            # before data-parallel training, which results elsewhere were tuned on).
            torch.empty((), dtype=torch.int64).random_(generator=gen)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i:i + self.batch_size]
            if len(idx) < distributed.world_size():
                continue  # too small to give every process a sample; the same skip everywhere
            a, b = distributed.shard_range(len(idx))
            yield self.dataset[idx[a:b]], len(idx)


class LoaderBatches:
    """A caller's DataLoader (or any re-iterable of batches, e.g. a list): every process
    iterates it in the same order and keeps its share of each batch (tensors nested in dicts,
    e.g. tokenizer outputs, are split too). Random samplers are re-seeded each epoch (their
    first seed + epoch); one without a generator gets one seeded with ``seed``, because drawing
    the order from the global RNG would let processes disagree once their RNG use differs."""

    def __init__(self, loader: DataLoader | Iterable[Sequence[Any]], seed: int = 0) -> None:
        self.loader = loader
        self._gens: list[tuple[torch.Generator, int]] = []
        for sampler in _samplers(loader):
            if hasattr(sampler, "generator") and sampler.generator is None and _is_random(sampler):
                sampler.generator = torch.Generator().manual_seed(seed)
            gen = getattr(sampler, "generator", None)
            if isinstance(gen, torch.Generator) and all(g is not gen for g, _ in self._gens):
                self._gens.append((gen, gen.initial_seed()))

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def epoch(self, epoch: int) -> Iterator[LocalBatch]:
        for gen, first in self._gens:
            gen.manual_seed(first + epoch)
        world = distributed.world_size()
        for batch in self.loader:
            n = len(batch[1])
            if world == 1:
                yield batch, n
                continue
            if n < world:
                continue
            a, b = distributed.shard_range(n)
            yield tuple(_share(t, a, b, n) for t in batch), n


def _samplers(loader: Any) -> list[Any]:
    """The loader's sampler, batch sampler and what they wrap (e.g. the RandomSampler inside a
    BatchSampler passed as ``sampler`` with ``batch_size=None``, as transfer_loader builds)."""
    out: list[Any] = []
    if not isinstance(loader, DataLoader):
        return out
    todo = [loader.sampler, getattr(loader, "batch_sampler", None)]
    while todo:
        s = todo.pop()
        if s is not None and all(s is not o for o in out):
            out.append(s)
            todo.append(getattr(s, "sampler", None))
    return out


def _is_random(sampler: Any) -> bool:
    from torch.utils.data import RandomSampler, SubsetRandomSampler, WeightedRandomSampler

    return isinstance(sampler, (RandomSampler, SubsetRandomSampler, WeightedRandomSampler))


def _share(t: Any, a: int, b: int, n: int) -> Any:
    """Rows ``a:b`` of every per-sample tensor in ``t`` (nested in dicts, tuples, lists)."""
    if isinstance(t, torch.Tensor):
        return t[a:b] if t.dim() > 0 and t.shape[0] == n else t
    if isinstance(t, Mapping):
        return {k: _share(v, a, b, n) for k, v in t.items()}
    if isinstance(t, (tuple, list)):
        return type(t)(_share(v, a, b, n) for v in t)
    return t

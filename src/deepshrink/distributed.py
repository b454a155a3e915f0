"""Data-parallel plumbing over ``torch.distributed``: who am I (rank, world size, main process),
collectives that are no-ops in a single process, and device / backend selection.

deepshrink never invents its own launcher: scripts and the CLI are started by PyTorch's
``torchrun`` (single- or multi-node), which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. :func:`setup` turns that environment into a process group
(``nccl`` on GPUs, ``gloo`` on CPUs) the first time training needs one. Everything else here
works the same whether or not a group exists, so library code can call :func:`is_main`,
:func:`all_reduce` or :func:`broadcast` unconditionally: in a plain ``python`` run they cost
nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from deepshrink.errors import ConfigError

T = TypeVar("T")
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    """True when this process was started by ``torchrun`` (its environment names a rank)."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """This process's index on its node (picks its GPU)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if launched_by_torchrun() else 0


def is_main() -> bool:
    """The process that writes files, prints tables and shows progress (global rank 0).
    Before a process group exists, torchrun's ``RANK`` decides, so output can be gated early."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return not launched_by_torchrun() or os.environ.get("RANK") == "0"


def select_device(requested: str = "cpu", *, cuda_available: bool | None = None,
                  cuda_count: int | None = None, local: int | None = None) -> torch.device:
    """The device for this process: ``cpu``, ``cuda`` (the GPU of this process's local rank),
    ``cuda:N`` (that GPU) or ``auto`` (a GPU when there is one). ``cuda_available`` /
    ``cuda_count`` / ``local`` default to the real machine and torchrun's environment (tests
    pass them to check the logic on a machine without GPUs)."""
    avail = torch.cuda.is_available() if cuda_available is None else cuda_available
    count = (torch.cuda.device_count() if avail else 0) if cuda_count is None else cuda_count
    local = local_rank() if local is None else local
    req = requested.strip().lower()
    if req == "auto":
        req = "cuda" if avail and count > 0 else "cpu"
    if req == "cpu":
        return torch.device("cpu")
    if req == "cuda" or req.startswith("cuda:"):
        if not avail or count == 0:
            raise ConfigError(f"device {requested!r}: no CUDA GPU is available in this process",
                              hint="use --device cpu (or auto), or run on a machine with a GPU")
        index = local if req == "cuda" else _cuda_index(requested, req)
        if index >= count:
            raise ConfigError(f"device {requested!r}: GPU {index} requested but only {count} visible",
                              hint="one process per GPU: torchrun --nproc_per_node=<number of GPUs>")
        return torch.device("cuda", index)
    raise ConfigError(f"device {requested!r}: must be cpu, cuda, cuda:N or auto")


def _cuda_index(requested: str, req: str) -> int:
    try:
        return int(req.split(":", 1)[1])
    except ValueError:
        raise ConfigError(f"device {requested!r}: the GPU index must be an integer") from None


def backend_for(device: torch.device) -> str:
    """``nccl`` for GPUs (the fast GPU collectives), ``gloo`` for CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


def setup(device: str = "cpu") -> torch.device:
    """Pick this process's device and, under torchrun, join the process group (once).

    Called by :func:`deepshrink.train.train`; scripts may call it earlier (e.g. to gate
    output with :func:`is_main` before training). Returns the device to train on."""
    dev = select_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        # device_id binds NCCL to this GPU up front; gloo ignores it.
        dist.init_process_group(backend_for(dev), device_id=dev if dev.type == "cuda" else None)
    elif is_distributed() and backend_for(dev) not in str(dist.get_backend()):
        # A group the caller made: DDP needs nccl for GPU models and gloo for CPU ones.
        raise ConfigError(f"device {device!r} does not fit the process group's backend "
                          f"{dist.get_backend()!r}", hint="nccl with --device cuda, gloo with cpu")
    return dev


def shutdown() -> None:
    """Leave the process group (end of a torchrun script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Run ``fn`` (e.g. a save) on the main process only, then wait for it everywhere, so a
    file the main process writes exists for all of them afterwards. Returns ``fn``'s result
    on the main process, None elsewhere."""
    result = fn(*args, **kwargs) if is_main() else None
    barrier()
    return result


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``t`` over all processes in place (``sum``, ``mean``, ``min`` or ``max``) and
    return it; unchanged in a single process."""
    if not is_distributed():
        return t
    ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
           "max": dist.ReduceOp.MAX}
    dist.all_reduce(t, ops[op])
    if op == "mean":
        t /= world_size()
    return t


def all_reduce_floats(values: Iterable[float], op: str = "sum") -> list[float]:
    """Reduce a few Python numbers (metrics, counts) over all processes, in float64."""
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    return all_reduce(t, op).tolist()


def broadcast(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` on every process with the values of process ``src`` (in place)."""
    if not is_distributed():
        return
    dev = _comm_device()
    for t in tensors:
        # Not every backend sends bool, and NCCL only GPU tensors: go through a copy if needed.
        wire = t.to(dev, torch.uint8 if t.dtype == torch.bool else t.dtype)
        dist.broadcast(wire, src)
        if wire is not t:
            t.copy_(wire)


def broadcast_json(obj: Any, src: int = 0) -> Any:
    """``obj`` (anything JSON can hold) as process ``src`` has it, on every process: for small
    decisions and records one process makes for all (e.g. a search's state and trial results).
    Sent as JSON text, never pickled; returned as parsed back from that text everywhere (so the
    processes hold equal values). In a single process, ``obj`` itself."""
    if not is_distributed():
        return obj
    dev = _comm_device()
    payload = json.dumps(obj, default=str).encode() if rank() == src else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=dev)
    dist.broadcast(size, src)
    if rank() == src:
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(dev)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
    dist.broadcast(buf, src)
    return json.loads(buf.cpu().numpy().tobytes().decode())


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the ``.grad`` of parameters that live outside a DistributedDataParallel model
    (e.g. a technique's own small optimiser), so every process takes the same step."""
    if not is_distributed():
        return
    for p in params:
        if p.grad is not None:
            all_reduce(p.grad, "mean")


def global_extremes(x: torch.Tensor) -> torch.Tensor:
    """``tensor([min, max])`` of ``x`` over the whole global batch (every process's share)."""
    x = x.detach()
    if not is_distributed():
        return torch.stack([x.min(), x.max()]).float()
    lo = x.min().float().reshape(1).to(_comm_device())
    hi = x.max().float().reshape(1).to(_comm_device())
    all_reduce(lo, "min")
    all_reduce(hi, "max")
    return torch.cat([lo, hi]).to(x.device)


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors every process holds (their first dimensions may
    differ), in rank order; the same result on every process."""
    if not is_distributed():
        return t
    dev = _comm_device()
    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.int64, device=dev))
    counts = [int(s) for s in sizes]
    pad = torch.zeros((max(counts), *t.shape[1:]), dtype=t.dtype, device=dev)
    pad[: t.shape[0]] = t
    parts = [torch.empty_like(pad) for _ in counts]
    dist.all_gather(parts, pad)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).to(t.device)


def shard_range(n: int, index: int | None = None, parts: int | None = None) -> tuple[int, int]:
    """``[start, stop)`` of this process's contiguous share of ``n`` items (sizes differ by at
    most one; the first ``n % parts`` shares are one larger, as ``torch.tensor_split``)."""
    index = rank() if index is None else index
    parts = world_size() if parts is None else parts
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def _comm_device() -> torch.device:
    # NCCL only moves GPU tensors; gloo only CPU ones.
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

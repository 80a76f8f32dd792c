"""Training on several processes and machines: join, wrap, gather, leave.

Parallelism is applied to the model from outside (the model never mentions ranks), the way
torchtitan does it: `parallelize(model, world) -> model`, and the optimizer is built after it.

    world = setup()                       # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    wrap = partial(parallelize, world=world, strategy="ddp")    # or "fsdp"
    core = TruthGPTOptimizationCore(config, parallelize=wrap)   # or load_core(run, parallelize=…)
    train(core, data, run_dir, world=world)
    teardown(world)

`ddp` keeps a whole replica of the model in every process and averages gradients once per
optimiser step. `fsdp` (FSDP2's `fully_shard`, one unit per block plus the root) keeps 1/N of
the parameters, gradients and AdamW moments in each process and gathers a block's parameters
only while it runs. Either way an update equals the one a single process would compute from
the global batch (batch_size × gradient_accumulation_steps × world size).

Checkpoints stay the single-folder, unsharded format, written by rank 0 (`gather_full_state`
collects a sharded model first), so a run resumes with any number of processes and either
strategy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn

from truthgpt.training.errors import DistributedSetupError, exit_code, one_line


@dataclass
class World:
    """Where this process stands in a (possibly distributed) run."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


STRATEGIES = ("ddp", "fsdp")
DEFAULT_TIMEOUT_S = 600.0

# The unsharded (model state dict, optimizer state dict) a checkpoint stores.
FullState = tuple[dict[str, Tensor], dict[str, Any] | None]


# ---------------------------------------------------------------------------------- joining


def requested(environ: Mapping[str, str] | None = None) -> bool:
    """True when this process was started as one rank of a distributed job (torchrun sets
    RANK and WORLD_SIZE)."""
    environ = os.environ if environ is None else environ
    return "RANK" in environ and "WORLD_SIZE" in environ


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is not None:
            return default
        raise ValueError(
            f"{name}: not set; start distributed runs with torchrun (or `truthgpt train "
            "--nproc N`), which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"
        )
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {raw!r}") from None


def _barrier() -> None:
    if torch.cuda.is_available():
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def setup(timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """Join the process group the environment describes and return this process's place.

    The backend follows the tensors: gloo for CPU ones and NCCL for CUDA ones (one group
    "cpu:gloo,cuda:nccl" when CUDA is present, so a CPU run on a GPU machine works too). With
    CUDA each process uses the GPU numbered LOCAL_RANK. `timeout_s` bounds the rendezvous and
    every later collective; when the processes cannot meet in time, `DistributedSetupError`
    says what to check.
    """
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(
            f"RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={world_size}: need "
            "0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0"
        )
    if not timeout_s > 0:
        raise ValueError(f"timeout_s: must be positive, got {timeout_s!r}")
    addr = os.environ.get("MASTER_ADDR")
    port = _env_int("MASTER_PORT")
    if not addr:
        raise ValueError("MASTER_ADDR: not set; it names the machine of rank 0")
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise RuntimeError("a different process group is already running in this process")
        return World(rank, world_size)

    backend = "gloo"
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(
                f"LOCAL_RANK={local_rank}: this machine has {count} GPU(s); start at most "
                f"{count} processes per machine (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        _barrier()  # every rank has arrived: nothing below races with a slower one
    except (RuntimeError, OSError) as err:  # DistNetworkError, DistStoreError, TimeoutError
        if dist.is_initialized():
            dist.destroy_process_group()
        raise DistributedSetupError(
            f"rank {rank} of {world_size} could not join the process group at "
            f"{addr}:{port} (backend {backend}, timeout {timeout_s:g} s): {err}\n"
            f"Check that all {world_size} processes were started, that MASTER_ADDR={addr} is "
            f"an address of rank 0's machine that every machine can reach, that "
            f"MASTER_PORT={port} is free there and not blocked by a firewall, and that every "
            "process starts within the timeout."
        ) from err
    return World(rank, world_size)


def teardown(world: World) -> None:
    """Wait for every rank, then leave the process group."""
    if world.world_size > 1 and dist.is_initialized():
        _barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_worker(code: int) -> NoReturn:
    """End a worker process now, with `code`, after flushing stdout and stderr.

    A normal interpreter exit after `destroy_process_group` sometimes aborts in gloo's
    teardown (about one run in four with torch 2.13); `os._exit` skips that teardown. Every
    file must be closed before: training closes its checkpoints, metrics and TensorBoard files.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream
            stream.flush()
    os._exit(code)


def run_worker(main: Callable[[World], int], *, timeout_s: float = DEFAULT_TIMEOUT_S) -> NoReturn:
    """Run `main(world)` as one rank of a distributed job: join, run, leave, exit.

    An error is printed and ends this process at once, without waiting for the other ranks;
    torchrun then stops them.
    """
    die_with_parent()  # torchrun's agent killed: this rank goes too
    try:
        world = setup(timeout_s)
    except (ValueError, DistributedSetupError) as err:
        print(f"truthgpt: error: {err}", file=sys.stderr)
        exit_worker(2 if isinstance(err, ValueError) else 1)
    try:
        code = int(main(world) or 0)
    except BaseException as err:
        code = exit_code(err)
        if code is None:
            traceback.print_exc()
            exit_worker(1)
        print(f"truthgpt: rank {world.rank}: error: {one_line(err)}", file=sys.stderr)
        exit_worker(code)
    teardown(world)
    exit_worker(code)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux), so a kill -9
    of `truthgpt train --nproc N` leaves no torchrun or worker behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run `python -m truthgpt *argv` as `nproc` processes on this machine under torchrun.

    Returns torchrun's exit status. Each process gets an equal share of the CPU threads
    unless OMP_NUM_THREADS is set.
    """
    if nproc < 1:
        raise ValueError(f"--nproc: must be at least 1, got {nproc}")
    if requested():
        raise ValueError("--nproc: this process is already one rank of a distributed run")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(nproc), "-m", "truthgpt", *argv,
    ]  # fmt: skip
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # SIGTERM, not SIGKILL: torchrun then stops its workers before it exits.
    process = subprocess.Popen(command, env=env, preexec_fn=lambda: die_with_parent(signal.SIGTERM))
    try:
        return process.wait()
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reaches torchrun too, which stops its workers: give it time.
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait()
        raise


# ---------------------------------------------------------------------------------- wrapping


def is_sharded(model: nn.Module) -> bool:
    """True for a model wrapped with FSDP2's `fully_shard`."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # never imported: nothing is sharded
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def parallelize(model: nn.Module, world: World, strategy: str = "ddp") -> nn.Module:
    """`model` wrapped for data-parallel training over `world`; build the optimizer after.

    `ddp`: DistributedDataParallel (rank 0's weights are broadcast to the others).
    `fsdp`: `fully_shard` on every block, then on the whole model (which holds the embeddings,
    the final norm and the tied head); rank 0's weights are broadcast before sharding. With
    one process the model comes back as it is. Pass it to the trainer, which applies it
    after loading a checkpoint and before building its optimizer:
    `TruthGPTOptimizationCore(config, parallelize=partial(parallelize, world=world))`.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if world.world_size == 1:
        return model
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("parallelize: no process group is running; call setup() first")
    if hasattr(model, "module") or is_sharded(model):
        raise ValueError("model: already wrapped for distributed training")
    device = next(model.parameters()).device
    if device.type == "cuda" and device.index not in (None, torch.cuda.current_device()):
        raise ValueError(
            f"device: {device} is fixed in the config, but each process needs its own GPU; use "
            "device=auto or cuda (rank r then uses cuda:LOCAL_RANK)"
        )
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [torch.cuda.current_device()] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    mesh = init_device_mesh(device.type, (world.world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def replicas(model: nn.Module) -> int:
    """How many processes train `model` together: the world size once it is wrapped."""
    wrapped = hasattr(model, "module") or is_sharded(model)
    return dist.get_world_size() if wrapped and dist.is_initialized() else 1


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """The optimizer's state keyed by parameter name, to load again once the model is
    sharded (`load_full_optimizer_state`); None when there is nothing to carry over."""
    if not optimizer.state or not (dist.is_available() and dist.is_initialized()):
        return None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    saved = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True)
    )
    # Loading shards each tensor by a scatter from rank 0, in the order the state is walked,
    # so that order must be the same on every rank; a loaded one is arbitrary.
    saved["state"] = {
        name: dict(sorted(values.items())) for name, values in sorted(saved["state"].items())
    }
    return saved


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict
) -> None:
    """Shard a state from `full_optimizer_state` into the optimizer of the sharded model."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, optimizer, saved, options=options)


def mean_over_ranks(value: float, world: World, device: torch.device) -> float:
    """The mean of a per-process number over every process (a logged loss, say)."""
    if world.world_size == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total) / world.world_size


# ---------------------------------------------------------------------------------- checkpoints


def gather_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> FullState | None:
    """Under FSDP, the full model and optimiser state dicts on rank 0's CPU; None otherwise.

    Every rank must call it (each sends its shards), rank 0 then passes the result to
    `CheckpointManager.save(..., full_state=...)`. The optimiser's state is keyed by parameter
    index, as `optimizer.state_dict()` of an unsharded model is, so the checkpoint is the
    same whatever the strategy. For unsharded models (DDP or one process) there is nothing to
    gather: the checkpoint reads rank 0's replica directly, and this returns None.
    """
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = None
    if optimizer is not None:
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.get_rank() != 0:
        return None  # cpu_offload leaves the gathered state on rank 0 only
    return model_state, _by_index(optimizer_state) if optimizer_state is not None else None


def _by_index(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter name → keyed by position, as
    `torch.optim.Optimizer.state_dict()` numbers parameters: in order, group after group."""
    names = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    return {
        "state": {index[name]: values for name, values in state["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]}
            for group in state["param_groups"]
        ],
    }

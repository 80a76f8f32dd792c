"""λ tuning: fit only the per-head λ of a trained model, everything else frozen.

λ sets how sharply each head turns distances into weights. Tuning it alone is cheap (one
scalar per head) and cannot damage what the rest of the network learned. Adam works on log λ,
as training does, and log λ is clamped to [ln LAMBDA_MIN, ln LAMBDA_MAX] after every step.
The tuned λ are kept only if they lower the loss on a fixed validation set, so tuning never
returns a worse model than it was given.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from truthgpt.analysis.patterns import check_positive_int
from truthgpt.nn.attention import LAMBDA_MAX, LAMBDA_MIN

if TYPE_CHECKING:
    from truthgpt.training.core import TruthGPTOptimizationCore

# Adam's step is about lr in log λ per update: small, because a trained model's λ is already
# near a minimum and larger steps mostly add noise.
DEFAULT_LR = 0.01
DEFAULT_STEPS_PER_EPOCH = 50
# Most batches read from a plain iterable (which may be endless) when steps_per_epoch is unset.
MAX_ITERABLE_BATCHES = 200
# Added to the training seed so tuning draws other windows than training did.
SEED_OFFSET = 10_007
# Held-out share of a plain iterable of batches when no val_data is given.
HOLDOUT_FRACTION = 0.2


def _is_split(data: Any) -> bool:
    return hasattr(data, "tokens")


def _is_prepared(data: Any) -> bool:
    return _is_split(getattr(data, "train", None)) and _is_split(getattr(data, "val", None))


def _plan(
    core: Any,
    data: Any,
    val_data: Any,
    steps_per_epoch: int | None,
    seed: int,
) -> tuple[Any, Any, int]:
    """(batch_for(epoch, k), val set, steps per epoch) for the kind of data given."""
    cfg = core.train_config
    if _is_prepared(data) or _is_split(data):
        from truthgpt.data import RandomBatches

        if _is_prepared(data):
            train_split, val_default = data.train, data.val
        else:
            if val_data is None:
                raise ValueError(
                    "val_data: tuning on a single token split needs a separate validation set "
                    "(val_data=a token split or batches), or pass prepared data with train/val"
                )
            train_split, val_default = data, None
        steps = steps_per_epoch or DEFAULT_STEPS_PER_EPOCH
        sampler = RandomBatches(train_split, cfg.block_size, cfg.batch_size, seed=seed)
        val = val_data if val_data is not None else val_default
        return (lambda epoch, k: sampler.batch(epoch * steps + k)), val, steps

    if not isinstance(data, Iterable):
        raise ValueError(
            "data: expected prepared data (train/val), a token split or an iterable of batches, "
            f"got {type(data).__name__}"
        )
    # One epoch is one pass over the batches; they are read once (capped) so that a generator
    # can serve several epochs.
    cap = steps_per_epoch or MAX_ITERABLE_BATCHES
    if val_data is None:
        cap += max(1, math.ceil(cap * HOLDOUT_FRACTION / (1 - HOLDOUT_FRACTION)))
    batches = list(itertools.islice(data, cap))
    if val_data is None:
        if len(batches) < 2:
            raise ValueError(
                "data: need at least 2 batches to hold some out for validation (or pass val_data=)"
            )
        held = max(1, round(len(batches) * HOLDOUT_FRACTION))
        batches, val_data = batches[:-held], batches[-held:]
    if not batches:
        raise ValueError("data: the iterable of batches is empty")
    if not _is_split(val_data):
        val_data = list(val_data)  # evaluated twice: must be re-iterable
    return (lambda epoch, k: batches[k]), val_data, len(batches)


def _lambda_params(core: Any) -> list[torch.nn.Parameter]:
    return [block.attn.log_lambda for block in core.raw_model.blocks]


def _lambdas(core: Any) -> list[list[float]]:
    """Effective λ per layer and head, as the attention layers use them."""
    return core.raw_model.lambdas().cpu().tolist()


def tune_lambda(
    core: TruthGPTOptimizationCore,
    data: Any,
    num_epochs: int = 5,
    *,
    lr: float = DEFAULT_LR,
    steps_per_epoch: int | None = None,
    val_data: Any = None,
    eval_batches: int | None = None,
    seed: int | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Tune each head's λ of `core`'s model on `data`, in place; returns a report.

    Args:
        core: a `TruthGPTOptimizationCore`; its block_size, batch_size and precision are used.
        data: prepared data (tune on train, measure on val), a token split (then `val_data`
            is required), or an iterable of batches (dicts or (x, y) tuples): one epoch is one
            pass over it, capped at `steps_per_epoch` (default 200) batches; without
            `val_data`, a further 20% of batches are read and held out for measuring.
        num_epochs: passes over the tuning batches.
        lr: Adam learning rate on log λ.
        steps_per_epoch: batches per epoch (default 50 for token data, at most 200 batches of
            an iterable).
        val_data: what to measure the loss on: a token split or batches.
        eval_batches: cap on validation batches (default: the run's eval_batches).
        seed: batch sampling seed (default: the run's seed + 10007, unlike training's).
        log: called with a line of progress text, e.g. `print`.

    Every other parameter is frozen during tuning and keeps its value bit for bit; the
    requires_grad flags are restored afterwards. If the tuned λ do not lower the validation
    loss, the original λ are put back (`kept == "original"`).
    """
    check_positive_int("num_epochs", num_epochs)
    if steps_per_epoch is not None:
        check_positive_int("steps_per_epoch", steps_per_epoch)
    if eval_batches is not None:
        check_positive_int("eval_batches", eval_batches)
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr: must be a positive number, got {lr!r}")
    cfg = core.train_config
    seed = cfg.seed + SEED_OFFSET if seed is None else seed
    if eval_batches is None:
        eval_batches = cfg.eval_batches
    say = log or (lambda _line: None)

    batch_for, val, steps = _plan(core, data, val_data, steps_per_epoch, seed)
    model = core.model
    params = _lambda_params(core)
    original = [p.detach().clone() for p in params]
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    low, high = math.log(LAMBDA_MIN), math.log(LAMBDA_MAX)

    start = time.perf_counter()
    lambda_before = _lambdas(core)
    val_before = core.evaluate(val, max_batches=eval_batches)["loss"]
    say(f"val loss before: {val_before:.4f}")
    clamped: dict[tuple[int, int], dict[str, Any]] = {}
    epochs: list[dict[str, float]] = []
    done = skipped = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        optimizer = torch.optim.Adam(params, lr=lr)
        model.train()
        for epoch in range(num_epochs):
            losses = []
            for k in range(steps):
                loss, _ = core.compute_loss(batch_for(epoch, k))
                value = float(loss.detach())
                if not math.isfinite(value):
                    skipped += 1
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grads = [p.grad for p in params if p.grad is not None]
                if not all(bool(torch.isfinite(g).all()) for g in grads):
                    skipped += 1
                    continue
                optimizer.step()
                done += 1
                losses.append(value)
                _clamp(params, low, high, clamped, done)
            mean_loss = sum(losses) / len(losses) if losses else math.nan
            epochs.append({"epoch": epoch + 1, "train_loss": mean_loss})
            say(f"epoch {epoch + 1}/{num_epochs}: train loss {mean_loss:.4f}")
        lambda_tuned = _lambdas(core)
        val_tuned = core.evaluate(val, max_batches=eval_batches)["loss"]
    except BaseException:
        _restore(params, original)  # an interrupted tuning leaves the model as it was
        raise
    finally:
        for p in params:
            p.grad = None
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)

    kept = "tuned" if val_tuned < val_before else "original"
    if kept == "original":
        _restore(params, original)
        say(
            f"val loss after tuning {val_tuned:.4f} is not below {val_before:.4f}: "
            "kept the original λ"
        )
    else:
        say(f"val loss after: {val_tuned:.4f} (tuned λ kept)")
    return {
        "lambda_before": lambda_before,
        "lambda_after": _lambdas(core),
        "lambda_tuned": lambda_tuned,
        "val_loss_before": val_before,
        "val_loss_after": val_tuned if kept == "tuned" else val_before,
        "val_loss_tuned": val_tuned,
        "kept": kept,
        "clamped": [clamped[key] for key in sorted(clamped)],
        "lambda_range": [LAMBDA_MIN, LAMBDA_MAX],
        "steps": done,
        "skipped_steps": skipped,
        "epochs": epochs,
        "lr": lr,
        "steps_per_epoch": steps,
        "eval_batches": eval_batches,
        "seed": seed,
        "time_s": time.perf_counter() - start,
    }


@torch.no_grad()
def _restore(params: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    for p, value in zip(params, saved, strict=True):
        p.copy_(value)


@torch.no_grad()
def _clamp(
    params: Sequence[torch.Tensor],
    low: float,
    high: float,
    clamped: dict[tuple[int, int], dict[str, Any]],
    step: int,
) -> None:
    """Pull log λ back into range, recording which heads hit which bound and how often."""
    for layer, p in enumerate(params):
        below, above = p < low, p > high
        for head in torch.nonzero(below | above).flatten().tolist():
            entry = clamped.setdefault(
                (layer, head),
                {"layer": layer, "head": head, "bound": None, "times": 0, "first_step": step},
            )
            entry["bound"] = "min" if bool(below[head]) else "max"
            entry["lambda"] = LAMBDA_MIN if bool(below[head]) else LAMBDA_MAX
            entry["times"] += 1
        p.clamp_(low, high)

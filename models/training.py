"""One training loop for the models, in the shape of nanoGPT's and denoising-diffusion-pytorch's trainers.

``loss = loss_of(batch_indices)`` each step, then gradient clipping, an AdamW
step and an exponential moving average (EMA) of the weights. The learning rate
warms up linearly, then decays on a cosine to a tenth, over the step count or
a wall-clock budget, whichever runs out first (a shared machine's speed swings
too much to guess steps from time). A tqdm bar shows the running loss; the EMA
is validated every ``eval_every`` steps and at the end; a resumable state
(weights, EMA, optimiser, history, step, seconds spent) is written every
``save_every`` steps and at the end.

The diffusion trainers (:mod:`hybridrag.models.train_diffusion`) run on it.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """Exponential moving average of the weights (what diffusion models sample with)."""
    with torch.no_grad():
        for e, m in zip(ema.parameters(), model.parameters()):
            e.lerp_(m, 1 - decay)
        for e, m in zip(ema.buffers(), model.buffers()):
            e.copy_(m)


def cosine_lr(step: int, progress: float, base: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% of ``base`` as ``progress`` goes 0 -> 1."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def schedule_progress(step: int, steps: int, elapsed_s: float, budget_s: float | None) -> float:
    """How far through the run we are, in [0, 1]: by steps, or by wall clock when there is a budget.

    The machine is shared and its speed swings several-fold within minutes, so a
    budgeted run decays its learning rate over time rather than over a step
    count guessed from the first steps, and stops when the time is up.
    """
    by_steps = step / max(steps, 1)
    return by_steps if budget_s is None else max(by_steps, elapsed_s / budget_s)


def save_state(path: Path, model, ema, opt, history: dict, step: int, elapsed_s: float) -> None:
    """Everything a resume needs: weights, EMA, optimiser, history, step and the seconds spent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "history": history, "step": step, "elapsed_s": elapsed_s}, tmp)
    tmp.replace(path)


@dataclass
class LoopConfig:
    steps: int  # upper bound; a time budget usually ends the run first
    batch_size: int  # indices drawn (with replacement) per step
    lr: float  # peak learning rate
    warmup: int  # linear warm-up steps
    ema_decay: float = 0.999  # EMA of the weights once past ema_start
    ema_start: int = 200  # until this step the EMA copies the weights
    clip: float = 1.0  # gradient norm clipping
    seed: int = 0  # seeds the batch sampler (offset by the resumed step)
    device: str = "cpu"
    state_path: Path | None = None  # resumable state; None writes none
    resume: bool = False  # continue from state_path if it exists
    save_every: int = 500  # steps between resumable states
    eval_every: int = 1000  # steps between validations of the EMA
    time_budget_s: float | None = None  # total wall-clock seconds, earlier runs of a resume included
    progress: bool = True  # tqdm bar
    desc: str = "train"  # the bar's label
    loss_format: str = ".4f"  # the bar's running loss


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, n_items: int, loss_of: Callable[[torch.Tensor], torch.Tensor],
          validate: Callable[[torch.nn.Module], dict], history: dict, cfg: LoopConfig) -> tuple[torch.nn.Module, dict]:
    """Train ``model`` on batches of indices into ``n_items`` items; returns the EMA model (CPU, eval) and the history.

    ``loss_of(idx)``: the scalar loss of the items ``idx`` (long, (batch_size,), on ``cfg.device``).
    ``validate(ema)``: a dict of held-out figures. ``history`` gains ``loss`` ([step, mean loss] every 100
    steps), ``val`` (each validation with its step and elapsed seconds) and ``steps`` (where the run ended).
    """
    from tqdm.auto import tqdm

    ema = copy.deepcopy(model).eval()
    start, prior_s = 0, 0.0  # prior_s: seconds already trained before a resume
    if cfg.resume and cfg.state_path is not None and cfg.state_path.exists():
        st = torch.load(cfg.state_path, map_location=cfg.device, weights_only=False)
        model.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        history, start, prior_s = st["history"], st["step"], st.get("elapsed_s", 0.0)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + start)
    running, t0 = [], time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc=cfg.desc, disable=not cfg.progress, initial=start, total=cfg.steps)
    for step in bar:
        frac = schedule_progress(step, cfg.steps, prior_s + time.perf_counter() - t0, cfg.time_budget_s)
        if frac >= 1.0:
            break
        model.train()
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, frac, cfg.lr, warmup=cfg.warmup)
        idx = torch.randint(0, n_items, (cfg.batch_size,), generator=gen).to(cfg.device)
        loss = loss_of(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        ema_update(ema, model, cfg.ema_decay if step > cfg.ema_start else 0.0)
        running.append(loss.item())
        if (step + 1) % 100 == 0:
            history["loss"].append([step + 1, float(np.mean(running))])
            bar.set_postfix(loss=format(np.mean(running), cfg.loss_format))
            running = []
        if (step + 1) % cfg.eval_every == 0:
            v = validate(ema)
            v.update(step=step + 1, elapsed_s=time.perf_counter() - t0)
            history["val"].append(v)
            tqdm.write(json.dumps(v))
        if cfg.state_path is not None and (step + 1) % cfg.save_every == 0:
            save_state(cfg.state_path, model, ema, opt, history, step + 1, prior_s + time.perf_counter() - t0)
    step = bar.n
    bar.close()
    v = validate(ema)
    v.update(step=step, elapsed_s=prior_s + time.perf_counter() - t0)
    history["val"].append(v)
    history["steps"] = step
    tqdm.write(json.dumps(v))
    if cfg.state_path is not None:
        save_state(cfg.state_path, model, ema, opt, history, step, prior_s + time.perf_counter() - t0)
    return ema.cpu().eval(), history

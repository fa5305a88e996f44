"""Averages of the weights: EDM2's power-function EMA, whose length is chosen after training.

A power-function EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models") averages the weights of steps 1..t with the profile p(s) ~ s^gamma, so its
length is a fixed share of the run at every step: ``sigma_rel``, the profile's standard deviation
relative to its length (0.05 to 0.10 are typical). Each step it moves by
``beta_t = (1 - 1/t)^(gamma + 1)``.

With snapshots of two such averages (``train.ema_sigma_rels``, say [0.05, 0.10]) kept every so
many steps, the average of any other length at any snapshot's step is a linear combination of the
snapshots: the one whose profile is nearest, in least squares, to the wanted profile. That is
:func:`posthoc_coefficients`; ``clevrgen export RUN --ema-sigma-rel S`` builds such a model.

A run's average is :func:`make_ema`'s: power EMAs, or diffusers' classic EMA of ``train.ema_decay``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from clevrgen.config import Config


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power-function profile with relative standard deviation sigma_rel:
    the root of sigma_rel^2 (gamma + 2)^2 (gamma + 3) = gamma + 1 above -1."""
    if not 0.0 < sigma_rel < 0.28:  # gamma = 0 (a plain mean of every step) gives 1/sqrt(12) = 0.289
        raise ValueError(f"sigma_rel must be between 0 and 0.28 (got {sigma_rel})")
    roots = np.roots([sigma_rel**2, 7 * sigma_rel**2, 16 * sigma_rel**2 - 1, 12 * sigma_rel**2 - 1])
    real = [r.real for r in roots if abs(r.imag) < 1e-9 and r.real > -1]
    return float(max(real))


def _profile_dot(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """Inner products of the profiles p(s) = (g + 1) s^g / t^(g + 1) on [0, t] (every pair)."""
    t_a, g_a = t_a[:, None].astype(np.float64), g_a[:, None].astype(np.float64)
    t_b, g_b = t_b[None, :].astype(np.float64), g_b[None, :].astype(np.float64)
    lo = np.minimum(t_a, t_b)
    # (g_a + 1)(g_b + 1) lo^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1)), in logs
    log = (np.log(g_a + 1) + np.log(g_b + 1) + (g_a + g_b + 1) * np.log(lo) - np.log(g_a + g_b + 1)
           - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b))
    return np.exp(log)


def posthoc_coefficients(steps: Sequence[int], sigma_rels: Sequence[float], target_step: int,
                         target_sigma_rel: float) -> np.ndarray:
    """Weights x of the stored averages (snapshot i: the EMA of relative length ``sigma_rels[i]``
    at step ``steps[i]``) such that sum_i x_i * theta_i is the average of relative length
    ``target_sigma_rel`` at ``target_step``, as nearly as these snapshots allow (least squares)."""
    t = np.asarray(steps, dtype=np.float64)
    g = np.asarray([sigma_rel_to_gamma(s) for s in sigma_rels])
    gram = _profile_dot(t, g, t, g)
    target = _profile_dot(t, g, np.asarray([float(target_step)]), np.asarray([sigma_rel_to_gamma(target_sigma_rel)]))
    x, *_ = np.linalg.lstsq(gram, target[:, 0], rcond=None)
    return x


class PowerEMA:
    """Power-function EMAs of a model's parameters, one per ``sigma_rel``, with the interface of
    diffusers' ``EMAModel`` (``step``, ``copy_to``, ``to``, ``state_dict``) so the trainer treats
    both alike; ``copy_to``'s ``index`` picks the average."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], sigma_rels: Sequence[float]):
        params = list(parameters)
        self.sigma_rels = list(sigma_rels)
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.averages = [[p.detach().float().clone() for p in params] for _ in self.sigma_rels]
        self.updates = 0  # optimizer steps folded in so far

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Fold in the weights after one more optimizer step."""
        self.updates += 1
        params = [p.detach().float() for p in parameters]
        for gamma, average in zip(self.gammas, self.averages):
            beta = (1 - 1 / self.updates) ** (gamma + 1)
            torch._foreach_lerp_(average, params, 1 - beta)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter], index: int = 0) -> None:
        for p, a in zip(parameters, self.averages[index]):
            p.copy_(a.to(p.dtype))

    def to(self, device) -> "PowerEMA":
        self.averages = [[a.to(device) for a in average] for average in self.averages]
        return self

    def state_dict(self) -> dict:
        return {"sigma_rels": self.sigma_rels, "step": self.updates, "averages": self.averages}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "sigma_rels" not in state:  # a classic EMA's state (ema_decay)
            raise ValueError("the checkpoint holds a classic EMA (train.ema_decay) but the config asks for power "
                             "EMAs (train.ema_sigma_rels), and the kind of average cannot change on a resume: "
                             "remove train.ema_sigma_rels from RUN/config.toml, or start a new run from these "
                             "weights with train.init=RUN")
        if [round(s, 9) for s in state["sigma_rels"]] != [round(s, 9) for s in self.sigma_rels]:
            raise ValueError(f"the checkpoint tracks EMAs of sigma_rel {state['sigma_rels']}, the config "
                             f"{self.sigma_rels}")
        self.updates = int(state["step"])
        self.averages = [[a.clone() for a in average] for average in state["averages"]]


def make_ema(model: torch.nn.Module, cfg: Config):
    """The weights' average: EDM2's power-function EMAs with ``train.ema_sigma_rels`` (the first is
    the run's artifact; all are kept in snapshots, for a length chosen after training), else a
    classic EMA of ``train.ema_decay``."""
    if cfg.train.ema_sigma_rels:
        return PowerEMA(model.parameters(), cfg.train.ema_sigma_rels)
    from diffusers.training_utils import EMAModel

    # foreach: one fused update over all weights, not a kernel launch per tensor (on a GPU)
    return EMAModel(model.parameters(), decay=cfg.train.ema_decay, use_ema_warmup=cfg.train.ema_warmup, foreach=True)


def check_classic_resume(state) -> None:
    """A classic EMA (``train.ema_decay``) cannot continue power EMAs' state: the ValueError says
    why and how to go on, not the classic EMA's own ``KeyError``."""
    if isinstance(state, dict) and "sigma_rels" in state:
        lengths = ", ".join(f"{s:g}" for s in state["sigma_rels"])
        raise ValueError(f"the checkpoint holds power EMAs (train.ema_sigma_rels = [{lengths}]) but the config asks "
                         "for a classic EMA (train.ema_decay), and the kind of average cannot change on a resume: put "
                         f"train.ema_sigma_rels = [{lengths}] back in RUN/config.toml, or start a new run from these "
                         "weights with train.init=RUN")


def sigma_rel_of_decay(decay: float, steps: int) -> float:
    """The relative length of a classic EMA of ``decay`` over a run of ``steps`` (for comparison):
    its profile's standard deviation, about 1 / (1 - decay) steps, over the run's length."""
    return math.sqrt(decay) / (1 - decay) / steps


def power_snapshots(run_dir) -> list[tuple[int, float, "object"]]:
    """(step, sigma_rel, folder) of every power-EMA snapshot of a run (``snapshots/step-N/ema-S``).
    A folder whose name is no step or length clevrgen writes (``ema-nan``, ``ema-0.5``, ``step-0``),
    or a second folder of one step and length (``step-4`` beside ``step-000004``), is named in one
    CheckpointError: the synthesis would fail on it in numpy's terms."""
    from pathlib import Path

    from clevrgen.errors import CheckpointError

    found, seen = [], {}
    for folder in sorted(Path(run_dir).glob("snapshots/step-*/ema-*")):
        try:
            step, sigma_rel = int(folder.parent.name.removeprefix("step-")), float(folder.name.removeprefix("ema-"))
        except ValueError:
            continue
        if step < 1 or not 0 < sigma_rel < 0.28:  # train.ema_sigma_rels' range (nan fails it too)
            raise CheckpointError(f"{folder}: not a snapshot clevrgen writes (a step from 1 and a length sigma_rel in "
                                  "(0, 0.28)); the run folder is damaged: remove or rename it")
        if (key := (step, round(sigma_rel, 3))) in seen:
            raise CheckpointError(f"{seen[key]} and {folder} are both the snapshot of step {step} at sigma_rel "
                                  f"{sigma_rel:g}; the run folder is damaged: remove one of them")
        seen[key] = folder
        found.append((step, sigma_rel, folder))
    return found


REACH_TOLERANCE = 0.05
"""How far from 1 the coefficients of a post-hoc average may sum (the shipped model's 0.15 from
snapshots of 0.05 and 0.10 over 6 steps: 0.987) before the length counts as out of reach."""


def check_reachable(x: np.ndarray, sigma_rel: float, step: int, sigma_rels: Sequence[float]) -> None:
    """Refuse (never normalise) a length the snapshots cannot build: coefficients that do not sum
    to about 1 would scale every weight of the exported model (0.001 at an early step: by 0.21)."""
    from clevrgen.errors import UsageError

    total = float(np.sum(x))
    if abs(total - 1.0) > REACH_TOLERANCE:
        raise UsageError(
            f"--ema-sigma-rel {sigma_rel:g} at step {step} is out of reach of the run's snapshots (sigma_rel "
            f"{', '.join(f'{s:g}' for s in sigma_rels)}): their best combination's coefficients sum to {total:.2f}, "
            "not 1, so the exported weights would be scaled down. Choose a length nearer the snapshots' "
            "(or a later --step, with more snapshots)")


def posthoc_model(run_dir, sigma_rel: float, step: int | None = None):
    """The model whose weights are the power-function EMA of relative length ``sigma_rel`` at
    ``step`` (default: the last snapshot's), synthesized from the run's snapshots; with its config
    and the snapshots' coefficients, for the record."""
    from clevrgen.artifact import load_artifact
    from clevrgen.errors import CheckpointError, UsageError

    snaps = power_snapshots(run_dir)
    if not snaps:
        raise CheckpointError(f"{run_dir} has no power-EMA snapshots (snapshots/step-N/ema-S): train it with "
                              "train.ema_sigma_rels and train.snapshot_every")
    step = step if step is not None else max(s for s, _, _ in snaps)
    used = [(s, r, f) for s, r, f in snaps if s <= step]
    if not used or step not in {s for s, _, _ in snaps}:
        raise UsageError(f"--step {step}: the run's snapshots are at steps "
                         f"{', '.join(str(s) for s in sorted({s for s, _, _ in snaps}))}")
    x = posthoc_coefficients([s for s, _, _ in used], [r for _, r, _ in used], step, sigma_rel)
    check_reachable(x, sigma_rel, step, sorted({r for _, r, _ in used}))
    model, config = load_artifact(used[0][2])
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in model.state_dict().items()}
    for weight, (_, _, folder) in zip(x, used):
        snapshot, _ = load_artifact(folder)
        for k, v in snapshot.state_dict().items():
            total[k] += float(weight) * v.double()
    model.load_state_dict({k: v.float() for k, v in total.items()})
    return model, config, {f"step-{s:06d}/ema-{r:.3f}": float(w) for (s, r, _), w in zip(used, x)}

"""GraphCast's optimizer and its three-phase schedule (paper defaults, all configurable).

Phase 1: linear warm-up from 0 to `peak_lr` over `warmup_steps`.
Phase 2: half-cosine from `peak_lr` to 0 over `decay_steps` (still 1 autoregressive step).
Phase 3: the rollout curriculum: `ar_start`..`ar_end` steps, one more every `steps_per_ar` steps,
at the constant `curriculum_lr`.

The learning rate is a function of the global step, not of the optimizer's own counter, so a skipped
(non-finite) update does not shift the schedule. AdamW is split into a direction (clip + Adam +
decoupled weight decay on weight matrices) and the step `-lr * direction`; both, and the whole
update the experiment trains, are in graphcast.update.
"""

import dataclasses
import math

import optax

from graphcast import update


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule settings; the defaults are the GraphCast paper's."""
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_param_names: tuple = ("w",)   # haiku names of weight matrices (biases/norms excluded)
    clip_global_norm: float = 32.0
    warmup_steps: int = 1000
    peak_lr: float = 1e-3
    decay_steps: int = 299_000
    ar_start: int = 2
    ar_end: int = 12
    steps_per_ar: int = 1000
    curriculum_lr: float = 3e-7

    @classmethod
    def from_mapping(cls, mapping) -> "OptimConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ValueError(f"Unknown optimizer config fields {unknown}; known: {sorted(known)}.")
        values = dict(mapping)
        if "decay_param_names" in values:
            values["decay_param_names"] = tuple(values["decay_param_names"])
        return cls(**values)

    @property
    def total_steps(self) -> int:
        """Steps to the end of the curriculum (311,000 with the defaults)."""
        stages = max(self.ar_end - self.ar_start + 1, 0) if self.steps_per_ar > 0 else 0
        return self.warmup_steps + self.decay_steps + stages * self.steps_per_ar


def schedule(step: int, cfg: OptimConfig) -> tuple:
    """(learning rate, autoregressive steps) to use for the update at 0-based `step`."""
    if step < 0:
        raise ValueError(f"schedule: step must be >= 0, got {step}.")
    if step < cfg.warmup_steps:
        return cfg.peak_lr * step / cfg.warmup_steps, 1
    t = step - cfg.warmup_steps
    if t < cfg.decay_steps:
        return cfg.peak_lr * 0.5 * (1.0 + math.cos(math.pi * t / cfg.decay_steps)), 1
    if cfg.steps_per_ar <= 0 or cfg.ar_end < cfg.ar_start:
        return 0.0, 1
    stage = (t - cfg.decay_steps) // cfg.steps_per_ar
    return cfg.curriculum_lr, int(min(cfg.ar_start + stage, cfg.ar_end))


def distinct_ar_steps(cfg: OptimConfig, training_steps: int) -> list:
    """Rollout lengths a run of `training_steps` will use (each compiles once)."""
    values = []
    boundaries = [0, cfg.warmup_steps + cfg.decay_steps]
    boundaries += [boundaries[1] + k * cfg.steps_per_ar
                   for k in range(1, max(cfg.ar_end - cfg.ar_start + 1, 0))]
    for step in boundaries:
        if step < training_steps:
            ar = schedule(step, cfg)[1]
            if ar not in values:
                values.append(ar)
    return values


def make_direction(cfg: OptimConfig) -> optax.GradientTransformation:
    """Clip -> Adam -> + weight_decay * w (graphcast.update's direction) with `cfg`'s settings."""
    return update.make_direction(clip_global_norm=cfg.clip_global_norm, b1=cfg.b1, b2=cfg.b2,
                                 eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 decay_param_names=cfg.decay_param_names)

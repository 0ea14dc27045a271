"""Hyperparameter search of the defense with Ray Tune + Optuna + ASHA.

``raydefense.tune.space`` (no Ray needed): the knobs (lambda, T, guidance layer, learning
rates, denoiser width), how a trial's values become config overrides, and the objective.
``raydefense.tune.trial``: one trial, the pipeline's training loops on Ray Train inside a
Tune function. ``raydefense.tune.search``: ``run_search``, the driver (Tuner, restore, summary).
"""
from raydefense.tune.space import Knob, apply_params, build_knobs, objective, overrides_for, param_space

__all__ = ["Knob", "apply_params", "build_knobs", "objective", "overrides_for", "param_space", "run_search"]


def __getattr__(name: str):
    # run_search imports Ray Tune; load it only when asked for.
    if name == "run_search":
        from raydefense.tune.search import run_search

        return run_search
    raise AttributeError(f"module 'raydefense.tune' has no attribute '{name}'")

"""Opacus DP-SGD set-up and accounting shared by central and client training."""

from __future__ import annotations

import torch
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("rdp", "prv")


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Smallest noise multiplier whose composed (epsilon, delta) over ``steps`` meets the target."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant=accountant))


def make_private(module: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: torch.utils.data.DataLoader,
                 noise_multiplier: float, max_grad_norm: float, accountant: str):
    """Wrap for DP-SGD: per-sample gradients, flat clipping, Gaussian noise, Poisson sampling."""
    engine = PrivacyEngine(accountant=accountant)
    module, optimizer, loader = engine.make_private(
        module=module, optimizer=optimizer, data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        poisson_sampling=True, clipping="flat",
    )
    return engine, module, optimizer, loader


def interaction_group_size(history_len: int, examples_per_user: int) -> int:
    """How many add/remove-one-example steps separate two datasets that differ in one rating: its own
    example, a removal plus an addition for each of up to ``history_len`` later examples whose
    history text it appears in, and, with a most-recent window, one older example let in."""
    return 2 * history_len + 1 + (1 if examples_per_user > 0 else 0)

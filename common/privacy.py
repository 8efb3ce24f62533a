"""DP-SGD with Opacus' per-sample gradients, clipping and accountants, and privrec's own
randomness and public parameters.

``make_private`` assembles the pieces that Opacus' ``PrivacyEngine.make_private`` would,
with three differences that the guarantee depends on:

- the noise comes from a :class:`~common.secure_random.SecureStream` and is snapped to a
  grid (:mod:`common.secure_random`), never from torch's global generator;
- Poisson batches are drawn from a second, independent secure stream
  (:meth:`PrivateTraining.batches`);
- the sample rate and the denominator of the averaged noisy gradient are *public* numbers
  given by the caller. ``PrivacyEngine`` derives both from the dataset size, which on a
  client is private: under add/remove adjacency a mechanism that divides by the exact
  example count does not have the accounted epsilon.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import numpy as np
import torch
from opacus.accountants import IAccountant, RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample.utils import wrap_model
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from common.grad_sample import OnePassGradSample, OuterProductRows, factored_rows
from common.secure_random import SecureStream, add_gaussian_noise

ACCOUNTANTS = ("rdp", "prv")


def epsilon_of_history(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of composed sampled Gaussian mechanisms (noise multiplier, sample rate,
    steps), with an Opacus accountant from its registry (0 for an empty history)."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    history = [(float(z), float(q), int(n)) for z, q, n in history if n > 0]
    if not history:
        return 0.0
    if accountant == "rdp":
        # What RDPAccountant.get_epsilon computes (the sum of steps x one-step RDP curve over the
        # history, then Opacus' conversion), with each one-step curve computed once per process:
        # at q < 1 one curve costs about half a second, and ledgers ask for the same few often.
        rdp = sum(n * _one_step_rdp(z, q) for z, q, n in history)
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    acc = create_accountant(mechanism=accountant)
    acc.history = history
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=4096)
def _one_step_rdp(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    curve = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                     orders=RDPAccountant.DEFAULT_ALPHAS)
    curve.setflags(write=False)  # shared between callers
    return curve


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Smallest noise multiplier whose composed (epsilon, delta) over ``steps`` meets the target."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant=accountant))


@dataclass(frozen=True)
class PublicSchedule:
    """The public parameters of one DP-SGD session: Poisson rate, steps and the denominator.

    Built from a *public* example count (a client's cap on examples per session, or a central
    data set's published size), never from a client's actual count.
    """

    sample_rate: float
    steps: int
    expected_batch_size: int

    @classmethod
    def from_public_size(cls, public_size: int, batch_size: int, epochs: float) -> "PublicSchedule":
        """q = min(1, batch / public size), ceil(epochs / q) steps, denominator q x public size."""
        if public_size < 1 or batch_size < 1 or not epochs > 0:
            raise ValueError(f"public size, batch size and epochs must be positive, got {public_size}, "
                             f"{batch_size}, {epochs}")
        q = min(1.0, batch_size / public_size)
        return cls(sample_rate=q, steps=max(1, math.ceil(epochs / q - 1e-9)),
                   expected_batch_size=min(batch_size, public_size))


def client_public_size(cfg: Mapping[str, Any]) -> int:
    """The public example count a client session's DP schedule is derived from (resolved run config):
    the cap on examples per session, or the batch size when there is no cap."""
    return cfg["examples-per-user"] if cfg["examples-per-user"] > 0 else cfg["batch-size"]


def client_schedule(cfg: Mapping[str, Any]) -> PublicSchedule:
    """Every client's session schedule under a run config: the same for all, whatever their data."""
    return PublicSchedule.from_public_size(client_public_size(cfg), cfg["batch-size"], cfg["local-epochs"])


class SecureNoiseDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer (flat clipping, mean reduction over a fixed public batch size) whose
    Gaussian noise comes from a secure stream and is snapped to a grid."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: int, noise_stream: SecureStream) -> None:
        super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, loss_reduction="mean")
        self.noise_stream = noise_stream

    def clip_and_accumulate(self) -> None:
        """Opacus' flat clipping (each example's gradient scaled by min(1, C / (norm + 1e-6)), the scaled
        gradients summed into ``p.summed_grad``), except that an example whose per-sample gradient is not
        finite contributes zero: Opacus would turn it into a NaN sum, and a client failing only for some
        data would tell the server something about that data. Every norm is computed once; gradients the
        one-pass engine kept factored (:class:`~common.grad_sample.OuterProductRows`) are never built."""
        params = self.params
        batch = len(self._get_flat_grad_sample(params[0]))
        samples: list[torch.Tensor | OuterProductRows] = []
        for p in params:
            rows = factored_rows(p)
            sample = rows if rows is not None else self._get_flat_grad_sample(p)
            if tuple(sample.shape) != (batch, *p.shape):  # e.g. a zero-width placeholder whose factors were lost
                raise RuntimeError(f"per-example gradients of shape {tuple(sample.shape)} for a parameter of shape "
                                   f"{tuple(p.shape)} in a batch of {batch}")
            samples.append(sample if rows is not None else sample.reshape(batch, p.numel()))
        if batch == 0:
            factor = torch.zeros(0, device=params[0].device)
        else:
            per_param = torch.stack([s.norms() if isinstance(s, OuterProductRows)
                                     else torch.linalg.vector_norm(s, dim=1) for s in samples], dim=1)
            finite = torch.isfinite(per_param).all(dim=1)
            if not bool(finite.all()):
                samples = [s.keep_rows(finite) if isinstance(s, OuterProductRows)
                           else torch.where(finite[:, None], s, torch.zeros_like(s)) for s in samples]
                per_param = torch.where(finite[:, None], per_param, torch.zeros_like(per_param))
            factor = (self.max_grad_norm / (torch.linalg.vector_norm(per_param, dim=1) + 1e-6)).clamp(max=1.0)
        for p, s in zip(params, samples):
            _check_processed_flag(p.grad_sample)
            weights = factor.to(p.dtype)
            # sum_i factor_i g_i
            grad = (s.weighted_sum(weights) if isinstance(s, OuterProductRows) else weights @ s.to(p.dtype)).view_as(p)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        """The clipped sums plus Gaussian noise of std noise_multiplier x C per coordinate, all coordinates
        drawn in one call (independent draws, as one call per parameter would give), into ``p.grad``."""
        std = self.noise_multiplier * self.max_grad_norm
        params = self.params
        for p in params:
            _check_processed_flag(p.summed_grad)
        summed = torch.cat([p.summed_grad.detach().reshape(-1) for p in params]).to(torch.float64)
        noisy = torch.from_numpy(add_gaussian_noise(summed.numpy(), std, self.noise_stream))
        offset = 0
        for p in params:
            p.grad = noisy[offset:offset + p.numel()].to(p.dtype).view_as(p)
            offset += p.numel()
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        """Divide by the public expected batch size (times the accumulated steps), as Opacus' mean reduction."""
        denominator = self.expected_batch_size * self.accumulated_iterations
        for p in self.params:
            p.grad /= denominator


@dataclass
class PrivateTraining:
    """The wrapped module, the DP optimizer and the accountant of one DP-SGD session."""

    module: torch.nn.Module
    optimizer: SecureNoiseDPOptimizer
    accountant: IAccountant
    schedule: PublicSchedule
    sampling_stream: SecureStream
    sensitivity: float = 1.0  # of the clipped sum, in units of the clip (see session_sensitivity)
    one_pass: OnePassGradSample | None = None  # the per-example engine when not Opacus' hooks

    def backward(self, loss_sum: torch.Tensor, batch_size: int) -> None:
        """Per-example gradients of a batch's summed loss (``batch_size`` examples) for the optimizer's step."""
        if self.one_pass is not None:
            self.one_pass.backward(loss_sum, batch_size)
        else:  # Opacus' hooks rescale the mean's backprops by the batch length
            (loss_sum / batch_size).backward()

    def batches(self, num_rows: int) -> Iterator[torch.Tensor]:
        """The session's Poisson batches: each row independently with the public rate, every step."""
        for _ in range(self.schedule.steps):
            chosen = self.sampling_stream.bernoulli(self.schedule.sample_rate, num_rows)
            yield torch.from_numpy(np.flatnonzero(chosen))

    def epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` of the steps taken so far (the history Opacus' step hook recorded), with
        the noise counted in units of the session's sensitivity."""
        history = [(z / self.sensitivity, q, n) for z, q, n in self.accountant.history]
        return epsilon_of_history(history, delta, self.accountant.mechanism())

    def close(self) -> None:
        """Remove the per-example hooks from the model (always call it, also when training failed)."""
        _remove_hooks(self.module, self.one_pass)


def _remove_hooks(module: torch.nn.Module, one_pass: OnePassGradSample | None) -> None:
    """Take the per-example machinery off the model: the one-pass engine's hooks, or Opacus' wrapper's."""
    if one_pass is not None:
        one_pass.close()
    else:
        module._close()


class GradientCanaries(Protocol):
    """Extra rows of the training set whose per-example gradients an audit chooses.

    They are Poisson-sampled, clipped and noised by the same Opacus objects as the real
    examples: only their gradient is made up (see :mod:`simulations.audits.mechanism`).
    """

    count: int

    def rows(self, canary_index: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-example gradients of the sampled canaries, one tensor (len(index), *p.shape) per param."""
        ...


GRAD_SAMPLE_MODES = ("hooks", "one-pass")


def make_private(model: torch.nn.Module, optimizer: torch.optim.Optimizer, noise_multiplier: float,
                 max_grad_norm: float, schedule: PublicSchedule, accountant: str,
                 sensitivity: float = 1.0, grad_sample_mode: str = "hooks") -> PrivateTraining:
    """Wrap ``model`` and ``optimizer`` for DP-SGD with per-sample gradients; the session's epsilon is
    accounted at ``sensitivity`` times the clip (:func:`session_sensitivity`). ``grad_sample_mode``:
    "hooks" (Opacus' ``GradSampleModule``; call ``module``) or "one-pass" (:class:`OnePassGradSample`: the
    same grad samplers from one backward pass without ordinary weight gradients; ``module`` is ``model``).
    Either way gradients come from :meth:`PrivateTraining.backward`."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
    one_pass = OnePassGradSample(model) if grad_sample_mode == "one-pass" else None
    module = model if one_pass is not None else wrap_model(model, grad_sample_mode="hooks", batch_first=True,
                                                           loss_reduction="mean")
    try:
        dp_optimizer = SecureNoiseDPOptimizer(optimizer, noise_multiplier=noise_multiplier,
                                              max_grad_norm=max_grad_norm,
                                              expected_batch_size=schedule.expected_batch_size,
                                              noise_stream=SecureStream())
        acc = create_accountant(mechanism=accountant)
        dp_optimizer.attach_step_hook(acc.get_optimizer_hook_fn(sample_rate=schedule.sample_rate))
    except Exception:
        _remove_hooks(module, one_pass)
        raise
    return PrivateTraining(module, dp_optimizer, acc, schedule, SecureStream(), sensitivity, one_pass)


def session_sensitivity(examples_per_user: int, adjacency: str) -> float:
    """The L2 sensitivity of a client session's clipped gradient sum, in units of the clip norm.

    With a cap on a session's examples (``examples_per_user`` > 0) the session uses the device's
    most recent that many examples: removing one of them lets the next older one in, so the window
    changes by a removal *and* an addition and the sum moves by up to 2C. Whether a device holds
    more examples than the cap is private, so every capped session is accounted at 2C (for a
    device below the cap this over-states the spend). Without a cap, add/remove of one example
    moves the sum by C, replace-one by 2C. With a cap replace-one stays 2C: replacing an example
    changes the window by at most one example swapped for another.
    """
    if adjacency not in ("add-remove", "replace-one"):
        raise ValueError(f"adjacency must be add-remove or replace-one, got {adjacency!r}")
    return 2.0 if examples_per_user > 0 or adjacency == "replace-one" else 1.0


def selection_rule(examples_per_user: int, padded: bool = True) -> str:
    """The rule that chooses a session's examples, in words (for the privacy statement); ``padded``
    when sessions fill up to the cap with weight-0 rows (a device's, not the central baseline's)."""
    if examples_per_user > 0:
        padding = f", padded with weight-0 rows to {examples_per_user}" if padded else ""
        return (f"the user's {examples_per_user} most recent training examples (all of them when fewer){padding}; "
                f"a removal that lets an older example into the window is accounted as a replacement "
                f"(sensitivity 2C)")
    return "all of the user's training examples"


def interaction_group_size(history_len: int, examples_per_user: int) -> int:
    """How many accounted unit changes separate two datasets that differ in one rating: its own example,
    and the rewritten history texts of up to ``history_len`` later examples. With a cap on a
    session's examples each change is accounted as a replacement (sensitivity 2C), so a rewritten
    history is one change and a removal that lets an older example in is one too: ``history_len + 1``.
    Without a cap, add/remove adjacency counts a rewritten history as a removal plus an addition:
    ``2 history_len + 1``."""
    return history_len + 1 if examples_per_user > 0 else 2 * history_len + 1

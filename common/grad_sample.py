"""Per-example gradients from one autograd pass, computed by Opacus' registered grad samplers.

Opacus' hooks mode (``GradSampleModule``) lets autograd compute every parameter's ordinary gradient
and, in backward hooks, each layer's per-example gradients into zero-filled buffers. DP-SGD never
uses the ordinary gradient. :class:`OnePassGradSample` instead records each trainable layer's inputs
and output in the forward pass, asks autograd only for the gradient of the batch's summed per-example
losses with respect to those outputs (one backward pass that skips every weight gradient), and hands
each (layer, inputs, output gradient) to the grad sampler Opacus has registered for the layer's type:
the library's per-layer formulas (and privrec's own registered ones, ``TextBias`` and ``ItemBias``);
``nn.Linear`` uses the same formula written as batched products, which copies less.
A layer called more than once gets the sum of its calls' per-example gradients, as in Opacus.

A Linear layer that sees one position per example (a 2-D input, once per forward) keeps its weight's
per-example gradients as factors (:class:`OuterProductRows`: example i's gradient is its output gradient
times its input, ``g_i x_i^T``): their norms are ``|g_i| |x_i|`` and a weighted sum over examples is one
matrix product, so the (batch, out, in) tensor is never built. ``p.grad_sample`` then holds a zero-width
(batch, 0) placeholder, which keeps Opacus' bookkeeping (batch length, processed flags) working. It holds
no values, but it is not self-evidently wrong to every reader (a per-row norm of it is a row of zeros),
so privrec's optimizer refuses a per-example tensor whose shape is not (batch, *p.shape) and reads the
factors only through :func:`factored_rows`, while the placeholder is still ``p.grad_sample``. Read either
form with :func:`per_example_gradient`; append rows (an audit's canaries) with :func:`append_rows`.

The result is exact under the same condition as Opacus' hooks: example i's loss depends on example
i's inputs alone (no batch statistics, no in-batch negatives). Because the loss is a sum, each
output gradient row is already its own example's, so no batch-size rescaling is involved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn


@dataclass(frozen=True)
class OuterProductRows:
    """A weight's per-example gradients (rows, out, in): first ``len(left)`` rows kept as two factors, row i
    being ``left[i] right[i]^T``, then the ordinary rows ``extra`` (an audit's canaries, appended after them)."""

    left: torch.Tensor  # (n, out): each example's output gradient
    right: torch.Tensor  # (n, in): each example's input
    extra: torch.Tensor  # (k, out, in), k >= 0
    placeholder: torch.Tensor  # the zero-width (n + k, 0) tensor left in ``p.grad_sample`` in their place

    @classmethod
    def of(cls, left: torch.Tensor, right: torch.Tensor) -> "OuterProductRows":
        """Rows ``left[i] right[i]^T``, from copies of the factors (nothing else can then change them in place)."""
        extra = left.new_zeros((0, left.shape[1], right.shape[1]))
        return cls(left.clone(), right.clone(), extra, left.new_empty((len(left), 0)))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.left) + len(self.extra), self.left.shape[1], self.right.shape[1])

    def norms(self) -> torch.Tensor:
        """(rows,) each row's Frobenius norm: |left_i| |right_i| for the factored rows."""
        factored = torch.linalg.vector_norm(self.left, dim=1) * torch.linalg.vector_norm(self.right, dim=1)
        return torch.cat([factored, torch.linalg.vector_norm(self.extra.flatten(1), dim=1)])

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """(out, in) the sum over rows of weights[i] times row i."""
        n, weights = len(self.left), weights.to(self.left.dtype)
        total = (weights[:n, None] * self.left).T @ self.right
        if len(self.extra):
            total = total + (weights[n:] @ self.extra.flatten(1)).view_as(total)
        return total

    def keep_rows(self, keep: torch.Tensor) -> "OuterProductRows":
        """The same rows with those not in the boolean ``keep`` (rows,) set to zero: both factors of a dropped
        row, since 0 x inf would be NaN."""
        n = len(self.left)
        return OuterProductRows(torch.where(keep[:n, None], self.left, 0.0),
                                torch.where(keep[:n, None], self.right, 0.0),
                                torch.where(keep[n:, None, None], self.extra, 0.0), self.placeholder)

    def appended(self, rows: torch.Tensor) -> "OuterProductRows":
        """These rows followed by the ordinary ``rows`` (k, out, in), with a placeholder of the new length."""
        extra = torch.cat([self.extra, rows.to(self.extra.dtype)])
        return OuterProductRows(self.left, self.right, extra, self.left.new_empty((self.shape[0] + len(rows), 0)))

    def materialise(self) -> torch.Tensor:
        """(rows, out, in) the per-example gradients as one tensor."""
        return torch.cat([self.left[:, :, None] * self.right[:, None, :], self.extra])


def factored_rows(p: torch.Tensor) -> OuterProductRows | None:
    """The factored per-example gradients the engine left for ``p``, or None when ``p.grad_sample`` is an
    ordinary tensor (factors whose placeholder is no longer ``p.grad_sample`` are stale and ignored)."""
    rows = getattr(p, "grad_sample_factors", None)
    if rows is not None and rows.placeholder is getattr(p, "grad_sample", None):
        return rows
    return None


def per_example_gradient(p: torch.Tensor) -> torch.Tensor:
    """``p``'s per-example gradients (batch, *p.shape) as one tensor, whichever form the engine left."""
    rows = factored_rows(p)
    return rows.materialise() if rows is not None else p.grad_sample


def append_rows(p: torch.Tensor, rows: torch.Tensor) -> None:
    """Append ordinary per-example rows (k, *p.shape) after ``p``'s per-example gradients, in either form."""
    factors = factored_rows(p)
    if factors is None:
        p.grad_sample = torch.cat([p.grad_sample, rows.to(p.grad_sample.dtype)])
    else:
        grown = factors.appended(rows)
        p.grad_sample, p.grad_sample_factors = grown.placeholder, grown


def _linear_per_example(layer: nn.Linear, activations: list[torch.Tensor],
                        backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor | OuterProductRows]:
    """Per-example gradients of ``nn.Linear`` (the formula of Opacus' sampler, as batched products: example
    i's weight gradient sums backprop_i[t] x input_i[t] over its positions t, its bias gradient backprop_i[t])."""
    x, g = activations[0], backprops
    out: dict[nn.Parameter, torch.Tensor | OuterProductRows] = {}
    if x.dim() == 2:  # one position per example: an outer product, kept factored
        if layer.weight.requires_grad:
            out[layer.weight] = OuterProductRows.of(g, x)
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias] = g
        return out
    x, g = x.reshape(len(x), -1, x.shape[-1]), g.reshape(len(g), -1, g.shape[-1])
    if layer.weight.requires_grad:
        out[layer.weight] = torch.bmm(g.transpose(1, 2), x)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(dim=1)
    return out


# Used before Opacus' registry for these exact types (the same gradients, fewer copies: tested against each
# example's own gradient in tests/test_sequence_model.py and tests/test_grad_sample.py).
FASTER_SAMPLERS = {nn.Linear: _linear_per_example}


def _dense(sample: torch.Tensor | OuterProductRows) -> torch.Tensor:
    """A sampler's per-example gradients as one tensor."""
    return sample.materialise() if isinstance(sample, OuterProductRows) else sample


def _sampler(module: nn.Module):
    kind = type(module)
    return FASTER_SAMPLERS.get(kind) or GradSampleModule.GRAD_SAMPLERS[kind]


def _trainable_leaves(model: nn.Module) -> list[nn.Module]:
    """The modules that own a trainable parameter directly."""
    return [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


class OnePassGradSample:
    """Sets ``p.grad_sample`` (batch, *p.shape) for every trainable parameter of ``model`` from one
    backward pass of a summed per-example loss (:meth:`backward`). Remove its hooks with :meth:`close`."""

    def __init__(self, model: nn.Module) -> None:
        was_training = model.training
        model.train()  # Opacus' validator also asks for training mode, which the caller sets later
        try:
            problems = ModuleValidator.validate(model, strict=False)
        finally:
            model.train(was_training)
        if problems:
            raise ValueError(f"model not fit for per-example gradients: {problems}")
        self.params = [p for p in model.parameters() if p.requires_grad]
        leaves = _trainable_leaves(model)
        owned = {id(p) for m in leaves for p in m.parameters(recurse=False)}
        missing = [type(m).__name__ for m in leaves
                   if type(m) not in GradSampleModule.GRAD_SAMPLERS and type(m) not in FASTER_SAMPLERS]
        if missing or any(id(p) not in owned for p in self.params):
            raise ValueError(f"no Opacus grad sampler is registered for the layer types {sorted(set(missing))}")
        self._calls: list[tuple[nn.Module, list[torch.Tensor], list[int], torch.Tensor, int]] = []
        # A forward that never reached backward (an error in between) must not leave its records to the next.
        self._handles = [model.register_forward_pre_hook(lambda *_: self._calls.clear())]
        self._handles += [m.register_forward_hook(self._record) for m in leaves]

    def _record(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        # Every call under autograd, training mode or not: the per-example gradients are then those of the
        # function autograd differentiates (Opacus' hooks instead fail on a call made in eval mode).
        if not torch.is_grad_enabled():
            return
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"{type(module).__name__} returned {type(output).__name__}; a tensor was expected")
        # the version counters catch a later in-place change of the output (autograd would then return the
        # gradient of the changed value, not of this layer's output) or of an input (the samplers read them)
        activations = [t.detach() for t in inputs if isinstance(t, torch.Tensor)]
        self._calls.append((module, activations, [t._version for t in activations], output, output._version))

    def backward(self, loss_sum: torch.Tensor, batch_size: int) -> None:
        """Each example's own gradient into ``p.grad_sample``; ``loss_sum`` is the sum of the ``batch_size``
        examples' losses of the last forward pass (``p.grad`` is left untouched)."""
        calls, self._calls = self._calls, []
        if not calls:
            raise RuntimeError("no forward pass under autograd was recorded since the last backward")
        for module, activations, versions, out, version in calls:
            if out._version != version or [t._version for t in activations] != versions:
                raise RuntimeError(f"an input or the output of {type(module).__name__} was changed in place after "
                                   f"it was recorded")
        grads = torch.autograd.grad(loss_sum, [out for *_, out, _ in calls], allow_unused=True)
        per_example: dict[int, torch.Tensor | OuterProductRows] = {}
        for (module, activations, _, out, _), grad in zip(calls, grads):
            backprops = torch.zeros_like(out) if grad is None else grad
            for p, sample in _sampler(module)(module, activations, backprops).items():
                expected = (batch_size, *p.shape)
                if tuple(sample.shape) != expected:
                    raise RuntimeError(f"{type(module).__name__}: per-example gradient of shape "
                                       f"{tuple(sample.shape)}, expected {expected}")
                key = id(p)
                if key in per_example:  # a second call: a sum of outer products is no longer one
                    per_example[key] = _dense(per_example[key]) + _dense(sample)
                else:
                    per_example[key] = sample
        assigned: set[int] = set()
        for p in self.params:
            sample = per_example.get(id(p))
            p.grad_sample_factors = None
            if isinstance(sample, OuterProductRows):
                p.grad_sample, p.grad_sample_factors = sample.placeholder, sample
                continue
            if sample is None:  # a layer never called, or whose output does not reach the loss
                sample = torch.zeros((batch_size, *p.shape), dtype=p.dtype, device=p.device)
            if id(sample) in assigned:  # samplers may hand back the output gradient itself: one tensor per parameter
                sample = sample.clone()
            assigned.add(id(sample))
            p.grad_sample = sample

    def close(self) -> None:
        """Remove the hooks and the per-example gradients (always call it, also when training failed)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._calls = [], []
        for p in self.params:
            for name in ("grad_sample", "grad_sample_factors"):
                if hasattr(p, name):
                    delattr(p, name)

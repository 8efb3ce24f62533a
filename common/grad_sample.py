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

The result is exact under the same condition as Opacus' hooks: example i's loss depends on example
i's inputs alone (no batch statistics, no in-batch negatives). Because the loss is a sum, each
output gradient row is already its own example's, so no batch-size rescaling is involved.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn


def _linear_per_example(layer: nn.Linear, activations: list[torch.Tensor],
                        backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradients of ``nn.Linear`` (the formula of Opacus' sampler, as batched products: example
    i's weight gradient sums backprop_i[t] x input_i[t] over its positions t, its bias gradient backprop_i[t])."""
    x, g = activations[0], backprops
    out: dict[nn.Parameter, torch.Tensor] = {}
    if x.dim() == 2:  # one position per example: an outer product
        if layer.weight.requires_grad:
            out[layer.weight] = g[:, :, None] * x[:, None, :]
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
        self._calls: list[tuple[nn.Module, list[torch.Tensor], torch.Tensor, int]] = []
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
        # the version counter catches a later in-place change of the output (autograd would then return the
        # gradient of the changed value, not of this layer's output)
        self._calls.append((module, [t.detach() for t in inputs if isinstance(t, torch.Tensor)], output,
                            output._version))

    def backward(self, loss_sum: torch.Tensor, batch_size: int) -> None:
        """Each example's own gradient into ``p.grad_sample``; ``loss_sum`` is the sum of the ``batch_size``
        examples' losses of the last forward pass (``p.grad`` is left untouched)."""
        calls, self._calls = self._calls, []
        if not calls:
            raise RuntimeError("no forward pass under autograd was recorded since the last backward")
        for module, _, out, version in calls:
            if out._version != version:
                raise RuntimeError(f"the output of {type(module).__name__} was changed in place after it was recorded")
        grads = torch.autograd.grad(loss_sum, [out for _, _, out, _ in calls], allow_unused=True)
        per_example: dict[int, torch.Tensor] = {}
        for (module, activations, out, _), grad in zip(calls, grads):
            backprops = torch.zeros_like(out) if grad is None else grad
            for p, sample in _sampler(module)(module, activations, backprops).items():
                if sample.shape != (batch_size, *p.shape):
                    raise RuntimeError(f"{type(module).__name__}: per-example gradient of shape "
                                       f"{tuple(sample.shape)}, expected {(batch_size, *p.shape)}")
                key = id(p)
                per_example[key] = sample if key not in per_example else per_example[key] + sample
        assigned: set[int] = set()
        for p in self.params:
            sample = per_example.get(id(p))
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
            if hasattr(p, "grad_sample"):
                del p.grad_sample

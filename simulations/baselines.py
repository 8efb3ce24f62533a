"""Central baselines on the PROTOCOL split: popularity, zero-shot, LoRA fine-tune, DP LoRA fine-tune.

Each run writes one PROTOCOL result file per split (validation, test and the
cold-start test subset) and returns the records.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from common.dataset import Dataset
from common.encoder import LoraSettings, TextEncoder, load_tokenizer
from common.evaluation import eval_texts, evaluate_scores, user_scores
from common.examples import training_examples
from common.features import FeatureSet, compute_features
from common.io import write_json_atomic
from common.model import Recommender, refresh_items
from common.privacy import interaction_group_size, selection_rule, session_sensitivity
from common.reference_scores import popularity_scores
from common.results import NO_PRIVACY, result_record
from common.split import Split, cold_start_items, leave_one_out, without_items
from common.training import TrainConfig, train


@dataclass(frozen=True)
class Method:
    """A baseline: a train-count statistic, or the recommender zero-shot, trained, or trained with DP-SGD."""

    statistic: bool = False
    trained: bool = False
    dp: bool = False


METHODS: dict[str, Method] = {
    "popularity": Method(statistic=True),
    "zeroshot": Method(),
    "central": Method(trained=True),
    "central-dp": Method(trained=True, dp=True),
}


@dataclass
class BaselineConfig:
    """Every knob of the central baselines (recorded in each result file)."""

    history_len: int = 5
    max_length: int = 64
    item_max_length: int = 32
    examples_per_user: int = 20
    lora: LoraSettings = field(default_factory=LoraSettings)
    scale: float = 20.0
    item_bias: bool = True
    # The bias's share of DP-SGD's joint clip norm (README, "Model"). Without DP it only rescales
    # the bias's Adam step, so the non-private fine-tune keeps 1 (its recorded results).
    item_bias_scale: float = 1.0
    dp_item_bias_scale: float = 10.0
    id_residual: bool = False
    # Both chosen on validation NDCG@10 of seed 0 (README, "How the settings were chosen").
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1.0, learning_rate=3e-3))
    dp_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=2.0, batch_size=256, learning_rate=1e-3, item_learning_rate=3e-3,
        dp=True, target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0, accountant="rdp"))


class FeatureCache:
    """Frozen bottom-layer features, computed once per text set and shared across seeds."""

    def __init__(self, cfg: BaselineConfig, verbose: bool) -> None:
        self.cfg, self.verbose = cfg, verbose
        self.tokenizer = load_tokenizer()
        self.encoder = TextEncoder(cfg.lora)  # frozen bottom layers are identical for every seed
        self._store: dict[str, object] = {}

    def get(self, key: str, texts_fn, max_length: int) -> FeatureSet:
        if key not in self._store:
            texts = texts_fn()
            self._store[key] = compute_features(self.encoder, self.tokenizer, texts, max_length,
                                                label=f"features: {key}" if self.verbose else None)
        return self._store[key]


def cold_start_users(split: Split, held_out: np.ndarray, which: str = "test") -> np.ndarray:
    """The evaluation users whose ``which`` (test or validation) item is one of the held-out items."""
    held = np.zeros(split.data.num_items, dtype=bool)
    held[held_out] = True
    users = split.eval_users()
    targets = np.array([split.target_row(int(u), which) for u in users], dtype=np.int64)
    return users[held[split.data.item[targets]]]


class BaselineRunner:
    """Runs baselines on one dataset, reusing the split and cached features across runs."""

    def __init__(self, data: Dataset, cfg: BaselineConfig | None = None, verbose: bool = True) -> None:
        self.data, self.cfg, self.verbose = data, cfg or BaselineConfig(), verbose
        self.split = leave_one_out(data)
        self.held_out = cold_start_items(data.num_items)
        self.cold_split = without_items(self.split, self.held_out)
        self.cold_users = cold_start_users(self.split, self.held_out)
        self._features: FeatureCache | None = None

    @property
    def features(self) -> FeatureCache:
        if self._features is None:
            self._features = FeatureCache(self.cfg, self.verbose)
        return self._features

    def run(self, method: str, seed: int, out_dir: Path | None, cold_start: bool = True) -> list[dict]:
        """Evaluate ``method`` (training it if needed) and write its result files."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
        t0 = time.perf_counter()
        results: list[dict] = []
        main = self._fit_and_score(method, seed, self.split)
        for which in ("validation", "test"):
            metrics = evaluate_scores(main["scores"][which], self.split, which, self.split.eval_users())
            results.append(result_record(method, which, metrics, len(self.split.eval_users()), seed,
                                         main["privacy"], time.perf_counter() - t0, main["config"]))
        if cold_start:
            t1 = time.perf_counter()
            cold = self._fit_and_score(method, seed, self.cold_split, users=self.cold_users, splits=("test",))
            metrics = evaluate_scores(cold["scores"]["test"], self.split, "test", self.cold_users)
            metrics = {k: metrics[k] for k in ("HR@10", "NDCG@10")}
            cfg = dict(cold["config"], cold_start_items=len(self.held_out), cold_start_seed=0)
            results.append(result_record(method, "test-cold-start", metrics, len(self.cold_users), seed,
                                         cold["privacy"], time.perf_counter() - t1, cfg))
        if out_dir is not None:
            for r in results:
                write_json_atomic(Path(out_dir) / f"{method}-seed{seed}-{r['split']}.json", r)
        return results

    def _fit_and_score(self, method: str, seed: int, train_split: Split,
                       users: np.ndarray | None = None, splits: tuple[str, ...] = ("validation", "test")) -> dict:
        users = self.split.eval_users() if users is None else users
        cfg = self.cfg
        spec = METHODS[method]
        if spec.statistic:
            return {"scores": {w: popularity_scores(train_split, users) for w in splits},
                    "privacy": NO_PRIVACY, "config": {"statistic": "train interaction count"}}
        torch.manual_seed(seed)
        dp, trained = spec.dp, spec.trained
        encoder = TextEncoder(cfg.lora)
        model = Recommender(encoder, self.data.num_items, scale=cfg.scale,
                            item_bias=cfg.item_bias and trained, id_residual=cfg.id_residual and trained,
                            bias_scale=cfg.dp_item_bias_scale if dp else cfg.item_bias_scale)
        model.head.known[:] = torch.as_tensor(train_split.train_item_counts() > 0)
        tag = "cold" if train_split is self.cold_split else "main"
        item_feats = self.features.get("items", self.data.item_texts, cfg.item_max_length)
        privacy = NO_PRIVACY
        train_info: dict = {}
        if trained:
            ex_key = f"train-{tag}"
            examples = training_examples(train_split, cfg.history_len, cfg.examples_per_user)
            feats = self.features.get(ex_key, lambda: examples.texts, cfg.max_length)
            tcfg = replace(cfg.dp_train if dp else cfg.train, seed=seed)
            if dp:  # each user's most recent examples_per_user: a removal can let an older one in
                tcfg = replace(tcfg, sensitivity=session_sensitivity(cfg.examples_per_user, "add-remove"))
            label = f"{method} seed {seed} ({tag})" if self.verbose else None
            report = train(model, feats, examples.targets, item_feats, tcfg, label=label)
            train_info = {"train_examples": len(examples.targets), "train_steps": report.steps,
                          "train_seconds": round(report.seconds, 2),
                          "examples_per_second": round(report.examples_per_second, 1),
                          "final_loss": float(np.mean(report.losses[-20:])),
                          "truncated_train_texts": feats.truncated}
            if dp:
                group = interaction_group_size(cfg.history_len, cfg.examples_per_user)
                privacy = {"unit": "example", "epsilon": round(report.epsilon, 4), "delta": tcfg.delta,
                           "accountant": tcfg.accountant, "adjacency": "add-remove",
                           "selection": selection_rule(cfg.examples_per_user, padded=False),
                           "sensitivity": tcfg.sensitivity,
                           "trust": "the curator who trains centrally holds every example",
                           "noise_multiplier": report.noise_multiplier, "sample_rate": report.sample_rate,
                           "steps": report.steps, "max_grad_norm": tcfg.max_grad_norm,
                           "denominator": report.expected_batch_size,
                           "note": (f"example-level only: one rating is the target of one example and appears in "
                                    f"the histories of up to {cfg.history_len} more, so interaction-level DP "
                                    f"follows only by group privacy with group size {group}; the training set's "
                                    f"size is treated as public")}
        else:
            refresh_items(model, item_feats)
        scores = {}
        for which in splits:
            key = f"eval-{which}-{tag}-{len(users)}"
            feats = self.features.get(key, lambda w=which: eval_texts(self.split, w, cfg.history_len, users),
                                      cfg.max_length)
            scores[which] = user_scores(model, feats)
        config = {"history_len": cfg.history_len, "max_length": cfg.max_length,
                  "item_max_length": cfg.item_max_length, "lora": asdict(cfg.lora), "scale": cfg.scale,
                  "item_bias": model.head.bias is not None,
                  "item_bias_scale": model.head.bias.scale if model.head.bias is not None else None,
                  "id_residual": model.head.residual is not None}
        if trained:
            config.update(examples_per_user=cfg.examples_per_user, train=asdict(tcfg), **train_info)
        return {"scores": scores, "privacy": privacy, "config": config}

"""Server-side evaluation of the global state on the full PROTOCOL split (validation and test).

In simulation the server holds the public benchmark split for measurement only;
it never sends it to clients and clients never send it anything but tensors.
"""

from __future__ import annotations

import numpy as np

from common.evaluation import eval_texts, evaluate_scores, user_scores
from common.model_state import ModelRuntime
from common.split import Split


class ServerEvaluator:
    """Full-ranking PROTOCOL metrics for every user with targets, features cached once."""

    def __init__(self, runtime: ModelRuntime, split: Split) -> None:
        self.runtime, self.split = runtime, split
        self.users = split.eval_users()
        hl = runtime.settings.history_len
        self._features = {w: runtime.features(eval_texts(split, w, hl, self.users)) for w in ("validation", "test")}

    def evaluate(self, names: list[str], arrays: list[np.ndarray]) -> dict[str, dict[str, float]]:
        """Metrics per split for the given global state."""
        self.runtime.load_state(names, arrays)
        return {w: evaluate_scores(user_scores(self.runtime.model, f), self.split, w, self.users)
                for w, f in self._features.items()}

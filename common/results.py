"""PROTOCOL.md section 5 result files: one JSON object per result, with exactly the protocol's fields."""

from __future__ import annotations

from typing import Any

PROTOCOL = "ml-100k-loo-full-v1"
NO_PRIVACY = {"unit": "none"}


def result_record(method: str, split: str, metrics: dict[str, float], users: int, seed: int,
                  privacy: dict[str, Any], wall_seconds: float, config: dict[str, Any]) -> dict[str, Any]:
    """One result object with exactly the protocol's fields."""
    return {"method": method, "split": split, "protocol": PROTOCOL, "metrics": metrics,
            "users": int(users), "seed": int(seed), "privacy": privacy,
            "wall_seconds": round(float(wall_seconds), 3), "config": config}

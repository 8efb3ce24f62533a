"""Everything a device may send, field by field, and why each is safe to send.

This is the one list: the ClientApp builds replies from it, the server rejects a reply
with any other field, ``privrec audit`` checks a run's wire log against it, a test
inspects real replies against it, and the README's privacy statement prints it.

A field is safe when it is public (a function of public data and the mechanism's public
parameters only: the run config, the device's policy, and which rounds the device took
part in, which the server knows anyway) or released through a DP mechanism that the
device's ledger counts before the reply leaves.
"""

from __future__ import annotations

TRAIN_ARRAYS = ("arrays: the user model's exchanged tensors after one DP-SGD session (the sequence model's "
                "layers, text bias and item-bias parameter; the text model's LoRA adapters and item-bias "
                "parameter): "
                "DP-protected (Opacus per-example clipping, Gaussian noise from a secure stream, snapped to a "
                "grid, Poisson batches from a second secure stream, averaged over the public expected batch "
                "size; recorded in the ledger before the reply is built)")

# metric name -> why it is safe
TRAIN_METRICS: dict[str, str] = {
    "refused": "0 or 1: whether the device declined the round (depends on the run config, the device policy "
               "and its budget history, all public to the server)",
    "epsilon": "the device's composed epsilon after this session: a function of the public mechanism "
               "parameters of every release in its ledger (which also tells the server how much the device "
               "spent in other runs: its participation, not its data)",
    "delta": "the delta of that epsilon (the device policy's)",
    "noise-multiplier": "public mechanism parameter (run config, checked against the device policy)",
    "max-grad-norm": "public mechanism parameter (run config, checked against the device policy)",
    "sample-rate": "public Poisson rate: min(1, batch-size / examples-per-user), never from the device's data",
    "steps": "public step count: ceil(local-epochs / sample-rate), or fewer when the budget truncates the "
             "session (a function of the device's budget history, as for epsilon)",
    "expected-batch-size": "public denominator of the averaged noisy gradient (never the device's example count)",
    "adjacency-replace-one": "0 or 1: the device policy's adjacency (1: accounted as replace-one)",
}

EVALUATE_METRICS: dict[str, str] = {
    "refused": TRAIN_METRICS["refused"],
    "HR@10": "DP release: the device's hit (0 or 1) on its held-out item plus Gaussian noise of std "
             "eval-noise-multiplier x sqrt(2), snapped to a grid; recorded in the ledger first",
    "NDCG@10": "DP release, the same Gaussian mechanism as HR@10 (the pair has L2 sensitivity sqrt(2))",
    "eval-noise-multiplier": "public mechanism parameter (run config, checked against the device policy)",
    "epsilon": TRAIN_METRICS["epsilon"],
    "delta": TRAIN_METRICS["delta"],
}

STATUS_FIELDS: dict[str, str] = {
    "refused": "true on a refusal",
    "reason": "one of the fixed refusal codes below, never a message built from local data",
}

REFUSAL_REASONS: dict[str, str] = {
    "privacy-policy": "the run config asks for less privacy than the device's policy allows",
    "privacy-budget": "the session would take the device over its epsilon budget",
    "ledger-unavailable": "the device's ledger is missing, unreadable or locked; it refuses rather than "
                          "train without it",
    "client-error": "anything else failed on the device (details only in the device's own log)",
}

RECORD_NAMES = {"arrays", "metrics", "status"}
EVALUATE_RECORD_NAMES = {"metrics", "status"}  # an evaluation reply carries no tensors

# A secure-aggregation round (Flower SecAgg+): what a reply may carry in each stage, record by record
# (record name -> the allowed keys; array records must arrive empty: secaggplus_mod clears them).
SECURE_STAGE_FIELDS: dict[str, dict[str, set[str]]] = {
    "setup": {"secaggplus_configs": {"pk1", "pk2"}},
    "share_keys": {"secaggplus_configs": {"dsts", "ctxts"}},
    "collect_masked_vectors": {"secaggplus_configs": {"masked_params"}, "fitres.parameters": set(),
                               "fitres.num_examples": {"num_examples"},
                               "fitres.metrics": {"refused", "user-epsilon", "epsilon"},
                               "fitres.status": {"code", "message"}},
    "unmask": {"secaggplus_configs": {"nids", "shares"}},
}
SECURE_FIELDS: dict[str, str] = {
    "setup: secaggplus_configs.pk1, pk2": "two fresh public keys (SecAgg+ key agreement)",
    "share_keys: secaggplus_configs.dsts, ctxts": "the device's Shamir shares of its mask seed and secret key, "
                                                 "each encrypted for one neighbour (the server cannot read them)",
    "collect_masked_vectors: secaggplus_configs.masked_params": (
        "the device's share (its whole session update clipped to user-clip, stochastically rounded, plus its "
        "1/min-survivors part of the Skellam noise; recorded in the ledger first) plus SecAgg+ masks: uniform "
        "modulo M to the server until the round's sum is unmasked"),
    "collect_masked_vectors: fitres.num_examples": "always 1 (every device weighs the same)",
    "collect_masked_vectors: fitres.metrics.refused, user-epsilon, epsilon": (
        "0, and the device's composed user-level (and, with local DP, example-level) epsilon: functions of the "
        "public mechanism parameters of every release in its ledger (they tell the server how often the device "
        "took part, also in other runs and in aborted rounds: its participation, not its data)"),
    "collect_masked_vectors: fitres.status.code, message": "OK and an empty message",
    "unmask: secaggplus_configs.nids, shares": ("Shamir shares of the mask seeds of devices whose share arrived, "
                                                "and of the secret keys of those that dropped out"),
    "any stage: error reason": ("a refusal: one of the fixed refusal codes (the device drops out); otherwise "
                                "Flower's own protocol error message, which holds no local data"),
}


# What the server observes about every reply besides its fields (client.reply_pacing).
OBSERVED = {
    "when it arrives, and its metadata's creation time": (
        "a deployed device holds every reply until a whole multiple of its own `privacy-reply-time-quantum` "
        "(default 1 s) after it took the request, then stamps it: one quantum whenever its work fits in one, "
        "whatever it holds"),
    "the ClientApp's run time (the SuperNode reports it to the SuperLink)": (
        "measured by the SuperNode from the ClientApp's pull of the request to its push of the reply, so it holds the "
        "hold: the app's start-up, which reads no data, plus whole quanta"),
}


def allowed_metrics(message_type: str) -> dict[str, str]:
    """The metric fields a reply to a ``train`` or ``evaluate`` message may carry."""
    return TRAIN_METRICS if message_type == "train" else EVALUATE_METRICS


def markdown_table() -> str:
    """The README's list of released fields (a test keeps the README in step with it)."""
    rows = ["| reply | field | why it is safe to send |", "|---|---|---|",
            f"| train | `arrays` | {TRAIN_ARRAYS.split(': ', 1)[1]} |"]
    rows += [f"| train | `metrics.{k}` | {v} |" for k, v in TRAIN_METRICS.items()]
    rows += [f"| evaluate | `metrics.{k}` | {v} |" for k, v in EVALUATE_METRICS.items()]
    rows += [f"| refusal | `status.{k}` | {v} |" for k, v in STATUS_FIELDS.items()]
    rows += [f"| refusal | reason `{k}` | {v} |" for k, v in REFUSAL_REASONS.items()]
    rows += [f"| secure round | {k} | {v} |" for k, v in SECURE_FIELDS.items()]
    rows += [f"| any | {k} | {v} |" for k, v in OBSERVED.items()]
    return "\n".join(rows)

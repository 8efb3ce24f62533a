"""What a device checks in a SecAgg+ round before it trains and before it helps unmask.

Flower's ``secaggplus_mod`` takes the round's parameters from the server's setup message and trains
before it decrypts the key shares other devices sent. A server (or one hostile device) could then:

- set another ``max_weight``, range or modulus for all devices but one, so that the unmasked "mean"
  is that one device's share with only its own part of the noise;
- set a reconstruction threshold of half a neighbourhood or less, so that two disjoint halves told
  different dropout lists hand over both secrets of one device;
- forward garbage key shares, so that every device trains and spends its budget in a round that can
  never be unmasked.

So before training a device checks every setup parameter against the run config and the state it
received (the plan of :mod:`common.skellam`), and decrypts and verifies every forwarded key share;
before unmasking it checks the dropout lists. Any failure is a refusal (``privacy-policy``) before
anything is trained, spent or sent.

These checks stop a hostile device and a server that only tampers with parameters. They do not make
SecAgg+ secure against a malicious server: one that relays its own public keys in place of a device's
neighbours', or tells different devices different dropout lists while forwarding a target only a
threshold's worth of key shares, can still unmask one device's share (Flower 1.42 has neither
authenticated keys nor the consistency round of the malicious-model protocol). Against such a server
the guarantee is the share-only epsilon.
"""

from __future__ import annotations

from typing import Any

from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE, Key
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate

from common.secagg_params import neighbourhood, reconstruction_threshold
from common.skellam import secure_plan


class SecureCheckError(ValueError):
    """The round is not the one the run config describes: the device takes no part."""


def stored_state(context) -> SecAggPlusState:
    """The SecAgg+ state ``secaggplus_mod`` keeps in the node's context."""
    if RECORD_KEY_STATE not in context.state.config_records:
        raise SecureCheckError("no SecAgg+ state: the setup and key-sharing stages did not run on this device")
    return SecAggPlusState(**context.state.config_records[RECORD_KEY_STATE])


def check_before_training(state: SecAggPlusState, configs, dim: int, cfg: dict[str, Any]) -> None:
    """The setup parameters are the run's (for a state of ``dim`` values) and every forwarded key share
    decrypts, comes from its claimed sender and is meant for this device."""
    plan = secure_plan(cfg, dim)
    n = int(state.sample_num)
    if not plan.min_survivors <= n <= cfg["clients-per-round"]:
        raise SecureCheckError(f"round of {n} devices, outside [min-survivors, clients-per-round]")
    share_num = neighbourhood(n, cfg["secagg-neighbours"])
    want = {"max_weight": 1.0, "clipping_range": plan.clipping_range, "target_range": plan.levels,
            "mod_range": plan.modulus, "share_num": share_num,
            "threshold": reconstruction_threshold(share_num, cfg["secagg-threshold"], n)}
    wrong = {k: getattr(state, k) for k, v in want.items() if getattr(state, k) != v}
    if wrong:
        raise SecureCheckError(f"setup parameters {wrong} differ from the run's {want}")
    if 2 * state.threshold <= state.share_num:
        raise SecureCheckError("reconstruction threshold is not a strict majority of the neighbourhood")
    sources = list(configs.get(Key.SOURCE_LIST, []))
    ciphertexts = list(configs.get(Key.CIPHERTEXT_LIST, []))
    if len(sources) != len(ciphertexts) or len(set(sources)) != len(sources):
        raise SecureCheckError("malformed forwarded key shares")
    if len(ciphertexts) + 1 < state.threshold:
        raise SecureCheckError("fewer key shares than the reconstruction threshold")
    for src, ciphertext in zip(sources, ciphertexts):
        key = state.ss2_dict.get(int(src))
        if key is None:
            raise SecureCheckError(f"a key share from {src}, which shared no key with this device")
        try:
            actual_src, dst, _, _ = share_keys_plaintext_separate(decrypt(key, ciphertext))
        except Exception as exc:  # noqa: BLE001 - any undecryptable share disqualifies the round
            raise SecureCheckError(f"a key share from {src} does not decrypt ({type(exc).__name__})") from None
        if int(actual_src) != int(src) or int(dst) != int(state.nid):
            raise SecureCheckError(f"a key share claims {src} -> {state.nid} but holds {actual_src} -> {dst}")


def check_before_unmask(state: SecAggPlusState, configs, cfg: dict[str, Any]) -> None:
    """The dropout lists are consistent: disjoint, this device active, only devices it exchanged keys
    with; with every device a neighbour, at least ``min-survivors`` active."""
    active = [int(x) for x in configs.get(Key.ACTIVE_NODE_ID_LIST, [])]
    dead = [int(x) for x in configs.get(Key.DEAD_NODE_ID_LIST, [])]
    if set(active) & set(dead) or len(set(active)) != len(active) or len(set(dead)) != len(dead):
        raise SecureCheckError("a device listed twice, or both active and dropped")
    if int(state.nid) not in active:
        raise SecureCheckError("this device, whose share was sent, is not listed as active")
    known = {int(k) for k in state.public_keys_dict}
    if not set(active) | set(dead) <= known:
        raise SecureCheckError("the lists name devices this device never exchanged keys with")
    if state.share_num >= state.sample_num and len(active) < cfg["min-survivors"]:  # every device a neighbour
        raise SecureCheckError(f"{len(active)} shares in the sum < min-survivors {cfg['min-survivors']}")

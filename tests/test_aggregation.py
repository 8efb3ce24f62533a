"""Robust aggregation and the update bound derived from the public mechanism: one hostile update
among honest ones, Flower's own rules, and the configurations central DP refuses."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum
from flwr.supercore.task_identity import TaskIdentity

from common.run_config import ConfigError, resolve
from server.aggregation import make_server_step, server_learning_rate, server_step
from server.aggregators import AGGREGATORS, aggregate
from server.federation import Federation
from server.validation import update_norm_bound
from simulations.inprocess_grid import InProcessGrid, state_of

N_HONEST, DIM = 19, 40


def _honest() -> list[list[np.ndarray]]:
    """19 honest states: coordinate j of client i is spread evenly in [-1, 1] (no randomness)."""
    spread = np.linspace(-1.0, 1.0, N_HONEST)
    return [[np.full(DIM, spread[(i * 7 + j) % N_HONEST], dtype=np.float32) for j in range(1)] for i in
            range(N_HONEST)]


def _with_attacker(value: float) -> list[list[np.ndarray]]:
    states = _honest()
    hostile = np.zeros(DIM, dtype=np.float32)
    hostile[0] = value  # everything on one coordinate
    return [*states, [hostile]]


def _cfg(aggregator: str, **more) -> dict:
    return resolve({"aggregator": aggregator, **more})


@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean", "bulyan"])
def test_one_hostile_update_moves_a_robust_aggregate_within_the_honest_range(aggregator):
    clean = aggregate(_honest(), _cfg(aggregator))[0][0]
    for value in (10.0, 1e6):
        attacked = aggregate(_with_attacker(value), _cfg(aggregator))[0][0]
        assert -1.0 <= attacked <= 1.0  # never outside what honest clients sent, however large the value
        assert abs(attacked - clean) <= 2.0 / (N_HONEST - 1) + 1e-6  # about one order statistic


def test_the_mean_follows_a_hostile_update_without_bound():
    clean = aggregate(_honest(), _cfg("mean"))[0][0]
    assert aggregate(_with_attacker(1e6), _cfg("mean"))[0][0] - clean > 1e4


def test_krum_prefers_an_update_close_to_everyone():
    """Under DP noise an update near the centre (here: all zeros, bar one coordinate) beats every honest
    one: Krum picks it. Why Krum is not a default under local DP."""
    rng = np.random.default_rng(0)
    honest = [[rng.normal(0.0, 1.0, 400).astype(np.float32)] for _ in range(N_HONEST)]
    bump = np.zeros(400, dtype=np.float32)
    bump[0] = 5.0
    chosen = aggregate([*honest, [bump]], _cfg("krum"))[0]
    assert np.array_equal(chosen, bump)


def _messages(states: list[list[np.ndarray]]) -> list[Message]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    out = []
    for s in states:
        content = RecordDict({"arrays": ArrayRecord({str(k): Array(a) for k, a in enumerate(s)}),
                              "metrics": MetricRecord({"num-examples": 1})})
        out.append(Message(content=content, dst_node_id=1, message_type="train"))
    return out


@pytest.mark.parametrize("aggregator,flower", [
    ("median", FedMedian()), ("trimmed-mean", FedTrimmedAvg(beta=0.1)),
    ("krum", Krum(num_malicious_nodes=1)), ("multikrum", MultiKrum(num_malicious_nodes=1, num_nodes_to_select=19)),
    ("bulyan", Bulyan(num_malicious_nodes=1)),
])
def test_each_rule_is_flowers_own(aggregator, flower):
    rng = np.random.default_rng(1)
    states = [[rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=5).astype(np.float32)] for _ in range(20)]
    ours = aggregate(states, _cfg(aggregator, **{"trim-fraction": 0.1, "byzantine-clients": 1}))
    theirs, _ = flower.aggregate_train(1, _messages(states))
    for k, a in enumerate(ours):
        np.testing.assert_allclose(a, theirs[str(k)].numpy(), rtol=1e-5, atol=1e-6)


def test_central_dp_refuses_a_robust_aggregator():
    assert resolve({})["aggregator"] == "trimmed-mean" and resolve({"central-dp": True})["aggregator"] == "mean"
    for name in AGGREGATORS:
        if name == "mean":
            resolve({"central-dp": True, "aggregator": name})
        else:
            with pytest.raises(ConfigError, match="aggregator.*central-dp"):
                resolve({"central-dp": True, "aggregator": name})


def test_the_default_update_bound_follows_from_the_public_mechanism(small_run_config):
    """Honest updates at the derived bound are all accepted; the bound sits just above their noise
    (the old fixed 50 was 24 times an honest default update) and a scaled-up honest update fails."""
    cfg = dict(small_run_config, **{"num-server-rounds": 1, "clients-per-round": 6, "evaluate-clients": 0})
    del cfg["max-update-norm"]  # the derived default
    grid = InProcessGrid(6, cfg)
    fed = Federation(grid, cfg)
    start = dict(zip(fed.names, [a.copy() for a in fed.arrays]))
    fed.run()
    resolved = resolve(cfg)
    dimension = sum(a.size for a in start.values())
    bound = update_norm_bound(resolved, dimension)
    norms = []
    for reply in grid.replies:
        state = state_of(reply.content)
        norms.append(math.sqrt(sum(float(np.sum((state[k].astype(np.float64) - start[k]) ** 2)) for k in start)))
    rows = [r for r in fed.folder.read_rounds()]
    # An honest norm exceeds the bound only if ||z|| >= sqrt(d) + 6.44; the chi distribution's std is
    # below 1/sqrt(2), so that is 9 of its standard deviations: about 1e-19 per reply (the bound's
    # stated 1e-9 is the looser concentration inequality).
    assert rows[0]["trained"] and not rows[0]["rejected"]
    # expected noise norm: lr / B * sigma * C * sqrt(steps) * sqrt(d); the bound adds the clipped sum and t
    noise = 1.0 / 2 * resolved["noise-multiplier"] * math.sqrt(2) * math.sqrt(dimension)
    assert max(norms) <= bound < 1.2 * noise
    assert update_norm_bound(dict(resolved, **{"max-update-norm": 7.0}), dimension) == 7.0
    assert update_norm_bound(dict(resolved, **{"local-dp": False}), dimension) == 50.0


def test_an_examples_item_bias_gradient_sums_to_zero_and_the_server_removes_any_common_mode(tiny_grouplens):
    """Why the server may project bias updates onto the zero-sum subspace: the softmax is unchanged by a
    common shift of the logits, so an honest example's bias gradient sums to zero over the items; a
    hostile update that lowers every other item is left with its zero-sum part only."""
    import torch

    from common.model_state import ModelRuntime, ModelSettings, get_state
    from common.partition import client_data, split_for
    from server.aggregators import without_common_mode

    cfg = resolve({"dataset": str(tiny_grouplens), "history-len": 3, "max-length": 32})
    split = split_for(cfg["dataset"])
    runtime = ModelRuntime(split.data, ModelSettings.from_run_config(cfg))
    runtime.load_state(*get_state(runtime.model))
    data = client_data(split, 0, 3, 4)
    feats, mask = runtime.features(data.train_texts).batch(torch.arange(len(data.train_texts)))
    model = runtime.model
    for i in range(len(data.train_texts)):
        model.zero_grad()
        logits = model(feats[i:i + 1], mask[i:i + 1])
        torch.nn.functional.cross_entropy(logits, torch.as_tensor(data.train_targets[i:i + 1])).backward()
        grad = model.head.bias.bias.grad
        assert abs(float(grad.sum())) < 1e-5 * float(grad.abs().sum())
    names, current = get_state(model)
    hostile = [a.copy() for a in current]
    k = names.index("item_bias")
    hostile[k] = hostile[k] - 0.5
    hostile[k][3] += 2.0
    projected = without_common_mode([hostile], names, current)[0]
    update = projected[k] - current[k]
    assert abs(float(update.sum())) < 1e-4
    # the uniform -0.5 is gone; what is left is the target's +2 made zero-sum
    assert np.allclose(np.delete(update, 3), -2.0 / len(update), atol=1e-5)
    assert update[3] == pytest.approx(2.0 - 2.0 / len(update), abs=1e-5)
    assert all(np.array_equal(a, b) for j, (a, b) in enumerate(zip(projected, hostile)) if j != k)


def test_the_server_learning_rate_falls_linearly_towards_its_final_share():
    assert server_learning_rate(0.01, 0.0, 1, 5) == 0.01
    assert server_learning_rate(0.01, 0.2, 3, 5) == pytest.approx(0.01 * (1 - 0.8 * 2 / 5))
    # the final share is reached one round after the last: the last round's (spent) update still counts
    assert server_learning_rate(0.01, 0.0, 5, 5) == pytest.approx(0.002)
    assert server_learning_rate(0.01, 0.0, 1, 1) == 0.01  # a one-round run keeps its rate
    assert {server_learning_rate(0.01, 1.0, r, 7) for r in range(1, 8)} == {0.01}


def test_a_falling_server_rate_needs_fedadam_and_a_fixed_number_of_rounds(small_run_config):
    with pytest.raises(ConfigError, match="server-lr-final-factor"):
        resolve({"strategy": "fedavg", "server-lr-final-factor": 0.5})
    cfg = dict(small_run_config, **{"num-server-rounds": 1, "server-lr-final-factor": 0.5})
    Federation(InProcessGrid(6, cfg), cfg).run()
    longer = dict(cfg, **{"num-server-rounds": 2, "resume": True})
    with pytest.raises(ConfigError, match="num-server-rounds cannot change"):
        Federation(InProcessGrid(6, longer), longer)


def test_fedadam_moves_the_state_by_the_given_learning_rate():
    names, current, mean = ["w"], [np.zeros(3, dtype=np.float32)], [np.array([1.0, -2.0, 0.5], dtype=np.float32)]
    moves = [server_step(make_server_step("fedadam", 0.01), 1, names, current, mean, lr)[0] for lr in (0.01, 0.02)]
    assert np.abs(moves[0]).min() > 0
    np.testing.assert_allclose(moves[1], 2 * moves[0], rtol=1e-6)
    assert np.array_equal(server_step(make_server_step("fedadam", 0.01), 1, names, current, mean, 0.0)[0], current[0])


def test_a_run_steps_fedadam_at_each_rounds_scheduled_rate(small_run_config, monkeypatch):
    import server.federation as federation

    used = []

    def recording(step, rnd, names, current, mean, learning_rate=None):
        used.append((rnd, learning_rate))
        return server_step(step, rnd, names, current, mean, learning_rate)

    monkeypatch.setattr(federation, "server_step", recording)
    cfg = dict(small_run_config, **{"num-server-rounds": 3, "server-learning-rate": 0.04,
                                    "server-lr-final-factor": 0.5})
    Federation(InProcessGrid(6, cfg), cfg).run()
    assert [r for r, _ in used] == [1, 2, 3]
    assert [lr for _, lr in used] == pytest.approx([0.04, 0.04 * (1 - 0.5 / 3), 0.04 * (1 - 0.5 * 2 / 3)])

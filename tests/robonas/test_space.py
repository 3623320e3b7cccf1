"""PolicyArch and SearchSpace: serialisation, encoding, mutation, exact costs, config errors."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from robonas.errors import ConfigError
from robonas.space import ACTIVATIONS, Layer, PolicyArch, SearchSpace

SPACE = SearchSpace(
    obs_dim=11,
    act_dim=3,
    depths=(1, 2, 3),
    widths=(16, 32, 64),
    activations=ACTIVATIONS,
    history=(1, 2, 4),
)


def _samples(n: int = 300, seed: int = 0) -> list[PolicyArch]:
    rng = np.random.default_rng(seed)
    return [SPACE.sample(rng) for _ in range(n)]


# --- PolicyArch -------------------------------------------------------------------------------
def test_json_round_trip_and_stable_id():
    for arch in _samples():
        back = PolicyArch.from_json(arch.to_json())
        assert back == arch and hash(back) == hash(arch)
        assert back.arch_id == arch.arch_id and len(arch.arch_id) == 12
        int(arch.arch_id, 16)
        assert PolicyArch.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
    a = PolicyArch(4, 2, (Layer(8, "relu"),))
    b = PolicyArch(4, 2, (Layer(8, "tanh"),))
    assert a.arch_id != b.arch_id


def test_describe_and_input_dim():
    arch = PolicyArch(5, 2, (Layer(64, "relu"), Layer(64, "relu")), layer_norm=True, residual=True, history=2)
    assert arch.describe() == "64relu-64relu ln res sep h2"
    assert arch.input_dim == 10
    assert PolicyArch(5, 2, (Layer(16, "tanh"),), shared_trunk=True).describe() == "16tanh shared"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"obs_dim": 0}, "arch.obs_dim"),
        ({"act_dim": -1}, "arch.act_dim"),
        ({"history": 0}, "arch.history"),
        ({"layers": ()}, "arch.layers"),
        ({"layer_norm": "yes"}, "arch.layer_norm"),
    ],
)
def test_arch_validation_names_field(kwargs, field):
    base = {"obs_dim": 4, "act_dim": 2, "layers": (Layer(8, "relu"),)}
    with pytest.raises(ConfigError, match=field):
        PolicyArch(**{**base, **kwargs})


def test_layer_validation():
    with pytest.raises(ConfigError, match="width"):
        Layer(0, "relu")
    with pytest.raises(ConfigError, match="width"):
        Layer(True, "relu")
    with pytest.raises(ConfigError, match=r"gelu.*relu, tanh, elu, silu"):
        Layer(8, "gelu")


# --- costs against torch --------------------------------------------------------------------
COST_ARCHS = [
    PolicyArch(7, 2, (Layer(16, act), Layer(16, act), Layer(8, act)), layer_norm=ln, residual=res, history=h)
    for act, ln, res, h in itertools.product(ACTIVATIONS, (False, True), (False, True), (1, 3))
]


@pytest.mark.parametrize("arch", COST_ARCHS, ids=lambda a: a.describe())
def test_costs_match_torch(arch):
    actor = arch.build_actor()
    costs = arch.actor_layer_costs()
    summary = arch.cost_summary()
    assert summary["params"] == sum(p.numel() for p in actor.parameters())
    assert summary["layers"] == len(costs)

    x = torch.zeros(1, arch.input_dim)
    with FlopCounterMode(display=False) as counter:
        out = actor(x)
    assert out.shape == (1, arch.act_dim)
    linear = [c for c in costs if c.kind == "linear"]
    assert counter.get_total_flops() == 2 * sum(c.macs for c in linear)
    # layer by layer: each Linear's weight+bias and MACs, each LayerNorm's affine params
    torch_linears = [m for m in actor.modules() if isinstance(m, torch.nn.Linear)]
    assert [c.params for c in linear] == [sum(p.numel() for p in m.parameters()) for m in torch_linears]
    assert [c.macs for c in linear] == [m.in_features * m.out_features for m in torch_linears]
    norms = [m for m in actor.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert [c.params for c in costs if c.kind == "layernorm"] == [
        sum(p.numel() for p in m.parameters()) for m in norms
    ]
    # a skip-add per block that really adds its input (the 16->16 block only)
    skips = [c for c in costs if c.kind == "add"]
    assert len(skips) == sum(1 for b in actor.trunk.blocks if b.residual)
    assert len(skips) == (1 if arch.residual else 0)
    assert all(c.macs == 0 for c in costs if c.kind != "linear")
    assert [c.name for c in costs][-1] == "head"
    assert costs[0].act_in == arch.input_dim and costs[-1].act_out == arch.act_dim


def test_bytes_counts_params_and_activations():
    arch = PolicyArch(3, 1, (Layer(4, "relu"),))
    # fc0: 3*4+4 params, 3 in, 4 out; act0: 4 in, 4 out; head: 4+1 params, 4 in, 1 out
    assert arch.cost_summary() == {
        "params": 16 + 5,
        "macs": 12 + 4,
        "bytes": 4 * (16 + 7 + 8 + 5 + 5),
        "layers": 3,
    }


def test_space_module_does_not_import_torch():
    code = "import sys, robonas.space; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=".", check=False).returncode == 0


# --- SearchSpace ----------------------------------------------------------------------------
def test_encode_decode_round_trip():
    cards = SPACE.cardinalities()
    assert len(cards) == 1 + 2 * 3 + 4
    for arch in _samples():
        assert SPACE.contains(arch)
        vec = SPACE.encode(arch)
        assert all(0 <= v < n for v, n in zip(vec, cards, strict=True))
        assert SPACE.decode(vec) == arch
        depth = len(arch.layers)
        inactive = set(range(len(cards))) - set(SPACE.active_decisions(depth))
        assert all(vec[i] == 0 for i in inactive)


def test_decode_ignores_inactive_slots_and_rejects_bad_vectors():
    rng = np.random.default_rng(1)
    for _ in range(100):
        vec = [int(rng.integers(n)) for n in SPACE.cardinalities()]
        arch = SPACE.decode(vec)
        canon = SPACE.encode(arch)
        assert all(canon[i] == vec[i] for i in SPACE.active_decisions(len(arch.layers)))
    with pytest.raises(ConfigError, match="length"):
        SPACE.decode([0, 0])
    with pytest.raises(ConfigError, match=r"vector\[0\]"):
        SPACE.decode([3] + [0] * 10)


def test_mutate_changes_exactly_one_decision():
    rng = np.random.default_rng(2)
    depth_changes = 0
    for arch in _samples(400, seed=3):
        child = SPACE.mutate(arch, rng)
        assert child != arch and SPACE.contains(child)
        a, c = SPACE.encode(arch), SPACE.encode(child)
        if len(child.layers) == len(arch.layers):
            assert sum(x != y for x, y in zip(a, c, strict=True)) == 1
        else:
            depth_changes += 1
            common = min(len(arch.layers), len(child.layers))
            assert child.layers[:common] == arch.layers[:common]
            assert a[-4:] == c[-4:]
            if len(child.layers) > len(arch.layers):  # deepening copies the last layer
                assert all(x == arch.layers[-1] for x in child.layers[common:])
    assert depth_changes > 10


def test_mutate_in_single_arch_space_returns_arch():
    space = SearchSpace(
        4,
        1,
        depths=(1,),
        widths=(8,),
        activations=("relu",),
        layer_norm=(False,),
        residual=(False,),
        shared_trunk=(True,),
    )
    arch = space.sample(np.random.default_rng(0))
    assert space.size() == 1 and space.mutate(arch, np.random.default_rng(0)) == arch


def test_size_counts_distinct_archs():
    space = SearchSpace(4, 1, depths=(1, 2), widths=(8, 16), activations=("relu", "tanh"), history=(1, 2))
    rng = np.random.default_rng(0)
    seen = {space.sample(rng) for _ in range(6000)}
    assert space.size() == (4 + 16) * 2 * 2 * 2 * 2 == len(seen)
    assert SearchSpace(4, 1).size() == (8 + 64 + 512) * 8


def test_contains_and_encode_outside_space():
    other = PolicyArch(11, 3, (Layer(128, "relu"),))
    assert not SPACE.contains(other)
    assert not SPACE.contains(PolicyArch(12, 3, (Layer(16, "relu"),)))
    with pytest.raises(ConfigError, match="not in this space"):
        SPACE.encode(other)


def test_from_config():
    space = SearchSpace.from_config(
        {"depths": [2], "widths": [32, 64], "activations": ["elu"], "history": 3}, 6, 2
    )
    assert space.depths == (2,) and space.widths == (32, 64) and space.history == (3,)
    assert space.layer_norm == (False, True)
    arch = space.sample(np.random.default_rng(0))
    assert arch.obs_dim == 6 and arch.history == 3 and len(arch.layers) == 2
    assert SearchSpace.from_config({}, 6, 2) == SearchSpace(6, 2)


@pytest.mark.parametrize(
    "table, message",
    [
        ({"widths": [32, -4]}, "space.widths: -4 is not a positive integer"),
        ({"widths": []}, "space.widths: the list of choices is empty"),
        ({"depths": [0]}, "space.depths: 0 is not a positive integer"),
        ({"activations": ["relu", "gelu"]}, "space.activations: 'gelu' is not one of relu"),
        ({"layer_norm": ["no"]}, "space.layer_norm: 'no' is not true or false"),
        ({"history": [1, 1]}, "space.history: .* lists a choice twice"),
        ({"width": [8]}, "space.width: unknown key; valid keys are depths, widths"),
        ({"widths": [True]}, "space.widths: True is not a positive integer"),
    ],
)
def test_bad_config_names_field(table, message):
    with pytest.raises(ConfigError, match=message):
        SearchSpace.from_config(table, 4, 2)

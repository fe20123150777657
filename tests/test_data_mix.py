"""Weighted mixing: token proportions, seeding, exact resume, exhaustion."""

import itertools

import pytest

from angelmed.data.mix import MixSource, WeightedMix


def _source(name, n, length, weight, repeat=True):
    return MixSource(name, lambda: ([f"{name}{i}"] * length for i in range(n)), weight, repeat)


def _mix(seed=0, weights=(0.25, 0.75)):
    # short items from "a" (5 tokens), long ones from "b" (40 tokens): a record-count mix would be far off
    return WeightedMix([_source("a", 100, 5, weights[0]), _source("b", 60, 40, weights[1])], seed=seed)


def test_token_fractions_follow_weights_not_record_counts():
    mix = _mix()
    tokens = {"a": 0, "b": 0}
    for item in itertools.islice(mix, 3000):
        tokens[item[0][0]] += len(item)
    frac_a = tokens["a"] / (tokens["a"] + tokens["b"])
    assert abs(frac_a - 0.25) < 0.03
    assert abs(mix.token_fractions()["a"] - frac_a) < 1e-12


def test_same_seed_same_stream_other_seed_differs():
    first = list(itertools.islice(_mix(seed=5), 200))
    assert first == list(itertools.islice(_mix(seed=5), 200))
    assert first != list(itertools.islice(_mix(seed=6), 200))


def test_resume_gives_identical_continuation_across_epochs():
    mix = _mix()
    list(itertools.islice(mix, 250))  # "a" (100 records) has wrapped into its next epoch by now
    state = mix.state_dict()
    assert state["sources"]["a"]["epoch"] >= 1
    expected = list(itertools.islice(mix, 300))
    resumed = _mix(seed=999)  # the seed is irrelevant: the RNG state comes from the checkpoint
    resumed.load_state_dict(state)
    assert list(itertools.islice(resumed, 300)) == expected


def test_state_is_plain_data():
    import json
    json.dumps(_mix().state_dict())  # checkpoint-friendly: no objects, no tuples needing pickle


def test_non_repeating_sources_end_the_mix():
    mix = WeightedMix([_source("a", 3, 2, 1.0, repeat=False), _source("b", 2, 2, 1.0, repeat=False)], seed=0)
    items = list(mix)
    assert sorted(i[0] for i in items) == ["a0", "a1", "a2", "b0", "b1"]


def test_empty_source_is_an_error():
    mix = WeightedMix([MixSource("empty", lambda: iter(()), 1.0)], seed=0)
    with pytest.raises(RuntimeError, match="'empty' yielded no records"):
        next(mix)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="weight"):
        WeightedMix([_source("a", 1, 1, 0.0)])
    with pytest.raises(ValueError, match="unique"):
        WeightedMix([_source("a", 1, 1, 1.0), _source("a", 1, 1, 1.0)])
    mix = _mix()
    with pytest.raises(ValueError, match="sources"):
        WeightedMix([_source("c", 1, 1, 1.0)]).load_state_dict(mix.state_dict())

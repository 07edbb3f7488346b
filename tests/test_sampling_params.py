"""The shared request parse reads llama.cpp's own sampling knobs (top_k, min_p,
repeat_penalty) beside OpenAI's, range-checked, so every dialect and the P2P sale honour them."""

from __future__ import annotations

import pytest

from forge_cli.errors import UsageError
from forge_cli.inference.jobs import Sampling
from forge_cli.inference.requests import parse_sampling

N_CTX = 512


def test_absent_knobs_keep_the_engines_defaults():
    parsed = parse_sampling({}, N_CTX)
    assert (parsed.top_k, parsed.min_p, parsed.repeat_penalty) == (
        Sampling().top_k, Sampling().min_p, Sampling().repeat_penalty)


def test_knobs_in_range_reach_the_sampling():
    parsed = parse_sampling({"top_k": 0, "min_p": 0.1, "repeat_penalty": 1.3}, N_CTX)
    assert (parsed.top_k, parsed.min_p, parsed.repeat_penalty) == (0, 0.1, 1.3)
    assert isinstance(parse_sampling({"min_p": 1, "repeat_penalty": 2}, N_CTX).min_p, float)


@pytest.mark.parametrize(("body", "named"), [
    ({"top_k": -1}, "top_k must be between 0"),
    ({"top_k": 2**21}, "top_k must be between 0"),
    ({"top_k": 4.5}, "'top_k' must be an integer"),
    ({"top_k": True}, "'top_k' must be an integer, found a boolean"),
    ({"min_p": -0.1}, "min_p must be between 0 and 1"),
    ({"min_p": 1.5}, "min_p must be between 0 and 1"),
    ({"min_p": "0.1"}, "'min_p' must be an integer or a number"),
    ({"repeat_penalty": 0}, "repeat_penalty must be between 0.01 and 2"),
    ({"repeat_penalty": 2.5}, "repeat_penalty must be between 0.01 and 2"),
    ({"repeat_penalty": [1]}, "'repeat_penalty' must be an integer or a number"),
])
def test_knobs_out_of_range_or_of_the_wrong_type_are_a_400_naming_them(body, named):
    with pytest.raises(UsageError, match=named.replace("(", r"\(")) as refused:
        parse_sampling(body, N_CTX)
    assert refused.value.http_status == 400

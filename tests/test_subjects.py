"""Model names map onto NATS subject tokens safely and reversibly."""

from __future__ import annotations

import random
import string

import pytest

from protocol import subjects as subj

NAMES = ["qwen2.5:7b", "meta-llama/Llama-3-8B", "gpt-3.5-turbo", "a b", "x*y>z", "tilde~name", "ünïcödé/模型", "plain_name-1"]


@pytest.mark.parametrize("name", NAMES)
def test_model_token_is_one_safe_token_and_round_trips(name: str) -> None:
    token = subj.model_token(name)
    assert set(token) <= set(string.ascii_letters + string.digits + "_-~")
    assert subj.model_from_token(token) == name


def test_safe_names_are_left_readable() -> None:
    assert subj.model_token("gpt-4o_mini") == "gpt-4o_mini"
    assert subj.complete_subject("qwen2.5:7b") == "lloom.v1.complete.qwen2~2E5~3A7b"


def test_random_names_round_trip_and_never_collide() -> None:
    rng = random.Random(7)
    alphabet = string.printable + "éü模型"
    seen: dict[str, str] = {}
    for _ in range(2000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20)))
        token = subj.model_token(name)
        assert subj.model_from_token(token) == name
        assert seen.setdefault(token, name) == name


@pytest.mark.parametrize("token", ["a~", "a~4", "a~41", "a~zz", "~FF", "a~2e"])
def test_tokens_no_name_encodes_to_are_rejected(token: str) -> None:
    with pytest.raises(subj.SubjectError):
        subj.model_from_token(token)


@pytest.mark.parametrize("name", ["", "x" * 257])
def test_empty_or_overlong_model_names_are_rejected(name: str) -> None:
    with pytest.raises(subj.SubjectError):
        subj.model_token(name)


@pytest.mark.parametrize("bad", ["", "a.b", "a*", "a>", "a b", "x" * 65])
def test_ids_must_be_single_plain_tokens(bad: str) -> None:
    with pytest.raises(subj.SubjectError):
        subj.direct_subject(bad)
    with pytest.raises(subj.SubjectError):
        subj.cancel_subject(bad)

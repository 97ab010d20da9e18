"""The request schema's decoding options come from GenerateConfig (declared once, in config.py)."""

from __future__ import annotations

import dataclasses
import typing

import pytest

pytest.importorskip("fastapi")

from prefixtune.config import GenerateConfig, field_docs  # noqa: E402
from prefixtune.serve.schema import (  # noqa: E402
    DECODING_FIELDS, NOT_PER_REQUEST, REQUEST_DEFAULTS, GenerateRequest, decoding_fields)


def test_every_generate_config_field_is_a_request_field_or_excluded_with_a_reason():
    names = {f.name for f in dataclasses.fields(GenerateConfig)}
    assert set(NOT_PER_REQUEST) <= names, "an exclusion names a field GenerateConfig does not have"
    assert names - set(NOT_PER_REQUEST) <= set(GenerateRequest.model_fields)
    assert not set(NOT_PER_REQUEST) & set(GenerateRequest.model_fields)
    assert set(GenerateRequest.model_fields) - names == {"task", "input", "stream"}


def test_request_fields_carry_the_config_docstring_type_and_default():
    docs, hints = field_docs(GenerateConfig), typing.get_type_hints(GenerateConfig)
    for name in set(GenerateRequest.model_fields) - {"task", "input", "stream"}:
        field = GenerateRequest.model_fields[name]
        assert field.description.startswith(docs[name]), name
        default = REQUEST_DEFAULTS.get(name, getattr(GenerateConfig(), name))
        assert field.default == default, name
        assert hints[name] in (field.annotation, *typing.get_args(field.annotation)), name


def test_a_new_config_field_becomes_a_request_field_without_touching_the_schema():
    @dataclasses.dataclass
    class Wider(GenerateConfig):
        repetition_penalty: float = 1.0
        """Penalty for repeated tokens."""

    fields = decoding_fields(Wider)
    kind, field = fields["repetition_penalty"]
    assert kind is float and field.default == 1.0 and field.description == "Penalty for repeated tokens."


def test_decoding_fields_copied_into_the_config_are_request_fields_except_max_new_tokens():
    assert "max_new_tokens" not in DECODING_FIELDS
    assert set(DECODING_FIELDS) | {"max_new_tokens"} == set(GenerateRequest.model_fields) - {"task", "input", "stream"}
    body = GenerateRequest(task="t", input="x", num_beams=3, seed=7)
    config = GenerateConfig(**{name: getattr(body, name) for name in DECODING_FIELDS})
    assert (config.num_beams, config.seed, config.min_new_tokens) == (3, 7, 0)
    assert GenerateRequest(task="t", input="x", max_new_tokens=None).max_new_tokens is None  # server default

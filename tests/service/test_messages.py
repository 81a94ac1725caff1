"""One-sentence messages for several validation errors name every problem (issue 21 §5: "(and 2 more problems)"
listed none of them)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field, ValidationError

from disalign.cli.serve import settings_sentence
from disalign.service.messages import validation_sentence


class Row(BaseModel):
    features: list[float]
    logits: list[float]


class Body(BaseModel):
    rows: list[Row]
    top_k: int = Field(1, ge=1)


def errors_of(model, raw) -> list[dict]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(raw)
    return info.value.errors()


def test_every_further_problem_of_a_request_is_named():
    errors = [{**e, "loc": ("body", *e["loc"])} for e in errors_of(Body, {"rows": [{"features": "x"}], "top_k": 0})]
    assert len(errors) == 3
    assert validation_sentence(errors) == ("rows[0].features: input should be a valid list (and 2 more problems: "
                                           "rows[0].logits: field required; top_k: input should be greater than or equal to 1).")


def test_many_problems_are_counted_past_the_ones_named():
    errors = [{**e, "loc": ("body", *e["loc"])} for e in errors_of(Body, {"rows": [{"features": "x", "logits": "y"}] * 4})]
    assert len(errors) == 8
    sentence = validation_sentence(errors)
    assert sentence.startswith("rows[0].features: input should be a valid list (and 7 more problems: rows[0].logits: ")
    assert sentence.count("input should be a valid list") == 6 and sentence.endswith("; and 2 others).")


def test_every_further_problem_of_the_settings_is_named():
    class Settings(BaseModel):
        max_rows: int = Field(ge=1)
        max_images: int = Field(ge=1)

    errors = errors_of(Settings, {"max_rows": 0, "max_images": 0})
    assert settings_sentence(errors) == ("--max-rows / DISALIGN_MAX_ROWS: input should be greater than or equal to 1, found 0 "
                                         "(and 1 more problem: --max-images / DISALIGN_MAX_IMAGES: input should be greater than or "
                                         "equal to 1, found 0).")

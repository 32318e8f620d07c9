"""Model refs and label sets are checked where a job enters: what can never work is refused, with a hint."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flglm.contracts.model_refs import TINY_ARCHITECTURE_NAMES, check_model_ref
from flglm.protocol import JobSpec
from flglm.tiny_models import TINY_ARCHITECTURES


def test_the_torch_free_list_of_tiny_architectures_is_the_real_one() -> None:
    assert TINY_ARCHITECTURE_NAMES == TINY_ARCHITECTURES


@pytest.mark.parametrize(
    "ref", ["tiny:llama", "tiny:gpt2:3", "smollm2-135m", "SmolLM2-135M-Instruct", "/models/llama-3-8b",
            "meta-llama/Llama-3.1-8B", "gpt2"],
)  # fmt: skip
def test_refs_that_can_name_a_model_pass(ref: str) -> None:
    assert check_model_ref(ref) == ref


@pytest.mark.parametrize(
    ("ref", "said"),
    [
        ("tiny:lama", "unknown tiny architecture 'lama'; did you mean tiny:llama?"),
        ("tiny:llama:x", "expected tiny:<arch>[:seed]"),
        ("tiny:llama:0:1", "expected tiny:<arch>[:seed]"),
        ("smollm2-135", "is not a built-in model; did you mean smollm2-135m?"),
        ("./models/mine", "must be an absolute path"),
        ("my model", "is none of: tiny:<arch>[:seed], smollm2-135m, an absolute directory path"),
        ("http://example.com/model", "is none of"),
    ],
)
def test_refs_that_can_never_load_are_refused(ref: str, said: str) -> None:
    with pytest.raises(ValueError) as refused:
        check_model_ref(ref)
    assert said in str(refused.value)
    with pytest.raises(ValidationError, match="model_ref"):  # a job with it is refused at submission
        JobSpec.model_validate({"name": "j", "model_ref": ref})


@pytest.mark.parametrize(("labels", "said"), [(["BBC", "BBC"], "repeated: ['BBC']"), (["BBC", " "], "blank")])
def test_a_label_set_must_be_distinct_and_not_blank(labels: list[str], said: str) -> None:
    with pytest.raises(ValidationError, match="labels must be distinct") as refused:
        JobSpec.model_validate(
            {"name": "j", "model_ref": "tiny:llama", "hyperparameters": {"labels": labels}}
        )
    assert said in str(refused.value)

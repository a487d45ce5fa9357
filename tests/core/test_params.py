"""params: one definition of adaptable weights, shared by the Switcher and the fingerprint."""

from __future__ import annotations

import torch

from shira_core import BaseFingerprint, Switcher
from shira_core.fingerprint import unique_parameters as unique_from_fingerprint
from shira_core.params import adaptable, adaptable_names, tied_aliases, unique_parameters


def test_adaptable_is_floating_point_with_two_or_more_dims():
    assert adaptable(torch.zeros(2, 3)) and adaptable(torch.zeros(2, 3, 4, dtype=torch.bfloat16))
    assert not adaptable(torch.zeros(3)) and not adaptable(torch.zeros(()))
    assert not adaptable(torch.zeros(2, 3, dtype=torch.int64))


def test_switcher_fingerprint_and_params_agree(tiny_llama):
    model = tiny_llama(seed=0)
    names = adaptable_names(model)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied: listed once
    assert not any("norm" in n for n in names)
    assert tied_aliases(model) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert unique_from_fingerprint is unique_parameters
    assert BaseFingerprint.of(model).adaptable == frozenset(names)
    assert Switcher(model).names == names


def test_untied_model_has_no_aliases(tiny_llama):
    model = tiny_llama(seed=0, tie=False)
    assert tied_aliases(model) == {}
    assert "lm_head.weight" in adaptable_names(model)

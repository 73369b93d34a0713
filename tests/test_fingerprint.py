"""grass.fingerprint: the model digest changes with any weight and ignores nothing it should see.

The digest is compared against itself under controlled edits: one element of any parameter or
buffer nudged by one unit in the last place, two elements swapped, a dtype or shape change. It
must stay equal for an identical copy of the model and after the model is run (no state added).
The sharded (FSDP2) case is checked in test_fsdp.py against the unsharded model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from grass.fingerprint import model_fingerprint


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5), nn.Linear(5, 3, bias=False),
                          nn.BatchNorm1d(3))
    model[3].running_mean.normal_()
    return model


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(model.named_parameters()) + [
        (n, b) for n, b in model.named_buffers() if b.is_floating_point()]


def test_identical_copies_agree_and_running_changes_nothing():
    model = _model()
    digest = model_fingerprint(model)
    assert model_fingerprint(copy.deepcopy(model)) == digest
    model.eval()(torch.randn(4, 7))
    assert model_fingerprint(model) == digest


@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_one_ulp_in_any_tensor_changes_the_digest(position):
    base = _model()
    digest = model_fingerprint(base)
    for name, _ in _tensors(base):
        model = copy.deepcopy(base)
        t = dict(_tensors(model))[name].data.view(-1)
        i = {"first": 0, "middle": t.numel() // 2, "last": t.numel() - 1}[position]
        t[i] = torch.nextafter(t[i], torch.tensor(float("inf")))
        assert model_fingerprint(model) != digest, (name, i)


def test_swapping_two_elements_changes_the_digest():
    model = _model()
    digest = model_fingerprint(model)
    w = model[0].weight.data
    w[0, 0], w[3, 4] = w[3, 4].clone(), w[0, 0].clone()
    assert model_fingerprint(model) != digest


def test_dtype_and_shape_are_part_of_the_digest():
    a, b = nn.Linear(4, 6, bias=False), nn.Linear(6, 4, bias=False)
    b.weight.data = a.weight.data.reshape(4, 6).clone()
    assert model_fingerprint(a) != model_fingerprint(b)  # same bytes, other shape
    half = copy.deepcopy(a).to(torch.bfloat16)
    assert model_fingerprint(half) != model_fingerprint(a)


def test_odd_sizes_and_word_widths():
    """Rows of 3 bf16 values (6 bytes: 2-byte words), 1-byte bools, 0-dim buffers."""
    model = nn.Module()
    model.w = nn.Parameter(torch.randn(1030, 3).to(torch.bfloat16))
    model.register_buffer("flag", torch.tensor([True, False, True]))
    model.register_buffer("step", torch.tensor(7))
    digest = model_fingerprint(model)
    model.flag[1] = True
    assert model_fingerprint(model) != digest
    model.flag[1] = False
    model.step += 1
    assert model_fingerprint(model) != digest
    model.step -= 1
    assert model_fingerprint(model) == digest
    model.w.data[1029, 2] = -model.w.data[1029, 2]  # in the tail past the last 1024 words
    assert model_fingerprint(model) != digest

"""bf16 models end to end: capture runs in the model's dtype and accumulates in fp32, and the
features agree with the fp32 model's (same weights) to bf16 precision."""

import copy

import pytest
import torch

import grass
from grass.compressors import LayerMap
from grass.layers import TrackedLayers
from grass.tasks import CausalLM
from conftest import rel_err
from tiny_models import causal_lm, padded

# bf16 keeps 8 significant bits (relative spacing 2^-8 = 3.9e-3); forward and backward through
# two blocks give about 5e-3 relative error on a whole feature matrix (GPT-2 and Llama, both
# compressors); the bound leaves 4x room.
BF16_TOLERANCE = 2e-2


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("compressor", [grass.FactGraSS(k=64), grass.LoGra(k=64)])
def test_bf16_features_agree_with_fp32(arch, compressor):
    fp32 = causal_lm(arch)
    with torch.no_grad():  # the same weights on both sides: only the compute dtype differs
        for p in fp32.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    batch = padded([12, 7, 16, 9], seed=3)
    seen = []
    features = {}
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        attr = grass.Attributor(model, CausalLM(), compressor, progress=False)
        first = next(iter(attr.layers.values()))

        def recording(acts, grads, mask, inner=first.map):
            out = inner(acts, grads, mask)
            seen.append((acts.dtype, grads.dtype, out.dtype))
            return out

        attr.layers = TrackedLayers((t.module, t.shape, LayerMap(t.map.k, recording) if t is first
                                     else t.map) for t in attr.layers.values())
        features[name] = attr.features(batch).values
    assert seen == [(torch.float32,) * 3, (torch.bfloat16, torch.bfloat16, torch.float32)]
    assert features["bf16"].dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    err = rel_err(features["bf16"], features["fp32"])
    assert 0 < err < BF16_TOLERANCE, err

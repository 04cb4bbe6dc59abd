"""A decode step that compiles whole: ``torch.compile(fullgraph=True)`` with no graph break, the eager tokens.

Tiny on purpose (one layer, hidden 32): capturing costs seconds on a CPU. The captures run with dynamo's
``"eager"`` backend (the graph dynamo captures, run as is), which checks the capture itself; inductor's code
generation is exercised by the GPU benchmark.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from factories import save_expert, tiny_llama

from xlora_hub import XLoraConfig, XLoraModel, XLoraStaticCache


def _one_layer():
    return tiny_llama(num_hidden_layers=1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile-experts")
    experts = {
        "x": save_expert(_one_layer, root / "e0", target_modules=["q_proj", "down_proj"], r=4, seed=1, scale=0.5),
        "y": save_expert(_one_layer, root / "e1", target_modules=["v_proj", "down_proj"], r=2, seed=2, scale=0.5),
    }
    ours = XLoraModel.from_experts(_one_layer(), XLoraConfig(experts=experts, scaling_pass_value=None))
    with torch.no_grad():
        for p in ours.classifier.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 2)
    return ours


def _prefilled(model, ids):
    cache = XLoraStaticCache(config=model.config, max_cache_len=12)
    with torch.no_grad():
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
    return cache, logits.argmax(-1, keepdim=True)


def test_the_decode_step_has_no_graph_break(model):
    """What ``compile_decode_step`` compiles (``fullgraph=True``) is one graph."""
    ids = torch.tensor([[5, 17, 33, 9]])
    cache, token = _prefilled(model, ids)
    for layer in model.xlora_layers:
        layer.prepare_stack()
    with torch.no_grad():
        explained = torch._dynamo.explain(model.decode_step)(token, torch.tensor([[4]]), cache)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_auto_compiled_generate_gives_the_eager_tokens(model):
    ids = torch.tensor([[5, 17, 33, 9]])
    # transformers' own auto-compile of generate (what a GPU gets by itself), through the X-LoRA routing hooks
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "cache_implementation": "static"}
    config = transformers.CompileConfig(fullgraph=True, dynamic=False, backend="eager")
    config._compile_all_devices = True  # on CPU transformers compiles only when told to
    eager = model.generate(input_ids=ids, **settings)
    compiled = model.generate(input_ids=ids, **settings, compile_config=config)
    assert hasattr(model.model, "_compiled_call")  # the decode steps did run compiled
    assert compiled.tolist() == eager.tolist()
    with model.disable_adapter():
        assert model.generate(input_ids=ids, **settings).tolist() != eager.tolist()

    # look-ahead over a static cache compiles its batched step too (one capture, reused by the next call)
    plain = model.generate(input_ids=ids, **settings)
    ahead = model.generate(input_ids=ids, **settings, compile_config=config, scaling_lookahead=True)
    again = model.generate(input_ids=ids, **settings, compile_config=config, scaling_lookahead=True)
    assert len(model._decoder.compiled_rows) == 1
    assert ahead.tolist() == again.tolist() == plain.tolist()

"""Static KV caches for both passes: the same tokens as the dynamic cache, and clear refusals."""

from __future__ import annotations

import pytest
import torch
from factories import VOCAB, save_expert, tiny_bert_classifier, tiny_llama

from xlora_hub import XLoraConfig, XLoraModel, XLoraStaticCache

GREEDY = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("static-experts")
    return [
        save_expert(tiny_llama, root / "e0", target_modules=["q_proj", "v_proj"], r=4, seed=1, scale=0.5),
        save_expert(tiny_llama, root / "e1", target_modules=["o_proj", "down_proj", "lm_head"], r=2, seed=2, scale=0.5),
    ]


@pytest.fixture(scope="module", params=["dense", "layerwise-topk"])
def model(request, experts):
    options = {} if request.param == "dense" else {"layerwise_scalings": True, "top_k_lora": 1}
    ours = XLoraModel.from_experts(tiny_llama(), XLoraConfig(experts={"x": experts[0], "y": experts[1]}, **options))
    with torch.no_grad():
        for p in ours.classifier.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 2)
    return ours


def _batch(kind):
    if kind == "single":
        return {
            "input_ids": torch.tensor([[5, 17, 33, 9, 60, 71]]),
            "attention_mask": torch.ones(1, 6, dtype=torch.long),
        }
    ids = torch.tensor([[0, 0, 0, 12, 40, 7], [0, 88, 3, 91, 45, 20], [14, 15, 16, 17, 18, 19]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


@pytest.mark.parametrize("kind", ["single", "left-padded"])
def test_static_greedy_equals_dynamic(model, kind):
    inputs = _batch(kind)
    dynamic = model.generate(**inputs, **GREEDY)
    static = model.generate(**inputs, **GREEDY, cache_implementation="static")
    assert static.tolist() == dynamic.tolist()
    with model.disable_adapter():
        assert model.generate(**inputs, **GREEDY).tolist() != dynamic.tolist()  # the experts matter here


def test_static_sampling_beams_and_eos_equal_dynamic(model):
    inputs = _batch("left-padded")
    sampling = {"max_new_tokens": 8, "do_sample": True, "top_p": 0.9, "temperature": 0.8, "pad_token_id": 0}
    torch.manual_seed(11)
    dynamic = model.generate(**inputs, **sampling)
    torch.manual_seed(11)
    assert model.generate(**inputs, **sampling, cache_implementation="static").tolist() == dynamic.tolist()

    beams = {"max_new_tokens": 6, "num_beams": 2, "do_sample": False, "pad_token_id": 0}
    assert (
        model.generate(**inputs, **beams, cache_implementation="static").tolist()
        == model.generate(**inputs, **beams).tolist()
    )

    # an EOS mid-batch: the token row 1 emits at its third step ends it there (the other rows go on)
    free = model.generate(**inputs, **GREEDY)
    eos = int(free[1, 6 + 2])
    dynamic = model.generate(**inputs, **GREEDY, eos_token_id=eos)
    static = model.generate(**inputs, **GREEDY, eos_token_id=eos, cache_implementation="static")
    assert static.tolist() == dynamic.tolist()
    assert dynamic[1, 6 + 3 :].eq(0).all()  # row 1 finished: padding after its EOS


def test_static_cache_by_hand_matches_the_full_forward(model):
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    cache = XLoraStaticCache(config=model.config, max_cache_len=12)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        first = model(input_ids=ids[:, :7], cache=cache, use_cache=True)
        assert first.past_key_values is cache
        assert int(cache.get_seq_length()) == 7 and int(cache.scaling_cache.get_seq_length()) == 7
        step = model(input_ids=ids[:, 7:8], position_ids=torch.tensor([[7], [7]]), cache=cache, use_cache=True)
    torch.testing.assert_close(first.logits, full[:, :7], atol=1e-5, rtol=0)
    torch.testing.assert_close(step.logits[:, -1], full[:, 7], atol=1e-5, rtol=0)
    # the same cache object, passed to generate, is used (and filled) by both passes
    cache = XLoraStaticCache(config=model.config, max_cache_len=16)
    inputs = _batch("single")
    tokens = model.generate(**inputs, **GREEDY, cache=cache)
    assert tokens.tolist() == model.generate(**inputs, **GREEDY).tolist()
    assert int(cache.get_seq_length()) == int(cache.scaling_cache.get_seq_length()) == 6 + GREEDY["max_new_tokens"] - 1


def test_unsupported_cache_implementations_are_refused(model, experts):
    inputs = _batch("single")
    with pytest.raises(ValueError, match="supports `cache_implementation` 'dynamic' .* or 'static', got 'offloaded'"):
        model.generate(**inputs, **GREEDY, cache_implementation="offloaded")
    cache = XLoraStaticCache(config=model.config, max_cache_len=16)
    with pytest.raises(ValueError, match="either a cache or `cache_implementation='static'`"):
        model.generate(**inputs, **GREEDY, cache=cache, cache_implementation="static")


def test_static_cache_on_a_model_without_a_kv_cache_is_refused(tmp_path):
    expert = save_expert(tiny_bert_classifier, tmp_path / "b0", target_modules=["query", "value"], r=2, seed=1)
    bert = XLoraModel.from_experts(tiny_bert_classifier(), XLoraConfig(experts={"a": expert, "b": expert}))
    with pytest.raises(ValueError, match='`cache_implementation="static"` needs a decoder-only generative model'):
        bert.generate(input_ids=torch.tensor([[5, 6, 7]]), cache_implementation="static")

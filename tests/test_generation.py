"""KV-cached generation: same tokens as without the cache, and as peft's X-LoRA (which runs uncached)."""

from __future__ import annotations

import pytest
import torch
from factories import VOCAB, copy_classifier_from_peft, peft_reference, save_expert, tiny_llama
from transformers import DynamicCache

from xlora_hub import XLoraCache, XLoraConfig, XLoraModel

CONFIGS = {
    "dense": {},
    "topk": {"top_k_lora": 2, "enable_softmax_topk": True, "enable_softmax": False},
    "layerwise": {"layerwise_scalings": True, "scaling_pass_value": None},
}


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen-experts")
    return [
        save_expert(tiny_llama, root / "e0", target_modules=["q_proj", "v_proj"], r=4, seed=1, scale=0.5),
        save_expert(tiny_llama, root / "e1", target_modules=["o_proj", "down_proj"], r=2, seed=2, scale=0.5),
        save_expert(
            tiny_llama, root / "e2", target_modules=["k_proj", "gate_proj", "embed_tokens"], r=6, seed=3, scale=0.5
        ),
    ]


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, experts):
    options = CONFIGS[request.param]
    peft_options = dict(options)
    scaling_pass_value = peft_options.pop("scaling_pass_value", 0.0)
    reference = peft_reference(tiny_llama, experts, **peft_options)
    reference.set_scaling_pass_value(scaling_pass_value)
    with torch.no_grad():
        for p in reference.base_model.internal_xlora_classifier.parameters():
            p.copy_(torch.randn_like(p) * 2)
    ours = XLoraModel.from_experts(
        tiny_llama(), XLoraConfig(experts={"x": experts[0], "y": experts[1], "z": experts[2]}, **options)
    )
    copy_classifier_from_peft(ours, reference)
    return reference, ours


def _batch(kind):
    if kind == "single":
        return {
            "input_ids": torch.tensor([[5, 17, 33, 9, 60, 71]]),
            "attention_mask": torch.ones(1, 6, dtype=torch.long),
        }
    ids = torch.tensor([[0, 0, 0, 12, 40, 7], [0, 88, 3, 91, 45, 20], [14, 15, 16, 17, 18, 19]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


GREEDY = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False, "pad_token_id": 0}


@pytest.mark.parametrize("kind", ["single", "left-padded"])
def test_greedy_cached_equals_uncached_equals_peft(pair, kind):
    reference, ours = pair
    inputs = _batch(kind)
    cached = ours.generate(**inputs, **GREEDY)
    uncached = ours.generate(**inputs, **GREEDY, use_cache=False)
    expected = reference.generate(**inputs, **GREEDY)
    assert cached.tolist() == uncached.tolist() == expected.tolist()
    with ours.disable_adapter():
        base_tokens = ours.generate(**inputs, **GREEDY)
    assert base_tokens.tolist() != cached.tolist()  # the experts matter for these prompts


@pytest.mark.parametrize("kind", ["single", "left-padded"])
def test_seeded_sampling_cached_equals_uncached(pair, kind):
    _, ours = pair
    inputs = _batch(kind)
    settings = {"max_new_tokens": 8, "do_sample": True, "top_p": 0.9, "temperature": 0.8, "pad_token_id": 0}
    torch.manual_seed(7)
    cached = ours.generate(**inputs, **settings)
    torch.manual_seed(7)
    uncached = ours.generate(**inputs, **settings, use_cache=False)
    assert cached.tolist() == uncached.tolist()


@pytest.mark.parametrize("kind", ["single", "left-padded"])
def test_beam_search_cached_equals_uncached(pair, kind):
    _, ours = pair
    inputs = _batch(kind)
    settings = {"max_new_tokens": 8, "num_beams": 2, "do_sample": False, "pad_token_id": 0}
    assert ours.generate(**inputs, **settings).tolist() == ours.generate(**inputs, **settings, use_cache=False).tolist()


def test_forward_by_hand_with_the_cache(pair):
    _, ours = pair
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(input_ids=ids, use_cache=False).logits
        full_scalings = ours.get_latest_scalings()
        first = ours(input_ids=ids[:, :7], use_cache=True)
        cache = first.past_key_values
        assert isinstance(cache, XLoraCache)
        assert cache.get_seq_length() == 7 and cache.scaling_cache.get_seq_length() == 7
        step = ours(input_ids=ids[:, 7:8], past_key_values=cache, use_cache=True)
        assert ours.get_latest_scalings().shape == (2, 1, ours.n_layers, 3)
        torch.testing.assert_close(ours.get_latest_scalings(), full_scalings[:, 7:8], atol=1e-5, rtol=0)
        step2 = ours(input_ids=ids[:, 8:9], past_key_values=step.past_key_values, use_cache=True)
    torch.testing.assert_close(step.logits[:, -1], full[:, 7], atol=1e-5, rtol=0)
    torch.testing.assert_close(step2.logits[:, -1], full[:, 8], atol=1e-5, rtol=0)


def test_scalings_after_a_cached_generation_step(pair):
    _, ours = pair
    ours.enable_scalings_logging()
    ours.clear_scalings_log()
    inputs = _batch("left-padded")
    ours.generate(**inputs, **GREEDY)
    ours.disable_scalings_logging()
    log = ours.get_scalings_log()
    assert log[0].shape == (3, 6, ours.n_layers, 3)
    assert all(t.shape == (3, 1, ours.n_layers, 3) for t in log[1:])
    assert len(log) == GREEDY["max_new_tokens"]  # the prompt, then every fed-back token
    assert ours.get_latest_scalings().shape == (3, 1, ours.n_layers, 3)


def test_a_foreign_cache_is_refused(pair):
    _, ours = pair
    ids = torch.randint(3, VOCAB, (1, 4))
    with torch.no_grad():
        past = tiny_llama()(input_ids=ids, use_cache=True).past_key_values
        assert isinstance(past, DynamicCache) and not isinstance(past, XLoraCache)
        with pytest.raises(TypeError, match="X-LoRA needs an XLoraCache as `"):
            ours(input_ids=ids[:, -1:], past_key_values=past, use_cache=True)


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_cached_generation_on_other_architectures(arch, tmp_path):
    from factories import tiny_gpt2, tiny_opt

    factory, targets = {
        "gpt2": (tiny_gpt2, [["c_attn"], ["c_fc", "c_proj"]]),
        "opt": (tiny_opt, [["fc1"], ["q_proj"]]),
    }[arch]
    dirs = [
        save_expert(factory, tmp_path / f"e{i}", target_modules=t, seed=i, scale=0.5) for i, t in enumerate(targets)
    ]
    model = XLoraModel.from_experts(factory(), XLoraConfig(experts={"a": dirs[0], "b": dirs[1]}))
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.copy_(torch.randn_like(p) * 2)
    inputs = _batch("left-padded")
    settings = dict(GREEDY, pad_token_id=0)
    assert (
        model.generate(**inputs, **settings).tolist() == model.generate(**inputs, **settings, use_cache=False).tolist()
    )


def test_static_routing(experts):
    from test_architectures import force_expert

    model = XLoraModel.from_experts(
        tiny_llama(), XLoraConfig(experts={"x": experts[0], "y": experts[1], "z": experts[2]})
    )
    inputs = _batch("left-padded")
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.copy_(torch.randn_like(p) * 2)
    dynamic = model.generate(**inputs, **GREEDY)
    static = model.generate(**inputs, **GREEDY, routing="static")
    assert static.shape == dynamic.shape
    assert model.generate(**inputs, **GREEDY, routing="static", num_beams=2).shape[0] == 3
    # with routing that does not depend on the input, static and dynamic routing agree
    force_expert(model, 1)
    assert model.generate(**inputs, **GREEDY, routing="static").tolist() == model.generate(**inputs, **GREEDY).tolist()
    with pytest.raises(ValueError, match="`routing` must be 'dynamic' or 'static'"):
        model.generate(**inputs, routing="sometimes")


def test_an_explicit_generation_config_still_uses_the_xlora_cache(pair):
    # transformers 5's GenerationConfig() leaves use_cache as None ("the default", which is a cache):
    # generation must still give both passes their own cache, not hand the scaling pass the real pass's.
    from transformers import GenerationConfig

    reference, ours = pair
    inputs = _batch("left-padded")
    config = GenerationConfig(**GREEDY)
    assert config.use_cache is None
    expected = reference.generate(**inputs, **GREEDY)
    assert ours.generate(**inputs, generation_config=config).tolist() == expected.tolist()
    empty = DynamicCache()
    assert ours.generate(**inputs, **GREEDY, past_key_values=empty).tolist() == expected.tolist()


def test_generate_refuses_a_filled_foreign_cache(pair):
    _, ours = pair
    inputs = _batch("single")
    with torch.no_grad():
        past = tiny_llama()(**inputs, use_cache=True).past_key_values
    with pytest.raises(TypeError, match="needs an XLoraCache"):
        ours.generate(**inputs, **GREEDY, past_key_values=past)


def greedy_by_full_forward(model, input_ids, steps):
    """Greedy decoding the slow, obvious way: the whole sequence through forward at every step, no cache."""
    ids = input_ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_experts_on_the_lm_head_generate(tmp_path):
    # generate() asks for the last position's logits only (logits_to_keep), so an lm_head expert sees
    # fewer positions than the scalings cover: it must use the last positions' scalings.
    dirs = [
        save_expert(tiny_llama, tmp_path / "head", target_modules=["lm_head", "q_proj"], seed=4, scale=0.5),
        save_expert(tiny_llama, tmp_path / "mlp", target_modules=["down_proj"], seed=5, scale=0.5),
    ]
    model = XLoraModel.from_experts(tiny_llama(), XLoraConfig(experts={"head": dirs[0], "mlp": dirs[1]}))
    assert any(name.endswith("lm_head") for name in model.xlora_config.layer_names)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.copy_(torch.randn_like(p) * 2)
    inputs = _batch("single")
    cached = model.generate(**inputs, **GREEDY)
    assert cached.tolist() == model.generate(**inputs, **GREEDY, use_cache=False).tolist()
    assert cached.tolist() == greedy_by_full_forward(model, inputs["input_ids"], GREEDY["max_new_tokens"]).tolist()
    with model.disable_adapter():
        assert model.generate(**inputs, **GREEDY).tolist() != cached.tolist()


@pytest.mark.parametrize("upcast", [False, True])
def test_bfloat16_model(experts, upcast):
    # Experts stay in the model's dtype unless upcast_experts=True. The yardstick for the error bfloat16
    # brings is peft's X-LoRA in bfloat16 on the same experts and classifier: routing amplifies rounding
    # (a slightly different hidden state gives slightly different scalings), for peft as for us.
    reference = peft_reference(tiny_llama, experts)
    reference.set_scaling_pass_value(0.0)
    with torch.no_grad():
        for p in reference.base_model.internal_xlora_classifier.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 2)
    reference_low = peft_reference(lambda: tiny_llama().to(torch.bfloat16), experts)
    reference_low.set_scaling_pass_value(0.0)
    reference_low.base_model.internal_xlora_classifier.load_state_dict(
        reference.base_model.internal_xlora_classifier.state_dict()
    )
    config = XLoraConfig(experts={"x": experts[0], "y": experts[1], "z": experts[2]})
    low = XLoraModel.from_experts(tiny_llama().to(torch.bfloat16), config, upcast_experts=upcast)
    copy_classifier_from_peft(low, reference)
    expert_dtypes = {p.dtype for n, p in low.named_parameters() if "lora_" in n}
    assert expert_dtypes == {torch.float32 if upcast else torch.bfloat16}
    inputs = _batch("left-padded")
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = reference(**inputs).logits
        got = low(**inputs).logits
        peft_low = reference_low(**inputs).logits
    assert got.dtype == torch.bfloat16

    def relative_error(a, b):
        return float((a.float() - b.float())[mask].abs().max() / b.float()[mask].abs().max())

    ours, peft_error = relative_error(got, expected), relative_error(peft_low, expected)
    print(f"bfloat16 relative logit error vs float32: xlora-hub {ours:.3g}, peft {peft_error:.3g}")
    assert ours < 1.5 * peft_error + 0.005
    assert relative_error(got, peft_low) < 0.03
    tokens = low.generate(**inputs, **GREEDY)
    assert tokens.shape == (3, 6 + GREEDY["max_new_tokens"])

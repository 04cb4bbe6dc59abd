"""The look-ahead scaling pass: the tokens of the plain two-pass path, for any cache and scaling-pass value."""

from __future__ import annotations

import pytest
import torch
from factories import save_expert, tiny_llama

from xlora_hub import XLoraCache, XLoraConfig, XLoraModel

NEW = 10
GREEDY = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0}
SAMPLING = {"max_new_tokens": NEW, "do_sample": True, "top_k": 4, "temperature": 0.7, "pad_token_id": 0}


def _experts(root, scale):
    return {
        "x": save_expert(
            tiny_llama, root / "e0", target_modules=["q_proj", "v_proj", "embed_tokens"], r=4, seed=1, scale=scale
        ),
        "y": save_expert(
            tiny_llama, root / "e1", target_modules=["o_proj", "down_proj", "lm_head"], r=2, seed=2, scale=scale
        ),
    }


def _mixture(experts, **options):
    model = XLoraModel.from_experts(tiny_llama(), XLoraConfig(experts=experts, **options))
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 2)
    return model


@pytest.fixture(scope="module")
def small_experts(tmp_path_factory):
    """Experts that are small deltas (as fine-tunes are): the scaling pass guesses most tokens right."""
    return _experts(tmp_path_factory.mktemp("lookahead-small"), 0.1)


@pytest.fixture(scope="module", params=["value-0", "value-default-layerwise"])
def model(request, small_experts):
    options = {} if request.param == "value-0" else {"scaling_pass_value": None, "layerwise_scalings": True}
    return _mixture(small_experts, **options)


def _batch(kind):
    if kind == "single":
        return {
            "input_ids": torch.tensor([[5, 17, 33, 9, 60, 71]]),
            "attention_mask": torch.ones(1, 6, dtype=torch.long),
        }
    ids = torch.tensor([[0, 0, 0, 12, 40, 7], [0, 88, 3, 91, 45, 20], [14, 15, 16, 17, 18, 19]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("kind", ["single", "left-padded"])
def test_lookahead_greedy_equals_the_plain_path(model, kind, cache):
    inputs = _batch(kind)
    plain = model.generate(**inputs, **GREEDY, cache_implementation=cache)
    assert model.lookahead_acceptance is None  # no look-ahead ran
    ahead = model.generate(**inputs, **GREEDY, cache_implementation=cache, scaling_lookahead=True)
    assert ahead.tolist() == plain.tolist()
    assert 0.0 < model.lookahead_acceptance < 1.0  # guesses both confirmed and refused: both branches ran
    with model.disable_adapter():
        assert model.generate(**inputs, **GREEDY).tolist() != plain.tolist()  # the experts change these tokens


@pytest.mark.parametrize("cache", [None, "static"])
def test_lookahead_seeded_sampling_and_eos_equal_the_plain_path(model, cache):
    inputs = _batch("left-padded")
    torch.manual_seed(5)
    plain = model.generate(**inputs, **SAMPLING, cache_implementation=cache)
    after_plain = torch.rand(3)
    torch.manual_seed(5)
    ahead = model.generate(**inputs, **SAMPLING, cache_implementation=cache, scaling_lookahead=True)
    assert ahead.tolist() == plain.tolist()
    assert torch.rand(3).tolist() == after_plain.tolist()  # the random stream consumed exactly as on the plain path

    free = model.generate(**inputs, **GREEDY)
    eos = int(free[0, 6 + 2])  # row 0 ends at its third new token, the others go on
    plain = model.generate(**inputs, **GREEDY, eos_token_id=eos, cache_implementation=cache)
    ahead = model.generate(**inputs, **GREEDY, eos_token_id=eos, cache_implementation=cache, scaling_lookahead=True)
    assert ahead.tolist() == plain.tolist()
    assert plain[0, 6 + 3 :].eq(0).all() and not plain[2, 6 + 3 :].eq(0).all()


def test_acceptance_in_the_output_and_the_scalings_log(model):
    inputs = _batch("left-padded")
    model.enable_scalings_logging()
    try:
        model.clear_scalings_log()
        plain = model.generate(**inputs, **GREEDY, return_dict_in_generate=True, output_scores=True)
        plain_log = model.get_scalings_log()
        model.clear_scalings_log()
        ahead = model.generate(
            **inputs, **GREEDY, return_dict_in_generate=True, output_scores=True, scaling_lookahead=True
        )
        ahead_log = model.get_scalings_log()
    finally:
        model.disable_scalings_logging()
        model.clear_scalings_log()
    assert ahead.sequences.tolist() == plain.sequences.tolist()
    assert ahead.lookahead_acceptance == model.lookahead_acceptance
    assert plain.lookahead_acceptance is None
    assert len(ahead.scores) == len(plain.scores) == NEW
    for got, want in zip(ahead.scores, plain.scores):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert [t.shape for t in ahead_log] == [t.shape for t in plain_log]  # the prompt, then every fed-back token
    for got, want in zip(ahead_log, plain_log):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_auto_falls_back_when_guesses_fail(tmp_path):
    """Large experts: the base model's guesses are mostly wrong, so "auto" finishes with plain steps."""
    model = _mixture(_experts(tmp_path, 0.6))
    inputs = _batch("left-padded")
    settings = dict(GREEDY, max_new_tokens=14)
    plain = model.generate(**inputs, **settings)
    auto = model.generate(**inputs, **settings, scaling_lookahead="auto")
    assert auto.tolist() == plain.tolist()
    assert model.lookahead_acceptance < 0.5  # why auto turned it off after its warm-up
    for cache in (None, "static"):
        assert model.generate(**inputs, **settings, cache_implementation=cache, scaling_lookahead=True).tolist() == (
            plain.tolist()
        )


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_lookahead_on_other_architectures(arch, tmp_path):
    from factories import tiny_gpt2, tiny_opt

    factory, targets, extra = {
        "gpt2": (tiny_gpt2, ["c_attn", "c_proj"], {"fan_in_fan_out": True}),
        "opt": (tiny_opt, ["q_proj", "v_proj", "fc1"], {}),
    }[arch]
    experts = {
        f"e{i}": save_expert(factory, tmp_path / f"e{i}", target_modules=targets, r=4, seed=i + 1, scale=0.1, **extra)
        for i in range(2)
    }
    model = XLoraModel.from_experts(factory(), XLoraConfig(experts=experts))
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 2)
    inputs = _batch("left-padded")
    plain = model.generate(**inputs, **GREEDY)
    assert model.generate(**inputs, **GREEDY, scaling_lookahead=True).tolist() == plain.tolist()
    assert 0.0 < model.lookahead_acceptance < 1.0


def test_a_model_whose_logits_are_more_than_its_head_is_refused(tmp_path):
    import transformers as tf

    def tiny_gemma2():
        torch.manual_seed(0)
        config = tf.Gemma2Config(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            final_logit_softcapping=30.0,
            pad_token_id=0,
        )
        return tf.Gemma2ForCausalLM(config).eval()

    expert = save_expert(tiny_gemma2, tmp_path / "g0", target_modules=["q_proj"], r=2, seed=1)
    model = XLoraModel.from_experts(tiny_gemma2(), XLoraConfig(experts={"a": expert, "b": expert}))
    with pytest.raises(
        ValueError,
        match=r"Gemma2ForCausalLM: its logits are more than the LM head's "
        r"\(final_logit_softcapping\)\. Generate with `scaling_lookahead=False`",
    ):
        model.generate(**_batch("single"), **GREEDY, scaling_lookahead=True)


def test_unsupported_lookahead_combinations_are_refused(model):
    inputs = _batch("single")
    fix = "generate with `scaling_lookahead=False`"
    with pytest.raises(ValueError, match=rf"does not support beam search .*{fix}"):
        model.generate(**inputs, **GREEDY, num_beams=2, scaling_lookahead=True)
    with pytest.raises(ValueError, match=rf'does not support `routing="static"`.*{fix}'):
        model.generate(**inputs, **GREEDY, routing="static", scaling_lookahead="auto")
    with pytest.raises(ValueError, match="needs the KV cache .* drop `use_cache=False`"):
        model.generate(**inputs, **GREEDY, use_cache=False, scaling_lookahead=True)
    with pytest.raises(ValueError, match="`scaling_lookahead` must be True, False or 'auto', got 'yes'"):
        model.generate(**inputs, **GREEDY, scaling_lookahead="yes")
    with pytest.raises(ValueError, match=rf"does not support `inputs_embeds`.*{fix}"):
        embeds = model.model.get_input_embeddings()(inputs["input_ids"])
        model.generate(inputs_embeds=embeds, **GREEDY, scaling_lookahead=True)
    filled = XLoraCache(config=model.config)
    with torch.no_grad():
        model(**inputs, cache=filled, use_cache=True)
    with pytest.raises(ValueError, match="starts from an empty cache"):
        model.generate(**inputs, **GREEDY, cache=filled, scaling_lookahead=True)


def test_the_4d_mask_is_given_only_where_it_equals_the_models_own():
    """Look-ahead hands its mask over as 4D (skipping transformers' per-step mask building) only for SDPA with full
    attention on every layer of a known model type; sliding windows, eager attention and other types keep 2D."""
    import transformers as tf

    from xlora_hub.lookahead import four_d_mask_ready

    small = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    small |= {"num_attention_heads": 2, "num_key_value_heads": 1}
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(**small, attn_implementation="sdpa"))
    eager = tf.LlamaForCausalLM(tf.LlamaConfig(**small, attn_implementation="eager"))
    sliding = tf.MistralForCausalLM(tf.MistralConfig(**small, sliding_window=4, attn_implementation="sdpa"))
    full = tf.MistralForCausalLM(tf.MistralConfig(**small, sliding_window=None, attn_implementation="sdpa"))
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32))
    assert [four_d_mask_ready(m) for m in (llama, eager, sliding, full, gpt2)] == [True, False, False, True, False]

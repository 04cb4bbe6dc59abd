"""Flattening a mixture into one plain peft LoRA (``convert --to lora``): it loads in peft alone, equals the
fixed-weight mixture, states its calibration and measured fidelity, and round-trips through the Hub."""

from __future__ import annotations

import json
import os
import re
import string
import sys
import uuid
import warnings
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from factories import save_expert, tiny_llama

from xlora_hub import DataFormatError, InvalidConfigError, XLoraConfig, XLoraModel
from xlora_hub.cli import main as cli_main
from xlora_hub.convert import flatten_to_lora, parse_weights, push_flattened_lora
from xlora_hub.convert import main as convert_main
from xlora_hub.convert.flatten import pinned_routing

CHARS = string.digits + string.ascii_lowercase + "+=:"
PROMPTS = ["add:1+2=3", "add:12+7=19", "up:abc=", "cnt:abcab:a=2", "rev:xyz=zyx", "zz"]
IDS = torch.tensor([[1, 5, 9, 14, 27, 33, 6, 2], [1, 7, 7, 30, 3, 24, 12, 10]])


def char_tokenizer():
    """A character-level tokenizer (BOS added) whose ids fit the tiny Llama's 128-token vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *CHARS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def expert_dirs(tmp_path_factory) -> dict[str, Path]:
    """Three experts that differ in every way the scaling depends on: modules (embeddings too), ranks, alphas,
    rsLoRA, and a rank/alpha pattern."""
    root = tmp_path_factory.mktemp("flatten-experts")
    return {
        "a": save_expert(tiny_llama, root / "a", target_modules=["q_proj", "v_proj", "embed_tokens"], seed=1),
        "b": save_expert(tiny_llama, root / "b", target_modules=["q_proj", "up_proj"], r=2, alpha=4, seed=2,
                         use_rslora=True),
        "c": save_expert(tiny_llama, root / "c", target_modules=["v_proj", "down_proj"], r=3, alpha=8, seed=3,
                         rank_pattern={"model.layers.1.mlp.down_proj": 5},
                         alpha_pattern={"model.layers.1.mlp.down_proj": 3}),
    }  # fmt: skip


def mixture(expert_dirs, *, seed: int = 5, **settings) -> XLoraModel:
    model = XLoraModel.from_experts(
        tiny_llama(), XLoraConfig(experts={n: str(d) for n, d in expert_dirs.items()}, **settings)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.classifier.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    return model


def load_plain_lora(folder, base=tiny_llama) -> torch.nn.Module:
    """The flattened adapter loaded with peft alone (no xlora-hub code), with no key missing or unexpected."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base(), str(folder)).eval()
    keys = [str(w.message) for w in caught if "keys" in str(w.message).lower()]
    assert not keys, keys
    return model


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def reference_mean_weights(model: XLoraModel, tokenizer, texts: list[str]) -> torch.Tensor:
    """Each expert's mean processed scaling per layer, by hand: one unpadded text at a time, top-k, the top-k
    softmax and the global weight applied here from the config."""
    config = model.xlora_config
    rows = []
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            model(input_ids=ids)
        s = model.get_latest_scalings()[0].to(torch.float64)  # [seq, L, E]
        if not config.layerwise_scalings:
            s = s[:, :1]
        if config.top_k_lora is not None:
            keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(config.top_k_lora, -1).indices, True)
            s = s * keep
            if config.enable_softmax_topk:
                s = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
        rows.append(s * config.global_scaling_weight)
    return torch.cat(rows).mean(0)


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(
            layerwise_scalings=True,
            top_k_lora=2,
            enable_softmax_topk=True,
            softmax_temperature=0.5,
            global_scaling_weight=0.7,
            xlora_depth=2,
            xlora_size=8,
        ),
    ],  # fmt: skip
    ids=["shared", "layerwise-topk-softmax-temperature-global"],
)
def test_flattened_lora_loads_in_peft_and_is_the_fixed_weight_mixture(expert_dirs, tokenizer, tmp_path, settings):
    model = mixture(expert_dirs, **settings)
    out = flatten_to_lora(model, tmp_path / "flat", calibration=PROMPTS, tokenizer=tokenizer, batch_size=4)
    weights = reference_mean_weights(model, tokenizer, PROMPTS)
    with torch.no_grad(), pinned_routing(model, weights):
        expected = model.model(input_ids=IDS).logits
    plain = load_plain_lora(out)
    assert torch.allclose(logits(plain), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(logits(plain), logits(tiny_llama()), atol=1e-3)  # the experts are really in it

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is False and config["lora_dropout"] == 0.0
    assert sorted(config["target_modules"]) == ["down_proj", "embed_tokens", "q_proj", "up_proj", "v_proj"]
    ranks = {  # rank = the sum of the ranks of the experts on the module; c's rank pattern on one module
        "model.embed_tokens": 4,
        "model.layers.0.self_attn.q_proj": 4 + 2,
        "model.layers.0.self_attn.v_proj": 4 + 3,
        "model.layers.0.mlp.up_proj": 2,
        "model.layers.0.mlp.down_proj": 3,
        "model.layers.1.mlp.down_proj": 5,
    }
    for name, rank in ranks.items():
        module = plain.base_model.model.get_submodule(name)
        assert module.r["default"] == rank and module.scaling["default"] == 1.0, name


def test_a_constant_router_flattens_to_the_routed_mixture_exactly(expert_dirs, tokenizer, tmp_path):
    """A classifier whose output is the same at every token: the routed mixture IS a fixed-weight mixture, so the
    flattened adapter must give its logits, and the card must measure 100% equal tokens and a KL of 0."""
    model = mixture(expert_dirs, layerwise_scalings=True, softmax_temperature=0.8, global_scaling_weight=0.5)
    n_layers = model.n_layers
    bias = torch.randn(n_layers * 3, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        model.classifier.last_layer.weight.zero_()
        model.classifier.last_layer.bias.copy_(bias)
    out = flatten_to_lora(model, tmp_path / "flat", calibration=PROMPTS, tokenizer=tokenizer)
    routed = logits(model)
    assert torch.allclose(logits(load_plain_lora(out)), routed, atol=1e-5, rtol=0)
    card = (out / "README.md").read_text()
    assert "**100.00%** of greedy next tokens equal" in card
    kl = float(re.search(r"mean KL of the next-token distributions \*\*([^*]+)\*\*", card).group(1))
    assert abs(kl) < 1e-9
    expected = 0.5 * torch.softmax(bias.reshape(n_layers, 3) / 0.8, -1)  # the weights the card must state
    assert f"{float(expected[0, 0]):.4f}" in card and f"{float(expected[-1, 2]):.4f}" in card


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_one_expert_at_weight_one_is_that_expert_in_peft(expert_dirs, tmp_path, name):
    """Independent of xlora-hub's routing: weight 1 on one expert is that expert's own adapter (its alpha/r, rsLoRA,
    rank and alpha patterns, embeddings), and the others contribute nothing."""
    model = mixture(expert_dirs)
    out = flatten_to_lora(model, tmp_path / "flat", weights={name: 1.0})
    alone = PeftModel.from_pretrained(tiny_llama(), str(expert_dirs[name])).eval()
    assert torch.allclose(logits(load_plain_lora(out)), logits(alone), atol=1e-5, rtol=0)


def test_gpt2_conv1d_experts_flatten_with_fan_in_fan_out(tmp_path):
    """GPT-2's fused ``Conv1D`` projections store their weight transposed: the adapter says so (``fan_in_fan_out``)."""
    from factories import tiny_gpt2

    dirs = {
        "a": save_expert(tiny_gpt2, tmp_path / "a", target_modules=["c_attn", "c_fc"], seed=1, fan_in_fan_out=True),
        "b": save_expert(tiny_gpt2, tmp_path / "b", target_modules=["c_attn"], r=2, seed=2, fan_in_fan_out=True),
    }
    model = XLoraModel.from_experts(tiny_gpt2(), XLoraConfig(experts={n: str(d) for n, d in dirs.items()}))
    out = flatten_to_lora(model, tmp_path / "flat", weights={"a": 0.3, "b": 0.9})
    with torch.no_grad(), pinned_routing(model, torch.tensor([[0.3, 0.9]])):
        expected = model.model(input_ids=IDS).logits
    plain = load_plain_lora(out, base=tiny_gpt2)
    assert plain.peft_config["default"].fan_in_fan_out is True
    assert torch.allclose(logits(plain), expected, atol=1e-5, rtol=0)


def test_given_weights_and_the_card(expert_dirs, tmp_path):
    model = mixture(expert_dirs, layerwise_scalings=True)
    out = flatten_to_lora(model, tmp_path / "flat", weights={"a": 0.6, "c": 0.4})
    with torch.no_grad(), pinned_routing(model, torch.tensor([[0.6, 0.0, 0.4]])):
        expected = model.model(input_ids=IDS).logits
    assert torch.allclose(logits(load_plain_lora(out)), expected, atol=1e-5, rtol=0)
    card = ModelCard.load(out / "README.md")
    # no base model is recorded (made in memory), so no base_model and no relation to one (see the Hub test)
    assert card.data.base_model is None and getattr(card.data, "base_model_relation", None) is None
    assert card.data.library_name == "peft"
    assert "lora" in card.data.tags
    assert "Given by the user" in card.text and "Not measured (no calibration data)" in card.text
    assert str(tmp_path) not in card.text and str(expert_dirs["a"]) not in (out / "adapter_config.json").read_text()


def test_a_bare_base_name_inside_the_mixture_is_not_published_as_a_hub_id(expert_dirs, tmp_path, monkeypatch):
    mixture_dir = tmp_path / "mix"
    tiny_llama().save_pretrained(mixture_dir / "base_model")
    config = XLoraConfig(experts={n: str(d) for n, d in expert_dirs.items()})
    XLoraModel.from_experts(tiny_llama(), config).save_pretrained(mixture_dir, bundle_experts=True, overwrite=True)
    saved = json.loads((mixture_dir / "xlora_config.json").read_text())
    saved["base_model"] = {"repo_id": "base_model"}  # a valid Hub id too, but here a folder of the mixture
    (mixture_dir / "xlora_config.json").write_text(json.dumps(saved))
    monkeypatch.chdir(tmp_path)
    loaded = XLoraModel.from_pretrained(mixture_dir)
    out = flatten_to_lora(loaded, tmp_path / "flat", weights={"a": 1.0})
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] is None and adapter["revision"] is None
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None and getattr(card.data, "base_model_relation", None) is None
    assert "names no base model" in card.text and "pass it as `base_model`" in card.text
    assert "base_model" not in card.content.split("---")[1]  # nothing about a base in the metadata
    with torch.no_grad(), pinned_routing(loaded, torch.tensor([[1.0, 0.0, 0.0]])):
        expected = loaded.model(input_ids=IDS).logits
    assert torch.allclose(logits(load_plain_lora(out)), expected, atol=1e-5, rtol=0)  # on the base passed to peft


def test_fidelity_on_the_calibration_data_is_measured_against_the_routed_mixture(expert_dirs, tokenizer, tmp_path):
    """The card's numbers recomputed by hand, one unpadded calibration text at a time."""
    model = mixture(expert_dirs, layerwise_scalings=True, seed=11)
    data = tmp_path / "calibration.txt"
    data.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out = flatten_to_lora(model, tmp_path / "flat", calibration=data, tokenizer=tokenizer, batch_size=3)
    plain = load_plain_lora(out)
    equal = positions = 0
    kl = 0.0
    for text in PROMPTS:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        routed = torch.log_softmax(logits(model, ids)[0].double(), -1)
        flat = torch.log_softmax(logits(plain, ids)[0].double(), -1)
        equal += int((routed.argmax(-1) == flat.argmax(-1)).sum())
        positions += ids.shape[1]
        kl += float((routed.exp() * (routed - flat)).sum())
    card = (out / "README.md").read_text()
    import hashlib

    assert f"`calibration.txt`: {len(PROMPTS)} examples, {positions} tokens" in card
    assert hashlib.sha256(data.read_bytes()).hexdigest() in card
    assert f"({positions} next-token positions)" in card
    assert f"**{100 * equal / positions:.2f}%**" in card
    stated = float(re.search(r"mean KL of the next-token distributions \*\*([^*]+)\*\*", card).group(1))
    assert kl > 0 and stated == pytest.approx(kl / positions, rel=1e-3)


def test_errors_name_the_fix(expert_dirs, tmp_path):
    model = mixture(expert_dirs)
    with pytest.raises(InvalidConfigError, match=r"pass calibration= .* or weights="):
        flatten_to_lora(model, tmp_path / "a")
    with pytest.raises(InvalidConfigError, match=r"\['math'\], which is not an expert of the mixture; its experts"):
        flatten_to_lora(model, tmp_path / "b", weights={"a": 1.0, "math": 0.5})
    with pytest.raises(InvalidConfigError, match="must be a finite number"):
        flatten_to_lora(model, tmp_path / "c", weights={"a": float("nan")})
    with pytest.raises(InvalidConfigError, match="batch_size must be a positive integer, got 0"):
        flatten_to_lora(model, tmp_path / "d", calibration=PROMPTS, batch_size=0)
    with pytest.raises(DataFormatError, match="A tokenizer is needed .* pass `tokenizer=`"):
        flatten_to_lora(model, tmp_path / "d", calibration=PROMPTS)
    with pytest.raises(InvalidConfigError, match="NAME=WEIGHT pairs .* got 'b'"):
        parse_weights("a=0.5,b")
    assert parse_weights("a=0.5, b=1e-1") == {"a": 0.5, "b": 0.1}
    assert not any((tmp_path / n).exists() for n in "abcd")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(Exception, match="overwrite"):
        flatten_to_lora(model, tmp_path / "full", weights={"a": 1.0})
    assert (tmp_path / "full" / "keep.txt").exists()


def test_push_to_the_hub_and_load_with_peft_from_there(hub, expert_dirs, tmp_path):
    model = XLoraModel.from_experts(
        tiny_llama(),
        XLoraConfig(experts={n: str(d) for n, d in expert_dirs.items()}, base_model={"repo_id": "alice/tiny-base"}),
    )
    out = flatten_to_lora(model, tmp_path / "flat", weights={"a": 0.5, "b": 0.3, "c": 0.2})
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "alice/tiny-base"
    repo_id = f"alice/flat-{uuid.uuid4().hex[:8]}"
    info = push_flattened_lora(out, repo_id, token=hub.token)
    assert re.fullmatch(r"[0-9a-f]{40}", info.oid)
    card = ModelCard.load(repo_id, token=hub.token)
    assert card.data.base_model == "alice/tiny-base" and card.data.base_model_relation == "adapter"
    from_hub = PeftModel.from_pretrained(tiny_llama(), repo_id, token=hub.token).eval()
    assert torch.allclose(logits(from_hub), logits(load_plain_lora(out)), atol=1e-6, rtol=0)


def test_cli_convert_to_lora(expert_dirs, tokenizer, tmp_path, capsys):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    tokenizer.save_pretrained(base)
    mix = tmp_path / "mix"
    built = XLoraModel.from_experts(
        tiny_llama(), XLoraConfig(experts={n: str(d) for n, d in expert_dirs.items()}, base_model=str(base))
    )
    built.save_pretrained(mix, bundle_experts=True)
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS), encoding="utf-8")

    assert cli_main(["convert", str(mix), str(tmp_path / "out"), "--to", "lora", "--calibration", str(data)]) == 0
    assert "to lora:" in capsys.readouterr().out
    assert "`calib.jsonl`" in (tmp_path / "out" / "README.md").read_text()
    load_plain_lora(tmp_path / "out")
    assert convert_main(["export", "lora", str(mix), str(tmp_path / "out2"), "--weights", "a=1"]) == 0
    assert "Given by the user" in (tmp_path / "out2" / "README.md").read_text()

    for argv, phrase in [
        (["--to", "lora"], "--to lora needs --calibration DATA"),
        (["--to", "peft", "--weights", "a=1"], "only apply with --to lora"),
    ]:
        assert cli_main(["convert", str(mix), str(tmp_path / "x"), *argv]) == 2
        assert phrase in capsys.readouterr().err
    assert cli_main(["convert", str(mix), str(tmp_path / "x"), "--to", "lora", "--weights", "zz=1"]) == 1
    assert "'zz'" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_cli_calibration_tokenizer_falls_back_to_base_model_or_takes_tokenizer(
    expert_dirs, tokenizer, tmp_path, capsys
):
    bare, with_tokenizer, only_tokenizer = tmp_path / "bare", tmp_path / "base", tmp_path / "tok"
    tiny_llama().save_pretrained(bare)  # the recorded base has no tokenizer
    tiny_llama().save_pretrained(with_tokenizer)
    tokenizer.save_pretrained(with_tokenizer)
    tokenizer.save_pretrained(only_tokenizer)
    mix = tmp_path / "mix"
    config = XLoraConfig(experts={n: str(d) for n, d in expert_dirs.items()}, base_model=str(bare))
    XLoraModel.from_experts(tiny_llama(), config).save_pretrained(mix, bundle_experts=True)
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS[:2]), encoding="utf-8")
    calib = ["--calibration", str(data)]

    assert cli_main(["convert", str(mix), str(tmp_path / "x"), "--to", "lora", *calib]) == 1
    err = capsys.readouterr().err
    assert "No tokenizer could be loaded" in err and "--tokenizer" in err and "--base-model" in err
    assert convert_main(["export", "lora", str(mix), str(tmp_path / "x"), *calib]) == 1
    assert "--tokenizer" in capsys.readouterr().err
    for i, extra in enumerate((["--base-model", str(with_tokenizer)], ["--tokenizer", str(only_tokenizer)])):
        assert cli_main(["convert", str(mix), str(tmp_path / f"a{i}"), "--to", "lora", *calib, *extra]) == 0
        assert convert_main(["export", "lora", str(mix), str(tmp_path / f"b{i}"), *calib, *extra]) == 0
        assert "`calib.jsonl`" in (tmp_path / f"b{i}" / "README.md").read_text()
    assert (
        cli_main(["convert", str(mix), str(tmp_path / "y"), "--to", "lora", "--weights", "a=1", "--tokenizer", "t"])
        == 2
    )
    assert "--tokenizer only applies with --to lora --calibration" in capsys.readouterr().err


def test_a_mixture_on_a_4bit_base_flattens_to_a_lora_peft_loads_on_that_base(tmp_path):
    """bitsandbytes NF4 (QLoRA's serving case): the LoRA factors are plain tensors, and peft puts the flattened
    adapter on the quantized base as it does any LoRA."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (the `quant` extra); CI installs it")
    import transformers as tf

    sizes = dict(hidden_size=64, intermediate_size=128)  # bitsandbytes' CPU 4-bit kernels need multiples of 64
    folder = tmp_path / "base"
    tiny_llama(**sizes).save_pretrained(folder)
    experts = {
        name: save_expert(lambda: tiny_llama(**sizes), tmp_path / name, target_modules=targets, r=r, seed=seed)
        for name, targets, r, seed in [("a", ["q_proj", "v_proj"], 3, 41), ("b", ["v_proj", "down_proj"], 2, 42)]
    }

    def quantized_base():
        config = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tf.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu").eval()

    model = XLoraModel.from_experts(quantized_base(), XLoraConfig(experts={n: str(d) for n, d in experts.items()}))
    out = flatten_to_lora(model, tmp_path / "flat", weights={"a": 0.7, "b": 0.4})
    with torch.no_grad(), pinned_routing(model, torch.tensor([[0.7, 0.4]])):
        expected = model.model(input_ids=IDS).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = PeftModel.from_pretrained(quantized_base(), str(out)).eval()
    assert type(plain.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    # bitsandbytes rounds each layer's input, so the stacked and the peft deltas differ a little (test_quantized.py)
    assert torch.allclose(logits(plain), expected, atol=5e-5, rtol=0)

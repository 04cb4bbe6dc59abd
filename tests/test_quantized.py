"""X-LoRA over quantized bases: bitsandbytes 4/8-bit, torchao, optimum-quanto (all on CPU, tiny seeded Llama).

The base is a tiny Llama saved once and loaded through transformers with each backend's quantization config, as
a user would. Every backend is checked for: a forward; zero scalings giving exactly the quantized base; one
forced expert giving that expert alone in peft (layer by layer to 1e-5, and for the whole model to a tolerance
per backend, since bitsandbytes rounds each layer's input and small differences grow through the layers);
cached generation equal to uncached; classifier training (and QLoRA-style expert training) lowering the loss;
and mixtures moving between quantized and unquantized bases.

A backend that is not installed skips with the reason; CI installs all of them (the ``quant`` extra).
"""

from __future__ import annotations

import logging
import re
import warnings

import pytest
import torch
import transformers as tf
from factories import VOCAB, save_expert, tiny_llama
from peft import PeftModel

from xlora_hub import IncompatibleExpertError, InvalidConfigError, XLoraConfig, XLoraModel
from xlora_hub.data import IGNORE_INDEX, TokenizedDataset
from xlora_hub.layers import RoutingState, XLoraLinear, wrap_lora_layer
from xlora_hub.quantization import is_quantized_tensor
from xlora_hub.training import evaluate_loss, train_classifier

# bitsandbytes' 4-bit CPU kernels need a multiple of its block size (64) in every quantized layer.
SIZES = dict(hidden_size=64, intermediate_size=128)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SKIP = "{} is not installed (pip install 'xlora-hub[quant]'); CI installs it"

# Whole-model |logits| difference allowed between one forced expert in X-LoRA and that expert in peft. The
# stacked delta rounds differently from peft's per-expert one (~1e-7); a backend that quantizes each layer's
# input (torchao's dynamic int8 activations; bitsandbytes' int8 casts it to float16) can turn that into a
# different rounding of the next layer's input, so those differences grow through the layers. Layer by layer,
# on the same input, every backend matches to LAYER_ATOL. Measured on CPU (README, "Big models"): at most
# 2.2e-6 (bitsandbytes), 1.1e-6 (torchao weight-only, quanto), 1.1e-4 (torchao dynamic int8).
MODEL_ATOL = {"bnb": 5e-5, "bnb-int8": 5e-5, "torchao-int8-dynamic": 1e-3}
DEFAULT_MODEL_ATOL = 2e-5
LAYER_ATOL = 1e-5
# Cached against uncached generation scores: the cached attention rounds differently in its last bits, which
# the same input rounding amplifies. Measured: 2.9e-4 (bnb int8), 2.7e-4 (torchao dynamic int8), 2.9e-5
# (bnb 4-bit), 1.8e-6 (torchao weight-only, quanto).
GENERATION_ATOL = {"bnb-int8": 1e-3, "torchao-int8-dynamic": 1e-3, "bnb": 2e-4}


def _bnb(**kwargs):
    pytest.importorskip("bitsandbytes", reason=SKIP.format("bitsandbytes"))
    return tf.BitsAndBytesConfig(**kwargs)


def _torchao(name: str, **kwargs):
    pytest.importorskip("torchao", reason=SKIP.format("torchao"))
    import torchao.quantization as q

    return tf.TorchAoConfig(quant_type=getattr(q, name)(**kwargs))


def _quanto(weights: str):
    pytest.importorskip("optimum.quanto", reason=SKIP.format("optimum-quanto"))
    return tf.QuantoConfig(weights=weights)


BACKENDS = {
    "bnb-nf4": lambda: _bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "bnb-nf4-double-quant": lambda: _bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "bnb-fp4": lambda: _bnb(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "bnb-fp4-double-quant": lambda: _bnb(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "bnb-int8": lambda: _bnb(load_in_8bit=True),
    "torchao-int8-weight-only": lambda: _torchao("Int8WeightOnlyConfig"),
    "torchao-int8-dynamic": lambda: _torchao("Int8DynamicActivationInt8WeightConfig"),
    "torchao-intx-weight-only": lambda: _torchao("IntxWeightOnlyConfig"),
    "quanto-int8": lambda: _quanto("int8"),
}
PEFT_LAYER = {
    "bnb-int8": "Linear8bitLt",
    "bnb": "Linear4bit",
    "torchao": "TorchaoLoraLinear",
    "quanto": "Linear",
}


def model_atol(backend: str) -> float:
    return MODEL_ATOL.get(backend, MODEL_ATOL.get(_family(backend), DEFAULT_MODEL_ATOL))


def _family(backend: str) -> str:
    return "bnb-int8" if backend == "bnb-int8" else backend.split("-")[0]


def base_model() -> tf.PreTrainedModel:
    return tiny_llama(**SIZES)


@pytest.fixture(autouse=True)
def _quiet():
    """bitsandbytes' int8 matmul warns at every call that it casts its input to float16."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        yield


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quant-base") / "base"
    base_model().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-experts")
    # alpha/r of 5/3 and 7/2: scalings that are not powers of two, so the stacked and per-expert math round differently
    return [
        save_expert(base_model, root / "e0", target_modules=TARGETS, r=3, alpha=5, seed=31, scale=0.3),
        save_expert(base_model, root / "e1", target_modules=TARGETS[:4], r=2, alpha=7, seed=32, scale=0.3),
    ]


# One backend per peft layer class, for the checks that do not depend on the quantization's numbers.
ONE_PER_LAYER_CLASS = ["bnb-nf4", "bnb-int8", "torchao-int8-weight-only", "quanto-int8"]


@pytest.fixture(params=list(BACKENDS))
def backend(request) -> str:
    BACKENDS[request.param]()  # skips when the backend is not installed
    return request.param


@pytest.fixture(params=ONE_PER_LAYER_CLASS)
def layer_class_backend(request) -> str:
    BACKENDS[request.param]()
    return request.param


def load_base(base_dir, backend: str | None) -> tf.PreTrainedModel:
    """The tiny base, quantized by transformers with the backend's config (``None``: full precision)."""
    kwargs = {} if backend is None else {"quantization_config": BACKENDS[backend](), "device_map": "cpu"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tf.AutoModelForCausalLM.from_pretrained(base_dir, **kwargs).eval()


def mixture(base_dir, experts, backend: str | None, **config) -> XLoraModel:
    torch.manual_seed(0)
    cfg = XLoraConfig(experts={f"e{k}": str(d) for k, d in enumerate(experts)}, **config)
    return XLoraModel.from_experts(load_base(base_dir, backend), cfg)


def force_routing(model: XLoraModel, scalings: list[float]) -> None:
    """Route every token to fixed scalings: a zero classifier (no softmax) with the scalings as its bias."""
    assert not model.xlora_config.enable_softmax
    with torch.no_grad():
        model.classifier.last_layer.weight.zero_()
        model.classifier.last_layer.bias.copy_(torch.tensor(scalings))


def input_ids(batch: int = 2, seq: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- forward and parity
def test_quantized_layers_are_mixed_on_the_stacked_path(base_dir, experts, backend):
    model = mixture(base_dir, experts, backend)
    layers = model.xlora_layers
    assert len(layers) == 2 * len(TARGETS)
    assert all(type(layer) is XLoraLinear for layer in layers)
    expected = PEFT_LAYER[_family(backend)]
    assert {type(layer.lora_layer).__name__ for layer in layers} == {expected}
    assert all(is_quantized_tensor(layer.base_layer.weight) for layer in layers)
    # the experts stay in the compute dtype; the quantized base weights are untouched
    assert {t.dtype for layer in layers for t in layer._sources} == {torch.float32}
    assert model.classifier.last_layer.weight.dtype == torch.float32
    assert model.xlora_config.base_model.quantization.startswith(backend.split("-")[0].replace("bnb", "bitsandbytes"))
    with torch.no_grad():
        out = model(input_ids=input_ids())
    assert out.logits.shape == (2, 9, VOCAB) and torch.isfinite(out.logits).all()
    assert not any(layer._use_loop() for layer in layers)  # inference takes the stacked path


def test_zero_scalings_give_exactly_the_quantized_base(base_dir, experts, backend):
    model = mixture(base_dir, experts, backend, enable_softmax=False)
    force_routing(model, [0.0, 0.0])
    ids = input_ids()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        base = load_base(base_dir, backend)(input_ids=ids).logits
    assert torch.equal(ours, base)


def test_one_forced_expert_matches_that_expert_in_peft(base_dir, experts, backend):
    model = mixture(base_dir, experts, backend, enable_softmax=False)
    force_routing(model, [0.0, 1.0])
    reference = PeftModel.from_pretrained(load_base(base_dir, backend), str(experts[1])).eval()
    ids = input_ids()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = reference(input_ids=ids).logits
    atol = model_atol(backend)
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)

    # layer by layer, on the same input, the match is tight on every backend
    peft_layers = dict(reference.base_model.model.named_modules())
    x = torch.randn(2, 5, SIZES["hidden_size"], generator=torch.Generator().manual_seed(1))
    routing = torch.tensor([0.0, 1.0]).expand(2, 5, 1, 2)
    compared = 0
    for layer in model.xlora_layers:
        if layer.base_layer.in_features != x.shape[-1]:
            continue
        with torch.no_grad(), model._routing(routing):
            ours_layer = layer(x)
        with torch.no_grad():
            theirs_layer = peft_layers[layer.module_name](x)
        torch.testing.assert_close(ours_layer, theirs_layer, atol=LAYER_ATOL, rtol=0)
        compared += 1
    assert compared >= 8


def test_cached_generation_equals_uncached(base_dir, experts, backend):
    model = mixture(base_dir, experts, backend)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.normal_(std=0.5, generator=torch.Generator().manual_seed(2))
    ids = input_ids(seq=5)
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    cached = model.generate(input_ids=ids, use_cache=True, **kwargs)
    uncached = model.generate(input_ids=ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    atol = GENERATION_ATOL.get(backend, GENERATION_ATOL.get(_family(backend), DEFAULT_MODEL_ATOL))
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------- training
def _expert_targets(base_dir, experts, backend: str, n: int) -> TokenizedDataset:
    """Sequences whose targets are what expert 1 alone predicts: routing to it is what lowers the loss."""
    teacher = PeftModel.from_pretrained(load_base(base_dir, backend), str(experts[1])).eval()
    ids = torch.randint(3, VOCAB, (n, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        predicted = teacher(input_ids=ids).logits.argmax(-1)
    rows = [
        {
            "input_ids": ids[i].tolist(),
            "labels": [IGNORE_INDEX] + predicted[i, :-1].tolist(),
            "attention_mask": [1] * 10,
        }
        for i in range(n)
    ]
    return TokenizedDataset(rows)


def test_classifier_training_lowers_the_loss(base_dir, experts, backend):
    model = mixture(base_dir, experts, backend)
    data = _expert_targets(base_dir, experts, backend, 16)
    before = evaluate_loss(model, data, batch_size=8)
    result = train_classifier(model, data, epochs=3, lr=3e-2, batch_size=8, progress=False)
    after = evaluate_loss(model, data, batch_size=8)
    assert result.steps == 6
    assert after < before - 0.01, (before, after)


def test_trainable_experts_train_qlora_style(base_dir, experts, backend):
    model = mixture(base_dir, experts, backend, use_trainable_adapters=True)
    layer = model.xlora_layers[0]
    probe = torch.randn(3, SIZES["hidden_size"], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # the quantized weight itself may not support comparison: compare what it computes
        frozen = layer.base_layer(probe)
    expert_a = layer.lora_layer.lora_A["e0"].weight.detach().clone()
    assert not any(p.requires_grad for n, p in model.model.named_parameters() if "lora_" not in n)
    data = _expert_targets(base_dir, experts, backend, 8)
    before = evaluate_loss(model, data, batch_size=8)
    train_classifier(model, data, epochs=3, lr=1e-2, batch_size=8, progress=False)
    after = evaluate_loss(model, data, batch_size=8)
    assert after < before - 0.01, (before, after)
    assert not torch.equal(layer.lora_layer.lora_A["e0"].weight, expert_a)  # the expert trained
    with torch.no_grad():
        assert torch.equal(layer.base_layer(probe), frozen)  # the quantized base did not move


# ---------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("direction", ["quantized-to-full", "full-to-quantized"])
def test_mixture_moves_between_quantized_and_full_precision_bases(
    tmp_path, base_dir, experts, layer_class_backend, direction
):
    backend = layer_class_backend
    saved_on, loaded_on = (backend, None) if direction == "quantized-to-full" else (None, backend)
    model = mixture(base_dir, experts, saved_on)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.normal_(std=0.5, generator=torch.Generator().manual_seed(4))
    model.save_pretrained(tmp_path / "mix")
    saved = XLoraConfig.load(tmp_path / "mix" / "xlora_config.json")
    assert (saved.base_model.quantization is None) == (saved_on is None)

    loaded = XLoraModel.from_pretrained(tmp_path / "mix", base_model=load_base(base_dir, loaded_on))
    assert (loaded.xlora_config.base_model.quantization is None) == (loaded_on is None)
    for key, value in model.classifier.state_dict().items():
        assert torch.equal(loaded.classifier.state_dict()[key], value)
    # on the base it is loaded on, it computes what a mixture built there with the same classifier does
    rebuilt = mixture(base_dir, experts, loaded_on)
    rebuilt.classifier.load_state_dict(model.classifier.state_dict())
    ids = input_ids()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, rebuilt(input_ids=ids).logits)


def test_quantization_is_information_only_in_the_config():
    old = {"format_version": 1, "experts": [{"name": "a", "path": "a"}], "base_model": {"repo_id": "org/base"}}
    assert XLoraConfig.from_dict(old).base_model.quantization is None  # configs from before the field load
    new = dict(old, base_model={"repo_id": "org/base", "quantization": "bitsandbytes-nf4"})
    config = XLoraConfig.from_dict(new)
    assert config.base_model.quantization == "bitsandbytes-nf4"
    assert config.to_dict()["base_model"] == new["base_model"]
    assert "quantization" not in XLoraConfig.from_dict(old).to_dict()["base_model"]
    with pytest.raises(InvalidConfigError, match="`base_model.quantization` must be a non-empty string"):
        XLoraConfig.from_dict(dict(old, base_model={"repo_id": "org/base", "quantization": 4}))


def test_quantized_base_is_not_cast_to_another_dtype(base_dir, experts):
    BACKENDS["bnb-nf4"]()
    cfg = XLoraConfig(experts={"e0": str(experts[0])})
    with pytest.raises(
        InvalidConfigError, match=r"quantized \(bitsandbytes-nf4\) and cannot be cast to torch.bfloat16"
    ):
        XLoraModel.from_experts(load_base(base_dir, "bnb-nf4"), cfg, torch_dtype=torch.bfloat16)
    # its own dtype and a device are fine (transformers refuses `.to(dtype=None)` on a bitsandbytes model)
    model = XLoraModel.from_experts(load_base(base_dir, "bnb-nf4"), cfg, torch_dtype=torch.float32, device="cpu")
    assert model.device.type == "cpu"


# ---------------------------------------------------------------------------------------------- unsupported layers
def test_unsupported_quantized_layer_names_its_class_and_the_supported_ones():
    from peft import LoraConfig
    from peft.tuners.lora.gptq import GPTQLoraLinear

    layer = GPTQLoraLinear(torch.nn.Linear(8, 8), "e0", config=LoraConfig(r=2), r=2, lora_alpha=4)
    with pytest.raises(IncompatibleExpertError) as info:
        wrap_lora_layer(layer, layer_index=0, expert_names=["e0"], routing=RoutingState(), module_name="layers.0.q")
    message = str(info.value)
    assert "'layers.0.q' is a GPTQLoraLinear (peft's LoRA over a GPTQ-quantized layer)" in message
    assert "lora.bnb.Linear4bit" in message and "lora.TorchaoLoraLinear" in message and "optimum-quanto" in message
    assert "the experts need no change" in message and "Retrain" not in message


def test_unsupported_plain_layer_lists_the_supported_ones():
    from peft import LoraConfig
    from peft.tuners.lora.layer import Conv1d

    layer = Conv1d(torch.nn.Conv1d(4, 4, 1), "e0", config=LoraConfig(r=2), r=2, lora_alpha=4)
    with pytest.raises(IncompatibleExpertError, match=r"'c' is a Conv1d, which X-LoRA does not mix\. Supported: lora"):
        wrap_lora_layer(layer, layer_index=0, expert_names=["e0"], routing=RoutingState(), module_name="c")


def test_base_quantized_by_an_unsupported_backend_is_refused_before_it_is_touched(experts):
    """PyTorch's own dynamic quantization: its Linear is no nn.Linear, and peft has no LoRA layer for it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = torch.ao.quantization.quantize_dynamic(base_model(), {torch.nn.Linear}, dtype=torch.qint8)
    cfg = XLoraConfig(experts={"e0": str(experts[0])})
    with pytest.raises(IncompatibleExpertError) as info:
        XLoraModel.from_experts(base, cfg)
    message = str(info.value)
    assert re.search(
        r"Expert 'e0' targets 'model\.layers\.\d\.\w+\.\w+_proj', a torch\.ao\.nn\.quantized\.dynamic", message
    )
    assert "which X-LoRA cannot mix. Supported: lora.Linear" in message and "lora.bnb.Linear8bitLt" in message
    assert not any(type(m).__name__ == "XLoraLinear" or hasattr(m, "lora_A") for m in base.modules())

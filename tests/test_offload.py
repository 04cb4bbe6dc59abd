"""Offloaded bases: a base placed by accelerate with some layers on "disk" computes what the in-memory one does.

On a CPU-only machine accelerate offloads only to "disk" (a "cpu" entry is where the model runs anyway); the
offloaded layers' weights are meta tensors that its hooks load for each forward, the case that broke the
stacked path (it read the experts' ``.weight`` once) and peft's re-dispatch (it needs the offload folder).
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from factories import VOCAB, save_expert, tiny_llama

from xlora_hub import InvalidConfigError, XLoraConfig, XLoraModel

pytest.importorskip("accelerate", reason="accelerate is not installed (pip install 'xlora-hub[train]')")

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"]
DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "disk",
    "lm_head": "disk",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    tiny_llama().save_pretrained(root / "base")
    experts = [
        save_expert(tiny_llama, root / f"e{k}", target_modules=TARGETS, r=4, alpha=6, seed=40 + k) for k in range(2)
    ]
    return root, experts


def _config(experts) -> XLoraConfig:
    return XLoraConfig(experts={f"e{k}": str(d) for k, d in enumerate(experts)}, layerwise_scalings=True)


def _randomize(model: XLoraModel) -> None:
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.normal_(std=0.5, generator=torch.Generator().manual_seed(7))


def test_disk_offloaded_base_equals_the_in_memory_one(setup, tmp_path, monkeypatch):
    root, experts = setup
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # peft writes re-keyed offloaded shards relative to it unless kept in the offload folder
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    in_memory = XLoraModel.from_experts(tf.AutoModelForCausalLM.from_pretrained(root / "base"), _config(experts))
    _randomize(in_memory)
    base = tf.AutoModelForCausalLM.from_pretrained(root / "base", device_map=DEVICE_MAP, offload_folder=tmp_path)
    assert base.model.layers[1].self_attn.q_proj.weight.is_meta  # really offloaded
    offloaded = XLoraModel.from_experts(base, _config(experts))
    offloaded.classifier.load_state_dict(in_memory.classifier.state_dict())
    assert offloaded.classifier.last_layer.weight.device.type == "cpu"  # not built on the meta device

    by_name = {layer.module_name: layer for layer in offloaded.xlora_layers}
    assert by_name["model.layers.1.self_attn.q_proj"]._offloaded and by_name["lm_head"]._offloaded
    assert not by_name["model.layers.0.self_attn.q_proj"]._offloaded  # in memory: still the stacked path

    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(offloaded(input_ids=ids).logits, in_memory(input_ids=ids).logits, atol=1e-5, rtol=0)
    kwargs = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(offloaded.generate(input_ids=ids, **kwargs), in_memory.generate(input_ids=ids, **kwargs))
    # nothing was written outside the offload folder: not in the working directory, not over the base's files
    assert list(cwd.iterdir()) == []
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before
    assert all(p.resolve().is_relative_to(tmp_path.resolve()) for p in tmp_path.rglob("*.safetensors"))


def test_disk_offloaded_base_without_a_known_offload_folder_is_refused(setup, tmp_path):
    root, experts = setup
    base = tf.AutoModelForCausalLM.from_pretrained(root / "base", device_map=DEVICE_MAP, offload_folder=tmp_path)
    for module in base.modules():  # a base whose hooks do not say where it was offloaded to
        weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if getattr(weights, "dataset", None) is not None:
            weights.dataset.save_folder = None
    with pytest.raises(InvalidConfigError, match="offloaded to disk but no offload folder is known; pass `offload_fo"):
        XLoraModel.from_experts(base, _config(experts))


def test_from_pretrained_passes_the_placement_to_transformers_and_peft(setup, tmp_path):
    root, experts = setup
    in_memory = XLoraModel.from_experts(tf.AutoModelForCausalLM.from_pretrained(root / "base"), _config(experts))
    _randomize(in_memory)
    in_memory.save_pretrained(tmp_path / "mix")
    loaded = XLoraModel.from_pretrained(tmp_path / "mix", device_map=DEVICE_MAP, offload_folder=tmp_path / "off")
    assert loaded.model.hf_device_map["model.layers.1"] == "disk"
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, in_memory(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_device_map_auto_with_little_memory(setup, tmp_path):
    root, experts = setup
    in_memory = XLoraModel.from_experts(tf.AutoModelForCausalLM.from_pretrained(root / "base"), _config(experts))
    _randomize(in_memory)
    in_memory.save_pretrained(tmp_path / "mix")
    loaded = XLoraModel.from_pretrained(
        tmp_path / "mix", device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=tmp_path / "off"
    )
    assert "disk" in set(loaded.model.hf_device_map.values())
    assert not loaded.classifier.last_layer.weight.is_meta
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, in_memory(input_ids=ids).logits, atol=1e-5, rtol=0)

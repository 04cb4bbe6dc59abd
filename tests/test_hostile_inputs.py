"""Hostile inputs (issue 10): hangs and memory, silent wrong output, unclear errors.

Each case is a file or value a stranger's mixture or expert could hold. Every one must be refused with a named
error that says which file, expert or field is at fault, before anything is built or allocated, and the
caller's base model must be left as it was.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from factories import save_expert, tiny_llama

from xlora_hub import (
    IncompatibleExpertError,
    InvalidConfigError,
    InvalidMixtureError,
    XLoraConfig,
    XLoraModel,
    inspect_mixture,
    load_mixture,
)
from xlora_hub.classifier import XLoraClassifier
from xlora_hub.config_checks import _RESERVED_NAMES, MAX_EXPERT_NAME_LENGTH, MAX_XLORA_DEPTH
from xlora_hub.errors import short_repr
from xlora_hub.hub import classifier_shapes
from xlora_hub.jsonfile import MAX_JSON_BYTES, read_json_object

ROOT = Path(__file__).resolve().parent.parent
IDS = torch.tensor([[1, 5, 9, 14, 27, 33]])


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def expert_dir(tmp_path_factory) -> Path:
    return save_expert(tiny_llama, tmp_path_factory.mktemp("experts") / "good", target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def pristine(expert_dir, tmp_path_factory) -> Path:
    model = XLoraModel.from_experts(tiny_llama(), XLoraConfig(experts={"a": str(expert_dir)}))
    return Path(model.save_pretrained(tmp_path_factory.mktemp("pristine") / "mix", bundle_experts=True))


@pytest.fixture
def saved(pristine, tmp_path) -> Path:
    """A fresh copy of a saved mixture (its expert bundled), for one test to break."""
    return Path(shutil.copytree(pristine, tmp_path / "mix"))


@pytest.fixture
def expert_copy(expert_dir, tmp_path) -> Path:
    """A fresh copy of a good expert folder, for one test to break."""
    return Path(shutil.copytree(expert_dir, tmp_path / "bad"))


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def assert_untouched(base) -> None:
    """A refused load leaves the caller's base model as it was: no LoRA layer anywhere, same weights."""
    assert not any(isinstance(m, LoraLayer) for m in base.modules())
    fresh = tiny_llama()
    for (name, p), (_, q) in zip(base.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(p, q), name


def load_fails(folder: Path, error: type[Exception], match: str) -> None:
    base = tiny_llama()
    with pytest.raises(error, match=match):
        load_mixture(folder, base_model=base)
    assert_untouched(base)


def build_fails(expert: Path, error: type[Exception], match: str) -> None:
    """Building a mixture with the (broken) expert ``bad`` next to a good one is refused before peft runs."""
    base = tiny_llama()
    with pytest.raises(error, match=match):
        XLoraModel.from_experts(base, XLoraConfig(experts={"bad": str(expert)}))
    assert_untouched(base)


def cli(args: list[str], capsys) -> tuple[int, str]:
    from xlora_hub.cli import main

    code = main(args)
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- hangs and memory
def test_huge_xlora_depth_is_refused_from_the_config_alone():
    with pytest.raises(InvalidConfigError, match=r"`xlora_depth` is 100000, above the limit of 64"):
        XLoraConfig(experts={"a": "org/a"}, xlora_depth=100_000)
    with pytest.raises(InvalidConfigError, match=r"`xlora_size` is 10000000, above the limit"):
        XLoraConfig(experts={"a": "org/a"}, xlora_size=10_000_000)
    with pytest.raises(InvalidConfigError, match=r"the classifier would have [\d,]+ parameters .*Lower `xlora_size`"):
        XLoraConfig(experts={"a": "org/a"}, xlora_depth=MAX_XLORA_DEPTH, xlora_size=65536, hidden_size=4096)
    with pytest.raises(InvalidConfigError, match=r"`layer_names` lists 20,000 layers, above the limit"):
        XLoraConfig(experts={"a": "org/a"}, layer_names=[f"l{i}" for i in range(20_000)])
    with pytest.raises(InvalidConfigError, match=r"`experts` lists 2,000 experts, above the limit"):
        XLoraConfig(experts={f"e{i}": "org/a" for i in range(2000)})


def test_classifier_refuses_an_oversized_build_before_allocating():
    config = XLoraConfig(experts={"a": "org/a"}, xlora_depth=4, xlora_size=65536)
    with pytest.raises(InvalidConfigError, match="X-LoRA classifier: the classifier would have"):
        XLoraClassifier(config, hidden_size=65536, n_layers=10, n_experts=1)
    with pytest.raises(InvalidConfigError, match=r"`n_layers` is 1,000,000, above the limit"):
        XLoraClassifier(config, hidden_size=8, n_layers=1_000_000, n_experts=1, device="meta")


def test_deep_classifier_config_is_refused_by_info_and_from_pretrained(saved, capsys):
    # 100 passes the original checks (and 100000 takes 37 s / 1.3 GB there); both exceed the depth limit
    for depth in (100, 100_000):
        edit_json(saved / "xlora_config.json", lambda d, depth=depth: d.update(xlora_depth=depth))
        with pytest.raises(InvalidConfigError, match=rf"xlora_config.json: `xlora_depth` is {depth}, above the limit"):
            inspect_mixture(saved, local_files_only=True)
        load_fails(saved, InvalidConfigError, rf"`xlora_depth` is {depth}, above the limit of {MAX_XLORA_DEPTH}")
    code, err = cli(["info", str(saved), "--offline"], capsys)
    assert code == 1 and "`xlora_depth` is 100000, above the limit of 64" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "settings",
    [dict(), dict(xlora_depth=3, xlora_size=16), dict(xlora_depth=2, xlora_dropout_p=0.0, layerwise_scalings=True)],
)
def test_classifier_shapes_by_arithmetic_match_the_built_module(settings):
    config = XLoraConfig(experts={"a": "org/a", "b": "org/b"}, **settings)
    built = XLoraClassifier(config, hidden_size=12, n_layers=3, n_experts=2, device="meta").shapes()
    assert classifier_shapes(config, hidden_size=12, n_layers=3, n_experts=2) == built


def test_classifier_file_with_many_tensors_is_refused_from_its_key_count(saved):
    save_file({f"t{i}": torch.zeros(1) for i in range(1000)}, str(saved / "xlora_classifier.safetensors"))
    load_fails(saved, InvalidMixtureError, r"holds 1,000 tensors but xlora_config.json describes a classifier of 2")


def test_expert_rank_is_checked_against_the_tensors_before_peft_allocates(expert_copy):
    # r = 10**6 would make peft allocate 10**6 x 32 factors per layer before failing with a size mismatch
    for r in (64, 1_000_000):
        edit_json(expert_copy / "adapter_config.json", lambda d, r=r: d.update(r=r))
        build_fails(
            expert_copy,
            IncompatibleExpertError,
            rf"Expert 'bad': `r` \(or `rank_pattern`\) in adapter_config.json gives '.*q_proj' rank {r}, but its "
            r"tensors have shapes \[4, 32\].*Set `r` to the tensors' rank \(4\)",
        )


def test_rank_pattern_is_honoured(tmp_path):
    expert = save_expert(tiny_llama, tmp_path / "e", target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    model = XLoraModel.from_experts(tiny_llama(), XLoraConfig(experts={"ok": str(expert)}))
    assert model.n_layers == 4
    edit_json(expert / "adapter_config.json", lambda d: d.update(rank_pattern={}))
    build_fails(expert, IncompatibleExpertError, r"gives '.*v_proj' rank 4, but its tensors have shapes \[2, 32\]")


# ---------------------------------------------------------------------------------------------- JSON
def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_mixture_config_is_a_named_error(saved, capsys):
    path = saved / "xlora_config.json"
    text = path.read_text()
    path.write_text(text.rstrip().rstrip("}") + f', "deep": {nested(100_000)}}}')
    with pytest.raises(InvalidConfigError, match=r"xlora_config.json: nested deeper than 32 levels"):
        inspect_mixture(saved, local_files_only=True)
    load_fails(saved, InvalidConfigError, r"xlora_config.json: nested deeper than 32 levels")
    code, err = cli(["info", str(saved), "--offline"], capsys)
    assert code == 1 and "nested deeper than 32 levels" in err and "RecursionError" not in err
    assert len(err.strip().splitlines()) == 1


def test_deeply_nested_adapter_config_is_a_named_error(expert_copy):
    path = expert_copy / "adapter_config.json"
    path.write_text(path.read_text().rstrip().rstrip("}") + f', "deep": {nested(100_000)}}}')
    build_fails(expert_copy, IncompatibleExpertError, r"Expert 'bad': adapter_config.json: nested deeper than 32")
    path.write_text(json.dumps({"peft_type": "LORA", "deep": json.loads(nested(40))}))
    build_fails(expert_copy, IncompatibleExpertError, r"Expert 'bad': adapter_config.json: nested deeper than 32")


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"a": NaN}', "the non-finite number NaN is not allowed"),
        ('{"a": -Infinity}', "the non-finite number -Infinity is not allowed"),
        ('{"a": 1e999}', r"the number '1e999' is too large"),
        ('{"a": ' + "9" * 5000 + "}", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object, got list"),
        ('{"a": ', "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8 text"),
    ],
)
def test_json_reader_refuses_with_the_file_named(tmp_path, text, match):
    path = tmp_path / "some.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(InvalidConfigError, match=re.escape(str(path)) + ".*" + match):
        read_json_object(path)


def test_json_reader_size_cap_is_checked_before_reading(tmp_path):
    path = tmp_path / "big.json"
    with open(path, "wb") as f:
        f.truncate(MAX_JSON_BYTES + 1)
    with pytest.raises(InvalidConfigError, match=r"big.json: 16,777,217 bytes, larger than the 16,777,216 bytes"):
        read_json_object(path)


def test_non_finite_and_nested_values_in_saved_files_are_refused(saved, expert_copy):
    path = saved / "xlora_config.json"
    original = path.read_text()
    for field_name, value in (("softmax_temperature", "NaN"), ("global_scaling_weight", "Infinity")):
        data = json.loads(original)
        data[field_name] = "@@"
        path.write_text(json.dumps(data).replace('"@@"', value))
        load_fails(saved, InvalidConfigError, rf"xlora_config.json: the non-finite number {value} is not allowed")
    adapter = expert_copy / "adapter_config.json"
    adapter.write_text(adapter.read_text().replace('"lora_alpha": 8', '"lora_alpha": NaN'))
    build_fails(expert_copy, IncompatibleExpertError, r"Expert 'bad': adapter_config.json: the non-finite number NaN")


def test_foreign_format_configs_use_the_bounded_reader(tmp_path):
    from xlora_hub.convert import detect_format

    folder = tmp_path / "foreign"
    folder.mkdir()
    (folder / "xlora_config.json").write_text('{"adapters": ' + nested(100_000) + "}")
    with pytest.raises(InvalidConfigError, match=r"foreign: xlora_config.json: nested deeper than 32"):
        detect_format(folder)


def test_every_json_file_is_read_through_the_one_reader():
    """No module but the reader parses JSON files (data.py reads JSONL training data line by line)."""
    offenders = []
    for path in sorted((ROOT / "xlora_hub").rglob("*.py")):  # the packages' modules too
        if path.name in ("jsonfile.py", "data.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bjson\.loads?\(", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert offenders == [], f"use xlora_hub.jsonfile.read_json_object instead: {offenders}"


# ---------------------------------------------------------------------------------------------- expert files
def write_tensors(expert: Path, change) -> None:
    path = expert / "adapter_model.safetensors"
    tensors = dict(load_file(str(path)))
    save_file(change(tensors), str(path))


def test_expert_file_with_no_tensors_is_refused(expert_copy):
    write_tensors(expert_copy, lambda t: {})
    build_fails(expert_copy, IncompatibleExpertError, "Expert 'bad': adapter_model.safetensors holds no tensors")


def test_expert_with_only_lora_a_is_refused(expert_copy):
    write_tensors(expert_copy, lambda t: {k: v for k, v in t.items() if "lora_A" not in k or "q_proj" in k})
    write_tensors(expert_copy, lambda t: {k: v for k, v in t.items() if not ("lora_B" in k and "q_proj" in k)})
    build_fails(
        expert_copy, IncompatibleExpertError, r"Expert 'bad': module '.*q_proj' has \['lora_A'\] but no \['lora_B'\]"
    )


def test_tensors_outside_target_modules_are_refused(expert_copy):
    edit_json(expert_copy / "adapter_config.json", lambda d: d.update(target_modules=["q_proj"]))
    build_fails(
        expert_copy,
        IncompatibleExpertError,
        r"Expert 'bad': adapter_model.safetensors holds tensors for module\(s\) outside `target_modules` "
        r"\['q_proj'\]: \['model.layers.0.self_attn.v_proj'",
    )


def test_target_modules_selecting_untrained_modules_are_refused(expert_copy):
    edit_json(expert_copy / "adapter_config.json", lambda d: d.update(target_modules=["q_proj", "v_proj", "k_proj"]))
    build_fails(expert_copy, IncompatibleExpertError, r"selects 2 module\(s\) with no tensors .*k_proj")


def test_non_lora_tensors_are_refused(expert_copy):
    write_tensors(expert_copy, lambda t: {**t, "base_model.model.lm_head.weight": torch.zeros(128, 32)})
    build_fails(expert_copy, IncompatibleExpertError, r"holds tensors that are not LoRA factors .*lm_head.weight")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.pop("peft_type"), r"Expert 'bad': adapter_config.json has no `peft_type`.*\"LORA\""),
        (lambda d: d.update(peft_type="lora"), r"`peft_type` is 'lora' .*peft only reads \"LORA\""),
        (lambda d: d.update(peft_type=["LORA"]), r"`peft_type` in adapter_config.json must be a string"),
        (lambda d: d.update(r=0), r"Expert 'bad': `r` in adapter_config.json must be a positive integer.*got 0"),
        (lambda d: d.update(r="4"), r"`r` in adapter_config.json must be a positive integer.*got '4'"),
        (lambda d: d.update(r=True), r"`r` in adapter_config.json must be a positive integer"),
        (lambda d: d.update(lora_alpha="8"), r"`lora_alpha` in adapter_config.json must be a finite number"),
        (lambda d: d.update(rank_pattern={"q_proj": "2"}), r"`rank_pattern` .*must map module names to positive"),
        (lambda d: d.update(target_modules="^nothing$"), r"`target_modules` '\^nothing\$' .*matches no module"),
        (lambda d: d.update(target_modules=".*"), r"`target_modules` '\.\*' selects .* LoRA cannot adapt"),
        (lambda d: d.update(target_modules="(unclosed"), r"`target_modules` '\(unclosed' .*is not a valid regex"),
        (lambda d: d.update(target_modules=None), r"has no `target_modules`"),
        (lambda d: d.update(target_modules=[3]), r"`target_modules` .*must be a list of module names or a regex"),
        (lambda d: d.update(modules_to_save=["lm_head"]), r"Expert 'bad' has modules_to_save \['lm_head'\]"),
    ],
)
def test_bad_adapter_config_values_are_named(expert_copy, change, match):
    edit_json(expert_copy / "adapter_config.json", change)
    build_fails(expert_copy, IncompatibleExpertError, match)


def test_a_regex_target_modules_that_fits_is_accepted(expert_copy):
    edit_json(expert_copy / "adapter_config.json", lambda d: d.update(target_modules=r".*\.(q_proj|v_proj)"))
    model = XLoraModel.from_experts(tiny_llama(), XLoraConfig(experts={"ok": str(expert_copy)}))
    assert model.n_layers == 4


# ---------------------------------------------------------------------------------------------- non-finite numbers
@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(softmax_temperature=math.nan), "`softmax_temperature` must be a finite number, got nan"),
        (dict(softmax_temperature=1e-320), r"`softmax_temperature` is 1e-320, below the minimum of 0.001"),
        (dict(softmax_temperature=math.inf), "`softmax_temperature` must be a finite number"),
        (dict(global_scaling_weight=math.inf), "`global_scaling_weight` must be a finite number, got inf"),
        (dict(global_scaling_weight=1e300), r"`global_scaling_weight` is 1e\+300, beyond"),
        (dict(global_scaling_weight=10**400), "`global_scaling_weight` must be a finite number"),
        (dict(scaling_pass_value=math.nan), "`scaling_pass_value` must be a finite number, got nan"),
        (dict(scaling_pass_value=-1e9), r"`scaling_pass_value` is -1000000000.0, beyond"),
        (dict(xlora_dropout_p=math.nan), r"`xlora_dropout_p` must be a finite number"),
    ],
)
def test_non_finite_settings_are_refused(settings, match):
    with pytest.raises(InvalidConfigError, match=match):
        XLoraConfig(experts={"a": "org/a"}, **settings)


def test_setters_refuse_non_finite_values_and_keep_the_old_one(expert_dir):
    model = XLoraModel.from_experts(tiny_llama(), XLoraConfig(experts={"a": str(expert_dir)}))
    for setter, value in (
        (model.set_global_scaling_weight, math.nan),
        (model.set_global_scaling_weight, math.inf),
        (model.set_softmax_temperature, math.nan),
        (model.set_softmax_temperature, 1e-320),
        (model.set_scaling_pass_value, math.inf),
    ):
        with pytest.raises(InvalidConfigError, match="`"):
            setter(value)
    assert model.get_global_scaling_weight() == 1.0
    assert model.classifier.softmax_temperature == 1.0 and model.xlora_config.softmax_temperature == 1.0
    assert model.xlora_config.scaling_pass_value == 0.0
    assert torch.isfinite(model(input_ids=IDS).logits).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_classifier_weights_are_refused(saved, bad):
    path = saved / "xlora_classifier.safetensors"
    tensors = dict(load_file(str(path)))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = bad
    save_file(tensors, str(path), metadata={"format": "pt"})
    load_fails(saved, InvalidMixtureError, rf"xlora_classifier.safetensors: tensor '{key}' holds NaN or infinite")


@pytest.mark.parametrize("bad", [math.nan, -math.inf])
def test_non_finite_expert_weights_are_refused(expert_copy, bad):
    def poison(tensors):
        key = next(k for k in sorted(tensors) if "v_proj.lora_B" in k)
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = bad
        return tensors

    write_tensors(expert_copy, poison)
    build_fails(
        expert_copy, IncompatibleExpertError, r"Expert 'bad': tensor model.layers.0.self_attn.v_proj.lora_B holds NaN"
    )


# ---------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("name", ["keys", "update", "forward", "training", "items", "to", "state_dict", "_hidden"])
def test_expert_names_that_are_module_attributes_are_refused(name):
    with pytest.raises(InvalidConfigError, match=rf"Expert name '{name}' is reserved.*Rename it"):
        XLoraConfig(experts={name: "org/a"})


def test_reserved_names_cover_torch_module_dicts():
    public = {n for cls in (nn.Module, nn.ModuleDict, nn.ParameterDict, dict) for n in dir(cls) if n[0] != "_"}
    assert public - _RESERVED_NAMES == set()
    assert "training" in _RESERVED_NAMES


def test_long_expert_names_are_refused_before_any_file_is_written():
    with pytest.raises(InvalidConfigError, match=rf"has 300 characters; the limit is {MAX_EXPERT_NAME_LENGTH}"):
        XLoraConfig(experts={"e" * 300: "org/a"})
    assert XLoraConfig(experts={"e" * MAX_EXPERT_NAME_LENGTH: "org/a"}).n_experts == 1
    with pytest.raises(InvalidConfigError, match="is not a valid identifier"):
        XLoraConfig(experts={"class": "org/a"})


def test_reserved_name_in_a_saved_config_is_refused(saved):
    edit_json(saved / "xlora_config.json", lambda d: d["experts"][0].update(name="keys"))
    load_fails(saved, InvalidConfigError, "Expert name 'keys' is reserved")


# ---------------------------------------------------------------------------------------------- capped messages
def test_short_repr_caps_long_values():
    assert short_repr("abc") == "'abc'"
    text = short_repr("x" * 50_000_000, limit=100)
    assert len(text) < 120 and text.endswith("...(cut)")
    assert len(short_repr(list(range(10**6)))) < 220
    assert short_repr(10**5000).startswith("<int")  # repr itself refuses such an int


def test_errors_do_not_echo_huge_values(saved, expert_copy, capsys):
    with pytest.raises(InvalidConfigError) as err:
        XLoraConfig(experts={"a": "!" * 5_000_000})
    assert len(str(err.value)) < 600
    with pytest.raises(InvalidConfigError) as err:
        XLoraConfig(experts={"a": "org/a"}, enable_softmax="y" * 5_000_000)
    assert len(str(err.value)) < 600
    edit_json(saved / "xlora_config.json", lambda d: d.update(enable_softmax="y" * 5_000_000))
    code, message = cli(["info", str(saved), "--offline"], capsys)
    assert code == 1 and "`enable_softmax` must be true or false" in message and len(message) < 800
    edit_json(expert_copy / "adapter_config.json", lambda d: d.update(r="4" * 5_000_000))
    with pytest.raises(IncompatibleExpertError) as err:
        XLoraModel.from_experts(tiny_llama(), XLoraConfig(experts={"bad": str(expert_copy)}))
    assert "`r` in adapter_config.json must be a positive integer" in str(err.value) and len(str(err.value)) < 800


# ---------------------------------------------------------------------------------------------- convert CLI
def test_convert_command_exits_1_with_one_line_for_user_errors(tmp_path, capsys):
    from xlora_hub.convert import main

    assert main(["detect", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"python -m xlora_hub.convert detect: error: Checkpoint folder {str(tmp_path / 'nowhere')!r} does not exist."
    ]
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "xlora_config.json").write_text(nested(100_000))
    assert main(["detect", str(tmp_path / "deep")]) == 1
    assert "nested deeper than 32" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:  # bad usage stays argparse's exit 2
        main(["detect"])
    assert usage.value.code == 2


# ---------------------------------------------------------------------------------------------- generation cache
def test_generate_warns_once_when_the_model_config_turned_the_cache_off(expert_dir, caplog):
    def model():
        base = tiny_llama(use_cache=False)  # as peft's X-LoRA requires; carried into the generation config
        assert base.generation_config.use_cache is False
        return XLoraModel.from_experts(base, XLoraConfig(experts={"a": str(expert_dir)}))

    first = model()
    caplog.set_level(logging.WARNING, logger="xlora_hub.generation")
    for _ in range(2):
        first.generate(input_ids=IDS, max_new_tokens=2, do_sample=False)
    warnings = [r for r in caplog.records if "without a KV cache" in r.getMessage()]
    assert len(warnings) == 1 and "Pass `use_cache=True`" in warnings[0].getMessage()

    caplog.clear()
    second = model()
    second.generate(input_ids=IDS, max_new_tokens=2, do_sample=False, use_cache=False)  # asked for: no warning
    assert not [r for r in caplog.records if "without a KV cache" in r.getMessage()]
    fast = second.generate(input_ids=IDS, max_new_tokens=2, do_sample=False, use_cache=True)
    slow = first.generate(input_ids=IDS, max_new_tokens=2, do_sample=False)
    assert torch.equal(fast, slow)

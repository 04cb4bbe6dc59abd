"""The Hub room as a package: typed entry points, the one tokenizer loader, expert origins, cwd-free refs, layering."""

from __future__ import annotations

import ast
import inspect
import json
import os
import pydoc
import sys
import uuid
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from factories import save_expert, tiny_llama

from xlora_hub import BaseModelRef, InvalidMixtureError, XLoraConfig, XLoraModel, load_mixture
from xlora_hub.hub import load_tokenizer, make_model_card

TARGETS = ["q_proj", "v_proj"]
IDS = torch.tensor([[1, 5, 9, 14, 27, 33, 60, 2]])
HUB_ROOT = Path(__file__).resolve().parent.parent / "xlora_hub" / "hub"


def word_tokenizer(words: list[str]):
    """A tiny word-level fast tokenizer; its vocabulary tells two tokenizers apart."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


@pytest.fixture(scope="module")
def expert_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pkg-experts")
    return {
        "math": save_expert(tiny_llama, root / "math", target_modules=TARGETS, seed=1),
        "code": save_expert(tiny_llama, root / "code", target_modules=TARGETS, seed=2),
    }


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


# ---------------------------------------------------------------------------------------------- typed entry points
@pytest.mark.parametrize("method", ["from_pretrained", "save_pretrained", "push_to_hub"])
def test_hub_methods_spell_out_and_document_every_option(method):
    function = getattr(XLoraModel, method)
    parameters = [p for p in inspect.signature(function).parameters.values() if p.name not in ("self", "cls")]
    kinds = {p.kind for p in parameters}
    assert inspect.Parameter.VAR_KEYWORD not in kinds and inspect.Parameter.VAR_POSITIONAL not in kinds
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters[1:])  # options are keyword-only
    doc = inspect.getdoc(function) or ""
    assert "Args:" in doc and "Returns:" in doc
    args = doc.split("Args:", 1)[1].split("Returns:", 1)[0]
    undocumented = [p.name for p in parameters if f"\n    {p.name} (" not in "\n" + args]
    assert not undocumented, f"{method}: options missing from the Args: section: {undocumented}"
    shown = pydoc.render_doc(function, renderer=pydoc.plaintext)
    assert all(p.name in shown for p in parameters)  # help() lists every option


def test_load_mixture_is_from_pretrained_as_a_function(expert_dirs, tmp_path):
    import xlora_hub

    assert inspect.signature(load_mixture) == inspect.signature(XLoraModel.from_pretrained)
    assert xlora_hub.load_mixture is load_mixture or xlora_hub.load_mixture == load_mixture
    model = XLoraModel.from_experts(tiny_llama(), XLoraConfig(experts={k: str(v) for k, v in expert_dirs.items()}))
    folder = model.save_pretrained(tmp_path / "mix")
    assert isinstance(load_mixture(folder, base_model=tiny_llama()), XLoraModel)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bundle'"):  # a typo fails at the call
        load_mixture(folder, bundle=True)


# ---------------------------------------------------------------------------------------------- expert origins
def test_each_resolved_expert_records_where_it_came_from(expert_dirs, tmp_path):
    model = XLoraModel.from_experts(tiny_llama(), XLoraConfig(experts={k: str(v) for k, v in expert_dirs.items()}))
    assert [e.origin for e in model.experts] == ["local", "local"]
    folder = model.save_pretrained(tmp_path / "mix")
    loaded = XLoraModel.from_pretrained(folder, base_model=tiny_llama())
    assert [e.origin for e in loaded.experts] == ["bundled", "bundled"]
    assert not hasattr(loaded, "_xlora_hub_bundled_experts")  # no undeclared attribute set from outside
    # saving the loaded mixture again keeps its bundled experts bundled (read from the origins)
    again = loaded.save_pretrained(tmp_path / "again")
    config = json.loads((again / "xlora_config.json").read_text())
    assert [e["path"] for e in config["experts"]] == ["experts/math", "experts/code"]


# ---------------------------------------------------------------------------------------------- stored refs and the cwd
def test_model_card_base_model_does_not_depend_on_the_working_directory(expert_dirs, tmp_path, monkeypatch):
    model = XLoraModel.from_experts(tiny_llama(), XLoraConfig(experts={k: str(v) for k, v in expert_dirs.items()}))
    config = model.xlora_config.replace(base_model=BaseModelRef(repo_id="my-org/base"))
    monkeypatch.chdir(tmp_path)
    assert make_model_card(config).data.base_model == "my-org/base"
    (tmp_path / "my-org" / "base").mkdir(parents=True)  # a folder of that name where the command runs
    assert make_model_card(config).data.base_model == "my-org/base"


# ---------------------------------------------------------------------------------------------- the tokenizer loader
def self_contained_mixture(expert_dirs, folder: Path, name: str = "./base_model") -> Path:
    """A saved mixture whose config names its base model ``name``, with the base (and its tokenizer) inside."""
    model = XLoraModel.from_experts(tiny_llama(), XLoraConfig(experts={k: str(v) for k, v in expert_dirs.items()}))
    model.xlora_config = model.xlora_config.replace(base_model=BaseModelRef(repo_id=name))
    model.save_pretrained(folder)
    tiny_llama().save_pretrained(folder / "base_model")
    word_tokenizer(["base", "words"]).save_pretrained(folder / "base_model")
    return folder


@pytest.mark.parametrize("name", ["./base_model", "base_model"])
def test_tokenizer_of_a_saved_folder_from_another_working_directory(expert_dirs, tmp_path, monkeypatch, name):
    folder = self_contained_mixture(expert_dirs, tmp_path / "mix", name)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    tokenizer = load_tokenizer(folder)  # the base model's, found inside the mixture, not in the cwd
    assert set(tokenizer.get_vocab()) == {"<unk>", "base", "words"}
    assert isinstance(XLoraModel.from_pretrained(folder), XLoraModel)  # the model's base is found the same way
    word_tokenizer(["mixture", "own", "tokens"]).save_pretrained(folder)  # the mixture's own comes first
    assert "mixture" in load_tokenizer(folder).get_vocab()
    assert "mixture" in load_tokenizer(os.path.relpath(folder)).get_vocab()


def test_tokenizer_of_a_plain_model_folder_and_a_folder_with_none(tmp_path):
    word_tokenizer(["plain"]).save_pretrained(tmp_path / "plain")
    assert "plain" in load_tokenizer(tmp_path / "plain").get_vocab()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidMixtureError, match="No tokenizer could be loaded from .*empty"):
        load_tokenizer(tmp_path / "empty")


def test_tokenizer_of_a_hub_mixture_and_namespaced_push(hub, expert_dirs, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi(token=hub.token)
    tag = uuid.uuid4().hex[:8]
    base_repo = f"alice/tok-base-{tag}"
    tiny_llama().save_pretrained(tmp_path / "base")
    word_tokenizer(["hub", "base"]).save_pretrained(tmp_path / "base")
    api.create_repo(base_repo)
    api.upload_folder(repo_id=base_repo, folder_path=str(tmp_path / "base"))
    base = __import__("transformers").AutoModelForCausalLM.from_pretrained(base_repo, cache_dir=tmp_path / "c")
    config = XLoraConfig(experts={"math": str(expert_dirs["math"]), "code": str(expert_dirs["code"])})
    model = XLoraModel.from_experts(base, config)

    name = f"tok-mix-{tag}"  # no namespace: the repo lands in the token user's namespace
    model.push_to_hub(name, token=hub.token, push_local_experts=True)
    repo_id = f"alice/{name}"
    assert hub.server.repo_exists(repo_id)
    pushed = json.loads(hub.server.get_file(repo_id, "xlora_config.json"))
    assert [e["repo_id"] for e in pushed["experts"]] == [f"alice/{name}-math", f"alice/{name}-code"]
    assert f"# {repo_id}" in hub.server.get_file(repo_id, "README.md").decode()
    loaded = load_mixture(repo_id, cache_dir=tmp_path / "fresh")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert [e.origin for e in loaded.experts] == ["hub", "hub"]

    tokenizer = load_tokenizer(repo_id, cache_dir=tmp_path / "fresh")  # none in the mixture repo: the base's
    assert set(tokenizer.get_vocab()) == {"<unk>", "hub", "base"}
    word_tokenizer(["hub", "mixture"]).save_pretrained(tmp_path / "own")
    api.upload_folder(repo_id=repo_id, folder_path=str(tmp_path / "own"))
    assert "mixture" in load_tokenizer(repo_id, cache_dir=tmp_path / "fresh2").get_vocab()


# ---------------------------------------------------------------------------------------------- layering
def _runtime_imports(path: Path) -> list[tuple[str, int]]:
    """Modules ``path`` imports at run time (module or function level), ``if TYPE_CHECKING:`` blocks excluded."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = "xlora_hub.hub"
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            skipped.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            found.append((module, node.lineno))
    return found


def test_the_hub_package_never_imports_the_model_at_run_time():
    offenders = [
        f"{path.name}:{line} imports {module}"
        for path in sorted(HUB_ROOT.glob("*.py"))
        for module, line in _runtime_imports(path)
        if module.startswith(("xlora_hub.model", "xlora_hub.cli", "xlora_hub.space", "xlora_hub.convert"))
    ]
    assert not offenders


def test_tokenizer_of_a_plain_hub_model_loads_offline_from_the_cache(hub, tmp_path):
    # A plain model repo (no xlora_config.json): offline, the missing mixture file is a cache miss, not a mixture.
    from huggingface_hub import HfApi

    repo = f"alice/plain-tok-{uuid.uuid4().hex[:8]}"
    word_tokenizer(["offline", "words"]).save_pretrained(tmp_path / "plain")
    api = HfApi(token=hub.token)
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=str(tmp_path / "plain"))
    assert "offline" in load_tokenizer(repo, cache_dir=tmp_path / "c").get_vocab()  # online: fills the cache
    assert "offline" in load_tokenizer(repo, cache_dir=tmp_path / "c", local_files_only=True).get_vocab()

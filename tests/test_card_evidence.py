"""Routing evidence on the card and Hub collections, through the real client and ``tests/hub_server.py``.

A tiny seeded mixture of two Hub experts over a Hub base model is pushed with evaluation data; every number on
the card is computed again here without xlora-hub's evidence code: example by example (no padding), the experts
alone with peft on a fresh base model, the base model with transformers alone. The base model's EOS row copies
(scaled) the row of a token it often writes, so greedy answers stop and exact match is not 0 for everyone.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import HfApi, ModelCard
from peft import PeftModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from factories import save_expert, tiny_llama
from test_space_app import char_tokenizer

from xlora_hub import XLoraConfig, XLoraModel
from xlora_hub.cli import main
from xlora_hub.errors import DataFormatError, InvalidConfigError, MissingDependencyError
from xlora_hub.evidence import compute_evidence
from xlora_hub.hub.card_evidence import BASE, EVIDENCE_DIR, HEATMAP_NAME, MIXTURE, USAGE_NAME, expert_system
from xlora_hub.space import model_card_evidence

EXPERTS = ("math", "code")
TARGETS = {"math": ["q_proj", "v_proj"], "code": ["up_proj", "down_proj"]}
PROMPTS = ["2+2=", "hello ", "def f(x):", "Once upon", "SELECT ", "sum of 7 and 5 is"]
# Prompts where the greedy answers stop (EOS) within BUDGET: the base model's on the first three, the mixture's on
# the last two (found once by a search over short prompts such as "q 0".."2+ 11"; `_stopped` checks it every run).
CANDIDATES = ["def 0", "SELECT 0", "if 0", "sum 1", "def 11"]
BUDGET = 12  # new tokens for the reference answers the completions are made from
PNG = b"\x89PNG\r\n\x1a\n"


def unique(name: str) -> str:
    return f"alice/{name}-{uuid.uuid4().hex[:8]}"


def _stopping_base(seed: int = 0) -> transformers.PreTrainedModel:
    """The tiny Llama, with its EOS logit a little above the logit of the token it writes most (so it stops)."""
    model = tiny_llama(seed=seed)
    tokenizer = char_tokenizer()
    counts = torch.zeros(model.config.vocab_size)
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            out = model.generate(ids, max_new_tokens=BUDGET, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
            counts += torch.bincount(out, minlength=counts.numel()).float()
        counts[:4] = 0
        model.lm_head.weight[2] = model.lm_head.weight[int(counts.argmax())] * 1.05
    return model


def _greedy(model, tokenizer, prompt: str, budget: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    options = dict(max_new_tokens=budget, do_sample=False, pad_token_id=0, eos_token_id=2)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def world(hub, tmp_path_factory):
    """Base model and experts in their own Hub repos, a mixture over them, and evaluation data whose completions
    are the greedy answers of the mixture and of the base model (so exact match differs between systems)."""
    root = tmp_path_factory.mktemp("evidence")
    api = HfApi(token=hub.token)
    base_dir = root / "base"
    _stopping_base().save_pretrained(base_dir)
    char_tokenizer().save_pretrained(base_dir)
    repos = {"base": unique("ev-base"), **{name: unique(f"ev-lora-{name}") for name in EXPERTS}}
    dirs = {"base": base_dir}
    for i, name in enumerate(EXPERTS):
        dirs[name] = save_expert(
            _stopping_base, root / name, target_modules=TARGETS[name], r=2 + i, seed=i + 1, scale=0.6
        )
    for key, repo_id in repos.items():
        api.create_repo(repo_id)
        api.upload_folder(repo_id=repo_id, folder_path=str(dirs[key]))
    cache = root / "cache"
    base = transformers.AutoModelForCausalLM.from_pretrained(repos["base"], cache_dir=cache).eval()
    model = XLoraModel.from_experts(
        base,
        XLoraConfig(experts={n: repos[n] for n in EXPERTS}, layerwise_scalings=True),
        token=hub.token,
        cache_dir=cache,
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.classifier.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 3.0)
    tokenizer = char_tokenizer()
    plain = _stopping_base()
    rows = _stopped(model, plain, tokenizer, 2) + _stopped(plain, model, tokenizer, 3)
    rows += [{"prompt": PROMPTS[5], "completion": " 12"}, {"text": "a poem about routing, and more words"}]
    data = root / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return dict(root=root, repos=repos, dirs=dirs, model=model, tokenizer=tokenizer, rows=rows, data=data)


def _stopped(model, other, tokenizer, n: int) -> list[dict[str, str]]:
    """``n`` examples whose completion is ``model``'s greedy answer, from prompts where it stops (EOS) in time and
    ``other`` answers something else."""
    rows = []
    for prompt in CANDIDATES:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=BUDGET, do_sample=False, pad_token_id=0, eos_token_id=2)
        answer = out[0, ids.shape[1] :].tolist()
        if 2 in answer[1:]:
            text = tokenizer.decode(answer, skip_special_tokens=True)
            if _greedy(other, tokenizer, prompt, BUDGET) != text:
                rows.append({"prompt": prompt, "completion": text})
        if len(rows) == n:
            return rows
    raise AssertionError(f"only {len(rows)} of the prompts give a greedy answer that stops; the fixture needs {n}")


def _features(tokenizer, row) -> tuple[list[int], list[int]]:
    """Ids and labels of one example as `train` reads it (prompt tokens unsupervised, EOS after the completion)."""
    if "text" in row:
        ids = tokenizer(row["text"])["input_ids"] + [2]
        return ids, list(ids)
    prompt, completion = tokenizer(row["prompt"])["input_ids"], tokenizer(row["completion"])["input_ids"] + [2]
    return prompt + completion, [-100] * len(prompt) + completion


def _loss(forward, tokenizer, rows) -> float:
    total, count = 0.0, 0
    for row in rows:
        ids, labels = _features(tokenizer, row)
        with torch.no_grad():
            logits = forward(torch.tensor([ids]))[0]
        labels = torch.tensor(labels[1:])
        keep = labels != -100
        total += float(torch.nn.functional.cross_entropy(logits[:-1][keep], labels[keep], reduction="sum"))
        count += int(keep.sum())
    return total / count


def _exact(model, tokenizer, rows) -> float:
    pairs = [r for r in rows if "prompt" in r]
    budget = max(len(tokenizer(r["completion"])["input_ids"]) for r in pairs) + 1
    return sum(_greedy(model, tokenizer, r["prompt"], budget) == r["completion"] for r in pairs) / len(pairs)


def _expected(world) -> dict:
    """Every number of the card, computed example by example without xlora_hub.evidence."""
    model, tokenizer, rows = world["model"], world["tokenizer"], world["rows"]
    weights = []
    for row in rows:
        ids, _ = _features(tokenizer, row)
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        weights.append(model.get_latest_scalings()[0].mean(dim=1))  # [tokens, experts], mean over layers
    weights = torch.cat(weights)
    p = weights / weights.sum(-1, keepdim=True)
    expected = {
        "mean": weights.mean(0).tolist(),
        "top1": [float((weights.argmax(-1) == j).float().mean()) for j in range(len(EXPERTS))],
        "entropy": float(-(p * p.log()).sum(-1).mean()),
        "n_tokens": weights.shape[0],
        "scores": {},
    }
    base = transformers.AutoModelForCausalLM.from_pretrained(world["dirs"]["base"]).eval()
    systems = {MIXTURE: model, BASE: base}
    for name in EXPERTS:
        fresh = transformers.AutoModelForCausalLM.from_pretrained(world["dirs"]["base"]).eval()
        systems[expert_system(name)] = PeftModel.from_pretrained(fresh, str(world["dirs"][name])).eval()
    for name, system in systems.items():
        loss = _loss(lambda ids, m=system: m(input_ids=ids).logits, tokenizer, rows)
        expected["scores"][name] = (loss, _exact(system, tokenizer, rows))
    return expected


def test_push_with_eval_data_puts_evidence_scores_and_pictures_in_one_commit(hub, world):
    api = HfApi(token=hub.token)
    repo_id = unique("ev-mixture")
    model, tokenizer = world["model"], world["tokenizer"]
    info = model.push_to_hub(repo_id, token=hub.token, eval_dataset=world["data"], eval_tokenizer=tokenizer)
    expected = _expected(world)

    # The pictures are files of the very commit that carries the card.
    files = api.list_repo_files(repo_id, revision=info.oid)
    assert {f"{EVIDENCE_DIR}/{HEATMAP_NAME}", f"{EVIDENCE_DIR}/{USAGE_NAME}", "README.md"} <= set(files)
    for name in (HEATMAP_NAME, USAGE_NAME):
        path = api.hf_hub_download(repo_id, f"{EVIDENCE_DIR}/{name}", revision=info.oid)
        assert Path(path).read_bytes().startswith(PNG)
    card = ModelCard.load(repo_id, token=hub.token)
    assert f"]({EVIDENCE_DIR}/{HEATMAP_NAME})" in card.text and f"]({EVIDENCE_DIR}/{USAGE_NAME})" in card.text

    # model-index: the loss and exact match of the mixture, each expert alone and the base model.
    assert card.data.model_name == repo_id
    results = {(r.metric_type, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert {r.dataset_name for r in card.data.eval_results} == {"eval.jsonl"}
    for system, (loss, exact) in expected["scores"].items():
        assert results[("loss", f"Loss ({system})")] == pytest.approx(loss, abs=1e-5), system
        assert results[("exact_match", f"Exact match ({system})")] == pytest.approx(exact, abs=1e-6), system
    exact = {system: e for system, (_, e) in expected["scores"].items()}
    assert exact[MIXTURE] > 0 and exact[BASE] > 0 and exact[MIXTURE] != exact[BASE]  # the numbers can tell apart
    assert results[("loss", f"Loss ({MIXTURE})")] != results[("loss", f"Loss ({BASE})")]

    # The usage table and the entropy, as computed without padding.
    for name, mean, top1 in zip(EXPERTS, expected["mean"], expected["top1"]):
        assert f"| `{name}` | {mean:.3f} | {100 * top1:.1f}% |" in card.text
    assert f"Routing entropy: {expected['entropy']:.3f} nats" in card.text
    assert f"(uniform routing: {math.log(len(EXPERTS)):.3f})" in card.text
    digest = __import__("hashlib").sha256(world["data"].read_bytes()).hexdigest()
    assert (
        f"`eval.jsonl` ({len(world['rows'])} examples, {expected['n_tokens']} tokens, sha256\n`{digest}`" in card.text
    )

    # The Space page shows the section without the pictures (their links are relative to the mixture repo).
    shown = model_card_evidence(card.content)
    assert shown.startswith("## Routing evidence") and "Top-1 share" in shown and "Exact match" in shown
    assert "![" not in shown and "## Usage" not in shown

    # A push without eval data leaves no stale pictures behind.
    plain = model.push_to_hub(repo_id, token=hub.token)
    assert not [f for f in api.list_repo_files(repo_id, revision=plain.oid) if f.startswith(EVIDENCE_DIR + "/")]


def test_missing_matplotlib_is_named_and_plots_can_be_left_out(hub, world, monkeypatch, tmp_path, capsys):
    api = HfApi(token=hub.token)
    repo_id = unique("ev-noplots")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    (tmp_path / "mix").mkdir()
    assert main(["push", str(tmp_path / "mix"), repo_id, "--eval", str(world["data"]), "--token", hub.token]) == 1
    assert "pip install 'xlora-hub[plots]'" in capsys.readouterr().err  # before the model is even loaded
    with pytest.raises(MissingDependencyError, match=r"pip install 'xlora-hub\[plots\]'.*eval_plots=False"):
        world["model"].push_to_hub(
            repo_id, token=hub.token, eval_dataset=world["data"], eval_tokenizer=char_tokenizer()
        )
    assert not api.repo_exists(repo_id)  # nothing was pushed
    info = world["model"].push_to_hub(
        repo_id, token=hub.token, eval_dataset=world["data"], eval_tokenizer=char_tokenizer(), eval_plots=False
    )
    assert not [f for f in api.list_repo_files(repo_id, revision=info.oid) if f.startswith(EVIDENCE_DIR + "/")]
    card = ModelCard.load(repo_id, token=hub.token)
    assert "## Routing evidence" in card.text and "![" not in card.text
    assert len(card.data.eval_results) == 2 * (len(EXPERTS) + 2)


def test_eval_data_without_a_tokenizer_says_where_to_give_one(world):
    model = XLoraModel.from_experts(tiny_llama(), XLoraConfig(experts={n: str(world["dirs"][n]) for n in EXPERTS}))
    assert model.xlora_config.base_model is None  # a base made in memory: no tokenizer to fall back on
    with pytest.raises(DataFormatError, match=r"records no base model.*pass `eval_tokenizer=` \(`--tokenizer`\)"):
        compute_evidence(model, world["rows"], tokenizer=None, plots=False)


def test_eval_tokenizer_of_a_base_inside_the_mixture_is_found_from_any_directory(world, tmp_path, monkeypatch):
    mixture = tmp_path / "mix"
    base = transformers.AutoModelForCausalLM.from_pretrained(world["dirs"]["base"])
    model = XLoraModel.from_experts(base, XLoraConfig(experts={n: str(world["dirs"][n]) for n in EXPERTS}))
    model.save_pretrained(mixture, bundle_experts=True)
    shutil.copytree(world["dirs"]["base"], mixture / "base_model")  # the only tokenizer: the mixture has none
    config = json.loads((mixture / "xlora_config.json").read_text())
    for name in ("./base_model", "base_model"):  # a relative path, and a bare name that is a folder of the mixture
        config["base_model"] = {"repo_id": name}
        (mixture / "xlora_config.json").write_text(json.dumps(config))
        elsewhere = tmp_path / f"cwd-{len(name)}"
        (elsewhere / "base_model").mkdir(parents=True)  # a folder of the same name in the cwd has no tokenizer
        monkeypatch.chdir(elsewhere)
        loaded = XLoraModel.from_pretrained(mixture)
        evidence = compute_evidence(loaded, world["rows"], tokenizer=None, plots=False)
        reference = compute_evidence(loaded, world["rows"], tokenizer=world["tokenizer"], plots=False)
        assert evidence.n_tokens == reference.n_tokens > 0
        assert evidence.mean_weights == reference.mean_weights


def test_eval_tokenizer_of_a_hub_base_is_read_at_its_revision_with_the_token(hub, world, tmp_path):
    api = HfApi(token=hub.token)
    repo = unique("ev-private-base")
    api.create_repo(repo, private=True)
    first = api.upload_folder(repo_id=repo, folder_path=str(world["dirs"]["base"])).oid
    files = [f for f in api.list_repo_files(repo) if f.startswith(("tokenizer", "special_tokens", "vocab"))]
    assert files
    api.delete_files(repo, delete_patterns=files)  # the main branch no longer has a tokenizer; `first` does
    model = XLoraModel.from_experts(
        transformers.AutoModelForCausalLM.from_pretrained(world["dirs"]["base"]),
        XLoraConfig(
            experts={n: str(world["dirs"][n]) for n in EXPERTS}, base_model={"repo_id": repo, "revision": first}
        ),
    )
    evidence = compute_evidence(
        model, world["rows"], tokenizer=None, plots=False, token=hub.token, cache_dir=tmp_path / "cache"
    )
    reference = compute_evidence(model, world["rows"], tokenizer=world["tokenizer"], plots=False)
    assert evidence.n_tokens == reference.n_tokens > 0


def _collection(api: HfApi, title: str):
    """The collection as the real client reads it (``exists_ok`` finds it by title)."""
    return api.create_collection(title, namespace="alice", exists_ok=True)


def test_collection_gathers_mixture_experts_base_and_space_idempotently(hub, world):
    api = HfApi(token=hub.token)
    repo_id = unique("ev-collected")
    title = f"Tiny mixtures {uuid.uuid4().hex[:6]}"
    world["model"].push_to_hub(repo_id, token=hub.token, collection=title)
    first = _collection(api, title)
    items = [(i.item_id, i.item_type) for i in first.items]
    repos = world["repos"]
    assert items == [(repo_id, "model"), (repos["math"], "model"), (repos["code"], "model"), (repos["base"], "model")]

    # A Space whose README names the mixture (as `xlora-hub space push` writes it) joins at the next push.
    space = unique("ev-space")
    api.create_repo(space, repo_type="space", space_sdk="gradio")
    readme = f"---\nsdk: gradio\nmodels:\n- {repo_id}\n- {repos['base']}\n---\n# demo\n"
    api.upload_file(path_or_fileobj=readme.encode(), path_in_repo="README.md", repo_id=space, repo_type="space")
    world["model"].push_to_hub(repo_id, token=hub.token, collection=title)
    world["model"].push_to_hub(repo_id, token=hub.token, collection=title)
    again = _collection(api, title)
    assert again.slug == first.slug
    assert [(i.item_id, i.item_type) for i in again.items] == [*items, (space, "space")]


def test_bad_collection_title_is_refused_before_anything_is_pushed(hub, world):
    repo_id = unique("ev-badtitle")
    with pytest.raises(InvalidConfigError, match="collection title must be a non-empty string.*collection="):
        world["model"].push_to_hub(repo_id, token=hub.token, collection="  ")
    assert not HfApi(token=hub.token).repo_exists(repo_id)


def test_cli_push_with_eval_and_collection(hub, world, tmp_path, capsys):
    folder = tmp_path / "mix"
    world["model"].save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    repo_id, title = unique("ev-cli"), f"CLI mixtures {uuid.uuid4().hex[:6]}"
    argv = ["push", str(folder), repo_id, "--eval", str(world["data"]), "--collection", title, "--token", hub.token]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "expert math: mean routing weight" in out and "routing entropy" in out
    card = ModelCard.load(repo_id, token=hub.token)
    assert {r.metric_name for r in card.data.eval_results} >= {f"Loss ({MIXTURE})", f"Exact match ({BASE})"}
    assert (repo_id, "model") in [(i.item_id, i.item_type) for i in _collection(HfApi(token=hub.token), title).items]


def test_server_collections_api_answers_like_the_hub(hub, world):
    """The routes and payloads the real client uses: 409 on a second title or item, 404 for a missing repo."""
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=hub.token)
    title = f"Server check {uuid.uuid4().hex[:6]}"
    made = api.create_collection(title, namespace="alice", description="d")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_collection(title, namespace="alice")
    assert err.value.response.status_code == 409
    api.add_collection_item(made.slug, world["repos"]["math"], "model", note="n")
    with pytest.raises(HfHubHTTPError) as err:
        api.add_collection_item(made.slug, world["repos"]["math"], "model")
    assert err.value.response.status_code == 409
    same = api.add_collection_item(made.slug, world["repos"]["math"], "model", exists_ok=True)
    assert [(i.item_id, i.note) for i in same.items] == [(world["repos"]["math"], "n")]
    with pytest.raises(HfHubHTTPError) as err:
        api.add_collection_item(made.slug, "alice/no-such-repo", "model")
    assert err.value.response.status_code == 404
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token=hub.other_token).add_collection_item(made.slug, world["repos"]["code"], "model")
    assert err.value.response.status_code == 403
    assert api.get_collection(made.slug).title == title and made.url.endswith(f"/collections/{made.slug}")

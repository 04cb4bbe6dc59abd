"""Building the demo mixture from a seed: tokenizer, base model, one LoRA expert per task, the classifier.

Every step is seeded and runs inside :func:`~xlora_hub.demo.cache.deterministic_torch`; the order of the
seeds, the draws and the training steps below is what :data:`~xlora_hub.demo.REFERENCE_WEIGHTS_SHA256`
records, so any change here that touches them changes the build's bits.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..staging import replace_folder, staging_folder
from .cache import (
    canonicalize_adapter_config,
    canonicalize_safetensors_header,
    demo_mixture_path,
    deterministic_torch,
    is_built,
    write_build_info,
)
from .recipe import BASE_MODEL_DIR, EXPERTS_DIR, LORA_TARGETS, RECIPE, DemoRecipe
from .tasks import TASKS, make_task_examples, pretraining_data, vocab

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from ..data import TokenizedDataset
    from ..model import XLoraModel


# ---------------------------------------------------------------------------------------------- tokenizer / base
def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` built with the ``tokenizers`` library.

    No BOS is added: the scalings of a first token cannot depend on the input, and a model this small
    leans on its first token as an attention sink, so a shared BOS would blur every expert. Without it
    the first token (the task prefix) already tells the tasks apart.

    The decoder is ``Sequence[ByteFallback, Fuse]``, not a bare ``Fuse``: the two decode every token list the
    same (no token of the vocabulary is a ``<0xNN>`` byte token), and mistral.rs refuses a bare ``Fuse``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocab())}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=RECIPE.max_positions,
        padding_side="left",  # batched generation; training batches are padded by CompletionCollator
    )


def new_base_model(tokenizer: Any, recipe: DemoRecipe, seed: int):
    """A freshly initialised (seeded) tiny Llama sized by ``recipe``, greedy generation by default."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=recipe.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    # transformers 5 writes only `rope_parameters`; mistral.rs (and transformers 4) read a top-level `rope_theta`.
    config.rope_theta = config.rope_parameters["rope_theta"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        do_sample=False,
        max_new_tokens=8,
        use_cache=True,
    )
    return model


def load_base_model(folder: Path):
    """The trained base model of the build in ``folder``, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder / BASE_MODEL_DIR).eval()


def demo_xlora_config():
    """The demo's X-LoRA settings: experts as folders inside the mixture, a two-layer classifier."""
    from ..config import BaseModelRef, XLoraConfig

    return XLoraConfig(
        experts={task: f"./{EXPERTS_DIR}/{task}" for task in TASKS},
        base_model=BaseModelRef(repo_id=f"./{BASE_MODEL_DIR}"),
        xlora_depth=2,
        xlora_size=64,
        xlora_dropout_p=0.0,
        enable_softmax=True,
        layerwise_scalings=False,
        scaling_pass_value=0.0,
    )


# ---------------------------------------------------------------------------------------------- fitting
def _fit(
    model: torch.nn.Module,
    data: TokenizedDataset,
    tokenizer: Any,
    *,
    steps: int,
    lr: float,
    seed: int,
    recipe: DemoRecipe,
    desc: str,
    progress: bool,
) -> float:
    """Train the trainable parameters for ``steps`` seeded random batches (short warm-up, linear decay)."""
    from ..data import CompletionCollator
    from ..training import run_steps, sampled_batches, trainable_parameters

    collator = CompletionCollator.for_tokenizer(tokenizer)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, 1.0 - 0.9 * step / steps)
    )
    generator = torch.Generator().manual_seed(seed)
    batches = sampled_batches(data, batch_size=recipe.batch_size, collator=collator, generator=generator, steps=steps)
    losses = run_steps(
        model,
        batches,
        optimizer=optimizer,
        params=params,
        total=steps,
        grad_clip=1.0,
        scheduler=schedule,
        desc=desc,
        progress=progress,
    )
    model.eval()
    return losses[-1] if losses else float("nan")


def _build_base(folder: Path, tokenizer: Any, *, seed: int, recipe: DemoRecipe, progress: bool) -> None:
    """Pre-train the base model on the generic data and save it (with the tokenizer) as ``base_model/``."""
    base = new_base_model(tokenizer, recipe, seed)
    data = pretraining_data(tokenizer, recipe.pretrain_examples, seed=seed, max_length=recipe.max_length)
    _fit(
        base,
        data,
        tokenizer,
        steps=recipe.pretrain_steps,
        lr=recipe.pretrain_lr,
        seed=seed,
        recipe=recipe,
        desc="demo: base model",
        progress=progress,
    )
    base.name_or_path = BASE_MODEL_DIR  # what the experts' adapter_config.json records
    base.save_pretrained(folder / BASE_MODEL_DIR)
    tokenizer.save_pretrained(folder / BASE_MODEL_DIR)


def _lora_config(recipe: DemoRecipe):
    """The experts' LoRA settings (one object, shared by every expert as the recipe always did)."""
    from peft import LoraConfig

    return LoraConfig(
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        task_type="CAUSAL_LM",
    )


def _build_expert(
    folder: Path, tokenizer: Any, lora: Any, index: int, task: str, *, seed: int, recipe: DemoRecipe, progress: bool
) -> None:
    """Train the LoRA expert of ``task`` (the ``index``-th) on the saved base model; save its factors."""
    from peft import get_peft_model

    from ..data import tokenize_dataset

    expert_seed = seed * 1000 + index + 1
    torch.manual_seed(expert_seed)
    expert_base = load_base_model(folder)
    expert_base.name_or_path = BASE_MODEL_DIR  # not the staging folder's absolute path, which would leak
    peft_model = get_peft_model(expert_base, lora)
    examples = make_task_examples(task, recipe.expert_examples, seed=seed)
    data = tokenize_dataset(examples, tokenizer, max_length=recipe.max_length)
    _fit(
        peft_model,
        data,
        tokenizer,
        steps=recipe.expert_steps,
        lr=recipe.expert_lr,
        seed=expert_seed,
        recipe=recipe,
        desc=f"demo: expert {task}",
        progress=progress,
    )
    peft_model.save_pretrained(folder / EXPERTS_DIR / task, save_embedding_layers=False)  # LoRA factors only


def _train_classifier(folder: Path, tokenizer: Any, *, seed: int, recipe: DemoRecipe, progress: bool) -> XLoraModel:
    """The mixture of the saved experts, its classifier trained on every task (with the routing loss)."""
    from ..model import XLoraModel
    from ..training import train_classifier

    base = load_base_model(folder)
    torch.manual_seed(seed)  # the classifier's initial weights
    model = XLoraModel.from_experts(base, demo_xlora_config(), base_dir=folder)
    examples = [e for task in TASKS for e in make_task_examples(task, recipe.classifier_examples, seed=seed + 1)]
    train_classifier(
        model,
        examples,
        tokenizer=tokenizer,
        epochs=recipe.classifier_epochs,
        lr=recipe.classifier_lr,
        batch_size=recipe.batch_size,
        max_length=recipe.max_length,
        seed=seed,
        routing_loss_weight=recipe.routing_loss_weight,
        routing_loss_tokens="all",
        progress=progress,
    )
    return model.eval()


def _build_into(folder: Path, *, seed: int, recipe: DemoRecipe, progress: bool) -> dict[str, float]:
    """Write base model, experts and mixture into ``folder``; return the seconds each phase took."""
    phases: dict[str, float] = {}
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    _build_base(folder, tokenizer, seed=seed, recipe=recipe, progress=progress)
    phases["base_model"] = time.perf_counter() - started
    lora = _lora_config(recipe)
    for index, task in enumerate(TASKS):
        started = time.perf_counter()
        _build_expert(folder, tokenizer, lora, index, task, seed=seed, recipe=recipe, progress=progress)
        phases[f"expert_{task}"] = time.perf_counter() - started
    started = time.perf_counter()
    model = _train_classifier(folder, tokenizer, seed=seed, recipe=recipe, progress=progress)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # next to the mixture files too, as a published mixture ships it
    phases["classifier"] = time.perf_counter() - started
    return phases


# ---------------------------------------------------------------------------------------------- build / load / push
def build_demo_mixture(
    *,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: bool = True,
    recipe: DemoRecipe | None = None,
) -> Path:
    """Build the demo mixture once (about two minutes on one CPU core) and return its cached folder.

    A finished build (one with ``demo_build.json``) is reused unless ``force``. The build happens in a
    temporary folder next to the target and is renamed into place at the end, so an interrupted build
    never leaves a half-written mixture behind. ``recipe`` changes sizes and schedules (for experiments
    and quick tests); such builds are cached under their own name.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    recipe = recipe or RECIPE
    target = demo_mixture_path(seed=seed, cache_dir=cache_dir, recipe=recipe)
    if is_built(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(target) as work:
        with deterministic_torch():
            phases = _build_into(work, seed=seed, recipe=recipe, progress=progress)
        for path in sorted(work.rglob("*.safetensors")):
            canonicalize_safetensors_header(path)
        for path in sorted(work.rglob("adapter_config.json")):
            canonicalize_adapter_config(path)
        write_build_info(work, seed=seed, recipe=recipe, phases=phases)
        if is_built(target) and not force:  # another process finished the same build first
            return target
        replace_folder(work, target)
    return target


def load_demo_mixture(
    *,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    recipe: DemoRecipe | None = None,
):
    """``(XLoraModel, tokenizer)`` of the demo mixture, built first if it is not cached yet."""
    from transformers import AutoTokenizer

    from ..model import XLoraModel

    folder = build_demo_mixture(seed=seed, cache_dir=cache_dir, progress=progress, recipe=recipe)
    tokenizer = AutoTokenizer.from_pretrained(folder / BASE_MODEL_DIR)
    # The config names the base model as the folder `./base_model` inside the mixture: pass it in.
    model = XLoraModel.from_pretrained(folder, base_model=load_base_model(folder), device=device)
    return model.eval(), tokenizer


def push_demo_mixture(
    repo_id: str,
    *,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    recipe: DemoRecipe | None = None,
) -> CommitInfo:
    """Publish the demo as separate Hub repos in one call: base model, one repo per expert, the mixture.

    The base model (with its tokenizer) goes to ``<repo_id>-base``, each expert to ``<repo_id>-<name>``;
    the mixture pushed to ``repo_id`` references all of them pinned to the commits just made, so
    ``XLoraModel.from_pretrained(repo_id)`` loads it anywhere.
    """
    from huggingface_hub import HfApi

    from ..config import BaseModelRef

    folder = build_demo_mixture(seed=seed, cache_dir=cache_dir, recipe=recipe)
    api = HfApi(token=token)
    base_repo = f"{repo_id}-base"
    api.create_repo(base_repo, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=base_repo,
        folder_path=str(folder / BASE_MODEL_DIR),
        commit_message="Upload the base model of the xlora-hub demo mixture",
    )
    sha = getattr(info, "oid", None) or api.model_info(base_repo).sha
    model, _ = load_demo_mixture(seed=seed, cache_dir=cache_dir, progress=False, recipe=recipe)
    model.xlora_config = model.xlora_config.replace(base_model=BaseModelRef(repo_id=base_repo, revision=sha))
    return model.push_to_hub(repo_id, private=private, token=token, push_local_experts=True)


__all__ = [
    "build_demo_mixture",
    "build_tokenizer",
    "demo_xlora_config",
    "load_base_model",
    "load_demo_mixture",
    "new_base_model",
    "push_demo_mixture",
]

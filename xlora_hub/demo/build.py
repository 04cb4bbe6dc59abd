"""The embedded default mixture: a tiny but real X-LoRA mixture, built from a seed with nothing downloaded.

Four synthetic tasks whose inputs look different::

    add:12+7=      -> 19        (adding two numbers up to 19)
    rev:ABCD=      -> DCBA      (reversing an upper-case word)
    up:abcd=       -> ABCD      (upper-casing a word)
    cnt:abcab:a=   -> 2         (counting a letter in a word)

A tiny Llama-style causal LM with a character-level tokenizer is pre-trained on generic data: copying
strings, and the task *inputs* without their answers, so it reads every format but solves no task.
One peft LoRA expert is trained per task, then an X-LoRA classifier on the union of the tasks (the
task labels supervise the routing during training only; inference sees the text alone).

The result is laid out like a published mixture: ``base_model/`` (model + tokenizer), one peft adapter
folder per expert under ``experts/``, and the mixture files written by ``save_pretrained``. It is
cached under ``$XLORA_HUB_CACHE`` (default ``$XDG_CACHE_HOME/xlora-hub`` or ``~/.cache/xlora-hub``),
keyed by :data:`DEMO_VERSION` and the seed.

Every step is seeded and runs with deterministic kernels on one CPU thread, so two builds with the
same seed on one machine give the same files byte for byte. Another machine may build other bits: MKL
and torch pick their math kernels for the CPU they find (an AMD CPU takes other MKL kernels than an
Intel one; AVX2 and AVX-512 sum in other orders). Pinning them before Python starts
(``MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=avx2``: MKL documents its compatible branch as giving the
same results on Intel and AMD CPUs) makes the build's weights independent of the MKL kernels the CPU
would get, but costs about twice the CPU time, so the default build does not pin them. The recipe has
the margin instead: builds with five seeds and with other kernels score within a point or two of the
recorded one (``benchmarks/results/demo_seeds.md``), and :data:`REFERENCE_WEIGHTS_SHA256` tells whether
a build reproduced the recorded one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import string
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .jsonfile import read_json_object
from .staging import replace_folder, staging_folder

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from .data import TokenizedDataset
    from .model import XLoraModel

DEMO_VERSION = "v2"
"""Names the recipe below; bump it whenever the recipe changes, so an old cached build is never reused."""

REFERENCE_WEIGHTS_SHA256 = "f6569629b5ce9abc1dc73cb8baa0b2f114459a3d941d125374799a1963f6e0be"
""":func:`weights_digest` of the recorded default build (seed 0, :data:`RECIPE`): torch 2.13.0, transformers 5.24,
peft 0.21.2 on an Intel Xeon with AVX-512, default kernels. Another digest means other kernels or library
versions; such a build scores a little differently (within the margin the tests allow)."""

KERNEL_ENV = ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
"""Environment variables that choose the math kernels (recorded in ``demo_build.json`` with the CPU capability)."""

CACHE_ENV = "XLORA_HUB_CACHE"
BASE_MODEL_DIR = "base_model"
EXPERTS_DIR = "experts"
BUILD_INFO_NAME = "demo_build.json"
BUILD_THREADS = 1
"""CPU threads of the build: fixed, so the floating-point reductions (and the weights) never depend on the core count."""

TASKS = ("add", "rev", "up", "cnt")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens")
ADD_MAX = 19
WORD_LENGTHS = (3, 5)
COUNT_LENGTHS = (3, 6)
COUNT_ALPHABET = "abc"


# ---------------------------------------------------------------------------------------------- tasks
def _word(rng: random.Random, alphabet: str, lengths: tuple[int, int]) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(*lengths)))


def make_task_example(task: str, rng: random.Random) -> dict[str, str]:
    """One ``{"prompt", "completion", "expert"}`` example of ``task``, drawn from ``rng``."""
    if task == "add":
        a, b = rng.randint(0, ADD_MAX), rng.randint(0, ADD_MAX)
        return {"prompt": f"add:{a}+{b}=", "completion": str(a + b), "expert": task}
    if task == "rev":
        while True:  # a palindrome's answer would be its own copy
            word = _word(rng, string.ascii_uppercase, WORD_LENGTHS)
            if word != word[::-1]:
                return {"prompt": f"rev:{word}=", "completion": word[::-1], "expert": task}
    if task == "up":
        word = _word(rng, string.ascii_lowercase, WORD_LENGTHS)
        return {"prompt": f"up:{word}=", "completion": word.upper(), "expert": task}
    if task == "cnt":
        word = _word(rng, COUNT_ALPHABET, COUNT_LENGTHS)
        letter = rng.choice(COUNT_ALPHABET)
        return {"prompt": f"cnt:{word}:{letter}=", "completion": str(word.count(letter)), "expert": task}
    raise ValueError(f"Unknown demo task {task!r}; the tasks are {TASKS}.")


def make_task_examples(task: str, n: int, *, seed: int) -> list[dict[str, str]]:
    """``n`` examples of ``task``; the same ``seed`` always gives the same examples."""
    rng = random.Random(f"{task}-{seed}")
    return [make_task_example(task, rng) for _ in range(n)]


def pretraining_data(tokenizer, n: int, *, seed: int, max_length: int) -> TokenizedDataset:
    """The base model's generic data: copying random strings, and the task inputs with no answer.

    The inputs are plain text without a final EOS, so the model learns to read every format but is
    never shown what follows ``=``: it solves no task, and its hidden states keep the tasks apart.
    """
    from .data import TokenizedDataset, tokenize_example

    rng = random.Random(f"generic-{seed}")
    alphabet = string.ascii_letters + string.digits
    features = []
    for i in range(n):
        if i % 2 == 0:
            text = _word(rng, alphabet, (2, 7))
            example, add_eos = {"prompt": f"cp:{text}=", "completion": text}, True
        else:
            task = TASKS[(i // 2) % len(TASKS)]
            example, add_eos = {"text": make_task_example(task, rng)["prompt"]}, False
        features.append(tokenize_example(example, tokenizer, max_length=max_length, add_eos=add_eos))
    return TokenizedDataset(features)


# ---------------------------------------------------------------------------------------------- recipe
@dataclass(frozen=True)
class DemoRecipe:
    """Sizes and schedules of the build (what :data:`DEMO_VERSION` names)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_positions: int = 64
    pretrain_examples: int = 8000
    pretrain_steps: int = 700
    pretrain_lr: float = 3e-3
    expert_examples: int = 3000
    expert_steps: int = 800
    expert_lr: float = 5e-3
    lora_r: int = 8
    lora_alpha: int = 16
    classifier_examples: int = 800
    classifier_epochs: int = 8
    classifier_lr: float = 1e-2
    routing_loss_weight: float = 5.0
    batch_size: int = 64
    max_length: int = 32


RECIPE = DemoRecipe()


# ---------------------------------------------------------------------------------------------- tokenizer / base
def _vocab() -> list[str]:
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    return [*specials, *string.digits, *string.ascii_lowercase, *string.ascii_uppercase, *":+=- "]


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` built with the ``tokenizers`` library.

    No BOS is added: the scalings of a first token cannot depend on the input, and a model this small
    leans on its first token as an attention sink, so a shared BOS would blur every expert. Without it
    the first token (the task prefix) already tells the tasks apart.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(_vocab())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=RECIPE.max_positions,
        padding_side="left",  # batched generation; training batches are padded by CompletionCollator
    )


def _new_base_model(tokenizer, recipe: DemoRecipe, seed: int):
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


def _load_base_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder / BASE_MODEL_DIR).eval()


# ---------------------------------------------------------------------------------------------- training helpers
@contextlib.contextmanager
def deterministic_torch(threads: int = BUILD_THREADS) -> Iterator[None]:
    """Deterministic kernels on a fixed number of threads (bitwise-reproducible CPU training); restored after."""
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_num_threads(previous_threads)


def _fit(
    model: torch.nn.Module,
    data: TokenizedDataset,
    tokenizer,
    *,
    steps: int,
    lr: float,
    seed: int,
    recipe: DemoRecipe,
    desc: str,
    progress: bool,
) -> float:
    """Train the trainable parameters for ``steps`` seeded random batches (short warm-up, linear decay)."""
    from huggingface_hub.utils import tqdm

    from .data import CompletionCollator

    collator = CompletionCollator.for_tokenizer(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, 1.0 - 0.9 * step / steps)
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss_value = float("nan")
    with tqdm(total=steps, desc=desc, disable=not progress) as bar:
        for _ in range(steps):
            index = torch.randint(len(data), (recipe.batch_size,), generator=generator).tolist()
            loss = model(**collator([data[i] for i in index])).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            loss_value = float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
    model.eval()
    return loss_value


# ---------------------------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    """``$XLORA_HUB_CACHE``, else ``$XDG_CACHE_HOME/xlora-hub``, else ``~/.cache/xlora-hub``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "xlora-hub"


def demo_mixture_path(
    *, seed: int = 0, cache_dir: str | os.PathLike[str] | None = None, recipe: DemoRecipe | None = None
) -> Path:
    """Where the demo mixture of ``seed`` (and ``recipe``, when not the default) is, or will be, cached."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = f"demo-mixture-{DEMO_VERSION}-seed{seed}"
    if recipe is not None and recipe != RECIPE:
        name += "-" + hashlib.sha256(repr(recipe).encode()).hexdigest()[:12]
    return root / name


def read_build_info(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``demo_build.json`` records: version, seed, build time per phase, weights digest."""
    return read_json_object(Path(folder) / BUILD_INFO_NAME)


# ---------------------------------------------------------------------------------------------- build
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
    if (target / BUILD_INFO_NAME).is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(target) as work:
        with deterministic_torch():
            phases = _build_into(work, seed=seed, recipe=recipe, progress=progress)
        for path in sorted(work.rglob("*.safetensors")):
            canonicalize_safetensors_header(path)
        info = {
            "version": DEMO_VERSION,
            "seed": seed,
            "tasks": list(TASKS),
            "recipe": dataclasses.asdict(recipe),
            "build_seconds": round(sum(phases.values()), 1),
            "phase_seconds": {name: round(seconds, 1) for name, seconds in phases.items()},
            "threads": BUILD_THREADS,
            "kernels": kernel_settings(),
            "weights_sha256": weights_digest(work),
        }
        (work / BUILD_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if (target / BUILD_INFO_NAME).is_file() and not force:  # another process finished the same build first
            return target
        replace_folder(work, target)
    return target


def kernel_settings() -> dict[str, Any]:
    """What chose this process's math kernels: torch's CPU capability and the kernel variables that are set.

    Recorded with each build, so a build whose digest differs from the recorded one says why it may.
    """
    settings: dict[str, Any] = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
    settings.update({name: os.environ[name] for name in KERNEL_ENV if os.environ.get(name)})
    return settings


def _build_into(folder: Path, *, seed: int, recipe: DemoRecipe, progress: bool) -> dict[str, float]:
    """Write base model, experts and mixture into ``folder``; return the seconds each phase took."""
    from peft import LoraConfig, get_peft_model

    from .data import tokenize_dataset

    phases: dict[str, float] = {}
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    base = _new_base_model(tokenizer, recipe, seed)
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
    phases["base_model"] = time.perf_counter() - started

    lora = LoraConfig(
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        task_type="CAUSAL_LM",
    )
    for index, task in enumerate(TASKS):
        started = time.perf_counter()
        expert_seed = seed * 1000 + index + 1
        torch.manual_seed(expert_seed)
        expert_base = _load_base_model(folder)
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
        phases[f"expert_{task}"] = time.perf_counter() - started

    started = time.perf_counter()
    model = _train_classifier(folder, tokenizer, seed=seed, recipe=recipe, progress=progress)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # next to the mixture files too, as a published mixture ships it
    phases["classifier"] = time.perf_counter() - started
    return phases


def demo_xlora_config():
    """The demo's X-LoRA settings: experts as folders inside the mixture, a two-layer classifier."""
    from .config import BaseModelRef, XLoraConfig

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


def _train_classifier(folder: Path, tokenizer, *, seed: int, recipe: DemoRecipe, progress: bool) -> XLoraModel:
    from .model import XLoraModel
    from .training import train_classifier

    base = _load_base_model(folder)
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


def canonicalize_safetensors_header(path: Path) -> None:
    """Rewrite ``path``'s header with its ``__metadata__`` keys sorted, so equal files are equal byte for byte.

    safetensors writes the metadata in its hash map's order, which changes from process to process. The
    header keeps its length (the same JSON, compact, padded with spaces as safetensors pads it), so the
    tensor bytes after it are not moved.
    """
    with path.open("r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        metadata = header.pop("__metadata__", None)
        tensors = sorted(header.items(), key=lambda item: item[1]["data_offsets"])
        canonical = {"__metadata__": dict(sorted(metadata.items()))} if metadata is not None else {}
        canonical.update(tensors)
        text = json.dumps(canonical, separators=(",", ":")).encode()
        if len(text) > length:  # never happens for a header safetensors wrote; leave such a file alone
            return
        handle.seek(8)
        handle.write(text + b" " * (length - len(text)))


def weights_digest(folder: str | os.PathLike[str]) -> str:
    """SHA-256 over every tensor of every ``.safetensors`` file under ``folder`` (path, name, dtype, shape, bytes).

    Only the tensors count, not the file bytes: the header's metadata (and its order) does not change the digest.
    """
    from safetensors import safe_open

    digest = hashlib.sha256()
    folder = Path(folder)
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(path.relative_to(folder).as_posix().encode())
        with safe_open(str(path), framework="pt") as handle:
            for key in sorted(handle.keys()):
                tensor = handle.get_tensor(key).contiguous()
                digest.update(f"{key}:{tensor.dtype}:{list(tensor.shape)}".encode())
                digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- load / push
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

    from .model import XLoraModel

    folder = build_demo_mixture(seed=seed, cache_dir=cache_dir, progress=progress, recipe=recipe)
    tokenizer = AutoTokenizer.from_pretrained(folder / BASE_MODEL_DIR)
    # The config names the base model as the folder `./base_model` inside the mixture: pass it in.
    model = XLoraModel.from_pretrained(folder, base_model=_load_base_model(folder), device=device)
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

    from .config import BaseModelRef

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


# ---------------------------------------------------------------------------------------------- evaluation
@dataclass
class TaskScores:
    """Exact-match accuracies on one task (fractions in [0, 1])."""

    task: str
    n: int
    base: float
    experts: dict[str, float]
    mixture: float
    routing: float

    @property
    def own_expert(self) -> float:
        return self.experts[self.task]


@dataclass
class DemoReport:
    """Per task: exact match of the base model, of each expert alone and of the mixture; routing accuracy."""

    tasks: list[TaskScores] = field(default_factory=list)

    def by_task(self, task: str) -> TaskScores:
        return next(t for t in self.tasks if t.task == task)

    @property
    def routing_accuracy(self) -> float:
        return sum(t.routing * t.n for t in self.tasks) / sum(t.n for t in self.tasks)

    def format(self) -> str:
        names = list(self.tasks[0].experts) if self.tasks else []
        columns = ["base", *(f"only {n}" for n in names), "X-LoRA", "routing"]
        header = f"{'task':<6} {'n':>4} " + " ".join(f"{c:>9}" for c in columns)
        lines = ["exact match (greedy) per task; routing: top mean scaling on the answer tokens is the task's expert"]
        lines += [header, "-" * len(header)]
        for t in self.tasks:
            values = [t.base, *(t.experts[n] for n in names), t.mixture, t.routing]
            lines.append(f"{t.task:<6} {t.n:>4} " + " ".join(f"{100 * v:>8.1f}%" for v in values))
        lines.append(f"overall routing accuracy: {100 * self.routing_accuracy:.1f}%")
        return "\n".join(lines)


def _prompt_groups(examples: Sequence[dict[str, str]], tokenizer) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Prompts grouped by token length (so no padding is needed), with their positions in ``examples``."""
    encoded = [tokenizer(e["prompt"])["input_ids"] for e in examples]
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    for length in sorted(groups):
        yield groups[length], torch.tensor([encoded[i] for i in groups[length]], dtype=torch.long)


def exact_match(generate: Callable[..., torch.Tensor], examples: Sequence[dict[str, str]], tokenizer) -> float:
    """Fraction of examples whose greedy answer (up to EOS) is exactly the completion."""
    correct = 0
    for index, input_ids in _prompt_groups(examples, tokenizer):
        output = generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        for row, i in enumerate(index):
            answer = tokenizer.decode(output[row, input_ids.shape[1] :], skip_special_tokens=True)
            correct += int(answer == examples[i]["completion"])
    return correct / len(examples)


def evaluate_demo_mixture(
    model: XLoraModel | None = None,
    tokenizer=None,
    *,
    seed: int = 0,
    n_per_task: int = 100,
    cache_dir: str | os.PathLike[str] | None = None,
    print_report: bool = True,
    progress: bool = False,
    recipe: DemoRecipe | None = None,
) -> DemoReport:
    """Score the demo mixture on fresh examples of each task with greedy, KV-cached generation.

    Columns: the base model alone, each expert alone (its peft adapter on the base model), the X-LoRA
    mixture, and the routing accuracy (the expert with the largest mean scaling over the answer
    tokens is the task's own expert). Pass ``model``/``tokenizer`` to score an already loaded mixture.
    """
    from peft import PeftModel

    folder = build_demo_mixture(seed=seed, cache_dir=cache_dir, progress=progress, recipe=recipe)
    if model is None or tokenizer is None:
        model, tokenizer = load_demo_mixture(seed=seed, cache_dir=cache_dir, progress=progress, recipe=recipe)
    options = dict(
        max_new_tokens=8,
        do_sample=False,
        use_cache=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    base = _load_base_model(folder)
    singles = {
        task: PeftModel.from_pretrained(_load_base_model(folder), str(folder / EXPERTS_DIR / task)).eval()
        for task in TASKS
    }
    max_length = (recipe or RECIPE).max_length
    report = DemoReport()
    with deterministic_torch():  # one thread: fastest for a model this small, and no thrashing on a busy machine
        for task in TASKS:
            scores = _score_task(
                task, model, tokenizer, base, singles, options, seed=seed, n=n_per_task, max_length=max_length
            )
            report.tasks.append(scores)
    if print_report:
        print(report.format())
    return report


def _score_task(task, model, tokenizer, base, singles, options, *, seed: int, n: int, max_length: int) -> TaskScores:
    from .training import routing_report

    # A draw of its own (the training draws used seed and seed + 1); small tasks such as add repeat problems.
    examples = make_task_examples(task, n, seed=seed + 2)
    routing = routing_report(model, examples, tokenizer=tokenizer, max_length=max_length)
    return TaskScores(
        task=task,
        n=len(examples),
        base=exact_match(lambda **kw: base.generate(**kw, **options), examples, tokenizer),
        experts={
            name: exact_match(lambda m=single, **kw: m.generate(**kw, **options), examples, tokenizer)
            for name, single in singles.items()
        },
        mixture=exact_match(lambda **kw: model.generate(**kw, **options), examples, tokenizer),
        routing=routing.label_accuracy(task),
    )


__all__ = [
    "DEMO_VERSION",
    "REFERENCE_WEIGHTS_SHA256",
    "TASKS",
    "DemoRecipe",
    "DemoReport",
    "TaskScores",
    "build_demo_mixture",
    "build_tokenizer",
    "canonicalize_safetensors_header",
    "default_cache_dir",
    "demo_mixture_path",
    "demo_xlora_config",
    "evaluate_demo_mixture",
    "exact_match",
    "kernel_settings",
    "load_demo_mixture",
    "make_task_example",
    "make_task_examples",
    "pretraining_data",
    "push_demo_mixture",
    "read_build_info",
    "weights_digest",
]

"""Scoring the demo: exact match per task for the base model, each expert alone and the mixture; routing.

The examples are a draw of their own (``seed + 2``; the build's training draws used ``seed`` and
``seed + 1``), generated greedily with the KV cache on one thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .build import build_demo_mixture, load_base_model, load_demo_mixture
from .cache import deterministic_torch
from .recipe import EXPERTS_DIR, RECIPE, DemoRecipe
from .tasks import TASKS, make_task_examples

if TYPE_CHECKING:
    from ..model import XLoraModel


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
    base = load_base_model(folder)
    singles = {
        task: PeftModel.from_pretrained(load_base_model(folder), str(folder / EXPERTS_DIR / task)).eval()
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


def _score_task(
    task: str,
    model: XLoraModel,
    tokenizer: Any,
    base: torch.nn.Module,
    singles: dict[str, torch.nn.Module],
    options: dict[str, Any],
    *,
    seed: int,
    n: int,
    max_length: int,
) -> TaskScores:
    from ..training import routing_report

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


__all__ = ["DemoReport", "TaskScores", "evaluate_demo_mixture", "exact_match"]

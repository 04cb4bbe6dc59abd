"""Routing evidence on the model card: what a visitor reads to judge whether the routing works.

Plain data (:class:`RoutingEvidence`, made by :func:`xlora_hub.evidence.compute_evidence`, which needs the model)
and its two renderings here, in the Hub room, which never imports the model: the card's "Routing evidence"
section (per-expert usage, the entropy, the pictures, the scores of the mixture, each expert alone and the
base model) and the ``model-index`` entries (``huggingface_hub.EvalResult``) through which the Hub shows those
scores. The pictures are files of the same commit, under :data:`EVIDENCE_DIR`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "EVIDENCE_DIR",
    "EVIDENCE_HEADING",
    "BASE",
    "HEATMAP_NAME",
    "MIXTURE",
    "USAGE_NAME",
    "RoutingEvidence",
    "SystemScores",
    "add_evidence",
    "eval_results",
    "evidence_section",
    "expert_system",
    "write_evidence",
    "write_evidence_images",
]

EVIDENCE_DIR = "evidence"
"""Where the pictures live in the mixture repo (replaced whole at each push)."""
HEATMAP_NAME = "routing_heatmap.png"
USAGE_NAME = "expert_usage.png"
EVIDENCE_HEADING = "## Routing evidence"
MIXTURE = "X-LoRA mixture"
BASE = "base model"


def expert_system(name: str) -> str:
    """How the scores name one expert run alone on the base model."""
    return f"expert {name} alone"


@dataclass(frozen=True)
class SystemScores:
    """The scores of one system on the evaluation data: the mixture, one expert alone, or the base model.

    ``loss`` is the mean next-token cross-entropy over every supervised token (the completion tokens of a
    prompt/completion example, every token of a text example); ``exact_match`` the fraction of
    prompt/completion examples whose greedy answer is the completion, ``None`` when the data has none.
    """

    system: str
    loss: float
    exact_match: float | None = None


@dataclass(frozen=True)
class RoutingEvidence:
    """What the mixture did on a data set: per-expert usage over the real tokens, the entropy, the scores.

    ``mean_weights[j]``: expert j's routing weight (processed scalings, mean over the X-LoRA layers), averaged
    over every real (not padding) token; ``top1_shares[j]``: the share of those tokens where expert j weighs
    most; ``entropy``: the mean per-token entropy (nats) of the weights normalised to sum to one, at most
    ``log(n_experts)``. ``images``: PNG bytes by file name (empty when plots were not asked for).
    """

    dataset_name: str
    n_examples: int
    sha256: str
    n_tokens: int
    expert_names: list[str]
    mean_weights: list[float]
    top1_shares: list[float]
    entropy: float
    scores: list[SystemScores]
    images: dict[str, bytes] = field(default_factory=dict)

    @property
    def max_entropy(self) -> float:
        return math.log(len(self.expert_names)) if self.expert_names else 0.0

    def score(self, system: str) -> SystemScores:
        """The scores of one system (:data:`MIXTURE`, :data:`BASE` or :func:`expert_system`)."""
        return next(s for s in self.scores if s.system == system)


def _number(value: float | None, *, percent: bool = False) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" if percent else f"{value:.4f}"


def evidence_section(evidence: RoutingEvidence) -> str:
    """The card's "Routing evidence" section (markdown): data, usage table, entropy, pictures, scores."""
    usage = "\n".join(
        f"| `{name}` | {weight:.3f} | {100 * share:.1f}% |"
        for name, weight, share in zip(evidence.expert_names, evidence.mean_weights, evidence.top1_shares)
    )
    has_em = any(s.exact_match is not None for s in evidence.scores)
    score_head = "| System | Loss | Exact match |\n|---|---|---|" if has_em else "| System | Loss |\n|---|---|"
    score_rows = "\n".join(
        f"| {s.system} | {_number(s.loss)} |" + (f" {_number(s.exact_match, percent=True)} |" if has_em else "")
        for s in evidence.scores
    )
    em_note = "; exact match: the greedy answer is the completion" if has_em else ""
    pictures = "".join(
        f"\n![{alt}]({EVIDENCE_DIR}/{name})\n"
        for name, alt in ((HEATMAP_NAME, "Routing heatmap"), (USAGE_NAME, "Expert usage"))
        if name in evidence.images
    )
    return f"""
{EVIDENCE_HEADING}

Measured on `{evidence.dataset_name}` ({evidence.n_examples} examples, {evidence.n_tokens} tokens, sha256
`{evidence.sha256}`). Routing weights are the processed scalings, averaged over the X-LoRA layers and over the
real tokens (padding excluded).

| Expert | Mean routing weight | Top-1 share of tokens |
|---|---|---|
{usage}

Routing entropy: {evidence.entropy:.3f} nats per token (uniform routing: {evidence.max_entropy:.3f}).
{pictures}
Scores on the same data (loss: mean next-token cross-entropy over the supervised tokens{em_note}; an expert
alone is its LoRA at full weight on the base model):

{score_head}
{score_rows}
"""


def eval_results(evidence: RoutingEvidence) -> list[Any]:
    """The ``model-index`` entries (``huggingface_hub.EvalResult``): every system's loss (and exact match)."""
    from huggingface_hub import EvalResult

    results = []
    for s in evidence.scores:
        metrics = [("loss", "Loss", s.loss), ("exact_match", "Exact match", s.exact_match)]
        for metric_type, label, value in metrics:
            if value is None:
                continue
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="Text generation",
                    dataset_type=evidence.dataset_name,
                    dataset_name=evidence.dataset_name,
                    metric_type=metric_type,
                    metric_name=f"{label} ({s.system})",
                    metric_value=round(float(value), 6),
                )
            )
    return results


def add_evidence(card: Any, evidence: RoutingEvidence, *, repo_id: str | None) -> Any:
    """``card`` (a ``huggingface_hub.ModelCard``) with the evidence section appended and the scores in its
    ``model-index`` (``eval_results`` needs a model name: the repo id). Works on whatever card was written."""
    card.data.model_name = repo_id or card.data.model_name or "X-LoRA mixture"
    card.data.eval_results = eval_results(evidence)
    card.text = card.text.rstrip("\n") + "\n" + evidence_section(evidence)
    return card


def write_evidence(folder: Path, evidence: RoutingEvidence, *, repo_id: str | None, card_name: str) -> None:
    """Add the evidence to the card in ``folder`` and write its pictures beside it, for one commit."""
    from huggingface_hub import ModelCard

    path = Path(folder) / card_name
    add_evidence(ModelCard.load(path), evidence, repo_id=repo_id).save(str(path))
    write_evidence_images(evidence, folder)


def write_evidence_images(evidence: RoutingEvidence, folder: Path) -> None:
    """Write the pictures into ``folder/evidence/`` (the folder about to be committed with the card)."""
    if not evidence.images:
        return
    target = Path(folder) / EVIDENCE_DIR
    target.mkdir(parents=True, exist_ok=True)
    for name, data in evidence.images.items():
        (target / name).write_bytes(data)

"""The Hub room: mixtures as Hub citizens (fetch, check, save, push, pull, summarise, model card, tokenizer).

A mixture is small on purpose: ``xlora_config.json`` (settings, base model, expert references, layer names),
``xlora_classifier.safetensors`` (the gating classifier, with metadata a loader checks before building
anything) and a ``README.md`` model card. Experts stay in their own Hub repos, referenced at a pinned commit;
only experts that exist nowhere else (local folders, trained experts) are copied into ``experts/<name>/``. All
Hub I/O goes through ``huggingface_hub``.

This package sits below the model (:mod:`xlora_hub.model`) and never imports it at run time: functions that
take a model use what it exposes. ``XLoraModel.from_pretrained`` calls :func:`open_mixture` once and builds
itself. Modules, one job each:

* :mod:`.api`: the ``HfApi`` factory and the wording of lost connections;
* :mod:`.experts` / :mod:`.expert_checks`: resolving expert refs to folders; checking them against a base model;
* :mod:`.format`: the folder format's names, readers and header checks;
* :mod:`.fetch` / :mod:`.open`: finding a mixture's files and its base model; everything a load does before building;
* :mod:`.save` / :mod:`.push` / :mod:`.pull`: writing a folder, pushing a repo, downloading for offline use;
* :mod:`.summary` / :mod:`.card` / :mod:`.tokenizer`: ``inspect_mixture``, the model card, the one tokenizer loader;
* :mod:`.pins` / :mod:`.check`: expert weight files recorded by sha256 and checked, headers read remotely;
  ``check_mixture`` (everything a load would refuse, found without downloading weights).
"""

from __future__ import annotations

from .api import (
    clear_connection_errors,
    client_identity,
    hub_api,
    hub_connection_error,
    hub_endpoint,
    transport_errors,
)
from .card import ExpertFacts, licence_warnings, make_model_card, read_expert_facts
from .card_evidence import (
    EVIDENCE_DIR,
    EVIDENCE_HEADING,
    RoutingEvidence,
    SystemScores,
    add_evidence,
    evidence_section,
    expert_system,
    write_evidence,
)
from .check import Problem, check_mixture
from .collection import check_collection_title, update_collection
from .expert_checks import (
    adapter_tensor_shapes,
    check_expert_matches_model,
    read_adapter_config,
    warn_on_base_mismatch,
)
from .experts import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PICKLE_WEIGHTS_NAME,
    ExpertOrigin,
    ResolvedExpert,
    cached_commit_sha,
    resolve_expert,
    safe_relative_path,
    snapshot_sha,
)
from .fetch import MixtureSource, fetch_mixture, load_base_model, local_mixture_folder, resolve_base_model_ref
from .format import (
    CARD_TAGS,
    EXPERT_FILES,
    EXPERTS_DIR,
    LIBRARY_NAME,
    MODEL_CARD_NAME,
    check_classifier_file,
    classifier_metadata,
    classifier_shapes,
    expected_classifier_shapes,
    read_classifier_header,
    read_mixture_config,
    settings_dict,
)
from .open import MixtureFiles, open_mixture
from .pull import BASE_MODEL_PATTERNS, DownloadResult, download_mixture
from .push import expert_repo_id, push_mixture
from .save import ExpertPlan, bundled_names, plan_experts, save_mixture, write_expert_files, write_mixture
from .summary import ExpertSummary, MixtureSummary, inspect_mixture
from .tokenizer import load_tokenizer

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "BASE_MODEL_PATTERNS",
    "CARD_TAGS",
    "EVIDENCE_DIR",
    "EVIDENCE_HEADING",
    "EXPERTS_DIR",
    "EXPERT_FILES",
    "LIBRARY_NAME",
    "MODEL_CARD_NAME",
    "PICKLE_WEIGHTS_NAME",
    "DownloadResult",
    "ExpertFacts",
    "ExpertOrigin",
    "ExpertPlan",
    "ExpertSummary",
    "MixtureFiles",
    "MixtureSource",
    "MixtureSummary",
    "Problem",
    "ResolvedExpert",
    "RoutingEvidence",
    "SystemScores",
    "add_evidence",
    "adapter_tensor_shapes",
    "bundled_names",
    "cached_commit_sha",
    "check_classifier_file",
    "check_collection_title",
    "check_expert_matches_model",
    "check_mixture",
    "classifier_metadata",
    "classifier_shapes",
    "clear_connection_errors",
    "client_identity",
    "download_mixture",
    "evidence_section",
    "expected_classifier_shapes",
    "expert_repo_id",
    "expert_system",
    "fetch_mixture",
    "hub_api",
    "hub_connection_error",
    "hub_endpoint",
    "inspect_mixture",
    "load_base_model",
    "licence_warnings",
    "load_tokenizer",
    "local_mixture_folder",
    "make_model_card",
    "open_mixture",
    "plan_experts",
    "push_mixture",
    "read_adapter_config",
    "read_classifier_header",
    "read_expert_facts",
    "read_mixture_config",
    "resolve_base_model_ref",
    "resolve_expert",
    "safe_relative_path",
    "save_mixture",
    "settings_dict",
    "snapshot_sha",
    "transport_errors",
    "update_collection",
    "warn_on_base_mismatch",
    "write_evidence",
    "write_expert_files",
    "write_mixture",
]

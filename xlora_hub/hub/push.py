"""``push_mixture``: a mixture pushed to the Hub in one commit, every Hub expert (and the base model) pinned first.

Experts that exist only as local folders are bundled, pushed to their own repos, or refused before anything
is pushed; a local base model folder is never written into the pushed files. The model is used through what it
exposes (``xlora_config``, ``experts``); this package never imports :mod:`xlora_hub.model` at run time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import CONFIG_NAME, BaseModelRef, ExpertRef
from ..errors import ExpertNotFoundError, InvalidMixtureError
from ..jsonfile import read_json_object
from ..refs import hub_url, is_commit_sha, is_stored_hub_id, loaded_base_folder, stored_base_hub_id
from .api import clear_connection_errors, hub_api
from .card import ExpertFacts, licence_warnings, make_model_card, read_expert_facts
from .card_evidence import EVIDENCE_DIR, write_evidence
from .collection import check_collection_title, update_collection
from .experts import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    ResolvedExpert,
    config_path_in_repo,
    weights_path_in_repo,
)
from .format import EXPERT_FILES, EXPERTS_DIR, MODEL_CARD_NAME
from .pins import locked_ref
from .save import bundled_names, plan_experts, write_mixture

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from ..model import XLoraModel
    from .card_evidence import RoutingEvidence

__all__ = ["expert_repo_id", "push_mixture"]

logger = logging.getLogger(__name__)


def _pin(expert: ResolvedExpert, api: Any) -> ExpertRef:
    """The expert's Hub ref pinned to a commit sha: the one it was loaded at, or the one its revision names now."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    ref = expert.ref
    if ref.is_pinned:
        return ref
    sha = expert.commit_sha
    if not sha:
        try:
            sha = api.model_info(ref.repo_id, revision=ref.revision).sha
        except RepositoryNotFoundError as err:
            raise ExpertNotFoundError(
                f"Expert {expert.name!r}: Hub repo {ref.repo_id!r} was not found (or the token cannot read it); "
                "cannot pin it before pushing."
            ) from err
        except RevisionNotFoundError as err:
            raise ExpertNotFoundError(
                f"Expert {expert.name!r}: revision {ref.revision!r} does not exist in {ref.repo_id!r}."
            ) from err
    return ExpertRef(repo_id=ref.repo_id, revision=sha, subfolder=ref.subfolder)


def _pin_base_model(ref: BaseModelRef | None, api: Any) -> BaseModelRef | None:
    """The base model pinned to the commit its revision names now (Hub ids only; a local folder stays as it is)."""
    from huggingface_hub.errors import HfHubHTTPError

    if ref is None or not is_stored_hub_id(ref.repo_id) or is_commit_sha(ref.revision):
        return ref
    try:
        sha = api.model_info(ref.repo_id, revision=ref.revision).sha
    except (HfHubHTTPError, OSError) as err:  # the base may be a private model the token cannot read
        from ..redact import redact

        why = redact(" ".join(str(err).split()), [getattr(api, "token", None)])
        logger.warning("Could not pin base model %r to a commit (%s); it stays unpinned.", ref.repo_id, why)
        return ref
    return BaseModelRef(repo_id=ref.repo_id, revision=sha, quantization=ref.quantization) if sha else ref


def expert_repo_id(repo_id: str, name: str) -> str:
    """Where ``push_local_experts=True`` pushes a local expert: ``<mixture repo>-<expert name>``."""
    return f"{repo_id}-{name.replace('_', '-')}"


def _push_expert(
    api: Any,
    expert: ResolvedExpert,
    repo_id: str,
    *,
    mixture: str,
    private: bool | None,
    loaded_from: str | None = None,
    hub_base: str | None = None,
) -> ExpertRef:
    """Push a local expert's adapter files (and a small card) to its own repo; return the pinned ref."""
    from huggingface_hub import ModelCard, ModelCardData

    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory(prefix="xlora-expert-") as tmp:
        folder = Path(tmp)
        for filename in EXPERT_FILES:
            shutil.copyfile(expert.local_dir / filename, folder / filename)
        _drop_local_base_paths(folder, loaded_from=loaded_from, hub_base=hub_base)
        base = read_json_object(folder / ADAPTER_CONFIG_NAME).get("base_model_name_or_path")
        data = ModelCardData(
            base_model=base if is_stored_hub_id(base) else None, library_name="peft", tags=["lora", "x-lora-expert"]
        )
        body = (
            f"\n# {repo_id}\n\nLoRA expert `{expert.name}` of the X-LoRA mixture "
            f"[{mixture}]({hub_url(mixture, revision='main')}), pushed by xlora-hub. A plain peft LoRA adapter.\n"
        )
        ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").save(str(folder / MODEL_CARD_NAME))
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=f"Upload LoRA expert {expert.name!r} (xlora-hub)"
        )
    sha = getattr(info, "oid", None)
    if not is_commit_sha(sha):
        sha = api.model_info(repo_id).sha
    return ExpertRef(repo_id=repo_id, revision=sha)


def _local_experts(model: XLoraModel, *, push_local_experts: bool) -> list[ResolvedExpert]:
    """The experts only this machine has (trained ones are always exported; ones the mixture bundles are kept)."""
    if model.xlora_config.use_trainable_adapters:
        return []
    already_bundled = bundled_names(model)
    return [e for e in model.experts if not e.ref.is_hub and (push_local_experts or e.name not in already_bundled)]


def push_mixture(
    model: XLoraModel,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    branch: str | None = None,
    create_pr: bool = False,
    bundle_experts: bool = False,
    push_local_experts: bool = False,
    revision: str | None = None,
    base_model: str | None = None,
    evidence: RoutingEvidence | None = None,
    collection: str | None = None,
) -> CommitInfo:
    """Push the mixture to ``repo_id`` in one commit, every Hub expert (and the base model) pinned to a commit first.

    Experts that are only local folders are bundled (``bundle_experts=True``), pushed to their own repos
    ``<repo_id>-<name>`` (``push_local_experts=True``, with the same ``private``), or refused before anything
    is pushed. Trained experts are always bundled. ``revision`` is an alias of ``branch``. The repo id is the
    one ``create_repo`` returns (a name without a namespace lands in the token's user namespace).

    ``base_model`` is the Hub repo id to record as the base model (for a mixture made on a local copy of it).
    A local base model folder is never written into the pushed files: without ``base_model`` the pushed
    config records none (with a warning), and its users pass ``base_model=`` when loading. A lost or refused
    connection is a ``ConnectionError`` naming the endpoint.

    ``evidence`` (:func:`xlora_hub.evidence.compute_evidence`) puts the routing evidence on the card, its
    scores in the ``model-index`` and its pictures under ``evidence/``, in the same commit. ``collection``: the
    title of a Hub collection to create or update with the mixture, its experts, base model and Spaces.
    """
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    if branch is not None and revision is not None and branch != revision:
        raise ValueError(f"`branch={branch!r}` and `revision={revision!r}` disagree; give one of them.")
    local = _local_experts(model, push_local_experts=push_local_experts)
    if local and not (bundle_experts or push_local_experts):
        names = ", ".join(f"{e.name!r} ({e.local_dir})" for e in local)
        raise InvalidMixtureError(
            f"Expert(s) {names} exist only as local folders, so the pushed mixture could not reference them. Pass "
            "`bundle_experts=True` to copy them into the mixture repo, or `push_local_experts=True` to push each "
            f"to its own repo ({expert_repo_id(repo_id, local[0].name)!r}, ...). Nothing was pushed."
        )
    if base_model is not None:
        validate_repo_id(base_model)
    if collection is not None:
        collection = check_collection_title(collection)
    branch = branch or revision
    with clear_connection_errors(f"Pushing the mixture to {repo_id!r}", token=token, download=False):
        api = hub_api(token)
        overrides = _pinned_hub_refs(model, api, bundle_experts=bundle_experts)  # read-only: before anything is made
        overrides = _locked_refs(model, api, overrides)  # digests recorded, the loaded copies checked
        facts = _expert_facts(api, overrides)
        base = _pushed_base_model(model, repo_id, base_model, api)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # with the user's namespace
        if push_local_experts and not bundle_experts and not model.xlora_config.use_trainable_adapters:
            for expert in local:
                repo = expert_repo_id(repo_id, expert.name)
                pushed = _push_expert(
                    api,
                    expert,
                    repo,
                    mixture=repo_id,
                    private=private,
                    loaded_from=loaded_base_folder(model.model),
                    hub_base=base.repo_id if base is not None else None,
                )
                # its pushed config is not the local file (a local base path is cleared): recorded as pushed
                overrides[expert.name] = _locked_refs(model, api, {expert.name: pushed}, local_config=False)[
                    expert.name
                ]
                facts[expert.name] = ExpertFacts()  # its new repo: no licence in its card, not gated
        plans = plan_experts(model, bundle_experts=bundle_experts, overrides=overrides)
        info = _upload(
            model,
            api,
            repo_id,
            plans,
            base,
            branch=branch,
            commit_message=commit_message,
            create_pr=create_pr,
            evidence=evidence,
            facts=facts,
        )
        if collection is not None:
            _collect(api, collection, repo_id, overrides, base, private=private)
        return info


def _collect(
    api: Any, title: str, repo_id: str, refs: dict[str, ExpertRef], base: BaseModelRef | None, *, private: bool | None
) -> None:
    """Add the pushed mixture, its Hub experts, its Hub base model and its Spaces to the collection ``title``."""
    experts = [ref.repo_id for ref in refs.values() if ref.is_hub and ref.repo_id]
    base_id = base.repo_id if base is not None and is_stored_hub_id(base.repo_id) else None
    update_collection(api, title, repo_id, experts=experts, base_model=base_id, private=private)


def _pinned_hub_refs(model: XLoraModel, api: Any, *, bundle_experts: bool) -> dict[str, ExpertRef]:
    """Each Hub expert's ref pinned to a commit, for the pushed config (none when every expert is bundled)."""
    if model.xlora_config.use_trainable_adapters or bundle_experts:
        return {}
    return {expert.name: _pin(expert, api) for expert in model.experts if expert.ref.is_hub}


def _locked_refs(
    model: XLoraModel, api: Any, refs: dict[str, ExpertRef], *, local_config: bool = True
) -> dict[str, ExpertRef]:
    """Each pinned Hub ref with the sha256 and size of its weight file and of its adapter config as the Hub reports
    them (format version 2), the loaded copies checked to be those files (the config's only with ``local_config``:
    an expert pushed here has the config xlora-hub wrote, which is then read back from the Hub)."""
    experts = {expert.name: expert for expert in model.experts}
    out = {}
    for name, ref in refs.items():
        local = experts[name].local_dir / ADAPTER_WEIGHTS_NAME if name in experts else None
        config = experts[name].local_dir / ADAPTER_CONFIG_NAME if name in experts and local_config else None
        path = weights_path_in_repo(ref, name=name)
        out[name] = locked_ref(
            api,
            name,
            ref,
            path_in_repo=path,
            local_file=local if local and local.is_file() else None,
            config_path_in_repo=config_path_in_repo(ref, name=name),
            local_config=config if config and config.is_file() else None,
        )
    return out


def _expert_facts(api: Any, refs: dict[str, ExpertRef]) -> dict[str, ExpertFacts]:
    """Each Hub expert's licence and gating for the card, each reason for care logged as a warning (the CLI
    prints it on stderr)."""
    facts = read_expert_facts(api, refs)
    for line in licence_warnings(facts):
        logger.warning("%s", line.replace("`", "'"))
    return facts


def _upload(
    model: XLoraModel, api: Any, repo_id: str, plans: list[Any], base: BaseModelRef | None, **options: Any
) -> CommitInfo:
    """Write the mixture into a temporary folder and upload it as one commit (old bundled experts replaced)."""
    branch = options["branch"]
    with tempfile.TemporaryDirectory(prefix="xlora-mixture-") as tmp:
        config = write_mixture(model, Path(tmp), plans, repo_id=repo_id, base_model=base)
        if base is None and model.xlora_config.base_model is not None:
            config = config.replace(base_model=None)
            config.save(Path(tmp) / CONFIG_NAME)
        card = make_model_card(config, repo_id=repo_id, experts=options["facts"])  # with licences and gating
        card.save(str(Path(tmp) / MODEL_CARD_NAME))
        if options["evidence"] is not None:
            write_evidence(Path(tmp), options["evidence"], repo_id=repo_id, card_name=MODEL_CARD_NAME)
        hub_base = base.repo_id if base is not None else None
        _drop_local_base_paths(Path(tmp) / EXPERTS_DIR, loaded_from=loaded_base_folder(model.model), hub_base=hub_base)
        if branch is not None:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=options["commit_message"]
            or f"Upload X-LoRA mixture of {config.n_experts} experts (xlora-hub)",
            revision=branch,
            create_pr=options["create_pr"],
            delete_patterns=[f"{EXPERTS_DIR}/**", f"{EVIDENCE_DIR}/**"],
        )


def _pushed_base_model(model: XLoraModel, repo_id: str, given: str | None, api: Any) -> BaseModelRef | None:
    """The base model the pushed config records: ``given`` (a Hub id) or the model's own, pinned; ``None``
    for a local folder, whose path means nothing on another machine (and must not be published)."""
    if given is not None:
        return _pin_base_model(BaseModelRef(repo_id=given), api)
    base = _pin_base_model(model.xlora_config.base_model, api)
    if base is not None and not is_stored_hub_id(base.repo_id):
        logger.warning(
            "The base model of %r is the local folder %r: the pushed mixture records no base model (a local path "
            "is never published), so its users must pass `base_model=` when loading it. To record it, push the "
            "base model to the Hub and pass its repo id: `push_to_hub(repo_id, base_model='owner/name')` "
            "(`xlora-hub push ... --base-model owner/name`).",
            repo_id,
            base.repo_id,
        )
        return None
    return base


def _drop_local_base_paths(folder: Path, *, loaded_from: str | None = None, hub_base: str | None = None) -> None:
    """Clear a local ``base_model_name_or_path`` in the peft adapter configs under ``folder`` before they are
    pushed: peft records the folder the expert was trained on, a path on this machine.

    When that folder is the one the mixture's base was loaded from (``loaded_from``: ``base_model`` inside the
    mixture, as the demo's experts record it) and the base is pushed as ``hub_base``, the expert names that Hub
    repo instead, so its card files it under the right base and a load does not warn about another base."""
    for path in sorted(folder.rglob(ADAPTER_CONFIG_NAME)) if folder.is_dir() else []:
        data = read_json_object(path)
        value = data.get("base_model_name_or_path")
        if not isinstance(value, str) or not value or stored_base_hub_id(value, loaded_from=loaded_from):
            continue
        same_base = loaded_from is not None and (
            stored_base_hub_id(value, loaded_from=None) is not None  # a bare name ending the loaded folder
            or os.path.realpath(os.path.expanduser(value)) == loaded_from
        )
        data["base_model_name_or_path"] = hub_base if same_base else None
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

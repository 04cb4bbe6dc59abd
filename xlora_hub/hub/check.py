"""``check_mixture``: everything a load would refuse, found from the Hub's records and file headers, no weight downloaded.

For a mixture author's CI (``xlora-hub check``): every pin resolves, each Hub expert's recorded digest and size
are the Hub's (its LFS record, :mod:`.pins`), each expert's tensor header (read remotely with ``Range``
requests) fits the base model, which is built from its ``config.json`` on the ``meta`` device (no weight is
allocated or downloaded), the classifier's header fits the config, and the recorded layer order is the one a
load would build. Only JSON files (the mixture's config, each expert's adapter config, the base model's
config) are downloaded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import CLASSIFIER_WEIGHTS_NAME, BaseModelRef, ExpertRef, XLoraConfig
from ..errors import XLoraHubError
from ..refs import is_commit_sha, is_stored_hub_id
from .api import clear_connection_errors, client_identity, hub_api
from .expert_checks import check_expert_matches_model
from .experts import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    ResolvedExpert,
    resolve_expert,
    safe_relative_path,
    weights_path_in_repo,
)
from .fetch import MixtureSource, _model_class, fetch_mixture, resolve_base_model_ref
from .format import expected_classifier_shapes, read_classifier_header
from .pins import TensorHeader, check_expert_config_digest, remote_file_record, remote_tensor_header

__all__ = ["Problem", "check_mixture"]


@dataclass(frozen=True)
class Problem:
    """One thing a load of the mixture would refuse (or a pin that is not lockfile-grade): what, and why."""

    subject: str
    message: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.message}"


class _Found(Exception):
    """A problem found inside a step; the step stops there and the problem is reported."""

    def __init__(self, problem: Problem):
        super().__init__(str(problem))
        self.problem = problem


@contextlib.contextmanager
def _as_problem(subject: str) -> Iterator[None]:
    """Turn the library's named errors, and the Hub client's "not found" answers, into a problem of ``subject``."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        yield
    except (XLoraHubError, RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, OSError) as err:
        if isinstance(err, ConnectionError):
            raise
        raise _Found(Problem(subject, " ".join(str(err).split()))) from None


def check_mixture(
    repo_id_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    base_model: str | os.PathLike[str] | None = None,
) -> list[Problem]:
    """The problems of a mixture (Hub repo or folder), one per failed check; an empty list when it is sound.

    Checked without downloading any weight: the config; each Hub expert's pin (a commit that exists), its
    recorded ``sha256``/``size`` against the Hub's record, its adapter config and tensor header against the
    base model; the base model (its pin and config); the classifier header; the layer order. A lost connection
    is a ``ConnectionError`` (not a problem of the mixture).

    ``base_model`` (a Hub repo id or a model folder; only its ``config.json`` is read) replaces the recorded base,
    as ``from_pretrained(base_model=)`` does: a mixture pushed from a local base folder records none.
    """
    label = os.fspath(repo_id_or_path)
    with clear_connection_errors(f"Checking mixture {label!r}", token=token):
        try:
            with _as_problem("mixture"):
                source = fetch_mixture(
                    repo_id_or_path, revision=revision, token=token, cache_dir=cache_dir, with_weights=False
                )
        except _Found as found:
            return [found.problem]
        return _Checker(source, token=token, cache_dir=cache_dir, base_model=base_model).run()


class _Checker:
    """The checks of one mixture, each adding its problems; later checks run on what earlier ones established."""

    def __init__(
        self,
        source: MixtureSource,
        *,
        token: str | bool | None,
        cache_dir: Any,
        base_model: str | os.PathLike[str] | None = None,
    ):
        self.source = source
        self.base_override = base_model
        self.config: XLoraConfig = source.config
        self.token = token
        self.cache_dir = cache_dir
        self.api = hub_api(token)
        self.problems: list[Problem] = []

    def run(self) -> list[Problem]:
        self._step(self._classifier)
        base = self._step(self._base_model)
        adapted: dict[str, set[str]] = {}
        for name, ref in self.config.experts.items():
            modules = self._step(self._expert, name, ref, base)
            if modules is not None:
                adapted[name] = modules
        if base is not None and len(adapted) == self.config.n_experts:
            self._step(self._layer_order, base, adapted)
        return self.problems

    def _step(self, check: Any, *args: Any) -> Any:
        """Run one check; a problem it finds is recorded and ``None`` returned."""
        try:
            return check(*args)
        except _Found as found:
            self.problems.append(found.problem)
            return None

    # ------------------------------------------------------------------------------------------ the mixture
    def _classifier(self) -> None:
        """The classifier's header (read remotely for a Hub mixture) against the config."""
        expected = expected_classifier_shapes(self.config)
        with _as_problem("classifier"):
            if self.source.repo_id is None:
                shapes, _ = read_classifier_header(
                    self.source.folder / CLASSIFIER_WEIGHTS_NAME, what=self.source.label, max_tensors=len(expected)
                )
            else:
                header = remote_tensor_header(
                    self.source.repo_id,
                    CLASSIFIER_WEIGHTS_NAME,
                    revision=self.source.commit,
                    token=self.token,
                    what=f"Mixture {self.source.label}",
                )
                shapes = {key: shape for key, (shape, _) in header.items()}
        if shapes != expected:
            raise _Found(
                Problem(
                    "classifier",
                    f"{CLASSIFIER_WEIGHTS_NAME} has tensors {sorted(shapes.items())[:4]} but the config describes "
                    f"{sorted(expected.items())[:4]}; save the mixture again.",
                )
            )

    def _base_model(self) -> Any:
        """The base model built from its ``config.json`` on the ``meta`` device (no weight allocated)."""
        import torch
        import transformers

        if self.base_override is not None:
            text = os.fspath(self.base_override)
            local = os.path.expanduser(text)
            ref = BaseModelRef(repo_id=str(Path(local).resolve()) if os.path.isdir(local) else text)
        elif self.config.base_model is None:
            raise _Found(
                Problem(
                    "base model",
                    "the mixture records no base model (it was pushed from a local base folder); pass "
                    "`base_model=` (CLI: --base-model), the Hub repo id or folder of the model it was made on.",
                )
            )
        else:
            with _as_problem("base model"):
                ref = resolve_base_model_ref(self.source)
            self._check_pinned("base model", ref)
        with _as_problem(f"base model {ref.repo_id!r}"):
            auto_config = transformers.AutoConfig.from_pretrained(self._base_config_folder(ref))
        cls = _model_class(auto_config)
        try:
            with torch.device("meta"):  # module shapes only: nothing is allocated or downloaded
                model = (
                    cls(auto_config) if issubclass(cls, transformers.PreTrainedModel) else cls.from_config(auto_config)
                )
        except Exception as err:  # an architecture transformers cannot build from its config alone
            raise _Found(
                Problem(
                    f"base model {ref.repo_id!r}", f"cannot be built from its config.json ({type(err).__name__}: {err})"
                )
            ) from None
        text = auto_config.get_text_config() if hasattr(auto_config, "get_text_config") else auto_config
        hidden = next((getattr(text, a) for a in ("hidden_size", "n_embd", "d_model") if hasattr(text, a)), None)
        if self.config.hidden_size is not None and hidden is not None and hidden != self.config.hidden_size:
            self.problems.append(
                Problem(
                    f"base model {ref.repo_id!r}",
                    f"hidden size {hidden}, but the mixture was made for hidden size {self.config.hidden_size}.",
                )
            )
        return model

    def _base_config_folder(self, ref: BaseModelRef) -> str:
        """Where the base model's ``config.json`` is: its folder, or the Hub file downloaded with xlora-hub's user
        agent (``AutoConfig.from_pretrained`` of a repo id sends transformers' own)."""
        from huggingface_hub import hf_hub_download

        if os.path.isdir(os.path.expanduser(ref.repo_id)):
            return os.path.expanduser(ref.repo_id)
        path = hf_hub_download(
            ref.repo_id,
            "config.json",
            revision=ref.revision,
            token=self.token,
            cache_dir=self.cache_dir,
            **client_identity(),
        )
        return str(Path(path).parent)

    def _check_pinned(self, subject: str, ref: BaseModelRef | ExpertRef) -> None:
        """A Hub ref whose revision is not a commit sha can change under the mixture's users: a problem (in a Hub
        mixture; a local folder's refs are pinned when it is pushed)."""
        repo_id = ref.repo_id
        if (
            self.source.repo_id is None
            or repo_id is None
            or (isinstance(ref, BaseModelRef) and not is_stored_hub_id(repo_id))
        ):
            return  # a bundled expert (the mixture's commit pins it) or a local base folder
        if not is_commit_sha(ref.revision):
            self.problems.append(
                Problem(
                    subject,
                    f"{repo_id} is not pinned to a commit (revision {ref.revision or 'main'!r}); push the mixture "
                    "with xlora-hub to pin it.",
                )
            )

    # ------------------------------------------------------------------------------------------ experts
    def _expert(self, name: str, ref: ExpertRef, base: Any) -> set[str] | None:
        """One expert: pin, digest record, adapter config and tensor header against the base model."""
        subject = f"expert {name!r}"
        if ref.is_hub:
            expert, header = self._hub_expert(name, ref)
        else:
            expert, header = self._bundled_expert(name, ref)
        if base is None:
            return None
        with _as_problem(subject):
            return check_expert_matches_model(expert, base, header=header)

    def _hub_expert(self, name: str, ref: ExpertRef) -> tuple[ResolvedExpert, TensorHeader]:
        """A Hub expert's pin resolved, its digest record compared with the Hub's, its config and header read."""
        from huggingface_hub import hf_hub_download

        subject = f"expert {name!r}"
        assert ref.repo_id is not None
        self._check_pinned(subject, ref)
        path = weights_path_in_repo(ref, name=name)
        with _as_problem(subject):
            commit = self.api.model_info(ref.repo_id, revision=ref.revision).sha or ref.revision
            self._check_digest(name, ref, path, commit)
            config_path = hf_hub_download(
                ref.repo_id,
                ADAPTER_CONFIG_NAME,
                subfolder=ref.subfolder,
                revision=commit,
                token=self.token,
                cache_dir=self.cache_dir,
                **client_identity(),
            )
            check_expert_config_digest(name, ref, config_path, revision=commit)  # the config the mixture was built with
            header = remote_tensor_header(ref.repo_id, path, revision=commit, token=self.token, what=f"Expert {name!r}")
        return ResolvedExpert(name, ref, Path(config_path).parent, commit_sha=commit, origin="hub"), header

    def _check_digest(self, name: str, ref: ExpertRef, path: str, commit: str | None) -> None:
        """The recorded ``sha256``/``size`` against the Hub's record of the file at the pinned commit."""
        assert ref.repo_id is not None
        subject = f"expert {name!r}"
        if ref.sha256 is None and ref.size is None:
            if self.source.repo_id is not None:  # a local folder gets its digests when it is pushed
                self.problems.append(
                    Problem(
                        subject,
                        "no sha256/size of its weight file is recorded (pushed before format version 2): a "
                        "rewritten revision or a mirror would go unnoticed. Push the mixture again with this release.",
                    )
                )
            return
        sha256, _, size = remote_file_record(self.api, ref.repo_id, path, revision=commit or "main")
        if ref.sha256 is not None and sha256 is None and (ref.size is None or size == ref.size):
            self.problems.append(
                Problem(
                    subject,
                    f"cannot verify sha256 remotely: {ref.repo_id}@{commit}'s {path} is not an LFS file (the Hub "
                    f"records no sha256 for it); only its size ({size:,d} bytes) was compared. A load checks the "
                    "sha256 of the file it downloads; move the file to LFS to have it checked here.",
                )
            )
            return
        if (ref.sha256 is not None and sha256 is not None and sha256 != ref.sha256) or (
            ref.size is not None and size != ref.size
        ):
            self.problems.append(
                Problem(
                    subject,
                    f"{ref.repo_id}@{commit}'s {path} has sha256 {sha256 or 'unknown (not an LFS file)'} "
                    f"({size:,d} bytes) on the Hub but the "
                    f"mixture recorded sha256 {ref.sha256} ({ref.size} bytes); the mixture would refuse to load it.",
                )
            )

    def _bundled_expert(self, name: str, ref: ExpertRef) -> tuple[ResolvedExpert, TensorHeader | None]:
        """An expert inside the mixture: a local folder's files, or a Hub mixture's config and remote header."""
        from huggingface_hub import hf_hub_download

        subject = f"expert {name!r}"
        with _as_problem(subject):
            if self.source.repo_id is None:
                return resolve_expert(name, ref, base_dir=self.source.folder), None
            assert ref.path is not None
            subdir = safe_relative_path(ref.path, what=f"Expert {name!r} path")
            if ref.subfolder:
                subdir = subdir / safe_relative_path(ref.subfolder, what=f"Expert {name!r} subfolder")
            config_path = hf_hub_download(
                self.source.repo_id,
                f"{subdir}/{ADAPTER_CONFIG_NAME}",
                revision=self.source.commit,
                token=self.token,
                cache_dir=self.cache_dir,
                **client_identity(),
            )
            header = remote_tensor_header(
                self.source.repo_id,
                f"{subdir}/{ADAPTER_WEIGHTS_NAME}",
                revision=self.source.commit,
                token=self.token,
                what=f"Expert {name!r}",
            )
        return ResolvedExpert(name, ref, Path(config_path).parent, origin="bundled"), header

    # ------------------------------------------------------------------------------------------ layers
    def _layer_order(self, base: Any, adapted: dict[str, set[str]]) -> None:
        """The X-LoRA layers a load would build (the adapted modules in the base's module order) against the config."""
        modules = set().union(*adapted.values())
        built = [name for name, _ in base.named_modules() if name in modules]
        recorded = list(self.config.layer_names or [])
        if built != recorded:
            missing = [n for n in recorded if n not in built][:3]
            extra = [n for n in built if n not in recorded][:3]
            detail = (
                f"missing {missing}, unexpected {extra}" if (missing or extra) else "the same layers in another order"
            )
            self.problems.append(
                Problem(
                    "layers",
                    f"the config records {len(recorded)} X-LoRA layers but these experts on this base build "
                    f"{len(built)} ({detail}); the classifier would route to the wrong layers.",
                )
            )

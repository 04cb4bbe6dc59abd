"""X-LoRA configuration: what a mixture is made of and how it routes.

This module is plain Python (no torch) so a mixture's config can be read, validated and shown
without loading any weights. Every invalid value is rejected at construction with an
:class:`~xlora_hub.errors.InvalidConfigError` that names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config_checks import (
    MAX_EXPERTS,
    check_expert_name,
    check_settings,
)
from .errors import InvalidConfigError, UnsupportedFormatError, short_repr
from .jsonfile import read_json_object
from .refs import is_commit_sha, is_hub_repo_id, is_local_argument, is_sha256

FORMAT_VERSION = 2
"""Version of the ``xlora_config.json`` layout written by this release (2: Hub experts may carry the ``sha256`` and
``size`` of their weight file; version 1 configs, without them, still load)."""

CONFIG_NAME = "xlora_config.json"
CLASSIFIER_WEIGHTS_NAME = "xlora_classifier.safetensors"


@dataclass(frozen=True)
class ExpertRef:
    """Where a LoRA expert lives: a Hub repo (optionally pinned) or a local folder.

    ``path`` is a local folder. When the ref is part of a saved mixture, a relative ``path`` is
    relative to the mixture folder (for example ``experts/math``) and may not escape it.

    ``sha256`` and ``size`` (Hub refs only, format version 2) are those of the expert's
    ``adapter_model.safetensors`` at the pinned commit as the Hub reported them at push (its LFS oid): a
    loader checks the downloaded file against them, so a rewritten revision or a mirror serving other
    bytes is an error rather than another expert. ``config_sha256`` and ``config_size`` (optional, same
    version) record its ``adapter_config.json`` the same way (``r``, ``lora_alpha``, the patterns and the
    target modules decide what the weights compute): the sha256 of the file the mixture was built with.
    """

    repo_id: str | None = None
    revision: str | None = None
    subfolder: str | None = None
    path: str | None = None
    sha256: str | None = None
    size: int | None = None
    config_sha256: str | None = None
    config_size: int | None = None

    def __post_init__(self) -> None:
        if (self.repo_id is None) == (self.path is None):
            raise InvalidConfigError(
                f"An expert reference needs exactly one of `repo_id` or `path` (got repo_id={short_repr(self.repo_id)}, "
                f"path={short_repr(self.path)})."
            )
        for name in ("repo_id", "revision", "subfolder", "path"):  # sha256/size: checked by _check_lock
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidConfigError(
                    f"Expert reference field `{name}` must be a non-empty string, got {short_repr(value)}."
                )
        if self.path is not None and self.revision is not None:
            raise InvalidConfigError(
                f"Expert path {short_repr(self.path)} is a local folder: it cannot have a `revision` (only Hub repos do)."
            )
        self._check_lock()

    def _check_lock(self) -> None:
        """``sha256`` / ``config_sha256``: 64 lower-case hex digits; ``size`` / ``config_size``: byte counts; all
        for Hub refs only."""
        fields = ("sha256", "size", "config_sha256", "config_size")
        if all(getattr(self, name) is None for name in fields):
            return
        if self.path is not None:
            raise InvalidConfigError(
                f"Expert path {short_repr(self.path)} is a local folder: `sha256`/`size` record a Hub file (its "
                "mixture's own commit pins a bundled expert)."
            )
        for name in ("sha256", "config_sha256"):
            value = getattr(self, name)
            if value is not None and not is_sha256(value):
                raise InvalidConfigError(
                    f"Expert reference field `{name}` must be 64 lower-case hex digits, got {short_repr(value)}."
                )
        for name in ("size", "config_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise InvalidConfigError(
                    f"Expert reference field `{name}` must be a byte count (an integer >= 0), got {short_repr(value)}."
                )

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    @property
    def is_pinned(self) -> bool:
        """True when the ref names an exact commit, so it can never change under its users."""
        return is_commit_sha(self.revision)

    @classmethod
    def parse(cls, value: str | os.PathLike[str] | Mapping[str, Any] | ExpertRef) -> ExpertRef:
        """Build a ref from ``owner/name[@revision][:subfolder]``, a local folder, or a dict.

        A string read as a user argument (:func:`xlora_hub.refs.is_local_argument`: path syntax such as ``./``,
        ``../``, ``/`` or ``~``, or an existing folder) is a local path. Anything else is a Hub repo id.
        """
        if isinstance(value, ExpertRef):
            return value
        if isinstance(value, os.PathLike):
            return cls(path=os.fspath(value))
        if isinstance(value, Mapping):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise InvalidConfigError(
                    f"Unknown field(s) {short_repr(sorted(map(str, unknown)))} in expert reference "
                    f"{short_repr(dict(value))}; "
                    "allowed: repo_id, revision, subfolder, path, sha256, size, config_sha256, config_size."
                )
            return cls(**dict(value))
        if not isinstance(value, str) or not value.strip():
            raise InvalidConfigError(
                f"Expert reference must be a Hub repo id, a local folder or a dict, got {short_repr(value)}. "
                "Example: 'my-org/lora-math@main:adapters/math' or './experts/math'."
            )
        value = value.strip()
        if is_local_argument(value):
            return cls(path=value)
        spec, subfolder = value, None
        if ":" in spec:
            spec, subfolder = spec.split(":", 1)
            subfolder = subfolder.strip("/") or None
        revision = None
        if "@" in spec:
            spec, revision = spec.split("@", 1)
            if not revision:
                raise InvalidConfigError(f"Expert reference {short_repr(value)} has an empty revision after '@'.")
        if not is_hub_repo_id(spec):
            raise InvalidConfigError(
                f"Expert reference {short_repr(value)} is neither an existing local folder nor a valid Hub repo id "
                "('owner/name', optionally '@revision' and ':subfolder'). For a local folder, start it with './'."
            )
        return cls(repo_id=spec, revision=revision, subfolder=subfolder)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def __str__(self) -> str:
        if self.path is not None:
            return self.path
        text = self.repo_id or ""
        if self.revision:
            text += f"@{self.revision}"
        if self.subfolder:
            text += f":{self.subfolder}"
        return text


@dataclass(frozen=True)
class BaseModelRef:
    """The base model a mixture was built on (Hub repo id or local path, plus the commit it was loaded at).

    ``quantization`` says how that base was quantized when the mixture was saved (``"bitsandbytes-nf4"``,
    ``"torchao-Int8WeightOnlyConfig"``...; absent when it was not). It is information only: the mixture loads on
    the same base quantized another way or not at all.
    """

    repo_id: str
    revision: str | None = None
    quantization: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.repo_id, str) or not self.repo_id:
            raise InvalidConfigError(
                f"`base_model.repo_id` must be a non-empty string, got {short_repr(self.repo_id)}."
            )
        if self.revision is not None and (not isinstance(self.revision, str) or not self.revision):
            raise InvalidConfigError(
                f"`base_model.revision` must be a non-empty string, got {short_repr(self.revision)}."
            )
        if self.quantization is not None and (not isinstance(self.quantization, str) or not self.quantization):
            raise InvalidConfigError(
                f"`base_model.quantization` must be a non-empty string or absent, got {short_repr(self.quantization)}."
            )

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class XLoraConfig:
    """Settings of an X-LoRA mixture. Field names and defaults follow ``peft.XLoraConfig``.

    Args:
        experts: ordered mapping of expert name (a Python identifier) to an :class:`ExpertRef`
            or a string ``owner/name[@revision][:subfolder]`` / local folder.
        base_model: the base model reference; filled from the model when ``None``.
        hidden_size: hidden size of the base model; filled from the model when ``None``.
        enable_softmax: softmax (with ``softmax_temperature``) over the classifier's logits.
        enable_softmax_topk: softmax over the ``top_k_lora`` kept experts of each token.
        softmax_temperature: lower gives sharper routing.
        layerwise_scalings: one set of scalings per X-LoRA layer instead of one shared set.
        top_k_lora: keep only the k largest scalings of each token (``None``: dense).
        xlora_depth: number of linear layers in the classifier.
        xlora_size: classifier hidden width (used when ``xlora_depth > 1``).
        xlora_dropout_p: classifier dropout (used when ``xlora_depth > 1``).
        use_trainable_adapters: train the experts too, not only the classifier.
        scaling_pass_value: scaling of every expert in the scaling pass (``None``: 1/n_experts).
        global_scaling_weight: multiplies every expert's output in the real pass.
        layer_names: the ordered names of the X-LoRA layers; recorded when the model is built so
            that a mismatch on load is an error rather than silent misrouting.
    """

    experts: dict[str, ExpertRef] = field(default_factory=dict)
    base_model: BaseModelRef | None = None
    hidden_size: int | None = None
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    softmax_temperature: float = 1.0
    layerwise_scalings: bool = False
    top_k_lora: int | None = None
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    scaling_pass_value: float | None = 0.0
    global_scaling_weight: float = 1.0
    layer_names: list[str] | None = None

    def __post_init__(self) -> None:
        self.experts = self._normalise_experts(self.experts)
        if isinstance(self.base_model, str):
            self.base_model = BaseModelRef(repo_id=self.base_model)
        elif isinstance(self.base_model, Mapping):
            self.base_model = BaseModelRef(**dict(self.base_model))
        elif self.base_model is not None and not isinstance(self.base_model, BaseModelRef):
            raise InvalidConfigError(
                f"`base_model` must be a repo id, a dict or a BaseModelRef, got {type(self.base_model).__name__}."
            )
        self.validate()

    @staticmethod
    def _normalise_experts(experts: Any) -> dict[str, ExpertRef]:
        if isinstance(experts, Mapping):
            items = list(experts.items())
        elif isinstance(experts, (list, tuple)):
            items = []
            for entry in experts:
                if not isinstance(entry, Mapping) or "name" not in entry:
                    raise InvalidConfigError(
                        f"Each entry of `experts` given as a list must be a dict with a `name`, got {short_repr(entry)}."
                    )
                entry = dict(entry)
                items.append((entry.pop("name"), entry))
        else:
            raise InvalidConfigError(
                f"`experts` must map expert names to refs (dict) or be a list of dicts, got {type(experts).__name__}."
            )
        if len(items) > MAX_EXPERTS:
            raise InvalidConfigError(f"`experts` lists {len(items):,d} experts, above the limit of {MAX_EXPERTS:,d}.")
        out: dict[str, ExpertRef] = {}
        for name, ref in items:
            check_expert_name(name)
            if name in out:
                raise InvalidConfigError(f"Duplicate expert name {name!r}: every expert needs its own name.")
            out[name] = ExpertRef.parse(ref)
        return out

    def validate(self, *, n_experts: int | None = None) -> None:
        """Check every field; raise :class:`InvalidConfigError` naming the first bad one.

        Numbers must be finite and within sane bounds (a NaN temperature or an infinite weight gives NaN
        logits), and the classifier's size is bounded before anything is built (:mod:`xlora_hub.config_checks`).
        """
        check_settings(self, n_experts=len(self.experts) if n_experts is None else n_experts)

    # ------------------------------------------------------------------ convenience
    @property
    def expert_names(self) -> list[str]:
        return list(self.experts)

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    def resolved_scaling_pass_value(self) -> float:
        """The value used in the scaling pass: ``scaling_pass_value`` or 1/n_experts when it is ``None``."""
        return 1.0 / self.n_experts if self.scaling_pass_value is None else float(self.scaling_pass_value)

    def replace(self, **changes: Any) -> XLoraConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ JSON round trip
    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format_version": FORMAT_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "experts":
                value = [{"name": name, **ref.to_dict()} for name, ref in value.items()]
            elif f.name == "base_model":
                value = value.to_dict() if value is not None else None
            elif f.name == "layer_names" and value is not None:
                value = list(value)
            data[f.name] = value
        if self.layer_names is not None:
            data["n_layers"] = len(self.layer_names)
        data["n_experts"] = self.n_experts
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> XLoraConfig:
        """Read a dict written by :meth:`to_dict`, with clear errors for unknown versions and bad fields."""
        if not isinstance(data, Mapping):
            raise InvalidConfigError(f"{source}: expected a JSON object, got {type(data).__name__}.")
        data = dict(data)
        version = data.pop("format_version", None)
        if version is None:
            raise InvalidConfigError(f"{source}: missing `format_version`; this is not an xlora-hub config.")
        if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise UnsupportedFormatError(
                f"{source}: format_version {short_repr(version, limit=40)} is not supported by this release of xlora-hub "
                f"(it reads versions 1..{FORMAT_VERSION}); upgrade with `pip install -U xlora-hub`."
            )
        n_layers = data.pop("n_layers", None)
        n_experts = data.pop("n_experts", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidConfigError(
                f"{source}: unknown field(s) {short_repr(unknown)}; was it written by a newer release?"
            )
        if "experts" not in data:
            raise InvalidConfigError(f"{source}: missing required field `experts`.")
        try:
            config = cls(**data)
        except InvalidConfigError as err:
            raise InvalidConfigError(f"{source}: {err}") from None
        except TypeError as err:
            raise InvalidConfigError(f"{source}: {short_repr(str(err), limit=300)}") from None
        if n_experts is not None and n_experts != config.n_experts:
            raise InvalidConfigError(
                f"{source}: `n_experts` is {short_repr(n_experts, limit=40)} but {config.n_experts} experts are listed."
            )
        if n_layers is not None and config.layer_names is not None and n_layers != len(config.layer_names):
            raise InvalidConfigError(
                f"{source}: `n_layers` is {short_repr(n_layers, limit=40)} but {len(config.layer_names)} layer names are listed."
            )
        return config

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``xlora_config.json`` atomically (a temp file renamed in place)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json_string(), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> XLoraConfig:
        path = Path(path)
        return cls.from_dict(read_json_object(path), source=str(path))

"""The X-LoRA gating classifier: last hidden state -> per-token expert scalings.

The module layout (an ``nn.Sequential`` called ``layers`` with Linear / ReLU / Dropout in peft's
order) is kept on purpose: its state-dict keys are interchangeable with peft's
``XLoraClassifier`` (``layers.0.weight`` ... ``layers.{last}.bias``), so weights move between the
two without renaming.

The classifier holds the mixture's :class:`~xlora_hub.config.XLoraConfig` (``self.config``) and reads the
softmax settings from it at every forward, so the temperature lives in one place: ``XLoraModel.xlora_config``
is this same object, and its setters replace it here.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import XLoraConfig
from .config_checks import check_classifier_size


class XLoraClassifier(nn.Module):
    """Gating MLP. Returns scalings of shape ``[batch, seq, n_layers, n_experts]``.

    With ``layerwise_scalings=False`` the returned tensor is an expanded view of one
    ``[batch, seq, 1, n_experts]`` tensor (no copy per layer).
    """

    def __init__(
        self,
        config: XLoraConfig,
        *,
        hidden_size: int,
        n_layers: int,
        n_experts: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        # bounded before any layer is made: a config may come from a stranger's repo
        check_classifier_size(
            config, hidden_size=hidden_size, n_layers=n_layers, n_experts=n_experts, source="X-LoRA classifier"
        )
        self.n_layers = n_layers
        self.n_experts = n_experts
        self.hidden_size = hidden_size
        self.config = config
        self.layerwise = config.layerwise_scalings  # fixed: it decides the last layer's shape
        out_features = n_experts * n_layers if self.layerwise else n_experts
        factory = {"dtype": dtype, "device": device}
        layers: list[nn.Module] = []
        width = hidden_size
        for _ in range(config.xlora_depth - 1):
            layers.append(nn.Linear(width, config.xlora_size, bias=True, **factory))
            layers.append(nn.ReLU())
            if config.xlora_dropout_p > 0.0:
                layers.append(nn.Dropout(p=config.xlora_dropout_p))
            width = config.xlora_size
        layers.append(nn.Linear(width, out_features, bias=True, **factory))
        self.layers = nn.Sequential(*layers)

    @property
    def enable_softmax(self) -> bool:
        """Whether a softmax runs over the logits (read from :attr:`config`)."""
        return self.config.enable_softmax

    @property
    def softmax_temperature(self) -> float:
        """The softmax temperature, read from :attr:`config` (the one place it is kept)."""
        return float(self.config.softmax_temperature)

    @property
    def last_layer(self) -> nn.Linear:
        return self.layers[-1]  # type: ignore[return-value]

    def logits(self, hidden_state: torch.Tensor) -> torch.Tensor:
        """Raw classifier logits ``[batch, seq, n_layers or 1, n_experts]`` (before any softmax)."""
        batch, seq = hidden_state.shape[:2]
        logits = self.layers(hidden_state.to(self.last_layer.weight.dtype))
        return logits.reshape(batch, seq, self.n_layers if self.layerwise else 1, self.n_experts)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        scalings = self.logits(hidden_state)
        if self.enable_softmax:
            scalings = torch.softmax(scalings / self.softmax_temperature, dim=-1)
        if not self.layerwise:
            scalings = scalings.expand(-1, -1, self.n_layers, -1)
        return scalings

    def shapes(self) -> dict[str, list[int]]:
        """Tensor name -> shape, as written in the safetensors file."""
        return {name: list(t.shape) for name, t in self.state_dict().items()}

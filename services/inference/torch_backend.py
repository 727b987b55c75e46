"""The torch backend: a version's Hugging Face module (safetensors), placed by loading.py. It
serves every task, images included (`images`)."""

from __future__ import annotations

from typing import Any

import torch

from fmserve.core.repository import ModelConfig
from fmserve.core.tasks import TaskName
from services.inference.backend import encoder_only
from services.inference.loading import Placement, load_module, place
from services.inference.memory import Footprint, module_footprint


class TorchBackend:
    def __init__(
        self, module: torch.nn.Module, placement: Placement, hidden: bool, clip: bool = False
    ) -> None:
        self.module = module
        self.placement = placement
        self.device = placement.device
        self.hf_config: Any = module.config
        self._hidden = hidden
        # audio models take float samples (in the model's precision), text models token ids
        self._audio = module.main_input_name == "input_values"
        self._clip = clip

    @classmethod
    def load(
        cls, config: ModelConfig, version: str, cuda_devices: int | None = None
    ) -> TorchBackend:
        placement = place(config.runtime_of(version), cuda_devices)
        hidden = encoder_only(config)
        module = load_module(config.files(version), config.task, placement, encoder_only=hidden)
        return cls(module, placement, hidden, clip=config.task is TaskName.IMAGE_EMBEDDING)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self._audio:
            values = ids.to(self.placement.dtype)
            return self.module(input_values=values, attention_mask=mask).logits
        if self._clip:
            clip: Any = self.module  # CLIPModel, whose tower methods nn.Module does not type
            features = clip.get_text_features(input_ids=ids, attention_mask=mask)
            return features.pooler_output  # projected into the space shared with images
        out = self.module(input_ids=ids, attention_mask=mask)
        return out.last_hidden_state if self._hidden else out.logits

    def images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixels = pixel_values.to(self.placement.dtype)
        if self._clip:
            clip: Any = self.module
            return clip.get_image_features(pixel_values=pixels).pooler_output
        return self.module(pixel_values=pixels).logits

    def footprint(self) -> Footprint:
        return module_footprint(self.module, self.device)

    def synchronize(self) -> None:
        # a CUDA forward returns before it ran
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

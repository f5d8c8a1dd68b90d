"""Networks: SAM-family backbones, LoRA experts, expert attention and its fusion (HL-Attn and
baselines), the prompt-free decoder, ``SAMoraNet`` and the stage-1 teachers."""

from . import backbones, decoders, expert_attention, fusion, kernels, lora, precision, samora_net, teachers
from .samora_net import SAMoraNet

__all__ = [
    "SAMoraNet", "backbones", "decoders", "expert_attention", "fusion", "kernels", "lora", "precision", "samora_net",
    "teachers",
]

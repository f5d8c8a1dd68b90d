"""SAMora components: SAM backbones, LoRA experts, HL-Attn fusion, data, training and evaluation
helpers used by the SAMora MONAI bundles. See docs/architecture.md for the module map."""

from . import backbones, data, decoder, fusion, handlers, io, lora, network, schedules, transforms, workflow

__version__ = "0.1.0"

__all__ = [
    "backbones", "data", "decoder", "fusion", "handlers", "io", "lora", "network", "schedules", "transforms",
    "workflow", "__version__",
]

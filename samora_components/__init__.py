"""SAMora components: SAM backbones, LoRA experts, HL-Attn fusion, data, training and evaluation
used by the SAMora MONAI bundles. See docs/architecture.md for the package map."""

from . import apps, bundle, data, engines, metrics, networks

__version__ = "0.1.0"

__all__ = ["apps", "bundle", "data", "engines", "metrics", "networks", "__version__"]

"""SAMora components: SAM backbones, LoRA experts, HL-Attn fusion, data, training and evaluation
used by the SAMora MONAI bundles. See docs/architecture.md for the package map."""

from .utils import keep_freed_memory

keep_freed_memory()  # first: large per-batch buffers are reused, not page-faulted in again (see utils)

from . import apps, bundle, data, engines, metrics, networks  # noqa: E402

__version__ = "0.1.0"

__all__ = ["apps", "bundle", "data", "engines", "metrics", "networks", "__version__"]

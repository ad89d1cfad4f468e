"""DeepSeek-V4.1 (model_type deepseek_v41): configuration and CSA2 layer schedule (config.py, read.py,
schedule.py), the reference forward (model.py: CSA2 attention, single-pass mHC, MoE, Engram, the
fake-quant points; imported on its own, `from dayzero.v41.model import V41Transformer`) and its
checkpoint layout (formats.py, checkpoint.py, `from dayzero.v41.loader import load_v41`). Not built:
the engine path (paged cache), V4.1's DSpark, vision (issue 23; docs/V41.md)."""
from dayzero.v41.config import V41Args, is_v41_config
from dayzero.v41.schedule import V41Layer, derive_layers, validate_schedule

__all__ = ["V41Args", "V41Layer", "derive_layers", "is_v41_config", "validate_schedule"]

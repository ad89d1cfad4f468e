"""DeepSeek-V4.1 (model_type deepseek_v41): configuration and CSA2 layer schedule only. The model,
CSA2 attention, Engram, loading, V4.1's DSpark and encoding are not built yet (issue 23; docs/V41.md)."""
from dayzero.v41.config import V41Args, is_v41_config
from dayzero.v41.schedule import V41Layer, derive_layers, validate_schedule

__all__ = ["V41Args", "V41Layer", "derive_layers", "is_v41_config", "validate_schedule"]

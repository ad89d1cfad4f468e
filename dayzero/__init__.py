"""dayzero: a faithful, portable DeepSeek-V4 runtime."""
from dayzero.config import ModelArgs
from dayzero.engine import LLM, GenerationOutput, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "GenerationOutput", "ModelArgs", "__version__"]

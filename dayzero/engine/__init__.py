from dayzero.engine.llm import LLM, GenerationOutput
from dayzero.engine.sampling import SamplingParams

__all__ = ["LLM", "GenerationOutput", "SamplingParams"]

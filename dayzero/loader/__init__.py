"""Official-checkpoint loading and writing: sharded safetensors, FP8/FP4 weight formats."""

from .checkpoint import (
    SAFETENSORS_DTYPES,
    CheckpointError,
    TensorInfo,
    TensorSpec,
    list_tensors,
    load_state,
    read_config,
    read_header,
)
from .formats import (
    FP4_E2M1_VALUES,
    dequant_fp4,
    dequant_fp8_block,
    e8m0_to_float,
    float_to_e8m0,
    pack_fp4_codes,
    quant_fp4,
    quant_fp8_block,
    unpack_fp4,
)
from .writer import QUANT_KINDS, quantize_state, save_state

__all__ = [
    "SAFETENSORS_DTYPES",
    "CheckpointError",
    "TensorInfo",
    "TensorSpec",
    "list_tensors",
    "load_state",
    "read_config",
    "read_header",
    "FP4_E2M1_VALUES",
    "dequant_fp4",
    "dequant_fp8_block",
    "e8m0_to_float",
    "float_to_e8m0",
    "pack_fp4_codes",
    "quant_fp4",
    "quant_fp8_block",
    "unpack_fp4",
    "QUANT_KINDS",
    "quantize_state",
    "save_state",
]

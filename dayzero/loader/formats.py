"""Weight storage formats of the official DeepSeek-V4 checkpoints.

E8M0   one byte per scale, value 2^(byte - 127); no sign, no mantissa. Byte 255 is NaN (OCP
       MX spec) and decodes to NaN. Byte 0 decodes to 2^-127 (an fp32 subnormal).
FP8    float8_e4m3fn weight [out, in] with one scale per 128x128 block, scale tensor
       [ceil(out/128), ceil(in/128)]; E8M0 in instruct checkpoints, float32 in Base
       checkpoints. W = W_fp8 * scale of its block; edge blocks may be partial.
FP4    MXFP4 routed experts stored as int8 [out, in/2]: each byte holds two e2m1 codes along
       the input (K) dimension, low nibble = even element, high nibble = odd element; one E8M0
       scale per 32 inputs, scale tensor [out, in/32]. W = value(code) * scale.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_BLOCK = 128
FP4_BLOCK = 32

# Values of the 16 e2m1 codes: bit 3 sign, bits 2-1 exponent (bias 1), bit 0 mantissa.
FP4_E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=torch.float32,
)

# Amax floors: FP8 keeps the scale >= 2^-126 (an E8M0 normal, an fp32 normal); FP4 is the
# official 6 * 2^-126.
FP8_AMAX_FLOOR = FP8_MAX * 2.0**-126
FP4_AMAX_FLOOR = FP4_MAX * 2.0**-126

_E8M0 = torch.float8_e8m0fnu
_FP8 = torch.float8_e4m3fn


def _e8m0_bytes(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype == _E8M0:
        return scale.view(torch.uint8)
    if scale.dtype == torch.uint8:
        return scale
    raise TypeError(f"expected float8_e8m0fnu or uint8 E8M0 bytes, got {scale.dtype}")


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 scales (float8_e8m0fnu, or their raw uint8 bytes) -> fp32 2^(byte - 127).

    Built from fp32 bit patterns: byte b in 1..254 is the exponent field (b << 23); byte 0 is
    the subnormal 2^-127 (bit 22); byte 255 is NaN.
    """
    b = _e8m0_bytes(scale).to(torch.int32)
    bits = torch.where(b == 0, torch.full_like(b, 1 << 22), b << 23)
    bits = torch.where(b == 255, torch.full_like(b, 0x7FC00000), bits)
    return bits.view(torch.float32)


def _pow2_exponent(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For positive finite fp32 x: (e, exact) with 2^e the smallest power of two >= x."""
    mantissa, exponent = torch.frexp(x)
    exact = mantissa == 0.5
    return torch.where(exact, exponent - 1, exponent), exact


def float_to_e8m0(x: torch.Tensor) -> torch.Tensor:
    """Positive powers of two in [2^-127, 2^127] -> float8_e8m0fnu, exactly.

    Raises ValueError for anything else (zero, negative, non-finite, not a power of two).
    """
    x = x.to(torch.float32)
    bad = ~(torch.isfinite(x) & (x > 0))
    e, exact = _pow2_exponent(torch.where(bad, torch.ones_like(x), x))
    bad |= ~exact | (e < -127) | (e > 127)
    if bool(bad.any()):
        sample = x[bad].flatten()[:4].tolist()
        raise ValueError(f"E8M0 holds only powers of two in [2^-127, 2^127]; got e.g. {sample}")
    return (e + 127).to(torch.uint8).view(_E8M0)


def _scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype in (_E8M0, torch.uint8):
        return e8m0_to_float(scale)
    if scale.is_floating_point():
        return scale.to(torch.float32)
    raise TypeError(f"scale must be float8_e8m0fnu or a float dtype, got {scale.dtype}")


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def dequant_fp8_block(w: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """FP8 block-scaled weight -> fp32.

    w: float8_e4m3fn [out, in]. scale: [ceil(out/block), ceil(in/block)], float8_e8m0fnu (or
    its uint8 bytes) or float32. Returns fp32 [out, in]; element (i, j) is
    w[i, j] * scale[i // block, j // block].
    """
    if w.dim() != 2 or w.dtype != _FP8:
        raise ValueError(f"FP8 weight must be 2-D float8_e4m3fn, got {w.dtype} {tuple(w.shape)}")
    out_dim, in_dim = w.shape
    want = (_blocks(out_dim, block), _blocks(in_dim, block))
    if tuple(scale.shape) != want:
        raise ValueError(
            f"FP8 scale for weight {tuple(w.shape)} with block {block} must be {want}, "
            f"got {tuple(scale.shape)}"
        )
    s = _scale_to_float(scale)
    s = s.repeat_interleave(block, 0)[:out_dim].repeat_interleave(block, 1)[:, :in_dim]
    return w.to(torch.float32) * s


def quant_fp8_block(
    w: torch.Tensor, block: int = FP8_BLOCK, scale_dtype: torch.dtype = _E8M0
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32/bf16 [out, in] -> (float8_e4m3fn [out, in], scale [ceil(out/block), ceil(in/block)]).

    amax per block is floored at FP8_AMAX_FLOOR. scale_dtype float8_e8m0fnu: scale = smallest
    power of two >= amax/448, so each block's largest |code| lies in [224, 448]. scale_dtype
    float32: scale = amax/448. Codes are w/scale rounded to nearest e4m3 (ties to even),
    clamped to +-448.

    With E8M0 scales dequant(quant(.)) is a fixed point in value space:
    dequant(quant(dequant(q, s))) == dequant(q, s) exactly, and (q, s) itself comes back
    unchanged when every block of q has a code with |code| > 224.
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"FP8 quant needs a 2-D float tensor, got {w.dtype} {tuple(w.shape)}")
    if scale_dtype not in (_E8M0, torch.float32):
        raise ValueError(f"scale_dtype must be float8_e8m0fnu or float32, got {scale_dtype}")
    x = w.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("FP8 quant input has non-finite values")
    out_dim, in_dim = x.shape
    ob, ib = _blocks(out_dim, block), _blocks(in_dim, block)
    padded = torch.nn.functional.pad(x, (0, ib * block - in_dim, 0, ob * block - out_dim))
    amax = padded.abs().view(ob, block, ib, block).amax(dim=(1, 3)).clamp_min(FP8_AMAX_FLOOR)
    if scale_dtype == _E8M0:
        e, _ = _pow2_exponent(amax / FP8_MAX)
        s = torch.ldexp(torch.ones_like(amax), e)
        scale = float_to_e8m0(s)
    else:
        s = amax / FP8_MAX
        scale = s
    full = s.repeat_interleave(block, 0)[:out_dim].repeat_interleave(block, 1)[:, :in_dim]
    q = (x / full).clamp(-FP8_MAX, FP8_MAX).to(_FP8)
    return q, scale


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Packed FP4 int8 (or uint8) [out, in/2] -> fp32 e2m1 values [out, in] (unscaled).

    Byte j of a row holds element 2j in its low nibble and element 2j+1 in its high nibble.
    The bytes are reinterpreted, never read as signed integers.
    """
    if packed.dtype not in (torch.int8, torch.uint8) or packed.dim() != 2:
        raise ValueError(
            f"packed FP4 must be 2-D int8/uint8, got {packed.dtype} {tuple(packed.shape)}"
        )
    b = packed.view(torch.uint8)
    codes = torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(b.shape[0], 2 * b.shape[1])
    return FP4_E2M1_VALUES.to(packed.device)[codes.long()]


def pack_fp4_codes(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes uint8 [out, in] (values 0..15, in even) -> int8 [out, in/2], low nibble first."""
    if codes.dim() != 2 or codes.shape[1] % 2:
        raise ValueError(f"FP4 codes must be 2-D with an even width, got {tuple(codes.shape)}")
    if codes.dtype != torch.uint8:
        raise ValueError(f"FP4 codes must be uint8, got {codes.dtype}")
    if bool((codes > 15).any()):
        raise ValueError("FP4 codes must be in 0..15")
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)


# |x| thresholds between consecutive e2m1 magnitudes [0, .5, 1, 1.5, 2, 3, 4, 6]; ties go to
# the even code (mantissa bit 0): > where the lower neighbour is even, >= where it is odd.
_FP4_UP_GT = (0.25, 1.25, 2.5, 5.0)
_FP4_UP_GE = (0.75, 1.75, 3.5)


def _fp4_codes(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    mag = torch.zeros_like(a, dtype=torch.uint8)
    for t in _FP4_UP_GT:
        mag += (a > t).to(torch.uint8)
    for t in _FP4_UP_GE:
        mag += (a >= t).to(torch.uint8)
    return mag | (torch.signbit(x).to(torch.uint8) << 3)


def quant_fp4(w: torch.Tensor, block: int = FP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32/bf16 [out, in] -> (int8 packed [out, in/2], float8_e8m0fnu scale [out, in/block]).

    in must be a multiple of block. amax per block is floored at 6 * 2^-126; scale = smallest
    power of two >= amax/6; code = e2m1 value nearest to w/scale, ties to even (IEEE
    round-to-nearest-even, as hardware FP4 conversion does); negative inputs that round to zero
    keep their sign (code 8, -0).
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"FP4 quant needs a 2-D float tensor, got {w.dtype} {tuple(w.shape)}")
    out_dim, in_dim = w.shape
    if in_dim % block or block % 2:
        raise ValueError(f"FP4 input width {in_dim} must be a multiple of block {block}")
    x = w.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("FP4 quant input has non-finite values")
    xb = x.view(out_dim, in_dim // block, block)
    amax = xb.abs().amax(dim=-1).clamp_min(FP4_AMAX_FLOOR)
    e, _ = _pow2_exponent(amax / FP4_MAX)
    s = torch.ldexp(torch.ones_like(amax), e)
    codes = _fp4_codes(xb / s.unsqueeze(-1)).view(out_dim, in_dim)
    return pack_fp4_codes(codes), float_to_e8m0(s)


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """Packed FP4 int8 [out, in/2] + E8M0 scale [out, in/block] -> fp32 [out, in]."""
    values = unpack_fp4(packed)
    out_dim, in_dim = values.shape
    want = (out_dim, _blocks(in_dim, block))
    if tuple(scale.shape) != want or in_dim % block:
        raise ValueError(
            f"FP4 scale for packed {tuple(packed.shape)} with block {block} must be {want}, "
            f"got {tuple(scale.shape)}"
        )
    return values * _scale_to_float(scale).repeat_interleave(block, 1)

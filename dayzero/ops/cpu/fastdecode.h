/* Integer-only weight decoding for the vdpbf16ps kernels of gemm.c (included there, AVX512-BF16
 * builds), used where a block's E8M0 scale byte keeps every scaled weight a normal bf16 number.
 * The bf16 words are bit for bit the ones gemm.c's float route forms (decode, multiply by the
 * scale in fp32, round to bf16), so results do not change; only the instructions per weight do.
 *
 * FP8 e4m3 byte s.eeee.mmm (e >= 1) times 2^(sb - 127) is exactly the bf16 number with sign s,
 * exponent field e - 7 + sb and mantissa mmm0000: its bits are (eeee.mmm << 4) + ((sb - 7) << 7)
 * with the sign at bit 15, a normal number for e in 1..15 when sb lies in [FP8_SB_LO, FP8_SB_HI]
 * (the NaN codes 0x7f / 0xff give +-480 * scale, as the float route). Codes with e = 0 (zeros and
 * subnormals) come from a 16-entry table per block built by the float route itself (vpermw on
 * their low bits, masked to those lanes). Per 32 weights: vpmovsxbw, vpsllw, vpand, vpaddw,
 * vptestnmw, vpermw, vpternlog (the float route: about twice as many micro-ops). */
#ifndef DAYZERO_CPU_FASTDECODE_H
#define DAYZERO_CPU_FASTDECODE_H

#define FP8_SB_LO 7
#define FP8_SB_HI 246

/* every scale byte of n in [FP8_SB_LO, FP8_SB_HI] */
static inline int fp8_scales_fast(const uint8_t *s, int64_t n) {
    if (!use_fast_decode) return 0;
    for (int64_t i = 0; i < n; i++)
        if (s[i] < FP8_SB_LO || s[i] > FP8_SB_HI) return 0;
    return 1;
}

/* the block constants: exponent offset (sb - 7) << 7 and the e = 0 table (codes 0..7 scaled by the
 * float route: e4m3_x2m8(code) * fl(scale * 2^8), rounded to bf16 to nearest even) */
AI __m512i fp8_fast_off(uint8_t sb) { return _mm512_set1_epi16((short)((sb - FP8_SB_LO) << 7)); }

AI __m512i fp8_fast_sub(__m512 codes_x2m8, __m512 vs) {
    return _mm512_zextsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(codes_x2m8, vs)));
}

/* 32 e4m3 bytes -> 32 bf16 words (see above) */
AI __m512i fp8_fast_decode(__m256i b, __m512i off, __m512i sub) {
    const __m512i h = _mm512_cvtepi8_epi16(b); /* sign-extended: bit 15 = sign, low 7 bits = eeee.mmm */
    const __m512i v = _mm512_add_epi16(_mm512_and_si512(_mm512_slli_epi16(h, 4), _mm512_set1_epi16(0x07f0)), off);
    const __mmask32 z = _mm512_testn_epi16_mask(h, _mm512_set1_epi16(0x78)); /* e = 0 */
    const __m512i f = _mm512_mask_permutexvar_epi16(v, z, h, sub);           /* index: low bits = mmm */
    return _mm512_ternarylogic_epi32(f, h, _mm512_set1_epi16((short)0x8000), 0xF8); /* f | (h & sign) */
}

/* fp8_step_bf with the integer decode: 32 weights of nr rows at k, whole steps only */
AI void fp8_step_fast(const uint8_t *w, int64_t ldw, __m512i off, __m512i sub, const uint16_t *const *xr, int64_t k,
                      const int nr, const int mb, const int sel, __m512 (*a0)[MB], __m512 (*a1)[MB]) {
    __m512i wv[2];
    for (int r = 0; r < nr; r++) wv[r] = fp8_fast_decode(_mm256_loadu_si256((const __m256i *)(w + r * ldw + k)), off, sub);
    for (int m = 0; m < mb; m++) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(xr[m] + k);
        for (int r = 0; r < nr; r++) {
            if (sel)
                a1[r][m] = _mm512_dpbf16_ps(a1[r][m], (__m512bh)wv[r], xv);
            else
                a0[r][m] = _mm512_dpbf16_ps(a0[r][m], (__m512bh)wv[r], xv);
        }
    }
}

#endif

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
 * vptestnmw, vpermw, vpternlog (the float route: about 10 instructions, two conversions to fp32,
 * two multiplies and a conversion to bf16 among them). With 128x128 blocks and AVX512-VBMI the
 * FP8 words come from byte tables instead (FP8_TAB below: fewer shuffles, the same words).
 *
 * FP4 (e2m1, a scale per 32): the float route builds, per pair of groups, a 32-entry bf16 table
 * (the 16 e2m1 values times each group's scale: two multiplies and a conversion per row). The
 * nonzero e2m1 values times 2^(sb - 127) are the bf16 words of the values plus (sb - 127) << 7
 * (exponent fields 126..129 + sb - 127 stay in 1..254 for sb in [FP4_SB_LO, FP4_SB_HI]), so each
 * scale byte's 16 words are a constant 32-byte table (FP4_T, built once, low bytes then high
 * bytes) and a group pair's table is two of them (a load and a merge-masked broadcast). The words
 * are looked up a byte at a time (vpermb, VBMI: one micro-op where vpermw takes two): the 32
 * weight bytes are copied to both bytes of their word (one vpermb), and per 32 weights a vpternlog
 * (after a shift for the high nibbles) keeps the nibble at index bits 0..3 and sets bit 4 (the
 * byte's half of the word) and bit 5 (the group). Per 64 weights: 7 vector micro-ops besides the
 * two vdpbf16ps (zero-extension, 3 shifts, 2 vpermw and a table add before: 9); on the 2-core Xeon
 * VM a vdpbf16ps keeps both 512-bit ports busy about 2 cycles, so every decode micro-op adds to the
 * time of a step. The x layout is the float route's (split64_row); the words are the same. */
#ifndef DAYZERO_CPU_FASTDECODE_H
#define DAYZERO_CPU_FASTDECODE_H

#define FP8_SB_LO 7
#define FP8_SB_HI 246
#define FP4_SB_LO 2
#define FP4_SB_HI 252

/* every scale byte of nr rows (lds apart) x n in [lo, hi] */
static inline int scales_in(const uint8_t *s, int64_t lds, int nr, int64_t n, int lo, int hi) {
    if (!use_fast_decode) return 0;
    const __m512i vlo = _mm512_set1_epi8((char)lo), vhi = _mm512_set1_epi8((char)hi);
    for (int r = 0; r < nr; r++)
        for (int64_t i = 0; i < n; i += 64) {
            const __mmask64 km = n - i >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (n - i)) - 1);
            const __m512i v = _mm512_maskz_loadu_epi8(km, s + r * lds + i);
            if ((_mm512_mask_cmplt_epu8_mask(km, v, vlo) | _mm512_mask_cmpgt_epu8_mask(km, v, vhi)) != 0) return 0;
        }
    return 1;
}

/* the block constants: exponent offset (sb - 7) << 7 and the e = 0 table (codes 0..7 scaled by the
 * float route: e4m3_x2m8(code) * fl(scale * 2^8), rounded to bf16 to nearest even) */
AI __m512i fp8_fast_off(uint8_t sb) { return _mm512_set1_epi16((short)((sb - FP8_SB_LO) << 7)); }

AI __m512i fp8_fast_sub(__m512 codes_x2m8, __m512 vs) {
    return _mm512_zextsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(codes_x2m8, vs)));
}

/* 32x32 blocks (V4.1; gemm.c's lg = 5: new constants every 32 weights) form both constants from the
 * scale byte by integer operations: the e = 0 codes m = 1..7 times 2^(sb - 127) are m * 2^(sb - 136),
 * normal bf16 numbers for sb >= FP8_SB_LO32, whose words are FP8_SUB_W[m] + (sb << 7) (exponent field
 * sb - 9 + floor(log2 m), mantissa the bits of m after its leading one): the words fp8_fast_sub forms */
#define FP8_SB_LO32 10
static const short FP8_SUB_W[8] = {0, -9 * 128, -8 * 128, -8 * 128 + 0x40, -7 * 128, -7 * 128 + 0x20,
                                   -7 * 128 + 0x40, -7 * 128 + 0x60};

AI void fp8_fast_consts32(uint8_t sb, __m512i *off, __m512i *sub) {
    const __m512i v = _mm512_set1_epi16((short)(sb << 7));
    *off = _mm512_sub_epi16(v, _mm512_set1_epi16(FP8_SB_LO << 7));
    const __m512i base = _mm512_zextsi128_si512(_mm_loadu_si128((const __m128i *)FP8_SUB_W));
    *sub = _mm512_maskz_add_epi16((__mmask32)0xFE, base, v); /* entries 1..7; 0 (code 0) and 8..31 zero */
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

#if defined(__AVX512VBMI__) /* vpermi2b / vpermt2b (Ice Lake, Zen 4 and later) */
#define DZ_FP8_TAB 1

/* FP8 with 128x128 blocks (gemm.c's lg = 7) by byte tables: FP8_TAB[sb] holds, for scale byte sb,
 * the float route's bf16 word of every magnitude code c = 0..127 (e4m3_x2m8(c) * fl(2^(sb-127) *
 * 2^8), rounded to nearest even) split into 128 low bytes (vectors 0, 1) and 128 high bytes (2, 3).
 * Per 64 weights of a row: vpermb puts the bytes in the order vpunpck{l,h}bw undoes, two vpermi2b
 * look each byte's low 7 bits up in both halves, vpternlog puts the byte's sign bit into the high
 * byte, and vpunpcklbw / vpunpckhbw interleave low and high bytes into the 2 x 32 words in natural
 * order (6 instructions; the integer route above: 14; measured on a Xeon with AVX512-BF16, where
 * shuffles and vdpbf16ps share one port: 12.4-13.7 cycles per 64 weights with vdpbf16ps, the integer
 * route 15.5-17.4, interleaving by two vpermt2b 13.4-14.9; docs/BENCHMARKS.md). The words are the
 * float route's wherever the word of c | 0x80 is the word of c with bit 15 set: fp8_tab_init checks
 * that for every code and every scale byte in [FP8_SB_LO, FP8_SB_HI] (the bytes scales_in lets in)
 * and leaves the tables off (fp8_tab_ok = 0: the integer route runs) if one differs. 64 KiB; a
 * matrix's few distinct scale bytes keep their tables in L1. */
static uint8_t FP8_TAB[256][4][64] __attribute__((aligned(64)));
/* vpermb: byte 16L + j (j < 8) of each 128-bit lane L <- byte 8L + j, 16L + 8 + j <- 32 + 8L + j, so that
 * vpunpcklbw gives words 0..31 and vpunpckhbw words 32..63 in order */
static uint8_t FP8_IL[64] __attribute__((aligned(64)));
static int fp8_tab_ok;

__attribute__((constructor)) static void fp8_tab_init(void) {
    uint8_t codes[256];
    for (int c = 0; c < 256; c++) codes[c] = (uint8_t)c;
    int ok = 1;
    for (int sb = 0; sb < 256; sb++) {
        const __m512 vs = _mm512_set1_ps(scale_bits(&codes[sb], 0, 1) * 256.0f); /* fp8_micro_bf's VS_AT */
        uint16_t wd[256];
        for (int c = 0; c < 256; c += 16) {
            const __m512 v = _mm512_mul_ps(e4m3_x2m8(_mm_loadu_si128((const __m128i *)(codes + c))), vs);
            _mm256_storeu_si256((__m256i *)(wd + c), (__m256i)_mm512_cvtneps_pbh(v));
        }
        for (int c = 0; c < 128; c++) {
            FP8_TAB[sb][c >> 6][c & 63] = (uint8_t)wd[c];
            FP8_TAB[sb][2 + (c >> 6)][c & 63] = (uint8_t)(wd[c] >> 8);
            if (sb >= FP8_SB_LO && sb <= FP8_SB_HI && wd[c | 0x80] != (wd[c] | 0x8000)) ok = 0;
        }
    }
    for (int p = 0; p < 64; p++) FP8_IL[p] = (uint8_t)(8 * (p >> 4) + (p & 7) + (p & 8 ? 32 : 0));
    fp8_tab_ok = ok;
}

/* 64 weights of nr rows at k by the tables t (one block's: t[0..3]), weights k..k+31 into a0 and
 * k+32..k+63 into a1: the two 32-weight steps of fp8_step_fast / fp8_step_bf, the same words */
AI void fp8_tab_step(const uint8_t *w, int64_t ldw, const __m512i *t, __m512i il, const uint16_t *const *xr,
                     int64_t k, const int nr, const int mb, __m512 (*a0)[MB], __m512 (*a1)[MB]) {
    __m512i wv[2][2];
    for (int r = 0; r < nr; r++) {
        const __m512i b = _mm512_permutexvar_epi8(il, _mm512_loadu_si512((const void *)(w + r * ldw + k)));
        const __m512i lo = _mm512_permutex2var_epi8(t[0], b, t[1]);
        const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(t[2], b, t[3]), b,
                                                     _mm512_set1_epi8((char)0x80), 0xF8); /* hi | (b & sign) */
        wv[r][0] = _mm512_unpacklo_epi8(lo, hi);
        wv[r][1] = _mm512_unpackhi_epi8(lo, hi);
    }
    for (int m = 0; m < mb; m++) {
        const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xr[m] + k), x1 = (__m512bh)_mm512_loadu_si512(xr[m] + k + 32);
        for (int r = 0; r < nr; r++) {
            a0[r][m] = _mm512_dpbf16_ps(a0[r][m], (__m512bh)wv[r][0], x0);
            a1[r][m] = _mm512_dpbf16_ps(a1[r][m], (__m512bh)wv[r][1], x1);
        }
    }
}
#endif /* __AVX512VBMI__ */

#if defined(__AVX512VBMI__) /* vpermb: FP4 on the integer route only with VBMI (Ice Lake, Zen 4 and later) */
#define DZ_FAST_FP4 1

/* FP4_T[s] (s in [FP4_SB_LO, FP4_SB_HI]; zeros elsewhere): the 16 e2m1 values times 2^(s - 127) as
 * bf16 words, split by bytes: [0, 16) their low bytes, [16, 32) their high bytes. A group pair's
 * 64-byte table is two of them, so vpermb index bits 0..3 = the nibble, 4 = the byte's half of the
 * word, 5 = the group. */
static uint8_t FP4_T[256][32] __attribute__((aligned(64)));

__attribute__((constructor)) static void fp4_fast_init(void) {
    static const uint16_t V[8] = {0, 0x3f00, 0x3f80, 0x3fc0, 0x4000, 0x4040, 0x4080, 0x40c0}; /* 0 .. 6 */
    for (int s = FP4_SB_LO; s <= FP4_SB_HI; s++)
        for (int n = 0; n < 16; n++) {
            const uint16_t w = (uint16_t)((n & 7 ? V[n & 7] + ((s - 127) << 7) : 0) | (n & 8 ? 0x8000 : 0));
            FP4_T[s][n] = (uint8_t)w;
            FP4_T[s][16 + n] = (uint8_t)(w >> 8);
        }
}

/* the FP4_T byte offsets (32 s) of n <= 16 groups' scale bytes s of nr rows (row r's at sr[r] + g0),
 * read once into a word array (byte loads inside the step would make gcc keep the accumulators in
 * memory: a char access may alias them) */
AI void fp4_toffs16(const uint8_t *const *sr, int64_t g0, int n, const int nr, uint16_t (*to)[16]) {
    for (int r = 0; r < nr; r++)
        _mm256_store_si256((__m256i *)to[r],
                           _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8((__mmask16)((1u << n) - 1), sr[r] + g0)), 5));
}

/* groups g, g + 1 of nr rows (row r's bytes at wr[r]; both groups present; FP4_T offsets to[r][j],
 * to[r][j + 1]) into the accumulators, as fp4_step_bf */
AI void fp4_step_fast(const uint8_t *const *wr, const uint16_t (*to)[16], int j, int64_t g, const uint16_t *const *xr,
                      const int nr, const int mb, const int two, __m512 (*a0)[MB], __m512 (*a1)[MB]) {
    /* byte 2i and 2i + 1 <- weight byte i */
    const __m512i dup = _mm512_set_epi8(31, 31, 30, 30, 29, 29, 28, 28, 27, 27, 26, 26, 25, 25, 24, 24, 23, 23, 22, 22,
                                        21, 21, 20, 20, 19, 19, 18, 18, 17, 17, 16, 16, 15, 15, 14, 14, 13, 13, 12, 12,
                                        11, 11, 10, 10, 9, 9, 8, 8, 7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    /* index bits 4..5: the byte's half of the word (odd bytes: 16), the group (words 16..31: 32) */
    const __m512i hg = _mm512_set_epi64(0x3020302030203020LL, 0x3020302030203020LL, 0x3020302030203020LL,
                                        0x3020302030203020LL, 0x1000100010001000LL, 0x1000100010001000LL,
                                        0x1000100010001000LL, 0x1000100010001000LL);
    const __m512i nib = _mm512_set1_epi8(0x0f);
    __m512i lo[2], hi[2];
    for (int r = 0; r < nr; r++) {
        const char *t = (const char *)FP4_T; /* [FP4_T[s_g], FP4_T[s_g+1]]: the second broadcast, merged into bytes 32..63 */
        const __m512i tbl = _mm512_mask_broadcast_i64x4(_mm512_castsi256_si512(_mm256_load_si256((const __m256i *)(t + to[r][j]))),
                                                        0xF0, _mm256_load_si256((const __m256i *)(t + to[r][j + 1])));
        const __m512i d = _mm512_permutexvar_epi8(dup, _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(wr[r] + 16 * g))));
        /* d & 15 | hg: the low nibbles; (d >> 4, as words: both bytes get the high nibble at bits 0..3) & 15 | hg */
        const __m512i ih = _mm512_ternarylogic_epi32(_mm512_srli_epi16(d, 4), nib, hg, 0xEA);
        hi[r] = _mm512_permutexvar_epi8(ih, tbl);
        lo[r] = _mm512_permutexvar_epi8(_mm512_ternarylogic_epi32(d, nib, hg, 0xEA), tbl); /* d's last use */
    }
    for (int m = 0; m < mb; m++) {
        const __m512bh xe = (__m512bh)_mm512_loadu_si512(xr[m] + 32 * g);
        const __m512bh xo = (__m512bh)_mm512_loadu_si512(xr[m] + 32 * g + 32);
        for (int r = 0; r < nr; r++) {
            a0[r][m] = _mm512_dpbf16_ps(a0[r][m], (__m512bh)lo[r], xe);
            if (two)
                a1[r][m] = _mm512_dpbf16_ps(a1[r][m], (__m512bh)hi[r], xo);
            else
                a0[r][m] = _mm512_dpbf16_ps(a0[r][m], (__m512bh)hi[r], xo);
        }
    }
}

#endif /* __AVX512VBMI__ */

#endif

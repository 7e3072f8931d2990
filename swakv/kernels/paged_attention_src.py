"""C++ source of the CPU attention kernels (built by `swakv.kernels.cpu_build`).

Registered as torch ops in namespace `swakv`:

- `paged_decode(q, k_pool, v_pool, slot_table, rows, key_lo, key_hi, page_map,
  page_size, scale, softcap) -> out`
  q [B, H, D]; k_pool / v_pool [S, KVH, D] (same dtype as q, float32 or bfloat16);
  slot_table int64 [R, C]: full slot of position j of row r; rows / key_lo / key_hi
  int64 [B]: query b sees positions [key_lo[b], key_hi[b]) of row rows[b] (non-empty).
  page_map int64 [M] (numel 0: none): a key's pool slot is
  page_map[s / P] * P + s % P for full slot s (a sliding layer's SWA slot), else s.
  Only visible slots are read. Query head h uses KV head h / (H / KVH).
  Returns out [B, H * D] in q's dtype. Scores, softmax and accumulation are fp32;
  keys are split in chunks of 256 positions whose partial softmax states are merged.
  bf16 with AVX512-BF16: q.k sums exact bf16 products in fp32 (4 keys x 4 heads per
  step when H / KVH = 4); for H / KVH <= 4 and D % 64 == 0 the unnormalised
  probabilities are rounded to bf16 for the P x V products (fp32 sums), as the torch
  path's bf16 P x V does.

- `masked_softmax_out(scores, out, group, rows_per_kv_head, q_pos0, k_pos0, window,
  scale, softcap) -> out`
  scores [R, N] contiguous, raw q.k products of a query block (float32, or bfloat16
  with a bfloat16 `out`); out [R, N] float32 or bfloat16 (may be `scores` itself):
  row r is query i = (r % rows_per_kv_head) / group at position q_pos0 + i, column c
  is key position k_pos0 + c. Row r keeps columns [lo, hi) with hi = pos + 1 - k_pos0
  and lo = max(0, pos - window + 1 - k_pos0) (window > 0) or 0, and gets
  softmax(softcap(scale * s)) there (fp32 inside) and 0 elsewhere.

- `pack_keys_bf16(k [N, D] bf16, rows may be strided) -> packed [ceil(N / 16), D / 2, 16, 2]`
  with packed[t, p, j, e] = k[16 t + j, 2 p + e] (0 past N): the layout of the AVX512
  bf16 dot-product instruction.
- `qk_scores_bf16(q [M, D] bf16, packed, key_lo, key_hi) -> fp32 [M, key_hi - key_lo]`:
  q . k for keys [key_lo, key_hi); products of bf16 are exact in fp32 and summed in
  fp32 (a register-blocked 8 rows x 32 keys micro-kernel). Needs AVX512-BF16
  (`bf16_dot_supported()`).
- `pack_values_bf16(v [N, D] bf16, rows may be strided) -> packed [ceil(N / 2), D, 2]` with
  packed[p, d, e] = v[2 p + e, d] (0 past N): key pairs per column for P x V.
- `flash_extend_bf16(q [n, G, D] bf16, packed_k, packed_v, out [n, G, D] bf16 (unit last
  strides), q_pos0, key_pos, window, scale, softcap) -> out`: fused prefill attention of
  one KV head: query i (position q_pos0 + i) of each of the G heads sees key columns
  [lo, hi) with hi = q_pos0 + i + 1 - key_pos and lo = max(0, hi - window) (window > 0)
  or 0; column c is key position key_pos + c. Tiles of 64 stacked query rows walk
  their keys 128 at a time (8-row register blocks): q.k exact bf16 products in fp32, an
  online softmax in fp32, the unnormalised probabilities rounded to bf16 for P x V
  (fp32 sums), one division by the row sum at the end. No score matrix is stored and
  no key tile past a row block's last visible key is read. D % 32 == 0; needs
  AVX512-BF16.
- `write_rows(dst [S, ...] contiguous, slots int64 [n], src [n, ...]) -> ()`: dst[slots[i]]
  = src[i], one row copy each (src rows contiguous, any row stride; same dtype and row
  shape); every slot is checked to lie in [0, S) before anything is written (the KV
  pool writer: `index_copy_` of a few rows costs tens of microseconds per call).
- `int8_group_mm(x [M, K] float32|bfloat16, qweight int8 [N, K], scales float32
  [N, K / group], group) -> [M, N] in x's dtype`: weight-only int8 with one scale per
  `group` input columns (group a multiple of 16 dividing K), fp32 sums (see
  `swakv.kernels.quant_src`).
- `rms_norm_bf16(x bf16 [T, D] or [T, H, D] (unit last stride), weight float32 [D],
  [1, D] or [H, D], eps) -> bf16, same shape, contiguous`: Gemma's RMSNorm in fp32
  (x * rsqrt(mean(x^2) + eps) * weight[h]), rounded once to bf16.
- `add_rms_norm_bf16(h bf16 [T, D] contiguous, y bf16 [T, D] (unit column stride), wy, wx
  float32 [D], eps) -> (h_out, x_out) bf16 [T, D]`: h_out = bf16(h + rms_norm_bf16(y, wy)),
  x_out = rms_norm_bf16(h_out, wx), bit-identical (the residual add and the next norm).
- `argmax_update_bf16(x bf16 [M, N] (unit column stride), best_value float32 [M],
  best_index int64 [M], offset) -> ()`: per row, when x's first maximum (NaN largest,
  first NaN wins) beats best_value (strictly, or NaN over a number), stores it and
  offset + its column: fed tiles in column order, the first maximum of the whole row.
- `rms_norm_rope_bf16(x bf16 [T, H, D] (unit last stride), weight as above, eps,
  cos, sin bf16 [T, D / 2]) -> bf16 [T, H, D]`: `rms_norm_bf16`, then rotary embedding
  with half-width cos / sin, rounding to bf16 after each product and the sum as the
  same ops on bf16 tensors do (`swakv.model.rope.apply_rope`).
- `gelu_tanh_mul_bf16(gate_up bf16 [T, 2 I], unit column stride) -> bf16 [T, I]`:
  GELU(tanh)(gate) * up for gate = columns [0, I), up = [I, 2 I), with the roundings of
  the same ops on bf16 tensors (GELU rounded to bf16, then the product).
- `quantize_rows_int8(x [M, K] float32|bfloat16, unit column stride) -> (int8 [M, K],
  float32 [M, 1])`: per-row int8 with scale max|x_row| / 127 (1 for a zero row) and
  round-half-even of x / scale: bit-identical to `swakv.model.quant.quantize_per_token`.
- `rescale_int32(acc int32 [M, N], sx float32 [M] or [M, 1], sw float32 [N], dtype) ->
  [M, N] dtype`: (float(acc) * sx[m]) * sw[n] rounded once to dtype (float32|bfloat16).
- `rescale_gelu_mul_bf16(acc int32 [M, 2 I], sx float32 [M] or [M, 1], sw float32 [2 I]) ->
  bf16 [M, I]`: `gelu_tanh_mul_bf16(rescale_int32(acc, sx, sw, bfloat16))` in one pass,
  bit-identical (the w8a8 gate/up epilogue).
"""

from swakv.kernels.argmax_src import ARGMAX_SOURCE
from swakv.kernels.decode_src import DECODE_SOURCE
from swakv.kernels.extend_src import EXTEND_SOURCE
from swakv.kernels.flash_src import FLASH_SOURCE
from swakv.kernels.quant_src import NORM_SOURCE, QUANT_SOURCE, W8A8_SOURCE
from swakv.kernels.rows_src import ROWS_SOURCE

# includes and helpers shared by both kernel families; opens the anonymous namespace
COMMON_SOURCE = r"""
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {



// bf16 bits of f rounded to nearest, ties to even (f finite)
static inline uint32_t bf16_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
}

// f rounded to the nearest bf16 value, ties to even (f finite)
static inline float round_bf16(float f) {
  const uint32_t bits = bf16_bits(f) << 16;
  float r;
  std::memcpy(&r, &bits, sizeof(r));
  return r;
}

// exp(x) for x <= 0 (softmax arguments), about 1 ulp; vectorisable (no libm call).
static inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  // round to nearest by the 1.5 * 2^23 trick (no libm call, vectorises)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693145751953125f;  // ln2 split into hi + lo
  r = r - n * 1.428606765330187e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

static inline void load_row(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}

static inline void load_row(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits = static_cast<uint32_t>(s[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    dst[i] = f;
  }
}

static inline void store_row(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}

static inline void store_row(const float* src, c10::BFloat16* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &src[i], sizeof(bits));
    bits += 0x7FFFu + ((bits >> 16) & 1u);  // round to nearest even (inputs finite)
    d[i] = static_cast<uint16_t>(bits >> 16);
  }
}

static inline void store_row_scaled(const float* src, float mul, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * mul;
}

static inline void store_row_scaled(const float* src, float mul, c10::BFloat16* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float f = src[i] * mul;
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    bits += 0x7FFFu + ((bits >> 16) & 1u);  // round to nearest even (inputs finite)
    d[i] = static_cast<uint16_t>(bits >> 16);
  }
}

static inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

static inline float softcap_of(float s, float softcap) {
  return softcap > 0.0f ? std::tanh(s / softcap) * softcap : s;
}

// x[j] <- exp(x[j] - m) for j < n, m = max_j x[j] (n >= 1); returns {m, sum of the new x}:
// the unnormalised softmax of one row, as the scalar kernels compute it.
static inline std::pair<float, float> exp_minus_max(float* x, int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  float l = 0.0f;
#pragma omp simd reduction(+ : l)
  for (int64_t j = 0; j < n; ++j) {
    x[j] = exp_nonpos(x[j] - m);
    l += x[j];
  }
  return {m, l};
}

#if defined(__AVX512F__)
// Lanes j < n of 16-lane step j0: the mask of a (possibly partial) last step.
static inline __mmask16 tail_mask(int64_t j0, int64_t n) {
  return n - j0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j0)) - 1u);
}

// round_bf16 on 16 lanes (round to nearest even, finite inputs), still as fp32 values
static inline __m512 round_bf16_512(__m512 f) {
  const __m512i b = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// exp(x) for x <= 0 lane-wise: exp_nonpos's polynomial on 16 lanes.
static inline __m512 exp512_nonpos(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}
#endif
"""

REGISTRATION_SOURCE = r"""
}  // namespace

TORCH_LIBRARY(swakv, m) {
  m.def("paged_decode(Tensor q, Tensor k_pool, Tensor v_pool, Tensor slot_table, Tensor rows, "
        "Tensor key_lo, Tensor key_hi, Tensor page_map, int page_size, float scale, "
        "float softcap) -> Tensor");
  m.def("masked_softmax_out(Tensor scores, Tensor(a!) out, int group, int rows_per_kv_head, "
        "int q_pos0, int k_pos0, int window, float scale, float softcap) -> Tensor(a!)");
  m.def("pack_keys_bf16(Tensor k) -> Tensor");
  m.def("qk_scores_bf16(Tensor q, Tensor packed, int key_lo, int key_hi) -> Tensor");
  m.def("bf16_dot_supported() -> bool");
  m.def("pack_values_bf16(Tensor v) -> Tensor");
  m.def("flash_extend_bf16(Tensor q, Tensor packed_k, Tensor packed_v, Tensor(a!) out, int q_pos0, "
        "int key_pos, int window, float scale, float softcap) -> Tensor(a!)");
  m.def("int8_group_mm(Tensor x, Tensor qweight, Tensor scales, int group) -> Tensor");
  m.def("rms_norm_bf16(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("gelu_tanh_mul_bf16(Tensor gate_up) -> Tensor");
  m.def("rms_norm_rope_bf16(Tensor x, Tensor weight, float eps, Tensor cos, Tensor sin) -> Tensor");
  m.def("quantize_rows_int8(Tensor x) -> (Tensor, Tensor)");
  m.def("rescale_int32(Tensor acc, Tensor sx, Tensor sw, ScalarType dtype) -> Tensor");
  m.def("rescale_gelu_mul_bf16(Tensor acc, Tensor sx, Tensor sw) -> Tensor");
  m.def("argmax_update_bf16(Tensor x, Tensor(a!) best_value, Tensor(b!) best_index, int offset) -> ()");
  m.def("add_rms_norm_bf16(Tensor h, Tensor y, Tensor wy, Tensor wx, float eps) -> (Tensor, Tensor)");
  m.def("write_rows(Tensor(a!) dst, Tensor slots, Tensor src) -> ()");
}

TORCH_LIBRARY_IMPL(swakv, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("masked_softmax_out", &masked_softmax_out);
  m.impl("pack_keys_bf16", &pack_keys_bf16);
  m.impl("qk_scores_bf16", &qk_scores_bf16);
  m.impl("pack_values_bf16", &pack_values_bf16);
  m.impl("flash_extend_bf16", &flash_extend_bf16);
  m.impl("int8_group_mm", &int8_group_mm);
  m.impl("rms_norm_bf16", &rms_norm_bf16);
  m.impl("gelu_tanh_mul_bf16", &gelu_tanh_mul_bf16);
  m.impl("rms_norm_rope_bf16", &rms_norm_rope_bf16);
  m.impl("quantize_rows_int8", &quantize_rows_int8);
  m.impl("rescale_int32", &rescale_int32);
  m.impl("rescale_gelu_mul_bf16", &rescale_gelu_mul_bf16);
  m.impl("write_rows", &write_rows);
  m.impl("argmax_update_bf16", &argmax_update_bf16);
  m.impl("add_rms_norm_bf16", &add_rms_norm_bf16);
}

TORCH_LIBRARY_IMPL(swakv, CompositeExplicitAutograd, m) {
  m.impl("bf16_dot_supported", &bf16_dot_supported);
}
"""

SOURCE = "\n".join((COMMON_SOURCE, DECODE_SOURCE, EXTEND_SOURCE, FLASH_SOURCE, QUANT_SOURCE,
                    W8A8_SOURCE, NORM_SOURCE, ARGMAX_SOURCE, ROWS_SOURCE,
                    REGISTRATION_SOURCE))

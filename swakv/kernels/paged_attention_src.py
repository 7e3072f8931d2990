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
"""

SOURCE = r"""
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kChunk = 256;  // keys per decode work unit

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

constexpr int64_t kPrefetch = 4;  // keys ahead whose rows are prefetched

template <typename T>
static inline void prefetch_row(const T* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64)
    __builtin_prefetch(p + off, 0, 1);
}

// q.k over D for one head: qraw is q in its own dtype, qf the same values in fp32.
static inline float row_dot(const float* qraw, const float* qf, const float* k, float* kf,
                            int64_t D) {
  (void)qraw;
  (void)kf;
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) {
      acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(qf + d), _mm512_loadu_ps(k + d), acc0);
      acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(qf + d + 16), _mm512_loadu_ps(k + d + 16), acc1);
    }
    for (; d < D; d += 16)
      acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(qf + d), _mm512_loadu_ps(k + d), acc0);
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  }
#endif
  return dot(qf, k, D);
}

static inline float row_dot(const c10::BFloat16* qraw, const float* qf, const c10::BFloat16* k,
                            float* kf, int64_t D) {
#if defined(__AVX512BF16__)
  if (D % 32 == 0) {
    (void)qf;
    (void)kf;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 64 <= D; d += 64) {
      acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(qraw + d),
                              (__m512bh)_mm512_loadu_si512(k + d));
      acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(qraw + d + 32),
                              (__m512bh)_mm512_loadu_si512(k + d + 32));
    }
    for (; d < D; d += 32)
      acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(qraw + d),
                              (__m512bh)_mm512_loadu_si512(k + d));
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  }
#endif
  (void)qraw;
  load_row(k, kf, D);
  return dot(qf, kf, D);
}

#if defined(__AVX512F__)
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

// acc[g][0:D] = sum_j p[g * p_stride + j] * V[slots[j], h, :] for j < n, g < G.
template <typename T>
static inline void accumulate_pv(const float* p, int64_t p_stride, int64_t G,
                                 const int64_t* slots, int64_t n, const T* vd, int64_t KVH,
                                 int64_t h, int64_t D, float* acc) {
#if defined(__AVX512F__)
  if (D % 64 == 0 && G <= 4) {
    // d-tiles of 64 columns: G x 4 accumulators stay in registers across all keys
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      __m512 a[4][4];
      for (int g = 0; g < 4; ++g)
        for (int t = 0; t < 4; ++t) a[g][t] = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; ++j) {
        if (d0 == 0 && j + kPrefetch < n) prefetch_row(vd + (slots[j + kPrefetch] * KVH + h) * D, D);
        const T* v = vd + (slots[j] * KVH + h) * D + d0;
        const __m512 v0 = load16(v), v1 = load16(v + 16), v2 = load16(v + 32), v3 = load16(v + 48);
        for (int g = 0; g < G; ++g) {
          const __m512 pg = _mm512_set1_ps(p[g * p_stride + j]);
          a[g][0] = _mm512_fmadd_ps(pg, v0, a[g][0]);
          a[g][1] = _mm512_fmadd_ps(pg, v1, a[g][1]);
          a[g][2] = _mm512_fmadd_ps(pg, v2, a[g][2]);
          a[g][3] = _mm512_fmadd_ps(pg, v3, a[g][3]);
        }
      }
      for (int g = 0; g < G; ++g)
        for (int t = 0; t < 4; ++t) _mm512_storeu_ps(acc + g * D + d0 + 16 * t, a[g][t]);
    }
    return;
  }
#endif
  std::vector<float> vf(D);
  std::fill(acc, acc + G * D, 0.0f);
  for (int64_t j = 0; j < n; ++j) {
    load_row(vd + (slots[j] * KVH + h) * D, vf.data(), D);
    for (int64_t g = 0; g < G; ++g) {
      const float pj = p[g * p_stride + j];
      float* a = acc + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += pj * vf[d];
    }
  }
}

template <typename T>
void decode_impl(const at::Tensor& q, const at::Tensor& kp, const at::Tensor& vp,
                 const at::Tensor& table, const at::Tensor& rows, const at::Tensor& key_lo,
                 const at::Tensor& key_hi, const at::Tensor& page_map, int64_t page_size,
                 double scale_d, double softcap_d, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = kp.size(1);
  const int64_t G = H / KVH, C = table.size(1);
  const float scale = static_cast<float>(scale_d), softcap = static_cast<float>(softcap_d);
  const T* qd = q.data_ptr<T>();
  const T* kd = kp.data_ptr<T>();
  const T* vd = vp.data_ptr<T>();
  const int64_t* tab = table.data_ptr<int64_t>();
  const int64_t* rw = rows.data_ptr<int64_t>();
  const int64_t* lo_p = key_lo.data_ptr<int64_t>();
  const int64_t* hi_p = key_hi.data_ptr<int64_t>();
  const int64_t* map = page_map.numel() ? page_map.data_ptr<int64_t>() : nullptr;
  T* od = out.data_ptr<T>();

  // unit u = (b, kv head, chunk): chunk_start[b] + c for c < num_chunks(b)
  std::vector<int64_t> chunk_start(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = hi_p[b] - lo_p[b];
    chunk_start[b + 1] = chunk_start[b] + (n + kChunk - 1) / kChunk;
  }
  const int64_t num_chunks = chunk_start[B];
  std::vector<int64_t> chunk_query(num_chunks);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = chunk_start[b]; c < chunk_start[b + 1]; ++c) chunk_query[c] = b;
  // partial state per (chunk, kv head, g): [max, sum, acc[D]]
  const int64_t stride = D + 2;
  std::vector<float> partial(num_chunks * KVH * G * stride);

  at::parallel_for(0, num_chunks * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), kf(D), s(G * kChunk), acc(G * D);
    std::vector<int64_t> slots(kChunk);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t c = unit / KVH, h = unit % KVH, b = chunk_query[c];
      const int64_t j0 = lo_p[b] + (c - chunk_start[b]) * kChunk;
      const int64_t n = std::min(kChunk, hi_p[b] - j0);
      const int64_t* row = tab + rw[b] * C;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t full = row[j0 + j];
        slots[j] = map ? map[full / page_size] * page_size + full % page_size : full;
      }
      const T* qrows = qd + (b * H + h * G) * D;  // G consecutive heads share KV head h
      for (int64_t g = 0; g < G; ++g) load_row(qrows + g * D, &qf[g * D], D);
      for (int64_t j = 0; j < n; ++j) {
        if (j + kPrefetch < n) prefetch_row(kd + (slots[j + kPrefetch] * KVH + h) * D, D);
        const T* krow = kd + (slots[j] * KVH + h) * D;
        for (int64_t g = 0; g < G; ++g)
          s[g * kChunk + j] = softcap_of(row_dot(qrows + g * D, &qf[g * D], krow, kf.data(), D) * scale, softcap);
      }
      float* part = &partial[(c * KVH + h) * G * stride];
      for (int64_t g = 0; g < G; ++g) {
        float* sg = &s[g * kChunk];
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < n; ++j) m = sg[j] > m ? sg[j] : m;
        float l = 0.0f;
#pragma omp simd reduction(+ : l)
        for (int64_t j = 0; j < n; ++j) {
          sg[j] = exp_nonpos(sg[j] - m);
          l += sg[j];
        }
        part[g * stride] = m;
        part[g * stride + 1] = l;
      }
      for (int64_t j = 0; j < kPrefetch && j < n; ++j) prefetch_row(vd + (slots[j] * KVH + h) * D, D);
      accumulate_pv(s.data(), kChunk, G, slots.data(), n, vd, KVH, h, D, acc.data());
      for (int64_t g = 0; g < G; ++g)
        std::memcpy(part + g * stride + 2, &acc[g * D], D * sizeof(float));
    }
  });

  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> o(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / KVH, h = bh % KVH;
      for (int64_t g = 0; g < G; ++g) {
        float m = -INFINITY;
        for (int64_t c = chunk_start[b]; c < chunk_start[b + 1]; ++c)
          m = std::max(m, partial[((c * KVH + h) * G + g) * stride]);
        float l = 0.0f;
        std::fill(o.begin(), o.end(), 0.0f);
        for (int64_t c = chunk_start[b]; c < chunk_start[b + 1]; ++c) {
          const float* part = &partial[((c * KVH + h) * G + g) * stride];
          const float w = exp_nonpos(part[0] - m);
          l += w * part[1];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) o[d] += w * part[2 + d];
        }
        const float inv = 1.0f / l;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] *= inv;
        store_row(o.data(), od + (b * H + h * G + g) * D, D);
      }
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                        const at::Tensor& slot_table, const at::Tensor& rows,
                        const at::Tensor& key_lo, const at::Tensor& key_hi,
                        const at::Tensor& page_map, int64_t page_size, double scale,
                        double softcap) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 3 && v_pool.sizes() == k_pool.sizes(), "shapes");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && q.scalar_type() == v_pool.scalar_type(),
              "q and the pools need one dtype");
  TORCH_CHECK(q.is_contiguous() && k_pool.is_contiguous() && v_pool.is_contiguous() &&
                  slot_table.is_contiguous() && rows.is_contiguous() && key_lo.is_contiguous() &&
                  key_hi.is_contiguous() && page_map.is_contiguous(),
              "contiguous inputs");
  TORCH_CHECK(q.size(2) == k_pool.size(2) && q.size(1) % k_pool.size(1) == 0, "head shapes");
  TORCH_CHECK(slot_table.scalar_type() == at::kLong && rows.scalar_type() == at::kLong &&
                  key_lo.scalar_type() == at::kLong && key_hi.scalar_type() == at::kLong &&
                  page_map.scalar_type() == at::kLong,
              "int64 index tensors");
  TORCH_CHECK(page_size >= 1, "page_size >= 1");
  at::Tensor out = at::empty({q.size(0), q.size(1) * q.size(2)}, q.options());
  if (q.size(0) == 0) return out;
  if (q.scalar_type() == at::kFloat) {
    decode_impl<float>(q, k_pool, v_pool, slot_table, rows, key_lo, key_hi, page_map, page_size,
                       scale, softcap, out);
  } else if (q.scalar_type() == at::kBFloat16) {
    decode_impl<c10::BFloat16>(q, k_pool, v_pool, slot_table, rows, key_lo, key_hi, page_map,
                               page_size, scale, softcap, out);
  } else {
    TORCH_CHECK(false, "paged_decode: float32 or bfloat16 only");
  }
  return out;
}

template <typename TI, typename TO>
void softmax_impl(const at::Tensor& scores, at::Tensor& out, int64_t group,
                  int64_t rows_per_kv_head, int64_t q_pos0, int64_t k_pos0, int64_t window,
                  float scale, float softcap) {
  const int64_t R = scores.size(0), N = scores.size(1);
  const TI* sd = scores.data_ptr<TI>();
  TO* od = out.data_ptr<TO>();
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> x(N);
    const TO zero = static_cast<TO>(0.0f);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t pos = q_pos0 + (r % rows_per_kv_head) / group;
      const int64_t hi = std::min(N, pos + 1 - k_pos0);
      const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1 - k_pos0) : 0;
      TO* row = od + r * N;
      if (hi <= lo) {  // sees nothing in this block (cannot happen for a planned block)
        std::fill(row, row + N, zero);
        continue;
      }
      const int64_t n = hi - lo;
      load_row(sd + r * N + lo, x.data(), n);
      if (softcap > 0.0f) {
        for (int64_t j = 0; j < n; ++j) x[j] = std::tanh(x[j] * scale / softcap) * softcap;
      } else {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) x[j] *= scale;
      }
      float m = -INFINITY;
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
      float l = 0.0f;
#pragma omp simd reduction(+ : l)
      for (int64_t j = 0; j < n; ++j) {
        x[j] = exp_nonpos(x[j] - m);
        l += x[j];
      }
      std::fill(row, row + lo, zero);
      store_row_scaled(x.data(), 1.0f / l, row + lo, n);
      std::fill(row + hi, row + N, zero);
    }
  });
}

at::Tensor masked_softmax_out(const at::Tensor& scores, at::Tensor out, int64_t group,
                              int64_t rows_per_kv_head, int64_t q_pos0, int64_t k_pos0,
                              int64_t window, double scale_d, double softcap_d) {
  TORCH_CHECK(scores.dim() == 2 && scores.is_contiguous(), "scores [R, N] contiguous");
  TORCH_CHECK(out.sizes() == scores.sizes() && out.is_contiguous(), "out like scores");
  TORCH_CHECK(group >= 1 && rows_per_kv_head >= group, "group sizes");
  const float scale = static_cast<float>(scale_d), softcap = static_cast<float>(softcap_d);
  const auto ti = scores.scalar_type(), to = out.scalar_type();
  if (ti == at::kFloat && to == at::kFloat) {
    softmax_impl<float, float>(scores, out, group, rows_per_kv_head, q_pos0, k_pos0, window, scale, softcap);
  } else if (ti == at::kFloat && to == at::kBFloat16) {
    softmax_impl<float, c10::BFloat16>(scores, out, group, rows_per_kv_head, q_pos0, k_pos0, window, scale, softcap);
  } else if (ti == at::kBFloat16 && to == at::kBFloat16) {
    softmax_impl<c10::BFloat16, c10::BFloat16>(scores, out, group, rows_per_kv_head, q_pos0, k_pos0, window, scale, softcap);
  } else {
    TORCH_CHECK(false, "masked_softmax_out: float32 -> float32/bfloat16 or bfloat16 -> bfloat16");
  }
  return out;
}

// packed[t][p][j][e] = k[16 t + j][2 p + e] (0 past the last key): 16-key tiles of
// d-pairs, the layout the bf16 dot-product instruction reads.
at::Tensor pack_keys_bf16(const at::Tensor& k) {
  TORCH_CHECK(k.dim() == 2 && k.scalar_type() == at::kBFloat16 && k.stride(1) == 1, "k [N, D] bf16");
  const int64_t N = k.size(0), D = k.size(1), ld = k.stride(0);
  TORCH_CHECK(D % 2 == 0, "even head_dim");
  const int64_t tiles = (N + 15) / 16, P = D / 2;
  at::Tensor packed = at::empty({tiles, P, 16, 2}, k.options());
  const uint32_t* src = reinterpret_cast<const uint32_t*>(k.data_ptr<c10::BFloat16>());
  uint32_t* dst = reinterpret_cast<uint32_t*>(packed.data_ptr<c10::BFloat16>());
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t key = 16 * t + j;
        for (int64_t p = 0; p < P; ++p)
          dst[(t * P + p) * 16 + j] = key < N ? src[key * (ld / 2) + p] : 0u;
      }
  });
  return packed;
}

#if defined(__AVX512BF16__)
// out[r][c] for rows r < RM, columns of key tiles t0, t0 + 1 (ntiles of them):
// column of tile lane j is 16 t + j - key_lo, stored when in [0, num_cols).
template <int RM>
static inline void qk_micro(const c10::BFloat16* q, int64_t ldq, const uint32_t* pk, int64_t P,
                            int64_t t0, int ntiles, int64_t key_lo, int64_t num_cols,
                            float* out, int64_t ldo) {
  __m512 acc[RM][2];
  for (int r = 0; r < RM; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const uint32_t* b0p = pk + t0 * P * 16;
  const uint32_t* b1p = b0p + P * 16;
  for (int64_t p = 0; p < P; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b0p + p * 16);
    const __m512bh b1 = ntiles > 1 ? (__m512bh)_mm512_loadu_si512(b1p + p * 16) : (__m512bh)_mm512_setzero_si512();
    for (int r = 0; r < RM; ++r) {
      int32_t pair;
      std::memcpy(&pair, q + r * ldq + 2 * p, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  }
  for (int tile = 0; tile < ntiles; ++tile) {
    const int64_t col0 = 16 * (t0 + tile) - key_lo;
    uint32_t mask = 0xFFFFu;
    if (col0 < 0) mask &= 0xFFFFu << (-col0);
    if (col0 + 16 > num_cols) mask &= 0xFFFFu >> (col0 + 16 - num_cols);
    for (int r = 0; r < RM; ++r)
      _mm512_mask_storeu_ps(out + r * ldo + col0, static_cast<__mmask16>(mask), acc[r][tile]);
  }
}
#endif

// out [M, key_hi - key_lo] fp32: q [M, D] bf16 times keys [key_lo, key_hi) of `packed`.
at::Tensor qk_scores_bf16(const at::Tensor& q, const at::Tensor& packed, int64_t key_lo,
                          int64_t key_hi) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kBFloat16 && q.stride(1) == 1, "q [M, D] bf16");
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) * 2 == q.size(1), "packed keys match q");
  TORCH_CHECK(0 <= key_lo && key_lo < key_hi && key_hi <= packed.size(0) * 16, "key range");
  const int64_t M = q.size(0), P = packed.size(1), num_cols = key_hi - key_lo, ldq = q.stride(0);
  at::Tensor out = at::empty({M, num_cols}, q.options().dtype(at::kFloat));
#if defined(__AVX512BF16__)
  const c10::BFloat16* qd = q.data_ptr<c10::BFloat16>();
  const uint32_t* pk = reinterpret_cast<const uint32_t*>(packed.data_ptr<c10::BFloat16>());
  float* od = out.data_ptr<float>();
  const int64_t t_first = key_lo / 16, t_end = (key_hi + 15) / 16;
  const int64_t num_pairs = (t_end - t_first + 1) / 2;
  at::parallel_for(0, num_pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t t0 = t_first + 2 * pair;
      const int ntiles = t0 + 1 < t_end ? 2 : 1;
      int64_t r = 0;
      for (; r + 8 <= M; r += 8)
        qk_micro<8>(qd + r * ldq, ldq, pk, P, t0, ntiles, key_lo, num_cols, od + r * num_cols, num_cols);
      for (; r < M; ++r)
        qk_micro<1>(qd + r * ldq, ldq, pk, P, t0, ntiles, key_lo, num_cols, od + r * num_cols, num_cols);
    }
  });
#else
  TORCH_CHECK(false, "qk_scores_bf16 needs AVX512-BF16");
#endif
  return out;
}

bool bf16_dot_supported() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

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
}

TORCH_LIBRARY_IMPL(swakv, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("masked_softmax_out", &masked_softmax_out);
  m.impl("pack_keys_bf16", &pack_keys_bf16);
  m.impl("qk_scores_bf16", &qk_scores_bf16);
}

TORCH_LIBRARY_IMPL(swakv, CompositeExplicitAutograd, m) {
  m.impl("bf16_dot_supported", &bf16_dot_supported);
}
"""

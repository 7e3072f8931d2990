"""C++ source of `swakv.paged_decode` (contract in `swakv.kernels.paged_attention_src`)."""

DECODE_SOURCE = r"""
constexpr int64_t kChunk = 256;  // keys per decode work unit
// keys ahead whose rows are prefetched: B = 64 requests x 512 (1,536) keys of 16-slot
// pages scattered over pools of 18 (50) MB per tensor, partly L3-resident (the op alone,
// one process alternating the distances, best of 4 medians), ms per call for 4 / 8 /
// 16 / 32 / 64 keys ahead:
// 1.48 / 1.23 / 1.10 / 1.09 / 1.28 (5.49 / 4.74 / 4.58 / 4.64 / 5.38)
constexpr int64_t kPrefetch = 16;

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

#if defined(__AVX512BF16__)
// bf16 V, G <= 4, D % 64 == 0: acc[g][0:D] = sum_j bf16(p[g * p_stride + j]) * V[slots[j], h, :]
// in fp32, two keys per bf16 dot-product instruction: the rows of keys 2i and 2i + 1
// are interleaved (unpack lo / hi within 128-bit lanes), so accumulator lane 4 l + t of
// a 32-column block holds column 8 l + t (lo) or 8 l + 4 + t (hi), un-permuted at the
// end. A missing partner key (odd n) gets probability 0 and repeats the last row.
static void accumulate_pv_bf16(const float* p, int64_t p_stride, int64_t G, const int64_t* slots,
                               int64_t n, const c10::BFloat16* vd, int64_t KVH, int64_t h,
                               int64_t D, float* acc) {
  const int64_t num_pairs = (n + 1) / 2;
  // (bf16(p_2i), bf16(p_2i+1)) per head: the bf16 row of p read as 32-bit pairs, 0 past n
  alignas(64) uint32_t pp[4][kChunk / 2];
  for (int64_t g = 0; g < G; ++g) {
    uint16_t* row = reinterpret_cast<uint16_t*>(pp[g]);
    for (int64_t j = 0; j < 2 * num_pairs; j += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(tail_mask(j, n), p + g * p_stride + j);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + j), (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
  const uint16_t* vbase = reinterpret_cast<const uint16_t*>(vd);
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    __m512 a[4][4];
    for (int g = 0; g < 4; ++g)
      for (int t = 0; t < 4; ++t) a[g][t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < num_pairs; ++i) {
      const int64_t j = 2 * i;
      if (d0 == 0 && j + kPrefetch + 1 < n) {
        prefetch_row(vd + (slots[j + kPrefetch] * KVH + h) * D, D);
        prefetch_row(vd + (slots[j + kPrefetch + 1] * KVH + h) * D, D);
      }
      const uint16_t* x = vbase + (slots[j] * KVH + h) * D + d0;
      const uint16_t* y = j + 1 < n ? vbase + (slots[j + 1] * KVH + h) * D + d0 : x;
      const __m512i x0 = _mm512_loadu_si512(x), x1 = _mm512_loadu_si512(x + 32);
      const __m512i y0 = _mm512_loadu_si512(y), y1 = _mm512_loadu_si512(y + 32);
      const __m512bh b0 = (__m512bh)_mm512_unpacklo_epi16(x0, y0);
      const __m512bh b1 = (__m512bh)_mm512_unpackhi_epi16(x0, y0);
      const __m512bh b2 = (__m512bh)_mm512_unpacklo_epi16(x1, y1);
      const __m512bh b3 = (__m512bh)_mm512_unpackhi_epi16(x1, y1);
      for (int g = 0; g < G; ++g) {
        const __m512bh pg = (__m512bh)_mm512_set1_epi32(static_cast<int>(pp[g][i]));
        a[g][0] = _mm512_dpbf16_ps(a[g][0], pg, b0);
        a[g][1] = _mm512_dpbf16_ps(a[g][1], pg, b1);
        a[g][2] = _mm512_dpbf16_ps(a[g][2], pg, b2);
        a[g][3] = _mm512_dpbf16_ps(a[g][3], pg, b3);
      }
    }
    alignas(64) float lo[16], hi[16];
    for (int g = 0; g < G; ++g)
      for (int half = 0; half < 2; ++half) {
        _mm512_store_ps(lo, a[g][2 * half]);
        _mm512_store_ps(hi, a[g][2 * half + 1]);
        float* dst = acc + g * D + d0 + 32 * half;
        for (int l = 0; l < 4; ++l)
          for (int t = 0; t < 4; ++t) {
            dst[8 * l + t] = lo[4 * l + t];
            dst[8 * l + 4 + t] = hi[4 * l + t];
          }
      }
  }
}
#endif

#if defined(__AVX512BF16__)
// Lane-wise sums of 16 vectors: lane L of the result is the sum of v[4 (L % 4) + L / 4]
// (halving 512 -> 256 -> 128 -> 64 -> 32 bits, pairing vectors at each step).
static inline __m512 reduce16(const __m512* v) {
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xDD));
}

// G = 4 heads, bf16, D % 32 == 0: s[g * kChunk + j] = q_g . k_j (exact bf16 products,
// fp32 sums) for j < n. Prefetches each key's V row with its K row, so P x V reads the
// chunk's V from cache (B = 64 x 512 keys over a 1 GiB pool of scattered 16-slot pages,
// op alone, old / new library alternating, medians of 60: 1.36 / 1.30, 1.34 / 1.24,
// 1.71 / 1.69 ms). Four keys at a time: 16 accumulators (key kk, head g) at index
// 4 kk + g, so reduce16's lanes 4 g .. 4 g + 3 are head g's four keys.
static void qk_dots_g4(const c10::BFloat16* qrows, const int64_t* slots, int64_t n,
                       const c10::BFloat16* kd, const c10::BFloat16* vd, int64_t KVH, int64_t h,
                       int64_t D, float* s) {
  const uint16_t* qb = reinterpret_cast<const uint16_t*>(qrows);
  const uint16_t* kb = reinterpret_cast<const uint16_t*>(kd);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    for (int kk = 0; kk < 4; ++kk)
      if (j + kPrefetch + kk < n) {
        prefetch_row(kd + (slots[j + kPrefetch + kk] * KVH + h) * D, D);
        prefetch_row(vd + (slots[j + kPrefetch + kk] * KVH + h) * D, D);
      }
    const uint16_t* k[4];
    for (int kk = 0; kk < 4; ++kk) k[kk] = kb + (slots[j + kk] * KVH + h) * D;
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      __m512bh kv[4];
      for (int kk = 0; kk < 4; ++kk) kv[kk] = (__m512bh)_mm512_loadu_si512(k[kk] + d);
      for (int g = 0; g < 4; ++g) {
        const __m512bh qv = (__m512bh)_mm512_loadu_si512(qb + g * D + d);
        for (int kk = 0; kk < 4; ++kk) acc[4 * kk + g] = _mm512_dpbf16_ps(acc[4 * kk + g], qv, kv[kk]);
      }
    }
    const __m512 z = reduce16(acc);
    _mm_storeu_ps(s + j, _mm512_extractf32x4_ps(z, 0));
    _mm_storeu_ps(s + kChunk + j, _mm512_extractf32x4_ps(z, 1));
    _mm_storeu_ps(s + 2 * kChunk + j, _mm512_extractf32x4_ps(z, 2));
    _mm_storeu_ps(s + 3 * kChunk + j, _mm512_extractf32x4_ps(z, 3));
  }
  for (; j < n; ++j) {
    const c10::BFloat16* krow = kd + (slots[j] * KVH + h) * D;
    for (int g = 0; g < 4; ++g) s[g * kChunk + j] = row_dot(qrows + g * D, nullptr, krow, nullptr, D);
  }
}
#endif


#if defined(__AVX512BF16__)
// Raw scores s[g * kChunk + j] (j < n, g < G) -> exp(score - max) in place, where score
// = softcap_of(raw * scale); part[g * stride] = max, part[g * stride + 1] = sum. The
// arithmetic of the scalar loops (same exp polynomial), sixteen lanes at a time.
static void softmax_chunk(float* s, int64_t G, int64_t n, float scale, float softcap,
                          float* part, int64_t stride) {
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * kChunk;
    if (softcap > 0.0f)
      for (int64_t j = 0; j < n; ++j) sg[j] = softcap_of(sg[j] * scale, softcap);
    const __m512 mul = _mm512_set1_ps(softcap > 0.0f ? 1.0f : scale);
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 k = tail_mask(j, n);
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, sg + j), mul);
      _mm512_mask_storeu_ps(sg + j, k, v);
      mv = _mm512_mask_max_ps(mv, k, mv, v);
    }
    const float m = _mm512_reduce_max_ps(mv);
    const __m512 mm = _mm512_set1_ps(m);
    __m512 lv = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 k = tail_mask(j, n);
      const __m512 e = _mm512_maskz_mov_ps(k, exp512_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sg + j), mm)));
      _mm512_mask_storeu_ps(sg + j, k, e);
      lv = _mm512_add_ps(lv, e);
    }
    part[g * stride] = m;
    part[g * stride + 1] = _mm512_reduce_add_ps(lv);
  }
}
#endif

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
  const int64_t R = table.size(0), S = kp.size(0), M = page_map.numel();
  std::vector<int64_t> chunk_start(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(0 <= rw[b] && rw[b] < R, "paged_decode: row out of range");
    TORCH_CHECK(0 <= lo_p[b] && lo_p[b] < hi_p[b] && hi_p[b] <= C,
                "paged_decode: key range must satisfy 0 <= key_lo < key_hi <= columns");
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

  std::atomic<bool> bad_slot{false};
  at::parallel_for(0, num_chunks * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), kf(D), s(G * kChunk), acc(G * D);
    std::vector<int64_t> slots(kChunk);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t c = unit / KVH, h = unit % KVH, b = chunk_query[c];
      const int64_t j0 = lo_p[b] + (c - chunk_start[b]) * kChunk;
      const int64_t n = std::min(kChunk, hi_p[b] - j0);
      const int64_t* row = tab + rw[b] * C;
      bool ok = true;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t full = row[j0 + j];
        const bool in_map = !map || (full >= 0 && full / page_size < M);
        const int64_t slot = !in_map ? -1 : map ? map[full / page_size] * page_size + full % page_size : full;
        ok &= 0 <= slot && slot < S;
        slots[j] = ok ? slot : 0;
      }
      if (!ok) {  // a slot outside the pool: report after the loop, read nothing
        bad_slot = true;
        continue;
      }
      const T* qrows = qd + (b * H + h * G) * D;  // G consecutive heads share KV head h
      float* part = &partial[(c * KVH + h) * G * stride];
      bool vector_done = false;  // the G = 4 bf16 path: raw dots, then softmax_chunk
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (G == 4 && D % 32 == 0) {
          qk_dots_g4(qrows, slots.data(), n, kd, vd, KVH, h, D, s.data());
          softmax_chunk(s.data(), G, n, scale, softcap, part, stride);
          vector_done = true;
        }
      }
#endif
      if (!vector_done) {
        for (int64_t g = 0; g < G; ++g) load_row(qrows + g * D, &qf[g * D], D);
        for (int64_t j = 0; j < n; ++j) {
          if (j + kPrefetch < n) prefetch_row(kd + (slots[j + kPrefetch] * KVH + h) * D, D);
          const T* krow = kd + (slots[j] * KVH + h) * D;
          for (int64_t g = 0; g < G; ++g)
            s[g * kChunk + j] = softcap_of(row_dot(qrows + g * D, &qf[g * D], krow, kf.data(), D) * scale, softcap);
        }
        for (int64_t g = 0; g < G; ++g) {
          const auto [m, l] = exp_minus_max(&s[g * kChunk], n);
          part[g * stride] = m;
          part[g * stride + 1] = l;
        }
      }
      for (int64_t j = 0; j < kPrefetch && j < n; ++j) prefetch_row(vd + (slots[j] * KVH + h) * D, D);
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (G <= 4 && D % 64 == 0) {
          accumulate_pv_bf16(s.data(), kChunk, G, slots.data(), n, vd, KVH, h, D, acc.data());
        } else {
          accumulate_pv(s.data(), kChunk, G, slots.data(), n, vd, KVH, h, D, acc.data());
        }
      } else
#endif
      accumulate_pv(s.data(), kChunk, G, slots.data(), n, vd, KVH, h, D, acc.data());
      for (int64_t g = 0; g < G; ++g)
        std::memcpy(part + g * stride + 2, &acc[g * D], D * sizeof(float));
    }
  });

  TORCH_CHECK(!bad_slot, "paged_decode: a key slot (after page mapping) is outside the pool");
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
"""

"""C++ source of the extend kernels `swakv.masked_softmax_out`, `swakv.pack_keys_bf16`,
`swakv.qk_scores_bf16` (contracts in `swakv.kernels.paged_attention_src`)."""

EXTEND_SOURCE = r"""
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
      const float l = exp_minus_max(x.data(), n).second;
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
// acc[r] = q row r . the keys of packed tile t0 (lanes 0-15 in acc[r][0]) and, when
// `two`, t0 + 1 (acc[r][1], else 0) for r < RM: exact bf16 products, fp32 sums, in
// registers.
template <int RM>
static inline __attribute__((always_inline)) void qk_tiles(const c10::BFloat16* q, int64_t ldq,
                                                           const uint32_t* pk, int64_t P, int64_t t0,
                                                           bool two, __m512 (&acc)[RM][2]) {
  for (int r = 0; r < RM; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const uint32_t* b0p = pk + t0 * P * 16;
  const uint32_t* b1p = b0p + P * 16;
  for (int64_t p = 0; p < P; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b0p + p * 16);
    const __m512bh b1 = two ? (__m512bh)_mm512_loadu_si512(b1p + p * 16) : (__m512bh)_mm512_setzero_si512();
#pragma GCC unroll 8
    for (int r = 0; r < RM; ++r) {
      int32_t pair;
      std::memcpy(&pair, q + r * ldq + 2 * p, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  }
}

// out[r][c] for rows r < RM, columns of key tiles t0, t0 + 1 (ntiles of them):
// column of tile lane j is 16 t + j - key_lo, stored when in [0, num_cols).
template <int RM>
static inline void qk_micro(const c10::BFloat16* q, int64_t ldq, const uint32_t* pk, int64_t P,
                            int64_t t0, int ntiles, int64_t key_lo, int64_t num_cols,
                            float* out, int64_t ldo) {
  __m512 acc[RM][2];
  qk_tiles<RM>(q, ldq, pk, P, t0, ntiles > 1, acc);
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
"""

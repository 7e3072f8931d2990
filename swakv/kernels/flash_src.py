"""C++ source of the fused extend kernel `swakv.flash_extend_bf16` and its value packing
`swakv.pack_values_bf16` (contracts in `swakv.kernels.paged_attention_src`)."""

FLASH_SOURCE = r"""
// packed[p][d][e] = v[2 p + e][d] (0 past the last key): key pairs of each column, the
// layout the bf16 dot-product instruction reads for P x V.
at::Tensor pack_values_bf16(const at::Tensor& v) {
  TORCH_CHECK(v.dim() == 2 && v.scalar_type() == at::kBFloat16 && v.stride(1) == 1, "v [N, D] bf16");
  const int64_t N = v.size(0), D = v.size(1), ld = v.stride(0);
  const int64_t pairs = (N + 1) / 2;
  at::Tensor packed = at::empty({pairs, D, 2}, v.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(v.data_ptr<c10::BFloat16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.data_ptr<c10::BFloat16>());
  at::parallel_for(0, pairs, 16, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const uint16_t* r0 = src + 2 * p * ld;
      const bool has1 = 2 * p + 1 < N;
      uint16_t* out = dst + p * D * 2;
      for (int64_t d = 0; d < D; ++d) {
        out[2 * d] = r0[d];
        out[2 * d + 1] = has1 ? r0[ld + d] : uint16_t(0);
      }
    }
  });
  return packed;
}

#if defined(__AVX512BF16__)
constexpr int FLASH_ROWS = 8;   // query rows per micro-tile (register block)
constexpr int FLASH_TILE = 64;  // query rows per tile: each key / value step is reused by all
// keys per step: eight packed key tiles. Longer steps spread each row's max / sum
// reductions and the rescaling of its accumulator over more keys; ms for 1,024 queries
// x 4 heads (head_dim 256) at 4,096 keys of context, full / window 512: 32 keys 26.3 /
// 3.07, 64 23.5 / 2.78, 128 22.1 / 2.66, 256 22.1 / 2.70
constexpr int FLASH_KEYS = 128;
constexpr int FLASH_KT = FLASH_KEYS / 16;  // 16-key tiles per step

// Online-softmax state and P x V of one micro-tile (8 rows) for one step of FLASH_KEYS
// keys [c0, c0 + FLASH_KEYS): S in blocks of 32 keys (the register block of qk_tiles);
// tiles at or past step_hi (the micro-tile's last visible column + 1) are not read.
static void flash_micro(const uint32_t* qpairs, const int64_t* lo, const int64_t* hi, int rows,
                        const uint32_t* pk, const uint32_t* pv, int64_t P, int64_t D, int64_t c0,
                        int64_t step_hi, float scale, float softcap, float* m, float* l, float* acc) {
  alignas(64) float st[FLASH_ROWS][FLASH_KEYS];
  for (int half = 0; half < FLASH_KT / 2; ++half) {  // 32-key blocks
    const int64_t h0 = c0 + 32 * half;
    __m512 acc_qk[FLASH_ROWS][2];  // S = Q K^T, one store
    if (h0 < step_hi) {
      qk_tiles<FLASH_ROWS>(reinterpret_cast<const c10::BFloat16*>(qpairs), 2 * P, pk, P, h0 / 16,
                           h0 + 16 < step_hi, acc_qk);
    } else {
      for (int r = 0; r < FLASH_ROWS; ++r) acc_qk[r][0] = acc_qk[r][1] = _mm512_setzero_ps();
    }
    for (int r = 0; r < FLASH_ROWS; ++r) {
      _mm512_store_ps(st[r] + 32 * half, acc_qk[r][0]);
      _mm512_store_ps(st[r] + 32 * half + 16, acc_qk[r][1]);
    }
  }
  alignas(64) uint32_t ppairs[FLASH_ROWS][FLASH_KEYS / 2];
  float corr[FLASH_ROWS];
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  for (int r = 0; r < FLASH_ROWS; ++r) {
    __mmask16 vis[FLASH_KT];
    __m512 sa[FLASH_KT];
    __mmask16 any = 0;
    __m512 vmax = ninf;
    for (int h = 0; h < FLASH_KT; ++h) {
      const __m512i col = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(c0 + 16 * h)));
      vis[h] = r < rows ? (__mmask16)(_mm512_cmpge_epi32_mask(col, _mm512_set1_epi32(static_cast<int>(lo[r]))) &
                                      _mm512_cmplt_epi32_mask(col, _mm512_set1_epi32(static_cast<int>(hi[r]))))
                        : (__mmask16)0;
      any |= vis[h];
      if (softcap > 0.0f) {
        for (int j = 0; j < 16; ++j) st[r][16 * h + j] = std::tanh(st[r][16 * h + j] * scale / softcap) * softcap;
        sa[h] = _mm512_load_ps(st[r] + 16 * h);
      } else {
        sa[h] = _mm512_mul_ps(_mm512_load_ps(st[r] + 16 * h), _mm512_set1_ps(scale));
      }
      vmax = _mm512_mask_max_ps(vmax, vis[h], vmax, sa[h]);
    }
    if (any == 0) {
      corr[r] = 1.0f;
      std::memset(ppairs[r], 0, sizeof(ppairs[r]));
      continue;
    }
    const float bmax = _mm512_reduce_max_ps(vmax);
    const float m_new = std::max(m[r], bmax);
    corr[r] = m[r] == -INFINITY ? 0.0f : exp_nonpos(m[r] - m_new);
    m[r] = m_new;
    const __m512 mv = _mm512_set1_ps(m_new);
    __m512 psum = _mm512_setzero_ps();
    for (int h = 0; h < FLASH_KT; h += 2) {
      const __m512 p0 = _mm512_maskz_mov_ps(vis[h], exp512_nonpos(_mm512_sub_ps(sa[h], mv)));
      const __m512 p1 = _mm512_maskz_mov_ps(vis[h + 1], exp512_nonpos(_mm512_sub_ps(sa[h + 1], mv)));
      psum = _mm512_add_ps(psum, _mm512_add_ps(p0, p1));
      // keys 2i, 2i + 1 as one bf16 pair (round to nearest even)
      _mm512_store_si512(ppairs[r] + 8 * h, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
    }
    l[r] = l[r] * corr[r] + _mm512_reduce_add_ps(psum);
  }
  // acc = acc * corr + P V over the step's key pairs
  const int64_t pair0 = c0 / 2;
  const int npairs = static_cast<int>(std::min<int64_t>(FLASH_KEYS / 2, (step_hi - c0 + 1) / 2));
  for (int64_t d = 0; d < D; d += 32) {  // 8 rows x 32 columns in registers (D % 32 == 0)
    __m512 a[FLASH_ROWS][2];
#pragma GCC unroll 8
    for (int r = 0; r < FLASH_ROWS; ++r) {
      const __m512 c = _mm512_set1_ps(corr[r]);
      a[r][0] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * D + d), c);
      a[r][1] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * D + d + 16), c);
    }
    for (int i = 0; i < npairs; ++i) {
      const __m512bh v0 = (__m512bh)_mm512_loadu_si512(pv + (pair0 + i) * D + d);
      const __m512bh v1 = (__m512bh)_mm512_loadu_si512(pv + (pair0 + i) * D + d + 16);
#pragma GCC unroll 8
      for (int r = 0; r < FLASH_ROWS; ++r) {
        const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(ppairs[r][i]));
        a[r][0] = _mm512_dpbf16_ps(a[r][0], w, v0);
        a[r][1] = _mm512_dpbf16_ps(a[r][1], w, v1);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < FLASH_ROWS; ++r) {
      _mm512_storeu_ps(acc + r * D + d, a[r][0]);
      _mm512_storeu_ps(acc + r * D + d + 16, a[r][1]);
    }
  }
}

// One tile of up to FLASH_TILE stacked query rows (row r: query r / G, head r % G) against
// key columns [lo[r], hi[r]): steps of FLASH_KEYS keys, each run by every micro-tile that sees
// one of its keys, so a step's keys and values are read from cache once per tile.
static void flash_tile(const uint32_t* qpairs, const int64_t* lo, const int64_t* hi, int rows,
                       const uint32_t* pk, const uint32_t* pv, int64_t P, int64_t D,
                       float scale, float softcap, float* acc, c10::BFloat16* const* out_rows) {
  float m[FLASH_TILE], l[FLASH_TILE];
  std::fill(m, m + FLASH_TILE, -INFINITY);
  std::fill(l, l + FLASH_TILE, 0.0f);
  std::fill(acc, acc + FLASH_TILE * D, 0.0f);
  const int micro = (rows + FLASH_ROWS - 1) / FLASH_ROWS;
  // micro-tile mt holds rows [8 mt, 8 mt + 8) and sees columns [mlo[mt], mhi[mt])
  int64_t mlo[FLASH_TILE / FLASH_ROWS], mhi[FLASH_TILE / FLASH_ROWS];
  for (int mt = 0; mt < micro; ++mt) {
    mlo[mt] = INT64_MAX;
    mhi[mt] = 0;
    for (int r = mt * FLASH_ROWS; r < std::min(rows, (mt + 1) * FLASH_ROWS); ++r) {
      mlo[mt] = std::min(mlo[mt], lo[r]);
      mhi[mt] = std::max(mhi[mt], hi[r]);
    }
  }
  const int64_t tlo = *std::min_element(mlo, mlo + micro), thi = *std::max_element(mhi, mhi + micro);
  for (int64_t c0 = (tlo / 16) * 16; c0 < thi; c0 += FLASH_KEYS) {
    for (int mt = 0; mt < micro; ++mt) {
      if (mhi[mt] <= c0 || mlo[mt] >= c0 + FLASH_KEYS) continue;  // sees none of this step's keys
      const int r0 = mt * FLASH_ROWS;
      flash_micro(qpairs + r0 * P, lo + r0, hi + r0, std::min(FLASH_ROWS, rows - r0), pk, pv, P, D,
                  c0, mhi[mt], scale, softcap, m + r0, l + r0, acc + r0 * D);
    }
  }
  for (int r = 0; r < rows; ++r) store_row_scaled(acc + r * D, 1.0f / l[r], out_rows[r], D);
}
#endif

// out[i, g] = softmax(scale * q[i, g] . K^T) V over the key columns query i sees:
// [lo_i, hi_i) with hi_i = q_pos0 + i + 1 - key_pos, lo_i = max(0, hi_i - window) (window
// > 0) or 0; column c is key position key_pos + c of packed_k / packed_v.
at::Tensor flash_extend_bf16(const at::Tensor& q, const at::Tensor& packed_k, const at::Tensor& packed_v,
                             at::Tensor out, int64_t q_pos0, int64_t key_pos, int64_t window,
                             double scale_d, double softcap_d) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kBFloat16 && q.stride(2) == 1, "q [n, G, D] bf16");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == at::kBFloat16 && out.stride(2) == 1,
              "out like q");
  const int64_t n = q.size(0), G = q.size(1), D = q.size(2), P = D / 2;
  TORCH_CHECK(D % 32 == 0, "head_dim a multiple of 32");
  TORCH_CHECK(packed_k.dim() == 4 && packed_k.size(1) == P && packed_v.dim() == 3 && packed_v.size(1) == D,
              "packed keys / values match q");
  const int64_t num_keys = q_pos0 + n - key_pos;
  TORCH_CHECK(key_pos >= 0 && q_pos0 >= key_pos && packed_k.size(0) * 16 >= num_keys &&
              packed_v.size(0) * 2 >= num_keys, "packed keys cover every query's columns");
#if defined(__AVX512BF16__)
  const float scale = static_cast<float>(scale_d), softcap = static_cast<float>(softcap_d);
  const int64_t R = n * G, tiles = (R + FLASH_TILE - 1) / FLASH_TILE;
  const uint32_t* pk = reinterpret_cast<const uint32_t*>(packed_k.data_ptr<c10::BFloat16>());
  const uint32_t* pv = reinterpret_cast<const uint32_t*>(packed_v.data_ptr<c10::BFloat16>());
  const c10::BFloat16* qd = q.data_ptr<c10::BFloat16>();
  c10::BFloat16* od = out.data_ptr<c10::BFloat16>();
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tiles);
  // tiles dealt round robin: later queries see more keys (causal), so contiguous
  // ranges would load the last thread most
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> qpairs(FLASH_TILE * P);
    std::vector<float> acc(FLASH_TILE * D);
    for (int64_t tid = begin; tid < end; ++tid) {
      for (int64_t t = tid; t < tiles; t += threads) {
        int64_t lo[FLASH_TILE], hi[FLASH_TILE];
        c10::BFloat16* out_rows[FLASH_TILE];
        const int rows = static_cast<int>(std::min<int64_t>(FLASH_TILE, R - t * FLASH_TILE));
        for (int r = 0; r < rows; ++r) {
          const int64_t row = t * FLASH_TILE + r, i = row / G, g = row % G;
          std::memcpy(&qpairs[r * P], qd + i * q.stride(0) + g * q.stride(1), D * sizeof(c10::BFloat16));
          hi[r] = q_pos0 + i + 1 - key_pos;
          lo[r] = window > 0 ? std::max<int64_t>(0, hi[r] - window) : 0;
          out_rows[r] = od + i * out.stride(0) + g * out.stride(1);
        }
        flash_tile(qpairs.data(), lo, hi, rows, pk, pv, P, D, scale, softcap, acc.data(), out_rows);
      }
    }
  });
#else
  TORCH_CHECK(false, "flash_extend_bf16 needs AVX512-BF16");
#endif
  return out;
}
"""

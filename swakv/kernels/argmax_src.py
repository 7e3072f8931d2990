"""C++ source of `swakv.argmax_update_bf16` (contract in `swakv.kernels.paged_attention_src`):
the running first maximum of bf16 logits computed tile by tile, so a greedy step can
take its tokens from each LM-head tile while the tile is in cache instead of writing
the whole [rows, vocab] logits and scanning them again.

Order: the first maximum, as `torch.argmax` (ties keep the lowest column); a NaN counts
as larger than any number, and the first NaN of a row wins, as torch's max does.
"""

ARGMAX_SOURCE = r"""
// (best value, first column holding it) of row[0:n], NaN largest (first NaN wins)
static inline std::pair<float, int64_t> row_first_max(const c10::BFloat16* row, int64_t n) {
  const uint16_t* r = reinterpret_cast<const uint16_t*>(row);
  int64_t j = 0;
  float best = -INFINITY;
  int64_t best_j = 0;
  bool nan = false;
#if defined(__AVX512F__)
  if (n >= 16) {
    // per lane: the largest value seen and the first column holding it (strict >)
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    __m512i vidx = _mm512_setzero_si512();
    __m512i cols = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    __mmask16 unordered = 0;
    for (; j + 16 <= n; j += 16) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + j));
      const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);
      vmax = _mm512_mask_mov_ps(vmax, gt, v);
      vidx = _mm512_mask_mov_epi32(vidx, gt, cols);
      cols = _mm512_add_epi32(cols, step);
    }
    nan = unordered != 0;
    if (!nan) {
      alignas(64) float m[16];
      alignas(64) int32_t ix[16];
      _mm512_store_ps(m, vmax);
      _mm512_store_si512(ix, vidx);
      for (int l = 0; l < 16; ++l)
        if (m[l] > best || (m[l] == best && ix[l] < best_j)) best = m[l], best_j = ix[l];
    }
  }
#endif
  if (nan) j = 0;  // rare: rescan in order for the first NaN
  for (; j < n; ++j) {
    uint32_t bits = static_cast<uint32_t>(r[j]) << 16;
    float v;
    std::memcpy(&v, &bits, sizeof(v));
    if (std::isnan(v)) return {v, j};
    if (v > best) best = v, best_j = j;
  }
  return {best, best_j};
}

// For each row m of x [M, N] (bf16, unit column stride): when the row's first maximum v
// at column j beats best_value[m] (v > best, or v NaN and best not), set best_value[m] =
// v and best_index[m] = offset + j. Tiles fed in increasing column order keep the first
// maximum of the whole row.
void argmax_update_bf16(const at::Tensor& x, at::Tensor& best_value, at::Tensor& best_index,
                        int64_t offset) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.stride(1) == 1,
              "x bf16 [M, N] with unit column stride");
  const int64_t M = x.size(0), N = x.size(1), ld = x.stride(0);
  TORCH_CHECK(best_value.scalar_type() == at::kFloat && best_value.is_contiguous() &&
              best_value.numel() == M, "best_value float32 [M] contiguous");
  TORCH_CHECK(best_index.scalar_type() == at::kLong && best_index.is_contiguous() &&
              best_index.numel() == M, "best_index int64 [M] contiguous");
  if (N == 0) return;
  const c10::BFloat16* xd = x.data_ptr<c10::BFloat16>();
  float* bv = best_value.data_ptr<float>();
  int64_t* bi = best_index.data_ptr<int64_t>();
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const auto [v, j] = row_first_max(xd + m * ld, N);
      if (v > bv[m] || (std::isnan(v) && !std::isnan(bv[m]))) {
        bv[m] = v;
        bi[m] = offset + j;
      }
    }
  });
}
"""

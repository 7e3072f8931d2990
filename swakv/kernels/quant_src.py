"""C++ sources of `swakv.int8_group_mm` and `swakv.rms_norm_bf16` (contracts in
`swakv.kernels.paged_attention_src`).

y[m, n] = sum_g scales[n, g] * sum_{k in group g} qweight[n, k] * x[m, k], with the
group sums and the total in fp32. Weight-only: x stays in its float dtype (bf16 inputs
are widened exactly), so the only rounding beyond fp32 summation is the weights'.
Meant for a few rows (decode), where reading the weights dominates: each weight byte is
read once for up to 8 rows at a time, and rows of the output are split across threads.
"""

QUANT_SOURCE = r"""
// x rows widened to fp32 once: xf [M, K]
static std::vector<float> widen_rows(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<float> xf(M * K);
  for (int64_t m = 0; m < M; ++m) {
    if (x.scalar_type() == at::kFloat)
      load_row(x.data_ptr<float>() + m * x.stride(0), xf.data() + m * K, K);
    else
      load_row(x.data_ptr<c10::BFloat16>() + m * x.stride(0), xf.data() + m * K, K);
  }
  return xf;
}

template <int MB>
static void group_rows(const int8_t* q, const float* s, const float* xf, int64_t K, int64_t G,
                       int64_t n_lo, int64_t n_hi, float* y, int64_t ldy) {
  const int64_t num_groups = K / G;
  for (int64_t n = n_lo; n < n_hi; ++n) {
    const int8_t* qr = q + n * K;
    const float* sr = s + n * num_groups;
#if defined(__AVX512F__)
    __m512 total[MB];
    for (int m = 0; m < MB; ++m) total[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < num_groups; ++g) {
      __m512 acc[MB];
      for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
      for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + k));
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
        for (int m = 0; m < MB; ++m)
          acc[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xf + m * K + k), acc[m]);
      }
      const __m512 scale = _mm512_set1_ps(sr[g]);
      for (int m = 0; m < MB; ++m) total[m] = _mm512_fmadd_ps(acc[m], scale, total[m]);
    }
    for (int m = 0; m < MB; ++m) y[m * ldy + n] = _mm512_reduce_add_ps(total[m]);
#else
    for (int m = 0; m < MB; ++m) {
      float total = 0.0f;
      for (int64_t g = 0; g < num_groups; ++g) {
        float acc = 0.0f;
        for (int64_t k = g * G; k < (g + 1) * G; ++k) acc += float(qr[k]) * xf[m * K + k];
        total += acc * sr[g];
      }
      y[m * ldy + n] = total;
    }
#endif
  }
}

static void group_block(int64_t mb, const int8_t* q, const float* s, const float* xf, int64_t K,
                        int64_t G, int64_t n_lo, int64_t n_hi, float* y, int64_t ldy) {
  switch (mb) {
    case 1: group_rows<1>(q, s, xf, K, G, n_lo, n_hi, y, ldy); break;
    case 2: group_rows<2>(q, s, xf, K, G, n_lo, n_hi, y, ldy); break;
    case 3: group_rows<3>(q, s, xf, K, G, n_lo, n_hi, y, ldy); break;
    case 4: group_rows<4>(q, s, xf, K, G, n_lo, n_hi, y, ldy); break;
    case 5: group_rows<5>(q, s, xf, K, G, n_lo, n_hi, y, ldy); break;
    case 6: group_rows<6>(q, s, xf, K, G, n_lo, n_hi, y, ldy); break;
    case 7: group_rows<7>(q, s, xf, K, G, n_lo, n_hi, y, ldy); break;
    default: group_rows<8>(q, s, xf, K, G, n_lo, n_hi, y, ldy); break;
  }
}

at::Tensor int8_group_mm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x [M, K] with unit column stride");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x float32 or bfloat16");
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() && qweight.scalar_type() == at::kChar,
              "qweight int8 [N, K] contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == K, "qweight [N, K] matches x [M, K]");
  TORCH_CHECK(group > 0 && group % 16 == 0 && K % group == 0, "group a multiple of 16 dividing K");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
              scales.dim() == 2 && scales.size(0) == N && scales.size(1) == K / group,
              "scales float32 [N, K / group] contiguous");
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return y.to(x.scalar_type());
  const std::vector<float> xf = widen_rows(x);
  const int8_t* q = qweight.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  at::parallel_for(0, N, 256, [&](int64_t n_lo, int64_t n_hi) {
    for (int64_t m0 = 0; m0 < M; m0 += 8)
      group_block(std::min<int64_t>(8, M - m0), q, s, xf.data() + m0 * K, K, group, n_lo, n_hi,
                  yd + m0 * N, N);
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}
"""

# The w8a8 kernel's two passes around torch._int_mm (see swakv.model.quant.W8A8Kernel).
W8A8_SOURCE = r"""
// Per row m of x [M, K]: amax = max |x[m, :]|, sx[m] = amax / 127 (1 when amax is 0),
// q[m, k] = round_half_even(x[m, k] / sx[m]) in [-127, 127]: the values and roundings of
// torch.div(x, sx).round_() with fp32 division, so it matches quantize_per_token exactly.
template <typename T>
static void quantize_rows_impl(const at::Tensor& x, at::Tensor& q, at::Tensor& sx) {
  const int64_t M = x.size(0), K = x.size(1), ld = x.stride(0);
  const T* xd = x.data_ptr<T>();
  int8_t* qd = q.data_ptr<int8_t>();
  float* sd = sx.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t m = begin; m < end; ++m) {
      load_row(xd + m * ld, row.data(), K);
      float amax = 0.0f;
#pragma omp simd reduction(max : amax)
      for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(row[k]));
      const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
      sd[m] = s;
      int8_t* qr = qd + m * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) qr[k] = static_cast<int8_t>(std::nearbyint(row[k] / s));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_rows_int8(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x [M, K] with unit column stride");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x float32 or bfloat16");
  at::Tensor q = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kChar));
  at::Tensor sx = at::empty({x.size(0), 1}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kFloat) quantize_rows_impl<float>(x, q, sx);
  else quantize_rows_impl<c10::BFloat16>(x, q, sx);
  return {q, sx};
}

// out[m, n] = dtype((float(acc[m, n]) * sx[m]) * sw[n]): the roundings of
// acc.float().mul_(sx).mul_(sw).to(dtype) in one pass.
template <typename T>
static void rescale_impl(const at::Tensor& acc, const at::Tensor& sx, const at::Tensor& sw,
                         at::Tensor& out) {
  const int64_t M = acc.size(0), N = acc.size(1);
  const int32_t* ad = acc.data_ptr<int32_t>();
  const float* xs = sx.data_ptr<float>();
  const float* ws = sw.data_ptr<float>();
  T* od = out.data_ptr<T>();
  at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> row(N);
    for (int64_t m = begin; m < end; ++m) {
      const int32_t* ar = ad + m * N;
      const float s = xs[m];
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) row[n] = (static_cast<float>(ar[n]) * s) * ws[n];
      store_row(row.data(), od + m * N, N);
    }
  });
}

at::Tensor rescale_int32(const at::Tensor& acc, const at::Tensor& sx, const at::Tensor& sw,
                         at::ScalarType dtype) {
  TORCH_CHECK(acc.dim() == 2 && acc.is_contiguous() && acc.scalar_type() == at::kInt,
              "acc int32 [M, N] contiguous");
  TORCH_CHECK(sx.scalar_type() == at::kFloat && sx.is_contiguous() && sx.numel() == acc.size(0),
              "sx float32 [M] or [M, 1] contiguous");
  TORCH_CHECK(sw.scalar_type() == at::kFloat && sw.is_contiguous() && sw.numel() == acc.size(1),
              "sw float32 [N] contiguous");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dtype float32 or bfloat16");
  at::Tensor out = at::empty({acc.size(0), acc.size(1)}, acc.options().dtype(dtype));
  if (dtype == at::kFloat) rescale_impl<float>(acc, sx, sw, out);
  else rescale_impl<c10::BFloat16>(acc, sx, sw, out);
  return out;
}
"""

# RMSNorm rows for bf16 models (registered beside the matmul kernel; see gemma3.rms_norm).
NORM_SOURCE = r"""
// Checks weight float32 [D], [1, D] or [H, D] contiguous; returns its row count W (row h % W
// scales head h).
static int64_t norm_weight_rows(const at::Tensor& weight, int64_t H, int64_t D) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
              weight.size(-1) == D && (weight.dim() == 1 || (weight.dim() == 2 &&
              (weight.size(0) == H || weight.size(0) == 1))),
              "weight float32 [D], [1, D] or [H, D] contiguous");
  return weight.dim() == 1 ? 1 : weight.size(0);
}

// row[0:D] <- row * rsqrt(mean(row^2) + eps) * w, in fp32 (not rounded)
static inline void rms_scale_row(float* row, const float* w, int64_t D, float eps) {
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < D; ++j) ss += row[j] * row[j];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
#pragma omp simd
  for (int64_t j = 0; j < D; ++j) row[j] = row[j] * inv * w[j];
}
// out[t, h, :] = bf16(x[t, h, :] * rsqrt(mean(x[t, h, :]^2) + eps) * w[h % W, :]), fp32 math
at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& weight, double eps_d) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && (x.dim() == 2 || x.dim() == 3) &&
              x.stride(-1) == 1, "x bf16 [T, D] or [T, H, D] with unit last stride");
  const at::Tensor x3 = x.dim() == 2 ? x.unsqueeze(1) : x;
  const int64_t T = x3.size(0), H = x3.size(1), D = x3.size(2);
  const int64_t W = norm_weight_rows(weight, H, D);
  at::Tensor out = at::empty({T, H, D}, x.options());
  const c10::BFloat16* xd = x3.data_ptr<c10::BFloat16>();
  const float* wd = weight.data_ptr<float>();
  c10::BFloat16* od = out.data_ptr<c10::BFloat16>();
  const int64_t st = x3.stride(0), sh = x3.stride(1);
  const float eps = static_cast<float>(eps_d);
  at::parallel_for(0, T * H, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r / H, h = r % H;
      load_row(xd + t * st + h * sh, row.data(), D);
      rms_scale_row(row.data(), wd + (h % W) * D, D, eps);
      store_row(row.data(), od + r * D, D);
    }
  });
  return x.dim() == 2 ? out.squeeze(1) : out;
}

// Gemma's residual step and the next norm in one pass per row t (D columns):
// h_out[t] = bf16(h[t] + bf16(rms(y[t]) * wy)), x_out[t] = bf16(rms(h_out[t]) * wx), the
// roundings of `h = h + rms_norm_bf16(y, wy)` (a bf16 add) then `rms_norm_bf16(h, wx)`.
std::tuple<at::Tensor, at::Tensor> add_rms_norm_bf16(const at::Tensor& h, const at::Tensor& y,
                                                     const at::Tensor& wy, const at::Tensor& wx,
                                                     double eps_d) {
  TORCH_CHECK(h.scalar_type() == at::kBFloat16 && h.dim() == 2 && h.is_contiguous(),
              "h bf16 [T, D] contiguous");
  TORCH_CHECK(y.scalar_type() == at::kBFloat16 && y.sizes() == h.sizes() && y.stride(1) == 1,
              "y bf16 [T, D] like h, unit column stride");
  const int64_t T = h.size(0), D = h.size(1);
  norm_weight_rows(wy, 1, D);  // checks: float32 [D] or [1, D]
  norm_weight_rows(wx, 1, D);
  at::Tensor h_out = at::empty({T, D}, h.options());
  at::Tensor x_out = at::empty({T, D}, h.options());
  const c10::BFloat16* hd = h.data_ptr<c10::BFloat16>();
  const c10::BFloat16* yd = y.data_ptr<c10::BFloat16>();
  const float* wyd = wy.data_ptr<float>();
  const float* wxd = wx.data_ptr<float>();
  c10::BFloat16* hod = h_out.data_ptr<c10::BFloat16>();
  c10::BFloat16* xod = x_out.data_ptr<c10::BFloat16>();
  const int64_t ly = y.stride(0);
  const float eps = static_cast<float>(eps_d);
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> row(D), res(D);
    for (int64_t t = begin; t < end; ++t) {
      load_row(yd + t * ly, row.data(), D);
      rms_scale_row(row.data(), wyd, D, eps);
      load_row(hd + t * D, res.data(), D);
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) row[j] = round_bf16(res[j] + round_bf16(row[j]));
      store_row(row.data(), hod + t * D, D);
      rms_scale_row(row.data(), wxd, D, eps);
      store_row(row.data(), xod + t * D, D);
    }
  });
  return {h_out, x_out};
}

// rms_norm_bf16 of x [T, H, D], then RoPE with half-width cos / sin [T, D / 2] (bf16):
// y = bf16(norm); out[:half] = bf16(bf16(y1 c) - bf16(y2 s)), out[half:] =
// bf16(bf16(y2 c) + bf16(y1 s)): every rounding of gemma3's two-step torch path.
at::Tensor rms_norm_rope_bf16(const at::Tensor& x, const at::Tensor& weight, double eps_d,
                              const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 3 && x.stride(-1) == 1,
              "x bf16 [T, H, D] with unit last stride");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  TORCH_CHECK(D % 2 == 0, "even head_dim");
  const int64_t W = norm_weight_rows(weight, H, D);
  TORCH_CHECK(cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16 &&
              cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 &&
              cos.sizes() == sin.sizes() && cos.size(0) == T && cos.size(1) == half,
              "cos, sin bf16 [T, D / 2] contiguous");
  at::Tensor out = at::empty({T, H, D}, x.options());
  const c10::BFloat16* xd = x.data_ptr<c10::BFloat16>();
  const float* wd = weight.data_ptr<float>();
  const c10::BFloat16* cd = cos.data_ptr<c10::BFloat16>();
  const c10::BFloat16* sd = sin.data_ptr<c10::BFloat16>();
  c10::BFloat16* od = out.data_ptr<c10::BFloat16>();
  const int64_t st = x.stride(0), sh = x.stride(1);
  const float eps = static_cast<float>(eps_d);
  at::parallel_for(0, T * H, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> row(D), c(half), s(half);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r / H, h = r % H;
      load_row(xd + t * st + h * sh, row.data(), D);
      rms_scale_row(row.data(), wd + (h % W) * D, D, eps);
      load_row(cd + t * half, c.data(), half);
      load_row(sd + t * half, s.data(), half);
#pragma omp simd
      for (int64_t j = 0; j < half; ++j) {
        const float y1 = round_bf16(row[j]), y2 = round_bf16(row[j + half]);
        row[j] = round_bf16(y1 * c[j]) - round_bf16(y2 * s[j]);
        row[j + half] = round_bf16(y2 * c[j]) + round_bf16(y1 * s[j]);
      }
      store_row(row.data(), od + r * D, D);
    }
  });
  return out;
}

#if defined(__AVX512F__)
// bf16(gelu_tanh(x)) * u on 16 lanes: the scalar loop's formula (the same exp polynomial,
// one division), with explicit fused multiply-adds where the compiler may contract.
static inline __m512 gelu_tanh_mul_512(__m512 x, __m512 u) {
  const __m512 y = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                 _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x),
                                                 _mm512_mul_ps(x, x), x));
  const __m512 e = exp512_nonpos(_mm512_mul_ps(_mm512_set1_ps(-2.0f), _mm512_abs_ps(y)));
  const __mmask16 pos = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_GE_OQ);
  const __m512 gelu = _mm512_div_ps(_mm512_mask_blend_ps(pos, _mm512_mul_ps(x, e), x),
                                    _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  return _mm512_mul_ps(round_bf16_512(gelu), u);
}
#endif

// g[j] <- bf16(gelu_tanh(g[j])) * u[j] in fp32 for j < n (the caller rounds the product):
// F.gelu's bf16 rounding of its output, then the product; 0.5 (1 + tanh y) = sigmoid(2 y).
static inline void gelu_tanh_mul_row(float* g, const float* u, int64_t n) {
#if defined(__AVX512F__)
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(j, n);
    _mm512_mask_storeu_ps(g + j, k, gelu_tanh_mul_512(_mm512_maskz_loadu_ps(k, g + j),
                                                      _mm512_maskz_loadu_ps(k, u + j)));
  }
#else
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float x = g[j];
    const float y = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    // 0.5 x (1 + tanh y) = x sigmoid(2 y), with exp only of non-positive arguments
    const float e = exp_nonpos(-2.0f * std::fabs(y));
    // one division per lane: the numerator picks the branch (x / d or (x e) / d)
    const float gelu = (y >= 0.0f ? x : x * e) / (1.0f + e);
    g[j] = round_bf16(gelu) * u[j];
  }
#endif
}

// out[t, j] = bf16(bf16(gelu_tanh(g)) * u), g = gate_up[t, j], u = gate_up[t, I + j]: the
// roundings of F.gelu(gate) * up on bf16 tensors.
at::Tensor gelu_tanh_mul_bf16(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == at::kBFloat16 && gate_up.dim() == 2 &&
              gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "gate_up bf16 [T, 2 I] with unit column stride");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2, ld = gate_up.stride(0);
  at::Tensor out = at::empty({T, I}, gate_up.options());
  const c10::BFloat16* gd = gate_up.data_ptr<c10::BFloat16>();
  c10::BFloat16* od = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, T, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> g(I), u(I);
    for (int64_t t = begin; t < end; ++t) {
      load_row(gd + t * ld, g.data(), I);
      load_row(gd + t * ld + I, u.data(), I);
      gelu_tanh_mul_row(g.data(), u.data(), I);
      store_row(g.data(), od + t * I, I);
    }
  });
  return out;
}

// The w8a8 gate/up epilogue in one pass: out[m, j] = bf16(bf16(gelu_tanh(g)) * u) with
// g = bf16((float(acc[m, j]) * sx[m]) * sw[j]) and u the same of column I + j:
// bit-identical to gelu_tanh_mul_bf16(rescale_int32(acc, sx, sw, bfloat16)), without the
// [M, 2 I] bf16 temporary.
at::Tensor rescale_gelu_mul_bf16(const at::Tensor& acc, const at::Tensor& sx,
                                 const at::Tensor& sw) {
  TORCH_CHECK(acc.dim() == 2 && acc.is_contiguous() && acc.scalar_type() == at::kInt &&
              acc.size(1) % 2 == 0, "acc int32 [M, 2 I] contiguous");
  TORCH_CHECK(sx.scalar_type() == at::kFloat && sx.is_contiguous() && sx.numel() == acc.size(0),
              "sx float32 [M] or [M, 1] contiguous");
  TORCH_CHECK(sw.scalar_type() == at::kFloat && sw.is_contiguous() && sw.numel() == acc.size(1),
              "sw float32 [2 I] contiguous");
  const int64_t M = acc.size(0), I = acc.size(1) / 2;
  at::Tensor out = at::empty({M, I}, acc.options().dtype(at::kBFloat16));
  const int32_t* ad = acc.data_ptr<int32_t>();
  const float* xs = sx.data_ptr<float>();
  const float* ws = sw.data_ptr<float>();
  c10::BFloat16* od = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> g(I), u(I);
    for (int64_t m = begin; m < end; ++m) {
      const int32_t* ar = ad + m * 2 * I;
      const float s = xs[m];
#if defined(__AVX512F__)
      const __m512 sv = _mm512_set1_ps(s);
      for (int64_t j = 0; j < I; j += 16) {  // rescale, GELU and product in registers
        const __mmask16 k = tail_mask(j, I);
        const __m512 gj = round_bf16_512(_mm512_mul_ps(
            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(k, ar + j)), sv),
            _mm512_maskz_loadu_ps(k, ws + j)));
        const __m512 uj = round_bf16_512(_mm512_mul_ps(
            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(k, ar + I + j)), sv),
            _mm512_maskz_loadu_ps(k, ws + I + j)));
        _mm512_mask_storeu_ps(g.data() + j, k, gelu_tanh_mul_512(gj, uj));
      }
#else
#pragma omp simd
      for (int64_t j = 0; j < I; ++j) {
        g[j] = round_bf16((static_cast<float>(ar[j]) * s) * ws[j]);
        u[j] = round_bf16((static_cast<float>(ar[I + j]) * s) * ws[I + j]);
      }
      gelu_tanh_mul_row(g.data(), u.data(), I);
#endif
      store_row(g.data(), od + m * I, I);
    }
  });
  return out;
}
"""

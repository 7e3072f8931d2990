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

# RMSNorm rows for bf16 models (registered beside the matmul kernel; see gemma3.rms_norm).
NORM_SOURCE = r"""
// out[t, h, :] = bf16(x[t, h, :] * rsqrt(mean(x[t, h, :]^2) + eps) * w[h % W, :]), fp32 math
at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& weight, double eps_d) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && (x.dim() == 2 || x.dim() == 3) &&
              x.stride(-1) == 1, "x bf16 [T, D] or [T, H, D] with unit last stride");
  const at::Tensor x3 = x.dim() == 2 ? x.unsqueeze(1) : x;
  const int64_t T = x3.size(0), H = x3.size(1), D = x3.size(2);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
              weight.size(-1) == D && (weight.dim() == 1 || (weight.dim() == 2 &&
              (weight.size(0) == H || weight.size(0) == 1))),
              "weight float32 [D], [1, D] or [H, D] contiguous");
  const int64_t W = weight.dim() == 1 ? 1 : weight.size(0);
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
      float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < D; ++j) ss += row[j] * row[j];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
      const float* w = wd + (h % W) * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) row[j] = row[j] * inv * w[j];
      store_row(row.data(), od + r * D, D);
    }
  });
  return x.dim() == 2 ? out.squeeze(1) : out;
}

// out[t, j] = bf16(bf16(gelu_tanh(g)) * u), g = gate_up[t, j], u = gate_up[t, I + j]: the
// roundings of F.gelu(gate) * up on bf16 tensors; 0.5 (1 + tanh y) = sigmoid(2 y).
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
#pragma omp simd
      for (int64_t j = 0; j < I; ++j) {
        const float x = g[j];
        const float y = 0.7978845608028654f * (x + 0.044715f * x * x * x);
        // 0.5 x (1 + tanh y) = x sigmoid(2 y), with exp only of non-positive arguments
        const float e = exp_nonpos(-2.0f * std::fabs(y));
        const float gelu = y >= 0.0f ? x / (1.0f + e) : x * e / (1.0f + e);
        // round gelu to bf16 (F.gelu's output), then the product in fp32
        uint32_t bits;
        std::memcpy(&bits, &gelu, sizeof(bits));
        bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
        float gelu_bf16;
        std::memcpy(&gelu_bf16, &bits, sizeof(bits));
        g[j] = gelu_bf16 * u[j];
      }
      store_row(g.data(), od + t * I, I);
    }
  });
  return out;
}
"""

"""C++ source of `swakv.write_rows`, the KV pool's row scatter (contract in
`swakv.kernels.paged_attention_src`)."""

ROWS_SOURCE = r"""
// dst[slots[i]] = src[i] for i < n: one memcpy per row. Every slot is checked before any
// row is written, so a bad slot leaves dst untouched.
void write_rows(at::Tensor dst, const at::Tensor& slots, const at::Tensor& src) {
  TORCH_CHECK(dst.dim() >= 1 && dst.is_contiguous(), "write_rows: dst [S, ...] contiguous");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.is_contiguous(),
              "write_rows: slots int64 [n] contiguous");
  TORCH_CHECK(src.scalar_type() == dst.scalar_type(), "write_rows: src and dst need one dtype");
  TORCH_CHECK(src.dim() == dst.dim() && src.size(0) == slots.size(0) &&
              src.sizes().slice(1) == dst.sizes().slice(1),
              "write_rows: src [n, ...] with dst's row shape");
  const int64_t n = slots.size(0), S = dst.size(0);
  if (n == 0) return;
  int64_t expected = 1;  // src rows must be contiguous: strides of dims 1.. as packed
  for (int64_t d = src.dim() - 1; d >= 1; --d) {
    TORCH_CHECK(src.size(d) == 1 || src.stride(d) == expected, "write_rows: src rows contiguous");
    expected *= src.size(d);
  }
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(0 <= sl[i] && sl[i] < S, "write_rows: slot ", sl[i], " outside [0, ", S, ")");
  const int64_t row_bytes = expected * static_cast<int64_t>(dst.element_size());
  const int64_t src_stride = src.stride(0) * static_cast<int64_t>(src.element_size());
  char* d = static_cast<char*>(dst.data_ptr());
  const char* s = static_cast<const char*>(src.data_ptr());
  // a thread per 256 KB or so: a decode step's few rows stay on the calling thread
  const int64_t grain = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) std::memcpy(d + sl[i] * row_bytes, s + i * src_stride, row_bytes);
  });
}
"""

// Routed-expert SwiGLU FFNs in fp32 on CPU for few rows per expert (decode). angelmed/cpu_kernels.py: when, why.
//
// A GEMM library multiplies a few rows by streaming a weight through packing and blocking built for many rows;
// here each weight row is read once, straight from memory, and dotted with all of its expert's rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

// GCC/Clang vector extension: 8 floats (one AVX2 register, two NEON ones), unaligned loads allowed.
typedef float v8 __attribute__((vector_size(32), aligned(4)));

// out[r] = w . x[r] over K for R rows (x[r] = x + r * ldx): w is read once for all R rows.
template <int R>
inline void dot_rows(const float* __restrict w, int64_t K, const float* __restrict x, int64_t ldx, float* out) {
  v8 lo[R], hi[R];  // two accumulators a row: FMA latency hides behind the other
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = v8{};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const v8 w0 = *(const v8*)(w + k), w1 = *(const v8*)(w + k + 8);
    for (int r = 0; r < R; ++r) {
      lo[r] += w0 * *(const v8*)(x + r * ldx + k);
      hi[r] += w1 * *(const v8*)(x + r * ldx + k + 8);
    }
  }
  for (int r = 0; r < R; ++r) {
    const v8 a = lo[r] + hi[r];
    float s = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
    for (int64_t t = k; t < K; ++t) s += w[t] * x[r * ldx + t];
    out[r] = s;
  }
}

// f(first, block) over `rows` rows in blocks of at most 4 (4 rows' accumulators: 8 of AVX2's 16 registers).
template <typename F>
inline void in_blocks(int64_t rows, F f) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) f(r, std::integral_constant<int, 4>{});
  switch (rows - r) {
    case 3: f(r, std::integral_constant<int, 3>{}); break;
    case 2: f(r, std::integral_constant<int, 2>{}); break;
    case 1: f(r, std::integral_constant<int, 1>{}); break;
  }
}

constexpr int64_t kRowsPerTask = 32;  // weight rows per parallel task

// Calls f(e, first_weight_row, end_weight_row) for every expert with pairs, its n weight rows split in tasks.
template <typename F>
void for_expert_rows(const std::vector<int64_t>& experts, int64_t n, F f) {
  const int64_t chunks = (n + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, (int64_t)experts.size() * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first = (t % chunks) * kRowsPerTask;
      f(experts[t / chunks], first, std::min(n, first + kRowsPerTask));
    }
  });
}

// y[p] = down[e] (silu(gate[e] x[p]) * up[e] x[p]) for the pairs p sorted by expert, counts[e] of them for e.
at::Tensor swiglu_rows(const at::Tensor& x, const at::Tensor& counts, const at::Tensor& gate, const at::Tensor& up,
                       const at::Tensor& down) {
  TORCH_CHECK(x.dim() == 2 && gate.dim() == 3 && gate.sizes() == up.sizes() && down.dim() == 3,
              "swiglu_rows: x [P, D], gate and up [E, I, D], down [E, D, I]");
  const int64_t E = gate.size(0), I = gate.size(1), D = gate.size(2), P = x.size(0);
  TORCH_CHECK(x.size(1) == D && down.size(0) == E && down.size(1) == D && down.size(2) == I,
              "swiglu_rows: shapes disagree: x ", x.sizes(), ", gate ", gate.sizes(), ", down ", down.sizes());
  for (const at::Tensor* t : {&x, &gate, &up, &down})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "swiglu_rows: wants contiguous float32 CPU tensors");
  TORCH_CHECK(counts.device().is_cpu() && counts.scalar_type() == at::kLong && counts.numel() == E,
              "swiglu_rows: counts must be E int64 on CPU");
  std::vector<int64_t> start(E + 1, 0), experts;
  const int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(c[e] >= 0, "swiglu_rows: negative count");
    start[e + 1] = start[e] + c[e];
    if (c[e]) experts.push_back(e);
  }
  TORCH_CHECK(start[E] == P, "swiglu_rows: counts sum to ", start[E], ", x has ", P, " rows");

  at::Tensor h = at::empty({P, I}, x.options()), y = at::empty({P, D}, x.options());
  const float *xp = x.data_ptr<float>(), *gp = gate.data_ptr<float>(), *upp = up.data_ptr<float>(),
              *dp = down.data_ptr<float>();
  float *hp = h.data_ptr<float>(), *yp = y.data_ptr<float>();
  for_expert_rows(experts, I, [&](int64_t e, int64_t i0, int64_t i1) {
    const int64_t rows = start[e + 1] - start[e];
    for (int64_t i = i0; i < i1; ++i)
      in_blocks(rows, [&](int64_t r, auto block) {
        constexpr int R = decltype(block)::value;
        const int64_t p = start[e] + r;
        float g[R], u[R];
        dot_rows<R>(gp + (e * I + i) * D, D, xp + p * D, D, g);
        dot_rows<R>(upp + (e * I + i) * D, D, xp + p * D, D, u);
        for (int j = 0; j < R; ++j) hp[(p + j) * I + i] = g[j] / (1.f + std::exp(-g[j])) * u[j];
      });
  });
  for_expert_rows(experts, D, [&](int64_t e, int64_t d0, int64_t d1) {
    const int64_t rows = start[e + 1] - start[e];
    for (int64_t d = d0; d < d1; ++d)
      in_blocks(rows, [&](int64_t r, auto block) {
        constexpr int R = decltype(block)::value;
        const int64_t p = start[e] + r;
        float o[R];
        dot_rows<R>(dp + (e * D + d) * I, I, hp + p * I, I, o);
        for (int j = 0; j < R; ++j) yp[(p + j) * D + d] = o[j];
      });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(angelmed_cpu, m) {
  m.def("swiglu_rows(Tensor x, Tensor counts, Tensor gate, Tensor up, Tensor down) -> Tensor", &swiglu_rows);
}

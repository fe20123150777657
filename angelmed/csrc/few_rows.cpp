// fp32 products of few rows on CPU (decode): routed-expert SwiGLU FFNs and plain linears, with fp32 weights or bf16
// ones widened to fp32 as they are loaded (exact: a bf16 is the top half of an fp32). angelmed/cpu_kernels.py:
// when, why.
//
// A GEMM library multiplies a few rows by streaming a weight through packing and blocking built for many rows;
// here each weight row is read once, straight from memory, and dotted with all of the rows it multiplies.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

// GCC/Clang vector extension: 8 floats (one AVX2 register, two NEON ones), unaligned loads allowed.
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef uint16_t v8h __attribute__((vector_size(16), aligned(2)));
typedef uint32_t v8u __attribute__((vector_size(32)));

inline v8 load8(const float* p) { return *(const v8*)p; }
inline v8 load8(const c10::BFloat16* p) {  // 8 bf16 -> 8 fp32: zero-extend, shift into the top half, reinterpret
  return (v8)(__builtin_convertvector(*(const v8h*)p, v8u) << 16);
}

// out[r] = w . x[r] over K for R rows: w is read once for all R rows.
template <int R, typename W>
inline void dot_rows(const W* __restrict w, int64_t K, const float* const* x, float* out) {
  v8 lo[R], hi[R];  // two accumulators a row: FMA latency hides behind the other
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = v8{};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const v8 w0 = load8(w + k), w1 = load8(w + k + 8);
    for (int r = 0; r < R; ++r) {
      lo[r] += w0 * *(const v8*)(x[r] + k);
      hi[r] += w1 * *(const v8*)(x[r] + k + 8);
    }
  }
  for (int r = 0; r < R; ++r) {
    const v8 a = lo[r] + hi[r];
    float s = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
    // an explicit fma: left to the compiler, the tail contracted in some instantiations and not in others
    for (int64_t t = k; t < K; ++t) s = std::fma(static_cast<float>(w[t]), x[r][t], s);
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

// out(j, w . row(j)) for the n rows j < n, in blocks of at most 4: the weight row w is read once for all of them.
template <typename W, typename Row, typename Out>
inline void dot_all(const W* w, int64_t K, int64_t n, Row row, Out out) {
  in_blocks(n, [&](int64_t r, auto block) {
    constexpr int R = decltype(block)::value;
    const float* rows[R];
    for (int j = 0; j < R; ++j) rows[j] = row(r + j);
    float o[R];
    dot_rows<R>(w, K, rows, o);
    for (int j = 0; j < R; ++j) out(r + j, o[j]);
  });
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

// Calls f with a null pointer of the weights' element type: float or c10::BFloat16.
template <typename F>
inline void with_weight_type(const at::Tensor& w, const char* op, F f) {
  if (w.scalar_type() == at::kFloat)
    f(static_cast<const float*>(nullptr));
  else if (w.scalar_type() == at::kBFloat16)
    f(static_cast<const c10::BFloat16*>(nullptr));
  else
    TORCH_CHECK(false, op, ": weights must be float32 or bfloat16, got ", w.scalar_type());
}

// what: "<op>: <tensor> must be <dtype name>"
inline void check_cpu_contiguous(const at::Tensor& t, at::ScalarType dtype, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous(), what,
              ", contiguous, on CPU; got ", t.scalar_type(), " on ", t.device(), t.is_contiguous() ? "" : ", strided");
}

// The routed experts' output, fp32: out[t] = sum_j w[t, j] * down[e] (silu(gate[e] x[t]) * up[e] x[t]) with
// e = idx[t, j], summed in j order, so that a token's result depends on its own routing only.
at::Tensor routed_experts(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& w, const at::Tensor& gate,
                          const at::Tensor& up, const at::Tensor& down) {
  TORCH_CHECK(x.dim() == 2 && idx.dim() == 2 && w.sizes() == idx.sizes() && gate.dim() == 3 &&
                  gate.sizes() == up.sizes() && down.dim() == 3,
              "routed_experts: x [T, D], idx and w [T, k], gate and up [E, I, D], down [E, D, I]");
  const int64_t E = gate.size(0), I = gate.size(1), D = gate.size(2), T = x.size(0), k = idx.size(1), P = T * k;
  TORCH_CHECK(x.size(1) == D && idx.size(0) == T && down.size(0) == E && down.size(1) == D && down.size(2) == I,
              "routed_experts: shapes disagree: x ", x.sizes(), ", idx ", idx.sizes(), ", gate ", gate.sizes(),
              ", down ", down.sizes());
  check_cpu_contiguous(x, at::kFloat, "routed_experts: x must be float32");
  check_cpu_contiguous(w, at::kFloat, "routed_experts: w must be float32");
  for (const at::Tensor* t : {&gate, &up, &down})
    check_cpu_contiguous(*t, gate.scalar_type(),
                         "routed_experts: gate, up and down must be float32 or bfloat16, one dtype");
  check_cpu_contiguous(idx, at::kLong, "routed_experts: idx must be int64");

  // the pairs (t, j) grouped by expert: pair p = t * k + j sits at slot[p]; expert e holds slots start[e]..
  const int64_t* ip = idx.data_ptr<int64_t>();
  std::vector<int64_t> start(E + 1, 0), slot(P), token(P), experts;
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(ip[p] >= 0 && ip[p] < E, "routed_experts: expert index ", ip[p], " out of range [0, ", E, ")");
    ++start[ip[p] + 1];
  }
  for (int64_t e = 0; e < E; ++e) {
    if (start[e + 1]) experts.push_back(e);
    start[e + 1] += start[e];
  }
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t p = 0; p < P; ++p) {
    slot[p] = fill[ip[p]]++;
    token[slot[p]] = p / k;
  }

  at::Tensor h = at::empty({P, I}, x.options()), y = at::empty({P, D}, x.options()), out = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float *hp = h.data_ptr<float>(), *yp = y.data_ptr<float>(), *op = out.data_ptr<float>();
  with_weight_type(gate, "routed_experts", [&](auto type) {
    using W = std::remove_const_t<std::remove_pointer_t<decltype(type)>>;
    const W *gp = gate.data_ptr<W>(), *upp = up.data_ptr<W>(), *dp = down.data_ptr<W>();
    for_expert_rows(experts, I, [&](int64_t e, int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)  // gate and up rows i together: each block of rows is loaded once for both
        in_blocks(start[e + 1] - start[e], [&](int64_t r, auto block) {
          constexpr int R = decltype(block)::value;
          const int64_t s = start[e] + r;
          const float* rows[R];
          for (int j = 0; j < R; ++j) rows[j] = xp + token[s + j] * D;
          float g[R], u[R];
          dot_rows<R>(gp + (e * I + i) * D, D, rows, g);
          dot_rows<R>(upp + (e * I + i) * D, D, rows, u);
          for (int j = 0; j < R; ++j) hp[(s + j) * I + i] = g[j] / (1.f + std::exp(-g[j])) * u[j];
        });
    });
    for_expert_rows(experts, D, [&](int64_t e, int64_t d0, int64_t d1) {
      const int64_t s = start[e], n = start[e + 1] - s;
      for (int64_t d = d0; d < d1; ++d)
        dot_all(dp + (e * D + d) * I, I, n, [&](int64_t j) { return hp + (s + j) * I; },
                [&](int64_t j, float o) { yp[(s + j) * D + d] = o; });
    });
  });
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* o = op + t * D;
      std::fill(o, o + D, 0.f);
      for (int64_t j = 0; j < k; ++j) {
        const float wt = wp[t * k + j], *yr = yp + slot[t * k + j] * D;
        for (int64_t d = 0; d < D; ++d) o[d] += wt * yr[d];
      }
    }
  });
  return out;
}

// y = x w^T in fp32 for few rows of x (w fp32 or bf16): each row of w is read once for all of them. Row t of y
// depends on x[t] only.
at::Tensor rows_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "rows_linear: x [T, K] and w [N, K], got x ", x.sizes(), ", w ", w.sizes());
  check_cpu_contiguous(x, at::kFloat, "rows_linear: x must be float32");
  check_cpu_contiguous(w, w.scalar_type(), "rows_linear: w must be float32 or bfloat16");
  const int64_t T = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({T, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  with_weight_type(w, "rows_linear", [&](auto type) {
    using W = std::remove_const_t<std::remove_pointer_t<decltype(type)>>;
    const W* wp = w.data_ptr<W>();
    at::parallel_for(0, N, kRowsPerTask, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        dot_all(wp + n * K, K, T, [&](int64_t t) { return xp + t * K; },
                [&](int64_t t, float o) { yp[t * N + n] = o; });
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(angelmed_cpu, m) {
  m.def("routed_experts(Tensor x, Tensor idx, Tensor w, Tensor gate, Tensor up, Tensor down) -> Tensor");
  m.def("rows_linear(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(angelmed_cpu, CPU, m) {
  m.impl("routed_experts", &routed_experts);
  m.impl("rows_linear", &rows_linear);
}

// CPU statistics kernel of deepstable_fastai's StatsEngine, built by torch.utils.cpp_extension on first use.
// Registers two in-place ops: torch.ops.deepstable.acc_ and torch.ops.deepstable.hist_.
// Why C++ at all: on the CPU, inductor's fused reduction of the same statistics runs 2-5x slower per element
// than this loop (bench/engine.py), and each call through torch.compile costs ~70 us of host time against ~3 us here.
// Every other device uses the torch.compile'd path in stats.py; the two are tested against each other.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <cmath>
#include <vector>

namespace {

// Raw row layout, float64: [n, mean, M2, absmax, n_near_zero, n_zero, n_nan, n_inf].
// Sums are taken around a shift (the first finite element), in float32 over blocks of 2048 elements (256 per SIMD
// lane) and then in float64, so a large mean does not cancel the variance away; the block is merged into the row
// with Chan's formula, so a module called several times in a batch gets one exact row.
template <typename T, typename Acc>
void stats_block(const T* x, int64_t n, double nz, double* row) {
  if (n <= 0) return;
  T c = 0;
  for (int64_t i = 0; i < n && i < 64; i++) if (std::isfinite(x[i])) { c = x[i]; break; }
  double s = 0, q = 0; T mx = 0, fnz = (T)nz, finf = INFINITY;
  int64_t cnz = 0, cz = 0, cnan = 0, cinf = 0;
  for (int64_t i0 = 0; i0 < n; i0 += 2048) {
    int64_t m = n - i0 < 2048 ? n - i0 : 2048;
    const T* y = x + i0;
    Acc bs = 0, bq = 0; T bmx = 0; int32_t bnz = 0, bz = 0, bnan = 0, binf = 0;
    #pragma omp simd reduction(+:bs,bq,bnz,bz) reduction(max:bmx)
    for (int64_t j = 0; j < m; j++) {
      T v = y[j], a = std::fabs(v); Acc d = (Acc)(v - c);
      bs += d; bq += d*d; bmx = a > bmx ? a : bmx;  // NaN never wins a comparison: absmax ignores NaN
      bnz += a <= fnz; bz += v == 0;
    }
    // A NaN or an Inf makes the sums non-finite (so does a square past the float range): only then count them.
    // Counting them in the loop above cost a third of its time on finite data (bench/README.md).
    if (!std::isfinite(bs + bq))
      for (int64_t j = 0; j < m; j++) { bnan += y[j] != y[j]; binf += std::fabs(y[j]) == finf; }
    s += bs; q += bq; mx = bmx > mx ? bmx : mx; cnz += bnz; cz += bz; cnan += bnan; cinf += binf;
  }
  double nb = (double)n, mb = (double)c + s/nb, m2b = q - s*s/nb, na = row[0];
  if (m2b < 0) m2b = 0;
  if (na == 0) { row[1] = mb; row[2] = m2b; row[3] = mx; }
  else {
    double N = na + nb, d = mb - row[1];
    row[1] += d*nb/N; row[2] += m2b + d*d*na*nb/N;
    row[3] = (double)mx > row[3] ? (double)mx : row[3];
  }
  row[0] += nb; row[4] += cnz; row[5] += cz; row[6] += cnan; row[7] += cinf;
}

// Counts of `x` in `nb` equal bins over [lo, hi] (outliers in the edge bins), then NaN, -Inf, +Inf.
// Blocks of 1024 that are all finite (checked with one vectorised pass: x*0 is NaN only for NaN and Inf) take a
// vectorised bin computation; the rest take the branchy loop that sorts out the non-finite values.
// The counting is a scatter: `K` copies of the counts, element j going to copy j%K, so that runs of equal bins (the
// zeros after a ReLU) do not wait on each other's store; 8 copies, unrolled, ran 40% faster than the loop before
// (4 copies, indexed by j&3): 0.42 against 0.70 ns per element (bench/README.md).
template <typename T>
void hist_block(const T* x, int64_t n, double lo, double hi, int64_t nb, int64_t* h) {
  constexpr int K = 8;
  const int64_t w = nb + 3;
  std::vector<int64_t> c(K*w, 0);  // on the heap: `nb` comes from the user
  std::vector<int32_t> idx(1024);
  const T flo = (T)lo, scale = (T)nb / ((T)hi - (T)lo), top = (T)(nb - 1);
  for (int64_t i0 = 0; i0 < n; i0 += 1024) {
    int64_t m = n - i0 < 1024 ? n - i0 : 1024;
    const T* y = x + i0;
    T z = 0;
    #pragma omp simd reduction(+:z)
    for (int64_t j = 0; j < m; j++) z += y[j]*(T)0;
    if (z == 0) {
      int32_t* ix = idx.data();
      #pragma omp simd
      for (int64_t j = 0; j < m; j++) { T t = (y[j] - flo)*scale; t = t < 0 ? 0 : t; t = t > top ? top : t; ix[j] = (int32_t)t; }
      int64_t j = 0;
      for (; j + K <= m; j += K)
        for (int k = 0; k < K; k++) c[k*w + ix[j + k]]++;
      for (; j < m; j++) c[ix[j]]++;
    } else for (int64_t j = 0; j < m; j++) {
      T v = y[j]; int64_t b;
      if (v != v) b = nb;
      else if (std::isinf(v)) b = v < 0 ? nb + 1 : nb + 2;
      else { T t = (v - flo)*scale; b = t < 0 ? 0 : (t >= (T)nb ? nb - 1 : (int64_t)t); }
      c[b]++;
    }
  }
  for (int64_t j = 0; j < w; j++) { int64_t s = 0; for (int k = 0; k < K; k++) s += c[k*w + j]; h[j] += s; }
}

// A view of `t` whose elements are dense in memory (order does not matter for statistics), as float or double.
at::Tensor dense(const at::Tensor& t) {
  at::Tensor x = t;
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) x = x.to(at::kFloat);
  if (!(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast))) x = x.contiguous();
  return x;
}

void acc_(const at::Tensor& t, at::Tensor& raw, int64_t i, double near_zero) {
  TORCH_CHECK(raw.scalar_type() == at::kDouble && raw.is_contiguous() && raw.size(1) == 8, "raw: contiguous (rows, 8) float64");
  at::Tensor x = dense(t);
  double* row = raw.data_ptr<double>() + i*8;
  if (x.scalar_type() == at::kFloat) stats_block<float, float>(x.data_ptr<float>(), x.numel(), near_zero, row);
  else stats_block<double, double>(x.data_ptr<double>(), x.numel(), near_zero, row);
}

void hist_(const at::Tensor& t, at::Tensor& h, int64_t i, double lo, double hi) {
  TORCH_CHECK(h.scalar_type() == at::kLong && h.is_contiguous() && h.size(1) > 3, "h: contiguous (rows, bins+3) int64");
  at::Tensor x = dense(t);
  int64_t nb = h.size(1) - 3;
  int64_t* row = h.data_ptr<int64_t>() + i*h.size(1);
  if (x.scalar_type() == at::kFloat) hist_block<float>(x.data_ptr<float>(), x.numel(), lo, hi, nb, row);
  else hist_block<double>(x.data_ptr<double>(), x.numel(), lo, hi, nb, row);
}

}  // namespace

TORCH_LIBRARY(deepstable, m) {
  m.def("acc_(Tensor x, Tensor(a!) raw, int i, float near_zero) -> ()");
  m.def("hist_(Tensor x, Tensor(a!) h, int i, float lo, float hi) -> ()");
}

TORCH_LIBRARY_IMPL(deepstable, CPU, m) {
  m.impl("acc_", &acc_);
  m.impl("hist_", &hist_);
}

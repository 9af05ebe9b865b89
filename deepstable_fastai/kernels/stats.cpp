// CPU statistics kernel of deepstable_fastai's StatsEngine, built by torch.utils.cpp_extension on first use.
// Registers two in-place ops: torch.ops.deepstable.acc_ and torch.ops.deepstable.hist_.
// Why C++ at all: on the CPU, inductor's fused reduction of the same statistics runs 2-5x slower per element
// than this loop (bench/engine.py), and each call through torch.compile costs ~70 us of host time against ~3 us here.
// Every other device uses the torch.compile'd path in stats.py; the two are tested against each other.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// Raw row layout, float64: [n, mean, M2, absmax, n_near_zero, n_zero, n_nan, n_inf].
// Sums are taken around a shift (the first finite element), in float64 (float32 block sums lost 3e-5 relative on
// fp16 data with outliers, and overflowed on finite values past 1e19; at one thread float64 costs 4-20% of the loop,
// bench/README.md), over blocks of 2048 elements, so a large mean does not cancel the variance away, and a
// block's sums tell whether it holds NaN or Inf; the block is merged into the row
// with Chan's formula, so a module called several times in a batch gets one exact row.

// Fold raw row `b` into raw row `row` (Chan's formula for the mean and M2 of the union).
void merge_row(double* row, const double* b) {
  double na = row[0], nb = b[0];
  if (nb == 0) return;
  if (na == 0) { row[1] = b[1]; row[2] = b[2]; row[3] = b[3]; }
  else {
    double N = na + nb, d = b[1] - row[1];
    row[1] += d*nb/N; row[2] += b[2] + d*d*na*nb/N;
    row[3] = b[3] > row[3] ? b[3] : row[3];
  }
  row[0] += nb; for (int k = 4; k < 8; k++) row[k] += b[k];
}

template <typename T>
void stats_block(const T* x, int64_t n, double nz, double* row) {
  if (n <= 0) return;
  T c = 0;
  for (int64_t i = 0; i < n && i < 64; i++) if (std::isfinite(x[i])) { c = x[i]; break; }
  double s = 0, q = 0; T mx = 0, fnz = (T)nz, finf = INFINITY;
  int64_t cnz = 0, cz = 0, cnan = 0, cinf = 0;
  for (int64_t i0 = 0; i0 < n; i0 += 2048) {
    int64_t m = n - i0 < 2048 ? n - i0 : 2048;
    const T* y = x + i0;
    double bs = 0, bq = 0; T bmx = 0; int32_t bnz = 0, bz = 0, bnan = 0, binf = 0;
    #pragma omp simd reduction(+:bs,bq,bnz,bz) reduction(max:bmx)
    for (int64_t j = 0; j < m; j++) {
      T v = y[j], a = std::fabs(v); double d = (double)v - (double)c;
      bs += d; bq += d*d; bmx = a > bmx ? a : bmx;  // NaN never wins a comparison: absmax ignores NaN
      bnz += a <= fnz; bz += v == 0;
    }
    // A NaN or an Inf makes the sums non-finite (so does a square past the float range): only then count them.
    // Counting them in the loop above cost a third of its time on finite data (bench/README.md).
    if (!std::isfinite(bs + bq))
      for (int64_t j = 0; j < m; j++) { bnan += y[j] != y[j]; binf += std::fabs(y[j]) == finf; }
    s += bs; q += bq; mx = bmx > mx ? bmx : mx; cnz += bnz; cz += bz; cnan += bnan; cinf += binf;
  }
  double nb = (double)n, m2b = q - s*s/nb;
  double b[8] = {nb, (double)c + s/nb, m2b < 0 ? 0 : m2b, (double)mx,
                  (double)cnz, (double)cz, (double)cnan, (double)cinf};
  merge_row(row, b);
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
      // written so that a NaN (a zero times an infinite scale) lands in bin 0, never at an index out of range
      for (int64_t j = 0; j < m; j++) {
        T t = (y[j] - flo)*scale; t = t >= 0 ? t : 0; t = t <= top ? t : top; ix[j] = (int32_t)t;
      }
      int64_t j = 0;
      for (; j + K <= m; j += K)
        for (int k = 0; k < K; k++) c[k*w + ix[j + k]]++;
      for (; j < m; j++) c[ix[j]]++;
    } else for (int64_t j = 0; j < m; j++) {
      T v = y[j]; int64_t b;
      if (v != v) b = nb;
      else if (std::isinf(v)) b = v < 0 ? nb + 1 : nb + 2;
      else { T t = (v - flo)*scale; b = !(t >= 0) ? 0 : (t >= (T)nb ? nb - 1 : (int64_t)t); }
      c[b]++;
    }
  }
  for (int64_t j = 0; j < w; j++) { int64_t s = 0; for (int k = 0; k < K; k++) s += c[k*w + j]; h[j] += s; }
}

// Big tensors are split into one chunk per PyTorch intra-op thread (whole 2048-element blocks), each reduced into a
// partial row (or histogram) of its own, then merged: the training around the hooks runs on every core, so a
// one-thread loop would cost `threads` times its share. Below 256K elements per thread one thread is faster.
constexpr int64_t kGrain = 1 << 18;

int64_t n_chunks(int64_t n) {
  if (at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kGrain));
}

// Run `f(offset, count, chunk)` for each of `nt` chunks of `n` elements on PyTorch's threads.
template <typename F>
void run_chunks(int64_t n, int64_t nt, const F& f) {
  int64_t len = ((n + nt - 1)/nt + 2047) / 2048 * 2048;
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; p++) if (p*len < n) f(p*len, std::min(len, n - p*len), p);
  });
}

template <typename T>
void stats(const T* x, int64_t n, double nz, double* row) {
  int64_t nt = n_chunks(n);
  if (nt == 1) { stats_block<T>(x, n, nz, row); return; }
  std::vector<double> part(nt*8, 0.);
  run_chunks(n, nt, [&](int64_t o, int64_t m, int64_t p) { stats_block<T>(x + o, m, nz, &part[p*8]); });
  for (int64_t p = 0; p < nt; p++) merge_row(row, &part[p*8]);
}

template <typename T>
void hist(const T* x, int64_t n, double lo, double hi, int64_t nb, int64_t* h) {
  int64_t nt = n_chunks(n), w = nb + 3;
  if (nt == 1) { hist_block<T>(x, n, lo, hi, nb, h); return; }
  std::vector<int64_t> part(nt*w, 0);
  run_chunks(n, nt, [&](int64_t o, int64_t m, int64_t p) { hist_block<T>(x + o, m, lo, hi, nb, &part[p*w]); });
  for (int64_t p = 0; p < nt; p++) for (int64_t j = 0; j < w; j++) h[j] += part[p*w + j];
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
  if (x.scalar_type() == at::kFloat) stats<float>(x.data_ptr<float>(), x.numel(), near_zero, row);
  else stats<double>(x.data_ptr<double>(), x.numel(), near_zero, row);
}

void hist_(const at::Tensor& t, at::Tensor& h, int64_t i, double lo, double hi) {
  TORCH_CHECK(h.scalar_type() == at::kLong && h.is_contiguous() && h.size(1) > 3, "h: contiguous (rows, bins+3) int64");
  at::Tensor x = dense(t);
  int64_t nb = h.size(1) - 3;
  int64_t* row = h.data_ptr<int64_t>() + i*h.size(1);
  if (x.scalar_type() == at::kFloat) hist<float>(x.data_ptr<float>(), x.numel(), lo, hi, nb, row);
  else hist<double>(x.data_ptr<double>(), x.numel(), lo, hi, nb, row);
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

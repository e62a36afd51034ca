// hvd_topk CPU kernel: the fused CPU implementation of selection.py's pipeline for one
// float32 tensor (update -> threshold -> candidates -> exact top-k -> residual write), in one
// call: topk_update below. Built on first use by hvd_topk/_cpu_kernel.py
// (torch.utils.cpp_extension); the torch steps in selection.py compute the same thing and are
// its reference in the tests.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <tuple>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kBlock = 2048;  // 8 KiB of floats: the block and its mask stay in L1
constexpr int64_t kMinRange = 1 << 18;  // elements per thread, at least, in topk_update's scan

inline bool is_nonfinite(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits & 0x7f800000u) == 0x7f800000u;  // exponent all ones: Inf or NaN
}

void check_vectors(std::initializer_list<torch::Tensor> tensors) {
  const int64_t n = tensors.begin()->numel();
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous() &&
                    t.dim() == 1 && t.numel() == n,
                "1-D contiguous float32 CPU tensors of one length expected");
  }
}

// f(i) for every nonzero byte mask[i], i < len, ascending: 8 bytes at a time (most words are
// zero at Top-K densities).
template <typename F>
inline void for_each_set(const uint8_t* mask, int64_t len, F f) {
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    uint64_t word;
    std::memcpy(&word, mask + i, sizeof word);
    while (word) {
      f(i + (__builtin_ctzll(word) >> 3));
      word &= word - 1;
    }
  }
  for (; i < len; ++i) {
    if (mask[i]) f(i);
  }
}

// finite(g_i) as a value: g_i, or 0 for NaN/Inf (recorded in nf). alpha * g is exactly g for
// alpha == 1, so one loop serves both.
inline float finite_or_zero(float x, uint32_t& nf) {
  const bool bad = is_nonfinite(x);
  nf |= bad;
  return bad ? 0.0f : x;
}

// The block loops below are built twice, for AVX2 and for the baseline, and the loader picks
// one for the CPU it runs on (GCC's function multi-versioning): one build serves every x86-64
// host. The same bits either way: each entry's arithmetic is the same IEEE operations in the
// same order (no FMA contraction: -ffp-contract=off in _cpu_kernel.py's flags).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HVD_TOPK_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define HVD_TOPK_CLONES
#endif

// One block of error feedback: v_i += alpha finite(g_i); mask_i = !(|v_i| <= t). Returns
// nonzero if some g_i was NaN/Inf. Branch-free, so the compiler vectorises it.
HVD_TOPK_CLONES uint32_t ef_block(float* __restrict v, const float* __restrict g, int64_t len, float a,
                         float t, uint8_t* __restrict mask) {
  uint32_t nf = 0;
  for (int64_t i = 0; i < len; ++i) {
    const float vi = v[i] + a * finite_or_zero(g[i], nf);
    v[i] = vi;
    mask[i] = !(std::fabs(vi) <= t);
  }
  return nf;
}

// One block of DGC momentum correction: u_i = finite(m u_i + alpha finite(g_i)) (an
// overflowing velocity entry is reset to 0 and reported, like a NaN/Inf g_i); v_i += u_i;
// mask_i = !(|v_i| <= t).
HVD_TOPK_CLONES uint32_t momentum_block(float* __restrict v, float* __restrict u, const float* __restrict g,
                               int64_t len, float m, float a, float t, uint8_t* __restrict mask) {
  uint32_t nf = 0;
  for (int64_t i = 0; i < len; ++i) {
    const float ui = finite_or_zero(m * u[i] + a * finite_or_zero(g[i], nf), nf);
    u[i] = ui;
    const float vi = v[i] + ui;
    v[i] = vi;
    mask[i] = !(std::fabs(vi) <= t);
  }
  return nf;
}

}  // namespace

// ------------------------------------------------------------------------------------------
// The scattered writes of a step, each a cache miss that the hardware prefetcher does not
// foresee (positions ~1/ratio apart): the lines are asked for kAhead positions early. The
// same bits as the torch ops they stand for (selection.residual_write_'s scatter_ of 0,
// exchange_core.scatter_add_'s index_add_, which adds in index order too).
namespace {

constexpr int64_t kAhead = 16;

template <typename I>
void check_positions(const I* ip, int64_t m, int64_t n) {
  for (int64_t j = 0; j < m; ++j) {
    TORCH_CHECK(ip[j] >= 0 && ip[j] < n, "position ", static_cast<int64_t>(ip[j]), " out of [0, ", n, ")");
  }
}

template <typename I>
void zero_at_impl(float* vp, float* up, const I* ip, int64_t m) {
  for (int64_t j = 0; j < m; ++j) {
    if (j + kAhead < m) {
      __builtin_prefetch(vp + ip[j + kAhead], 1);
      if (up) __builtin_prefetch(up + ip[j + kAhead], 1);
    }
    vp[ip[j]] = 0.0f;
    if (up) up[ip[j]] = 0.0f;
  }
}

template <typename I>
void add_at_impl(float* op, const I* ip, const float* xp, int64_t m) {
  for (int64_t j = 0; j < m; ++j) {
    if (j + kAhead < m) __builtin_prefetch(op + ip[j + kAhead], 1);
    op[ip[j]] += xp[j];
  }
}

void check_positions_tensor(const torch::Tensor& idx, int64_t n) {
  TORCH_CHECK(idx.device().is_cpu() && idx.dim() == 1 && idx.is_contiguous() &&
                  (idx.scalar_type() == torch::kLong || idx.scalar_type() == torch::kInt),
              "positions: a 1-D contiguous int32/int64 CPU tensor expected");
  if (idx.scalar_type() == torch::kLong) {
    check_positions(idx.data_ptr<int64_t>(), idx.numel(), n);
  } else {
    check_positions(idx.data_ptr<int32_t>(), idx.numel(), n);
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------
// The whole of error feedback's step for one tensor, in one call (compression.py's fast path):
//
//   (momentum correction, u non-empty)  u_i = finite(m u_i + alpha finite(g_i));  v_i = v_i + u_i
//   (plain error feedback, u empty)     v_i = v_i + alpha finite(g_i)
//   sent = the k largest |v_i| (ties: the lower index), ascending
//   v[sent] = 0 if zero_v;  u[sent] = 0 if zero_u (DGC momentum factor masking)
//
// The candidates come from a threshold t: the r-th largest |x| of the strided sample
// x[0], x[stride], ... of the *updated* values (computed ahead, from v, u and g), a few
// sigmas below the k-th largest (selection.py's _sample_plan picks stride and r). The scan
// keeps every entry with !(|v| <= t), with its value; if fewer than k pass, every entry is a
// candidate. Either way the exact top-k is picked among them (nth_element), so t only decides
// the speed. stride == 0: every entry is a candidate (small tensors). A non-finite v after the
// update (e + g overflowed) is set to 0 and reported.
// Returns (indices int64 (k,), v values (k,), u values before masking (k,) or empty,
//          g was finite, v was finite).
namespace {

// Candidates with their values (position, v there). Plain arrays with a count: the scan
// appends ~1.5 k of them, one per set mask byte.
struct Picked {
  explicit Picked(size_t capacity) { grow(std::max<size_t>(capacity, 64)); }

  void push(int64_t p, float v) {
    if (n == cap) grow(2 * cap);
    pos[n] = p;
    val[n] = v;
    ++n;
  }

  void grow(size_t c) {
    pos.resize(c);
    val.resize(c);
    cap = c;
  }

  size_t n = 0, cap = 0;
  std::vector<int64_t> pos;
  std::vector<float> val;
};

inline uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

float sample_threshold(const float* v, const float* u, const float* g, int64_t n, int64_t stride,
                       int64_t rank, float m, float a) {
  std::vector<float> mags;
  mags.reserve(n / stride + 1);
  uint32_t nf = 0;
  const int64_t ahead = 8 * stride;  // strided reads: prefetch (the hardware stops at pages)
  for (int64_t i = 0; i < n; i += stride) {
    if (i + ahead < n) {
      __builtin_prefetch(v + i + ahead);
      __builtin_prefetch(g + i + ahead);
      if (u) __builtin_prefetch(u + i + ahead);
    }
    const float gi = a * finite_or_zero(g[i], nf);
    const float x = u ? v[i] + finite_or_zero(m * u[i] + gi, nf) : v[i] + gi;
    mags.push_back(is_nonfinite(x) ? 0.0f : std::fabs(x));
  }
  rank = std::min<int64_t>(std::max<int64_t>(rank, 1), static_cast<int64_t>(mags.size()));
  std::nth_element(mags.begin(), mags.begin() + (rank - 1), mags.end(), std::greater<float>());
  return mags[rank - 1];
}

// The magnitude T of the k-th largest of mags (0 < k <= c) and how many equal to T are kept
// (those of lowest position). A histogram of the magnitudes' top bits (non-negative floats
// order like their bit patterns) finds the bin holding the k-th largest; only that bin goes
// through nth_element.
std::pair<uint32_t, int64_t> kth_largest(const std::vector<uint32_t>& mags, int64_t k) {
  const int64_t c = static_cast<int64_t>(mags.size());
  uint32_t lo = UINT32_MAX, hi = 0;
  for (uint32_t b : mags) {
    lo = std::min(lo, b >> 16);
    hi = std::max(hi, b >> 16);
  }
  std::vector<int64_t> hist(hi - lo + 1, 0);  // bins 1/128 of an octave wide
  for (uint32_t b : mags) ++hist[(b >> 16) - lo];
  int64_t above = 0;  // entries in bins above `bin`
  uint32_t bin = hi - lo;
  while (above + hist[bin] < k) above += hist[bin--];
  std::vector<uint32_t> band;
  band.reserve(hist[bin]);
  for (int64_t j = 0; j < c; ++j) {
    if ((mags[j] >> 16) - lo == bin) band.push_back(mags[j]);
  }
  const int64_t r = k - above;  // the r-th largest of the band is the k-th largest overall
  std::nth_element(band.begin(), band.begin() + (r - 1), band.end(), std::greater<uint32_t>());
  const uint32_t t = band[r - 1];
  int64_t greater = above;
  for (uint32_t b : band) greater += b > t;
  return {t, k - greater};
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, bool, bool> topk_update(
    torch::Tensor v, torch::Tensor u, torch::Tensor g, double momentum, double alpha, int64_t k,
    int64_t stride, int64_t rank, bool zero_v, bool zero_u) {
  const bool mom = u.numel() > 0;
  if (mom) {
    check_vectors({v, u, g});
  } else {
    check_vectors({v, g});
  }
  const int64_t n = v.numel();
  TORCH_CHECK(k >= 0 && k <= n, "k must be in [0, numel]");
  float* __restrict vp = v.data_ptr<float>();
  float* __restrict up = mom ? u.data_ptr<float>() : nullptr;
  const float* __restrict gp = g.data_ptr<float>();
  const float m = static_cast<float>(momentum);
  const float a = static_cast<float>(alpha);
  const float t = stride > 0 ? sample_threshold(vp, up, gp, n, stride, rank, m, a) : -1.0f;

  // The scan, over ranges of the tensor on torch's intra-op threads: every element is
  // independent and each range keeps its candidates in order, so joining them in range
  // order gives what one thread gives.
  const size_t expect = stride > 0 ? static_cast<size_t>(2 * rank * stride + 4096) : static_cast<size_t>(n);
  const int64_t ranges = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kMinRange));
  const int64_t per = (n / ranges + kBlock - 1) / kBlock * kBlock;
  std::vector<Picked> parts;
  parts.reserve(ranges);
  for (int64_t r = 0; r < ranges; ++r) parts.emplace_back(expect / ranges + 64);
  std::vector<uint32_t> nonfinite(ranges, 0);
  at::parallel_for(0, ranges, 1, [&](int64_t r0, int64_t r1) {
    alignas(64) uint8_t mask[kBlock];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t end = std::min(n, (r + 1) * per);
      for (int64_t start = r * per; start < end; start += kBlock) {
        const int64_t len = std::min(end - start, kBlock);
        nonfinite[r] |= mom ? momentum_block(vp + start, up + start, gp + start, len, m, a, t, mask)
                            : ef_block(vp + start, gp + start, len, a, t, mask);
        Picked& c = parts[r];
        for_each_set(mask, len, [&](int64_t i) {
          const int64_t p = start + i;
          c.push(p, vp[p]);
        });
      }
    }
  });
  Picked c = std::move(parts[0]);
  for (int64_t r = 1; r < ranges; ++r) {
    for (size_t j = 0; j < parts[r].n; ++j) c.push(parts[r].pos[j], parts[r].val[j]);
  }
  const bool g_finite = std::all_of(nonfinite.begin(), nonfinite.end(), [](uint32_t f) { return f == 0; });
  // Every non-finite v is a candidate (!(NaN <= t), !(Inf <= t)): zero them there.
  bool v_finite = true;
  for (size_t j = 0; j < c.n; ++j) {
    if (is_nonfinite(c.val[j])) {
      v_finite = false;
      c.val[j] = 0.0f;
      vp[c.pos[j]] = 0.0f;
    }
  }
  if (static_cast<int64_t>(c.n) < k) {
    // An unlucky sample: every entry is a candidate (v is already updated and finite).
    c.n = 0;
    for (int64_t j = 0; j < n; ++j) c.push(j, vp[j]);
  }

  // Keep every |x| above the k-th largest magnitude and, of those equal to it, the lowest.
  const int64_t cn = static_cast<int64_t>(c.n);
  auto idx = torch::empty({k}, torch::kLong);
  auto vals = torch::empty({k}, torch::kFloat);
  auto uvals = torch::empty({mom ? k : 0}, torch::kFloat);
  int64_t* ip = idx.data_ptr<int64_t>();
  float* op = vals.data_ptr<float>();
  float* uo = mom ? uvals.data_ptr<float>() : nullptr;
  if (k > 0) {
    std::vector<uint32_t> mags(cn);  // |x| as bits: 0x7fffffff clears the sign
    for (int64_t j = 0; j < cn; ++j) mags[j] = bits_of(c.val[j]) & 0x7fffffffu;
    uint32_t kth = 0;
    int64_t ties = cn;
    if (k < cn) std::tie(kth, ties) = kth_largest(mags, k);
    int64_t o = 0;
    for (int64_t j = 0; j < cn && o < k; ++j) {
      if (mags[j] > kth || (mags[j] == kth && ties-- > 0)) {
        ip[o] = c.pos[j];
        op[o] = c.val[j];
        ++o;
      }
    }
    TORCH_CHECK(o == k, "topk_update: selected ", o, " of ", k);
  }
  // The sent entries are ~1/ratio apart: one cache miss each (see zero_at_impl).
  if (zero_v) zero_at_impl(vp, nullptr, ip, k);
  if (mom) {  // u where sent, read (and masked) in the same touch of its cache line
    for (int64_t j = 0; j < k; ++j) {
      if (j + kAhead < k) __builtin_prefetch(up + ip[j + kAhead], 1);
      uo[j] = up[ip[j]];
      if (zero_u) up[ip[j]] = 0.0f;
    }
  }
  return {idx, vals, uvals, g_finite, v_finite};
}


// v[idx] = 0 and, if u is not empty, u[idx] = 0 (the commit: residual and velocity where sent).
void zero_at(torch::Tensor v, torch::Tensor u, torch::Tensor idx) {
  const bool both = u.numel() > 0;
  if (both) {
    check_vectors({v, u});
  } else {
    check_vectors({v});
  }
  check_positions_tensor(idx, v.numel());
  float* up = both ? u.data_ptr<float>() : nullptr;
  if (idx.scalar_type() == torch::kLong) {
    zero_at_impl(v.data_ptr<float>(), up, idx.data_ptr<int64_t>(), idx.numel());
  } else {
    zero_at_impl(v.data_ptr<float>(), up, idx.data_ptr<int32_t>(), idx.numel());
  }
}

// out[idx[j]] += x[j] for j = 0, 1, ... in order (duplicates summed in that order).
void add_at(torch::Tensor out, torch::Tensor idx, torch::Tensor x) {
  check_vectors({out});
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == 1 &&
                  x.numel() == idx.numel(),
              "add_at: values as a 1-D contiguous float32 CPU tensor of the positions' length expected");
  check_positions_tensor(idx, out.numel());
  if (idx.scalar_type() == torch::kLong) {
    add_at_impl(out.data_ptr<float>(), idx.data_ptr<int64_t>(), x.data_ptr<float>(), idx.numel());
  } else {
    add_at_impl(out.data_ptr<float>(), idx.data_ptr<int32_t>(), x.data_ptr<float>(), idx.numel());
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("topk_update", &topk_update,
        "error feedback (+ momentum correction) and the exact top-k, in place (see above)");
  m.def("zero_at", &zero_at, "v[idx] = 0 (and u[idx] = 0 if u is not empty), in place");
  m.def("add_at", &add_at, "out[idx[j]] += x[j] in order, in place");
}

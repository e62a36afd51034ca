// hvd_topk CPU kernel: error feedback's compensate + the candidate scan of Top-K, in one walk.
//
// For a float32 residual buffer `buf` and gradient `g` (1-D, contiguous, same length):
//
//   g_i'  = g_i if g_i is finite, else 0          (a NaN/Inf never enters the residual)
//   buf_i = buf_i + alpha * g_i'                   (in place)
//   candidates = { i : !(|buf_i| <= t) }           (ascending; NaN/Inf in buf are candidates)
//
// Returns (candidates int64 (min(c, cap),), c, g_all_finite). The loops over a block are
// branch-free so the compiler vectorises them; the candidate positions come from the block's
// byte mask, 8 bytes at a time (most words are zero at Top-K densities).
// Built on first use by hvd_topk/_cpu_kernel.py (torch.utils.cpp_extension); the pure-torch
// path in selection.py computes the same thing and is the reference in the tests.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <tuple>

namespace {

constexpr int64_t kBlock = 2048;  // 8 KiB of floats: the block and its mask stay in L1

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

// The ascending candidate positions, at most `cap` of them stored (all counted).
struct Candidates {
  explicit Candidates(int64_t capacity)
      : cap(std::max<int64_t>(capacity, 0)), out(torch::empty({cap}, torch::kLong)),
        o(out.data_ptr<int64_t>()) {}

  // Appends start + i for every nonzero byte mask[i], i < len: 8 bytes at a time.
  void emit(const uint8_t* mask, int64_t len, int64_t start) {
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
      uint64_t word;
      std::memcpy(&word, mask + i, sizeof word);
      while (word) {
        push(start + i + (__builtin_ctzll(word) >> 3));
        word &= word - 1;
      }
    }
    for (; i < len; ++i) {
      if (mask[i]) push(start + i);
    }
  }

  std::tuple<torch::Tensor, int64_t, bool> result(bool finite) const {
    return {out.narrow(0, 0, std::min(count, cap)), count, finite};
  }

 private:
  void push(int64_t pos) {
    if (count < cap) o[count] = pos;
    ++count;
  }
  int64_t cap;
  torch::Tensor out;
  int64_t* o;
  int64_t count = 0;
};

// Walks [0, n) in blocks: `block(start, len, mask)` updates its block, fills mask[0, len)
// with 0/1 and returns nonzero if it met a non-finite gradient entry; the candidates are
// collected from the masks. Inlined into each kernel, so its loop vectorises there.
template <typename Block>
std::tuple<torch::Tensor, int64_t, bool> scan_blocks(int64_t n, int64_t cap, Block block) {
  Candidates cands(cap);
  uint32_t nonfinite = 0;
  alignas(64) uint8_t mask[kBlock];
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(n - start, kBlock);
    nonfinite |= block(start, len, mask);
    cands.emit(mask, len, start);
  }
  return cands.result(nonfinite == 0);
}

// finite(g_i) as a value: g_i, or 0 for NaN/Inf (recorded in nf). alpha * g is exactly g for
// alpha == 1, so one loop serves both.
inline float finite_or_zero(float x, uint32_t& nf) {
  const bool bad = is_nonfinite(x);
  nf |= bad;
  return bad ? 0.0f : x;
}

std::tuple<torch::Tensor, int64_t, bool> compensate_candidates(torch::Tensor buf, torch::Tensor g,
                                                               double alpha, double threshold,
                                                               int64_t cap) {
  check_vectors({buf, g});
  float* __restrict b = buf.data_ptr<float>();
  const float* __restrict gp = g.data_ptr<float>();
  const float a = static_cast<float>(alpha);
  const float t = static_cast<float>(threshold);
  return scan_blocks(buf.numel(), cap, [=](int64_t start, int64_t len, uint8_t* mask) {
    float* __restrict bb = b + start;
    const float* __restrict gg = gp + start;
    uint32_t nf = 0;
    for (int64_t i = 0; i < len; ++i) {
      const float v = bb[i] + a * finite_or_zero(gg[i], nf);
      bb[i] = v;
      mask[i] = !(std::fabs(v) <= t);
    }
    return nf;
  });
}

// DGC momentum correction fused the same way (no Nesterov):
//   u_i = momentum * u_i + alpha * finite(g_i);   v_i = v_i + u_i;   candidates |v_i| > t.
// The same bits as u.mul_(momentum).add_(g, alpha=alpha); v.add_(u) when alpha * g is exact.
std::tuple<torch::Tensor, int64_t, bool> momentum_candidates(torch::Tensor v, torch::Tensor u,
                                                             torch::Tensor g, double momentum,
                                                             double alpha, double threshold,
                                                             int64_t cap) {
  check_vectors({v, u, g});
  float* __restrict vp = v.data_ptr<float>();
  float* __restrict up = u.data_ptr<float>();
  const float* __restrict gp = g.data_ptr<float>();
  const float m = static_cast<float>(momentum);
  const float a = static_cast<float>(alpha);
  const float t = static_cast<float>(threshold);
  return scan_blocks(v.numel(), cap, [=](int64_t start, int64_t len, uint8_t* mask) {
    float* __restrict vv = vp + start;
    float* __restrict uu = up + start;
    const float* __restrict gg = gp + start;
    uint32_t nf = 0;
    for (int64_t i = 0; i < len; ++i) {
      const float ui = m * uu[i] + a * finite_or_zero(gg[i], nf);
      uu[i] = ui;
      const float vi = vv[i] + ui;
      vv[i] = vi;
      mask[i] = !(std::fabs(vi) <= t);
    }
    return nf;
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compensate_candidates", &compensate_candidates,
        "buf += alpha * finite(g) in place; ascending indices with |buf| > t (see file header)");
  m.def("momentum_candidates", &momentum_candidates,
        "u = m u + alpha finite(g); v += u (in place); ascending indices with |v| > t");
}

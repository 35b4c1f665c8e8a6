// One DNC memory step (one write head, no masking, de-allocation or sharpening) as one C++
// pass per sample, forward and backward: the composition of dnc_addressing.py's
//   update_usage (the previous write weights as constants), content_weighting (write key),
//   allocation_weighting, write_weighting, erase_and_write, content_weighting (read keys on
//   the new memory), update_link + directional_weightings (dnc_link.h), update_precedence,
//   read_weighting, read_vectors,
// from the activated interface (strengths, gates and modes are activated by the caller).
// Python side: dnc_kernels.fused_memory_step. Values and gradients equal the reference
// composition to float rounding (tests/test_dnc_native.py).
//
// Per sample (N slots, W word size, R read heads; eps as in dnc_addressing.EPSILON):
//   psi  = prod_r (1 - free_r rw_prev_r)            u'  = (u + ww_prev - u ww_prev) psi
//   cw   = softmax(ws cos(wk, M))                   a   = allocation(eps + (1 - eps) u')
//   ww   = gw (cw + ga (a - cw))                    M'  = M (1 - ww e^T) + ww v^T
//   cr_r = softmax(rs_r cos(rk_r, M'))              L', f, b = link step (L, p, ww, rw_prev)
//   p'   = (1 - sum ww) p + ww                      rw_r = m_r0 b_r + m_r1 f_r + m_r2 cr_r
//   rv_r = rw_r M'

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "dnc_matvec.h"
#include "dnc_link.h"
#include "dnc_native.h"

namespace dnc_native {

namespace {

constexpr double kEps = 1e-6;

// Subnormal floats flushed to zero on this thread while a kernel runs (restored after):
// products of many usages (the allocation's cumulative product) fall below the normal range,
// where the CPU's arithmetic is tens of times slower. What is flushed is below 1e-38 in
// float32 (1e-308 in float64), far below the float rounding of the values it would add to.
class FlushSubnormals {
 public:
#if defined(__SSE__)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ | DAZ
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

// Content weighting of H keys over the N words of Mx: sim (H, N), weights (H, N), and the
// words' norms mn (N).
template <typename T>
void content_forward(const T* Mx, const T* keys, const T* strengths, int64_t n, int64_t w,
                     int64_t heads, T* mn, T* sim, T* weights) {
  const T eps = T(kEps);
  for (int64_t i = 0; i < n; ++i) {
    const T* Mi = Mx + i * w;
    mn[i] = std::sqrt(dot(Mi, Mi, w) + eps);
  }
  for (int64_t h = 0; h < heads; ++h) {
    const T* key = keys + h * w;
    T kk = T(0);
    for (int64_t k = 0; k < w; ++k) kk += key[k] * key[k];
    const T kn = std::sqrt(kk + eps);
    T* sh = sim + h * n;
    T* wh = weights + h * n;
    T top = -INFINITY;
    matvec(Mx, n, w, key, sh);
    for (int64_t i = 0; i < n; ++i) {
      sh[i] /= kn * mn[i] + eps;
      wh[i] = sh[i] * strengths[h];
      top = std::max(top, wh[i]);
    }
    T total = T(0);
    for (int64_t i = 0; i < n; ++i) {
      wh[i] = std::exp(wh[i] - top);
      total += wh[i];
    }
    for (int64_t i = 0; i < n; ++i) wh[i] /= total;
  }
}

// Gradients of content_forward for g_weights (H, N): adds to gM (N, W), writes gkeys (H, W)
// and gstrengths (H). scratch: N + H * N.
template <typename T>
void content_backward(const T* Mx, const T* keys, const T* strengths, const T* mn, const T* sim,
                      const T* weights, const T* gweights, int64_t n, int64_t w, int64_t heads,
                      T* gM, T* gkeys, T* gstrengths, T* scratch) {
  const T eps = T(kEps);
  T* gmn = scratch;          // (N)
  T* gdot = scratch + n;     // (H, N)
  std::fill(gmn, gmn + n, T(0));
  for (int64_t h = 0; h < heads; ++h) {
    const T* key = keys + h * w;
    T kk = T(0);
    for (int64_t k = 0; k < w; ++k) kk += key[k] * key[k];
    const T kn = std::sqrt(kk + eps);
    const T* wh = weights + h * n;
    const T* gh = gweights + h * n;
    const T* sh = sim + h * n;
    T* gd = gdot + h * n;
    T mean = T(0);
    for (int64_t i = 0; i < n; ++i) mean += gh[i] * wh[i];
    T gbeta = T(0), gkn = T(0);
    for (int64_t i = 0; i < n; ++i) {
      const T gl = wh[i] * (gh[i] - mean);
      gbeta += gl * sh[i];
      gd[i] = gl * strengths[h] / (kn * mn[i] + eps);
      const T gden = -gd[i] * sh[i];
      gmn[i] += gden * kn;
      gkn += gden * mn[i];
    }
    gstrengths[h] = gbeta;
    T* gk = gkeys + h * w;
    const T self = gkn / kn;
    for (int64_t k = 0; k < w; ++k) gk[k] = self * key[k];
  }
  // gkeys[h] += sum_i gdot[h, i] Mx[i]: four heads per pass over Mx
  vecmats_any<T, true>(gdot, heads, Mx, n, w, gkeys);
  for (int64_t i = 0; i < n; ++i) {
    const T* Mi = Mx + i * w;
    T* gMi = gM + i * w;
    const T self = gmn[i] / mn[i];
#pragma omp simd
    for (int64_t k = 0; k < w; ++k) gMi[k] += self * Mi[k];
    for (int64_t h = 0; h < heads; ++h) {
      const T g = gdot[h * n + i];
      const T* key = keys + h * w;
#pragma omp simd
      for (int64_t k = 0; k < w; ++k) gMi[k] += g * key[k];
    }
  }
}

// The usage mapped to [eps, 1] (uh, N), as the allocation sorts and multiplies it.
template <typename T>
void mapped_usage(const T* usage, int64_t n, T* uh) {
  const T eps = T(kEps);
  for (int64_t i = 0; i < n; ++i) uh[i] = eps + (T(1) - eps) * usage[i];
}

// The slots in ascending order of uh (stable: the lower index first on ties).
template <typename T>
void ascending_order(const T* uh, int64_t n, int64_t* order) {
  std::iota(order, order + n, int64_t(0));
  std::stable_sort(order, order + n, [uh](int64_t a, int64_t b) { return uh[a] < uh[b]; });
}

// The exclusive cumulative product of uh in that order (cp, N).
template <typename T>
void exclusive_products(const T* uh, const int64_t* order, int64_t n, T* cp) {
  T prod = T(1);
  for (int64_t j = 0; j < n; ++j) {
    cp[j] = prod;
    prod *= uh[order[j]];
  }
}

struct Sizes {
  int64_t n, w, reads;
};

// Each tensor's data and its stride between samples, read once per call (the kernels then
// find one sample's rows by arithmetic alone); the index tensor's are read as int64. A
// sample's entries are contiguous (check_rows); samples may lie apart.
template <typename T>
class Samples {
 public:
  explicit Samples(const std::vector<at::Tensor>& tensors) {
    for (const auto& t : tensors) {
      const bool values = t.scalar_type() == c10::CppTypeToScalarType<T>::value;
      data_.push_back(values ? t.data_ptr<T>() : nullptr);
      index_.push_back(values ? nullptr : t.data_ptr<int64_t>());
      stride_.push_back(t.size(0) > 1 ? t.stride(0) : 0);
    }
  }
  T* operator()(size_t k, int64_t b) const { return data_[k] + b * stride_[k]; }
  int64_t* index(size_t k, int64_t b) const { return index_[k] + b * stride_[k]; }

 private:
  std::vector<T*> data_;
  std::vector<int64_t*> index_;
  std::vector<int64_t> stride_;
};

template <typename T>
void forward_sample(const Samples<T>& in, const Samples<T>& out,
                    int64_t b, const Sizes& s, std::vector<T>& scratch) {
  const int64_t n = s.n, w = s.w, reads = s.reads;
  const T *M = in(0, b), *u = in(1, b), *L = in(2, b),
          *p = in(3, b), *rwp = in(4, b), *wwp = in(5, b),
          *rk = in(6, b), *rs = in(7, b), *wk = in(8, b),
          *ws = in(9, b), *e = in(10, b), *v = in(11, b),
          *fr = in(12, b), *modes = in(15, b);
  const T ga = *in(13, b), gw = *in(14, b);
  T *M2 = out(0, b), *u2 = out(1, b), *L2 = out(2, b),
    *p2 = out(3, b), *rw = out(4, b), *ww = out(5, b),
    *rv = out(6, b), *alloc = out(7, b), *psi = out(8, b),
    *cw = out(9, b), *simw = out(10, b), *mnold = out(11, b),
    *cr = out(12, b), *simr = out(13, b), *mnnew = out(14, b),
    *f = out(15, b), *bk = out(16, b);
  int64_t* order = out.index(17, b);
  T* uh = scratch.data();
  T* cp = uh + n;

  for (int64_t i = 0; i < n; ++i) {
    T keep = T(1);
    for (int64_t r = 0; r < reads; ++r) keep *= T(1) - fr[r] * rwp[r * n + i];
    psi[i] = keep;
    u2[i] = (u[i] + wwp[i] - u[i] * wwp[i]) * keep;
  }
  content_forward(M, wk, ws, n, w, int64_t(1), mnold, simw, cw);
  mapped_usage(u2, n, uh);
  ascending_order(uh, n, order);
  exclusive_products(uh, order, n, cp);
  for (int64_t j = 0; j < n; ++j) alloc[order[j]] = (T(1) - uh[order[j]]) * cp[j];
  T written = T(0);
  for (int64_t i = 0; i < n; ++i) {
    ww[i] = gw * (cw[i] + ga * (alloc[i] - cw[i]));
    written += ww[i];
  }
  for (int64_t i = 0; i < n; ++i) {
    const T* Mi = M + i * w;
    T* M2i = M2 + i * w;
    const T wi = ww[i];
#pragma omp simd
    for (int64_t k = 0; k < w; ++k) M2i[k] = Mi[k] * (T(1) - wi * e[k]) + wi * v[k];
  }
  content_forward(M2, rk, rs, n, w, reads, mnnew, simr, cr);
  link_forward_one(L, p, ww, rwp, n, reads, L2, f, bk);
  for (int64_t i = 0; i < n; ++i) p2[i] = (T(1) - written) * p[i] + ww[i];
  for (int64_t r = 0; r < reads; ++r) {
    const T mb = modes[r * 3], mf = modes[r * 3 + 1], mc = modes[r * 3 + 2];
    T* rwr = rw + r * n;
    for (int64_t i = 0; i < n; ++i)
      rwr[i] = mb * bk[r * n + i] + mf * f[r * n + i] + mc * cr[r * n + i];
  }
  vecmats_any(rw, reads, M2, n, w, rv);  // the read vectors, four heads per pass over M'
}

// The read vectors' gradients (rv_r = rw_r M') for R heads in one pass over the rows of M':
// grw_r[i] += M'_i . grv_r and gM'_i += sum_r rw_r[i] grv_r (gM' holds the incoming
// gradient), each summed in the order of matvec (rows past the last four by dot) and of a
// head-by-head update.
template <int R, typename T>
void read_vectors_backward(const T* M2, const T* rw, const T* grv, int64_t n, int64_t w,
                           T* gM2t, T* grwt) {
  using V = typename Vector<T>::type;
  constexpr int64_t lanes = sizeof(V) / sizeof(T);
  for (int64_t i = 0; i < n; ++i) {
    const T* m = M2 + i * w;
    T* g = gM2t + i * w;
    T c[R], dots[R];
    V acc[R] = {};
    for (int q = 0; q < R; ++q) c[q] = rw[q * n + i];
    int64_t k = 0;
    for (; k + lanes <= w; k += lanes) {
      const V x = load<V>(m + k);
      V gk = load<V>(g + k);
      for (int q = 0; q < R; ++q) {
        const V y = load<V>(grv + q * w + k);
        acc[q] += x * y;
        gk += c[q] * y;
      }
      store(g + k, gk);
    }
    for (int q = 0; q < R; ++q) dots[q] = lanes_sum<T>(acc[q]);
    for (; k < w; ++k) {
      T gk = g[k];
      for (int q = 0; q < R; ++q) {
        dots[q] += m[k] * grv[q * w + k];
        gk += c[q] * grv[q * w + k];
      }
      g[k] = gk;
    }
    if (i >= n - n % 4)
      for (int q = 0; q < R; ++q) dots[q] = dot(m, grv + q * w, w);
    for (int q = 0; q < R; ++q) grwt[q * n + i] += dots[q];
  }
}

template <typename T>
void backward_sample(const Samples<T>& sv, const Samples<T>& gr, const Samples<T>& go,
                     int64_t b, const Sizes& s, std::vector<T>& scratch) {
  const int64_t n = s.n, w = s.w, reads = s.reads;
  // saved: the 16 inputs, then M2, u2, rw, ww, alloc, psi, cw, simw, mnold, cr, simr, mnnew,
  // f, bk, order
  const T *M = sv(0, b), *u = sv(1, b), *L = sv(2, b),
          *p = sv(3, b), *rwp = sv(4, b), *wwp = sv(5, b),
          *rk = sv(6, b), *rs = sv(7, b), *wk = sv(8, b),
          *ws = sv(9, b), *e = sv(10, b), *v = sv(11, b),
          *fr = sv(12, b), *modes = sv(15, b);
  const T ga = *sv(13, b), gw = *sv(14, b);
  const T *M2 = sv(16, b), *u2 = sv(17, b), *rw = sv(18, b),
          *ww = sv(19, b), *alloc = sv(20, b), *psi = sv(21, b),
          *cw = sv(22, b), *simw = sv(23, b), *mnold = sv(24, b),
          *cr = sv(25, b), *simr = sv(26, b), *mnnew = sv(27, b),
          *f = sv(28, b), *bk = sv(29, b);
  const int64_t* order = sv.index(30, b);
  // incoming: gM2, gu2, gL2, gp2, grw, gww, grv, galloc
  const T *gM2 = gr(0, b), *gu2 = gr(1, b), *gL2 = gr(2, b),
          *gp2 = gr(3, b), *grw = gr(4, b), *gww_in = gr(5, b),
          *grv = gr(6, b), *galloc_in = gr(7, b);
  // outgoing: gM, gu, gL, gp, grwp, gwwp, grk, grs, gwk, gws, ge, gv, gfree, gga, ggw, gmodes
  T *gM = go(0, b), *gu = go(1, b), *gL = go(2, b),
    *gp = go(3, b), *grwp = go(4, b), *gwwp = go(5, b),
    *grk = go(6, b), *grs = go(7, b), *gwk = go(8, b),
    *gws = go(9, b), *ge = go(10, b), *gv = go(11, b),
    *gfree = go(12, b), *gga = go(13, b), *ggw = go(14, b),
    *gmodes = go(15, b);

  T* gM2t = scratch.data();             // (N, W) total gradient of M'
  T* grwt = gM2t + n * w;               // (R, N) total gradient of rw
  T* gbk = grwt + reads * n;            // (R, N)
  T* gf = gbk + reads * n;              // (R, N)
  T* gcr = gf + reads * n;              // (R, N)
  T* gwwt = gcr + reads * n;            // (N)
  T* gpl = gwwt + n;                    // (N) link's precedence gradient
  T* gwl = gpl + n;                     // (N) link's write-weight gradient
  T* gal = gwl + n;                     // (N) allocation gradient
  T* gcw = gal + n;                     // (N)
  T* gu2t = gcw + n;                    // (N)
  T* uh = gu2t + n;                     // (N)
  T* cp = uh + n;                       // (N)
  T* cscratch = cp + n;                 // (N + R N) content scratch
  T* lscratch = cscratch + n + reads * n;  // (8 N) link scratch

  // read vectors rv = rw M': up to four heads per pass over M'
  std::copy(gM2, gM2 + n * w, gM2t);
  std::copy(grw, grw + reads * n, grwt);
  in_groups_of_four(reads, [&](auto group, int64_t r) {
    read_vectors_backward<decltype(group)::value>(M2, rw + r * n, grv + r * w, n, w, gM2t,
                                                  grwt + r * n);
  });
  // read weights: the mode mixture
  for (int64_t r = 0; r < reads; ++r) {
    T sb = T(0), sf = T(0), sc = T(0);
    for (int64_t i = 0; i < n; ++i) {
      const T g = grwt[r * n + i];
      sb += g * bk[r * n + i];
      sf += g * f[r * n + i];
      sc += g * cr[r * n + i];
      gbk[r * n + i] = modes[r * 3] * g;
      gf[r * n + i] = modes[r * 3 + 1] * g;
      gcr[r * n + i] = modes[r * 3 + 2] * g;
    }
    gmodes[r * 3] = sb;
    gmodes[r * 3 + 1] = sf;
    gmodes[r * 3 + 2] = sc;
  }
  // precedence
  T written = T(0), gp2p = T(0);
  for (int64_t i = 0; i < n; ++i) {
    written += ww[i];
    gp2p += gp2[i] * p[i];
  }
  for (int64_t i = 0; i < n; ++i) {
    gp[i] = (T(1) - written) * gp2[i];
    gwwt[i] = gww_in[i] + gp2[i] - gp2p;
  }
  // link and directional reads
  link_backward_one(L, p, ww, rwp, gL2, gf, gbk, n, reads, gL, gpl, gwl, grwp, lscratch);
  for (int64_t i = 0; i < n; ++i) {
    gp[i] += gpl[i];
    gwwt[i] += gwl[i];
  }
  // read content weighting on M'
  content_backward(M2, rk, rs, mnnew, simr, cr, gcr, n, w, reads, gM2t, grk, grs, cscratch);
  // erase and write
  std::fill(ge, ge + w, T(0));
  std::fill(gv, gv + w, T(0));
  for (int64_t i = 0; i < n; ++i) {
    const T* Mi = M + i * w;
    const T* gi = gM2t + i * w;
    T* gMi = gM + i * w;
    const T wi = ww[i];
    T acc = T(0);
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < w; ++k) {
      gMi[k] = gi[k] * (T(1) - wi * e[k]);
      acc += gi[k] * (v[k] - Mi[k] * e[k]);
      ge[k] -= gi[k] * Mi[k] * wi;
      gv[k] += gi[k] * wi;
    }
    gwwt[i] += acc;
  }
  // write weights ww = gw (cw + ga (a - cw))
  T sgw = T(0), sga = T(0);
  for (int64_t i = 0; i < n; ++i) {
    const T mixed = cw[i] + ga * (alloc[i] - cw[i]);
    sgw += gwwt[i] * mixed;
    const T gmix = gw * gwwt[i];
    sga += gmix * (alloc[i] - cw[i]);
    gal[i] = ga * gmix + galloc_in[i];
    gcw[i] = (T(1) - ga) * gmix;
  }
  *ggw = sgw;
  *gga = sga;
  // allocation: a[order_j] = (1 - s_j) cp_j with s_j = uh[order_j], cp the exclusive product
  const T eps = T(kEps);
  mapped_usage(u2, n, uh);
  exclusive_products(uh, order, n, cp);
  std::copy(gu2, gu2 + n, gu2t);
  T later = T(0);  // sum over j' > j of g_cp[j'] cp[j']
  for (int64_t j = n - 1; j >= 0; --j) {
    const int64_t slot = order[j];
    const T s = uh[slot];
    const T g = gal[slot];
    T gs = -g * cp[j] + later / s;
    later += g * (T(1) - s) * cp[j];
    gu2t[slot] += (T(1) - eps) * gs;
  }
  // write content weighting on M (the erase pass wrote gM; this adds to it)
  content_backward(M, wk, ws, mnold, simw, cw, gcw, n, w, int64_t(1), gM, gwk, gws, cscratch);
  // usage (the previous write weights are constants)
  std::fill(gfree, gfree + reads, T(0));
  for (int64_t i = 0; i < n; ++i) {
    gu[i] = gu2t[i] * psi[i] * (T(1) - wwp[i]);
    gwwp[i] = T(0);
    const T gpsi = gu2t[i] * (u[i] + wwp[i] - u[i] * wwp[i]);
    for (int64_t r = 0; r < reads; ++r) {
      T others = T(1);
      for (int64_t q = 0; q < reads; ++q)
        if (q != r) others *= T(1) - fr[q] * rwp[q * n + i];
      gfree[r] -= gpsi * others * rwp[r * n + i];
      grwp[r * n + i] -= gpsi * others * fr[r];
    }
  }
}

}  // namespace

std::vector<at::Tensor> memory_step_forward(std::vector<at::Tensor> in) {
  TORCH_CHECK(in.size() == 16, "memory_step_forward: 16 inputs");
  const char* names[16] = {"memory", "usage", "link", "precedence", "read weights",
                           "write weights", "read keys", "read strengths", "write key",
                           "write strength", "erase", "write vector", "free gates",
                           "allocation gate", "write gate", "read modes"};
  const int64_t dims[16] = {3, 2, 3, 2, 3, 2, 3, 2, 2, 1, 2, 2, 2, 1, 1, 3};
  for (int i = 0; i < 16; ++i) check_rows(in[i], dims[i], names[i]);
  const int64_t batch = in[0].size(0);
  const Sizes s{in[0].size(1), in[0].size(2), in[4].size(1)};
  const auto& M = in[0];
  auto opt = M.options();
  std::vector<at::Tensor> out = {
      at::empty_like(M), at::empty_like(in[1]), at::empty_like(in[2]),
      at::empty_like(in[3]), at::empty_like(in[4]), at::empty_like(in[1]),
      at::empty({batch, s.reads, s.w}, opt), at::empty_like(in[1]),
      at::empty_like(in[1]),                                  // psi
      at::empty_like(in[1]), at::empty_like(in[1]),        // cw, simw
      at::empty_like(in[1]),                                  // mnold
      at::empty_like(in[4]), at::empty_like(in[4]),        // cr, simr
      at::empty_like(in[1]),                                  // mnnew
      at::empty_like(in[4]), at::empty_like(in[4]),        // f, bk
      at::empty({batch, s.n}, opt.dtype(at::kLong))};      // order
  AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "dnc_memory_step_forward", [&] {
    const Samples<scalar_t> ins(in), outs(out);
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      FlushSubnormals flush;
      std::vector<scalar_t> scratch(2 * s.n);
      for (int64_t b = begin; b < end; ++b) forward_sample(ins, outs, b, s, scratch);
    });
  });
  return out;
}

std::vector<at::Tensor> memory_step_backward(std::vector<at::Tensor> saved,
                                                std::vector<at::Tensor> grads,
                                                std::vector<at::Tensor> into) {
  TORCH_CHECK(saved.size() == 31 && grads.size() == 8, "memory_step_backward: 31 + 8 tensors");
  for (const auto& t : grads) check(t, t.dim(), "gradient");
  const int64_t batch = saved[0].size(0);
  const Sizes s{saved[0].size(1), saved[0].size(2), saved[4].size(1)};
  std::vector<at::Tensor> go;
  for (int i = 0; i < 16; ++i) {
    const bool given = i < static_cast<int>(into.size()) && into[i].defined();
    if (given) check_rows(into[i], saved[i].dim(), "gradient buffer");
    TORCH_CHECK(!given || into[i].sizes() == saved[i].sizes(),
                "memory_step_backward: a gradient buffer of the wrong shape");
    go.push_back(given ? into[i] : at::empty_like(saved[i]));
  }
  AT_DISPATCH_FLOATING_TYPES(saved[0].scalar_type(), "dnc_memory_step_backward", [&] {
    const Samples<scalar_t> svs(saved), grs(grads), gos(go);
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      FlushSubnormals flush;
      const int64_t n = s.n, r = s.reads;
      // backward_sample's layout: M' (N W), four (R, N), eight (N), content (N + R N),
      // link (8 N)
      std::vector<scalar_t> scratch(n * s.w + 4 * r * n + 8 * n + (n + r * n) + 8 * n);
      for (int64_t b = begin; b < end; ++b) backward_sample(svs, grs, gos, b, s, scratch);
    });
  });
  return go;
}

}  // namespace dnc_native

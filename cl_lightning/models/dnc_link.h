// The DNC's temporal-link step for one sample: the loops that dnc_link.cpp and
// dnc_memory_step.cpp share (math in dnc_link.cpp's header). The directional reads are
// matrix-vector products over the new link, each in registers (dnc_matvec.h).
#pragma once

#include <algorithm>
#include <cstdint>

#include "dnc_matvec.h"

namespace dnc_native {

// Rows i0 .. i0 + rows - 1 of the new link L' (into Lp, rows x n), from the old link L.
template <typename T>
inline void new_link_rows(const T* L, const T* p, const T* w, int64_t n, int64_t i0,
                          int64_t rows, T* Lp) {
  for (int64_t k = 0; k < rows; ++k) {
    const int64_t i = i0 + k;
    const T wi = w[i];
    const T keep = T(1) - wi;
    const T* Li = L + i * n;
    T* Lpi = Lp + k * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) Lpi[j] = (keep - w[j]) * Li[j] + wi * p[j];
    Lpi[i] = T(0);
  }
}

// Asks the CPU to bring rows i0 .. i0 + rows - 1 of an n x n matrix into cache while the
// rows before them are computed (the link matrices come from beyond the private caches).
template <typename T>
inline void prefetch_rows(const T* A, int64_t n, int64_t i0, int64_t rows) {
  constexpr int64_t line = 64 / sizeof(T);
  for (int64_t j = i0 * n; j < (i0 + rows) * n; j += line) __builtin_prefetch(A + j);
}

template <typename T>
inline void link_forward_one(const T* L, const T* p, const T* w, const T* r, int64_t n,
                             int64_t reads, T* Lp, T* f, T* b) {
  for (int64_t i = 0; i < n; i += 4) {
    if (i + 8 <= n) prefetch_rows(L, n, i + 4, 4);
    new_link_rows(L, p, w, n, i, std::min<int64_t>(4, n - i), Lp + i * n);
  }
  for (int64_t q = 0; q < reads; ++q) matvec(Lp, n, n, r + q * n, f + q * n);  // f_q = L' r_q
  vecmats_any(r, reads, Lp, n, n, b);  // b_q = r_q L', four heads per pass over L'
}

// The link's gradient for K rows i0 .. i0 + K - 1 (K <= 4), given their rows of the new
// link's total gradient in G (K x n, diagonal zeroed): writes those rows of gL, adds their
// terms to gw and gp. One pass over the columns serves the K rows, so gw and gp are read and
// written once for them.
template <int K, typename T>
inline void link_grad_rows(const T* L, const T* p, const T* w, const T* G, int64_t n,
                           int64_t i0, T* gL, T* gp, T* gw) {
  using V = typename Vector<T>::type;
  constexpr int64_t lanes = sizeof(V) / sizeof(T);
  V row[K] = {};
  T tail[K] = {};
  int64_t j = 0;
  for (; j + lanes <= n; j += lanes) {
    const V wj = load<V>(w + j), pj = load<V>(p + j);
    V gwj = load<V>(gw + j), gpj = load<V>(gp + j);
    for (int k = 0; k < K; ++k) {
      const int64_t i = i0 + k;
      const V g = load<V>(G + k * n + j), l = load<V>(L + i * n + j);
      store(gL + i * n + j, ((T(1) - w[i]) - wj) * g);
      row[k] += g * (pj - l);
      gwj -= g * l;
      gpj += g * w[i];
    }
    store(gw + j, gwj);
    store(gp + j, gpj);
  }
  for (; j < n; ++j) {
    for (int k = 0; k < K; ++k) {
      const int64_t i = i0 + k;
      const T g = G[k * n + j], l = L[i * n + j];
      gL[i * n + j] = ((T(1) - w[i]) - w[j]) * g;
      tail[k] += g * (p[j] - l);
      gw[j] -= g * l;
      gp[j] += g * w[i];
    }
  }
  for (int k = 0; k < K; ++k) gw[i0 + k] += lanes_sum<T>(row[k]) + tail[k];
}

// Rows i0 .. i0 + K - 1 of the new link's total gradient (K x n into G, diagonal zeroed):
//   G[i, j] = gL'[i, j] + sum_q gf[q, i] r[q, j] + r[q, i] gb[q, j]
// One load of r_q and gb_q serves the K rows.
template <int K, typename T>
inline void link_total_rows(const T* r, const T* gLp, const T* gf, const T* gb, int64_t n,
                            int64_t reads, int64_t i0, T* G) {
  using V = typename Vector<T>::type;
  constexpr int64_t lanes = sizeof(V) / sizeof(T);
  int64_t j = 0;
  for (; j + lanes <= n; j += lanes) {
    V g[K], h[K];
    for (int k = 0; k < K; ++k) {
      g[k] = load<V>(gLp + (i0 + k) * n + j);
      h[k] = V{};
    }
    for (int64_t q = 0; q < reads; ++q) {
      const V rq = load<V>(r + q * n + j), bq = load<V>(gb + q * n + j);
      for (int k = 0; k < K; ++k) {
        g[k] += gf[q * n + i0 + k] * rq;
        h[k] += r[q * n + i0 + k] * bq;
      }
    }
    for (int k = 0; k < K; ++k) store(G + k * n + j, g[k] + h[k]);
  }
  for (; j < n; ++j)
    for (int k = 0; k < K; ++k) {
      T g = gLp[(i0 + k) * n + j];
      for (int64_t q = 0; q < reads; ++q)
        g += gf[q * n + i0 + k] * r[q * n + j] + r[q * n + i0 + k] * gb[q * n + j];
      G[k * n + j] = g;
    }
  for (int k = 0; k < K; ++k) G[k * n + i0 + k] = T(0);  // L' has a constant zero diagonal
}

// The read weights' gradient from K rows i0 .. i0 + K - 1 of the new link (Lp, K x n):
//   gr[q, j] += sum_i gf[q, i] L'[i, j],   gr[q, i] += sum_j gb[q, j] L'[i, j]
template <int K, typename T>
inline void link_read_grad_rows(const T* Lp, const T* gf, const T* gb, int64_t n,
                                int64_t reads, int64_t i0, T* gr) {
  using V = typename Vector<T>::type;
  constexpr int64_t lanes = sizeof(V) / sizeof(T);
  for (int64_t q = 0; q < reads; ++q) {
    T* grq = gr + q * n;
    T c[K], d[K];
    for (int k = 0; k < K; ++k) c[k] = gf[q * n + i0 + k];
    int64_t j = 0;
    for (; j + lanes <= n; j += lanes) {
      V g = load<V>(grq + j);
      for (int k = 0; k < K; ++k) g += c[k] * load<V>(Lp + k * n + j);
      store(grq + j, g);
    }
    for (; j < n; ++j)
      for (int k = 0; k < K; ++k) grq[j] += c[k] * Lp[k * n + j];
    matvec(Lp, K, n, gb + q * n, d);
    for (int k = 0; k < K; ++k) grq[i0 + k] += d[k];
  }
}

// scratch: 8 * n
template <typename T>
inline void link_backward_one(const T* L, const T* p, const T* w, const T* r, const T* gLp,
                              const T* gf, const T* gb, int64_t n, int64_t reads, T* gL, T* gp,
                              T* gw, T* gr, T* scratch) {
  // four rows at a time: the new link's (again: cheaper than reading it back from memory)
  // and its total gradient's
  T* Lp = scratch;
  T* G = Lp + 4 * n;
  for (int64_t k = 0; k < n; ++k) gp[k] = gw[k] = T(0);
  for (int64_t k = 0; k < reads * n; ++k) gr[k] = T(0);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    if (i + 8 <= n) {
      prefetch_rows(L, n, i + 4, 4);
      prefetch_rows(gLp, n, i + 4, 4);
    }
    new_link_rows(L, p, w, n, i, 4, Lp);
    link_read_grad_rows<4>(Lp, gf, gb, n, reads, i, gr);
    link_total_rows<4>(r, gLp, gf, gb, n, reads, i, G);
    link_grad_rows<4>(L, p, w, G, n, i, gL, gp, gw);
  }
  for (; i < n; ++i) {
    new_link_rows(L, p, w, n, i, 1, Lp);
    link_read_grad_rows<1>(Lp, gf, gb, n, reads, i, gr);
    link_total_rows<1>(r, gLp, gf, gb, n, reads, i, G);
    link_grad_rows<1>(L, p, w, G, n, i, gL, gp, gw);
  }
}

}  // namespace dnc_native

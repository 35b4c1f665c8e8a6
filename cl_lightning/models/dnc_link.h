// The DNC's temporal-link step for one sample: the loops that dnc_link.cpp and
// dnc_memory_step.cpp share (math in dnc_link.cpp's header).
#pragma once

#include <cstdint>

namespace dnc_native {

template <typename T>
inline void link_forward_one(const T* L, const T* p, const T* w, const T* r, int64_t n,
                             int64_t reads, T* Lp, T* f, T* b) {
  for (int64_t k = 0; k < reads * n; ++k) b[k] = T(0);
  for (int64_t i = 0; i < n; ++i) {
    const T wi = w[i];
    const T keep = T(1) - wi;
    const T* Li = L + i * n;
    T* Lpi = Lp + i * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) Lpi[j] = (keep - w[j]) * Li[j] + wi * p[j];
    Lpi[i] = T(0);
    for (int64_t q = 0; q < reads; ++q) {
      const T* rq = r + q * n;
      T* bq = b + q * n;
      const T rqi = rq[i];
      T acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < n; ++j) {
        acc += rq[j] * Lpi[j];
        bq[j] += rqi * Lpi[j];
      }
      f[q * n + i] = acc;
    }
  }
}

template <typename T>
inline void link_backward_one(const T* L, const T* p, const T* w, const T* r, const T* gLp,
                              const T* gf, const T* gb, int64_t n, int64_t reads, T* gL, T* gp,
                              T* gw, T* gr, T* G, T* Lpi) {
  for (int64_t k = 0; k < n; ++k) gp[k] = gw[k] = T(0);
  for (int64_t k = 0; k < reads * n; ++k) gr[k] = T(0);
  for (int64_t i = 0; i < n; ++i) {
    const T* Li = L + i * n;
    const T* gLpi = gLp + i * n;
    const T wi = w[i];
    const T keep = T(1) - wi;
    // the new link's row again (cheaper than reading it back from memory)
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      Lpi[j] = (keep - w[j]) * Li[j] + wi * p[j];
      G[j] = gLpi[j];
    }
    Lpi[i] = T(0);
    for (int64_t q = 0; q < reads; ++q) {
      const T* rq = r + q * n;
      const T* gbq = gb + q * n;
      T* grq = gr + q * n;
      const T gfqi = gf[q * n + i];
      const T rqi = rq[i];
      T acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < n; ++j) {
        G[j] += gfqi * rq[j] + rqi * gbq[j];
        grq[j] += gfqi * Lpi[j];
        acc += gbq[j] * Lpi[j];
      }
      grq[i] += acc;
    }
    G[i] = T(0);  // the new link's diagonal is constant zero
    T* gLi = gL + i * n;
    T row = T(0);
#pragma omp simd reduction(+ : row)
    for (int64_t j = 0; j < n; ++j) {
      const T g = G[j];
      gLi[j] = (keep - w[j]) * g;
      row += g * (p[j] - Li[j]);
      gw[j] -= g * Li[j];
      gp[j] += g * wi;
    }
    gw[i] += row;
  }
}

}  // namespace dnc_native

// The DNC's temporal-link step as one pass over each N x N link matrix, forward and backward.
//
// Python side: cl_lightning/models/dnc_link_native.py (build) and dnc_kernels.py (autograd).
// Shapes (flattened over batch x write heads, M = B * Wr; every tensor contiguous):
//   link L (M, N, N), precedence p (M, N), write weights w (M, N), read weights r (M, R, N).
// Forward (the reference: dnc_addressing.update_link, then directional_weightings):
//   L'[i, j] = (1 - w[i] - w[j]) L[i, j] + w[i] p[j], with L'[i, i] = 0
//   f[q, i]  = sum_j r[q, j] L'[i, j]          (forward read: r L'^T)
//   b[q, j]  = sum_i r[q, i] L'[i, j]          (backward read: r L')
// Backward, given gL' (from the next step), gf and gb:
//   G[i, j]  = gL'[i, j] + sum_q gf[q, i] r[q, j] + r[q, i] gb[q, j]   (i != j; G[i, i] = 0)
//   gL[i, j] = (1 - w[i] - w[j]) G[i, j]
//   gw[k]    = sum_j G[k, j] (p[j] - L[k, j]) - sum_i G[i, k] L[i, k]
//   gp[j]    = sum_i G[i, j] w[i]
//   gr[q, j] = sum_i gf[q, i] L'[i, j] + sum_i gb[q, i] L'[j, i]
// Each row of L and gL' is read once and each row of gL written once (the backward pass
// recomputes each row of L' rather than reading it back); every other term is a vector of N
// (or R x N) that stays in cache. Summation order differs from the matrix products
// of the ATen path, so values agree to float rounding, not bit for bit.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <vector>

namespace {

template <typename T>
void forward_one(const T* L, const T* p, const T* w, const T* r, int64_t n, int64_t reads,
                 T* Lp, T* f, T* b) {
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
void backward_one(const T* L, const T* p, const T* w, const T* r, const T* gLp, const T* gf,
                  const T* gb, int64_t n, int64_t reads, T* gL, T* gp, T* gw, T* gr, T* G,
                  T* Lpi) {
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

void check(const torch::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "dnc_link: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == dim, "dnc_link: ", name, " must have ", dim, " dimensions");
  TORCH_CHECK(t.is_contiguous(), "dnc_link: ", name, " must be contiguous");
}

std::vector<torch::Tensor> link_read_forward(torch::Tensor L, torch::Tensor p, torch::Tensor w,
                                             torch::Tensor r) {
  check(L, 3, "link");
  check(p, 2, "precedence");
  check(w, 2, "write weights");
  check(r, 3, "read weights");
  const int64_t m = L.size(0), n = L.size(1), reads = r.size(1);
  auto Lp = torch::empty_like(L);
  auto f = torch::empty({m, reads, n}, L.options());
  auto b = torch::empty({m, reads, n}, L.options());
  AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "dnc_link_read_forward", [&] {
    const scalar_t *Ld = L.data_ptr<scalar_t>(), *pd = p.data_ptr<scalar_t>(),
                   *wd = w.data_ptr<scalar_t>(), *rd = r.data_ptr<scalar_t>();
    scalar_t *Lpd = Lp.data_ptr<scalar_t>(), *fd = f.data_ptr<scalar_t>(),
             *bd = b.data_ptr<scalar_t>();
    at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        forward_one(Ld + k * n * n, pd + k * n, wd + k * n, rd + k * reads * n, n, reads,
                    Lpd + k * n * n, fd + k * reads * n, bd + k * reads * n);
      }
    });
  });
  return {Lp, f, b};
}

std::vector<torch::Tensor> link_read_backward(torch::Tensor L, torch::Tensor p, torch::Tensor w,
                                              torch::Tensor r, torch::Tensor gLp,
                                              torch::Tensor gf, torch::Tensor gb) {
  check(L, 3, "link");
  check(p, 2, "precedence");
  check(w, 2, "write weights");
  check(r, 3, "read weights");
  check(gLp, 3, "new link gradient");
  check(gf, 3, "forward read gradient");
  check(gb, 3, "backward read gradient");
  const int64_t m = L.size(0), n = L.size(1), reads = r.size(1);
  auto gL = torch::empty_like(L);
  auto gp = torch::empty_like(p);
  auto gw = torch::empty_like(w);
  auto gr = torch::empty_like(r);
  AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "dnc_link_read_backward", [&] {
    const scalar_t *Ld = L.data_ptr<scalar_t>(), *pd = p.data_ptr<scalar_t>(),
                   *wd = w.data_ptr<scalar_t>(), *rd = r.data_ptr<scalar_t>(),
                   *gLpd = gLp.data_ptr<scalar_t>(),
                   *gfd = gf.data_ptr<scalar_t>(), *gbd = gb.data_ptr<scalar_t>();
    scalar_t *gLd = gL.data_ptr<scalar_t>(), *gpd = gp.data_ptr<scalar_t>(),
             *gwd = gw.data_ptr<scalar_t>(), *grd = gr.data_ptr<scalar_t>();
    at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> rows(2 * n);  // G and L' of the row at hand
      for (int64_t k = begin; k < end; ++k) {
        const int64_t mat = k * n * n, vec = k * n, rv = k * reads * n;
        backward_one(Ld + mat, pd + vec, wd + vec, rd + rv, gLpd + mat, gfd + rv, gbd + rv, n,
                     reads, gLd + mat, gpd + vec, gwd + vec, grd + rv, rows.data(),
                     rows.data() + n);
      }
    });
  });
  return {gL, gp, gw, gr};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("link_read_forward", &link_read_forward, "DNC link update and directional reads");
  m.def("link_read_backward", &link_read_backward, "their first-order gradients");
}

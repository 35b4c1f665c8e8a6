// The DNC's temporal-link step as one pass over each N x N link matrix, forward and backward.
//
// Python side: cl_lightning/models/dnc_native.py (build) and dnc_kernels.py (autograd).
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

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "dnc_link.h"
#include "dnc_native.h"

namespace dnc_native {

namespace {

void check_link_inputs(const at::Tensor& L, const at::Tensor& p, const at::Tensor& w,
                       const at::Tensor& r) {
  check(L, 3, "link");
  check(p, 2, "precedence");
  check(w, 2, "write weights");
  check(r, 3, "read weights");
}

}  // namespace

std::vector<at::Tensor> link_read_forward(at::Tensor L, at::Tensor p, at::Tensor w,
                                          at::Tensor r) {
  check_link_inputs(L, p, w, r);
  const int64_t m = L.size(0), n = L.size(1), reads = r.size(1);
  auto Lp = at::empty_like(L);
  auto f = at::empty({m, reads, n}, L.options());
  auto b = at::empty({m, reads, n}, L.options());
  AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "dnc_link_read_forward", [&] {
    const scalar_t *Ld = L.data_ptr<scalar_t>(), *pd = p.data_ptr<scalar_t>(),
                   *wd = w.data_ptr<scalar_t>(), *rd = r.data_ptr<scalar_t>();
    scalar_t *Lpd = Lp.data_ptr<scalar_t>(), *fd = f.data_ptr<scalar_t>(),
             *bd = b.data_ptr<scalar_t>();
    at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        link_forward_one(Ld + k * n * n, pd + k * n, wd + k * n, rd + k * reads * n, n,
                         reads, Lpd + k * n * n, fd + k * reads * n, bd + k * reads * n);
      }
    });
  });
  return {Lp, f, b};
}

std::vector<at::Tensor> link_read_backward(at::Tensor L, at::Tensor p, at::Tensor w,
                                           at::Tensor r, at::Tensor gLp, at::Tensor gf,
                                           at::Tensor gb) {
  check_link_inputs(L, p, w, r);
  check(gLp, 3, "new link gradient");
  check(gf, 3, "forward read gradient");
  check(gb, 3, "backward read gradient");
  const int64_t m = L.size(0), n = L.size(1), reads = r.size(1);
  auto gL = at::empty_like(L);
  auto gp = at::empty_like(p);
  auto gw = at::empty_like(w);
  auto gr = at::empty_like(r);
  AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "dnc_link_read_backward", [&] {
    const scalar_t *Ld = L.data_ptr<scalar_t>(), *pd = p.data_ptr<scalar_t>(),
                   *wd = w.data_ptr<scalar_t>(), *rd = r.data_ptr<scalar_t>(),
                   *gLpd = gLp.data_ptr<scalar_t>(),
                   *gfd = gf.data_ptr<scalar_t>(), *gbd = gb.data_ptr<scalar_t>();
    scalar_t *gLd = gL.data_ptr<scalar_t>(), *gpd = gp.data_ptr<scalar_t>(),
             *gwd = gw.data_ptr<scalar_t>(), *grd = gr.data_ptr<scalar_t>();
    at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(8 * n);
      for (int64_t k = begin; k < end; ++k) {
        const int64_t mat = k * n * n, vec = k * n, rv = k * reads * n;
        link_backward_one(Ld + mat, pd + vec, wd + vec, rd + rv, gLpd + mat, gfd + rv,
                          gbd + rv, n, reads, gLd + mat, gpd + vec, gwd + vec, grd + rv,
                          scratch.data());
      }
    });
  });
  return {gL, gp, gw, gr};
}

}  // namespace dnc_native

// The C++ kernels of the DNC (built by dnc_native.py), declared for the Python module.
#pragma once

#include <ATen/core/Tensor.h>  // not ATen/ATen.h: each source includes the operators it calls

#include <tuple>
#include <vector>

namespace dnc_native {

inline void check(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "dnc kernel: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == dim, "dnc kernel: ", name, " must have ", dim, " dimensions");
  TORCH_CHECK(t.is_contiguous(), "dnc kernel: ", name, " must be contiguous");
}

// As check, for a (B, ...) tensor whose samples may lie apart (a field of a wider row):
// each sample's entries contiguous, samples at any non-overlapping distance.
inline void check_rows(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "dnc kernel: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == dim, "dnc kernel: ", name, " must have ", dim, " dimensions");
  int64_t inner = 1;
  for (int64_t d = dim - 1; d >= 1; --d) {
    TORCH_CHECK(t.size(d) == 1 || t.stride(d) == inner, "dnc kernel: ", name,
                " must have each sample's entries contiguous");
    inner *= t.size(d);
  }
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) >= inner, "dnc kernel: ", name,
              " must not overlap between samples");
}

std::vector<at::Tensor> link_read_forward(at::Tensor L, at::Tensor p, at::Tensor w,
                                             at::Tensor r);
std::vector<at::Tensor> link_read_backward(at::Tensor L, at::Tensor p, at::Tensor w,
                                              at::Tensor r, at::Tensor gLp,
                                              at::Tensor gf, at::Tensor gb);
std::vector<at::Tensor> memory_step_forward(std::vector<at::Tensor> inputs);
// `into`: tensors to write the gradients into, by position (undefined or missing: new ones)
std::vector<at::Tensor> memory_step_backward(std::vector<at::Tensor> saved,
                                                std::vector<at::Tensor> grads,
                                                std::vector<at::Tensor> into = {});
// The interface's gradient through its activations and clamp, in place in g_raw (which
// holds the memory step's gradients of the fields): the time step backward's pass.
void interface_activations_backward_(at::Tensor raw, at::Tensor softplus_grad,
                                     at::Tensor sig, at::Tensor modes,
                                     at::Tensor g_modes_memory,
                                     at::Tensor g_modes_diagnostic, double clip,
                                     at::Tensor g_raw);
// The LSTM cell's backward from its activations (i, f, o, g), cell, tanh of the new cell
// and the new h's and cell's gradients: the gates' and the old cell's gradients.
std::vector<at::Tensor> lstm_cell_backward(at::Tensor act, at::Tensor c, at::Tensor tc,
                                           at::Tensor g_h2, at::Tensor g_c2);
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> time_step_forward(
    std::vector<at::Tensor> inputs, double clip, bool oneplus);
// `weight_grads`: W_rec's, W_if's and b_if's gradients so far, which this step's add to in
// place and returns (empty or undefined: new ones)
std::vector<at::Tensor> time_step_backward(std::vector<at::Tensor> saved,
                                           std::vector<at::Tensor> grads, double clip,
                                           std::vector<at::Tensor> into = {},
                                           std::vector<at::Tensor> weight_grads = {});
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sequence_forward(
    at::Tensor x_gates, std::vector<at::Tensor> state, std::vector<at::Tensor> weights,
    double clip, bool oneplus, bool keep);
std::vector<at::Tensor> sequence_backward(std::vector<at::Tensor> saved,
                                          at::Tensor g_features,
                                          std::vector<at::Tensor> g_state, double clip);

}  // namespace dnc_native

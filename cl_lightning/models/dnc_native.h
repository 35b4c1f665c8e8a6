// The C++ kernels of the DNC (built by dnc_native.py), declared for the Python module.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace dnc_native {

inline void check(const torch::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "dnc kernel: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == dim, "dnc kernel: ", name, " must have ", dim, " dimensions");
  TORCH_CHECK(t.is_contiguous(), "dnc kernel: ", name, " must be contiguous");
}

std::vector<torch::Tensor> link_read_forward(torch::Tensor L, torch::Tensor p, torch::Tensor w,
                                             torch::Tensor r);
std::vector<torch::Tensor> link_read_backward(torch::Tensor L, torch::Tensor p, torch::Tensor w,
                                              torch::Tensor r, torch::Tensor gLp,
                                              torch::Tensor gf, torch::Tensor gb);
std::vector<torch::Tensor> memory_step_forward(std::vector<torch::Tensor> inputs);
std::vector<torch::Tensor> memory_step_backward(std::vector<torch::Tensor> saved,
                                                std::vector<torch::Tensor> grads);

}  // namespace dnc_native

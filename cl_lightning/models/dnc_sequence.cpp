// The DNC's time steps over a whole input sequence as one C++ call forward and one backward
// (the steps of dnc_time_step.cpp in a loop): no Python and no autograd node between steps,
// and the weights' gradients summed here. Python side: dnc_kernels.fused_sequence.
//
// State, in and out, in the time step's argument order: h, c, read vectors, memory, usage,
// link, precedence, read weights, write weights (one write head). The outputs start with
// the features the DNC's output layer reads, [h_t | read vectors_t] for every step t.
// Without `keep` (no gradient wanted) each step's intermediates are freed at once, so the
// next step reuses their memory while it is still in cache.

#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <tuple>
#include <vector>

#include "dnc_native.h"

namespace dnc_native {

namespace {

constexpr int kState = 9, kSaved = 40;

// The time step's outputs that become the next step's state, by state position:
// h', c', read vectors, memory, usage, link, precedence, read weights, write weights.
constexpr int kNextState[kState] = {0, 1, 8, 2, 3, 4, 5, 6, 7};

}  // namespace

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sequence_forward(
    at::Tensor x_gates, std::vector<at::Tensor> state, std::vector<at::Tensor> weights,
    double clip, bool oneplus, bool keep) {
  TORCH_CHECK(x_gates.dim() == 3 && state.size() == kState && weights.size() == 3,
              "sequence_forward: x_gates (B, T, 4H), 9 state tensors, 3 weights");
  const int64_t batch = x_gates.size(0), steps = x_gates.size(1);
  std::vector<at::Tensor> in(1 + kState + 3), hs, reads, saved;
  for (int k = 0; k < kState; ++k) in[1 + k] = state[k];
  for (int k = 0; k < 3; ++k) in[1 + kState + k] = weights[k];
  if (keep) saved.reserve(kSaved * steps);
  for (int64_t t = 0; t < steps; ++t) {
    in[0] = x_gates.select(1, t);
    auto [out, step_saved] = time_step_forward(in, clip, oneplus);
    for (int k = 0; k < kState; ++k) in[1 + k] = out[kNextState[k]];
    hs.push_back(out[0]);
    reads.push_back(out[8].reshape({batch, -1}));
    if (keep) saved.insert(saved.end(), step_saved.begin(), step_saved.end());
  }
  std::vector<at::Tensor> outputs = {at::cat({at::stack(hs, 1), at::stack(reads, 1)}, 2)};
  outputs.insert(outputs.end(), in.begin() + 1, in.begin() + 1 + kState);
  return {outputs, saved};
}

std::vector<at::Tensor> sequence_backward(std::vector<at::Tensor> saved,
                                          at::Tensor g_features,
                                          std::vector<at::Tensor> g_state, double clip) {
  const int64_t steps = g_features.size(1);
  TORCH_CHECK(steps > 0 && saved.size() == static_cast<size_t>(kSaved * steps) &&
                  g_state.size() == kState,
              "sequence_backward: 40 saved tensors a step, 9 state gradients");
  const at::Tensor &tc = saved[34], &read_keys = saved[6], &usage = saved[1],
                   &modes = saved[15];
  const int64_t batch = tc.size(0), hidden = tc.size(1), reads = read_keys.size(1),
                word = read_keys.size(2);
  // the time step's output gradients: the state's (carried from the later step), then
  // the allocation and the diagnostics, which nothing downstream reads: zero
  std::vector<at::Tensor> grads(14);
  for (int k = 0; k < kState; ++k) grads[kNextState[k]] = g_state[k];
  grads[9] = at::zeros_like(usage);
  grads[10] = at::zeros({batch}, usage.options());
  grads[11] = grads[10];
  grads[12] = at::zeros({batch, reads}, usage.options());
  grads[13] = at::zeros_like(modes);
  const auto no_write_grad = at::zeros_like(usage);  // previous writes: a constant
  // The memory's and the link's gradients of the steps go to two buffers in turn: each step
  // reads the one its later step wrote and writes the other (new tensors at every step would
  // be new memory, which the system maps in again page by page).
  std::vector<at::Tensor> into[2];
  for (auto& buffers : into) buffers = {at::empty_like(saved[0]), {}, at::empty_like(saved[2])};
  std::vector<at::Tensor> g_x(steps), g_weights(3);
  for (int64_t t = steps - 1; t >= 0; --t) {
    auto g_out = g_features.select(1, t);
    grads[0] = grads[0] + g_out.narrow(1, 0, hidden);
    grads[8] = grads[8] + g_out.narrow(1, hidden, reads * word).reshape({batch, reads, word});
    for (auto& g : grads) g = g.contiguous();
    std::vector<at::Tensor> step_saved(saved.begin() + kSaved * t,
                                       saved.begin() + kSaved * (t + 1));
    auto g = time_step_backward(step_saved, grads, clip, into[t % 2], g_weights);
    // g: x_gates, h, c, read vectors, memory, usage, link, precedence, read weights,
    // (write weights), W_rec, W_if, b_if
    g_x[t] = g[0];
    for (int k = 0; k < kState - 1; ++k) grads[kNextState[k]] = g[1 + k];
    grads[7] = no_write_grad;
    for (int k = 0; k < 3; ++k) g_weights[k] = g[10 + k];  // the sums so far
  }
  std::vector<at::Tensor> result = {at::stack(g_x, 1)};
  for (int k = 0; k < kState - 1; ++k) result.push_back(grads[kNextState[k]]);
  result.push_back(at::Tensor());  // the first write weights: a constant
  result.insert(result.end(), g_weights.begin(), g_weights.end());
  return result;
}

}  // namespace dnc_native

// One whole DNC time step (one write head) as one C++ call forward and one backward: the LSTM
// controller, the interface layer and its activations, then the memory step of
// dnc_memory_step.cpp. The composition of dnc.py's lstm_cell, the interface Linear, the
// clamp to +-clip, InterfaceLayout.parse and dnc_kernels._memory_step_reference.
// Python side: dnc_kernels.fused_time_step. The batch-wide parts (matrix products,
// activations) are ATen calls, without the per-operation cost of Python and autograd.
//
//   rin = [r_prev | h_prev]                 gates = x_gates + rin W_rec^T
//   i, f, o = sigmoid(gates[:3H])           g = tanh(gates[3H:])
//   c' = f c + i g                           h' = o tanh(c')
//   raw = clamp(h' W_if^T + b_if, -clip, clip)          (clip 0: no clamp)
//   raw = [read keys R W | write key W | write vector W | strengths R + 1 |
//          erase W, free gates R, allocation gate, write gate | read modes R x 3]
//   strengths: softplus (+ 1 for oneplus); gates and erase: sigmoid; modes: softmax of 3

#include <ATen/TensorOperators.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/softplus.h>
#include <ATen/ops/tanh.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "dnc_native.h"

namespace dnc_native {

namespace {

struct Layout {
  int64_t batch, hidden, reads, word;
  int64_t keys() const { return reads * word; }
  int64_t strengths() const { return keys() + 2 * word; }  // offset of the strengths
  int64_t sigmoids() const { return strengths() + reads + 1; }
  int64_t modes() const { return sigmoids() + word + reads + 2; }
  int64_t size() const { return modes() + 3 * reads; }
};

Layout layout_of(const at::Tensor& h, const at::Tensor& read_vectors) {
  return {h.size(0), h.size(1), read_vectors.size(1), read_vectors.size(2)};
}

// The LSTM cell's backward, element by element in one pass, from the activations act
// (B, 4H: i, f, o sigmoids, g tanh), the cell c, tanh(c') tc, and the gradients of h' and
// c' (g_h2, g_c2_in): the gates' gradients (B, 4H) and the previous cell's (B, H).
//   g_c2 = g_c2_in + g_h2 o (1 - tc^2)
//   g_i = g_c2 g i (1 - i)    g_f = g_c2 c f (1 - f)    g_o = g_h2 tc o (1 - o)
//   g_g = g_c2 i (1 - g^2)    g_c = g_c2 f
// Every product and difference is rounded on its own, in the order of the ATen expressions
// this pass replaced (no fused multiply-add), so its values equal theirs bit for bit.
template <typename T>
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void lstm_backward(const T* act, const T* c, const T* tc, const T* g_h2, const T* g_c2_in,
                   int64_t batch, int64_t H, T* g_gates, T* g_c) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  for (int64_t b = 0; b < batch; ++b) {
    const T* a = act + b * 4 * H;
    T* gg = g_gates + b * 4 * H;
    for (int64_t j = 0; j < H; ++j) {
      const int64_t k = b * H + j;
      const T i = a[j], f = a[H + j], o = a[2 * H + j], g = a[3 * H + j], t = tc[k];
      const T g_c2 = g_c2_in[k] + g_h2[k] * o * (T(1) - t * t);
      gg[j] = g_c2 * g * (i * (T(1) - i));
      gg[H + j] = g_c2 * c[k] * (f * (T(1) - f));
      gg[2 * H + j] = g_h2[k] * t * (o * (T(1) - o));
      gg[3 * H + j] = g_c2 * i * (T(1) - g * g);
      g_c[k] = g_c2 * f;
    }
  }
}

// The interface's gradient after the memory step has written its fields' parts into g_raw
// (B, F), in one pass per sample: through the activations (strengths' softplus, given its
// derivative sp; the gates' and erase's sigmoids sig; the read modes' softmax, from the
// memory step's and the diagnostics' gradients of the modes) and the clamp to +-clip (clip
// 0: none). Rounded as the ATen expressions this pass replaced, like lstm_backward:
//   g_strength *= sp      g_gate *= s (1 - s)      g_clamped *= (|raw| <= clip)
//   g_mode_k = m_k (gm_k - sum_k' gm_k' m_k'),  gm = gm_memory + gm_diagnostic
template <typename T>
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void interface_backward(const Layout& s, const T* raw, const T* sp, const T* sig,
                        const T* modes, const T* gm_memory, const T* gm_diagnostic,
                        double clip, T* g_raw) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  const int64_t F = s.size(), gates = s.word + s.reads + 2, R = s.reads;
  const T limit = static_cast<T>(clip);
  for (int64_t b = 0; b < s.batch; ++b) {
    T* g = g_raw + b * F;
    const T* x = raw + b * F;
    for (int64_t k = 0; k <= R; ++k) g[s.strengths() + k] *= sp[b * (R + 1) + k];
    for (int64_t k = 0; k < gates; ++k) {
      const T y = sig[b * gates + k];
      g[s.sigmoids() + k] *= y * (T(1) - y);
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t o = (b * R + r) * 3;
      const T* m = modes + o;
      const T gm[3] = {gm_memory[o] + gm_diagnostic[o], gm_memory[o + 1] + gm_diagnostic[o + 1],
                       gm_memory[o + 2] + gm_diagnostic[o + 2]};
      const T dot = gm[0] * m[0] + gm[1] * m[1] + gm[2] * m[2];
      for (int k = 0; k < 3; ++k) g[s.modes() + 3 * r + k] = m[k] * (gm[k] - dot);
    }
    if (clip > 0)
      for (int64_t k = 0; k < F; ++k) g[k] *= T(std::abs(x[k]) <= limit);
  }
}

}  // namespace

void interface_activations_backward_(at::Tensor raw, at::Tensor softplus_grad,
                                     at::Tensor sig, at::Tensor modes,
                                     at::Tensor g_modes_memory,
                                     at::Tensor g_modes_diagnostic, double clip,
                                     at::Tensor g_raw) {
  for (const auto& t : {raw, softplus_grad, sig, g_raw}) check(t, 2, "interface tensor");
  for (const auto& t : {modes, g_modes_memory, g_modes_diagnostic}) check(t, 3, "read modes");
  const int64_t reads = modes.size(1), F = raw.size(1);
  // F = R W + 2 W (keys, write key and vector) + R + 1 + W + R + 2 + 3 R
  const Layout s{raw.size(0), 0, reads, (F - 5 * reads - 3) / (reads + 3)};
  TORCH_CHECK(s.size() == F && g_raw.sizes() == raw.sizes() &&
                  softplus_grad.size(1) == reads + 1 && sig.size(1) == s.word + reads + 2,
              "interface_activations_backward: shapes of one interface layout");
  AT_DISPATCH_FLOATING_TYPES(raw.scalar_type(), "dnc_interface_backward", [&] {
    interface_backward<scalar_t>(s, raw.data_ptr<scalar_t>(), softplus_grad.data_ptr<scalar_t>(),
                                 sig.data_ptr<scalar_t>(), modes.data_ptr<scalar_t>(),
                                 g_modes_memory.data_ptr<scalar_t>(),
                                 g_modes_diagnostic.data_ptr<scalar_t>(), clip,
                                 g_raw.data_ptr<scalar_t>());
  });
}

std::vector<at::Tensor> lstm_cell_backward(at::Tensor act, at::Tensor c, at::Tensor tc,
                                           at::Tensor g_h2, at::Tensor g_c2) {
  check(act, 2, "activations");
  for (const auto& t : {c, tc, g_h2, g_c2}) check(t, 2, "cell tensor");
  const int64_t H = tc.size(1);
  TORCH_CHECK(act.size(1) == 4 * H, "lstm_cell_backward: activations (B, 4H)");
  auto g_gates = at::empty_like(act), g_c = at::empty_like(tc);
  AT_DISPATCH_FLOATING_TYPES(act.scalar_type(), "dnc_lstm_backward", [&] {
    lstm_backward<scalar_t>(act.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(),
                            tc.data_ptr<scalar_t>(), g_h2.data_ptr<scalar_t>(),
                            g_c2.data_ptr<scalar_t>(), act.size(0), H,
                            g_gates.data_ptr<scalar_t>(), g_c.data_ptr<scalar_t>());
  });
  return {g_gates, g_c};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> time_step_forward(
    std::vector<at::Tensor> in, double clip, bool oneplus) {
  TORCH_CHECK(in.size() == 13, "time_step_forward: 13 inputs");
  const at::Tensor &x_gates = in[0], &h = in[1], &c = in[2], &read_vectors = in[3],
                   &w_rec = in[10], &w_if = in[11], &b_if = in[12];
  const Layout s = layout_of(h, read_vectors);
  TORCH_CHECK(w_if.size(0) == s.size(), "time_step_forward: interface size ", w_if.size(0),
              ", expected ", s.size());
  const int64_t H = s.hidden;

  auto rin = at::cat({read_vectors.reshape({s.batch, s.keys()}), h}, 1);
  auto gates = at::addmm(x_gates, rin, w_rec.t());
  auto act = at::empty_like(gates);  // [i, f, o, g]
  auto act_sig = act.narrow(1, 0, 3 * H), act_cell = act.narrow(1, 3 * H, H);
  at::sigmoid_out(act_sig, gates.narrow(1, 0, 3 * H));
  at::tanh_out(act_cell, gates.narrow(1, 3 * H, H));
  auto c2 = at::addcmul(act.narrow(1, H, H) * c, act.narrow(1, 0, H), act_cell);
  auto tc = at::tanh(c2);
  auto h2 = act.narrow(1, 2 * H, H) * tc;
  auto raw = at::addmm(b_if, h2, w_if.t());
  auto field = clip > 0 ? raw.clamp(-clip, clip) : raw;

  auto strengths = at::softplus(field.narrow(1, s.strengths(), s.reads + 1));
  if (oneplus) strengths.add_(1.0);
  auto sig = at::sigmoid(field.narrow(1, s.sigmoids(), s.word + s.reads + 2));
  auto modes = at::softmax(field.narrow(1, s.modes(), 3 * s.reads).reshape({s.batch, s.reads, 3}),
                           -1);
  std::vector<at::Tensor> memory_in = {
      in[4], in[5], in[6], in[7], in[8], in[9],
      field.narrow(1, 0, s.keys()).reshape({s.batch, s.reads, s.word}),  // read keys
      strengths.narrow(1, 0, s.reads),                                    // read strengths
      field.narrow(1, s.keys(), s.word),                                  // write key
      strengths.select(1, s.reads),                                       // write strength
      sig.narrow(1, 0, s.word),                                           // erase
      field.narrow(1, s.keys() + s.word, s.word),                         // write vector
      sig.narrow(1, s.word, s.reads),                                     // free gates
      sig.select(1, s.word + s.reads),                                    // allocation gate
      sig.select(1, s.word + s.reads + 1),                                // write gate
      modes};
  // the fields are views of the interface's rows: the memory step reads them in place
  auto out = memory_step_forward(memory_in);

  // h', c', memory, usage, link, precedence, read weights, write weights, read vectors,
  // allocation, then the diagnostics: allocation gate, write gate, free gates, read modes
  std::vector<at::Tensor> outputs = {h2, c2, out[0], out[1], out[2], out[3], out[4], out[5],
                                     out[6], out[7], memory_in[13], memory_in[14],
                                     memory_in[12], memory_in[15]};
  // what the backward pass reads: the memory step's 31 tensors, then the controller's
  std::vector<at::Tensor> saved(memory_in.begin(), memory_in.end());
  for (int k : {0, 1, 4, 5}) saved.push_back(out[k]);
  saved.insert(saved.end(), out.begin() + 7, out.end());
  for (const auto& t : {rin, act, c, tc, h2, raw, w_rec, w_if, sig}) saved.push_back(t);
  return {outputs, saved};
}

std::vector<at::Tensor> time_step_backward(std::vector<at::Tensor> saved,
                                           std::vector<at::Tensor> grads, double clip,
                                           std::vector<at::Tensor> into,
                                           std::vector<at::Tensor> weight_grads) {
  TORCH_CHECK(saved.size() == 40 && grads.size() == 14, "time_step_backward: 40 + 14 tensors");
  const at::Tensor &rin = saved[31], &act = saved[32], &c = saved[33], &tc = saved[34],
                   &h2 = saved[35], &raw = saved[36], &w_rec = saved[37], &w_if = saved[38],
                   &sig = saved[39];
  const at::Tensor& modes = saved[15];
  const int64_t H = tc.size(1);
  const Layout s{tc.size(0), H, saved[6].size(1), saved[6].size(2)};

  // the interface's gradient: the memory step writes its fields' parts in place (the
  // fields' views of the interface's rows, as in the forward), the modes' part below
  auto g_raw = at::empty_like(raw);
  auto g_strengths = g_raw.narrow(1, s.strengths(), s.reads + 1);
  auto g_sig = g_raw.narrow(1, s.sigmoids(), s.word + s.reads + 2);
  std::vector<at::Tensor> g_into(into.begin(), into.end());
  g_into.resize(15);
  g_into[6] = g_raw.narrow(1, 0, s.keys()).view({s.batch, s.reads, s.word});
  g_into[7] = g_strengths.narrow(1, 0, s.reads);
  g_into[8] = g_raw.narrow(1, s.keys(), s.word);
  g_into[9] = g_strengths.select(1, s.reads);
  g_into[10] = g_sig.narrow(1, 0, s.word);
  g_into[11] = g_raw.narrow(1, s.keys() + s.word, s.word);
  g_into[12] = g_sig.narrow(1, s.word, s.reads);
  g_into[13] = g_sig.select(1, s.word + s.reads);
  g_into[14] = g_sig.select(1, s.word + s.reads + 1);
  std::vector<at::Tensor> memory_saved(saved.begin(), saved.begin() + 31);
  std::vector<at::Tensor> memory_grads(grads.begin() + 2, grads.begin() + 10);
  auto g = memory_step_backward(memory_saved, memory_grads, g_into);
  // g: memory, usage, link, precedence, read weights, (write weights), read keys, read
  // strengths, write key, write strength, erase, write vector, free gates, allocation gate,
  // write gate, read modes; the diagnostics' gradients join their fields'
  g[12].add_(grads[12]);
  g[13].add_(grads[10]);
  g[14].add_(grads[11]);
  // softplus' = sigmoid of the pre-activation (oneplus adds a constant: the same)
  auto pre = raw.narrow(1, s.strengths(), s.reads + 1);
  if (clip > 0) pre = pre.clamp(-clip, clip);
  interface_activations_backward_(raw, at::sigmoid(pre).contiguous(), sig, modes.contiguous(),
                                  g[15].contiguous(), grads[13].contiguous(), clip, g_raw);

  // the sequence's weight gradients: each step's product, then added to the later steps'
  // sum, as autograd adds the steps' gradients (an addmm_ may round the sum inside the
  // product, differently on different CPUs' BLAS)
  const bool accumulate = weight_grads.size() == 3 && weight_grads[0].defined();
  auto g_h2 = at::addmm(grads[0], g_raw, w_if);
  auto g_w_if = at::mm(g_raw.t(), h2);
  if (accumulate) g_w_if = weight_grads[1].add_(g_w_if);
  auto g_b_if = accumulate ? weight_grads[2].add_(g_raw.sum(0)) : g_raw.sum(0);
  auto cell = lstm_cell_backward(act, c.contiguous(), tc, g_h2, grads[1].contiguous());
  const auto &g_gates = cell[0], &g_c = cell[1];
  auto g_rin = at::mm(g_gates, w_rec);
  auto g_w_rec = at::mm(g_gates.t(), rin);
  if (accumulate) g_w_rec = weight_grads[0].add_(g_w_rec);
  // x_gates, h, c, read vectors, memory, usage, link, precedence, read weights, write
  // weights (a constant: no gradient), W_rec, W_if, b_if
  return {g_gates,
          g_rin.narrow(1, s.keys(), H),
          g_c,
          g_rin.narrow(1, 0, s.keys()).reshape({s.batch, s.reads, s.word}),
          g[0], g[1], g[2], g[3], g[4], at::Tensor(), g_w_rec, g_w_if, g_b_if};
}

}  // namespace dnc_native

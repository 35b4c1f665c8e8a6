// The Python module of the DNC's C++ kernels (built by dnc_native.py).
#include <torch/csrc/utils/pybind.h>  // lighter than torch/extension.h: tensors only
#include <pybind11/stl.h>

#include "dnc_native.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("link_read_forward", &dnc_native::link_read_forward,
        "DNC link update and directional reads");
  m.def("link_read_backward", &dnc_native::link_read_backward, "their first-order gradients");
  m.def("memory_step_forward", &dnc_native::memory_step_forward,
        "one DNC memory step (one write head), forward");
  m.def("memory_step_backward",
        [](std::vector<at::Tensor> saved, std::vector<at::Tensor> grads) {
          return dnc_native::memory_step_backward(saved, grads);
        },
        "its first-order gradients");
  m.def("interface_activations_backward",
        [](at::Tensor raw, at::Tensor sp, at::Tensor sig, at::Tensor modes, at::Tensor gm,
           at::Tensor gd, double clip, at::Tensor g_raw) {
          auto out = g_raw.clone();
          dnc_native::interface_activations_backward_(raw, sp, sig, modes, gm, gd, clip, out);
          return out;
        },
        "the interface's gradient through its activations and clamp (time step backward)");
  m.def("lstm_cell_backward", &dnc_native::lstm_cell_backward,
        "the LSTM cell's pointwise backward (gates' and old cell's gradients)");
  m.def("time_step_forward", &dnc_native::time_step_forward,
        "one whole DNC time step (controller, interface, memory), forward");
  m.def("time_step_backward",
        [](std::vector<at::Tensor> saved, std::vector<at::Tensor> grads, double clip) {
          return dnc_native::time_step_backward(saved, grads, clip);
        },
        "its first-order gradients");
  m.def("sequence_forward", &dnc_native::sequence_forward,
        "the DNC's time steps over a whole sequence, forward");
  m.def("sequence_backward", &dnc_native::sequence_backward, "their first-order gradients");
}

// The op schemas of grass_kernels. The ops' entry points register themselves for CPU and CUDA
// in flat_ops.cpp and factorized_ops.cpp (TORCH_LIBRARY_IMPL); fake implementations live in
// grass_kernels/_library.py.
// Argument meaning and shapes: grass_kernels/reference.py (the spec).
#include <torch/library.h>

TORCH_LIBRARY(grass_kernels, m) {
  // x (N, D) float, codes (D, c) int32 -> (N, k) fp32
  m.def("sjlt(Tensor x, Tensor codes, int k) -> Tensor");
  // y (N, k) float, codes (D, c) int32 -> (N, D) fp32
  m.def("sjlt_transpose(Tensor y, Tensor codes) -> Tensor");
  // x (N, D), indices (k') int64, codes (k', c) -> (N, k) fp32
  m.def("grass(Tensor x, Tensor indices, Tensor codes, int k, float scale) -> Tensor");
  // acts (B, T, d_in), grads (B, T, d_out), p_in (k_in, d_in + bias) fp32,
  // p_out (k_out, d_out) fp32, token_mask (B, T) fp32 -> (B, k_out * k_in) fp32
  m.def(
      "logra(Tensor acts, Tensor grads, Tensor p_in, Tensor p_out, Tensor? token_mask, "
      "bool bias) -> Tensor");
  // in_indices (k_i') int64 into [0, d_in + bias), out_indices (k_o') int64,
  // codes (k_o' * k_i', c) -> (B, k) fp32
  m.def(
      "fact_grass(Tensor acts, Tensor grads, Tensor in_indices, Tensor out_indices, "
      "Tensor codes, int k, float scale, Tensor? token_mask, bool bias) -> Tensor");
  // codes_in (d_in + bias, c), codes_out (d_out, c) -> (B, k_out * k_in) fp32
  m.def(
      "fact_sjlt(Tensor acts, Tensor grads, Tensor codes_in, Tensor codes_out, int k_in, "
      "int k_out, Tensor? token_mask, bool bias) -> Tensor");
}

#ifdef GRASS_PYTHON_MODULE
#include <Python.h>
// `import grass_kernels._C` loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
#endif

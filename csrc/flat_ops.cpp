// The entry points of the flat ops (sjlt, sjlt_transpose, grass) on every device: each checks
// its arguments once, for the CPU and the CUDA kernel alike, fills its family's params struct
// and runs the kernel of the inputs' device. Semantics: grass_kernels/reference.py.
#include <cmath>

#include "common.h"
#include "params.h"

namespace grass {
namespace {

// 1 / sqrt(c) times the op's own scale, the factor every flat output carries.
float copies_scale(double scale, int64_t c) {
  return static_cast<float>(scale / std::sqrt(static_cast<double>(c)));
}

// (N, k) fp32: the SJLT of x's columns, all of them (columns == nullptr) or the selected ones.
// codes: checked and contiguous.
at::Tensor run_flat(const at::Tensor& x, const at::Tensor* columns, const at::Tensor& codes,
                    int64_t k, double scale) {
  at::Tensor out = at::empty({x.size(0), k}, x.options().dtype(at::kFloat));
  const FlatParams p{view_of(x),
                     x.size(0),
                     x.size(1),
                     columns ? columns->numel() : x.size(1),
                     columns ? columns->data_ptr<int64_t>() : nullptr,
                     codes.data_ptr<int32_t>(),
                     codes.size(1),
                     k,
                     copies_scale(scale, codes.size(1)),
                     out.data_ptr<float>()};
  run_on_device(x, p);
  return out;
}

at::Tensor sjlt(const at::Tensor& x, const at::Tensor& codes_in, int64_t k) {
  check_float(x, "x", 2);
  check_codes(codes_in, "codes", x.size(1), x);
  check_k(k, codes_in);
  const at::Tensor codes = codes_in.contiguous();
  check_ranges({{codes, "codes", k, "k", true}});
  return run_flat(x, nullptr, codes, k, 1.0);
}

at::Tensor grass_op(const at::Tensor& x, const at::Tensor& indices_in, const at::Tensor& codes_in,
                    int64_t k, double scale) {
  check_float(x, "x", 2);
  check_indices(indices_in, "indices", x);
  check_codes(codes_in, "codes", indices_in.numel(), x);
  check_k(k, codes_in);
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  check_ranges({{codes, "codes", k, "k", true}, {indices, "indices", x.size(1), "", false}});
  return run_flat(x, &indices, codes, k, scale);
}

at::Tensor sjlt_transpose(const at::Tensor& y_in, const at::Tensor& codes_in) {
  check_float(y_in, "y", 2);
  check_codes(codes_in, "codes", codes_in.size(0), y_in);
  check_k(y_in.size(1), codes_in);
  const at::Tensor codes = codes_in.contiguous();
  check_ranges({{codes, "codes", y_in.size(1), "k", true}});
  const at::Tensor y = y_in.contiguous();
  at::Tensor out = at::empty({y.size(0), codes.size(0)}, y.options().dtype(at::kFloat));
  const TransposeParams p{view_of(y),
                          y.size(0),
                          y.size(1),
                          codes.data_ptr<int32_t>(),
                          codes.size(0),
                          codes.size(1),
                          copies_scale(1.0, codes.size(1)),
                          out.data_ptr<float>()};
  run_on_device(y, p);
  return out;
}

void define_flat_ops(torch::Library& m) {
  m.impl("sjlt", &sjlt);
  m.impl("sjlt_transpose", &sjlt_transpose);
  m.impl("grass", &grass_op);
}

}  // namespace

TORCH_LIBRARY_IMPL(grass_kernels, CPU, m) { define_flat_ops(m); }
#ifdef GRASS_WITH_CUDA
TORCH_LIBRARY_IMPL(grass_kernels, CUDA, m) { define_flat_ops(m); }
#endif

}  // namespace grass

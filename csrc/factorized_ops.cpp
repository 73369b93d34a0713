// The entry points of the factorized ops (logra, fact_grass, fact_sjlt) on every device: each
// checks its arguments once, for every kernel of the op, fills its params struct and runs the
// kernel of the inputs' device (logra and fact_sjlt have CPU kernels only: on GPUs the Python
// layer runs them in Triton). Semantics: grass_kernels/reference.py.
#include <optional>
#include <tuple>

#include "common.h"
#include "params.h"

namespace grass {
namespace {

// The shared part of the params, for inputs that check_linear accepted. mask: the token mask
// made contiguous (undefined for none); out: the (B, width) fp32 output, zeroed.
LinearParams linear_params(const at::Tensor& acts, const at::Tensor& grads, const at::Tensor& mask,
                           bool bias, at::Tensor& out) {
  return {view_of(acts),  view_of(grads), acts.size(0), acts.size(1),
          acts.size(2),   grads.size(2),  mask.defined() ? mask.data_ptr<float>() : nullptr,
          bias,           out.data_ptr<float>()};
}

// (B, T) floats: small beside acts and grads, so a contiguous copy when it is not one.
at::Tensor contiguous_mask(const std::optional<at::Tensor>& token_mask) {
  return token_mask ? token_mask->contiguous() : at::Tensor();
}

at::Tensor zeroed_output(const at::Tensor& acts, int64_t width) {
  return at::zeros({acts.size(0), width}, acts.options().dtype(at::kFloat));
}

at::Tensor fact_grass(const at::Tensor& acts, const at::Tensor& grads,
                      const at::Tensor& in_indices, const at::Tensor& out_indices,
                      const at::Tensor& codes_in, int64_t k, double scale,
                      const std::optional<at::Tensor>& token_mask, bool bias) {
  check_linear(acts, grads, token_mask);
  check_indices(in_indices, "in_indices", acts);
  check_indices(out_indices, "out_indices", acts);
  check_codes(codes_in, "codes", in_indices.numel() * out_indices.numel(), acts);
  check_k(k, codes_in);
  if (acts.is_cuda()) {
    const bool fp64 = acts.scalar_type() == at::kDouble || grads.scalar_type() == at::kDouble;
    TORCH_CHECK_TYPE(!fp64 || acts.scalar_type() == grads.scalar_type(),
                     "fact_grass on CUDA reads float64 acts and grads only together, got ",
                     acts.scalar_type(), " and ", grads.scalar_type());
  }
  const at::Tensor in_idx = in_indices.contiguous();
  const at::Tensor out_idx = out_indices.contiguous();
  const at::Tensor codes = codes_in.contiguous();
  check_ranges({{in_idx, "in_indices", acts.size(2) + (bias ? 1 : 0), "", false},
                {out_idx, "out_indices", grads.size(2), "", false},
                {codes, "codes", k, "k", true}});
  const at::Tensor mask = contiguous_mask(token_mask);
  at::Tensor out = zeroed_output(acts, k);
  FactGrassParams p{linear_params(acts, grads, mask, bias, out)};
  p.in_indices = in_idx.data_ptr<int64_t>();
  p.out_indices = out_idx.data_ptr<int64_t>();
  p.k_in_masked = in_idx.numel();
  p.k_out_masked = out_idx.numel();
  p.codes = codes.data_ptr<int32_t>();
  p.c = codes.size(1);
  p.k = k;
  p.scale = scale;
  run_on_device(acts, p);
  return out;
}

at::Tensor logra(const at::Tensor& acts, const at::Tensor& grads, const at::Tensor& p_in,
                 const at::Tensor& p_out, const std::optional<at::Tensor>& token_mask,
                 bool bias) {
  check_linear(acts, grads, token_mask);
  const int64_t d_in = acts.size(2), d_out = grads.size(2);
  for (const auto& [p, name, cols] :
       {std::tuple{&p_in, "p_in", d_in + bias}, std::tuple{&p_out, "p_out", d_out}}) {
    TORCH_CHECK_TYPE(p->scalar_type() == at::kFloat, name, " must be float32, got ",
                     p->scalar_type());
    TORCH_CHECK_VALUE(p->dim() == 2 && p->size(1) == cols && p->size(0) >= 1, name,
                      " must have shape (k, ", cols, "), got ", p->sizes());
    check_same_device(*p, name, acts);
  }
  const at::Tensor pi = p_in.contiguous(), po = p_out.contiguous();
  const at::Tensor mask = contiguous_mask(token_mask);
  at::Tensor out = zeroed_output(acts, po.size(0) * pi.size(0));
  LograParams p{linear_params(acts, grads, mask, bias, out)};
  p.p_in = pi.data_ptr<float>();
  p.p_out = po.data_ptr<float>();
  p.k_in = pi.size(0);
  p.k_out = po.size(0);
  run_cpu(p);
  return out;
}

at::Tensor fact_sjlt(const at::Tensor& acts, const at::Tensor& grads, const at::Tensor& codes_in,
                     const at::Tensor& codes_out, int64_t k_in, int64_t k_out,
                     const std::optional<at::Tensor>& token_mask, bool bias) {
  check_linear(acts, grads, token_mask);
  check_codes(codes_in, "codes_in", acts.size(2) + bias, acts);
  check_k(k_in, codes_in, "k_in");
  check_codes(codes_out, "codes_out", grads.size(2), acts);
  check_k(k_out, codes_out, "k_out");
  const at::Tensor ci = codes_in.contiguous(), co = codes_out.contiguous();
  check_ranges({{ci, "codes_in", k_in, "k_in", true}, {co, "codes_out", k_out, "k_out", true}});
  const at::Tensor mask = contiguous_mask(token_mask);
  at::Tensor out = zeroed_output(acts, k_out * k_in);
  FactSjltParams p{linear_params(acts, grads, mask, bias, out)};
  p.codes_in = ci.data_ptr<int32_t>();
  p.codes_out = co.data_ptr<int32_t>();
  p.c_in = ci.size(1);
  p.c_out = co.size(1);
  p.k_in = k_in;
  p.k_out = k_out;
  run_cpu(p);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(grass_kernels, CPU, m) {
  m.impl("logra", &logra);
  m.impl("fact_grass", &fact_grass);
  m.impl("fact_sjlt", &fact_sjlt);
}
#ifdef GRASS_WITH_CUDA
TORCH_LIBRARY_IMPL(grass_kernels, CUDA, m) { m.impl("fact_grass", &fact_grass); }
#endif

}  // namespace grass

// Fused BUnit unit kernel for CPU inference, as a torch extension (the fused_cpu backend, bunit/fused_cpu.py).
//
// The kernel itself is unit_kernel.h, which says how it works, compiled into its own library (unit_kernel.cpp,
// shared with the OpenVINO custom operation) and reached through unit_kernel_api.h; this file checks the tensors,
// hands the kernel at::parallel_for and binds it to Python.
// Light headers, not <torch/extension.h> (the whole C++ frontend): the build takes about a third of the time.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>

#include "unit_kernel_api.h"

using namespace bunit_unit;

// y[:, out_start[u]:out_start[u]+c] = unit_u(x[:, in_start[u]:in_start[u]+a]) for every unit u of one group.
// x: (N, Cin, H, W) float32, any memory format (NCHW, channels_last, any strides); y: (N, Cout, Ho, Wo) float32
// contiguous (NCHW), written in place. w1: (U*b, a, k, k), b1: (U*b,), w2: (U*c, b, k, k), b2: (U*c,): BN
// already folded in. residual: None, or a tensor: then y = relu(units(x) + residual) on the group's channels (a
// residual block's shortcut and final ReLU); with res_step 1 and res_offset 0 it has y's sizes (any memory
// format), otherwise it is read as an option-A shortcut: output channel o at (i, j) adds
// residual[:, o - res_offset, i * res_step, j * res_step], zero where that channel does not exist.
// in_start, out_start: (U,) int64. Returns whether a fixed-shape kernel ran (false:
// the run-time-channel 3x3 path or the generic path).
bool unit_group_forward(const at::Tensor& x, at::Tensor& y, const std::optional<at::Tensor>& residual,
                        const at::Tensor& w1, const at::Tensor& b1,
                        const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& in_start,
                        const at::Tensor& out_start, int64_t a, int64_t b, int64_t c, int64_t k, int64_t s,
                        int64_t res_step, int64_t res_offset) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4,
              "x: a float32 CPU tensor (N, C, H, W) is required");
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == at::kFloat && y.is_contiguous() && y.dim() == 4,
              "y: a contiguous float32 CPU tensor (N, C, Ho, Wo) is required");
  TORCH_CHECK(a > 0 && b > 0 && c > 0 && k > 0 && k % 2 == 1 && s > 0, "unit spec: positive a, b, c, s and odd k");
  const int64_t units = in_start.numel();
  TORCH_CHECK(out_start.numel() == units && w1.numel() == units * b * a * k * k && b1.numel() == units * b &&
                  w2.numel() == units * c * b * k * k && b2.numel() == units * c,
              "weights: sizes do not match the unit spec and the number of units");
  for (const auto* t : {&w1, &b1, &w2, &b2})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "weights: contiguous float32 required");
  const int64_t n = x.size(0), cin = x.size(1), h = x.size(2), w = x.size(3), cout = y.size(1);
  const Strides xs{x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const int64_t ho = (h + 2 * (k / 2) - k) / s + 1, wo = (w + 2 * (k / 2) - k) / s + 1;
  TORCH_CHECK(y.size(0) == n && y.size(2) == ho && y.size(3) == wo, "y: wrong shape for this input and stride");
  const float* rp = nullptr;
  TORCH_CHECK(res_step >= 1, "res_step: 1 or more required");
  const bool mapped = res_step != 1 || res_offset != 0;
  bool gather = false;  // the residual is gathered per item (a map, or not laid out like y); else read in place
  int64_t rc = 0;
  Strides rs{};
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.device().is_cpu() && r.scalar_type() == at::kFloat && r.dim() == 4,
                "residual: a float32 CPU tensor (N, C, H, W) is required");
    TORCH_CHECK(mapped || r.sizes() == y.sizes(), "residual: the output's shape is required with res_step 1, "
                "res_offset 0");
    rc = r.size(1), rs = Strides{r.stride(0), r.stride(1), r.stride(2), r.stride(3)};
    TORCH_CHECK(r.size(0) == n && (ho - 1) * res_step < r.size(2) && (wo - 1) * res_step < r.size(3),
                "residual: batch or plane too small for the output at res_step");
    gather = mapped || !r.is_contiguous();
    rp = r.data_ptr<float>();
  }
  auto ins = in_start.to(at::kLong).contiguous();
  auto outs = out_start.to(at::kLong).contiguous();
  const int64_t* in_p = ins.data_ptr<int64_t>();
  const int64_t* out_p = outs.data_ptr<int64_t>();
  for (int64_t u = 0; u < units; ++u)
    TORCH_CHECK(in_p[u] >= 0 && in_p[u] + a <= cin && out_p[u] >= 0 && out_p[u] + c <= cout,
                "in_start/out_start: a unit's channels fall outside the tensors");
  const GroupCall call{x.data_ptr<float>(), xs, n, cin, h, w, y.data_ptr<float>(), cout, rp, rc, rs, gather,
                       res_step, res_offset, w1.data_ptr<float>(), b1.data_ptr<float>(), w2.data_ptr<float>(),
                       b2.data_ptr<float>(), in_p, out_p, units, a, b, c, k, s};
  return run_group(call, [](int64_t items, auto&& body) { at::parallel_for(0, items, 1, body); });
}

bool has_variant(int64_t a, int64_t b, int64_t c, int64_t k, int64_t s) {
  return bunit_unit_has_variant(a, b, c, k, s) != 0;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("unit_group_forward", &unit_group_forward, "Fused conv-BN-ReLU-conv-BN-ReLU of a group of units (CPU)");
  m.def("has_variant", &has_variant, "Whether a unit shape has a specialised kernel");
}

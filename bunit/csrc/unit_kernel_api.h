// The unit kernel's interface: what the torch extension (unit_fused.cpp) and the OpenVINO operation
// (unit_openvino.cpp) include. The kernel itself (unit_kernel.h, which says how it works) is compiled once, into
// its own shared library (unit_kernel.cpp, built by bunit/fused_cpu.py: kernel_library), that both link: its
// fixed-shape templates are most of the build time, and before they were compiled once per framework.
#pragma once

#include <cstdint>

namespace bunit_unit {

// Element strides of a 4-D tensor (N, C, H, W): the kernel reads its input and residual in any memory format.
struct Strides {
  int64_t n, c, h, w;
};

// One group call on raw pointers (unit_group_forward in unit_fused.cpp documents the arguments).
struct GroupCall {
  const float* x;      // input (n, cin, h, w), element strides xs
  Strides xs;
  int64_t n, cin, h, w;
  float* y;            // output (n, cout, ho, wo), NCHW contiguous
  int64_t cout;
  const float* res;    // residual or nullptr; rc channels, strides rs
  int64_t rc;
  Strides rs;
  bool gather;         // the residual is gathered per item (mapped, or not laid out like y)
  int64_t res_step, res_offset;
  const float *w1, *b1, *w2, *b2;  // BN folded in
  const int64_t *in_start, *out_start;
  int64_t units, a, b, c, k, s;
};

// The caller's parallel-for, type-erased: run(ctx, n, body, state) must call body(state, begin, end) over
// contiguous ranges covering [0, n) (at::parallel_for in torch, tbb::parallel_for in OpenVINO).
using RangeFn = void (*)(void* state, int64_t begin, int64_t end);
struct ParallelFor {
  void (*run)(void* ctx, int64_t n, RangeFn body, void* state);
  void* ctx;
};

}  // namespace bunit_unit

extern "C" {
// Runs every (image, unit) item of the call; returns 1 when a fixed-shape kernel ran, 0 for the run-time-channel
// 3x3 path or the generic path.
int bunit_unit_run_group(const bunit_unit::GroupCall* call, bunit_unit::ParallelFor parallel_for);
// 1 when the unit shape has a fixed-shape kernel.
int bunit_unit_has_variant(int64_t a, int64_t b, int64_t c, int64_t k, int64_t s);
}

namespace bunit_unit {

// run_group(call, f) with any callable f(n, body) that calls body(begin, end) over contiguous ranges of [0, n).
template <class F>
bool run_group(const GroupCall& call, F&& parallel_for) {
  const ParallelFor erased{[](void* ctx, int64_t n, RangeFn body, void* state) {
                             (*static_cast<F*>(ctx))(n, [&](int64_t begin, int64_t end) { body(state, begin, end); });
                           },
                           const_cast<void*>(static_cast<const void*>(&parallel_for))};
  return bunit_unit_run_group(&call, erased) != 0;
}

}  // namespace bunit_unit

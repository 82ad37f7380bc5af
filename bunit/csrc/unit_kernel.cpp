// The unit kernel (unit_kernel.h) as a shared library of its own, behind the C interface of unit_kernel_api.h:
// built once per CPU and kernel source by bunit/fused_cpu.py (kernel_library) and linked by both the fused_cpu torch
// extension and the OpenVINO unit operation, so its fixed-shape templates compile once, not once per framework.
#include "unit_kernel.h"

extern "C" __attribute__((visibility("default"))) int bunit_unit_run_group(const bunit_unit::GroupCall* call,
                                                                           bunit_unit::ParallelFor parallel_for) {
  return bunit_unit::run_group_items(*call, [&](int64_t items, auto&& body) {
    using Body = std::remove_reference_t<decltype(body)>;
    parallel_for.run(parallel_for.ctx, items,
                     [](void* state, int64_t begin, int64_t end) { (*static_cast<Body*>(state))(begin, end); },
                     const_cast<void*>(static_cast<const void*>(&body)));
  }) ? 1 : 0;
}

extern "C" __attribute__((visibility("default"))) int bunit_unit_has_variant(int64_t a, int64_t b, int64_t c,
                                                                             int64_t k, int64_t s) {
  return bunit_unit::find_variant(a, b, c, k, s) != nullptr ? 1 : 0;
}

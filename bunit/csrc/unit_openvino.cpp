// BUnit's unit kernel as an OpenVINO custom operation: bunit.UnitGroup, one node per group of same-spec units.
//
// The computation is unit_kernel.h, the source of the fused_cpu torch extension: per unit conv -> (folded BN) ->
// ReLU -> conv -> (folded BN) -> ReLU, optionally relu(. + residual) with an option-A shortcut read in place.
// harness/measure/openvino_ext.py exports unit layers to ONNX as nodes of type UnitGroup in domain "bunit" and
// builds this file into a shared library that OpenVINO loads with Core.add_extension; the ONNX frontend maps the
// node through the ConversionExtension at the bottom, and the CPU plugin runs it through evaluate().
//
// Inputs: x (N, Cin, H, W) f32; w1 (U*b, a, k, k), b1 (U*b), w2 (U*c, b, k, k), b2 (U*c), BN folded in; then, in
// this order and only when the attribute says so, residual (has_residual: (N, out_channels, Ho, Wo), or the tensor
// an option-A shortcut reads with res_step/res_offset) and prev (has_prev: the output of the layer's previous
// group node, (N, out_channels, Ho, Wo), copied into this node's output before its units write their channels).
// Attributes: a, b, c, k, s (the unit spec), in_start and out_start (each unit's first input and output channel in
// layer order), out_channels, has_residual, res_step, res_offset, has_prev.
// Output: (N, out_channels, Ho, Wo) f32; the channels of this group's units are written, the others are prev's
// (uninitialised without prev: a layer's last group node has written them all).
#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/frontend/node_context.hpp>
#include <openvino/frontend/onnx/extension/conversion.hpp>
#include <openvino/op/op.hpp>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/partitioner.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "unit_kernel.h"

namespace bunit_ov {

struct Attrs {
  int64_t a = 1, b = 1, c = 1, k = 3, s = 1, out_channels = 1;
  std::vector<int64_t> in_start, out_start;
  int64_t has_residual = 0, res_step = 1, res_offset = 0, has_prev = 0;
};

class UnitGroup : public ov::op::Op {
 public:
  OPENVINO_OP("UnitGroup", "bunit");

  UnitGroup() = default;
  UnitGroup(const ov::OutputVector& args, const Attrs& attrs) : Op(args), m(attrs) {
    constructor_validate_and_infer_types();
  }

  void validate_and_infer_types() override {
    const size_t expected = 5 + (m.has_residual ? 1 : 0) + (m.has_prev ? 1 : 0);
    NODE_VALIDATION_CHECK(this, get_input_size() == expected, "UnitGroup: ", expected, " inputs expected, got ",
                          get_input_size());
    NODE_VALIDATION_CHECK(this, get_input_element_type(0) == ov::element::f32, "UnitGroup: float32 input required");
    NODE_VALIDATION_CHECK(this, m.a > 0 && m.b > 0 && m.c > 0 && m.k > 0 && m.k % 2 == 1 && m.s > 0 &&
                                    m.res_step >= 1 && !m.in_start.empty() &&
                                    m.in_start.size() == m.out_start.size(),
                          "UnitGroup: positive a, b, c, s, odd k and one in_start and out_start per unit required");
    for (size_t u = 0; u < m.out_start.size(); ++u)
      NODE_VALIDATION_CHECK(this, m.out_start[u] >= 0 && m.out_start[u] + m.c <= m.out_channels && m.in_start[u] >= 0,
                            "UnitGroup: a unit's output channels fall outside out_channels");
    const ov::PartialShape& in = get_input_partial_shape(0);
    ov::PartialShape out = ov::PartialShape::dynamic(4);
    if (in.rank().is_static()) {
      NODE_VALIDATION_CHECK(this, in.rank().get_length() == 4, "UnitGroup: input (N, C, H, W) required");
      out[0] = in[0];
      out[1] = m.out_channels;
      const int64_t p = m.k / 2;
      for (int i = 2; i < 4; ++i)
        if (in[i].is_static()) out[i] = (in[i].get_length() + 2 * p - m.k) / m.s + 1;
    }
    set_output_type(0, ov::element::f32, out);
  }

  std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override {
    return std::make_shared<UnitGroup>(args, m);
  }

  bool visit_attributes(ov::AttributeVisitor& visitor) override {
    visitor.on_attribute("a", m.a);
    visitor.on_attribute("b", m.b);
    visitor.on_attribute("c", m.c);
    visitor.on_attribute("k", m.k);
    visitor.on_attribute("s", m.s);
    visitor.on_attribute("in_start", m.in_start);
    visitor.on_attribute("out_start", m.out_start);
    visitor.on_attribute("out_channels", m.out_channels);
    visitor.on_attribute("has_residual", m.has_residual);
    visitor.on_attribute("res_step", m.res_step);
    visitor.on_attribute("res_offset", m.res_offset);
    visitor.on_attribute("has_prev", m.has_prev);
    return true;
  }

  bool has_evaluate() const override { return true; }

  bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
    using bunit_unit::Strides;
    const ov::Shape& xs = inputs[0].get_shape();
    const int64_t n = xs[0], cin = xs[1], h = xs[2], w = xs[3];
    const int64_t p = m.k / 2, ho = (h + 2 * p - m.k) / m.s + 1, wo = (w + 2 * p - m.k) / m.s + 1;
    const int64_t units = static_cast<int64_t>(m.in_start.size());
    for (int64_t u = 0; u < units; ++u)
      OPENVINO_ASSERT(m.in_start[u] + m.a <= cin, "UnitGroup: a unit's input channels fall outside the input");
    OPENVINO_ASSERT(static_cast<int64_t>(inputs[1].get_size()) == units * m.b * m.a * m.k * m.k &&
                        static_cast<int64_t>(inputs[2].get_size()) == units * m.b &&
                        static_cast<int64_t>(inputs[3].get_size()) == units * m.c * m.b * m.k * m.k &&
                        static_cast<int64_t>(inputs[4].get_size()) == units * m.c,
                    "UnitGroup: weight sizes do not match the unit spec and the number of units");
    ov::Tensor& y = outputs[0];
    y.set_shape(ov::Shape{static_cast<size_t>(n), static_cast<size_t>(m.out_channels), static_cast<size_t>(ho),
                          static_cast<size_t>(wo)});
    float* yp = y.data<float>();
    size_t next = 5;
    const float* rp = nullptr;
    int64_t rc = 0;
    Strides rs{};
    bool gather = false;
    if (m.has_residual) {
      const ov::Tensor& r = inputs[next++];
      const ov::Shape& sh = r.get_shape();
      OPENVINO_ASSERT(sh.size() == 4 && static_cast<int64_t>(sh[0]) == n &&
                          (ho - 1) * m.res_step < static_cast<int64_t>(sh[2]) &&
                          (wo - 1) * m.res_step < static_cast<int64_t>(sh[3]),
                      "UnitGroup: residual batch or plane too small for the output");
      const bool mapped = m.res_step != 1 || m.res_offset != 0;
      OPENVINO_ASSERT(mapped || (static_cast<int64_t>(sh[1]) == m.out_channels && static_cast<int64_t>(sh[2]) == ho &&
                                 static_cast<int64_t>(sh[3]) == wo),
                      "UnitGroup: a residual of the output's shape is required with res_step 1, res_offset 0");
      rc = sh[1];
      rs = Strides{static_cast<int64_t>(sh[1] * sh[2] * sh[3]), static_cast<int64_t>(sh[2] * sh[3]),
                   static_cast<int64_t>(sh[3]), 1};
      gather = mapped;  // OpenVINO hands plain (NCHW, dense) tensors: an unmapped residual is laid out like y
      rp = r.data<const float>();
    }
    if (m.has_prev) {
      const ov::Tensor& prev = inputs[next++];
      OPENVINO_ASSERT(prev.get_byte_size() == y.get_byte_size(), "UnitGroup: prev must have the output's shape");
      if (prev.data() != y.data()) std::memcpy(yp, prev.data(), y.get_byte_size());
    }
    const int64_t xstrides[4] = {cin * h * w, h * w, w, 1};
    const bunit_unit::GroupCall call{inputs[0].data<const float>(), Strides{xstrides[0], xstrides[1], xstrides[2], 1},
                                     n, cin, h, w, yp, m.out_channels, rp, rc, rs, gather, m.res_step, m.res_offset,
                                     inputs[1].data<const float>(), inputs[2].data<const float>(),
                                     inputs[3].data<const float>(), inputs[4].data<const float>(),
                                     m.in_start.data(), m.out_start.data(), units, m.a, m.b, m.c, m.k, m.s};
    // the CPU plugin runs this inside its stream's task arena: the items go to that arena's threads, in contiguous
    // ranges one per thread (the kernel copies the next item's input while it computes the current one)
    bunit_unit::run_group(call, [](int64_t items, auto&& body) {
      tbb::parallel_for(
          tbb::blocked_range<int64_t>(0, items, 1),
          [&](const tbb::blocked_range<int64_t>& r) { body(r.begin(), r.end()); }, tbb::static_partitioner());
    });
    return true;
  }

 private:
  Attrs m;
};

// The ONNX node (domain "bunit", type "UnitGroup") to the operation; its attributes are read by name.
ov::OutputVector from_onnx(const ov::frontend::NodeContext& node) {
  Attrs attrs;
  for (auto [name, field] : {std::pair<const char*, int64_t*>{"a", &attrs.a}, {"b", &attrs.b}, {"c", &attrs.c},
                             {"k", &attrs.k}, {"s", &attrs.s}, {"out_channels", &attrs.out_channels},
                             {"has_residual", &attrs.has_residual}, {"res_step", &attrs.res_step},
                             {"res_offset", &attrs.res_offset}, {"has_prev", &attrs.has_prev}})
    *field = node.get_attribute<int64_t>(name, *field);
  attrs.in_start = node.get_attribute<std::vector<int64_t>>("in_start");
  attrs.out_start = node.get_attribute<std::vector<int64_t>>("out_start");
  ov::OutputVector inputs;
  for (size_t i = 0; i < node.get_input_size(); ++i) inputs.push_back(node.get_input(static_cast<int>(i)));
  return std::make_shared<UnitGroup>(inputs, attrs)->outputs();
}

}  // namespace bunit_ov

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>(
    {std::make_shared<ov::OpExtension<bunit_ov::UnitGroup>>(),
     std::make_shared<ov::frontend::onnx::ConversionExtension>("UnitGroup", "bunit", bunit_ov::from_onnx)}));

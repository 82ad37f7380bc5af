// BUnit's unit kernel as an OpenVINO custom operation: bunit.UnitGroup, one node per group of same-spec units.
//
// The computation is unit_kernel.h, the kernel of the fused_cpu torch extension too, compiled into its own library
// (unit_kernel.cpp, bunit/fused_cpu.py: kernel_library) that this one links: per unit conv -> (folded BN) ->
// ReLU -> conv -> (folded BN) -> ReLU, optionally relu(. + residual) with an option-A shortcut read in place.
// harness/measure/openvino_ext.py exports unit layers to ONNX as nodes of type UnitGroup in domain "bunit" and
// builds this file into a shared library that OpenVINO loads with Core.add_extension; the ONNX frontend maps the
// node through the ConversionExtension at the bottom, and the CPU plugin runs it through evaluate().
//
// Inputs: x (N, Cin, H, W) f32; the weights, BN folded in, as one constant: w1 (U*b, a, k, k), b1 (U*b), w2 (U*c, b,
// k, k), b2 (U*c) flattened one after the other (one input instead of four: the CPU plugin wraps every input of
// the node in a new ov::Tensor on every call); then, in
// this order and only when the attribute says so, residual (has_residual: (N, out_channels, Ho, Wo), or the tensor
// an option-A shortcut reads with res_step/res_offset) and prev (has_prev: the output of the layer's previous
// group node, (N, out_channels, Ho, Wo), copied into this node's output before its units write their channels).
// Attributes: a, b, c, k, s (the unit spec), in_start and out_start (each unit's first input and output channel in
// layer order), out_channels, has_residual, res_step, res_offset, has_prev; x_nhwc and res_nhwc (0 or 1): x, or the
// residual, is given as (N, H, W, C), the NCHW tensor transposed (the exporter transposes the network's first unit
// layer's input: the CPU plugin hands a convolution's channels-last output to a Transpose to NHWC as it is, where
// it reorders it to NCHW for this operation otherwise); the node transposes it back to NCHW into a scratch buffer
// of the calling thread, once when the residual is the same tensor.
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

#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "unit_kernel_api.h"

namespace bunit_ov {

struct Attrs {
  int64_t a = 1, b = 1, c = 1, k = 3, s = 1, out_channels = 1;
  std::vector<int64_t> in_start, out_start;
  int64_t has_residual = 0, res_step = 1, res_offset = 0, has_prev = 0, x_nhwc = 0, res_nhwc = 0;
};

// A 4-D tensor's (N, C, H, W) sizes: its dims are (N, C, H, W), or (N, H, W, C) with nhwc.
inline std::array<int64_t, 4> nchw_sizes(const ov::Shape& d, bool nhwc) {
  const int64_t d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
  return nhwc ? std::array<int64_t, 4>{d0, d3, d1, d2} : std::array<int64_t, 4>{d0, d1, d2, d3};
}

// One step of a 16x16 transpose held in 16 vectors: rows i and i + M (bit M of i clear) swap their off-diagonal
// MxM blocks; the steps M = 8, 4, 2, 1 transpose the whole tile.
typedef float V16 __attribute__((vector_size(64)));
typedef float V16u __attribute__((vector_size(64), aligned(4), may_alias));
template <int M, size_t... J>
inline void swap_blocks(V16& a, V16& b, std::index_sequence<J...>) {
  const V16 lo = __builtin_shufflevector(a, b, ((J & M) ? 16 + J - M : J)...);
  const V16 hi = __builtin_shufflevector(a, b, ((J & M) ? 16 + J : J + M)...);
  a = lo, b = hi;
}
template <int M>
inline void transpose_step(V16 (&r)[16]) {
  for (int i = 0; i < 16; ++i)
    if (!(i & M)) swap_blocks<M>(r[i], r[i + M], std::make_index_sequence<16>{});
}

// An (N, H, W, C) tensor as NCHW in `dst` (resized to fit), in parallel; returns dst's data. Each image is an
// (H*W, C) matrix transposed to (C, H*W): in 16x16 tiles in vector registers where 16 divides both, else row by
// row in scalars.
inline const float* nhwc_to_nchw(const ov::Tensor& t, std::vector<float>& dst) {
  const auto [n, c, h, w] = nchw_sizes(t.get_shape(), true);
  const int64_t hw = h * w;
  const float* src = t.data<const float>();
  if (dst.size() < t.get_size()) dst.resize(t.get_size());
  float* out = dst.data();
  if (hw % 16 == 0 && c % 16 == 0) {
    const int64_t pixel_tiles = hw / 16, channel_tiles = c / 16;
    tbb::parallel_for(
        tbb::blocked_range<int64_t>(0, n * pixel_tiles * channel_tiles, 1),
        [&](const tbb::blocked_range<int64_t>& tiles) {
          for (int64_t tile = tiles.begin(); tile < tiles.end(); ++tile) {
            const int64_t img = tile / (pixel_tiles * channel_tiles), rest = tile % (pixel_tiles * channel_tiles);
            const int64_t p0 = rest / channel_tiles * 16, c0 = rest % channel_tiles * 16;
            const float* s = src + (img * hw + p0) * c + c0;
            V16 r[16];
            for (int i = 0; i < 16; ++i)  // pixel p0 + i, channels c0 ..
              r[i] = *reinterpret_cast<const V16u*>(s + i * c);
            transpose_step<8>(r), transpose_step<4>(r), transpose_step<2>(r), transpose_step<1>(r);
            float* d = out + (img * c + c0) * hw + p0;
            for (int j = 0; j < 16; ++j)  // channel c0 + j, pixels p0 ..
              *reinterpret_cast<V16u*>(d + j * hw) = r[j];
          }
        },
        tbb::static_partitioner());
    return out;
  }
  tbb::parallel_for(
      tbb::blocked_range<int64_t>(0, n * h, 1),
      [&](const tbb::blocked_range<int64_t>& rows) {
        for (int64_t row = rows.begin(); row < rows.end(); ++row) {
          const float* s = src + row * w * c;
          float* d = out + (row / h) * c * hw + (row % h) * w;
          for (int64_t j = 0; j < c; ++j)
            for (int64_t x = 0; x < w; ++x) d[j * hw + x] = s[x * c + j];
        }
      },
      tbb::static_partitioner());
  return out;
}

class UnitGroup : public ov::op::Op {
 public:
  OPENVINO_OP("UnitGroup", "bunit");

  UnitGroup() = default;
  UnitGroup(const ov::OutputVector& args, const Attrs& attrs) : Op(args), m(attrs) {
    constructor_validate_and_infer_types();
  }

  void validate_and_infer_types() override {
    const size_t expected = 2 + (m.has_residual ? 1 : 0) + (m.has_prev ? 1 : 0);
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
      for (int i = 2; i < 4; ++i) {
        const ov::Dimension& d = in[m.x_nhwc ? i - 1 : i];
        if (d.is_static()) out[i] = (d.get_length() + 2 * p - m.k) / m.s + 1;
      }
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
    visitor.on_attribute("x_nhwc", m.x_nhwc);
    visitor.on_attribute("res_nhwc", m.res_nhwc);
    return true;
  }

  bool has_evaluate() const override { return true; }

  bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
    using bunit_unit::Strides;
    const auto [n, cin, h, w] = nchw_sizes(inputs[0].get_shape(), m.x_nhwc);
    const int64_t p = m.k / 2, ho = (h + 2 * p - m.k) / m.s + 1, wo = (w + 2 * p - m.k) / m.s + 1;
    const int64_t units = static_cast<int64_t>(m.in_start.size());
    for (int64_t u = 0; u < units; ++u)
      OPENVINO_ASSERT(m.in_start[u] + m.a <= cin, "UnitGroup: a unit's input channels fall outside the input");
    const int64_t w1_size = units * m.b * m.a * m.k * m.k, w2_size = units * m.c * m.b * m.k * m.k;
    OPENVINO_ASSERT(static_cast<int64_t>(inputs[1].get_size()) == w1_size + units * m.b + w2_size + units * m.c,
                    "UnitGroup: the weights' size does not match the unit spec and the number of units");
    const float* w1 = inputs[1].data<const float>();
    const float* b1 = w1 + w1_size;
    const float* w2 = b1 + units * m.b;
    const float* b2 = w2 + w2_size;
    ov::Tensor& y = outputs[0];
    y.set_shape(ov::Shape{static_cast<size_t>(n), static_cast<size_t>(m.out_channels), static_cast<size_t>(ho),
                          static_cast<size_t>(wo)});
    float* yp = y.data<float>();
    thread_local std::vector<float> x_scratch, res_scratch;  // NHWC inputs as NCHW
    const float* xp = m.x_nhwc ? nhwc_to_nchw(inputs[0], x_scratch) : inputs[0].data<const float>();
    size_t next = 2;
    const float* rp = nullptr;
    int64_t rc = 0;
    Strides rs{};
    bool gather = false;
    if (m.has_residual) {
      const ov::Tensor& r = inputs[next++];
      OPENVINO_ASSERT(r.get_shape().size() == 4, "UnitGroup: a 4-D residual required");
      const auto [rn, rch, rh, rw] = nchw_sizes(r.get_shape(), m.res_nhwc);
      OPENVINO_ASSERT(rn == n && (ho - 1) * m.res_step < rh && (wo - 1) * m.res_step < rw,
                      "UnitGroup: residual batch or plane too small for the output");
      const bool mapped = m.res_step != 1 || m.res_offset != 0;
      OPENVINO_ASSERT(mapped || (rch == m.out_channels && rh == ho && rw == wo),
                      "UnitGroup: a residual of the output's shape is required with res_step 1, res_offset 0");
      rc = rch;
      rs = Strides{rch * rh * rw, rh * rw, rw, 1};
      gather = mapped;  // OpenVINO hands plain (dense) tensors: an unmapped residual is laid out like y
      if (!m.res_nhwc)
        rp = r.data<const float>();
      else if (m.x_nhwc && r.data() == inputs[0].data() && r.get_shape() == inputs[0].get_shape())
        rp = xp;  // the block's input itself, already transposed
      else
        rp = nhwc_to_nchw(r, res_scratch);
    }
    if (m.has_prev) {
      const ov::Tensor& prev = inputs[next++];
      OPENVINO_ASSERT(prev.get_byte_size() == y.get_byte_size(), "UnitGroup: prev must have the output's shape");
      if (prev.data() != y.data()) std::memcpy(yp, prev.data(), y.get_byte_size());
    }
    const bunit_unit::GroupCall call{xp, Strides{cin * h * w, h * w, w, 1},
                                     n, cin, h, w, yp, m.out_channels, rp, rc, rs, gather, m.res_step, m.res_offset,
                                     w1, b1, w2, b2,
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
                             {"res_offset", &attrs.res_offset}, {"has_prev", &attrs.has_prev},
                             {"x_nhwc", &attrs.x_nhwc}, {"res_nhwc", &attrs.res_nhwc}})
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

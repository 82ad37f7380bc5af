// The unit kernel without its framework: the one source of BUnit's fused unit computation, compiled into its own
// library (unit_kernel.cpp) that the torch extension (unit_fused.cpp, the fused_cpu backend) and the OpenVINO custom
// operation (unit_openvino.cpp) link; they include only its interface, unit_kernel_api.h.
//
// Fused BUnit unit kernel for CPU inference: conv -> (folded BN) -> ReLU -> conv -> (folded BN) -> ReLU per unit.
//
// One call runs one group of same-spec units of a unit layer (bunit/fused_cpu.py folds BatchNorm into the conv
// weights and biases first). Work items are (image, unit) pairs, run in parallel by the caller's parallel-for. Per item:
//   1. the unit's `a` input planes are copied into a zero-padded buffer; for stride s the columns are split by
//      phase (column mod s), so every tap of a strided conv reads contiguous floats;
//   2. for a tile of output rows, the hidden rows it needs (tile + halo) are computed into a small buffer
//      (zero-padded too) that stays in cache;
//   3. the output rows are computed from the hidden buffer and written straight into the unit's output channels.
// Both convs are one routine, conv_rows: VW pixels of a row at a time in GCC vector registers (portable SIMD),
// R rows and OB output channels at a time as independent accumulators. The unit shapes of the paper's catalogue
// and of the uniform ResNet/VGG plans are compiled as templates with a, b, c, k, s known at compile time (the
// loops unroll fully); other 3x3 shapes at stride 1 or 2 (those a MACs-target plan picks, e.g. 2-2-2, 4-4-8) run
// with the channel counts at run time but the same row reuse, 4, 2 or 1 output channels per pass (k3_item); any
// other kernel size runs the generic path (all sizes at run time, one channel and one row per pass).
//
// run_group_items() is one group call on raw pointers; the caller checks the tensors and hands it its parallel-for
// (at::parallel_for in torch, tbb::parallel_for in OpenVINO, through unit_kernel_api.h's ParallelFor):
// parallel_for(n, f) must call f(begin, end) over contiguous ranges covering [0, n).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "unit_kernel_api.h"

namespace bunit_unit {

// VW floats per vector: 16 (one AVX-512 register, two AVX2 ones) or 8, whichever wastes fewer lanes on a row.
template <int VW>
struct Vec {
  typedef float type __attribute__((vector_size(VW * sizeof(float))));
  typedef float unaligned __attribute__((vector_size(VW * sizeof(float)), aligned(4), may_alias));
  static type load(const float* p) { return *reinterpret_cast<const unaligned*>(p); }
  static void store(float* p, type v) { *reinterpret_cast<unaligned*>(p) = v; }
  static type splat(float x) { return x - type{}; }  // x - 0 == x exactly (0 + x is not: -0 + 0 == +0)
  static type relu(type v) {
    const type zero = {};
    return v > zero ? v : zero;
  }
};
constexpr int kMaxVW = 16;

// Sizes of one group call.
struct Geometry {
  int64_t a, b, c, k, s, p;  // unit spec, padding k/2
  int64_t h, w, ho, wo;       // input and output plane size
  int64_t vw;                 // vector width (8 or 16)
  int64_t wo_r;               // wo rounded up to a multiple of vw: every row is computed in whole vectors
  int64_t hp, wq;             // padded input buffer: rows, floats per row and phase
  int64_t th, wh;             // tile rows, hidden buffer floats per row
  int64_t in_size() const { return a * s * hp * wq; }
  int64_t hid_size() const { return b * (th + 2 * p) * wh; }
};

// R output rows x OB output channels of one conv, all columns [0, width_r) in vectors of VW.
// Source layout: channel stride cs, phase stride ps, row stride rs; output row r reads source rows
// row0 + r*s + dy and, for tap dx, phase dx % s at column offset dx / s. A template size of 0 means "runtime".
// Each output is relu(acc); with a residual `res` (laid out like dst) it is relu(relu(acc) + res).
template <int VW, int CIN, int K, int S, int OB, int R>
inline void conv_rows(const float* __restrict src, int64_t cs, int64_t ps, int64_t rs, int64_t row0,
                      int64_t cin_rt, int64_t k_rt, int64_t s_rt, const float* wt, const float* bias,
                      float* __restrict dst, const float* __restrict res,
                      int64_t dcs, int64_t drs, int64_t width_r, int64_t valid) {
  using V = Vec<VW>;
  const int64_t cin = CIN ? CIN : cin_rt, k = K ? K : k_rt, s = S ? S : s_rt;
  const int64_t wstride = cin * k * k;  // weights of one output channel
  for (int64_t x0 = 0; x0 < width_r; x0 += VW) {
    typename V::type acc[R][OB];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int o = 0; o < OB; ++o) acc[r][o] = V::splat(bias[o]);
    if constexpr (K > 0 && S > 0) {
      // Known sizes: each source row is loaded once per (channel, dx) and feeds every output row and dy it
      // touches ((R - 1) * S + K loads instead of R * K); the K * OB weights of the column stay in registers.
#pragma GCC unroll 8
      for (int64_t i = 0; i < cin; ++i)
#pragma GCC unroll 8
        for (int dx = 0; dx < K; ++dx) {
          typename V::type wv[K][OB];
#pragma GCC unroll 8
          for (int dy = 0; dy < K; ++dy)
#pragma GCC unroll 8
            for (int o = 0; o < OB; ++o) wv[dy][o] = V::splat(wt[o * wstride + (i * K + dy) * K + dx]);
          const float* sp = src + i * cs + (dx % S) * ps + row0 * rs + x0 + dx / S;
#pragma GCC unroll 32
          for (int j = 0; j < (R - 1) * S + K; ++j) {  // source row j feeds output row (j - dy) / S
            const typename V::type v = V::load(sp + j * rs);
#pragma GCC unroll 8
            for (int dy = 0; dy < K; ++dy)
              if (j - dy >= 0 && (j - dy) % S == 0 && (j - dy) / S < R)
#pragma GCC unroll 8
                for (int o = 0; o < OB; ++o) acc[(j - dy) / S][o] += wv[dy][o] * v;
          }
        }
    } else {
#pragma GCC unroll 8
      for (int64_t i = 0; i < cin; ++i)
#pragma GCC unroll 8
        for (int64_t dy = 0; dy < k; ++dy)
#pragma GCC unroll 8
          for (int64_t dx = 0; dx < k; ++dx) {
            const float* sp = src + i * cs + (dx % s) * ps + (row0 + dy) * rs + x0 + dx / s;
            const float* wp = wt + (i * k + dy) * k + dx;
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
              const typename V::type v = V::load(sp + r * s * rs);
#pragma GCC unroll 8
              for (int o = 0; o < OB; ++o) acc[r][o] += V::splat(wp[o * wstride]) * v;
            }
          }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int o = 0; o < OB; ++o) {
        const int64_t off = o * dcs + r * drs + x0;
        float* dp = dst + off;
        typename V::type y = V::relu(acc[r][o]);
        const bool whole = x0 + VW <= valid;
        if (res && whole) {
          y = V::relu(y + V::load(res + off));
        } else if (res) {  // the last, partial vector of a residual row: its lanes past the row end read zeros
          float tmp[VW] = {};
          std::memcpy(tmp, res + off, sizeof(float) * (valid - x0));
          y = V::relu(y + V::load(tmp));
        }
        if (whole) {
          V::store(dp, y);
        } else {  // the last, partial vector of an output row
          float tmp[VW];
          V::store(tmp, y);
          std::memcpy(dp, tmp, sizeof(float) * (valid - x0));
        }
      }
  }
}

// Rows [lo, hi) of one conv: blocks of R rows (then of R/2 where the channels are known only at run time), then
// single rows. OB channels per pass, `passes` passes.
template <int VW, int CIN, int K, int S, int OB, int R>
inline void conv_range(const float* src, int64_t cs, int64_t ps, int64_t rs, int64_t src_row_of_lo, int64_t lo,
                       int64_t hi, int64_t cin, int64_t k, int64_t s, int64_t passes, const float* wt,
                       const float* bias, float* dst_of_lo, const float* res_of_lo, int64_t dcs, int64_t drs,
                       int64_t width_r, int64_t valid) {
  for (int64_t q = 0; q < passes; ++q) {
    const float* w = wt + q * OB * cin * k * k;
    const float* bq = bias + q * OB;
    float* d0 = dst_of_lo + q * OB * dcs;
    const float* r0 = res_of_lo ? res_of_lo + q * OB * dcs : nullptr;
    int64_t r = lo;
    for (; r + R <= hi; r += R)
      conv_rows<VW, CIN, K, S, OB, R>(src, cs, ps, rs, src_row_of_lo + (r - lo) * s, cin, k, s, w, bq,
                                      d0 + (r - lo) * drs, r0 ? r0 + (r - lo) * drs : nullptr, dcs, drs,
                                      width_r, valid);
    if constexpr (CIN == 0 && R >= 4)  // run-time channels (small planes are common there): half blocks next
      for (; r + R / 2 <= hi; r += R / 2)
        conv_rows<VW, CIN, K, S, OB, R / 2>(src, cs, ps, rs, src_row_of_lo + (r - lo) * s, cin, k, s, w, bq,
                                            d0 + (r - lo) * drs, r0 ? r0 + (r - lo) * drs : nullptr, dcs, drs,
                                            width_r, valid);
    for (; r < hi; ++r)
      conv_rows<VW, CIN, K, S, OB, 1>(src, cs, ps, rs, src_row_of_lo + (r - lo) * s, cin, k, s, w, bq,
                                      d0 + (r - lo) * drs, r0 ? r0 + (r - lo) * drs : nullptr, dcs, drs,
                                      width_r, valid);
  }
}

// Columns [c, c + 2*VW) of a unit-stride row split into their even and odd ones (for stride 2): column j goes to
// phase (j + p) % 2, column (j + p) / 2 of the padded buffer row d (phases `phase_stride` floats apart).
template <int VW>
inline void split_columns(const float* __restrict src, float* __restrict d, int64_t phase_stride, int64_t c,
                          int64_t p) {
  using V = Vec<VW>;
  const typename V::type lo = V::load(src + c), hi = V::load(src + c + VW);
  typename V::type even, odd;
  if constexpr (VW == 16) {
    even = __builtin_shufflevector(lo, hi, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    odd = __builtin_shufflevector(lo, hi, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  } else {
    even = __builtin_shufflevector(lo, hi, 0, 2, 4, 6, 8, 10, 12, 14);
    odd = __builtin_shufflevector(lo, hi, 1, 3, 5, 7, 9, 11, 13, 15);
  }
  const int64_t ce = c + p, co = c + 1 + p;  // where the even and the odd lanes go
  V::store(d + (ce % 2) * phase_stride + ce / 2, even);
  V::store(d + (co % 2) * phase_stride + co / 2, odd);
}

// One input row (w floats, unit stride) into the s phases of a padded buffer row: input column c goes to phase
// (c + p) % s, column (c + p) / s (phases `phase_stride` floats apart). In vectors of 16, then 8, for s = 1 (a
// copy) and s = 2 (split_columns); scalar otherwise and for the last columns.
template <int S>
inline void fill_row(const float* __restrict src, float* __restrict d, int64_t phase_stride, int64_t w, int64_t p,
                     int64_t s) {
  int64_t c = 0;
  if constexpr (S == 1) {
    for (; c + 16 <= w; c += 16) {
      Vec<16>::store(d + c + p, Vec<16>::load(src + c));
      asm volatile("");  // keeps GCC from turning the loop into a memmove call (a call per 64-byte row)
    }
    for (; c + 8 <= w; c += 8) Vec<8>::store(d + c + p, Vec<8>::load(src + c));
  } else if constexpr (S == 2) {
    for (; c + 32 <= w; c += 32) split_columns<16>(src, d, phase_stride, c, p);
    for (; c + 16 <= w; c += 16) split_columns<8>(src, d, phase_stride, c, p);
  }
  for (; c < w; ++c) d[((c + p) % s) * phase_stride + (c + p) / s] = src[c];
}

// The unit's input planes into the padded, phase-split buffer [a][s][hp][wq]. Only the interior is written: the
// buffer starts zeroed and its borders are the same for every item, so they stay zero. `x` points at the item's
// first input channel; rows with unit column stride (NCHW) are copied by fill_row, any other layout (channels_last)
// element by element. Input rows and columns past the buffer's (never read by the convolution) are not copied.
template <int S>
void fill_input(const Geometry& g, const float* __restrict x, const Strides& st, float* __restrict buf) {
  const int64_t s = S ? S : g.s, p = g.p;
  const int64_t rows = std::min(g.hp, g.h + p) - p;    // input rows 0 .. rows-1 land in buffer rows p ..
  const int64_t cols = std::min(g.w, g.wq * s - p);     // input columns 0 .. cols-1 land in buffer columns < wq
  const int64_t phase = g.hp * g.wq, plane = s * phase;  // floats between phases, between channels
  for (int64_t i = 0; i < g.a; ++i)
    for (int64_t r = 0; r < rows; ++r) {
      const float* __restrict src = x + i * st.c + r * st.h;
      float* __restrict d = buf + i * plane + (r + p) * g.wq;
      if (st.w == 1 && cols == g.w) {
        fill_row<S>(src, d, phase, cols, p, s);
      } else {
        for (int64_t c = 0; c < cols; ++c) d[((c + p) % s) * phase + (c + p) / s] = src[c * st.w];
      }
    }
}

// One (image, unit) item: the unit's input channels of image x (already in inbuf, see fill_input) to its output
// channels of image y.
template <int VW, int A, int B, int C, int K, int S, int OB1, int OB2, int R1, int R2>
void run_item(const Geometry& g, float* y, const float* res, const float* w1, const float* b1,
              const float* w2, const float* b2, float* inbuf, float* hid) {
  const int64_t p = g.p, hrows = g.th + 2 * p, hcs = hrows * g.wh;
  for (int64_t t0 = 0; t0 < g.ho; t0 += g.th) {
    const int64_t t1 = std::min(g.ho, t0 + g.th);
    const int64_t lo = std::max<int64_t>(0, t0 - p), hi = std::min(g.ho, t1 + p);  // hidden rows of this tile
    const int64_t base = t0 - p;  // hidden row r lives in buffer row r - base
    // zero rows outside the plane (conv2's vertical padding); with one tile per plane they are never written
    // (the buffer starts zeroed), so only tiled planes clear them
    for (int64_t j = 0; j < g.b && g.th < g.ho; ++j) {
      if (lo > base) std::memset(hid + j * hcs, 0, sizeof(float) * (lo - base) * g.wh);
      if (base + hrows > hi)
        std::memset(hid + j * hcs + (hi - base) * g.wh, 0, sizeof(float) * (base + hrows - hi) * g.wh);
    }
    conv_range<VW, A, K, S, OB1, R1>(inbuf, g.s * g.hp * g.wq, g.hp * g.wq, g.wq, lo * g.s, lo, hi, g.a, g.k, g.s,
                                     g.b / OB1, w1, b1, hid + (lo - base) * g.wh + p, nullptr, hcs, g.wh, g.wo_r,
                                     g.wo_r);
    // conv2's horizontal padding: columns [0, p) and [p + wo_r, wh) are never written (zero from the start);
    // [p + wo, p + wo_r) holds the lanes past the row end of the last vector and is cleared here
    if (g.wo_r > g.wo)
      for (int64_t j = 0; j < g.b; ++j)
        for (int64_t r = lo; r < hi; ++r)
          std::memset(hid + j * hcs + (r - base) * g.wh + p + g.wo, 0, sizeof(float) * (g.wo_r - g.wo));
    conv_range<VW, B, K, 1, OB2, R2>(hid, hcs, 0, g.wh, 0, t0, t1, g.b, g.k, 1, g.c / OB2, w2, b2,
                                     y + t0 * g.wo, res ? res + t0 * g.wo : nullptr, g.ho * g.wo, g.wo, g.wo_r,
                                     g.wo);
  }
}

using FillFn = void (*)(const Geometry&, const float*, const Strides&, float*);
using ItemFn = void (*)(const Geometry&, float*, const float*, const float*, const float*,
                        const float*, const float*, float*, float*);

// Rows per step: about 16 accumulators (R rows x all outputs), so each weight, broadcast once per step, feeds R
// vector FMAs. The weights are deliberately not __restrict: the compiler then reloads them after each step's
// stores instead of hoisting all k*k*a*b broadcasts out of the loops and spilling them to the stack.
constexpr int clamp_rows(int outputs) { return outputs >= 16 ? 1 : (16 / outputs > 8 ? 8 : 16 / outputs); }

template <int VW, int A, int B, int C, int K, int S>
constexpr ItemFn fixed_item() {
  return &run_item<VW, A, B, C, K, S, B, C, clamp_rows(B), clamp_rows(C)>;
}

// A 3x3 shape outside the fixed list: channel counts at run time, 4, 2 or 1 output channels per pass (the most
// that divides both b and c), about 16 accumulators.
template <int VW, int S>
ItemFn k3_item(int64_t b, int64_t c) {
  if (b % 4 == 0 && c % 4 == 0) return &run_item<VW, 0, 0, 0, 3, S, 4, 4, 4, 4>;
  if (b % 2 == 0 && c % 2 == 0) return &run_item<VW, 0, 0, 0, 3, S, 2, 2, 8, 8>;
  return &run_item<VW, 0, 0, 0, 3, S, 1, 1, 8, 8>;
}

struct Variant {
  int a, b, c, k, s;
  ItemFn fn8, fn16;
  FillFn fill;
};

// The specialised unit shapes: the paper's exploration catalogue and the uniform 2-4 plans (2-4-2 keeps the
// width, 2-4-4 doubles it), each at stride 1 and 2, kernel 3.
#define BUNIT_STRIDE(A, B, C, S) \
  {A, B, C, 3, S, fixed_item<8, A, B, C, 3, S>(), fixed_item<16, A, B, C, 3, S>(), &fill_input<S>}
#define BUNIT_VARIANT(A, B, C) BUNIT_STRIDE(A, B, C, 1), BUNIT_STRIDE(A, B, C, 2)
const Variant kVariants[] = {
    BUNIT_VARIANT(1, 2, 1), BUNIT_VARIANT(1, 2, 2), BUNIT_VARIANT(1, 2, 3), BUNIT_VARIANT(2, 1, 1),
    BUNIT_VARIANT(2, 1, 2), BUNIT_VARIANT(3, 2, 1), BUNIT_VARIANT(2, 4, 2), BUNIT_VARIANT(2, 4, 4),
};
#undef BUNIT_VARIANT
#undef BUNIT_STRIDE

const Variant* find_variant(int64_t a, int64_t b, int64_t c, int64_t k, int64_t s) {
  for (const Variant& v : kVariants)
    if (v.a == a && v.b == b && v.c == c && v.k == k && v.s == s) return &v;
  return nullptr;
}

Geometry make_geometry(int64_t a, int64_t b, int64_t c, int64_t k, int64_t s, int64_t h, int64_t w) {
  Geometry g{};
  g.a = a, g.b = b, g.c = c, g.k = k, g.s = s, g.p = k / 2, g.h = h, g.w = w;
  g.ho = (h + 2 * g.p - k) / s + 1;
  g.wo = (w + 2 * g.p - k) / s + 1;
  const int64_t waste16 = (g.wo + 15) / 16 * 16 - g.wo, waste8 = (g.wo + 7) / 8 * 8 - g.wo;
  g.vw = waste8 < waste16 ? 8 : 16;
  g.wo_r = (g.wo + g.vw - 1) / g.vw * g.vw;
  g.hp = (g.ho - 1) * s + k;
  g.wq = g.wo_r + (k - 1) / s;
  g.wh = g.wo_r + k - 1;
  const int64_t budget = 8192;  // floats of hidden rows per tile (32 KiB): an L1-sized working set
  g.th = std::max<int64_t>(1, std::min<int64_t>(g.ho, budget / (b * g.wh) - 2 * g.p));
  return g;
}

// The residual of one item gathered into buf [c][ho][wo]: output channel `first + j` adds channel `first + j`
// of r (rc channels, element strides st) at rows and columns times `step` (zero where that channel does not
// exist: an option-A shortcut's padding). Returns false when none of the item's channels exists (no residual).
bool gather_residual(const float* r, int64_t rc, const Strides& st, int64_t step, int64_t first, int64_t c,
                     int64_t ho, int64_t wo, float* __restrict buf) {
  if (first >= rc || first + c <= 0) return false;
  for (int64_t j = 0; j < c; ++j) {
    float* __restrict d = buf + j * ho * wo;
    if (first + j < 0 || first + j >= rc) {
      std::memset(d, 0, sizeof(float) * ho * wo);
      continue;
    }
    const float* src = r + (first + j) * st.c;
    for (int64_t yy = 0; yy < ho; ++yy)
      for (int64_t xx = 0; xx < wo; ++xx) d[yy * wo + xx] = src[yy * step * st.h + xx * step * st.w];
  }
  return true;
}


// Runs every (image, unit) item of the call; returns whether a fixed-shape kernel ran.
template <class ParallelFor>
bool run_group_items(const GroupCall& call, ParallelFor&& parallel_for) {
  const int64_t a = call.a, b = call.b, c = call.c, k = call.k, s = call.s, units = call.units, cout = call.cout;
  const int64_t res_step = call.res_step, res_offset = call.res_offset, rc = call.rc;
  const bool gather = call.gather;
  const Strides xs = call.xs, rs = call.rs;
  const Geometry g = make_geometry(a, b, c, k, s, call.h, call.w);
  const int64_t* in_p = call.in_start;
  const int64_t* out_p = call.out_start;
  const float* rp = call.res;
  const Variant* variant = find_variant(a, b, c, k, s);
  ItemFn fn = nullptr;
  FillFn fill = &fill_input<0>;
  if (variant) {
    fn = g.vw == 8 ? variant->fn8 : variant->fn16, fill = variant->fill;
  } else if (k == 3 && s == 1) {  // other 3x3 shapes: channels at run time, rows reused as in the fixed shapes
    fn = g.vw == 8 ? k3_item<8, 1>(b, c) : k3_item<16, 1>(b, c);
    fill = &fill_input<1>;
  } else if (k == 3 && s == 2) {
    fn = g.vw == 8 ? k3_item<8, 2>(b, c) : k3_item<16, 2>(b, c);
    fill = &fill_input<2>;
  } else {  // the generic path: runtime sizes, one output channel and row per pass
    fn = g.vw == 8 ? &run_item<8, 0, 0, 0, 0, 0, 1, 1, 1, 1> : &run_item<16, 0, 0, 0, 0, 0, 1, 1, 1, 1>;
  }
  const float* xp = call.x;
  float* yp = call.y;
  const float *w1p = call.w1, *b1p = call.b1;
  const float *w2p = call.w2, *b2p = call.b2;
  const int64_t out_plane = g.ho * g.wo;
  parallel_for(call.n * units, [&](int64_t begin, int64_t end) {
    // two input buffers: the next item's input is copied in before this item runs, so that its stores have
    // retired when the convolution loads them (a load that overlaps a pending store at another offset stalls)
    std::vector<float> inbuf(2 * (g.in_size() + kMaxVW)), hid(g.hid_size() + kMaxVW), rbuf(gather ? c * out_plane : 0);
    float* bufs[2] = {inbuf.data(), inbuf.data() + g.in_size() + kMaxVW};
    auto input_of = [&](int64_t item) { return xp + (item / units) * xs.n + in_p[item % units] * xs.c; };
    if (begin < end) fill(g, input_of(begin), xs, bufs[0]);
    for (int64_t item = begin; item < end; ++item) {
      if (item + 1 < end) fill(g, input_of(item + 1), xs, bufs[(item + 1 - begin) & 1]);
      const int64_t img = item / units, u = item % units;
      const int64_t out_off = (img * cout + out_p[u]) * out_plane;
      const float* res = rp && !gather ? rp + out_off : nullptr;
      if (gather && gather_residual(rp + img * rs.n, rc, rs, res_step, out_p[u] - res_offset, c, g.ho, g.wo,
                                    rbuf.data()))
        res = rbuf.data();
      fn(g, yp + out_off, res, w1p + u * b * a * k * k, b1p + u * b, w2p + u * c * b * k * k, b2p + u * c,
         bufs[(item - begin) & 1], hid.data());
    }
  });
  return variant != nullptr;
}

}  // namespace bunit_unit

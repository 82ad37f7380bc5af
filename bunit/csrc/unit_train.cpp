// Grouped 3x3 convolution for training unit layers on CPU: forward, gradient of the input and of the weight.
//
// A unit layer's group of n same-spec units is two grouped convolutions with a (then b) channels per group, 1-8
// of them: oneDNN's grouped convolution is slow there in training (its backward of a 2-1-2 row runs at about
// 1.4 GMAC/s on 2 cores here). This kernel computes exactly what F.conv2d(x, w, None, s, k // 2, groups=n)
// computes, and its two gradients, for k = 3 and s = 1 or 2 (bunit/unit_train.py wraps it in an
// autograd.Function). In training, a unit group's BatchNorm (batch statistics) and ReLU are fused around its two
// convolutions (the section at the end of this file).
//
// Work items are (image, group) pairs, run in parallel with at::parallel_for. Per item:
//   1. the group's `cin` input planes are copied into a zero-padded buffer, columns split by phase (column mod s),
//      so that every tap of a strided conv reads contiguous values (any input layout: read through strides; NCHW rows
//      split 32 columns at a time by AVX-512 permutes); with bf16 dot products, the paired buffers are built straight
//      from the tensor instead (see "built straight from the stored tensors");
//   2. forward: VW output columns x OB output channels at a time in GCC vector registers, summed over (ci, dy, dx),
//      written in the input's memory format (NCHW or channels_last);
//   3. backward: the output gradient is copied into a buffer whose rows are padded to whole vectors (zeros past
//      the row end); the weight gradient is a dot product over rows and vectors (9 accumulators per (o, ci)),
//      into a per-thread buffer summed at the end; the input gradient at stride 1 is a convolution of the padded
//      gradient with the flipped weights, at stride 2 it is scattered into a padded, phase-split buffer (every
//      (o, dy, dx) adds w * gy to the input positions it read), then copied out without padding.
// float and double (double for gradcheck); bf16 storage with float32 arithmetic, or with bf16 dot products where the
// CPU has AVX512-BF16 (see "bf16 dot products" below). Rows of 2-1-2 and 2-1-4 units given channels_last tensors run
// in kernels of their own, 16 units per vector (or 8 units of two pixels; see "rows of 2-1-2 and 2-1-4 units in
// channels_last"), and so do
// hybrid rows, one lane per channel (see "hybrid rows in channels_last"). The
// accumulation order differs from oneDNN's: float results agree to rounding (about 1e-6 relative).
// Light headers, not <torch/extension.h> (the whole C++ frontend): the build takes about a third of the time.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

// Scratch buffers and weight tables at 64-byte boundaries (whole cache lines), whatever the heap hands out: the
// kernels' 64-byte loads and stores of them never span two lines (or pages). In a std::vector's storage (16-byte
// aligned) they could, by where the heap had put the buffer, and the cost followed the process: a hybrid row's gather
// of a pixel's words just written to such a buffer stalled in some processes (row_conv1_backward of a 48-lane row
// 1.1 + k x 4.6 ms, k = 0-5, instead of 1.1 ms; the same call the same time again and again; measured, the
// mechanism not pinned down), so the kernels' scratch buffers, weight tables and per-thread double sums of BN are
// all of these.
template <typename T>
struct Align64 {
  using value_type = T;
  Align64() = default;
  template <typename U>
  Align64(const Align64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const Align64<U>&) const { return true; }
  template <typename U>
  bool operator!=(const Align64<U>&) const { return false; }
};
template <typename T>
using Scratch = std::vector<T, Align64<T>>;

template <typename T>
struct V {
  static constexpr int W = 64 / sizeof(T);  // one 64-byte vector: 16 floats or 8 doubles
  typedef T type __attribute__((vector_size(64)));
  typedef T unaligned __attribute__((vector_size(64), aligned(sizeof(T)), may_alias));
  static type load(const T* p) { return *reinterpret_cast<const unaligned*>(p); }
  static void store(T* p, type v) { *reinterpret_cast<unaligned*>(p) = v; }
  static type splat(T x) { return x - type{}; }
};

// How the kernel reads and writes tensor memory of type M while computing in T: M = T, or M = bfloat16 with T =
// float (bf16 storage under autocast: values widened exactly on load, rounded to nearest even on store, as
// c10::BFloat16 and Tensor.to(torch.bfloat16) round). The padded work buffers are always T.
template <typename T, typename M>
struct IO;

// The first n (0 < n < W) values of a vector: AVX-512 masked stores where the build has them (rows of 7, 14 and 28
// values end in a part of a vector), else one value at a time.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
constexpr bool kMasked = true;
#else
constexpr bool kMasked = false;
#endif

template <typename T>
struct IO<T, T> {
  static typename V<T>::type load(const T* p) { return V<T>::load(p); }
  static typename V<T>::type load_n(const T* p, int64_t n) {  // zeros past n
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    if constexpr (std::is_same_v<T, float>)
      return (typename V<T>::type)_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
#endif
    typename V<T>::type v{};
    for (int64_t j = 0; j < n; ++j) v[j] = p[j];
    return v;
  }
  static void store(T* p, typename V<T>::type v) { V<T>::store(p, v); }
  static T get(const T* p) { return *p; }
  static void put(T* p, T v) { *p = v; }
  static void store_n(T* p, typename V<T>::type v, int64_t n) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    if constexpr (std::is_same_v<T, float>) {
      _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), (__m512)v);
      return;
    } else if constexpr (std::is_same_v<T, double>) {
      _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1), (__m512d)v);
      return;
    }
#endif
    for (int64_t j = 0; j < n; ++j) p[j] = v[j];
  }
};

template <>
struct IO<float, c10::BFloat16> {
  typedef uint16_t half16 __attribute__((vector_size(32)));
  typedef uint16_t half16u __attribute__((vector_size(32), aligned(2), may_alias));
  typedef uint32_t word16 __attribute__((vector_size(64)));
  using F = V<float>::type;
  // 16-bit to 32-bit lanes and back: AVX-512's one-instruction conversions where the build has them (GCC splits
  // the generic vector conversions into 128-bit pieces)
  static word16 widen(half16 h) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    return (word16)_mm512_cvtepu16_epi32((__m256i)h);
#else
    return __builtin_convertvector(h, word16);
#endif
  }
  static half16 narrow(word16 w) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    return (half16)_mm512_cvtepi32_epi16((__m512i)w);
#else
    return __builtin_convertvector(w, half16);
#endif
  }
  static F load(const c10::BFloat16* p) { return (F)(widen(*reinterpret_cast<const half16u*>(p)) << 16); }
  static void store(c10::BFloat16* p, F v) {
    const word16 u = (word16)v;
    const word16 nan = (word16)(v != v);  // all ones in NaN lanes, which become the quiet NaN 0x7fc0
    const word16 r = ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16 & ~nan) | (0x7fc0u & nan);
    *reinterpret_cast<half16u*>(p) = narrow(r);
  }
  static float get(const c10::BFloat16* p) { return static_cast<float>(*p); }
  static void put(c10::BFloat16* p, float v) { *p = c10::BFloat16(v); }
  static F load_n(const c10::BFloat16* p, int64_t n) {  // zeros past n
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    return (F)(widen((half16)_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p)) << 16);
#else
    F v{};
    for (int64_t j = 0; j < n; ++j) v[j] = get(p + j);
    return v;
#endif
  }
  static void store_n(c10::BFloat16* p, F v, int64_t n) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    const word16 u = (word16)v;
    const word16 nan = (word16)(v != v);
    const word16 r = ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16 & ~nan) | (0x7fc0u & nan);
    _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), (__m256i)narrow(r));
#else
    for (int64_t j = 0; j < n; ++j) put(p + j, v[j]);
#endif
  }
};

// --- bf16 dot products (AVX512-BF16): the multiplies of the bf16-storage path in bfloat16 ---------------------
//
// With bf16 storage and bf16_dot set, the convolutions multiply in bfloat16 as autocast's own convolutions do: each
// vdpbf16ps adds to 16 float lanes the products of two bf16 pairs (exact in float32), so 32 multiply-adds per
// instruction where a float32 FMA does 16. The operands are rounded to bf16 (nearest even) where they are not bf16
// already: the weights, the input of conv2 (BN1 + ReLU of the stored y1) and the output gradient taken through BN
// and ReLU. Sums stay float32 (BN's in double). Pairs run over two channels for the forward (input channels) and
// the input gradient (output channels), and over two output rows for the weight gradient, at strides 1 and 2 (a
// forward at stride 2 reads column-phase-split pairs; the input gradient at stride 2 has its own kernel,
// gx_s2_rows_dot). An odd count per group pairs its last channel with zeros (and a zero weight): a 2-1-2 unit's conv2
// (one input channel) multiplies in bf16 too.
#if defined(__AVX512BF16__)
constexpr bool kBf16Dot = true;
#else
constexpr bool kBf16Dot = false;
#endif
// Planes of up to 7 columns flattened (see "planes of up to 7 columns, flattened"): with AVX512-VBMI2's word expands.
#if defined(__AVX512BF16__) && defined(__AVX512VBMI2__)
constexpr bool kFlatPlanes = true;
#else
constexpr bool kFlatPlanes = false;
#endif
bool flat_planes = kFlatPlanes;  // off: the padded rows of the other planes (set_flat_planes, for side-by-side timing)
constexpr int kFlatImages = 16;  // the most items of a group whose flattened weight gradients gw_flat_dot sums

typedef uint32_t u32v __attribute__((vector_size(64)));
typedef uint32_t u32vu __attribute__((vector_size(64), aligned(4), may_alias));

// float bits rounded to nearest even bf16, kept in the upper 16 bits (NaN: the quiet NaN 0x7fc0), as IO stores.
inline u32v bf16_high(V<float>::type v) {
  const u32v u = (u32v)v;
  const u32v nan = (u32v)(v != v);
  return ((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u & ~nan) | (0x7fc00000u & nan);
}

inline uint32_t bf16_high(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if (v != v) return 0x7fc00000u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
}

// n pairs (lo[j], hi[j]) rounded to bf16: lo in the low half of each 32-bit word, hi in the high half.
inline void pack_pairs(const float* lo, const float* hi, int64_t n, uint32_t* dst) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    *reinterpret_cast<u32vu*>(dst + j) = (bf16_high(V<float>::load(lo + j)) >> 16) | bf16_high(V<float>::load(hi + j));
  for (; j < n; ++j) dst[j] = (bf16_high(lo[j]) >> 16) | bf16_high(hi[j]);
}

// n contiguous values of M into T.
template <typename T, typename M>
inline void widen_row(const M* src, int64_t n, T* dst) {
  if constexpr (std::is_same_v<T, M>) {
    std::memcpy(dst, src, sizeof(T) * n);
  } else {
    int64_t j = 0;
    for (; j + V<T>::W <= n; j += V<T>::W) V<T>::store(dst + j, IO<T, M>::load(src + j));
    if constexpr (kMasked) {
      if (j < n) IO<T, T>::store_n(dst + j, IO<T, M>::load_n(src + j, n - j), n - j);
    } else {
      for (; j < n; ++j) dst[j] = IO<T, M>::get(src + j);
    }
  }
}

// relu(src * a + b) over n contiguous values into dst: whole vectors, then the rest one by one (branch-free).
template <typename T, typename M = T>
inline void bn_relu_row(const M* src, int64_t n, T a, T b, T* dst) {
  using Vt = V<T>;
  const typename Vt::type va = Vt::splat(a), vb = Vt::splat(b), zero{};
  int64_t j = 0;
  for (; j + Vt::W <= n; j += Vt::W) {
    const typename Vt::type v = IO<T, M>::load(src + j) * va + vb;
    Vt::store(dst + j, v > zero ? v : zero);
  }
  for (; j < n; ++j) dst[j] = std::max(IO<T, M>::get(src + j) * a + b, T(0));
}

// The gradient reaching y through BN and ReLU, (y * sc + sh > 0 ? sc * g : 0) + y * A + B, over n contiguous values.
template <typename T, typename M = T>
inline void bn_relu_grad_row(const M* y, const M* gr, int64_t n, T sc, T sh, T A, T B, T* dst) {
  using Vt = V<T>;
  const typename Vt::type vsc = Vt::splat(sc), vsh = Vt::splat(sh), va = Vt::splat(A), vb = Vt::splat(B), zero{};
  int64_t j = 0;
  for (; j + Vt::W <= n; j += Vt::W) {  // branch-free: the ReLU mask is data, a branch would mispredict
    const typename Vt::type yv = IO<T, M>::load(y + j);
    const typename Vt::type gv = IO<T, M>::load(gr + j) * vsc;
    Vt::store(dst + j, (yv * vsc + vsh > zero ? gv : zero) + yv * va + vb);
  }
  for (; j < n; ++j) {
    const T yv = IO<T, M>::get(y + j), gv = IO<T, M>::get(gr + j) * sc;
    dst[j] = (yv * sc + sh > T(0) ? gv : T(0)) + yv * A + B;
  }
}

// Work (multiply-adds / 9) below which a call, or a chunk of items, is not split further between threads: a tiny
// call spends longer waking a second thread (or waiting for it on a busy machine) than computing.
constexpr int64_t kMinWork = 1 << 15;

struct Geo {
  int64_t n, groups, cin, cout, s;  // per group: cin input and cout output channels
  int64_t h, w, ho, wo;
  int64_t vw;  // the vector width the rows are rounded to: 16 floats, or 8 for rows of up to 8 (see DotV)
  int64_t wr;  // wo rounded up to whole vectors
  int64_t hp;  // padded rows
  int64_t wq;  // floats per padded row and phase
  int64_t plane() const { return s * hp * wq; }  // one input channel in the buffer
};

Geo geometry(const at::Tensor& x, const at::Tensor& w, int64_t groups, int64_t s, int64_t vw) {
  Geo g;
  g.n = x.size(0);
  g.groups = groups;
  g.cin = x.size(1) / groups;
  g.cout = w.size(0) / groups;
  g.s = s;
  g.h = x.size(2);
  g.w = x.size(3);
  g.ho = (g.h - 1) / s + 1;
  g.wo = (g.w - 1) / s + 1;
  g.vw = vw;
  g.wr = (g.wo + vw - 1) / vw * vw;
  g.hp = std::max(g.h + 2, (g.ho - 1) * s + 3);
  g.wq = g.wr + 3;
  return g;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// The first n (0 <= n <= 16) values at p as floats, zeros past n.
template <typename M>
inline __m512 load16(const M* p, int64_t n) {
  if (n <= 0) return _mm512_setzero_ps();
  if constexpr (std::is_same_v<M, float>) {
    return n >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  } else {
    return (__m512)(n >= 16 ? IO<float, M>::load(p) : IO<float, M>::load_n(p, n));
  }
}

// A contiguous row of w values split by phase for stride 2, 32 at a time: src[2k] to odd[k], src[2k + 1] to
// even[k], zeros past the row (whole vectors: the buffer rows hold them, see Geo).
template <typename M>
inline void split_row_s2(const M* src, int64_t w, float* even, float* odd) {
  const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t j = 0; j < w; j += 32) {
    const __m512 a = load16(src + j, w - j), b = load16(src + j + 16, w - j - 16);
    _mm512_storeu_ps(odd + j / 2, _mm512_permutex2var_ps(a, ie, b));
    _mm512_storeu_ps(even + j / 2, _mm512_permutex2var_ps(a, io, b));
  }
}

// Lanes 0-7 of a and b interleaved (a0, b0, a1, b1, ...), and lanes 8-15 the same.
inline __m512 interleave_lo(__m512 a, __m512 b) {
  return _mm512_permutex2var_ps(a, _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23), b);
}
inline __m512 interleave_hi(__m512 a, __m512 b) {
  return _mm512_permutex2var_ps(a, _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31), b);
}

// The inverse: dst[2k] = odd[k], dst[2k + 1] = even[k] for the w values of a contiguous row of M.
template <typename M>
inline void merge_row_s2(const float* even, const float* odd, int64_t w, M* dst) {
  for (int64_t j = 0; j < w; j += 32) {
    const __m512 a = _mm512_loadu_ps(odd + j / 2), b = _mm512_loadu_ps(even + j / 2);
    const V<float>::type v0 = (V<float>::type)interleave_lo(a, b);
    const V<float>::type v1 = (V<float>::type)interleave_hi(a, b);
    if (w - j >= 32) {
      IO<float, M>::store(dst + j, v0);
      IO<float, M>::store(dst + j + 16, v1);
    } else if (w - j > 16) {
      IO<float, M>::store(dst + j, v0);
      IO<float, M>::store_n(dst + j + 16, v1, w - j - 16);
    } else if (w - j == 16) {
      IO<float, M>::store(dst + j, v0);
    } else {
      IO<float, M>::store_n(dst + j, v0, w - j);
    }
  }
}
#endif

// One input plane (row stride rs, column stride cs) into its padded, phase-split place dst in the buffer.
template <typename T, typename M>
inline void pad_plane(const M* src, int64_t rs, int64_t cs, const Geo& g, T* dst) {
  for (int64_t r = 0; r < g.h; ++r) {
    const M* sr = src + r * rs;
    T* dr = dst + (r + 1) * g.wq;
    if (g.s == 1) {
      if (cs == 1) {
        widen_row(sr, g.w, dr + 1);
      } else {
        for (int64_t c = 0; c < g.w; ++c) dr[c + 1] = IO<T, M>::get(sr + c * cs);
      }
    } else {  // s == 2: padded column c + 1 goes to phase (c + 1) % 2, position (c + 1) / 2
      T* odd = dr + g.hp * g.wq;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
      if constexpr (std::is_same_v<T, float>) {
        if (cs == 1) {
          split_row_s2(sr, g.w, dr + 1, odd);
          continue;
        }
      }
#endif
      for (int64_t c = 0; c < g.w; c += 2) odd[c / 2] = IO<T, M>::get(sr + c * cs);
      for (int64_t c = 1; c < g.w; c += 2) dr[(c + 1) / 2] = IO<T, M>::get(sr + c * cs);
    }
  }
}

// Input plane ci of group gi of image ni into buf: padded row r + 1, padded column c + 1, split by phase. With isc
// (and ish), the plane is taken through the previous BatchNorm and ReLU: relu(v * isc[c] + ish[c]), c the channel.
template <typename T, typename M = T>
void pad_copy(const M* x, const int64_t* xs, const Geo& g, int64_t ni, int64_t gi, T* buf, const T* isc = nullptr,
              const T* ish = nullptr, T* tmp = nullptr) {
  std::fill(buf, buf + g.cin * g.plane(), T(0));
  for (int64_t ci = 0; ci < g.cin; ++ci) {
    const int64_t ch = gi * g.cin + ci;
    const M* src = x + ni * xs[0] + ch * xs[1];
    T* dst = buf + ci * g.plane();
    if (isc) {  // through BN and ReLU into tmp, a whole plane at a time where it is contiguous
      if (xs[3] == 1 && xs[2] == g.w) {
        bn_relu_row(src, g.h * g.w, isc[ch], ish[ch], tmp);
      } else {
        for (int64_t r = 0; r < g.h; ++r)
          for (int64_t c = 0; c < g.w; ++c)
            tmp[r * g.w + c] = std::max(IO<T, M>::get(src + r * xs[2] + c * xs[3]) * isc[ch] + ish[ch], T(0));
      }
      pad_plane<T, T>(tmp, g.w, 1, g, dst);
    } else {
      pad_plane<T, M>(src, xs[2], xs[3], g, dst);
    }
  }
}

// One vector of results into VW values of a row at dst (column stride cs), the first `valid` of them.
template <typename T, typename M>
inline void store_row(typename V<T>::type v, M* dst, int64_t cs, int64_t valid) {
  if (cs == 1 && valid == V<T>::W) {
    IO<T, M>::store(dst, v);
  } else if (cs == 1 && kMasked) {
    IO<T, M>::store_n(dst, v, valid);
  } else {
    T tmp[V<T>::W];
    V<T>::store(tmp, v);
    for (int64_t j = 0; j < valid; ++j) IO<T, M>::put(dst + j * cs, tmp[j]);
  }
}

// Rows i .. rows in blocks of RB, then of RB / 2, ... 1: f(integral_constant<RB>, first row).
template <int RB, typename F>
inline void rows_from(int64_t i, int64_t rows, F& f) {
  for (; i + RB <= rows; i += RB) f(std::integral_constant<int, RB>{}, i);
  if constexpr (RB > 1) rows_from<RB / 2>(i, rows, f);
}

// Rows 0 .. rows of one block of OB channels in blocks of RB = 16 / OB rows, at most 8 (RB * OB independent
// accumulators, 16 from two channels up), then halves for the rows left (7 rows: 4 + 2 + 1 at OB = 2). ONE: a row at
// a time. (16 against 8 accumulators: the 8-8-8 units' dot-product convolutions 7-12% faster.)
template <int OB, bool ONE = false, typename F>
inline void in_row_blocks(int64_t rows, F&& f) {
  rows_from<(ONE || 16 / OB <= 1 ? 1 : (16 / OB > 8 ? 8 : 16 / OB))>(0, rows, f);
}

// Channels 0 .. n in blocks of 8, 4, 2 and 1: f(integral_constant<OB>, first channel). ONE: a channel at a time.
// double (gradcheck only) runs one channel and one row at a time: fewer copies of the unrolled kernels to compile.
template <bool ONE = false, typename F>
inline void in_channel_blocks(int64_t n, F&& f) {
  int64_t c = 0;
  if constexpr (!ONE) {
    for (; c + 8 <= n; c += 8) f(std::integral_constant<int, 8>{}, c);
    for (; c + 4 <= n; c += 4) f(std::integral_constant<int, 4>{}, c);
    for (; c + 2 <= n; c += 2) f(std::integral_constant<int, 2>{}, c);
  }
  for (; c < n; ++c) f(std::integral_constant<int, 1>{}, c);
}

// Forward of OB output channels (o0 .. o0 + OB) of one item, rows i0 .. i0 + RB, from the padded input buffer. RB
// rows at once give RB * OB independent accumulators: with one or two output channels (the 2-1-2 units) a single
// chain of dependent multiply-adds per vector would leave the FMA units waiting on their latency.
template <typename T, typename M, int OB, int S, int RB>
inline void fwd_rows(const T* buf, const T* wg, const Geo& g, int64_t o0, M* y, const int64_t* ys, int64_t ni,
                     int64_t gi, int64_t i0) {
  using Vt = V<T>;
  constexpr int VW = Vt::W;
  const int64_t cin = g.cin;
  constexpr int64_t s = S;
  for (int64_t x0 = 0; x0 < g.wr; x0 += VW) {
    typename Vt::type acc[RB][OB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
      for (int o = 0; o < OB; ++o) acc[r][o] = typename Vt::type{};
    for (int64_t ci = 0; ci < cin; ++ci) {
      const T* plane = buf + ci * g.plane();
      for (int dy = 0; dy < 3; ++dy) {
#pragma GCC unroll 3
        for (int dx = 0; dx < 3; ++dx) {
          const T* wp = wg + ((o0 * cin + ci) * 3 + dy) * 3 + dx;
          typename Vt::type wv[OB];
#pragma GCC unroll 8
          for (int o = 0; o < OB; ++o) wv[o] = Vt::splat(wp[o * cin * 9]);
#pragma GCC unroll 8
          for (int r = 0; r < RB; ++r) {
            const T* row = plane + ((i0 + r) * s + dy) * g.wq;
            const typename Vt::type v = Vt::load(row + (dx % s) * g.hp * g.wq + x0 + dx / s);
#pragma GCC unroll 8
            for (int o = 0; o < OB; ++o) acc[r][o] += wv[o] * v;
          }
        }
      }
    }
    const int64_t valid = std::min<int64_t>(VW, g.wo - x0);
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
      for (int o = 0; o < OB; ++o)
        store_row<T, M>(acc[r][o], y + ni * ys[0] + (gi * g.cout + o0 + o) * ys[1] + (i0 + r) * ys[2] + x0 * ys[3],
                        ys[3], valid);
  }
}

template <typename T, typename M, int S>
void fwd_all(const T* buf, const T* wg, const Geo& g, M* yp, const int64_t* ys, int64_t ni, int64_t gi) {
  constexpr bool one = std::is_same_v<T, double>;
  in_channel_blocks<one>(g.cout, [&](auto ob, int64_t o0) {
    constexpr int OB = decltype(ob)::value;
    in_row_blocks<OB, one>(g.ho, [&](auto rb, int64_t i) {
      fwd_rows<T, M, OB, S, decltype(rb)::value>(buf, wg, g, o0, yp, ys, ni, gi, i);
    });
  });
}

#if defined(__AVX512BF16__)
// --- the same three convolutions with bf16 dot products (see "bf16 dot products" above) ---------------------------

inline __m512bh bf16_pairs(const uint32_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh bf16_pair_splat(uint32_t w) { return (__m512bh)_mm512_set1_epi32(static_cast<int>(w)); }

// The dot-product kernels' vectors: 16 float lanes (zmm), or 8 (ymm) for rows of up to 8 values, where 16 lanes
// would leave more than half of them idle (the 7 px planes of a ResNet's last stage). On a CPU that runs 512-bit
// instructions as two 256-bit halves (AMD Zen 4), an 8-lane dot product costs half of a 16-lane one.
template <int VW>
struct DotV;

template <>
struct DotV<16> {
  using F = __m512;
  using B = __m512bh;
  static F zero() { return _mm512_setzero_ps(); }
  static B load(const uint32_t* p) { return bf16_pairs(p); }
  static B splat(uint32_t w) { return bf16_pair_splat(w); }
  static F dot(F a, B x, B y) { return _mm512_dpbf16_ps(a, x, y); }
  static V<float>::type wide(F a) { return (V<float>::type)a; }  // all 16 lanes
  static float sum(F a) { return _mm512_reduce_add_ps(a); }
  static void add_to(float* p, F a) { _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), a)); }
};

template <>
struct DotV<8> {
  using F = __m256;
  using B = __m256bh;
  static F zero() { return _mm256_setzero_ps(); }
  static B load(const uint32_t* p) { return (B)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static B splat(uint32_t w) { return (B)_mm256_set1_epi32(static_cast<int>(w)); }
  static F dot(F a, B x, B y) { return _mm256_dpbf16_ps(a, x, y); }
  static V<float>::type wide(F a) { return (V<float>::type)_mm512_castps256_ps512(a); }  // lanes 8-15 undefined
  static float sum(F a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
  }
  static void add_to(float* p, F a) { _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), a)); }
};

// A 3x3 convolution at stride S (1 or 2) with bf16 dot products, rows r0 .. r0 + RB of output channels o0 .. o0 + OB
// of one item: np padded planes of 32-bit words (plane stride ps, rows of wq words, value (i, j) at row i + 1, column
// j + 1; at stride 2 split by column phase as pad_plane splits them, the odd phase hp rows after the even), each word
// a pair of input channels, and weights paired the same way (w[(o * np + k) * 9 + tap]). The output has `width`
// columns, computed VW at a time; channel o0 + o goes to out[ni * os[0] + (ch0 + o) * os[1] + ...]. It serves the
// forward (pairs of input channels, the group's weights) and the input gradient at stride 1 (pairs of output channels
// of the padded gradient, the flipped weights).
struct DotConv {
  const uint32_t* planes;
  int64_t np, ps;
  const uint32_t* w;
  int64_t rows, width, ch0;  // output rows and columns; the group's first output channel in out
};

template <typename M, int OB, int RB, int VW, int S = 1>
inline void conv_rows_dot(const DotConv& c, const Geo& g, int64_t o0, M* out, const int64_t* os, int64_t ni,
                          int64_t r0) {
  using D = DotV<VW>;
  for (int64_t x0 = 0; x0 < c.width; x0 += VW) {
    typename D::F acc[RB][OB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
      for (int o = 0; o < OB; ++o) acc[r][o] = D::zero();
    for (int64_t k = 0; k < c.np; ++k) {
      const uint32_t* plane = c.planes + k * c.ps;
      for (int dy = 0; dy < 3; ++dy) {
#pragma GCC unroll 3
        for (int dx = 0; dx < 3; ++dx) {
          const uint32_t* wp = c.w + (o0 * c.np + k) * 9 + dy * 3 + dx;
          typename D::B wv[OB];
#pragma GCC unroll 8
          for (int o = 0; o < OB; ++o) wv[o] = D::splat(wp[o * c.np * 9]);
#pragma GCC unroll 8
          for (int r = 0; r < RB; ++r) {
            const typename D::B v = D::load(plane + (S * (r0 + r) + dy) * g.wq + (dx % S) * g.hp * g.wq + x0 + dx / S);
#pragma GCC unroll 8
            for (int o = 0; o < OB; ++o) acc[r][o] = D::dot(acc[r][o], v, wv[o]);
          }
        }
      }
    }
    const int64_t valid = std::min<int64_t>(VW, c.width - x0);
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
      for (int o = 0; o < OB; ++o)
        store_row<float, M>(D::wide(acc[r][o]),
                            out + ni * os[0] + (c.ch0 + o0 + o) * os[1] + (r0 + r) * os[2] + x0 * os[3], os[3],
                            valid);
  }
}

// Every output channel (cout of them) and row of one item, at stride S; rows of up to 8 in 8-lane vectors.
template <typename M, int S = 1>
void conv_all_dot(const DotConv& c, const Geo& g, int64_t cout, M* out, const int64_t* os, int64_t ni) {
  in_channel_blocks(cout, [&](auto ob, int64_t o0) {
    constexpr int OB = decltype(ob)::value;
    in_row_blocks<OB>(c.rows, [&](auto rb, int64_t r) {
      if (c.width <= 8)
        conv_rows_dot<M, OB, decltype(rb)::value, 8, S>(c, g, o0, out, os, ni, r);
      else
        conv_rows_dot<M, OB, decltype(rb)::value, 16, S>(c, g, o0, out, os, ni, r);
    });
  });
}

// Input gradient at stride 2 with bf16 dot products, input channels c0 .. c0 + OB of one item: gp holds np padded
// planes of output-gradient channel pairs (rows of wq words, value (i, j) at row i + 1, column j + 1, zeros around
// and past the row end) and w the weights paired over output channels, flipped as pair_weights stores them
// (w[(c * np + m) * 9 + 8 - t] for tap t = 3 * dy + dx). Input row r = 2k + dy - 1 is read by output row k' with
// r = 2k' + dy - 1: an even row 2k by tap row 1 of gradient row k, an odd row 2k + 1 by tap row 0 of row k + 1 and
// tap row 2 of row k; columns the same. So each pair of input rows (2k, 2k + 1) takes its four column-and-row phases
// from padded rows k + 1 and k + 2 at columns l + 1 and l + 2 (nine taps in all), and the even and odd columns are
// interleaved on the store.
template <typename M, int OB, int VW>
inline void gx_s2_rows_dot(const uint32_t* gp, int64_t np, int64_t ps, const uint32_t* w, const Geo& g, int64_t c0,
                           int64_t ch0, M* gx, const int64_t* gs, int64_t ni, int64_t k) {
  using D = DotV<VW>;
  for (int64_t x0 = 0; x0 < g.wo; x0 += VW) {
    typename D::F ee[OB], eo[OB], oe[OB], oo[OB];  // (row phase, column phase) of each channel
#pragma GCC unroll 8
    for (int o = 0; o < OB; ++o) ee[o] = eo[o] = oe[o] = oo[o] = D::zero();
    for (int64_t m = 0; m < np; ++m) {
      const uint32_t* r1 = gp + m * ps + (k + 1) * g.wq + x0;  // gradient row k, padded
      const uint32_t* r2 = r1 + g.wq;                          // gradient row k + 1
      const typename D::B a1 = D::load(r1 + 1), a2 = D::load(r1 + 2), b1 = D::load(r2 + 1), b2 = D::load(r2 + 2);
#pragma GCC unroll 8
      for (int o = 0; o < OB; ++o) {
        const uint32_t* wt = w + ((c0 + o) * np + m) * 9 + 8;  // wt[-t]: tap t
        ee[o] = D::dot(ee[o], a1, D::splat(wt[-4]));
        eo[o] = D::dot(eo[o], a2, D::splat(wt[-3]));
        eo[o] = D::dot(eo[o], a1, D::splat(wt[-5]));
        oe[o] = D::dot(oe[o], b1, D::splat(wt[-1]));
        oe[o] = D::dot(oe[o], a1, D::splat(wt[-7]));
        oo[o] = D::dot(oo[o], b2, D::splat(wt[0]));
        oo[o] = D::dot(oo[o], b1, D::splat(wt[-2]));
        oo[o] = D::dot(oo[o], a2, D::splat(wt[-6]));
        oo[o] = D::dot(oo[o], a1, D::splat(wt[-8]));
      }
    }
    const int64_t valid = g.w - 2 * x0;  // input columns from 2 * x0
#pragma GCC unroll 8
    for (int o = 0; o < OB; ++o)
      for (int ph = 0; ph < 2 && 2 * k + ph < g.h; ++ph) {
        __m512 e, d;  // the even and the odd columns of input row 2k + ph
        if constexpr (VW == 8) {
          e = _mm512_castps256_ps512(ph ? oe[o] : ee[o]);
          d = _mm512_castps256_ps512(ph ? oo[o] : eo[o]);
        } else {
          e = ph ? oe[o] : ee[o];
          d = ph ? oo[o] : eo[o];
        }
        M* dst = gx + ni * gs[0] + (ch0 + c0 + o) * gs[1] + (2 * k + ph) * gs[2] + 2 * x0 * gs[3];
        store_row<float, M>((V<float>::type)interleave_lo(e, d), dst, gs[3], std::min<int64_t>(16, valid));
        if (VW == 16 && valid > 16)
          store_row<float, M>((V<float>::type)interleave_hi(e, d), dst + 16 * gs[3], gs[3],
                              std::min<int64_t>(16, valid - 16));
      }
  }
}

// The stride-2 input gradient of every input channel (cin of them) of one item (see gx_s2_rows_dot).
template <typename M>
void gx_s2_all_dot(const uint32_t* gp, int64_t np, int64_t ps, const uint32_t* w, const Geo& g, int64_t ch0, M* gx,
                   const int64_t* gs, int64_t ni) {
  in_channel_blocks(g.cin, [&](auto ob, int64_t c0) {
    constexpr int OB = decltype(ob)::value > 4 ? 4 : decltype(ob)::value;  // 4 x 4 accumulators at most
    for (int64_t cb = c0; cb < c0 + decltype(ob)::value; cb += OB)
      for (int64_t k = 0; 2 * k < g.h; ++k) {
        if (g.wo <= 8)
          gx_s2_rows_dot<M, OB, 8>(gp, np, ps, w, g, cb, ch0, gx, gs, ni, k);
        else
          gx_s2_rows_dot<M, OB, 16>(gp, np, ps, w, g, cb, ch0, gx, gs, ni, k);
      }
  });
}

// Weight gradient of output channels o0 .. o0 + OB and input channel ci of one item, added lane by lane into gwl
// (VW float lanes per weight, [(o * cin + ci) * 9 + tap][VW]: the lanes are summed once per thread, not once per
// item, which at 7 px planes cost as much as the products), with output rows paired: g2 holds (gy row 2p, gy row
// 2p + 1) per word ([cout][(ho + 1) / 2][wr] words, zeros past the row end and for the missing row of an odd ho); x2
// holds (row r, row r + S) of the padded, phase-split input buffer.
template <int OB, int S, int VW = 16>
inline void gw_block_dot(const uint32_t* x2, const uint32_t* g2, const Geo& g, int64_t o0, int64_t ci, float* gwl) {
  using D = DotV<VW>;
  const int64_t pairs = (g.ho + 1) / 2, g2plane = pairs * g.wr;
  typename D::F acc[OB][9];  // every loop over acc fully unrolled: else GCC keeps acc in memory
#pragma GCC unroll 4
  for (int o = 0; o < OB; ++o)
#pragma GCC unroll 9
    for (int k = 0; k < 9; ++k) acc[o][k] = D::zero();
  const uint32_t* plane = x2 + ci * g.plane();
  for (int64_t p = 0; p < pairs; ++p)
    for (int64_t x0 = 0; x0 < g.wr; x0 += VW) {
      typename D::B gv[OB];
#pragma GCC unroll 4
      for (int o = 0; o < OB; ++o) gv[o] = D::load(g2 + (o0 + o) * g2plane + p * g.wr + x0);
#pragma GCC unroll 3
      for (int dy = 0; dy < 3; ++dy) {
        const uint32_t* row = plane + (2 * p * S + dy) * g.wq + x0;
#pragma GCC unroll 3
        for (int dx = 0; dx < 3; ++dx) {
          const typename D::B v = D::load(row + (dx % S) * g.hp * g.wq + dx / S);
#pragma GCC unroll 4
          for (int o = 0; o < OB; ++o) acc[o][dy * 3 + dx] = D::dot(acc[o][dy * 3 + dx], gv[o], v);
        }
      }
    }
#pragma GCC unroll 4
  for (int o = 0; o < OB; ++o) {
    float* dst = gwl + ((o0 + o) * g.cin + ci) * 9 * VW;
#pragma GCC unroll 9
    for (int k = 0; k < 9; ++k) D::add_to(dst + k * VW, acc[o][k]);
  }
}

// --- the dot products' operands built straight from the stored tensors ---------------------------------------------
//
// The paired buffers are built from the bf16 tensors in one pass per value (each value widened, taken through BN and
// ReLU or its gradient where it is, rounded to bf16 once, placed next to its pair), not through a padded float
// buffer and a second packing pass. Rows are written 16 values at a time, zeros past the row end; the borders (the
// padding rows and columns) are never written, so a buffer zeroed once per thread stays padded for every item.

// The bits of 16 bf16 values at p (n valid, zeros past them), each in the low half of a 32-bit lane.
inline u32v load_bits(const c10::BFloat16* p, int64_t n) {
  const __m256i h = n >= 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                            : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
  return (u32v)_mm512_cvtepu16_epi32(h);
}

inline V<float>::type keep_first(V<float>::type v, int64_t n) {
  return n >= 16 ? v : (V<float>::type)_mm512_maskz_mov_ps(static_cast<__mmask16>((1u << n) - 1), (__m512)v);
}

// 16 values of a row (n valid, zeros past them) as bf16 bits in the high half of each lane: the stored values
// themselves, or relu(v * sc + sh) rounded to nearest even with bn.
inline u32v row_high(const c10::BFloat16* from, int64_t n, bool bn, float sc, float sh) {
  const u32v bits = load_bits(from, n) << 16;
  if (!bn) return bits;
  const V<float>::type zero{};
  V<float>::type v = (V<float>::type)bits * sc + sh;
  return bf16_high(keep_first(v > zero ? v : zero, n));
}

inline void store_bits(uint16_t* dst, u32v high) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16((__m512i)(high >> 16)));
}

// Words (lo[j], hi[j]) of two rows of w values at dst[0 ..): the forward's pair of input channels (hi null: zeros,
// the last pair of an odd count). With bn, lo's values through relu(v * slo + tlo) and hi's through
// relu(v * shi + thi).
inline void pair_rows(const c10::BFloat16* lo, const c10::BFloat16* hi, int64_t w, bool bn, float slo, float tlo,
                      float shi, float thi, uint32_t* dst) {
  for (int64_t x0 = 0; x0 < w; x0 += 16)
    *reinterpret_cast<u32vu*>(dst + x0) = (row_high(lo + x0, w - x0, bn, slo, tlo) >> 16) |
                                          (hi ? row_high(hi + x0, w - x0, bn, shi, thi) : u32v{});
}

// A row of w values at dst[0 ..) as bf16 bits (relu(v * sc + sh) with bn).
inline void bits_row(const c10::BFloat16* src, int64_t w, bool bn, float sc, float sh, uint16_t* dst) {
  for (int64_t x0 = 0; x0 < w; x0 += 16) store_bits(dst + x0, row_high(src + x0, w - x0, bn, sc, sh));
}

// A row of w values of the gradient through BN and ReLU, (y * sc + sh > 0 ? sc * g : 0) + y * A + B, as bf16 bits.
inline void grad_bits_row(const c10::BFloat16* y, const c10::BFloat16* gr, int64_t w, float sc, float sh, float A,
                          float B, uint16_t* dst) {
  const V<float>::type zero{};
  for (int64_t x0 = 0; x0 < w; x0 += 16) {
    const int64_t n = w - x0;
    const V<float>::type yv = (V<float>::type)(load_bits(y + x0, n) << 16);
    const V<float>::type gv = (V<float>::type)(load_bits(gr + x0, n) << 16) * sc;
    store_bits(dst + x0, bf16_high(keep_first((yv * sc + sh > zero ? gv : zero) + yv * A + B, n)));
  }
}

inline u32v widen_u16(const uint16_t* p) {
  return (u32v)_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Words (lo[j], hi[j]) of n 16-bit values.
inline void interleave_bits(const uint16_t* lo, const uint16_t* hi, int64_t n, uint32_t* dst) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) *reinterpret_cast<u32vu*>(dst + j) = widen_u16(lo + j) | (widen_u16(hi + j) << 16);
  if (j < n) {  // the last n - j < 16 words by masked loads and a masked store (rows of 7 and 14 words)
    const __mmask16 m = static_cast<__mmask16>((1u << (n - j)) - 1);
    const u32v l = (u32v)_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, lo + j));
    const u32v h = (u32v)_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, hi + j));
    _mm512_mask_storeu_epi32(dst + j, m, (__m512i)(l | (h << 16)));
  }
}

// --- planes of up to 7 columns, flattened: a last stage's 7 px planes -------------------------------------------
//
// A plane of w <= 7 columns in rows of 8 words, value (r, c) at word (r + 1) * 8 + c + 1: one zero column per row
// (the right border of row r is the left border of row r + 1), a zero row above and below, zeros to the end. Such a
// plane is built from its NCHW plane (h * w contiguous values) whole: the values taken through BN and ReLU (or their
// gradient) 16 at a time, then placed by word expands (AVX512-VBMI2), 32 words per instruction, where rows of 7
// values took one masked vector each. Read as 32-bit words, its words (2j, 2j + 1) are already the pairs the weight
// gradient multiplies: output positions q = 8i + j and q + 1 (j = 7, the zero column, adds nothing) of the gradient
// against the input at q + 8 dy + dx, contiguous loads for every tap (gw_flat_dot), where the row layout paired rows
// (2p, 2p + 1) in a second buffer for each operand. Rows of 8 words also serve the forward's and the input
// gradient's convolutions (conv_rows_dot, 8 lanes per row; a valid column reads at most one word past its row, the
// next row's zero), the forward's channel pairs built in order as words and placed by 32-bit expands
// (flat_place_pairs). The forward takes this layout for NCHW planes of up to 7 columns at stride 1, the backward for
// output planes of up to 7 columns at strides 1 and 2 (the input in phase planes, see phase_words), where the
// operands are built straight from the tensors; set_flat_planes(false) turns it off, for side-by-side timing.
#if defined(__AVX512VBMI2__)
struct FlatPlane {
  int64_t h = 0, words = 0;         // rows; words per plane, a multiple of 32
  std::vector<__mmask32> mask;      // per 32 words: those that hold a value
  std::vector<int64_t> from;        // per 32 words: the index of the first value they hold
  int64_t chunks() const { return words / 32; }
  int64_t vectors() const { return (h * 8 + 31) / 32; }  // the weight gradient's 16-pair vectors
};

// The layout of an h x w plane (w <= 7): enough words for the reads of gw_flat_dot (up to 32 * vectors + 19) and of
// conv_rows_dot (up to (h + 2) * 8 + 1).
inline FlatPlane flat_plane(int64_t h, int64_t w) {
  FlatPlane f;
  f.h = h;
  f.words = (std::max<int64_t>(32 * f.vectors() + 20, (h + 2) * 8 + 2) + 31) / 32 * 32;
  int64_t seen = 0;
  for (int64_t k = 0; k < f.chunks(); ++k) {
    __mmask32 m = 0;
    for (int b = 0; b < 32; ++b) {
      const int64_t r = (32 * k + b) / 8 - 1, c = (32 * k + b) % 8 - 1;
      if (r >= 0 && r < h && c >= 0 && c < w) m |= __mmask32{1} << b;
    }
    f.mask.push_back(m);
    f.from.push_back(seen);
    seen += __builtin_popcount(m);
  }
  return f;
}

// vals (the plane's h * w values as bf16 bits, readable 32 words past them) placed in the layout at dst.
inline void flat_place(const FlatPlane& f, const uint16_t* vals, uint16_t* dst) {
  for (int64_t k = 0; k < f.chunks(); ++k)
    _mm512_storeu_si512(dst + 32 * k, _mm512_maskz_expand_epi16(f.mask[k], _mm512_loadu_si512(vals + f.from[k])));
}

// vals (the plane's h * w words, readable 16 words past them) placed, 32-bit words, in the layout at dst (words,
// not 16-bit words: the forward's channel pairs).
inline void flat_place_pairs(const FlatPlane& f, const uint32_t* vals, uint32_t* dst) {
  for (int64_t k = 0; k < f.chunks(); ++k) {
    const __mmask16 lo = static_cast<__mmask16>(f.mask[k]), hi = static_cast<__mmask16>(f.mask[k] >> 16);
    const uint32_t* src = vals + f.from[k];
    _mm512_storeu_si512(dst + 32 * k, _mm512_maskz_expand_epi32(lo, _mm512_loadu_si512(src)));
    const __m512i rest = _mm512_loadu_si512(src + __builtin_popcount(lo));
    _mm512_storeu_si512(dst + 32 * k + 16, _mm512_maskz_expand_epi32(hi, rest));
  }
}

// At stride 2 the input is split into four phase planes (row and column parity of the padded input), each in rows
// of 8 words: padded input (R, C) at word (R / 2) * 8 + C / 2 of plane (R % 2, C % 2), so that tap (dy, dx) of
// output position q = 8i + j reads plane (dy % 2, dx % 2) at q + 8 (dy / 2) + dx / 2, contiguous again. A plane's
// 8 columns all hold values (padded columns 0 .. w + 1, halved); the gradient's zero column j = 7 masks the one
// output position whose taps run into the next row. phase_words: the words per phase plane, for the reads of
// gw_flat_dot (up to 32 * vectors + 8) and the (h + 1) / 2 + 1 rows.
inline int64_t phase_words(const FlatPlane& g, int64_t h) {
  return (std::max<int64_t>(32 * g.vectors() + 9, ((h + 1) / 2 + 1) * 8) + 31) / 32 * 32;
}

// The h x w input plane src (NCHW rows of xs2 values apart; w <= 16) through relu(v * sc + sh) with bn, rounded to
// bf16, into its four phase planes at dst (pw words each, zeros where nothing is written): each row's values split
// by column parity with one word permute.
inline void phase_planes(const c10::BFloat16* src, int64_t xs2, int64_t h, int64_t w, bool bn, float sc, float sh,
                         int64_t pw, uint16_t* dst) {
  const __m256i split = _mm256_setr_epi16(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __mmask8 evens = static_cast<__mmask8>((1u << ((w + 1) / 2)) - 1);  // columns 0, 2, ..: (w + 1) / 2
  const __mmask8 odds = static_cast<__mmask8>((1u << (w / 2)) - 1);         // columns 1, 3, ..: w / 2
  for (int64_t r = 0; r < h; ++r) {
    const u32v high = row_high(src + r * xs2, w, bn, sc, sh);  // 16 values as bf16 bits, zeros past w
    const __m256i words = _mm256_permutexvar_epi16(split, _mm512_cvtepi32_epi16((__m512i)(high >> 16)));
    const int64_t R = r + 1;  // padded row; column c is padded column c + 1: even c -> phase 1, odd c -> phase 0
    uint16_t* row = dst + (R % 2) * 2 * pw + (R / 2) * 8;
    _mm_mask_storeu_epi16(row + pw, evens, _mm256_castsi256_si128(words));  // c = 0, 2, ..: columns 0, 1, ..
    _mm_mask_storeu_epi16(row + 1, odds, _mm256_extracti128_si256(words, 1));  // c = 1, 3, ..: columns 1, 2, ..
  }
}

// Weight gradient of output channels o0 .. o0 + OB and input channel ci of nimg items of one group, from flattened
// planes (g16: the gradient through BN and ReLU, [cout][words]; x16: the input, xplane words per channel: one plane
// at stride 1, four phase planes of pw words at stride 2; item i's planes xstep and gstep words after item i - 1's),
// summed in registers over the items, then added into gwl (16 float lanes per weight, [(o * cin + ci) * 9 +
// tap][16]) as gw_block_dot adds: one add per weight for nimg items (the lanes of a layer's weights, 36 KB per
// group of 8x8, do not stay in L1).
template <int OB, int S>
inline void gw_flat_dot(const uint16_t* x16, int64_t xplane, int64_t pw, const uint16_t* g16, const FlatPlane& f,
                        int64_t cin, int64_t o0, int64_t ci, float* gwl, int nimg, int64_t xstep, int64_t gstep) {
  __m512 acc[OB][9];
#pragma GCC unroll 4
  for (int o = 0; o < OB; ++o)
#pragma GCC unroll 9
    for (int k = 0; k < 9; ++k) acc[o][k] = _mm512_setzero_ps();
  for (int im = 0; im < nimg; ++im)
    for (int64_t v = 0; v < f.vectors(); ++v) {
      const uint16_t* xp = x16 + im * xstep + ci * xplane;
      __m512bh gv[OB];
#pragma GCC unroll 4
      for (int o = 0; o < OB; ++o)
        gv[o] = (__m512bh)_mm512_loadu_si512(g16 + im * gstep + (o0 + o) * f.words + 9 + 32 * v);
#pragma GCC unroll 3
      for (int dy = 0; dy < 3; ++dy)
#pragma GCC unroll 3
        for (int dx = 0; dx < 3; ++dx) {
          const uint16_t* tap = S == 1 ? xp + 8 * dy + dx : xp + ((dy % 2) * 2 + dx % 2) * pw + 8 * (dy / 2) + dx / 2;
          const __m512bh xv = (__m512bh)_mm512_loadu_si512(tap + 32 * v);
#pragma GCC unroll 4
          for (int o = 0; o < OB; ++o) acc[o][dy * 3 + dx] = _mm512_dpbf16_ps(acc[o][dy * 3 + dx], gv[o], xv);
        }
    }
#pragma GCC unroll 4
  for (int o = 0; o < OB; ++o) {
    float* dst = gwl + ((o0 + o) * cin + ci) * 9 * 16;
#pragma GCC unroll 9
    for (int k = 0; k < 9; ++k) DotV<16>::add_to(dst + k * 16, acc[o][k]);
  }
}
#endif
#endif

// Weights paired for the bf16 dot products, np = (count + 1) / 2 pairs: fwd[(o * np + k) * 9 + t] = (w[o][2k][t],
// w[o][2k + 1][t]) over input channels; gx[((gi * cin + c) * np + m) * 9 + 8 - t] = (w[2m][c][t], w[2m + 1][c][t])
// over group gi's output channels (t = 3 * dy + dx). An odd count's last pair has a zero second weight (its
// operands pair the last channel with zeros).
struct PairedWeights {
  Scratch<uint32_t> fwd, gx;
};

inline PairedWeights pair_weights(const float* w, const Geo& g, bool fwd, bool gx) {
  PairedWeights pw;
  const int64_t co = g.groups * g.cout;
  if (fwd) {
    const int64_t np = (g.cin + 1) / 2;
    pw.fwd.resize(co * np * 9);
    for (int64_t o = 0; o < co; ++o)
      for (int64_t k = 0; k < np; ++k)
        for (int t = 0; t < 9; ++t)
          pw.fwd[(o * np + k) * 9 + t] = (bf16_high(w[(o * g.cin + 2 * k) * 9 + t]) >> 16) |
                                         (2 * k + 1 < g.cin ? bf16_high(w[(o * g.cin + 2 * k + 1) * 9 + t]) : 0u);
  }
  if (gx) {
    const int64_t np = (g.cout + 1) / 2;
    pw.gx.resize(g.groups * g.cin * np * 9);
    for (int64_t gi = 0; gi < g.groups; ++gi)
      for (int64_t c = 0; c < g.cin; ++c)
        for (int64_t m = 0; m < np; ++m)
          for (int t = 0; t < 9; ++t) {
            const float* wo = w + ((gi * g.cout + 2 * m) * g.cin + c) * 9 + t;
            pw.gx[((gi * g.cin + c) * np + m) * 9 + 8 - t] =
                (bf16_high(*wo) >> 16) | (2 * m + 1 < g.cout ? bf16_high(wo[g.cin * 9]) : 0u);
          }
  }
  return pw;
}

// BN's per-thread sums in double, kSumLanes per sum: with AVX-512, 8 (a float vector's lanes l and l + 8 are added
// to lane l, exactly; the lanes are summed once per call), so that a 7 px plane's sums do not end in 32 scalar
// additions; else 1.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
constexpr int kSumLanes = 8;

inline void add_lanes(__m512 v, double* acc) {
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  _mm512_storeu_pd(acc, _mm512_add_pd(_mm512_loadu_pd(acc), _mm512_add_pd(lo, hi)));
}
#else
constexpr int kSumLanes = 1;
#endif

// Sums over threads and lanes: out[k] = sum of partial[t][k * lanes + l] (n values; threads without sums empty).
inline void sum_lanes(const std::vector<Scratch<double>>& partial, int64_t n, double* out,
                      int lanes = kSumLanes) {
  std::fill(out, out + n, 0.0);
  for (const auto& p : partial)
    if (!p.empty())
      for (int64_t k = 0; k < n; ++k)
        for (int l = 0; l < lanes; ++l) out[k] += p[k * lanes + l];
}

// Sum and sum of squares of n contiguous values, added to the kSumLanes lanes at sum and at sq.
template <typename T, typename M = T>
inline void plane_stats(const M* p, int64_t n, double* sum, double* sq) {
  using Vt = V<T>;
  typename Vt::type s1{}, s2{};
  int64_t j = 0;
  for (; j + Vt::W <= n; j += Vt::W) {
    const typename Vt::type v = IO<T, M>::load(p + j);
    s1 += v;
    s2 += v * v;
  }
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  if constexpr (std::is_same_v<T, float>) {
    if (j < n) {  // the rest as one vector, zeros past it
      const typename Vt::type v = (typename Vt::type)load16(p + j, n - j);
      s1 += v;
      s2 += v * v;
    }
    add_lanes((__m512)s1, sum);
    add_lanes((__m512)s2, sq);
    return;
  }
#endif
  double a = 0, q = 0;
  for (int l = 0; l < Vt::W; ++l) {
    a += s1[l];
    q += s2[l];
  }
  for (; j < n; ++j) {
    const T v = IO<T, M>::get(p + j);
    a += v;
    q += double(v) * v;
  }
  sum[0] += a;
  sq[0] += q;
}

// Threads for a call of `work` multiply-adds / 9 over `items` work items.
inline int threads_for(int64_t work, int64_t items) {
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>({(int64_t)at::get_num_threads(), work / kMinWork, items})));
}

// The forward; with stats (a double tensor [2, C]; y then NCHW contiguous), the batch sums and sums of squares of the
// outputs, summed from each item's planes right after they are written (in cache); with isc/ish,
// the input taken through BN and ReLU first (relu(x * isc[c] + ish[c]), the previous layer's normalisation).
// With dot (bf16 storage, an even cin, AVX512-BF16 in the build), the multiplies are bf16 dot products.
template <typename T, typename M = T>
void forward_impl(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, int64_t groups, int64_t s, const T* isc,
                  const T* ish, at::Tensor* stats, bool dot = false) {
  Geo g = geometry(x, w, groups, s, V<T>::W);
  const M* xp = x.data_ptr<M>();
  const T* wp = w.data_ptr<T>();
  [[maybe_unused]] PairedWeights pw;
  if constexpr (std::is_same_v<M, c10::BFloat16>) {
    dot = dot && kBf16Dot;
    if (dot) pw = pair_weights(wp, g, true, false);
    // rows of up to 8 at stride 1: 8-lane dot products (DotV) and buffer rows sized for them (at stride 2 the rows
    // keep room for split_row_s2's whole vectors; conv_all_dot picks 8 lanes for them all the same)
    if (dot && g.s == 1 && g.wo <= 8) g = geometry(x, w, groups, s, 8);
  } else {
    dot = false;
  }
  M* yp = y.data_ptr<M>();
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const int64_t ys[4] = {y.stride(0), y.stride(1), y.stride(2), y.stride(3)};
  const int64_t items = g.n * g.groups;
  const int nthreads = threads_for(items * g.ho * g.wr * g.cout * g.cin, items);
  const int64_t nst = 2 * g.groups * g.cout;
  std::vector<Scratch<double>> partial(stats ? nthreads : 0);
  // planes of up to 7 columns at stride 1 read from contiguous NCHW planes: flattened (see "planes of up to 7
  // columns, flattened"), rows of 8 words (gf)
  bool flat = false;
  int64_t ps = g.plane();  // words per channel pair's plane
  [[maybe_unused]] Geo gf = g;
#if defined(__AVX512BF16__) && defined(__AVX512VBMI2__)
  flat = flat_planes && dot && xs[3] == 1 && xs[2] == g.w && g.s == 1 && g.w <= 7 && g.vw == 8;
  const FlatPlane fp = flat ? flat_plane(g.h, g.w) : FlatPlane{};
  if (flat) ps = fp.words;
  gf.wq = 8;
#endif
  at::parallel_for(0, nthreads, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const int64_t begin = items * t / nthreads, end = items * (t + 1) / nthreads;
      // direct: the channel pairs built straight from x (NCHW rows), in a buffer zeroed once (its borders stay
      // zero); at stride 2 each row's words are split by column phase as pad_plane splits values (split_row_s2 moves
      // 32-bit lanes, so it splits words as it splits floats)
      const bool direct = dot && xs[3] == 1;
      Scratch<uint32_t> row_words(direct && g.s == 2 ? (g.w + 31) / 32 * 32 : 0);
      Scratch<T> buf(direct ? 0 : g.cin * g.plane()), tmp(isc && !direct ? g.h * g.w : 0);
      const int64_t np = (g.cin + 1) / 2;  // channel pairs (an odd count's last with zeros)
      Scratch<uint32_t> pairs(dot ? np * ps : 0);
      Scratch<uint32_t> vals(flat ? (g.h * g.w + 15) / 16 * 16 + 16 : 0);  // a flattened plane's pairs, in order
      Scratch<T> zero_plane(dot && !direct && g.cin % 2 ? g.plane() : 0, T(0));
      double* st = nullptr;
      if (stats) {
        partial[t].assign(nst * kSumLanes, 0.0);
        st = partial[t].data();
      }
      for (int64_t item = begin; item < end; ++item) {
        const int64_t ni = item / g.groups, gi = item % g.groups;
        if (!direct) pad_copy(xp, xs, g, ni, gi, buf.data(), isc, ish, tmp.data());
        const T* wg = wp + gi * g.cout * g.cin * 9;
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<T, float> && std::is_same_v<M, c10::BFloat16>) {
#if defined(__AVX512VBMI2__)
          for (int64_t k = 0; k < np && flat; ++k) {  // each plane's pairs in order, then placed in rows of 8 words
            const int64_t lo = gi * g.cin + 2 * k, hi = lo + 1;
            const bool has_hi = 2 * k + 1 < g.cin;
            const M* src = xp + ni * xs[0] + lo * xs[1];
            pair_rows(src, has_hi ? src + xs[1] : nullptr, g.h * g.w, isc != nullptr, isc ? isc[lo] : 0.f,
                      isc ? ish[lo] : 0.f, isc && has_hi ? isc[hi] : 0.f, isc && has_hi ? ish[hi] : 0.f, vals.data());
            flat_place_pairs(fp, vals.data(), pairs.data() + k * ps);
          }
#endif
          if (direct && !flat) {
            for (int64_t k = 0; k < np; ++k) {
              const int64_t lo = gi * g.cin + 2 * k, hi = lo + 1;
              const bool has_hi = 2 * k + 1 < g.cin;
              const M* src = xp + ni * xs[0] + lo * xs[1];
              for (int64_t r = 0; r < g.h; ++r) {
                uint32_t* dr = pairs.data() + k * g.plane() + (r + 1) * g.wq;
                pair_rows(src + r * xs[2], has_hi ? src + xs[1] + r * xs[2] : nullptr, g.w, isc != nullptr,
                          isc ? isc[lo] : 0.f, isc ? ish[lo] : 0.f, isc && has_hi ? isc[hi] : 0.f,
                          isc && has_hi ? ish[hi] : 0.f, g.s == 1 ? dr + 1 : row_words.data());
                if (g.s == 2)
                  split_row_s2(reinterpret_cast<const float*>(row_words.data()), g.w, reinterpret_cast<float*>(dr + 1),
                               reinterpret_cast<float*>(dr + g.hp * g.wq));
              }
            }
          } else if (dot && !direct) {
            for (int64_t k = 0; k < np; ++k)
              pack_pairs(buf.data() + 2 * k * g.plane(),
                         2 * k + 1 < g.cin ? buf.data() + (2 * k + 1) * g.plane() : zero_plane.data(), g.plane(),
                         pairs.data() + k * g.plane());
          }
          if (dot) {
            const DotConv c{pairs.data(), np, ps, pw.fwd.data() + gi * g.cout * np * 9, g.ho, g.wo, gi * g.cout};
            if (g.s == 1)
              conv_all_dot<M, 1>(c, flat ? gf : g, g.cout, yp, ys, ni);
            else
              conv_all_dot<M, 2>(c, g, g.cout, yp, ys, ni);
          }
        }
#endif
        if (!dot) {
          if (g.s == 1)
            fwd_all<T, M, 1>(buf.data(), wg, g, yp, ys, ni, gi);
          else
            fwd_all<T, M, 2>(buf.data(), wg, g, yp, ys, ni, gi);
        }
        if (st)  // the item's output planes, just written (in cache, as stored); y is NCHW contiguous here
          for (int64_t o = 0; o < g.cout; ++o) {
            const int64_t ch = gi * g.cout + o;
            plane_stats<T, M>(yp + (ni * g.groups * g.cout + ch) * g.ho * g.wo, g.ho * g.wo, st + ch * kSumLanes,
                              st + (g.groups * g.cout + ch) * kSumLanes);
          }
      }
    }
  });
  if (stats) sum_lanes(partial, nst, stats->data_ptr<double>());
}

// Input gradient at stride 1, OB input channels (c0 .. c0 + OB) of one item: a convolution of the padded output
// gradient (gp: cout planes of (ho + 2) rows of wq values, value (i, j) at row i + 1, column j + 1) with the
// flipped, transposed weights: gx[c][y][x] = sum_{o, dy, dx} w[o][c][dy][dx] * gy[o][y + 1 - dy][x + 1 - dx].
template <typename T, typename M, int OB, int RB>
inline void gx_rows(const T* gp, const T* wg, const Geo& g, int64_t c0, M* gx, const int64_t* gs, int64_t ni,
                    int64_t gi, int64_t y0) {
  using Vt = V<T>;
  constexpr int VW = Vt::W;
  const int64_t cin = g.cin, gplane = (g.ho + 2) * g.wq;
  for (int64_t x0 = 0; x0 < g.wr; x0 += VW) {
    typename Vt::type acc[RB][OB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < OB; ++c) acc[r][c] = typename Vt::type{};
    for (int64_t o = 0; o < g.cout; ++o) {
      const T* plane = gp + o * gplane;
      for (int ey = 0; ey < 3; ++ey) {
#pragma GCC unroll 3
        for (int ex = 0; ex < 3; ++ex) {
          const T* wp = wg + ((o * cin + c0) * 3 + (2 - ey)) * 3 + (2 - ex);
          typename Vt::type wv[OB];
#pragma GCC unroll 8
          for (int c = 0; c < OB; ++c) wv[c] = Vt::splat(wp[c * 9]);
#pragma GCC unroll 8
          for (int r = 0; r < RB; ++r) {
            const typename Vt::type v = Vt::load(plane + (y0 + r + ey) * g.wq + x0 + ex);
#pragma GCC unroll 8
            for (int c = 0; c < OB; ++c) acc[r][c] += wv[c] * v;
          }
        }
      }
    }
    const int64_t valid = std::min<int64_t>(VW, g.w - x0);
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < OB; ++c)
        store_row<T, M>(acc[r][c], gx + ni * gs[0] + (gi * cin + c0 + c) * gs[1] + (y0 + r) * gs[2] + x0 * gs[3],
                        gs[3], valid);
  }
}

// Weight gradient of output channels o0 .. o0 + OB and input channel ci of one item, added into gwg.
template <typename T, int OB, int S>
inline void gw_block(const T* buf, const T* gp, const Geo& g, int64_t o0, int64_t ci, T* gwg) {
  using Vt = V<T>;
  constexpr int VW = Vt::W;
  constexpr int64_t s = S;
  const int64_t gplane = (g.ho + 2) * g.wq;
  typename Vt::type acc[OB][9];  // every loop over acc fully unrolled: else GCC keeps acc in memory
#pragma GCC unroll 4
  for (int o = 0; o < OB; ++o)
#pragma GCC unroll 9
    for (int k = 0; k < 9; ++k) acc[o][k] = typename Vt::type{};
  const T* plane = buf + ci * g.plane();
  for (int64_t i = 0; i < g.ho; ++i)
    for (int64_t x0 = 0; x0 < g.wr; x0 += VW) {
      typename Vt::type gv[OB];
#pragma GCC unroll 4
      for (int o = 0; o < OB; ++o) gv[o] = Vt::load(gp + (o0 + o) * gplane + (i + 1) * g.wq + 1 + x0);
#pragma GCC unroll 3
      for (int dy = 0; dy < 3; ++dy) {
        const T* row = plane + (i * s + dy) * g.wq + x0;
#pragma GCC unroll 3
        for (int dx = 0; dx < 3; ++dx) {
          const typename Vt::type v = Vt::load(row + (dx % s) * g.hp * g.wq + dx / s);
#pragma GCC unroll 4
          for (int o = 0; o < OB; ++o) acc[o][dy * 3 + dx] += gv[o] * v;
        }
      }
    }
#pragma GCC unroll 4
  for (int o = 0; o < OB; ++o) {
    T* dst = gwg + ((o0 + o) * g.cin + ci) * 9;
#pragma GCC unroll 9
    for (int k = 0; k < 9; ++k) {
      T sum = 0;
      for (int l = 0; l < VW; ++l) sum += acc[o][k][l];
      dst[k] += sum;
    }
  }
}

// Output-gradient transform of the fused path: the gradient reaching the convolution's output y through BN (batch
// statistics) and ReLU, from the gradient g of relu(y * sc + sh): (y * sc + sh > 0 ? sc * g : 0) + y * A + B, with
// per-channel A and B holding BN's batch-statistic terms.
template <typename T, typename M = T>
struct GradBN {
  const M* y = nullptr;  // the convolution's output, NCHW contiguous; nullptr: no transform
  const T *sc = nullptr, *sh = nullptr, *A = nullptr, *B = nullptr;
  const M* add = nullptr;  // added to the input gradient as autograd would add it (x's strides); nullptr: none
};

// dst += src over rows x cols values (row strides rd, rs; column stride cs of both), as the stored values add in
// PyTorch: widened, summed in T, rounded once. Contiguous rows in vectors; rows that follow each other in both (a
// whole plane) as one row, so that short rows (7 px) do not each end in a masked vector.
template <typename T, typename M>
inline void add_rows(M* dst, const M* src, int64_t rows, int64_t cols, int64_t rd, int64_t rs, int64_t cs) {
  using Vt = V<T>;
  if (cs == 1 && rd == cols && rs == cols) {
    cols *= rows;
    rows = 1;
  }
  for (int64_t r = 0; r < rows; ++r) {
    M* d = dst + r * rd;
    const M* q = src + r * rs;
    int64_t j = 0;
    if (cs == 1) {
      for (; j + Vt::W <= cols; j += Vt::W) IO<T, M>::store(d + j, IO<T, M>::load(d + j) + IO<T, M>::load(q + j));
      if constexpr (kMasked && !std::is_same_v<T, double>) {
        if (j < cols) {
          IO<T, M>::store_n(d + j, IO<T, M>::load_n(d + j, cols - j) + IO<T, M>::load_n(q + j, cols - j), cols - j);
          continue;
        }
      }
    }
    for (; j < cols; ++j) IO<T, M>::put(d + j * cs, IO<T, M>::get(d + j * cs) + IO<T, M>::get(q + j * cs));
  }
}

template <typename T, typename M = T>
void backward_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& gy, at::Tensor* gx, at::Tensor* gw,
                   int64_t groups, int64_t s, const T* isc = nullptr, const T* ish = nullptr,
                   GradBN<T, M> bn = GradBN<T, M>(), bool dot = false) {
  using Vt = V<T>;
  constexpr int VW = Vt::W;
  Geo g = geometry(x, w, groups, s, VW);
  // bf16 dot products (bf16 storage, AVX512-BF16 in the build): the weight gradient and the input gradient
  bool dot_gx = false;
  [[maybe_unused]] PairedWeights pw;
  if constexpr (std::is_same_v<M, c10::BFloat16>) {
    dot = dot && kBf16Dot;
    dot_gx = dot && gx;
    if (dot_gx) pw = pair_weights(w.data_ptr<float>(), g, false, true);
    // rows of up to 8: 8-lane dot products (DotV), strides 1 and 2 (at stride 2 split_row_s2's whole vectors run
    // past a buffer row of 8 into the next one, writing the zeros past the input row: the padding it holds, or
    // values the next row's copy writes after them)
    if (dot && g.wo <= 8) g = geometry(x, w, groups, s, 8);
  } else {
    dot = false;
  }
  const bool dot_gw = dot && gw;
  const M* xp = x.data_ptr<M>();
  const T* wp = w.data_ptr<T>();
  const M* gyp = gy.data_ptr<M>();
  M* gxp = gx ? gx->data_ptr<M>() : nullptr;
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const int64_t gys[4] = {gy.stride(0), gy.stride(1), gy.stride(2), gy.stride(3)};
  int64_t gxs[4] = {0, 0, 0, 0};
  if (gx)
    for (int d = 0; d < 4; ++d) gxs[d] = gx->stride(d);
  const int64_t wsize = g.groups * g.cout * g.cin * 9;
  const int64_t gplane = (g.ho + 2) * g.wq;
  const int64_t items = g.n * g.groups;
  const int64_t work = items * g.ho * g.wr * g.cout * g.cin;  // multiply-adds / 9 of one gradient
  const int nthreads = threads_for(work, items);
  std::vector<Scratch<T>> partial(gw ? nthreads : 0);
  const bool plane_contiguous = gys[3] == 1 && gys[2] == g.wo;
  // The dot products' operands built straight from the tensors (see "built straight from the stored tensors"):
  // the output gradient's when no float32 multiply reads it, the input's row pairs at stride 1 from NCHW rows.
  const bool direct_g = dot && bn.y && plane_contiguous && (!gx || dot_gx);
  const bool direct_x = dot_gw && s == 1 && xs[3] == 1;
  // Output planes of up to 7 columns, the gradient built straight from the tensors and the input read from NCHW
  // planes: flattened (see "planes of up to 7 columns, flattened"; at stride 2 the input in phase planes); gf, the
  // geometry of their rows of 8 words, for the input gradient's convolution.
  bool flat = false;
  int64_t gps = gplane, xps = g.plane();  // words per plane of the output gradient's and the input's bf16 buffers
  [[maybe_unused]] int64_t phw = 0;      // words per phase plane (stride 2)
  [[maybe_unused]] Geo gf = g;
#if defined(__AVX512BF16__) && defined(__AVX512VBMI2__)
  flat = flat_planes && direct_g && g.wo <= 7 && g.vw == 8 && g.w <= 16 && (!gw || (xs[3] == 1 && xs[2] == g.w));
  const FlatPlane fp = flat ? flat_plane(g.ho, g.wo) : FlatPlane{};
  if (flat) {
    gps = fp.words;
    xps = s == 1 ? fp.words : 4 * (phw = phase_words(fp, g.h));
  }
  gf.wq = 8;
#endif
  // One chunk of whole items per thread, each with its own weight-gradient buffer, summed at the end.
  at::parallel_for(0, nthreads, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const int64_t begin = items * t / nthreads, end = items * (t + 1) / nthreads;
      Scratch<T> buf(gw && !direct_x && !flat ? g.cin * g.plane() : 0), gbuf(direct_g ? 0 : g.cout * gplane, T(0));
      // flattened planes: up to kFlatImages items' planes of the gradient and the input, for gw_flat_dot
      const int64_t slots = flat && dot_gw ? kFlatImages : 1;
      Scratch<uint16_t> gb16(direct_g ? slots * g.cout * gps : 0);
      Scratch<uint16_t> xb16(direct_x || (flat && gw) ? slots * g.cin * xps : 0);
      Scratch<uint16_t> zero16(direct_x && !flat ? g.wq : 0);
      // flattened planes: one plane's values as bf16 bits, 32 words past them readable
      Scratch<uint16_t> vals(flat ? (g.h * g.w + 15) / 16 * 16 + 32 : 0);  // (at stride 1 h x w = ho x wo)
      Scratch<T> gxb(gx && s != 1 && !dot_gx ? g.cin * g.plane() : 0);
      // one output-gradient plane through BN and ReLU, one input plane through the previous BN and ReLU
      Scratch<T> plane(bn.y && !direct_g ? g.ho * g.wo : 0), tmp(isc && !direct_x && !flat ? g.h * g.w : 0);
      // the bf16 dot products' operands: input rows paired (r, r + s), output-gradient rows paired (2p, 2p + 1),
      // output-gradient channels paired (2m, 2m + 1); a zero row for the pairs past the last row
      Scratch<uint32_t> x2(dot_gw && !flat ? g.cin * g.plane() : 0);
      Scratch<uint32_t> g2(dot_gw && !flat ? g.cout * ((g.ho + 1) / 2) * g.wr : 0);
      const int64_t npg = (g.cout + 1) / 2;  // output-gradient channel pairs (an odd count's last with zeros)
      Scratch<uint32_t> gpp(dot_gx ? npg * gps : 0);
      Scratch<uint16_t> zero_g16(dot_gx && direct_g && g.cout % 2 ? gps : 0);
      Scratch<T> zero_g(dot_gx && !direct_g && g.cout % 2 ? gplane : 0, T(0));
      Scratch<T> zero_row(dot_gw ? g.wq : 0, T(0));
      const int64_t lanes = flat ? 16 : g.vw;  // gw_block_dot's lanes per weight (gw_flat_dot's: 16)
      Scratch<float> gw_lanes(dot_gw ? wsize * lanes : 0, 0.f);  // summed into gwt at the end
      T* gwt = nullptr;
      if (gw) {
        partial[t].assign(wsize, T(0));
        gwt = partial[t].data();
      }
      [[maybe_unused]] int pend = 0;  // flattened planes: items of group gi built, waiting for gw_flat_dot
      for (int64_t item = begin; item < end; ++item) {
        // flattened planes: the items group by group (consecutive items of a group share gw_flat_dot's sums)
        const int64_t ni = flat ? item % g.n : item / g.groups, gi = flat ? item / g.n : item % g.groups;
        // output gradient, padded by one row and column of zeros (and zeros past the row end); on the fused path
        // taken through BN and ReLU first, a whole plane at a time (rows of 7-28 values are too short for vectors)
        for (int64_t o = 0; o < g.cout && !direct_g; ++o) {
          const int64_t ch = gi * g.cout + o;
          const M* gsrc = gyp + ni * gys[0] + ch * gys[1];
          T* gdst = gbuf.data() + o * gplane + g.wq + 1;  // value (i, j) at gdst[i * wq + j]
          if (bn.y) {
            const M* yp = bn.y + (ni * g.groups * g.cout + ch) * g.ho * g.wo;
            const T sc = bn.sc[ch], sh = bn.sh[ch], A = bn.A[ch], B = bn.B[ch];
            if (plane_contiguous) {
              bn_relu_grad_row(yp, gsrc, g.ho * g.wo, sc, sh, A, B, plane.data());
            } else {
              for (int64_t i = 0; i < g.ho; ++i)
                for (int64_t j = 0; j < g.wo; ++j) {
                  const T yv = IO<T, M>::get(yp + i * g.wo + j);
                  const T gv = IO<T, M>::get(gsrc + i * gys[2] + j * gys[3]) * sc;
                  plane[i * g.wo + j] = (yv * sc + sh > T(0) ? gv : T(0)) + yv * A + B;
                }
            }
            for (int64_t i = 0; i < g.ho; ++i) std::memcpy(gdst + i * g.wq, plane.data() + i * g.wo, sizeof(T) * g.wo);
          } else {
            for (int64_t i = 0; i < g.ho; ++i) {
              const M* src = gsrc + i * gys[2];
              if (gys[3] == 1) {
                widen_row(src, g.wo, gdst + i * g.wq);
              } else {
                for (int64_t j = 0; j < g.wo; ++j) gdst[i * g.wq + j] = IO<T, M>::get(src + j * gys[3]);
              }
            }
          }
        }
        if (gw && !direct_x && !flat) pad_copy(xp, xs, g, ni, gi, buf.data(), isc, ish, tmp.data());
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<T, float> && std::is_same_v<M, c10::BFloat16>) {
          const int64_t pairs = (g.ho + 1) / 2;
#if defined(__AVX512VBMI2__)
          if (flat) {  // flattened planes of the gradient (through BN and ReLU) and of the input (through BN1)
            const int64_t hw = g.h * g.w, hwo = g.ho * g.wo;
            uint16_t* gbs = gb16.data() + pend * g.cout * gps;  // this item's slot
            for (int64_t o = 0; o < g.cout; ++o) {
              const int64_t ch = gi * g.cout + o;
              grad_bits_row(bn.y + (ni * g.groups * g.cout + ch) * hwo, gyp + ni * gys[0] + ch * gys[1], hwo,
                            bn.sc[ch], bn.sh[ch], bn.A[ch], bn.B[ch], vals.data());
              flat_place(fp, vals.data(), gbs + o * gps);
            }
            if (dot_gx)
              for (int64_t m = 0; m < npg; ++m)
                interleave_bits(gbs + 2 * m * gps, 2 * m + 1 < g.cout ? gbs + (2 * m + 1) * gps : zero_g16.data(),
                                gps, gpp.data() + m * gps);
            if (dot_gw) {
              uint16_t* xbs = xb16.data() + pend * g.cin * xps;
              for (int64_t ci = 0; ci < g.cin; ++ci) {
                const int64_t ch = gi * g.cin + ci;
                const M* src = xp + ni * xs[0] + ch * xs[1];
                const float sc = isc ? isc[ch] : 0.f, sh = isc ? ish[ch] : 0.f;
                if (s == 1) {
                  bits_row(src, hw, isc != nullptr, sc, sh, vals.data());
                  flat_place(fp, vals.data(), xbs + ci * xps);
                } else {
                  phase_planes(src, xs[2], g.h, g.w, isc != nullptr, sc, sh, phw, xbs + ci * xps);
                }
              }
              // the weight gradient once kFlatImages items of the group wait, or the group's last item is in
              if (++pend == kFlatImages || item + 1 == end || (item + 1) / g.n != gi) {
                float* gwg = gw_lanes.data() + gi * g.cout * g.cin * 9 * 16;
                const int64_t xst = g.cin * xps, gst = g.cout * gps;
                const auto all = [&](auto stride) {  // output channels two at a time, every input channel
                  constexpr int S = decltype(stride)::value;
                  for (int64_t ci = 0; ci < g.cin; ++ci) {
                    int64_t o0 = 0;
                    for (; o0 + 2 <= g.cout; o0 += 2)
                      gw_flat_dot<2, S>(xb16.data(), xps, phw, gb16.data(), fp, g.cin, o0, ci, gwg, pend, xst, gst);
                    for (; o0 < g.cout; ++o0)
                      gw_flat_dot<1, S>(xb16.data(), xps, phw, gb16.data(), fp, g.cin, o0, ci, gwg, pend, xst, gst);
                  }
                };
                if (s == 1)
                  all(std::integral_constant<int, 1>{});
                else
                  all(std::integral_constant<int, 2>{});
                pend = 0;
              }
            }
            if (dot_gx) {
              const uint32_t* wgx = pw.gx.data() + gi * g.cin * npg * 9;
              if (s == 1) {
                const DotConv c{gpp.data(), npg, gps, wgx, g.h, g.w, gi * g.cin};
                conv_all_dot(c, gf, g.cin, gxp, gxs, ni);
              } else {
                gx_s2_all_dot(gpp.data(), npg, gps, wgx, gf, gi * g.cin, gxp, gxs, ni);
              }
            }
          }
#endif
          if (direct_g && !flat) {  // the gradient through BN and ReLU as bf16 bits, then its channel and row pairs
            for (int64_t o = 0; o < g.cout; ++o) {
              const int64_t ch = gi * g.cout + o, off = (ni * g.groups * g.cout + ch) * g.ho * g.wo;
              const M* gsrc = gyp + ni * gys[0] + ch * gys[1];
              for (int64_t i = 0; i < g.ho; ++i)
                grad_bits_row(bn.y + off + i * g.wo, gsrc + i * g.wo, g.wo, bn.sc[ch], bn.sh[ch], bn.A[ch], bn.B[ch],
                              gb16.data() + o * gplane + (i + 1) * g.wq + 1);
            }
            if (dot_gx)
              for (int64_t m = 0; m < npg; ++m)
                interleave_bits(gb16.data() + 2 * m * gplane,
                                2 * m + 1 < g.cout ? gb16.data() + (2 * m + 1) * gplane : zero_g16.data(), gplane,
                                gpp.data() + m * gplane);
            if (dot_gw)
              for (int64_t o = 0; o < g.cout; ++o)
                for (int64_t p = 0; p < pairs; ++p) {
                  const uint16_t* src = gb16.data() + o * gplane + (2 * p + 1) * g.wq + 1;  // rows 2p and 2p + 1
                  interleave_bits(src, src + g.wq, g.wr, g2.data() + (o * pairs + p) * g.wr);
                }
          }
          if (direct_x && !flat) {  // the input (through the previous BN and ReLU) as bf16 bits, then its row pairs
            for (int64_t ci = 0; ci < g.cin; ++ci) {
              const int64_t ch = gi * g.cin + ci;
              const M* src = xp + ni * xs[0] + ch * xs[1];
              uint16_t* xb = xb16.data() + ci * g.plane();
              for (int64_t r = 0; r < g.h; ++r)
                bits_row(src + r * xs[2], g.w, isc != nullptr, isc ? isc[ch] : 0.f, isc ? ish[ch] : 0.f,
                         xb + (r + 1) * g.wq + 1);
              const int64_t whole = (g.hp - 1) * g.wq;
              interleave_bits(xb, xb + g.wq, whole, x2.data() + ci * g.plane());
              interleave_bits(xb + whole, zero16.data(), g.wq, x2.data() + ci * g.plane() + whole);
            }
          }
          if (dot_gw && !flat) {
            for (int64_t ci = 0; ci < g.cin && !direct_x; ++ci)
              for (int64_t ph = 0; ph < g.s; ++ph) {  // rows r and r + s of a phase are s * wq values apart
                const int64_t base = ci * g.plane() + ph * g.hp * g.wq, whole = (g.hp - g.s) * g.wq;
                pack_pairs(buf.data() + base, buf.data() + base + g.s * g.wq, whole, x2.data() + base);
                for (int64_t r = g.hp - g.s; r < g.hp; ++r)
                  pack_pairs(buf.data() + base + r * g.wq, zero_row.data(), g.wq, x2.data() + base + r * g.wq);
              }
            for (int64_t o = 0; o < g.cout && !direct_g; ++o)
              for (int64_t p = 0; p < pairs; ++p) {
                const T* src = gbuf.data() + o * gplane + (2 * p + 1) * g.wq + 1;  // rows 2p and 2p + 1 (or padding)
                pack_pairs(src, src + g.wq, g.wr, g2.data() + (o * pairs + p) * g.wr);
              }
            float* gwg = gw_lanes.data() + gi * g.cout * g.cin * 9 * g.vw;
            for (int64_t ci = 0; ci < g.cin; ++ci) {
              int64_t o0 = 0;
              if (s == 1) {
                if (g.vw == 8) {
                  for (; o0 + 2 <= g.cout; o0 += 2) gw_block_dot<2, 1, 8>(x2.data(), g2.data(), g, o0, ci, gwg);
                  for (; o0 < g.cout; ++o0) gw_block_dot<1, 1, 8>(x2.data(), g2.data(), g, o0, ci, gwg);
                }
                for (; o0 + 2 <= g.cout; o0 += 2) gw_block_dot<2, 1>(x2.data(), g2.data(), g, o0, ci, gwg);
                for (; o0 < g.cout; ++o0) gw_block_dot<1, 1>(x2.data(), g2.data(), g, o0, ci, gwg);
              } else {
                if (g.vw == 8) {
                  for (; o0 + 2 <= g.cout; o0 += 2) gw_block_dot<2, 2, 8>(x2.data(), g2.data(), g, o0, ci, gwg);
                  for (; o0 < g.cout; ++o0) gw_block_dot<1, 2, 8>(x2.data(), g2.data(), g, o0, ci, gwg);
                }
                for (; o0 + 2 <= g.cout; o0 += 2) gw_block_dot<2, 2>(x2.data(), g2.data(), g, o0, ci, gwg);
                for (; o0 < g.cout; ++o0) gw_block_dot<1, 2>(x2.data(), g2.data(), g, o0, ci, gwg);
              }
            }
          }
          if (dot_gx && !flat) {
            for (int64_t m = 0; m < npg && !direct_g; ++m)
              pack_pairs(gbuf.data() + 2 * m * gplane,
                         2 * m + 1 < g.cout ? gbuf.data() + (2 * m + 1) * gplane : zero_g.data(), gplane,
                         gpp.data() + m * gplane);
            if (s == 1) {
              const DotConv c{gpp.data(), npg, gplane, pw.gx.data() + gi * g.cin * npg * 9, g.h, g.w,
                              gi * g.cin};
              conv_all_dot(c, g, g.cin, gxp, gxs, ni);
            } else {
              gx_s2_all_dot(gpp.data(), npg, gplane, pw.gx.data() + gi * g.cin * npg * 9, g, gi * g.cin, gxp, gxs,
                            ni);
            }
          }
        }
#endif
        if (gw && !dot_gw) {
          T* gwg = gwt + gi * g.cout * g.cin * 9;
          for (int64_t ci = 0; ci < g.cin; ++ci) {
            int64_t o0 = 0;
            if (s == 1) {
              if constexpr (!std::is_same_v<T, double>)
                for (; o0 + 2 <= g.cout; o0 += 2) gw_block<T, 2, 1>(buf.data(), gbuf.data(), g, o0, ci, gwg);
              for (; o0 < g.cout; ++o0) gw_block<T, 1, 1>(buf.data(), gbuf.data(), g, o0, ci, gwg);
            } else {
              if constexpr (!std::is_same_v<T, double>)
                for (; o0 + 2 <= g.cout; o0 += 2) gw_block<T, 2, 2>(buf.data(), gbuf.data(), g, o0, ci, gwg);
              for (; o0 < g.cout; ++o0) gw_block<T, 1, 2>(buf.data(), gbuf.data(), g, o0, ci, gwg);
            }
          }
        }
        if (gx && s == 1 && !dot_gx) {
          const T* wg = wp + gi * g.cout * g.cin * 9;
          constexpr bool one = std::is_same_v<T, double>;
          in_channel_blocks<one>(g.cin, [&](auto ob, int64_t c0) {
            constexpr int OB = decltype(ob)::value;
            in_row_blocks<OB, one>(g.h, [&](auto rb, int64_t y) {
              gx_rows<T, M, OB, decltype(rb)::value>(gbuf.data(), wg, g, c0, gxp, gxs, ni, gi, y);
            });
          });
        } else if (gx && s != 1 && !dot_gx) {
          // stride 2: scatter every (o, dy, dx)'s w * gy into the padded, phase-split input positions it read
          std::fill(gxb.begin(), gxb.end(), T(0));
          const T* wg = wp + gi * g.cout * g.cin * 9;
          for (int64_t ci = 0; ci < g.cin; ++ci) {
            T* plane = gxb.data() + ci * g.plane();
            for (int dy = 0; dy < 3; ++dy)
              for (int dx = 0; dx < 3; ++dx) {
                T* base = plane + dy * g.wq + (dx % 2) * g.hp * g.wq + dx / 2;
                for (int64_t i = 0; i < g.ho; ++i) {
                  T* trow = base + i * 2 * g.wq;
                  for (int64_t x0 = 0; x0 < g.wr; x0 += VW) {
                    typename Vt::type acc = Vt::load(trow + x0);
                    for (int64_t o = 0; o < g.cout; ++o)
                      acc += Vt::splat(wg[((o * g.cin + ci) * 3 + dy) * 3 + dx]) *
                             Vt::load(gbuf.data() + o * gplane + (i + 1) * g.wq + 1 + x0);
                    Vt::store(trow + x0, acc);
                  }
                }
              }
            for (int64_t r = 0; r < g.h; ++r) {  // copy out without padding, phases merged
              M* dr = gxp + ni * gxs[0] + (gi * g.cin + ci) * gxs[1] + r * gxs[2];
              const T* sr = plane + (r + 1) * g.wq;
              const T* odd = sr + g.hp * g.wq;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
              if constexpr (std::is_same_v<T, float>) {
                if (gxs[3] == 1) {
                  merge_row_s2(sr + 1, odd, g.w, dr);
                  continue;
                }
              }
#endif
              for (int64_t c = 0; c < g.w; c += 2) IO<T, M>::put(dr + c * gxs[3], odd[c / 2]);
              for (int64_t c = 1; c < g.w; c += 2) IO<T, M>::put(dr + c * gxs[3], sr[(c + 1) / 2]);
            }
          }
        }
        if (gx && bn.add)  // the item's input-gradient planes, just written (in cache), plus the addend's
          for (int64_t ci = 0; ci < g.cin; ++ci) {
            const int64_t o = ni * gxs[0] + (gi * g.cin + ci) * gxs[1];
            add_rows<T, M>(gxp + o, bn.add + o, g.h, g.w, gxs[2], gxs[2], gxs[3]);
          }
      }
      for (int64_t k = 0; k < wsize && dot_gw; ++k) {  // the thread's lanes, summed once
        float sum = 0.f;
        for (int64_t l = 0; l < lanes; ++l) sum += gw_lanes[k * lanes + l];
        gwt[k] += sum;
      }
    }
  });
  if (gw) {
    T* out = gw->data_ptr<T>();
    std::fill(out, out + wsize, T(0));
    for (const auto& p : partial)
      if (!p.empty())
        for (int64_t k = 0; k < wsize; ++k) out[k] += p[k];
  }
}

// The dtype the kernel computes in for tensors stored as t: float for bfloat16, else t itself.
at::ScalarType compute_type(at::ScalarType t) { return t == at::kBFloat16 ? at::kFloat : t; }

// f(T{}, M{}) for the storage dtype t: (float, bfloat16) for bfloat16, (t, t) for float and double.
template <typename F>
void dispatch_storage(at::ScalarType t, const char* name, F&& f) {
  if (t == at::kBFloat16)
    f(float{}, c10::BFloat16{});
  else if (t == at::kFloat)
    f(float{}, float{});
  else if (t == at::kDouble)
    f(double{}, double{});
  else
    TORCH_CHECK(false, name, ": dtype ", t, " is not supported (float, double or bfloat16)");
}

// bfloat16 storage: input (and the fused path's activations and gradients) bfloat16, weight float.
void check(const at::Tensor& x, const at::Tensor& w, int64_t groups, int64_t s, bool allow_bf16 = false) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "unit_train: CPU tensors only");
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3, "unit_train: 3x3 kernels only");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() ||
                  (allow_bf16 && x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kFloat),
              "unit_train: input and weight dtypes differ");
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0 && w.size(0) % groups == 0 && w.size(1) == x.size(1) / groups,
              "unit_train: channel counts do not match the groups");
  TORCH_CHECK(s == 1 || s == 2, "unit_train: stride 1 or 2 only");
  TORCH_CHECK(w.is_contiguous(), "unit_train: the weight must be contiguous");
}

}  // namespace

// --- BatchNorm (batch statistics) and ReLU fused around the convolutions --------------------------------------
//
// The unit group's chain conv1 -> BN1 -> ReLU -> conv2 -> BN2 -> ReLU runs as (bunit/unit_train.py, UnitGroupFn):
//   forward:  y1, stats1 = conv(x); y2, stats2 = conv(relu(bn1(y1))) (BN1 + ReLU applied while the input is padded);
//             out = relu(bn2(y2)) in the input's memory format.
//   backward: sums of the gradient of relu(bn2(.)) (one pass over g and y2); conv2's gradients from that gradient
//             taken through BN2 and ReLU while it is padded (GradBN), conv2's input relu(bn1(y1)) rebuilt while padded;
//             then the same for conv1 with the gradient of relu(bn1(y1)).
// The hidden and normalised activations are never written; BN's statistics are summed in double.

namespace {

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

// A per-channel coefficient: c contiguous values of the dtype the kernel computes in for `like`.
void check_channel_vec(const std::optional<at::Tensor>& t, int64_t c, const at::Tensor& like, const char* what) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == c && t->is_contiguous() &&
                  t->scalar_type() == compute_type(like.scalar_type()),
              "unit_train: ", what, " must be a contiguous vector of ", c, " values of the compute dtype");
}

// v as the unfused path reads it back after storing it in M: rounded to bf16 (nearest even) for M = bfloat16.
template <typename T, typename M>
inline typename V<T>::type as_stored(typename V<T>::type v) {
  if constexpr (std::is_same_v<M, c10::BFloat16>)
    return (typename V<T>::type)bf16_high(v);
  else
    return v;
}

// Per plane (n, c) of y (NCHW contiguous): out = relu(y * sc[c] + sh[c]), out in NCHW or channels_last. With res (a
// residual block's shortcut, of out's shape, layout and dtype R), out = relu(u + res) where u is that value as stored
// in M: what relu(units(x) + shortcut) computes from the unit group's stored output, in one pass.
template <typename T, typename M = T, typename R = M>
void apply_impl(const at::Tensor& y, const T* sc, const T* sh, at::Tensor& out, const R* res = nullptr) {
  using Vt = V<T>;
  constexpr int VW = Vt::W;
  const int64_t n = y.size(0), c = y.size(1), hw = y.size(2) * y.size(3);
  const M* yp = y.data_ptr<M>();
  R* op = out.data_ptr<R>();
  const bool nchw = out.is_contiguous();
  const int64_t grain = std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, hw));
  at::parallel_for(0, n * c, grain, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t ni = p / c, ch = p % c;
      const M* src = yp + p * hw;
      const T a = sc[ch], s0 = sh[ch];
      if (nchw) {
        R* dst = op + p * hw;
        const R* rp = res ? res + p * hw : nullptr;
        const typename Vt::type va = Vt::splat(a), vb = Vt::splat(s0), zero{};
        int64_t j = 0;
        for (; j + VW <= hw; j += VW) {
          typename Vt::type v = IO<T, M>::load(src + j) * va + vb;
          v = v > zero ? v : zero;
          if (rp) {
            v = as_stored<T, M>(v) + IO<T, R>::load(rp + j);
            v = v > zero ? v : zero;
          }
          IO<T, R>::store(dst + j, v);
        }
        for (; j < hw; ++j) {
          T v = std::max(IO<T, M>::get(src + j) * a + s0, T(0));
          if (rp) v = std::max(static_cast<T>(static_cast<M>(v)) + IO<T, R>::get(rp + j), T(0));
          IO<T, R>::put(dst + j, v);
        }
      } else {  // channels_last: (n, h, w, c)
        R* dst = op + ni * hw * c + ch;
        const R* rp = res ? res + ni * hw * c + ch : nullptr;
        for (int64_t j = 0; j < hw; ++j) {
          T v = std::max(IO<T, M>::get(src + j) * a + s0, T(0));
          if (rp) v = std::max(static_cast<T>(static_cast<M>(v)) + IO<T, R>::get(rp + j * c), T(0));
          IO<T, R>::put(dst + j * c, v);
        }
      }
    }
  });
}

// Sums over the batch of gz = (y * sc + sh > 0 ? g : 0) and of gz * y per channel (g and y NCHW contiguous), each
// in kSumLanes double lanes per thread (see plane_stats). RES: g first goes through the residual block's ReLU,
// g = out <= 0 ? 0 : g (what threshold_backward(g, out, 0) computes, out the block's output), and that gradient is
// written to gres (the shortcut's gradient) in the same pass.
template <typename T, typename M = T, bool RES = false>
void grad_sums_impl(const at::Tensor& g, const at::Tensor& y, const T* sc, const T* sh, at::Tensor& sums,
                    const M* op = nullptr, M* gres = nullptr) {
  using Vt = V<T>;
  constexpr int VW = Vt::W;
  const int64_t n = y.size(0), c = y.size(1), hw = y.size(2) * y.size(3);
  const M* yp = y.data_ptr<M>();
  const M* gp = g.data_ptr<M>();
  const int nthreads = threads_for(n * c * hw / 8, n);
  std::vector<Scratch<double>> partial(nthreads, Scratch<double>(2 * c * kSumLanes, 0.0));
  at::parallel_for(0, nthreads, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      double* st = partial[t].data();
      for (int64_t ni = n * t / nthreads; ni < n * (t + 1) / nthreads; ++ni)
        for (int64_t ch = 0; ch < c; ++ch) {
          const int64_t off = (ni * c + ch) * hw;
          const M* yr = yp + off;
          const M* gr = gp + off;
          const T a = sc[ch], b = sh[ch];
          const typename Vt::type va = Vt::splat(a), vb = Vt::splat(b), zero{};
          typename Vt::type s1{}, s2{};
          int64_t j = 0;
          for (; j + VW <= hw; j += VW) {
            const typename Vt::type yv = IO<T, M>::load(yr + j);
            typename Vt::type gv = IO<T, M>::load(gr + j);
            if constexpr (RES) {
              gv = IO<T, M>::load(op + off + j) <= zero ? zero : gv;
              IO<T, M>::store(gres + off + j, gv);
            }
            const typename Vt::type gz = yv * va + vb > zero ? gv : zero;
            s1 += gz;
            s2 += gz * yv;
          }
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
          if constexpr (std::is_same_v<T, float>) {
            if (j < hw) {  // the rest as one vector: zeros past it give gz = 0 there
              const typename Vt::type yv = (typename Vt::type)load16(yr + j, hw - j);
              typename Vt::type gv = (typename Vt::type)load16(gr + j, hw - j);
              if constexpr (RES) {
                gv = (typename Vt::type)load16(op + off + j, hw - j) <= zero ? zero : gv;
                IO<T, M>::store_n(gres + off + j, gv, hw - j);
              }
              const typename Vt::type gz = yv * va + vb > zero ? gv : zero;
              s1 += gz;
              s2 += gz * yv;
            }
            add_lanes((__m512)s1, st + ch * kSumLanes);
            add_lanes((__m512)s2, st + (c + ch) * kSumLanes);
            continue;
          }
#endif
          double d1 = 0, d2 = 0;
          for (int l = 0; l < VW; ++l) {
            d1 += s1[l];
            d2 += s2[l];
          }
          for (; j < hw; ++j) {
            const T yv = IO<T, M>::get(yr + j);
            T gv = IO<T, M>::get(gr + j);
            if constexpr (RES) {
              gv = IO<T, M>::get(op + off + j) <= T(0) ? T(0) : gv;
              IO<T, M>::put(gres + off + j, gv);
            }
            if (yv * a + b > T(0)) {
              d1 += gv;
              d2 += double(gv) * yv;
            }
          }
          st[ch * kSumLanes] += d1;
          st[(c + ch) * kSumLanes] += d2;
        }
    }
  });
  sum_lanes(partial, 2 * c, sums.data_ptr<double>());
}

}  // namespace

namespace {

// --- rows of 2-1-2 and 2-1-4 units in channels_last: one vector holds 16 units --------------------------------
//
// A row of n 2-1-c units (conv1 two input channels to one at stride 1 or 2, conv2 one to c = 2 or 4) spends its
// time in the per-(image, unit) work of the kernels above: each work item is a few planes of 7-14 px. In
// channels_last the units lie side by side instead: at one pixel, a 512-bit load of the input holds 16 units'
// channel pairs, exactly the word pairs vdpbf16ps multiplies, and conv1 of 16 units is 9 dot products per pixel;
// conv2 and the gradients are 16-lane multiply-adds with one unit per lane. These kernels take that layout (bf16
// storage, AVX512-BF16, n a multiple of 16, or 8 with two pixels per vector: unit_lanes) and compute what the NCHW
// kernels compute: the same operands rounded to
// bf16 (weights, conv2's input relu(y1 * sc + sh), the gradients taken through BN), products exact in float32,
// float32 sums in another order, BN's sums in double. Each image's planes go through a zero-bordered scratch copy, so no tap is
// tested at the borders.
// channels_last and not also NCHW-contiguous (as bunit.functional.is_channels_last says), 4-D.
inline bool is_cl(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

// Whether n units of a row (or n channels of their tensors) fill these kernels' vectors: a multiple of 16, or 8 (two
// pixels per vector, see unit_lanes).
inline bool fills_unit_lanes(int64_t n) { return n % 16 == 0 || n == 8; }

#if defined(__AVX512BF16__)
constexpr bool kChannelsLastUnits = true;

inline __m512 round_bf16(__m512 v) { return (__m512)bf16_high((V<float>::type)v); }
inline __m512 words_lo(__m512i w) { return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)); }
inline __m512 words_hi(__m512i w) {
  return _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
// (lo, hi) rounded to bf16, lo in the low half of each word: 16 channel pairs (2u, 2u + 1) in channels_last order.
inline __m512i pack_words(__m512 lo, __m512 hi) {
  return (__m512i)((bf16_high((V<float>::type)lo) >> 16) | bf16_high((V<float>::type)hi));
}
inline __m512 load_bf16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline void store_bf16(c10::BFloat16* p, __m512 v) {
  store_bits(reinterpret_cast<uint16_t*>(p), bf16_high((V<float>::type)v));
}
// 16 floats added to 16 double lanes (one per channel).
inline void add_channels(__m512 v, double* acc) {
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  _mm512_storeu_pd(acc, _mm512_add_pd(_mm512_loadu_pd(acc), _mm512_cvtps_pd(_mm512_castps512_ps256(v))));
  _mm512_storeu_pd(acc + 8, _mm512_add_pd(_mm512_loadu_pd(acc + 8), _mm512_cvtps_pd(hi)));
}

// Which kernel of this section computes conv(x, w, groups, s): 1 conv1 of 2-1-c units (w: (n, 2, 3, 3), stride 1
// or 2), 2 their conv2 (w: (cn, 1, 3, 3), c = 2 or 4), 0 none (then the kernels above). n is a multiple of 16 or 8.
inline int channels_last_units(const at::Tensor& x, const at::Tensor& w, int64_t groups, int64_t s, bool dot) {
  if (!dot || x.scalar_type() != at::kBFloat16 || !fills_unit_lanes(groups) || !is_cl(x)) return 0;
  if (w.size(0) == groups && w.size(1) == 2 && x.size(1) == 2 * groups && (s == 1 || s == 2)) return 1;
  if (s == 1 && (w.size(0) == 2 * groups || w.size(0) == 4 * groups) && w.size(1) == 1 && x.size(1) == groups)
    return 2;
  return 0;
}


// Lanes of a row of n units in these kernels: n (a multiple of 16: 16 units of one pixel per vector), or 16 for n = 8,
// whose vectors hold two neighbouring pixels of a row (lanes 8-15 the second pixel's; at a row's end with an odd width,
// lanes 8-15 are read past it and masked where stored or summed). Per-unit weights and BN coefficients are repeated in
// both halves (lane l: unit l % n), and per-lane sums folded back to units (sum_unit_lanes).
inline int64_t unit_lanes(int64_t n) { return n == 8 ? 16 : n; }
inline int64_t pixels_per_vector(int64_t n) { return n == 8 ? 2 : 1; }

// The lanes to keep of the vector holding the pixel at column col of a row of w pixels (n units): all 16, or for n = 8
// at an odd row's last column the first pixel's 8.
inline __mmask16 pixel_lanes(int64_t n, int64_t col, int64_t w) {
  return n == 8 && col + 1 == w ? static_cast<__mmask16>(0x00ff) : static_cast<__mmask16>(0xffff);
}

// The lanes of values k .. k + 16 of a row of `row` values (the last vector of a row partly past its end).
inline __mmask16 row_lanes(int64_t k, int64_t row) {
  return row - k >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (row - k)) - 1);
}

// 16 words of a row's vector: 16 units of the pixel at p (n a multiple of 16), or for n = 8 the 8 units of the pixels
// at p and p + step (words; step 8: one load).
inline __m512i load_units(const uint32_t* p, int64_t n, int64_t step) {
  if (n != 8 || step == 8) return _mm512_loadu_si512(p);
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + step)), 1);
}

// The 16 bf16 values at p widened to float, those outside m read as 0 (not loaded).
inline __m512 load_bf16_lanes(const c10::BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

inline void store_bf16_lanes(c10::BFloat16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16((__m512i)(bf16_high((V<float>::type)v) >> 16)));
}

// A per-unit vector of n floats laid out in unit_lanes(n) lanes (lane l: v[l % n]).
inline Scratch<float> unit_lane_values(const float* v, int64_t n) {
  Scratch<float> out(unit_lanes(n));
  for (int64_t l = 0; l < unit_lanes(n); ++l) out[l] = v[l % n];
  return out;
}

// The per-thread sums of `rows` rows of unit_lanes(n) lanes, folded to rows of n values: out[k * n + u].
inline void sum_unit_lanes(const std::vector<Scratch<double>>& partial, int64_t rows, int64_t n, double* out) {
  const int64_t L = unit_lanes(n);
  std::vector<double> all(rows * L);
  sum_lanes(partial, rows * L, all.data(), 1);
  std::fill(out, out + rows * n, 0.0);
  for (int64_t k = 0; k < rows; ++k)
    for (int64_t l = 0; l < L; ++l) out[k * n + l % n] += all[k * L + l];
}

// Columns 0 .. w of a row in blocks of 4, then one at a time: f(integral_constant<P>, first column). P independent
// accumulators per step: one pixel's 9 taps are a chain of dependent multiply-adds, which alone leaves the FMA
// units waiting on their latency.
template <typename F>
inline void in_pixel_blocks(int64_t w, F&& f) {
  int64_t c = 0;
  for (; c + 4 <= w; c += 4) f(std::integral_constant<int, 4>{}, c);
  for (; c < w; ++c) f(std::integral_constant<int, 1>{}, c);
}

// Per-thread work of a call over the B images: f(first image, last image, thread).
template <typename F>
void over_images(int64_t images, int64_t work, F&& f) {
  const int nthreads = threads_for(work, images);
  at::parallel_for(0, nthreads, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) f(images * t / nthreads, images * (t + 1) / nthreads, t);
  });
}

// Unit u's weights of a group, one 16-lane vector per (output j of the unit, tap t), L = unit_lanes(n):
// out[(j * 9 + t) * L + l] = w[per_unit * u + j][t'] with u = l % n (per_unit outputs per unit, w's 9 taps of one
// input channel per output), t' = 8 - t when flipped (the input gradient), rounded to bf16 (every product of these
// kernels is of bf16 operands).
inline Scratch<float> unit_weight_lanes(const float* w, int64_t n, int64_t per_unit, bool flip) {
  const int64_t L = unit_lanes(n);  // lane l: unit l % n
  Scratch<float> out(per_unit * 9 * L);
  for (int64_t l = 0; l < L; ++l)
    for (int64_t j = 0; j < per_unit; ++j)
      for (int t = 0; t < 9; ++t) {
        const uint32_t bits = bf16_high(w[(per_unit * (l % n) + j) * 9 + (flip ? 8 - t : t)]);
        std::memcpy(&out[(j * 9 + t) * L + l], &bits, 4);
      }
  return out;
}

// The same weights as bf16 pairs for vdpbf16ps, outputs 2q and 2q + 1 of the unit in one word:
// out[(q * 9 + t) * L + l] = (w[per_unit * u + 2q][t'], w[per_unit * u + 2q + 1][t']) (u = l % n).
inline Scratch<uint32_t> unit_weight_pairs(const float* w, int64_t n, int64_t per_unit, bool flip) {
  const int64_t L = unit_lanes(n);  // lane l: unit l % n
  Scratch<uint32_t> out(per_unit / 2 * 9 * L);
  for (int64_t l = 0; l < L; ++l)
    for (int64_t q = 0; q < per_unit / 2; ++q)
      for (int t = 0; t < 9; ++t) {
        const int64_t k = (per_unit * (l % n) + 2 * q) * 9 + (flip ? 8 - t : t);
        out[(q * 9 + t) * L + l] = (bf16_high(w[k]) >> 16) | bf16_high(w[k + 9]);
      }
  return out;
}

// 16 lanes' 3x3 stencil of a zero-bordered float plane (rows of wp pixels of n values, unit block ub) with two weight
// sets w0, w1 (9 taps each), for P vectors of output row r from column c0, pv pixels apart (pixels_per_vector):
// a0[q], a1[q].
template <int P>
inline void stencil_two(const float* pad, int64_t wp, int64_t n, int64_t ub, int64_t r, int64_t c0, int64_t pv,
                        const __m512* w0, const __m512* w1, __m512 (&a0)[P], __m512 (&a1)[P]) {
#pragma GCC unroll 4
  for (int q = 0; q < P; ++q) a0[q] = a1[q] = _mm512_setzero_ps();
#pragma GCC unroll 3
  for (int dy = 0; dy < 3; ++dy)
#pragma GCC unroll 3
    for (int dx = 0; dx < 3; ++dx)
#pragma GCC unroll 4
      for (int q = 0; q < P; ++q) {
        const __m512 v = _mm512_loadu_ps(pad + ((r + dy) * wp + c0 + q * pv + dx) * n + ub);
        a0[q] = _mm512_fmadd_ps(v, w0[dy * 3 + dx], a0[q]);
        a1[q] = _mm512_fmadd_ps(v, w1[dy * 3 + dx], a1[q]);
      }
}

// conv1 of n 2-1-2 units: x (B, 2n, H, W) channels_last bf16 -> y (B, n, H, W) channels_last bf16, with the batch
// [sums; sums of squares] of y as stored.
void cl_conv1_forward(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, at::Tensor& stats, int64_t s) {
  const int64_t B = x.size(0), n = x.size(1) / 2, H = x.size(2), W = x.size(3), wp = W + 2;
  const int64_t Ho = y.size(2), Wo = y.size(3), L = unit_lanes(n), pv = pixels_per_vector(n), nv = (Wo + pv - 1) / pv;
  const float* wf = w.data_ptr<float>();
  const Scratch<uint32_t> wq = unit_weight_pairs(wf, n, 2, false);  // wq[t * L + l]: (w[u][0][t], w[u][1][t])
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(x.data_ptr<c10::BFloat16>());
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  std::vector<Scratch<double>> partial(at::get_num_threads());
  over_images(B, B * H * W * n, [&](int64_t b0, int64_t b1, int64_t t) {
    Scratch<uint32_t> pad(((H + 2) * wp + 4) * n, 0u);  // 4 pixels past the plane: read (not used) at odd ends
    Scratch<double>& st = partial[t];
    st.assign(2 * L, 0.0);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t r = 0; r < H; ++r)
        std::memcpy(pad.data() + ((r + 1) * wp + 1) * n, xp + (b * H + r) * W * n, sizeof(uint32_t) * W * n);
      for (int64_t ub = 0; ub < n; ub += 16) {
        __m512bh wv[9];
#pragma GCC unroll 9
        for (int k = 0; k < 9; ++k) wv[k] = (__m512bh)_mm512_loadu_si512(wq.data() + k * L + ub);
        for (int64_t r = 0; r < Ho; ++r) {
          __m512 s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps();
          in_pixel_blocks(nv, [&](auto pb, int64_t v0) {
            constexpr int P = decltype(pb)::value;
            __m512 acc[P];
#pragma GCC unroll 4
            for (int q = 0; q < P; ++q) acc[q] = _mm512_setzero_ps();
#pragma GCC unroll 3
            for (int dy = 0; dy < 3; ++dy)
#pragma GCC unroll 3
              for (int dx = 0; dx < 3; ++dx)
#pragma GCC unroll 4
                for (int q = 0; q < P; ++q)
                  acc[q] = _mm512_dpbf16_ps(
                      acc[q],
                      (__m512bh)load_units(pad.data() + ((r * s + dy) * wp + (v0 + q) * pv * s + dx) * n + ub, n,
                                           s * n),
                      wv[dy * 3 + dx]);
#pragma GCC unroll 4
            for (int q = 0; q < P; ++q) {
              const int64_t col = (v0 + q) * pv;
              const __mmask16 m = pixel_lanes(n, col, Wo);
              const __m512 v = _mm512_maskz_mov_ps(m, round_bf16(acc[q]));
              store_bf16_lanes(yp + ((b * Ho + r) * Wo + col) * n + ub, v, m);
              s1 = _mm512_add_ps(s1, v);
              s2 = _mm512_fmadd_ps(v, v, s2);
            }
          });
          add_channels(s1, st.data() + ub);
          add_channels(s2, st.data() + L + ub);
        }
      }
    }
  });
  sum_unit_lanes(partial, 2, n, stats.data_ptr<double>());
}

// conv2's input relu(y1 * sc + sh) (or y1 itself without sc), rounded to bf16, for one image into the zero-bordered
// float scratch pad ((H + 2) x (W + 2) pixels of n values); sc and sh in unit_lanes(n) lanes (unit_lane_values).
// A row's W n values are contiguous in both, taken 16 at a time (the last ones masked: n = 8 and W odd).
inline void cl_bn_input(const c10::BFloat16* y1, int64_t H, int64_t W, int64_t n, const float* sc, const float* sh,
                        float* pad) {
  const int64_t wp = W + 2, row = W * n;
  for (int64_t r = 0; r < H; ++r)
    for (int64_t k = 0; k < row; k += 16) {
      const __mmask16 m = row_lanes(k, row);
      __m512 v = load_bf16_lanes(y1 + r * row + k, m);
      if (sc) {
        const int64_t l = k % n;  // the unit block (0 for n = 8, whose lanes repeat every 8)
        v = round_bf16(_mm512_max_ps(_mm512_fmadd_ps(v, _mm512_loadu_ps(sc + l), _mm512_loadu_ps(sh + l)),
                                     _mm512_setzero_ps()));
      }
      _mm512_mask_storeu_ps(pad + ((r + 1) * wp + 1) * n + k, m, v);
    }
}

// Words of two 16-word vectors interleaved, a[0], b[0], a[1], b[1], ...: the first 16 and the last 16.
inline void interleave_words(__m512i a, __m512i b, __m512i* lo, __m512i* hi) {
  const __m512i il = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i ih = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  *lo = _mm512_permutex2var_epi32(a, il, b);
  *hi = _mm512_permutex2var_epi32(a, ih, b);
}

// conv2 of n 2-1-c units (c = 2 or 4 outputs per unit): y1 (B, n, H, W) channels_last bf16, taken through
// relu(y1 * sc + sh) when sc is given -> y2 (B, cn, H, W) channels_last bf16, with the batch sums of y2 as stored.
// The outputs go in pairs (channels cu + 2q, cu + 2q + 1: one word per unit); with c = 4 the two pairs' words are
// interleaved per unit once the image's pairs are done.
void cl_conv2_forward(const at::Tensor& y1, const at::Tensor& w, const float* sc, const float* sh, at::Tensor& y2,
                      at::Tensor& stats) {
  const int64_t B = y1.size(0), n = y1.size(1), H = y1.size(2), W = y1.size(3), wp = W + 2;
  const int64_t c = w.size(0) / n, pairs = c / 2, L = unit_lanes(n), pv = pixels_per_vector(n), nv = (W + pv - 1) / pv;
  const float* wf = w.data_ptr<float>();
  const Scratch<float> wr = unit_weight_lanes(wf, n, c, false);  // w[cu + j][0][t], bf16-rounded
  const Scratch<float> scl = sc ? unit_lane_values(sc, n) : Scratch<float>();
  const Scratch<float> shl = sh ? unit_lane_values(sh, n) : Scratch<float>();
  const c10::BFloat16* y1p = y1.data_ptr<c10::BFloat16>();
  uint32_t* y2w = reinterpret_cast<uint32_t*>(y2.data_ptr<c10::BFloat16>());  // (c / 2) n words per pixel
  std::vector<Scratch<double>> partial(at::get_num_threads());
  over_images(B, B * H * W * n * c, [&](int64_t b0, int64_t b1, int64_t t) {
    Scratch<float> pad(((H + 2) * wp + 4) * n, 0.f);  // 4 pixels past the plane: read (not used) at odd ends
    Scratch<uint32_t> words(pairs > 1 ? (pairs * H * W + 1) * n : 0);  // [pair][pixel][unit], a pixel past the last
    Scratch<double>& st = partial[t];
    st.assign(2 * c * L, 0.0);  // [sum j; squares j], each L lanes (unit l % n)
    for (int64_t b = b0; b < b1; ++b) {
      cl_bn_input(y1p + b * H * W * n, H, W, n, sc ? scl.data() : nullptr, sh ? shl.data() : nullptr, pad.data());
      for (int64_t pq = 0; pq < pairs; ++pq)
        for (int64_t ub = 0; ub < n; ub += 16) {
          __m512 w0[9], w1[9];
#pragma GCC unroll 9
          for (int k = 0; k < 9; ++k) {
            w0[k] = _mm512_loadu_ps(wr.data() + (2 * pq * 9 + k) * L + ub);
            w1[k] = _mm512_loadu_ps(wr.data() + ((2 * pq + 1) * 9 + k) * L + ub);
          }
          for (int64_t r = 0; r < H; ++r) {
            __m512 s10 = _mm512_setzero_ps(), s11 = s10, s20 = s10, s21 = s10;
            in_pixel_blocks(nv, [&](auto pb, int64_t vb) {
              constexpr int P = decltype(pb)::value;
              __m512 a0[P], a1[P];
              stencil_two<P>(pad.data(), wp, n, ub, r, vb * pv, pv, w0, w1, a0, a1);
#pragma GCC unroll 4
              for (int q = 0; q < P; ++q) {
                const int64_t col = (vb + q) * pv, pix = r * W + col;
                const __mmask16 m = pixel_lanes(n, col, W);
                const __m512 v0 = _mm512_maskz_mov_ps(m, round_bf16(a0[q]));
                const __m512 v1 = _mm512_maskz_mov_ps(m, round_bf16(a1[q]));
                uint32_t* dst =
                    pairs > 1 ? words.data() + (pq * H * W + pix) * n + ub : y2w + (b * H * W + pix) * n + ub;
                _mm512_mask_storeu_epi32(dst, m, pack_words(v0, v1));
                s10 = _mm512_add_ps(s10, v0);
                s11 = _mm512_add_ps(s11, v1);
                s20 = _mm512_fmadd_ps(v0, v0, s20);
                s21 = _mm512_fmadd_ps(v1, v1, s21);
              }
            });
            add_channels(s10, st.data() + 2 * pq * L + ub);
            add_channels(s11, st.data() + (2 * pq + 1) * L + ub);
            add_channels(s20, st.data() + (c + 2 * pq) * L + ub);
            add_channels(s21, st.data() + (c + 2 * pq + 1) * L + ub);
          }
        }
      if (pairs == 2)  // unit u's words: (cu, cu + 1), then (cu + 2, cu + 3); n = 8: two pixels per pair of vectors
        for (int64_t pix = 0; pix < H * W; pix += pv)
          for (int64_t ub = 0; ub < n; ub += 16) {
            __m512i lo, hi;
            interleave_words(_mm512_loadu_si512(words.data() + pix * n + ub),
                             _mm512_loadu_si512(words.data() + (H * W + pix) * n + ub), &lo, &hi);
            uint32_t* dst = y2w + (b * H * W + pix) * 2 * n + 2 * ub;
            _mm512_storeu_si512(dst, lo);
            if (pix + pv <= H * W) _mm512_storeu_si512(dst + 16, hi);
          }
    }
  });
  std::vector<double> sums(2 * c * n);
  sum_unit_lanes(partial, 2 * c, n, sums.data());
  double* out = stats.data_ptr<double>();  // [2, cn]: channel cu + j
  for (int64_t u = 0; u < n; ++u)
    for (int j = 0; j < c; ++j) {
      out[c * u + j] = sums[j * n + u];
      out[c * n + c * u + j] = sums[(c + j) * n + u];
    }
}

// relu(y * sc + sh) over y (B, C, H, W) channels_last bf16, C a multiple of 16, into out (channels_last, R); with
// res, relu(that value as stored + res), as apply_impl computes it.
template <typename R>
void cl_apply(const at::Tensor& y, const float* sc, const float* sh, at::Tensor& out, const R* res) {
  const int64_t C = y.size(1), P = y.size(0) * y.size(2) * y.size(3);
  const c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  R* op = out.data_ptr<R>();
  at::parallel_for(0, P, std::max<int64_t>(1, kMinWork / C), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t cb = 0; cb < C; cb += 16) {
        const int64_t off = p * C + cb;
        const __m512 a = _mm512_fmadd_ps(load_bf16(yp + off), _mm512_loadu_ps(sc + cb), _mm512_loadu_ps(sh + cb));
        __m512 v = _mm512_max_ps(a, _mm512_setzero_ps());
        if (res) {
          const __m512 rv = std::is_same_v<R, float> ? _mm512_loadu_ps(reinterpret_cast<const float*>(res + off))
                                                     : load_bf16(reinterpret_cast<const c10::BFloat16*>(res + off));
          v = _mm512_max_ps(_mm512_add_ps(round_bf16(v), rv), _mm512_setzero_ps());
        }
        if constexpr (std::is_same_v<R, float>)
          _mm512_storeu_ps(op + off, v);
        else
          store_bf16(op + off, v);
      }
  });
}

// grad_sums_impl for channels_last bf16 g and y (C a multiple of 16, or 8): sums of gz = (y * sc + sh > 0 ? g : 0) and
// gz * y per channel; with out, g first through the block's ReLU (out <= 0 ? 0 : g), written to gres. Vectors of 16
// channels of a pixel (C = 8: of two pixels, an odd image's last vector masked).
void cl_grad_sums(const at::Tensor& g, const at::Tensor& y, const float* sc, const float* sh, at::Tensor& sums,
                  const c10::BFloat16* op, c10::BFloat16* gres) {
  const int64_t C = y.size(1), B = y.size(0), HW = y.size(2) * y.size(3), L = unit_lanes(C);
  const int64_t pv = pixels_per_vector(C), nv = (HW + pv - 1) / pv;
  const c10::BFloat16* gp = g.data_ptr<c10::BFloat16>();
  const c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  const Scratch<float> scl = unit_lane_values(sc, C), shl = unit_lane_values(sh, C);
  std::vector<Scratch<double>> partial(at::get_num_threads());
  over_images(B, B * HW * C / 8, [&](int64_t b0, int64_t b1, int64_t t) {
    Scratch<double>& st = partial[t];
    st.assign(2 * L, 0.0);
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t cb = 0; cb < C; cb += 16) {  // one image's sums of 16 lanes, in float, then into double
        const __m512 vs = _mm512_loadu_ps(scl.data() + cb), vh = _mm512_loadu_ps(shl.data() + cb);
        const __m512 zero = _mm512_setzero_ps();
        __m512 s1a = zero, s2a = zero, s1b = zero, s2b = zero;  // two chains: even and odd vectors
        const auto pixel = [&](int64_t v, __m512& s1, __m512& s2) {
          const int64_t off = (b * HW + v * pv) * C + cb;
          const __mmask16 m = pixel_lanes(C, v * pv, HW);
          const auto load = [m](const c10::BFloat16* p) { return load_bf16_lanes(p, m); };
          const __m512 yv = load(yp + off);
          __m512 gv = load(gp + off);
          if (op) {
            gv = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(load(op + off), zero, _CMP_NLE_UQ), gv);
            store_bf16_lanes(gres + off, gv, m);
          }
          const __m512 gz = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_fmadd_ps(yv, vs, vh), zero, _CMP_GT_OQ), gv);
          s1 = _mm512_add_ps(s1, gz);
          s2 = _mm512_fmadd_ps(gz, yv, s2);
        };
        int64_t v = 0;
        for (; v + 2 <= nv; v += 2) {
          pixel(v, s1a, s2a);
          pixel(v + 1, s1b, s2b);
        }
        if (v < nv) pixel(v, s1a, s2a);
        add_channels(_mm512_add_ps(s1a, s1b), st.data() + cb);
        add_channels(_mm512_add_ps(s2a, s2b), st.data() + L + cb);
      }
  });
  sum_unit_lanes(partial, 2, C, sums.data_ptr<double>());
}

// The gradient through BN and ReLU, (y * sc + sh > 0 ? sc * g : 0) + y * A + B, of 16 values y and g (widened) with
// the coefficients' 16 lanes at sc, sh, A, B, rounded to bf16.
inline __m512 bn_grad_values(__m512 yv, __m512 gv, const float* sc, const float* sh, const float* A, const float* B) {
  const __m512 s = _mm512_loadu_ps(sc);
  const __mmask16 on =
      _mm512_cmp_ps_mask(_mm512_fmadd_ps(yv, s, _mm512_loadu_ps(sh)), _mm512_setzero_ps(), _CMP_GT_OQ);
  const __m512 gz = _mm512_maskz_mov_ps(on, _mm512_mul_ps(gv, s));
  return round_bf16(_mm512_add_ps(gz, _mm512_fmadd_ps(yv, _mm512_loadu_ps(A), _mm512_loadu_ps(B))));
}

// The same of 16 channels from c0 of a pixel (y and g at its channel c0).
inline __m512 cl_bn_grad(const c10::BFloat16* y, const c10::BFloat16* g, int64_t c0, const float* sc, const float* sh,
                         const float* A, const float* B) {
  return bn_grad_values(load_bf16(y), load_bf16(g), sc + c0, sh + c0, A + c0, B + c0);
}

// conv2's backward: g (B, cn, H, W), the gradient of relu(y2 * sc + sh), y2 (B, cn, H, W), y1 (B, n, H, W) with
// conv2's input relu(y1 * isc + ish), all channels_last bf16 (c = 2 or 4 outputs per unit): gh (B, n, H, W)
// channels_last bf16 and gw (cn, 1, 3, 3). The gradient through BN2 is kept as c / 2 planes of channel-pair words
// (pair q of unit u: channels cu + 2q, cu + 2q + 1), so that gh is 9 dot products per plane.
void cl_conv2_backward(const at::Tensor& y1, const at::Tensor& w, const at::Tensor& g, const at::Tensor& y2,
                       const float* sc, const float* sh, const float* A, const float* Bc, const float* isc,
                       const float* ish, at::Tensor* gh, at::Tensor* gw) {
  const int64_t B = y1.size(0), n = y1.size(1), H = y1.size(2), W = y1.size(3), wp = W + 2;
  const int64_t c = w.size(0) / n, pairs = c / 2, plane = ((H + 2) * wp + 4) * n;  // 4 pixels read past a plane
  const int64_t L = unit_lanes(n), pv = pixels_per_vector(n), nv = (W + pv - 1) / pv;
  const float* wf = w.data_ptr<float>();
  // wq[(pq * 9 + t) * L + l]: (w[cu + 2pq][0][8 - t], w[cu + 2pq + 1][0][8 - t]), flipped for the input gradient
  const Scratch<uint32_t> wq = unit_weight_pairs(wf, n, c, true);
  const Scratch<float> iscl = unit_lane_values(isc, n), ishl = unit_lane_values(ish, n);
  const c10::BFloat16* y1p = y1.data_ptr<c10::BFloat16>();
  const c10::BFloat16* gp = g.data_ptr<c10::BFloat16>();
  const c10::BFloat16* y2p = y2.data_ptr<c10::BFloat16>();
  c10::BFloat16* ghp = gh ? gh->data_ptr<c10::BFloat16>() : nullptr;
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512i halves = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);  // n = 8
  std::vector<Scratch<float>> partial(at::get_num_threads());
  over_images(B, B * H * W * n * 2 * c, [&](int64_t b0, int64_t b1, int64_t t) {
    Scratch<uint32_t> gpad(pairs * plane, 0u);  // the gradient through BN2: [pair][padded pixel][unit]
    Scratch<uint32_t> pix_words(pairs * n);       // one pixel's, in channel order
    Scratch<float> xpad(gw ? plane : 0, 0.f);
    Scratch<float>& acc = partial[t];
    acc.assign(gw ? 9 * c * L : 0, 0.f);  // acc[(j * 9 + t) * L + l] (unit l % n)
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t r = 0; r < H; ++r)
        for (int64_t col = 0; col < W; ++col) {
          const int64_t off = ((b * H + r) * W + col) * c * n, pix = ((r + 1) * wp + col + 1) * n;
          uint16_t* dst = reinterpret_cast<uint16_t*>(pairs == 1 ? gpad.data() + pix : pix_words.data());
          for (int64_t c0 = 0; c0 < c * n; c0 += 16)
            store_bits(dst + c0,
                       bf16_high((V<float>::type)cl_bn_grad(y2p + off + c0, gp + off + c0, c0, sc, sh, A, Bc)));
          if (pairs == 2 && n == 8) {  // the 8 units' two words: evens to plane 0, odds to plane 1
            const __m512i v = _mm512_permutexvar_epi32(halves, _mm512_loadu_si512(pix_words.data()));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(gpad.data() + pix), _mm512_castsi512_si256(v));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(gpad.data() + plane + pix), _mm512_extracti64x4_epi64(v, 1));
          } else if (pairs == 2) {
            for (int64_t ub = 0; ub < n; ub += 16) {  // unit u's two words to the two planes
              const __m512i lo = _mm512_loadu_si512(pix_words.data() + 2 * ub);
              const __m512i hi = _mm512_loadu_si512(pix_words.data() + 2 * ub + 16);
              _mm512_storeu_si512(gpad.data() + pix + ub, _mm512_permutex2var_epi32(lo, even, hi));
              _mm512_storeu_si512(gpad.data() + plane + pix + ub, _mm512_permutex2var_epi32(lo, odd, hi));
            }
          }
        }
      if (gw) cl_bn_input(y1p + b * H * W * n, H, W, n, iscl.data(), ishl.data(), xpad.data());
      for (int64_t ub = 0; ub < n; ub += 16) {
        if (ghp)
          for (int64_t r = 0; r < H; ++r)
            in_pixel_blocks(nv, [&](auto pb, int64_t vb) {
              constexpr int P = decltype(pb)::value;
              const int64_t c0 = vb * pv;
              __m512 a[P];
#pragma GCC unroll 4
              for (int q = 0; q < P; ++q) a[q] = _mm512_setzero_ps();
              for (int64_t pq = 0; pq < pairs; ++pq) {
                const uint32_t* gq = gpad.data() + pq * plane;
#pragma GCC unroll 3
                for (int dy = 0; dy < 3; ++dy)
#pragma GCC unroll 3
                  for (int dx = 0; dx < 3; ++dx) {
                    const __m512bh wv = (__m512bh)_mm512_loadu_si512(wq.data() + (pq * 9 + dy * 3 + dx) * L + ub);
#pragma GCC unroll 4
                    for (int q = 0; q < P; ++q)
                      a[q] = _mm512_dpbf16_ps(
                          a[q], (__m512bh)_mm512_loadu_si512(gq + ((r + dy) * wp + c0 + q * pv + dx) * n + ub), wv);
                  }
              }
#pragma GCC unroll 4
              for (int q = 0; q < P; ++q)
                store_bf16_lanes(ghp + ((b * H + r) * W + c0 + q * pv) * n + ub, a[q],
                                 pixel_lanes(n, c0 + q * pv, W));
            });
        for (int64_t pq = 0; pq < pairs && gw; ++pq) {
          const uint32_t* gq = gpad.data() + pq * plane;
          float* accq = acc.data() + 2 * pq * 9 * L;
          __m512 a0[9], a1[9];
#pragma GCC unroll 9
          for (int k = 0; k < 9; ++k) {
            a0[k] = _mm512_loadu_ps(accq + k * L + ub);
            a1[k] = _mm512_loadu_ps(accq + (9 + k) * L + ub);
          }
          for (int64_t r = 0; r < H; ++r)
            for (int64_t col = 0; col < W; col += pv) {  // n = 8, W odd: the last vector's second pixel a zero border
              const __m512i gwd = _mm512_loadu_si512(gq + ((r + 1) * wp + col + 1) * n + ub);
              const __m512 g0 = words_lo(gwd), g1 = words_hi(gwd);
#pragma GCC unroll 3
              for (int dy = 0; dy < 3; ++dy)
#pragma GCC unroll 3
                for (int dx = 0; dx < 3; ++dx) {
                  const __m512 v = _mm512_loadu_ps(xpad.data() + ((r + dy) * wp + col + dx) * n + ub);
                  a0[dy * 3 + dx] = _mm512_fmadd_ps(g0, v, a0[dy * 3 + dx]);
                  a1[dy * 3 + dx] = _mm512_fmadd_ps(g1, v, a1[dy * 3 + dx]);
                }
            }
#pragma GCC unroll 9
          for (int k = 0; k < 9; ++k) {
            _mm512_storeu_ps(accq + k * L + ub, a0[k]);
            _mm512_storeu_ps(accq + (9 + k) * L + ub, a1[k]);
          }
        }
      }
    }
  });
  if (gw) {
    float* out = gw->data_ptr<float>();  // (cn, 1, 3, 3)
    std::fill(out, out + 9 * c * n, 0.f);
    for (const auto& p : partial)
      for (int64_t l = 0; l < L && !p.empty(); ++l)
        for (int j = 0; j < c; ++j)
          for (int k = 0; k < 9; ++k) out[(c * (l % n) + j) * 9 + k] += p[(j * 9 + k) * L + l];
  }
}

// conv1's backward: gh (B, n, H, W), the gradient of relu(y1 * sc + sh), y1 and x (B, 2n, H, W), all channels_last
// bf16: gx (B, 2n, H, W) channels_last bf16 and gw (n, 2, 3, 3).
void cl_conv1_backward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& gh, const at::Tensor& y1,
                       const float* sc, const float* sh, const float* A, const float* Bc, at::Tensor* gx,
                       at::Tensor* gw, const c10::BFloat16* add, int64_t s) {
  const int64_t B = x.size(0), n = x.size(1) / 2, H = x.size(2), W = x.size(3), wp = W + 2;
  const int64_t Ho = gh.size(2), Wo = gh.size(3), wpg = Wo + 2;  // the gradient's plane (stride s)
  const int64_t L = unit_lanes(n), pv = pixels_per_vector(n);
  const float* wf = w.data_ptr<float>();
  // wr[(i * 9 + t) * L + l]: w[u][i][8 - t] with u = l % n (flipped), rounded to bf16; the gradient through BN1
  // rounded to bf16 too, so that every product is of bf16 operands (exact in float32), as in the NCHW kernels' dot
  // products
  const Scratch<float> wr = unit_weight_lanes(wf, n, 2, true);
  const Scratch<float> scl = unit_lane_values(sc, n), shl = unit_lane_values(sh, n), Al = unit_lane_values(A, n),
                       Bl = unit_lane_values(Bc, n);
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(x.data_ptr<c10::BFloat16>());
  const c10::BFloat16* ghp = gh.data_ptr<c10::BFloat16>();
  const c10::BFloat16* y1p = y1.data_ptr<c10::BFloat16>();
  uint32_t* gxp = gx ? reinterpret_cast<uint32_t*>(gx->data_ptr<c10::BFloat16>()) : nullptr;  // n words per pixel
  std::vector<Scratch<float>> partial(at::get_num_threads());
  over_images(B, B * H * W * n * 4, [&](int64_t b0, int64_t b1, int64_t t) {
    // the gradient through BN1, rounded to bf16; both pads 4 pixels longer (read, not used, past odd rows' ends)
    Scratch<float> gpad(((Ho + 2) * wpg + 4) * n, 0.f);
    Scratch<uint32_t> xpad(gw ? ((H + 2) * wp + 4) * n : 0, 0u);
    Scratch<float>& acc = partial[t];
    acc.assign(gw ? 18 * L : 0, 0.f);  // acc[(i * 9 + t) * L + l] (unit l % n)
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t r = 0; r < Ho; ++r)  // a row's Wo n values, contiguous in gh, y1 and the pad, 16 at a time
        for (int64_t k = 0; k < Wo * n; k += 16) {
          const int64_t off = (b * Ho + r) * Wo * n + k, l = k % n;
          const __mmask16 m = row_lanes(k, Wo * n);  // the rest (zero) stays out of the pad's border
          _mm512_mask_storeu_ps(gpad.data() + ((r + 1) * wpg + 1) * n + k, m,
                                bn_grad_values(load_bf16_lanes(y1p + off, m), load_bf16_lanes(ghp + off, m),
                                               scl.data() + l, shl.data() + l, Al.data() + l, Bl.data() + l));
        }
      if (gw)
        for (int64_t r = 0; r < H; ++r)
          std::memcpy(xpad.data() + ((r + 1) * wp + 1) * n, xp + (b * H + r) * W * n, sizeof(uint32_t) * W * n);
      for (int64_t ub = 0; ub < n; ub += 16) {
        if (gxp && s == 2) {
          // stride 2: input pixel (R, C) gathers the taps (dy, dx) with R + 1 - dy and C + 1 - dx even, from
          // gradient pixel ((R + 1 - dy) / 2, (C + 1 - dx) / 2) (the zero border where that is outside)
          for (int64_t R = 0; R < H; ++R)
            for (int64_t C = 0; C < W; ++C) {
              __m512 a0 = _mm512_setzero_ps(), a1 = a0;
              for (int dy = (R + 1) % 2; dy < 3; dy += 2)
                for (int dx = (C + 1) % 2; dx < 3; dx += 2) {
                  const __m512 v =
                      _mm512_loadu_ps(gpad.data() + (((R + 1 - dy) / 2 + 1) * wpg + (C + 1 - dx) / 2 + 1) * n + ub);
                  const int t = 8 - (dy * 3 + dx);  // wr is flipped
                  a0 = _mm512_fmadd_ps(v, _mm512_loadu_ps(wr.data() + t * L + ub), a0);
                  a1 = _mm512_fmadd_ps(v, _mm512_loadu_ps(wr.data() + (9 + t) * L + ub), a1);
                }
              // n = 8: one pixel per vector here (the taps differ by column phase), lanes 8-15 not stored
              const __mmask16 one_pixel = n == 8 ? 0x00ff : 0xffff;
              _mm512_mask_storeu_epi32(gxp + ((b * H + R) * W + C) * n + ub, one_pixel, pack_words(a0, a1));
            }
        } else if (gxp) {
          __m512 w0[9], w1[9];
#pragma GCC unroll 9
          for (int k = 0; k < 9; ++k) {
            w0[k] = _mm512_loadu_ps(wr.data() + k * L + ub);
            w1[k] = _mm512_loadu_ps(wr.data() + (9 + k) * L + ub);
          }
          for (int64_t r = 0; r < H; ++r)
            in_pixel_blocks((W + pv - 1) / pv, [&](auto pb, int64_t vb) {
              constexpr int P = decltype(pb)::value;
              __m512 a0[P], a1[P];
              stencil_two<P>(gpad.data(), wpg, n, ub, r, vb * pv, pv, w0, w1, a0, a1);
#pragma GCC unroll 4
              for (int q = 0; q < P; ++q) {
                const int64_t col = (vb + q) * pv;
                _mm512_mask_storeu_epi32(gxp + ((b * H + r) * W + col) * n + ub, pixel_lanes(n, col, W),
                                         pack_words(a0[q], a1[q]));
              }
            });
        }
        if (gxp && add && ub + 16 >= n) {  // the image's input gradient, just written, plus the addend's
          c10::BFloat16* d = reinterpret_cast<c10::BFloat16*>(gxp) + b * H * W * 2 * n;
          const c10::BFloat16* q = add + b * H * W * 2 * n;
          for (int64_t k = 0; k < H * W * 2 * n; k += 16)
            store_bf16(d + k, _mm512_add_ps(load_bf16(d + k), load_bf16(q + k)));
        }
        if (gw) {
          __m512 a0[9], a1[9];
#pragma GCC unroll 9
          for (int k = 0; k < 9; ++k) {
            a0[k] = _mm512_loadu_ps(acc.data() + k * L + ub);
            a1[k] = _mm512_loadu_ps(acc.data() + (9 + k) * L + ub);
          }
          for (int64_t r = 0; r < Ho; ++r)
            for (int64_t c = 0; c < Wo; c += pv) {  // n = 8, Wo odd: the last vector's second pixel a zero border
              const __m512 gv = _mm512_loadu_ps(gpad.data() + ((r + 1) * wpg + c + 1) * n + ub);
#pragma GCC unroll 3
              for (int dy = 0; dy < 3; ++dy)
#pragma GCC unroll 3
                for (int dx = 0; dx < 3; ++dx) {
                  const __m512i xw = load_units(xpad.data() + ((r * s + dy) * wp + c * s + dx) * n + ub, n, s * n);
                  a0[dy * 3 + dx] = _mm512_fmadd_ps(gv, words_lo(xw), a0[dy * 3 + dx]);
                  a1[dy * 3 + dx] = _mm512_fmadd_ps(gv, words_hi(xw), a1[dy * 3 + dx]);
                }
            }
#pragma GCC unroll 9
          for (int k = 0; k < 9; ++k) {
            _mm512_storeu_ps(acc.data() + k * L + ub, a0[k]);
            _mm512_storeu_ps(acc.data() + (9 + k) * L + ub, a1[k]);
          }
        }
      }
    }
  });
  if (gw) {
    float* out = gw->data_ptr<float>();  // (n, 2, 3, 3)
    std::fill(out, out + 18 * n, 0.f);
    for (const auto& p : partial)
      for (int64_t l = 0; l < L && !p.empty(); ++l)
        for (int i = 0; i < 2; ++i)
          for (int k = 0; k < 9; ++k) out[(2 * (l % n) + i) * 9 + k] += p[(i * 9 + k) * L + l];
  }
}

// --- hybrid rows in channels_last: every channel a lane, each lane's inputs gathered ------------------------------
//
// A hybrid row (units of several specs side by side, 1-4 channels each, on planes of 7-14 px) spends its time in
// the NCHW kernels' per-(group, image) work and in one call per group and pass. In channels_last every channel is a
// lane instead: conv1's hidden channels, conv2's outputs, and for the input gradients the input (or hidden) channels.
// Each lane's inputs (its unit's a or b channels, or for a gradient its unit's outputs) are gathered, pixel by pixel,
// by AVX-512 word permutes of the pixel's bf16 channels, into P = ceil(K / 2) planes of 32-bit words per lane
// (inputs 2p and 2p + 1 of the lane, K the most inputs a lane of the 16 has, zeros past a lane's own): exactly the
// pairs vdpbf16ps multiplies, so a convolution is P x 9 dot products per 16 lanes per pixel, the same code for
// every spec. The gathers come as tables from Python (bunit.unit_train.RowPlan): idx[k][lane] the channel the lane's
// k-th input is read from (-1: none), and the weights as wt[k][tap][lane] in the same order (taps flipped for an
// input gradient). The weight gradient is, per lane, the sum over pixels of the output gradient times the gathered
// input (each word pair widened to two float32 values, float32 multiply-adds).
// Operands are those of autocast's convolutions: bf16 storage, the weights and the BN-normalised inputs and
// gradients rounded to bf16 (at stride 2 too, where the NCHW kernels multiply unrounded float32); products exact in
// float32, sums in float32 in another order, BN's in double. The hidden tensor carries lanes up to a multiple of 16
// (zero weights and BN coefficients: zeros).
constexpr bool kUnitRows = true;

// One gather table: plane p of lane l holds the pair (src[idx[2p][l]], src[idx[2p + 1][l]]) (0 for -1), for planes
// p < pv[v] of each 16-lane vector v; the source is a pixel's channels as bf16 words, padded to 64k.
struct RowGather {
  int64_t K = 0, P = 0, L = 0, S = 0;  // inputs per lane, planes, lanes (16k), source words (padded to 64k)
  std::vector<int> kv, pv;             // per vector: 1 + its last k with a source, and its planes (kv + 1) / 2
  struct Part {
    int block;          // source words 64 * block .. + 64
    uint16_t idx[32];   // word 2l + h of the result: the source word (0-63) of lane l's input 2p + h
    __mmask32 mask;     // the result words read from this block
  };
  std::vector<Part> parts;   // every (v, p)'s parts, in that order
  std::vector<int> first;    // (v, p)'s parts: first[v * P + p] .. first[v * P + p + 1]
  // Sources of at most 64 words (S == 64) have one block: each (v, p < pv[v]) is then one masked permute of the
  // pixel's two halves, its table and mask read from `single` (one entry per (v, p), in that order).
  struct Single {
    uint16_t idx[32];
    __mmask32 mask;
    int64_t off;  // the result's word offset in a gathered pixel: p * L + 16 v
  };
  std::vector<Single> single;
};

RowGather make_row_gather(const at::Tensor& idx, int64_t sources) {
  TORCH_CHECK(idx.dim() == 2 && idx.scalar_type() == at::kInt && idx.is_contiguous() && idx.size(1) % 16 == 0,
              "unit_train: a row gather table must be contiguous int32 [K, 16k]");
  RowGather g;
  g.K = idx.size(0);
  g.P = (g.K + 1) / 2;
  g.L = idx.size(1);
  g.S = (sources + 63) / 64 * 64;
  const int64_t nv = g.L / 16;
  const int32_t* p = idx.data_ptr<int32_t>();
  g.kv.assign(nv, 0);
  for (int64_t v = 0; v < nv; ++v) {
    for (int64_t k = 0; k < g.K; ++k)
      for (int l = 0; l < 16; ++l) {
        const int32_t src = p[k * g.L + v * 16 + l];
        TORCH_CHECK(src >= -1 && src < sources, "unit_train: a row gather reads channel ", src, " of ", sources);
        if (src >= 0) g.kv[v] = std::max<int>(g.kv[v], static_cast<int>(k) + 1);
      }
    g.pv.push_back((g.kv[v] + 1) / 2);
  }
  for (int64_t v = 0; v < nv; ++v)
    for (int64_t q = 0; q < g.P; ++q) {
      g.first.push_back(static_cast<int>(g.parts.size()));
      const size_t mine = g.parts.size();
      for (int w = 0; w < 32; ++w) {
        const int64_t k = 2 * q + w % 2;
        const int32_t src = k < g.K ? p[k * g.L + v * 16 + w / 2] : -1;
        if (src < 0) continue;
        auto it = std::find_if(g.parts.begin() + mine, g.parts.end(),
                               [&](const RowGather::Part& r) { return r.block == src / 64; });
        if (it == g.parts.end()) {
          g.parts.push_back(RowGather::Part{static_cast<int>(src / 64), {}, 0});
          it = g.parts.end() - 1;
        }
        it->idx[w] = static_cast<uint16_t>(src % 64);
        it->mask |= 1u << w;
      }
    }
  g.first.push_back(static_cast<int>(g.parts.size()));
  if (g.S == 64)
    for (int64_t v = 0; v < nv; ++v)
      for (int q = 0; q < g.pv[v]; ++q) {
        RowGather::Single one{{}, 0, q * g.L + 16 * v};
        for (int i = g.first[v * g.P + q]; i < g.first[v * g.P + q + 1]; ++i) {  // one part at most: block 0
          std::copy(g.parts[i].idx, g.parts[i].idx + 32, one.idx);
          one.mask = g.parts[i].mask;
        }
        g.single.push_back(one);
      }
  return g;
}

// One pixel: src (g.S bf16 words) gathered to dst (g.P * g.L words; planes p >= pv[v] of a vector left as they are).
inline void row_gather_pixel(const RowGather& g, const uint16_t* src, uint32_t* dst) {
  if (g.S == 64) {
    const __m512i lo = _mm512_loadu_si512(src), hi = _mm512_loadu_si512(src + 32);
    for (const RowGather::Single& one : g.single)
      _mm512_storeu_si512(dst + one.off,
                          _mm512_maskz_permutex2var_epi16(one.mask, lo, _mm512_loadu_si512(one.idx), hi));
    return;
  }
  const int64_t nv = g.L / 16;
  for (int64_t v = 0; v < nv; ++v)
    for (int q = 0; q < g.pv[v]; ++q) {
      const RowGather::Part* part = g.parts.data() + g.first[v * g.P + q];
      const RowGather::Part* end = g.parts.data() + g.first[v * g.P + q + 1];
      __m512i r = _mm512_setzero_si512();
      for (; part < end; ++part) {
        const uint16_t* b = src + 64 * part->block;
        r = _mm512_mask_mov_epi16(r, part->mask,
                                  _mm512_permutex2var_epi16(_mm512_loadu_si512(b), _mm512_loadu_si512(part->idx),
                                                            _mm512_loadu_si512(b + 32)));
      }
      _mm512_storeu_si512(dst + q * g.L + 16 * v, r);
    }
}

// The weights wt [K, 9, L] (float32) as bf16 pairs: out[(p * 9 + t) * L + l] = (wt[2p][t][l], wt[2p + 1][t][l]).
Scratch<uint32_t> row_weights(const at::Tensor& wt, const RowGather& g) {
  TORCH_CHECK(wt.dim() == 3 && wt.size(0) == g.K && wt.size(1) == 9 && wt.size(2) == g.L &&
                  wt.scalar_type() == at::kFloat && wt.is_contiguous(),
              "unit_train: row weights must be contiguous float32 [K, 9, L] matching the gather table");
  const float* w = wt.data_ptr<float>();
  Scratch<uint32_t> out(g.P * 9 * g.L);
  for (int64_t q = 0; q < g.P; ++q)
    for (int64_t i = 0; i < 9 * g.L; ++i)
      out[q * 9 * g.L + i] =
          (bf16_high(w[2 * q * 9 * g.L + i]) >> 16) | (2 * q + 1 < g.K ? bf16_high(w[(2 * q + 1) * 9 * g.L + i]) : 0u);
  return out;
}

// Output pixels (r, c0 .. c0 + N) of lane vector v: sum over planes p < pv, taps (dy, dx) of the weight pairs times
// the gathered plane e (rows of wp pixels of P * L words) at (r * s + dy, c * s + dx). Fewer than four pixels take
// two accumulators each (taps of the middle row in the second), for more independent chains of dot products.
template <int N>
inline void row_stencil(const uint32_t* e, int64_t wp, const RowGather& g, const uint32_t* wt, int64_t v, int64_t r,
                        int64_t c0, int64_t s, __m512 (&acc)[N]) {
  const int64_t PL = g.P * g.L, l0 = 16 * v;
  __m512 odd[N];
#pragma GCC unroll 4
  for (int q = 0; q < N; ++q) acc[q] = odd[q] = _mm512_setzero_ps();
  for (int p = 0; p < g.pv[v]; ++p)
#pragma GCC unroll 3
    for (int dy = 0; dy < 3; ++dy)
#pragma GCC unroll 3
      for (int dx = 0; dx < 3; ++dx) {
        const __m512bh w = (__m512bh)_mm512_loadu_si512(wt + (p * 9 + dy * 3 + dx) * g.L + l0);
        const uint32_t* row = e + ((r * s + dy) * wp + dx) * PL + p * g.L + l0;
#pragma GCC unroll 4
        for (int q = 0; q < N; ++q) {
          __m512& a = N < 4 && dy == 1 ? odd[q] : acc[q];
          a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(row + (c0 + q) * s * PL), w);
        }
      }
#pragma GCC unroll 4
  for (int q = 0; q < N && N < 4; ++q) acc[q] = _mm512_add_ps(acc[q], odd[q]);
}

// Columns 0 .. w in blocks of 4, then the rest as one block of 1-3: f(integral_constant<N>, first column).
template <typename F>
inline void in_row_blocks_of_4(int64_t w, F&& f) {
  int64_t c = 0;
  for (; c + 4 <= w; c += 4) f(std::integral_constant<int, 4>{}, c);
  if (w - c == 3) f(std::integral_constant<int, 3>{}, c);
  if (w - c == 2) f(std::integral_constant<int, 2>{}, c);
  if (w - c == 1) f(std::integral_constant<int, 1>{}, c);
}

// acc[(k * 9 + t) * L + lane] += sum over output pixels q of gout[q][lane] * input k of the lane at q * s + t (the
// gathered plane e, rows of wp pixels): a weight gradient over one image (gout Ho x Wo pixels of L floats).
inline void row_weight_grad(const float* gout, int64_t Ho, int64_t Wo, const uint32_t* e, int64_t wp,
                            const RowGather& g, int64_t s, float* acc) {
  const int64_t PL = g.P * g.L;
  for (int64_t v = 0; v < g.L / 16; ++v)
    for (int p = 0; p < g.pv[v]; ++p) {
      const bool two = 2 * p + 1 < g.kv[v];
      __m512 a0[9], a1[9];
      float* ak = acc + 2 * p * 9 * g.L + 16 * v;
#pragma GCC unroll 9
      for (int t = 0; t < 9; ++t) {
        a0[t] = _mm512_loadu_ps(ak + t * g.L);
        a1[t] = two ? _mm512_loadu_ps(ak + (9 + t) * g.L) : _mm512_setzero_ps();
      }
      for (int64_t r = 0; r < Ho; ++r)
        for (int64_t c = 0; c < Wo; ++c) {
          const __m512 gv = _mm512_loadu_ps(gout + (r * Wo + c) * g.L + 16 * v);
          const uint32_t* base = e + ((r * s) * wp + c * s) * PL + p * g.L + 16 * v;
#pragma GCC unroll 3
          for (int dy = 0; dy < 3; ++dy)
#pragma GCC unroll 3
            for (int dx = 0; dx < 3; ++dx) {
              const __m512i wv = _mm512_loadu_si512(base + (dy * wp + dx) * PL);
              a0[dy * 3 + dx] = _mm512_fmadd_ps(gv, words_lo(wv), a0[dy * 3 + dx]);
              if (two) a1[dy * 3 + dx] = _mm512_fmadd_ps(gv, words_hi(wv), a1[dy * 3 + dx]);
            }
        }
#pragma GCC unroll 9
      for (int t = 0; t < 9; ++t) {
        _mm512_storeu_ps(ak + t * g.L, a0[t]);
        if (two) _mm512_storeu_ps(ak + (9 + t) * g.L, a1[t]);
      }
    }
}

// Per-thread weight-gradient sums into gw [K, 9, L] (float32).
at::Tensor row_sum_threads(const std::vector<Scratch<float>>& partial, int64_t K, int64_t L,
                           const at::TensorOptions& opt) {
  at::Tensor gw = at::empty({K, 9, L}, opt.dtype(at::kFloat));
  float* out = gw.data_ptr<float>();
  std::fill(out, out + K * 9 * L, 0.f);
  for (const auto& p : partial)
    if (!p.empty())
      for (int64_t i = 0; i < K * 9 * L; ++i) out[i] += p[i];
  return gw;
}

// A pixel's C channels of a channels_last bf16 tensor as bf16 words for the gather (S words, of which the gather
// reads only the first C): as stored (the tensor itself where S words from the pixel lie inside it, else a copy
// padded with zeros), or through relu(v * sc + sh) (sc given), or through BN's and ReLU's gradient with y (cl_bn_grad,
// gy given), rounded to bf16 into dst; the float values also to f when f is given.
struct RowSource {
  const c10::BFloat16* x = nullptr;  // the tensor (channels_last, C channels)
  int64_t C = 0;
  const float *sc = nullptr, *sh = nullptr;  // relu(x * sc + sh)
  const c10::BFloat16* gy = nullptr;         // gradient mode: x is y, gy the gradient
  const float *A = nullptr, *B = nullptr;
  int64_t pixels = 0;                        // the tensor's pixels (B * H * W)
  const uint16_t* pixel(int64_t pix, uint16_t* dst, int64_t S, float* f = nullptr) const {
    const int64_t off = pix * C;
    if (!sc && !gy) {
      if (off + S <= pixels * C) return reinterpret_cast<const uint16_t*>(x + off);
      std::memcpy(dst, x + off, sizeof(uint16_t) * C);
      std::fill(dst + C, dst + S, uint16_t{0});
      return dst;
    }
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
      const __m512 v = gy ? cl_bn_grad(x + off + c0, gy + off + c0, c0, sc, sh, A, B)
                          : _mm512_max_ps(_mm512_fmadd_ps(load_bf16(x + off + c0), _mm512_loadu_ps(sc + c0),
                                                          _mm512_loadu_ps(sh + c0)),
                                          _mm512_setzero_ps());
      const __m256bh h = _mm512_cvtneps_pbh(v);  // rounded to nearest even (v: finite, or the gradient's NaN)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c0), (__m256i)h);
      if (f) _mm512_storeu_ps(f + c0, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16)));
    }
    return dst;
  }
};

// One image's source pixels (Hs x Ws from first_pix) gathered into the zero-bordered plane e (rows of wp pixels of
// P * L words): source pixel (r, c) at (r * s + 1, c * s + 1) (s = 2: an input gradient's dilated gradient, every
// other position zero); with f, the pixels' float values there too (Hs * Ws pixels of C floats; e null: those
// alone). row: S words whose tail past the source's channels is zero (the gather reads no further than its channels).
inline void row_fill(const RowSource& src, int64_t first_pix, int64_t Hs, int64_t Ws, int64_t s, const RowGather& g,
                     int64_t wp, uint16_t* row, uint32_t* e, float* f = nullptr) {
  for (int64_t r = 0; r < Hs; ++r)
    for (int64_t c = 0; c < Ws; ++c) {
      const uint16_t* words = src.pixel(first_pix + r * Ws + c, row, g.S, f ? f + (r * Ws + c) * src.C : nullptr);
      if (e) row_gather_pixel(g, words, e + ((r * s + 1) * wp + c * s + 1) * g.P * g.L);
    }
}

// What a row convolution sums of the values it stores, per lane: nothing, the values and their squares (a
// forward's BN sums), or the values where y * sc + sh > 0 and those times y (BN1's gradient sums, y the hidden
// tensor of the image).
struct RowNoSums {
  void add(int64_t, int64_t, __m512, __m512&, __m512&) const {}
};
struct RowValueSums {
  void add(int64_t, int64_t, __m512 v, __m512& s1, __m512& s2) const {
    s1 = _mm512_add_ps(s1, v);
    s2 = _mm512_fmadd_ps(v, v, s2);
  }
};
struct RowMaskedSums {
  const c10::BFloat16* y;
  const float *sc, *sh;
  int64_t L;
  void add(int64_t l0, int64_t pix, __m512 v, __m512& s1, __m512& s2) const {
    const __m512 yv = load_bf16(y + pix * L + l0);
    const __mmask16 on = _mm512_cmp_ps_mask(_mm512_fmadd_ps(yv, _mm512_loadu_ps(sc + l0), _mm512_loadu_ps(sh + l0)),
                                            _mm512_setzero_ps(), _CMP_GT_OQ);
    const __m512 gz = _mm512_maskz_mov_ps(on, v);
    s1 = _mm512_add_ps(s1, gz);
    s2 = _mm512_fmadd_ps(gz, yv, s2);
  }
};

// A convolution of a gathered plane (rows of wp pixels) into Ho x Wo pixels of L lanes, each value rounded to bf16
// and stored at out (channels_last); sums.add of the stored values, per row in registers, then into st (2L doubles:
// [first sums; second sums]) when st is given.
template <typename Sums>
inline void row_conv_image(const uint32_t* e, int64_t wp, const RowGather& g, const uint32_t* wt, int64_t s,
                           int64_t Ho, int64_t Wo, c10::BFloat16* out, const Sums& sums, double* st) {
  for (int64_t r = 0; r < Ho; ++r)  // rows outside, so that the three input rows stay in L1 for every vector
    for (int64_t v = 0; v < g.L / 16; ++v) {
      __m512 s1 = _mm512_setzero_ps(), s2 = s1;
      in_row_blocks_of_4(Wo, [&](auto pb, int64_t c0) {
        constexpr int N = decltype(pb)::value;
        __m512 acc[N];
        row_stencil<N>(e, wp, g, wt, v, r, c0, s, acc);
#pragma GCC unroll 4
        for (int q = 0; q < N; ++q) {
          const int64_t pix = r * Wo + c0 + q;
          const __m256bh h = _mm512_cvtneps_pbh(acc[q]);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + pix * g.L + 16 * v), (__m256i)h);
          sums.add(16 * v, pix, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16)), s1, s2);
        }
      });
      if (st) {
        add_channels(s1, st + 16 * v);
        add_channels(s2, st + g.L + 16 * v);
      }
    }
}

void check_row_tensor(const at::Tensor& t, int64_t c, const char* what) {
  TORCH_CHECK(t.dim() == 4 && t.scalar_type() == at::kBFloat16 && t.size(1) == c && t.size(1) % 16 == 0 &&
                  t.is_contiguous(at::MemoryFormat::ChannelsLast),
              "unit_train: ", what, " must be a channels_last bf16 tensor of ", c, " channels (a multiple of 16)");
}

const float* row_vec(const std::optional<at::Tensor>& t, int64_t n, const char* what) {
  if (!t) return nullptr;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->scalar_type() == at::kFloat && t->is_contiguous(),
              "unit_train: ", what, " must be contiguous float32 of ", n, " values");
  return t->data_ptr<float>();
}

// x (channels_last bf16, 16k channels) as a row source: as stored, or through relu(x * sc + sh) where sc is given.
RowSource row_source(const at::Tensor& x, const float* sc = nullptr, const float* sh = nullptr) {
  check_row_tensor(x, x.size(1), "a row's input");
  return RowSource{x.data_ptr<c10::BFloat16>(), x.size(1), sc, sh, nullptr, nullptr, nullptr, x.numel() / x.size(1)};
}

// The gradient g of relu(y * sc + sh) taken through that ReLU and BN (A, B: BN's backward coefficients) as a row
// source of y's channels; g and y channels_last bf16 of one shape.
RowSource row_grad_source(const at::Tensor& y, const at::Tensor& g, const at::Tensor& sc, const at::Tensor& sh,
                          const at::Tensor& A, const at::Tensor& B) {
  const int64_t c = y.size(1);
  check_row_tensor(y, c, "y");
  check_row_tensor(g, c, "the gradient");
  TORCH_CHECK(g.sizes() == y.sizes(), "unit_train: a gradient must have its tensor's shape");
  return RowSource{y.data_ptr<c10::BFloat16>(), c, row_vec(sc, c, "sc"), row_vec(sh, c, "sh"),
                   g.data_ptr<c10::BFloat16>(), row_vec(A, c, "A"), row_vec(B, c, "B")};
}
#else
constexpr bool kChannelsLastUnits = false;
constexpr bool kUnitRows = false;
inline int channels_last_units(const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool) { return 0; }
#endif

}  // namespace

// y (NCHW contiguous) and its per-channel [sums; sums of squares] in double; with isc/ish the input is read as
// relu(x * isc + ish).
std::vector<at::Tensor> conv_forward_stats(const at::Tensor& x, const at::Tensor& w, int64_t groups, int64_t s,
                                           const std::optional<at::Tensor>& isc,
                                           const std::optional<at::Tensor>& ish, bool bf16_dot) {
  check(x, w, groups, s, true);
  check_channel_vec(isc, x.size(1), x, "isc");
  check_channel_vec(ish, x.size(1), x, "ish");
  TORCH_CHECK(isc.has_value() == ish.has_value(), "unit_train: isc and ish come together");
  const int64_t ho = (x.size(2) - 1) / s + 1, wo = (x.size(3) - 1) / s + 1;
  at::Tensor stats = at::empty({2, w.size(0)}, x.options().dtype(at::kDouble));
  const int kind = channels_last_units(x, w, groups, s, bf16_dot && kBf16Dot);
  [[maybe_unused]] const auto cl_format = at::MemoryFormat::ChannelsLast;
#if defined(__AVX512BF16__)  // the channels_last unit kernels: in this build only (kChannelsLastUnits)
  if (kind == 1 && !isc) {  // 2-1-2 units in channels_last: y channels_last too
    at::Tensor y = at::empty({x.size(0), w.size(0), ho, wo}, x.options().memory_format(cl_format));
    cl_conv1_forward(x, w, y, stats, s);
    return {y, stats};
  }
  if (kind == 2) {
    at::Tensor y = at::empty({x.size(0), w.size(0), ho, wo}, x.options().memory_format(cl_format));
    cl_conv2_forward(x, w, opt_ptr<float>(isc), opt_ptr<float>(ish), y, stats);
    return {y, stats};
  }
#endif
  at::Tensor y = at::empty({x.size(0), w.size(0), ho, wo}, x.options());
  dispatch_storage(x.scalar_type(), "unit_train_forward_stats", [&](auto t, auto m) {
    using T = decltype(t);
    using M = decltype(m);
    forward_impl<T, M>(x, w, y, groups, s, opt_ptr<T>(isc), opt_ptr<T>(ish), &stats, bf16_dot);
  });
  return {y, stats};
}

// relu(y * sc + sh) per channel, y NCHW contiguous; the result channels_last when asked. With a residual (of the
// result's shape and layout; y's dtype, or float32 for bfloat16 y), relu(that value as stored + residual) in the
// residual's dtype: a residual block's tail, relu(units(x) + shortcut), in the same pass.
at::Tensor bn_relu_apply(const at::Tensor& y, const at::Tensor& sc, const at::Tensor& sh, bool channels_last,
                         const std::optional<at::Tensor>& residual) {
  const bool cl_y = kChannelsLastUnits && is_cl(y) && y.scalar_type() == at::kBFloat16 && y.size(1) % 16 == 0;
  TORCH_CHECK(y.dim() == 4 && (y.is_contiguous() || (cl_y && channels_last)),
              "unit_train: y must be NCHW contiguous (or channels_last bf16 of 16k channels, for a channels_last "
              "result)");
  check_channel_vec(sc, y.size(1), y, "sc");
  check_channel_vec(sh, y.size(1), y, "sh");
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const bool with_res = residual.has_value() && residual->defined();
  if (with_res) {
    const at::ScalarType rt = residual->scalar_type();
    TORCH_CHECK(residual->sizes() == y.sizes() && residual->is_contiguous(fmt) && residual->device().is_cpu() &&
                    (rt == y.scalar_type() || (y.scalar_type() == at::kBFloat16 && rt == at::kFloat)),
                "unit_train: the residual must have the output's shape and layout, and y's dtype (or float32 for "
                "bfloat16 y)");
  }
  at::Tensor out = at::empty_like(with_res ? *residual : y, fmt);
#if defined(__AVX512BF16__)  // the channels_last unit kernels: in this build only (kChannelsLastUnits)
  if (cl_y && !y.is_contiguous()) {
    const float *a = sc.data_ptr<float>(), *b = sh.data_ptr<float>();
    if (!with_res)
      cl_apply<c10::BFloat16>(y, a, b, out, nullptr);
    else if (residual->scalar_type() == at::kFloat)
      cl_apply<float>(y, a, b, out, residual->data_ptr<float>());
    else
      cl_apply<c10::BFloat16>(y, a, b, out, residual->data_ptr<c10::BFloat16>());
    return out;
  }
#endif
  dispatch_storage(y.scalar_type(), "unit_train_apply", [&](auto t, auto m) {
    using T = decltype(t);
    using M = decltype(m);
    if (!with_res) {
      apply_impl<T, M>(y, sc.data_ptr<T>(), sh.data_ptr<T>(), out);
    } else if (residual->scalar_type() == y.scalar_type()) {
      apply_impl<T, M, M>(y, sc.data_ptr<T>(), sh.data_ptr<T>(), out, residual->data_ptr<M>());
    } else if constexpr (std::is_same_v<M, c10::BFloat16>) {
      apply_impl<T, M, float>(y, sc.data_ptr<T>(), sh.data_ptr<T>(), out, residual->data_ptr<float>());
    }
  });
  return out;
}

// [sum of gz; sum of gz * y] per channel in double, gz = g where y * sc + sh > 0 (g and y NCHW contiguous).
at::Tensor bn_relu_grad_sums(const at::Tensor& g, const at::Tensor& y, const at::Tensor& sc, const at::Tensor& sh,
                             const std::optional<at::Tensor>& out = std::nullopt, at::Tensor* gres = nullptr) {
  const bool cl = kChannelsLastUnits && is_cl(y) && is_cl(g) && y.scalar_type() == at::kBFloat16 &&
                  fills_unit_lanes(y.size(1)) && (!out || is_cl(*out));
  TORCH_CHECK(y.dim() == 4 && ((y.is_contiguous() && g.is_contiguous()) || cl) && g.sizes() == y.sizes() &&
                  g.scalar_type() == y.scalar_type(),
              "unit_train: g and y must be NCHW contiguous (or both channels_last bf16 of 16k or 8 channels) of one "
              "shape and dtype");
  check_channel_vec(sc, y.size(1), y, "sc");
  check_channel_vec(sh, y.size(1), y, "sh");
  at::Tensor sums = at::empty({2, y.size(1)}, y.options().dtype(at::kDouble));
  if (out) {
    TORCH_CHECK((cl || out->is_contiguous()) && out->sizes() == y.sizes() && out->scalar_type() == y.scalar_type(),
                "unit_train: out must have y's shape, layout and dtype");
    *gres = at::empty_like(g);
  }
#if defined(__AVX512BF16__)  // the channels_last unit kernels: in this build only (kChannelsLastUnits)
  if (cl) {
    cl_grad_sums(g, y, sc.data_ptr<float>(), sh.data_ptr<float>(), sums,
                 out ? out->data_ptr<c10::BFloat16>() : nullptr, out ? gres->data_ptr<c10::BFloat16>() : nullptr);
    return sums;
  }
#endif
  dispatch_storage(y.scalar_type(), "unit_train_grad_sums", [&](auto t, auto m) {
    using T = decltype(t);
    using M = decltype(m);
    if (out)
      grad_sums_impl<T, M, true>(g, y, sc.data_ptr<T>(), sh.data_ptr<T>(), sums, out->data_ptr<M>(),
                                 gres->data_ptr<M>());
    else
      grad_sums_impl<T, M>(g, y, sc.data_ptr<T>(), sh.data_ptr<T>(), sums);
  });
  return sums;
}

namespace {

// The values of a 1-D floating tensor of n elements, as doubles.
std::vector<double> as_doubles(const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "unit_train: ", what, " must have ", n, " values");
  const at::Tensor c = t.contiguous();
  std::vector<double> out(n);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "unit_train_as_doubles", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<double>(p[i]);
  });
  return out;
}

// A new 1-D tensor of `like`'s dtype holding v (rounded once, from double).
at::Tensor from_doubles(const std::vector<double>& v, const at::Tensor& like) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, like.options());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "unit_train_from_doubles", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<scalar_t>(v[i]);
  });
  return t;
}

// running <- running * (1 - factor) + value * factor, in running's dtype (value rounded to it first), as
// running.mul_(1 - factor).add_(value.to(running.dtype), alpha=factor) computes it.
void update_running(const at::Tensor& running, const double* value, int64_t n, double factor) {
  TORCH_CHECK(running.dim() == 1 && running.size(0) == n && running.is_contiguous(),
              "unit_train: a running statistic must be contiguous with one value per channel");
  AT_DISPATCH_FLOATING_TYPES(running.scalar_type(), "unit_train_running", [&] {
    scalar_t* p = running.data_ptr<scalar_t>();
    const scalar_t keep = static_cast<scalar_t>(1.0 - factor), f = static_cast<scalar_t>(factor);
    for (int64_t i = 0; i < n; ++i) p[i] = p[i] * keep + f * static_cast<scalar_t>(value[i]);
  });
}

// BN with batch statistics for one channel from its sum and sum of squares over count values: mean, biased variance,
// 1/sqrt(var + eps), the affine map relu(y * sc + sh) applies (weight g, bias b) and the unbiased variance.
inline void bn_moments(double sum, double sq, int64_t count, double eps, double g, double b, double* mean,
                       double* var, double* invstd, double* sc, double* sh, double* unbiased) {
  const double n = static_cast<double>(count), bessel = n / static_cast<double>(std::max<int64_t>(count - 1, 1));
  *mean = sum / n;
  *var = std::max(sq / n - *mean * *mean, 0.0);
  *invstd = 1.0 / std::sqrt(*var + eps);
  *sc = g * *invstd;
  *sh = b - *mean * *sc;
  *unbiased = *var * bessel;
}

// BN's backward for one channel from s1 = sum gz and s2 = sum gz * y (gz the ReLU-masked output gradient): the
// weight and bias gradients, and A, B of the convolution output's gradient (mask ? sc * g : 0) + y * A + B.
inline void bn_grad(double s1, double s2, double mean, double invstd, double sc, int64_t count, double* dg,
                    double* db, double* A, double* B) {
  const double n = static_cast<double>(count);
  *db = s1;
  *dg = invstd * (s2 - mean * s1);
  *A = -sc * invstd * *dg / n;
  *B = -sc * s1 / n - *A * mean;
}

}  // namespace

// BN with batch statistics, from a convolution's per-channel [sums; sums of squares] (double [2, C]) over `count`
// values: mean, biased variance and 1/sqrt(var + eps) as double [3, C], and the affine map relu(y * sc + sh) applies
// (sc = weight / std, sh = bias - mean * sc, in like's dtype). The running statistics, when given, are updated as
// F.batch_norm updates them in training (unbiased variance, `factor` the average's factor).
std::vector<at::Tensor> bn_coefficients(const at::Tensor& stats, int64_t count, const at::Tensor& weight,
                                        const at::Tensor& bias, double eps,
                                        const std::optional<at::Tensor>& running_mean,
                                        const std::optional<at::Tensor>& running_var, double factor,
                                        const at::Tensor& like) {
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 2 && stats.scalar_type() == at::kDouble && stats.is_contiguous(),
              "unit_train: stats must be contiguous double [2, C]");
  TORCH_CHECK(count > 0, "unit_train: count must be positive");
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), "unit_train: running mean and variance together");
  const int64_t c = stats.size(1);
  const double* st = stats.data_ptr<double>();
  const std::vector<double> g = as_doubles(weight, c, "the BN weight"), b = as_doubles(bias, c, "the BN bias");
  at::Tensor moments = at::empty({3, c}, stats.options());
  double* mean = moments.data_ptr<double>();
  double* var = mean + c;
  double* invstd = var + c;
  std::vector<double> sc(c), sh(c), unbiased(c);
  for (int64_t k = 0; k < c; ++k)
    bn_moments(st[k], st[c + k], count, eps, g[k], b[k], mean + k, var + k, invstd + k, &sc[k], &sh[k], &unbiased[k]);
  if (running_mean.has_value()) {
    update_running(*running_mean, mean, c, factor);
    update_running(*running_var, unbiased.data(), c, factor);
  }
  return {moments, from_doubles(sc, like), from_doubles(sh, like)};
}

// BN's backward with batch statistics for the output gradient g of relu(y * sc + sh) (g, y NCHW contiguous): with
// gz = g where y * sc + sh > 0 (else 0), s1 = sum gz and s2 = sum gz * xhat per channel (in double), the gradients
// of BN's weight (s2) and bias (s1), and A, B of the convolution output's gradient (mask ? sc * g : 0) + y * A + B,
// all in param's dtype (the dtype the kernel computes in). moments: bn_coefficients' [mean; var; invstd]. With
// out (the output of a residual block, relu(relu(y * sc + sh) + shortcut), of y's layout and dtype), g is first taken
// through that block's ReLU, and the gradient so taken (the shortcut's, and what conv_backward_bn is then given) is
// returned fifth, written in the same pass as the sums.
std::vector<at::Tensor> bn_relu_grad_coefficients(const at::Tensor& g, const at::Tensor& y, const at::Tensor& sc,
                                                  const at::Tensor& sh, int64_t count, const at::Tensor& moments,
                                                  const at::Tensor& param, const std::optional<at::Tensor>& out) {
  at::Tensor gres;
  const at::Tensor sums = bn_relu_grad_sums(g, y, sc, sh, out, &gres);
  const int64_t c = y.size(1);
  TORCH_CHECK(moments.dim() == 2 && moments.size(0) == 3 && moments.size(1) == c &&
                  moments.scalar_type() == at::kDouble && moments.is_contiguous(),
              "unit_train: moments must be contiguous double [3, C]");
  const double* su = sums.data_ptr<double>();
  const double* mean = moments.data_ptr<double>();
  const double* invstd = mean + 2 * c;
  const std::vector<double> scd = as_doubles(sc, c, "sc");  // the scale as applied, rounded to y's dtype
  std::vector<double> dg(c), db(c), A(c), B(c);
  for (int64_t k = 0; k < c; ++k)
    bn_grad(su[k], su[c + k], mean[k], invstd[k], scd[k], count, &dg[k], &db[k], &A[k], &B[k]);
  std::vector<at::Tensor> result{from_doubles(dg, param), from_doubles(db, param), from_doubles(A, param),
                                 from_doubles(B, param)};
  if (out) result.push_back(gres);
  return result;
}

// The convolution's input and weight gradients from g, the gradient of relu(y * sc + sh) (y its output, NCHW
// contiguous), taken through ReLU and BN's batch statistics as (y * sc + sh > 0 ? sc * g : 0) + y * A + B; with
// isc/ish the convolution's input was relu(x * isc + ish) (the input gradient is then that of the normalised input).
std::vector<at::Tensor> conv_backward_bn(const at::Tensor& x, const at::Tensor& w, const at::Tensor& g,
                                         const at::Tensor& y, const at::Tensor& sc, const at::Tensor& sh,
                                         const at::Tensor& A, const at::Tensor& B, int64_t groups, int64_t s,
                                         const std::optional<at::Tensor>& isc, const std::optional<at::Tensor>& ish,
                                         bool need_input, bool need_weight, bool bf16_dot,
                                         const std::optional<at::Tensor>& add) {
  check(x, w, groups, s, true);
  TORCH_CHECK(g.scalar_type() == x.scalar_type() && y.scalar_type() == x.scalar_type(),
              "unit_train: gradient dtype differs from the input's");
  const int kind = channels_last_units(x, w, groups, s, bf16_dot && kBf16Dot);
  const bool cl = kChannelsLastUnits && kind && is_cl(g) && is_cl(y) && (kind == 2) == isc.has_value();
  TORCH_CHECK((y.is_contiguous() || cl) && g.sizes() == y.sizes() && y.size(1) == w.size(0),
              "unit_train: y must be the NCHW contiguous output (channels_last for a channels_last row of 2-1-2 "
              "units), of g's shape");
  for (const at::Tensor* t : {&sc, &sh, &A, &B}) check_channel_vec(*t, w.size(0), x, "a BN coefficient");
  check_channel_vec(isc, x.size(1), x, "isc");
  check_channel_vec(ish, x.size(1), x, "ish");
  TORCH_CHECK(isc.has_value() == ish.has_value(), "unit_train: isc and ish come together");
  at::Tensor gx, gw;
  if (need_input) gx = at::empty_like(x, x.suggest_memory_format());
  if (need_weight) gw = at::empty_like(w);
  TORCH_CHECK(!add || (need_input && s == 1 && add->sizes() == gx.sizes() && add->strides() == gx.strides() &&
                       add->scalar_type() == gx.scalar_type()),
              "unit_train: add must have the input gradient's shape, strides and dtype (stride 1)");
#if defined(__AVX512BF16__)  // the channels_last unit kernels: in this build only (kChannelsLastUnits)
  if (cl) {
    const float *a = sc.data_ptr<float>(), *b = sh.data_ptr<float>(), *ca = A.data_ptr<float>(),
                *cb = B.data_ptr<float>();
    if (kind == 2)
      cl_conv2_backward(x, w, g, y, a, b, ca, cb, isc->data_ptr<float>(), ish->data_ptr<float>(),
                        need_input ? &gx : nullptr, need_weight ? &gw : nullptr);
    else
      cl_conv1_backward(x, w, g, y, a, b, ca, cb, need_input ? &gx : nullptr, need_weight ? &gw : nullptr,
                        add ? add->data_ptr<c10::BFloat16>() : nullptr, s);
    return {gx, gw};
  }
#endif
  dispatch_storage(x.scalar_type(), "unit_train_backward_bn", [&](auto t, auto m) {
    using T = decltype(t);
    using M = decltype(m);
    GradBN<T, M> bn;
    bn.y = y.data_ptr<M>();
    bn.sc = sc.data_ptr<T>();
    bn.sh = sh.data_ptr<T>();
    bn.A = A.data_ptr<T>();
    bn.B = B.data_ptr<T>();
    bn.add = add ? add->data_ptr<M>() : nullptr;
    backward_impl<T, M>(x, w, g, need_input ? &gx : nullptr, need_weight ? &gw : nullptr, groups, s, opt_ptr<T>(isc),
                        opt_ptr<T>(ish), bn, bf16_dot);
  });
  return {gx, gw};
}

// --- hybrid rows in channels_last (see the section of that name): the convolutions and their BN ---------------------

// conv1 or conv2 of a hybrid row: x (B, S, H, W) channels_last bf16, read through relu(x * isc + ish) when isc is
// given (conv2's input); idx [K, L] the gather table, wt [K, 9, L] the weights in its order; stride s. Returns y
// (B, L, Ho, Wo) channels_last bf16 and its per-lane [sums; sums of squares] as stored (double [2, L]).
std::vector<at::Tensor> row_conv_forward(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& wt, int64_t s,
                                         const std::optional<at::Tensor>& isc, const std::optional<at::Tensor>& ish) {
  TORCH_CHECK(kUnitRows, "unit_train: hybrid rows need a build with AVX512-BF16");
  TORCH_CHECK(s == 1 || s == 2, "unit_train: stride must be 1 or 2");
  TORCH_CHECK(isc.has_value() == ish.has_value(), "unit_train: isc and ish come together");
#if defined(__AVX512BF16__)
  const RowSource src = row_source(x, row_vec(isc, x.size(1), "isc"), row_vec(ish, x.size(1), "ish"));
  const RowGather g = make_row_gather(idx, x.size(1));
  const Scratch<uint32_t> w = row_weights(wt, g);
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3), Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1, wp = W + 2;
  const int64_t L = g.L;
  at::Tensor y = at::empty({B, L, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor stats = at::empty({2, L}, x.options().dtype(at::kDouble));
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  std::vector<Scratch<double>> partial(at::get_num_threads());
  over_images(B, B * Ho * Wo * L * g.P * 2, [&](int64_t b0, int64_t b1, int64_t t) {
    Scratch<uint32_t> e((H + 2) * wp * g.P * L, 0u);
    Scratch<uint16_t> row(g.S, 0);
    Scratch<double>& st = partial[t];
    st.assign(2 * L, 0.0);
    for (int64_t b = b0; b < b1; ++b) {
      row_fill(src, b * H * W, H, W, 1, g, wp, row.data(), e.data());
      row_conv_image(e.data(), wp, g, w.data(), s, Ho, Wo, yp + b * Ho * Wo * L, RowValueSums{}, st.data());
    }
  });
  sum_lanes(partial, 2 * L, stats.data_ptr<double>(), 1);
  return {y, stats};
#else
  return {};
#endif
}

// conv2's backward in a hybrid row: g and y2 (B, C, H, W) (the gradient of relu(y2 * sc + sh), and y2), BN2's A and
// B; y1 (B, L, H, W) with conv2's input relu(y1 * isc + ish). gidx [Kc, L] and gwt [Kc, 9, L]: each hidden lane's
// gather of output channels and their flipped weights; fidx [K2, C]: conv2's forward gather (for the weight
// gradient). Returns gh (B, L, H, W) channels_last bf16, the hidden lanes' [sum gz; sum gz * y1] in double (gz = gh
// as stored where y1 * isc + ish > 0: BN1's gradient sums, taken in the same pass), and gw [K2, 9, C] in fidx's order
// (undefined unless need_weight).
std::vector<at::Tensor> row_conv2_backward(const at::Tensor& g, const at::Tensor& y2, const at::Tensor& sc,
                                           const at::Tensor& sh, const at::Tensor& A, const at::Tensor& Bc,
                                           const at::Tensor& y1, const at::Tensor& isc, const at::Tensor& ish,
                                           const at::Tensor& gidx, const at::Tensor& gwt, const at::Tensor& fidx,
                                           bool need_weight) {
  TORCH_CHECK(kUnitRows, "unit_train: hybrid rows need a build with AVX512-BF16");
#if defined(__AVX512BF16__)
  const int64_t C = y2.size(1), L = y1.size(1);
  const RowSource gsrc = row_grad_source(y2, g, sc, sh, A, Bc);
  const float* isp = row_vec(isc, L, "isc");
  const float* ihp = row_vec(ish, L, "ish");
  const RowSource hsrc = row_source(y1, isp, ihp);
  TORCH_CHECK(y1.size(0) == y2.size(0) && y1.size(2) == y2.size(2) && y1.size(3) == y2.size(3),
              "unit_train: g, y2 and y1 must be of one batch and plane");
  const RowGather gg = make_row_gather(gidx, C), fg = make_row_gather(fidx, L);
  TORCH_CHECK(gg.L == L && fg.L == C, "unit_train: the gather tables must give y1's and y2's lanes");
  const Scratch<uint32_t> w = row_weights(gwt, gg);
  const int64_t B = y1.size(0), H = y1.size(2), W = y1.size(3), wp = W + 2, HW = H * W;
  at::Tensor gh = at::empty_like(y1, at::MemoryFormat::ChannelsLast);
  at::Tensor sums = at::empty({2, L}, y1.options().dtype(at::kDouble));
  c10::BFloat16* ghp = gh.data_ptr<c10::BFloat16>();
  const c10::BFloat16* y1p = y1.data_ptr<c10::BFloat16>();
  std::vector<Scratch<double>> partial(at::get_num_threads());
  std::vector<Scratch<float>> wpart(at::get_num_threads());
  over_images(B, B * HW * (L * gg.P + C * fg.K) * 2, [&](int64_t b0, int64_t b1, int64_t t) {
    Scratch<uint32_t> e((H + 2) * wp * gg.P * L, 0u), ex(need_weight ? (H + 2) * wp * fg.P * C : 0, 0u);
    Scratch<uint16_t> row(std::max(gg.S, fg.S), 0);
    Scratch<float> gout(need_weight ? HW * C : 0);
    Scratch<double>& st = partial[t];
    st.assign(2 * L, 0.0);
    Scratch<float>& acc = wpart[t];
    acc.assign(need_weight ? fg.K * 9 * C : 0, 0.f);
    for (int64_t b = b0; b < b1; ++b) {
      // the gradient through BN2 and ReLU, gathered for the hidden lanes (and kept as floats for the weight gradient)
      row_fill(gsrc, b * HW, H, W, 1, gg, wp, row.data(), e.data(), need_weight ? gout.data() : nullptr);
      row_conv_image(e.data(), wp, gg, w.data(), 1, H, W, ghp + b * HW * L, RowMaskedSums{y1p + b * HW * L, isp, ihp, L},
                     st.data());
      if (need_weight) {  // conv2's input relu(y1 * isc + ish), gathered as the forward gathers it
        row_fill(hsrc, b * HW, H, W, 1, fg, wp, row.data(), ex.data());
        row_weight_grad(gout.data(), H, W, ex.data(), wp, fg, 1, acc.data());
      }
    }
  });
  sum_lanes(partial, 2 * L, sums.data_ptr<double>(), 1);
  at::Tensor gw;
  if (need_weight) gw = row_sum_threads(wpart, fg.K, C, y1.options());
  return {gh, sums, gw};
#else
  return {};
#endif
}

// conv1's backward in a hybrid row: gh (B, L, Ho, Wo) the gradient of relu(y1 * sc + sh), y1, BN1's A and B;
// x (B, C, H, W), stride s. gidx [Kb, C] and gwt [Kb, 9, C]: each input lane's gather of hidden channels and their
// flipped weights; fidx [K1, L]: conv1's forward gather (for the weight gradient). Returns gx (B, C, H, W)
// channels_last bf16 and gw [K1, 9, L] in fidx's order (each undefined unless asked). With add (x's shape,
// channels_last bf16: an identity shortcut's gradient), gx + add, each image's values added as they are written, as
// autograd adds two bf16 gradients (widened, summed, rounded once).
std::vector<at::Tensor> row_conv1_backward(const at::Tensor& gh, const at::Tensor& y1, const at::Tensor& sc,
                                           const at::Tensor& sh, const at::Tensor& A, const at::Tensor& Bc,
                                           const at::Tensor& x, const at::Tensor& gidx, const at::Tensor& gwt,
                                           const at::Tensor& fidx, int64_t s, bool need_input, bool need_weight,
                                           const std::optional<at::Tensor>& add) {
  TORCH_CHECK(kUnitRows, "unit_train: hybrid rows need a build with AVX512-BF16");
  TORCH_CHECK(s == 1 || s == 2, "unit_train: stride must be 1 or 2");
#if defined(__AVX512BF16__)
  const int64_t L = y1.size(1), C = x.size(1);
  const RowSource gsrc = row_grad_source(y1, gh, sc, sh, A, Bc);
  const RowSource xsrc = row_source(x);
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3), Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1, wp = W + 2;
  TORCH_CHECK(y1.size(0) == B && y1.size(2) == Ho && y1.size(3) == Wo,
              "unit_train: gh and y1 must be conv1's output for x");
  const RowGather gg = make_row_gather(gidx, L), fg = make_row_gather(fidx, C);
  TORCH_CHECK(gg.L == C && fg.L == L, "unit_train: the gather tables must give x's and y1's lanes");
  const Scratch<uint32_t> w = need_input ? row_weights(gwt, gg) : Scratch<uint32_t>();
  at::Tensor gx, gw;
  if (need_input) gx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  c10::BFloat16* gxp = need_input ? gx.data_ptr<c10::BFloat16>() : nullptr;
  const c10::BFloat16* addp = nullptr;
  if (add && need_input) {
    check_row_tensor(*add, C, "the added gradient");
    TORCH_CHECK(add->sizes() == x.sizes(), "unit_train: the added gradient must have x's shape");
    addp = add->data_ptr<c10::BFloat16>();
  }
  std::vector<Scratch<float>> wpart(at::get_num_threads());
  over_images(B, B * (H * W * C * gg.P + Ho * Wo * L * fg.K) * 2, [&](int64_t b0, int64_t b1, int64_t t) {
    // the gradient through BN1 and ReLU, gathered for the input lanes at (r * s + 1, c * s + 1) of a zero-bordered
    // full-size plane (at stride 2 the other positions stay zero), and kept as floats for the weight gradient
    Scratch<uint32_t> e(need_input ? (H + 2) * wp * gg.P * C : 0, 0u);
    Scratch<uint32_t> ex(need_weight ? (H + 2) * wp * fg.P * L : 0, 0u);
    Scratch<uint16_t> row(std::max(gg.S, fg.S), 0);
    Scratch<float> gout(need_weight ? Ho * Wo * L : 0);
    Scratch<float>& acc = wpart[t];
    acc.assign(need_weight ? fg.K * 9 * L : 0, 0.f);
    for (int64_t b = b0; b < b1; ++b) {
      row_fill(gsrc, b * Ho * Wo, Ho, Wo, s, gg, wp, row.data(), need_input ? e.data() : nullptr,
               need_weight ? gout.data() : nullptr);
      if (need_input) {  // the flipped taps over the (dilated, at stride 2) gradient
        row_conv_image(e.data(), wp, gg, w.data(), 1, H, W, gxp + b * H * W * C, RowNoSums{}, nullptr);
        if (addp)  // the image's values, just written (in cache)
          add_rows<float, c10::BFloat16>(gxp + b * H * W * C, addp + b * H * W * C, 1, H * W * C, 0, 0, 1);
      }
      if (need_weight) {
        row_fill(xsrc, b * H * W, H, W, 1, fg, wp, row.data(), ex.data());
        row_weight_grad(gout.data(), Ho, Wo, ex.data(), wp, fg, s, acc.data());
      }
    }
  });
  if (need_weight) gw = row_sum_threads(wpart, fg.K, L, x.options());
  return {gx, gw};
#else
  return {};
#endif
}

// BN of a hybrid row's lanes (see "hybrid rows"): stats [2, L] per lane; the BN modules' weights, biases and running
// statistics given per group (running lists empty: none tracked), the channels of all groups in order mapped to
// lanes by `lanes`; factors per group. Returns moments [3, L] and sc, sh [L] in like's dtype, as bn_coefficients
// computes them channel by channel (lanes no channel maps to: zero mean and variance, sc = sh = 0).
std::vector<at::Tensor> row_bn_coefficients(const at::Tensor& stats, int64_t count, const std::vector<at::Tensor>& weights,
                                            const std::vector<at::Tensor>& biases, double eps,
                                            const std::vector<at::Tensor>& running_means,
                                            const std::vector<at::Tensor>& running_vars,
                                            const std::vector<double>& factors, const at::Tensor& lanes,
                                            const at::Tensor& like) {
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 2 && stats.scalar_type() == at::kDouble && stats.is_contiguous(),
              "unit_train: stats must be contiguous double [2, L]");
  TORCH_CHECK(count > 0, "unit_train: count must be positive");
  TORCH_CHECK(weights.size() == biases.size() && weights.size() == factors.size() &&
                  running_means.size() == running_vars.size() &&
                  (running_means.empty() || running_means.size() == weights.size()),
              "unit_train: one weight, bias, factor (and running mean and variance) per group");
  TORCH_CHECK(lanes.dim() == 1 && lanes.scalar_type() == at::kLong && lanes.is_contiguous(),
              "unit_train: lanes must be contiguous int64");
  const int64_t L = stats.size(1);
  const double* st = stats.data_ptr<double>();
  const int64_t* lane = lanes.data_ptr<int64_t>();
  at::Tensor moments = at::empty({3, L}, stats.options());
  double* mean = moments.data_ptr<double>();
  double* var = mean + L;
  double* invstd = var + L;
  std::fill(mean, var + L, 0.0);
  std::fill(invstd, invstd + L, 1.0);
  std::vector<double> sc(L, 0.0), sh(L, 0.0);
  int64_t first = 0;
  for (size_t gi = 0; gi < weights.size(); ++gi) {
    const int64_t c = weights[gi].numel();
    TORCH_CHECK(first + c <= lanes.size(0), "unit_train: lanes must map every group's channels");
    const std::vector<double> g = as_doubles(weights[gi], c, "a BN weight"), b = as_doubles(biases[gi], c, "a BN bias");
    std::vector<double> m(c), u(c);
    for (int64_t k = 0; k < c; ++k) {
      const int64_t l = lane[first + k];
      TORCH_CHECK(l >= 0 && l < L, "unit_train: a lane out of range");
      bn_moments(st[l], st[L + l], count, eps, g[k], b[k], mean + l, var + l, invstd + l, &sc[l], &sh[l], &u[k]);
      m[k] = mean[l];
    }
    if (!running_means.empty()) {
      update_running(running_means[gi], m.data(), c, factors[gi]);
      update_running(running_vars[gi], u.data(), c, factors[gi]);
    }
    first += c;
  }
  TORCH_CHECK(first == lanes.size(0), "unit_train: lanes must map exactly the groups' channels");
  return {moments, from_doubles(sc, like), from_doubles(sh, like)};
}

// BN's backward for a hybrid row's lanes from their sums [sum gz; sum gz * y] (double [2, L]): the gradients of
// the lanes' BN weights and biases, and A, B, in param's dtype, as bn_relu_grad_coefficients computes them.
std::vector<at::Tensor> row_grad_coefficients(const at::Tensor& sums, const at::Tensor& sc, const at::Tensor& moments,
                                              int64_t count, const at::Tensor& param) {
  const int64_t L = sums.size(1);
  TORCH_CHECK(sums.dim() == 2 && sums.size(0) == 2 && sums.scalar_type() == at::kDouble && sums.is_contiguous() &&
                  moments.dim() == 2 && moments.size(0) == 3 && moments.size(1) == L &&
                  moments.scalar_type() == at::kDouble && moments.is_contiguous(),
              "unit_train: sums (double [2, L]) and moments (double [3, L]) must be contiguous");
  const double* su = sums.data_ptr<double>();
  const double* mean = moments.data_ptr<double>();
  const double* invstd = mean + 2 * L;
  const std::vector<double> scd = as_doubles(sc, L, "sc");
  std::vector<double> dg(L), db(L), A(L), B(L);
  for (int64_t k = 0; k < L; ++k) bn_grad(su[k], su[L + k], mean[k], invstd[k], scd[k], count, &dg[k], &db[k], &A[k], &B[k]);
  return {from_doubles(dg, param), from_doubles(db, param), from_doubles(A, param), from_doubles(B, param)};
}

at::Tensor conv_forward(const at::Tensor& x, const at::Tensor& w, int64_t groups, int64_t s) {
  check(x, w, groups, s);
  const int64_t ho = (x.size(2) - 1) / s + 1, wo = (x.size(3) - 1) / s + 1;
  // the output in the input's layout: a channels_last network stays channels_last around its unit layers
  at::Tensor y = at::empty({x.size(0), w.size(0), ho, wo}, x.options().memory_format(x.suggest_memory_format()));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "unit_train_forward",
                             [&] { forward_impl<scalar_t>(x, w, y, groups, s, nullptr, nullptr, nullptr); });
  return y;
}

std::vector<at::Tensor> conv_backward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& gy, int64_t groups,
                                      int64_t s, bool need_input, bool need_weight) {
  check(x, w, groups, s);
  TORCH_CHECK(gy.scalar_type() == x.scalar_type(), "unit_train: gradient dtype differs from the input's");
  at::Tensor gx, gw;
  if (need_input) gx = at::empty_like(x, x.suggest_memory_format());
  if (need_weight) gw = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "unit_train_backward", [&] {
    backward_impl<scalar_t>(x, w, gy, need_input ? &gx : nullptr, need_weight ? &gw : nullptr, groups, s);
  });
  return {gx, gw};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("conv_forward", &conv_forward, "grouped 3x3 conv, pad 1, stride 1 or 2 (forward)");
  m.def("conv_backward", &conv_backward, "its input and weight gradients");
  m.def("conv_forward_stats", &conv_forward_stats, "the forward (NCHW output) with its batch sums, input via BN+ReLU",
        py::arg("x"), py::arg("w"), py::arg("groups"), py::arg("s"), py::arg("isc") = py::none(),
        py::arg("ish") = py::none(), py::arg("bf16_dot") = false);
  m.def("bn_relu_apply", &bn_relu_apply, "relu(y * sc + sh) per channel; with a residual, relu(that + residual)",
        py::arg("y"), py::arg("sc"), py::arg("sh"), py::arg("channels_last"), py::arg("residual") = py::none());
  m.def(
      "bn_relu_grad_sums",
      [](const at::Tensor& g, const at::Tensor& y, const at::Tensor& sc, const at::Tensor& sh) {
        return bn_relu_grad_sums(g, y, sc, sh);
      },
      "per-channel sums of the ReLU-masked gradient and of it times y");
  m.def("bn_coefficients", &bn_coefficients, "BN's batch moments and affine map from the sums; running stats updated",
        py::arg("stats"), py::arg("count"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        py::arg("running_mean"), py::arg("running_var"), py::arg("factor"), py::arg("like"));
  m.def("bn_relu_grad_coefficients", &bn_relu_grad_coefficients,
        "BN's weight and bias gradients and the A, B of the convolution output's gradient (with out: and the gradient "
        "taken through the residual block's ReLU)",
        py::arg("g"), py::arg("y"), py::arg("sc"), py::arg("sh"), py::arg("count"), py::arg("moments"),
        py::arg("param"), py::arg("out") = py::none());
  m.def("conv_backward_bn", &conv_backward_bn, "input and weight gradients through BN (batch statistics) and ReLU",
        py::arg("x"), py::arg("w"), py::arg("g"), py::arg("y"), py::arg("sc"), py::arg("sh"), py::arg("A"),
        py::arg("B"), py::arg("groups"), py::arg("s"), py::arg("isc"), py::arg("ish"), py::arg("need_input"),
        py::arg("need_weight"), py::arg("bf16_dot") = false, py::arg("add") = py::none());
  m.def("row_conv_forward", &row_conv_forward, "a hybrid row's convolution in channels_last, lanes gathered",
        py::arg("x"), py::arg("idx"), py::arg("wt"), py::arg("s"), py::arg("isc") = py::none(),
        py::arg("ish") = py::none());
  m.def("row_conv2_backward", &row_conv2_backward, "a hybrid row's conv2 backward with BN1's gradient sums");
  m.def("row_conv1_backward", &row_conv1_backward, "a hybrid row's conv1 backward (with add: its input gradient plus "
        "add)", py::arg("gh"), py::arg("y1"), py::arg("sc"), py::arg("sh"), py::arg("A"), py::arg("B"), py::arg("x"),
        py::arg("gidx"), py::arg("gwt"), py::arg("fidx"), py::arg("s"), py::arg("need_input"), py::arg("need_weight"),
        py::arg("add") = py::none());
  m.def("row_bn_coefficients", &row_bn_coefficients, "BN of a hybrid row's lanes; running stats updated per group");
  m.def("row_grad_coefficients", &row_grad_coefficients, "BN's backward coefficients of a hybrid row's lanes");
  m.def("set_flat_planes", [](bool on) { flat_planes = on && kFlatPlanes; },
        "whether planes of up to 7 columns run flattened (where this build has AVX512-VBMI2); off for side-by-side "
        "timing");
  m.def("has_flat_planes", [] { return kFlatPlanes; }, "whether this build runs planes of up to 7 columns flattened");
  m.def("has_unit_rows", [] { return kUnitRows; }, "whether this build runs hybrid rows in channels_last");
  m.def("has_bf16_dot", [] { return kBf16Dot; },
        "whether this build multiplies bf16 storage with AVX512-BF16 dot products when asked (bf16_dot)");
}

// Dot products and small matrix-vector products for the kernels' inner loops.
//
// A sum written as one running total (`acc += a[k] * b[k]`, vectorised or not) makes every
// multiply-add wait for the one before it (a vector each 4 cycles, a fraction of what the CPU
// issues), and a row-by-row `out += c[i] * X[i]` stores and reloads `out` for every row.
// Here the partial sums live in registers, several at a time (GCC/Clang vector types of 32
// bytes: AVX registers where built for them, pairs of SSE registers otherwise), so their
// multiply-adds overlap. The order of additions differs from a running sum: values agree to
// float rounding. Several vectors against one matrix (`vecmats`: the DNC's read heads) go in
// one pass over the matrix, each output summed as its own `vecmat` would sum it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace dnc_native {

template <typename T>
struct Vector;
template <>
struct Vector<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vector<double> {
  typedef double type __attribute__((vector_size(32)));
};

template <typename V, typename T>
inline V load(const T* at) {
  V v;
  std::memcpy(&v, at, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void store(T* at, const V& v) {
  std::memcpy(at, &v, sizeof(V));
}

template <typename T, typename V>
inline T lanes_sum(const V& v) {
  T total = T(0);
  for (int64_t l = 0; l < int64_t(sizeof(V) / sizeof(T)); ++l) total += v[l];
  return total;
}

// sum_k a[k] b[k]
template <typename T>
inline T dot(const T* a, const T* b, int64_t len) {
  using V = typename Vector<T>::type;
  constexpr int64_t lanes = sizeof(V) / sizeof(T);
  V s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t k = 0;
  for (; k + 4 * lanes <= len; k += 4 * lanes) {
    s0 += load<V>(a + k) * load<V>(b + k);
    s1 += load<V>(a + k + lanes) * load<V>(b + k + lanes);
    s2 += load<V>(a + k + 2 * lanes) * load<V>(b + k + 2 * lanes);
    s3 += load<V>(a + k + 3 * lanes) * load<V>(b + k + 3 * lanes);
  }
  for (; k + lanes <= len; k += lanes) s0 += load<V>(a + k) * load<V>(b + k);
  T total = lanes_sum<T>((s0 + s1) + (s2 + s3));
  for (; k < len; ++k) total += a[k] * b[k];
  return total;
}

// out[i] = sum_k X[i, k] y[k] for the rows of X (rows x cols, contiguous): four rows at a
// time, sharing the loads of y (one partial-sum vector a row); the rows past the last four
// by dot.
template <typename T>
inline void matvec(const T* X, int64_t rows, int64_t cols, const T* y, T* out) {
  using V = typename Vector<T>::type;
  constexpr int64_t lanes = sizeof(V) / sizeof(T);
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) {
    const T *x0 = X + i * cols, *x1 = x0 + cols, *x2 = x1 + cols, *x3 = x2 + cols;
    V a0 = {}, a1 = {}, a2 = {}, a3 = {};
    int64_t k = 0;
    for (; k + lanes <= cols; k += lanes) {
      const V yk = load<V>(y + k);
      a0 += load<V>(x0 + k) * yk;
      a1 += load<V>(x1 + k) * yk;
      a2 += load<V>(x2 + k) * yk;
      a3 += load<V>(x3 + k) * yk;
    }
    T s0 = lanes_sum<T>(a0), s1 = lanes_sum<T>(a1), s2 = lanes_sum<T>(a2),
      s3 = lanes_sum<T>(a3);
    for (; k < cols; ++k) {
      s0 += x0[k] * y[k];
      s1 += x1[k] * y[k];
      s2 += x2[k] * y[k];
      s3 += x3[k] * y[k];
    }
    out[i] = s0;
    out[i + 1] = s1;
    out[i + 2] = s2;
    out[i + 3] = s3;
  }
  for (; i < rows; ++i) out[i] = dot(X + i * cols, y, cols);
}

// out[k] = sum_i c[i] X[i, k] for the columns of X (rows x cols, contiguous): a panel of
// columns at a time, summed over every row in registers before it is stored.
template <typename T>
inline void vecmat(const T* c, const T* X, int64_t rows, int64_t cols, T* out) {
  using V = typename Vector<T>::type;
  constexpr int64_t lanes = sizeof(V) / sizeof(T);
  int64_t k = 0;
  for (; k + 4 * lanes <= cols; k += 4 * lanes) {
    V a0 = {}, a1 = {}, a2 = {}, a3 = {};
    const T* x = X + k;
    for (int64_t i = 0; i < rows; ++i, x += cols) {
      const T ci = c[i];
      a0 += ci * load<V>(x);
      a1 += ci * load<V>(x + lanes);
      a2 += ci * load<V>(x + 2 * lanes);
      a3 += ci * load<V>(x + 3 * lanes);
    }
    store(out + k, a0);
    store(out + k + lanes, a1);
    store(out + k + 2 * lanes, a2);
    store(out + k + 3 * lanes, a3);
  }
  for (; k + lanes <= cols; k += lanes) {
    V a0 = {};
    for (int64_t i = 0; i < rows; ++i) a0 += c[i] * load<V>(X + i * cols + k);
    store(out + k, a0);
  }
  for (; k < cols; ++k) {
    T total = T(0);
    for (int64_t i = 0; i < rows; ++i) total += c[i] * X[i * cols + k];
    out[k] = total;
  }
}

// out[q, k] = sum_i C[q, i] X[i, k] for R vectors C[q] (R x rows) at once: one pass over X
// for all of them, each output summed over the rows in order as vecmat sums it. With
// Accumulate the sums start from out's values instead of zero.
template <int R, typename T, bool Accumulate = false>
inline void vecmats(const T* C, const T* X, int64_t rows, int64_t cols, T* out) {
  using V = typename Vector<T>::type;
  constexpr int64_t lanes = sizeof(V) / sizeof(T);
  int64_t k = 0;
  for (; k + 2 * lanes <= cols; k += 2 * lanes) {
    V a[R][2] = {};
    if (Accumulate)
      for (int q = 0; q < R; ++q) {
        a[q][0] = load<V>(out + q * cols + k);
        a[q][1] = load<V>(out + q * cols + k + lanes);
      }
    const T* x = X + k;
    for (int64_t i = 0; i < rows; ++i, x += cols) {
      const V x0 = load<V>(x), x1 = load<V>(x + lanes);
      for (int q = 0; q < R; ++q) {
        const T c = C[q * rows + i];
        a[q][0] += c * x0;
        a[q][1] += c * x1;
      }
    }
    for (int q = 0; q < R; ++q) {
      store(out + q * cols + k, a[q][0]);
      store(out + q * cols + k + lanes, a[q][1]);
    }
  }
  for (; k + lanes <= cols; k += lanes) {
    V a[R] = {};
    if (Accumulate)
      for (int q = 0; q < R; ++q) a[q] = load<V>(out + q * cols + k);
    for (int64_t i = 0; i < rows; ++i) {
      const V x0 = load<V>(X + i * cols + k);
      for (int q = 0; q < R; ++q) a[q] += C[q * rows + i] * x0;
    }
    for (int q = 0; q < R; ++q) store(out + q * cols + k, a[q]);
  }
  for (; k < cols; ++k)
    for (int q = 0; q < R; ++q) {
      T total = Accumulate ? out[q * cols + k] : T(0);
      for (int64_t i = 0; i < rows; ++i) total += C[q * rows + i] * X[i * cols + k];
      out[q * cols + k] = total;
    }
}

// Calls f(std::integral_constant<int, R>{}, q) over m items in groups of R <= 4 (q: the
// group's first item): four at a time, then the rest as one group.
template <typename F>
inline void in_groups_of_four(int64_t m, F&& f) {
  for (int64_t q = 0; q < m;) {
    switch (std::min<int64_t>(m - q, 4)) {
      case 4: f(std::integral_constant<int, 4>{}, q); q += 4; break;
      case 3: f(std::integral_constant<int, 3>{}, q); q += 3; break;
      case 2: f(std::integral_constant<int, 2>{}, q); q += 2; break;
      default: f(std::integral_constant<int, 1>{}, q); q += 1; break;
    }
  }
}

// vecmats over any number m of vectors, up to four per pass over X.
template <typename T, bool Accumulate = false>
inline void vecmats_any(const T* C, int64_t m, const T* X, int64_t rows, int64_t cols, T* out) {
  in_groups_of_four(m, [&](auto group, int64_t q) {
    vecmats<decltype(group)::value, T, Accumulate>(C + q * rows, X, rows, cols, out + q * cols);
  });
}

}  // namespace dnc_native

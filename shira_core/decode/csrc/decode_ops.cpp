// The small operations of a Llama-family decode step (shira_core.decode.step), one call each instead of the
// five to ten PyTorch ops transformers spends on them: RMSNorm with the residual add, rotary embedding, and
// attention of one query per row over the KV cache. Sums run in float32 and round once into the
// model's dtype. Each row is computed the same way whatever its batchmates, as in decode_linear.cpp.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
inline float f(T v) {
    return static_cast<float>(v);
}

// Eight partial sums, so the compiler can vectorize the loop and the order stays fixed.
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t d = 0;
    for (; d + 8 <= n; d += 8)
        for (int j = 0; j < 8; j++) part[j] += a[d + j] * f(b[d + j]);
    float s = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
    for (; d < n; d++) s += a[d] * f(b[d]);
    return s;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const at::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// n a multiple of 16.
template <typename T>
float dot512(const float* a, const T* b, int64_t n) {
    __m512 s = _mm512_setzero_ps();
    for (int64_t d = 0; d < n; d += 16) s = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), load16(b + d), s);
    return _mm512_reduce_add_ps(s);
}

template <typename T>
void axpy512(float e, const T* v, float* acc, int64_t n) {
    const __m512 ev = _mm512_set1_ps(e);
    for (int64_t d = 0; d < n; d += 16)
        _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(ev, load16(v + d), _mm512_loadu_ps(acc + d)));
}

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// n a multiple of 8.
template <typename T>
float dot256(const float* a, const T* b, int64_t n) {
    __m256 s = _mm256_setzero_ps();
    for (int64_t d = 0; d < n; d += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), load8(b + d), s);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

template <typename T>
void axpy256(float e, const T* v, float* acc, int64_t n) {
    const __m256 ev = _mm256_set1_ps(e);
    for (int64_t d = 0; d < n; d += 8)
        _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(ev, load8(v + d), _mm256_loadu_ps(acc + d)));
}

#pragma GCC pop_options

const bool kAvx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512vl");
const bool kAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");

// The dot product the ops use: AVX-512 or AVX2 where the CPU has it and n fits, else eight scalar lanes (which the
// compiler's baseline SSE2 barely speeds up: on an AVX2-only Zen 3, attention over 60 cached tokens took 4.5 ms of
// an 8-row step that way).
template <typename T>
inline float vdot(const float* a, const T* b, int64_t n) {
    if constexpr (!std::is_same_v<T, double>) {
        if (kAvx512 && n % 16 == 0) return dot512(a, b, n);
        if (kAvx2 && n % 8 == 0) return dot256(a, b, n);
    }
    return dot(a, b, n);
}

template <typename T>
inline void axpy(float e, const T* v, float* acc, int64_t n) {
    if constexpr (!std::is_same_v<T, double>) {
        if (kAvx512 && n % 16 == 0) return axpy512(e, v, acc, n);
        if (kAvx2 && n % 8 == 0) return axpy256(e, v, acc, n);
    }
    for (int64_t d = 0; d < n; d++) acc[d] += e * f(v[d]);
}

template <typename T>
void rms_norm_rows(const T* x, const T* w, T* out, int64_t rows, int64_t n, float eps) {
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
        std::vector<float> xf(n);
        for (int64_t r = begin; r < end; r++) {
            const T* xr = x + r * n;
            for (int64_t i = 0; i < n; i++) xf[i] = f(xr[i]);
            const float ss = vdot(xf.data(), xr, n);
            const float scale = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
            // transformers: weight * (x * rsqrt(var + eps)).to(dtype)
            for (int64_t i = 0; i < n; i++) out[r * n + i] = static_cast<T>(f(w[i]) * f(static_cast<T>(f(xr[i]) * scale)));
        }
    });
}

template <typename T>
void rope_rows(T* x, const T* cos, const T* sin, int64_t rows, int64_t heads, int64_t dim) {
    const int64_t half = dim / 2;
    for (int64_t r = 0; r < rows; r++) {
        const T* c = cos + r * dim;
        const T* s = sin + r * dim;
        for (int64_t h = 0; h < heads; h++) {
            T* v = x + (r * heads + h) * dim;
            for (int64_t i = 0; i < half; i++) {
                const float a = f(v[i]), b = f(v[i + half]);
                // x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1)
                v[i] = static_cast<T>(a * f(c[i]) - b * f(s[i]));
                v[i + half] = static_cast<T>(b * f(c[i + half]) + a * f(s[i + half]));
            }
        }
    }
}

template <typename T>
void attend(const T* q, const T* k, const T* v, const int64_t* mask, T* out, int64_t rows, int64_t q_heads,
            int64_t kv_heads, int64_t len, int64_t dim, const int64_t* ks, const int64_t* vs, int64_t mask_stride,
            float scale) {
    const int64_t group = q_heads / kv_heads;
    at::parallel_for(0, rows * q_heads, 4, [&](int64_t begin, int64_t end) {
        std::vector<float> p(len), acc(dim), qf(dim);
        for (int64_t t = begin; t < end; t++) {
            const int64_t r = t / q_heads, h = t % q_heads, g = h / group;
            const T* qh = q + t * dim;
            for (int64_t d = 0; d < dim; d++) qf[d] = f(qh[d]);
            const T* kh = k + r * ks[0] + g * ks[1];
            const T* vh = v + r * vs[0] + g * vs[1];
            const int64_t* m = mask + r * mask_stride;
            float top = -INFINITY;
            for (int64_t l = 0; l < len; l++) {
                if (!m[l]) continue;
                p[l] = vdot(qf.data(), kh + l * ks[2], dim) * scale;
                top = std::max(top, p[l]);
            }
            float total = 0.0f;
            for (int64_t d = 0; d < dim; d++) acc[d] = 0.0f;
            for (int64_t l = 0; l < len; l++) {
                if (!m[l]) continue;
                const float e = std::exp(p[l] - top);
                total += e;
                axpy(e, vh + l * vs[2], acc.data(), dim);
            }
            T* o = out + t * dim;
            const float inv = total > 0.0f ? 1.0f / total : 0.0f;
            for (int64_t d = 0; d < dim; d++) o[d] = static_cast<T>(acc[d] * inv);
        }
    });
}

void check_cpu(const torch::Tensor& t, const char* what) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "decode_ops: ", what, " must be a contiguous CPU tensor");
}

}  // namespace

// x += residual (in place, when residual is given), then RMSNorm(x) * weight. x: [..., n]; returns the norm.
torch::Tensor add_rms_norm(torch::Tensor& x, const c10::optional<torch::Tensor>& residual, const torch::Tensor& weight,
                           double eps) {
    check_cpu(x, "x");
    check_cpu(weight, "weight");
    if (residual && residual->defined()) x.add_(*residual);
    auto out = torch::empty_like(x);
    const int64_t n = x.size(-1), rows = x.numel() / n;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
        rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows,
                                n, static_cast<float>(eps));
    });
    return out;
}

// Rotary embedding in place. x: [rows, heads, dim]; cos, sin: [rows, dim] (transformers' halves-duplicated layout).
void rope(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
    check_cpu(x, "x");
    check_cpu(cos, "cos");
    check_cpu(sin, "sin");
    TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
                "decode_ops: cos and sin must have x's dtype");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope", [&] {
        rope_rows<scalar_t>(x.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(), x.size(0),
                            x.size(1), x.size(2));
    });
}

// One query per row over the cache. q: [rows, q_heads, dim]; k, v: [rows, kv_heads, len, dim] with each position's
// dim contiguous; mask: [rows, len] int64, 0 for padding. Returns [rows, q_heads * dim].
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const torch::Tensor& mask, double scale) {
    check_cpu(q, "q");
    TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.sizes() == v.sizes(),
                "decode_ops: k and v must be [rows, kv_heads, len, dim] with dim contiguous");
    TORCH_CHECK(mask.scalar_type() == at::kLong && mask.stride(1) == 1 && mask.size(1) == k.size(2),
                "decode_ops: mask must be int64 [rows, len]");
    TORCH_CHECK(q.size(1) % k.size(1) == 0, "decode_ops: query heads must be a multiple of kv heads");
    const int64_t rows = q.size(0), q_heads = q.size(1), dim = q.size(2);
    auto out = torch::empty({rows, q_heads * dim}, q.options());
    pybind11::gil_scoped_release no_gil;
    const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)};
    const int64_t vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention", [&] {
        attend<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                         mask.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), rows, q_heads, k.size(1), k.size(2),
                         dim, ks, vs, mask.stride(0), static_cast<float>(scale));
    });
    return out;
}

void register_decode_ops(pybind11::module& m) {
    m.def("add_rms_norm", &add_rms_norm, py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"));
    m.def("rope", &rope);
    m.def("attention", &attention);
}

// Linear layers for decode steps on the CPU: out = x W^T (+ b) for a few rows x, weights streamed once per call.
//
// A decode step multiplies every weight by one token per row, so it is bound by reading the weights. PyTorch's
// CPU GEMV ran SmolLM2-135M's layers at ~10 GB/s on a 2-core VM where a plain read streams ~29 GB/s. Here each
// weight row is loaded once for up to four batch rows, from float32, bfloat16 or float16 storage, and summed in
// float32.
//
// Every output is one 16-lane (AVX-512) or 8-lane (AVX2) sum over k in order, reduced the same way whatever the
// batch holds, so a row's result does not depend on its batchmates: batched decoding equals decoding alone, bit
// for bit.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int kRows = 4;  // batch rows per tile (AVX-512; see rows)

template <typename T>
struct Out {
    static void store(T* p, float v) { *p = static_cast<T>(v); }
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")

template <typename W>
inline __m512 load16(const W* p, __mmask16 m);
template <>
inline __m512 load16<float>(const float* p, __mmask16 m) {
    return _mm512_maskz_loadu_ps(m, p);
}
template <>
inline __m512 load16<at::BFloat16>(const at::BFloat16* p, __mmask16 m) {
    __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <>
inline __m512 load16<at::Half>(const at::Half* p, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// The accumulators of a tile, zeroed; and each one's sum (reduced the same way in every tile) plus the bias, stored.
template <int NO, int NR>
inline void zero512(__m512 (&acc)[NO][NR]) {
#pragma GCC unroll 8
    for (int i = 0; i < NO; i++)
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
}

template <typename O, typename W, int NO, int NR>
inline void store512(__m512 (&acc)[NO][NR], O* out, int64_t n_out, const W* bias) {
#pragma GCC unroll 8
    for (int i = 0; i < NO; i++) {
        const float b = bias ? static_cast<float>(bias[i]) : 0.0f;
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) Out<O>::store(out + j * n_out + i, _mm512_reduce_add_ps(acc[i][j]) + b);
    }
}

// One k-chunk of 16 for NO weight rows and NR batch rows (m: the lanes in range).
template <typename W, int NO, int NR>
inline void step512(const W* w, int64_t k_len, const float* x, int64_t k, __mmask16 m, __m512 (&acc)[NO][NR]) {
    __m512 wv[NO];
#pragma GCC unroll 8
    for (int i = 0; i < NO; i++) {
        wv[i] = load16<W>(w + i * k_len + k, m);
        if (NR > 2) _mm_prefetch(reinterpret_cast<const char*>(w + (i + NO) * k_len + k), _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int j = 0; j < NR; j++) {
        const __m512 xv = _mm512_maskz_loadu_ps(m, x + j * k_len + k);
#pragma GCC unroll 8
        for (int i = 0; i < NO; i++) acc[i][j] = _mm512_fmadd_ps(wv[i], xv, acc[i][j]);
    }
}

template <typename W, typename O, int NO, int NR>
void tile512(const W* w, int64_t k_len, const float* x, O* out, int64_t n_out, const W* bias) {
    __m512 acc[NO][NR];
    zero512(acc);
    const int64_t body = k_len / 16 * 16;
    for (int64_t k = 0; k < body; k += 16) step512<W, NO, NR>(w, k_len, x, k, 0xFFFF, acc);
    if (body < k_len) step512<W, NO, NR>(w, k_len, x, body, static_cast<__mmask16>((1u << (k_len - body)) - 1), acc);
    store512(acc, out, n_out, bias);
}

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

template <typename W>
inline __m256 load8(const W* p);
template <>
inline __m256 load8<float>(const float* p) {
    return _mm256_loadu_ps(p);
}
template <>
inline __m256 load8<at::BFloat16>(const at::BFloat16* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
template <>
inline __m256 load8<at::Half>(const at::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline float reduce8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// The AVX2 tile: 8 lanes over the multiples of 8, then the last k < 8 in order, one scalar sum per output.
template <typename W, typename O, int NO, int NR>
void tile256(const W* w, int64_t k_len, const float* x, O* out, int64_t n_out, const W* bias) {
    __m256 acc[NO][NR];
    for (int i = 0; i < NO; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_ps();
    const int64_t body = k_len / 8 * 8;
    for (int64_t k = 0; k < body; k += 8) {
        __m256 wv[NO];
        for (int i = 0; i < NO; i++) wv[i] = load8<W>(w + i * k_len + k);
        for (int j = 0; j < NR; j++) {
            const __m256 xv = _mm256_loadu_ps(x + j * k_len + k);
            for (int i = 0; i < NO; i++) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
        }
    }
    for (int i = 0; i < NO; i++) {
        const float b = bias ? static_cast<float>(bias[i]) : 0.0f;
        for (int j = 0; j < NR; j++) {
            float s = reduce8(acc[i][j]);
            for (int64_t k = body; k < k_len; k++) s += static_cast<float>(w[i * k_len + k]) * x[j * k_len + k];
            Out<O>::store(out + j * n_out + i, s + b);
        }
    }
}

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

// bf16 rows against bf16 weights with AVX512-BF16: each instruction multiplies 32 pairs exactly and adds them into
// 16 float32 lanes, so a tile needs half the instructions of the converting one.
template <int NO, int NR>
inline void step_dot(const at::BFloat16* w, int64_t k_len, const at::BFloat16* x, int64_t k, __mmask32 m,
                     __m512 (&acc)[NO][NR]) {
    __m512i wv[NO];
#pragma GCC unroll 8
    for (int i = 0; i < NO; i++) {
        wv[i] = _mm512_maskz_loadu_epi16(m, w + i * k_len + k);
        if (NR > 2) _mm_prefetch(reinterpret_cast<const char*>(w + (i + NO) * k_len + k), _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int j = 0; j < NR; j++) {
        const __m512i xv = _mm512_maskz_loadu_epi16(m, x + j * k_len + k);
#pragma GCC unroll 8
        for (int i = 0; i < NO; i++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)wv[i], (__m512bh)xv);
    }
}

template <typename O, int NO, int NR>
void tile_dot(const at::BFloat16* w, int64_t k_len, const at::BFloat16* x, O* out, int64_t n_out,
              const at::BFloat16* bias) {
    __m512 acc[NO][NR];
    zero512(acc);
    const int64_t body = k_len / 32 * 32;
    for (int64_t k = 0; k < body; k += 32) step_dot<NO, NR>(w, k_len, x, k, 0xFFFFFFFFu, acc);
    if (body < k_len) step_dot<NO, NR>(w, k_len, x, body, static_cast<__mmask32>((1ull << (k_len - body)) - 1), acc);
    store512(acc, out, n_out, bias);
}

#pragma GCC pop_options

enum class Isa { none, avx2, avx512 };

Isa detect() {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return Isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return Isa::avx2;
    return Isa::none;
}

Isa kIsa = detect();  // tests step down to AVX2 through use_isa
bool kDot = kIsa == Isa::avx512 && __builtin_cpu_supports("avx512bf16");  // tests turn it off through use_isa

template <typename W, typename O, int NO, int NR>
inline void tile(const W* w, int64_t k_len, const float* x, O* out, int64_t n_out, const W* bias) {
    if (kIsa == Isa::avx512)
        tile512<W, O, NO, NR>(w, k_len, x, out, n_out, bias);
    else
        tile256<W, O, NO, NR>(w, k_len, x, out, n_out, bias);
}

template <typename W, typename O, int NO, int NR>
inline void tile(const W* w, int64_t k_len, const at::BFloat16* x, O* out, int64_t n_out, const W* bias) {
    tile_dot<O, NO, NR>(w, k_len, x, out, n_out, bias);  // only W = bf16 reaches here (see linear)
}

// The batch rows' remainder after the full tiles of NR (0 <= rest < NR), as one tile.
template <typename W, typename X, typename O, int NO, int NR>
inline void rest_tile(int64_t rest, const W* w, int64_t k_len, const X* x, O* out, int64_t n_out, const W* bias) {
    if constexpr (NR > 1) {
        if (rest == NR - 1) return tile<W, O, NO, NR - 1>(w, k_len, x, out, n_out, bias);
        rest_tile<W, X, O, NO, NR - 1>(rest, w, k_len, x, out, n_out, bias);
    }
}

// All batch rows against NO weight rows, NR batch rows at a time (the weight rows stay in L1 between them).
template <typename W, typename X, typename O, int NO, int NR>
void rows_of(const W* w, int64_t k_len, const X* x, int64_t m, O* out, int64_t n_out, const W* bias) {
    int64_t j = 0;
    for (; j + NR <= m; j += NR) tile<W, O, NO, NR>(w, k_len, x + j * k_len, out + j * n_out, n_out, bias);
    rest_tile<W, X, O, NO, NR>(m - j, w, k_len, x + j * k_len, out + j * n_out, n_out, bias);
}

// Tiles of NO x 4. AVX2 has 16 registers, so a prefill's many rows run in tiles of 2 x 6 (12 sums, 2 weight vectors,
// 1 input), where 4 x 4 spilled its sums to the stack: prompts of 44 tokens ran 9-13% faster on a Zen 3, fp32 and
// bf16. A decode step's fp32 4 x 4 tile spills too, and stays: its weights stream from memory, and 2 x 4 was slower.
template <typename W, typename X, typename O, int NO>
void rows(const W* w, int64_t k_len, const X* x, int64_t m, O* out, int64_t n_out, const W* bias) {
    if constexpr (NO <= 2 && std::is_same_v<X, float>) {
        if (kIsa == Isa::avx2 && m > 8) return rows_of<W, X, O, NO, 6>(w, k_len, x, m, out, n_out, bias);
    }
    rows_of<W, X, O, NO, kRows>(w, k_len, x, m, out, n_out, bias);
}

// One weight of a call: its rows are tiles [first, first + tiles) of the call's tile range.
struct Job {
    const void* w;
    const void* bias;
    void* out;
    int64_t n_out;
    int64_t first;
    int64_t tiles;
};

template <typename W, typename X, typename O>
void tile_of(const Job& job, int64_t t, const X* x, int64_t m, int64_t k_len, int64_t width) {
    const int64_t n = t * width;
    const W* wt = static_cast<const W*>(job.w) + n * k_len;
    const W* bt = job.bias ? static_cast<const W*>(job.bias) + n : nullptr;
    O* out = static_cast<O*>(job.out) + n;
    switch (std::min<int64_t>(width, job.n_out - n)) {
        case 4: rows<W, X, O, 4>(wt, k_len, x, m, out, job.n_out, bt); break;
        case 3: rows<W, X, O, 3>(wt, k_len, x, m, out, job.n_out, bt); break;
        case 2: rows<W, X, O, 2>(wt, k_len, x, m, out, job.n_out, bt); break;
        default: rows<W, X, O, 1>(wt, k_len, x, m, out, job.n_out, bt); break;
    }
}

// Every weight of the call over one tile range, so the weights that share an input (q, k and v; gate and up) are
// split between the threads in one hand-off.
template <typename W, typename X, typename O>
void run(std::vector<Job>& jobs, const X* x, int64_t m, int64_t k_len) {
    // One or two rows: one weight row at a time, so each thread reads a single sequential stream (the prefetchers
    // keep up; four interleaved row streams ran at half the bandwidth). More rows: four fp32 or two 16-bit weight
    // rows a tile, so each loaded x vector feeds several FMAs, with the next tile prefetched (measured on SmolLM2's
    // layers, 2 cores: 8 rows 28 ms against 32 without the prefetch). Every output is the same sum in the same order
    // whatever the tile.
    const int64_t width = m <= 2 ? 1 : sizeof(W) == 4 && (kIsa == Isa::avx512 || m <= 8) ? 4 : 2;
    int64_t total = 0;
    for (auto& job : jobs) {
        job.first = total;
        job.tiles = (job.n_out + width - 1) / width;
        total += job.tiles;
    }
    // ~32K weights a task: small layers stay on one thread, where a hand-off would cost more than it saves.
    const int64_t grain = std::max<int64_t>(1, 32768 / (width * k_len));
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
        size_t j = 0;
        for (int64_t t = begin; t < end; t++) {
            while (t >= jobs[j].first + jobs[j].tiles) j++;
            tile_of<W, X, O>(jobs[j], t - jobs[j].first, x, m, k_len, width);
        }
    });
}

// Rows in chunks of kChunk (a prefill's tokens): each chunk's inputs stay in L2 while every weight streams past.
constexpr int64_t kChunk = 64;

template <typename W, typename X, typename O>
void run_chunks(const std::vector<Job>& jobs, const X* x, int64_t m, int64_t k_len) {
    for (int64_t r0 = 0; r0 < m; r0 += kChunk) {
        std::vector<Job> chunk = jobs;
        for (auto& job : chunk) job.out = static_cast<O*>(job.out) + r0 * job.n_out;
        run<W, X, O>(chunk, x + r0 * k_len, std::min(kChunk, m - r0), k_len);
    }
}

template <typename W, typename X>
void dispatch_out(std::vector<Job>& jobs, const X* x, int64_t m, int64_t k_len, at::ScalarType out) {
    switch (out) {
        case at::kFloat: run_chunks<W, X, float>(jobs, x, m, k_len); break;
        case at::kBFloat16: run_chunks<W, X, at::BFloat16>(jobs, x, m, k_len); break;
        case at::kHalf: run_chunks<W, X, at::Half>(jobs, x, m, k_len); break;
        default: TORCH_CHECK(false, "decode_linear: output dtype must be float32, bfloat16 or float16");
    }
}

}  // namespace

bool supported() { return kIsa != Isa::none; }

std::string isa() {
    if (kIsa == Isa::avx512) return kDot ? "avx512-bf16" : "avx512";
    return kIsa == Isa::avx2 ? "avx2" : "none";
}

// Runs the AVX2 or plain AVX-512 tiles on a CPU that has more, or back (tests cover each path on one machine);
// returns the ISA in use.
std::string use_isa(const std::string& name) {
    const Isa best = detect();
    const bool dot = best == Isa::avx512 && __builtin_cpu_supports("avx512bf16");
    if (name == "avx2" && best != Isa::none) kIsa = Isa::avx2, kDot = false;
    if (name == "avx512" && best == Isa::avx512) kIsa = Isa::avx512, kDot = false;
    if (name == "avx512-bf16" && dot) kIsa = Isa::avx512, kDot = true;
    return isa();
}

// x: [..., in] on the CPU; weights: [out_i, in] contiguous, one dtype (float32, bfloat16 or float16); biases: [out_i]
// or None each, the weights' dtype. Returns one [..., out_i] per weight, in x's dtype.
std::vector<torch::Tensor> linears(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                                   const std::vector<c10::optional<torch::Tensor>>& biases) {
    TORCH_CHECK(kIsa != Isa::none, "decode_linear: this CPU has neither AVX-512 nor AVX2 with FMA");
    TORCH_CHECK(!weights.empty() && biases.size() == weights.size(), "decode_linear: one bias (or None) per weight");
    TORCH_CHECK(x.device().is_cpu(), "decode_linear: CPU tensors only");
    const int64_t k_len = weights[0].size(-1);
    const at::ScalarType wtype = weights[0].scalar_type();
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k_len, "decode_linear: x has ", x.size(-1), " features, the weight ",
                k_len);
    const int64_t m = x.numel() / k_len;
    std::vector<torch::Tensor> outs;
    std::vector<Job> jobs;
    auto sizes = x.sizes().vec();
    for (size_t i = 0; i < weights.size(); i++) {
        const torch::Tensor& w = weights[i];
        TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous() && w.size(1) == k_len &&
                        w.scalar_type() == wtype,
                    "decode_linear: weights must be contiguous CPU matrices of one dtype, each [out, ", k_len, "]");
        const auto& b = biases[i];
        const bool has_bias = b && b->defined();
        if (has_bias)
            TORCH_CHECK(b->is_contiguous() && b->numel() == w.size(0) && b->scalar_type() == wtype,
                        "decode_linear: bias must be a contiguous [out] vector of the weight's dtype");
        sizes.back() = w.size(0);
        outs.push_back(torch::empty(sizes, x.options()));
        jobs.push_back({w.data_ptr(), has_bias ? b->data_ptr() : nullptr, outs.back().data_ptr(), w.size(0), 0, 0});
    }
    if (m == 0) return outs;
    const at::ScalarType otype = x.scalar_type();
    pybind11::gil_scoped_release no_gil;  // a streaming server's event loop runs meanwhile
    if (kDot && wtype == at::kBFloat16 && otype == at::kBFloat16) {
        const torch::Tensor xs = x.contiguous();
        dispatch_out<at::BFloat16, at::BFloat16>(jobs, xs.data_ptr<at::BFloat16>(), m, k_len, otype);
        return outs;
    }
    const torch::Tensor x32 = otype == at::kFloat && x.is_contiguous() ? x : x.to(at::kFloat).contiguous();
    const float* xp = x32.data_ptr<float>();
    switch (wtype) {
        case at::kFloat: dispatch_out<float, float>(jobs, xp, m, k_len, otype); break;
        case at::kBFloat16: dispatch_out<at::BFloat16, float>(jobs, xp, m, k_len, otype); break;
        case at::kHalf: dispatch_out<at::Half, float>(jobs, xp, m, k_len, otype); break;
        default: TORCH_CHECK(false, "decode_linear: weight dtype must be float32, bfloat16 or float16");
    }
    return outs;
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
    return linears(x, {weight}, {bias})[0];
}

void register_decode_ops(pybind11::module& m);  // decode_ops.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    register_decode_ops(m);
    m.def("linear", &linear, "x W^T + b for a few rows", py::arg("x"), py::arg("weight"), py::arg("bias") = py::none());
    m.def("linears", &linears, "x W_i^T + b_i for each weight, in one pass", py::arg("x"), py::arg("weights"),
          py::arg("biases"));
    m.def("supported", &supported);
    m.def("isa", &isa);
    m.def("use_isa", &use_isa);
}

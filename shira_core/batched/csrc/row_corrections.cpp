// Row corrections for one Linear layer in a forward pass (a decode step or a prefill), on the CPU.
//
// out[r] += delta @ x[r] for every term (a set's sparse delta for this layer) and each row r it applies to. The
// corrected token rows (a decode step's batch rows, or every token of a prefill's) run as the eight lanes of one
// vector, from their inputs transposed (xt[c * 8 + lane]): an entry costs one vector multiply-add for eight rows,
// whichever terms they carry, where a scalar loop costs one per entry and row. A term's sums are masked to its
// own lanes once per group of entries, not per entry.
//
// A delta is stored for this loop (shira_core.batched.deltas.grouped):
//   - by window of kWindow output rows: threads split the windows; a window's sums are 65 vectors (2 KB);
//   - within a window, in groups of kGroup row pieces (rows cut every 32 entries, pieces sorted by length), their
//     entries interleaved: the j-th entry of each piece in turn. A group sums into four registers, four
//     independent chains, and writes them once. An entry is three loads and a multiply-add for all eight rows.
//     The layout before (one entry at a time, by column within a block, into sums in memory) ran one scalar
//     loop per row: 8 rows over 5 sets of SmolLM2-135M cost ~7 ms a decode step, ~5 ms now.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kWindow = 64;
constexpr int64_t kGroup = 4;
constexpr int kLanes = 8;
// A layer with fewer entry visits than this runs on the calling thread: waking the others costs more (~5 us).
constexpr int64_t kInline = 16384;
// How far ahead of a group its term's arrays are prefetched, in entries (2 KB of values). The arrays stream from
// memory (a step's deltas are ~6x the L2), and a group's loads wait on each other: column, input, sum.
constexpr int64_t kAhead = 512;

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t i8v __attribute__((vector_size(32)));
typedef uint32_t u8v __attribute__((vector_size(32)));
typedef uint16_t h8v __attribute__((vector_size(16)));

struct Term {
    const int32_t* windows;  // [windows + 1]: each window's first group
    const int32_t* start;    // [groups + 1]: each group's first entry
    const uint8_t* lane;     // [groups * kGroup]: each piece's row within its window (kWindow: an empty lane)
    const uint16_t* col;     // [entries]: the input column (0 for padding)
    const float* val;        // [entries]: the value (0 for padding)
    const int64_t* rows;     // the m batch rows it applies to
    int64_t m;
};

__attribute__((always_inline)) inline v8 load8(const float* p) {
    v8 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

__attribute__((always_inline)) inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }

// Eight consecutive values of a row as fp32.
__attribute__((always_inline)) inline v8 row8(const float* p) { return load8(p); }

__attribute__((always_inline)) inline v8 row8(const at::BFloat16* p) {
    h8v h;
    std::memcpy(&h, p, sizeof h);
    return (v8)(__builtin_convertvector(h, u8v) << 16);
}

__attribute__((always_inline)) inline v8 row8(const at::Half* p) {
    v8 v;
    for (int i = 0; i < 8; i++) v[i] = static_cast<float>(p[i]);
    return v;
}

// p[0..8) += v, each sum rounded once into the row's dtype (bf16: to nearest even, as c10::BFloat16 rounds).
__attribute__((always_inline)) inline void add8(float* p, v8 v) { store8(p, load8(p) + v); }

__attribute__((always_inline)) inline void add8(at::BFloat16* p, v8 v) {
    const v8 f = row8(p) + v;
    const u8v u = (u8v)f;
    u8v r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const i8v nan = f != f;
    r = (u8v)(((i8v)r & ~nan) | (nan & 0x7FC0));
    const h8v h = __builtin_convertvector(r, h8v);
    std::memcpy(p, &h, sizeof h);
}

__attribute__((always_inline)) inline void add8(at::Half* p, v8 v) {
    for (int i = 0; i < 8; i++) p[i] = static_cast<at::Half>(static_cast<float>(p[i]) + v[i]);
}

// a[i][j] -> a[j][i] for eight vectors of eight (three rounds of shuffles).
__attribute__((always_inline)) inline void transpose8(v8* a) {
    v8 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = __builtin_shuffle(a[i], a[i + 1], i8v{0, 8, 1, 9, 4, 12, 5, 13});
        t[i + 1] = __builtin_shuffle(a[i], a[i + 1], i8v{2, 10, 3, 11, 6, 14, 7, 15});
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = __builtin_shuffle(t[i], t[i + 2], i8v{0, 1, 8, 9, 4, 5, 12, 13});
        u[i + 1] = __builtin_shuffle(t[i], t[i + 2], i8v{2, 3, 10, 11, 6, 7, 14, 15});
        u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], i8v{0, 1, 8, 9, 4, 5, 12, 13});
        u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], i8v{2, 3, 10, 11, 6, 7, 14, 15});
    }
    for (int j = 0; j < 4; j++) {
        a[j] = __builtin_shuffle(u[j], u[j + 4], i8v{0, 1, 2, 3, 8, 9, 10, 11});
        a[j + 4] = __builtin_shuffle(u[j], u[j + 4], i8v{4, 5, 6, 7, 12, 13, 14, 15});
    }
}

// xt[c * 8 + j] = x[flat[j]][c] in fp32, for the chunk's `lanes` token rows (zeros in the lanes past them).
template <typename T>
__attribute__((target_clones("arch=x86-64-v3", "default")))
void transpose_in(const T* x, const int64_t* flat, int lanes, int64_t n_in, float* xt) {
    const T* xs[kLanes];
    for (int j = 0; j < kLanes; j++) xs[j] = x + flat[std::min(j, lanes - 1)] * n_in;
    int64_t c = 0;
    for (; c + 8 <= n_in; c += 8) {
        v8 a[8];
        for (int j = 0; j < 8; j++) a[j] = j < lanes ? row8(xs[j] + c) : v8{};
        transpose8(a);
        for (int i = 0; i < 8; i++) store8(xt + (c + i) * 8, a[i]);
    }
    for (; c < n_in; c++)
        for (int j = 0; j < kLanes; j++) xt[c * 8 + j] = j < lanes ? static_cast<float>(xs[j][c]) : 0.0f;
}

// The term's groups in windows w0..w1, summed over the eight lanes and added to sums[(w - w0) * (kWindow + 1) +
// row within the window], masked to the lanes the term applies to (a masked lane sums another row's inputs; the
// mask drops it, NaN included). One call a term: its arrays are read in one sweep.
__attribute__((target_clones("arch=x86-64-v3", "default")))
void window_sums(const Term& t, const float* xt, const int32_t* lanes, v8* sums, int64_t w0, int64_t w1) {
    i8v mask;
    std::memcpy(&mask, lanes, sizeof mask);  // a std::vector does not align it for a vector load
    const int32_t* start = t.start;
    const uint16_t* col = t.col;
    const float* val = t.val;
    for (int64_t w = w0; w < w1; w++) {
        v8* acc = sums + (w - w0) * (kWindow + 1);
        for (int32_t g = t.windows[w]; g < t.windows[w + 1]; g++) {
            v8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
            __builtin_prefetch(val + start[g] + kAhead);  // a group reads ~1.5 lines of values, ~0.8 of columns
            __builtin_prefetch(val + start[g] + kAhead + 16);
            __builtin_prefetch(col + start[g] + kAhead);
            for (int32_t e = start[g]; e < start[g + 1]; e += kGroup) {
                a0 += val[e] * load8(xt + 8 * static_cast<int64_t>(col[e]));
                a1 += val[e + 1] * load8(xt + 8 * static_cast<int64_t>(col[e + 1]));
                a2 += val[e + 2] * load8(xt + 8 * static_cast<int64_t>(col[e + 2]));
                a3 += val[e + 3] * load8(xt + 8 * static_cast<int64_t>(col[e + 3]));
            }
            const uint8_t* lane = t.lane + kGroup * static_cast<int64_t>(g);
            acc[lane[0]] += (v8)((i8v)a0 & mask);
            acc[lane[1]] += (v8)((i8v)a1 & mask);
            acc[lane[2]] += (v8)((i8v)a2 & mask);
            acc[lane[3]] += (v8)((i8v)a3 & mask);
        }
    }
}

// acc[row][lane] -> outs[lane][base + row] for the window's n rows, eight rows at a time, each sum rounded once.
template <typename T>
__attribute__((target_clones("arch=x86-64-v3", "default")))
void flush(const v8* acc, T* const* outs, int lanes, int64_t n, int64_t base) {
    for (int64_t r0 = 0; r0 < n; r0 += 8) {
        v8 o[8];
        for (int i = 0; i < 8; i++) o[i] = acc[r0 + i];  // acc has kWindow + 1 rows: r0 + 8 stays inside. Not a
        transpose8(o);                                    // memcpy: its 16-byte moves stall the 32-byte loads
        const int64_t width = std::min<int64_t>(8, n - r0);
        for (int j = 0; j < lanes; j++) {
            T* dst = outs[j] + base + r0;
            if (width == 8) {
                add8(dst, o[j]);
            } else {
                for (int64_t r = 0; r < width; r++) dst[r] = static_cast<T>(static_cast<float>(dst[r]) + o[j][r]);
            }
        }
    }
}

// A buffer of n floats: up to 1 MB, the thread's own `which`, kept between calls (a fresh 20-50 KB allocation
// comes back from the kernel as zeroed pages once glibc has trimmed the heap, ~1 us a page: more than the sums of
// a small layer cost); a long prefill's, in `own`, freed with it.
float* scratch(int which, int64_t n, std::vector<float>& own) {
    thread_local std::vector<float> kept[2];
    std::vector<float>& b = n <= (1 << 18) ? kept[which] : own;
    if (static_cast<int64_t>(b.size()) < n) b.resize(n);
    return b.data();
}

// Every term over x [n_rows * tokens, n_in] into out [n_rows * tokens, n_out]: the corrected token rows in chunks
// of eight lanes; chunks and windows split across threads (each pair writes its own outputs).
template <typename T>
void run(const std::vector<Term>& terms, const T* x, T* out, int64_t n_rows, int64_t tokens, int64_t n_in,
         int64_t n_out) {
    const int64_t k = static_cast<int64_t>(terms.size());
    std::vector<uint8_t> carries(k * n_rows, 0), any(n_rows, 0);
    for (int64_t q = 0; q < k; q++)
        for (int64_t j = 0; j < terms[q].m; j++) carries[q * n_rows + terms[q].rows[j]] = any[terms[q].rows[j]] = 1;
    std::vector<int64_t> flat;  // the lanes' token rows, batch row by batch row
    for (int64_t r = 0; r < n_rows; r++)
        if (any[r])
            for (int64_t i = 0; i < tokens; i++) flat.push_back(r * tokens + i);
    const int64_t n_flat = static_cast<int64_t>(flat.size()), chunks = (n_flat + kLanes - 1) / kLanes;
    const int64_t windows = (n_out + kWindow - 1) / kWindow;
    std::vector<int32_t> masks(k * chunks * kLanes, 0);  // per term and chunk, its lanes (-1)
    std::vector<uint8_t> used(k * chunks, 0);
    int64_t visits = 0;
    for (int64_t q = 0; q < k; q++) {
        const int64_t entries = terms[q].start[terms[q].windows[windows]];
        for (int64_t c = 0; c < chunks; c++) {
            for (int j = 0; j < kLanes && c * kLanes + j < n_flat; j++) {
                const bool carried = carries[q * n_rows + flat[c * kLanes + j] / tokens];
                masks[(q * chunks + c) * kLanes + j] = carried ? -1 : 0;
                used[q * chunks + c] |= carried;
            }
            visits += used[q * chunks + c] ? entries : 0;
        }
    }
    std::vector<float> own_xt;
    float* xt = scratch(0, chunks * n_in * kLanes, own_xt);
    pybind11::gil_scoped_release no_gil;  // a streaming server's event loop runs meanwhile
    const bool inline_ = visits < kInline;
    const auto transpose = [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; c++) {
            const int lanes = static_cast<int>(std::min<int64_t>(kLanes, n_flat - c * kLanes));
            transpose_in<T>(x, flat.data() + c * kLanes, lanes, n_in, xt + c * n_in * kLanes);
        }
    };
    if (inline_ || chunks == 1) {
        transpose(0, chunks);  // a decode step's rows: less than a hand-off costs
    } else {
        at::parallel_for(0, chunks, 1, transpose);
    }
    at::parallel_for(0, chunks * windows, inline_ ? chunks * windows : 1, [&](int64_t i0, int64_t i1) {
        // Sums for every window of the range (the last row of each: padding lanes' zeros), so each term's arrays
        // are read in one sweep: the prefetchers follow a few long streams, not many short ones.
        const int64_t n_sums = (i1 - i0) * (kWindow + 1) * kLanes;
        std::vector<float> own_sums;
        float* zeroed = scratch(1, n_sums + kLanes, own_sums);
        std::fill(zeroed, zeroed + n_sums + kLanes, 0.0f);
        v8* sums = reinterpret_cast<v8*>((reinterpret_cast<uintptr_t>(zeroed) + 31) & ~uintptr_t{31});
        T* outs[kLanes];
        for (int64_t a = i0; a < i1;) {
            const int64_t c = a / windows, b = std::min(i1, (c + 1) * windows);  // windows a..b of chunk c
            const float* xc = xt + c * n_in * kLanes;
            for (int64_t q = 0; q < k; q++)
                if (used[q * chunks + c])
                    window_sums(terms[q], xc, &masks[(q * chunks + c) * kLanes], sums + (a - i0) * (kWindow + 1),
                                a % windows, (b - 1) % windows + 1);
            const int lanes = static_cast<int>(std::min<int64_t>(kLanes, n_flat - c * kLanes));
            for (int j = 0; j < lanes; j++) outs[j] = out + flat[c * kLanes + j] * n_out;
            for (int64_t i = a; i < b; i++) {
                const int64_t w = i % windows;
                flush<T>(sums + (i - i0) * (kWindow + 1), outs, lanes, std::min(kWindow, n_out - w * kWindow),
                         w * kWindow);
            }
            a = b;
        }
    });
}

// The terms of one layer from a plan: terms [k, layers, 5] holds, per distinct delta and layer, the addresses of
// its windows, start, lane, col and values arrays (0: no entries in that layer; the caller keeps the tensors
// alive); rows holds k + 1 offsets into its tail, then each delta's row indices.
std::vector<Term> layer_terms(const torch::Tensor& terms, const torch::Tensor& rows, int64_t layer, int64_t n_rows) {
    TORCH_CHECK(terms.dtype() == torch::kInt64 && terms.is_contiguous() && terms.dim() == 3 && terms.size(2) == 5,
                "terms: contiguous int64 [deltas, layers, 5]");
    TORCH_CHECK(rows.dtype() == torch::kInt64 && rows.is_contiguous() && rows.dim() == 1, "rows: contiguous int64");
    const int64_t k = terms.size(0);
    TORCH_CHECK(layer >= 0 && layer < terms.size(1), "layer ", layer, " is outside the plan's ", terms.size(1));
    TORCH_CHECK(rows.numel() >= k + 1, "rows: ", k + 1, " offsets needed, got ", rows.numel());
    const int64_t* offsets = rows.data_ptr<int64_t>();
    const int64_t* indices = offsets + k + 1;
    const int64_t n_indices = rows.numel() - k - 1;
    const int64_t* addr = terms.data_ptr<int64_t>() + layer * 5;
    std::vector<Term> out;
    for (int64_t q = 0; q < k; q++, addr += terms.size(1) * 5) {
        const int64_t lo = offsets[q], hi = offsets[q + 1];
        TORCH_CHECK(0 <= lo && lo <= hi && hi <= n_indices, "rows: offsets ", lo, "..", hi, " out of order");
        if (addr[0] == 0 || lo == hi) continue;
        for (int64_t j = lo; j < hi; j++)
            TORCH_CHECK(indices[j] >= 0 && indices[j] < n_rows, "row ", indices[j], " is outside the batch of ", n_rows);
        out.push_back(Term{reinterpret_cast<const int32_t*>(addr[0]), reinterpret_cast<const int32_t*>(addr[1]),
                           reinterpret_cast<const uint8_t*>(addr[2]), reinterpret_cast<const uint16_t*>(addr[3]),
                           reinterpret_cast<const float*>(addr[4]), indices + lo, hi - lo});
    }
    return out;
}

// Starts loading the heads of the next layer's arrays (the layers run in plan order), so that its call, a dense
// product later, does not begin with a cold stream per array: a step's deltas do not stay in the caches.
void prefetch_layer(const torch::Tensor& terms, int64_t layer) {
    if (layer >= terms.size(1)) return;
    const int64_t* addr = terms.data_ptr<int64_t>() + layer * 5;
    for (int64_t q = 0; q < terms.size(0); q++, addr += terms.size(1) * 5) {
        if (addr[0] == 0) continue;
        for (int a = 0; a < 3; a++) __builtin_prefetch(reinterpret_cast<const char*>(addr[a]));
        for (int64_t off = 0; off < 4096; off += 64) {
            __builtin_prefetch(reinterpret_cast<const char*>(addr[3]) + off);
            __builtin_prefetch(reinterpret_cast<const char*>(addr[4]) + 2 * off);
            __builtin_prefetch(reinterpret_cast<const char*>(addr[4]) + 2 * off + 64);
        }
    }
}

}  // namespace

// One layer of a plan (see layer_terms) over x: [rows, tokens, n_in] or [rows, n_in] into out likewise with n_out
// (a decode step has one token per row, a prefill many). Each output's corrections are summed in fp32 and added
// to it once, rounded into its dtype.
void correct(const torch::Tensor& terms, const torch::Tensor& rows, int64_t layer, const torch::Tensor& x,
             torch::Tensor& out) {
    const int64_t n_rows = x.size(0), n_in = x.size(-1), n_out = out.size(-1);
    const int64_t tokens = x.dim() == 3 ? x.size(1) : 1;
    TORCH_CHECK((x.dim() == 2 || x.dim() == 3) && out.sizes().size() == x.sizes().size() && out.size(0) == n_rows &&
                    (x.dim() == 2 || out.size(1) == tokens),
                "inputs ", x.sizes(), " and outputs ", out.sizes(), " do not match: [rows, (tokens,) features] each");
    const std::vector<Term> found = layer_terms(terms, rows, layer, n_rows);
    prefetch_layer(terms, layer + 1);  // after layer_terms checked the table
    if (found.empty() || tokens == 0) return;
    const auto dtype = x.scalar_type();
    const bool direct = dtype == out.scalar_type() && x.is_contiguous() && out.is_contiguous();
    if (direct && dtype == torch::kFloat32) {  // no tensor made (~1 us each, 210 layers a step)
        run(found, x.data_ptr<float>(), out.data_ptr<float>(), n_rows, tokens, n_in, n_out);
    } else if (direct && dtype == torch::kBFloat16) {
        run(found, x.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), n_rows, tokens, n_in, n_out);
    } else if (direct && dtype == torch::kHalf) {
        run(found, x.data_ptr<at::Half>(), out.data_ptr<at::Half>(), n_rows, tokens, n_in, n_out);
    } else {
        const torch::Tensor xs = x.to(torch::kFloat32).contiguous();
        torch::Tensor ys = torch::zeros(out.sizes(), xs.options());
        run(found, xs.data_ptr<float>(), ys.data_ptr<float>(), n_rows, tokens, n_in, n_out);
        out.add_(ys);
    }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("correct", &correct, "out[r] += delta @ x[r] for each delta of the plan and its rows, in one layer");
    m.attr("window") = kWindow;
    m.attr("group") = kGroup;
    m.attr("lanes") = kLanes;
}

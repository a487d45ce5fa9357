// Row corrections for one Linear layer in a forward pass (a decode step or a prefill), on the CPU.
//
// out[r] += delta @ x[r] for every term (a set's sparse delta for this layer) and each row r the term applies
// to. A term's entries are read once for all its rows, so rows that share a set share the work, with uint8 rows
// and uint16 columns (7 bytes per entry). On a 2-core CPU it is bound by instructions, not memory (~2 ns per
// entry and thread, ~1.5 GB/s of a 20 GB/s bus), so the layout is chosen for a short loop: see kBlock.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Output rows per block. A term's entries are stored block by block, sorted by column within a block, so the
// loop over a block's entries runs straight through: no per-row loop to mispredict the end of (a 1%-dense row of
// SmolLM2-135M has ~6 entries), and consecutive entries add into different outputs, so no add waits on the one
// before. A block's local row fits a byte, and its outputs stay in L1.
constexpr int64_t kBlock = 64;

struct Term {
    const int32_t* start;  // [blocks + 1]: where each block's entries begin
    const uint8_t* row;    // [nnz]: the output row within the block
    const uint16_t* col;   // [nnz]: the input column
    const float* val;      // [nnz]
    const int64_t* rows;   // the m batch rows it applies to
    int64_t m;
};

// M batch rows of one term in block b: each entry is loaded once and used M times.
template <int M>
void block_rows(const Term& t, const int64_t* rows, const float* x, float* out, int64_t n_in, int64_t n_out,
                int64_t b) {
    const float* xs[M];
    float* os[M];
    for (int j = 0; j < M; j++) {
        xs[j] = x + rows[j] * n_in;
        os[j] = out + rows[j] * n_out + b * kBlock;
    }
    const int32_t end = t.start[b + 1];
    for (int32_t k = t.start[b]; k < end; k++) {
        const float v = t.val[k];
        const uint16_t c = t.col[k];
        const uint8_t r = t.row[k];
        for (int j = 0; j < M; j++) os[j][r] += v * xs[j][c];
    }
}

void apply_term(const Term& t, const float* x, float* out, int64_t n_in, int64_t n_out, int64_t b) {
    const int64_t* rows = t.rows;
    int64_t left = t.m;
    for (; left >= 8; left -= 8, rows += 8) block_rows<8>(t, rows, x, out, n_in, n_out, b);
    if (left >= 4) {
        block_rows<4>(t, rows, x, out, n_in, n_out, b);
        left -= 4;
        rows += 4;
    }
    if (left == 3) block_rows<3>(t, rows, x, out, n_in, n_out, b);
    if (left == 2) block_rows<2>(t, rows, x, out, n_in, n_out, b);
    if (left == 1) block_rows<1>(t, rows, x, out, n_in, n_out, b);
}

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t i8v __attribute__((vector_size(32)));

// Eight token rows (lanes) of a term in block b, from their inputs transposed (xt[c * 8 + lane]): one vector
// multiply-add per entry for all eight, where block_rows costs a scalar one per entry and row.
__attribute__((target_clones("avx2", "default")))
void block_lanes(const Term& t, const float* xt, float* const* outs, int lanes, int64_t n_out, int64_t b) {
    v8 acc[kBlock] = {};
    const int32_t end = t.start[b + 1];
    for (int32_t k = t.start[b]; k < end; k++) {
        v8 xv;
        std::memcpy(&xv, xt + 8 * static_cast<int64_t>(t.col[k]), sizeof xv);
        acc[t.row[k]] += t.val[k] * xv;
    }
    // acc is [row][lane]; the outputs are [lane][row]: transpose eight rows at a time (three rounds of shuffles)
    // and add whole vectors, where a scalar add per output costs more than the entries themselves.
    const int64_t n = std::min(kBlock, n_out - b * kBlock);
    for (int64_t r0 = 0; r0 < n; r0 += 8) {
        const v8* a = acc + r0;
        v8 t[8], u[8], o[8];
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
            o[j] = __builtin_shuffle(u[j], u[j + 4], i8v{0, 1, 2, 3, 8, 9, 10, 11});
            o[j + 4] = __builtin_shuffle(u[j], u[j + 4], i8v{4, 5, 6, 7, 12, 13, 14, 15});
        }
        const int64_t width = std::min<int64_t>(8, n - r0);
        for (int j = 0; j < lanes; j++) {
            float* dst = outs[j] + b * kBlock + r0;
            if (width == 8) {
                v8 d;
                std::memcpy(&d, dst, sizeof d);
                d += o[j];
                std::memcpy(dst, &d, sizeof d);
            } else {
                for (int64_t r = 0; r < width; r++) dst[r] += o[j][r];
            }
        }
    }
}

// Several tokens per row (a prefill): the term's token rows in chunks of eight lanes, each chunk's inputs
// transposed once (n_in * 8 moves, small against a delta's entries at prefill widths) and run through every
// block. Chunks write distinct rows, so threads split them.
void run_tokens(const Term& t, const float* x, float* out, int64_t tokens, int64_t n_in, int64_t n_out) {
    const int64_t m = t.m * tokens, chunks = (m + 7) / 8, blocks = (n_out + kBlock - 1) / kBlock;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        std::vector<float> xt(n_in * 8);
        float* outs[8];
        for (int64_t chunk = c0; chunk < c1; chunk++) {
            // A short last chunk keeps the previous chunk's inputs in its spare lanes: computed, never added.
            const int lanes = static_cast<int>(std::min<int64_t>(8, m - chunk * 8));
            for (int j = 0; j < lanes; j++) {
                const int64_t flat = chunk * 8 + j;  // the term's token rows: its batch rows' tokens in turn
                const int64_t row = t.rows[flat / tokens] * tokens + flat % tokens;
                const float* xr = x + row * n_in;
                for (int64_t c = 0; c < n_in; c++) xt[c * 8 + j] = xr[c];
                outs[j] = out + row * n_out;
            }
            for (int64_t b = 0; b < blocks; b++) block_lanes(t, xt.data(), outs, lanes, n_out, b);
        }
    });
}

// The terms of one layer from a plan: terms [k, layers, 4] holds, per distinct delta and layer, the addresses of
// its start, row, col and values arrays (0: no entries in that layer; the caller keeps the tensors alive); rows
// holds k + 1 offsets into its tail, then each delta's row indices.
std::vector<Term> layer_terms(const torch::Tensor& terms, const torch::Tensor& rows, int64_t layer, int64_t n_rows) {
    TORCH_CHECK(terms.dtype() == torch::kInt64 && terms.is_contiguous() && terms.dim() == 3 && terms.size(2) == 4,
                "terms: contiguous int64 [deltas, layers, 4]");
    TORCH_CHECK(rows.dtype() == torch::kInt64 && rows.is_contiguous() && rows.dim() == 1, "rows: contiguous int64");
    const int64_t k = terms.size(0);
    TORCH_CHECK(layer >= 0 && layer < terms.size(1), "layer ", layer, " is outside the plan's ", terms.size(1));
    TORCH_CHECK(rows.numel() >= k + 1, "rows: ", k + 1, " offsets needed, got ", rows.numel());
    const int64_t* offsets = rows.data_ptr<int64_t>();
    const int64_t* indices = offsets + k + 1;
    const int64_t n_indices = rows.numel() - k - 1;
    const int64_t* addr = terms.data_ptr<int64_t>() + layer * 4;
    std::vector<Term> out;
    for (int64_t q = 0; q < k; q++, addr += terms.size(1) * 4) {
        const int64_t lo = offsets[q], hi = offsets[q + 1];
        TORCH_CHECK(0 <= lo && lo <= hi && hi <= n_indices, "rows: offsets ", lo, "..", hi, " out of order");
        if (addr[0] == 0 || lo == hi) continue;
        for (int64_t j = lo; j < hi; j++)
            TORCH_CHECK(indices[j] >= 0 && indices[j] < n_rows, "row ", indices[j], " is outside the batch of ", n_rows);
        out.push_back(Term{reinterpret_cast<const int32_t*>(addr[0]), reinterpret_cast<const uint8_t*>(addr[1]),
                           reinterpret_cast<const uint16_t*>(addr[2]), reinterpret_cast<const float*>(addr[3]),
                           indices + lo, hi - lo});
    }
    return out;
}

// A decode step of a bf16 (or fp16) model: every term's entries for block b summed in fp32 per batch row, then each
// touched output rounded once into the model's dtype, as the fp32 conversion path did, without converting x and
// out to fp32 tensors in every layer (two tensors and an add, ~40% of a bf16 mixed step's corrections).
template <typename T>
void block_half(const std::vector<Term>& terms, const T* x, T* out, int64_t n_rows, int64_t n_in, int64_t n_out,
                int64_t b, std::vector<float>& acc, std::vector<uint8_t>& touched) {
    std::fill(touched.begin(), touched.end(), 0);
    for (const Term& t : terms) {
        for (int64_t j = 0; j < t.m; j++) {
            const int64_t row = t.rows[j];
            float* a = acc.data() + row * kBlock;
            if (!touched[row]) std::fill(a, a + kBlock, 0.0f), touched[row] = 1;
            const T* xr = x + row * n_in;
            const int32_t end = t.start[b + 1];
            for (int32_t k = t.start[b]; k < end; k++) a[t.row[k]] += t.val[k] * static_cast<float>(xr[t.col[k]]);
        }
    }
    const int64_t n = std::min(kBlock, n_out - b * kBlock);
    for (int64_t row = 0; row < n_rows; row++) {
        if (!touched[row]) continue;
        const float* a = acc.data() + row * kBlock;
        T* o = out + row * n_out + b * kBlock;
        for (int64_t r = 0; r < n; r++) o[r] = static_cast<T>(static_cast<float>(o[r]) + a[r]);
    }
}

template <typename T>
void run_half(const std::vector<Term>& terms, const T* x, T* out, int64_t n_rows, int64_t n_in, int64_t n_out) {
    pybind11::gil_scoped_release no_gil;
    at::parallel_for(0, (n_out + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
        std::vector<float> acc(n_rows * kBlock);
        std::vector<uint8_t> touched(n_rows);
        for (int64_t b = b0; b < b1; b++) block_half<T>(terms, x, out, n_rows, n_in, n_out, b, acc, touched);
    });
}

void run_terms(const std::vector<Term>& terms, const float* xp, float* op, int64_t tokens, int64_t n_in,
               int64_t n_out) {
    pybind11::gil_scoped_release no_gil;  // a streaming server's event loop runs meanwhile
    if (tokens > 1) {
        for (const Term& t : terms) run_tokens(t, xp, op, tokens, n_in, n_out);
        return;
    }
    at::parallel_for(0, (n_out + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
        for (const Term& t : terms)  // a term's blocks in turn: one long run through its arrays
            for (int64_t b = b0; b < b1; b++) apply_term(t, xp, op, n_in, n_out, b);
    });
}

}  // namespace

// One layer of a plan (see layer_terms) over x: [rows, tokens, n_in] or [rows, n_in] into out likewise with n_out
// (a decode step has one token per row, a prefill many); sums run in fp32 and are rounded into out's dtype.
void correct(const torch::Tensor& terms, const torch::Tensor& rows, int64_t layer, const torch::Tensor& x,
             torch::Tensor& out) {
    const int64_t n_rows = x.size(0), n_in = x.size(-1), n_out = out.size(-1);
    const int64_t tokens = x.dim() == 3 ? x.size(1) : 1;
    TORCH_CHECK((x.dim() == 2 || x.dim() == 3) && out.sizes().size() == x.sizes().size() && out.size(0) == n_rows &&
                    (x.dim() == 2 || out.size(1) == tokens),
                "inputs ", x.sizes(), " and outputs ", out.sizes(), " do not match: [rows, (tokens,) features] each");
    const std::vector<Term> found = layer_terms(terms, rows, layer, n_rows);
    if (found.empty() || tokens == 0) return;
    const bool same = x.scalar_type() == out.scalar_type() && x.is_contiguous() && out.is_contiguous();
    if (tokens == 1 && same && x.scalar_type() == torch::kBFloat16) {
        run_half(found, x.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), n_rows, n_in, n_out);
        return;
    }
    if (tokens == 1 && same && x.scalar_type() == torch::kHalf) {
        run_half(found, x.data_ptr<at::Half>(), out.data_ptr<at::Half>(), n_rows, n_in, n_out);
        return;
    }
    const bool fp32_in = x.dtype() == torch::kFloat32 && x.is_contiguous();
    const bool fp32_out = out.dtype() == torch::kFloat32 && out.is_contiguous();
    if (fp32_in && fp32_out) {  // the common case: no tensor made (~1 us each, 210 layers a step)
        run_terms(found, x.data_ptr<float>(), out.data_ptr<float>(), tokens, n_in, n_out);
        return;
    }
    const torch::Tensor xs = fp32_in ? x : x.to(torch::kFloat32).contiguous();
    torch::Tensor ys = fp32_out ? out : torch::zeros(out.sizes(), xs.options());
    run_terms(found, xs.data_ptr<float>(), ys.data_ptr<float>(), tokens, n_in, n_out);
    if (!fp32_out) out.add_(ys);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("correct", &correct, "out[r] += delta @ x[r] for each delta of the plan and its rows, in one layer");
    m.attr("block") = kBlock;
}

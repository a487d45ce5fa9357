// Guest-row corrections for one decode step of one Linear layer, on the CPU.
//
// out[r] += delta @ x[r] for every term (a set's sparse delta for this layer) and each row r the term applies
// to. A term's entries are read once for all its rows, so rows that share a set share the memory traffic, and
// the column indices are uint16 (6 bytes per entry, not 8). MKL's CSR product reads every row's copy of the
// entries with int32 columns, which is why this runs the same step's corrections in about half the time.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace {

struct Term {
    const int32_t* crow;  // [n_out + 1]
    const uint16_t* col;  // [nnz], columns of the layer's input
    const float* val;     // [nnz]
    std::vector<int64_t> rows;
};

// M rows of one term at once: each entry is loaded once and used M times.
template <int M>
void rows_block(const Term& t, const int64_t* rows, const float* x, float* out, int64_t n_in, int64_t n_out,
                int64_t i0, int64_t i1) {
    const float* xs[M];
    float* os[M];
    for (int j = 0; j < M; j++) {
        xs[j] = x + rows[j] * n_in;
        os[j] = out + rows[j] * n_out;
    }
    for (int64_t i = i0; i < i1; i++) {
        float acc[M] = {0};
        for (int32_t k = t.crow[i]; k < t.crow[i + 1]; k++) {
            const float v = t.val[k];
            const uint16_t c = t.col[k];
            for (int j = 0; j < M; j++) acc[j] += v * xs[j][c];
        }
        for (int j = 0; j < M; j++) os[j][i] += acc[j];
    }
}

// One row: two accumulators, so consecutive entries do not wait on each other's add.
void rows_one(const Term& t, int64_t row, const float* x, float* out, int64_t n_in, int64_t n_out, int64_t i0,
              int64_t i1) {
    const float* xr = x + row * n_in;
    float* o = out + row * n_out;
    for (int64_t i = i0; i < i1; i++) {
        int32_t k = t.crow[i];
        const int32_t end = t.crow[i + 1];
        float a0 = 0.f, a1 = 0.f;
        for (; k + 1 < end; k += 2) {
            a0 += t.val[k] * xr[t.col[k]];
            a1 += t.val[k + 1] * xr[t.col[k + 1]];
        }
        if (k < end) a0 += t.val[k] * xr[t.col[k]];
        o[i] += a0 + a1;
    }
}

void apply_term(const Term& t, const float* x, float* out, int64_t n_in, int64_t n_out, int64_t i0, int64_t i1) {
    const int64_t* rows = t.rows.data();
    int64_t left = static_cast<int64_t>(t.rows.size());
    for (; left >= 8; left -= 8, rows += 8) rows_block<8>(t, rows, x, out, n_in, n_out, i0, i1);
    if (left >= 4) {
        rows_block<4>(t, rows, x, out, n_in, n_out, i0, i1);
        left -= 4;
        rows += 4;
    }
    if (left == 3) rows_block<3>(t, rows, x, out, n_in, n_out, i0, i1);
    if (left == 2) rows_block<2>(t, rows, x, out, n_in, n_out, i0, i1);
    if (left == 1) rows_one(t, rows[0], x, out, n_in, n_out, i0, i1);
}

}  // namespace

// Parses the table and runs it over x [rows, n_in] into out [rows, n_out], both fp32 and contiguous.
void run_table(const torch::Tensor& table, const torch::Tensor& x, torch::Tensor& out) {
    const int64_t* p = table.data_ptr<int64_t>();
    const int64_t* end = p + table.numel();
    const int64_t n_rows = x.size(0), n_in = x.size(1), n_out = out.size(1);
    std::vector<Term> terms(table.numel() ? *p++ : 0);
    for (Term& t : terms) {
        TORCH_CHECK(p + 4 <= end, "table ends inside a term");
        t.crow = reinterpret_cast<const int32_t*>(p[0]);
        t.col = reinterpret_cast<const uint16_t*>(p[1]);
        t.val = reinterpret_cast<const float*>(p[2]);
        const int64_t m = p[3];
        p += 4;
        TORCH_CHECK(m >= 0 && p + m <= end, "table ends inside a term's rows");
        for (int64_t j = 0; j < m; j++) {
            TORCH_CHECK(p[j] >= 0 && p[j] < n_rows, "row ", p[j], " is outside the batch of ", n_rows);
            t.rows.push_back(p[j]);
        }
        p += m;
    }
    const float* xp = x.data_ptr<float>();
    float* op = out.data_ptr<float>();
    pybind11::gil_scoped_release no_gil;  // a streaming server's event loop runs meanwhile
    at::parallel_for(0, n_out, 64, [&](int64_t i0, int64_t i1) {
        for (const Term& t : terms) apply_term(t, xp, op, n_in, n_out, i0, i1);
    });
}

// table (int64): n_terms, then per term: crow, col, val (addresses of tensors the caller keeps alive), the number
// of rows m, then m row indices. x: [rows, 1, n_in] or [rows, n_in] (one token per row), out likewise with n_out;
// sums run in fp32 and are rounded into out's dtype.
void decode(const torch::Tensor& table, const torch::Tensor& x, torch::Tensor& out) {
    TORCH_CHECK(table.dtype() == torch::kInt64 && table.is_contiguous(), "table: contiguous int64");
    const int64_t rows = x.size(0), n_in = x.size(-1), n_out = out.size(-1);
    TORCH_CHECK(x.numel() == rows * n_in && out.numel() == rows * n_out && out.size(0) == rows,
                "a decode plan corrects one token per row; got inputs ", x.sizes(), " and outputs ", out.sizes());
    const torch::Tensor xs = x.reshape({rows, n_in}).to(torch::kFloat32).contiguous();
    if (out.dtype() == torch::kFloat32 && out.is_contiguous()) {
        torch::Tensor ys = out.view({rows, n_out});
        run_table(table, xs, ys);
        return;
    }
    torch::Tensor ys = torch::zeros({rows, n_out}, xs.options());
    run_table(table, xs, ys);
    out.add_(ys.view(out.sizes()));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("decode", &decode, "out[r] += delta @ x[r] for each term's rows (see guest_decode.cpp)");
}

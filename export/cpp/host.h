// The host side of attention.cpp, none of it touching CUDA: fp16 <-> fp32, the plugin's index.tsv, the test
// inputs and the attention itself on the CPU in double precision. tests/test_export_launch.py compiles these
// without a GPU and checks them against numpy's float16 and kernels.packed_attention_ref.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace host {

// IEEE binary16 from binary32, rounding to nearest even (subnormals, overflow to inf, NaN kept quiet).
inline uint16_t float_to_half(float f) {
    uint32_t x;
    std::memcpy(&x, &f, sizeof x);
    const uint16_t sign = (x >> 16) & 0x8000u;
    const uint32_t mag = x & 0x7fffffffu;
    if (mag >= 0x7f800000u) return sign | 0x7c00u | (mag > 0x7f800000u ? 0x200u : 0u);  // inf, NaN
    if (mag >= 0x477ff000u) return sign | 0x7c00u;  // 65520 and up round to inf
    if (mag < 0x38800000u) {  // below 2^-14: a multiple of 2^-24, rounded half to even by nearbyint
        float a;
        std::memcpy(&a, &mag, sizeof a);
        return sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f));
    }
    uint32_t h = ((mag >> 23) - 112u) << 10 | (mag & 0x7fffffu) >> 13;  // rebias 127 -> 15, keep 10 bits
    const uint32_t rest = mag & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right too
    return sign | static_cast<uint16_t>(h);
}

inline float half_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    if (exp == 0) {  // zero or subnormal: mant * 2^-24
        const float f = std::ldexp(static_cast<float>(mant), -24);
        return sign ? -f : f;
    }
    const uint32_t bits = sign | (exp == 31 ? 0x7f800000u : (exp + 112u) << 23) | mant << 13;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// One row of DIR/index.tsv (python -m export plugin): what launching that cubin needs.
struct Variant {
    std::string cubin, kernel_name;
    int threads_per_block = 0, shared_bytes = 0, block_m = 0;
};

// The variant for arch ("sm_90"), dtype, heads and head_dim; false with a one-line *error when there is none.
inline bool find_variant(const std::string& dir, const std::string& arch, const std::string& dtype, int heads,
                         int head_dim, Variant* out, std::string* error) {
    const std::string path = dir + "/index.tsv";
    std::ifstream in(path);
    if (!in) {
        *error = "cannot read " + path + ": build it with `python -m export plugin --out " + dir + "`";
        return false;
    }
    auto split = [](const std::string& line) {
        std::vector<std::string> cells;
        std::stringstream s(line);
        for (std::string cell; std::getline(s, cell, '\t');) cells.push_back(cell);
        return cells;
    };
    std::string line;
    std::getline(in, line);
    std::map<std::string, size_t> col;
    const std::vector<std::string> header = split(line);
    for (size_t i = 0; i < header.size(); ++i) col[header[i]] = i;
    for (const char* name : {"arch", "dtype", "heads", "head_dim", "cubin", "kernel_name", "threads_per_block",
                             "shared_bytes", "block_m"}) {
        if (!col.count(name)) {
            *error = path + " has no column " + name + " (header: " + line + ")";
            return false;
        }
    }
    std::string have;
    for (int n = 2; std::getline(in, line); ++n) {
        if (line.empty()) continue;
        const std::vector<std::string> c = split(line);
        if (c.size() != header.size()) {
            *error = path + " line " + std::to_string(n) + " has " + std::to_string(c.size()) + " cells, the header " +
                     std::to_string(header.size());
            return false;
        }
        const std::string got = c[col["arch"]] + " " + c[col["dtype"]] + " h" + c[col["heads"]] + " d" +
                                c[col["head_dim"]];
        have += (have.empty() ? "" : ", ") + got;
        if (got == arch + " " + dtype + " h" + std::to_string(heads) + " d" + std::to_string(head_dim)) {
            *out = {c[col["cubin"]], c[col["kernel_name"]], std::stoi(c[col["threads_per_block"]]),
                    std::stoi(c[col["shared_bytes"]]), std::stoi(c[col["block_m"]])};
            return true;
        }
    }
    *error = "no variant for " + arch + " " + dtype + " heads=" + std::to_string(heads) + " head_dim=" +
             std::to_string(head_dim) + " in " + path + "; it has: " + (have.empty() ? "nothing" : have);
    return false;
}

struct Shape {
    int batch, lq, heads, head_dim, lt, li;
    int width() const { return heads * head_dim; }  // elements per token of every packed (B, L, H*D) tensor
};

// The kernel's inputs as the GPU sees them (already rounded to fp16 when `half`); scale is (B,) fp32.
struct Inputs {
    std::vector<float> q, k, v, k_ip, v_ip, scale;
};

// Deterministic values in [-2, 2); batch row b gets the adapter scale `scale / (b + 1)`, so each row differs.
inline Inputs make_inputs(const Shape& s, float scale, bool half, uint64_t seed) {
    uint64_t state = seed * 0x9e3779b97f4a7c15ull + 1;
    auto fill = [&](int tokens) {
        std::vector<float> t(static_cast<size_t>(s.batch) * tokens * s.width());
        for (float& x : t) {
            state = state * 6364136223846793005ull + 1442695040888963407ull;  // 64-bit LCG, top 24 bits used
            x = static_cast<float>(state >> 40) * (4.0f / 16777216.0f) - 2.0f;
            if (half) x = half_to_float(float_to_half(x));
        }
        return t;
    };
    Inputs in{fill(s.lq), fill(s.lt), fill(s.lt), fill(s.li), fill(s.li), {}};
    for (int b = 0; b < s.batch; ++b) in.scale.push_back(scale / static_cast<float>(b + 1));
    return in;
}

// acc += w * softmax(q k^T / sqrt(D)) v over n keys of one head; rows are `width` apart.
inline void attend(const float* q, const float* k, const float* v, int n, int width, int d, double w, double* acc) {
    std::vector<double> p(n);
    double top = -INFINITY, sum = 0.0;
    for (int j = 0; j < n; ++j) {
        double dot = 0.0;
        for (int e = 0; e < d; ++e) dot += static_cast<double>(q[e]) * k[static_cast<size_t>(j) * width + e];
        p[j] = dot / std::sqrt(static_cast<double>(d));
        top = std::max(top, p[j]);
    }
    for (int j = 0; j < n; ++j) sum += p[j] = std::exp(p[j] - top);
    for (int j = 0; j < n; ++j)
        for (int e = 0; e < d; ++e) acc[e] += w * p[j] / sum * v[static_cast<size_t>(j) * width + e];
}

// out (B, Lq, H*D) = per head softmax(q k^T / sqrt(D)) v + scale[b] softmax(q k_ip^T / sqrt(D)) v_ip
inline std::vector<double> attention(const Shape& s, const Inputs& in) {
    const int w = s.width(), d = s.head_dim;
    std::vector<double> out(static_cast<size_t>(s.batch) * s.lq * w, 0.0);
    for (int b = 0; b < s.batch; ++b)
        for (int h = 0; h < s.heads; ++h)
            for (int i = 0; i < s.lq; ++i) {
                const size_t row = (static_cast<size_t>(b) * s.lq + i) * w + static_cast<size_t>(h) * d;
                const size_t text = (static_cast<size_t>(b) * s.lt) * w + h * d;
                const size_t ip = (static_cast<size_t>(b) * s.li) * w + h * d;
                attend(&in.q[row], &in.k[text], &in.v[text], s.lt, w, d, 1.0, &out[row]);
                attend(&in.q[row], &in.k_ip[ip], &in.v_ip[ip], s.li, w, d, in.scale[b], &out[row]);
            }
    return out;
}

}  // namespace host

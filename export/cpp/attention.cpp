// attention: the TensorRT plugin's packed decoupled attention run from its cubin (python -m export plugin) with
// the CUDA driver API alone, no Python and no Triton, and checked against the same maths on the CPU in double
// precision. Exit 0: within tolerance; 1: too far off, or a CUDA error (named); 2: bad arguments or no variant.
#include <cuda.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <string>
#include <vector>

#include "host.h"

namespace {

const char kUsage[] =
    "usage: attention PLUGIN_DIR [--dtype float16|float32] [--batch 2] [--lq 4096] [--head-dim 40] [--heads 8]\n"
    "                 [--lt 77] [--li 16] [--scale 0.7]\n"
    "Runs the plugin's cubin for this GPU at that shape (batch row b gets the adapter scale SCALE / (b + 1))\n"
    "and compares it with the CPU in double precision.\n";

void check(CUresult r, const char* call) {
    if (r == CUDA_SUCCESS) return;
    const char* name = nullptr;
    if (cuGetErrorName(r, &name) != CUDA_SUCCESS) name = "an unknown CUresult";
    std::fprintf(stderr, "attention: %s failed: %s (%d)\n", call, name, static_cast<int>(r));
    std::exit(1);
}
#define CU(call) check((call), #call)

[[noreturn]] void usage_error(const std::string& message) {
    std::fprintf(stderr, "attention: %s\n%s", message.c_str(), kUsage);
    std::exit(2);
}

struct Options {
    std::string dir, dtype = "float16";
    host::Shape shape{2, 4096, 8, 40, 77, 16};
    float scale = 0.7f;
};

Options parse(int argc, char** argv) {
    Options o;
    host::Shape& s = o.shape;
    const std::map<std::string, int*> sizes = {{"--batch", &s.batch}, {"--lq", &s.lq}, {"--head-dim", &s.head_dim},
                                               {"--heads", &s.heads}, {"--lt", &s.lt}, {"--li", &s.li}};
    for (int i = 1; i < argc; ++i) {
        const std::string opt = argv[i];
        if (opt == "-h" || opt == "--help") {
            std::fputs(kUsage, stdout);
            std::exit(0);
        }
        if (opt.rfind("--", 0) != 0) {
            if (!o.dir.empty()) usage_error("one PLUGIN_DIR, got " + o.dir + " and " + opt);
            o.dir = opt;
            continue;
        }
        if (i + 1 == argc) usage_error(opt + " needs a value");
        const std::string value = argv[++i];
        size_t used = 0;
        try {
            if (opt == "--dtype") {
                if (value != "float16" && value != "float32") usage_error("--dtype is float16 or float32: " + value);
                o.dtype = value;
                used = value.size();
            } else if (opt == "--scale") {
                o.scale = std::stof(value, &used);
            } else if (sizes.count(opt)) {
                const int n = std::stoi(value, &used);
                if (n < 1) usage_error(opt + " must be at least 1, got " + value);
                *sizes.at(opt) = n;
            } else {
                usage_error("unknown option " + opt);
            }
        } catch (const std::exception&) {
            used = 0;
        }
        if (used != value.size()) usage_error(opt + " wants a number, got " + value);
    }
    if (o.dir.empty()) usage_error("PLUGIN_DIR is missing");
    return o;
}

// The launch passes 12 parameters, the index's order: Q K V KI VI Scale (pointers), Lq Lt Li (int32), Out, then
// Triton's global and profile scratch pointers (null). A cubin that takes anything else must not be launched.
void check_parameters(CUfunction fn, const std::string& cubin) {
#if CUDA_VERSION >= 12040
    const size_t bytes[12] = {8, 8, 8, 8, 8, 8, 4, 4, 4, 8, 8, 8};
    for (size_t i = 0; i < 12; ++i) {
        size_t offset = 0, size = 0;
        CU(cuFuncGetParamInfo(fn, i, &offset, &size));
        if (size != bytes[i]) {
            std::fprintf(stderr, "attention: %s: parameter %zu is %zu bytes, this program passes %zu\n", cubin.c_str(),
                         i, size, bytes[i]);
            std::exit(1);
        }
    }
    size_t offset = 0;
    if (cuFuncGetParamInfo(fn, 12, &offset, nullptr) == CUDA_SUCCESS) {
        std::fprintf(stderr, "attention: %s takes more than the 12 parameters this program passes\n", cubin.c_str());
        std::exit(1);
    }
#else
    (void)fn, (void)cubin;  // cuFuncGetParamInfo came with CUDA 12.4
#endif
}

// A device copy of x, in fp16 when `half`.
CUdeviceptr upload(const std::vector<float>& x, bool half) {
    CUdeviceptr p = 0;
    if (half) {
        std::vector<uint16_t> h(x.size());
        for (size_t i = 0; i < x.size(); ++i) h[i] = host::float_to_half(x[i]);
        CU(cuMemAlloc(&p, h.size() * sizeof(uint16_t)));
        CU(cuMemcpyHtoD(p, h.data(), h.size() * sizeof(uint16_t)));
    } else {
        CU(cuMemAlloc(&p, x.size() * sizeof(float)));
        CU(cuMemcpyHtoD(p, x.data(), x.size() * sizeof(float)));
    }
    return p;
}

std::vector<float> download(CUdeviceptr p, size_t n, bool half) {
    std::vector<float> x(n);
    if (half) {
        std::vector<uint16_t> h(n);
        CU(cuMemcpyDtoH(h.data(), p, n * sizeof(uint16_t)));
        for (size_t i = 0; i < n; ++i) x[i] = host::half_to_float(h[i]);
    } else {
        CU(cuMemcpyDtoH(x.data(), p, n * sizeof(float)));
    }
    return x;
}

}  // namespace

int main(int argc, char** argv) {
    const Options o = parse(argc, argv);
    const host::Shape& s = o.shape;
    const bool half = o.dtype == "float16";

    CU(cuInit(0));
    CUdevice dev;
    CU(cuDeviceGet(&dev, 0));
    int major = 0, minor = 0;
    CU(cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev));
    CU(cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev));
    const std::string arch = "sm_" + std::to_string(major) + std::to_string(minor);
    host::Variant var;
    std::string error;
    if (!host::find_variant(o.dir, arch, o.dtype, s.heads, s.head_dim, &var, &error)) {
        std::fprintf(stderr, "attention: %s\n", error.c_str());
        return 2;
    }

    CUcontext ctx;
    CU(cuDevicePrimaryCtxRetain(&ctx, dev));
    CU(cuCtxSetCurrent(ctx));
    CUmodule mod;
    CU(cuModuleLoad(&mod, (o.dir + "/" + var.cubin).c_str()));
    CUfunction fn;
    CU(cuModuleGetFunction(&fn, mod, var.kernel_name.c_str()));
    check_parameters(fn, var.cubin);
    if (var.shared_bytes > 48 * 1024)  // past 48 KiB of dynamic shared memory a kernel must opt in
        CU(cuFuncSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, var.shared_bytes));

    const host::Inputs in = host::make_inputs(s, o.scale, half, 1);
    CUdeviceptr q = upload(in.q, half), k = upload(in.k, half), v = upload(in.v, half);
    CUdeviceptr k_ip = upload(in.k_ip, half), v_ip = upload(in.v_ip, half), scale = upload(in.scale, false);
    CUdeviceptr out = 0, null = 0;
    CU(cuMemAlloc(&out, in.q.size() * (half ? sizeof(uint16_t) : sizeof(float))));
    int lq = s.lq, lt = s.lt, li = s.li;
    void* params[] = {&q, &k, &v, &k_ip, &v_ip, &scale, &lq, &lt, &li, &out, &null, &null};

    CUstream stream;
    CU(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING));
    const unsigned grid_x = (s.lq + var.block_m - 1) / var.block_m, grid_y = s.batch * s.heads;
    auto launch = [&] {
        CU(cuLaunchKernel(fn, grid_x, grid_y, 1, var.threads_per_block, 1, 1, var.shared_bytes, stream, params,
                          nullptr));
    };
    launch();
    CU(cuStreamSynchronize(stream));
    const std::vector<float> got = download(out, in.q.size(), half);

    const int reps = 20;
    CUevent start, stop;
    CU(cuEventCreate(&start, CU_EVENT_DEFAULT));
    CU(cuEventCreate(&stop, CU_EVENT_DEFAULT));
    CU(cuEventRecord(start, stream));
    for (int r = 0; r < reps; ++r) launch();
    CU(cuEventRecord(stop, stream));
    CU(cuEventSynchronize(stop));
    float ms = 0.0f;
    CU(cuEventElapsedTime(&ms, start, stop));

    const std::vector<double> want = host::attention(s, in);
    double diff = 0.0;
    size_t nans = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        if (std::isnan(got[i])) ++nans;
        else diff = std::max(diff, std::fabs(got[i] - want[i]));
    }
    const double tol = half ? 2e-2 : 1e-4;
    const bool ok = nans == 0 && diff <= tol;
    std::printf("%s %s B=%d Lq=%d H=%d D=%d Lt=%d Li=%d: %s, grid %ux%u, %d threads, %d B shared\n", arch.c_str(),
                o.dtype.c_str(), s.batch, s.lq, s.heads, s.head_dim, s.lt, s.li, var.cubin.c_str(), grid_x, grid_y,
                var.threads_per_block, var.shared_bytes);
    std::printf("max abs diff vs the CPU in double: %.3g (tolerance %.0e), NaNs: %zu\n", diff, tol, nans);
    std::printf("kernel time: %.4f ms (cuEvent, mean of %d launches)\n", ms / reps, reps);
    std::printf("%s\n", ok ? "OK" : "FAILED");

    for (CUdeviceptr p : {q, k, v, k_ip, v_ip, scale, out}) CU(cuMemFree(p));
    CU(cuEventDestroy(start));
    CU(cuEventDestroy(stop));
    CU(cuStreamDestroy(stream));
    CU(cuModuleUnload(mod));
    CU(cuDevicePrimaryCtxRelease(dev));
    return ok ? 0 : 1;
}

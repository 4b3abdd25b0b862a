// unet_bench: times one UNet engine (`python -m export trt`, unet.plan) with TensorRT's C++ runtime alone: no Python,
// no PyTorch. Input names, types and shapes come from the engine; every dynamic size is the batch (first axis), the
// latent height/width (last two axes of a rank-4 input) or else the profile's opt value. Prints ms/step (cuEvent,
// mean of --steps enqueueV3 after --warmup). Exit 0 on success, 1 on any failure with one line on stderr.
// Built for TensorRT for RTX (make TRT=rtx, the default) or the full TensorRT 10.x/11.x (make TRT=full, which defines
// UNET_BENCH_TRT_FULL); a plan deserialises only in the TensorRT that built it.
#include <NvInferRuntime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "driver.h"
#include "host.h"

using namespace nvinfer1;

namespace {

const char kUsage[] =
    "usage: unet_bench PLAN [--plugin LIB] [--batch B] [--height PX --width PX] [--vae-factor 8]\n"
    "                  [--latent-height H --latent-width W] [--warmup 3] [--steps 20] [--verbose]\n"
    "Times enqueueV3 of a UNet engine. LIB (libipadapter_instruct_plugin.so) is loaded into TensorRT's plugin\n"
    "registry first; without --plugin the engine must carry it (plugins_to_serialize). The plugin reads its cubins\n"
    "from $IPADAPTER_INSTRUCT_PLUGIN_DIR (`python -m export plugin --out DIR`). Sizes default to the profile's opt.\n"
    "PLAN must come from the TensorRT this program was built for (make unet_bench TRT=rtx|full).\n";

#ifdef UNET_BENCH_TRT_FULL
constexpr char kTensorRT[] = "TensorRT", kOther[] = "rtx";
#else
constexpr char kTensorRT[] = "TensorRT for RTX", kOther[] = "full";
#endif

[[noreturn]] void die(const std::string& message) {
    std::fprintf(stderr, "unet_bench: %s\n", message.c_str());
    std::exit(1);
}

void check(const driver::Api& cu, CUresult r, const char* call) {
    if (r != CUDA_SUCCESS) die(driver::describe(cu, r, call));
}
#define CU(call) check(*cu, cu->call, #call)

std::string version_text(int32_t v) {
    return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100);
}

// The TensorRT library this program runs ("TensorRT 10.13.0"). The full TensorRT's must be the major version of the
// headers it was compiled with: their inline wrappers call into the library's own tables.
std::string library() {
    const int32_t v = getInferLibVersion();
#ifdef UNET_BENCH_TRT_FULL
    if (v / 10000 != NV_TENSORRT_MAJOR)
        die("compiled against the TensorRT " + std::to_string(NV_TENSORRT_MAJOR) + "." +
            std::to_string(NV_TENSORRT_MINOR) + " headers, running libnvinfer " + version_text(v) +
            ": rebuild with that TensorRT's own include/ (make unet_bench TRT=full TRT_INCLUDE_DIR=...)");
#endif
    return std::string(kTensorRT) + " " + version_text(v);
}

struct Logger : ILogger {
    Severity shown = Severity::kWARNING;
    void log(Severity severity, AsciiChar const* msg) noexcept override {
        if (severity <= shown) std::fprintf(stderr, "[TensorRT] %s\n", msg);
    }
};

struct Options {
    std::string plan, plugin;
    int batch = 0, height = 0, width = 0, latent_height = 0, latent_width = 0, vae_factor = 8, warmup = 3, steps = 20;
    bool verbose = false;
};

Options parse(int argc, char** argv) {
    Options o;
    const std::map<std::string, int*> ints = {
        {"--batch", &o.batch}, {"--height", &o.height}, {"--width", &o.width}, {"--latent-height", &o.latent_height},
        {"--latent-width", &o.latent_width}, {"--vae-factor", &o.vae_factor}, {"--warmup", &o.warmup},
        {"--steps", &o.steps}};
    for (int i = 1; i < argc; ++i) {
        const std::string opt = argv[i];
        if (opt == "-h" || opt == "--help") {
            std::fputs(kUsage, stdout);
            std::exit(0);
        }
        if (opt == "--verbose") {
            o.verbose = true;
        } else if (opt.rfind("--", 0) != 0) {
            if (!o.plan.empty()) die("one PLAN, got " + o.plan + " and " + opt);
            o.plan = opt;
        } else if (i + 1 == argc) {
            die(opt + " needs a value");
        } else if (opt == "--plugin") {
            o.plugin = argv[++i];
        } else if (ints.count(opt)) {
            const std::string value = argv[++i];
            char* end = nullptr;
            const long n = std::strtol(value.c_str(), &end, 10);
            if (value.empty() || *end || n < (opt == "--warmup" ? 0 : 1) || n > 1 << 20)
                die(opt + " wants a positive integer, got " + value);
            *ints.at(opt) = static_cast<int>(n);
        } else {
            die("unknown option " + opt + " (--help lists them)");
        }
    }
    if (o.plan.empty()) die("PLAN is missing (--help for usage)");
    if ((o.height > 0) != (o.width > 0)) die("give --height and --width together");
    if ((o.latent_height > 0) != (o.latent_width > 0)) die("give --latent-height and --latent-width together");
    return o;
}

std::string dims_text(const Dims& d) {
    std::string s;
    for (int32_t i = 0; i < d.nbDims; ++i) s += (i ? "x" : "") + std::to_string(d.d[i]);
    return s.empty() ? "scalar" : s;
}

size_t element_bytes(DataType t, const char* name) {
    switch (t) {
        case DataType::kFLOAT: case DataType::kINT32: return 4;
        case DataType::kHALF: return 2;
        case DataType::kINT64: return 8;
        default: die(std::string(name) + " has a data type (" + std::to_string(static_cast<int>(t)) +
                     ") this program does not fill; it handles float32, float16, int32 and int64");
    }
}

// Deterministic bytes for one input: the timestep 500, the adapter scale 0.8, anything else in [-1, 1).
std::vector<unsigned char> fill(const std::string& name, DataType t, size_t n, uint64_t seed) {
    std::vector<unsigned char> bytes(n * element_bytes(t, name.c_str()));
    uint64_t state = seed * 0x9e3779b97f4a7c15ull + 1;
    for (size_t i = 0; i < n; ++i) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        float x = static_cast<float>(state >> 40) * (2.0f / 16777216.0f) - 1.0f;
        if (name == "timestep") x = 500.0f;
        if (name == "ip_scale") x = 0.8f;
        if (t == DataType::kFLOAT) std::memcpy(&bytes[i * 4], &x, 4);
        if (t == DataType::kHALF) {
            const uint16_t h = host::float_to_half(x);
            std::memcpy(&bytes[i * 2], &h, 2);
        }
        if (t == DataType::kINT32) {
            const int32_t v = static_cast<int32_t>(std::lround(x));
            std::memcpy(&bytes[i * 4], &v, 4);
        }
        if (t == DataType::kINT64) {
            const int64_t v = std::lround(x);
            std::memcpy(&bytes[i * 8], &v, 8);
        }
    }
    return bytes;
}

int64_t volume(const Dims& d) {
    int64_t n = 1;
    for (int32_t i = 0; i < d.nbDims; ++i) n *= d.d[i];
    return n;
}

}  // namespace

int main(int argc, char** argv) {
    const Options o = parse(argc, argv);
    std::string error;
    const driver::Api* cu = driver::api(&error);
    if (!cu) die(error);
    CUdevice dev;
    CU(cuDeviceGet(&dev, 0));
    CUcontext ctx;
    CU(cuDevicePrimaryCtxRetain(&ctx, dev));  // the context TensorRT's runtime API calls will use too
    CU(cuCtxSetCurrent(ctx));
    char gpu[256] = {0};
    CU(cuDeviceGetName(gpu, sizeof gpu, dev));
    if (!cu->cuEventElapsedTime) die("this CUDA driver has no cuEventElapsedTime_v2 (needs 12.8 or newer)");

    Logger logger;
    if (o.verbose) logger.shown = ILogger::Severity::kVERBOSE;
    const std::string trt = library();
    std::unique_ptr<IRuntime> runtime(createInferRuntime(logger));
    if (!runtime) die("createInferRuntime failed (TensorRT's log above says why)");
    if (!o.plugin.empty()) {
        if (!runtime->getPluginRegistry().loadLibrary(o.plugin.c_str()))
            die("cannot load the plugin library " + o.plugin + " (TensorRT's log above says why)");
    } else {
        runtime->setEngineHostCodeAllowed(true);  // the engine's own copy of the plugin library (plugins_to_serialize)
    }
    std::ifstream file(o.plan, std::ios::binary);
    if (!file) die("cannot read " + o.plan);
    const std::vector<char> plan((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    std::unique_ptr<ICudaEngine> engine(runtime->deserializeCudaEngine(plan.data(), plan.size()));
    if (!engine)
        die("cannot deserialize " + o.plan + " with " + trt + " (TensorRT's log above says why; " +
            (o.plugin.empty() ? "a plugin library may be missing: --plugin LIB; " : "") +
            "a plan of the other TensorRT needs `make unet_bench TRT=" + kOther + "`)");
    std::unique_ptr<IExecutionContext> context(engine->createExecutionContext());
    if (!context) die("createExecutionContext failed (TensorRT's log above says why)");

    std::vector<CUdeviceptr> buffers;
    std::string shapes;
    const int32_t n_io = engine->getNbIOTensors();
    for (int32_t i = 0; i < n_io; ++i) {  // inputs: shape, bounds, values
        const char* name = engine->getIOTensorName(i);
        if (engine->getTensorIOMode(name) != TensorIOMode::kINPUT) continue;
        Dims d = engine->getTensorShape(name);
        const Dims opt = engine->getProfileShape(name, 0, OptProfileSelector::kOPT);
        const Dims lo = engine->getProfileShape(name, 0, OptProfileSelector::kMIN);
        const Dims hi = engine->getProfileShape(name, 0, OptProfileSelector::kMAX);
        for (int32_t a = 0; a < d.nbDims; ++a) {
            if (d.d[a] >= 0) continue;
            d.d[a] = opt.d[a];
            if (a == 0 && o.batch) d.d[a] = o.batch;
            const bool spatial = d.nbDims == 4 && a >= 2;
            const int latent = a == 2 ? o.latent_height : o.latent_width, pixels = a == 2 ? o.height : o.width;
            if (spatial && latent) d.d[a] = latent;
            if (spatial && !latent && pixels) {
                if (pixels % o.vae_factor)
                    die(std::to_string(pixels) + " pixels is not a multiple of --vae-factor " +
                        std::to_string(o.vae_factor));
                d.d[a] = pixels / o.vae_factor;
            }
            if (d.d[a] < lo.d[a] || d.d[a] > hi.d[a])
                die(std::string(name) + " " + dims_text(d) + " is outside the engine's profile: min " + dims_text(lo) +
                    ", max " + dims_text(hi) + " (rebuild with `python -m export trt --min/--max`)");
        }
        if (!context->setInputShape(name, d))
            die(std::string("setInputShape(") + name + ", " + dims_text(d) + ") failed");
        const DataType t = engine->getTensorDataType(name);
        const std::vector<unsigned char> host = fill(name, t, static_cast<size_t>(volume(d)), i + 1);
        CUdeviceptr p = 0;
        CU(cuMemAlloc(&p, host.size() ? host.size() : 1));
        if (!host.empty()) CU(cuMemcpyHtoD(p, host.data(), host.size()));
        buffers.push_back(p);
        if (!context->setTensorAddress(name, reinterpret_cast<void*>(p)))
            die(std::string("setTensorAddress(") + name + ") failed");
        shapes += std::string(shapes.empty() ? "" : ", ") + name + " " + dims_text(d);
    }
    if (!context->allInputDimensionsSpecified()) die("the engine has inputs this program did not give a shape");
    struct Output {
        const char* name;
        DataType type;
        size_t n;
        CUdeviceptr p;
    };
    std::vector<Output> outputs;
    for (int32_t i = 0; i < n_io; ++i) {
        const char* name = engine->getIOTensorName(i);
        if (engine->getTensorIOMode(name) != TensorIOMode::kOUTPUT) continue;
        const Dims d = context->getTensorShape(name);
        if (volume(d) < 0) die(std::string("TensorRT could not infer the shape of output ") + name);
        const DataType t = engine->getTensorDataType(name);
        Output out{name, t, static_cast<size_t>(volume(d)), 0};
        CU(cuMemAlloc(&out.p, out.n ? out.n * element_bytes(t, name) : 1));
        if (!context->setTensorAddress(name, reinterpret_cast<void*>(out.p)))
            die(std::string("setTensorAddress(") + name + ") failed");
        buffers.push_back(out.p);
        outputs.push_back(out);
        shapes += std::string(" -> ") + name + " " + dims_text(d);
    }

    CUstream stream;
    CU(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING));
    auto step = [&] {
        if (!context->enqueueV3(reinterpret_cast<cudaStream_t>(stream)))
            die("enqueueV3 failed (TensorRT's log above says why)");
    };
    for (int i = 0; i < o.warmup; ++i) step();
    CU(cuStreamSynchronize(stream));
    CUevent start, stop;
    CU(cuEventCreate(&start, CU_EVENT_DEFAULT));
    CU(cuEventCreate(&stop, CU_EVENT_DEFAULT));
    CU(cuEventRecord(start, stream));
    for (int i = 0; i < o.steps; ++i) step();
    CU(cuEventRecord(stop, stream));
    CU(cuEventSynchronize(stop));
    float ms = 0.0f;
    CU(cuEventElapsedTime(&ms, start, stop));

    // a timing of garbage is no timing: every output value must be finite
    for (const Output& out : outputs) {
        if (out.type != DataType::kFLOAT && out.type != DataType::kHALF) continue;
        const size_t bytes = element_bytes(out.type, out.name);
        std::vector<unsigned char> h(out.n * bytes);
        if (!h.empty()) CU(cuMemcpyDtoH(h.data(), out.p, h.size()));
        size_t bad = 0;
        for (size_t i = 0; i < out.n; ++i) {
            float x;
            if (out.type == DataType::kFLOAT) {
                std::memcpy(&x, &h[i * 4], 4);
            } else {
                uint16_t v;
                std::memcpy(&v, &h[i * 2], 2);
                x = host::half_to_float(v);
            }
            bad += !std::isfinite(x);
        }
        if (bad) die(std::string(out.name) + " has " + std::to_string(bad) + " non-finite values of " +
                     std::to_string(out.n));
    }

    std::printf("%s on %s with %s: %s\n", o.plan.c_str(), gpu, trt.c_str(), shapes.c_str());
    std::printf("%.3f ms/step (cuEvent, mean of %d enqueueV3 after %d warm-up)\n", ms / o.steps, o.steps, o.warmup);
    for (CUdeviceptr p : buffers) CU(cuMemFree(p));
    CU(cuEventDestroy(start));
    CU(cuEventDestroy(stop));
    CU(cuStreamDestroy(stream));
    context.reset();
    engine.reset();
    runtime.reset();
    CU(cuDevicePrimaryCtxRelease(dev));
    return 0;
}

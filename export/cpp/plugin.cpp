// libipadapter_instruct_plugin.so: ipadapter_instruct::DecoupledAttention version 1 as a C++ IPluginV3 for TensorRT
// and TensorRT-RTX, the node `python -m export onnx` writes (docs/export-tensorrt-cpp.md). Its enqueue launches the cubin that
// `python -m export plugin` compiled for this GPU, found through $IPADAPTER_INSTRUCT_PLUGIN_DIR/index.tsv:
//   out (B, Lq, H*D) = per head softmax(q k^T / sqrt(D)) v + ip_scale[b] * softmax(q k_ip^T / sqrt(D)) v_ip
// TensorRT's loader (IPluginRegistry::loadLibrary, plugins_to_serialize) calls the exported getCreators.
#include <NvInferRuntime.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "driver.h"
#include "host.h"

using namespace nvinfer1;

namespace {

constexpr char kName[] = "DecoupledAttention", kVersion[] = "1", kNamespace[] = "ipadapter_instruct";
constexpr char kDirVariable[] = "IPADAPTER_INSTRUCT_PLUGIN_DIR";
constexpr int kInputs = 6, kScale = 5;  // q, k, v, k_ip, v_ip, ip_scale -> out
const char* const kTensors[] = {"q", "k", "v", "k_ip", "v_ip", "ip_scale", "out"};

std::atomic<ILoggerFinder*> gLoggerFinder{nullptr};

// TensorRT's own logger once the loader handed over its finder (setLoggerFinder), else stderr.
void log(ILogger::Severity severity, const std::string& message) {
    const std::string line = std::string(kNamespace) + "::" + kName + ": " + message;
    ILoggerFinder* finder = gLoggerFinder.load();
    if (ILogger* logger = finder ? finder->findLogger() : nullptr) {
        logger->log(severity, line.c_str());
    } else if (severity <= ILogger::Severity::kWARNING) {
        std::fprintf(stderr, "%s\n", line.c_str());
    }
}

// Logs the error and hands it to the execution context's error recorder when there is one; returns 1 for TensorRT.
int32_t fail(IErrorRecorder* recorder, ErrorCode code, const std::string& message) {
    log(ILogger::Severity::kERROR, message);
    if (recorder) recorder->reportError(code, (std::string(kNamespace) + "::" + kName + ": " + message).c_str());
    return 1;
}

std::string dims_text(const Dims& d) {
    std::string s = "(";
    for (int32_t i = 0; i < d.nbDims; ++i) s += (i ? "," : "") + std::to_string(d.d[i]);
    return s + ")";
}

// The shape rules shared by configurePlugin (where -1 stands for a dimension not known yet) and onShapeChange:
// q, k, v, k_ip, v_ip rank 3 of one width, a multiple of num_heads; ip_scale (B,); one batch size; k and v of one
// length, k_ip and v_ip of one length. Empty when they hold, else what is wrong.
std::string check_shapes(const Dims* d, int32_t heads) {
    for (int i = 0; i < kInputs; ++i) {
        const int rank = i == kScale ? 1 : 3;
        if (d[i].nbDims != rank)
            return std::string(kTensors[i]) + " must have rank " + std::to_string(rank) + ", got " + dims_text(d[i]);
    }
    auto differ = [](int64_t a, int64_t b) { return a >= 0 && b >= 0 && a != b; };
    for (int i = 1; i < kInputs; ++i) {
        if (differ(d[i].d[0], d[0].d[0]))
            return std::string("batch sizes differ: q ") + dims_text(d[0]) + ", " + kTensors[i] + " " + dims_text(d[i]);
        if (i != kScale && differ(d[i].d[2], d[0].d[2]))
            return std::string("widths differ: q ") + dims_text(d[0]) + ", " + kTensors[i] + " " + dims_text(d[i]);
    }
    if (differ(d[1].d[1], d[2].d[1])) return "k " + dims_text(d[1]) + " and v " + dims_text(d[2]) + " differ in length";
    if (differ(d[3].d[1], d[4].d[1]))
        return "k_ip " + dims_text(d[3]) + " and v_ip " + dims_text(d[4]) + " differ in length";
    if (d[0].d[2] >= 0 && d[0].d[2] % heads)
        return "width " + std::to_string(d[0].d[2]) + " is not a multiple of num_heads=" + std::to_string(heads);
    return "";
}

// One loaded cubin entry per CUDA context and variant: cuModuleLoad runs once, every later enqueue reuses it.
struct Kernel {
    CUfunction fn = nullptr;
    host::Variant variant;
};

// The kernel for this context (current on the calling thread), dtype, heads and head size; null with *error.
const Kernel* kernel_for(const driver::Api& cu, CUcontext ctx, const std::string& dtype, int heads, int head_dim,
                         std::string* error) {
    static std::mutex mutex;
    static std::map<std::tuple<CUcontext, std::string, int, int>, Kernel> cache;  // modules live as long as the process
    std::lock_guard<std::mutex> lock(mutex);
    const auto key = std::make_tuple(ctx, dtype, heads, head_dim);
    if (auto it = cache.find(key); it != cache.end()) return &it->second;

    const char* dir = std::getenv(kDirVariable);
    if (!dir || !*dir) {
        *error = std::string(kDirVariable) + " is not set: point it at a folder written by `python -m export plugin "
                 "--out DIR` (the cubins and index.tsv)";
        return nullptr;
    }
    CUdevice dev;
    int major = 0, minor = 0;
    CUresult r = cu.cuCtxGetDevice(&dev);
    if (r == CUDA_SUCCESS) r = cu.cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
    if (r == CUDA_SUCCESS) r = cu.cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev);
    if (r != CUDA_SUCCESS) {
        *error = driver::describe(cu, r, "reading the GPU's compute capability");
        return nullptr;
    }
    Kernel k;
    const std::string arch = "sm_" + std::to_string(major) + std::to_string(minor);
    if (!host::find_variant(dir, arch, dtype, heads, head_dim, &k.variant, error)) return nullptr;
    const std::string path = std::string(dir) + "/" + k.variant.cubin;
    CUmodule mod;
    if ((r = cu.cuModuleLoad(&mod, path.c_str())) != CUDA_SUCCESS) {
        *error = driver::describe(cu, r, ("cuModuleLoad(" + path + ")").c_str());
        return nullptr;
    }
    r = cu.cuModuleGetFunction(&k.fn, mod, k.variant.kernel_name.c_str());
    if (r == CUDA_SUCCESS && k.variant.shared_bytes > 48 * 1024)  // past 48 KiB of dynamic shared memory: opt in
        r = cu.cuFuncSetAttribute(k.fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, k.variant.shared_bytes);
    if (r != CUDA_SUCCESS) {
        *error = driver::describe(cu, r, (path + ": " + k.variant.kernel_name).c_str());
        return nullptr;
    }
    log(ILogger::Severity::kVERBOSE, "loaded " + path + " (" + k.variant.kernel_name + ") for " + arch);
    return &cache.emplace(key, k).first->second;
}

class DecoupledAttention final : public IPluginV3,
                                 public IPluginV3OneCore,
                                 public IPluginV3OneBuild,
                                 public IPluginV3OneRuntime {
public:
    explicit DecoupledAttention(int32_t heads) : mHeads(heads) {}

    // IPluginV3
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
        switch (type) {
            case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
            case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
            case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }
    IPluginV3* clone() noexcept override { return new (std::nothrow) DecoupledAttention(mHeads); }

    // IPluginV3OneCore
    AsciiChar const* getPluginName() const noexcept override { return kName; }
    AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
    AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override { return 1; }

    int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                               int32_t nbInputs) const noexcept override {
        if (nbInputs != kInputs || nbOutputs != 1)
            return fail(nullptr, ErrorCode::kINVALID_ARGUMENT, io_count(nbInputs, nbOutputs));
        outputTypes[0] = inputTypes[0];
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
                            int32_t nbOutputs, IExprBuilder&) noexcept override {
        if (nbInputs != kInputs || nbOutputs != 1)
            return fail(nullptr, ErrorCode::kINVALID_ARGUMENT, io_count(nbInputs, nbOutputs));
        if (inputs[0].nbDims != 3)
            return fail(nullptr, ErrorCode::kINVALID_ARGUMENT,
                        "q must be (B, Lq, H*D), got rank " + std::to_string(inputs[0].nbDims));
        outputs[0] = inputs[0];
        return 0;
    }

    // q, k, v, k_ip, v_ip and out all FLOAT or all HALF, ip_scale FLOAT; every tensor linear.
    bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override {
        if (nbInputs != kInputs || nbOutputs != 1 || pos < 0 || pos > kInputs) return false;
        const PluginTensorDesc& d = inOut[pos].desc;
        if (d.format != TensorFormat::kLINEAR) return false;
        if (pos == kScale) return d.type == DataType::kFLOAT;
        if (pos == 0) return d.type == DataType::kFLOAT || d.type == DataType::kHALF;
        return d.type == inOut[0].desc.type;
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
                            int32_t nbOutputs) noexcept override {
        if (nbInputs != kInputs || nbOutputs != 1)
            return fail(nullptr, ErrorCode::kINVALID_ARGUMENT, io_count(nbInputs, nbOutputs));
        Dims dims[kInputs];
        for (int i = 0; i < kInputs; ++i) dims[i] = in[i].desc.dims;
        const std::string wrong = check_shapes(dims, mHeads);
        return wrong.empty() ? 0 : fail(nullptr, ErrorCode::kINVALID_ARGUMENT, wrong);
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const*, int32_t, DynamicPluginTensorDesc const*,
                            int32_t) const noexcept override {
        return 0;
    }

    // IPluginV3OneRuntime
    int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*,
                          int32_t nbOutputs) noexcept override {
        if (nbInputs != kInputs || nbOutputs != 1)
            return fail(mRecorder, ErrorCode::kINVALID_ARGUMENT, io_count(nbInputs, nbOutputs));
        Dims dims[kInputs];
        for (int i = 0; i < kInputs; ++i) dims[i] = in[i].dims;
        std::string wrong = check_shapes(dims, mHeads);
        for (int i = 0; i < kInputs && wrong.empty(); ++i) {
            int64_t n = 1;
            for (int32_t j = 0; j < dims[i].nbDims; ++j) n *= dims[i].d[j];
            if (n >= (int64_t{1} << 31))  // the kernel indexes with int32
                wrong = std::string(kTensors[i]) + " " + dims_text(dims[i]) + " has 2^31 elements or more";
        }
        return wrong.empty() ? 0 : fail(mRecorder, ErrorCode::kINVALID_ARGUMENT, wrong);
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
                    void* const* outputs, void*, cudaStream_t stream) noexcept override {
        const Dims& q = inputDesc[0].dims;
        const int lq = static_cast<int>(q.d[1]), width = static_cast<int>(q.d[2]);
        const int lt = static_cast<int>(inputDesc[1].dims.d[1]), li = static_cast<int>(inputDesc[3].dims.d[1]);
        const unsigned grid_y = static_cast<unsigned>(q.d[0]) * mHeads;
        if (lq == 0 || grid_y == 0) return 0;
        std::string error;
        const driver::Api* cu = driver::api(&error);
        if (!cu) return fail(mRecorder, ErrorCode::kFAILED_EXECUTION, error);
        // the module belongs to the stream's context, which TensorRT need not have made current on this thread
        const CUstream s = reinterpret_cast<CUstream>(stream);
        CUcontext ctx = nullptr;
        CUresult r = cu->cuStreamGetCtx(s, &ctx);
        if (r == CUDA_SUCCESS) r = cu->cuCtxPushCurrent(ctx);
        if (r != CUDA_SUCCESS)
            return fail(mRecorder, ErrorCode::kFAILED_EXECUTION,
                        driver::describe(*cu, r, "making the stream's context current"));
        const std::string dtype = inputDesc[0].type == DataType::kHALF ? "float16" : "float32";
        const Kernel* k = kernel_for(*cu, ctx, dtype, mHeads, width / mHeads, &error);
        if (k) {
            // the index's order: Q K V KI VI Scale, Lq Lt Li (int32), Out, then Triton's two scratch pointers (null)
            CUdeviceptr ptr[kInputs + 1], null = 0;
            for (int i = 0; i < kInputs; ++i) ptr[i] = reinterpret_cast<CUdeviceptr>(inputs[i]);
            ptr[kInputs] = reinterpret_cast<CUdeviceptr>(outputs[0]);
            int sizes[3] = {lq, lt, li};
            void* params[] = {&ptr[0], &ptr[1], &ptr[2], &ptr[3], &ptr[4], &ptr[5], &sizes[0], &sizes[1], &sizes[2],
                              &ptr[6], &null, &null};
            const host::Variant& v = k->variant;
            const unsigned grid_x = static_cast<unsigned>((lq + v.block_m - 1) / v.block_m);
            r = cu->cuLaunchKernel(k->fn, grid_x, grid_y, 1, v.threads_per_block, 1, 1, v.shared_bytes, s, params,
                                   nullptr);
            if (r != CUDA_SUCCESS) error = driver::describe(*cu, r, ("cuLaunchKernel(" + v.cubin + ")").c_str());
        }
        cu->cuCtxPopCurrent(&ctx);
        return k && r == CUDA_SUCCESS ? 0 : fail(mRecorder, ErrorCode::kFAILED_EXECUTION, error);
    }

    IPluginV3* attachToContext(IPluginResourceContext* context) noexcept override {
        auto* p = new (std::nothrow) DecoupledAttention(mHeads);
        if (p && context) p->mRecorder = context->getErrorRecorder();
        return p;
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override {
        mField = PluginField("num_heads", &mHeads, PluginFieldType::kINT32, 1);
        mFields = {1, &mField};
        return &mFields;
    }

private:
    static std::string io_count(int32_t nbInputs, int32_t nbOutputs) {
        return "takes 6 inputs (q, k, v, k_ip, v_ip, ip_scale) and 1 output, got " + std::to_string(nbInputs) +
               " and " + std::to_string(nbOutputs);
    }

    int32_t mHeads;
    IErrorRecorder* mRecorder = nullptr;  // the execution context's, from attachToContext
    PluginField mField;
    PluginFieldCollection mFields;
};

// An integer field's value whatever integer type the caller used (the ONNX parser's choice is not documented).
bool field_int(const PluginField& f, int64_t* out) {
    if (!f.data || f.length < 1) return false;
    switch (f.type) {
        case PluginFieldType::kINT8: *out = *static_cast<const int8_t*>(f.data); return true;
        case PluginFieldType::kINT16: *out = *static_cast<const int16_t*>(f.data); return true;
        case PluginFieldType::kINT32: *out = *static_cast<const int32_t*>(f.data); return true;
        case PluginFieldType::kINT64: *out = *static_cast<const int64_t*>(f.data); return true;
        default: return false;
    }
}

class DecoupledAttentionCreator final : public IPluginCreatorV3One {
public:
    DecoupledAttentionCreator() {
        mFieldNames[0] = PluginField("num_heads", nullptr, PluginFieldType::kINT32, 1);
        mFieldNames[1] = PluginField("aot", nullptr, PluginFieldType::kINT32, 1);  // the ONNX node's; ignored
        mCollection = {2, mFieldNames};
    }

    IPluginV3* createPlugin(AsciiChar const* name, PluginFieldCollection const* fc,
                            TensorRTPhase phase) noexcept override {
        int64_t heads = 0;
        std::string seen;
        for (int32_t i = 0; fc && i < fc->nbFields; ++i) {
            const PluginField& f = fc->fields[i];
            const std::string field = f.name ? f.name : "";
            seen += (seen.empty() ? "" : ", ") + field + " (type " + std::to_string(static_cast<int>(f.type)) +
                    ", length " + std::to_string(f.length) + ")";
            int64_t value = 0;
            if (field == "num_heads" && !field_int(f, &value)) {
                log(ILogger::Severity::kERROR, "num_heads must be an integer field, got type " +
                                                   std::to_string(static_cast<int>(f.type)));
                return nullptr;
            }
            if (field == "num_heads") heads = value;
            else if (field != "aot") log(ILogger::Severity::kWARNING, "ignoring unknown field " + field);
        }
        log(ILogger::Severity::kVERBOSE, std::string("createPlugin(") + (name ? name : "") + ", " +
                                             (phase == TensorRTPhase::kBUILD ? "build" : "runtime") + ") fields: " +
                                             (seen.empty() ? "none" : seen));
        if (heads < 1 || heads > 65535) {
            log(ILogger::Severity::kERROR, "needs the field num_heads (an integer >= 1), got " +
                                               (seen.empty() ? std::string("no fields") : seen));
            return nullptr;
        }
        return new (std::nothrow) DecoupledAttention(static_cast<int32_t>(heads));
    }

    PluginFieldCollection const* getFieldNames() noexcept override { return &mCollection; }
    AsciiChar const* getPluginName() const noexcept override { return kName; }
    AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
    AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }

private:
    PluginField mFieldNames[2];
    PluginFieldCollection mCollection;
};

}  // namespace

// What TensorRT's loader looks up in a plugin library (the symbol names are in libnvinfer/libtensorrt_rtx):
// getCreators for IPluginV3 creators, and setLoggerFinder to lend its logger. The rest stays hidden.
extern "C" __attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    static DecoupledAttentionCreator creator;
    static IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}

extern "C" __attribute__((visibility("default"))) void setLoggerFinder(ILoggerFinder* finder) {
    gLoggerFinder.store(finder);
}

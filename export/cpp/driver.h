// The CUDA driver API opened at first use with dlopen("libcuda.so.1") instead of linked with -lcuda: the plugin
// library must load into a process that has no driver (TensorRT-RTX builds engines on a CPU), and unet_bench then
// links on such a machine too. Only cuda.h's declarations are used; no runtime API.
#pragma once

#include <cuda.h>
#include <dlfcn.h>

#include <string>

namespace driver {

// cuda.h maps some names to versioned symbols (cuMemAlloc -> cuMemAlloc_v2) with object-like macros, so the member
// names and the dlsym strings below expand to the very symbols a program linked with -lcuda would bind.
#define DRIVER_CALLS(X)                                                                                             \
    X(cuInit) X(cuGetErrorName) X(cuDeviceGet) X(cuDeviceGetAttribute) X(cuDeviceGetName)                          \
    X(cuDevicePrimaryCtxRetain) X(cuDevicePrimaryCtxRelease) X(cuCtxSetCurrent) X(cuCtxPushCurrent)                \
    X(cuCtxPopCurrent) X(cuCtxGetDevice) X(cuStreamGetCtx) X(cuModuleLoad) X(cuModuleGetFunction)                  \
    X(cuFuncSetAttribute) X(cuLaunchKernel) X(cuMemAlloc) X(cuMemFree) X(cuMemcpyHtoD) X(cuMemcpyDtoH)            \
    X(cuStreamCreate) X(cuStreamSynchronize) X(cuStreamDestroy) X(cuEventCreate) X(cuEventRecord)                  \
    X(cuEventSynchronize) X(cuEventDestroy)
// Left null when the driver lacks them; callers check. (CUDA 13's cuEventElapsedTime_v2 needs a 12.8+ driver, and
// the plugin, which never times anything, must not refuse an older one for it.)
#define DRIVER_OPTIONAL(X) X(cuEventElapsedTime)
#define DRIVER_STR_(x) #x
#define DRIVER_STR(x) DRIVER_STR_(x)

struct Api {
#define DRIVER_MEMBER(name) decltype(&::name) name = nullptr;
    DRIVER_CALLS(DRIVER_MEMBER)
    DRIVER_OPTIONAL(DRIVER_MEMBER)
#undef DRIVER_MEMBER
};

// The driver's calls after cuInit(0), or null with *error saying why; opened once per process.
inline const Api* api(std::string* error) {
    static std::string failure;
    static const Api* const loaded = [] () -> const Api* {
        void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        if (!lib) {
            const char* why = dlerror();
            failure = std::string("cannot load the CUDA driver (libcuda.so.1): ") + (why ? why : "unknown reason");
            return nullptr;
        }
        static Api a;
#define DRIVER_LOAD(name)                                                                                           \
        a.name = reinterpret_cast<decltype(a.name)>(dlsym(lib, DRIVER_STR(name)));                                  \
        if (!a.name) {                                                                                              \
            failure = std::string("the CUDA driver has no " DRIVER_STR(name) ": it is older than the CUDA ") +     \
                      std::to_string(CUDA_VERSION / 1000) + "." + std::to_string(CUDA_VERSION % 1000 / 10) +        \
                      " headers this was built with";                                                               \
            return nullptr;                                                                                         \
        }
        DRIVER_CALLS(DRIVER_LOAD)
#undef DRIVER_LOAD
#define DRIVER_LOAD_OPTIONAL(name) a.name = reinterpret_cast<decltype(a.name)>(dlsym(lib, DRIVER_STR(name)));
        DRIVER_OPTIONAL(DRIVER_LOAD_OPTIONAL)
#undef DRIVER_LOAD_OPTIONAL
        const CUresult r = a.cuInit(0);
        if (r != CUDA_SUCCESS) {
            failure = "cuInit failed with CUresult " + std::to_string(static_cast<int>(r)) + " (no usable GPU?)";
            return nullptr;
        }
        return &a;
    }();
    if (!loaded && error) *error = failure;
    return loaded;
}

// "cuLaunchKernel failed: CUDA_ERROR_INVALID_VALUE (1)"
inline std::string describe(const Api& a, CUresult r, const char* call) {
    const char* name = nullptr;
    if (a.cuGetErrorName(r, &name) != CUDA_SUCCESS || !name) name = "an unknown CUresult";
    return std::string(call) + " failed: " + name + " (" + std::to_string(static_cast<int>(r)) + ")";
}

}  // namespace driver

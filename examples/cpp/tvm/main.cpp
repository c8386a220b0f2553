// Run a crate-edge TVM artifact (model.so, Relax VM, CPU build) with the TVM C++ runtime, no Python:
//   crate_edge_tvm_run ARTIFACT/model.so N C H W [images.f32]
// images.f32: N*C*H*W raw float32 values, NCHW, preprocessed as manifest.json's
// "input.preprocessing" says; without it the input is all zeros. A build with a static batch
// (manifest backend.static_batch) takes exactly that N. Prints N rows of logits.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <cstring>

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

namespace ffi = tvm::ffi;

struct CPUAlloc {  // host memory for the input tensor
  void AllocData(DLTensor* t) { t->data = std::malloc(ffi::GetDataSize(*t)); }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s model.so N C H W [images.f32]\n", argv[0]);
    return 2;
  }
  const int64_t n = std::atoll(argv[2]), c = std::atoll(argv[3]), h = std::atoll(argv[4]), w = std::atoll(argv[5]);
  DLDevice cpu{kDLCPU, 0};
  ffi::Tensor images = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::Shape({n, c, h, w}), DLDataType{kDLFloat, 32, 1}, cpu);
  float* x = static_cast<float*>(images.data_ptr());
  std::memset(x, 0, n * c * h * w * sizeof(float));
  if (argc > 6) {
    FILE* f = std::fopen(argv[6], "rb");
    if (!f || std::fread(x, sizeof(float), n * c * h * w, f) != static_cast<size_t>(n * c * h * w)) {
      std::fprintf(stderr, "cannot read %lld floats from %s\n", static_cast<long long>(n * c * h * w), argv[6]);
      return 2;
    }
    std::fclose(f);
  }

  try {
    ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    // (device type, device id, allocator) per device: CPU 0, pooled allocator (2), as tvm.runtime.vm does
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
    ffi::Any out = vm->GetFunction("main").value()(images);

    // "main" returns the logits tensor, or a tuple whose first field is the logits
    auto maybe = out.as<ffi::Tensor>();
    ffi::Tensor logits = maybe ? *maybe : out.cast<ffi::Array<ffi::Any>>()[0].cast<ffi::Tensor>();
    const float* p = static_cast<const float*>(logits.data_ptr());
    const int64_t k = logits.shape()[1];
    for (int64_t i = 0; i < n; ++i, std::printf("\n"))
      for (int64_t j = 0; j < k; ++j) std::printf("%s%.6f", j ? " " : "", p[i * k + j]);
  } catch (const std::exception& e) {  // load or run failed: say why
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}

// Run a crate-edge ONNX Runtime artifact (model.onnx) with the ONNX Runtime C++ API, no Python:
//   crate_edge_ort_run ARTIFACT/model.onnx N C H W [images.f32]
// images.f32: N*C*H*W raw float32 values, NCHW, preprocessed as manifest.json's
// "input.preprocessing" says; without it the input is all zeros. Prints N rows of logits.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <vector>

#include <onnxruntime_cxx_api.h>

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s model.onnx N C H W [images.f32]\n", argv[0]);
    return 2;
  }
  std::vector<int64_t> shape{std::atoll(argv[2]), std::atoll(argv[3]), std::atoll(argv[4]), std::atoll(argv[5])};
  std::vector<float> x(shape[0] * shape[1] * shape[2] * shape[3], 0.0f);
  if (argc > 6) {
    FILE* f = std::fopen(argv[6], "rb");
    if (!f || std::fread(x.data(), sizeof(float), x.size(), f) != x.size()) {
      std::fprintf(stderr, "cannot read %zu floats from %s\n", x.size(), argv[6]);
      return 2;
    }
    std::fclose(f);
  }

  try {
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "crate-edge");
    Ort::SessionOptions opts;
    opts.SetIntraOpNumThreads(4);  // the target's "threads" option, or your core count
    opts.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    Ort::Session session(env, argv[1], opts);

    Ort::AllocatorWithDefaultOptions alloc;
    auto in_name = session.GetInputNameAllocated(0, alloc);    // "images"
    auto out_name = session.GetOutputNameAllocated(0, alloc);  // the logits
    const char* in_names[] = {in_name.get()};
    const char* out_names[] = {out_name.get()};
    auto mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    Ort::Value input = Ort::Value::CreateTensor<float>(mem, x.data(), x.size(), shape.data(), shape.size());
    auto out = session.Run(Ort::RunOptions{nullptr}, in_names, &input, 1, out_names, 1);

    const float* p = out[0].GetTensorData<float>();
    const int64_t k = out[0].GetTensorTypeAndShapeInfo().GetShape()[1];
    for (int64_t i = 0; i < shape[0]; ++i, std::printf("\n"))
      for (int64_t j = 0; j < k; ++j) std::printf("%s%.6f", j ? " " : "", p[i * k + j]);
  } catch (const std::exception& e) {  // load or run failed: say why
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}

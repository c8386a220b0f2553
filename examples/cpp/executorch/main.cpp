// Run a crate-edge ExecuTorch artifact (model.pte) with the ExecuTorch C++ runtime, no Python:
//   crate_edge_et_run ARTIFACT/model.pte N C H W [images.f32]
// images.f32: N*C*H*W raw float32 values, NCHW, already preprocessed as manifest.json's
// "input.preprocessing" says (pixel * scale, then (x - mean) / std per channel); without it the
// input is all zeros. N must lie in the manifest's input.batch_range. Prints N rows of logits.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

using executorch::extension::from_blob;
using executorch::extension::Module;
using executorch::runtime::Error;

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s model.pte N C H W [images.f32]\n", argv[0]);
    return 2;
  }
  const int n = std::atoi(argv[2]), c = std::atoi(argv[3]), h = std::atoi(argv[4]), w = std::atoi(argv[5]);
  std::vector<float> input(static_cast<size_t>(n) * c * h * w, 0.0f);
  if (argc > 6) {
    FILE* f = std::fopen(argv[6], "rb");
    if (!f || std::fread(input.data(), sizeof(float), input.size(), f) != input.size()) {
      std::fprintf(stderr, "cannot read %zu floats from %s\n", input.size(), argv[6]);
      return 2;
    }
    std::fclose(f);
  }

  Module module(argv[1], Module::LoadMode::Mmap);
  if (module.load_forward() != Error::Ok) {
    std::fprintf(stderr, "cannot load %s (kernels or XNNPACK backend not linked?)\n", argv[1]);
    return 1;
  }
  auto images = from_blob(input.data(), {n, c, h, w});  // float32 by default; no copy
  const auto result = module.forward(images);
  if (!result.ok()) {
    std::fprintf(stderr, "forward failed: error 0x%x\n", static_cast<unsigned>(result.error()));
    return 1;
  }
  const auto& logits = result->at(0).toTensor();  // (N, num_classes)
  const float* p = logits.const_data_ptr<float>();
  const int k = static_cast<int>(logits.size(1));
  for (int i = 0; i < n; ++i, std::printf("\n"))
    for (int j = 0; j < k; ++j) std::printf("%s%.6f", j ? " " : "", p[i * k + j]);
  return 0;
}

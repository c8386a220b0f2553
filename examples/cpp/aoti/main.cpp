// Run a crate-edge AOTInductor artifact (model.pt2, CPU build) with libtorch, no Python:
//   crate_edge_aoti_run ARTIFACT/model.pt2 N C H W [images.f32]
// images.f32: N*C*H*W raw float32 values, NCHW, preprocessed as manifest.json's
// "input.preprocessing" says; without it the input is all zeros. Prints N rows of logits.
#include <cstdio>
#include <cstdlib>
#include <exception>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s model.pt2 N C H W [images.f32]\n", argv[0]);
    return 2;
  }
  const int64_t n = std::atoll(argv[2]), c = std::atoll(argv[3]), h = std::atoll(argv[4]), w = std::atoll(argv[5]);
  torch::Tensor x = torch::zeros({n, c, h, w}, torch::kFloat32);
  if (argc > 6) {
    FILE* f = std::fopen(argv[6], "rb");
    if (!f || std::fread(x.data_ptr<float>(), sizeof(float), x.numel(), f) != static_cast<size_t>(x.numel())) {
      std::fprintf(stderr, "cannot read %lld floats from %s\n", static_cast<long long>(x.numel()), argv[6]);
      return 2;
    }
    std::fclose(f);
  }
  try {
    torch::set_num_threads(4);  // the package's CPU kernels run on torch's intra-op pool

    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    torch::NoGradGuard no_grad;
    torch::Tensor logits = loader.run({x})[0].contiguous();  // (N, num_classes)
    const float* p = logits.data_ptr<float>();
    const int64_t k = logits.size(1);
    for (int64_t i = 0; i < n; ++i, std::printf("\n"))
      for (int64_t j = 0; j < k; ++j) std::printf("%s%.6f", j ? " " : "", p[i * k + j]);
  } catch (const std::exception& e) {  // load or run failed: say why
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}

// Python binding of the fused SSIM kernels (fused_ssim.cu). Only the light ATen/pybind headers are included,
// not <torch/extension.h> (the whole C++ frontend), to keep the JIT build short.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <array>
#include <vector>

#include "fused_ssim.h"

namespace {

constexpr int64_t kMaxPlanes = 65535;  // gridDim.z limit

void check_image(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.dim() == 4, name, " must be [B, C, H, W]");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_pair(const at::Tensor& img1, const at::Tensor& img2) {
  check_image(img1, "img1");
  check_image(img2, "img2");
  TORCH_CHECK(img1.sizes() == img2.sizes(), "img1 and img2 must have the same shape");
  TORCH_CHECK(img1.device() == img2.device(), "img1 and img2 must be on the same device");
  TORCH_CHECK(img1.size(0) * img1.size(1) <= kMaxPlanes, "fused_ssim supports at most ", kMaxPlanes,
              " images x channels");
  TORCH_CHECK(img1.size(2) < (1 << 30) && img1.size(3) < (1 << 30), "image too large");
}

std::array<float, kFusedSsimWindow> to_taps(const std::vector<double>& taps) {
  TORCH_CHECK(static_cast<int>(taps.size()) == kFusedSsimWindow, "fused_ssim needs ", kFusedSsimWindow, " taps");
  std::array<float, kFusedSsimWindow> out{};
  for (int k = 0; k < kFusedSsimWindow; ++k) out[k] = static_cast<float>(taps[k]);
  return out;
}

// Returns (ssim_map [B, C, H, W] with "same" padding, dmaps [3, B, C, H, W] or an empty tensor).
std::vector<at::Tensor> forward(const at::Tensor& img1, const at::Tensor& img2, const std::vector<double>& taps,
                                bool with_grad) {
  check_pair(img1, img2);
  const auto w = to_taps(taps);
  const c10::cuda::CUDAGuard guard(img1.device());
  const int64_t B = img1.size(0), C = img1.size(1), H = img1.size(2), W = img1.size(3);
  at::Tensor ssim_map = img1.new_empty({B, C, H, W});
  at::Tensor dmaps = with_grad ? img1.new_empty({3, B, C, H, W}) : img1.new_empty({0});
  if (img1.numel() > 0) {
    const cudaError_t err = fused_ssim_forward_launch(
        img1.data_ptr<float>(), img2.data_ptr<float>(), B * C, static_cast<int>(H), static_cast<int>(W), w.data(),
        ssim_map.data_ptr<float>(), with_grad ? dmaps.data_ptr<float>() : nullptr,
        c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "fused_ssim forward launch failed: ", cudaGetErrorString(err));
  }
  return {ssim_map, dmaps};
}

// dL/dimg1 for L = grad_out * scale * (sum of the SSIM map over pixels at least `border` from the edge).
at::Tensor backward(const at::Tensor& img1, const at::Tensor& img2, const at::Tensor& dmaps,
                    const at::Tensor& grad_out, const std::vector<double>& taps, double scale, int64_t border) {
  check_pair(img1, img2);
  const auto w = to_taps(taps);
  const int64_t B = img1.size(0), C = img1.size(1), H = img1.size(2), W = img1.size(3);
  TORCH_CHECK(dmaps.is_cuda() && dmaps.scalar_type() == at::kFloat && dmaps.is_contiguous() &&
                  dmaps.numel() == 3 * img1.numel() && dmaps.device() == img1.device(),
              "dmaps must be the contiguous float32 [3, B, C, H, W] tensor of forward()");
  TORCH_CHECK(grad_out.numel() == 1 && grad_out.device() == img1.device(), "grad_out must be a scalar on img1's device");
  TORCH_CHECK(border >= 0, "border must be >= 0");
  const at::Tensor g = grad_out.to(at::kFloat).contiguous();
  const c10::cuda::CUDAGuard guard(img1.device());
  at::Tensor grad1 = img1.new_empty({B, C, H, W});
  if (img1.numel() > 0) {
    const cudaError_t err = fused_ssim_backward_launch(
        img1.data_ptr<float>(), img2.data_ptr<float>(), dmaps.data_ptr<float>(), g.data_ptr<float>(),
        static_cast<float>(scale), B * C, static_cast<int>(H), static_cast<int>(W), static_cast<int>(border), w.data(),
        grad1.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "fused_ssim backward launch failed: ", cudaGetErrorString(err));
  }
  return grad1;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused SSIM kernels (11x11 Gaussian window): one launch forward, one launch backward";
  m.def("forward", &forward, "SSIM map and its derivatives w.r.t. img1's blurred moments", py::arg("img1"),
        py::arg("img2"), py::arg("taps"), py::arg("with_grad"));
  m.def("backward", &backward, "dL/dimg1 of the mean SSIM", py::arg("img1"), py::arg("img2"), py::arg("dmaps"),
        py::arg("grad_out"), py::arg("taps"), py::arg("scale"), py::arg("border"));
}

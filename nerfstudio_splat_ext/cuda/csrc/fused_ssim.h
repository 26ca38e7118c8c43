// Host-side interface of fused_ssim.cu (kept free of torch headers so nvcc compiles the kernels quickly).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

// The kernels are specialised for the 3DGS window; other sizes use the PyTorch reference.
constexpr int kFusedSsimWindow = 11;

// img1, img2, ssim_map: `planes` contiguous HxW float planes. dmaps: [3, planes, H, W] (dS/dmu1, dS/de11,
// dS/de12), or nullptr when no gradient is needed. taps: kFusedSsimWindow host floats.
cudaError_t fused_ssim_forward_launch(const float* img1, const float* img2, int64_t planes, int H, int W,
                                      const float* taps, float* ssim_map, float* dmaps, cudaStream_t stream);

// grad1 = dL/dimg1 for L = grad_out[0] * scale * sum of the map over pixels at least `border` from the edge.
cudaError_t fused_ssim_backward_launch(const float* img1, const float* img2, const float* dmaps,
                                       const float* grad_out, float scale, int64_t planes, int H, int W, int border,
                                       const float* taps, float* grad1, cudaStream_t stream);

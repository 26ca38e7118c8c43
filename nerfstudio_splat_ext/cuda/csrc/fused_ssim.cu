// Fused SSIM (11x11 separable Gaussian window, zero padding as padding="same"): one kernel launch for the
// forward, one for the backward. Reference: nerfstudio_splat_ext/losses/ssim.py.
//
// Both kernels work on one output tile per thread block: the tile plus a kHalo-pixel border is staged in shared
// memory (zeros outside the image, which is exactly the zero padding of the reference's convolutions), blurred
// horizontally into a second shared buffer and then vertically per output pixel.
//
// Forward, per pixel p (mu = G*x, e11 = G*(x^2), e12 = G*(xy), ...):
//   S = (2 mu1 mu2 + C1)(2 s12 + C2) / ((mu1^2 + mu2^2 + C1)(s11 + s22 + C2)),  s11 = e11 - mu1^2, s12 = e12 - mu1 mu2
// plus the derivatives of S w.r.t. the blurred moments of img1 (mu1, e11, e12) with the other moments held fixed:
//   dS/de11 = dS/ds11,  dS/de12 = dS/ds12,  dS/dmu1 (total) = dS/dmu1|_s - 2 mu1 dS/ds11 - mu2 dS/ds12.
// Backward (G symmetric, so the adjoint of the zero-padded blur is the same zero-padded blur):
//   dL/dx = g * ( G*(m dS/dmu1) + 2 x G*(m dS/de11) + y G*(m dS/de12) ),
// with g = dL/dSSIM / N and m the mask of pixels that enter the mean (all of them, or the interior for "valid").

#include <cuda_runtime.h>

#include <cstdint>

#include "fused_ssim.h"

namespace {

constexpr int kHalo = kFusedSsimWindow / 2;
constexpr int kTileW = 32;    // output columns per block (= blockDim.x: one warp per row, coalesced)
constexpr int kTileH = 16;    // output rows per block
constexpr int kThreadsY = 8;  // blockDim.y; each thread covers kTileH / kThreadsY output rows
constexpr int kThreads = kTileW * kThreadsY;
constexpr int kInW = kTileW + 2 * kHalo;
constexpr int kInH = kTileH + 2 * kHalo;
constexpr float kC1 = 0.01f * 0.01f;
constexpr float kC2 = 0.03f * 0.03f;

// Passed by value: the taps live in the kernel's parameter (constant) bank.
struct Taps {
  float w[kFusedSsimWindow];
};

__device__ __forceinline__ bool inside(int y, int x, int y_lo, int y_hi, int x_lo, int x_hi) {
  return y >= y_lo && y < y_hi && x >= x_lo && x < x_hi;
}

__global__ void __launch_bounds__(kThreads)
    ssim_forward_kernel(const float* __restrict__ img1, const float* __restrict__ img2, int H, int W, Taps taps,
                        float* __restrict__ ssim_map, float* __restrict__ dmaps, int64_t dmap_stride) {
  __shared__ float s_x[kInH][kInW];
  __shared__ float s_y[kInH][kInW];
  __shared__ float s_h[5][kInH][kTileW];

  const int64_t plane = static_cast<int64_t>(blockIdx.z) * H * W;
  const int tile_x = blockIdx.x * kTileW;
  const int tile_y = blockIdx.y * kTileH;
  const int tid = threadIdx.y * kTileW + threadIdx.x;

  for (int i = tid; i < kInH * kInW; i += kThreads) {
    const int r = i / kInW, c = i - r * kInW;
    const int gy = tile_y - kHalo + r, gx = tile_x - kHalo + c;
    float a = 0.f, b = 0.f;
    if (inside(gy, gx, 0, H, 0, W)) {
      const int64_t idx = plane + static_cast<int64_t>(gy) * W + gx;
      a = img1[idx];
      b = img2[idx];
    }
    s_x[r][c] = a;
    s_y[r][c] = b;
  }
  __syncthreads();

  // Horizontal pass over all kInH staged rows: the five moments.
  const int c = threadIdx.x;
  for (int r = threadIdx.y; r < kInH; r += kThreadsY) {
    float m1 = 0.f, m2 = 0.f, e11 = 0.f, e22 = 0.f, e12 = 0.f;
#pragma unroll
    for (int k = 0; k < kFusedSsimWindow; ++k) {
      const float a = s_x[r][c + k], b = s_y[r][c + k], w = taps.w[k];
      const float wa = w * a, wb = w * b;
      m1 += wa;
      m2 += wb;
      e11 += wa * a;
      e22 += wb * b;
      e12 += wa * b;
    }
    s_h[0][r][c] = m1;
    s_h[1][r][c] = m2;
    s_h[2][r][c] = e11;
    s_h[3][r][c] = e22;
    s_h[4][r][c] = e12;
  }
  __syncthreads();

  const int gx = tile_x + c;
  if (gx >= W) return;  // no barrier follows
  for (int r = threadIdx.y; r < kTileH; r += kThreadsY) {
    const int gy = tile_y + r;
    if (gy >= H) break;
    float mu1 = 0.f, mu2 = 0.f, e11 = 0.f, e22 = 0.f, e12 = 0.f;
#pragma unroll
    for (int k = 0; k < kFusedSsimWindow; ++k) {
      const float w = taps.w[k];
      mu1 += w * s_h[0][r + k][c];
      mu2 += w * s_h[1][r + k][c];
      e11 += w * s_h[2][r + k][c];
      e22 += w * s_h[3][r + k][c];
      e12 += w * s_h[4][r + k][c];
    }
    const float mu1_sq = mu1 * mu1, mu2_sq = mu2 * mu2, mu12 = mu1 * mu2;
    const float s11 = e11 - mu1_sq, s22 = e22 - mu2_sq, s12 = e12 - mu12;
    const float a1 = 2.f * mu12 + kC1, a2 = 2.f * s12 + kC2;
    const float b1 = mu1_sq + mu2_sq + kC1, b2 = s11 + s22 + kC2;
    const float inv_b1 = 1.f / b1, inv_b2 = 1.f / b2;
    const float s = a1 * a2 * inv_b1 * inv_b2;
    const int64_t idx = plane + static_cast<int64_t>(gy) * W + gx;
    ssim_map[idx] = s;
    if (dmaps != nullptr) {
      const float ds_ds12 = 2.f * a1 * inv_b1 * inv_b2;
      const float ds_ds11 = -s * inv_b2;
      const float ds_dmu1 = 2.f * mu2 * a2 * inv_b1 * inv_b2 - 2.f * mu1 * s * inv_b1;
      // s11 and s12 depend on mu1 too: fold that in so the backward only blurs three maps.
      dmaps[idx] = ds_dmu1 - 2.f * mu1 * ds_ds11 - mu2 * ds_ds12;
      dmaps[dmap_stride + idx] = ds_ds11;
      dmaps[2 * dmap_stride + idx] = ds_ds12;
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    ssim_backward_kernel(const float* __restrict__ img1, const float* __restrict__ img2,
                         const float* __restrict__ dmaps, int64_t dmap_stride, const float* __restrict__ grad_out,
                         float scale, int H, int W, int border, Taps taps, float* __restrict__ grad1) {
  __shared__ float s_d[3][kInH][kInW];
  __shared__ float s_h[3][kInH][kTileW];

  const int64_t plane = static_cast<int64_t>(blockIdx.z) * H * W;
  const int tile_x = blockIdx.x * kTileW;
  const int tile_y = blockIdx.y * kTileH;
  const int tid = threadIdx.y * kTileW + threadIdx.x;

  // Pixels outside the image contribute nothing (zero padding); for "valid" neither do those within `border`
  // of the edge, since they are not part of the mean.
  for (int i = tid; i < kInH * kInW; i += kThreads) {
    const int r = i / kInW, c = i - r * kInW;
    const int gy = tile_y - kHalo + r, gx = tile_x - kHalo + c;
    float d0 = 0.f, d1 = 0.f, d2 = 0.f;
    if (inside(gy, gx, border, H - border, border, W - border)) {
      const int64_t idx = plane + static_cast<int64_t>(gy) * W + gx;
      d0 = dmaps[idx];
      d1 = dmaps[dmap_stride + idx];
      d2 = dmaps[2 * dmap_stride + idx];
    }
    s_d[0][r][c] = d0;
    s_d[1][r][c] = d1;
    s_d[2][r][c] = d2;
  }
  __syncthreads();

  const int c = threadIdx.x;
  for (int r = threadIdx.y; r < kInH; r += kThreadsY) {
    float h0 = 0.f, h1 = 0.f, h2 = 0.f;
#pragma unroll
    for (int k = 0; k < kFusedSsimWindow; ++k) {
      const float w = taps.w[k];
      h0 += w * s_d[0][r][c + k];
      h1 += w * s_d[1][r][c + k];
      h2 += w * s_d[2][r][c + k];
    }
    s_h[0][r][c] = h0;
    s_h[1][r][c] = h1;
    s_h[2][r][c] = h2;
  }
  __syncthreads();

  const int gx = tile_x + c;
  if (gx >= W) return;
  const float g = grad_out[0] * scale;
  for (int r = threadIdx.y; r < kTileH; r += kThreadsY) {
    const int gy = tile_y + r;
    if (gy >= H) break;
    float b0 = 0.f, b1 = 0.f, b2 = 0.f;
#pragma unroll
    for (int k = 0; k < kFusedSsimWindow; ++k) {
      const float w = taps.w[k];
      b0 += w * s_h[0][r + k][c];
      b1 += w * s_h[1][r + k][c];
      b2 += w * s_h[2][r + k][c];
    }
    const int64_t idx = plane + static_cast<int64_t>(gy) * W + gx;
    grad1[idx] = g * (b0 + 2.f * img1[idx] * b1 + img2[idx] * b2);
  }
}

Taps make_taps(const float* taps) {
  Taps t;
  for (int k = 0; k < kFusedSsimWindow; ++k) t.w[k] = taps[k];
  return t;
}

dim3 grid_for(int64_t planes, int H, int W) {
  return dim3((W + kTileW - 1) / kTileW, (H + kTileH - 1) / kTileH, static_cast<unsigned>(planes));
}

}  // namespace

cudaError_t fused_ssim_forward_launch(const float* img1, const float* img2, int64_t planes, int H, int W,
                                      const float* taps, float* ssim_map, float* dmaps, cudaStream_t stream) {
  ssim_forward_kernel<<<grid_for(planes, H, W), dim3(kTileW, kThreadsY), 0, stream>>>(
      img1, img2, H, W, make_taps(taps), ssim_map, dmaps, planes * H * W);
  return cudaGetLastError();
}

cudaError_t fused_ssim_backward_launch(const float* img1, const float* img2, const float* dmaps,
                                       const float* grad_out, float scale, int64_t planes, int H, int W, int border,
                                       const float* taps, float* grad1, cudaStream_t stream) {
  ssim_backward_kernel<<<grid_for(planes, H, W), dim3(kTileW, kThreadsY), 0, stream>>>(
      img1, img2, dmaps, planes * H * W, grad_out, scale, H, W, border, make_taps(taps), grad1);
  return cudaGetLastError();
}

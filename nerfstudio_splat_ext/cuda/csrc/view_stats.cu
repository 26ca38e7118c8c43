// Densification statistics of one rendered view, accumulated per Gaussian in one launch (cuda/view_stats.py has
// the PyTorch reference with the same signature). For every Gaussian n and camera c with radii[c, n] > 0:
//   grad2d[n] += |(grads[c, n, 0] * scale_x, grads[c, n, 1] * scale_y)|,  count[n] += 1,
//   max_radii2d[n] = max(max_radii2d[n], radii[c, n] * inv_image_size).
// One thread per Gaussian walks the cameras, so there are no atomics. The reference takes about 17 kernel
// launches for the same work, and the training step is bound by launches, not by the GPU.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

namespace contribution {

namespace {

__global__ void accumulate_view_stats_kernel(const int C, const int N, const float2 *__restrict__ grads,
                                             const int *__restrict__ radii, const float scale_x,
                                             const float scale_y, const float inv_image_size,
                                             float *__restrict__ grad2d, float *__restrict__ count,
                                             float *__restrict__ max_radii2d) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    float g_sum = 0.f, c_sum = 0.f, r_max = max_radii2d[n];
    for (int c = 0; c < C; ++c) {
        const int r = radii[c * N + n];
        if (r <= 0) continue;
        const float2 g = grads[c * N + n];
        const float gx = g.x * scale_x, gy = g.y * scale_y;
        g_sum += sqrtf(gx * gx + gy * gy);
        c_sum += 1.f;
        r_max = fmaxf(r_max, static_cast<float>(r) * inv_image_size);
    }
    grad2d[n] += g_sum;
    count[n] += c_sum;
    max_radii2d[n] = r_max;
}

}  // namespace

void accumulate_view_stats_cuda(const at::Tensor &grads, const at::Tensor &radii, double scale_x, double scale_y,
                                double inv_image_size, at::Tensor &grad2d, at::Tensor &count,
                                at::Tensor &max_radii2d) {
    const int C = static_cast<int>(grads.size(0)), N = static_cast<int>(grads.size(1));
    if (N == 0) return;
    const c10::cuda::CUDAGuard guard(grads.device());
    const int threads = 256;
    accumulate_view_stats_kernel<<<(N + threads - 1) / threads, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        C, N, reinterpret_cast<const float2 *>(grads.data_ptr<float>()), radii.data_ptr<int>(),
        static_cast<float>(scale_x), static_cast<float>(scale_y), static_cast<float>(inv_image_size),
        grad2d.data_ptr<float>(), count.data_ptr<float>(), max_radii2d.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace contribution

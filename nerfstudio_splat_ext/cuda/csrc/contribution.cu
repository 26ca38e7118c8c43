// Render loss contribution of each Gaussian (DeG): per pixel p and composited Gaussian j,
//   dC_{j,p} = -T_j a_j c_j + a_j / (1 - a_j) * (C_p - sum_{i<=j} T_i a_i c_i)
// accumulated as delta_loss[j] += <dL/dC_p, dC_{j,p}>, pixel_count[j] += 1, weight_sum[j] += T_j a_j.
//
// One block per (camera, tile), one thread per pixel. Each pixel walks its tile's list twice, with Gaussians
// staged in shared memory in batches (as gsplat's forward): pass 1 composites C_p and finds the last Gaussian
// before the T <= 1e-4 cut-off with gsplat's exact float32 rules; pass 2 walks the same list again and emits the
// contribution of every composited Gaussian. All threads of a block visit the same Gaussian at the same step, so
// a warp sums its lanes with shuffles and one lane does the atomics.

#include <ATen/ATen.h>
// c10 headers only: ATen/cuda/CUDAContext.h pulls in cuSPARSE / cuBLAS headers that a bare toolkit may lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace contribution {

namespace {

constexpr float kAlphaMax = 0.999f;
constexpr float kAlphaMin = 1.f / 255.f;
// gsplat compares the float T with the double 1e-4; 1e-4f is the largest float <= 1e-4, so this is equivalent.
constexpr float kTMin = 1e-4f;
constexpr unsigned kFullMask = 0xffffffffu;

struct PairAlpha {
    float alpha;
    bool valid;
};

// Same operation order as gsplat's rasterize_to_pixels forward, so both passes (and gsplat) agree bit for bit
// on which pairs pass the thresholds.
__device__ __forceinline__ PairAlpha eval_alpha(const float3 xyo, const float3 conic, const float px, const float py) {
    const float dx = xyo.x - px;
    const float dy = xyo.y - py;
    const float sigma = 0.5f * (conic.x * dx * dx + conic.z * dy * dy) + conic.y * dx * dy;
    const float alpha = fminf(kAlphaMax, xyo.z * __expf(-sigma));
    return {alpha, !(sigma < 0.f || alpha < kAlphaMin)};
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(kFullMask, v, off);
    return v;
}

__device__ __forceinline__ int warp_sum(int v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(kFullMask, v, off);
    return v;
}

template <int CDIM>
__global__ void render_loss_contribution_kernel(
    const int C,
    const int N,
    const int n_isects,
    const float2 *__restrict__ means2d,   // [C, N]
    const float3 *__restrict__ conics,    // [C, N]
    const float *__restrict__ opacities,  // [C, N]
    const float *__restrict__ colors,     // [C, N, CDIM]
    const float *__restrict__ backgrounds,  // [C, CDIM] or nullptr
    const float *__restrict__ grad_colors,  // [C, H, W, CDIM]
    const int width,
    const int height,
    const int tile_size,
    const int tile_width,
    const int tile_height,
    const int32_t *__restrict__ tile_offsets,  // [C, tile_height, tile_width]
    const int32_t *__restrict__ flatten_ids,   // [n_isects], ids into [C * N]
    float *__restrict__ delta_loss,            // [N]
    int32_t *__restrict__ pixel_count,         // [N] or nullptr
    float *__restrict__ weight_sum             // [N] or nullptr
) {
    // The block is 1-D and padded to whole warps: threads past tile_size^2 hold no pixel but still stage
    // Gaussians and take part in the warp sums.
    const int cam = blockIdx.x;
    const int tile_y = blockIdx.y;
    const int tile_x = blockIdx.z;
    const int tr = threadIdx.x;
    const int block_size = blockDim.x;
    const int lane = tr & 31;

    const int px_i = tile_x * tile_size + tr % tile_size;
    const int py_i = tile_y * tile_size + tr / tile_size;
    const bool inside = tr < tile_size * tile_size && px_i < width && py_i < height;
    const float px = (float)px_i + 0.5f;
    const float py = (float)py_i + 0.5f;
    const int64_t pix = ((int64_t)cam * height + py_i) * width + px_i;

    const int tile_id = (cam * tile_height + tile_y) * tile_width + tile_x;
    const int range_start = tile_offsets[tile_id];
    const int range_end = tile_id == C * tile_height * tile_width - 1 ? n_isects : tile_offsets[tile_id + 1];
    const int gauss_base = cam * N;  // unpacked layout: camera `cam` lists ids in [cam * N, cam * N + N)

    extern __shared__ unsigned char smem_raw[];
    int32_t *s_id = reinterpret_cast<int32_t *>(smem_raw);
    float3 *s_xyo = reinterpret_cast<float3 *>(s_id + block_size);
    float3 *s_conic = s_xyo + block_size;

    // ---- pass 1: C_p and the index of the last composited list entry -------------------------------------
    // Colour sums in double: pass 2 forms C_p - prefix, which cancels; a/(1-a) (up to 999) would amplify the
    // float32 rounding of a long list.
    double acc[CDIM];
#pragma unroll
    for (int k = 0; k < CDIM; ++k) acc[k] = 0.0;
    float T = 1.f;
    int last = range_start - 1;
    bool done = !inside;
    for (int b0 = range_start; b0 < range_end; b0 += block_size) {
        if (__syncthreads_count(done) == block_size) break;  // also guards the shared batch being overwritten
        const int idx = b0 + tr;
        if (idx < range_end) {
            const int32_t g = flatten_ids[idx];
            const float2 xy = means2d[g];
            s_id[tr] = g;
            s_xyo[tr] = make_float3(xy.x, xy.y, opacities[g]);
            s_conic[tr] = conics[g];
        }
        __syncthreads();
        const int n = min(block_size, range_end - b0);
        for (int t = 0; t < n && !done; ++t) {
            const PairAlpha pa = eval_alpha(s_xyo[t], s_conic[t], px, py);
            if (!pa.valid) continue;
            const float next_T = T * (1.f - pa.alpha);
            if (next_T <= kTMin) {  // exclusive: this Gaussian is not composited
                done = true;
                break;
            }
            const float vis = pa.alpha * T;
            const float *c = colors + (int64_t)s_id[t] * CDIM;
#pragma unroll
            for (int k = 0; k < CDIM; ++k) acc[k] += (double)(c[k] * vis);
            last = b0 + t;
            T = next_T;
        }
    }

    // ---- pass 2: per composited Gaussian, <G_p, dC_{j,p}> ------------------------------------------------
    float grad[CDIM];
    double rest[CDIM];  // C_p minus the composited prefix: what shows behind the current Gaussian
#pragma unroll
    for (int k = 0; k < CDIM; ++k) {
        grad[k] = inside ? grad_colors[pix * CDIM + k] : 0.f;
        rest[k] = acc[k] + (backgrounds != nullptr ? (double)T * (double)backgrounds[cam * CDIM + k] : 0.0);
    }
    T = 1.f;
    done = !inside || last < range_start;
    for (int b0 = range_start; b0 < range_end; b0 += block_size) {  // block-uniform bounds: it syncs
        if (__syncthreads_count(done) == block_size) break;
        const int idx = b0 + tr;
        if (idx < range_end) {
            const int32_t g = flatten_ids[idx];
            const float2 xy = means2d[g];
            s_id[tr] = g;
            s_xyo[tr] = make_float3(xy.x, xy.y, opacities[g]);
            s_conic[tr] = conics[g];
        }
        __syncthreads();
        const int n = min(block_size, range_end - b0);
        // Every lane walks the whole batch (the shuffles need the full warp); a warp leaves once all lanes are done.
        for (int t = 0; t < n; ++t) {
            if (__all_sync(kFullMask, done)) break;
            float dl = 0.f, w = 0.f;
            int hit = 0;
            if (!done) {
                done = b0 + t >= last;  // lets the block stop right after its pixels' last Gaussians
                const PairAlpha pa = eval_alpha(s_xyo[t], s_conic[t], px, py);
                if (pa.valid) {
                    const float vis = pa.alpha * T;
                    const float ratio = pa.alpha / (1.f - pa.alpha);
                    const float *c = colors + (int64_t)s_id[t] * CDIM;
#pragma unroll
                    for (int k = 0; k < CDIM; ++k) {
                        const float wc = c[k] * vis;
                        rest[k] -= (double)wc;
                        dl += grad[k] * (ratio * (float)rest[k] - wc);
                    }
                    w = vis;
                    hit = 1;
                    T = T * (1.f - pa.alpha);
                }
            }
            if (!__any_sync(kFullMask, hit)) continue;
            dl = warp_sum(dl);
            w = warp_sum(w);
            hit = warp_sum(hit);
            if (lane == 0) {
                const int gid = s_id[t] - gauss_base;
                atomicAdd(delta_loss + gid, dl);
                if (pixel_count != nullptr) {
                    atomicAdd(pixel_count + gid, hit);
                    atomicAdd(weight_sum + gid, w);
                }
            }
        }
    }
}

template <int CDIM>
void launch(
    const at::Tensor &means2d,
    const at::Tensor &conics,
    const at::Tensor &opacities,
    const at::Tensor &colors,
    const float *backgrounds,
    const at::Tensor &grad_colors,
    const at::Tensor &isect_offsets,
    const at::Tensor &flatten_ids,
    const int width,
    const int height,
    const int tile_size,
    at::Tensor &delta_loss,
    int32_t *pixel_count,
    float *weight_sum
) {
    const int C = means2d.size(0);
    const int N = means2d.size(1);
    const int tile_height = isect_offsets.size(1);
    const int tile_width = isect_offsets.size(2);
    const int n_isects = flatten_ids.size(0);
    if (C == 0 || N == 0 || n_isects == 0 || tile_height == 0 || tile_width == 0) return;
    const int block_size = (tile_size * tile_size + 31) / 32 * 32;
    const dim3 grid(C, tile_height, tile_width);
    const size_t smem = (size_t)block_size * (sizeof(int32_t) + 2 * sizeof(float3));
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    render_loss_contribution_kernel<CDIM><<<grid, block_size, smem, stream>>>(
        C,
        N,
        n_isects,
        reinterpret_cast<const float2 *>(means2d.data_ptr<float>()),
        reinterpret_cast<const float3 *>(conics.data_ptr<float>()),
        opacities.data_ptr<float>(),
        colors.data_ptr<float>(),
        backgrounds,
        grad_colors.data_ptr<float>(),
        width,
        height,
        tile_size,
        tile_width,
        tile_height,
        isect_offsets.data_ptr<int32_t>(),
        flatten_ids.data_ptr<int32_t>(),
        delta_loss.data_ptr<float>(),
        pixel_count,
        weight_sum
    );
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void render_loss_contribution_cuda(
    const at::Tensor &means2d,
    const at::Tensor &conics,
    const at::Tensor &opacities,
    const at::Tensor &colors,
    const c10::optional<at::Tensor> &backgrounds,
    const at::Tensor &grad_colors,
    const at::Tensor &isect_offsets,
    const at::Tensor &flatten_ids,
    const int width,
    const int height,
    const int tile_size,
    at::Tensor &delta_loss,
    at::Tensor &pixel_count,
    at::Tensor &weight_sum,
    const bool accumulate_counts
) {
    const c10::cuda::OptionalCUDAGuard guard(means2d.device());
    const float *bg = backgrounds.has_value() ? backgrounds.value().data_ptr<float>() : nullptr;
    int32_t *cnt = accumulate_counts ? pixel_count.data_ptr<int32_t>() : nullptr;
    float *wsum = accumulate_counts ? weight_sum.data_ptr<float>() : nullptr;
    const int D = colors.size(-1);
#define CONTRIB_CASE(CD)                                                                                             \
    case CD:                                                                                                         \
        launch<CD>(means2d, conics, opacities, colors, bg, grad_colors, isect_offsets, flatten_ids, width, height,    \
                   tile_size, delta_loss, cnt, wsum);                                                                \
        break;
    switch (D) {
        CONTRIB_CASE(1)
        CONTRIB_CASE(2)
        CONTRIB_CASE(3)
        CONTRIB_CASE(4)
        CONTRIB_CASE(8)
        CONTRIB_CASE(16)
        CONTRIB_CASE(32)
    default:
        TORCH_CHECK(false, "render_loss_contribution: unsupported channel count ", D, " (split it into 1-4, 8, 16, 32)");
    }
#undef CONTRIB_CASE
}

}  // namespace contribution

// Python binding of the density-control kernels: the render loss contribution (contribution.cu) and the per-view
// densification statistics (view_stats.cu). Checks live here so the .cu files only see well-formed float32 / int32
// CUDA tensors.

#include <torch/extension.h>

namespace contribution {
void render_loss_contribution_cuda(
    const at::Tensor &means2d,
    const at::Tensor &conics,
    const at::Tensor &opacities,
    const at::Tensor &colors,
    const c10::optional<at::Tensor> &backgrounds,
    const at::Tensor &grad_colors,
    const at::Tensor &isect_offsets,
    const at::Tensor &flatten_ids,
    int width,
    int height,
    int tile_size,
    at::Tensor &delta_loss,
    at::Tensor &pixel_count,
    at::Tensor &weight_sum,
    bool accumulate_counts);
void accumulate_view_stats_cuda(const at::Tensor &grads, const at::Tensor &radii, double scale_x, double scale_y,
                                double inv_image_size, at::Tensor &grad2d, at::Tensor &count,
                                at::Tensor &max_radii2d);
}  // namespace contribution

namespace {

void check(const at::Tensor &t, const char *name, at::ScalarType dtype) {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
}

// Accumulates into delta_loss / pixel_count / weight_sum ([N]); counts and weights only when accumulate_counts.
void render_loss_contribution(
    const at::Tensor &means2d,      // [C, N, 2]
    const at::Tensor &conics,       // [C, N, 3]
    const at::Tensor &opacities,    // [C, N]
    const at::Tensor &colors,       // [C, N, D]
    const c10::optional<at::Tensor> &backgrounds,  // [C, D]
    const at::Tensor &grad_colors,  // [C, H, W, D]
    const at::Tensor &isect_offsets,  // [C, tile_h, tile_w] int32
    const at::Tensor &flatten_ids,    // [M] int32
    int64_t width,
    int64_t height,
    int64_t tile_size,
    at::Tensor delta_loss,   // [N] float32
    at::Tensor pixel_count,  // [N] int32
    at::Tensor weight_sum,   // [N] float32
    bool accumulate_counts) {
    const auto f32 = at::kFloat;
    check(means2d, "means2d", f32);
    check(conics, "conics", f32);
    check(opacities, "opacities", f32);
    check(colors, "colors", f32);
    check(grad_colors, "grad_colors", f32);
    check(isect_offsets, "isect_offsets", at::kInt);
    check(flatten_ids, "flatten_ids", at::kInt);
    check(delta_loss, "delta_loss", f32);
    check(pixel_count, "pixel_count", at::kInt);
    check(weight_sum, "weight_sum", f32);
    TORCH_CHECK(means2d.dim() == 3 && means2d.size(2) == 2, "means2d must be [C, N, 2]");
    const int64_t C = means2d.size(0), N = means2d.size(1), D = colors.size(-1);
    TORCH_CHECK(conics.sizes() == at::IntArrayRef({C, N, 3}), "conics must be [C, N, 3]");
    TORCH_CHECK(opacities.sizes() == at::IntArrayRef({C, N}), "opacities must be [C, N]");
    TORCH_CHECK(colors.dim() == 3 && colors.size(0) == C && colors.size(1) == N, "colors must be [C, N, D]");
    TORCH_CHECK(grad_colors.sizes() == at::IntArrayRef({C, height, width, D}), "grad_colors must be [C, H, W, D]");
    TORCH_CHECK(tile_size > 0, "tile_size must be positive");
    TORCH_CHECK(isect_offsets.dim() == 3 && isect_offsets.size(0) == C &&
                    isect_offsets.size(1) == (height + tile_size - 1) / tile_size &&
                    isect_offsets.size(2) == (width + tile_size - 1) / tile_size,
                "isect_offsets must be [C, ceil(H / tile_size), ceil(W / tile_size)]");
    TORCH_CHECK(tile_size * tile_size <= 1024, "tile_size^2 must fit one block (<= 1024 threads)");
    TORCH_CHECK(delta_loss.numel() == N && pixel_count.numel() == N && weight_sum.numel() == N,
                "outputs must have N elements");
    if (backgrounds.has_value()) {
        check(backgrounds.value(), "backgrounds", f32);
        TORCH_CHECK(backgrounds.value().sizes() == at::IntArrayRef({C, D}), "backgrounds must be [C, D]");
    }
    contribution::render_loss_contribution_cuda(
        means2d, conics, opacities, colors, backgrounds, grad_colors, isect_offsets, flatten_ids,
        static_cast<int>(width), static_cast<int>(height), static_cast<int>(tile_size),
        delta_loss, pixel_count, weight_sum, accumulate_counts);
}

// Adds one view's statistics into grad2d / count / max_radii2d ([N] float32), in place.
void accumulate_view_stats(const at::Tensor &grads,  // [C, N, 2] float32
                           const at::Tensor &radii,  // [C, N] int32
                           double scale_x, double scale_y, double inv_image_size, at::Tensor grad2d,
                           at::Tensor count, at::Tensor max_radii2d) {
    check(grads, "grads", at::kFloat);
    check(radii, "radii", at::kInt);
    check(grad2d, "grad2d", at::kFloat);
    check(count, "count", at::kFloat);
    check(max_radii2d, "max_radii2d", at::kFloat);
    TORCH_CHECK(grads.dim() == 3 && grads.size(2) == 2, "grads must be [C, N, 2]");
    const int64_t C = grads.size(0), N = grads.size(1);
    TORCH_CHECK(radii.sizes() == at::IntArrayRef({C, N}), "radii must be [C, N]");
    TORCH_CHECK(grad2d.numel() == N && count.numel() == N && max_radii2d.numel() == N,
                "grad2d, count and max_radii2d must have N elements");
    contribution::accumulate_view_stats_cuda(grads, radii, scale_x, scale_y, inv_image_size, grad2d, count,
                                             max_radii2d);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "Density-control kernels: render loss contribution and per-view densification statistics";
    m.def("render_loss_contribution", &render_loss_contribution,
          "Accumulate delta_loss / pixel_count / weight_sum over the pixels of all cameras (CUDA)");
    m.def("accumulate_view_stats", &accumulate_view_stats,
          "Add one view's densification statistics (gradient norm, visible count, max radius) in place (CUDA)");
}

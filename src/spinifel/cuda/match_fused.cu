// Fused orientation matching: distances of an image block against a model-slice block,
// reduced straight to (best distance, best index) per image without materialising the
// distance matrix. float32, mask-aware (weight 0 = masked pixel), optional per-image scale.
//
// Launch: grid (n_images, ceil(n_slices / blockDim.x)), any blockDim.x <= 1024 that is a
// power of two. best_key must be initialised to 0xFFFFFFFFFFFFFFFF by the caller.
// The key packs an order-preserving encoding of the float distance (high 32 bits) with the
// slice index (low 32 bits): the smallest key is the smallest distance, ties -> lowest index.

extern "C" {

__device__ __forceinline__ unsigned int order_float(float f) {
    unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__global__ void match_fused(const float* __restrict__ images,   // (n_images, n_pixels)
                            const float* __restrict__ slices,   // (n_slices, n_pixels)
                            const float* __restrict__ weights,  // (n_pixels,) 0 = masked
                            int n_images, int n_slices, int n_pixels, int slice_offset,
                            int scale_per_image,
                            unsigned long long* __restrict__ best_key) {
    extern __shared__ unsigned long long keys[];
    const int img = blockIdx.x;
    const int s = blockIdx.y * blockDim.x + threadIdx.x;
    unsigned long long key = 0xFFFFFFFFFFFFFFFFull;
    if (img < n_images && s < n_slices) {
        const float* x = images + (size_t)img * n_pixels;
        const float* y = slices + (size_t)s * n_pixels;
        float xy = 0.f, yy = 0.f, xx = 0.f;
        for (int p = 0; p < n_pixels; ++p) {
            const float w = weights[p];
            const float xv = x[p] * w;
            const float yv = y[p] * w;
            xy += xv * y[p];
            yy += yv * y[p];
            xx += xv * x[p];
        }
        float d;
        if (scale_per_image) {
            const float pos = xy > 0.f ? xy : 0.f;
            d = xx - (yy > 0.f ? pos * pos / yy : 0.f);
        } else {
            d = xx + yy - 2.f * xy;
        }
        key = ((unsigned long long)order_float(d) << 32) | (unsigned int)(s + slice_offset);
    }
    keys[threadIdx.x] = key;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride && keys[threadIdx.x + stride] < keys[threadIdx.x])
            keys[threadIdx.x] = keys[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0 && img < n_images) atomicMin(best_key + img, keys[0]);
}

}  // extern "C"

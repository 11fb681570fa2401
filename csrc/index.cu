// Inverting an index map: inv[b, ids[b, k]] = k, -1 where no slot picked the position.
#include "common.cuh"
#include "ops.h"

namespace mae_fast {

__global__ void invert_index_kernel(const int64_t* __restrict__ ids, int32_t* __restrict__ inv, int64_t batch,
                                    int64_t K, int64_t L) {
  const int64_t n = batch * K;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = i / K, k = i % K, l = ids[i];
    if (l >= 0 && l < L) inv[b * L + l] = static_cast<int32_t>(k);  // out-of-range indices are ignored
  }
}

// ids: [B, K] int64 contiguous, distinct within a row -> [B, length] int32.
at::Tensor invert_index(const at::Tensor& ids, int64_t length) {
  const int64_t B = ids.size(0), K = ids.size(1);
  auto inv = at::full({B, length}, -1, ids.options().dtype(at::kInt));
  if (B * K > 0) {
    invert_index_kernel<<<num_blocks(B * K, 256), 256, 0, current_stream()>>>(
        ids.data_ptr<int64_t>(), inv.data_ptr<int32_t>(), B, K, length);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return inv;
}

bool vectorizable_rows(const at::Tensor& t, int64_t vec) { return vectorizable(t, vec); }

}  // namespace mae_fast

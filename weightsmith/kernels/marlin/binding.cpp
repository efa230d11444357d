// Python binding of weightsmith's CUDA low-bit GEMM (built just-in-time by kernels/cuda_ext.py).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

namespace weightsmith {
template <typename T>
void dispatch(int bits, bool sym, const T* x, const int32_t* p0, const int32_t* p1, const T* s, const T* zs, float* work, T* y,
              const T* bias, int M, int N, int K, int group_size, int sms, cudaStream_t stream);
}

torch::Tensor quant_gemm(torch::Tensor x, torch::Tensor p0, c10::optional<torch::Tensor> p1, torch::Tensor scales,
                         c10::optional<torch::Tensor> zeros_scaled, c10::optional<torch::Tensor> bias, int64_t bits,
                         int64_t group_size, int64_t n) {
  TORCH_CHECK(x.is_cuda() && p0.is_cuda() && scales.is_cuda(), "weightsmith quant_gemm: tensors must be on a CUDA device");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "weightsmith quant_gemm: x must be a contiguous [M, K] matrix");
  TORCH_CHECK(x.scalar_type() == scales.scalar_type(), "weightsmith quant_gemm: x and scales must share a dtype");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "weightsmith quant_gemm: bits must be 2, 3, 4 or 8");
  TORCH_CHECK(bits != 3 || p1.has_value(), "weightsmith quant_gemm: 3-bit weights need their 1-bit plane");
  const int M = x.size(0), K = x.size(1), N = static_cast<int>(n);
  TORCH_CHECK(K % 64 == 0 && N % 8 == 0, "weightsmith quant_gemm: K must be a multiple of 64 and N of 8");
  const at::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({M, N}, x.options());
  auto work = torch::empty({M, N}, x.options().dtype(torch::kFloat32));
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int32_t* p1p = p1.has_value() ? p1->data_ptr<int32_t>() : nullptr;
  const bool sym = !zeros_scaled.has_value();
  if (x.scalar_type() == torch::kHalf) {
    using T = half;
    weightsmith::dispatch<T>(bits, sym, reinterpret_cast<const T*>(x.data_ptr()), p0.data_ptr<int32_t>(), p1p,
                             reinterpret_cast<const T*>(scales.data_ptr()), sym ? nullptr : reinterpret_cast<const T*>(zeros_scaled->data_ptr()),
                             work.data_ptr<float>(), reinterpret_cast<T*>(y.data_ptr()),
                             bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr, M, N, K, group_size, sms, stream);
  } else if (x.scalar_type() == torch::kBFloat16) {
    using T = __nv_bfloat16;
    weightsmith::dispatch<T>(bits, sym, reinterpret_cast<const T*>(x.data_ptr()), p0.data_ptr<int32_t>(), p1p,
                             reinterpret_cast<const T*>(scales.data_ptr()), sym ? nullptr : reinterpret_cast<const T*>(zeros_scaled->data_ptr()),
                             work.data_ptr<float>(), reinterpret_cast<T*>(y.data_ptr()),
                             bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr, M, N, K, group_size, sms, stream);
  } else {
    TORCH_CHECK(false, "weightsmith quant_gemm: activations must be fp16 or bf16");
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("quant_gemm", &quant_gemm, "weightsmith low-bit GEMM (bit-plane layout)"); }

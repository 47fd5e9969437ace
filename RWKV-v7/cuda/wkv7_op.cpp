// Torch binding of the WKV7 kernels (wkv7_cuda.cu): registers two operators,
//   torch.ops.<WKV7_NS>.forward(r, w, k, v, a, b, need_state, cfg) -> (y, sT, sa)
//   torch.ops.<WKV7_NS>.forward_state(r, w, k, v, a, b, s0, cfg) -> (y, s_final)   (inference)
//   torch.ops.<WKV7_NS>.backward(r, w, k, v, a, b, dy, sT, sa, cfg_rows, cfg_cols)
//       -> (dr, dw, dk, dv, da, db)
// All tensors bf16 (B, T, C) contiguous on one CUDA device, C = H * head size,
// T % chunk == 0; sT / sa are the fp32 buffers the forward returns.  cfg < 0
// picks the build's default kernel configuration.  WKV7_NS is set per build
// (head size, chunk length, variant set) by rwkvlm/ops/wkv7/cuda.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>

#ifndef WKV7_NS
#define WKV7_NS wkv7_dev
#endif

int wkv7_launch_forward(int cfg, int B, int T, int H, const void* r, const void* w, const void* k, const void* v,
                        const void* a, const void* b, void* y, float* sa, float* sT, const float* s0, float* s_out,
                        cudaStream_t st);
int wkv7_launch_backward(int cfg_rows, int cfg_cols, int B, int T, int H, const void* r, const void* w,
                         const void* k, const void* v, const void* a, const void* b, const void* dy, const float* sT,
                         const float* sa, float* dsa, void* dr, void* dw, void* dk, void* dv, void* da, void* db,
                         cudaStream_t st);
int wkv7_chunk_len();
int wkv7_head_size();

namespace {

void check_input(const at::Tensor& x, const char* name, const at::Tensor& ref) {
    TORCH_CHECK(x.is_cuda(), "wkv7: ", name, " must be a CUDA tensor");
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "wkv7: ", name, " must be bfloat16, got ", x.scalar_type());
    TORCH_CHECK(x.is_contiguous(), "wkv7: ", name, " must be contiguous");
    TORCH_CHECK(x.sizes() == ref.sizes(), "wkv7: ", name, " has shape ", x.sizes(), ", expected ", ref.sizes());
    TORCH_CHECK(x.device() == ref.device(), "wkv7: ", name, " is on ", x.device(), ", expected ", ref.device());
    TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "wkv7: ", name,
                " must start on a 16-byte boundary (clone it)");
}

void dims(const at::Tensor& r, int& B, int& T, int& H) {
    TORCH_CHECK(r.dim() == 3, "wkv7: inputs must be (B, T, C), got ", r.sizes());
    const int N = wkv7_head_size(), CL = wkv7_chunk_len();
    B = (int)r.size(0);
    T = (int)r.size(1);
    const int64_t C = r.size(2);
    TORCH_CHECK(C % N == 0, "wkv7: C = ", C, " is not a multiple of the head size ", N);
    TORCH_CHECK(T % CL == 0, "wkv7: T = ", T, " is not a multiple of the chunk length ", CL);
    TORCH_CHECK(T > 0 && B > 0, "wkv7: empty input ", r.sizes());
    H = (int)(C / N);
}

void check_rc(int rc, const char* what) {
    TORCH_CHECK(rc != -1, "wkv7 ", what, ": kernel configuration not compiled in this build");
    TORCH_CHECK(rc == 0, "wkv7 ", what, ": CUDA error ", cudaGetErrorString((cudaError_t)rc));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> wkv7_forward(const at::Tensor& r, const at::Tensor& w,
                                                            const at::Tensor& k, const at::Tensor& v,
                                                            const at::Tensor& a, const at::Tensor& b,
                                                            bool need_state, int64_t cfg) {
    int B, T, H;
    dims(r, B, T, H);
    check_input(r, "r", r); check_input(w, "w", r); check_input(k, "k", r);
    check_input(v, "v", r); check_input(a, "a", r); check_input(b, "b", r);
    const c10::cuda::CUDAGuard guard(r.device());
    const int N = wkv7_head_size(), CL = wkv7_chunk_len();
    auto y = at::empty_like(r);
    auto f32 = r.options().dtype(at::kFloat);
    at::Tensor sT, sa;
    if (need_state) {
        sT = at::empty({B, H, T / CL, N, N}, f32);
        sa = at::empty({B, T, H * N}, f32);
    } else {
        sT = at::empty({0}, f32);
        sa = at::empty({B, T, H * N}, f32);   // the kernel always writes sa
    }
    auto st = c10::cuda::getCurrentCUDAStream(r.device().index()).stream();
    int rc = wkv7_launch_forward((int)cfg, B, T, H, r.data_ptr(), w.data_ptr(), k.data_ptr(), v.data_ptr(),
                                 a.data_ptr(), b.data_ptr(), y.data_ptr(), sa.data_ptr<float>(),
                                 need_state ? sT.data_ptr<float>() : nullptr, nullptr, nullptr, st);
    check_rc(rc, "forward");
    return {y, sT, sa};
}

// Inference: y and the final state from the initial state s0 ((B, H, N, N) fp32 contiguous,
// row i = value channel, column j = key channel); no buffers for a backward pass.
std::tuple<at::Tensor, at::Tensor> wkv7_forward_state(const at::Tensor& r, const at::Tensor& w,
                                                      const at::Tensor& k, const at::Tensor& v,
                                                      const at::Tensor& a, const at::Tensor& b,
                                                      const at::Tensor& s0, int64_t cfg) {
    int B, T, H;
    dims(r, B, T, H);
    check_input(r, "r", r); check_input(w, "w", r); check_input(k, "k", r);
    check_input(v, "v", r); check_input(a, "a", r); check_input(b, "b", r);
    const int N = wkv7_head_size();
    TORCH_CHECK(s0.is_cuda() && s0.device() == r.device() && s0.scalar_type() == at::kFloat && s0.is_contiguous() &&
                    s0.dim() == 4 && s0.size(0) == B && s0.size(1) == H && s0.size(2) == N && s0.size(3) == N,
                "wkv7 forward_state: initial state must be (B, H, N, N) = (", B, ", ", H, ", ", N, ", ", N,
                ") float32 contiguous on r's device, got ", s0.sizes(), " ", s0.scalar_type());
    const c10::cuda::CUDAGuard guard(r.device());
    auto y = at::empty_like(r);
    auto sa = at::empty({B, T, H * N}, r.options().dtype(at::kFloat));  // the kernel always writes sa
    auto s_out = at::empty_like(s0);
    auto st = c10::cuda::getCurrentCUDAStream(r.device().index()).stream();
    int rc = wkv7_launch_forward((int)cfg, B, T, H, r.data_ptr(), w.data_ptr(), k.data_ptr(), v.data_ptr(),
                                 a.data_ptr(), b.data_ptr(), y.data_ptr(), sa.data_ptr<float>(), nullptr,
                                 s0.data_ptr<float>(), s_out.data_ptr<float>(), st);
    check_rc(rc, "forward_state");
    return {y, s_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv7_backward(
    const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& dy, const at::Tensor& sT, const at::Tensor& sa, int64_t cfg_rows,
    int64_t cfg_cols) {
    int B, T, H;
    dims(r, B, T, H);
    check_input(r, "r", r); check_input(w, "w", r); check_input(k, "k", r);
    check_input(v, "v", r); check_input(a, "a", r); check_input(b, "b", r);
    check_input(dy, "dy", r);
    const int N = wkv7_head_size(), CL = wkv7_chunk_len();
    TORCH_CHECK(sT.is_cuda() && sT.scalar_type() == at::kFloat && sT.is_contiguous() &&
                    sT.numel() == (int64_t)B * H * (T / CL) * N * N,
                "wkv7 backward: saved state has the wrong shape/dtype ", sT.sizes());
    TORCH_CHECK(sa.is_cuda() && sa.scalar_type() == at::kFloat && sa.is_contiguous() && sa.numel() == r.numel(),
                "wkv7 backward: saved sa has the wrong shape/dtype ", sa.sizes());
    const c10::cuda::CUDAGuard guard(r.device());
    auto dr = at::empty_like(r), dw = at::empty_like(r), dk = at::empty_like(r);
    auto dv = at::empty_like(r), da = at::empty_like(r), db = at::empty_like(r);
    auto dsa = at::empty(r.sizes(), r.options().dtype(at::kFloat));
    auto st = c10::cuda::getCurrentCUDAStream(r.device().index()).stream();
    int rc = wkv7_launch_backward((int)cfg_rows, (int)cfg_cols, B, T, H, r.data_ptr(), w.data_ptr(), k.data_ptr(),
                                  v.data_ptr(), a.data_ptr(), b.data_ptr(), dy.data_ptr(), sT.data_ptr<float>(),
                                  sa.data_ptr<float>(), dsa.data_ptr<float>(), dr.data_ptr(), dw.data_ptr(),
                                  dk.data_ptr(), dv.data_ptr(), da.data_ptr(), db.data_ptr(), st);
    check_rc(rc, "backward");
    return {dr, dw, dk, dv, da, db};
}

int64_t wkv7_info_chunk() { return wkv7_chunk_len(); }
int64_t wkv7_info_head_size() { return wkv7_head_size(); }

}  // namespace

// Two-level macro so that WKV7_NS is expanded before TORCH_LIBRARY pastes it.
#define WKV7_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
WKV7_LIBRARY(WKV7_NS, m) {
    m.def("forward", &wkv7_forward);
    m.def("forward_state", &wkv7_forward_state);
    m.def("backward", &wkv7_backward);
    m.def("chunk_len", &wkv7_info_chunk);
    m.def("head_size", &wkv7_info_head_size);
}

// Torch binding of the WKV6 kernels (wkv6_cuda.cu): registers three operators,
//   torch.ops.<WKV6_NS>.forward(r, k, v, w, u, cfg) -> y                       (training, zero state)
//   torch.ops.<WKV6_NS>.forward_state(r, k, v, w, u, s0, cfg) -> (y, s_final)  (inference)
//   torch.ops.<WKV6_NS>.backward(r, k, v, w, u, dy, cfg_rows, cfg_cols) -> (dr, dk, dv, dw, du)
// r, k, v, w, dy: bf16 (B, T, C) contiguous on one CUDA device, C = H * head size,
// T % chunk == 0; u: fp32 (C,) contiguous; states: fp32 (B, H, N, N) contiguous, row i =
// value channel, column j = key channel. dr, dk, dv, dw come back in bf16, du in fp32 (C,)
// (summed over the batch). cfg < 0 picks the build's default kernel configuration.
// WKV6_NS is set per build (head size, chunk length, variant set) by rwkvlm/ops/wkv6/cuda.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#ifndef WKV6_NS
#define WKV6_NS wkv6_dev
#endif

int wkv6_launch_forward(int cfg, int B, int T, int H, const void* r, const void* k, const void* v, const void* w,
                        const float* u, void* y, const float* s0, float* s_out, cudaStream_t st);
int wkv6_launch_backward_cols(int cfg_cols, int B, int T, int H, const void* r, const void* k, const void* v,
                              const void* w, const float* u, const void* dy, float* P, void* dr, void* dk,
                              void* dw, float* du_b, cudaStream_t st);
int wkv6_launch_backward_rows(int cfg_rows, int B, int T, int H, const void* r, const void* k, const void* w,
                              const float* u, const void* dy, void* dv, cudaStream_t st);
int wkv6_chunk_len();
int wkv6_head_size();

namespace {

void check_input(const at::Tensor& x, const char* name, const at::Tensor& ref) {
    TORCH_CHECK(x.is_cuda(), "wkv6: ", name, " must be a CUDA tensor");
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "wkv6: ", name, " must be bfloat16, got ", x.scalar_type());
    TORCH_CHECK(x.is_contiguous(), "wkv6: ", name, " must be contiguous");
    TORCH_CHECK(x.sizes() == ref.sizes(), "wkv6: ", name, " has shape ", x.sizes(), ", expected ", ref.sizes());
    TORCH_CHECK(x.device() == ref.device(), "wkv6: ", name, " is on ", x.device(), ", expected ", ref.device());
    TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "wkv6: ", name,
                " must start on a 16-byte boundary (clone it)");
}

void check_u(const at::Tensor& u, const at::Tensor& r) {
    TORCH_CHECK(u.is_cuda() && u.device() == r.device(), "wkv6: u must be on r's device ", r.device());
    TORCH_CHECK(u.scalar_type() == at::kFloat, "wkv6: u must be float32, got ", u.scalar_type());
    TORCH_CHECK(u.is_contiguous() && u.dim() == 1 && u.size(0) == r.size(2), "wkv6: u must be contiguous (C,) = (",
                r.size(2), ",), got ", u.sizes());
}

void dims(const at::Tensor& r, int& B, int& T, int& H) {
    TORCH_CHECK(r.dim() == 3, "wkv6: inputs must be (B, T, C), got ", r.sizes());
    const int N = wkv6_head_size(), CL = wkv6_chunk_len();
    B = (int)r.size(0);
    T = (int)r.size(1);
    const int64_t C = r.size(2);
    TORCH_CHECK(C % N == 0, "wkv6: C = ", C, " is not a multiple of the head size ", N);
    TORCH_CHECK(T % CL == 0, "wkv6: T = ", T, " is not a multiple of the chunk length ", CL);
    TORCH_CHECK(T > 0 && B > 0, "wkv6: empty input ", r.sizes());
    H = (int)(C / N);
}

void check_all(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
               const at::Tensor& u) {
    check_input(r, "r", r); check_input(k, "k", r); check_input(v, "v", r); check_input(w, "w", r);
    check_u(u, r);
}

void check_rc(int rc, const char* what) {
    TORCH_CHECK(rc != -1, "wkv6 ", what, ": kernel configuration not compiled in this build");
    TORCH_CHECK(rc == 0, "wkv6 ", what, ": CUDA error ", cudaGetErrorString((cudaError_t)rc));
}

at::Tensor wkv6_forward(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                        const at::Tensor& u, int64_t cfg) {
    int B, T, H;
    dims(r, B, T, H);
    check_all(r, k, v, w, u);
    const c10::cuda::CUDAGuard guard(r.device());
    auto y = at::empty_like(r);
    auto st = c10::cuda::getCurrentCUDAStream(r.device().index()).stream();
    int rc = wkv6_launch_forward((int)cfg, B, T, H, r.data_ptr(), k.data_ptr(), v.data_ptr(), w.data_ptr(),
                                 u.data_ptr<float>(), y.data_ptr(), nullptr, nullptr, st);
    check_rc(rc, "forward");
    return y;
}

// Inference: y and the final state from the initial state s0 ((B, H, N, N) fp32 contiguous,
// row i = value channel, column j = key channel).
std::tuple<at::Tensor, at::Tensor> wkv6_forward_state(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                                                      const at::Tensor& w, const at::Tensor& u, const at::Tensor& s0,
                                                      int64_t cfg) {
    int B, T, H;
    dims(r, B, T, H);
    check_all(r, k, v, w, u);
    const int N = wkv6_head_size();
    TORCH_CHECK(s0.is_cuda() && s0.device() == r.device() && s0.scalar_type() == at::kFloat && s0.is_contiguous() &&
                    s0.dim() == 4 && s0.size(0) == B && s0.size(1) == H && s0.size(2) == N && s0.size(3) == N,
                "wkv6 forward_state: initial state must be (B, H, N, N) = (", B, ", ", H, ", ", N, ", ", N,
                ") float32 contiguous on r's device, got ", s0.sizes(), " ", s0.scalar_type());
    const c10::cuda::CUDAGuard guard(r.device());
    auto y = at::empty_like(r);
    auto s_out = at::empty_like(s0);
    auto st = c10::cuda::getCurrentCUDAStream(r.device().index()).stream();
    int rc = wkv6_launch_forward((int)cfg, B, T, H, r.data_ptr(), k.data_ptr(), v.data_ptr(), w.data_ptr(),
                                 u.data_ptr<float>(), y.data_ptr(), s0.data_ptr<float>(), s_out.data_ptr<float>(), st);
    check_rc(rc, "forward_state");
    return {y, s_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv6_backward(
    const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w, const at::Tensor& u,
    const at::Tensor& dy, int64_t cfg_rows, int64_t cfg_cols) {
    int B, T, H;
    dims(r, B, T, H);
    check_all(r, k, v, w, u);
    check_input(dy, "dy", r);
    const c10::cuda::CUDAGuard guard(r.device());
    auto dr = at::empty_like(r), dk = at::empty_like(r), dv = at::empty_like(r), dw = at::empty_like(r);
    auto f32 = r.options().dtype(at::kFloat);
    auto P = at::empty(r.sizes(), f32);                 // fp32 scratch, fully written by the dr pass
    auto du_b = at::empty({B, r.size(2)}, f32);          // du per batch entry, fully written by the dk pass
    // dv does not depend on the dr -> dk passes: it runs on a side stream, forked from and
    // joined back into the current one (so everything after this call is ordered after both)
    const auto dev = r.device().index();
    const cudaStream_t main = c10::cuda::getCurrentCUDAStream(dev).stream();
    const cudaStream_t side = c10::cuda::getStreamFromPool(false, dev).stream();
    cudaEvent_t fork, join;
    check_rc((int)cudaEventCreateWithFlags(&fork, cudaEventDisableTiming), "backward (event)");
    check_rc((int)cudaEventCreateWithFlags(&join, cudaEventDisableTiming), "backward (event)");
    int rc_ev = (int)cudaEventRecord(fork, main);
    if (rc_ev == 0) rc_ev = (int)cudaStreamWaitEvent(side, fork, 0);
    int rc_rows = rc_ev != 0 ? rc_ev
                             : wkv6_launch_backward_rows((int)cfg_rows, B, T, H, r.data_ptr(), k.data_ptr(),
                                                         w.data_ptr(), u.data_ptr<float>(), dy.data_ptr(),
                                                         dv.data_ptr(), side);
    int rc_cols = wkv6_launch_backward_cols((int)cfg_cols, B, T, H, r.data_ptr(), k.data_ptr(), v.data_ptr(),
                                            w.data_ptr(), u.data_ptr<float>(), dy.data_ptr(), P.data_ptr<float>(),
                                            dr.data_ptr(), dk.data_ptr(), dw.data_ptr(), du_b.data_ptr<float>(),
                                            main);
    int rc_join = (int)cudaEventRecord(join, side);
    if (rc_join == 0) rc_join = (int)cudaStreamWaitEvent(main, join, 0);
    cudaEventDestroy(fork);   // released once the pending work has used them
    cudaEventDestroy(join);
    check_rc(rc_rows, "backward (dv)");
    check_rc(rc_cols, "backward (dr, dk, dw, du)");
    check_rc(rc_join, "backward (join)");
    return {dr, dk, dv, dw, du_b.sum(0)};
}

int64_t wkv6_info_chunk() { return wkv6_chunk_len(); }
int64_t wkv6_info_head_size() { return wkv6_head_size(); }

}  // namespace

// Two-level macro so that WKV6_NS is expanded before TORCH_LIBRARY pastes it.
#define WKV6_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
WKV6_LIBRARY(WKV6_NS, m) {
    m.def("forward", &wkv6_forward);
    m.def("forward_state", &wkv6_forward_state);
    m.def("backward", &wkv6_backward);
    m.def("chunk_len", &wkv6_info_chunk);
    m.def("head_size", &wkv6_info_head_size);
}

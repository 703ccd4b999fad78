// oneDNN's CPU convolution for ega_jax's students, as three XLA FFI handlers.
//
// XLA:CPU (jaxlib 0.10.2) hands every convolution to YNNPACK, which runs a convolution that
// sits alone in its fusion on one core (docs/performance.md, "YNNPACK runs a lone convolution
// on one core"); oneDNN, the library PyTorch's CPU convolutions use, runs it on all of them.
// ega_jax/models/onednn.py compiles this file against the onednn-cpu-gomp wheel and registers
// the handlers; ega_jax/models/conv.py calls them for float32, ungrouped convolutions on CPU.
//
// Every operand is rank 4 (the binding checks it). Layouts are JAX's: activations NHWC (B, H, W, C), kernels HWIO (k, k, C, O), both float32
// and dense row-major. oneDNN picks its own (blocked) kernel layout ("any"); the HWIO kernel
// is reordered into it, or out of it for the weight gradient, on every call (k*k*C*O values:
// small next to the activations). Attributes: stride and the four zero paddings.
#include <cstdint>

#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace {

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;
using DataType = memory::data_type;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One convolution's shapes in oneDNN's logical order (NCHW, OIHW) plus its window.
struct Geometry {
  memory::dims src, weights, dst, strides, pad_before, pad_after, dilation;
  memory::desc SrcDesc() const { return {src, DataType::f32, Tag::nhwc}; }
  memory::desc DstDesc() const { return {dst, DataType::f32, Tag::nhwc}; }
  memory::desc AnyWeightsDesc() const { return {weights, DataType::f32, Tag::any}; }
  memory::desc HwioWeightsDesc() const { return {weights, DataType::f32, Tag::hwio}; }
};

// x: (B, H, W, C); kernel: (k, k, C, O); y: (B, H', W', O).
Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> kernel,
                      ffi::Span<const int64_t> y, int64_t stride, int64_t pad_top,
                      int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  Geometry g;
  g.src = {x[0], x[3], x[1], x[2]};
  g.weights = {kernel[3], kernel[2], kernel[0], kernel[1]};
  g.dst = {y[0], y[3], y[1], y[2]};
  g.strides = {stride, stride};
  g.pad_before = {pad_top, pad_left};
  g.pad_after = {pad_bottom, pad_right};
  g.dilation = {0, 0};
  return g;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      g.SrcDesc(), g.AnyWeightsDesc(), g.DstDesc(), g.strides, g.dilation, g.pad_before,
      g.pad_after);
}

// The kernel in the layout `wanted`: the HWIO buffer itself, or a reordered copy.
memory KernelIn(const memory::desc& wanted, const Geometry& g, float* hwio, dnnl::stream& s) {
  memory user(g.HwioWeightsDesc(), Engine(), hwio);
  if (wanted == user.get_desc()) return user;
  memory reordered(wanted, Engine());
  dnnl::reorder(user, reordered).execute(s, user, reordered);
  return reordered;
}

ffi::Error Forward(ffi::BufferR4<ffi::F32> x, ffi::BufferR4<ffi::F32> kernel,
                   ffi::ResultBufferR4<ffi::F32> y, int64_t stride, int64_t pad_top,
                   int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  Geometry g = MakeGeometry(x.dimensions(), kernel.dimensions(), y->dimensions(), stride,
                            pad_top, pad_bottom, pad_left, pad_right);
  auto desc = ForwardDesc(g);
  dnnl::stream s(Engine());
  memory src(desc.src_desc(), Engine(), x.typed_data());
  memory dst(desc.dst_desc(), Engine(), y->typed_data());
  memory weights = KernelIn(desc.weights_desc(), g, kernel.typed_data(), s);
  dnnl::convolution_forward(desc).execute(
      s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst}});
  s.wait();
  return ffi::Error::Success();
}

ffi::Error InputGrad(ffi::BufferR4<ffi::F32> out_grad, ffi::BufferR4<ffi::F32> kernel,
                     ffi::ResultBufferR4<ffi::F32> x_grad, int64_t stride, int64_t pad_top,
                     int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  Geometry g = MakeGeometry(x_grad->dimensions(), kernel.dimensions(), out_grad.dimensions(),
                            stride, pad_top, pad_bottom, pad_left, pad_right);
  dnnl::convolution_backward_data::primitive_desc desc(
      Engine(), dnnl::algorithm::convolution_direct, g.SrcDesc(), g.AnyWeightsDesc(),
      g.DstDesc(), g.strides, g.dilation, g.pad_before, g.pad_after, ForwardDesc(g));
  dnnl::stream s(Engine());
  memory diff_src(desc.diff_src_desc(), Engine(), x_grad->typed_data());
  memory diff_dst(desc.diff_dst_desc(), Engine(), out_grad.typed_data());
  memory weights = KernelIn(desc.weights_desc(), g, kernel.typed_data(), s);
  dnnl::convolution_backward_data(desc).execute(
      s, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DIFF_SRC, diff_src}});
  s.wait();
  return ffi::Error::Success();
}

ffi::Error KernelGrad(ffi::BufferR4<ffi::F32> x, ffi::BufferR4<ffi::F32> out_grad,
                      ffi::ResultBufferR4<ffi::F32> kernel_grad, int64_t stride, int64_t pad_top,
                      int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  Geometry g = MakeGeometry(x.dimensions(), kernel_grad->dimensions(), out_grad.dimensions(),
                            stride, pad_top, pad_bottom, pad_left, pad_right);
  dnnl::convolution_backward_weights::primitive_desc desc(
      Engine(), dnnl::algorithm::convolution_direct, g.SrcDesc(), g.AnyWeightsDesc(),
      g.DstDesc(), g.strides, g.dilation, g.pad_before, g.pad_after, ForwardDesc(g));
  dnnl::stream s(Engine());
  memory src(desc.src_desc(), Engine(), x.typed_data());
  memory diff_dst(desc.diff_dst_desc(), Engine(), out_grad.typed_data());
  memory hwio(g.HwioWeightsDesc(), Engine(), kernel_grad->typed_data());
  bool reorder_out = desc.diff_weights_desc() != hwio.get_desc();
  memory diff_weights = reorder_out ? memory(desc.diff_weights_desc(), Engine()) : hwio;
  dnnl::convolution_backward_weights(desc).execute(
      s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_DIFF_WEIGHTS, diff_weights}});
  if (reorder_out) dnnl::reorder(diff_weights, hwio).execute(s, diff_weights, hwio);
  s.wait();
  return ffi::Error::Success();
}

// Exceptions must not cross into XLA: a oneDNN error becomes an FFI error.
template <auto Fn, typename... Args>
ffi::Error Guarded(Args... args) {
  try {
    return Fn(args...);
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN conv: ") + e.what());
  }
}

}  // namespace

#define EGA_CONV_BINDING                                                          \
  ffi::Ffi::Bind()                                                                \
      .Arg<ffi::BufferR4<ffi::F32>>()                                               \
      .Arg<ffi::BufferR4<ffi::F32>>()                                               \
      .Ret<ffi::BufferR4<ffi::F32>>()                                               \
      .Attr<int64_t>("stride")                                                    \
      .Attr<int64_t>("pad_top")                                                   \
      .Attr<int64_t>("pad_bottom")                                                \
      .Attr<int64_t>("pad_left")                                                  \
      .Attr<int64_t>("pad_right")


XLA_FFI_DEFINE_HANDLER_SYMBOL(
    ega_onednn_conv_forward,
    (Guarded<Forward, ffi::BufferR4<ffi::F32>, ffi::BufferR4<ffi::F32>, ffi::ResultBufferR4<ffi::F32>,
             int64_t, int64_t, int64_t, int64_t, int64_t>),
    EGA_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    ega_onednn_conv_input_grad,
    (Guarded<InputGrad, ffi::BufferR4<ffi::F32>, ffi::BufferR4<ffi::F32>, ffi::ResultBufferR4<ffi::F32>,
             int64_t, int64_t, int64_t, int64_t, int64_t>),
    EGA_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    ega_onednn_conv_kernel_grad,
    (Guarded<KernelGrad, ffi::BufferR4<ffi::F32>, ffi::BufferR4<ffi::F32>,
             ffi::ResultBufferR4<ffi::F32>, int64_t, int64_t, int64_t, int64_t, int64_t>),
    EGA_CONV_BINDING);

// Every op schema of the icnet namespace, defined once. Device kernels register beside their sources.
#include <torch/library.h>

TORCH_LIBRARY(icnet, m) {
  // out = x + sum_b resize(avgpool_b(x)). kernel_sizes/strides: empty for adaptive pooling, else one
  // (kh, kw) / (sh, sw) pair per bin, flattened.
  m.def("pyramid_pool_sum(Tensor x, int[] bins, int[] kernel_sizes, int[] strides, bool align_corners) -> Tensor");
  // The adjoint of pyramid_pool_sum applied to grad_out (the op is linear, so this is its whole backward).
  m.def(
      "pyramid_pool_sum_backward(Tensor grad_out, int[] bins, int[] kernel_sizes, int[] strides, "
      "bool align_corners) -> Tensor");
  // out = relu(conv3x3(resize(low, high's HxW), weight_low, dilation, padding=dilation) + weight_high . high + bias):
  // cascade feature fusion with both BatchNorms folded into the weights and one bias. weight_low
  // [Co, Cl, 3, 3], weight_high [Co, Ch], bias [Co]; bilinear resize with the given align_corners.
  m.def(
      "cascade_feature_fusion(Tensor low, Tensor high, Tensor weight_low, Tensor weight_high, Tensor bias, "
      "int dilation, bool align_corners) -> Tensor");
  // ICNet's head: bilinear_zoom(conv1x1(features, weight) + bias, zoom), align_corners, output (h-1)*zoom+1
  // by (w-1)*zoom+1, in features' dtype and layout; weight [C, K], bias [C]. The labels variant returns the
  // argmax over the classes as uint8 [N, H, W] and never writes the logits. Inference only.
  m.def("segmentation_head(Tensor features, Tensor weight, Tensor bias, int zoom) -> Tensor");
  m.def("segmentation_head_labels(Tensor features, Tensor weight, Tensor bias, int zoom) -> Tensor");
  // A copy of x (contiguous in NCHW or channels_last) in the other of the two layouts, by a cache-blocked
  // transpose: the CPU layout switches of the fused build's inference. Internal: no autograd, no meta kernel.
  m.def("_relayout(Tensor x, bool channels_last) -> Tensor");
  // conv2d(input, weight, padding=1) for a [Co, C, 3, 3] weight by Winograd's F(2x2, 3x3), float32, CPU:
  // the CPU CFF kernel's low-resolution convolution, exposed for its tests and measurements. Internal: no
  // autograd and no meta kernel.
  m.def("_conv3x3_winograd(Tensor input, Tensor weight) -> Tensor");
}

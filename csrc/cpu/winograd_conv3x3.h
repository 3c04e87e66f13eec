#pragma once
// 3x3 convolution, stride 1, padding 1, dilation 1, by Winograd's minimal filtering F(2x2, 3x3) (Lavin and
// Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): each 2x2 output tile is
// A^T [(G g G^T) . (B^T d B)] A for its 4x4 input window d, so a tile costs 16 multiplies per channel pair
// instead of 36. The 16 elementwise products summed over input channels are 16 independent matrix
// products; they run as one grouped 1x1 convolution through ATen (oneDNN on x86), on data laid out
// channels-last so that no reorder precedes it.
//
// The transforms read and write 4x the data of the direct convolution's input and output, so they pay only
// while that data stays in cache; see winograd_f2_pays.
//
// Numerics: the transforms add and halve, so the float32 error stays within a small multiple of the direct
// convolution's. NaN reaches exactly the outputs whose 3x3 window holds it, as in the direct convolution
// (each input position enters only the transformed terms of the outputs it is a tap of); an infinite input
// may instead give NaN where its differences with other values meet.
#include <ATen/core/Tensor.h>

namespace icnet {

// input [N, C, h, w] and weight [Co, C, 3, 3], both float32 (any strides); returns [N, Co, h, w] float32,
// contiguous.
at::Tensor conv3x3_winograd_f2(const at::Tensor& input, const at::Tensor& weight);

// Whether conv3x3_winograd_f2 is expected to beat ATen's direct convolution on this input: when its
// transformed input and products, 16 floats per tile and channel, fit in 16 MiB: beyond that the transforms
// stream from memory and lose (the README gives the measurements the threshold comes from).
bool winograd_f2_pays(const at::Tensor& input, int64_t out_channels);

}  // namespace icnet

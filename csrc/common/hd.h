#pragma once
// Marks index math that both the C++ CPU kernels and the CUDA kernels call.
#ifdef __CUDACC__
#define ICNET_HD __host__ __device__ __forceinline__
#else
#define ICNET_HD inline
#endif

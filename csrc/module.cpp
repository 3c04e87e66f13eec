// The Python module icnet_kernels._C. Importing it runs the static op registrations; it has no functions
// of its own, so it needs no Python binding library.
#include <Python.h>

#ifdef ICNET_WITH_CUDA
#define ICNET_WITH_CUDA_FLAG 1
#else
#define ICNET_WITH_CUDA_FLAG 0
#endif

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  // The torch release this module was compiled against, so the package can tell a stale build.
  if (PyModule_AddStringConstant(m, "built_with_torch", ICNET_TORCH_VERSION) < 0 ||
      PyModule_AddIntConstant(m, "with_cuda", ICNET_WITH_CUDA_FLAG) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

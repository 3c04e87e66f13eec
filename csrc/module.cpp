// The Python module icnet_kernels._C. Importing it runs the static op registrations. Its functions are the
// inference arena's (csrc/cpu/inference_arena.h), which are not tensor ops; it uses Python's C API alone.
#include <Python.h>

#include "cpu/inference_arena.h"

#ifdef ICNET_WITH_CUDA
#define ICNET_WITH_CUDA_FLAG 1
#else
#define ICNET_WITH_CUDA_FLAG 0
#endif

namespace {

PyObject* arena_enter(PyObject*, PyObject*) { return PyBool_FromLong(icnet::arena::enter()); }

PyObject* arena_exit(PyObject*, PyObject*) {
  icnet::arena::exit();
  Py_RETURN_NONE;
}

PyObject* arena_release(PyObject*, PyObject*) { return PyLong_FromSize_t(icnet::arena::release()); }

PyObject* arena_cached_bytes(PyObject*, PyObject*) { return PyLong_FromSize_t(icnet::arena::cached_bytes()); }

PyMethodDef methods[] = {
    {"arena_enter", arena_enter, METH_NOARGS, "Opens an inference arena scope on this thread; False if unavailable."},
    {"arena_exit", arena_exit, METH_NOARGS, "Closes this thread's innermost inference arena scope."},
    {"arena_release", arena_release, METH_NOARGS, "Frees the arena's cached blocks; returns the bytes freed."},
    {"arena_cached_bytes", arena_cached_bytes, METH_NOARGS, "Bytes of freed blocks the arena holds."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
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

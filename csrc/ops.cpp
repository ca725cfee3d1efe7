// The t2t_fast operator library: the operator schemas (the source of truth: each op's descriptor in
// t2t_fast/ops/<op>.py repeats them for the Triton operators, and tests/test_op_contracts.py checks they match), the
// Python module t2t_fast._C (importing it registers the operators), and the poison testing aid.
//
// Kernels: csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL CPU) and csrc/cuda/registration.cpp (TORCH_LIBRARY_IMPL CUDA).
// Fake functions and autograd are registered from Python (t2t_fast/ops/descriptor.py) once this module loads.
#include <Python.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <atomic>
#include <limits>

#include "common.h"

namespace t2t_fast {
namespace {
std::atomic<bool> g_poison{false};
}  // namespace

bool poison_enabled() { return g_poison.load(std::memory_order_relaxed); }

namespace {
at::Tensor poisoned(at::Tensor t) {
  if (poison_enabled() && at::isFloatingType(t.scalar_type())) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return t;
}
}  // namespace

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return poisoned(at::empty(sizes, options));
}

at::Tensor new_output_like(const at::Tensor& t) { return poisoned(at::empty_like(t)); }

}  // namespace t2t_fast

TORCH_LIBRARY(t2t_fast, m) {
  m.def(
      "soft_split_forward(Tensor x, int[] kernel_size, int[] stride, int[] padding, Tensor weight, Tensor? bias, "
      "Tensor? norm_weight, Tensor? norm_bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "soft_split_backward(Tensor grad_y, Tensor x, int[] kernel_size, int[] stride, int[] padding, Tensor weight, "
      "Tensor? bias, Tensor? norm_weight, Tensor? norm_bias, Tensor? y, Tensor mean, Tensor rstd, "
      "bool compute_grad_x) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("performer_forward(Tensor q, Tensor k, Tensor v, Tensor w, float eps) -> (Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
  m.def(
      "performer_backward(Tensor grad_y, Tensor q, Tensor k, Tensor v, Tensor w, Tensor kv, Tensor ksum, "
      "Tensor kmax, Tensor denom) -> (Tensor, Tensor, Tensor)");
}

namespace {

PyObject* set_poison(PyObject*, PyObject* arg) {
  if (!PyBool_Check(arg)) {
    PyErr_Format(PyExc_TypeError, "_set_poison expects a bool, got %s", Py_TYPE(arg)->tp_name);
    return nullptr;
  }
  t2t_fast::g_poison.store(arg == Py_True);
  Py_RETURN_NONE;
}

PyObject* poison(PyObject*, PyObject*) { return PyBool_FromLong(t2t_fast::poison_enabled()); }

PyMethodDef methods[] = {
    {"_set_poison", set_poison, METH_O,
     "_set_poison(on: bool): NaN-fill every output the kernels allocate (a testing aid)."},
    {"_poison", poison, METH_NOARGS, "_poison() -> bool: whether poisoning is on."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "t2t-fast C++ extension: importing it registers the torch.ops.t2t_fast operators.", -1,
                          methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
#ifdef T2T_FAST_WITH_CUDA
  constexpr bool with_cuda = true;
#else
  constexpr bool with_cuda = false;
#endif
  // with_cuda (0 or 1): whether the CUDA kernels were compiled in (t2t_fast.backends reads it)
  if (module != nullptr && PyModule_AddIntConstant(module, "with_cuda", with_cuda) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

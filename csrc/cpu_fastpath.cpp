// lkconv._cpu_fast: the remembered delegated CPU call in C++ (see lkconv/ops.py, "the delegated eager
// CPU call, remembered").
//
// Where lkconv.depthwise_conv2d delegates a CPU call to F.conv2d (every pass PyTorch's own kernel), the
// call's own work is deciding that.  lkconv/ops.py remembers each decision under every fact it read;
// in Python the key alone costs ~2.5 us hot but 20-70 us right after a multi-millisecond convolution
// (measured on the 2-vCPU dev box: the interpreter and the ~20 getters it calls run cache-cold), 2-7 %
// of a 1-4 ms K=3..13 forward.  This module keeps the same remembered decisions and checks a call
// against them in one C++ function: the tensors' facts straight from at::Tensor, the mode checks from
// their C++ thread-locals, the Python-level settings from their module dicts; on a hit it runs
// at::conv2d (what F.conv2d runs) with the GIL released and returns the result; on a miss it returns
// None and the Python path decides (and calls remember()).
//
// The facts (one list, the same as lkconv.ops.delegation_key's; tests/test_cpu_delegation_cache.py checks
// that every one of them changes the outcome):
//   x, weight, bias: exact torch.Tensor / nn.Parameter (bias may be None), strided (not sparse, mkldnn or
//   nested: left to the Python path), x 4-D on the CPU; their
//   shapes, x's strides, dtypes, the weight's and bias's device, which of them autograd will need;
//   stride / padding / dilation: an int, a pair of ints or (padding) a string; backend: None or a string;
//   not under torch.jit tracing, a TorchDispatchMode, a TorchFunctionMode, the autograd profiler, a
//   functorch transform, forward AD or any autocast region (the Python wrapper checks
//   torch.compiler.is_compiling() before calling); lkconv.ops.EAGER_FAST_PATH true; the backends'
//   use_backend override, default backend, auto chain for "cpu" (a tuple: a list could change in place
//   under an entry), the cpu backend's instance, its path attribute and its class's delegates_to_torch,
//   the cpu backend's FORCE_PATH; the intra-op thread count.
// State facts that are not the very objects of an entry are compared with ==, which may run Python code
// (an __eq__, a finalizer) that changes the store: every scan of the entries checks `generation` after
// each comparison and stops (a miss) when the store changed.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/conv2d.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/MemoryFormat.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/profiler/orchestration/observer.h>

#include <array>
#include <vector>

namespace {

constexpr int kStateItems = 7;  // use_backend override, default backend, auto chain, instance, rule, FORCE_PATH,
                                // the instance's path
constexpr size_t kMaxEntries = 512;  // as lkconv.ops._DELEGATED_MAX: then forget all and start again

// an int / pair argument (kind 0 / 1) or a string (kind 2, the padding only)
struct Arg {
  int kind = -1;
  int64_t a = 0, b = 0;
  PyObject* s = nullptr;  // owned, kind 2
};

struct TensorFacts {
  std::array<int64_t, 4> sizes{};
  std::array<int64_t, 4> strides{};
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  bool cpu = false;
  bool requires_grad = false;
  int64_t bias_len = -1;  // the bias: its one size (-1: no bias)
};

struct Facts {
  TensorFacts x, w, b;
  Arg stride, padding, dilation;
  PyObject* backend = nullptr;  // owned; nullptr: None
  std::array<PyObject*, kStateItems> state{};  // owned (nullptr: absent)
  int threads = 0;
};

struct Entry {
  Facts facts;
  std::array<int64_t, 2> stride{}, padding{}, dilation{};
  int64_t groups = 0;
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
};

struct Globals {
  PyTypeObject* tensor_type = nullptr;
  PyTypeObject* param_type = nullptr;
  PyObject* ops_dict = nullptr;  // lkconv.ops.__dict__
  PyObject* backends_dict = nullptr;  // lkconv.backends.__dict__
  PyObject* cpu_dict = nullptr;  // lkconv.backends.cpu.__dict__
  PyObject* fwd_ad_dict = nullptr;  // torch.autograd.forward_ad.__dict__
  PyObject* s_eager = nullptr;
  PyObject* s_level = nullptr;
  PyObject* s_overrides = nullptr;
  PyObject* s_default = nullptr;
  PyObject* s_chain = nullptr;
  PyObject* s_instances = nullptr;
  PyObject* s_cpu = nullptr;
  PyObject* s_rule = nullptr;
  PyObject* s_force = nullptr;
  PyObject* s_path = nullptr;
} G;

std::vector<Entry> entries;
int64_t hits = 0;
// bumped by every change of `entries`: a comparison may run Python code (a state object's __eq__, a
// finalizer run by a reference dropped) that calls remember() / clear() / init(); a scan of `entries`
// that sees the generation change stops at once (its references into the vector may dangle)
uint64_t generation = 0;

void release(Facts& f) {
  Py_CLEAR(f.stride.s);
  Py_CLEAR(f.padding.s);
  Py_CLEAR(f.dilation.s);
  Py_CLEAR(f.backend);
  for (auto& o : f.state) Py_CLEAR(o);
}

// the store emptied first, the references dropped afterwards: a finalizer run by a Py_DECREF may call
// back into this module and finds a consistent (empty) store
void clear_entries() {
  std::vector<Entry> old;
  old.swap(entries);
  ++generation;
  for (auto& e : old) release(e.facts);
}

// releases the facts' references when it goes out of scope (also when a c10::Error unwinds), unless
// disarmed (the facts handed to an entry)
struct FactsGuard {
  Facts* f;
  ~FactsGuard() {
    if (f) release(*f);
  }
};

bool plain(PyObject* o) { return Py_TYPE(o) == G.tensor_type || Py_TYPE(o) == G.param_type; }

// a plain strided tensor (not sparse, mkldnn or nested: their sizes / strides are not the facts of a
// strided one; such calls are left to the Python path)
bool strided(const at::Tensor& t) { return t.layout() == c10::kStrided && !t.is_nested(); }

// an exact int (not a bool: True == 1 would share an int's entry)
bool exact_int(PyObject* o, int64_t* v) {
  if (!PyLong_CheckExact(o)) return false;
  int overflow = 0;
  *v = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (overflow || (*v == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  return true;
}

bool read_arg(PyObject* o, bool allow_str, Arg* out) {
  if (exact_int(o, &out->a)) {
    out->kind = 0;
    return true;
  }
  if (PyTuple_CheckExact(o) && PyTuple_GET_SIZE(o) == 2 && exact_int(PyTuple_GET_ITEM(o, 0), &out->a) &&
      exact_int(PyTuple_GET_ITEM(o, 1), &out->b)) {
    out->kind = 1;
    return true;
  }
  if (allow_str && PyUnicode_CheckExact(o)) {
    out->kind = 2;
    Py_INCREF(o);
    out->s = o;
    return true;
  }
  return false;
}

bool same_arg(const Arg& u, const Arg& v) {
  if (u.kind != v.kind) return false;
  if (u.kind == 2) return PyUnicode_Compare(u.s, v.s) == 0;
  return u.a == v.a && (u.kind == 0 || u.b == v.b);
}

void read_tensor(const at::Tensor& t, TensorFacts* f, bool strides) {
  const auto sz = t.sizes();
  for (size_t i = 0; i < 4 && i < sz.size(); ++i) f->sizes[i] = sz[i];
  if (strides) {
    const auto st = t.strides();
    for (size_t i = 0; i < 4; ++i) f->strides[i] = st[i];
  }
  f->dtype = t.scalar_type();
  f->cpu = t.device().is_cpu();
  f->requires_grad = t.requires_grad();
}

bool same_tensor(const TensorFacts& u, const TensorFacts& v) {
  return u.sizes == v.sizes && u.strides == v.strides && u.dtype == v.dtype && u.cpu == v.cpu &&
         u.requires_grad == v.requires_grad && u.bias_len == v.bias_len;
}

bool any_autocast() {
  using c10::DeviceType;
  // torch._C._is_any_autocast_enabled's devices (CPU, CUDA, XPU, IPU, XLA, HPU, PrivateUse1, MTIA), and MPS
  for (auto d : {DeviceType::CPU, DeviceType::CUDA, DeviceType::XPU, DeviceType::IPU, DeviceType::HPU,
                 DeviceType::XLA, DeviceType::PrivateUse1, DeviceType::MTIA, DeviceType::MPS}) {
    if (at::autocast::is_autocast_enabled(d)) return true;
  }
  return false;
}

// a functorch transform (vmap, grad, jvp, ...) is active: its dynamic-layer keys are in the TLS include
// set while its interpreter stack is non-empty (what torch._C._functorch.peek_interpreter_stack() reads)
bool functorch_active() {
  return c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

// a borrowed dict item as a new reference (nullptr: absent)
PyObject* item(PyObject* dict, PyObject* key) {
  PyObject* v = dict ? PyDict_GetItemWithError(dict, key) : nullptr;
  if (!v && PyErr_Occurred()) PyErr_Clear();
  Py_XINCREF(v);
  return v;
}

// Fill *f with the call's facts.  false: not rememberable (f partly filled: release() it).  No Python
// error is left set either way.
bool read_facts(PyObject* const* args, Facts* f) {
  PyObject *x = args[0], *w = args[1], *b = args[2];
  if (!G.tensor_type || !plain(x) || !plain(w) || (b != Py_None && !plain(b))) return false;
  if (!read_arg(args[3], false, &f->stride) || !read_arg(args[4], true, &f->padding) ||
      !read_arg(args[5], false, &f->dilation))
    return false;
  if (args[6] != Py_None) {
    if (!PyUnicode_CheckExact(args[6])) return false;
    Py_INCREF(args[6]);
    f->backend = args[6];
  }
  const at::Tensor& xt = THPVariable_Unpack(x);
  if (xt.dim() != 4 || !xt.device().is_cpu() || !strided(xt)) return false;
  if (torch::jit::tracer::isTracing() || c10::impl::TorchDispatchModeTLS::stack_len() > 0 ||
      at::impl::torch_function_mode_enabled() || torch::profiler::impl::profilerEnabled() ||
      functorch_active() || any_autocast())
    return false;
  // Python-level settings (lkconv.ops.EAGER_FAST_PATH, torch.autograd.forward_ad._current_level)
  PyObject* eager = PyDict_GetItemWithError(G.ops_dict, G.s_eager);
  if (!eager || PyObject_IsTrue(eager) != 1) {
    PyErr_Clear();
    return false;
  }
  PyObject* level = PyDict_GetItemWithError(G.fwd_ad_dict, G.s_level);
  if (level) {
    int64_t lv = 0;
    if (!exact_int(level, &lv) || lv >= 0) return false;
  } else if (PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  // the backends' state
  PyObject* overrides_var = PyDict_GetItemWithError(G.backends_dict, G.s_overrides);
  PyObject* overrides = nullptr;
  if (!overrides_var || !PyContextVar_CheckExact(overrides_var) ||
      PyContextVar_Get(overrides_var, nullptr, &overrides) < 0 || !overrides) {
    PyErr_Clear();
    return false;
  }
  f->state[0] = overrides;  // new reference
  f->state[1] = item(G.backends_dict, G.s_default);
  PyObject* chain = PyDict_GetItemWithError(G.backends_dict, G.s_chain);
  if (chain && !PyDict_Check(chain)) {  // another mapping: its .get("cpu") is not read here
    PyErr_Clear();
    return false;
  }
  f->state[2] = chain ? item(chain, G.s_cpu) : nullptr;
  // a tuple (or absent) only: an entry holds the very object, so a list edited in place would go unseen
  // (the Python store cannot hash a list: not rememberable there either)
  if (f->state[2] && !PyTuple_CheckExact(f->state[2])) return false;
  PyObject* insts = PyDict_GetItemWithError(G.backends_dict, G.s_instances);
  f->state[3] = (insts && PyDict_Check(insts)) ? item(insts, G.s_cpu) : nullptr;
  if (PyErr_Occurred()) PyErr_Clear();
  if (!f->state[3]) return false;  // the cpu backend not made yet: the first call creates it
  f->state[4] = PyObject_GetAttr(reinterpret_cast<PyObject*>(Py_TYPE(f->state[3])), G.s_rule);
  if (!f->state[4]) PyErr_Clear();
  f->state[5] = item(G.cpu_dict, G.s_force);
  f->state[6] = PyObject_GetAttr(f->state[3], G.s_path);  // CPUBackend(path=...), or set on the instance later
  if (!f->state[6]) PyErr_Clear();
  f->threads = at::get_num_threads();

  const at::Tensor& wt = THPVariable_Unpack(w);
  if (wt.dim() != 4 || !strided(wt)) return false;
  read_tensor(xt, &f->x, true);
  read_tensor(wt, &f->w, false);
  if (b != Py_None) {
    const at::Tensor& bt = THPVariable_Unpack(b);
    if (bt.dim() != 1 || !strided(bt)) return false;
    read_tensor(bt, &f->b, false);
    f->b.sizes[0] = 0;
    f->b.bias_len = bt.size(0);
  }
  if (!at::GradMode::is_enabled()) f->x.requires_grad = f->w.requires_grad = f->b.requires_grad = false;
  return true;
}

// u: an entry's facts (read before any Python code runs here: a comparison may change the store and
// drop u's references, so the objects compared are held here); the caller checks `generation` after
bool same_state(const Facts& u, const Facts& v) {
  int first = 0;
  while (first < kStateItems && u.state[first] == v.state[first]) ++first;  // the usual case: the same objects
  if (first == kStateItems) return true;
  std::array<PyObject*, kStateItems> us = u.state, vs = v.state;  // u is not read again below
  for (int k = first; k < kStateItems; ++k) {
    Py_XINCREF(us[k]);
    Py_XINCREF(vs[k]);
  }
  bool same = true;
  for (int i = first; same && i < kStateItems; ++i) {
    PyObject *p = us[i], *q = vs[i];
    if (p == q) continue;
    if (!p || !q) {
      same = false;
    } else {
      const int eq = PyObject_RichCompareBool(p, q, Py_EQ);  // may run Python code
      if (eq < 0) PyErr_Clear();  // an __eq__ that raises: not the same state
      same = eq == 1;
    }
  }
  for (int k = first; k < kStateItems; ++k) {
    Py_XDECREF(us[k]);
    Py_XDECREF(vs[k]);
  }
  return same;
}

bool same_facts(const Facts& u, const Facts& v) {
  if (!same_tensor(u.x, v.x) || !same_tensor(u.w, v.w) || !same_tensor(u.b, v.b) || u.threads != v.threads)
    return false;
  if (!same_arg(u.stride, v.stride) || !same_arg(u.padding, v.padding) || !same_arg(u.dilation, v.dilation))
    return false;
  if ((u.backend == nullptr) != (v.backend == nullptr)) return false;
  if (u.backend && PyUnicode_Compare(u.backend, v.backend) != 0) return false;
  return same_state(u, v);
}

bool pair_arg(PyObject* o, std::array<int64_t, 2>* out) {
  return PyTuple_Check(o) && PyTuple_GET_SIZE(o) == 2 && exact_int(PyTuple_GET_ITEM(o, 0), &(*out)[0]) &&
         exact_int(PyTuple_GET_ITEM(o, 1), &(*out)[1]);
}

// call(x, weight, bias, stride, padding, dilation, backend): the remembered delegated call's result, or
// None (not remembered: the Python path decides)
PyObject* fast_call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 7) {
    PyErr_SetString(PyExc_TypeError, "lkconv._cpu_fast.call: 7 arguments");
    return nullptr;
  }
  if (entries.empty()) Py_RETURN_NONE;
  std::array<int64_t, 2> stride{}, padding{}, dilation{};  // the hit's, copied: the store may change below
  int64_t groups = 0;
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
  bool hit = false;
  {
    Facts f;
    FactsGuard guard{&f};
    if (read_facts(args, &f)) {
      const uint64_t gen = generation;
      for (size_t i = 0; i < entries.size(); ++i) {
        const bool same = same_facts(entries[i].facts, f);
        if (generation != gen) break;  // the store changed during the comparison: a miss
        if (same) {
          const Entry& e = entries[i];
          stride = e.stride, padding = e.padding, dilation = e.dilation, groups = e.groups, format = e.format;
          hit = true;
          break;
        }
      }
    }
  }  // f's references dropped (this may run Python code too: the copies above are what is used)
  if (!hit) Py_RETURN_NONE;
  ++hits;
  const at::Tensor& x = THPVariable_Unpack(args[0]);  // the caller's references keep them alive
  const at::Tensor& w = THPVariable_Unpack(args[1]);
  std::optional<at::Tensor> bias;
  if (args[2] != Py_None) bias = THPVariable_Unpack(args[2]);
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = at::conv2d(x, w, bias, stride, padding, dilation, groups);
    if (!out.is_contiguous(format)) out = out.contiguous(format);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// remember(x, weight, bias, stride, padding, dilation, backend, conv_args): the call just ran
// F.conv2d(x, weight, bias, *conv_args[:4]) with output format conv_args[4]; True if remembered
PyObject* fast_remember(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 8) {
    PyErr_SetString(PyExc_TypeError, "lkconv._cpu_fast.remember: 8 arguments");
    return nullptr;
  }
  PyObject* ca = args[7];
  Entry e;
  if (!PyTuple_Check(ca) || PyTuple_GET_SIZE(ca) != 5 || !pair_arg(PyTuple_GET_ITEM(ca, 0), &e.stride) ||
      !pair_arg(PyTuple_GET_ITEM(ca, 1), &e.padding) || !pair_arg(PyTuple_GET_ITEM(ca, 2), &e.dilation) ||
      !exact_int(PyTuple_GET_ITEM(ca, 3), &e.groups)) {
    PyErr_SetString(PyExc_TypeError, "lkconv._cpu_fast.remember: conv_args must be (stride pair, padding pair, "
                                     "dilation pair, groups, memory_format)");
    return nullptr;
  }
  PyObject* fmt = PyTuple_GET_ITEM(ca, 4);
  if (!THPMemoryFormat_Check(fmt)) {
    PyErr_SetString(PyExc_TypeError, "lkconv._cpu_fast.remember: conv_args[4] must be a torch.memory_format");
    return nullptr;
  }
  e.format = reinterpret_cast<THPMemoryFormat*>(fmt)->memory_format;
  FactsGuard guard{&e.facts};
  if (!read_facts(args, &e.facts)) Py_RETURN_FALSE;
  const uint64_t gen = generation;
  for (size_t i = 0; i < entries.size(); ++i) {
    const bool same = same_facts(entries[i].facts, e.facts);
    if (generation != gen) Py_RETURN_FALSE;  // the store changed during the comparison: not remembered
    if (same) Py_RETURN_TRUE;
  }
  if (entries.size() >= kMaxEntries) clear_entries();
  entries.push_back(e);  // the entry owns the references e.facts took
  guard.f = nullptr;
  ++generation;
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

PyObject* fast_clear(PyObject*, PyObject*) {
  clear_entries();
  Py_RETURN_NONE;
}

PyObject* fast_stats(PyObject*, PyObject*) {
  return Py_BuildValue("{s:n,s:L}", "entries", static_cast<Py_ssize_t>(entries.size()), "hits",
                       static_cast<long long>(hits));
}

PyObject* intern(const char* s) { return PyUnicode_InternFromString(s); }

// init(tensor_type, parameter_type, ops_dict, backends_dict, cpu_dict, forward_ad_dict)
PyObject* fast_init(PyObject*, PyObject* args) {
  PyObject *tt, *pt, *od, *bd, *cd, *fd;
  if (!PyArg_ParseTuple(args, "O!O!O!O!O!O!", &PyType_Type, &tt, &PyType_Type, &pt, &PyDict_Type, &od, &PyDict_Type,
                        &bd, &PyDict_Type, &cd, &PyDict_Type, &fd))
    return nullptr;
  clear_entries();
  for (PyObject* o : {tt, pt, od, bd, cd, fd}) Py_INCREF(o);
  Globals old = G;  // init called again: the previous references dropped (after G is whole again)
  G.tensor_type = reinterpret_cast<PyTypeObject*>(tt);
  G.param_type = reinterpret_cast<PyTypeObject*>(pt);
  G.ops_dict = od;
  G.backends_dict = bd;
  G.cpu_dict = cd;
  G.fwd_ad_dict = fd;
  G.s_eager = intern("EAGER_FAST_PATH");
  G.s_level = intern("_current_level");
  G.s_overrides = intern("_OVERRIDES");
  G.s_default = intern("_default_backend");
  G.s_chain = intern("AUTO_CHAIN");
  G.s_instances = intern("_INSTANCES");
  G.s_cpu = intern("cpu");
  G.s_rule = intern("delegates_to_torch");
  G.s_force = intern("FORCE_PATH");
  G.s_path = intern("path");
  const bool interned = G.s_eager && G.s_level && G.s_overrides && G.s_default && G.s_chain && G.s_instances &&
                        G.s_cpu && G.s_rule && G.s_force && G.s_path;
  for (PyObject* o : {reinterpret_cast<PyObject*>(old.tensor_type), reinterpret_cast<PyObject*>(old.param_type),
                      old.ops_dict, old.backends_dict, old.cpu_dict, old.fwd_ad_dict, old.s_eager, old.s_level,
                      old.s_overrides, old.s_default, old.s_chain, old.s_instances, old.s_cpu, old.s_rule,
                      old.s_force, old.s_path})
    Py_XDECREF(o);
  if (!interned) {  // (out of memory) the store stays unusable: read_facts declines every call
    G.tensor_type = nullptr;
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"init", fast_init, METH_VARARGS, "init(tensor_type, parameter_type, ops_dict, backends_dict, cpu_dict, "
                                      "forward_ad_dict)"},
    {"call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_call)), METH_FASTCALL,
     "call(x, weight, bias, stride, padding, dilation, backend): the remembered delegated call, or None"},
    {"remember", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_remember)), METH_FASTCALL,
     "remember(x, weight, bias, stride, padding, dilation, backend, conv_args) -> bool"},
    {"clear", fast_clear, METH_NOARGS, "forget every remembered call"},
    {"stats", fast_stats, METH_NOARGS, "{'entries': remembered calls, 'hits': calls answered}"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_fast",
                      "lkconv's remembered delegated CPU call in C++ (see csrc/cpu_fastpath.cpp)", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__cpu_fast(void) { return PyModule_Create(&module); }

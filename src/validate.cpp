#include "validate.h"

#include <algorithm>
#include <cstdint>
#include <sstream>

namespace moe {

namespace {

bool dtype_matches(const DLDataType& dt, DType want) {
  if (dt.lanes != 1) return false;
  switch (want) {
    case DType::f32: return dt.code == kDLFloat && dt.bits == 32;
    case DType::f16: return dt.code == kDLFloat && dt.bits == 16;
    case DType::bf16: return dt.code == kDLBfloat && dt.bits == 16;
    case DType::i32: return dt.code == kDLInt && dt.bits == 32;
    case DType::e4m3:
      return dt.bits == 8 && (dt.code == MOE_DLPACK_CODE_FLOAT8_E4M3FN || dt.code == kDLUInt);
  }
  return false;
}

std::string dl_dtype_string(const DLDataType& dt) {
  std::ostringstream s;
  switch (dt.code) {
    case kDLInt: s << "int"; break;
    case kDLUInt: s << "uint"; break;
    case kDLFloat: s << "float"; break;
    case kDLBfloat: s << "bfloat"; break;
    case MOE_DLPACK_CODE_FLOAT8_E4M3FN: s << "float8_e4m3fn"; break;
    default: s << "code" << int(dt.code) << "_"; break;
  }
  if (dt.code != MOE_DLPACK_CODE_FLOAT8_E4M3FN) s << int(dt.bits);
  if (dt.lanes != 1) s << "x" << dt.lanes;
  return s.str();
}

}  // namespace

std::string device_string(const Device& d) {
  return d.backend == Backend::cpu ? std::string("cpu") : "cuda:" + std::to_string(d.id);
}

std::string shape_string(const DLTensor* t) {
  std::string s = "[";
  for (int i = 0; i < t->ndim; ++i) {
    if (i) s += ", ";
    s += std::to_string(t->shape[i]);
  }
  return s + "]";
}

void ArgChecker::bad(const std::string& arg, const std::string& expected, const std::string& got,
                     moe_status_t status) const {
  fail(status, std::string(fn_) + ": argument '" + arg + "': expected " + expected + ", got " + got);
}

Device ArgChecker::device(const DLTensor* t, const char* arg) const {
  switch (t->device.device_type) {
    case kDLCPU: return Device{Backend::cpu, 0};
    case kDLCUDA:
      if (t->device.device_id < 0)
        bad(std::string(arg) + ".device.device_id", "a CUDA ordinal >= 0",
            std::to_string(t->device.device_id));
      return Device{Backend::cuda, t->device.device_id};
    default:
      bad(std::string(arg) + ".device", "kDLCPU (1) or kDLCUDA (2)",
          "device_type " + std::to_string(int(t->device.device_type)), MOE_STATUS_UNSUPPORTED);
  }
}

void ArgChecker::same_device(const Device& expected, const DLTensor* t, const char* arg) const {
  Device d = device(t, arg);
  if (d != expected)
    bad(std::string(arg) + ".device", "the same device as the call's other tensors (" +
                                          device_string(expected) + ")",
        device_string(d));
}

DType ArgChecker::tensor(const DLTensor* t, const char* arg,
                         std::initializer_list<DType> allowed) const {
  not_null(t, arg);
  if (t->ndim < 1 || t->ndim > 4)
    bad(std::string(arg) + ".ndim", "1 to 4", std::to_string(t->ndim));
  if (!t->shape) bad(std::string(arg) + ".shape", "a non-NULL pointer", "NULL");
  for (int i = 0; i < t->ndim; ++i)
    if (t->shape[i] < 0 || t->shape[i] > (int64_t(1) << 40))
      bad(std::string(arg) + ".shape[" + std::to_string(i) + "]", "a size in [0, 2^40]",
          std::to_string(t->shape[i]));
  // Bound the element count before anything multiplies the dims (int64 overflow).
  bool empty = false;
  for (int i = 0; i < t->ndim; ++i) empty = empty || t->shape[i] == 0;
  for (int64_t i = 0, n = 1; !empty && i < t->ndim; n *= t->shape[i++])
    if (n > (int64_t(1) << 40) / t->shape[i])
      bad(std::string(arg) + ".shape", "at most 2^40 elements", "shape " + shape_string(t));
  device(t, arg);
  DType found = DType::f32;
  bool ok = false;
  for (DType a : allowed)
    if (dtype_matches(t->dtype, a)) {
      found = a;
      ok = true;
      break;
    }
  if (!ok) {
    std::string want;
    size_t i = 0;
    for (DType a : allowed) {
      want += (i == 0 ? "" : (i + 1 == allowed.size() ? " or " : ", "));
      want += dtype_name(a);
      ++i;
    }
    bad(std::string(arg) + ".dtype", "dtype " + want, dl_dtype_string(t->dtype));
  }
  int64_t n = numel(t);
  if (n > 0 && !t->data) bad(std::string(arg) + ".data", "a non-NULL pointer", "NULL");
  if (t->strides) {
    int64_t expect = 1;
    for (int i = t->ndim - 1; i >= 0; --i) {
      if (t->shape[i] != 1 && t->strides[i] != expect)
        bad(std::string(arg) + ".strides",
            "row-major contiguous strides (in elements) for shape " + shape_string(t),
            "stride " + std::to_string(t->strides[i]) + " in dim " + std::to_string(i));
      expect *= t->shape[i];
    }
  }
  size_t elem = dtype_bytes(found);
  auto addr = reinterpret_cast<uintptr_t>(tensor_data(t));
  if (n > 0 && addr % elem != 0)
    bad(std::string(arg) + ".data + byte_offset",
        "an address aligned to " + std::to_string(elem) + " bytes",
        "an address with remainder " + std::to_string(addr % elem));
  return found;
}

void ArgChecker::shape(const DLTensor* t, const char* arg, std::initializer_list<int64_t> expected,
                       std::initializer_list<const char*> names) const {
  bool ok = int64_t(expected.size()) == t->ndim;
  if (ok) {
    int i = 0;
    for (int64_t e : expected) {
      if (e >= 0 && t->shape[i] != e) ok = false;
      ++i;
    }
  }
  if (ok) return;
  std::string want = "shape [";
  auto nm = names.begin();
  int i = 0;
  for (int64_t e : expected) {
    if (i++) want += ", ";
    const char* label = nm != names.end() ? *nm++ : "?";
    // A dim whose label is its own value (e.g. "1") prints once.
    if (e >= 0 && std::to_string(e) == label) {
      want += label;
      continue;
    }
    want += label;
    if (e >= 0) want += "=" + std::to_string(e);
  }
  want += "]";
  bad(arg, want, "shape " + shape_string(t));
}

void require_backend(const ArgChecker& c, const Device& d, const char* arg) {
#ifndef MOE_WITH_CUDA
  if (d.backend == Backend::cuda)
    c.bad(arg, "the CPU (this libmoe was built without the CUDA backend)", device_string(d),
          MOE_STATUS_NOT_AVAILABLE);
#else
  (void)c;
  (void)d;
  (void)arg;
#endif
}

void check_max_tokens(const ArgChecker& c, int64_t max_tokens, int64_t per_token) {
  const int64_t most = (int64_t(1) << 40) / std::max<int64_t>(per_token, 1);
  if (max_tokens < 0 || max_tokens > most)
    c.bad("max_tokens", "a value in [0, " + std::to_string(most) +
                            "] (a run's tensors hold at most 2^40 elements)",
          std::to_string(max_tokens));
}

}  // namespace moe

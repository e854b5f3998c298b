// Argument validation for the API boundary. Every check throws moe::Error
// with INVALID_ARGUMENT (or UNSUPPORTED / NOT_AVAILABLE) and a message that
// names the function, the argument, what was expected and what was received.
#pragma once

#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

#include "common.h"
#include "plan.h"

namespace moe {

// Which backend a call runs on.
enum class Backend { cpu, cuda };

struct Device {
  Backend backend = Backend::cpu;
  int id = 0;
  bool operator==(const Device& o) const { return backend == o.backend && id == o.id; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

std::string device_string(const Device& d);
std::string shape_string(const DLTensor* t);

// The function name that prefixes every message of the current call.
class ArgChecker {
 public:
  explicit ArgChecker(const char* function) : fn_(function) {}

  [[noreturn]] void bad(const std::string& arg, const std::string& expected,
                        const std::string& got,
                        moe_status_t status = MOE_STATUS_INVALID_ARGUMENT) const;

  // An int32 flag field: 0 or 1.
  void flag(const char* arg, int32_t v) const {
    if (v != 0 && v != 1) bad(arg, "0 or 1", std::to_string(v));
  }

  template <class T>
  void not_null(const T* p, const char* arg) const {
    if (!p) bad(arg, "a non-NULL pointer", "NULL");
  }

  // Checks a tensor: non-NULL, sane ndim/shape, data non-NULL when non-empty,
  // on a supported device, with one of the allowed dtypes, row-major
  // contiguous and aligned to its element size. Returns its dtype.
  DType tensor(const DLTensor* t, const char* arg, std::initializer_list<DType> allowed) const;

  // Shape check; a dim of -1 in `expected` matches anything. `names` label
  // the dims in messages (e.g. {"T", "E"}).
  void shape(const DLTensor* t, const char* arg, std::initializer_list<int64_t> expected,
             std::initializer_list<const char*> names) const;

  Device device(const DLTensor* t, const char* arg) const;
  void same_device(const Device& expected, const DLTensor* t, const char* arg) const;

  // Config structs: `user` must have struct_size in [min_size, sizeof(T)].
  // Copies the bytes the caller knows over `defaults`.
  template <class T>
  T config(const T* user, const char* arg, const T& defaults, size_t min_size) const {
    not_null(user, arg);
    uint32_t size = user->struct_size;
    if (size < min_size || size > sizeof(T))
      bad(std::string(arg) + "->struct_size",
          "a value in [" + std::to_string(min_size) + ", " + std::to_string(sizeof(T)) +
              "] (fill the struct with its *_default() function; a larger value means the "
              "caller's header is newer than this library)",
          std::to_string(size));
    T out = defaults;
    std::memcpy(static_cast<void*>(&out), user, size);
    out.struct_size = uint32_t(sizeof(T));
    return out;
  }

  // *_default(): the caller sets struct_size first; only that many bytes of
  // the defaults are written, so an older caller's smaller struct is safe.
  template <class T>
  void write_defaults(T* user, const char* arg, const T& defaults, size_t min_size) const {
    not_null(user, arg);
    uint32_t size = user->struct_size;
    if (size < min_size || size > sizeof(T))
      bad(std::string(arg) + "->struct_size",
          "sizeof the struct in the caller's header, set before this call (a value in [" +
              std::to_string(min_size) + ", " + std::to_string(sizeof(T)) + "])",
          std::to_string(size));
    std::memcpy(static_cast<void*>(user), &defaults, size);
    user->struct_size = size;
  }

  const char* fn() const { return fn_; }

 private:
  const char* fn_;
};

inline void* tensor_data(const DLTensor* t) {
  return static_cast<char*>(t->data) + t->byte_offset;
}
inline int64_t numel(const DLTensor* t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
  return n;
}

// Fails with NOT_AVAILABLE when the CUDA backend is not built in; `arg`
// names what put the call on that device.
void require_backend(const ArgChecker& c, const Device& d, const char* arg = "tensors");

// Workspace queries: max_tokens in [0, 2^40 / per_token], the most any run can
// pass (its tensors hold at most 2^40 elements), so size arithmetic cannot wrap.
void check_max_tokens(const ArgChecker& c, int64_t max_tokens, int64_t per_token);

// Offset of the next 256-byte-aligned region.
inline size_t align256(size_t n) { return (n + 255) & ~size_t(255); }

}  // namespace moe

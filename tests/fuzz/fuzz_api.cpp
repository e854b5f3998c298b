// libFuzzer harness of the public C API on the CPU backend (issue 9 item 2).
//
// The fuzzer's bytes pick an operation (router, pack, dispatcher, runner, the
// one-call layer, queries), a config (struct_size included), shapes, dtypes,
// ids and data (NaN/Inf included), and now and then one bad argument: NULL,
// wrong dtype/rank/shape, non-contiguous strides, a misaligned byte_offset,
// a CUDA or OpenCL device, a bad workspace. Built with ASan + UBSan, so a
// crash or any sanitizer report fails. On top of that it aborts when:
//  - a non-OK status comes without a message, or the message does not start
//    with the function's name, or the status is INTERNAL_ERROR;
//  - an OK status carries a message, or follows an argument that is always
//    invalid (a NULL required tensor, strides, CUDA on this CPU build, ...);
//  - an OK result differs from a float64 reference: router ids/weights
//    (tests/ref_router.h), dispatcher metadata, runner and layer outputs
//    (within a rounding-error bound computed alongside the reference).
// Buffers always hold every element the descriptor claims (plus room for
// any byte_offset), so a sanitizer report is the library's fault.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "moe/moe.h"
#include "ref_router.h"
#include "support.h"

namespace {

using moe_test::bf16_to_f32;
using moe_test::f16_to_f32;
using moe_test::f32_to_bf16;
using moe_test::f32_to_f16;

[[noreturn]] void die(const char* fn, const std::string& what) {
  std::fprintf(stderr, "FUZZ INVARIANT VIOLATED in %s: %s\n  last error: %s\n", fn, what.c_str(),
               moe_last_error());
  std::abort();
}

// The fuzzer's bytes; zeros once exhausted (then every choice takes its
// first, valid option and no mutation happens).
struct In {
  const uint8_t* p;
  size_t n;
  uint8_t u8() {
    if (!n) return 0;
    --n;
    return *p++;
  }
  uint32_t u16() { return u8() | (uint32_t(u8()) << 8); }
  int pick(int lo, int hi) { return lo + int(u16() % uint32_t(hi - lo + 1)); }
  bool one_in(int k) { return u8() % k == uint8_t(k - 1); }
};

// Names of the always-invalid arguments of the next call (for the report).
std::string g_invalid;
bool invalid(bool cond, const char* name) {
  if (cond) g_invalid += std::string(g_invalid.empty() ? "" : ", ") + name;
  return cond;
}

// Checks the status discipline; true on success.
bool status_ok(moe_status_t st, const char* fn, bool must_fail = false) {
  const char* msg = moe_last_error();
  const std::string why = g_invalid;
  g_invalid.clear();
  if (!msg) die(fn, "moe_last_error() returned NULL");
  if (st == MOE_STATUS_SUCCESS) {
    if (msg[0]) die(fn, "success with a non-empty last error");
    if (must_fail) die(fn, "accepted an argument that is always invalid: " + why);
    return true;
  }
  if (int(st) <= 0 || int(st) >= int(MOE_STATUS_NUM_STATUSES)) die(fn, "status out of range");
  if (!msg[0]) die(fn, "non-OK status without a message");
  if (st == MOE_STATUS_INTERNAL_ERROR) die(fn, "internal error on fuzzed input");
  if (std::strncmp(msg, fn, std::strlen(fn)) != 0) die(fn, "message does not name the function");
  return false;
}

enum class Dt { f32, f16, bf16, i32, e4m3 };

DLDataType dl_of(Dt d) {
  switch (d) {
    case Dt::f32: return {kDLFloat, 32, 1};
    case Dt::f16: return {kDLFloat, 16, 1};
    case Dt::bf16: return {kDLBfloat, 16, 1};
    case Dt::i32: return {kDLInt, 32, 1};
    case Dt::e4m3: return {MOE_DLPACK_CODE_FLOAT8_E4M3FN, 8, 1};
  }
  return {kDLFloat, 32, 1};
}

// A fuzzed tensor. `bad` records a mutation every function must reject.
struct Ten {
  std::vector<int64_t> shape, strides;
  std::vector<unsigned char> mem;
  DLTensor t{};
  unsigned char* base = nullptr;  // data + byte_offset: where the library reads
  bool null = false;
  bool bad = false;
  int mutation = -1;  // make()'s case, -1 when none
  DLTensor* dl() { return null ? nullptr : &t; }
  int64_t numel() const {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
};

// Builds `x` as dtype `dt` with `shp`; with `mutate`, sometimes one bad
// argument. `required`: NULL is always invalid. The buffer holds 8 bytes per
// claimed element after a 64-byte window for byte_offset.
void make(Ten& x, Dt dt, std::vector<int64_t> shp, In& in, bool mutate, bool required = true) {
  x.shape = std::move(shp);
  x.t = DLTensor{};
  x.t.dtype = dl_of(dt);
  x.t.device = {kDLCPU, 0};
  x.bad = x.null = false;
  int m = (mutate && in.one_in(10)) ? in.pick(0, 12) : -1;
  x.mutation = m;
  switch (m) {
    case 0: x.null = true; x.bad = required; break;
    case 1: x.t.dtype = DLDataType{kDLFloat, 64, 1}; x.bad = true; break;
    case 2: x.t.dtype = DLDataType{kDLFloat, 32, 2}; x.bad = true; break;
    case 3: {  // another plausible dtype: valid or not depending on the argument
      const Dt all[] = {Dt::f32, Dt::f16, Dt::bf16, Dt::i32, Dt::e4m3};
      x.t.dtype = dl_of(all[in.pick(0, 4)]);
      break;
    }
    case 4: if (!x.shape.empty()) x.shape.pop_back(); break;
    case 5: x.shape.push_back(1); break;
    case 6: if (!x.shape.empty()) x.shape[in.pick(0, int(x.shape.size()) - 1)] += in.one_in(2) ? 1 : -1; break;
    default: break;
  }
  for (auto& s : x.shape) s = std::max<int64_t>(s, 0);
  x.strides.assign(x.shape.size(), 1);
  for (int i = int(x.shape.size()) - 2; i >= 0; --i) x.strides[i] = x.strides[i + 1] * std::max<int64_t>(x.shape[i + 1], 1);
  x.t.ndim = int(x.shape.size());
  x.t.shape = x.shape.data();
  x.t.strides = in.one_in(3) ? nullptr : x.strides.data();
  const int64_t n = x.numel();
  x.mem.assign(size_t(n) * 8 + 128, 0);
  x.base = x.mem.data() + 64;
  x.t.data = x.base;
  switch (m) {
    case 7: {  // non-contiguous (a dim > 1 gets a stride off by one)
      for (int i = 0; i < x.t.ndim; ++i)
        if (x.shape[i] > 1) {
          x.strides[i] += 1;
          x.t.strides = x.strides.data();
          x.bad = true;
          break;
        }
      break;
    }
    case 8: {  // byte_offset: fine when data + byte_offset is aligned to the element
      const uint64_t off = uint64_t(in.pick(1, 63));
      if (in.one_in(2)) {
        x.t.data = x.mem.data() + 64 - off;
        x.t.byte_offset = off;
      } else {
        x.t.byte_offset = off % 8;
        x.base += x.t.byte_offset;
        x.bad = n > 0 && x.t.byte_offset % std::max<uint64_t>(1, x.t.dtype.bits / 8) != 0;
      }
      break;
    }
    case 9: x.t.device = {kDLCUDA, 0}; x.t.data = reinterpret_cast<void*>(uintptr_t(0xdead00000000ull)); x.bad = true; break;
    case 10: x.t.device = {kDLOpenCL, 0}; x.bad = true; break;
    case 11: x.t.data = nullptr; x.bad = n > 0; break;
    case 12: x.t.ndim = in.one_in(2) ? 0 : 5; x.bad = true; break;
    default: break;
  }
}

// Gives `out` the dtype of `x`, unless make() mutated out's dtype or
// byte_offset: its `bad` flag was worked out for that dtype and would no
// longer hold (an f64 output made f16 again is a valid output).
void take_dtype(Ten& out, const Ten& x) {
  const int m = out.mutation;
  if (m == 1 || m == 2 || m == 3 || m == 8) return;
  out.t.dtype = x.t.dtype;
}

// Float data from the bytes: a grid in [-2, 2] exact in bf16/f16; with
// `specials`, now and then NaN, +-Inf or a huge value.
double fuzz_value(In& in, bool specials) {
  uint8_t b = in.u8();
  if (specials && b >= 250) {
    const double sp[] = {NAN, INFINITY, -INFINITY, 3e38, -3e38, 1e-40};
    return sp[b - 250];
  }
  return (double(b) - 125.0) / 62.5;
}

// Writes element i (of the claimed dtype) at bytes(); reads it back as double.
void put(Ten& x, int64_t i, double v) {
  unsigned char* p = x.base;
  const int32_t iv = std::isfinite(v) ? int32_t(std::clamp(v, -2e9, 2e9)) : 0;  // for integer dtypes
  const DLDataType d = x.t.dtype;
  if (d.code == kDLFloat && d.bits == 32) { float f = float(v); std::memcpy(p + 4 * i, &f, 4); }
  else if (d.code == kDLFloat && d.bits == 16) { uint16_t h = f32_to_f16(float(v)); std::memcpy(p + 2 * i, &h, 2); }
  else if (d.code == kDLBfloat && d.bits == 16) { uint16_t h = f32_to_bf16(float(v)); std::memcpy(p + 2 * i, &h, 2); }
  else if (d.code == kDLInt && d.bits == 32) std::memcpy(p + 4 * i, &iv, 4);
  else if (d.bits == 8) p[i] = uint8_t(iv);
  else p[i % 8] = uint8_t(iv);
}
double get(const Ten& x, int64_t i) {
  const unsigned char* p = x.base;
  const DLDataType d = x.t.dtype;
  if (d.code == kDLFloat && d.bits == 32) { float f; std::memcpy(&f, p + 4 * i, 4); return f; }
  if (d.code == kDLFloat && d.bits == 16) { uint16_t h; std::memcpy(&h, p + 2 * i, 2); return f16_to_f32(h); }
  if (d.code == kDLBfloat && d.bits == 16) { uint16_t h; std::memcpy(&h, p + 2 * i, 2); return bf16_to_f32(h); }
  if (d.code == kDLInt && d.bits == 32) { int32_t k; std::memcpy(&k, p + 4 * i, 4); return k; }
  return p[i];
}
std::vector<double> values(const Ten& x) {
  std::vector<double> v(size_t(x.numel()));
  for (size_t i = 0; i < v.size(); ++i) v[i] = get(x, int64_t(i));
  return v;
}
void fill_floats(Ten& x, In& in, bool specials) {
  for (int64_t i = 0; i < x.numel(); ++i) put(x, i, fuzz_value(in, specials));
}
void fill_ids(Ten& x, In& in, int limit) {  // mostly [-1, limit), sometimes out of range
  for (int64_t i = 0; i < x.numel(); ++i) {
    int v = in.one_in(24) ? in.pick(-3, limit + 2) : in.pick(-1, std::max(limit - 1, -1));
    put(x, i, v);
  }
}
void poison(Ten& x) { std::memset(x.mem.data(), 0xff, x.mem.size()); }  // NaN / -1 everywhere

bool all_finite(const std::vector<double>& v) {
  for (double d : v)
    if (!std::isfinite(d)) return false;
  return true;
}
bool is_f32(const DLTensor& t) { return t.dtype.code == kDLFloat && t.dtype.bits == 32 && t.dtype.lanes == 1; }

// A struct_size the way callers get it wrong or right: the full size, the
// size of an older header (a field boundary), zero, too small, from the future.
template <class C>
uint32_t fuzz_struct_size(In& in, std::initializer_list<size_t> boundaries) {
  if (!in.one_in(6)) return uint32_t(sizeof(C));
  switch (in.pick(0, 4)) {
    case 0: return 0;
    case 1: return uint32_t(sizeof(C) + 4 * size_t(in.pick(1, 8)));
    case 2: return uint32_t(in.pick(1, int(sizeof(C))));
    default: {
      std::vector<size_t> b(boundaries);
      return uint32_t(b[size_t(in.pick(0, int(b.size()) - 1))]);
    }
  }
}

// The config the library acts on: defaults, then the caller's bytes.
template <class C>
C effective(const C& user, const C& defaults) {
  C out = defaults;
  std::memcpy(static_cast<void*>(&out), &user, std::min<size_t>(user.struct_size, sizeof(C)));
  return out;
}

// ---------------------------------------------------------------------------
// Router
// ---------------------------------------------------------------------------

moe_router_config_t fuzz_router_cfg(In& in, int* E_out = nullptr) {
  moe_router_config_t c;
  c.struct_size = sizeof(c);
  int method = in.pick(0, 5);
  if (in.one_in(16)) method = in.pick(-2, 8);
  moe_status_t st = moe_router_config_default(&c, method);
  if (!status_ok(st, "moe_router_config_default", method < 0 || method >= MOE_ROUTING_NUM_METHODS)) {
    moe_router_config_default(&c, 0);
    c.method = method;
  }
  const int E = in.one_in(20) ? in.pick(-1, 40000) : in.pick(1, 24);
  c.num_experts = E;
  c.top_k = in.pick(c.method == MOE_ROUTING_LLAMA4 ? 1 : 0, std::max(1, std::min(E, 8)) + 1);
  if (c.method == MOE_ROUTING_LLAMA4 && !in.one_in(8)) c.top_k = 1;
  if (c.method == MOE_ROUTING_DEEPSEEK_V3 || c.method == MOE_ROUTING_GROUPED_SOFTMAX) {
    c.n_group = in.pick(0, 8);
    c.topk_group = in.pick(0, std::max(c.n_group, 1) + 1);
  } else if (in.one_in(16)) {
    c.n_group = in.pick(0, 4);
  }
  if (in.one_in(2)) c.renormalize = in.one_in(12) ? 2 : 1 - c.renormalize;
  const float factors[] = {1.0f, 2.5f, 0.5f, 16.0f, 0.0f, -1.0f, NAN, INFINITY};
  c.routed_scaling_factor = factors[in.one_in(3) ? in.pick(0, 7) : 0];
  c.scaling_on_output = in.one_in(3) ? 1 : 0;
  c.num_fused_shared_experts = in.one_in(4) ? in.pick(-1, 2) : 0;
  c.struct_size = fuzz_struct_size<moe_router_config_t>(
      in, {offsetof(moe_router_config_t, n_group), offsetof(moe_router_config_t, renormalize),
           offsetof(moe_router_config_t, routed_scaling_factor),
           offsetof(moe_router_config_t, num_fused_shared_experts)});
  if (E_out) *E_out = E;
  return c;
}

moe_router_config_t router_defaults_for(int method) {
  moe_router_config_t d;
  d.struct_size = sizeof(d);
  if (moe_router_config_default(&d, method) != MOE_STATUS_SUCCESS) moe_router_config_default(&d, 0);
  return d;
}

// Compares a routed batch with the float64 reference: ids exactly on rows
// clear of ties, weights to 1e-5 of their size.
void check_routes(const char* fn, const moe_router_config_t& eff, const std::vector<double>& logits,
                  int64_t T, const double* bias, int64_t valid, const Ten& ids, const Ten& w) {
  const moe_test::RefRouterCfg rc = moe_test::ref_router_cfg(eff);
  std::vector<int> rid;
  std::vector<double> rw, margin;
  moe_test::ref_route(rc, logits, T, bias, valid, rid, rw, &margin);
  const int C = rc.columns();
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < C; ++j) {
      const int64_t i = t * C + j;
      const int id = int(get(ids, i));
      const double wt = get(w, i);
      if (id < -1 || id >= rc.E + rc.n_shared) die(fn, "id out of range in an OK result");
      if (margin[size_t(t)] < 4e-6) {
        if (std::isnan(wt)) die(fn, "NaN weight on a near-tie row");
        continue;
      }
      const double want = rw[size_t(i)];
      if (id != rid[size_t(i)])
        die(fn, "token " + std::to_string(t) + " slot " + std::to_string(j) + ": id " +
                    std::to_string(id) + ", reference " + std::to_string(rid[size_t(i)]));
      if (!(std::fabs(wt - want) <= 1e-5 * std::max(1.0, std::fabs(want))) &&
          !(std::isinf(want) && wt == want))
        die(fn, "token " + std::to_string(t) + " slot " + std::to_string(j) + ": weight " +
                    std::to_string(wt) + ", reference " + std::to_string(want));
    }
}

void fuzz_router(In& in) {
  moe_router_config_t c = fuzz_router_cfg(in);
  moe_router_t r = reinterpret_cast<moe_router_t>(uintptr_t(8));
  const bool null_out = in.one_in(40);
  moe_status_t st = moe_router_create(in.one_in(40) ? nullptr : &c, null_out ? nullptr : &r);
  if (!status_ok(st, "moe_router_create")) {
    if (!null_out && r != nullptr) die("moe_router_create", "failed create left a non-NULL handle");
    return;
  }
  const moe_router_config_t eff = effective(c, router_defaults_for(c.method));
  int32_t cols = -1;
  status_ok(moe_router_output_columns(r, &cols), "moe_router_output_columns");
  if (cols != eff.top_k + eff.num_fused_shared_experts) die("moe_router_output_columns", "wrong count");
  const int E = eff.num_experts;
  for (int call = 0, calls = in.pick(1, 3); call < calls; ++call) {
    const int64_t T = in.pick(0, 9);
    const Dt dts[] = {Dt::f32, Dt::bf16, Dt::f16};
    Ten logits, bias, valid, ids, w;
    make(logits, dts[in.pick(0, 2)], {T, E}, in, true);
    const bool specials = in.one_in(4);
    fill_floats(logits, in, specials);
    const bool takes_bias =
        eff.method == MOE_ROUTING_SIGMOID_TOPK || eff.method == MOE_ROUTING_DEEPSEEK_V3;
    make(bias, Dt::f32, {E}, in, true, false);
    fill_floats(bias, in, specials);
    if (!in.one_in(takes_bias ? 2 : 16)) bias.null = true;
    const bool with_bias = !bias.null;
    make(valid, Dt::i32, {1}, in, true, false);
    put(valid, 0, in.pick(-2, int(T) + 2));
    if (!in.one_in(3)) valid.null = true;
    const bool with_valid = !valid.null;
    make(ids, Dt::i32, {T, cols}, in, true);
    make(w, Dt::f32, {T, cols}, in, true);
    poison(ids);
    poison(w);
    const bool must_fail = invalid(logits.bad, "logits") | invalid(ids.bad, "topk_ids") |
                           invalid(w.bad, "topk_weights") | invalid(with_bias && bias.bad, "bias") |
                           invalid(with_bias && !takes_bias, "bias for this method") |
                           invalid(with_valid && valid.bad, "num_valid_tokens");
    st = moe_router_run(in.one_in(50) ? nullptr : r, logits.dl(), bias.dl(), valid.dl(), ids.dl(),
                        w.dl(), nullptr);
    if (!status_ok(st, "moe_router_run", must_fail)) continue;
    // Accepted: every descriptor is the plain [T', E] / [T', cols] the library read.
    const int64_t Tr = logits.shape[0];
    std::vector<double> b = with_bias ? values(bias) : std::vector<double>();
    int64_t nv = with_valid ? std::clamp<int64_t>(int64_t(get(valid, 0)), 0, Tr) : Tr;
    check_routes("moe_router_run", eff, values(logits), Tr, with_bias ? b.data() : nullptr, nv, ids, w);
  }
  status_ok(moe_router_destroy(r), "moe_router_destroy");
}

void fuzz_pack(In& in) {
  const int64_t T = in.pick(0, 6), k = in.pick(0, 4);
  Ten ids, w, packed;
  make(ids, Dt::i32, {T, k}, in, true);
  for (int64_t i = 0; i < ids.numel(); ++i)
    put(ids, i, in.one_in(10) ? (in.one_in(2) ? in.pick(-3, 3) : 32760 + in.pick(0, 10)) : in.pick(-1, 200));
  make(w, Dt::f32, {T, k}, in, true);
  fill_floats(w, in, in.one_in(3));
  make(packed, Dt::i32, {T, k}, in, true);
  poison(packed);
  moe_status_t st = moe_pack_topk(ids.dl(), w.dl(), packed.dl(), nullptr);
  if (!status_ok(st, "moe_pack_topk",
                 invalid(ids.bad, "topk_ids") | invalid(w.bad, "topk_weights") | invalid(packed.bad, "packed")))
    return;
  for (int64_t i = 0; i < ids.numel(); ++i) {
    const int32_t id = int32_t(get(ids, i));
    if (id < -1 || id > 32767) die("moe_pack_topk", "accepted an id outside [-1, 32767]");
    const int32_t p = int32_t(get(packed, i));
    if ((p >> 16) != id) die("moe_pack_topk", "packed id differs");
    const uint16_t wb = uint16_t(p & 0xffff);
    const uint16_t want = f32_to_bf16(float(get(w, i)));
    const bool both_nan = std::isnan(bf16_to_f32(wb)) && std::isnan(bf16_to_f32(want));
    if (wb != want && !both_nan) die("moe_pack_topk", "packed weight differs from bf16(weight)");
  }
}

// ---------------------------------------------------------------------------
// Dispatcher
// ---------------------------------------------------------------------------

struct DispatchRef {
  std::vector<int32_t> local, counts, offsets, sorted;
};

DispatchRef ref_dispatch(const std::vector<int32_t>& mapping, int E_loc, const std::vector<double>& ids) {
  DispatchRef r;
  const size_t n = ids.size();
  r.local.resize(n);
  r.counts.assign(size_t(E_loc), 0);
  for (size_t i = 0; i < n; ++i) {
    int g = int(ids[i]);
    r.local[i] = g >= 0 ? mapping[size_t(g)] : -1;
    if (r.local[i] >= 0) ++r.counts[size_t(r.local[i])];
  }
  r.offsets.assign(size_t(E_loc) + 1, 0);
  for (int e = 0; e < E_loc; ++e) r.offsets[size_t(e) + 1] = r.offsets[size_t(e)] + r.counts[size_t(e)];
  r.sorted.assign(n, -1);
  std::vector<int32_t> cur(r.offsets.begin(), r.offsets.end() - 1);
  for (size_t i = 0; i < n; ++i)
    if (r.local[i] >= 0) r.sorted[size_t(cur[size_t(r.local[i])]++)] = int32_t(i);
  return r;
}

struct FuzzDispatcher {
  moe_dispatcher_t d = nullptr;
  std::vector<int32_t> mapping;
  int E = 0, E_loc = 0;
  ~FuzzDispatcher() { moe_dispatcher_destroy(d); }
};

// Creates a dispatcher over E experts (explicit mapping or ep ranges); false
// when the (possibly bad) config was rejected.
bool make_dispatcher(In& in, int E, FuzzDispatcher& out, bool allow_bad) {
  moe_dispatcher_config_t c;
  c.struct_size = sizeof(c);
  status_ok(moe_dispatcher_config_default(&c), "moe_dispatcher_config_default");
  c.num_experts = E;
  std::vector<int32_t> mapping;
  if (in.one_in(3)) {
    const int E_loc = in.pick(allow_bad ? 0 : 1, std::max(E, 1));
    mapping.resize(size_t(std::max(E, 0)));
    for (auto& m : mapping) m = in.pick(-1, E_loc - 1);
    if (allow_bad && in.one_in(12) && !mapping.empty()) mapping[size_t(in.pick(0, E - 1))] = in.pick(-3, E_loc + 2);
    c.local_expert_mapping = mapping.data();
    c.num_local_experts = E_loc;
  } else {
    c.ep_size = in.pick(1, 4);
    c.ep_rank = in.pick(0, c.ep_size - 1);
    if (allow_bad && in.one_in(12)) c.ep_rank = in.pick(-1, c.ep_size + 1);
  }
  if (allow_bad && in.one_in(20)) c.device_type = in.one_in(2) ? kDLCUDA : kDLOpenCL;
  if (allow_bad)
    c.struct_size = fuzz_struct_size<moe_dispatcher_config_t>(
        in, {offsetof(moe_dispatcher_config_t, device_type), offsetof(moe_dispatcher_config_t, device_id)});
  const bool must_fail = c.device_type != kDLCPU && c.struct_size > offsetof(moe_dispatcher_config_t, device_type);
  moe_status_t st = moe_dispatcher_create(&c, &out.d);
  if (!status_ok(st, "moe_dispatcher_create", must_fail)) {
    if (out.d) die("moe_dispatcher_create", "failed create left a non-NULL handle");
    return false;
  }
  out.E = E;
  status_ok(moe_dispatcher_num_local_experts(out.d, &out.E_loc), "moe_dispatcher_num_local_experts");
  out.mapping.resize(size_t(E));
  std::vector<int32_t> mask(static_cast<size_t>(E));
  status_ok(moe_dispatcher_get_mapping(out.d, out.mapping.data(), mask.data(), E),
            "moe_dispatcher_get_mapping");
  for (int e = 0; e < E; ++e) {
    const int l = out.mapping[size_t(e)];
    if (l < -1 || l >= out.E_loc) die("moe_dispatcher_get_mapping", "mapping entry out of range");
    if (mask[size_t(e)] != (l >= 0 ? 1 : 0)) die("moe_dispatcher_get_mapping", "mask != mapping >= 0");
    if (!mapping.empty() && c.struct_size >= offsetof(moe_dispatcher_config_t, num_local_experts) + 4 &&
        l != mapping[size_t(e)])
      die("moe_dispatcher_get_mapping", "mapping differs from the config's");
  }
  return true;
}

void fuzz_dispatch(In& in) {
  FuzzDispatcher fd;
  const int E = in.one_in(20) ? in.pick(-1, 3) : in.pick(1, 24);
  if (!make_dispatcher(in, E, fd, true)) return;
  for (int call = 0, calls = in.pick(1, 3); call < calls; ++call) {
    const int64_t T = in.pick(0, 8), K = in.one_in(20) ? in.pick(0, 1100) : in.pick(1, 4);
    Ten ids, local, counts, offsets, sorted;
    make(ids, Dt::i32, {T, K}, in, true);
    fill_ids(ids, in, E);
    make(local, Dt::i32, {T, K}, in, true);
    make(counts, Dt::i32, {fd.E_loc}, in, true);
    make(offsets, Dt::i32, {fd.E_loc + 1}, in, true);
    make(sorted, Dt::i32, {T * K}, in, true);
    for (Ten* x : {&local, &counts, &offsets, &sorted}) poison(*x);
    size_t need = 0;
    if (K >= 1 && K <= 1024)
      status_ok(moe_dispatcher_workspace_size(fd.d, T, int32_t(K), &need), "moe_dispatcher_workspace_size");
    std::vector<unsigned char> wsmem(need + 512);
    void* ws = nullptr;
    size_t ws_bytes = 0;
    bool ws_bad = false;
    switch (in.one_in(3) ? in.pick(0, 3) : 4) {
      case 0: ws = wsmem.data() + (256 - reinterpret_cast<uintptr_t>(wsmem.data()) % 256); ws_bytes = need; break;
      case 1: ws_bytes = 64; ws_bad = true; break;
      case 2: ws = wsmem.data() + (256 - reinterpret_cast<uintptr_t>(wsmem.data()) % 256) + 4; ws_bytes = need; ws_bad = true; break;
      default: break;
    }
    const bool must_fail = invalid(ws_bad, "workspace") | invalid(ids.bad, "topk_ids") |
                           invalid(local.bad, "local_ids") | invalid(counts.bad, "expert_counts") |
                           invalid(offsets.bad, "expert_offsets") | invalid(sorted.bad, "sorted_slots");
    moe_status_t st = moe_dispatcher_dispatch(fd.d, ids.dl(), local.dl(), counts.dl(), offsets.dl(),
                                              sorted.dl(), ws, ws_bytes, nullptr);
    if (!status_ok(st, "moe_dispatcher_dispatch", must_fail)) continue;
    const std::vector<double> idv = values(ids);
    for (double v : idv)
      if (v < -1 || v >= E) die("moe_dispatcher_dispatch", "accepted an id outside [-1, E)");
    DispatchRef ref = ref_dispatch(fd.mapping, fd.E_loc, idv);
    auto same = [&](const Ten& x, const std::vector<int32_t>& want, const char* what) {
      for (size_t i = 0; i < want.size(); ++i)
        if (int32_t(get(x, int64_t(i))) != want[i]) die("moe_dispatcher_dispatch", std::string(what) + " differs");
    };
    same(local, ref.local, "local_ids");
    same(counts, ref.counts, "expert_counts");
    same(offsets, ref.offsets, "expert_offsets");
    same(sorted, ref.sorted, "sorted_slots");
  }
}

// ---------------------------------------------------------------------------
// Runner
// ---------------------------------------------------------------------------

struct RunnerShape {
  int E_loc, H, I, activation;
  bool gated, swap, won;
  double output_scale;
};

double act(int a, double v) {
  switch (a) {
    case MOE_ACTIVATION_SILU: return v / (1.0 + std::exp(-v));
    case MOE_ACTIVATION_GELU: return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
    case MOE_ACTIVATION_GELU_TANH:
      return 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
    case MOE_ACTIVATION_RELU2: return v > 0 ? v * v : 0.0;
    default: return v;
  }
}
// A bound on |act'| over [v - e, v + e].
double act_slope(int a, double v, double e) {
  if (a == MOE_ACTIVATION_RELU2) return 2.0 * (std::fabs(v) + e);
  return a == MOE_ACTIVATION_IDENTITY ? 1.0 : 1.2;
}

// y [T, H] in float64 and a bound on |y_f32 - y| from f32 rounding: every dot
// product of n terms is off by at most ~n * 2^-23 * sum |terms|, carried
// through the activation by its slope. (tests/ref_runner.h has no bound.)
void ref_run(const RunnerShape& s, const std::vector<double>& x, int64_t T,
             const std::vector<double>& ids, const std::vector<double>& w, int K,
             const std::vector<double>& w13, const std::vector<double>& w2,
             double weight_rel_err, std::vector<double>& y, std::vector<double>& bound) {
  const int H = s.H, I = s.I, rows = s.gated ? 2 * I : I;
  const double u = 1.2e-7;
  y.assign(size_t(T * H), 0.0);
  bound.assign(size_t(T * H), 0.0);
  std::vector<double> xin(static_cast<size_t>(H)), h(static_cast<size_t>(I)), eh(static_cast<size_t>(I)), ha(static_cast<size_t>(I));
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < K; ++j) {
      const int e = int(ids[size_t(t * K + j)]);
      if (e < 0) continue;
      const double wt = w[size_t(t * K + j)];
      const double scale_in = s.won ? wt : 1.0, scale_out = s.won ? 1.0 : wt;
      for (int k = 0; k < H; ++k) xin[size_t(k)] = x[size_t(t * H + k)] * scale_in;
      auto dot13 = [&](int row, double& abs_sum) {
        double acc = 0;
        abs_sum = 0;
        const double* wr = &w13[size_t((int64_t(e) * rows + row) * H)];
        for (int k = 0; k < H; ++k) {
          acc += wr[k] * xin[size_t(k)];
          abs_sum += std::fabs(wr[k] * xin[size_t(k)]);
        }
        return acc;
      };
      const double eps13 = (H + 8) * u + (s.won ? weight_rel_err + u : 0.0);
      for (int i = 0; i < I; ++i) {
        double ga = 0, ua = 0;
        const int grow = s.gated && s.swap ? I + i : i;
        const double g = dot13(grow, ga), eg = eps13 * ga;
        const double a = act(s.activation, g);
        const double ea = act_slope(s.activation, g, eg) * eg + 4 * u * std::fabs(a);
        if (s.gated) {
          const double up = dot13(s.swap ? i : I + i, ua), eu = eps13 * ua;
          h[size_t(i)] = a * up;
          eh[size_t(i)] = std::fabs(up) * ea + std::fabs(a) * eu + ea * eu + u * std::fabs(a * up);
        } else {
          h[size_t(i)] = a;
          eh[size_t(i)] = ea;
        }
        ha[size_t(i)] = std::fabs(h[size_t(i)]) + eh[size_t(i)];
      }
      for (int c = 0; c < H; ++c) {
        const double* wr = &w2[size_t((int64_t(e) * H + c) * I)];
        double acc = 0, abs_sum = 0, err = 0;
        for (int i = 0; i < I; ++i) {
          acc += wr[i] * h[size_t(i)];
          abs_sum += std::fabs(wr[i]) * ha[size_t(i)];
          err += std::fabs(wr[i]) * eh[size_t(i)];
        }
        const double ey = (I + 8) * u * abs_sum + err;
        y[size_t(t * H + c)] += scale_out * acc;
        bound[size_t(t * H + c)] +=
            std::fabs(scale_out) * (ey + (K + 4) * u * abs_sum) + weight_rel_err * std::fabs(scale_out) * abs_sum;
      }
    }
  for (size_t i = 0; i < y.size(); ++i) {
    y[i] *= s.output_scale;
    bound[i] = std::fabs(s.output_scale) * bound[i] * 1.5 + 2 * u * std::fabs(y[i]);
  }
}

// The output (dtype of hidden) against y +- bound, plus its own rounding.
void check_output(const char* fn, const Ten& out, const std::vector<double>& y,
                  const std::vector<double>& bound) {
  const DLDataType d = out.t.dtype;
  const double rel = d.bits == 32 ? 0.0 : (d.code == kDLBfloat ? 1.0 / 256 : 1.0 / 2048);
  const double tiny = d.bits == 32 ? 1e-38 : (d.code == kDLBfloat ? 1e-38 : 6e-8);
  for (size_t i = 0; i < y.size(); ++i) {
    if (d.code == kDLFloat && d.bits == 16 && std::fabs(y[i]) + bound[i] > 6.0e4) continue;  // f16 overflow
    const double got = get(out, int64_t(i));
    const double tol = bound[i] * (1 + rel) + rel * std::fabs(y[i]) + tiny;
    if (!(std::fabs(got - y[i]) <= tol))
      die(fn, "output element " + std::to_string(i) + " = " + std::to_string(got) + ", reference " +
                  std::to_string(y[i]) + " +- " + std::to_string(tol));
  }
}

struct FuzzRunner {
  moe_runner_t r = nullptr;
  moe_runner_config_t eff{};
  RunnerShape s{};
  Ten w13, w2, s13, s2, a13, a2;
  bool weights_set = false, finite = true;
  ~FuzzRunner() { moe_runner_destroy(r); }
};

moe_runner_config_t runner_defaults() {
  moe_runner_config_t d;
  d.struct_size = sizeof(d);
  moe_runner_config_default(&d);
  return d;
}

// Creates a runner (maybe from a bad config) and maybe sets its weights.
bool make_runner(In& in, int E_loc, int H, bool won, FuzzRunner& fr, bool allow_bad) {
  moe_runner_config_t c = runner_defaults();
  c.num_experts = E_loc;
  c.hidden_size = H;
  c.intermediate_size = in.pick(1, 12);
  c.activation = in.pick(0, 4);
  c.gated = in.one_in(3) ? 0 : 1;
  c.swap_gate_up = c.gated && in.one_in(3);
  c.apply_router_weight_on_input = won;
  c.quant_mode = in.one_in(4) ? in.pick(1, 2) : MOE_QUANT_NONE;
  c.act_scale_mode = c.quant_mode == MOE_QUANT_FP8_PER_TENSOR && in.one_in(2) ? MOE_ACT_SCALE_STATIC
                                                                                : MOE_ACT_SCALE_DYNAMIC;
  const float scales[] = {1.0f, 0.5f, -2.0f, 0.0f, NAN};
  c.output_scale = scales[in.one_in(3) ? in.pick(0, allow_bad ? 4 : 3) : 0];
  if (allow_bad && in.one_in(10)) {
    switch (in.pick(0, 6)) {
      case 0: c.activation = in.pick(-2, 8); break;
      case 1: c.gated = in.pick(-1, 3); break;
      case 2: c.swap_gate_up = 1; c.gated = 0; break;
      case 3: c.quant_mode = in.pick(-1, 4); break;
      case 4: c.deterministic = 0; break;
      case 5: c.intermediate_size = in.pick(-1, 0); break;
      default: c.act_scale_mode = MOE_ACT_SCALE_STATIC; break;
    }
  }
  if (allow_bad)
    c.struct_size = fuzz_struct_size<moe_runner_config_t>(
        in, {offsetof(moe_runner_config_t, activation), offsetof(moe_runner_config_t, quant_mode),
             offsetof(moe_runner_config_t, output_scale), offsetof(moe_runner_config_t, validate_ids)});
  if (!status_ok(moe_runner_create(&c, &fr.r), "moe_runner_create")) {
    if (fr.r) die("moe_runner_create", "failed create left a non-NULL handle");
    return false;
  }
  fr.eff = effective(c, runner_defaults());
  const moe_runner_config_t& e = fr.eff;
  fr.s = RunnerShape{e.num_experts, e.hidden_size, e.intermediate_size, e.activation,
                     e.gated != 0, e.swap_gate_up != 0, e.apply_router_weight_on_input != 0,
                     double(e.output_scale)};
  if (allow_bad && in.one_in(30)) return true;  // no weights: every run must fail
  const int rows = fr.s.gated ? 2 * fr.s.I : fr.s.I;
  const bool fp8 = e.quant_mode != MOE_QUANT_NONE;
  const Dt float_dts[] = {Dt::f32, Dt::bf16, Dt::f16};
  const Dt wdt = fp8 ? Dt::e4m3 : float_dts[in.pick(0, 2)];
  make(fr.w13, wdt, {E_loc, rows, H}, in, allow_bad);
  make(fr.w2, wdt, {E_loc, H, fr.s.I}, in, allow_bad);
  const bool specials = allow_bad && in.one_in(6);
  fr.finite = !specials;
  for (Ten* x : {&fr.w13, &fr.w2}) {
    if (fp8)
      for (int64_t i = 0; i < x->numel(); ++i) put(*x, i, specials ? in.u8() : (in.u8() & 0x77) | (in.u8() & 0x80));
    else
      fill_floats(*x, in, specials);
  }
  auto scale = [&](Ten& x, std::vector<int64_t> shp) {
    make(x, Dt::f32, std::move(shp), in, allow_bad, false);
    for (int64_t i = 0; i < x.numel(); ++i) put(x, i, (1 + in.pick(0, 15)) / 64.0);
  };
  const int64_t b = 128;
  // The scales this mode takes: a missing one or an extra one is always
  // invalid, and so is a given one with a bad mutation (make() may also have
  // left a scale out: required = false there, judged here).
  bool needs[4] = {false, false, false, false};  // s13, s2, a13, a2
  if (e.quant_mode == MOE_QUANT_FP8_PER_TENSOR) {
    scale(fr.s13, {E_loc});
    scale(fr.s2, {E_loc});
    scale(fr.a13, {1});
    scale(fr.a2, {1});
    const bool stat = e.act_scale_mode == MOE_ACT_SCALE_STATIC;
    if (!stat) fr.a13.null = fr.a2.null = true;
    needs[0] = needs[1] = true;
    needs[2] = needs[3] = stat;
  } else if (e.quant_mode == MOE_QUANT_FP8_BLOCK_128) {
    scale(fr.s13, {E_loc, (rows + b - 1) / b, (H + b - 1) / b});
    scale(fr.s2, {E_loc, (H + b - 1) / b, (fr.s.I + b - 1) / b});
    make(fr.a13, Dt::f32, {1}, in, false);
    make(fr.a2, Dt::f32, {1}, in, false);
    fr.a13.null = fr.a2.null = true;
    needs[0] = needs[1] = true;
  } else {
    for (Ten* x : {&fr.s13, &fr.s2, &fr.a13, &fr.a2}) {
      make(*x, Dt::f32, {E_loc}, in, false);
      x->null = true;
    }
  }
  Ten* const all[] = {&fr.s13, &fr.s2, &fr.a13, &fr.a2};
  if (allow_bad && in.one_in(10)) {  // a scale missing or extra
    Ten* x = all[in.pick(0, 3)];
    x->null = !x->null;
  }
  bool scales_bad = false;
  for (int i = 0; i < 4; ++i)
    scales_bad = scales_bad || all[i]->null == needs[i] || (!all[i]->null && all[i]->bad);
  const bool must_fail = invalid(fr.w13.bad, "w13") | invalid(fr.w2.bad, "w2") | invalid(scales_bad, "scales");
  moe_status_t st = moe_runner_set_weights(fr.r, fr.w13.dl(), fr.w2.dl(), fr.s13.dl(), fr.s2.dl(),
                                           fr.a13.dl(), fr.a2.dl());
  fr.weights_set = status_ok(st, "moe_runner_set_weights", must_fail);
  return true;
}

// A workspace choice: internal, exact, too small, misaligned, NULL with bytes.
struct FuzzWs {
  std::vector<unsigned char> mem;
  void* ptr = nullptr;
  size_t bytes = 0;
  bool bad = false;
  void choose(In& in, size_t need) {
    mem.assign(need + 512, 0xcd);
    unsigned char* aligned = mem.data() + (256 - reinterpret_cast<uintptr_t>(mem.data()) % 256);
    switch (in.one_in(2) ? in.pick(0, 3) : 4) {
      case 0: ptr = aligned; bytes = need; break;
      case 1: ptr = aligned; bytes = need ? need - 1 : 0; bad = need > 0; break;
      case 2: ptr = aligned + 8; bytes = need; bad = true; break;
      case 3: bytes = need + 1; bad = true; break;
      default: break;
    }
  }
};

void fuzz_runner(In& in) {
  FuzzRunner fr;
  const int E_loc = in.pick(1, 5), H = in.pick(1, 20);
  const bool won = in.one_in(5);
  if (!make_runner(in, E_loc, H, won, fr, true)) return;
  const RunnerShape& s = fr.s;
  // Metadata from a real dispatch over the runner's experts.
  FuzzDispatcher fd;
  moe_dispatcher_config_t dc;
  dc.struct_size = sizeof(dc);
  moe_dispatcher_config_default(&dc);
  dc.num_experts = s.E_loc;
  if (!status_ok(moe_dispatcher_create(&dc, &fd.d), "moe_dispatcher_create")) die("fuzz_runner", "setup");
  for (int call = 0, calls = in.pick(1, 3); call < calls; ++call) {
    const int64_t T = in.pick(0, 6);
    const int K = s.won && !in.one_in(10) ? 1 : in.pick(1, 3);
    Ten ids, local, offsets, sorted, x, w, out;
    make(ids, Dt::i32, {T, K}, in, false);
    fill_ids(ids, in, s.E_loc);
    for (int64_t i = 0; i < ids.numel(); ++i)  // the dispatcher must accept these
      put(ids, i, std::clamp<int>(int(get(ids, i)), -1, s.E_loc - 1));
    make(local, Dt::i32, {T, K}, in, true);
    make(offsets, Dt::i32, {s.E_loc + 1}, in, true);
    make(sorted, Dt::i32, {T * K}, in, true);
    bool meta_bad = local.bad || offsets.bad || sorted.bad;
    if (!meta_bad && !local.null && !offsets.null && !sorted.null &&
        local.t.dtype.code == kDLInt && offsets.t.dtype.code == kDLInt && sorted.t.dtype.code == kDLInt &&
        local.t.dtype.bits == 32 && offsets.t.dtype.bits == 32 && sorted.t.dtype.bits == 32 &&
        local.shape == std::vector<int64_t>{T, K} && offsets.shape == std::vector<int64_t>{s.E_loc + 1} &&
        sorted.shape == std::vector<int64_t>{T * K} && local.t.ndim == 2 && offsets.t.ndim == 1 &&
        sorted.t.ndim == 1) {
      Ten pl, pc, po, ps;  // dispatch into plain buffers, then copy into the fuzzed ones
      make(pl, Dt::i32, {T, K}, in, false);
      make(pc, Dt::i32, {s.E_loc}, in, false);
      make(po, Dt::i32, {s.E_loc + 1}, in, false);
      make(ps, Dt::i32, {T * K}, in, false);
      if (!status_ok(moe_dispatcher_dispatch(fd.d, ids.dl(), pl.dl(), pc.dl(), po.dl(), ps.dl(), 0, 0, 0),
                     "moe_dispatcher_dispatch"))
        die("fuzz_runner", "dispatch of valid ids failed");
      for (int64_t i = 0; i < T * K; ++i) put(local, i, get(pl, i)), put(sorted, i, get(ps, i));
      for (int64_t i = 0; i <= s.E_loc; ++i) put(offsets, i, get(po, i));
      if (in.one_in(8)) {  // corrupt the metadata: the CPU boundary must notice
        switch (in.pick(0, 3)) {
          case 0: if (T * K > 0) put(local, in.pick(0, int(T * K) - 1), in.pick(-3, s.E_loc + 2)); break;
          case 1: put(offsets, in.pick(0, s.E_loc), in.pick(-2, int(T * K) + 2)); break;
          case 2: if (T * K > 1) { int a = in.pick(0, int(T * K) - 1), b = in.pick(0, int(T * K) - 1);
                    double va = get(sorted, a); put(sorted, a, get(sorted, b)); put(sorted, b, va); } break;
          default: if (T * K > 0) put(sorted, in.pick(0, int(T * K) - 1), in.pick(-2, int(T * K) + 1)); break;
        }
      }
    }
    const Dt xdts[] = {Dt::f32, Dt::bf16, Dt::f16};
    make(x, xdts[in.pick(0, 2)], {T, s.H}, in, true);
    const bool specials = in.one_in(6);
    fill_floats(x, in, specials);
    make(w, Dt::f32, {T, K}, in, true);
    fill_floats(w, in, specials);
    make(out, xdts[in.pick(0, 2)], {T, s.H}, in, true);
    if (in.one_in(2)) take_dtype(out, x);
    poison(out);
    size_t need = 0;
    status_ok(moe_runner_workspace_size(fr.r, T, K, kDLCPU, &need), "moe_runner_workspace_size");
    FuzzWs ws;
    ws.choose(in, need);
    const bool must_fail = invalid(!fr.weights_set, "no weights") | invalid(meta_bad, "metadata") |
                           invalid(x.bad, "hidden") | invalid(w.bad, "topk_weights") |
                           invalid(out.bad, "output") | invalid(ws.bad, "workspace");
    moe_status_t st = moe_runner_run(fr.r, x.dl(), local.dl(), w.dl(), offsets.dl(), sorted.dl(),
                                     out.dl(), ws.ptr, ws.bytes, nullptr);
    if (!status_ok(st, "moe_runner_run", must_fail)) continue;
    // Accepted: the local ids, offsets and slots are a valid dispatch of local_ids.
    const std::vector<double> lid = values(local);
    for (double v : lid)
      if (v < -1 || v >= s.E_loc) die("moe_runner_run", "accepted a local id outside [-1, E_loc)");
    std::vector<int32_t> ident(size_t(s.E_loc));
    for (int e = 0; e < s.E_loc; ++e) ident[size_t(e)] = e;
    const DispatchRef ref = ref_dispatch(ident, s.E_loc, lid);
    for (int e = 0; e <= s.E_loc; ++e)
      if (int32_t(get(offsets, e)) != ref.offsets[size_t(e)]) die("moe_runner_run", "accepted inconsistent offsets");
    if (fr.eff.quant_mode != MOE_QUANT_NONE || !fr.finite || specials) continue;  // FP8: see header
    const std::vector<double> xv = values(x), wv = values(w);
    if (!all_finite(xv) || !all_finite(wv)) continue;
    std::vector<double> y, bound;
    ref_run(s, xv, T, lid, wv, K, values(fr.w13), values(fr.w2), 0.0, y, bound);
    check_output("moe_runner_run", out, y, bound);
  }
}

// ---------------------------------------------------------------------------
// One-call layer
// ---------------------------------------------------------------------------

void fuzz_layer(In& in) {
  moe_router_config_t rc = fuzz_router_cfg(in);
  const bool loose = in.one_in(4);  // let configs and handles disagree
  if (!loose) rc.struct_size = sizeof(rc);
  moe_router_t router = nullptr;
  if (!status_ok(moe_router_create(&rc, &router), "moe_router_create")) return;
  struct Guard {
    moe_router_t r;
    ~Guard() { moe_router_destroy(r); }
  } guard{router};
  const moe_router_config_t eff = effective(rc, router_defaults_for(rc.method));
  const int E_all = eff.num_experts + eff.num_fused_shared_experts;
  FuzzDispatcher fd;
  if (!make_dispatcher(in, loose && in.one_in(4) ? E_all + 1 : E_all, fd, loose)) return;
  if (fd.E_loc < 1) return;
  FuzzRunner fr;
  const bool llama4 = eff.method == MOE_ROUTING_LLAMA4;
  if (!make_runner(in, loose && in.one_in(6) ? fd.E_loc + 1 : fd.E_loc, in.pick(1, 16),
                   loose && in.one_in(6) ? !llama4 : llama4, fr, loose))
    return;
  const bool fits = fd.E == E_all && fr.s.E_loc == fd.E_loc && fr.s.won == llama4 &&
                    (!fr.s.won || eff.top_k + eff.num_fused_shared_experts == 1);
  for (int call = 0, calls = in.pick(1, 2); call < calls; ++call) {
    const int64_t T = in.pick(0, 6);
    Ten x, logits, bias, out;
    const Dt xdts[] = {Dt::f32, Dt::bf16, Dt::f16};
    make(x, xdts[in.pick(0, 2)], {T, fr.s.H}, in, true);
    fill_floats(x, in, false);
    make(logits, xdts[in.pick(0, 2)], {T, eff.num_experts}, in, true);
    fill_floats(logits, in, in.one_in(6));
    const bool takes_bias = eff.method == MOE_ROUTING_SIGMOID_TOPK || eff.method == MOE_ROUTING_DEEPSEEK_V3;
    make(bias, Dt::f32, {eff.num_experts}, in, true, false);
    fill_floats(bias, in, false);
    if (!(takes_bias && in.one_in(2))) bias.null = true;
    const bool with_bias = !bias.null;
    make(out, xdts[in.pick(0, 2)], {T, fr.s.H}, in, true);
    if (in.one_in(2)) take_dtype(out, x);
    poison(out);
    size_t need = 0;
    if (fits)
      status_ok(moe_layer_workspace_size(router, fd.d, fr.r, T, kDLCPU, &need), "moe_layer_workspace_size");
    FuzzWs ws;
    ws.choose(in, need);
    const bool must_fail = invalid(!fits, "handles") | invalid(!fr.weights_set, "no weights") |
                           invalid(x.bad, "hidden") | invalid(logits.bad, "logits") |
                           invalid(out.bad, "output") | invalid(with_bias && bias.bad, "bias") |
                           invalid(fits && ws.bad, "workspace");
    moe_status_t st = moe_layer_forward(router, fd.d, fr.r, x.dl(), logits.dl(), bias.dl(), nullptr,
                                        out.dl(), ws.ptr, ws.bytes, nullptr);
    if (!status_ok(st, "moe_layer_forward", must_fail)) continue;
    if (fr.eff.quant_mode != MOE_QUANT_NONE || !fr.finite) continue;
    const std::vector<double> lv = values(logits), xv = values(x);
    if (!all_finite(lv)) continue;
    const int64_t Tr = x.shape[0];
    std::vector<double> b = with_bias ? values(bias) : std::vector<double>();
    std::vector<int> rid;
    std::vector<double> rw, margin;
    moe_test::ref_route(moe_test::ref_router_cfg(eff), lv, Tr, with_bias ? b.data() : nullptr, Tr, rid, rw,
                        &margin);
    bool clear = true;
    for (double m : margin) clear = clear && m >= 1e-4;
    if (!clear) continue;  // a near tie may route either way in f32
    const int C = eff.top_k + eff.num_fused_shared_experts;
    std::vector<double> lid(rid.size());
    for (size_t i = 0; i < rid.size(); ++i) lid[i] = rid[i] >= 0 ? fd.mapping[size_t(rid[i])] : -1;
    RunnerShape s = fr.s;
    if (eff.scaling_on_output) s.output_scale *= double(eff.routed_scaling_factor);
    std::vector<double> y, bound;
    ref_run(s, xv, Tr, lid, rw, C, values(fr.w13), values(fr.w2), 2e-6, y, bound);
    check_output("moe_layer_forward", out, y, bound);
  }
}

// ---------------------------------------------------------------------------
// Queries and odd calls
// ---------------------------------------------------------------------------

void fuzz_misc(In& in) {
  const char* s = moe_status_string(moe_status_t(in.pick(0, 15)));
  if (!s || !s[0]) die("moe_status_string", "NULL or empty");
  if (!moe_version_string() || moe_version() == 0) die("moe_version", "empty");
  status_ok(moe_router_destroy(nullptr), "moe_router_destroy");
  status_ok(moe_dispatcher_destroy(nullptr), "moe_dispatcher_destroy");
  status_ok(moe_runner_destroy(nullptr), "moe_runner_destroy");
  FuzzRunner fr;
  if (!make_runner(in, in.pick(1, 4), in.pick(1, 8), false, fr, true)) return;
  size_t bytes = 0;
  const int64_t max_tokens = in.one_in(4) ? int64_t(in.u16()) << in.pick(0, 47) : in.pick(-1, 64);
  const int32_t cols = in.pick(-1, 1030), dev = in.pick(0, 5);
  status_ok(moe_runner_workspace_size(fr.r, max_tokens, cols, dev, &bytes), "moe_runner_workspace_size");
  FuzzDispatcher fd;
  if (!make_dispatcher(in, in.pick(1, 8), fd, true)) return;
  status_ok(moe_dispatcher_workspace_size(fd.d, max_tokens, cols, &bytes), "moe_dispatcher_workspace_size");
  status_ok(moe_dispatcher_get_mapping(fd.d, nullptr, nullptr, in.pick(-1, 10)), "moe_dispatcher_get_mapping");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  In in{data, size};
  switch (in.u8() % 6) {
    case 0: fuzz_router(in); break;
    case 1: fuzz_pack(in); break;
    case 2: fuzz_dispatch(in); break;
    case 3: fuzz_runner(in); break;
    case 4: fuzz_layer(in); break;
    default: fuzz_misc(in); break;
  }
  return 0;
}

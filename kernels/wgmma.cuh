// Hopper warpgroup MMA (wgmma, sm_90a) primitives for the runners' GEMMs.
//
// Operands live in shared memory in the 128-byte-swizzled K-major layout:
// a tile row holds 128 bytes of K (64 bf16/f16 or 128 e4m3 values), rows
// follow each other every 128 bytes, and 16-byte chunk c of row r sits at
// chunk position c ^ (r % 8) (the hardware's 128B swizzle: byte-address bits
// 4-6 XOR bits 7-9). A tile starts on a 1024-byte boundary (eight rows, one
// swizzle period). A k step inside the 128-byte row advances the descriptor's
// start address by its byte width; the swizzle is applied to the absolute
// address, so the k-th 32-byte slice of every row is found.
//
// The accumulator of m64nNk16 in a warpgroup: warp w of the group (0..3)
// holds rows 16 w + lane / 4 and 16 w + lane / 4 + 8; register 4 j + 2 h + q
// holds row 16 w + lane / 4 + 8 h, column 8 j + 2 (lane % 4) + q (j < N / 8,
// h, q in {0, 1}): the mma.sync m16n8 fragment, repeated over N.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <cstdio>
#include <type_traits>

namespace moe::kernels::wgmma {

// Everything that issues wgmma is compiled only for the arch-specific target.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOE_HAS_WGMMA 1
#else
#define MOE_HAS_WGMMA 0
#endif

constexpr int kRowBytes = 128;      // one swizzle row
constexpr int kSwizzleBytes = 1024;  // eight rows: a tile's alignment

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` in a swizzled tile.
__device__ __forceinline__ uint32_t swizzled_offset(int row, int chunk) {
  return uint32_t(row) * kRowBytes + uint32_t((chunk ^ (row & 7)) << 4);
}

// Shared-memory matrix descriptor of a K-major, 128B-swizzled operand whose
// first row starts at shared address `saddr`, for the k steps inside that
// first swizzle row: at(offset) describes saddr + offset (offset a 16-byte
// multiple below 128). Fields: start address >> 4 (bits 0-13), leading byte
// offset 16 >> 4 (bits 16-29, unused by the swizzled K-major layout), stride
// byte offset 1024 >> 4 between 8-row groups (bits 32-45), base offset 0,
// swizzle mode 1 = 128B (bits 62-63). The start field is computed once and
// only added to per k step (shared addresses are below 2^18, so the 14-bit
// field does not carry): one add per MMA (v16).
struct DescSw128 {
  uint32_t lo;  // bits 0-31 at offset 0
  __device__ __forceinline__ explicit DescSw128(uint32_t saddr) : lo(((saddr & 0x3FFFF) >> 4) | (1u << 16)) {}
  __device__ __forceinline__ uint64_t at(uint32_t offset) const {
    return (uint64_t((kSwizzleBytes >> 4) | (1u << 30)) << 32) | (lo + (offset >> 4));
  }
};

// The k-step buffers of a block: STAGES x (A_ROWS rows of A, then B_ROWS
// rows of B), 128 swizzled bytes a row, in dynamic shared memory launched
// with SMEM_BYTES (one swizzle period of slack: the start is aligned here).
// Thread tid copies 16-byte chunk tid % 8 of rows tid / 8 + ROWS_PER_PASS i;
// that chunk's swizzled position is the same in all of them.
template <int THREADS, int A_ROWS, int B_ROWS, int STAGES>
struct Staging {
  static constexpr int ROWS_PER_PASS = THREADS / 8;
  static constexpr int A_CHUNKS = A_ROWS / ROWS_PER_PASS, B_CHUNKS = B_ROWS / ROWS_PER_PASS;
  static constexpr uint32_t A_BYTES = uint32_t(A_ROWS) * kRowBytes;
  static constexpr uint32_t STAGE_BYTES = A_BYTES + uint32_t(B_ROWS) * kRowBytes;
  static constexpr size_t SMEM_BYTES = size_t(STAGES) * STAGE_BYTES + kSwizzleBytes;
  static_assert(A_ROWS % ROWS_PER_PASS == 0 && B_ROWS % ROWS_PER_PASS == 0 && ROWS_PER_PASS % 8 == 0,
                "whole passes of whole swizzle periods");

  unsigned char* smem;  // aligned start
  uint32_t base;        // its shared address
  uint32_t chunk_off;   // this thread's chunk in its first row
  int chunk, row0;

  __device__ __forceinline__ Staging(unsigned char* raw, int tid) {
    const uint32_t r = uint32_t(__cvta_generic_to_shared(raw));
    base = (r + kSwizzleBytes - 1) & ~uint32_t(kSwizzleBytes - 1);
    smem = raw + (base - r);
    chunk = tid & 7;
    row0 = tid >> 3;
    chunk_off = swizzled_offset(row0, chunk);
  }
  __device__ __forceinline__ unsigned char* a_dst(int stage, int i) const {
    return smem + size_t(stage) * STAGE_BYTES + chunk_off + uint32_t(i) * ROWS_PER_PASS * kRowBytes;
  }
  __device__ __forceinline__ unsigned char* b_dst(int stage, int i) const {
    return a_dst(stage, i) + A_BYTES;
  }
  // Shared address of row `row` of A (of B) in buffer `stage`.
  __device__ __forceinline__ uint32_t a_tile(int stage, int row = 0) const {
    return base + uint32_t(stage) * STAGE_BYTES + uint32_t(row) * kRowBytes;
  }
  __device__ __forceinline__ uint32_t b_tile(int stage) const { return a_tile(stage) + A_BYTES; }
};

// --- mbarriers and the bulk tensor copy (TMA) --------------------------------

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
#if MOE_HAS_WGMMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}
// Makes initialised barriers visible to the other threads and to the copy engine.
__device__ __forceinline__ void mbar_init_fence() {
#if MOE_HAS_WGMMA
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#if MOE_HAS_WGMMA
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}
// One arrival that also announces `bytes` of copies completing on the barrier.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if MOE_HAS_WGMMA
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
#endif
}
// Waits until the barrier's phase with parity `parity` has completed.
// Debug builds with MOE_MBAR_WATCHDOG=1 (cmake -DMOE_MBAR_WATCHDOG=ON) turn a
// wait that lasts 2 s into a report (block, cluster rank, thread, barrier,
// its raw state and the caller's two tags: the pipeline step and the item)
// followed by a trap, so that a pipeline which would hang fails instead and
// says where; every warp still waiting 1 s later has reported too.
#ifndef MOE_MBAR_WATCHDOG
#define MOE_MBAR_WATCHDOG 0
#endif
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 1;
#if MOE_HAS_WGMMA
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
#endif
  return done != 0;
}
#if MOE_MBAR_WATCHDOG
__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
static __device__ __noinline__ void mbar_watchdog(uint32_t bar, uint32_t parity, int tag_a, int tag_b) {
  const uint64_t t0 = global_ns();
  while (!mbar_try_wait(bar, parity)) {
    if (global_ns() - t0 < 2000000000ull) continue;
    unsigned long long state = 0;
    asm volatile("ld.volatile.shared.u64 %0, [%1];" : "=l"(state) : "r"(bar));
    uint32_t rank = 0;
#if MOE_HAS_WGMMA
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
#endif
    if (threadIdx.x % 32 == 0)
      printf("mbar watchdog: block %d rank %u thread %d bar %#x parity %u state %#llx step %d item %d\n",
             int(blockIdx.x), rank, int(threadIdx.x), bar, parity, state, tag_a, tag_b);
    const uint64_t t1 = global_ns();
    while (global_ns() - t1 < 1000000000ull) {
    }
    __trap();
  }
}
#endif
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity, int tag_a = -1, int tag_b = -1) {
#if MOE_MBAR_WATCHDOG
  if (!mbar_try_wait(bar, parity)) mbar_watchdog(bar, parity, tag_a, tag_b);
#else
  (void)tag_a;
  (void)tag_b;
#if MOE_HAS_WGMMA
  asm volatile(
      "{\n.reg .pred done;\nwait_again:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_again;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#endif
#endif
}
// Debug builds with MOE_DEBUG_SKEW_NS=N (cmake -DMOE_DEBUG_SKEW_NS=N) hold the
// third warp of every warpgroup about N ns at each skew_point() a kernel
// marks, so that a test can check that a pipeline does not count on the
// warps of a warpgroup staying in step (run 145: run 140's hang came back at
// once on the old kernel, gpu.runner.wgmma_idle_warpgroup_steps).
#ifndef MOE_DEBUG_SKEW_NS
#define MOE_DEBUG_SKEW_NS 0
#endif
__device__ __forceinline__ void skew_point() {
#if MOE_DEBUG_SKEW_NS > 0
  if ((threadIdx.x / 32) % 4 == 2) __nanosleep(MOE_DEBUG_SKEW_NS);
#endif
}
// --- 2-block clusters ---------------------------------------------------------

__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r = 0;
#if MOE_HAS_WGMMA
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
#endif
  return r;
}
// Every thread of every block of the cluster (warp-converged).
__device__ __forceinline__ void cluster_sync() {
#if MOE_HAS_WGMMA
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}
// The same shared-memory offset in block `rank` of the cluster.
__device__ __forceinline__ uint32_t map_to_rank(uint32_t saddr, uint32_t rank) {
  uint32_t r = saddr;
#if MOE_HAS_WGMMA
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(saddr), "r"(rank));
#endif
  return r;
}
// An arrival on a barrier of any block of the cluster (address from
// map_to_rank), with the default (.release.cta) semantics: what it orders is
// this warpgroup's finished wgmma reads of a buffer before the partner's
// copy engine refills it, which the wgmma wait before the arrival already
// guarantees, and the producer's plain mbar_wait (CTA acquire) pairs with
// it. Cluster-scope release here and a cluster-scope acquire in the wait
// made the cluster kernel 1.3-1.8x slower (runs 26-30).
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t cluster_bar) {
#if MOE_HAS_WGMMA
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(cluster_bar) : "memory");
#endif
}
// tma_load_2d into the same offset `dst` of every block in `mask`, each
// block's barrier at offset `bar` receiving the bytes that land there.
__device__ __forceinline__ void tma_load_2d_multicast(uint32_t dst, const void* map, int c0, int c1,
                                                      uint32_t bar, uint16_t mask) {
#if MOE_HAS_WGMMA
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar), "h"(mask)
      : "memory");
#endif
}

// Box at (c0 = inner coordinate, c1 = row) of a 2-D tensor map into shared
// memory at `dst`, completing `bytes` on barrier `bar`.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* map, int c0, int c1, uint32_t bar) {
#if MOE_HAS_WGMMA
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
      ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
#endif
}

// One arrival on `bar` once every cp.async this thread issued before has
// landed; the barrier's expected count includes it (.noinc).
__device__ __forceinline__ void cp_async_arrive_noinc(uint32_t bar) {
#if MOE_HAS_WGMMA
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
#endif
}

// Full/empty mbarrier pairs of a STAGES-deep pipeline: one producer thread
// fills buffer kt % STAGES for k step kt by bulk copies once the consumers
// have released its previous use. `bars` is 2 * STAGES barriers in shared
// memory.
// The rule that keeps the waits' parities right: a buffer is refilled only
// after every warp that waits on its full barrier has passed that wait. A
// warp that fell two uses behind would wait on the parity of a phase that is
// running again and wait for ever (run 140: variant 2's idle warpgroups,
// whose warps only waited and released, one release per warpgroup). So each
// waiting warp releases (init counts warps), unless the warps of a
// warpgroup release only after a wgmma that reads the buffer: wgmma runs
// once all four warps have issued it, so its completion proves that each
// of them passed the wait, and one release per warpgroup is enough.
template <int STAGES>
struct Pipeline {
  uint32_t full0, empty0;

  __device__ __forceinline__ explicit Pipeline(uint64_t* bars)
      : full0(uint32_t(__cvta_generic_to_shared(bars))), empty0(full0 + 8 * STAGES) {}
  // By one thread, before a barrier across the block.
  __device__ __forceinline__ void init(uint32_t consumers) const {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full0 + 8 * s, 1);  // the producer's arrive (plus the copies' bytes)
      mbar_init(empty0 + 8 * s, consumers);
    }
    mbar_init_fence();
  }
  // Producer: the full barrier of step kt once its buffer is free, announced
  // to receive `bytes` of copies.
  // `item` only tags a watchdog report (mbar_wait).
  __device__ __forceinline__ uint32_t produce(int kt, uint32_t bytes, int item = -1) const {
    const int s = kt % STAGES;
    if (kt >= STAGES) mbar_wait(empty0 + 8 * s, uint32_t((kt / STAGES - 1) & 1), kt, item);
    const uint32_t bar = full0 + 8 * s;
    mbar_arrive_expect_tx(bar, bytes);
    return bar;
  }
  __device__ __forceinline__ void consume(int kt, int item = -1) const {
    mbar_wait(full0 + 8 * (kt % STAGES), uint32_t((kt / STAGES) & 1), kt, item);
  }
  __device__ __forceinline__ void release(int kt) const { mbar_arrive(empty0 + 8 * (kt % STAGES)); }

  // A pair of blocks (a 2-block cluster) whose producers each fill part of
  // both blocks' buffers: empty barriers count the consumers of both blocks
  // (init(2 * consumers)), consumers arrive on both; the producer side
  // is produce() as for one block (see mbar_arrive_cluster for the scope).
  __device__ __forceinline__ void release_pair(int kt, uint32_t rank) const {
    const uint32_t bar = empty0 + 8 * (kt % STAGES);
    mbar_arrive_cluster(map_to_rank(bar, rank));
    mbar_arrive_cluster(map_to_rank(bar, rank ^ 1u));
  }
};

// Register budget of a warpgroup (sm_90a; the kernel needs a register cap at entry).
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
#if MOE_HAS_WGMMA
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
#if MOE_HAS_WGMMA
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

// The register split of a warp-specialized block of THREADS threads
// (__launch_bounds__(THREADS, 1)), whose PRODUCERS first threads give
// registers back (setmaxnreg.dec to DEC) and whose other threads take them
// (setmaxnreg.inc to INC). The block is launched with LAUNCH registers per
// thread (the register file over its threads, in steps of 8: ptxas caps
// these kernels there), and setmaxnreg.inc waits until the block's own pool
// holds what it asks for: a split that takes more than is given back hangs
// the consumers for ever (run 96: 128 x (168 - 48) given back for
// 256 x (232 - 168) taken). So it is checked here, at compile time.
template <int THREADS, int PRODUCERS, int DEC, int INC>
struct RegSplit {
  static constexpr int LAUNCH = (65536 / THREADS) & ~7;
  static_assert(DEC % 8 == 0 && INC % 8 == 0 && DEC >= 24 && INC <= 256 && DEC <= LAUNCH && INC >= LAUNCH,
                "setmaxnreg counts: multiples of 8 in 24..256, around the launch count");
  static_assert(PRODUCERS % 128 == 0 && THREADS % 128 == 0, "whole warpgroups");
  static_assert(PRODUCERS * (LAUNCH - DEC) >= (THREADS - PRODUCERS) * (INC - LAUNCH),
                "the consumers take more registers than the producers give back: setmaxnreg.inc would wait for ever");
  __device__ __forceinline__ static void producer() { setmaxnreg_dec<DEC>(); }
  __device__ __forceinline__ static void consumer() { setmaxnreg_inc<INC>(); }
};

// A proxy fence between this thread's generic-proxy accesses of shared
// memory and the async proxy's (wgmma operands, bulk and tensor copies):
// shared memory written by cp.async or st.shared that wgmma or a bulk store
// reads next (each writer fences before the barrier), and shared memory read
// by ldmatrix or ld.shared that a tensor copy overwrites next (each reader
// fences before it releases the buffer: gemm::StreamRing::release).
__device__ __forceinline__ void fence_proxy_async() {
#if MOE_HAS_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Bulk stores from shared to global memory (the copy engine, no tensor map):
// `bytes` (a multiple of 16) from shared address saddr to gmem, both 16-byte
// aligned. The shared source was written by the generic proxy: its writers
// fence (fence_proxy_async) before the barrier that precedes the copy. The
// issuing thread commits its copies as one group and waits for their reads
// of shared memory (bulk_wait_read) before that memory is written again,
// and for their completion (bulk_wait) before it exits.
__device__ __forceinline__ void bulk_store(void* gmem, uint32_t saddr, uint32_t bytes) {
#if MOE_HAS_WGMMA
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(gmem), "r"(saddr), "r"(bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void bulk_commit() {
#if MOE_HAS_WGMMA
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void bulk_wait_read() {
#if MOE_HAS_WGMMA
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void bulk_wait() {
#if MOE_HAS_WGMMA
  asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void st_shared32(uint32_t saddr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(saddr), "r"(v) : "memory");
}

// Barrier `id` (1..15; 0 is __syncthreads') of `threads` threads, a multiple
// of 32. A run-time id makes ptxas reserve all 16 barriers of the block
// (one block per SM where it is used: gemm_wgmma_kernel).
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void fence() {
#if MOE_HAS_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void commit() {
#if MOE_HAS_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wait() {
#if MOE_HAS_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Keeps the compiler from moving accumulator reads or writes across the
// asynchronous MMAs (each register becomes an in/out of an empty asm).
template <int R>
__device__ __forceinline__ void fence_operands(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define MOE_WGMMA_D128_REGS \
  "{" \
  "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
  "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
  "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
  "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63," \
  "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79," \
  "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95," \
  "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111," \
  "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127" \
  "}"

#define MOE_WGMMA_D128_OPERANDS(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
  "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
  "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
  "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
  "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
  "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
  "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
  "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])

// d[64 x 256] (+)= A[64 x 16] * B[256 x 16]^T, both K-major in shared memory,
// f32 accumulation; scale_d = 0 overwrites d.
template <class T>
__device__ __forceinline__ void mma_m64n256k16(float (&d)[128], uint64_t desc_a, uint64_t desc_b,
                                               int scale_d) {
#if MOE_HAS_WGMMA
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " MOE_WGMMA_D128_REGS
        ", %128, %129, p, 1, 1, 0, 0;\n}\n"
        : MOE_WGMMA_D128_OPERANDS(d)
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 " MOE_WGMMA_D128_REGS
        ", %128, %129, p, 1, 1, 0, 0;\n}\n"
        : MOE_WGMMA_D128_OPERANDS(d)
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
#else
  (void)d, (void)desc_a, (void)desc_b, (void)scale_d;
  __trap();
#endif
}

#define MOE_WGMMA_D64_REGS \
  "{" \
  "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
  "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
  "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
  "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63" \
  "}"

#define MOE_WGMMA_D64_OPERANDS(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// d[64 x 128] (+)= A[64 x 32] * B[128 x 32]^T, E4M3 codes K-major in shared
// memory (32 bytes of K per step), f32 accumulation; scale_d = 0 overwrites d.
__device__ __forceinline__ void mma_m64n128k32_e4m3(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                    int scale_d) {
#if MOE_HAS_WGMMA
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 " MOE_WGMMA_D64_REGS
      ", %64, %65, p, 1, 1;\n}\n"
      : MOE_WGMMA_D64_OPERANDS(d)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#else
  (void)d, (void)desc_a, (void)desc_b, (void)scale_d;
  __trap();
#endif
}

}  // namespace moe::kernels::wgmma

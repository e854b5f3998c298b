# Sourced by the scripts: finds nvcc where the CUDA toolkit puts it, so that
# the CUDA backend is compiled whenever the toolkit is installed.
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
MOE_BUILD_DIR=${MOE_BUILD_DIR:-build}
MOE_JOBS=${MOE_JOBS:-$(nproc)}
moe_configure() {
  cmake -S . -B "$MOE_BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@"
}

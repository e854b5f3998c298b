# Sourced by the device scripts (tuning_run.sh, ab_libs.sh): run_log_open DIR
# makes the log folder DIR, sets `logs` to it and `summary` to the summary
# file beside it, and writes the GPU's name, driver and top clock there;
# note TEXT... prints a line and appends it to the summary.
run_log_open() {
  logs=$1
  mkdir -p "$logs"
  summary="$(dirname "$logs")/summary.txt"
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader >> "$summary" 2>&1
}
note() { echo "$*" | tee -a "$summary"; }

/* Compiled with -std=c99 -pedantic -Werror (and as C++): the public header
 * must stay plain C with no CUDA, NCCL or C++ types. */
#include <moe/moe.h>

int moe_header_check(void);
int moe_header_check(void) {
  moe_router_config_t rc;
  moe_dispatcher_config_t dc;
  moe_runner_config_t uc;
  rc.struct_size = (uint32_t)sizeof(rc);
  dc.struct_size = (uint32_t)sizeof(dc);
  uc.struct_size = (uint32_t)sizeof(uc);
  return (int)(rc.struct_size + dc.struct_size + uc.struct_size) + MOE_VERSION_MAJOR +
         (int)MOE_STATUS_SUCCESS;
}

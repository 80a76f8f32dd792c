// The float32 task loops for x86-64-v4 (AVX-512).
#define TG_VEC_BYTES 64  // AVX-512's 64-byte registers
#include "tasks.h"

#if TG_ISA_VARIANTS
namespace truthgpt_native {
TG_ENTRY_POINTS(float, f32_v4, TG_TARGET("arch=x86-64-v4"))
}  // namespace truthgpt_native
#endif

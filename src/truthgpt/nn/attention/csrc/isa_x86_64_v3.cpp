// The float32 task loops for x86-64-v3 (AVX2, FMA).
#define TG_VEC_BYTES 32  // AVX2's 32-byte registers
#include "tasks.h"

#if TG_ISA_VARIANTS
namespace truthgpt_native {
TG_ENTRY_POINTS(float, f32_v3, TG_TARGET("arch=x86-64-v3"))
}  // namespace truthgpt_native
#endif

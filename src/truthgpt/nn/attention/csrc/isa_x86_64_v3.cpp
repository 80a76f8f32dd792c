// The float32 task loops for x86-64-v3 (AVX2, FMA).
#include "tasks.h"

#if TG_ISA_VARIANTS
namespace truthgpt_native {
TG_ENTRY_POINTS(float, f32_v3, TG_TARGET("arch=x86-64-v3"))
}  // namespace truthgpt_native
#endif

// The task loops for baseline x86-64 (or the compiler's default target elsewhere), and the
// float64 ones (tests and gradcheck: one build, less compiling).
#define TG_VEC_BYTES 16  // SSE2's 16-byte registers (NEON's too)
#include "tasks.h"

namespace truthgpt_native {
TG_ENTRY_POINTS(float, f32, )
TG_ENTRY_POINTS(double, f64, )
}  // namespace truthgpt_native

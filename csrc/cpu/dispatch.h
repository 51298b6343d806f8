// Run-time choice among the CPU kernel variants compiled into svdq._C (see csrc/cpu/kernels.h).
#pragma once

#include <string>
#include <vector>

namespace svdq::cpu {

// Variants compiled in and supported by this CPU, best last (e.g. {"base", "avx2", "avx512"}).
std::vector<std::string> supported_isas();
// The variant the ops use now: SVDQ_CPU_ISA from the environment if set (and supported), else the best.
std::string active_isa();
// Switch variants (tests compare them); throws for a name that is not supported. Returns the previous one.
std::string set_isa(const std::string& name);

}  // namespace svdq::cpu

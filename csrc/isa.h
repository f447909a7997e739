// The vector ISA a translation unit is compiled for. The CPU kernels (csrc/cpu/*_cpu.cpp) are
// compiled once per ISA (setup.py, CMakeLists.txt: -DCPU_CAPABILITY_AVX2 / _AVX512 and the -m
// flags), like ATen's kernels; csrc/cpu/dispatch.cpp picks one build at load time.
//
// Each build must stay self-contained inside one shared library: its kernels live in
// cetnet::cpu::CETNET_ISA, and every header of ours with inline code puts it in the inline
// namespace CETNET_ISA_NS, so an AVX-512 copy of a helper can never be the one the linker keeps
// for the default build (torch's own inline code is shared; the build links the default
// objects first, so theirs is the copy kept).
#pragma once

#if defined(CPU_CAPABILITY_AVX512)
#define CETNET_ISA avx512
#define CETNET_ISA_NS isa_avx512
#define CETNET_ISA_NAME "avx512"
#elif defined(CPU_CAPABILITY_AVX2)
#define CETNET_ISA avx2
#define CETNET_ISA_NS isa_avx2
#define CETNET_ISA_NAME "avx2"
#else
#define CETNET_ISA base
#define CETNET_ISA_NS isa_base
#define CETNET_ISA_NAME "default"
#endif

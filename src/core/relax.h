/* cp_cpu_relax: the pause instruction of a spin-wait loop (lets the sibling hyperthread run). */
#ifndef CPOOL_RELAX_H
#define CPOOL_RELAX_H

static inline void cp_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

#endif

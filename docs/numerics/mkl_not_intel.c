/* Built by benchmarks/numerics.py and preloaded (LD_PRELOAD) into a probe: oneMKL inside torch then
   takes this CPU for one of another vendor. The torch wheel exports MKL's vendor check, so the
   preloaded one replaces it. A stand-in for MKL's vendor dispatch only: an AMD CPU differs in more
   than this flag (its own code paths, cache sizes). */
int mkl_serv_intel_cpu_true(void) { return 0; }
int mkl_serv_intel_cpu(void) { return 0; }
